"""How long ``grood.tune`` takes over a grid of ``k``: one search per validation set at the
grid's largest k, against each point searched on its own (grood before the shared search).

Points that differ in ``k`` alone share one fit; their scores are the k-th nearest distances,
so one search at the largest k gives every smaller k's. The baseline here scores each point
on its own (``grood.tuning._scores_by_k`` switched off), in the same run, interleaved. Both
runs' metrics must be equal, every point and every set, before anything is timed.

Data: :func:`grood._bench.common.realistic_features` (clustered post-ReLU-like rows), a
training set, an ID validation set of the same classes, and a near-OOD set (new classes
midway between two known ones) and a far one (uniform noise of the same scale). GROOD's
grid is the range a user would search; KNN's is OpenOOD v1.5's sweep of its ``K``; NNGuide
reads the features through a nearest-class-mean layer (given, not recovered).

    python bench/tune_search.py            # 20,000 x 512, C = 100, 3 x 5,000 val rows
    python bench/tune_search.py --small    # a quick check
    python bench/tune_search.py --only KNN # one estimator
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from functools import partial
from typing import Any

import torch

import grood
from grood import GROOD, KNN, NNGuide, tune
from grood._bench.common import interleaved_median_times, realistic_features
from grood._checks import positive_int_arg

#: Each estimator and its grid of ``k`` (NNGuide: a bank of a tenth of the training rows).
GRIDS: list[tuple[str, Any, list[int]]] = [
    ("GROOD", GROOD(), [1, 2, 5, 10, 20, 50]),
    ("KNN", KNN(), [50, 100, 200, 500, 1000]),
    ("NNGuide", NNGuide(bank_fraction=0.1), [1, 10, 100, 1000]),
]


def problem(n: int, c: int, d: int, n_val: int) -> dict[str, Any]:
    """The training set and the validation sets (float32, on the CPU)."""
    x, y = realistic_features(n, c, d, seed=0, device="cpu")
    val = realistic_features(n_val, c, d, seed=1, device="cpu")[0]
    near = realistic_features(n_val, c, d, seed=2, device="cpu", novel=True)[0]
    gen = torch.Generator().manual_seed(5)
    far = torch.rand(n_val, d, generator=gen) * float(x.mean()) * 2
    means = torch.stack([x[y == c].mean(0) for c in range(c)])
    head = {"weight": means, "bias": -0.5 * (means * means).sum(1)}  # nearest class mean
    return {"train": {"features": x, "labels": y}, "id_val": val,
            "ood_val": {"near": near, "far": far}, "head": head}


def run(est: Any, grid: list[int], sets: dict[str, Any], shared: bool) -> grood.Tuning:
    """``tune`` over ``grid``, with the shared search or with each point on its own."""
    import grood.tuning as tuning

    before = tuning._scores_by_k
    if not shared:
        tuning._scores_by_k = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        return tune(est, {"k": grid}, progress=False, train=sets["train"],
                    id_val=sets["id_val"], ood_val=sets["ood_val"],
                    fit_params=sets["head"] if isinstance(est, NNGuide) else None)
    finally:
        tuning._scores_by_k = before  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes, quick")
    parser.add_argument("--repeat", type=positive_int_arg, default=3,
                        help="timed runs of each (median)")
    parser.add_argument("--only", choices=[name for name, _, _ in GRIDS], action="append",
                        help="only this estimator (repeatable)")
    args = parser.parse_args()
    n, c, d, n_val = (3000, 20, 64, 500) if args.small else (20000, 100, 512, 5000)
    sets = problem(n, c, d, n_val)
    print(f"grood {grood.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, {date.today()}\n")
    print(f"training {n} x {d} (C = {c}); validation: ID {n_val}, near-OOD {n_val}, far-OOD "
          f"{n_val}; median of {args.repeat}\n")
    print("| estimator | grid of k | one search per set | each point on its own | ratio "
          "| fits | best k |")
    print("|---|---|---|---|---|---|---|")
    for name, est, grid in GRIDS:
        if args.only and name not in args.only:
            continue
        rows = n // 10 if isinstance(est, NNGuide) else n // 2  # (the bank: a tenth)
        grid = [k for k in grid if k <= rows]
        a, b = run(est, grid, sets, True), run(est, grid, sets, False)
        if a.results != b.results or a.best_params != b.best_params:
            raise SystemExit(f"{name}: the shared search's metrics differ from each point's")
        t_shared, t_each = interleaved_median_times(
            [partial(run, est, grid, sets, True), partial(run, est, grid, sets, False)],
            "cpu", args.repeat)
        print(f"| {name} | {', '.join(map(str, grid))} | {t_shared:.2f} s | {t_each:.2f} s "
              f"| {t_each / t_shared:.2f}x | {a.fits} | {a.best_params['k']} |")


if __name__ == "__main__":
    main()
