"""Triton kernels for GROOD's hot paths.

One public module per operation (``ncp_gradient``, ``knn``), holding its launcher and the
``compile_launches`` the compile report reads; its kernels (at most one a module besides the
device helpers they call), launch configurations and launch plan live in the private modules
beside it. Every launcher has a same-name, same-signature pure-PyTorch twin in
:mod:`grood.functional`. This package imports ``triton`` only inside the kernel modules, so
listing what it provides (``KERNELS``) is free. ``grood`` reaches the
kernels only through :mod:`grood.ops`, and shares their constants, result type and tie order
through the triton-free :mod:`grood_kernels.contract`. This package never imports ``grood``.
"""

from grood_kernels.contract import KERNEL_DTYPES

#: Operations implemented as Triton kernels (each in a module of the same name), with the input
#: dtypes each kernel accepts. The dispatcher in ``grood.ops`` picks Triton only for these.
KERNELS: dict[str, tuple[str, ...]] = {
    op: tuple(str(dt).removeprefix("torch.") for dt in KERNEL_DTYPES)
    for op in ("ncp_gradient", "knn")
}
