"""Triton kernels for GROOD's hot paths.

One kernel per module, each with its launcher; every kernel has a same-name, same-signature
pure-PyTorch twin in :mod:`grood.functional`. This package imports ``triton`` only inside the
kernel modules, so listing what it provides (``KERNELS``) is free. ``grood`` reaches it only
through :mod:`grood.ops`.
"""

#: Names of the operations this package implements as Triton kernels, each in a module of the
#: same name. The dispatcher in ``grood.ops`` picks the Triton backend only for names listed
#: here.
KERNELS: frozenset[str] = frozenset()
