"""The exact re-rank of a gradient-step row tile and its results: from the merged softmax
terms and the GEMM's candidates, each candidate's squared distance from fp32 differences
(every candidate, or with the gate only those the GEMM's error bound (:func:`gemm_error_sq`)
lets be nearer than the nearest found), then ``q_ood``, the prediction, ``min_dist``, the
log-sum-exp and the gradient (:func:`rerank_and_write`). The finish
(:mod:`grood_kernels._ncp_finish`), the split epilogue and the single-read kernel call it, or
its passes over D (:func:`add_exact_sq`, :func:`exact_sq_lean`)."""

import triton
import triton.language as tl

from grood_kernels._ncp_rows import load_u, row_results, store_row_results

#: Candidates re-ranked exactly in every row where the re-rank is gated (``RERANK_GATE``):
#: the GEMM-nearest. The others are re-ranked only where the GEMM's error bound
#: (:func:`gemm_error_sq`) lets them be nearer than it.
ALWAYS_EXACT = tl.constexpr(1)


@triton.jit
def gemm_error_sq(u_sq, p_sq, D, DOT_MODE: tl.constexpr):
    """A bound on |GEMM squared distance - exact squared distance| (units of ``scale``
    squared), per row and candidate: ``u_sq`` [rows] and the candidates' ``||P_c||^2``
    [rows, slots]. Operand rounding (relative ``r`` per operand: ieee 0, tf32 2**-11 (every
    tf32 operand the kernels hand the MMA or the BLAS is rounded to the nearest TF32 value:
    half a unit in the last of its 11 significant bits; a truncated one would err by up to
    2**-10), tf32x3 2**-19 (its hi/lo split), bf16 2**-8 (rounded to nearest: half a unit in
    the last of its 8 significant bits); ``2r + r^2`` of ``sum |u_k P_k|
    <= |u| |P|``, twice in the distance), fp32 accumulation over the K terms of the dot and of
    both squared norms (``gamma = K 2**-23 / (1 - K 2**-23)``: tensor cores truncate partial
    sums, so one bit more than rounding), and the three fp32 roundings of ``|u|^2 + |P|^2 -
    2 u.P``."""
    if DOT_MODE == 1:
        r = 0.00048828125  # 2**-11
    elif DOT_MODE == 2:
        r = 1.9073486328125e-06  # 2**-19
    elif DOT_MODE == 3:
        r = 0.00390625  # 2**-8
    else:
        r = 0.0
    k = D * (4 if DOT_MODE == 2 else 1) * 1.1920928955078125e-07  # K 2**-23
    gamma = k / (1.0 - k)
    cross = tl.sqrt(u_sq)[:, None] * tl.sqrt(p_sq)
    total = u_sq[:, None] + p_sq
    return (2.0 * ((2.0 * r + r * r) + gamma * (1.0 + r) * (1.0 + r)) * cross + gamma * total
            + 1.7881393432617188e-07 * (total + 2.0 * cross))  # 3 * 2**-24


@triton.jit
def rerank_and_write(
    # pointers: inputs (h, or u in the gradient's rows when STAGED), outputs, ||u||^2
    # (STAGED), the prepared prototypes' ||P_c||^2
    h_ptr, proto_ptr, pood_ptr, grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
    # the row tile's running max and sum of the GEMM terms and its candidates
    m, acc, cand_d, cand_i,
    # the row tile; sizes and scalars
    offs_n, mask_n, C, D, scale, inv_scale,
    # strides
    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_CAND: tl.constexpr,
    STAGED: tl.constexpr, FINISH_STAGES: tl.constexpr, DOT_MODE: tl.constexpr,
    RERANK_GATE: tl.constexpr, LEAN: tl.constexpr = 0, EVEN_D: tl.constexpr = 0,
    USQ_GIVEN: tl.constexpr = 0,
):
    """From a row tile's merged softmax terms and candidates: the candidates' exact distances
    (from fp32 differences), the results and the gradient. With ``STAGED`` the row pointer
    is the gradient's rows, holding ``u``, scaled in place at the end. ``||u||^2`` comes
    from ``usq_ptr`` with ``STAGED`` or ``USQ_GIVEN`` (the pre-pass's, where the staged rows
    hold the GEMM's operand only, ``u`` rounded to TF32 or in bf16, and the row pointer is
    ``h``); otherwise it is summed here.

    Without ``RERANK_GATE`` every candidate is re-ranked (the launcher's choice where the
    prototypes stay in L2, so their rows cost no HBM traffic). With it, the
    GEMM-nearest candidate is re-ranked in every row (``ALWAYS_EXACT``), together with
    ``||u||^2``, and each other one is gathered and re-ranked only where its GEMM squared
    distance, less the GEMM's error bound (:func:`gemm_error_sq`), is not above the exact one found:
    elsewhere it provably is not the nearest, so the prediction and ``min_dist`` are those of
    re-ranking every candidate, and its term keeps its GEMM estimate in the sum, as every
    class past the candidates does. Rows whose classes tie within the GEMM's error re-rank
    them all; where no row of the tile does, the second pass over D is skipped.

    ``LEAN`` (the finish launched apart): the exact distances by :func:`exact_sq_lean`, and
    the gradient's pass without a select after its loads; ``EVEN_D``: D is a whole number of
    ``BLOCK_D`` steps, so no load or store needs a column mask."""
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    slots = tl.arange(0, N_CAND)
    valid = cand_i >= 0
    # ||u||^2 and the exact squared distances of every candidate, or with the gate of the
    # nearest one, from differences in fp32.
    FIRST_PASS: tl.constexpr = N_CAND - RERANK_GATE * (N_CAND - ALWAYS_EXACT)
    SUM_USQ: tl.constexpr = (STAGED + USQ_GIVEN) == 0
    if LEAN:
        u_sq, exact_sq = exact_sq_lean(h_ptr, proto_ptr, pood_ptr, cand_i,
                                       valid & (slots[None, :] < FIRST_PASS), offs_n, mask_n,
                                       D, stride_hn, stride_hd, stride_pc, stride_pd,
                                       inv_scale, BLOCK_N, BLOCK_D, N_CAND, STAGED,
                                       FINISH_STAGES, SUM_USQ, EVEN_D)
    else:
        u_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        exact_sq = tl.zeros([BLOCK_N, N_CAND], dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=FINISH_STAGES):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd,
                       inv_scale, STAGED)
            if SUM_USQ:
                u_sq += tl.sum(u * u, axis=1)
            exact_sq = add_exact_sq(exact_sq, u, cand_i, valid, proto_ptr, pood_ptr, mask_n,
                                    offs_d, mask_d, stride_pc, stride_pd, inv_scale, N_CAND, 0,
                                    FIRST_PASS, 0)
    if not SUM_USQ:
        u_sq = tl.load(usq_ptr + offs_n, mask=mask_n, other=0.0)
    if N_CAND <= FIRST_PASS:  # every candidate re-ranked
        taken = valid
    else:
        taken = valid & (slots[None, :] < FIRST_PASS)
        best_sq = tl.min(tl.where(taken, exact_sq, float("inf")), axis=1)
        p_sq = tl.load(psq_ptr + tl.maximum(cand_i, 0), mask=valid, other=0.0)
        g = cand_d / scale
        k = D * (4 if DOT_MODE == 2 else 1) * 1.1920928955078125e-07
        # both sides computed in fp32 over D terms: a gamma margin on each
        low = (g * g - gemm_error_sq(u_sq, p_sq, D, DOT_MODE)) * (1.0 - 2.0 * k / (1.0 - k))
        gate = valid & (slots[None, :] >= ALWAYS_EXACT) & (low <= best_sq[:, None]) \
            & mask_n[:, None]
        if LEAN:
            if tl.max(tl.max(gate.to(tl.int32), axis=1), axis=0) > 0:
                exact_sq += exact_sq_lean(h_ptr, proto_ptr, pood_ptr, cand_i, gate, offs_n,
                                          mask_n, D, stride_hn, stride_hd, stride_pc,
                                          stride_pd, inv_scale, BLOCK_N, BLOCK_D, N_CAND,
                                          STAGED, FINISH_STAGES, 0, EVEN_D)[1]
        elif tl.max(tl.max(gate.to(tl.int32), axis=1), axis=0) > 0:
            for d0 in tl.range(0, D, BLOCK_D, num_stages=FINISH_STAGES):
                offs_d = d0 + arange_d
                mask_d = offs_d < D
                u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d,
                           stride_hd, inv_scale, STAGED)
                exact_sq = add_exact_sq(exact_sq, u, cand_i, gate, proto_ptr, pood_ptr,
                                        mask_n, offs_d, mask_d, stride_pc, stride_pd,
                                        inv_scale, N_CAND, ALWAYS_EXACT, N_CAND, 1)
        taken = taken | gate
    q, lse, best, pred, g_scale = row_results(m, acc, cand_d, cand_i, exact_sq, taken, u_sq,
                                              scale, C, N_CAND > FIRST_PASS)
    store_row_results(q_ptr, lse_ptr, mind_ptr, pred_ptr, offs_n, mask_n, q, lse, best, pred)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=FINISH_STAGES):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        # LEAN: rows past N load row 0 and are not stored, so nothing selects after the load
        u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd,
                   inv_scale, STAGED, SPARE_ROWS=LEAN, EVEN_D=EVEN_D)
        tl.store(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                 u * g_scale[:, None],
                 mask=mask_n[:, None] if EVEN_D else mask_n[:, None] & mask_d[None, :])


@triton.jit
def _slot_row(pick, slots, r: tl.constexpr, stride_pc):
    """Offsets of the prototype rows in slot ``r`` of the rows' candidate lists ``pick``."""
    return tl.sum(tl.where(slots[None, :] == r, pick, 0), axis=1).to(tl.int64) * stride_pc


@triton.jit
def _row_part(proto_ptr, row, cols, mask_d, EVEN_D: tl.constexpr):
    """The prototype rows at offsets ``row`` over the columns ``cols`` in fp32 (0 past D
    unless ``EVEN_D``, where no column is past D)."""
    ptrs = proto_ptr + row[:, None] + cols
    if EVEN_D:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def exact_sq_lean(h_ptr, proto_ptr, pood_ptr, cand_i, take, offs_n, mask_n, D,
                  stride_hn, stride_hd, stride_pc, stride_pd, inv_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_CAND: tl.constexpr,
                  STAGED: tl.constexpr, FINISH_STAGES: tl.constexpr, WITH_USQ: tl.constexpr,
                  EVEN_D: tl.constexpr):
    """One pass over D: ``(||u||^2 [rows] (0 unless WITH_USQ), the squared distances from
    fp32 differences [rows, N_CAND] of the candidates ``cand_i`` where ``take`` is set, 0
    elsewhere)``, in 3 operations per gathered element: each candidate's prototype row is
    picked out of the row's list once, before the loop (:func:`add_exact_sq` does it every
    step), its squares are summed per element over the D-steps and across the row once after
    the loop (not in every step), and no load needs a row mask or a select after it: rows past
    N load row 0, slots not taken (empty candidates among them) load prototype row 0, and the
    final selects drop what they add. With ``EVEN_D`` no load needs a column mask either;
    otherwise ``u`` and the prototype rows load 0 past D."""
    tl.static_assert(N_CAND == 4, "the lean re-rank holds one accumulator per candidate")
    slots = tl.arange(0, N_CAND)
    live = take & mask_n[:, None]
    pick = tl.where(live, cand_i, 0)
    row0 = _slot_row(pick, slots, 0, stride_pc)
    row1 = _slot_row(pick, slots, 1, stride_pc)
    row2 = _slot_row(pick, slots, 2, stride_pc)
    row3 = _slot_row(pick, slots, 3, stride_pc)
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    u_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=FINISH_STAGES):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd,
                   inv_scale, STAGED, SPARE_ROWS=1, EVEN_D=EVEN_D)
        if WITH_USQ:
            u_acc += u * u
        if EVEN_D:
            p_o = tl.load(pood_ptr + offs_d)[None, :]
        else:
            p_o = tl.load(pood_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
        cols = offs_d[None, :] * stride_pd
        d_0 = u - (_row_part(proto_ptr, row0, cols, mask_d, EVEN_D) * inv_scale - p_o)
        d_1 = u - (_row_part(proto_ptr, row1, cols, mask_d, EVEN_D) * inv_scale - p_o)
        d_2 = u - (_row_part(proto_ptr, row2, cols, mask_d, EVEN_D) * inv_scale - p_o)
        d_3 = u - (_row_part(proto_ptr, row3, cols, mask_d, EVEN_D) * inv_scale - p_o)
        acc0 += d_0 * d_0
        acc1 += d_1 * d_1
        acc2 += d_2 * d_2
        acc3 += d_3 * d_3
    sq = tl.where(slots[None, :] == 0, tl.sum(acc0, axis=1)[:, None],
                  tl.where(slots[None, :] == 1, tl.sum(acc1, axis=1)[:, None],
                           tl.where(slots[None, :] == 2, tl.sum(acc2, axis=1)[:, None],
                                    tl.sum(acc3, axis=1)[:, None])))
    # rows past N (row 0's values) as the other passes leave them: ||u||^2 0
    return tl.where(mask_n, tl.sum(u_acc, axis=1), 0.0), tl.where(live, sq, 0.0)


@triton.jit
def add_exact_sq(exact_sq, u, cand_i, take, proto_ptr, pood_ptr, mask_n, offs_d, mask_d,
                 stride_pc, stride_pd, inv_scale, N_CAND: tl.constexpr, FIRST: tl.constexpr,
                 LAST: tl.constexpr, GATED: tl.constexpr):
    """``exact_sq`` [rows, N_CAND] plus, for the slots ``FIRST .. LAST - 1`` (with ``GATED``
    only where ``take`` [rows, N_CAND] is set), each candidate's squared distance to the
    centred feature tile ``u`` over the columns ``offs_d``, from fp32 differences against the
    raw prototype rows (centred here); empty candidates (negative ids) add nothing. A slot not
    taken is not loaded (its lanes' loads are masked off: no memory traffic)."""
    slots = tl.arange(0, N_CAND)
    p_o = tl.load(pood_ptr + offs_d, mask=mask_d, other=0.0)
    for r in tl.static_range(FIRST, LAST):
        idx = tl.sum(tl.where(slots[None, :] == r, cand_i, 0), axis=1).to(tl.int64)
        ok = mask_n & (idx >= 0)
        if GATED:
            ok = ok & (tl.sum(tl.where(slots[None, :] == r, take.to(tl.int32), 0), axis=1) > 0)
        mask = ok[:, None] & mask_d[None, :]
        p = tl.load(proto_ptr + tl.maximum(idx, 0)[:, None] * stride_pc
                    + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, u - (p * inv_scale - p_o[None, :]), 0.0)
        part = tl.sum(diff * diff, axis=1)
        exact_sq = tl.where(slots[None, :] == r, exact_sq + part[:, None], exact_sq)
    return exact_sq
