"""The gradient step of a fitted detector: ``g(h)`` of feature batches, on one backend.

Holds what is computed once per fit, and recomputes in float64 the rows whose distances are too
large for the float32 softmax to resolve (such rows are far out of distribution, not errors).
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

from grood import functional, ops
from grood._checks import compute_dtype, ordinary
from grood.functional import NCPGradient
from grood_kernels import contract
from grood_kernels.contract import kept_per_prototypes


def centred_sq_norms(protos: Tensor, p_ood: Tensor) -> Tensor:
    """``||p_c - p_o||^2`` per class [C], summed in float64, in the compute dtype of the
    prototypes (float32 for half-precision ones, whose range the norms may pass)."""
    return contract.centred_sq_norms(protos, p_ood, compute_dtype(protos.dtype))


class GradientStep:
    """The NCP gradient of feature batches against fixed prototypes, on one backend.

    Holds the implementation chosen by :mod:`grood.ops` and the squared norms of the
    prototypes relative to the OOD prototype, computed once per fit and recomputed if either
    tensor is changed in place (a fitted detector's ``class_prototypes_`` is this tensor).
    """

    def __init__(self, protos: Tensor, p_ood: Tensor, backend: str, precision: str) -> None:
        self.protos, self.p_ood, self.precision = protos, p_ood, precision
        self.fn = ops.get_op("ncp_gradient", backend)

    @property
    def sq_norms(self) -> Tensor:
        """``||p_c - p_o||^2`` per class [C], kept while both tensors live unmodified."""
        # An ordinary tensor even when first made under torch.inference_mode: the ops check
        # given norms once per tensor, which needs its version counter.
        return kept_per_prototypes(self.protos, self.p_ood, ("centred sq norms",),
                                   lambda: ordinary(centred_sq_norms(self.protos, self.p_ood)))

    def __call__(self, h: Tensor) -> NCPGradient:
        if h.dtype == torch.float64 and self.protos.dtype != torch.float64:
            # float64 features are computed in float64 (the kernels take no float64).
            return functional.ncp_gradient(h, self.protos, self.p_ood)
        return self.fn(h, self.protos, self.p_ood, precision=self.precision,
                       prototype_sq_norms=self.sq_norms)

    def resolved(self, h: Tensor, row_offset: int) -> NCPGradient:
        """``self(h)`` with the rows float32 cannot resolve redone in float64
        (:func:`resolve_far_rows`; ``row_offset`` numbers the rows in its errors)."""
        return resolve_far_rows(self(h), h, self.protos, self.p_ood, row_offset)


# Largest feature-to-prototype distance the float32 softmax resolves: at 2**16 a float32
# distance is accurate to about 2**-8, and q_ood = exp(-d_ood - lse) carries two such errors:
# up to 0.6 % relative at distances of 6e4 (measured against float64 on C = 10, 100 and 1,000
# classes; about 1e-7 times the distance: 1e-4 at 1e3, 1e-3 at 1e4).
FLOAT32_DISTANCE_LIMIT = 2.0**16


# float64 resolves the softmax of distances up to 2**44 (the same relative resolution).
FLOAT64_DISTANCE_LIMIT = 2.0**44


def tiny_gradient_norm(dtype: torch.dtype) -> float:
    """The gradient norm (q_ood) below which squared distances between such gradients fall
    under ``dtype``'s smallest normal number: 2**-63 (about 1.1e-19) in float32, 2**-511 in
    float64. Scores of samples near such gradients lose precision, then tie at 0."""
    return float(torch.finfo(dtype).tiny) ** 0.5


#: How far a row's gradient computed in a wider dtype may lie from the same row's gradient
#: computed in ``dtype`` (an indexed one), relative to its norm ``q_ood``, in units of
#: ``dtype``'s epsilon times ``1 + d_ood + |lse|`` (``q_ood = exp(-d_ood - lse)`` carries the
#: rounding of both), plus, where its entries reach ``dtype``'s subnormal range, their
#: spacing there over D entries. ``bench/rounding_distance.py``: float64 gradients of float32
#: training rows lie at most 1.08 units from the float32 ones the fit indexed (C = 3 to 100,
#: D = 2 to 2,048, the digits, features sharing an offset of 1e5, five draws of each), new
#: rows at least 1,060 units from their nearest indexed gradient (a 2-D set; 2,650 at D = 8,
#: 39,800 and more from D = 16); rows whose float32 gradients are subnormal apart
#: (:func:`subnormal_rows`).
ROUNDING_UNITS = 8.0


def _narrower(res: NCPGradient, dtype: torch.dtype) -> tuple[torch.finfo, float] | None:
    """``dtype``'s ``finfo`` and the gradient norm below which its entries reach its subnormal
    range (``sqrt(D)`` times its smallest normal number), where ``dtype`` is narrower than
    ``res``'s rows; None where it is as wide."""
    info = torch.finfo(dtype)
    if info.eps <= torch.finfo(res.q_ood.dtype).eps:
        return None
    return info, res.grad.shape[1] ** 0.5 * info.tiny


def rounding_distance(res: NCPGradient, dtype: torch.dtype) -> Tensor:
    """Squared distances [N] (in ``res``'s dtype) within which each row's gradient equals
    an indexed gradient computed in ``dtype`` from the same features: 0 where ``dtype`` is as
    wide as the rows' (their gradients are then computed alike, and equal ones are at
    distance 0), else ``ROUNDING_UNITS`` of ``dtype``'s rounding (float64 features scored
    by a float32 detector); 0 where ``q_ood`` is 0."""
    q = res.q_ood
    narrower = _narrower(res, dtype)
    if narrower is None:
        return torch.zeros_like(q)
    info, subnormal = narrower
    spread = 1 + (torch.log(q) + res.lse).abs() + res.lse.abs()  # 1 + d_ood + |lse|
    tol = ROUNDING_UNITS * (info.eps * q * spread + subnormal * info.eps)  # (+ the spacing)
    return torch.where(q > 0, tol * tol, torch.zeros_like(q))


def subnormal_rows(res: NCPGradient, dtype: torch.dtype) -> Tensor:
    """Rows [N] (bool) of a dtype wider than ``dtype`` whose gradients, computed in
    ``dtype``, reach its subnormal range (``q_ood`` below ``sqrt(D)`` times its smallest
    normal number): there ``dtype`` rounds them by more than their differences from other
    such rows, so one within :func:`rounding_distance` of an indexed gradient cannot be told
    from its own, and none is counted as a training row (a fit in ``dtype`` warned of such
    gradients). All False where ``dtype`` is as wide as the rows'."""
    narrower = _narrower(res, dtype)
    if narrower is None:
        return torch.zeros_like(res.q_ood, dtype=torch.bool)
    return res.q_ood < narrower[1]


def resolved_rows(res: NCPGradient) -> Tensor:
    """Rows [N] (bool, on the device; no value is read on the host) whose results are finite
    and within the distance their dtype's softmax resolves (``FLOAT32_DISTANCE_LIMIT`` for
    float32 results, ``FLOAT64_DISTANCE_LIMIT`` for float64 ones). Non-finite features give
    non-finite results, so they are never resolved."""
    # A gradient row has norm <= 1, so its sum cannot overflow: it is finite exactly when
    # every entry is (one reduction instead of an [N, D] isfinite).
    ok = torch.isfinite(res.q_ood) & torch.isfinite(res.lse) & torch.isfinite(res.grad.sum(1))
    limit = (FLOAT64_DISTANCE_LIMIT if res.lse.dtype == torch.float64
             else FLOAT32_DISTANCE_LIMIT)
    return ok & (res.min_dist <= limit) & (-res.lse <= limit)


def resolve_far_rows(res: NCPGradient, xb: Tensor, protos: Tensor, p_ood: Tensor,
                     offset: int) -> NCPGradient:
    """Recompute in float64 the rows float32 cannot resolve; refuse only beyond float64.

    Finite features can give non-finite or meaningless softmax terms in float32 when the
    distances are huge: the softmax of negative distances is not scale-invariant, and float32
    cannot resolve distance differences below its resolution at that magnitude. Such a row is
    far out of distribution, not an error: it alone is redone in float64 (on every backend),
    and its float64 results replace the float32 ones. Rows beyond ``FLOAT64_DISTANCE_LIMIT``
    are refused (ValueError naming the first), float64 features' rows among them: there the
    distances' rounding exceeds the differences the softmax turns on, so ``q_ood``, the class
    and the score would come from rounding alone.
    """
    ok = resolved_rows(res)
    if bool(ok.all()):
        return res
    bad = (~ok).nonzero()[:, 0]
    if res.lse.dtype == torch.float64:  # computed in float64 already: nothing to redo
        _refuse_far_row(xb, int(bad[0]), offset)
    r64 = functional.ncp_gradient(xb[bad].double(), protos.double(), p_ood.double())
    good64 = resolved_rows(r64)
    if not bool(good64.all()):
        _refuse_far_row(xb, int(bad[int((~good64).nonzero()[0])]), offset)
    fields = []
    for mine, fixed in zip(res, r64, strict=True):
        out = mine.clone()
        out[bad] = fixed.to(mine.dtype)
        fields.append(out)
    return NCPGradient(*fields)


def _refuse_far_row(xb: Tensor, first: int, offset: int) -> NoReturn:
    """Raise the error naming row ``first`` of ``xb`` (numbered from ``offset``), which lies
    beyond what float64's softmax of distances resolves."""
    top = float(xb[first].abs().max())
    raise ValueError(f"features in row {first + offset} (values up to {top:.3g}) "
                     f"lie farther than {FLOAT64_DISTANCE_LIMIT:.3g} from the prototypes, "
                     "beyond what the softmax of distances resolves even in float64; "
                     "rescale them (GROOD's scores depend on the scale)")
