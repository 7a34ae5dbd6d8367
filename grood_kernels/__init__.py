"""Triton kernels for GROOD's hot paths.

One kernel per module, each with its launcher; every kernel has a same-name, same-signature
pure-PyTorch twin in :mod:`grood.functional`. This package imports ``triton`` only inside the
kernel modules, so listing what it provides (``KERNELS``) is free. ``grood`` reaches it only
through :mod:`grood.ops`.
"""

#: Operations implemented as Triton kernels (each in a module of the same name), with the input
#: dtypes each kernel accepts. The dispatcher in ``grood.ops`` picks Triton only for these.
KERNELS: dict[str, tuple[str, ...]] = {
    "ncp_gradient": ("float16", "bfloat16", "float32"),
    "knn": ("float16", "bfloat16", "float32"),
}
