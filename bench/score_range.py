"""Where GROOD's scores leave a dtype's range: float32 scores of tight classes, float16 index
copies of ordinary gradients.

An indexed gradient's norm is q_ood, the OOD prototype's softmax share, which falls like
exp(-distance) where classes lie far apart for their width. Two tables:

1. Five tight classes (unit spread) at a growing distance from their mean, with a near-OOD set
   (the class centres pulled 10 % towards the mean, spread 1.5): AUROC of float32 against
   float64 features, the indexed gradients' norms, and whether ``fit`` warns.
2. The clustered features of the accuracy tables (``grood._bench.common.realistic_features``)
   indexed with ``storage="float16"`` and ``"bfloat16"``: rows the half-precision copy loses
   and scores that change against the fp32 index.

    python bench/score_range.py            # the full tables (a few minutes on 2 CPU cores)
    python bench/score_range.py --tiny     # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch

import grood
from grood._bench.common import realistic_features, tight_classes
from grood.index import stored_rows_lost
from grood.metrics import ood_metrics


def fit_quietly(x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple[grood.GROOD, bool]:
    """The detector, and whether its fit warned of gradients below the dtype's range."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = grood.GROOD(progress=False, **kwargs).fit(x, y)
    return det, any("indexed training gradients" in str(w.message) for w in caught)


def scores_quietly(det: grood.GROOD, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return det.score_samples(x)


def tight_table(tiny: bool) -> list[str]:
    n, c, d = (200, 5, 16) if tiny else (600, 5, 32)
    rows = ["| distance | q_ood of the indexed (1 %, 50 %, 99 %) | AUROC float32 | "
            "AUROC float64 | fit warns (float32) |", "|---|---|---|---|---|"]
    for sep in ((40, 100) if tiny else (40, 50, 60, 70, 80, 100)):
        x, y, test, near = tight_classes(float(sep), n, c, d, seed=0)
        det32, warned = fit_quietly(x.float(), y)
        det64, _ = fit_quietly(x, y)
        a32 = ood_metrics(scores_quietly(det32, test.float()).numpy(),
                          scores_quietly(det32, near.float()).numpy())["auroc"]
        a64 = ood_metrics(scores_quietly(det64, test).numpy(),
                          scores_quietly(det64, near).numpy())["auroc"]
        q = det64.index_.vectors.norm(dim=1)
        qs = torch.quantile(q, torch.tensor([0.01, 0.5, 0.99], dtype=q.dtype)).tolist()
        rows.append(f"| {sep} | {', '.join(f'{v:.1e}' for v in qs)} | {a32:.4f} | {a64:.4f} | "
                    f"{'yes' if warned else 'no'} |")
    return rows


def storage_table(tiny: bool) -> list[str]:
    n, c, d = (2000, 20, 64) if tiny else (20000, 100, 512)
    x, y = realistic_features(n, c, d, seed=0, device="cpu")
    test, _ = realistic_features(n // 10, c, d, seed=1, device="cpu")
    plain = scores_quietly(fit_quietly(x, y)[0], test)
    rows = [f"Clustered features, {n:,} training rows, C = {c}, D = {d}, {n // 10:,} queries.",
            "", "| storage | indexed rows the copy loses | scores changed | max rel change |",
            "|---|---|---|---|"]
    for storage in ("float16", "bfloat16"):
        det, _ = fit_quietly(x, y, index_options={"storage": storage})
        index = det.index_
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the warning of lost rows: counted here)
            stored = index._searched()
        lost = int(stored_rows_lost(stored, index.vectors).sum())
        s = scores_quietly(det, test)
        changed = float((s != plain).double().mean())
        rel = float(((s - plain).abs() / plain.abs().clamp_min(1e-45)).max())
        rows.append(f"| {storage} | {lost:,} of {index.ntotal:,} ({100 * lost / index.ntotal:.1f}"
                    f" %) | {100 * changed:.2f} % | {rel:.3g} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run)")
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, torch {torch.__version__}, grood "
          f"{grood.__version__}, CPU\n")
    print("\n".join(tight_table(args.tiny)))
    print()
    print("\n".join(storage_table(args.tiny)))


if __name__ == "__main__":
    main()
