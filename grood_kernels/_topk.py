"""Device helpers shared by the kernels: a running top-k of distance tiles, in registers.

Both keep, per row, ``N_CAND`` candidates (distance, id), with +inf and a negative id in empty
slots (distinct ones, ``-1 - slot``, for :func:`insert_nearest`), and follow one rule: an entry
replaces the row's worst candidate by (distance, id) only when strictly nearer, and among equal
distances the lower id is taken first, so lower ids win exact ties.
"""

import triton
import triton.language as tl


@triton.jit
def _worst_slot(cand_d, cand_i, worst):
    """Per row, the slot a nearer entry replaces: the worst by (distance, id) — among slots at
    the worst distance the highest id, so lower ids survive exact ties (empty slots first)."""
    key = tl.where(cand_d == worst[:, None], cand_i, -2)
    return tl.argmax(key, axis=1, tie_break_left=True)


@triton.jit
def insert_nearest(dist, cand_d, cand_i, col0, N_CAND: tl.constexpr, N_COLS: tl.constexpr,
                   count_ptr=None, COUNT: tl.constexpr = False):
    """Merge the N_CAND smallest entries of each row of ``dist`` into the candidates.

    Args:
        dist: distance tile [ROWS, N_COLS] (+inf where masked).
        cand_d: candidate distances [ROWS, N_CAND] (+inf for an empty slot).
        cand_i: candidate column ids [ROWS, N_CAND], int32 or int64; empty slots hold
            distinct negative ids (``-1 - slot``), so the slot to replace is unique.
        col0: the global id of the tile's first column.
        count_ptr, COUNT: when COUNT, add the number of insertion rounds run to ``*count_ptr``.

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
            if tl.max(better.to(tl.int32), axis=0) > 0:
                if COUNT:
                    tl.atomic_add(count_ptr, 1)
                j = tl.argmin(dist, axis=1, tie_break_left=True)
                at_worst = cand_d == worst[:, None]
                worst_id = tl.max(tl.where(at_worst, cand_i, -2147483647), axis=1)
                slot = at_worst & (cand_i == worst_id[:, None]) & better[:, None]
                cand_d = tl.where(slot, v[:, None], cand_d)
                cand_i = tl.where(slot, (col0 + j).to(cand_i.dtype)[:, None], cand_i)
                dist = tl.where(cols[None, :] == j[:, None], float("inf"), dist)
            else:
                going = going * 0
    return cand_d, cand_i


@triton.jit
def merge_candidates(new_d, new_i, cand_d, cand_i, N_CAND: tl.constexpr):
    """Merge another candidate list [ROWS, N_CAND] (ids given per entry) into ``cand``.

    Entries are taken nearest first, lowest id first among equal distances, and replace the
    worst candidate when strictly nearer; empty entries (+inf) never enter. Lists from
    disjoint, ascending id ranges merged in order keep the lower-id-wins rule.
    """
    slots = tl.arange(0, N_CAND)
    for _ in tl.static_range(N_CAND):
        v = tl.min(new_d, axis=1)
        big = tl.where(new_i >= 0, new_i, 2147483647)
        j_id = tl.min(tl.where(new_d == v[:, None], big, 2147483647), axis=1)
        worst = tl.max(cand_d, axis=1)
        worst_at = _worst_slot(cand_d, cand_i, worst)
        better = v < worst
        slot = (slots[None, :] == worst_at[:, None]) & better[:, None]
        cand_d = tl.where(slot, v[:, None], cand_d)
        cand_i = tl.where(slot, j_id.to(cand_i.dtype)[:, None], cand_i)
        new_d = tl.where((new_d == v[:, None]) & (big == j_id[:, None]), float("inf"), new_d)
    return cand_d, cand_i
