"""The finish of a gradient-step row tile: the merge of the class groups' partials, then the
exact re-rank, the results and the gradient (:mod:`grood_kernels._ncp_rerank`: gated on the
GEMM's error bound where the prototypes pass the L2 budget, lean passes over D where not). The
class-group kernel's last program of a row block runs it (:func:`finish_rows`), or
:func:`_ncp_finish_kernel` as a launch of its own over small row tiles. The row-tile helpers it
shares with the other kernels are in :mod:`grood_kernels._ncp_rows`."""

import triton
import triton.language as tl

from grood_kernels._ncp_rerank import rerank_and_write
from grood_kernels._topk import merge_candidates


@triton.jit
def finish_rows(
    # pointers: inputs, the groups' partial results, outputs, ||u||^2 (STAGED), ||P_c||^2
    h_ptr, proto_ptr, pood_ptr, part_f_ptr, part_i_ptr,
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
    # the row tile; sizes and scalars
    offs_n, mask_n, N, C, D, scale, inv_scale, n_groups,
    # strides
    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_CAND: tl.constexpr,
    STAGED: tl.constexpr, FINISH_STAGES: tl.constexpr, DOT_MODE: tl.constexpr,
    RERANK_GATE: tl.constexpr, LEAN: tl.constexpr = 0, EVEN_D: tl.constexpr = 0,
    USQ_GIVEN: tl.constexpr = 0,
):
    """Merge the groups' partials of one row tile, re-rank exactly, write the results. With
    ``STAGED`` the gradient's rows hold ``u`` (the pre-pass wrote it; they are scaled in place
    at the end) and ``||u||^2`` comes from the pre-pass, as it does with ``USQ_GIVEN`` alone
    (the staged rows hold the GEMM's operand only; the row pointer is ``h``). ``FINISH_STAGES``:
    software-pipelining stages of the two loops over D (1: none). ``LEAN`` and ``EVEN_D``: see
    :func:`rerank_and_write`."""
    if STAGED:  # u in fp32, in the gradient's rows
        h_ptr, stride_hn, stride_hd = grad_ptr, stride_gn, stride_gd
    W: tl.constexpr = 2 + N_CAND
    slots = tl.arange(0, N_CAND)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    cand_d = tl.full([BLOCK_N, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_N, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty: -1 - slot
    for g in range(0, n_groups):  # in class order, so lower class ids win exact ties
        row = (offs_n * 0 + g) * N + offs_n  # int64: g * N may pass 2**31
        m_g = tl.load(part_f_ptr + row * W, mask=mask_n, other=0.0, cache_modifier=".cg")
        s_g = tl.load(part_f_ptr + row * W + 1, mask=mask_n, other=0.0, cache_modifier=".cg")
        d_g = tl.load(part_f_ptr + row[:, None] * W + 2 + slots[None, :],
                      mask=mask_n[:, None], other=float("inf"), cache_modifier=".cg")
        i_g = tl.load(part_i_ptr + row[:, None] * N_CAND + slots[None, :],
                      mask=mask_n[:, None], other=-1, cache_modifier=".cg")
        m_new = tl.maximum(m, m_g)
        acc = acc * tl.exp(m - m_new) + s_g * tl.exp(m_g - m_new)
        m = m_new
        cand_d, cand_i = merge_candidates(d_g, i_g, cand_d, cand_i, N_CAND)

    rerank_and_write(h_ptr, proto_ptr, pood_ptr, grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
                     usq_ptr, psq_ptr, m, acc, cand_d, cand_i, offs_n, mask_n, C, D, scale,
                     inv_scale, stride_hn, stride_hd, stride_pc, stride_pd, stride_gn,
                     stride_gd, BLOCK_N, BLOCK_D, N_CAND, STAGED, FINISH_STAGES, DOT_MODE,
                     RERANK_GATE, LEAN, EVEN_D, USQ_GIVEN)


@triton.jit
def _ncp_finish_kernel(
    # pointers: inputs (h, or u in the gradient's rows when STAGED), the prototypes, the OOD
    # prototype, the class groups' partial results
    h_ptr, proto_ptr, pood_ptr, part_f_ptr, part_i_ptr,
    # pointers: outputs, ||u||^2 (STAGED), ||P_c||^2
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale, n_groups,
    # strides
    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_CAND: tl.constexpr,
    STAGED: tl.constexpr, FINISH_STAGES: tl.constexpr, DOT_MODE: tl.constexpr,
    RERANK_GATE: tl.constexpr, EVEN_D: tl.constexpr, USQ_GIVEN: tl.constexpr = 0,
):
    """The finish as a launch of its own (``LaunchConfig.finish_apart``): each program takes
    ``BLOCK_N``-row tiles in turn (tile ``pid``, then every ``num_programs``-th after it),
    merges the class groups' partials that the class-group kernel wrote (launched with
    ``FINISH=0``), re-ranks the candidates exactly and writes the results and the gradient
    (:func:`finish_rows`, its passes over D lean: ``LEAN``). The launcher runs whole waves
    of programs whose row tiles, read and written, stay within the L2 budget
    (:func:`finish_programs`), so a tile's second pass (the gradient's, after the re-rank's)
    reads it from L2 and ``h`` comes from HBM once. In the
    class-group kernel the finish falls to one program per row block of 128 rows, which runs
    it alone on its SM while the tensor cores wait."""
    for t in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # t * BLOCK_N < N
        mask_n = offs_n < N
        finish_rows(h_ptr, proto_ptr, pood_ptr, part_f_ptr, part_i_ptr,
                    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
                    offs_n, mask_n, N, C, D, scale, inv_scale, n_groups,
                    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
                    BLOCK_N, BLOCK_D, N_CAND, STAGED, FINISH_STAGES, DOT_MODE, RERANK_GATE,
                    LEAN=1, EVEN_D=EVEN_D, USQ_GIVEN=USQ_GIVEN)


#: The separate finish's tile: rows, feature columns per step, warps, pipelining stages of its
#: loops over D.
FINISH_TILE = (8, 128, 4, 2)


def finish_programs(n: int, d: int, l2_budget: int, n_sm: int, min_waves: int = 1) -> int:
    """Programs of the separate finish: whole waves of ``n_sm`` (as many programs on every SM)
    as keep their row tiles (8 rows of ``d`` fp32 read, and as many written) within
    ``l2_budget`` (the rest of the L2 holds the prototype rows the re-rank gathers and the
    partials streaming through), at least ``min_waves`` per SM (and one) and at most one per
    row tile."""
    rows = FINISH_TILE[0]
    tiles = -(-n // rows)
    waves = max(1, min_waves, l2_budget // (2 * rows * d * 4) // n_sm)
    return max(1, min(tiles, waves * n_sm))


#: Programs per SM the finish kernel's registers allow on Hopper (151 of them at ImageNet-1k:
#: 3 CTAs of 4 warps, sm_90a): the autotuning candidate that fills them, its row tiles then
#: past the L2 budget where D is large (``LaunchConfig.finish_waves``).
FINISH_OCCUPANCY = 3
