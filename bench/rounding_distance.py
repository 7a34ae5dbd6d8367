"""How far float64 rows lie from their own float32 indexed gradients, and new rows from theirs.

A float32 detector scores float64 features in float64: its training rows, given as float64,
have gradients a rounding away from the float32 ones the fit indexed, not at 0. Calibration
and evaluation count them as training rows within ``grood._gradients.rounding_distance``:
``ROUNDING_UNITS`` (8) units of float32's epsilon times ``q_ood (1 + d_ood + |lse|)``. The
table gives, per set, each row's distance to its nearest indexed gradient in those units
(the square root of the squared distance over the bound, times 8): the training rows' own
(those the fit indexed) and new rows' of the same classes. The bound must hold every own row
and none of the new ones. Rows whose float32 gradients reach float32's subnormal range
(``subnormal_rows``: a float32 fit warns of them) are counted apart, as calibration leaves
them uncounted, and left out of the distances.

Sets: Gaussian classes (centres of spread ``sep``, unit noise, some shifted by an offset
shared by every feature), ReLU'd clustered rows at 512 and 2,048 features, and scikit-learn's
digits (the first 1,200 images fitted, the other 597 new).

    python bench/rounding_distance.py          # every set (a minute on 2 cores)
    python bench/rounding_distance.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

import grood
from grood._gradients import ROUNDING_UNITS, rounding_distance, subnormal_rows


def units(det: grood.GROOD, rows: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each float64 row's nearest indexed gradient's distance, in units of the float32
    rounding bound (``ROUNDING_UNITS`` at the bound), the training row behind it, and
    whether the row's float32 gradient reaches float32's subnormal range."""
    res = det._grads.resolved(rows, 0)
    dists, found = det.kneighbors(rows, 1)
    bound = rounding_distance(res, torch.float32)
    return (ROUNDING_UNITS * (dists[:, 0] / bound).sqrt(), found[:, 0],
            subnormal_rows(res, torch.float32))


def gaussian(n_classes: int, dim: int, sep: float, offset: float, n: int, seed: int,
             relu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows, their labels and as many new rows of the same classes (float32)."""
    rng = np.random.default_rng(seed)
    centres = sep * rng.standard_normal((n_classes, dim))
    y = np.arange(n) % n_classes

    def draw() -> np.ndarray:
        x = centres[y] + rng.standard_normal((n, dim)) + offset
        return (np.maximum(x, 0) if relu else x).astype(np.float32)

    return draw(), y, draw()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run")
    parser.add_argument("--seeds", type=int, default=3, help="draws of each Gaussian set")
    args = parser.parse_args(argv)
    per_class = 20 if args.tiny else 60
    sets = [("Gaussian", 6, 16, 3.0, 0.0), ("Gaussian", 3, 2, 3.0, 0.0),
            ("Gaussian", 3, 8, 30.0, 0.0), ("Gaussian, offset 1e5", 10, 64, 3.0, 1e5)]
    if not args.tiny:
        sets += [("ReLU'd clusters", 100, 512, 3.0, 0.0), ("Gaussian", 10, 2048, 0.3, 0.0)]
    rows = []
    for i, (name, c, d, sep, offset) in enumerate(sets):
        draws = [gaussian(c, d, sep, offset, c * per_class, seed=100 * i + seed,
                          relu=name.startswith("ReLU")) for seed in range(args.seeds)]
        rows.append((name, c, d, sep, draws))
    if not args.tiny:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = digits.data.astype(np.float32)
        rows.append(("digits (pixels)", 10, 64, None,
                     [(pixels[:1200], digits.target[:1200], pixels[1200:])]))
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}; float32 "
          f"detectors (torch backend, CPU), rows scored in float64; bound: {ROUNDING_UNITS:g} "
          "units\n")
    print(f"Over {args.seeds} draws of each Gaussian set (one of the digits): rows, the "
          "largest and median own-row distance, the smallest new-row distance.\n")
    print("| set | C | D | sep | own rows | own: max | own: median | new rows | new: min | "
          "new rows within the bound | subnormal: own, new |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c, d, sep, draws in rows:
        own_units, new_units, tiny = [], [], [0, 0]
        for x, y, new in draws:
            det = grood.GROOD().fit(x, y)
            mine, found, sub = units(det, torch.from_numpy(x).double())
            own = found == torch.arange(x.shape[0])
            own_units.append(mine[own & ~sub])
            tiny[0] += int((own & sub).sum())
            theirs, _, sub = units(det, torch.from_numpy(new).double())
            new_units.append(theirs[~sub])
            tiny[1] += int(sub.sum())
        mine, theirs = torch.cat(own_units), torch.cat(new_units)
        within = int((theirs <= ROUNDING_UNITS).sum())
        print(f"| {name} | {c} | {d} | {'' if sep is None else f'{sep:g}'} | "
              f"{mine.numel():,} | {mine.max():.3g} | {mine.median():.3g} | "
              f"{theirs.numel():,} | {theirs.min():.3g} | {within} | {tiny[0]}, {tiny[1]} |")


if __name__ == "__main__":
    main()
