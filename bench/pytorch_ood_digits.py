"""GROOD beside pytorch-ood's own detectors on real data, through pytorch-ood's own tools.

ID: scikit-learn's bundled digits 0-5 (no download); OOD: digits 6-9. A small MLP is trained
per seed; every detector is evaluated by ``pytorch_ood.benchmark.Benchmark.evaluate`` (metrics:
``pytorch_ood.metrics.OODMetrics``). Needs pytorch-ood (and so torchvision) and scikit-learn:

    python bench/pytorch_ood_digits.py --seeds 3      # prints a Markdown table (mean ± std)
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date

import torch
from pytorch_ood.benchmark import Benchmark
from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis, MaxSoftmax, ViM
from sklearn import datasets as sklearn_datasets
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grood.integrations.pytorch_ood import GROODDetector


def digits(seed: int = 0) -> dict:
    """ID: digits 0-5 (train / test), OOD: digits 6-9 (label -1); a small trained MLP."""
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    known = y < 6
    x_id, y_id = x[known], y[known]
    cut = int(0.7 * len(y_id))
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    head = nn.Linear(32, 6)
    model = nn.Sequential(encoder, head)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x_id[:cut]), y_id[:cut])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"train": (x_id[:cut], y_id[:cut]), "test": (x_id[cut:], y_id[cut:]),
            "ood": (x[~known], torch.full((int((~known).sum()),), -1)),
            "encoder": encoder, "head": head, "model": model}


class DigitsBenchmark(Benchmark):
    """ID digits 0-5, OOD digits 6-9, as a pytorch-ood Benchmark."""

    ood_names = ("digits 6-9",)

    def __init__(self, data):
        self.data = data

    def train_set(self):
        return TensorDataset(*self.data["train"])

    def test_sets(self, known=True, unknown=True):
        parts = ([self.data["test"]] if known else []) + ([self.data["ood"]] if unknown else [])
        if not parts:
            raise ValueError("known or unknown")
        return [TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))]


def detectors(data, train: DataLoader) -> dict:
    """Every detector of the comparison, fitted where it needs fitting."""
    enc, head = data["encoder"], data["head"]
    return {
        "GROOD (k=1)": GROODDetector(enc, head=head).fit(train),
        "MaxSoftmax": MaxSoftmax(data["model"]),
        "EnergyBased": EnergyBased(data["model"]),
        "Mahalanobis": Mahalanobis(enc).fit(train),
        "KNN (k=50)": KNN(enc, k=50).fit(train),
        "ViM (d=16)": ViM(enc, d=16, w=head.weight.detach(), b=head.bias.detach()).fit(train),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    import pytorch_ood

    rows: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        data = digits(seed)
        bench = DigitsBenchmark(data)
        train = DataLoader(bench.train_set(), batch_size=64)
        dets = detectors(data, train)
        with torch.no_grad():
            results = bench.evaluate(list(dets.values()), loader_kwargs={"batch_size": 256})
        for name, result in zip(dets, results, strict=True):
            for metric in ("AUROC", "FPR95TPR"):
                rows.setdefault(name, {}).setdefault(metric, []).append(100 * result[metric])
    print(f"grood | pytorch-ood {pytorch_ood.__version__} | torch {torch.__version__} | "
          f"python {platform.python_version()} | {date.today().isoformat()} | seeds "
          f"0..{args.seeds - 1}\n")
    print("| detector | AUROC (%) | FPR@95TPR (%) |\n|---|---|---|")
    for name, metrics in sorted(rows.items(), key=lambda kv: -statistics.mean(kv[1]["AUROC"])):
        cells = [f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}"
                 for v in (metrics["AUROC"], metrics["FPR95TPR"])]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
