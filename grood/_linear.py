"""What the baselines that read features through the classifier's last layer (ViM, ReAct)
need: that layer, given or recovered from training features and logits by least squares,
and exact order statistics of every entry of a feature matrix, streamed (ReAct's clipping
percentile over N x D values that need not fit in memory twice).

Both stream over row batches in float64 sums, so a fit's memory is one batch and D x D
(or 65,536-bin) accumulators, not a copy of the features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from grood._checks import as_tensor, check_finite_rows, check_matrix

#: Eigenvalues of the training features' scatter at or below this fraction of the largest
#: are taken for directions the features do not span (float32 rounding of an exact linear
#: dependence leaves ~1e-14 of it; real features' smallest variances lie far above).
SPAN_RCOND = 1e-10
#: The largest residual a recovered last layer may leave, as a fraction of the logits'
#: spread about their mean (root mean square): float32 logits leave ~1e-7, bfloat16 ones
#: (autocast) ~3e-3; features another layer than the one the logits are an affine map of
#: leave far more.
HEAD_TOLERANCE = 1e-2
#: A digit of the radix selection: 16 bits, 65,536 bins a pass.
_DIGIT = 16


def checked_head(weight: object, bias: object, d: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """The classifier's last layer as given (``weight`` [C, D], ``bias`` [C]: an
    ``nn.Linear``'s ``.weight`` and ``.bias``), checked against the features' width ``d`` and
    copied in ``dtype`` onto ``device``."""
    w = as_tensor(weight, "weight")[0]
    check_matrix(w, "weight", n_cols=d, cols_from="the features have {} columns")
    check_finite_rows(w, "weight")
    b = as_tensor(bias, "bias")[0]
    if b.ndim != 1 or b.shape[0] != w.shape[0] or not b.is_floating_point():
        raise ValueError(f"bias must be a floating-point vector of {w.shape[0]} entries (one "
                         f"per row of weight), got {b.dtype} of shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("bias holds NaN or Inf entries")
    return (w.detach().to(device=device, dtype=dtype, copy=True),
            b.detach().to(device=device, dtype=dtype, copy=True))


class Scatter:
    """The rows' count, mean and scatter, accumulated batch by batch in float64 about the
    first batch's mean (so features far from the origin do not cancel): ``shift`` (that
    mean), ``sx`` (the rows less it, summed) and ``xx`` (their outer products, summed)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.xx = self.sx = torch.zeros(0)

    def add_rows(self, x: Tensor) -> Tensor:
        """Add a batch of rows [B, D]; returns them less the shift, in float64."""
        x = x.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.xx = x.new_zeros((x.shape[1],) * 2)
            self.sx = x.new_zeros(x.shape[1])
        xc = x - self.shift
        self.xx += xc.T @ xc
        self.sx += xc.sum(0)
        self.n += x.shape[0]
        return xc

    def scatter(self) -> tuple[Tensor, Tensor]:
        """The rows' mean [D] and their scatter about it [D, D] (the sum of the rows' outer
        products less their mean), float64, from the sums (no pass over the rows)."""
        assert self.shift is not None  # (fits have rows)
        mean = self.sx / self.n  # (about the shift)
        return mean + self.shift, self.xx - self.n * torch.outer(mean, mean)


class HeadFit(Scatter):
    """Least squares ``logits ~ features @ weight.T + bias``, accumulated batch by batch in
    float64 about the first batch's mean (the features' :class:`Scatter`, and their cross
    products with the logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.xl = self.sl = torch.zeros(0)
        #: The precision the logits were held in (:func:`held_in`, batch by batch): the
        #: recovered layer's values are known no better.
        self.held = torch.float32

    def add(self, x: Tensor, logits: Tensor) -> None:
        """Add a batch of features [B, D] and their logits [B, C]."""
        lg = logits.to(torch.float64)
        if self.held == torch.float32 and logits.dtype == torch.float64:
            self.held = held_in(lg)
        if self.shift is None:
            self.xl = lg.new_zeros((x.shape[1], lg.shape[1]))
            self.sl = lg.new_zeros(lg.shape[1])
        xc = self.add_rows(x)
        self.xl += xc.T @ lg
        self.sl += lg.sum(0)

    def solve(self) -> tuple[Tensor, Tensor]:
        """``(weight [C, D], bias [C])`` in float64; an error where the training features do
        not span their space (the weights along the missing directions are then not
        determined by the logits)."""
        assert self.shift is not None  # (fits have rows)
        n, d = self.n, self.xx.shape[0]
        mean = self.sx / n  # (about the shift)
        scatter = self.xx - n * torch.outer(mean, mean)
        cross = self.xl - n * torch.outer(mean, self.sl / n)
        evals, evecs = torch.linalg.eigh((scatter + scatter.T) / 2)
        top = float(evals.max().clamp_min(0))
        rank = int((evals > SPAN_RCOND * top).sum()) if top > 0 else 0
        if rank < d:
            rows = (f" ({n} training rows for {d} feature columns: a fit needs more rows "
                    "than columns)" if n <= d else
                    " (a column constant over the training set, or one the others determine)")
            raise ValueError(
                f"the training features span {rank} of their {d} dimensions{rows}: the last "
                f"layer's weights along the other {d - rank} cannot be recovered from the "
                "logits; pass the classifier's weight and bias to fit instead (grood eval: "
                "--head FILE)")
        weight_t = evecs @ ((evecs.T @ cross) / evals[:, None])  # [D, C]
        bias = self.sl / n - (mean + self.shift) @ weight_t
        return weight_t.T.contiguous(), bias


def scatter(chunks: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """The mean [D] and the scatter about it [D, D] (float64) of the rows of ``chunks``
    (batches [B, D], at least one row), as :class:`Scatter` sums them."""
    acc = Scatter()
    for x in chunks:
        acc.add_rows(x)
    return acc.scatter()


def held_in(*tensors: Tensor) -> torch.dtype:
    """``torch.float32`` where every entry of ``tensors`` (float64 copies) is a float32
    value (a layer stored in float32, or narrower), else ``torch.float64``: the precision
    the values were held in, which bounds what their rounding can determine."""
    return (torch.float32 if all(torch.equal(t, t.to(torch.float32).to(t.dtype))
                                 for t in tensors) else torch.float64)


def least_moments_null(scatter: Tensor, offset: Tensor, n: int, dim: int) -> Tensor:
    """An orthonormal basis [D, D - dim] of the directions outside the ``dim`` (>= 1)
    leading eigenvectors of the second moments about a point: ``scatter`` [D, D] about the
    rows' mean plus ``n`` times the outer square of ``offset`` [D], the mean less the point
    (float64).

    Formed whole, a point far from the rows (``n |offset|^2`` beyond 1e5 times the scatter's
    trace) would leave the scatter's eigenvalues to the rounding of the offset's (float64
    keeps ~1e-16 of the largest); there the offset's direction, the leading one, is split
    off exactly (a reflection onto the first axis) and the rest solved on the scatter alone,
    less its coupling to that direction (second order in scatter over offset: below 1e-10
    of the scatter there)."""
    d_all = scatter.shape[0]
    scatter = (scatter + scatter.T) / 2
    rho = n * float(offset @ offset)
    if not rho > 1e5 * float(scatter.trace()):
        _, evecs = torch.linalg.eigh(scatter + n * torch.outer(offset, offset))  # ascending
        return evecs[:, : d_all - dim]
    u = offset / offset.norm()
    v = u.clone()
    v[0] += 1.0 if float(u[0]) >= 0 else -1.0
    reflect = torch.eye(d_all, dtype=u.dtype, device=u.device) - 2 * torch.outer(v, v) / (v @ v)
    s = reflect @ scatter @ reflect  # the first axis is offset's direction
    a, c, rest = rho + s[0, 0], s[1:, 0], s[1:, 1:]
    evals, evecs = torch.linalg.eigh(rest - torch.outer(c, c) / a)
    evals, evecs = evals[: d_all - dim], evecs[:, : d_all - dim]
    along = (c @ evecs) / (evals - a)  # each direction's small part along the offset
    basis = reflect[:, :1] * along + reflect[:, 1:] @ evecs
    return torch.linalg.qr(basis).Q


def relative_residual(pairs: Iterable[tuple[Tensor, Tensor]], weight: Tensor,
                      bias: Tensor) -> float:
    """Root mean square of ``logits - (features @ weight.T + bias)`` over the pairs
    ``(features, logits)``, as a fraction of the logits' root mean square spread about their
    mean (float64; the spread summed about the first batch's mean, then corrected)."""
    sq_err = sq_spread = 0.0
    n = 0
    shift = total = None
    for x, lg in pairs:
        lg64 = lg.to(torch.float64)
        sq_err += float(((x.to(torch.float64) @ weight.T + bias - lg64) ** 2).sum())
        shift = lg64.mean(0) if shift is None else shift
        centred = lg64 - shift
        sq_spread += float((centred ** 2).sum())
        total = centred.sum(0) if total is None else total + centred.sum(0)
        n += x.shape[0]
    assert total is not None  # (fits have rows)
    spread = sq_spread - float((total ** 2).sum()) / n
    if spread <= 0:  # every row's logits alike
        return 0.0 if sq_err == 0 else float("inf")
    return (sq_err / spread) ** 0.5


def _keys(x: Tensor) -> Tensor:
    """Signed integer keys ordered as the float values of ``x`` (float64 kept, narrower types
    as float32, whose order they share), as int64."""
    if x.dtype == torch.float64:
        i, bits = x.contiguous().view(torch.int64), 64
    else:
        i, bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64), 32
    mask = (1 << (bits - 1)) - 1
    # Negative floats order backwards in their bits: flip all but the sign bit.
    return torch.where(i < 0, i ^ mask, i)


def _from_key(key: int, bits: int) -> float:
    """The float value of a key of :func:`_keys`."""
    mask = (1 << (bits - 1)) - 1
    raw = key ^ mask if key < 0 else key
    dtype, itype = (torch.float64, torch.int64) if bits == 64 else (torch.float32, torch.int32)
    return float(torch.tensor([raw], dtype=itype).view(dtype)[0])


def order_statistics(chunks: Callable[[], Iterable[Tensor]], ranks: list[int],
                     dtype: torch.dtype) -> list[float]:
    """The values at 0-based ``ranks`` in the sorted entries of the tensors ``chunks()``
    yields (all of them, any shape, finite, of ``dtype``), found exactly by a radix selection
    over 16-bit digits of their bit patterns: one pass over the chunks per digit (2 for
    float32 and narrower, 4 for float64) with a 65,536-bin histogram per rank, never a sort
    or a copy of the whole."""
    bits = 64 if dtype == torch.float64 else 32
    prefixes: list[int | None] = [None] * len(ranks)  # each rank's digits found so far
    left = list(ranks)  # each rank among the entries that share its prefix
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hists: dict[int | None, Tensor] = {}
        for chunk in chunks():
            keys = _keys(chunk.reshape(-1))
            for prefix in dict.fromkeys(prefixes):
                if prefix is None:  # the first digit, signed: offset to 0..65535
                    digit = (keys >> shift) + (1 << (_DIGIT - 1))
                else:
                    digit = (keys[(keys >> (shift + _DIGIT)) == prefix] >> shift) & 0xFFFF
                h = torch.bincount(digit, minlength=1 << _DIGIT).cpu()
                hists[prefix] = hists[prefix] + h if prefix in hists else h
        for t, prefix in enumerate(prefixes):
            cum = hists[prefix].cumsum(0)
            found = int(torch.searchsorted(cum, torch.tensor(left[t]), right=True))
            left[t] -= int(cum[found - 1]) if found else 0
            prefixes[t] = (found - (1 << (_DIGIT - 1)) if prefix is None
                           else (prefix << _DIGIT) + found)
    return [_from_key(p, bits) for p in prefixes if p is not None]


def percentile(chunks: Callable[[], Iterable[Tensor]], n: int, q: float,
               dtype: torch.dtype) -> float:
    """The ``q``-th percentile (0-100) of the ``n`` entries of the tensors ``chunks()``
    yields, interpolated linearly between the two order statistics around it, as
    ``np.percentile``'s default does."""
    pos = q / 100 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    a, b = order_statistics(chunks, [lo, hi], dtype)
    t = pos - lo
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
