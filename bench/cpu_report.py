"""CPU report for the pure-torch fallback: how close each op runs to the matrix-multiply bound.

For each shape it times the grood op and, as named baselines in the same run, one plain
``torch.mm`` with the same multiply-add count (the GEMM the op cannot avoid) and one
element-wise pass over the input (``x * 2``, the memory-traffic floor that dominates when C is
small). It checks the op
against a float64 computation first. Prints one table; nothing is asserted.

``--stages`` adds a second table: the gradient step taken apart. Each stage the op runs per row
tile (the first write of the output, the GEMM, the distances, the softmax terms, the candidate
pick, the exact re-rank, the gradient's scaling) is timed alone over the whole input, with the
same torch calls on the same tiles, interleaved with the op and the baselines. Their sum
should come near the op; the stages the op cannot do without (the first write of a fresh
output and the GEMM) against the issue's targets say how much room is left.

    python bench/cpu_report.py            # default shapes (about a minute on 2 cores)
    python bench/cpu_report.py --small    # quick check
    python bench/cpu_report.py --stages   # and the gradient step's stages
    python bench/cpu_report.py --class-blocks   # only: the class block's width at large C
    python bench/cpu_report.py --search-k       # only: the exact search at k = 1 ... 1,000
    python bench/cpu_report.py --search-pick    # only: the search's candidate pick, A/B

``--class-blocks`` times the gradient step at large C (5,000 to 21,841 classes) with its
default class block (``functional.gradient_class_block``) against other widths, the former
default of one block up to 16,384 classes among them, interleaved; each width's outputs must
equal the default's bit for bit (every output compared with ``torch.equal``).
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from functools import partial

import torch

from grood import __version__, functional
from grood._bench.common import clustered_problem, interleaved_median_times
from grood._bench.search import kth_distance_error, normalised_rows
from grood._checks import positive_int_arg
from grood.functional import NCP_CANDIDATES, gradient_class_block, gradient_tile_rows

#: (N, C, D) of the ``--class-blocks`` table (``--small``: one quick shape).
CLASS_BLOCK_SHAPES = [(4096, 5000, 1024), (4096, 10000, 1024), (2048, 21841, 512),
                      (2048, 21841, 1024), (2048, 21841, 2048)]
#: (Q, M, D) and the k of the ``--search-k`` table (``--small``: Q = 128, M = 2,000, D = 64).
SEARCH_K_SHAPE = (2048, 20000, 512)
SEARCH_K = [1, 10, 50, 200, 1000]
#: (Q, M, D, k) of the ``--search-pick`` table: OpenOOD's KNN (k = 50) and GROOD's 1-NN on
#: ResNet-18 and ResNet-50 widths, a narrow index (D = 64, where picking costs as much as the
#: GEMM), few queries (wide database tiles) and k = 200 (kept whole at 4,096-row tiles, in
#: groups of 8 at 8,192).
SEARCH_PICK_SHAPES = [(2048, 20000, 512, 1), (2048, 20000, 512, 10), (2048, 20000, 512, 50),
                      (2048, 20000, 512, 200), (2048, 20000, 2048, 1), (8192, 20000, 64, 1),
                      (8192, 20000, 64, 50), (256, 100000, 512, 1), (512, 40000, 512, 200)]
#: The former default: every class in one block up to 16,384 (still the default off the CPU).
FORMER_CLASS_BLOCK = 1 << 14
#: Other widths timed against the default (those below C).
CLASS_BLOCK_WIDTHS = [4096, 2048, 512]


def _check_ncp(h, protos, p_ood) -> float:
    res = functional.ncp_gradient(h[:256], protos, p_ood)
    ref = functional.ncp_gradient(h[:256].double(), protos.double(), p_ood.double())
    return float(((res.q_ood.double() - ref.q_ood).abs() / ref.q_ood.abs()).max())


def _check_knn(q, db) -> float:
    _, i = functional.knn(q[:64], db, 1)
    _, ref_i = functional.knn(q[:64].double(), db.double(), 1)
    return float((i == ref_i).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes, quick")
    parser.add_argument("--repeat", type=positive_int_arg, default=5,
                        help="rounds; each calls the op and both baselines once (default 5)")
    parser.add_argument("--class-blocks", action="store_true",
                        help="only the class block's width at large C (its own table)")
    parser.add_argument("--stages", action="store_true",
                        help="also time the gradient step's stages alone (second table)")
    parser.add_argument("--search-k", action="store_true",
                        help="only the exact search at k from 1 to 1,000 (its own table)")
    parser.add_argument("--search-pick", action="store_true",
                        help="only the exact search with its candidates picked from group "
                             "minima against from whole tiles (its own table)")
    args = parser.parse_args()
    if args.class_blocks:
        _class_blocks_table([(256, 3000, 64)] if args.small else CLASS_BLOCK_SHAPES,
                            args.repeat)
        return
    if args.search_k:
        _search_k_table((128, 2000, 64) if args.small else SEARCH_K_SHAPE, args.repeat)
        return
    if args.search_pick:
        _search_pick_table([(64, 6000, 32, 1), (64, 6000, 32, 20)] if args.small
                           else SEARCH_PICK_SHAPES, args.repeat)
        return
    gen = torch.Generator().manual_seed(0)
    if args.small:
        ncp_shapes = [(512, 10, 64), (512, 100, 128)]
        knn_shapes = [(128, 2000, 64)]
    else:
        ncp_shapes = [(16384, 10, 512), (16384, 100, 512), (4096, 1000, 2048)]
        knn_shapes = [(1024, 50000, 512), (256, 100000, 2048)]
    _header(args.repeat, "op and baselines interleaved")
    _table_head()
    for n, c, d in ncp_shapes:
        h = torch.rand(n, d, generator=gen)
        protos = torch.rand(c, d, generator=gen)
        p_ood = protos.mean(0)
        _row(args.repeat, f"ncp_gradient | N={n} C={c} D={d}",
             partial(functional.ncp_gradient, h, protos, p_ood), h, protos,
             f"q_ood max rel err {_check_ncp(h, protos, p_ood):.1e}")
    for q, m, d in knn_shapes:
        queries = torch.rand(q, d, generator=gen)
        db = torch.rand(m, d, generator=gen)
        _row(args.repeat, f"knn k=1 | Q={q} M={m} D={d}", partial(functional.knn, queries, db, 1),
             queries, db, f"recall@1 vs fp64 {_check_knn(queries, db):.3f}")
    if args.stages:
        _stages_table(ncp_shapes, args.repeat)


def _search_k_table(shape: tuple[int, int, int], repeat: int) -> None:
    """The exact search's rows (as the main table's) at each of ``SEARCH_K``, on L2-normalised
    clustered rows (KNN's features), each checked first: its k-th distances against a float64
    search's, for 64 queries."""
    q, m, d = shape
    queries, db = normalised_rows(q, m, d, "cpu")
    _header(repeat, "op and baselines interleaved")
    _table_head()
    ks = [k for k in SEARCH_K if k <= m]
    want = functional.knn(queries[:64].double(), db.double(), max(ks))[0]
    for k in ks:
        err = kth_distance_error(functional.knn(queries[:64], db, k)[0], want, k)
        _row(repeat, f"knn k={k} | Q={q} M={m} D={d}", partial(functional.knn, queries, db, k),
             queries, db, f"k-th distance max rel err vs fp64 {err:.1e}")


def _search_pick_table(shapes: list[tuple[int, int, int, int]], repeat: int) -> None:
    """``functional.knn`` on the CPU with each database tile's candidates picked as it does
    (``topk_lowest_index`` narrowing wide tiles by group minima first) against ``torch.topk``
    over every whole tile (the former pick), interleaved, with the GEMM of the same FLOPs; on
    L2-normalised clustered rows. Both outputs must be equal bit for bit."""
    _header(repeat, "the two picks and the GEMM interleaved")
    print("| shape | k | database rows per tile | narrowed | whole tiles (ms) | narrowed (ms) "
          "| whole / narrowed | torch.mm same FLOPs (ms) | narrowed / mm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q, m, d, k in shapes:
        queries, db = normalised_rows(q, m, d, "cpu")
        n_cand = k + functional.RERANK_EXTRA
        rows, width = functional.search_tile("cpu", q, n_cand)

        whole = partial(_knn_whole_tiles, queries, db, k)
        narrowed = partial(functional.knn, queries, db, k)
        for a, b in zip(whole(), narrowed(), strict=True):
            if not torch.equal(a, b):
                raise SystemExit(f"Q={q} M={m} D={d} k={k}: the narrowed pick's neighbours "
                                 "differ from the whole tiles'")
        t_whole, t_narrow, t_mm = interleaved_median_times(
            [whole, narrowed, partial(torch.mm, queries, db.T)], "cpu", repeat)
        used = "yes" if functional._group_size((rows, min(width, m)), n_cand) else "no"
        print(f"| Q={q} M={m} D={d} | {k} | {min(width, m):,} | {used} | {1e3 * t_whole:.1f} "
              f"| {1e3 * t_narrow:.1f} | {t_whole / t_narrow:.2f}x | {1e3 * t_mm:.1f} "
              f"| {t_narrow / t_mm:.2f} |")


def _knn_whole_tiles(queries: torch.Tensor, db: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.knn`` with every tile's candidates picked by ``torch.topk`` over the whole
    tile (no tile is wide enough to be narrowed by group minima)."""
    kept = functional._GROUPED_WIDTH
    functional._GROUPED_WIDTH = 1 << 62
    try:
        return functional.knn(queries, db, k)
    finally:
        functional._GROUPED_WIDTH = kept


def _header(repeat: int, how: str) -> None:
    """The report's first line: versions, machine, date, and how its medians were taken."""
    print(f"grood {__version__} | torch {torch.__version__} | {platform.processor() or 'cpu'} | "
          f"{torch.get_num_threads()} threads | {date.today().isoformat()} | medians of "
          f"{repeat} rounds, {how}\n")


def _table_head() -> None:
    """The head of the ops' table, whose rows :func:`_row` prints."""
    print("| op | shape | ms | GFLOP/s | torch.mm same FLOPs (ms) | op / mm | one pass x*2 (ms) "
          "| op / pass | check |")
    print("|---|---|---|---|---|---|---|---|---|")


def _row(repeat: int, label: str, op, a: torch.Tensor, b: torch.Tensor, check: str) -> None:
    """Time ``op`` against ``a @ b.T`` (same FLOPs) and one pass over the larger input, the
    three called in turn in every round (medians over the rounds)."""
    big = a if a.numel() >= b.numel() else b
    t_op, t_mm, t_pass = interleaved_median_times(
        [op, partial(torch.mm, a, b.T), partial(torch.mul, big, 2)], "cpu", repeat)
    flops = 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
    print(f"| {label} | {1e3 * t_op:.1f} | {flops / t_op / 1e9:.1f} | {1e3 * t_mm:.1f} | "
          f"{t_op / t_mm:.2f} | {1e3 * t_pass:.1f} | {t_op / t_pass:.2f} | {check} |")


# Stages of functional.ncp_gradient (float32, ieee, prototypes near 1 so no rescaling), in the
# order the op runs them on each row tile.
STAGES = ("first write", "norms", "GEMM", "distances", "softmax", "pick", "re-rank", "scale")


def _stage_fns(h: torch.Tensor, protos: torch.Tensor, p_ood: torch.Tensor) -> list:
    """One function per entry of ``STAGES``, each running that stage's torch calls over every
    row tile of ``h`` as ``functional.ncp_gradient`` does (inputs of later stages made once,
    outside the timing)."""
    n, d = h.shape
    c = protos.shape[0]
    bn = gradient_tile_rows("cpu", c, d)
    tiles = [(r0, min(r0 + bn, n)) for r0 in range(0, n, bn)]
    centred = protos - p_ood
    centred_sq = (centred * centred).sum(1)
    u = h - p_ood
    u_sq = torch.linalg.vector_norm(u, dim=1) ** 2
    gemm = [torch.addmm(centred_sq[None], u[a:b], centred.T, alpha=-2.0) for a, b in tiles]
    dist = [g.add(u_sq[a:b, None]).clamp_min_(0).sqrt_()
            for g, (a, b) in zip(gemm, tiles, strict=True)]
    m = [-x.amin(1).double() for x in dist]
    cand = [functional._nearest(x, min(NCP_CANDIDATES, c))[1] for x in dist]
    buf = functional._rerank_scratch(h.device, min(bn, n), min(NCP_CANDIDATES, c), d, h.dtype)
    scale = torch.rand(n)
    work = torch.empty((n, d))

    def first_write():
        out = torch.empty((n, d))
        for a, b in tiles:
            torch.sub(h[a:b], p_ood, out=out[a:b])

    def norms():
        for a, b in tiles:
            torch.linalg.vector_norm(u[a:b], dim=1)

    def gemm_stage():
        for a, b in tiles:
            torch.addmm(centred_sq[None], u[a:b], centred.T, alpha=-2.0)

    def distances():
        for g, (a, b) in zip(gemm, tiles, strict=True):
            g.clone().add_(u_sq[a:b, None]).clamp_min_(0).sqrt_()

    def softmax():
        for x, mx in zip(dist, m, strict=True):
            torch.sub(mx.neg()[:, None], x).exp_().sum(1)

    def pick():
        for x in dist:
            functional._nearest(x, min(NCP_CANDIDATES, c))

    def rerank():
        for ci, (a, b) in zip(cand, tiles, strict=True):
            functional._exact_candidate_distances(centred, ci, u[a:b], buf)

    def scale_stage():  # in the op in place; here into a buffer of the output's size
        for a, b in tiles:
            torch.mul(u[a:b], scale[a:b, None], out=work[a:b])

    return [first_write, norms, gemm_stage, distances, softmax, pick, rerank, scale_stage]


def _stages_table(shapes: list[tuple[int, int, int]], repeat: int) -> None:
    """Print the gradient step's stages at each shape (see the module docstring)."""
    print("\nGradient step taken apart (ms; each stage alone over all row tiles):\n")
    print("| shape | op | pass x*2 | mm | " + " | ".join(STAGES)
          + " | sum of stages | op - sum | first write + GEMM | all but re-rank |")
    print("|---" * (len(STAGES) + 8) + "|")
    gen = torch.Generator().manual_seed(1)
    for n, c, d in shapes:
        h = torch.rand(n, d, generator=gen)
        protos = torch.rand(c, d, generator=gen)
        p_ood = protos.mean(0)
        fns = [partial(functional.ncp_gradient, h, protos, p_ood), partial(torch.mul, h, 2),
               partial(torch.mm, h, protos.T), *_stage_fns(h, protos, p_ood)]
        t = [1e3 * x for x in interleaved_median_times(fns, "cpu", repeat)]
        st = dict(zip(STAGES, t[3:], strict=True))
        cells = " | ".join(f"{x:.1f}" for x in t)
        total = sum(st.values())
        print(f"| N={n} C={c} D={d} | {cells} | {total:.1f} | {t[0] - total:.1f} | "
              f"{st['first write'] + st['GEMM']:.1f} | {total - st['re-rank']:.1f} |")


def _class_blocks_table(shapes: list[tuple[int, int, int]], repeat: int) -> None:
    """Print the gradient step at each shape with its default class block, the former
    default (``FORMER_CLASS_BLOCK``) and each of ``CLASS_BLOCK_WIDTHS`` below C (blocks as
    the op cuts them: full width, then the rest), timed in turn; a width whose outputs differ
    from the default's in any bit raises."""
    _header(repeat, "widths interleaved; clustered float32 features, ieee")
    print("| shape | class block | blocks | ms | this / default |")
    print("|---|---|---|---|---|")
    for n, c, d in shapes:
        h, protos = clustered_problem(n, c, d, "cpu")
        p_ood = protos.mean(0)
        default = gradient_class_block("cpu", c)
        former = min(c, FORMER_CLASS_BLOCK)
        widths = list(dict.fromkeys([default, former] + [w for w in CLASS_BLOCK_WIDTHS
                                                         if w < c]))
        fns = [partial(functional.ncp_gradient, h, protos, p_ood, block_classes=w)
               for w in widths]
        first = fns[0]()
        for w, fn in zip(widths[1:], fns[1:], strict=True):
            other = fn()
            if not all(torch.equal(a, b) for a, b in zip(first, other, strict=True)):
                raise AssertionError(f"N={n} C={c} D={d}: class blocks of {w} change the "
                                     f"outputs against {default}")
        times = interleaved_median_times(fns, "cpu", repeat)
        for i, (w, t) in enumerate(zip(widths, times, strict=True)):
            label = f"{w} (default)" if i == 0 else (f"{w} (former default)" if w == former
                                                     else str(w))
            print(f"| N={n} C={c} D={d} | {label} | {-(-c // w)} | {1e3 * t:.1f} | "
                  f"{t / times[0]:.2f} |")


if __name__ == "__main__":
    main()
