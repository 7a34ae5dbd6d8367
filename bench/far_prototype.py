"""An OOD prototype far outside the training features: what the fit finds, and the scores.

Four classes of features (D = 16) whose RMS spread is a small fraction of their distance from
an OOD prototype given as features (``ood_prototype="features"``): every gradient then points
nearly the same way. For each distance/spread ratio the table gives what the fit's check saw
(indexed gradients searched for as themselves and missed, of 64, with the index as built and
held less the gradients' mean), whether it kept the index so, the gradients' spread about
their mean relative to their norm, the warning it gave, and the float32 scores' largest
error against float64's on the same float32-rounded inputs, as a share of float64's score
spread: as fitted, with the index searched uncentred, and with a float64 search of the same
float32 query and indexed gradients (what float32 gradients allow at best).

    python bench/far_prototype.py          # the table (seconds on a CPU)
    python bench/far_prototype.py --tiny   # two ratios
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import numpy as np
import torch

import grood
from grood import GROOD, functional
from grood._bench.common import far_prototype_data
from grood._fit import missed_as_themselves, missed_less


def row(ratio: float) -> str:
    """One table row."""
    x, y, ood, test = far_prototype_data(ratio)
    x64 = x.astype(np.float64)
    spread = np.sqrt(((x64 - x64.mean(0)) ** 2).sum(1).mean())
    distance = float(np.linalg.norm(x64.mean(0) - ood[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    said = ", ".join("spread" if "spread about" in str(w.message) else "search"
                     if "as themselves" in str(w.message) else str(w.message)[:40]
                     for w in caught) or "-"
    wide = GROOD(ood_prototype="features").fit(x64, y, ood_features=ood.astype(np.float64))
    want = wide.score_samples(test.astype(np.float64))
    span = np.ptp(want)
    index = det.index_
    ids = torch.linspace(0, index.ntotal - 1, 64).round().long().unique()
    centred = index.centre is not None
    fitted = np.abs(det.score_samples(test) - want).max() / span
    # The gradients as queries would be (held plus any centre), in float32 and float64.
    held = index.vectors + (index.centre if centred else 0.0)
    rows = held.double()
    rel = float((rows - rows.mean(0)).square().sum(1).mean().sqrt()
                / rows.square().sum(1).mean().sqrt())
    grads = functional.ncp_gradient(torch.as_tensor(test), det.class_prototypes_,
                                    det.ood_prototype_).grad
    best, _ = functional.knn(grads.double(), held.double(), 1)
    at_best = np.abs(-best[:, 0].numpy() - want).max() / span
    index.drop_centre()  # (each row within a rounding of the fit's)
    missed = missed_as_themselves(index, ids)
    less_mean = missed_less(index, ids, index.vectors_mean())
    uncentred = np.abs(det.score_samples(test) - want).max() / span
    kept = f"{'yes' if centred else 'no'} ({less_mean})"
    return (f"| {distance / spread:,.0f} | {missed} | {kept} | {rel:.2g} | {uncentred:.2g} | "
            f"{fitted:.2g} | {at_best:.2g} | {said} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="two ratios (a smoke run)")
    args = parser.parse_args()
    ratios = [1e2, 1e4] if args.tiny else [1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6]
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}\n")
    print("| distance / spread | missed of 64 as built | held less the mean (missed so) | "
          "gradients' spread / norm | error uncentred | error as fitted | error, float64 "
          "search | fit's warning (spread: the gradients'; search: unresolved) |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in ratios:
        print(row(ratio), flush=True)


if __name__ == "__main__":
    main()
