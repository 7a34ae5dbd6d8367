"""The package version, in a module of its own so that detector files can record which grood
wrote them (:mod:`grood.persistence` cannot import the package, which imports it)."""

__version__ = "0.1.0"
