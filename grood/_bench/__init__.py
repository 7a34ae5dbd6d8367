"""Benchmark code of ``grood bench``: imported only when that command runs, never by the
library (a test holds that). ``report`` is the entry point; ``gradient`` and ``search`` build
its tables from ``common``."""
