"""export_onnx's check against ONNX Runtime: how far the file's scores lie from the module's.

A float32 graph (``PortableHead``) scores a row with float32's rounding at that row's
distance: the softmax of distances thousands of units long carries about 1e-7 of the
distance into ``q_ood``. The check allows each row its own rounding
(``grood.portable.float32_margins``: ``ROUNDING_UNITS`` = 8 float32 epsilons of
``q_ood (1 + d_ood + |lse|)`` in the gradient, plus the row's own rounding and the float32
search's). This script exports detectors (float32 and float64 fits of clustered features) and
scores rows 1 to 63,000 units from the training features in ONNX Runtime, against the head
itself (``checks="flag"``). Each cell: the largest score difference in units of one such
epsilon (``2 sqrt(|s|) r + r^2`` with ``r`` one epsilon of ``q_ood (1 + d_ood + |lse|)``),
over rows from the given distance out; and the largest relative to the largest score, the
flat measure the check used alone before (1e-4).

    python bench/export_margins.py          # C = 3 to 1,000, D = 2 to 256 (a minute)
    python bench/export_margins.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import grood
from grood import GROOD, export_onnx
from grood._gradients import ROUNDING_UNITS, rounding_distance
from grood.functional import ncp_gradient

SHAPES = [(300, 5, 16), (600, 50, 64), (2000, 200, 256), (400, 3, 2), (3000, 1000, 32)]
FROM = (0.0, 100.0, 3000.0)  # rows from these distances out


def clustered(n: int, c: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative clustered features (a ReLU layer's), float64, with labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.rand(c, d, generator=gen, dtype=torch.float64)
    y = torch.arange(n) % c
    x = (centres[y] + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)).clamp_min(0)
    return x, y


def measure(n: int, c: int, d: int, dtype: torch.dtype, float64: bool, rows: int,
            seed: int, folder: Path) -> list[tuple[float, float]]:
    """Per distance in ``FROM``: (largest difference in epsilon units, largest relative to
    the largest score) between ONNX Runtime's scores and the head's."""
    import onnxruntime

    x, y = clustered(n, c, d, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = GROOD(k=1 + seed % 3, progress=False).fit(x.to(dtype), y)
    gen = torch.Generator().manual_seed(seed)
    dist = 10 ** torch.linspace(0, 4.8, rows, dtype=torch.float64)
    dirs = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    example = (x[torch.randint(0, n, (rows,), generator=gen)]
               + dirs / dirs.norm(dim=1, keepdim=True) * dist[:, None]).float()
    path = folder / "margins.onnx"
    export_onnx(det, example, path, check=False, float64=float64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": example.numpy()})[0]).double()
    want = det.as_module(checks="flag")(example)[0].double()
    res = ncp_gradient(example.double(), det.class_prototypes_.double(),
                       det.ood_prototype_.double())
    r = rounding_distance(res, torch.float32).sqrt() / ROUNDING_UNITS  # one epsilon
    units = (got - want).abs() / (2 * want.abs().sqrt() * r + r * r)
    relative = (got - want).abs() / float(want.nan_to_num().abs().max())
    ok = ~got.isnan() & ~want.isnan()
    return [(float(units[ok & (dist >= lo)].max()), float(relative[ok & (dist >= lo)].max()))
            for lo in FROM]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    shapes = [(200, 4, 8)] if args.tiny else SHAPES
    rows = 60 if args.tiny else 300
    import onnxruntime

    print(f"grood {grood.__version__}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, numpy {np.__version__}, Python "
          f"{sys.version.split()[0]}, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}; {rows} rows 1 to 63,000 units out per detector\n")
    head = " | ".join(f"from {lo:g}: units, relative" for lo in FROM)
    print(f"| N, C, D | fit | softmax | {head} |")
    print("|---|---|---|" + "---:|" * len(FROM))
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (n, c, d) in enumerate(shapes):
            for dtype in (torch.float32, torch.float64):
                for float64 in (True, False):
                    cells = measure(n, c, d, dtype, float64, rows, seed, Path(tmp))
                    name = str(dtype).removeprefix("torch.")
                    print(f"| {n:,}, {c:,}, {d} | {name} | "
                          f"{'float64' if float64 else 'float32'} | "
                          + " | ".join(f"{u:.2f}, {rel:.1e}" for u, rel in cells) + " |")


if __name__ == "__main__":
    main()
