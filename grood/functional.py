"""Pure-PyTorch GROOD operations: the portable fallback and the test oracle for the kernels.

Every function here has the same name, signature and return contract as its Triton kernel in
``grood_kernels`` (where one exists) and is exact in float64 when given float64.

The math (ElAraby et al., arXiv 2312.14427; the README's "What it computes"). For a feature
``h``, class prototypes ``p_1..p_C`` and the OOD prototype ``p_o``::

    s_j  = -||h - p_j||_2            for j in {1..C, o}
    lse  = log(sum_j exp(s_j))       (over all C + 1 terms)
    q_o  = exp(s_o - lse)
    g(h) = q_o * (h - p_o) / ||h - p_o||_2      (g = 0 where h == p_o)

Distances are computed by matrix multiply in coordinates centred on the OOD prototype
(``u = h - p_o``, ``P_j = p_j - p_o``): ``u`` is needed for the gradient anyway, ``||u||`` is
the OOD distance itself, and centring removes most of the cancellation that makes
``||h||^2 + ||p||^2 - 2 h.p`` inaccurate for large, non-negative (post-ReLU) features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from grood._checks import (
    check_finite_rows,
    check_labels,
    check_not_tracked,
    check_positive_int,
    compute_dtype,
    labels_hint,
)
from grood_kernels.contract import (  # shared with the kernels, re-exported here
    NCP_CANDIDATES,
    PRECISIONS,
    RERANK_EXTRA,
    NCPGradient,
    check_dense,
    check_has_columns,
    check_sq_norms,
    kept_per_prototypes,
    lex_sort,
    matmul_precision,
    max_abs,
    ncp_scale,
    pow2_scale,
)
from grood_kernels.contract import check_precision as _check_mode

#: Names other libraries give the precision modes (torch's
#: ``set_float32_matmul_precision("highest")``, dtype names), for the error that refuses them.
PRECISION_ALIASES = {"fp32": "ieee", "float32": "ieee", "float": "ieee", "highest": "ieee",
                     "bfloat16": "bf16", "3xtf32": "tf32x3", "tf32_3x": "tf32x3"}


def check_precision(precision: str) -> None:
    """The kernels' contract's check of a precision mode, its error naming the mode meant
    where another name for one, or one in capitals, is given."""
    try:
        _check_mode(precision)
    except ValueError as exc:
        key = precision.lower() if isinstance(precision, str) else ""
        meant = key if key in PRECISIONS else PRECISION_ALIASES.get(key)
        raise ValueError(f"{exc}" + (f" (for {precision!r} pass {meant!r})" if meant else "")
                         ) from None


__all__ = [
    "NCP_CANDIDATES",
    "PRECISIONS",
    "RERANK_EXTRA",
    "NCPGradient",
    "PrototypeState",
    "add_rows_by_class",
    "check_precision",
    "class_prototypes",
    "database_sq_norms_of",
    "knn",
    "lex_sort",
    "matmul_precision",
    "max_abs",
    "ncp_gradient",
    "pow2_scale",
    "topk_lowest_index",
]

# Elements of the largest temporary tile (rows x classes, or queries x database rows).
# 2**22 float32 values are 16 MiB: small enough for any machine, large enough for a fast GEMM.
TILE_ELEMENTS = 1 << 22
# The gradient step's per-tile working set, in elements: rows x (2 D + 3 C_block) (the
# feature tile, the re-rank's difference rows, the distance tile and its float64 softmax
# terms). 2**22 (16 MiB of float32) keeps each tile's element-wise passes in a server CPU's
# L2 + L3 while making tiles large enough that per-tile dispatch does not dominate at small C.
ROW_TILE_ELEMENTS = 1 << 22
# Off the CPU the element-wise passes need no cache residency, and each torch op costs a
# host-side launch (tens of microseconds): tiles as large as this many elements (64 MiB of
# float32; their float64 softmax / key temporaries twice that) keep a tile's launches few next
# to its GPU work. On an H200 the CPU-sized tiles made the torch gradient step host-bound
# (243 ms for 65,536 x 1,000 x 2,048: ~114 tiles of ~60 launches).
DEVICE_TILE_ELEMENTS = 1 << 24
# Prototypes per class block of the gradient step by default: off the CPU every class up to
# this many in one block (one GEMM and one pass of each element-wise op per row tile) ...
DEVICE_CLASS_BLOCK = 1 << 14
# ... on the CPU at most this many, wider class sets split into even blocks. A block of
# 16,384 floors the row tile at MIN_TILE_ROWS with a [rows, block] distance tile and its
# float64 softmax terms far past the caches (256 x 16,384: 16 + 32 MiB): at C = 21,841 the
# step took 32-36 % longer than with blocks of 1,024 at D = 1,024 and 2,048 (2 threads; at
# D = 512 -2 to +28 %, run to run), 12-26 % longer at C = 5,000 and 10,000; blocks of 512
# to 2,048 came within 10 % of each other, and the outputs were identical bit for bit
# (bench/RESULTS.md, "The CPU's class blocks").
CPU_CLASS_BLOCK = 1 << 10
# Elements squared at a time by database_sq_norms_of (1 MiB of float32: cache-resident).
NORM_CHUNK_ELEMENTS = 1 << 18
# Bytes of the gradient step's re-rank scratch on the CPU: rows x candidates x D differences
# at a time, so the gathered prototype rows stay in cache between the gather, the subtraction
# and the norm (2 MiB: the re-rank 1.3-1.6x faster than one slot over the whole row tile;
# bench/RESULTS.md, "The CPU's exact re-rank in cache-sized chunks"). The search's
# re-rank takes its chunks the same way.
RERANK_CHUNK_BYTES = 1 << 21
# Queries per tile of the search off the CPU (the database tile follows from the budget).
DEVICE_QUERY_ROWS = 4096
# The CPU search's widest database tile, and its fewest queries a tile, for many candidates
# (search_tile): at k = 200 to 1,000 over 100,000 x 512 rows 1.15-1.48x faster than tiles
# of 4,096 rows (1.44-1.73x at D = 64), the same neighbours (bench/RESULTS.md, "the CPU
# search's tiles widened for many neighbours").
WIDE_SEARCH_TILE = 1 << 15
MIN_SEARCH_QUERIES = 128
# Elements of a batch widened to float64 at a time by class_prototypes on the CPU (4 MiB).
PROTOTYPE_CHUNK_ELEMENTS = 1 << 19
# Fewest rows per tile when the class block is wide: every row tile re-reads the block.
MIN_TILE_ROWS = 256
# Class-block widths (exclusive, inclusive) where the CPU picks float32 candidates by minima of
# packed keys, and float64 ones by successive argmin rounds, instead of torch.topk (timed in
# bench/RESULTS.md, "CPU fallback speed").
_KEYED_WIDTH = (16, 384)
_MIN_ROUNDS_WIDTH = (24, 160)
# Low bits of a float32 value widened to float64 that are always zero: the column goes there.
_KEY_BITS = 29
# On the CPU, topk_lowest_index narrows tiles at least this wide by group minima first, when
# the chosen groups hold at most a quarter of the tile; groups of 8 columns up to 4,096
# columns, of 16 beyond (of 8 where 16 would hold more than the quarter). Timed in
# bench/RESULTS.md, "The CPU search: wide tiles narrowed by group minima".
_GROUPED_WIDTH = 2048
_WIDE_GROUPS = 4096
# Off the CPU, whether the search's float32 tiles are narrowed the same way, without a host
# read (:func:`_grouped_in_order`), before their candidates are picked. The same candidates;
# not taken before a GPU has timed it against the whole tile's packed keys
# (``bench/gpu_report.py --only search`` times both).
DEVICE_NARROWED_PICK = False

class PrototypeState(NamedTuple):
    """Running per-class sums and counts, fed batch by batch by :func:`class_prototypes`.

    Attributes:
        sums (Tensor): per-class feature sums in float64, shape [C, D].
        counts (Tensor): per-class sample counts (int64), shape [C].
    """

    sums: Tensor
    counts: Tensor

    def prototypes(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Class means, shape [C, D]; raises if a class has no samples."""
        empty = (self.counts == 0).nonzero().flatten()
        if empty.numel():
            shown = ", ".join(str(int(c)) for c in empty[:10])
            more = f" (first 10 of {empty.numel()})" if empty.numel() > 10 else ""
            raise ValueError(
                f"class(es) {shown}{more} have no training samples; every class id in "
                f"0..{self.counts.numel() - 1} needs at least one"
            )
        return (self.sums / self.counts[:, None].to(self.sums.dtype)).to(dtype)


def _check_same_device(*tensors: Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(map(str, devices))}")


def _check_dims(name: str, x: Tensor, ndim: int, d: int | None = None,
                against: str = "") -> None:
    check_dense(**{name: x})
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if d is not None and x.shape[-1] != d:
        raise ValueError(f"{name} has dimension {x.shape[-1]}, expected {d} (the dimension "
                         f"of {against})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def ncp_gradient(
    h: Tensor,
    prototypes: Tensor,
    ood_prototype: Tensor,
    *,
    precision: str = "ieee",
    prototype_sq_norms: Tensor | None = None,
    block_rows: int | None = None,
    block_classes: int | None = None,
) -> NCPGradient:
    """Closed-form gradient of the NCP softmax loss with respect to the OOD prototype.

    Streams over rows and over blocks of prototypes with an online log-sum-exp, so no tensor
    larger than one ``[block_rows, block_classes]`` tile is ever made. Distances come from a
    GEMM in the chosen precision; then the ``NCP_CANDIDATES`` nearest prototypes of each row
    get their distances recomputed exactly from differences and replace their GEMM estimates
    in the log-sum-exp, the prediction and ``min_dist``. Those terms dominate ``q_ood``, so
    the reduced-precision modes stay close to fp32 where it matters.

    Args:
        h (Tensor): features, shape [N, D]; float16, bfloat16, float32 or float64.
        prototypes (Tensor): class prototypes, shape [C, D]. The centred copy of them made
            from this tensor and ``ood_prototype`` is kept for later calls with the same two
            tensors while both live unmodified (identity and version counter: in-place torch
            operations are seen). A change torch does not see, through a NumPy array sharing
            the memory or through ``.data``, needs new tensors.
        ood_prototype (Tensor): OOD prototype, shape [D].
        precision (str): the distance GEMM's precision: ``"ieee"`` (full fp32), ``"tf32"``
            (TF32 tensor cores on CUDA; the same as ieee on the CPU), ``"tf32x3"`` (split
            precision, fp32-faithful; computed as ieee here) or ``"bf16"`` (operands rounded
            to bfloat16, products accumulated in fp32). Ignored for float64 inputs.
        prototype_sq_norms (Tensor, optional): ``||p_c - p_o||^2`` for every class, shape
            [C] (squared norms of the prototypes *relative to the OOD prototype*); computed
            here when omitted. Norms that are not those of the prototypes (NaN, Inf, negative,
            another prototype set) are refused, checked once per tensor (ValueError).
        block_rows (int, optional): rows per tile; by default sized to ``ROW_TILE_ELEMENTS``
            and ``TILE_ELEMENTS`` on the CPU, to ``DEVICE_TILE_ELEMENTS`` elsewhere.
        block_classes (int, optional): prototypes per tile; by default
            :func:`gradient_class_block` (all C up to 16,384 off the CPU; on the CPU even
            blocks of at most 1,024).

    Returns:
        NCPGradient: ``grad`` [N, D], ``q_ood`` [N], ``pred`` [N], ``min_dist`` [N], ``lse`` [N].
        Floating outputs are float64 for float64 inputs and float32 otherwise. Distances are
        computed in units of a power of two near the prototypes' magnitude; a row whose
        distances do not fit the compute dtype in those units (features some 2**60 times the
        prototypes' magnitude, in float32) comes out non-finite. Such rows are far beyond what
        the float32 softmax resolves anyway: the detector redoes them in float64
        (:func:`grood._gradients.resolve_far_rows`). Values of ``h`` are not checked (that
        would read them on the host): a row with NaN or Inf, or whose ``||h - p_o||^2``
        overflows the compute dtype, comes out with NaN ``grad``, ``q_ood``, ``min_dist`` and
        ``lse`` and ``pred`` -1, on every backend; the detector and the head check rows before
        this op. Prototypes or an OOD prototype with NaN or Inf are refused (ValueError).
    """
    _check_dims("h", h, 2)
    d = h.shape[1]
    _check_dims("prototypes", prototypes, 2, d, "h")
    _check_dims("ood_prototype", ood_prototype, 1, d, "h")
    _check_same_device(h, prototypes, ood_prototype)
    check_not_tracked("ncp_gradient", h, prototypes, ood_prototype)
    check_dense(prototype_sq_norms=prototype_sq_norms)
    check_precision(precision)
    block_rows, block_classes = _block_sizes(block_rows=block_rows, block_classes=block_classes)
    n, c = h.shape[0], prototypes.shape[0]
    if c == 0:
        raise ValueError("prototypes is empty: need at least one class")
    check_has_columns(d, "h and the prototypes")
    dt = compute_dtype(torch.promote_types(torch.promote_types(h.dtype, prototypes.dtype),
                                           ood_prototype.dtype))
    if dt == torch.float64:
        precision = "ieee"
    bc = block_classes or gradient_class_block(h.device.type, c)
    bn = block_rows or gradient_tile_rows(h.device.type, bc, d)
    n_cand = min(NCP_CANDIDATES, c)

    if prototype_sq_norms is not None:
        check_sq_norms(prototype_sq_norms, prototypes, ood_prototype)
    # Work in units of a power of two near the prototypes' magnitude (exact rescaling), so
    # squared distances neither overflow nor underflow for huge or tiny prototypes. The scale
    # depends on the prototypes only, never on h (the rule the kernel shares).
    sc = ncp_scale(prototypes, ood_prototype)
    p_o, centred, centred_sq, gemm_protos = kept_per_prototypes(
        prototypes, ood_prototype, ("torch operand", dt, precision == "bf16"),
        lambda: _centred_prototypes(prototypes, ood_prototype, sc, dt, precision == "bf16"))
    if prototype_sq_norms is not None and sc == 1.0:
        centred_sq = prototype_sq_norms.to(dt)

    grad = torch.empty((n, d), dtype=dt, device=h.device)
    q_ood = torch.empty(n, dtype=dt, device=h.device)
    pred = torch.empty(n, dtype=torch.int64, device=h.device)
    min_dist = torch.empty(n, dtype=dt, device=h.device)
    lse = torch.empty(n, dtype=dt, device=h.device)

    sm = torch.float64  # the softmax's dtype (see below)
    diff_buf = _rerank_scratch(h.device, min(bn, n), n_cand, d, dt)
    for r0 in range(0, n, bn):
        r1 = min(r0 + bn, n)
        # u lives in the gradient's output rows: they are scaled in place at the end, so the
        # tile is written once and no [rows, D] temporary is allocated per tile.
        u = grad[r0:r1]
        if sc != 1.0:
            torch.div(h[r0:r1].to(dt), sc, out=u).sub_(p_o)  # [bn, D], units sc
        else:
            torch.sub(h[r0:r1].to(dt), p_o, out=u)
        u_norm = torch.linalg.vector_norm(u, dim=1)  # [bn]
        u_sq = u_norm * u_norm
        d_ood = u_norm * sc if sc != 1.0 else u_norm
        gemm_u = u.bfloat16().to(dt) if precision == "bf16" else u
        # Online log-sum-exp, seeded with the OOD term: running max m, running sum acc.
        # exp and log are not correctly rounded and torch evaluates them differently at a
        # tensor's vectorised body and its tail, so float32 results would depend on the batch
        # shape. Evaluated in float64 and then rounded, they do not (and are more accurate).
        neg_ood = -d_ood.to(sm)
        m = neg_ood  # running max
        acc = torch.ones_like(m)  # running sum
        cand_d = torch.full((r1 - r0, n_cand), float("inf"), dtype=dt, device=h.device)
        cand_i = torch.full((r1 - r0, n_cand), -1, dtype=torch.int64, device=h.device)
        for c0 in range(0, c, bc):
            c1 = min(c0 + bc, c)
            with matmul_precision(precision, h.device):
                # One row would take the matrix-vector path, which sums in another order;
                # a repeated row keeps it on the matrix-matrix path of larger batches.
                rows = gemm_u if gemm_u.shape[0] > 1 else gemm_u.expand(2, -1)
                dist = torch.addmm(centred_sq[None, c0:c1], rows, gemm_protos[c0:c1].T,
                                   alpha=-2.0)[: gemm_u.shape[0]]
            dist = dist.add_(u_sq[:, None]).clamp_min_(0).sqrt_()  # [bn, bc]
            if sc != 1.0:
                dist.mul_(sc)
            blk_d, blk_i = _nearest(dist, min(n_cand, c1 - c0))
            m_new = torch.maximum(m, -blk_d[:, 0].to(sm))
            if c0 == 0 and c1 - c0 >= n_cand:
                cand_d, cand_i = blk_d, blk_i  # the first block fills every candidate slot
            else:
                cand_d, cand_i = _merge_topk(cand_d, cand_i, blk_d, blk_i + c0, n_cand)
            acc = acc.mul_(torch.exp(m - m_new)).add_(
                torch.sub(m_new.neg()[:, None], dist).exp_().sum(1))
            m = m_new
        # Exact distances of the candidates replace their GEMM estimates in the sum.
        exact = _exact_candidate_distances(centred, cand_i, u, diff_buf)
        if sc != 1.0:
            exact.mul_(sc)
        rest = (acc - torch.sub(m.neg()[:, None], cand_d).exp_().sum(1)).clamp_min_(0)
        # log(rest) is -inf when the candidates were all of the sum: logaddexp handles it.
        row_lse = torch.logaddexp(m + torch.log(rest), torch.logsumexp(-exact.to(sm), dim=1))
        best_dist, best_class = _lex_first(exact, cand_i)
        q = torch.sub(neg_ood, row_lse).exp_()
        u_norm64 = u_norm.to(sm)
        scale = torch.where(u_norm64 > 0, q / torch.where(u_norm64 > 0, u_norm64, 1.0),
                            0.0).to(dt)
        # A row with NaN or Inf (or a norm beyond the dtype) has no answer: NaN results and
        # no class, the kernels' rule (whatever its distances' NaNs and infs would give).
        ok = u_sq < float("inf")
        u.mul_(torch.where(ok, scale, float("nan"))[:, None])  # u is grad[r0:r1]
        q_ood[r0:r1] = torch.where(ok, q.to(dt), float("nan"))
        pred[r0:r1] = torch.where(ok, best_class, -1)
        min_dist[r0:r1] = torch.where(ok, best_dist, float("nan"))
        lse[r0:r1] = torch.where(ok, row_lse.to(dt), float("nan"))
    return NCPGradient(grad, q_ood, pred, min_dist, lse)


def _rerank_scratch(device: torch.device, rows: int, k: int, d: int,
                    dtype: torch.dtype) -> Tensor:
    """The re-rank's scratch for :func:`_exact_candidate_distances`: on the CPU the
    differences of as many rows' ``k`` candidates as fit ``RERANK_CHUNK_BYTES`` (at least one
    row), elsewhere one candidate slot of a whole row tile, [rows, D]."""
    if device.type == "cpu":
        rows = min(rows, max(1, RERANK_CHUNK_BYTES // max(k * d * dtype.itemsize, 1))) * k
    return torch.empty((rows, d), dtype=dtype, device=device)


def _candidate_differences(table: Tensor, ids: Tensor, x: Tensor, scratch: Tensor
                           ) -> Iterator[tuple[int, int, Tensor]]:
    """``(r0, r1, table[ids[r0:r1]] - x[r0:r1, None])`` [r1 - r0, k, D] for chunks of the rows
    of ``ids`` [rows, k], each chunk gathered into ``scratch`` (a whole number of rows' k
    candidates, :func:`_rerank_scratch`) and subtracted there, so it stays in cache for the
    reduction the caller writes before the next chunk."""
    rows, k = ids.shape
    flat = ids.reshape(-1)
    step = scratch.shape[0] // k
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        diff = torch.index_select(table, 0, flat[r0 * k: r1 * k], out=scratch[: (r1 - r0) * k])
        yield r0, r1, diff.view(r1 - r0, k, -1).sub_(x[r0:r1, None, :])


def _exact_candidate_distances(centred: Tensor, cand_i: Tensor, u: Tensor,
                               scratch: Tensor) -> Tensor:
    """``||u - centred[cand_i]||`` [rows, k] from differences in ``u``'s dtype (``p - u`` is
    exactly ``-(u - p)`` in IEEE arithmetic: the same norm), through ``scratch`` from
    :func:`_rerank_scratch`. On the CPU every candidate of a chunk of rows at once, so the
    chunk's differences stay in cache from the gather to the norm and each row tile takes
    three operators per chunk; elsewhere one candidate slot over the whole tile at a time.
    Each distance is one row's norm either way: the same values."""
    rows, k = cand_i.shape
    exact = torch.empty((rows, k), dtype=u.dtype, device=u.device)
    if u.device.type != "cpu":
        diff = scratch[:rows]
        for j in range(k):
            torch.index_select(centred, 0, cand_i[:, j], out=diff).sub_(u)
            torch.linalg.vector_norm(diff, dim=1, out=exact[:, j])
        return exact
    for r0, r1, diff in _candidate_differences(centred, cand_i, u, scratch):
        torch.linalg.vector_norm(diff, dim=2, out=exact[r0:r1])
    return exact


def class_prototypes(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    state: PrototypeState | None = None,
    in_place: bool = False,
) -> PrototypeState:
    """Add a batch to running per-class sums and counts (float64 sums, exact order-free counts).

    Feed batches one after another and call ``state.prototypes()`` at the end::

        state = None
        for x, y in batches:
            state = class_prototypes(x, y, num_classes, state=state)
        prototypes = state.prototypes()

    Sums and counts can be all-reduced across processes before ``prototypes()``.

    Args:
        features (Tensor): features, shape [N, D].
        labels (Tensor): integer class ids in ``[0, num_classes)``, shape [N].
        num_classes (int): number of classes C.
        state (PrototypeState, optional): the running state to add to; a new one if omitted.
        in_place (bool): add to ``state``'s own tensors and return them, instead of copies
            (saves copying the C x D sums per batch when the caller keeps only the result).

    Returns:
        PrototypeState: ``sums`` [C, D] (float64) and ``counts`` [C] (int64). The input state
        is not modified unless ``in_place``.
    """
    _check_dims("features", features, 2)
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must have shape [{features.shape[0]}], got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # .to(int64) would truncate 1.7 to class 1, and read booleans as classes 0 and 1
        raise TypeError(f"labels must hold integer class ids, got "
                        f"{str(labels.dtype).removeprefix('torch.')}"
                        f"{labels_hint(labels, 'labels')}")
    num_classes = check_positive_int(num_classes, "num_classes")
    labels = labels.to(device=features.device, dtype=torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), "
                         f"found [{int(labels.min())}, {int(labels.max())}]")
    check_finite_rows(features, "features")  # a NaN row would make its class's mean NaN
    d = features.shape[1]
    if state is None:
        sums = torch.zeros((num_classes, d), dtype=torch.float64, device=features.device)
        counts = torch.zeros(num_classes, dtype=torch.int64, device=features.device)
    else:
        if tuple(state.sums.shape) != (num_classes, d):
            raise ValueError(
                f"state holds sums of shape {tuple(state.sums.shape)}, "
                f"expected {(num_classes, d)}"
            )
        if state.sums.device != features.device or state.counts.device != features.device:
            raise ValueError(f"state is on {state.sums.device}, the features on "
                             f"{features.device}: keep the running state with the batches")
        if state.sums.dtype != torch.float64 or state.counts.dtype != torch.int64 or \
                tuple(state.counts.shape) != (num_classes,):
            raise ValueError(
                "state must hold float64 sums [C, D] and int64 counts [C], as "
                f"class_prototypes returns them; got {state.sums.dtype} sums and "
                f"{state.counts.dtype} counts of shape {tuple(state.counts.shape)}")
        sums, counts = state if in_place else (state.sums.clone(), state.counts.clone())
    # On the CPU the float64 copy is made a cache-sized piece at a time (the same additions
    # in the same order): 4-7x faster than widening the whole batch at once.
    step = max(1, PROTOTYPE_CHUNK_ELEMENTS // d if features.device.type == "cpu"
               else features.shape[0])
    for r0 in range(0, features.shape[0], step):
        _add_rows(sums, labels[r0:r0 + step], features[r0:r0 + step].to(torch.float64))
    counts += torch.bincount(labels, minlength=num_classes)
    return PrototypeState(sums, counts)


def add_rows_by_class(sums: Tensor, labels: Tensor, rows: Tensor) -> None:
    """``sums[labels[i]] += rows[i]`` for every row, adding in the same order on every run.

    On the CPU ``index_add_`` adds the rows in order. On a GPU it adds them with atomics, in
    whatever order the threads arrive: the float64 sums, and so the prototypes, would differ
    in their last bits from one fit to the next. ``index_put_`` with ``accumulate=True``
    sorts the rows by class there first (the path ``index_add_`` takes under
    ``torch.use_deterministic_algorithms``), so a fit on a GPU is reproducible bit for bit.

    ``sums`` [C, D] (floating point) is added to in place; ``rows`` [N, D] must have its dtype
    and device, ``labels`` [N] integer class ids in ``[0, C)`` (an id out of range is
    refused here: on a GPU it would stop the process in a device-side assert).
    """
    _check_dims("sums", sums, 2)
    _check_dims("rows", rows, 2, sums.shape[1], "sums")
    if rows.dtype != sums.dtype:
        raise TypeError(f"rows must have the dtype of sums ({sums.dtype}), got {rows.dtype}")
    if rows.device != sums.device or labels.device != sums.device:
        raise ValueError(f"sums ({sums.device}), rows ({rows.device}) and labels "
                         f"({labels.device}) must be on one device")
    if labels.ndim == 1 and labels.shape[0] != rows.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but rows has {rows.shape[0]}")
    check_labels(labels, "labels", rows.shape[0], n_classes=sums.shape[0],
                 n_classes_from="the rows of sums", allow_empty=True)
    _add_rows(sums, labels.to(torch.int64), rows)  # (index_add_ takes int32 / int64 ids)


def _add_rows(sums: Tensor, labels: Tensor, rows: Tensor) -> None:
    """:func:`add_rows_by_class` without its checks (its callers checked)."""
    if sums.device.type == "cpu":
        sums.index_add_(0, labels, rows)
    else:
        sums.index_put_((labels,), rows, accumulate=True)


def gradient_class_block(device_type: str, c: int) -> int:
    """Prototypes per class block of :func:`ncp_gradient` by default, for C classes: up to
    ``DEVICE_CLASS_BLOCK`` off the CPU, and on the CPU the width of ``ceil(C /
    CPU_CLASS_BLOCK)`` even blocks (no narrow last block: 1,100 classes are two blocks of 550,
    not 1,024 and 76)."""
    if device_type != "cpu":
        return min(c, DEVICE_CLASS_BLOCK)
    blocks = -(-c // CPU_CLASS_BLOCK)  # ceil(C / CPU_CLASS_BLOCK)
    return -(-c // blocks) if blocks else 1


def gradient_tile_rows(device_type: str, block_classes: int, d: int) -> int:
    """Rows per tile of :func:`ncp_gradient` by default. On the CPU the tile's working set
    stays in cache (for small C the element-wise work and per-tile dispatch, not the GEMM, set
    the pace), with enough rows to amortise reading the class block and no [rows, C] or
    [rows, D] tile above ``TILE_ELEMENTS``; elsewhere as many rows as
    ``DEVICE_TILE_ELEMENTS`` allows (each tile's launches cost host time, not cache)."""
    if device_type == "cpu":
        return max(1, min(TILE_ELEMENTS // block_classes, TILE_ELEMENTS // d, max(
            MIN_TILE_ROWS, ROW_TILE_ELEMENTS // (2 * d + 3 * block_classes) // 64 * 64)))
    return max(1, min(DEVICE_TILE_ELEMENTS // block_classes, DEVICE_TILE_ELEMENTS // d))


def search_tile(device_type: str, n_queries: int, n_cand: int = 1) -> tuple[int, int]:
    """(queries, database rows) per tile of :func:`knn` by default, keeping ``n_cand``
    candidates per query: ``TILE_ELEMENTS`` on the CPU, ``DEVICE_TILE_ELEMENTS`` elsewhere.
    On the CPU a tile is made wider (and as much shorter) where its candidates are many: to the
    first power of two of database rows at least ``32 n_cand`` (where the narrowing by group
    minima applies, :func:`_group_size`), up to ``WIDE_SEARCH_TILE``, so fewer candidate lists
    are merged per query and the pick reads each tile once; no fewer than
    ``MIN_SEARCH_QUERIES`` queries a tile."""
    if device_type == "cpu":
        bq = min(n_queries, 1024)
        bm = max(256, TILE_ELEMENTS // bq)
        wide = min(WIDE_SEARCH_TILE, 1 << max(0, (32 * n_cand - 1).bit_length()))
        if wide > bm:
            bm = wide
            bq = min(n_queries, max(MIN_SEARCH_QUERIES, TILE_ELEMENTS // bm))
        return bq, bm
    bq = min(n_queries, DEVICE_QUERY_ROWS)
    return bq, max(256, DEVICE_TILE_ELEMENTS // bq)


def _block_sizes(**sizes: int | None) -> tuple[int | None, ...]:
    """Tile sizes given by name: each None (the default) or a positive integer (a size of
    0 or less left every tile out: outputs never written, or no neighbour found)."""
    return tuple(None if v is None else check_positive_int(v, name) for name, v in sizes.items())


def topk_lowest_index(dist: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` smallest entries of each row of ``dist`` [R, M] (ascending) and their column
    indices, taking the lowest columns among entries equal to the n-th smallest (``torch.topk``
    breaks such ties arbitrarily). A row needs that only when its (n+1)-th smallest equals its
    n-th; only those rows are redone, so the common case costs one ``torch.topk`` and no
    tile-sized temporary. Equal entries inside the n may come in any column order.

    On the CPU a wide tile (M >= 2,048 with n small next to M) is first narrowed to the groups
    of columns holding the n smallest group minima (:func:`_grouped_smallest`): the same
    entries, for one vectorised minimum over the tile instead of ``torch.topk`` over all of
    it."""
    return _smallest(dist, n, ordered=True)


def _smallest(dist: Tensor, n: int, ordered: bool) -> tuple[Tensor, Tensor]:
    """:func:`topk_lowest_index`, its n entries per row in ascending order or, where
    ``ordered`` is False, in any order (``torch.topk`` unsorted: half the time at n = 1,004
    of 4,096 on the CPU)."""
    per = _group_size(dist.shape, n) if dist.device.type == "cpu" else 0
    if per:
        return _grouped_smallest(dist, n, ordered, per)
    return _smallest_tie_lowest(dist, n, ordered)


def _group_size(shape: tuple[int, ...] | torch.Size, n: int) -> int:
    """Columns per group of :func:`_grouped_smallest` for a tile of ``shape`` [R, M] and ``n``
    entries per row, or 0 where the tile is kept whole (narrow, or n too large: the chosen
    groups would hold more than a quarter of it)."""
    rows, width = shape
    if rows == 0 or width < _GROUPED_WIDTH:
        return 0
    sizes = (8,) if width <= _WIDE_GROUPS else (16, 8)
    return next((size for size in sizes if 4 * n * size <= width), 0)


def _grouped_smallest(dist: Tensor, n: int, ordered: bool, per: int
                      ) -> tuple[Tensor, Tensor]:
    """:func:`_smallest` of a wide tile [R, M], read whole only once, in groups of ``per``
    columns (:func:`_group_size`).

    The first ``g * s`` columns (s = ``per``) form ``g = M // s`` groups of ``s`` (group j:
    columns j, j + g, j + 2 g, ..., so one ``amin`` over the tile viewed [R, s, g] is an
    element-wise minimum of s contiguous rows). Each of a row's n smallest entries, in
    (value, column) order, lies in one of the n groups with the smallest minima or in the
    last ``M - g s`` columns: a group left out has n chosen groups below it, each holding an
    entry below every entry of its own. Only those groups and the tail (``n s + M - g s``
    columns, in ascending column order) go to ``torch.topk``. Where that choice is not unique
    (the n-th and (n+1)-th smallest group minima equal) or a group's minimum is NaN, the row
    is redone on the whole tile."""
    rows, width = dist.shape
    groups = width // per
    dist = dist.contiguous()
    body = dist[:, : per * groups].view(rows, per, groups)
    mins = body.amin(1)  # [R, g]
    edge, chosen = torch.topk(mins, n + 1, dim=1, largest=False)
    chosen = chosen[:, :n].sort(1).values  # ascending, so the narrowed columns are too
    narrow = body.gather(2, chosen[:, None, :].expand(rows, per, n)).reshape(rows, per * n)
    if width > per * groups:
        narrow = torch.cat([narrow, dist[:, per * groups:]], 1)
    vals, pos = _smallest_tie_lowest(narrow, n, ordered)
    cols = torch.where(pos < per * n, (pos // n) * groups + chosen.gather(1, pos % n),
                       pos + (groups - n) * per)
    # (a NaN minimum makes its row's sum NaN; so do +inf and -inf minima: redone, harmlessly)
    redo = ((edge[:, n] == edge[:, n - 1]) | mins.sum(1).isnan()).nonzero()[:, 0]
    if redo.numel():
        whole_d, whole_c = _smallest_tie_lowest(dist[redo], n, ordered)
        vals, cols = vals.index_put((redo,), whole_d), cols.index_put((redo,), whole_c)
    return vals, cols


def _smallest_tie_lowest(dist: Tensor, n: int, ordered: bool = True
                         ) -> tuple[Tensor, Tensor]:
    """:func:`_smallest` by one ``torch.topk`` over the whole tile."""
    extra = min(n + 1, dist.shape[1])
    vals, cols = torch.topk(dist, extra, dim=1, largest=False, sorted=ordered)
    if extra == n:
        return vals, cols
    if ordered:
        kth = vals[:, n - 1:n]
        crowded = (vals[:, n] == vals[:, n - 1]).nonzero()[:, 0]
        vals, cols = vals[:, :n], cols[:, :n]
    else:
        vals, cols, kth, crowded = _without_largest(vals, cols, n)
    if crowded.numel():
        sub, kth = dist[crowded], kth[crowded]
        below, at = sub < kth, sub == kth
        need = n - below.sum(1, keepdim=True)
        chosen = below | (at & (at.cumsum(1, dtype=torch.int32) <= need))  # n per row
        picked = chosen.nonzero()[:, 1].view(-1, n)
        fixed_d, fixed = lex_sort(sub.gather(1, picked), picked)
        cols = cols.index_put((crowded,), fixed)
        vals = vals.index_put((crowded,), fixed_d)
    return vals, cols


def _without_largest(vals: Tensor, pos: Tensor, n: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of the n + 1 smallest entries of each row, unsorted (``vals`` [R, n + 1] and where
    they are, ``pos``): the n smallest and their positions (the largest swapped out for the
    last), the (n+1)-th smallest value [R, 1] (the largest; NaN above all, as ``torch.topk``
    orders it) and the rows where it appears twice, which tie at their n-th."""
    out = vals.argmax(1, keepdim=True)
    kth = vals.gather(1, out)
    crowded = ((vals == kth).sum(1) > 1).nonzero()[:, 0]
    return (vals.scatter(1, out, vals[:, n:])[:, :n], pos.scatter(1, out, pos[:, n:])[:, :n],
            kth, crowded)


def _centred_prototypes(prototypes: Tensor, ood_prototype: Tensor, sc: float,
                        dt: torch.dtype, bf16: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradient step's prototype operands in units ``sc``: the OOD prototype [D], the
    centred prototypes [C, D], their squared norms [C] and the GEMM's copy of them (rounded
    to bfloat16 values in bf16 mode). Made once per prototype set (``kept_per_prototypes``)."""
    p_o = ood_prototype.to(dt) / sc
    centred = prototypes.to(dt) / sc - p_o
    centred_sq = (centred * centred).sum(1)
    return p_o, centred, centred_sq, centred.bfloat16().to(dt) if bf16 else centred


def _nearest(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row of ``dist`` [R, M] (ascending) and their columns,
    the lowest columns among entries equal to the k-th smallest.

    ``torch.topk`` on the CPU costs more than k row minima when M is a few dozen to a few
    hundred; there the k entries are taken by successive minima. Off the CPU they always
    are: :func:`topk_lowest_index` reads on the host which rows tie, a synchronisation per
    class block that the minima do not need."""
    width = dist.shape[1]
    if dist.device.type != "cpu":
        return _nearest_keyed(dist, k) if dist.dtype == torch.float32 and \
            width < 1 << _KEY_BITS else _nearest_rounds(dist, k)
    if dist.dtype == torch.float32 and _KEYED_WIDTH[0] < width <= _KEYED_WIDTH[1]:
        return _nearest_keyed(dist, k)
    if _MIN_ROUNDS_WIDTH[0] < width <= _MIN_ROUNDS_WIDTH[1]:
        return _nearest_rounds(dist, k)
    return topk_lowest_index(dist, k)


def _nearest_keyed(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`_nearest` for a float32 tile of distances (entries >= 0, or not finite) by
    ``amin`` over float64 keys.

    A float32 value widened to float64 leaves the low 29 mantissa bits zero; the column goes
    there. For non-negative keys the float64 order is the order of their bit patterns, so one
    vectorised ``amin`` gives the smallest value and, among equal values, the lowest column
    (``argmin`` over a short row is not vectorised: several times slower). Non-finite entries
    become the largest finite float32 first (an inf key with column bits would be NaN), and
    -0.0 becomes 0.0 (its sign bit would order it before every other key)."""
    key = _column_keys(dist)
    picked = torch.empty((dist.shape[0], k), dtype=torch.float64, device=dist.device)
    mask = (1 << _KEY_BITS) - 1
    for j in range(k):
        torch.amin(key, 1, out=picked[:, j])
        if j + 1 < k:  # a taken entry becomes inf: above every finite key, never taken again
            key.scatter_(1, picked[:, j:j + 1].view(torch.int64) & mask, float("inf"))
    cols = picked.view(torch.int64) & mask
    return dist.gather(1, cols), cols


def _column_keys(dist: Tensor, cols: Tensor | None = None) -> Tensor:
    """Float64 keys of a float32 tile [R, M] ordered as (value, column): the value widened
    (non-finite entries as the largest finite float32, -0.0 as 0.0) with the column (each
    entry's position, or ``cols`` [R, M], all below 2**_KEY_BITS) in the low mantissa bits it
    leaves zero. Distinct within a row where the columns are."""
    big = torch.finfo(torch.float32).max
    key = torch.nan_to_num(dist, nan=big, posinf=big, neginf=big).to(torch.float64).abs_()
    key.view(torch.int64).bitwise_or_(
        torch.arange(dist.shape[1], device=dist.device) if cols is None else cols)
    return key


def _smallest_in_order(dist: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` smallest entries of each row of ``dist`` [R, M] (M >= n, entries >= 0 or
    not finite) in (value, column) order, without reading anything on the host: one
    ``torch.topk`` over :func:`_column_keys` for float32, a stable sort otherwise. Used off
    the CPU, where :func:`topk_lowest_index`'s host read of the tied rows would be a
    synchronisation per tile."""
    if dist.dtype == torch.float32 and dist.shape[1] < 1 << _KEY_BITS:
        per = _group_size(dist.shape, n) if DEVICE_NARROWED_PICK else 0
        if per:
            return _grouped_in_order(dist, n, per)
        cols = torch.topk(_column_keys(dist), n, dim=1, largest=False).indices
    else:
        cols = torch.sort(dist, dim=1, stable=True).indices[:, :n]
    return dist.gather(1, cols), cols


def _grouped_in_order(dist: Tensor, n: int, per: int) -> tuple[Tensor, Tensor]:
    """:func:`_smallest_in_order` of a wide float32 tile [R, M] narrowed by group minima as
    :func:`_grouped_smallest` does, with nothing read on the host: each group (``per``
    strided columns, :func:`_group_size`) is ranked by its minimum and the lowest column
    holding it (``torch.min`` over a dimension returns the first), packed as one key, so the n
    groups of smallest keys hold the row's n smallest entries in (value, column) order with
    no tie to redo: a group left out has n chosen groups below it, each holding an entry
    below every entry of its own in that order. Only those groups and the last ``M - g s``
    columns go to the final ``torch.topk``. Reads the tile about three times (a copy with
    non-finite entries as the largest float32, and its group minima) where building the whole
    tile's packed keys moves 13 times its float32 size before ``torch.topk`` reads them."""
    rows, width = dist.shape
    groups = width // per
    big = torch.finfo(torch.float32).max
    safe = torch.nan_to_num(dist, nan=big, posinf=big, neginf=big)
    mins, first = safe[:, : per * groups].view(rows, per, groups).min(1)  # [R, g]
    group_ids = torch.arange(groups, device=dist.device)
    chosen = torch.topk(_column_keys(mins, first * groups + group_ids), n, dim=1,
                        largest=False).indices  # [R, n]
    steps = torch.arange(per, device=dist.device)[None, :, None] * groups
    cols = (chosen[:, None, :] + steps).reshape(rows, per * n)
    if width > per * groups:
        tail = torch.arange(per * groups, width, device=dist.device)
        cols = torch.cat([cols, tail.expand(rows, -1)], 1)
    picked = torch.topk(_column_keys(safe.gather(1, cols), cols), n, dim=1,
                        largest=False).indices
    cols = cols.gather(1, picked)
    return dist.gather(1, cols), cols


def _nearest_rounds(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`_nearest` by successive ``argmin`` rounds (any floating dtype)."""
    # Non-finite entries (rows beyond the dtype's range) become the largest finite value, so
    # an entry taken (set to inf) is never taken again and a row's k columns are distinct.
    big = torch.finfo(dist.dtype).max
    work = torch.nan_to_num(dist, nan=big, posinf=big)
    cols = torch.empty((dist.shape[0], k), dtype=torch.int64, device=dist.device)
    for j in range(k):
        cols[:, j] = work.argmin(1)
        if j + 1 < k:
            work.scatter_(1, cols[:, j:j + 1], float("inf"))
    return dist.gather(1, cols), cols


def _lex_first(dist: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """The first entry of each row in :func:`lex_order` (smallest distance, then lowest index)
    without sorting: ``(dist, idx)`` of shape [R]. ``idx`` holds distinct non-negative ids per
    row; a row's distances are all NaN or none is (NaN sorts last, as in ``torch.sort``)."""
    key = torch.nan_to_num(dist, nan=float("inf"), posinf=float("inf"))
    at_min = key == key.amin(1, keepdim=True)
    # min(dim).values, not amin: amin over a short int64 row is ~20x slower on the CPU.
    first = torch.where(at_min, idx, torch.iinfo(idx.dtype).max).min(1).values
    picked = idx == first[:, None]  # exactly one entry per row
    return torch.where(picked, dist, 0).sum(1), first


def _merge_topk(best_d: Tensor, best_i: Tensor, new_d: Tensor, new_i: Tensor, k: int
                ) -> tuple[Tensor, Tensor]:
    """Keep the k smallest of two candidate lists, lower index first among equal distances."""
    cand_d, cand_i = lex_sort(torch.cat([best_d, new_d], 1), torch.cat([best_i, new_i], 1))
    return cand_d[:, :k], cand_i[:, :k]


def _merge_unordered(best_d: Tensor, best_i: Tensor, new_d: Tensor, new_i: Tensor, k: int
                     ) -> tuple[Tensor, Tensor]:
    """:func:`_merge_topk`'s k entries in no order, by an unsorted ``torch.topk`` (on the CPU
    5-7x faster than sorting both lists at k = 50 to 1,000). The k-th smallest is the
    largest of the k + 1 picked; a row where it appears twice is sorted whole instead (ties
    there go to the lower index, a missing candidate last). Reads on the host which rows
    tie: the CPU's merge."""
    dist, idx = torch.cat([best_d, new_d], 1), torch.cat([best_i, new_i], 1)
    if dist.shape[1] <= k:
        return dist, idx
    vals, pos = torch.topk(dist, k + 1, dim=1, largest=False, sorted=False)
    vals, pos, _, crowded = _without_largest(vals, pos, k)
    ids = idx.gather(1, pos)
    if crowded.numel():
        whole_d, whole_i = lex_sort(dist[crowded], idx[crowded])
        vals = vals.index_put((crowded,), whole_d[:, :k])
        ids = ids.index_put((crowded,), whole_i[:, :k])
    return vals, ids


def knn(
    queries: Tensor,
    database: Tensor,
    k: int = 1,
    *,
    precision: str = "ieee",
    database_sq_norms: Tensor | None = None,
    rerank_database: Tensor | None = None,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k-nearest-neighbour search by squared L2 distance, like ``faiss.IndexFlatL2``.

    The database is streamed in blocks with a running top-k per query, so no [Q, M] matrix is
    made. ``k + RERANK_EXTRA`` candidates per query are picked with the expansion
    ``||q||^2 + ||x||^2 - 2 q.x``; their distances are then recomputed directly as
    ``||q - x||^2`` and the best k kept, so returned distances carry no cancellation error and
    near-ties are ordered right. Among equal distances the lower database index comes first.
    The expansion can still pick the wrong candidates when every vector shares an offset far
    larger than their spread: centre such data first. GROOD's gradients share one only where
    the OOD prototype lies far outside the training features for their width (README,
    Numerics); on the features of a trained network nearest neighbours lie about 1,000
    times farther apart than the expansion's rounding.

    Args:
        queries (Tensor): query vectors, shape [Q, D].
        database (Tensor): database vectors, shape [M, D].
        k (int): number of neighbours, >= 1.
        precision (str): precision of the GEMM that picks candidates (as in
            :func:`ncp_gradient`); returned distances are exact in every mode.
        database_sq_norms (Tensor, optional): ``||x||^2`` of every database row, shape [M], in
            the compute dtype; computed here when omitted (an index caches them). Trusted, not
            checked (that would read the whole database once more): norms of other rows steer
            the candidates, and the returned neighbours are then exact distances to the wrong
            rows. :class:`grood.head.GROODHead` checks its cached norms when it loads them.
        rerank_database (Tensor, optional): the exact rows [M, D] the returned distances are
            computed from when ``database`` is a rounded copy (e.g. bf16 storage of an fp32
            index); it may live on another device (host memory). Default: ``database``.
        block_size (int, optional): database rows per tile; by default sized to
            ``TILE_ELEMENTS`` on the CPU (wider, with fewer queries a tile, for many
            neighbours: :func:`search_tile`) and ``DEVICE_TILE_ELEMENTS`` elsewhere.

    Returns:
        tuple[Tensor, Tensor]: ``(D, I)``: squared distances [Q, k] (ascending) and int64
        indices [Q, k]. When M < k the missing entries are ``inf`` and ``-1`` (as in faiss).
        Values are not checked (that would read them on the host): a query with NaN or Inf
        gets no neighbour (``inf``, ``-1``) and database rows with NaN or Inf are never found,
        nor are rows whose squared norm or squared distance overflows the dtype (values beyond
        about 1.8e19 in float32; such a query gets no neighbour); the indexes of
        :mod:`grood.index` refuse NaN and Inf by row.
    """
    _check_dims("queries", queries, 2)
    _check_dims("database", database, 2, queries.shape[1], "queries")
    _check_same_device(queries, database)
    check_dense(database_sq_norms=database_sq_norms, rerank_database=rerank_database)
    check_has_columns(queries.shape[1], "queries and the database")
    k = check_positive_int(k, "k")
    (block_size,) = _block_sizes(block_size=block_size)
    check_precision(precision)
    n_q, n_db = queries.shape[0], database.shape[0]
    exact_rows = database if rerank_database is None else rerank_database
    if tuple(exact_rows.shape) != tuple(database.shape):
        raise ValueError(f"rerank_database has shape {tuple(exact_rows.shape)}, the database "
                         f"{tuple(database.shape)}")
    dt = compute_dtype(torch.promote_types(queries.dtype, exact_rows.dtype))
    if dt == torch.float64:
        precision = "ieee"
    dev = queries.device
    out_d = torch.full((n_q, k), float("inf"), dtype=dt, device=dev)
    out_i = torch.full((n_q, k), -1, dtype=torch.int64, device=dev)
    if n_q == 0 or n_db == 0:
        return out_d, out_i
    n_cand = k + RERANK_EXTRA  # candidates kept per query, re-ranked exactly at the end
    # Database tiles converted to the compute dtype (half-precision storage, float64 queries,
    # bf16 rounding) go through a buffer of a tile's rows: those tiles are not widened for
    # many candidates (a buffer 8x larger), nor where block_size is given (a widened tile
    # holds fewer queries).
    converts = database.dtype != dt or precision == "bf16"
    bq, bm = search_tile(dev.type, n_q, 1 if converts or block_size is not None else n_cand)
    bm = block_size or bm
    if database_sq_norms is None:
        database_sq_norms = database_sq_norms_of(exact_rows, dt, block_size=bm).to(dev)
    elif tuple(database_sq_norms.shape) != (n_db,):
        raise ValueError(f"database_sq_norms must have shape [{n_db}], "
                         f"got {tuple(database_sq_norms.shape)}")
    # Off the CPU nothing is read on the host (a synchronisation per tile), except the
    # candidates' indices when the re-rank rows live on another device.
    pick, merge = _search_steps(dev.type)
    # On the CPU float32 candidates are merged as float64 keys (value, row) by one topk:
    # the same candidates as sorting them, at a fraction of the cost when they are many (k in
    # the hundreds); the re-ranked ones are sorted as such keys too.
    keyed = dev.type == "cpu" and dt == torch.float32 and n_db <= 1 << _KEY_BITS
    # One distance tile's memory for every tile: on the CPU a fresh 16 MiB tile is mapped and
    # faulted in afresh each time (a quarter of the tile's time at D = 64).
    work = torch.empty(min(bq, n_q) * min(bm, n_db), dtype=dt, device=dev)
    # Likewise the database tile where it is converted (each query tile converts it again).
    tile_rows = (min(bm, n_db), database.shape[1])
    blk_buf = torch.empty(tile_rows if converts else (0, 0), dtype=dt, device=dev)
    half_buf = torch.empty(tile_rows if precision == "bf16" else (0, 0), dtype=torch.bfloat16,
                           device=dev)
    for q0 in range(0, n_q, bq):
        q1 = min(q0 + bq, n_q)
        q = queries[q0:q1].to(dt)  # [bq, D]
        q_sq = (q * q).sum(1)
        gemm_q = q.bfloat16().to(dt) if precision == "bf16" else q
        if keyed:  # (an entry still inf at the end: no candidate)
            best_key = torch.full((q1 - q0, n_cand), float("inf"), dtype=torch.float64)
        else:
            best_key = None
            best_d = torch.full((q1 - q0, n_cand), float("inf"), dtype=dt, device=dev)
            best_i = torch.full((q1 - q0, n_cand), -1, dtype=torch.int64, device=dev)
        for m0 in range(0, n_db, bm):
            m1 = min(m0 + bm, n_db)
            blk = database[m0:m1]
            if blk.dtype != dt:  # half-precision storage, or float64 queries
                blk = blk_buf[: m1 - m0].copy_(blk)
            if precision == "bf16":  # the operand rounded to bfloat16 values
                blk = blk_buf[: m1 - m0].copy_(half_buf[: m1 - m0].copy_(blk))
            with matmul_precision(precision, dev):
                dist = torch.addmm(database_sq_norms[None, m0:m1].to(dt), gemm_q, blk.T,
                                   alpha=-2.0, out=work[: (q1 - q0) * (m1 - m0)].view(
                                       q1 - q0, m1 - m0))
            dist = dist.add_(q_sq[:, None]).clamp_min_(0)  # [bq, bm]
            blk_d, blk_i = pick(dist, min(n_cand, m1 - m0))
            if best_key is not None:
                best_key = torch.topk(torch.cat([best_key, _column_keys(blk_d, blk_i + m0)], 1),
                                      n_cand, dim=1, largest=False, sorted=False).values
            else:
                best_d, best_i = merge(best_d, best_i, blk_d, blk_i + m0, n_cand)
        if best_key is not None:
            best_d, best_i = _from_keys(best_key)
        # Re-rank the candidates by their directly computed distance; a missing candidate
        # (index -1, fewer database rows than candidates) reads row 0 and stays at inf.
        found = best_i >= 0
        exact = _rerank_distances(q, exact_rows, best_i.clamp_min(0))
        # The kernel's rule: a candidate needs a finite GEMM distance (not one of an Inf or NaN
        # in a query or a row, or of a squared norm beyond the dtype) and a finite exact one.
        found &= (best_d < float("inf")) & (exact < float("inf"))
        if keyed:
            exact, best_i = _sorted_by_keys(exact, best_i, found)
        else:
            exact = torch.where(found, exact, float("inf"))
            exact, best_i = lex_sort(exact, torch.where(found, best_i, -1))
        out_d[q0:q1], out_i[q0:q1] = exact[:, :k], best_i[:, :k]
    return out_d, out_i


def _search_steps(device_type: str) -> tuple[Callable[[Tensor, int], tuple[Tensor, Tensor]],
                                             Callable[..., tuple[Tensor, Tensor]]]:
    """:func:`knn`'s per-tile candidate pick and its merge of two candidate lists. On the CPU
    the candidates are kept in no order until the re-rank sorts them (unsorted ``topk``),
    and which rows tie is read on the host; off it nothing is read on the host (a
    synchronisation per tile): the sync-free picker and a sort."""
    if device_type == "cpu":
        return partial(_smallest, ordered=False), _merge_unordered
    return _smallest_in_order, _merge_topk


def _from_keys(keys: Tensor, largest_is_inf: bool = True) -> tuple[Tensor, Tensor]:
    """``(distances, rows)`` of float64 keys made by :func:`_column_keys`: a key still +inf
    (no candidate) is row -1 at inf, and the largest finite float32 (what a non-finite
    distance became) is inf again, unless ``largest_is_inf`` is False (keys of finite
    distances only)."""
    mask = (1 << _KEY_BITS) - 1
    bits = keys.view(torch.int64)
    missing = keys == float("inf")
    vals = (bits & ~mask).view(torch.float64).to(torch.float32)
    at_inf = missing | (vals == torch.finfo(torch.float32).max) if largest_is_inf else missing
    vals = vals.masked_fill_(at_inf, float("inf"))
    return vals, torch.where(missing, -1, bits & mask)


def _sorted_by_keys(dist: Tensor, rows: Tensor, found: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lex_sort` of float32 candidates [R, n] (``found``: a finite distance to a row
    below 2**_KEY_BITS; the others missing, inf and -1, last) by one sort of float64
    (distance, row) keys instead of two sorts and four gathers: 1.5-1.8x as fast on the
    CPU, the same order (the keys are distinct, and order as the pairs do)."""
    keys = torch.where(found, _column_keys(dist, rows.clamp_min(0)), float("inf"))
    # (every found distance is finite: the largest finite float32 among them stays itself)
    return _from_keys(torch.sort(keys, 1).values, largest_is_inf=False)


def _rerank_distances(q: Tensor, exact_rows: Tensor, rows: Tensor) -> Tensor:
    """``||q - exact_rows[rows]||^2`` [bq, n] of each query row and its ``n`` candidates'
    rows: on the CPU every candidate of a chunk of query rows at once where one row's
    candidates fit ``RERANK_CHUNK_BYTES``, otherwise one candidate slot at a time (the rows
    may live on another device, or in another dtype: then each slot's rows are copied
    over)."""
    if exact_rows.device != q.device or exact_rows.dtype != q.dtype:
        rows = rows.to(exact_rows.device)
        exact = torch.empty(rows.shape, dtype=q.dtype, device=q.device)
        for j in range(rows.shape[1]):
            diff = q - exact_rows[rows[:, j]].to(q.device, q.dtype)
            exact[:, j] = (diff * diff).sum(1)
        return exact
    # Into one reused buffer: x - q is exactly -(q - x), the same squares.
    bq, n = rows.shape
    per_row = n * q.shape[1] * q.element_size()
    if q.device.type == "cpu" and per_row <= RERANK_CHUNK_BYTES:
        # Every candidate of a chunk of query rows at once (see _exact_candidate_distances):
        # each distance is one row's sum either way, the same values.
        exact = torch.empty((bq, n), dtype=q.dtype, device=q.device)
        scratch = _rerank_scratch(q.device, bq, n, q.shape[1], q.dtype)
        for r0, r1, diff in _candidate_differences(exact_rows, rows, q, scratch):
            torch.sum(diff.square_(), 2, out=exact[r0:r1])
        return exact
    by_slot = torch.empty((n, bq), dtype=q.dtype, device=q.device)
    buf = torch.empty_like(q, memory_format=torch.contiguous_format)
    slots = rows.T.contiguous()
    for j in range(slots.shape[0]):
        torch.index_select(exact_rows, 0, slots[j], out=buf).sub_(q).square_()
        torch.sum(buf, 1, out=by_slot[j])
    return by_slot.T


def database_sq_norms_of(database: Tensor, dtype: torch.dtype | None = None, *,
                         block_size: int = 65536) -> Tensor:
    """``||x||^2`` of every row of ``database`` [M, D] -> [M], streamed over blocks of
    ``block_size`` rows, squared in one reused buffer. On the CPU a block also holds at most
    ``NORM_CHUNK_ELEMENTS`` elements (a fresh [block, D] temporary per block was mapped and
    faulted in each time: 8x as long at 100,000 x 512); off it the blocks stay large, as each
    costs launches. A block holds two rows or more (one where the database is one row), and
    the last one no lone row, so on the CPU each row is summed alone in one order: the sums
    do not depend on the blocks (a lone row of 32,768 elements or more would be split between
    threads) nor on the array's layout."""
    _check_dims("database", database, 2)
    block_size = check_positive_int(block_size, "block_size")
    dt = dtype or compute_dtype(database.dtype)
    m, d = database.shape
    out = torch.empty(m, dtype=dt, device=database.device)
    if database.device.type == "cpu":
        block_size = min(block_size, NORM_CHUNK_ELEMENTS // max(d, 1))
    rows = max(2, block_size)
    buf = torch.empty(min(rows + 1, m) * d, dtype=dt, device=database.device)
    m0 = 0
    while m0 < m:
        m1 = m if m - m0 <= rows + 1 else m0 + rows  # no lone last row
        sq = buf[: (m1 - m0) * d].view(m1 - m0, d).copy_(database[m0:m1])
        torch.sum(sq.mul_(sq), 1, out=out[m0:m1])
        m0 = m1
    return out
