"""Does a grid chosen on validation sets hold on the test sets? grood.tune on the demo's digits.

The demo's setting (``grood demo``): scikit-learn's bundled digits 0-5 as ID (no download),
its small CNN trained per seed, penultimate features (``relu3``) and logits. The ID test
split is halved at random into a validation and a test half. The OOD sets are split by kind
the way OpenOOD keeps its validation OOD apart from its test OOD: digits 6 and 7 and one
draw of uniform-noise images are the OOD validation sets; digits 8 and 9 (near-OOD) and the
demo's own noise images (far-OOD) the test sets. Each method's grid is searched by
``grood.tune`` on the validation sets (mean AUROC of the two); the table gives the test
AUROCs at the method's default parameters (as the demo runs it) and at the chosen ones,
mean ± std over seeds, and the parameters chosen per seed. Needs scikit-learn
(``grood[demo]``):

    python bench/tuning_digits.py --seeds 5      # prints Markdown tables
    python bench/tuning_digits.py --seeds 5 --plot tuning.png   # and seed 0's searches
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import grood
from grood import ASH, DICE, GEN, GROOD, KNN, ODIN, SCALE, NNGuide, ReAct, tune
from grood.demo import DemoConfig, load_digit_sets, train_classifier
from grood.extract import FeatureExtractor
from grood.tuning import plot_searches

#: Each method: its default estimator (as the demo runs it) and its grid (OpenOOD v1.5's
#: sweeps where it has one, scaled to 750 training images of 128 features and 6 classes).
METHODS: dict[str, tuple[Any, dict[str, list[Any]]]] = {
    "GROOD (mean)": (GROOD(), {"k": [1, 2, 3, 5, 10, 20]}),
    "KNN": (KNN(k=10), {"k": [1, 5, 10, 20, 50, 100, 200, 500]}),
    "NNGuide": (NNGuide(k=10, bank_fraction=1.0), {"k": [1, 5, 10, 20, 50, 100, 200, 500]}),
    "ReAct": (ReAct(), {"percentile": [85, 90, 95, 99]}),
    "ASH-S": (ASH(percentile=65), {"percentile": [10, 30, 50, 65, 75, 85, 90, 95]}),
    "SCALE": (SCALE(), {"percentile": [10, 30, 50, 65, 75, 85, 90, 95]}),
    "DICE": (DICE(), {"percentile": [0, 10, 30, 50, 70, 90]}),
    "GEN": (GEN(), {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0], "M": [2, 4, 6]}),
    "ODIN": (ODIN(progress=False), {"temperature": [1.0, 10.0, 100.0, 1000.0],
                                    "noise": [0.0, 0.0014, 0.0028, 0.005, 0.01]}),
}


def one_seed(seed: int, epochs: int, searches: list[Any] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Each method's test AUROCs at its defaults and at the parameters tuned on the
    validation sets, for one seed; each search (:class:`grood.Tuning`) appended to
    ``searches`` where given."""
    cfg = DemoConfig(out=Path("."), seed=seed, epochs=epochs, progress=False)
    torch.manual_seed(seed)
    sets = load_digit_sets(cfg)
    x_train, y_train = sets.pop("train")
    net = train_classifier(x_train, y_train, cfg)
    (x_id, _), (x_near, _), (x_noise, _) = sets.values()
    digits = torch.tensor(load_digits().target)
    near_labels = digits[digits >= 6]  # load_digit_sets keeps digits 6-9 in the data's order
    gen = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(len(x_id), generator=gen)
    half = len(x_id) // 2
    images = {
        "id_val": x_id[order[:half]], "id_test": x_id[order[half:]],
        "digits 6-7": x_near[near_labels <= 7], "noise (val)": torch.rand(
            (cfg.n_noise, 1, 8, 8), generator=gen),
        "digits 8-9": x_near[near_labels >= 8], "noise (test)": x_noise,
    }
    loaders = {name: DataLoader(TensorDataset(x), batch_size=128) for name, x in images.items()}
    extractor = FeatureExtractor(net, features="relu3", progress=False)
    train_f, train_l, _ = extractor.extract(DataLoader(TensorDataset(x_train), batch_size=128))
    arrays = {}
    for name, loader in loaders.items():
        f, lg, _ = extractor.extract(loader)
        arrays[name] = {"features": f, "logits": lg}
    train = {"features": train_f, "labels": y_train, "logits": train_l}
    head = {"weight": net.head.weight.detach(), "bias": net.head.bias.detach()}
    val_ood, test_ood = ("digits 6-7", "noise (val)"), ("digits 8-9", "noise (test)")
    out = {}
    for method, (default, grid) in METHODS.items():
        by_model = isinstance(default, ODIN)
        data: Any = loaders if by_model else arrays
        kwargs: dict[str, Any] = {"model": net} if by_model else {"train": train}
        if "head" in getattr(default, "fit_reads", ()):  # a last-layer baseline
            kwargs["fit_params"] = head
        found = tune(default, grid, id_val=data["id_val"],
                     ood_val={n: data[n] for n in val_ood}, progress=False, **kwargs)
        if searches is not None:
            searches.append(found)
        # each on the test sets: a search of one point, fitted with the parameters as given
        default_run, tuned_run = (
            tune(est, {}, id_val=data["id_test"], ood_val={n: data[n] for n in test_ood},
                 progress=False, **kwargs) for est in (default, found.best_estimator))
        out[method] = {
            "default": [default_run.results[0][n]["auroc"] for n in test_ood],  # the demo's
            "tuned": [tuned_run.results[0][n]["auroc"] for n in test_ood],
            "chosen": found.best_params,
            "val": found.best_score,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0.. (default: 5)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="CNN training epochs (default: 30, the demo's)")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="also draw every method's search on seed 0, a panel each, to "
                             "FILE (PNG; needs matplotlib)")
    args = parser.parse_args(argv)
    searches: list[Any] = []
    runs = [one_seed(s, args.epochs, searches if s == 0 else None)
            for s in range(args.seeds)]
    if args.plot is not None:
        print(f"wrote {plot_searches(searches, args.plot)}\n")
    print(f"grood {grood.__version__}, torch {torch.__version__}, Python "
          f"{platform.python_version()}, CPU, {date.today()}; seeds 0..{args.seeds - 1}; "
          "test AUROC (%), mean ± std over seeds\n")
    print("| method | near, default | near, tuned | far, default | far, tuned | "
          "chosen (count of seeds) |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        cells = []
        for i in range(2):
            for which in ("default", "tuned"):
                v = 100 * np.array([run[method][which][i] for run in runs])
                cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
        chosen = Counter(", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in run[method]["chosen"].items()) for run in runs)
        print(f"| {method} | " + " | ".join(cells) + " | "
              + "; ".join(f"{c} ({n})" for c, n in chosen.most_common()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
