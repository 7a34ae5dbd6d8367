"""What the Triton kernels and their PyTorch twins share, in one triton-free module.

``grood_kernels`` never imports ``grood``; ``grood.functional`` (the twins), ``grood.ops`` (the
dispatcher) and the kernels all import the names below from here, so a precision mode, a
candidate count, the scaling rule or the tie order cannot drift apart between a kernel and its
twin. Importing this module imports torch only.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from grood_kernels._derived import kept_per_prototypes
from grood_kernels._derived import pinning_kept_values as pinning_kept_values

#: GEMM precision modes, by name: fp32 FMA, one tf32 product, three tf32 products
#: (fp32-faithful), bf16 operands (see :func:`grood.functional.ncp_gradient`).
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
#: ``precision`` -> the ``DOT_MODE`` constant of the kernels' ``tl.dot`` helper.
DOT_MODES = {name: mode for mode, name in enumerate(PRECISIONS)}

#: Nearest prototypes per row whose distances are recomputed exactly (fp32 differences, no
#: GEMM expansion) after the blocked pass; they dominate q_ood, lse and the prediction.
NCP_CANDIDATES = 4
#: Extra nearest-neighbour candidates per query, beyond k, re-ranked by their exact distance:
#: near-ties the matrix-multiply expansion misorders by rounding are put right.
RERANK_EXTRA = 4

#: Input dtypes the kernels take (the twins also take float64).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NCPGradient(NamedTuple):
    """Result of ``ncp_gradient`` (kernel and twin alike).

    Attributes:
        grad (Tensor): gradient of the NCP loss w.r.t. the OOD prototype, shape [N, D].
        q_ood (Tensor): softmax probability of the OOD prototype, shape [N].
        pred (Tensor): index of the nearest class prototype (int64, first on ties), shape [N].
            Ties are settled among the ``NCP_CANDIDATES`` nearest by the distance GEMM: where
            more prototypes than that are at exactly the same distance (five duplicates of one
            prototype), the GEMM's rounding, which can differ between its output columns,
            decides which of them are compared.
        min_dist (Tensor): Euclidean (not squared) distance to that prototype, shape [N].
        lse (Tensor): log-sum-exp of the C + 1 negative distances, shape [N].
    """

    grad: Tensor
    q_ood: Tensor
    pred: Tensor
    min_dist: Tensor
    lse: Tensor


def check_precision(precision: str) -> None:
    """Raise a clear error for an unknown precision mode."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def integer_value(value: Any) -> int | None:
    """``value`` as a Python int if it is a Python, numpy or 0-d torch integer (not a bool,
    numpy's included, not a float such as 2.0), else None."""
    if type(value).__name__ in ("bool", "bool_") or (
            isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a Python int if it is a positive integer (see :func:`integer_value`), else
    a clear error (one rule for grood's parameters and both backends' ``k``)."""
    number = integer_value(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def check_has_columns(d: int, what: str) -> None:
    """Refuse vectors of dimension 0 (every distance would be 0; the kernels' tiling divides
    by D)."""
    if d == 0:
        raise ValueError(f"{what} have dimension 0: vectors need at least one component")


def check_dense(**tensors: Tensor | None) -> None:
    """Refuse what is not a tensor (a NumPy array) and sparse (or other non-strided) tensors by
    name, before any kernel or torch op fails on them with an error about storage, a missing
    backend or a missing attribute."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            hint = (" (torch.from_numpy(x) makes one without a copy; GROOD's own methods also "
                    "take NumPy arrays)" if type(t).__module__.split(".")[0] == "numpy" else "")
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{name} is a {str(t.layout).removeprefix('torch.')} tensor; pass "
                            "a dense one (tensor.to_dense())")


def max_abs(x: Tensor) -> float:
    """Largest absolute value of ``x``, by a reduction (no ``|x|`` temporary); NaN if ``x``
    holds a NaN."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def pow2_scale(magnitude: float) -> float:
    """1 for magnitudes in [2**-20, 2**20]; otherwise the power of two nearest ``magnitude``.

    Dividing by a power of two is exact, so rescaled results equal unscaled ones wherever the
    latter do not overflow or underflow. The gradient step takes it from the prototypes'
    magnitude alone (:func:`ncp_scale`), never from the features.
    """
    if magnitude == 0.0 or not math.isfinite(magnitude) or 2.0**-20 <= magnitude <= 2.0**20:
        return 1.0
    return 2.0 ** round(math.log2(magnitude))


def ncp_scale(prototypes: Tensor, ood_prototype: Tensor) -> float:
    """The gradient step's unit (kernel and twin): :func:`pow2_scale` of the largest absolute
    value of the prototypes and the OOD prototype, kept with them, so a detector reduces its
    prototypes once and no feature value is ever read on the host. Prototypes or an OOD
    prototype holding NaN or Inf are refused (ValueError naming the rows)."""
    return pow2_scale(kept_per_prototypes(
        prototypes, ood_prototype, ("magnitude",),
        lambda: _finite_magnitude(prototypes, ood_prototype)))


def _finite_magnitude(prototypes: Tensor, ood_prototype: Tensor) -> float:
    """The prototypes' largest absolute value, refusing NaN or Inf by row: one prototype's NaN
    would make every row's softmax NaN (the torch twin) or be passed over by the kernels'
    comparisons, so no backend could give an answer worth having. The magnitude is read on the
    host anyway, so the check costs nothing more."""
    magnitudes = max_abs(prototypes), max_abs(ood_prototype)
    if all(map(math.isfinite, magnitudes)):  # (Python's max passes over a NaN)
        return max(magnitudes)
    bad = (~torch.isfinite(prototypes).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:5]))
        more = f" (first 5 of {len(bad)})" if len(bad) > 5 else ""
        raise ValueError(f"prototypes contains NaN or Inf in row(s) {shown}{more}: every "
                         "class prototype must be finite")
    raise ValueError("ood_prototype contains NaN or Inf: the OOD prototype must be finite")


def check_sq_norms(sq_norms: Tensor, prototypes: Tensor, ood_prototype: Tensor) -> None:
    """Refuse given squared norms ``||p_c - p_o||^2`` that are not [C], or not those of the
    prototypes (NaN, Inf, negative, or from another prototype set, OOD prototype or class
    order): the kernels and twins trust them in the distance expansion, where a wrong one moves
    its class silently. The values are checked once per (norms, prototypes, OOD prototype)
    while all three live unmodified, so a detector or head that passes the same norms every
    call reads them once, and after the prototypes' own check (:func:`ncp_scale`). The
    tolerance (:func:`sq_norms_mismatch`) accepts the squares summed in any order in fp32 or
    float64, and nothing that would move a class."""
    c = prototypes.shape[0]
    if tuple(sq_norms.shape) != (c,):
        raise ValueError(f"prototype_sq_norms must have shape [{c}], got {tuple(sq_norms.shape)}")
    kept_per_prototypes(prototypes, ood_prototype, ("given squared norms",),
                        lambda: _check_sq_norms(sq_norms, prototypes, ood_prototype),
                        also=(sq_norms,))


def centred_sq_norms(prototypes: Tensor, ood_prototype: Tensor,
                     dtype: torch.dtype = torch.float64, block: int = 4096) -> Tensor:
    """``||p_c - p_o||^2`` per class [C], summed in float64 over blocks of classes (no
    [C, D] float64 temporary), in ``dtype``."""
    out = torch.empty(prototypes.shape[0], dtype=dtype, device=prototypes.device)
    p_o = ood_prototype.to(torch.float64)
    for c0 in range(0, prototypes.shape[0], block):
        diff = prototypes[c0:c0 + block].to(torch.float64) - p_o
        out[c0:c0 + block] = (diff * diff).sum(1)
    return out


def _check_sq_norms(sq_norms: Tensor, prototypes: Tensor, ood_prototype: Tensor) -> bool:
    ncp_scale(prototypes, ood_prototype)  # NaN or Inf prototypes are named as such
    bad = sq_norms_mismatch(sq_norms, centred_sq_norms(prototypes, ood_prototype))
    if bad:
        raise ValueError(f"prototype_sq_norms are not ||p_c - p_o||^2 of these prototypes and "
                         f"OOD prototype at class(es) {bad}: pass the squared norms of the "
                         "prototypes relative to the OOD prototype, or none")
    return True


def sq_norms_mismatch(given: Tensor, expected: Tensor) -> str:
    """Where squared norms ``given`` [M] are not ``expected`` [M] (float64): neither equal to
    them rounded to ``given``'s dtype (which takes norms that overflow or underflow it) nor
    within 1e-3 relative (or that dtype's rounding, where coarser) plus 1e-6 of the largest.
    NaN, and Inf or negative values where the norms fit, never agree. "" where they all agree,
    else the first three indices with both values, and the count."""
    given = given.to(expected.device)
    if given.is_floating_point():
        rtol = max(1e-3, torch.finfo(given.dtype).eps)
        rounded = given == expected.to(given.dtype)
    else:
        rtol, rounded = 1e-3, torch.zeros(given.shape, dtype=torch.bool, device=given.device)
    given = given.to(torch.float64)
    expected = expected.to(torch.float64)
    top = float(expected.max()) if expected.numel() else 0.0
    near = (given - expected).abs() <= rtol * expected + 1e-6 * top
    bad = (~(rounded | near)).nonzero().flatten()
    if bad.numel() == 0:
        return ""
    shown = ", ".join(f"{int(i)} (given {float(given[i]):.6g}, expected "
                      f"{float(expected[i]):.6g})" for i in bad[:3])
    return shown + (f"; {bad.numel()} in all" if bad.numel() > 3 else "")


def lex_order(dist: Tensor, idx: Tensor) -> Tensor:
    """Per-row order by (distance, index); a missing candidate (index -1) sorts last among
    equal distances. Equal distances go to the lower index, as in exact search."""
    order = torch.argsort(torch.where(idx < 0, torch.iinfo(torch.int64).max, idx), dim=1)
    by_dist = torch.sort(dist.gather(1, order), dim=1, stable=True).indices
    return order.gather(1, by_dist)


def lex_sort(dist: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """``(dist, idx)`` with each row sorted by :func:`lex_order`."""
    order = lex_order(dist, idx)
    return dist.gather(1, order), idx.gather(1, order)


#: Per device type, held by :func:`matmul_precision` while it has that device's matmul setting
#: changed. The setting is one per process: two threads each saving and restoring it around
#: their own GEMM, interleaved, would leave the second one's value (the guard's, not the
#: program's) in place for good. Re-entrant, so a guard inside a guard in one thread restores
#: the outer one's value.
_matmul_setting_locks = {"cuda": threading.RLock(), "cpu": threading.RLock()}


@contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Let CUDA float32 matmuls use TF32 only in ``tf32`` mode, and keep the CPU's in fp32
    in every mode (restored afterwards).

    On the CPU, oneDNN runs float32 matmuls with bf16 or TF32 arithmetic where the program
    asked for it (``torch.set_float32_matmul_precision("medium")`` or ``("high")``, or
    ``torch.backends.mkldnn.matmul.fp32_precision``) and the CPU has the instructions; the
    torch backend's GEMM is fp32 there whatever the mode (``tf32`` is ``ieee`` on the CPU,
    ``bf16`` rounds its operands itself), so its answers do not depend on that setting.

    Through the per-backend setting (``torch.backends.cuda.matmul.fp32_precision``,
    ``torch.backends.mkldnn.matmul.fp32_precision``) alone, the value ATen's matmuls read:
    the legacy getters (``allow_tf32``, ``torch.get_float32_matmul_precision``) raise once a
    program has set TF32 through the per-backend or generic API. Reading the setting answers
    the generic one (``torch.backends.fp32_precision``) where this backend's own is
    ``"none"``; it is given back as ``"none"`` then, so nothing stays pinned. A CPU setting
    that is fp32 already is left alone.

    Safe in threads: a thread whose guard changes the setting holds it alone until it has
    given the setting back (the guards around a GEMM are short; on a GPU they enclose a
    launch)."""
    # oneDNN's flags are a module attribute torch sets at run time, unknown to its stubs.
    cpu_flags = getattr(torch.backends.mkldnn, "matmul", None)
    flags: Any
    if device.type == "cuda":
        flags = torch.backends.cuda.matmul
        want = "tf32" if precision == "tf32" else "ieee"
    elif device.type == "cpu" and cpu_flags is not None:
        flags, want = cpu_flags, "ieee"
    else:
        yield
        return
    with _matmul_setting_locks[device.type]:
        own = flags.fp32_precision
        # Read under the lock: outside it, an fp32 value may be another thread's guard's, given
        # back while this thread's GEMM runs. Here it is the program's, or this thread's own
        # outer guard's.
        change = device.type == "cuda" or own not in ("none", "ieee")
        if change:
            # The global setting is a module attribute torch sets at run time, unknown to
            # its stubs.
            generic = torch.backends.fp32_precision  # type: ignore[attr-defined]
            saved = "none" if own == generic else own
            flags.fp32_precision = want
            try:
                yield
            finally:
                flags.fp32_precision = saved
            return
    yield
