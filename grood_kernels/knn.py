"""Exact k-nearest-neighbour search (squared L2) with a fused distance GEMM and running top-k.

For queries ``q`` [Q, D] and database rows ``x`` [M, D]::

    d(q, x) = ||q||^2 + ||x||^2 - 2 q.x        (GEMM, tile by tile, clamped at 0)

Schedule. Program (query block, database split) streams its split in ``BLOCK_M``-row tiles,
each a ``tl.dot`` over ``BLOCK_D`` slices of D, and keeps the ``N_CAND`` nearest rows per query
in registers; no [Q, M] matrix is ever written. Programs are ordered in groups of
``GROUP_Q`` query blocks: the programs running together are the group's query blocks against
a few neighbouring splits, so each database tile is read from HBM once per group and shared in
L2 by ``GROUP_Q`` programs, and the group's query tiles stay L2-resident while they stream.
The split count fills whole waves of the device. Operands go from memory to ``tl.dot`` as
loaded: in ``bf16`` mode the queries are cast once in the launcher and the database is stored
in bf16 (``bf16`` storage: half the bytes) or copied to bf16 per call (below).

Top-k: insertion rounds are gated (a tile with nothing nearer than a row's current worst
candidate costs one row minimum); ties go to the lower index. One fused kernel then merges the
splits' candidates by (distance, index), recomputes the best ``k + RERANK_EXTRA`` distances
exactly from fp32 differences (from ``rerank_database`` when given: the fp32 copy of a
bf16-stored database) and writes the k nearest (:mod:`grood_kernels._knn_merge`), so results
match exact fp32 search in every mode; exact rows held in host memory are merged in torch.
An fp32 database in ``bf16`` mode is cast to a bf16 copy per call (in chunks of rows, one
launch each) and searched as bf16 storage is, where there are enough queries to pay for the
pass (:func:`casts_database`); with fewer, each tile is cast in the K-loop.
The same computation in PyTorch is :func:`grood.functional.knn`.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from grood_kernels._dot import check_bf16_runs, dot_t
from grood_kernels._knn_configs import castable, casts_database, launch_plans
from grood_kernels._knn_merge import (
    MAX_FUSED_KEEP,
    merge_and_rerank,
    merge_and_rerank_torch,
    merge_plan,
)
from grood_kernels._launch import (
    KernelLaunch,
    LaunchConfig,
    run,
    sm_count,
    target_major,
)
from grood_kernels._topk import clamp_sq, insert_nearest
from grood_kernels.contract import (
    DOT_MODES,
    KERNEL_DTYPES,
    RERANK_EXTRA,
    check_dense,
    check_has_columns,
    check_positive_int,
    check_precision,
)


@triton.jit
def _knn_candidates_kernel(
    # pointers
    q_ptr, x_ptr, qsq_ptr, xsq_ptr, out_d_ptr, out_i_ptr, count_ptr,
    # sizes
    Q, M, D, rows_per_split, n_split, n_qb,
    # strides
    stride_qn, stride_qd, stride_xm, stride_xd,
    # meta-parameters
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_Q: tl.constexpr, N_CAND: tl.constexpr, DOT_MODE: tl.constexpr,
    EVEN_D: tl.constexpr, COUNT: tl.constexpr, FLAT_GATE: tl.constexpr = False,
):
    # Grouped order: GROUP_Q query blocks x every split, the query block fastest.
    pid = tl.program_id(0).to(tl.int64)
    per_group = GROUP_Q * n_split
    first_q = (pid // per_group) * GROUP_Q
    group_size = tl.minimum(n_qb - first_q, GROUP_Q)
    pid_q = first_q + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < Q
    arange_m = tl.arange(0, BLOCK_M)
    arange_d = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, N_CAND)
    q_sq = tl.load(qsq_ptr + offs_q, mask=mask_q, other=0.0)
    # Rows past the end are loaded clamped to the last row (valid memory, no load mask) and
    # their results discarded: the K-loop carries no predicates, only its two pointer tiles.
    q_rows = q_ptr + tl.minimum(offs_q, Q - 1).to(tl.int64)[:, None] * stride_qn

    cand_d = tl.full([BLOCK_Q, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_Q, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty: -1 - slot
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + arange_m
        mask_m = offs_m < stop
        q_ptrs = q_rows + arange_d[None, :] * stride_qd
        x_ptrs = (x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
                  + arange_d[None, :] * stride_xd)
        # d = ||q||^2 - 2 (q.x - ||x||^2 / 2), +inf rows past the split becoming -inf. The
        # accumulator starts at zero and the norms come in after the K-loop: started at
        # -||x||^2 / 2, its magnitude would set the precision every product is added at.
        dots = tl.zeros([BLOCK_Q, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                q = tl.load(q_ptrs)  # [BLOCK_Q, BLOCK_D]
                x = tl.load(x_ptrs)  # [BLOCK_M, BLOCK_D]
            else:
                mask_d = d0 + arange_d < D
                q = tl.load(q_ptrs, mask=mask_d[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=mask_d[None, :], other=0.0)
            dots = dot_t(q, x, dots, DOT_MODE)
            q_ptrs += BLOCK_D * stride_qd
            x_ptrs += BLOCK_D * stride_xd
        x_sq = tl.load(xsq_ptr + offs_m, mask=mask_m, other=float("inf"))  # after the loop:
        dots = dots - 0.5 * x_sq[None, :]  # no registers held during it
        dist = clamp_sq(q_sq[:, None] - 2.0 * dots)  # [BLOCK_Q, BLOCK_M]
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, m0, N_CAND, BLOCK_M,
                                        count_ptr, COUNT, FLAT_GATE)

    out = (offs_q[:, None] * n_split + pid_s) * N_CAND + slots[None, :]
    tl.store(out_d_ptr + out, cand_d, mask=mask_q[:, None])
    tl.store(out_i_ptr + out, tl.maximum(cand_i, -1), mask=mask_q[:, None])


def _bf16_copy(rows: int, d: int, device: torch.device) -> torch.Tensor:
    """The buffer each chunk of the database is copied into in bf16, [rows, D]."""
    return torch.empty((rows, d), dtype=torch.bfloat16, device=device)


def _sq_norms(x: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """``||x||^2`` per row in fp32, by a fused reduction (no squared copy of ``x``)."""
    return torch.cat([torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).square()
                      for b in x.split(block)])


def _plan(queries, database, q_sq, x_sq, cand_d, cand_i, counter, precision: str,
          cfg: LaunchConfig, rows_per_split: int, count: bool = False) -> KernelLaunch:
    """The launch for one configuration (also compiled, unlaunched, by the compile report)."""
    n_q, d = queries.shape
    n_qb = triton.cdiv(n_q, cfg.block_rows)
    return KernelLaunch(
        _knn_candidates_kernel, (n_qb * cfg.n_split,),
        (queries, database, q_sq, x_sq, cand_d, cand_i, counter,
         n_q, database.shape[0], d, rows_per_split, cfg.n_split, n_qb,
         queries.stride(0), queries.stride(1), database.stride(0), database.stride(1)),
        {"BLOCK_Q": cfg.block_rows, "BLOCK_M": cfg.block_cols, "BLOCK_D": cfg.block_d,
         "GROUP_Q": cfg.group_rows, "N_CAND": cand_d.shape[2], "DOT_MODE": DOT_MODES[precision],
         "EVEN_D": d % cfg.block_d == 0, "COUNT": count},
        cfg.num_warps, cfg.num_stages)


def compile_launches(n_q: int, n_db: int, d: int, precision: str, *, k: int = 1,
                     dtype=torch.float32, storage=None, configs: str = "launcher",
                     major: int = 9) -> list[KernelLaunch]:
    """The launches :func:`knn` makes at this shape on a GPU of compute capability
    ``major``.x, on ``meta`` tensors (for the compile report): the search, then the fused
    merge and exact re-rank (its exact rows in ``dtype``, on the device). ``storage`` is the
    database dtype (default: ``dtype``). There are no autotuning candidates, so ``configs``
    changes nothing."""
    def meta(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    q_dtype = torch.bfloat16 if precision == "bf16" else dtype
    x_dtype = storage or dtype
    cast = casts_database(n_q, precision, x_dtype)
    n_cand = triton.next_power_of_2(k + RERANK_EXTRA)
    searches, width = [], 0
    for r0, r1, cfg, rows in launch_plans(n_q, n_db, d, precision, q_dtype.itemsize,
                                          x_dtype.itemsize, cast, major=major):
        x_op = meta(r1 - r0, d, dt=torch.bfloat16 if cast else x_dtype)
        cand_d = meta(n_q, cfg.n_split, n_cand)
        cand_i = meta(n_q, cfg.n_split, n_cand, dt=torch.int32)
        searches.append(_plan(meta(n_q, d, dt=q_dtype), x_op, meta(n_q), meta(r1 - r0), cand_d,
                              cand_i, meta(1, dt=torch.int32), precision, cfg, rows))
        width += cfg.n_split * n_cand
    merge = merge_plan(meta(n_q, d, dt=dtype), meta(n_db, d, dt=dtype), meta(n_q, width),
                       meta(n_q, width, dt=torch.int32), k, k + RERANK_EXTRA,
                       meta(n_q, k), meta(n_q, k, dt=torch.int64))
    return [*searches, merge]


def knn(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int = 1,
    *,
    precision: str = "ieee",
    database_sq_norms: torch.Tensor | None = None,
    rerank_database: torch.Tensor | None = None,
    insert_rounds: torch.Tensor | None = None,
    cast_database: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`grood.functional.knn`: ``(D, I)`` of the k nearest rows.

    Args:
        queries (Tensor): [Q, D], float32 / float16 / bfloat16, any strides.
        database (Tensor): [M, D], float32 / float16 / bfloat16 storage, any strides.
        k (int): neighbours per query (>= 1).
        precision (str): ``"ieee"``, ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` for the GEMM that
            picks candidates; returned distances are exact fp32 in every mode.
        database_sq_norms (Tensor, optional): ``||x||^2`` per database row, [M], fp32 (of the
            exact rows when the database is a rounded copy); trusted, not checked (as in the
            twin).
        rerank_database (Tensor, optional): the exact rows [M, D] the final distances are
            computed from (e.g. the fp32 original of a bf16-stored database; on the device or
            in host memory). Default: ``database``.
        insert_rounds (Tensor, optional): int32 [1] on the queries' device; the kernel adds the
            number of top-k insertion rounds it ran (for measuring the gating).
        cast_database (bool, optional): in ``bf16`` mode on a database not stored in bf16,
            search a bf16 copy made per call (True) or cast each tile in the K-loop (False);
            default :func:`casts_database`, or the K-loop cast (with a ``RuntimeWarning``)
            where the device has no memory for the copy, which True raises instead. For
            measuring one against the other (both return exact fp32 distances of their
            candidates).

    Returns:
        tuple[Tensor, Tensor]: squared distances [Q, k] (fp32, ascending; ties by lower index)
        and int64 indices [Q, k]; ``inf`` / ``-1`` where M < k.
    """
    check_precision(precision)
    check_dense(queries=queries, database=database, database_sq_norms=database_sq_norms,
                rerank_database=rerank_database)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"expected queries [Q, D] and database [M, D], got "
                         f"{tuple(queries.shape)} and {tuple(database.shape)}")
    k = check_positive_int(k, "k")
    check_has_columns(queries.shape[1], "queries and the database")
    for name, t in (("queries", queries), ("database", database)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton knn takes float32, float16 or bfloat16; {name} is "
                            f"{t.dtype}")
    if database.device != queries.device:
        raise ValueError(f"database is on {database.device} but queries on {queries.device}")
    check_bf16_runs(precision, queries.device)
    if rerank_database is not None and tuple(rerank_database.shape) != tuple(database.shape):
        raise ValueError(f"rerank_database has shape {tuple(rerank_database.shape)}, the "
                         f"database {tuple(database.shape)}")
    n_q, d = queries.shape
    n_db = database.shape[0]
    if n_db >= 2**31 - 1:
        raise ValueError(f"the Triton knn indexes up to 2**31 - 2 rows, got {n_db}")
    dev = queries.device
    out_d = torch.full((n_q, k), float("inf"), dtype=torch.float32, device=dev)
    out_i = torch.full((n_q, k), -1, dtype=torch.int64, device=dev)
    if n_q == 0 or n_db == 0:
        return out_d, out_i
    exact_rows = database if rerank_database is None else rerank_database
    if database_sq_norms is None:
        database_sq_norms = _sq_norms(exact_rows)
    elif tuple(database_sq_norms.shape) != (n_db,):
        raise ValueError(f"database_sq_norms must have shape [{n_db}], "
                         f"got {tuple(database_sq_norms.shape)}")
    x_sq = database_sq_norms.to(device=dev, dtype=torch.float32).contiguous()
    q_sq = _sq_norms(queries)
    # bf16 mode: the queries are cast once here, so both operands reach tl.dot as loaded
    # when the database is stored in bf16, or cast per call (casts_database).
    q_op = queries.to(torch.bfloat16) if precision == "bf16" else queries
    if cast_database is None:
        cast = casts_database(n_q, precision, database.dtype)
    elif cast_database and not castable(precision, database.dtype):
        raise ValueError("cast_database=True copies a database not stored in bf16 for "
                         f"precision='bf16'; got precision={precision!r} and a "
                         f"{database.dtype} database")
    else:
        cast = bool(cast_database)
    def plans_for(cast: bool):
        return launch_plans(n_q, n_db, d, precision, q_op.element_size(),
                            database.element_size(), cast, sm_count(dev), target_major(dev))

    plans, copy = plans_for(cast), None
    if cast:
        rows = plans[0][1]  # the first chunk is the longest
        try:
            copy = _bf16_copy(rows, d, dev)
        except torch.OutOfMemoryError:
            if cast_database:
                raise
            # The copy is a speed-up: without room for it, cast each tile in the K-loop,
            # which needs no memory beyond the search's own.
            warnings.warn(f"no device memory for the bf16 copy of the database "
                          f"({rows * d * 2 / 2**30:.2f} GiB); the search casts its tiles in "
                          "the kernel instead (slower; store the index in bf16, or pass "
                          "cast_database=False, to skip the copy)", RuntimeWarning,
                          stacklevel=2)
            plans = plans_for(False)

    n_keep = k + RERANK_EXTRA
    n_cand = triton.next_power_of_2(n_keep)
    counter = insert_rounds if insert_rounds is not None else torch.zeros(1, dtype=torch.int32,
                                                                          device=dev)
    parts_d, parts_i = [], []
    for r0, r1, cfg, rows in plans:
        x_op = database
        if copy is not None:  # the chunk's rows in bf16 (the copy is reused, stream-ordered)
            x_op = copy[: r1 - r0]
            x_op.copy_(database[r0:r1])
        cand_d = torch.empty((n_q, cfg.n_split, n_cand), dtype=torch.float32, device=dev)
        cand_i = torch.empty((n_q, cfg.n_split, n_cand), dtype=torch.int32, device=dev)
        run(_plan(q_op, x_op, q_sq, x_sq[r0:r1], cand_d, cand_i, counter, precision, cfg,
                  rows, count=insert_rounds is not None))
        if r0:  # the chunk's row ids -> the database's (empty slots stay -1)
            cand_i.add_((cand_i >= 0).to(torch.int32), alpha=r0)
        parts_d.append(cand_d.view(n_q, -1))
        parts_i.append(cand_i.view(n_q, -1))
    # Chunks in order keep the splits' id ranges ascending: the merge's lower-id rule holds.
    cand_d = parts_d[0] if len(plans) == 1 else torch.cat(parts_d, 1)
    cand_i = parts_i[0] if len(plans) == 1 else torch.cat(parts_i, 1)
    if exact_rows.device == dev and n_keep <= MAX_FUSED_KEEP:
        merge_and_rerank(queries, exact_rows, cand_d, cand_i, k, n_keep, out_d, out_i)
        return out_d, out_i
    return merge_and_rerank_torch(queries, exact_rows, cand_d, cand_i.long(), k, out_d, out_i)
