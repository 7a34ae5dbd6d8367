"""Adapters that let other OOD frameworks call grood as a backend.

Neither framework is imported here or by the adapters at import time; both adapters follow the
frameworks' protocols by their method names and signatures.
"""
