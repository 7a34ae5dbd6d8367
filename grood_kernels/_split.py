"""The gradient step's split variant: the distance GEMM by the BLAS, everything after it fused.

Where the fused kernel's K-loop falls short of the vendor GEMM (on an H200 the tf32 step ran at
11 % of the tensor-core peak), the step can be split at the one place where a matrix must
exist: the staged pre-pass writes ``u = h / scale - p_o`` and ``||u||^2`` into the gradient's
rows (in bf16 the rows of ``u`` in bf16, in the first half of each row's bytes; in tf32 the
rows rounded to the nearest TF32 value, as the prepared prototypes are, so the BLAS's
conversion of them is exact whether it rounds or truncates; in both the finish centres ``h``
again), ``torch.mm`` (cuBLAS on a GPU) multiplies a
chunk of those rows by the prepared prototypes into an fp32 [rows, C] buffer, and
:func:`_ncp_epilogue_kernel` turns each chunk into results: distances, the online softmax,
the 4 nearest candidates, their exact distances from fp32 differences, ``q_ood``, ``pred``,
``min_dist``, ``lse`` and the gradient (written over the rows). The same
computation as the fused kernel, the GEMM's summation order aside; the buffer is bounded by
:data:`SPLIT_BUFFER_ELEMENTS` (row chunks), so extra memory stays fixed at any N. With the
finish apart the epilogue stops after its class loop and writes partial results, and the
finish kernel re-ranks and writes every row after the last chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grood_kernels._ncp_rerank import rerank_and_write
from grood_kernels._ncp_rows import distances, store_partials
from grood_kernels._topk import insert_nearest
from grood_kernels.contract import matmul_precision

#: Most elements of the fp32 [rows, C] buffer of GEMM results (256 MiB): rows are processed
#: in chunks of at most this many elements.
SPLIT_BUFFER_ELEMENTS = 1 << 26


def padded_classes(c: int, block_cols: int) -> int:
    """Columns of the buffer of GEMM results: C padded to whole ``block_cols`` blocks (the
    GEMM writes the first C of each row, the rest hold zeros; the epilogue's tiles load whole
    blocks)."""
    return triton.cdiv(c, block_cols) * block_cols


def split_rows(n: int, c: int, block_rows: int) -> int:
    """Rows per chunk: as many whole row blocks as keep the buffer (``c`` columns) within
    its bound."""
    per = max(block_rows, (SPLIT_BUFFER_ELEMENTS // max(c, 1)) // block_rows * block_rows)
    return min(per, triton.cdiv(n, block_rows) * block_rows)


def split_gemm(rows: torch.Tensor, operand: torch.Tensor, out: torch.Tensor,
               precision: str) -> None:
    """``out = rows @ operand.T`` in fp32 by the BLAS, in ``precision`` (bf16 operands give
    fp32 results: on a GPU through ``torch.mm``'s ``out_dtype``, elsewhere by widening the
    bf16 values, which fp32 holds exactly)."""
    if precision == "bf16":
        if rows.is_cuda:
            torch.mm(rows, operand.T, out_dtype=torch.float32, out=out)
        else:
            torch.mm(rows.float(), operand.float().T, out=out)
        return
    with matmul_precision(precision, rows.device):
        torch.mm(rows, operand.T, out=out)


@triton.jit
def _block_distances(dots_ptr, psq_ptr, local, mask_n, c0, C, stride_dn, u_sq, scale,
                     BLOCK_C: tl.constexpr):
    """Distances of the chunk's rows ``local`` to classes ``c0 .. c0 + BLOCK_C`` from the
    GEMM's results (+inf past C). The results' rows are padded to whole class blocks
    (:func:`padded_classes`), so the tile loads with a row mask only: whole 16-byte vectors,
    and a layout that keeps each row within one warp. Past C the padding holds zeros and the
    shift ``||P||^2 / 2`` is +inf, a distance of +inf (:func:`distances`)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    dots = tl.load(dots_ptr + local[:, None] * stride_dn + offs_c[None, :],
                   mask=mask_n[:, None], other=0.0)
    p_sq = tl.load(psq_ptr + offs_c, mask=offs_c < C, other=float("inf"))
    return distances(dots - 0.5 * p_sq[None, :], u_sq, scale)


@triton.jit
def _ncp_epilogue_kernel(
    # pointers: the chunk's GEMM results, prototypes, OOD prototype, ||P||^2, ||u||^2
    dots_ptr, proto_ptr, pood_ptr, psq_ptr, usq_ptr,
    # pointers: outputs (the gradient's rows hold u on entry), or with FINISH=0 the partials
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, part_f_ptr, part_i_ptr,
    # the chunk: its rows and first row; sizes and scalars
    R, row0, C, D, scale, inv_scale,
    # strides
    stride_dn, stride_pc, stride_pd, stride_gn, stride_gd,
    # the features h and their strides, for the finish where the gradient's rows hold the
    # GEMM's operand only (OPERAND_ROWS; unread otherwise)
    h_ptr, stride_hn, stride_hd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CAND: tl.constexpr, FINISH_STAGES: tl.constexpr, DOT_MODE: tl.constexpr,
    RERANK_GATE: tl.constexpr, FINISH: tl.constexpr = 1, OPERAND_ROWS: tl.constexpr = 0,
):
    """One row block of a chunk: the class blocks of its GEMM results with a running max /
    sum-exp and the N_CAND nearest candidates (as the fused kernel's class loop, the first
    block seeding), then the exact re-rank, the results and the gradient. Its loops are
    software-pipelined over ``FINISH_STAGES`` (the next block's loads in flight). With
    ``FINISH=0`` (``LaunchConfig.finish_apart``) it stops after the class loop and writes the
    rows' running max, sum and candidates as the one class group's partial result, laid out as
    the class-group kernel's, for :func:`grood_kernels._ncp_finish._ncp_finish_kernel` to
    re-rank and finish over all rows once the chunks are done. With ``OPERAND_ROWS`` (tf32,
    bf16) the gradient's rows hold the GEMM's operand only (``u`` rounded to TF32, or in
    bf16): the finish centres ``h`` again and takes the pre-pass's ``||u||^2``."""
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = local < R
    offs_n = row0 + local
    slots = tl.arange(0, N_CAND)
    u_sq = tl.load(usq_ptr + offs_n, mask=mask_n, other=0.0)
    dist = _block_distances(dots_ptr, psq_ptr, local, mask_n, 0, C, stride_dn, u_sq, scale,
                            BLOCK_C)
    m = -tl.min(dist, axis=1)
    acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
    cand_d = tl.full([BLOCK_N, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_N, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty: -1 - slot
    cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, 0, N_CAND, BLOCK_C)
    for c0 in tl.range(BLOCK_C, C, BLOCK_C, num_stages=FINISH_STAGES):
        dist = _block_distances(dots_ptr, psq_ptr, local, mask_n, c0, C, stride_dn, u_sq,
                                scale, BLOCK_C)
        m_new = tl.maximum(m, -tl.min(dist, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(-dist - m_new[:, None]), axis=1)
        m = m_new
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C)
    if FINISH:
        x_ptr, stride_xn, stride_xd = grad_ptr, stride_gn, stride_gd
        if OPERAND_ROWS:
            x_ptr, stride_xn, stride_xd = h_ptr, stride_hn, stride_hd
        rerank_and_write(x_ptr, proto_ptr, pood_ptr, grad_ptr, q_ptr, pred_ptr, mind_ptr,
                         lse_ptr, usq_ptr, psq_ptr, m, acc, cand_d, cand_i, offs_n, mask_n, C,
                         D, scale, inv_scale, stride_xn, stride_xd, stride_pc, stride_pd,
                         stride_gn, stride_gd, BLOCK_N, BLOCK_D, N_CAND, 1 - OPERAND_ROWS,
                         FINISH_STAGES, DOT_MODE, RERANK_GATE, USQ_GIVEN=OPERAND_ROWS)
    else:
        store_partials(part_f_ptr, part_i_ptr, offs_n, mask_n, m, acc, cand_d, cand_i, N_CAND)
