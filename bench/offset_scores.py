"""Features sharing an offset far above their spread: how exact float32's scores are.

Such features hold their differences in the bits below the offset (at 1e5 a float32 feature
resolves 1/128). One table, for offsets of 1e3 to 1e6 over classes of spread 1: the largest
difference between float32's scores and float64's of the same float32 inputs (GROOD's own
rounding), beside the largest change float64's scores take when every input moves one unit
in its last place (the inputs' own resolution), both over the float64 scores' spread, and
their ratio. A ratio near 1 or below says float32 loses nothing beyond the features' own
rounding; the class sums are float64 and a row less its OOD prototype, two nearby float32
values, is exact.

    python bench/offset_scores.py                    # 2,000 rows, both backends
    python bench/offset_scores.py --tiny             # a smoke run (torch backend)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import warnings

import numpy as np
import torch

import grood


def data(offset: float, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(train, labels, test)``: 10 classes (D = 64, spread 1, means 2 apart) plus ``offset``
    in float32; half the test rows like the classes, half noise of spread 3."""
    gen = np.random.default_rng(seed)
    means = gen.normal(size=(10, 64)) * 2
    y = gen.integers(0, 10, n)
    x = ((means[y] + gen.normal(size=(n, 64))) + offset).astype(np.float32)
    m = n // 10
    test = (np.concatenate([means[gen.integers(0, 10, m)] + gen.normal(size=(m, 64)),
                            3 * gen.normal(size=(m, 64))]) + offset).astype(np.float32)
    return x, y, test


def scores(train: np.ndarray, y: np.ndarray, rows: np.ndarray, backend: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = grood.GROOD(progress=False, backend=backend)
        return det.fit(train, y).score_samples(rows).astype(np.float64)


def row(offset: float, n: int, backend: str) -> str:
    x, y, test = data(offset, n)
    want = scores(x.astype(np.float64), y, test.astype(np.float64), "torch")
    ulp = float(np.spacing(np.float32(offset)))
    gen = np.random.default_rng(1)
    moved = scores(x + ulp * gen.choice([-1.0, 1.0], x.shape), y,
                   test + ulp * gen.choice([-1.0, 1.0], test.shape), "torch")
    spread = float(np.ptp(want))
    own = float(np.abs(scores(x, y, test, backend) - want).max()) / spread
    inputs = float(np.abs(moved - want).max()) / spread
    return (f"| {offset:.0e} | {backend} | {ulp:.3g} | {own:.2e} | {inputs:.2e} | "
            f"{own / inputs:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: fewer rows, torch")
    args = parser.parse_args()
    n = 300 if args.tiny else 2000
    offsets = (1e3, 1e5) if args.tiny else (1e3, 1e4, 1e5, 1e6)
    backends = ["torch"]
    if not args.tiny and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")  # (the kernels under the interpreter; compiled on a GPU)
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, "
          f"{datetime.date.today()}\n")
    print(f"{n:,} training rows of 10 classes (D = 64, spread 1), {n // 5:,} test rows; "
          "errors over the float64 scores' spread:\n")
    print("| offset | backend | float32 unit in the last place | float32 against float64, "
          "same inputs | float64, inputs moved one unit | ratio |")
    print("|---|---|---|---|---|---|")
    for offset in offsets:
        for backend in backends:
            print(row(offset, n, backend), flush=True)


if __name__ == "__main__":
    main()
