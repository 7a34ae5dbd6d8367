"""Exact k-nearest-neighbour search (squared L2) with a fused distance GEMM and running top-k.

For queries ``q`` [Q, D] and database rows ``x`` [M, D]::

    d(q, x) = ||q||^2 + ||x||^2 - 2 q.x        (GEMM, tile by tile, clamped at 0)

Program (pid_q, pid_s) owns ``BLOCK_Q`` queries and the ``pid_s``-th of ``n_split`` contiguous
ranges of the database, so small query batches still fill the GPU. It walks its range in
``BLOCK_M`` rows, each a ``tl.dot`` over ``BLOCK_D`` slices of D, and keeps the ``N_CAND``
nearest rows per query in registers; no [Q, M] matrix is ever written. The launcher merges
the n_split candidate lists, recomputes the distances of the best ``k + RERANK_EXTRA`` exactly
from differences in fp32, and returns the k nearest, so the result matches exact fp32 search
even when the GEMM runs on tensor cores (``tf32``, ``bf16``). Ties go to the lower index.
The same computation in PyTorch is :func:`grood.functional.knn`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grood_kernels._launch import KernelLaunch, run
from grood_kernels._topk import insert_nearest

#: ``precision`` name -> the kernel's DOT_MODE (the same names as ``grood.functional``).
DOT_MODES = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}
#: Candidates beyond k re-ranked exactly (equal to ``grood.functional.RERANK_EXTRA``).
RERANK_EXTRA = 4
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launch_config(n_q: int, n_db: int, precision: str) -> tuple[int, int, int, int, int]:
    """One known-good configuration: (BLOCK_Q, BLOCK_M, BLOCK_D, split, num_warps).

    ``split`` divides the database among programs until about 512 programs are in flight.
    """
    block_q = min(64, max(16, triton.next_power_of_2(n_q)))
    block_m = 128 if precision != "ieee" else 64
    block_m = min(block_m, max(16, triton.next_power_of_2(n_db)))
    block_d = 32
    q_blocks = triton.cdiv(n_q, block_q)
    split = max(1, min(triton.cdiv(n_db, block_m), triton.cdiv(512, q_blocks)))
    num_warps = 8 if block_q * block_m >= 8192 else 4
    return block_q, block_m, block_d, split, num_warps


@triton.jit
def _knn_candidates_kernel(
    q_ptr, x_ptr, qsq_ptr, xsq_ptr, out_d_ptr, out_i_ptr,
    Q, M, D, rows_per_split, n_split,
    stride_qn, stride_qd, stride_xm, stride_xd,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    pid_q = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < Q
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64)
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    slots = tl.arange(0, N_CAND)
    q_sq = tl.load(qsq_ptr + offs_q, mask=mask_q, other=0.0)

    cand_d = tl.full([BLOCK_Q, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_Q, N_CAND], -1, dtype=tl.int64)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + arange_m
        mask_m = offs_m < stop
        dots = tl.zeros([BLOCK_Q, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            q = tl.load(q_ptr + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=mask_q[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_Q, BLOCK_D]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
            if DOT_MODE == 3:
                dots = tl.dot(q.to(tl.bfloat16), tl.trans(x.to(tl.bfloat16)), dots)
            elif DOT_MODE == 2:
                dots = tl.dot(q.to(tl.float32), tl.trans(x.to(tl.float32)), dots,
                              input_precision="tf32x3")
            elif DOT_MODE == 1:
                dots = tl.dot(q.to(tl.float32), tl.trans(x.to(tl.float32)), dots,
                              input_precision="tf32")
            else:
                dots = tl.dot(q.to(tl.float32), tl.trans(x.to(tl.float32)), dots,
                              input_precision="ieee")
        x_sq = tl.load(xsq_ptr + offs_m, mask=mask_m, other=0.0)
        dist = tl.maximum(q_sq[:, None] + x_sq[None, :] - 2.0 * dots, 0.0)
        dist = tl.where(mask_m[None, :], dist, float("inf"))  # [BLOCK_Q, BLOCK_M]
        # Insert this tile's nearest rows into the candidates, replacing the worst.
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, m0, N_CAND, BLOCK_M)

    out = (offs_q[:, None] * n_split + pid_s) * N_CAND + slots[None, :]
    tl.store(out_d_ptr + out, cand_d, mask=mask_q[:, None])
    tl.store(out_i_ptr + out, cand_i, mask=mask_q[:, None])


def _sq_norms(x: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """``||x||^2`` per row in fp32, by a fused reduction (no squared copy of ``x``)."""
    return torch.cat([torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).square()
                      for b in x.split(block)])


def _plan(queries, database, q_sq, x_sq, cand_d, cand_i, precision: str,
          cfg: tuple[int, int, int, int, int], rows_per_split: int) -> KernelLaunch:
    """The launch for one configuration (also compiled, unlaunched, by the compile report)."""
    block_q, block_m, block_d, split, num_warps = cfg
    n_q, d = queries.shape
    return KernelLaunch(
        _knn_candidates_kernel, (triton.cdiv(n_q, block_q), split),
        (queries, database, q_sq, x_sq, cand_d, cand_i,
         n_q, database.shape[0], d, rows_per_split, split,
         queries.stride(0), queries.stride(1), database.stride(0), database.stride(1)),
        {"BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_D": block_d,
         "N_CAND": cand_d.shape[2], "DOT_MODE": DOT_MODES[precision]},
        num_warps, 3)


def compile_launches(n_q: int, n_db: int, d: int, precision: str, *, k: int = 1,
                     dtype=torch.float32, storage=None,
                     configs: str = "launcher") -> list[KernelLaunch]:
    """The launches :func:`knn` makes at this shape, on ``meta`` tensors (for the compile
    report). There are no autotuning candidates, so ``configs`` changes nothing."""
    def meta(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    block_q, block_m, block_d, split, num_warps = launch_config(n_q, n_db, precision)
    rows_per_split = triton.cdiv(triton.cdiv(n_db, split), block_m) * block_m
    split = triton.cdiv(n_db, rows_per_split)
    n_cand = triton.next_power_of_2(k + RERANK_EXTRA)
    return [_plan(meta(n_q, d, dt=dtype), meta(n_db, d, dt=storage or dtype), meta(n_q), meta(n_db),
                  meta(n_q, split, n_cand), meta(n_q, split, n_cand, dt=torch.int64), precision,
                  (block_q, block_m, block_d, split, num_warps), rows_per_split)]


def knn(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int = 1,
    *,
    precision: str = "ieee",
    database_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`grood.functional.knn`: ``(D, I)`` of the k nearest rows.

    Args:
        queries (Tensor): [Q, D], float32 / float16 / bfloat16, any strides.
        database (Tensor): [M, D], float32 / float16 / bfloat16 storage, any strides.
        k (int): neighbours per query (>= 1).
        precision (str): ``"ieee"``, ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` for the GEMM that
            picks candidates; returned distances are exact fp32 in every mode.
        database_sq_norms (Tensor, optional): ``||x||^2`` per database row, [M], fp32.

    Returns:
        tuple[Tensor, Tensor]: squared distances [Q, k] (fp32, ascending) and int64 indices
        [Q, k]; ``inf`` / ``-1`` where M < k.
    """
    if precision not in DOT_MODES:
        raise ValueError(f"precision must be one of {tuple(DOT_MODES)}, got {precision!r}")
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"expected queries [Q, D] and database [M, D], got "
                         f"{tuple(queries.shape)} and {tuple(database.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, t in (("queries", queries), ("database", database)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton knn takes float32, float16 or bfloat16; {name} is "
                            f"{t.dtype}")
    if database.device != queries.device:
        raise ValueError(f"database is on {database.device} but queries on {queries.device}")
    n_q, d = queries.shape
    n_db = database.shape[0]
    dev = queries.device
    out_d = torch.full((n_q, k), float("inf"), dtype=torch.float32, device=dev)
    out_i = torch.full((n_q, k), -1, dtype=torch.int64, device=dev)
    if n_q == 0 or n_db == 0:
        return out_d, out_i
    if database_sq_norms is None:
        database_sq_norms = _sq_norms(database)
    elif tuple(database_sq_norms.shape) != (n_db,):
        raise ValueError(f"database_sq_norms must have shape [{n_db}], "
                         f"got {tuple(database_sq_norms.shape)}")
    x_sq = database_sq_norms.to(device=dev, dtype=torch.float32).contiguous()
    q_sq = _sq_norms(queries)

    n_keep = k + RERANK_EXTRA
    n_cand = triton.next_power_of_2(n_keep)
    block_q, block_m, block_d, split, num_warps = launch_config(n_q, n_db, precision)
    rows_per_split = triton.cdiv(triton.cdiv(n_db, split), block_m) * block_m
    split = triton.cdiv(n_db, rows_per_split)
    cand_d = torch.empty((n_q, split, n_cand), dtype=torch.float32, device=dev)
    cand_i = torch.empty((n_q, split, n_cand), dtype=torch.int64, device=dev)
    run(_plan(queries, database, q_sq, x_sq, cand_d, cand_i, precision,
              (block_q, block_m, block_d, split, num_warps), rows_per_split))
    # Merge the per-split lists, then re-rank the best n_keep by exact fp32 distances.
    cand_d, cand_i = cand_d.view(n_q, -1), cand_i.view(n_q, -1)
    n_keep = min(n_keep, cand_d.shape[1])
    best = torch.topk(cand_d, n_keep, dim=1, largest=False).indices
    idx = cand_i.gather(1, best)  # [Q, n_keep]
    exact = torch.full(idx.shape, float("inf"), dtype=torch.float32, device=dev)
    for j in range(n_keep):
        rows = idx[:, j] >= 0
        if bool(rows.any()):
            diff = queries[rows].to(torch.float32) - database[idx[rows, j]].to(torch.float32)
            exact[rows, j] = (diff * diff).sum(1)
    # Sort by (distance, index); a missing candidate (-1) sorts last.
    order = torch.argsort(torch.where(idx < 0, torch.iinfo(torch.int64).max, idx), dim=1)
    exact, idx = exact.gather(1, order), idx.gather(1, order)
    order = torch.sort(exact, dim=1, stable=True).indices
    exact, idx = exact.gather(1, order), idx.gather(1, order)
    kk = min(k, n_keep)
    out_d[:, :kk], out_i[:, :kk] = exact[:, :kk], idx[:, :kk]
    return out_d, out_i
