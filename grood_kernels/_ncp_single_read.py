"""The gradient step in one read of ``h``, for small C and D: an autotuning candidate.

Every class in one block and the whole centred row tile held in registers from its load to the
gradient's store, so ``h`` is read from memory once (the class-group kernel,
:mod:`grood_kernels._ncp_kernel`, re-reads its row tile from L2 when C fits one block). The
math is :mod:`grood_kernels.ncp_gradient`'s; ``GROOD_AUTOTUNE=1`` times it against the
class-group kernel on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from grood_kernels._dot import dot_t
from grood_kernels._launch import LaunchConfig
from grood_kernels._ncp_rerank import add_exact_sq
from grood_kernels._ncp_rows import distances, load_u, row_results, store_row_results
from grood_kernels._topk import first_nearest

#: Largest class count (per tensor-core mode) and feature width at which the single-read
#: variant compiles spill-free for sm_90a under triton 3.6 and 3.9: 16-row tiles on 8 warps
#: (``mma.sync``), the centred tile held in registers (``bench/compile_report.py --configs
#: all``; tf32 at C = 100 and 32- or 64-row tiles spill).
SINGLE_READ_LIMITS = {"tf32": 16, "bf16": 128}
SINGLE_READ_MAX_D = 512


def single_read_config(c: int, d: int, precision: str) -> LaunchConfig | None:
    """The single-read variant's configuration for this shape, where it applies: every class
    in one block and the feature tile in registers, so ``h`` is read once at any C it takes
    (the class-group kernel re-reads its row tile from L2 when C fits one block)."""
    if c > SINGLE_READ_LIMITS.get(precision, 0) or d > SINGLE_READ_MAX_D:
        return None
    return LaunchConfig(16, max(16, triton.next_power_of_2(c)),
                        max(16, triton.next_power_of_2(d)), 8, 1, single_read=True)


@triton.jit
def _ncp_single_read_kernel(
    # pointers: inputs
    h_ptr, op_ptr, proto_ptr, pood_ptr, psq_ptr,
    # pointers: outputs
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale,
    # strides
    stride_hn, stride_hd, stride_oc, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """The whole step for one row tile with every class in one block and the whole centred
    tile [BLOCK_N, D_PAD] held in registers from its load to the gradient's store: ``h`` is
    read from memory once. One ``tl.dot`` over all of D, the softmax and candidates of the
    single class block, the exact re-rank against the held tile, the results (an autotuning
    candidate for small C and D; see :func:`single_read_config`)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    mask_d = offs_d < D
    u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd, inv_scale)
    u_sq = tl.sum(u * u, axis=1)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    p_sq = tl.load(psq_ptr + offs_c, mask=offs_c < C, other=float("inf"))
    # The prepared operand is zero-padded to whole tiles of 64 columns; D_PAD may pass them.
    p = tl.load(op_ptr + offs_c[:, None] * stride_oc + offs_d[None, :], mask=mask_d[None, :],
                other=0.0)
    dots = dot_t(u, p, tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32), DOT_MODE, ROUND_A=1) \
        - 0.5 * p_sq[None, :]
    dist = distances(dots, u_sq, scale)
    cand_d, cand_i, nearest = first_nearest(dist, 0, BLOCK_N, N_CAND, BLOCK_C)
    m = -nearest
    acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
    # Every candidate re-ranked: the tile is held, and the prototypes fit in L2 at these C.
    valid = cand_i >= 0
    exact_sq = add_exact_sq(tl.zeros([BLOCK_N, N_CAND], dtype=tl.float32), u, cand_i, valid,
                            proto_ptr, pood_ptr, mask_n, offs_d, mask_d, stride_pc, stride_pd,
                            inv_scale, N_CAND, 0, N_CAND, 0)
    q, lse, best, pred, g_scale = row_results(m, acc, cand_d, cand_i, exact_sq, valid, u_sq,
                                              scale, C)
    store_row_results(q_ptr, lse_ptr, mind_ptr, pred_ptr, offs_n, mask_n, q, lse, best, pred)
    tl.store(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             u * g_scale[:, None], mask=mask_n[:, None] & mask_d[None, :])
