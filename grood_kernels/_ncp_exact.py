"""The gradient step without a GEMM, for few classes: every class's distance from fp32
differences (:func:`_ncp_exact_kernel`), as the finish re-ranks its candidates, so the results
are the same in every precision mode and need no candidates, gather or re-rank. Its work is
``2 N C D`` fused multiply-adds on the CUDA cores (per feature element and class the scaled
difference, and its square added), which at CIFAR-10's 10 classes is less than the GEMM
kernels' tiles, epilogue and finish cost; past :data:`EXACT_MAX_C` the tensor cores win, and
the launcher (:func:`grood_kernels._ncp_configs.launch_config`) takes this kernel only up to
it."""

import triton
import triton.language as tl

from grood_kernels._launch import LaunchConfig, fit_tile
from grood_kernels._ncp_rows import _wide, answered, load_u, store_row_results
from grood_kernels._topk import clamp_sq

#: The kernel's block of classes, and the largest class count the launcher gives it: one
#: block, so each row tile is read once for its distances and once more (from L2 where it
#: stays there) for its gradient.
EXACT_MAX_C = 16

#: Largest class count at which the autotuning candidates (``GROOD_AUTOTUNE=1``, the
#: configurations table) hold this kernel past :data:`EXACT_MAX_C`: CIFAR-100's 100 classes
#: take 7 blocks, 7 passes over each row tile (after the first from L2) and 2 x 112 fused
#: multiply-adds per element, 0.30 ms of FMA work at N = 65,536, D = 512 on an H200 where
#: the GEMM kernels took 0.57-0.62 ms (2026-12-04); past it the passes multiply.
EXACT_CANDIDATE_MAX_C = 128

#: Rows per program, the D-step, warps, pipelining stages of the loops over D. The
#: accumulator [rows, classes, D-step] is 32 x 16 x 16 fp32 over 128 threads (64 registers
#: each); compiled for sm_90a at CIFAR-10 the kernel holds 128 registers, no spills, four
#: programs per SM, and its first loop issues 184 instructions a D-step per warp (triton 3.9;
#: 194 under 3.6), 136 of them FFMA: the 64 scaled differences and 64 squares added per
#: thread, and ``||u||^2``; 3 stages load two D-steps ahead (cp.async).
EXACT_TILE = (32, 16, 4, 3)


def exact_config(c: int, d: int, *, every_c: bool = False) -> LaunchConfig | None:
    """The exact kernel's configuration: where C is at most :data:`EXACT_MAX_C` (or, with
    ``every_c``, at any C: then it loops over blocks of 16 classes, a pass over D each)."""
    if c > EXACT_MAX_C and not every_c:
        return None
    rows, step, warps, stages = EXACT_TILE
    return LaunchConfig(rows, EXACT_MAX_C, fit_tile(step, d), warps, stages, exact=True)


@triton.jit
def _block_sq(h_ptr, proto_ptr, pood_ptr, rows, offs_c, mask_c, D, inv_scale, stride_hn,
              stride_hd, stride_pc, stride_pd, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_D: tl.constexpr, STAGES: tl.constexpr, EVEN_D: tl.constexpr,
              WITH_USQ: tl.constexpr):
    """Squared distances [rows, BLOCK_C] (units of ``scale`` squared) of the rows ``rows`` to
    the prototypes ``offs_c`` (classes past C load prototype row 0; the caller drops them), from
    the differences of the scaled rows: ``h / scale - P / scale``, the centring on the OOD
    prototype cancelling (one rounding fewer than ``u - (P / scale - p_o)``); with
    ``WITH_USQ`` also ``||u||^2`` [rows] (0 otherwise). Each square is added per element over
    the D-steps and across the row once after the loop."""
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    crow = tl.where(mask_c, offs_c, 0).to(tl.int64) * stride_pc
    acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_D], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + arange_d
        h_ptrs = h_ptr + rows[:, None] * stride_hn + _wide(offs_d) * stride_hd
        p_ptrs = proto_ptr + crow[:, None] + _wide(offs_d) * stride_pd
        if EVEN_D:
            x = tl.load(h_ptrs).to(tl.float32) * inv_scale
            p = tl.load(p_ptrs).to(tl.float32) * inv_scale
            if WITH_USQ:
                u = x - tl.load(pood_ptr + offs_d)[None, :]
                u_acc += u * u
        else:
            mask_d = offs_d < D
            x = tl.load(h_ptrs, mask=mask_d[None, :], other=0.0).to(tl.float32) * inv_scale
            p = tl.load(p_ptrs, mask=mask_d[None, :], other=0.0).to(tl.float32) * inv_scale
            if WITH_USQ:  # 0 past D: both loads give 0 there
                u = x - tl.load(pood_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
                u_acc += u * u
        diff = x[:, None, :] - p[None, :, :]
        acc += diff * diff
    return tl.sum(acc, axis=2), tl.sum(u_acc, axis=1)


@triton.jit
def _add_block(sq, offs_c, C, scale, m, acc, best, pred):
    """The running softmax state of a row tile (max ``m`` and sum ``acc`` of ``-distance``
    terms, the nearest distance ``best`` and its class ``pred``) after one block of classes'
    squared distances ``sq`` (classes past C dropped). The lowest class id wins ties: within
    the block by the minimum id, across blocks by taking a later block only where strictly
    nearer."""
    dist = tl.where(offs_c[None, :] < C, tl.sqrt(clamp_sq(sq)) * scale, float("inf"))
    near = tl.min(dist, axis=1)
    first = tl.min(tl.where(dist == near[:, None], offs_c[None, :], C), axis=1)
    pred = tl.where(near < best, first, pred)
    best = tl.minimum(best, near)
    m_new = tl.maximum(m, -near)
    acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(-dist - m_new[:, None]), axis=1)
    return m_new, acc, best, pred


@triton.jit
def _ncp_exact_kernel(
    # pointers: inputs
    h_ptr, proto_ptr, pood_ptr,
    # pointers: outputs
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale,
    # strides
    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, EVEN_D: tl.constexpr,
):
    """The whole step for one tile of ``BLOCK_N`` rows, every class's distance exact: per
    block of ``BLOCK_C`` classes a pass over D (:func:`_block_sq`), the softmax online across
    the blocks (running max and sum) with the nearest class (the lowest id on ties), then the
    OOD term, the results, and a pass over D writing the gradient ``q_ood u / ||u||``. Rows
    past N load row 0 and are not stored. A row with NaN or Inf gets NaN results and class -1,
    as in the other kernels."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0)
    arange_c = tl.arange(0, BLOCK_C)
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    # the first block of classes with ||u||^2 (from the same loads), then the others
    sq, u_sq = _block_sq(h_ptr, proto_ptr, pood_ptr, rows, arange_c, arange_c < C, D,
                         inv_scale, stride_hn, stride_hd, stride_pc, stride_pd, BLOCK_N,
                         BLOCK_C, BLOCK_D, STAGES, EVEN_D, 1)
    m, acc, best, pred = _add_block(sq, arange_c, C, scale,
                                    tl.full([BLOCK_N], float("-inf"), dtype=tl.float32),
                                    tl.zeros([BLOCK_N], dtype=tl.float32),
                                    tl.full([BLOCK_N], float("inf"), dtype=tl.float32),
                                    tl.full([BLOCK_N], -1, dtype=tl.int32))
    for c0 in range(BLOCK_C, C, BLOCK_C):
        offs_c = c0 + arange_c
        sq = _block_sq(h_ptr, proto_ptr, pood_ptr, rows, offs_c, offs_c < C, D, inv_scale,
                       stride_hn, stride_hd, stride_pc, stride_pd, BLOCK_N, BLOCK_C, BLOCK_D,
                       STAGES, EVEN_D, 0)[0]
        m, acc, best, pred = _add_block(sq, offs_c, C, scale, m, acc, best, pred)
    u_norm = tl.sqrt(u_sq)
    d_ood = u_norm * scale
    m_all = tl.maximum(m, -d_ood)
    log_sum = tl.log(acc * tl.exp(m - m_all) + tl.exp(-d_ood - m_all))
    lse = m_all + log_sum
    # q_ood = exp(-(d_ood + lse)) with d_ood + m_all taken first: see row_results
    q = tl.exp(-((d_ood + m_all) + log_sum))
    q, lse, best, pred, g_scale = answered(u_sq, u_norm, q, lse, best, pred)
    store_row_results(q_ptr, lse_ptr, mind_ptr, pred_ptr, offs_n, mask_n, q, lse, best, pred)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u = load_u(h_ptr, pood_ptr, rows, mask_n, stride_hn, offs_d, mask_d, stride_hd,
                   inv_scale, SPARE_ROWS=1, EVEN_D=EVEN_D)
        tl.store(grad_ptr + offs_n[:, None] * stride_gn + _wide(offs_d) * stride_gd,
                 u * g_scale[:, None],
                 mask=mask_n[:, None] if EVEN_D else mask_n[:, None] & mask_d[None, :])
