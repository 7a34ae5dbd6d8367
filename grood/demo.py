"""``grood demo``: GROOD (three OOD prototype sources) and nineteen baselines on real digits.

The data is scikit-learn's bundled copy of the UCI optical digits (1,797 images of 8x8 pixels;
no download). A small CNN is trained on digits 0-5 (the in-distribution classes) from a
stratified training split; the held-out test split of digits 0-5 is the ID test set. Digits
6-9 are near-OOD (same kind of image, unseen classes) and uniform-noise images are far-OOD.
GROOD is fitted from the model itself (``fit_model``) with each OOD prototype source — the
paper's ``mixup`` synthetic samples, blurred-noise images (``noise``) and the mean of the class
prototypes (``mean``); the baselines use the same model's penultimate features and logits,
and ODIN and RankFeat the model and its images.
GROOD (mean) minus each baseline is given with its paired bootstrap interval, per OOD set and
over both.
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from grood import (
    ASH,
    DICE,
    FDBD,
    GEN,
    GROOD,
    KLM,
    KNN,
    MSP,
    ODIN,
    RMD,
    SCALE,
    SHE,
    Energy,
    GradNorm,
    Mahalanobis,
    MaxLogit,
    Mixup,
    NNGuide,
    RankFeat,
    ReAct,
    UniformNoise,
    ViM,
    ood_metrics,
)
from grood._checks import check_new_folder
from grood._progress import progress
from grood.environment import environment
from grood.errors import require
from grood.extract import FeatureExtractor
from grood.metrics import mean_of_sets, paired_difference, resampled_methods
from grood.model_baselines import scores_inputs
from grood.persistence import written_atomically
from grood.prototypes import OODPrototypeSource
from grood.report import (
    METRIC_LABELS,
    markdown_table,
    plot_differences,
    plot_histograms,
    plot_neighbours,
    plot_roc,
)

ID_CLASSES = (0, 1, 2, 3, 4, 5)
#: The GROOD the baselines are compared with, paired, and the bootstrap resamples of that.
COMPARED = "GROOD (mean)"
RESAMPLES = 1000


@dataclass
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        out (Path): folder for the plots and result files.
        seed (int): seed for the split, the noise images and training.
        epochs (int): training epochs of the CNN.
        train_fraction (float): fraction of each ID class used for training.
        n_noise (int): number of far-OOD noise images (the test set).
        n_noise_prototype (int): blurred noise images generated for GROOD's ``noise`` OOD
            prototype (separate from the far-OOD test images).
        knn_k (int): neighbour used by the KNN baseline (scaled down from Sun et al.'s 50 for
            a training set of ~750 images), and how many neighbours NNGuide averages.
        progress (bool | None): show progress bars (None: only on a terminal).
    """

    out: Path = Path("grood-demo")
    seed: int = 0
    epochs: int = 30
    train_fraction: float = 0.7
    n_noise: int = 500
    n_noise_prototype: int = 1000
    knn_k: int = 10
    progress: bool | None = None


class DigitsNet(nn.Sequential):
    """A small CNN for 8x8 digits. Its named children run in order, so grood can split it for
    the mixup OOD prototype; ``relu3`` is the 128-d post-ReLU penultimate layer."""

    def __init__(self, n_classes: int) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 4 * 4, 128)), ("relu3", nn.ReLU()),
            ("head", nn.Linear(128, n_classes)),
        ]))


def load_digit_sets(cfg: DemoConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Images [N, 1, 8, 8] in [0, 1] and labels for train / ID test / near-OOD / far-OOD."""
    datasets = require("sklearn.datasets", extra="demo",
                       purpose="the demo's data (scikit-learn's bundled digits)")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_parts: list[Tensor] = []
    test_parts: list[Tensor] = []
    for c in ID_CLASSES:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        cut = round(cfg.train_fraction * idx.numel())
        train_parts.append(idx[:cut])
        test_parts.append(idx[cut:])
    train_idx, test_idx = torch.cat(train_parts), torch.cat(test_parts)
    near = ~torch.isin(labels, torch.tensor(ID_CLASSES))
    noise = torch.rand((cfg.n_noise, 1, 8, 8), generator=gen)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "digits 0-5 (ID test)": (images[test_idx], labels[test_idx]),
        "digits 6-9 (near-OOD)": (images[near], torch.full((int(near.sum()),), -1)),
        "noise (far-OOD)": (noise, torch.full((cfg.n_noise,), -1)),
    }


def train_classifier(x: Tensor, y: Tensor, cfg: DemoConfig) -> DigitsNet:
    """Train :class:`DigitsNet` with Adam and cross-entropy, deterministically. The network's
    initial weights come from torch's global generator, seeded with ``cfg.seed`` and given
    back to the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = DigitsNet(len(ID_CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net.train()
    bar = progress(range(cfg.epochs), desc="grood demo: training the CNN", unit="epochs",
                   enabled=cfg.progress)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    return net


def _features_and_logits(extractor: FeatureExtractor, loader: DataLoader
                         ) -> tuple[Tensor, Tensor]:
    """A loader's penultimate features and logits (the demo's network returns both)."""
    feats, logits, _ = extractor.extract(loader)
    if logits is None:
        raise ValueError("the demo's network gave no logits")
    return feats, logits


def run_demo(cfg: DemoConfig) -> dict:
    """Train, fit every detector, evaluate, write plots; returns the results as a dict. Torch's
    global generator is seeded with ``cfg.seed`` for the run and given back to the caller's
    state afterwards."""
    with torch.random.fork_rng(devices=[]):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict:
    start = time.perf_counter()
    check_new_folder(cfg.out, "the demo's output folder")  # before minutes of training
    # Both optional dependencies are checked before minutes of training, not after.
    require("sklearn.datasets", extra="demo", purpose="the demo's data (scikit-learn's digits)")
    require("matplotlib", extra="demo", purpose="the demo's ROC and histogram plots")
    torch.manual_seed(cfg.seed)
    log = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress is not False else (
        lambda msg: None)
    sets = load_digit_sets(cfg)
    x_train, y_train = sets.pop("train")
    log(f"grood demo: {x_train.shape[0]} training images of digits 0-5; "
        + ", ".join(f"{len(v[0])} {k}" for k, v in sets.items()))
    net = train_classifier(x_train, y_train, cfg)
    id_name, *ood_names = list(sets)
    y_test = sets[id_name][1]
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128)
    loaders = {name: DataLoader(TensorDataset(x), batch_size=128) for name, (x, _) in
               sets.items()}

    # GROOD from the model itself, with each OOD prototype source.
    sources: dict[str, str | OODPrototypeSource] = {"mixup": Mixup(layer="pool", lam=0.5),
               "noise": UniformNoise(n_samples=cfg.n_noise_prototype, seed=cfg.seed),
               "mean": "mean"}
    scores: dict[str, dict[str, np.ndarray]] = {}
    accuracy: dict[str, float] = {}
    train_accuracy = 0.0
    for name, source in sources.items():
        det = GROOD(ood_prototype=source, progress=cfg.progress).fit_model(
            net, train_loader, features="relu3", cache="host")  # (the net runs over it once)
        method = f"GROOD ({name})"
        scores[method] = {}
        for set_name, loader in loaders.items():
            s, pred = det.score_model(net, loader)
            scores[method][set_name] = s.numpy()
            if set_name == id_name:
                accuracy[method] = float((pred == y_test).float().mean())
        train_accuracy = det.train_accuracy_
    explained = det  # the last source's (mean) detector, whose neighbours are drawn

    # Baselines on the same penultimate features and logits.
    extractor = FeatureExtractor(net, features="relu3", progress=False)
    f_train, l_train = _features_and_logits(extractor, train_loader)
    feats = {name: _features_and_logits(extractor, loader) for name, loader in loaders.items()}
    fc = cast(nn.Linear, net.head)  # ViM's and ReAct's last layer
    fitted = [MSP().fit(l_train), MaxLogit().fit(l_train), Energy().fit(l_train),
              GEN().fit(l_train), KNN(k=cfg.knn_k).fit(f_train),
              Mahalanobis().fit(f_train, y_train), RMD().fit(f_train, y_train),
              ViM().fit(f_train, weight=fc.weight, bias=fc.bias),
              ReAct().fit(f_train, weight=fc.weight, bias=fc.bias),
              GradNorm().fit(f_train, weight=fc.weight, bias=fc.bias),
              # at its code's default percentile: the paper's 90 (ImageNet, D = 2048) leaves
              # 13 of this layer's 128 entries (AUROC 60 / 71 on seed 0)
              ASH(percentile=65).fit(f_train, weight=fc.weight, bias=fc.bias),
              KLM().fit(l_train), SHE().fit(f_train, y_train, weight=fc.weight, bias=fc.bias),
              DICE().fit(f_train, weight=fc.weight, bias=fc.bias),
              FDBD().fit(f_train, weight=fc.weight, bias=fc.bias),
              SCALE().fit(f_train, weight=fc.weight, bias=fc.bias),
              # k as KNN's, over every training image (OpenOOD's 1 % of them would be 8)
              NNGuide(k=cfg.knn_k, bank_fraction=1.0).fit(f_train, weight=fc.weight,
                                                          bias=fc.bias)]
    # Nothing to fit: they run the network on the images (RankFeat on the last feature map,
    # 64 channels by 4 x 4 positions, as the paper's single block).
    methods: list[Any] = [*fitted, ODIN(progress=cfg.progress),
                          RankFeat(layers="pool", progress=cfg.progress)]
    baselines = {b.display_name: b for b in methods}
    classifier_acc = float((feats[id_name][1].argmax(1) == y_test).float().mean())
    for method, baseline in baselines.items():
        if scores_inputs(baseline):  # its own prediction: of the moved images or changed map
            per_set = {name: baseline.score_model(net, loader)
                       for name, loader in loaders.items()}
            scores[method] = {name: s.numpy() for name, (s, _) in per_set.items()}
            accuracy[method] = float((per_set[id_name][1] == y_test).float().mean())
            continue
        use_logits = baseline.inputs == "logits"
        scores[method] = {name: np.asarray(baseline.score_samples(f[1] if use_logits else f[0]))
                          for name, f in feats.items()}
        # each method's own prediction: the classifier's argmax but for ReAct's, ASH's,
        # DICE's and SCALE's (of the clipped, shaped or scaled features, or sparse weights)
        accuracy[method] = (float((baseline.score_and_predict(feats[id_name][0])[1] == y_test)
                                  .float().mean())
                            if isinstance(baseline, (ReAct, ASH, DICE, SCALE))
                            else classifier_acc)

    results = {m: {ood: ood_metrics(s[id_name], s[ood]) for ood in ood_names}
               for m, s in scores.items()}
    keys = list(METRIC_LABELS)
    header = ["method", "ID acc"] + [f"{_short(ood)} {METRIC_LABELS[k]}"
                                     for ood in ood_names for k in keys]
    rows = [[m, accuracy[m]] + [results[m][ood][k] for ood in ood_names for k in keys]
            for m in results]
    table = markdown_table(header, rows)

    differences = paired_differences(scores, results, list(baselines), id_name, ood_names)

    cfg.out.mkdir(parents=True, exist_ok=True)
    plots = [plot_roc(scores, id_name, ood_names, cfg.out / "roc.png"),
             plot_histograms(scores, cfg.out / "score_histograms.png"),
             plot_differences(differences, cfg.out / "differences.png", method=COMPARED),
             plot_neighbours(extremes(explained, {n: (sets[n][0], feats[n][0]) for n in sets},
                                      scores["GROOD (mean)"]),
                             x_train[:, 0].numpy(), cfg.out / "neighbours.png",
                             y_train.numpy())]
    summary = {
        "config": {"seed": cfg.seed, "epochs": cfg.epochs, "train_fraction": cfg.train_fraction,
                   "n_noise": cfg.n_noise, "n_noise_prototype": cfg.n_noise_prototype,
                   "knn_k": cfg.knn_k},
        "sizes": {"train": int(x_train.shape[0]), **{k: len(v[0]) for k, v in sets.items()}},
        "classifier_accuracy": classifier_acc,
        "id_accuracy": accuracy,
        "metrics": results,
        # (difference, low, high) of each metric, the interval paired over RESAMPLES
        f"{COMPARED} minus": {label: {b: {k: list(v) for k, v in by_metric.items()}
                                      for b, by_metric in per_base.items()}
                              for label, per_base in differences.items()},
        "grood_train_accuracy": train_accuracy,
        "seconds": time.perf_counter() - start,
        # What the figures were taken with: versions, devices, and the day.
        "environment": environment(),
        "date": date.today().isoformat(),
    }
    for name, text in (("results.json", json.dumps(summary, indent=2)),
                       ("results.md", table + "\n")):
        with written_atomically(cfg.out / name) as tmp:
            tmp.write_text(text)
    summary["table"] = table
    summary["plots"] = [str(p) for p in plots]
    return summary


def paired_differences(scores: dict[str, dict[str, np.ndarray]],
                       results: dict[str, dict[str, dict[str, float]]], baselines: list[str],
                       id_name: str, ood_names: list[str]
                       ) -> dict[str, dict[str, dict[str, tuple[float, float, float]]]]:
    """:data:`COMPARED` minus each baseline on each OOD set and on their mean, by metric
    ``(difference, low, high)`` with the paired 95 % bootstrap interval (:data:`RESAMPLES`,
    seed 0; the ID set drawn once per resample for both sets), as
    :func:`grood.report.plot_differences` draws them."""
    labels = [_short(o) for o in ood_names] + [f"mean of {len(ood_names)} sets"]
    every = resampled_methods({method: (scores[method][id_name],
                                        [scores[method][o] for o in ood_names])
                               for method in (COMPARED, *baselines)}, n_boot=RESAMPLES)
    resampled = {method: [*per, mean_of_sets(per)] for method, per in every.items()}
    point = {method: [results[method][o] for o in ood_names] for method in resampled}
    for per_set in point.values():
        per_set.append(mean_of_sets(per_set))
    return {label: {base: paired_difference(point[COMPARED][i], point[base][i],
                                            resampled[COMPARED][i], resampled[base][i])
                    for base in baselines}
            for i, label in enumerate(labels)}


def extremes(det: GROOD, sets: dict[str, tuple[Tensor, Tensor]],
             scores: dict[str, np.ndarray], n_neighbours: int = 3) -> list[dict]:
    """For each set (images [N, 1, H, W], features [N, D]; ``scores``: ``det``'s scores of
    it): its highest- and lowest-scoring sample with its nearest training rows in gradient
    space (``det.kneighbors`` of those two samples), as
    :func:`grood.report.plot_neighbours` draws them."""
    out = []
    for name, (images, features) in sets.items():
        kind = name.split("(")[-1].rstrip(")") if "(" in name else name  # "near-OOD"
        picked = [int(scores[name].argmax()), int(scores[name].argmin())]
        dists, rows = det.kneighbors(features[picked], n_neighbours)
        for j, (which, i) in enumerate(zip(("highest", "lowest"), picked, strict=True)):
            out.append({"image": images[i, 0].numpy(), "title": f"{kind}: {which} score",
                        "score": float(scores[name][i]), "rows": rows[j].numpy(),
                        "distances": dists[j].numpy()})
    return out


def _short(name: str) -> str:
    """``"digits 6-9 (near-OOD)"`` -> ``"near"``; ``"noise (far-OOD)"`` -> ``"far"``."""
    return name.split("(")[-1].split("-")[0] if "(" in name else name


def run_seeds(cfg: DemoConfig, n_seeds: int) -> str:
    """Run the demo for seeds ``cfg.seed .. cfg.seed + n_seeds - 1`` (each into
    ``cfg.out / f"seed{s}"``) and return a Markdown table of mean ± std AUROC and FPR@95."""
    from dataclasses import replace

    runs = [run_demo(replace(cfg, seed=s, out=cfg.out / f"seed{s}"))
            for s in range(cfg.seed, cfg.seed + n_seeds)]
    methods = list(runs[0]["metrics"])
    sets = list(runs[0]["metrics"][methods[0]])
    header = ["method"] + [f"{_short(o)} {METRIC_LABELS[k]}" for o in sets
                           for k in ("auroc", "fpr95")]
    rows = []
    for m in methods:
        row = [m]
        for o in sets:
            for k in ("auroc", "fpr95"):
                values = 100 * np.array([r["metrics"][m][o][k] for r in runs])
                row.append(f"{values.mean():.2f} ± {values.std():.2f}")
        rows.append(row)
    return markdown_table(header, rows)
