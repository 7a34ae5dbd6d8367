"""The one place that chooses a backend for each operation.

``backend="torch"`` always runs :mod:`grood.functional`. ``backend="triton"`` runs the kernel
from :mod:`grood_kernels` and raises :class:`BackendUnavailableError` with the reason when it
cannot (no kernel for that operation, triton not installed, tensors not on a CUDA device and
``TRITON_INTERPRET=1`` not set, ``bf16`` under an interpreter that computes it wrongly).
``backend="auto"`` takes Triton when it can run and falls back to torch quietly otherwise.
Nothing is decided at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grood import functional
from grood._checks import check_not_tracked
from grood.errors import BackendUnavailableError
from grood.functional import NCPGradient

BACKENDS = ("auto", "torch", "triton")
OPERATIONS = ("ncp_gradient", "knn")


def check_backend_name(backend: str) -> None:
    """Raise a clear error for anything but ``auto``, ``torch`` or ``triton``."""
    if backend not in BACKENDS:
        a_device = isinstance(backend, str) and backend.split(":")[0].lower() in (
            "cpu", "cuda", "gpu")
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}" + (
            " (backend picks the implementation: torch, or the Triton kernels; where it runs "
            "is device=...)" if a_device else ""))


def triton_unavailable_reason(op: str, device: torch.device,
                              dtype: torch.dtype | None = None,
                              precision: str | None = None) -> str | None:
    """Why the Triton kernel for ``op`` cannot run on ``device`` and ``dtype`` (in
    ``precision``, where given), or None."""
    import grood_kernels

    if op not in grood_kernels.KERNELS:
        return f"this version of grood has no Triton kernel for {op!r}"
    supported = grood_kernels.KERNELS[op]
    if dtype is not None and str(dtype).removeprefix("torch.") not in supported:
        name = str(dtype).removeprefix("torch.")
        return (f"the {op} kernel takes {', '.join(supported)} inputs, not {name}" + (
            " (backend='auto' runs float64 in PyTorch, in float64; for the kernels cast to "
            "float32: x.float() (torch), x.astype(np.float32) (numpy; a Python list is "
            "float64)"
            if dtype == torch.float64 else ""))
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked installation
        found = False
    if not found:
        return "triton is not installed (pip install 'grood[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the tensors are on {device.type!r}: Triton kernels run on CUDA devices, and on the "
            "CPU only under the interpreter (export TRITON_INTERPRET=1 before starting Python)"
        )
    if device.type == "cuda" and torch.version.hip is not None:
        # ROCm's torch names AMD GPUs "cuda" too. The kernels' launch configurations, shared
        # memory sizes and dot precisions (tf32x3; tf32 outside gfx942) are NVIDIA's.
        return (f"{device} is an AMD GPU (torch built for ROCm {torch.version.hip}): grood's "
                "Triton kernels are built and tested for NVIDIA GPUs; the torch backend runs "
                "there, with the same answers")
    if precision is not None:
        from grood_kernels._dot import check_bf16_runs

        try:
            check_bf16_runs(precision, device)
        except RuntimeError as exc:  # (bf16 under an interpreter that computes it wrongly)
            return str(exc)
    return None


def resolve_backend(backend: str, op: str, device: torch.device | str,
                    dtype: torch.dtype | None = None, precision: str | None = None) -> str:
    """Return the concrete backend (``"torch"`` or ``"triton"``) for ``op``.

    ``auto`` takes Triton only for CUDA tensors (on the CPU the interpreter is far slower than
    torch), and not for the search in ``ieee`` (``precision`` None: the default, ``ieee``):
    there the Triton kernel's fp32 FMA dot ran 3.9x slower than torch's cuBLAS GEMM (H200,
    2026-12-04: 10,000 queries over 1.28 M x 2,048 rows, 7.71 s against 1.96 s, both exact).
    ``triton`` also runs on the CPU under ``TRITON_INTERPRET=1``, in ``bf16`` only where the
    interpreter computes bf16 as a GPU does (Triton 3.6 to 3.9's does not).
    """
    check_backend_name(backend)
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; known: {OPERATIONS}")
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    # (auto runs torch off a GPU whatever the precision: no interpreter probe for it)
    reason = triton_unavailable_reason(op, device, dtype,
                                       precision if backend == "triton" else None)
    if backend == "triton":
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run {op}: {reason}")
        return "triton"
    if op == "knn" and (precision or "ieee") == "ieee":
        return "torch"
    return "triton" if reason is None and device.type == "cuda" else "torch"


def resolve_backends(backend: str, device: torch.device | str,
                     dtype: torch.dtype | None = None, precision: str | None = None
                     ) -> dict[str, str]:
    """The concrete backend of every operation, for a detector asked to use ``backend``.

    An explicit ``"triton"`` applies to the operations grood has a Triton kernel for (and
    raises if one of those cannot run); operations without a kernel run on torch, which the
    returned mapping shows.
    """
    import grood_kernels

    return {op: resolve_backend("torch" if backend == "triton" and op not in
                                grood_kernels.KERNELS else backend, op, device, dtype,
                                precision)
            for op in OPERATIONS}


def get_op(op: str, backend: str) -> Callable[..., Any]:
    """The implementation of ``op`` for an already resolved backend."""
    if backend == "torch":
        return getattr(functional, op)
    if backend == "triton":
        return getattr(importlib.import_module(f"grood_kernels.{op}"), op)
    raise ValueError(f"resolved backend must be 'torch' or 'triton', got {backend!r}")


def ncp_gradient(h: Tensor, prototypes: Tensor, ood_prototype: Tensor, *, backend: str = "auto",
                 **kwargs: Any) -> NCPGradient:
    """:func:`grood.functional.ncp_gradient` on the chosen backend (not differentiable:
    inputs that autograd tracks are refused on every backend)."""
    check_not_tracked("ncp_gradient", h, prototypes, ood_prototype)
    impl = resolve_backend(backend, "ncp_gradient", h.device, h.dtype,
                           kwargs.get("precision"))
    return functional.NCPGradient(*get_op("ncp_gradient", impl)(h, prototypes, ood_prototype,
                                                                 **kwargs))


def knn(queries: Tensor, database: Tensor, k: int = 1, *, backend: str = "auto",
        **kwargs: Any) -> tuple[Tensor, Tensor]:
    """:func:`grood.functional.knn` on the chosen backend; returns ``(D, I)`` (not
    differentiable: inputs that autograd tracks are refused on every backend)."""
    check_not_tracked("knn", queries, database)
    impl = resolve_backend(backend, "knn", queries.device, queries.dtype,
                           kwargs.get("precision"))
    return get_op("knn", impl)(queries, database, k, **kwargs)
