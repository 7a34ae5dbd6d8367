"""The package version, in a module of its own so that detector files can record which grood
wrote them (:mod:`grood.persistence` cannot import the package, which imports it)."""

# Unreleased: detector files of format version 2 (grood 0.1 wrote version 1); CHANGELOG.md.
__version__ = "0.2.0.dev0"
