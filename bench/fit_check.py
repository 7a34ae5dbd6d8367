"""The fit's check of its exact index, against the fit it is part of.

After indexing, the fit searches 64 sampled gradients for as themselves and for their nearest
other row (``grood._fit.check_search_resolves``): whether the search tells them apart, and
whether they lie within the full-precision expansion's rounding of each other. Each search
reads the whole index. The table times, on the same fitted index, the check as the fit runs
it (one search for the two nearest, ``grood._fit.probed``) against the two searches it made
before (``missed_as_themselves`` through the index's search, then ``crowded_probes``), checks
that both give the same counts, and puts them beside the whole fit. Features: ReLU'd
clustered rows (class centres of spread 2, unit noise), float32, torch backend on the CPU.

    python bench/fit_check.py          # 50,000 x 2,048 and 200,000 x 512 (a minute on 2 cores)
    python bench/fit_check.py --tiny     # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import grood
from grood._fit import crowded_probes, missed_as_themselves, probe_ids, probed


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(n: int, d: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(c, d, generator=gen)
    labels = torch.arange(n) % c
    return (centres[labels] + torch.randn(n, d, generator=gen)).relu(), labels


def row(n: int, d: int, c: int, repeats: int) -> str:
    x, y = features(n, d, c)
    det = grood.GROOD(progress=False, backend="torch")
    fit = median_seconds(lambda: det.fit(x, y), max(1, repeats // 2))
    index = det.index_  # (the last timed fit's)
    ids = probe_ids(index.ntotal)
    held = index.vectors_at(ids)
    assert held is not None
    one = probed(index, ids, held)
    two = (missed_as_themselves(index, ids, held),
           crowded_probes(index, ids, held, index.dtype))
    if one != two:
        raise AssertionError(f"the one-search check counts {one}, the two searches {two}")
    t_one = median_seconds(lambda: probed(index, ids, held), repeats)
    t_two = median_seconds(lambda: (missed_as_themselves(index, ids, held),
                                    crowded_probes(index, ids, held, index.dtype)), repeats)
    return (f"| {n:,} x {d:,}, C = {c:,} | {index.ntotal:,} | {one[0]} / {one[1][0]} | "
            f"{1e3 * t_two:.0f} | {1e3 * t_one:.0f} | {t_two / t_one:.2f}x | {1e3 * fit:.0f} | "
            f"{100 * t_one / fit:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape (a smoke run)")
    args = parser.parse_args()
    shapes = [(3_000, 64, 10)] if args.tiny else [(50_000, 2_048, 1_000), (200_000, 512, 100)]
    repeats = 3 if args.tiny else 7
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), {datetime.date.today()}\n")
    print("| training rows | indexed | missed / crowded of 64 | two searches (ms) | "
          "one search (ms) | speed-up | whole fit (ms) | check's share of the fit |")
    print("|---|---|---|---|---|---|---|---|")
    for n, d, c in shapes:
        print(row(n, d, c, repeats))


if __name__ == "__main__":
    main()
