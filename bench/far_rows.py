"""Rows far from the prototypes: what each dtype's softmax of distances resolves.

GROOD's softmax is over negative distances ``-||h - p_j||``, which is not scale-invariant: far
out, the distances' differences stay bounded by the prototypes' spread while their rounding
grows with the distance. Two tables:

1. One row ``t * (1, ..., 1) / sqrt(D)`` at a growing distance ``t``, given as float32 and as
   float64 features to a detector fitted on three classes: ``q_ood`` and the class it returns
   (or its refusal), against a softmax computed from the same values in 60-digit arithmetic
   (mpmath). The detector redoes float32 rows past ``2**16`` in float64 and refuses rows past
   ``2**44`` in either dtype.
2. The relative error of float32 ``q_ood`` against float64, for rows in random directions at
   a distance ``t`` from the OOD prototype, on 10, 100 and 1,000 classes (the torch backend,
   before the detector's redo): about 1e-7 times the distance.

    python bench/far_rows.py           # both tables (seconds on a CPU)
    python bench/far_rows.py --tiny    # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import mpmath
import torch

import grood
from grood import functional
from grood._bench.common import exact_softmax


def detector_table(distances: list[float]) -> list[str]:
    """Table 1's rows: the detector's answer for one far row in each dtype, and the exact
    one."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=gen) + 4 * torch.nn.functional.one_hot(y, 8)
    det = grood.GROOD(progress=False).fit(x, y)
    protos, p_ood = det.class_prototypes_, det.ood_prototype_
    lines = ["| t | exact q_ood | exact class | float64 row: q_ood, class | "
             "float32 row: q_ood, class |", "|---|---|---|---|---|"]
    for t in distances:
        row = torch.full((1, 8), t / 8**0.5, dtype=torch.float64)
        want_q, want_c, _ = exact_softmax(row[0], protos, p_ood)
        cells = []
        for dtype in (torch.float64, torch.float32):
            h = row.to(dtype)
            if not bool(torch.isfinite(h).all()):
                cells.append(f"not finite in {str(dtype).removeprefix('torch.')}")
                continue
            try:
                res = det._grads.resolved(h, 0)
                cells.append(f"{float(res.q_ood[0]):.6f}, {int(res.pred[0])}")
            except ValueError as exc:
                cells.append("refused" if "even in float64" in str(exc) else f"error: {exc}")
        lines.append(f"| {t:.0e} | {want_q:.6f} | {want_c} | {cells[0]} | {cells[1]} |")
    return lines


def accuracy_table(distances: list[float], shapes: list[tuple[int, int]], rows: int
                   ) -> list[str]:
    """Table 2's rows: max relative error of float32 q_ood against float64 per distance and
    shape, and how many predictions differ."""
    lines = ["| t | " + " | ".join(f"C = {c:,}, D = {d}" for c, d in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    cells: dict[float, list[str]] = {t: [] for t in distances}
    for c, d in shapes:
        gen = torch.Generator().manual_seed(c)
        protos = torch.randn(c, d, generator=gen) * 4
        p_ood = protos.mean(0)
        dirs = torch.randn(rows, d, generator=gen)
        dirs /= dirs.norm(dim=1, keepdim=True)
        for t in distances:
            h = p_ood + t * dirs
            got = functional.ncp_gradient(h, protos, p_ood)
            want = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
            rel = ((got.q_ood.double() - want.q_ood) / want.q_ood).abs().max()
            moved = int((got.pred != want.pred).sum())
            moved_note = f" ({moved} of {rows} classes differ)" if moved else ""
            cells[t].append(f"{float(rel):.1e}{moved_note}")
    lines += [f"| {t:.0e} | " + " | ".join(cells[t]) + " |" for t in distances]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: fewer rows")
    args = parser.parse_args()
    if args.tiny:
        far = [1e5, 1e13, 1e20]
        near, shapes, rows = [1e3, 6e4], [(10, 16)], 16
    else:
        far = [1e5, 1e10, 1e13, 1e15, 1e20, 1e30, 1e39]
        near, shapes, rows = [1e2, 1e3, 1e4, 3e4, 6e4], [(10, 64), (100, 64), (1000, 256)], 64
    print(f"grood {grood.__version__}, torch {torch.__version__}, mpmath {mpmath.__version__}, "
          f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}\n")
    print("One row far along the diagonal (3 classes, D = 8), as the detector scores it, "
          "against a softmax in 60-digit arithmetic:\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fit's own notes on these classes)
        print("\n".join(detector_table(far)))
    print(f"\nfloat32 q_ood against float64, max relative error over {rows} rows in random "
          "directions at distance t from the OOD prototype (torch backend, before the "
          "detector's float64 redo past 2**16):\n")
    print("\n".join(accuracy_table(near, shapes, rows)))


if __name__ == "__main__":
    main()
