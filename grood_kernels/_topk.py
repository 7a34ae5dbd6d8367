"""Device helpers shared by the kernels: a running top-k of distance tiles, in registers.

Both keep, per row, ``N_CAND`` candidates (distance, id), with +inf and a distinct negative id
(``-1 - slot``) in empty slots, and follow one rule (:func:`replace_worst`): an entry
replaces the row's worst candidate by (distance, id) only when strictly nearer, and among equal
distances the lower id is taken first, so lower ids win exact ties.
"""

import triton
import triton.language as tl


@triton.jit
def clamp_sq(d2):
    """Squared distances from the GEMM expansion clamped at 0, NaN made +inf: an entry that is
    no distance (a row or a query with NaN or Inf) never becomes a candidate. Compiled,
    ``maximum`` returns the number where one operand is NaN (0 here: a perfect match), and row
    minima pass over NaN while ``argmin`` may point at one, so no NaN may reach the top-k."""
    return tl.where(d2 == d2, tl.maximum(d2, 0.0), float("inf"))


@triton.jit
def pop_nearest(vals, ids):
    """Each row's nearest entry by (value, id), negative ids after every other, and ``vals``
    with it set to +inf: returns ``(value, id, vals)`` (id 2**31 - 1 where the row has none).
    ``ids`` are int32."""
    v = tl.min(vals, axis=1)
    big = tl.where(ids >= 0, ids, 2147483647)
    j = tl.min(tl.where(vals == v[:, None], big, 2147483647), axis=1)
    return v, j, tl.where((vals == v[:, None]) & (big == j[:, None]), float("inf"), vals)


@triton.jit
def replace_worst(cand_d, cand_i, worst, v, new_id, better):
    """Put ``(v, new_id)`` in place of each row's worst candidate by (distance, id) where
    ``better``: among slots at the ``worst`` distance, the one with the highest id, so lower ids
    survive exact ties. Ids in a row must be distinct (empty slots: ``-1 - slot``)."""
    at_worst = cand_d == worst[:, None]
    worst_id = tl.max(tl.where(at_worst, cand_i, -2147483647), axis=1)
    slot = at_worst & (cand_i == worst_id[:, None]) & better[:, None]
    return (tl.where(slot, v[:, None], cand_d),
            tl.where(slot, new_id.to(cand_i.dtype)[:, None], cand_i))


@triton.jit
def any_row(flags, FLAT_GATE: tl.constexpr):
    """Whether any entry of the 1-D ``flags`` is set, as a scalar. ``FLAT_GATE`` (on from
    sm_100: :func:`grood_kernels._launch.for_target`): a reduction over every axis, which
    triton lowers through a reshape whose order is free (the public ``can_reorder`` flag for
    that is deprecated from triton 3.9; a plain reshape of the same shape folds away and
    brings the failure back). Under triton 3.6, compiling for sm_100 (tcgen05), a scalar
    reduction of a row reduction of the MMA accumulator fails in the TMEM layout pass ("parent
    layout must have at least rank >= 2"), which took every tensor-core mode of both kernels
    down on Blackwell GPUs; on sm_90a the reshape costs spills under triton 3.6 (the search in
    tf32), so it is not done there."""
    if FLAT_GATE:
        return tl.max(flags.to(tl.int32), axis=None) > 0
    else:
        return tl.max(flags.to(tl.int32), axis=0) > 0


@triton.jit
def insert_nearest(dist, cand_d, cand_i, col0, N_CAND: tl.constexpr, N_COLS: tl.constexpr,
                   count_ptr=None, COUNT: tl.constexpr = False,
                   FLAT_GATE: tl.constexpr = False):
    """Merge the N_CAND smallest entries of each row of ``dist`` into the candidates.

    Args:
        dist: distance tile [ROWS, N_COLS] (+inf where masked).
        cand_d: candidate distances [ROWS, N_CAND] (+inf for an empty slot).
        cand_i: candidate column ids [ROWS, N_CAND], int32 or int64; empty slots hold
            distinct negative ids (``-1 - slot``), so the slot to replace is unique.
        col0: the global id of the tile's first column.
        count_ptr, COUNT: when COUNT, add the number of insertion rounds run to ``*count_ptr``.
        FLAT_GATE: how the gate's flags are reduced (see :func:`any_row`).

    Each round takes every row's smallest remaining entry (the leftmost on ties) and puts it in
    place of the row's worst candidate by (distance, id) when strictly smaller. Rounds are
    gated: once no row's smallest remaining entry beats its worst candidate, no later round
    can, and the rest are skipped, so a tile with nothing new costs one row minimum and one
    comparison.
    Returns the updated ``(cand_d, cand_i)``.
    """
    cols = tl.arange(0, N_COLS)
    going = tl.full([], 1, dtype=tl.int32)
    for _ in tl.static_range(N_CAND):
        if going > 0:
            v = tl.min(dist, axis=1)
            worst = tl.max(cand_d, axis=1)
            better = v < worst
            if any_row(better, FLAT_GATE):
                if COUNT:
                    tl.atomic_add(count_ptr, 1)
                j = tl.argmin(dist, axis=1, tie_break_left=True)
                cand_d, cand_i = replace_worst(cand_d, cand_i, worst, v, col0 + j, better)
                dist = tl.where(cols[None, :] == j[:, None], float("inf"), dist)
            else:
                going = going * 0
    return cand_d, cand_i


@triton.jit
def first_nearest(dist, col0, ROWS: tl.constexpr, N_CAND: tl.constexpr, N_COLS: tl.constexpr):
    """The candidates of a row tile's first distance tile: :func:`insert_nearest` into empty
    candidates, with the same result bit for bit, and each row's minimum beside it.

    From empty candidates each round of :func:`insert_nearest` fills the next slot where the
    row still has a finite entry, so no round needs the worst candidate, the gate or the slot
    search, and the minimum and its column come from one reduction (``tl.min`` with indices,
    the leftmost on ties, as ``tl.argmin``) where :func:`insert_nearest` reduces the tile
    twice. This epilogue runs while a program's tensor cores are idle. Returns ``(cand_d,
    cand_i, row_min)``: the candidates [ROWS, N_CAND] (int32 ids; empty slots as above) and
    ``tl.min(dist, axis=1)``.
    """
    cols = tl.arange(0, N_COLS)
    slots = tl.arange(0, N_CAND)
    cand_d = tl.full([ROWS, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([ROWS, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty: -1 - slot
    v, j = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
    row_min = v
    for r in tl.static_range(N_CAND):
        if r > 0:
            dist = tl.where(cols[None, :] == j[:, None], float("inf"), dist)
            v, j = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        slot = (slots[None, :] == r) & (v < float("inf"))[:, None]
        cand_d = tl.where(slot, v[:, None], cand_d)
        cand_i = tl.where(slot, (col0 + j).to(tl.int32)[:, None], cand_i)
    return cand_d, cand_i, row_min


@triton.jit
def merge_candidates(new_d, new_i, cand_d, cand_i, N_CAND: tl.constexpr):
    """Merge another candidate list [ROWS, N_CAND] (ids given per entry) into ``cand``, whose
    empty slots hold distinct negative ids.

    Entries are taken nearest first, lowest id first among equal distances, and replace the
    worst candidate when strictly nearer; empty entries (+inf) never enter. Lists from
    disjoint, ascending id ranges merged in order keep the lower-id-wins rule.
    """
    for _ in tl.static_range(N_CAND):
        v, j_id, new_d = pop_nearest(new_d, new_i)
        worst = tl.max(cand_d, axis=1)
        cand_d, cand_i = replace_worst(cand_d, cand_i, worst, v, j_id, v < worst)
    return cand_d, cand_i
