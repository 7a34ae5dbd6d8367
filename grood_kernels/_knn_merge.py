"""The search's last step as one kernel: merge the database splits' candidates, re-rank them
exactly, and write the k nearest.

Per query, the search kernel leaves ``N_CAND`` candidates (GEMM distance, row id) per database
split. One program of this kernel takes ``BLOCK_Q`` queries and

1. keeps the best ``N_KEEP = k + RERANK_EXTRA`` of all their splits' candidates by (GEMM
   distance, id), streaming the candidate lists in chunks of ``W_CHUNK`` (splits hold disjoint,
   ascending id ranges, so the lower id wins exact ties, as in the one-pass rule);
2. recomputes their squared distances exactly, ``||q - x||^2`` from fp32 differences of the
   exact rows (gathered straight from the database, ``BLOCK_D`` dimensions at a time);
3. writes the k best by (exact distance, id), ``inf`` / ``-1`` where fewer exist.

No [Q, N_KEEP, D] gather is ever made, and nothing returns to the host in between. The same
computation in PyTorch is :func:`merge_and_rerank_torch` (used when the exact rows live in
host memory, or for a ``k`` past ``MAX_FUSED_KEEP - RERANK_EXTRA``).
"""

import torch
import triton
import triton.language as tl

from grood_kernels._launch import KernelLaunch, fit_tile, run
from grood_kernels._topk import merge_candidates, pop_nearest
from grood_kernels.contract import RERANK_EXTRA, lex_order

#: Largest ``k + RERANK_EXTRA`` the fused merge-and-re-rank kernel takes (it unrolls one
#: gather per kept candidate); larger k, and exact rows held in host memory, merge in torch.
MAX_FUSED_KEEP = 36
#: Candidate entries per query read per merge step (a power of two).
W_CHUNK = 64
#: Queries per program.
BLOCK_Q = 16


@triton.jit
def _merge_rerank_kernel(
    q_ptr, x_ptr, cd_ptr, ci_ptr, out_d_ptr, out_i_ptr,
    Q, W, D, K,
    stride_qn, stride_qd, stride_xm, stride_xd,
    BLOCK_Q: tl.constexpr, W_CHUNK: tl.constexpr, N_KEEP: tl.constexpr,
    KEEP_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < Q
    rows = offs_q.to(tl.int64)  # Q * W may pass 2**31
    slots = tl.arange(0, KEEP_PAD)
    real = slots < N_KEEP
    # Slots past N_KEEP hold -inf: never the worst, so never replaced, and never re-ranked.
    keep_d = tl.where(real[None, :], float("inf"), float("-inf")) + tl.zeros(
        [BLOCK_Q, KEEP_PAD], dtype=tl.float32)
    keep_i = tl.full([BLOCK_Q, KEEP_PAD], -1, dtype=tl.int32) - slots[None, :]  # -1 - slot
    cols = tl.arange(0, W_CHUNK)
    for w0 in range(0, W, W_CHUNK):
        m = mask_q[:, None] & (w0 + cols < W)[None, :]
        at = rows[:, None] * W + w0 + cols[None, :]
        new_d = tl.load(cd_ptr + at, mask=m, other=float("inf"))
        new_i = tl.load(ci_ptr + at, mask=m, other=-1)
        keep_d, keep_i = merge_candidates(new_d, new_i, keep_d, keep_i, KEEP_PAD)

    # Exact squared distances of the kept rows, from fp32 differences.
    exact = tl.zeros([BLOCK_Q, KEEP_PAD], dtype=tl.float32)
    arange_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        q = tl.load(q_ptr + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        for r in tl.static_range(N_KEEP):
            idx = tl.sum(tl.where(slots[None, :] == r, keep_i, 0), axis=1)
            ok = mask_q & (idx >= 0)
            x = tl.load(x_ptr + tl.maximum(idx, 0).to(tl.int64)[:, None] * stride_xm
                        + offs_d[None, :] * stride_xd,
                        mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            diff = tl.where(mask_d[None, :], q - x, 0.0)
            part = tl.sum(diff * diff, axis=1)
            exact = tl.where(slots[None, :] == r, exact + part[:, None], exact)
    exact = tl.where(real[None, :] & (keep_i >= 0), exact, float("inf"))

    # The k best by (exact distance, id).
    out_slots = tl.arange(0, K_PAD)
    best_d = tl.full([BLOCK_Q, K_PAD], float("inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK_Q, K_PAD], -1, dtype=tl.int64)
    for r in tl.static_range(K_PAD):
        v, j, exact = pop_nearest(exact, keep_i)
        best_d = tl.where(out_slots[None, :] == r, v[:, None], best_d)
        j = tl.where(v < float("inf"), j, -1).to(tl.int64)
        best_i = tl.where(out_slots[None, :] == r, j[:, None], best_i)
    at = rows[:, None] * K + out_slots[None, :]
    m = mask_q[:, None] & (out_slots < K)[None, :]
    tl.store(out_d_ptr + at, best_d, mask=m)
    tl.store(out_i_ptr + at, best_i, mask=m)


def merge_plan(queries: torch.Tensor, exact_rows: torch.Tensor, cand_d: torch.Tensor,
               cand_i: torch.Tensor, k: int, n_keep: int, out_d: torch.Tensor,
               out_i: torch.Tensor) -> KernelLaunch:
    """The launch of :func:`merge_and_rerank` (also compiled, unlaunched, by the compile
    report)."""
    n_q, d = queries.shape
    return KernelLaunch(
        _merge_rerank_kernel, (triton.cdiv(n_q, BLOCK_Q),),
        (queries, exact_rows, cand_d, cand_i, out_d, out_i, n_q, cand_d.shape[1], d, k,
         queries.stride(0), queries.stride(1), exact_rows.stride(0), exact_rows.stride(1)),
        {"BLOCK_Q": BLOCK_Q, "W_CHUNK": W_CHUNK, "N_KEEP": n_keep,
         "KEEP_PAD": triton.next_power_of_2(n_keep), "K_PAD": triton.next_power_of_2(k),
         "BLOCK_D": fit_tile(64, d)},
        8, 2)


def merge_and_rerank(queries: torch.Tensor, exact_rows: torch.Tensor, cand_d: torch.Tensor,
                     cand_i: torch.Tensor, k: int, n_keep: int, out_d: torch.Tensor,
                     out_i: torch.Tensor) -> None:
    """Fill ``out_d`` [Q, k] (fp32) and ``out_i`` [Q, k] (int64) from the splits' candidates
    ``cand_d`` / ``cand_i`` [Q, W] (fp32 / int32, contiguous), keeping ``n_keep`` by GEMM
    distance and ranking them by their exact distance to ``queries`` [Q, D] in ``exact_rows``
    [M, D] (on the queries' device)."""
    run(merge_plan(queries, exact_rows, cand_d, cand_i, k, n_keep, out_d, out_i))


def merge_and_rerank_torch(queries, exact_rows, cand_d, cand_i, k, out_d, out_i, chunk=4096):
    """Best ``k + RERANK_EXTRA`` split candidates by (distance, index), their exact fp32
    distances, and the k nearest by (exact distance, index): the fused kernel's computation
    (:func:`merge_and_rerank`) in torch, for exact rows in host memory or large k."""
    n_keep = min(k + RERANK_EXTRA, cand_d.shape[1])
    order = lex_order(cand_d, cand_i)[:, :n_keep]
    idx = cand_i.gather(1, order)  # [Q, n_keep]
    for r0 in range(0, idx.shape[0], chunk):
        sel = idx[r0:r0 + chunk]
        rows = exact_rows[sel.clamp_min(0).to(exact_rows.device)].to(queries.device,
                                                                      torch.float32)
        diff = queries[r0:r0 + chunk, None, :].to(torch.float32) - rows  # [chunk, n_keep, D]
        exact = torch.where(sel >= 0, (diff * diff).sum(2), float("inf"))
        best = lex_order(exact, sel)[:, :k]
        kk = best.shape[1]
        out_d[r0:r0 + chunk, :kk] = exact.gather(1, best)
        out_i[r0:r0 + chunk, :kk] = torch.where(exact.gather(1, best) < float("inf"),
                                                sel.gather(1, best), -1)
    return out_d, out_i
