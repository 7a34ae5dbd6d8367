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

import numpy as np
import torch

import grood
from grood._bench.common import offset_errors


def row(offset: float, n: int, backend: str) -> str:
    own, inputs = offset_errors(offset, n, backend)
    ulp = float(np.spacing(np.float32(offset)))
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
