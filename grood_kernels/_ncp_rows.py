"""Row-tile device functions every gradient-step kernel shares.

The centred feature tile (:func:`load_u`), distances from the shifted GEMM
(:func:`distances`), a class group's partial result (:func:`store_partials`), and a row tile's
results from its softmax terms and candidates (:func:`row_results`, :func:`answered`,
:func:`store_row_results`): the class-group kernel (:mod:`grood_kernels._ncp_kernel`), its
finish (:mod:`grood_kernels._ncp_finish`), the staged pre-pass, the split epilogue and the
kernels without a GEMM or with a single read all compute these the same way.
"""

import triton
import triton.language as tl

from grood_kernels._topk import clamp_sq


@triton.jit
def _wide(offs_d):
    """``offs_d`` as a row of int64 column offsets: the K-loop keeps its feature offsets in
    int32 (cheaper compares and adds), but times a column stride (a column-major ``h``: N) they
    can pass 2**31. A contiguous ``h``'s unit stride folds the widening away."""
    return offs_d[None, :].to(tl.int64)


@triton.jit
def load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd, inv_scale,
           STAGED: tl.constexpr = 0, SPARE_ROWS: tl.constexpr = 0, EVEN_D: tl.constexpr = 0):
    """The centred feature tile ``u = h / scale - p_o`` [rows, BLOCK_D] in fp32; 0 outside.
    With ``STAGED`` the pointer holds ``u`` already (the staged variant's pre-pass wrote it):
    the tile is loaded as it is, with nothing between the load and its use. With
    ``SPARE_ROWS`` (the GEMM's K-loop, whose rows past N feed only partial results that are
    never stored) rows past N load row 0 instead of zeros: the load needs no row mask and
    nothing selects between it and the MMA (the select cost the tf32 K-loop 16 % of its
    instructions and 17 registers). With ``SPARE_ROWS`` and ``EVEN_D`` (D a whole number of
    ``BLOCK_D`` steps) no load has a mask."""
    if SPARE_ROWS:
        rows = tl.where(mask_n, offs_n, 0)
        mask = mask_d[None, :]
    else:
        rows = offs_n
        mask = mask_n[:, None] & mask_d[None, :]
    if SPARE_ROWS and EVEN_D:
        ptrs = h_ptr + rows[:, None] * stride_hn + _wide(offs_d) * stride_hd
        if STAGED:
            u = tl.load(ptrs)
        else:
            u = tl.load(ptrs).to(tl.float32) * inv_scale - tl.load(pood_ptr + offs_d)[None, :]
    elif STAGED:
        u = tl.load(h_ptr + rows[:, None] * stride_hn + _wide(offs_d) * stride_hd, mask=mask,
                    other=0.0)
    else:
        p_o = tl.load(pood_ptr + offs_d, mask=mask_d, other=0.0)
        x = tl.load(h_ptr + rows[:, None] * stride_hn + _wide(offs_d) * stride_hd, mask=mask,
                    other=0.0).to(tl.float32)
        u = x * inv_scale - p_o[None, :]  # 0 past D: both loads give 0 there
        if not SPARE_ROWS:
            u = tl.where(mask, u, 0.0)
    return u


@triton.jit
def distances(dots, u_sq, scale):
    """Distances from the shifted GEMM ``u . P_c - ||P_c||^2 / 2`` [rows, classes] (+inf for
    classes past C, whose shift is -inf), through :func:`clamp_sq`."""
    return tl.sqrt(clamp_sq(u_sq[:, None] - 2.0 * dots)) * scale


@triton.jit
def store_partials(part_f_ptr, part_i_ptr, row, mask_n, m, acc, cand_d, cand_i,
                   N_CAND: tl.constexpr):
    """Write one class group's partial result for a row tile at the partials' rows ``row``
    (``group * N + offs_n``): ``[m, acc, cand_d...]`` in fp32 and ``cand_i`` in int32 (empty
    slots -1), as :func:`grood_kernels._ncp_finish.finish_rows` reads them."""
    W: tl.constexpr = 2 + N_CAND
    slots = tl.arange(0, N_CAND)
    tl.store(part_f_ptr + row * W, m, mask=mask_n)
    tl.store(part_f_ptr + row * W + 1, acc, mask=mask_n)
    tl.store(part_f_ptr + row[:, None] * W + 2 + slots[None, :], cand_d, mask=mask_n[:, None])
    tl.store(part_i_ptr + row[:, None] * N_CAND + slots[None, :], tl.maximum(cand_i, -1),
             mask=mask_n[:, None])


@triton.jit
def row_results(m, acc, cand_d, cand_i, exact_sq, taken, u_sq, scale, C,
                GATED: tl.constexpr = 0):
    """Per row, from the running max ``m`` and sum ``acc`` of the GEMM terms (OOD term not yet
    in), the candidates (GEMM distances ``cand_d``, ids ``cand_i``, -1 or less where empty), their
    exact squared distances (with ``GATED`` only where ``taken``; the others keep their GEMM
    distances) and
    ``||u||^2`` (units ``scale``): ``(q_ood, lse, min_dist, pred, gradient scale q_ood /
    ||u||)``. The re-ranked candidates' GEMM terms are swapped for exact ones. Rows whose
    ``||u||^2`` is not finite get NaN and class -1 (NaN gradient scale)."""
    u_norm = tl.sqrt(u_sq)
    d_ood = u_norm * scale
    valid = cand_i >= 0
    if GATED:
        exact = tl.where(valid & taken, tl.sqrt(exact_sq) * scale,
                         tl.where(valid, cand_d, float("inf")))
    else:
        exact = tl.where(valid, tl.sqrt(exact_sq) * scale, float("inf"))
    m_all = tl.maximum(m, -d_ood)
    acc = acc * tl.exp(m - m_all) + tl.exp(-d_ood - m_all)
    rest = acc - tl.sum(tl.where(valid, tl.exp(-cand_d - m_all[:, None]), 0.0), axis=1)
    rest = tl.maximum(rest, 0.0)
    best = tl.min(exact, axis=1)
    shift = tl.where(best < float("inf"), best, 0.0)  # rows past N have no candidates
    # A zero sum's log is -inf (the selects below); the argument is kept positive so nothing
    # divides by zero. The rest is empty when the candidates were all of the sum.
    s_exact = tl.sum(tl.exp(-exact + shift[:, None]), axis=1)
    log_exact = tl.log(tl.maximum(s_exact, 1e-38))
    log_rest = tl.log(tl.maximum(rest, 1e-38))
    lse = _log_add_exp(tl.where(rest > 0, m_all + log_rest, float("-inf")),
                       tl.where(s_exact > 0, -shift + log_exact, float("-inf")))
    # q_ood = exp(-(d_ood + lse)), with d_ood + lse summed part by part: each part's shift
    # taken from d_ood first (fp32 numbers of one size, so the difference adds no rounding),
    # then its log. From lse, rounded at the size of the distances, q_ood would carry an ulp
    # of lse (1.2e-4 at distances of 1,000) however near 1 it is.
    q = tl.exp(-_log_add_exp(tl.where(rest > 0, (d_ood + m_all) + log_rest, float("-inf")),
                             tl.where(s_exact > 0, (d_ood - shift) + log_exact,
                                      float("-inf"))))
    pred = tl.min(tl.where(exact == best[:, None], cand_i, C), axis=1)  # lowest index on ties
    return answered(u_sq, u_norm, q, lse, best, pred)


@triton.jit
def _log_add_exp(a, b):
    """``log(exp(a) + exp(b))`` from the larger term (NaN where both are -inf)."""
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def answered(u_sq, u_norm, q, lse, best, pred):
    """A row tile's ``(q_ood, lse, min_dist, pred, gradient scale q_ood / ||u||)`` from its
    OOD share, log-sum-exp and nearest class. A row with NaN or Inf (or a norm beyond fp32)
    has no answer: NaN results and no class (-1), whatever the comparisons and maxima before
    made of its NaNs and infs."""
    g_scale = tl.where(u_norm > 0, q / tl.where(u_norm > 0, u_norm, 1.0), 0.0)
    ok = u_sq < float("inf")
    nan = float("nan")
    return (tl.where(ok, q, nan), tl.where(ok, lse, nan), tl.where(ok, best, nan),
            tl.where(ok, pred, -1), tl.where(ok, g_scale, nan))


@triton.jit
def store_row_results(q_ptr, lse_ptr, mind_ptr, pred_ptr, offs_n, mask_n, q, lse, best, pred):
    """Write one row tile's q_ood, lse, min_dist and pred (int64)."""
    tl.store(q_ptr + offs_n, q, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(mind_ptr + offs_n, best, mask=mask_n)
    tl.store(pred_ptr + offs_n, pred.to(tl.int64), mask=mask_n)
