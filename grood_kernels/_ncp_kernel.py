"""The gradient step's class-group kernel: distances by GEMM, online softmax, candidates.

One program per (row block x class group), group fastest (the schedule and the math are in
:mod:`grood_kernels.ncp_gradient`). Its K-loop hands the prepared prototypes to ``tl.dot`` as
loaded and centres the feature tile in registers on the A operand (or, staged, loads it
centred); the tile epilogue keeps a running max / sum-exp and the ``N_CAND`` nearest classes,
and writes them as the group's partial result. The last program of a row block to arrive
merges the partials and finishes its rows (:func:`grood_kernels._ncp_finish.finish_rows`),
unless the finish runs as a launch of its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

from grood_kernels._dot import dot_t
from grood_kernels._ncp_finish import finish_rows
from grood_kernels._ncp_rows import distances, load_u, store_partials
from grood_kernels._topk import first_nearest, insert_nearest


@triton.jit
def _split_tf32(x):
    """``x = hi + lo`` with ``hi`` exact in tf32 (10 mantissa bits kept) and ``lo = x - hi``
    exact in fp32: the operands of a three-product tf32 GEMM that is fp32-faithful."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _class_block_dots(
    # pointers: features, the prepared operand, the OOD prototype
    h_ptr, op_ptr, pood_ptr, psq_ptr,
    # the row tile, the class block; sizes and scalars
    offs_n, mask_n, c0, C, D, inv_scale,
    # strides
    stride_hn, stride_hd, stride_oc,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr, WITH_SQ: tl.constexpr, STAGED: tl.constexpr,
):
    """``u . P_c - ||P_c||^2 / 2`` for one class block [BLOCK_N, BLOCK_C] (-inf for classes
    past C), and ``||u||^2`` when WITH_SQ.

    The accumulator starts at zero and ``||P_c||^2 / 2`` is subtracted after the K-loop: started
    there, the accumulator's magnitude would set the precision every product is added at (the
    tensor cores align a step's products to the accumulator; FMA rounds to it), which on an
    H200 put tf32x3 at 4e-5 relative in q_ood where the softmax is hard (ieee 1.8e-6); the
    norms are loaded after the loop, so they hold no registers during it. The prepared operand
    is padded to whole tiles, so its loads need no mask and go to ``tl.dot`` as loaded; the
    feature tile is centred in registers (the A operand), or with ``STAGED`` loaded centred
    from the pre-pass's rows and passed on as loaded.
    """
    offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    arange_d = tl.arange(0, BLOCK_D)  # int32: see _ncp_rows._wide
    dots = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    # ||u||^2 summed per element over the K-steps and across the row once after the loop: a
    # row sum in every K-step cost the tf32 K-loop 31 of its 206 instructions (shuffles).
    sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DOT_MODE != 0:
        # At least one K-step: without it the compiled code keeps a path that skips the K-loop,
        # where the zeroed accumulator meets the final wgmma wait, and ptxas then serializes
        # every wgmma of the kernel (its note C7515; tf32 at every shape, bf16 at some, triton
        # 3.6-3.9). (Not in ieee: no wgmma, and on sm_100a more registers, spilled in the
        # K-loop.)
        tl.assume(D > 0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, offs_d < D, stride_hd,
                    inv_scale, STAGED, SPARE_ROWS=1)  # [BLOCK_N, BLOCK_D]
        if WITH_SQ:
            sq += u * u
        p = tl.load(op_ptr + offs_c[:, None] * stride_oc + offs_d[None, :])  # [BLOCK_C, BLOCK_D]
        if DOT_MODE == 2:
            # Split precision as one tf32 GEMM over 4 x BLOCK_D: per feature, (u_hi, u_hi,
            # u_lo, u_lo) (join appends the new axis last) against the prepared
            # (P_hi, P_lo, P_hi, P_lo). One dot keeps the MMA
            # asynchronous (three separate dots each wait for their own).
            u_hi, u_lo = _split_tf32(u)
            pair = tl.join(u_hi, u_lo)
            a = tl.reshape(tl.join(pair, pair), [BLOCK_N, 4 * BLOCK_D])
            p4 = tl.load(op_ptr + offs_c[:, None] * stride_oc + 4 * d0
                         + tl.arange(0, 4 * BLOCK_D)[None, :])
            dots = dot_t(a, p4, dots, 1)
        else:  # (the tile centred here rounded to TF32; the staged rows go as loaded)
            dots = dot_t(u, p, dots, DOT_MODE, ROUND_A=1 - STAGED)
    p_sq = tl.load(psq_ptr + offs_c, mask=offs_c < C, other=float("inf"))
    if WITH_SQ:
        u_sq = tl.sum(sq, axis=1)
    else:
        u_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    return dots - 0.5 * p_sq[None, :], u_sq


@triton.jit
def _ncp_gradient_kernel(
    # pointers: inputs
    h_ptr, op_ptr, proto_ptr, pood_ptr, psq_ptr,
    # pointers: partial results per (class group, row) and the per-row-block arrival counters
    part_f_ptr, part_i_ptr, count_ptr,
    # pointers: outputs
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale, n_groups, blocks_per_group,
    # strides
    stride_hn, stride_hd, stride_oc, stride_pc, stride_pd, stride_gn, stride_gd,
    # the pre-pass's ||u||^2 per row (STAGED; unread otherwise)
    usq_ptr,
    # the features h and their strides, for the finish where the staged rows hold the GEMM's
    # operand only (OPERAND_ROWS; unread otherwise)
    raw_ptr, stride_rn, stride_rd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr, STAGED: tl.constexpr,
    FINISH: tl.constexpr, FLAT_GATE: tl.constexpr = False, RERANK_GATE: tl.constexpr = 0,
    ONE_BLOCK: tl.constexpr = 0, LEAN: tl.constexpr = 0, EVEN_D: tl.constexpr = 0,
    OPERAND_ROWS: tl.constexpr = 0,
):
    # FINISH: the software-pipelining stages of the finish's loops over D (1: plain loads; 2:
    # each step's loads issued during the one before, in the shared memory the K-loop's
    # stages leave free; see _ncp_configs.finish_stages). 0 (measurement only, ``grood bench
    # --only anatomy``): the partials are written and no program finishes the rows, so the
    # finish's share can be taken apart. ONE_BLOCK: every class group is one class block (the
    # launcher knows; ``blocks_per_group`` is then 1). LEAN: the finish's passes over D as the
    # separate finish runs them (see _ncp_configs.lean_finish); EVEN_D: D a whole number of
    # K-steps (no column masks in those passes). OPERAND_ROWS (with STAGED): the staged rows
    # hold the MMA's A operand only (u rounded to TF32, or in bf16 within the gradient's rows:
    # _ncp_configs.operand_rows); the finish centres h (``raw_ptr``) itself, as without
    # STAGED, and reads the pre-pass's ||u||^2 (of the unrounded rows), as with it.
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // n_groups
    group = pid % n_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slots = tl.arange(0, N_CAND)
    n_cb = tl.cdiv(C, BLOCK_C)
    cb0 = group * blocks_per_group
    cb1 = tl.minimum(cb0 + blocks_per_group, n_cb)
    # The rows the K-loop loads: its rows past N load row 0 (load_u's SPARE_ROWS), but bf16
    # rows in the gradient's (OPERAND_ROWS) may hold a finished row's fp32 gradient by then,
    # bytes that are no bf16 values: there they load the tile's first row, which no other
    # program writes before this one is done with it.
    ld_n, ld_mask = offs_n, mask_n
    if OPERAND_ROWS and DOT_MODE == 3:
        ld_n = tl.where(mask_n, offs_n, pid_n * BLOCK_N)
        ld_mask = ld_n < N

    # First class block of the group: also ||u||^2 (the pre-pass's, STAGED); seeds the
    # running max / sum-exp.
    c0 = cb0 * BLOCK_C
    dots, u_sq = _class_block_dots(h_ptr, op_ptr, pood_ptr, psq_ptr, ld_n, ld_mask, c0, C, D,
                                   inv_scale,
                                   stride_hn, stride_hd, stride_oc, BLOCK_N, BLOCK_C, BLOCK_D,
                                   DOT_MODE, STAGED == 0, STAGED)
    if STAGED:
        u_sq = tl.load(usq_ptr + offs_n, mask=mask_n, other=0.0)
    dist = distances(dots, u_sq, scale)
    if ONE_BLOCK:
        # The group is this block: its candidates are the tile's nearest, one reduction a
        # round (while the tensor cores wait), and no class loop is compiled.
        cand_d, cand_i, nearest = first_nearest(dist, c0, BLOCK_N, N_CAND, BLOCK_C)
        m = -nearest
        acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
    else:
        m = -tl.min(dist, axis=1)
        acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
        cand_d = tl.full([BLOCK_N, N_CAND], float("inf"), dtype=tl.float32)
        cand_i = tl.full([BLOCK_N, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C,
                                        FLAT_GATE=FLAT_GATE)
        for cb in range(cb0 + 1, cb1):
            c0 = cb * BLOCK_C
            dots, _ = _class_block_dots(h_ptr, op_ptr, pood_ptr, psq_ptr, ld_n, ld_mask, c0,
                                        C, D, inv_scale, stride_hn, stride_hd, stride_oc,
                                        BLOCK_N, BLOCK_C, BLOCK_D, DOT_MODE, False, STAGED)
            dist = distances(dots, u_sq, scale)
            m_new = tl.maximum(m, -tl.min(dist, axis=1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(-dist - m_new[:, None]), axis=1)
            m = m_new
            cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C,
                                            FLAT_GATE=FLAT_GATE)

    store_partials(part_f_ptr, part_i_ptr, group * N + offs_n, mask_n, m, acc, cand_d, cand_i,
                   N_CAND)
    if FINISH:
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_groups - 1:
            tl.debug_barrier()
            x_ptr, stride_xn, stride_xd = h_ptr, stride_hn, stride_hd
            if OPERAND_ROWS:
                x_ptr, stride_xn, stride_xd = raw_ptr, stride_rn, stride_rd
            finish_rows(x_ptr, proto_ptr, pood_ptr, part_f_ptr, part_i_ptr,
                        grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
                        offs_n, mask_n, N, C, D, scale, inv_scale, n_groups,
                        stride_xn, stride_xd, stride_pc, stride_pd, stride_gn, stride_gd,
                        BLOCK_N, BLOCK_D, N_CAND, STAGED * (1 - OPERAND_ROWS), FINISH,
                        DOT_MODE, RERANK_GATE, LEAN, EVEN_D, OPERAND_ROWS)
