"""Mahalanobis and RMD where classes lie far apart for their spread, against two-pass float64.

Mahalanobis and RMD stream the within-class covariance's second moments over the training
batches. Taken about one point for every class, the class means' part cancels the
within-class digits where the classes lie far apart for their spread (between / within
variance ``R``): the error grows with ``R``. Taken about a row of each row's own class, as
grood takes them, it does not. The reference is the covariance of each row less its class
mean (two passes), whitened in float64 with the same ``rcond`` (1e-10), and the exact squared
differences of the whitened rows (no Gram form). Each cell: the largest absolute error over
the reference scores' largest size, for the fit and the scores in float64 and in float32.

Data: 10 Gaussian classes in 32 dimensions (centres of spread 10, noise of spread
``10 / sqrt(R)``), 5,000 training rows, 500 rows to score (noise 1.5 times the training's).

    python bench/class_spread.py          # R from 1e2 to 1e14 (seconds)
    python bench/class_spread.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import numpy as np
import torch

import grood
from grood import RMD, Mahalanobis


def whitening(cov: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """The pseudo-inverse's square root of ``cov`` [D, D], keeping eigenvalues above
    ``rcond`` times the largest: [D, r]."""
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > rcond * evals.max()
    return evecs[:, keep] / evals[keep].sqrt()


def reference(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, n_classes: int,
              relative: bool) -> torch.Tensor:
    """Mahalanobis's (``relative``: RMD's) scores of ``q`` from a two-pass float64 fit."""
    means = torch.stack([x[y == c].mean(0) for c in range(n_classes)])
    centred = x - means[y]
    w = whitening(centred.T @ centred / x.shape[0])
    dist = ((q @ w)[:, None] - (means @ w)[None]).square().sum(-1).amin(1)
    if relative:
        mu = x.mean(0)
        background = whitening((x - mu).T @ (x - mu) / x.shape[0])
        dist = dist - ((q - mu) @ background).square().sum(1)
    return -dist


def errors(ratio: float, n: int, seed: int) -> dict[str, float]:
    """Each method's and dtype's largest error over the reference's largest score size."""
    gen = torch.Generator().manual_seed(seed)
    n_classes, dim = 10, 32
    centres = 10 * torch.randn(n_classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=gen)
    noise = 10 / ratio ** 0.5
    x = centres[y] + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    q = centres[torch.arange(n // 10) % n_classes] + 1.5 * noise * torch.randn(
        n // 10, dim, generator=gen, dtype=torch.float64)
    out = {}
    for cls in (Mahalanobis, RMD):
        ref = reference(x, y, q, n_classes, cls is RMD)
        for dtype in (torch.float64, torch.float32):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = cls().fit(x.to(dtype), y).score_samples(q.to(dtype)).double()
            out[f"{cls.__name__} {str(dtype).removeprefix('torch.')}"] = float(
                (got - ref).abs().max() / ref.abs().max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    ratios = [1e2, 1e6, 1e10] if args.tiny else [1e2, 1e4, 1e6, 1e8, 1e10, 1e12, 1e14]
    n = 1000 if args.tiny else 5000
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}; "
          f"{n:,} training rows, C = 10, D = 32\n")
    rows = [(ratio, errors(ratio, n, seed=0)) for ratio in ratios]
    keys = list(rows[0][1])
    print("| between / within variance | " + " | ".join(keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for ratio, err in rows:
        print(f"| {ratio:.0e} | " + " | ".join(f"{err[k]:.1e}" for k in keys) + " |")


if __name__ == "__main__":
    main()
