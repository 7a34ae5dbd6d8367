"""Logits and features of any scale: how exact float32's baseline scores are.

Logits of small spread (raw cosine similarities, a heavily regularised head, a high
temperature) make every softmax nearly uniform: ``p`` sits near ``1/C`` and ``log p`` near
``-log C``, where float32 holds far fewer digits than the scores differ in; logits of large
spread make it one-hot. One table per run: the baselines ``fit_baselines`` names, fitted and
scored in float32 and, on the same float32 values, in float64, on ReLU features whose last
layer's logits are scaled from a spread of about 1.5e-3 to 1.5e3 (the features and the bias
scaled together). Each cell: the largest float32 error over the float64 scores' spread, and
that error over the float64 scores' own float32 rounding (the most a float32 score can be
right by; "-" where that rounding is 0). A second table: GradNorm at temperatures 1 to 1e4.
A third: the baselines that read the features, on features scaled from 1e-30 to 1e20 with
the last layer divided by the scale (the logits unchanged), where float32 squares of the
entries leave its range below about 1e-19 and above about 1e19 ("refused": the rows were
refused, naming them, as scores float32 cannot hold). A fourth: the baselines with a
percentile (ReAct, ASH-S, SCALE, DICE) from p40 to p99 ("warned": ReAct's clip is the
training entries' smallest value, so every training row scores alike).

    python bench/logit_scale.py            # every baseline, 3,000 training rows
    python bench/logit_scale.py --tiny     # a smoke run: KLM and GradNorm, three scales;
                                           # ViM, SHE and fDBD at three feature scales;
                                           # ReAct, ASH and SCALE at p40 and p99
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import numpy as np
import torch

import grood
from grood.baselines import BY_NAME, GradNorm, fit_baselines
from grood.errors import RowsRefusedError


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """ReLU features of 10 classes (D = 64), their labels, a last layer that classifies
    them (unit class-mean directions, halved) and test rows (half near the classes, half
    noise)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    means = torch.randn(10, 64, generator=gen, dtype=torch.float64) * 2
    x = torch.relu(means[y] + torch.randn(n, 64, generator=gen, dtype=torch.float64))
    w = means / means.norm(dim=1, keepdim=True) * 0.5
    b = torch.randn(10, generator=gen, dtype=torch.float64) * 0.1
    m = n // 10
    near = means[torch.randint(0, 10, (m,), generator=gen)]
    q = torch.relu(torch.cat([near + torch.randn(m, 64, generator=gen, dtype=torch.float64),
                              torch.randn(m, 64, generator=gen, dtype=torch.float64) * 2]))
    return x, y, w, b, q


def errors(s32: torch.Tensor, s64: torch.Tensor) -> tuple[float, float]:
    """The float32 scores' largest error over the float64 scores' spread, and over their
    own float32 rounding (nan where that is 0)."""
    err = float((s32.double() - s64).abs().max())
    own = float((s64.float().double() - s64).abs().max())
    return err / float(s64.std()), err / own if own > 0 else float("nan")


def fitted(name: str, y, xs, ws, bs, logits=None, options=None, warned=None):
    """``name`` fitted on the float32 features ``xs`` (and ``logits``) with the layer
    ``ws``, ``bs``, and on the same values in float64: ``(float32 one, float64 one)``.
    ``options``: its constructor's arguments; ``warned``: a list the fits' warnings go to."""
    opts = options or ({"bank_fraction": 0.2} if name == "nnguide" else {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = tuple(fit_baselines([name], features=xs.to(dt), labels=y, weight=ws.to(dt),
                                   bias=bs.to(dt), options={name: opts} if opts else None,
                                   logits=None if logits is None else logits.to(dt))[0]
                     for dt in (torch.float32, torch.float64))
    if warned is not None:
        warned.extend(caught)
    return pair


def said(s32: torch.Tensor, s64: torch.Tensor) -> str:
    """A cell: :func:`errors` of the float32 scores ``s32`` against ``s64``."""
    spread, ratio = errors(s32, s64)
    return f"{spread:.0e} / {'-' if ratio != ratio else f'{ratio:.0f}x'}"


def cell(name: str, scale: float, x, y, w, b, q) -> str:
    xs, qs, bs = (x * scale).float(), (q * scale).float(), (b * scale).float()
    ws = w.float()
    logits = (xs.double() @ ws.double().T + bs.double()).float()
    e32, e64 = fitted(name, y, xs, ws, bs, logits)
    test = qs if BY_NAME[name][1] == "features" else \
        (qs.double() @ ws.double().T + bs.double()).float()
    return said(e32.score_samples(test), e64.score_samples(test.double()))


def feature_cell(name: str, scale: float, x, y, w, b, q) -> str:
    """One cell of the feature-scale table: features times ``scale``, the layer's weight
    over it."""
    xs, qs, ws, bs = (x * scale).float(), (q * scale).float(), (w / scale).float(), b.float()
    e32, e64 = fitted(name, y, xs, ws, bs)
    try:
        s32 = e32.score_samples(qs)
    except RowsRefusedError:
        return "refused"
    if not bool(torch.isfinite(s32).all()):
        return "non-finite"
    return said(s32, e64.score_samples(qs.double()))


def percentile_cell(name: str, q: float, x, y, w, b, test) -> str:
    """One cell of the percentile table: ``name`` at percentile ``q``, fitted and scored in
    float32 and on the same values in float64 ("warned" where the fit warned)."""
    warned: list = []
    e32, e64 = fitted(name, y, x, w, b, options={"percentile": q}, warned=warned)
    if warned:
        return "warned"
    return said(e32.score_samples(test), e64.score_samples(test.double()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run: KLM and GradNorm at three scales")
    args = parser.parse_args()
    x, y, w, b, q = data(600 if args.tiny else 3000)
    names = ["klm", "gradnorm"] if args.tiny else list(BY_NAME)
    scales = (1e-3, 1.0, 1e3) if args.tiny else (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, "
          f"{datetime.date.today()}\n")
    spreads = [float(((x * s) @ w.T + b * s).std()) for s in scales]
    print(f"{len(x):,} training rows, {len(q):,} test rows; float32 error / float64 "
          "spread, and / the float64 scores' own float32 rounding:\n")
    print("| baseline | " + " | ".join(f"logit spread {s:.2g}" for s in spreads) + " |")
    print("|---" * (len(scales) + 1) + "|")
    for name in names:
        cells = [cell(name, s, x, y, w, b, q) for s in scales]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    temps = (1.0, 1e2, 1e4) if args.tiny else (1.0, 1e1, 1e2, 1e3, 1e4)
    print("\nGradNorm at a temperature (logit spread 1.5):\n")
    print("| T | float32 error / spread | / own rounding |")
    print("|---|---|---|")
    xs, qs, ws, bs = x.float(), q.float(), w.float(), b.float()
    for t in temps:
        e32 = GradNorm(temperature=t).fit(xs, weight=ws, bias=bs)
        e64 = GradNorm(temperature=t).fit(xs.double(), weight=ws.double(), bias=bs.double())
        spread, ratio = errors(e32.score_samples(qs), e64.score_samples(qs.double()))
        print(f"| {t:g} | {spread:.1e} | {ratio:.0f}x |")
    feature_scales = (1e-30, 1.0, 1e20) if args.tiny else \
        (1e-30, 1e-25, 1e-21, 1e-19, 1e-10, 1.0, 1e10, 1e19, 1e20)
    readers = ["vim", "she", "fdbd"] if args.tiny else \
        [n for n in BY_NAME if BY_NAME[n][1] == "features"]
    print("\nFeatures times a scale, the last layer's weight over it (logits unchanged):\n")
    print("| baseline | " + " | ".join(f"features x {s:g}" for s in feature_scales) + " |")
    print("|---" * (len(feature_scales) + 1) + "|")
    for name in readers:
        cells = [feature_cell(name, s, x, y, w, b, q) for s in feature_scales]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    percentiles = (40.0, 99.0) if args.tiny else (40.0, 65.0, 85.0, 90.0, 95.0, 99.0)
    shapers = ["react", "ash", "scale"] if args.tiny else ["react", "ash", "scale", "dice"]
    print("\nThe baselines with a percentile (ReLU features, half their entries 0):\n")
    print("| baseline | " + " | ".join(f"p{p:g}" for p in percentiles) + " |")
    print("|---" * (len(percentiles) + 1) + "|")
    xs, qs, ws, bs = x.float(), q.float(), w.float(), b.float()
    for name in shapers:
        cells = [percentile_cell(name, p, xs, y, ws, bs, qs) for p in percentiles]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
