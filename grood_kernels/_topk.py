"""Device helper shared by the kernels: a running top-k of a distance tile, in registers."""

import triton
import triton.language as tl


@triton.jit
def insert_nearest(dist, cand_d, cand_i, col0, N_CAND: tl.constexpr, N_COLS: tl.constexpr):
    """Merge the N_CAND smallest entries of each row of ``dist`` into the candidates.

    Args:
        dist: distance tile [ROWS, N_COLS] (+inf where masked).
        cand_d: candidate distances [ROWS, N_CAND] (+inf for an empty slot).
        cand_i: candidate column ids [ROWS, N_CAND] (int64, -1 for an empty slot).
        col0: the global id of the tile's first column.

    Each step takes a row's smallest remaining entry (the leftmost on ties) and puts it in
    place of the row's worst candidate when strictly smaller, so earlier (lower) ids win ties.
    Returns the updated ``(cand_d, cand_i)``.
    """
    slots = tl.arange(0, N_CAND)
    cols = tl.arange(0, N_COLS)
    for _ in tl.static_range(N_CAND):
        j = tl.argmin(dist, axis=1, tie_break_left=True)
        v = tl.min(dist, axis=1)
        worst = tl.max(cand_d, axis=1)
        worst_at = tl.argmax(cand_d, axis=1, tie_break_left=True)
        slot = (slots[None, :] == worst_at[:, None]) & (v < worst)[:, None]
        cand_d = tl.where(slot, v[:, None], cand_d)
        cand_i = tl.where(slot, col0 + j.to(tl.int64)[:, None], cand_i)
        dist = tl.where(cols[None, :] == j[:, None], float("inf"), dist)
    return cand_d, cand_i
