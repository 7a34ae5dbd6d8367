"""Does a calibrated threshold hold on new data? GROOD on the demo's real digits, per seed.

The demo's setting (``grood demo``): scikit-learn's bundled digits 0-5 as ID (no download), its
small CNN trained per seed, GROOD fitted from the model (``fit_model``, the ``mean`` OOD
prototype). The ID test set is split in two at random: ``calibrate_model`` chooses the
threshold on one half at ``--tpr``; the table gives the fraction of the other half it accepts
(the target is ``tpr``), and the fractions of digits 6-9 (near-OOD) and of uniform noise
images (far-OOD) it flags. Needs scikit-learn (``grood[demo]``):

    python bench/calibration_digits.py --seeds 5      # prints a Markdown table (mean ± std)
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import grood
from grood import GROOD
from grood.demo import DemoConfig, load_digit_sets, train_classifier


def one_seed(seed: int, tpr: float, epochs: int) -> dict[str, float]:
    """Fractions accepted (held-out ID half) and flagged (near, far) for one seed."""
    cfg = DemoConfig(out=Path("."), seed=seed, epochs=epochs, progress=False)
    torch.manual_seed(seed)
    sets = load_digit_sets(cfg)
    x_train, y_train = sets.pop("train")
    net = train_classifier(x_train, y_train, cfg)
    id_name, near, far = list(sets)
    x_id = sets[id_name][0]
    order = torch.randperm(len(x_id), generator=torch.Generator().manual_seed(seed))
    half = len(x_id) // 2
    calibration, held_out = x_id[order[:half]], x_id[order[half:]]
    det = GROOD(progress=False).fit_model(
        net, DataLoader(TensorDataset(x_train, y_train), batch_size=128), features="relu3")
    det.calibrate_model(net, [calibration], tpr=tpr)

    def flagged(x: torch.Tensor) -> float:
        return float((det.score_model(net, [x])[0] < det.threshold_).float().mean())

    return {"calibration rows": half, "ID accepted": 1 - flagged(held_out),
            "near-OOD flagged": flagged(sets[near][0]), "far-OOD flagged": flagged(sets[far][0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0.. (default: 5)")
    parser.add_argument("--tpr", type=float, default=0.95,
                        help="fraction of ID to accept (default: 0.95)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="CNN training epochs (default: 30, the demo's)")
    args = parser.parse_args(argv)
    runs = [one_seed(s, args.tpr, args.epochs) for s in range(args.seeds)]
    print(f"grood {grood.__version__}, torch {torch.__version__}, Python "
          f"{platform.python_version()}, {date.today()}; seeds 0..{args.seeds - 1}; "
          f"threshold chosen at tpr = {args.tpr} on {runs[0]['calibration rows']} held-out ID "
          "images per seed\n")
    keys = ["ID accepted", "near-OOD flagged", "far-OOD flagged"]
    print("| " + " | ".join(["seed", *(f"{k} (%)" for k in keys)]) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for seed, run in enumerate(runs):
        print(f"| {seed} | " + " | ".join(f"{100 * run[k]:.2f}" for k in keys) + " |")
    values = {k: 100 * np.array([run[k] for run in runs]) for k in keys}
    print("| mean ± std | " + " | ".join(f"{v.mean():.2f} ± {v.std():.2f}"
                                         for v in values.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
