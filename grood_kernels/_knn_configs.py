"""Launch configurations of the exact k-NN search (:mod:`grood_kernels.knn`).

The search kernel's one known-good configuration per shape, mode and GPU
(:func:`launch_config`: tiles, the database split that fills whole waves, the query blocks that
share each database tile in L2), the Blackwell tiles for triton releases where the Hopper ones
spill, and when ``bf16`` mode searches a bf16 copy of an fp32 database, cast per call in chunks
of rows (:func:`casts_database`, :func:`cast_chunks`), with the launches that makes
(:func:`launch_plans`). Each choice names the compile-report figure it rests on.
"""

from __future__ import annotations

import math

import torch
import triton

from grood_kernels._launch import DEFAULT_SMS, LaunchConfig, blackwell_small_tiles, fit_tile

#: Bytes of query tiles a group of programs keeps L2-resident (a quarter of an H100's L2).
L2_QUERY_BUDGET = 12 << 20


#: Fewest queries for which ``bf16`` mode searches a bf16 copy of an fp32 (or fp16) database,
#: cast per call (:func:`casts_database`). The compile report's model (sm_90a) puts the copy
#: ahead from ~1,300 queries at both of its database shapes, without charging the tile cast
#: in the K-loop for its waiting wgmma: 1.13x at 2,048 queries, 1.28x at 4,096, 1.41x at
#: 10,000; 0.95x at 1,024 and 0.5x at 128, where the copy's pass (fp32 read, bf16 written)
#: is most of the search.
CAST_MIN_QUERIES = 2048


#: Largest bf16 copy made at once, in bytes: a larger database is cast and searched in chunks
#: of rows, one launch each (the extra device memory stays below this).
CAST_CHUNK_BYTES = 1 << 32


#: Tensor-core tiles for Blackwell under triton before 3.9 (``blackwell_small_tiles``), where
#: the tiles above spill (triton 3.6, sm_100a: 8,036 bytes per thread at tf32's 128 x 256,
#: 320 at bf16's 128 x 128 x 64 on an fp32 database, 72 at tf32x3's 64 x 128; 3.7.1 and
#: 3.8.0 alike): the largest checked that compile without a spill under 3.6 and 3.7.1. Under
#: 3.8.0 the tf32 and bf16-storage tiles spill 8 bytes stored and 4 reloaded per thread, none
#: in or around the K-loop (one store before the loops, one store and reload in a loop after
#: the K-loop); the spill-free tiles there (128 x 64 in tf32, 16-wide K-steps with a
#: bf16-stored database) are not taken untimed. Key: precision, or ``"bf16-storage"``.
#: Values: block_q, block_m, block_d, warps, stages, CTAs/SM.
BLACKWELL_SMALL_TILES = {
    "tf32": (128, 128, 16, 4, 4, 2),
    "bf16-storage": (128, 128, 32, 4, 4, 2),
    "bf16": (128, 128, 16, 4, 4, 2),
    "tf32x3": (128, 64, 16, 4, 3, 2),
}


def launch_config(n_q: int, n_db: int, d: int, precision: str, *, q_bytes: int = 4,
                  x_bytes: int = 4, n_sm: int | None = None, major: int = 9) -> LaunchConfig:
    """One known-good configuration for this shape.

    ``tf32``: 128 queries x 256 database rows on two warpgroups, 16-wide K-steps, 4 stages
    (42.7 FLOP per byte of operand loads: compute-bound under the model's L2 roof, where
    128 x 128 tiles are not); ``bf16`` with a bf16-stored database: 128 x 256, 32-wide K-steps;
    ``bf16`` on an fp32 database (cast per tile): 128 x 128, 64-wide K-steps; ``tf32x3``:
    64 x 128 on one warpgroup, 16-wide K-steps; ``ieee`` (FMA): 32 x 64 tiles on 8 warps,
    16-wide K-steps.
    None of them spills under triton 3.6 or 3.9 on sm_90a (``bench/compile_report.py``); for a
    Blackwell GPU (``major`` >= 10, the compute capability compiled for) under triton before
    3.9, :data:`BLACKWELL_SMALL_TILES` replaces the tensor-core tiles. The database is
    split so that (query blocks x splits) fills whole waves of ``n_sm`` x CTAs/SM programs,
    each split at least 4 tiles long; ``GROUP_Q`` query blocks (their tiles within
    ``L2_QUERY_BUDGET``) share each database tile.
    """
    if precision == "ieee":
        block_q, block_m, block_d, warps, stages, ctas = 32, 64, 16, 8, 3, 2
    elif precision == "tf32x3":  # three MMAs per step: a 64-row tile keeps it spill-free
        block_q, block_m, block_d, warps, stages, ctas = 64, 128, 16, 4, 3, 2
    elif precision == "tf32":
        block_q, block_m, block_d, warps, stages, ctas = 128, 256, 16, 8, 4, 1
    elif x_bytes == 2:  # bf16 on bf16 storage: both operands go to the MMA as loaded
        block_q, block_m, block_d, warps, stages, ctas = 128, 256, 32, 8, 4, 1
    else:  # bf16 on an fp32 database: the cast in registers needs the smaller tile
        block_q, block_m, block_d, warps, stages, ctas = 128, 128, 64, 8, 4, 1
    if precision != "ieee" and blackwell_small_tiles(major):
        key = "bf16-storage" if precision == "bf16" and x_bytes == 2 else precision
        block_q, block_m, block_d, warps, stages, ctas = BLACKWELL_SMALL_TILES[key]
    block_q, block_m = fit_tile(block_q, n_q), fit_tile(block_m, n_db)
    block_d = fit_tile(block_d, d)
    n_qb = triton.cdiv(n_q, block_q)
    group_q = max(1, min(n_qb, L2_QUERY_BUDGET // (block_q * d * q_bytes)))
    tiles = triton.cdiv(n_db, block_m)
    slots = (n_sm or DEFAULT_SMS) * ctas
    # Whole waves: the smallest split count with n_qb * split a multiple of the slots, or
    # else the one that wastes least of the last wave, among splits of >= 4 tiles.
    best, best_waste = 1, 1.0
    for split in range(1, max(1, tiles // 4) + 1):
        programs = n_qb * split
        waves = programs / slots
        waste = (math.ceil(waves) - waves) / math.ceil(waves)
        if waste < best_waste - 1e-9 or (waves < 1 and split > best):
            best, best_waste = split, waste
        if waves >= 1 and waste < 0.05:
            break
    return LaunchConfig(block_q, block_m, block_d, warps, stages, n_split=best, group_rows=group_q)


def casts_database(n_q: int, precision: str, x_dtype: torch.dtype) -> bool:
    """Whether :func:`knn` searches a bf16 copy of the database, cast per call, rather than
    casting each database tile in the K-loop: in ``bf16`` mode on a database not stored in
    bf16, for at least :data:`CAST_MIN_QUERIES` queries. Cast in the K-loop, the tile goes
    from registers back to shared memory before the MMA, so every wgmma waits for the one
    before (none in flight; ``bench/compile_report.py``), and the 128 x 128 tile it needs
    reads the fp32 rows through L2 once per query block. The copy is searched as bf16
    storage is (128 x 256 tiles, wgmma in flight), for one more pass over the database; with
    few queries that pass is most of the search, so they keep the cast in the K-loop."""
    return castable(precision, x_dtype) and n_q >= CAST_MIN_QUERIES


def castable(precision: str, x_dtype: torch.dtype) -> bool:
    """Whether there is a bf16 copy to make: ``bf16`` mode on rows not stored in bf16."""
    return precision == "bf16" and x_dtype != torch.bfloat16


def cast_chunks(n_db: int, d: int) -> list[tuple[int, int]]:
    """The row ranges ``(start, stop)`` a database of ``n_db`` rows is cast and searched in:
    as few equal chunks as keep each bf16 copy within :data:`CAST_CHUNK_BYTES`."""
    n_chunks = max(1, math.ceil(n_db * d * 2 / CAST_CHUNK_BYTES))
    rows = math.ceil(n_db / n_chunks)
    return [(r0, min(r0 + rows, n_db)) for r0 in range(0, n_db, rows)]


def _planned(n_q: int, n_db: int, d: int, precision: str, q_bytes: int, x_bytes: int,
             n_sm: int | None = None, major: int = 9) -> tuple[LaunchConfig, int]:
    """The launch configuration with its database split realised in whole tiles, and the
    rows per split (the last split may be shorter; none is empty)."""
    cfg = launch_config(n_q, n_db, d, precision, q_bytes=q_bytes, x_bytes=x_bytes, n_sm=n_sm,
                        major=major)
    rows = triton.cdiv(triton.cdiv(n_db, cfg.n_split), cfg.block_cols) * cfg.block_cols
    return cfg._replace(n_split=triton.cdiv(n_db, rows)), rows


def launch_plans(n_q: int, n_db: int, d: int, precision: str, q_bytes: int, x_bytes: int,
                 cast: bool, n_sm: int | None = None, major: int = 9):
    """``(start, stop, cfg, rows_per_split)`` of each search launch: one over the whole
    database, or with ``cast`` one per chunk of its bf16 copy (:func:`cast_chunks`)."""
    chunks = cast_chunks(n_db, d) if cast else [(0, n_db)]
    return [(r0, r1, *_planned(n_q, r1 - r0, d, precision, q_bytes, 2 if cast else x_bytes,
                               n_sm, major)) for r0, r1 in chunks]
