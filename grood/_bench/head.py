"""The head part of ``grood bench``: GROOD as a module inside a compiled program.

Fits a detector on realistic features, then scores one batch with ``det.as_module()`` eagerly,
under ``torch.compile(fullgraph=True)`` and through ``torch.export``: first that all three give
the detector's scores (max abs difference, predictions changed), then their throughput against
``det.score_and_predict`` in the same run.
"""

from __future__ import annotations

from functools import partial

import torch

from grood._bench.common import median_time, realistic_features


def head_table(device: str, backend: str, tiny: bool, repeat: int) -> list[str]:
    """Agreement and throughput of the GROOD head, eager / compiled / exported."""
    from grood import GROOD

    n_train, n, c, d = (600, 64, 10, 24) if tiny else (50000, 4096, 1000, 2048)
    x, y = realistic_features(n_train, c, d, seed=0, device=device)
    feats, _ = realistic_features(n, c, d, seed=1, device=device)
    det = GROOD(backend=backend, precision="ieee" if tiny else "tf32").fit(x, y)
    head = det.as_module()
    want_s, want_p = det.score_and_predict(feats)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    exported = torch.export.export(head, (feats,)).module()
    runs = {"detector.score_and_predict": partial(det.score_and_predict, feats),
            "head, eager": partial(head, feats), "head, torch.compile(fullgraph)":
            partial(compiled, feats), "head, torch.export": partial(exported, feats)}
    lines = [f"Head ({backend} backend, precision {det.precision}; {n_train} "
             f"training samples, C = {c}, D = {d}; one batch of N = {n}):", "",
             "| path | max abs score diff vs detector | pred changed | ms | samples/s |",
             "|---|---|---|---|---|"]
    for name, run in runs.items():
        score, pred = run()
        diff = float((score.double() - want_s.double()).abs().max())
        changed = float((pred != want_p).double().mean())
        t = median_time(run, device, repeat)
        lines.append(f"| {name} | {diff:.2e} | {100 * changed:.3f} % | {1e3 * t:.2f} | "
                     f"{n / t:,.0f} |")
    return lines
