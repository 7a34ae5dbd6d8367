"""The head part of ``grood bench``: GROOD as a module inside a compiled program.

Fits a detector on realistic features, then scores one batch with ``det.as_module()`` eagerly,
under ``torch.compile(fullgraph=True)`` and through ``torch.export``, and on a CUDA device the
``checks="flag"`` head captured in a CUDA graph and replayed: first that every path gives the
detector's scores (max abs difference, predictions changed), then their throughput against
``det.score_and_predict`` in the same run.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from grood._bench.common import median_time, realistic_features


def head_table(device: str, backend: str, tiny: bool, repeat: int) -> list[str]:
    """Agreement and throughput of the GROOD head, eager / compiled / exported."""
    from grood import GROOD
    from grood.head import capture_cuda_graph

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
    if device == "cuda":
        replay = capture_cuda_graph(det.as_module(checks="flag"), feats)
        runs["head (checks='flag'), CUDA graph replay"] = partial(replay, feats)
    lines = [f"Head ({backend} backend, precision {det.precision}; {n_train} "
             f"training samples, C = {c}, D = {d}; one batch of N = {n}):", "",
             "| path | max abs score diff vs detector | pred changed | ms | samples/s |",
             "|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(_timed_row(name, run, run(), want_s, want_p, n, device, repeat))
    return lines


def _timed_row(name: str, run, scored: tuple[Tensor, Tensor], want_s: Tensor, want_p: Tensor,
               n: int, device: str, repeat: int, lead: tuple[str, ...] = ()) -> str:
    """One table row: ``lead`` cells, then ``scored``'s (score, pred) against the detector's
    (max abs score difference, predictions changed), then the time of ``run`` and samples/s."""
    score, pred = scored
    diff = float((score.double() - want_s.double()).abs().max())
    changed = float((pred != want_p).double().mean())
    t = median_time(run, device, repeat)
    cells = [name, *lead, f"{diff:.2e}", f"{100 * changed:.3f} %", f"{1e3 * t:.2f}",
             f"{n / t:,.0f}"]
    return "| " + " | ".join(cells) + " |"



class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18Like(nn.Module):
    """ResNet-18's layout (4 stages of 2 basic blocks, 11.7 M parameters at width 64 and 1,000
    classes) in plain torch, with its penultimate features from a module named ``avgpool``."""

    def __init__(self, n_classes: int, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        c_in = width
        for i, c in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [_Block(c_in, c, 1 if i == 0 else 2), _Block(c, c, 1)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.body(x)), 1))


def attached_table(device: str, backend: str, tiny: bool, repeat: int) -> list[str]:
    """A ResNet-18-sized classifier with the GROOD head attached: agreement with the model
    and detector run separately, then throughput eager and (on a GPU) compiled and compiled
    in a CUDA graph, against the classifier alone."""
    from grood import GROOD
    from grood.head import capture_cuda_graph

    if tiny:
        batch, size, c, width = 4, 32, 10, 8
    else:  # ImageNet-sized inputs; a CPU gets a smaller batch and no compile rows
        batch, size, c, width = (256 if device == "cuda" else 16), 224, 1000, 64
    torch.manual_seed(0)
    net = ResNet18Like(c, width).to(device).eval()
    d = 8 * width
    x, y = realistic_features(600 if tiny else 50000, c, d, seed=0, device=device)
    det = GROOD(backend=backend, precision="ieee" if tiny else "tf32").fit(x, y)
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        logits = net(images)
        want_s, want_p = det.score_and_predict(net.avgpool(net.body(images)).flatten(1))
        attached = det.attach(net, features="avgpool", checks="flag")
        runs = {"classifier alone, eager": partial(net, images),
                "classifier + head, eager": partial(attached, images)}
        if not tiny and device == "cuda":
            torch._dynamo.reset()
            compiled = torch.compile(attached, fullgraph=True)
            runs["classifier + head, torch.compile(fullgraph)"] = partial(compiled, images)
            replay = capture_cuda_graph(compiled, images)
            runs["classifier + head, compiled, CUDA graph replay"] = partial(replay, images)
        lines = [f"ResNet-18-sized classifier (width {width}, {c} classes, random weights) "
                 f"with the GROOD head attached (checks='flag', {backend} backend, precision "
                 f"{det.precision}); batches of {batch} images {size} x {size}:", "",
                 "| path | max abs logit diff | max abs score diff vs detector | pred changed "
                 "| ms | images/s |", "|---|---|---|---|---|---|"]
        for name, run in runs.items():
            out = run()
            if isinstance(out, Tensor):  # the classifier alone: logits only
                out = (out, want_s, want_p)
            lines.append(_timed_row(name, run, out[1:], want_s, want_p, batch, device, repeat,
                                    (f"{float((out[0] - logits).abs().max()):.2e}",)))
    return lines
