"""The gradient step's staged pre-pass: the centred features and their squared norms.

For the staged variant of :mod:`grood_kernels.ncp_gradient` (``LaunchConfig.staged``) this
writes ``u = h / scale - p_o`` into the gradient's rows and ``||u||^2`` per row, once, so the
gradient step's K-loop hands its A operand to ``tl.dot`` as loaded (in bf16 ``u`` in bf16, in
the first half of each gradient row's bytes; in tf32 the rows rounded to the nearest TF32
value, the rounding the kernel gives a tile it centres in registers, since the MMA would
truncate them); the finish reads ``u`` back (in tf32 and bf16 it centres ``h`` again: the
rows hold the A operand only) and writes the gradient over the rows. One read of ``h`` and one
write per element: memory-bound by design.
"""

import triton
import triton.language as tl

from grood_kernels._dot import round_tf32
from grood_kernels._ncp_rows import load_u


@triton.jit
def _centre_rows_kernel(
    h_ptr, pood_ptr, u_ptr, usq_ptr, op_ptr,
    N, D, inv_scale,
    stride_hn, stride_hd, stride_un, stride_ud, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BF16_ROWS: tl.constexpr,
    ROUND_TF32: tl.constexpr = 0,
):
    """The staged variant's pre-pass: ``u = h / scale - p_o`` into the gradient's rows (which
    the finish scales in place) and ``||u||^2`` per row; one read of ``h``, one write. With
    ``BF16_ROWS`` instead ``u`` rounded to bf16 into ``op_ptr`` only (the bf16 GEMM's A
    operand, the rounding the kernel's cast would make; the launcher points it at the first
    half of each gradient row's bytes). With ``ROUND_TF32`` the rows hold ``u`` rounded to the
    nearest TF32 value (the tf32 GEMM's A operand). ``||u||^2`` is always the unrounded
    rows'."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    u_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd,
                   inv_scale)
        u_sq += tl.sum(u * u, axis=1)
        mask = mask_n[:, None] & mask_d[None, :]
        if BF16_ROWS:
            tl.store(op_ptr + offs_n[:, None] * stride_on + offs_d[None, :],
                     u.to(tl.bfloat16), mask=mask)
        else:
            tl.store(u_ptr + offs_n[:, None] * stride_un + offs_d[None, :] * stride_ud,
                     round_tf32(u) if ROUND_TF32 else u, mask=mask)
    tl.store(usq_ptr + offs_n, u_sq, mask=mask_n)


#: The pre-pass's tile: rows x feature columns per step, warps (a memory-bound copy).
CENTRE_TILE = (16, 256, 4)
