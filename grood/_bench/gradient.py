"""The gradient-step part of ``grood bench``: check it on the device, then time it.

Order of work: (1) correctness of the Triton kernel against the float64 torch twin on
realistic features (non-negative, clustered like a ResNet's post-ReLU penultimate layer), in
every precision mode: max relative error of ``grad`` and ``q_ood``, fraction of changed
``pred``, and the change in AUROC of the final GROOD score; (2) one table of timings:
shape | backend | precision | ms | samples/s | TFLOP/s | % of peak | speed-up vs the plain torch
closed form in the same precision | speed-up vs the per-sample autograd reference | peak extra
device memory. Compilation is excluded (warm-up runs), the device is synchronised around every
timed call, and every number comes from the same run on the same device.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor

from grood import functional, ood_metrics, ops
from grood._bench.common import (
    PRECISIONS,
    clustered_problem,
    device_peaks,
    interleaved_median_times,
    median_time,
    peak_extra_mib,
    realistic_features,
    record_timing,
)

#: (name, N, C, D) of the timing table.
FULL_SHAPES = [("CIFAR-10", 65536, 10, 512), ("CIFAR-100", 65536, 100, 512),
               ("ImageNet-1k", 65536, 1000, 2048), ("large-C", 65536, 21841, 1024)]
TINY_SHAPES = [("tiny-10", 96, 10, 40), ("tiny-100", 64, 100, 24)]


def torch_closed_form(h: Tensor, protos: Tensor, p_ood: Tensor, precision: str
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The straightforward torch closed form: full [N, C] distances, softmax, gradient."""
    dots = torch_gemm(h.float(), protos.float(), precision).float()
    d2 = (h * h).sum(1, keepdim=True) + (protos * protos).sum(1)[None] - 2 * dots
    dist = d2.clamp_min(0).sqrt()
    diff = h - p_ood
    d_ood = diff.norm(dim=1)
    s = torch.cat([-dist, -d_ood[:, None]], 1)
    lse = torch.logsumexp(s, 1)
    q = torch.exp(-d_ood - lse)
    grad = diff * (q / d_ood.clamp_min(1e-30))[:, None]
    return grad, q, dist.argmin(1)


def torch_gemm(h: Tensor, protos: Tensor, precision: str) -> Tensor:
    """The distance GEMM alone, ``h @ protos.T`` in ``precision`` (cuBLAS on a GPU): the floor
    a fused gradient step approaches when the GEMM dominates."""
    a, b = (h.bfloat16(), protos.bfloat16()) if precision == "bf16" else (h, protos)
    with functional.matmul_precision(precision, h.device):
        return a @ b.T


def autograd_reference(h: Tensor, protos: Tensor, p_ood: Tensor) -> Tensor:
    """The per-sample reference: one autograd call per sample, as OpenOOD's implementation."""
    out = []
    for row in h:
        p_o = p_ood.clone().requires_grad_(True)
        s = -torch.cat([torch.linalg.norm(row - protos, dim=1),
                        torch.linalg.norm(row - p_o)[None]])
        loss = -torch.log_softmax(s, 0)[int(s[:-1].argmax())]
        out.append(torch.autograd.grad(loss, p_o)[0])
    return torch.stack(out)


def accuracy_table(device: str, backend: str, tiny: bool) -> list[str]:
    """Errors of every precision mode against float64 on realistic features."""
    from grood import GROOD

    c, d = (10, 24) if tiny else (100, 512)
    n_train, n_test = (600, 200) if tiny else (20000, 5000)
    x, y = realistic_features(n_train, c, d, seed=0, device=device)
    id_x, _ = realistic_features(n_test, c, d, seed=1, device=device)
    ood_x, _ = realistic_features(n_test, c, d, seed=2, device=device, novel=True)
    protos = torch.stack([x[y == j].mean(0) for j in range(c)])
    p_ood = protos.mean(0)
    ref = functional.ncp_gradient(id_x.double(), protos.double(), p_ood.double())
    ref_det = GROOD(backend="torch").fit(x.double(), y)
    ref_auroc = ood_metrics(ref_det.score_samples(id_x.double()),
                            ref_det.score_samples(ood_x.double()))["auroc"]
    lines = [f"Accuracy against float64 ({backend} backend; C = {c}, D = {d}; {n_train} "
             f"training, {n_test} ID and {n_test} OOD samples of clustered post-ReLU-like "
             "features):", "",
             "| backend | precision | max rel err grad | max rel err q_ood | pred changed | "
             "AUROC | AUROC - float64 AUROC |", "|---|---|---|---|---|---|---|"]
    for precision in PRECISIONS:
        if backend == "triton" and precision == "bf16" and device != "cuda":
            continue  # the interpreter's bf16 dot is not the hardware's
        if backend == "torch" and precision != "tf32x3":
            # The plain closed form (no exact re-ranking), for comparison.
            g_err, q_err, changed = _errors(*torch_closed_form(id_x, protos, p_ood, precision),
                                            ref)
            lines.append(f"| torch closed form | {precision} | {g_err:.2e} | {q_err:.2e} | "
                         f"{100 * changed:.3f} % | n/a | n/a |")
        res = ops.get_op("ncp_gradient", backend)(id_x, protos, p_ood, precision=precision)
        g_err, q_err, changed = _errors(res.grad, res.q_ood, res.pred, ref)
        det = GROOD(backend=backend, precision=precision, device=device).fit(x, y)
        auroc = ood_metrics(det.score_samples(id_x), det.score_samples(ood_x))["auroc"]
        lines.append(f"| {backend} | {precision} | {g_err:.2e} | {q_err:.2e} | "
                     f"{100 * changed:.3f} % | {auroc:.6f} | {auroc - ref_auroc:+.1e} |")
    return lines


def hard_softmax_features(n: int, n_classes: int, dim: int, *, seed: int, device: str,
                          spread: float = 0.15) -> tuple[Tensor, Tensor]:
    """Features whose nearest prototype holds little of the softmax mass, and the prototypes.

    Post-ReLU-like features of realistic norm (about 64 at D = 2048): class prototypes scatter
    by ``spread`` around one shared non-negative centre and samples by ``spread`` around their
    prototype, so a sample is only slightly nearer its own prototype than hundreds of others.
    At C = 1000, D = 2048 the nearest prototype's softmax probability is about 0.04.
    """
    centre = torch.relu(torch.randn(dim, generator=torch.Generator().manual_seed(3))) * 2.0
    protos = torch.relu(centre + spread * torch.randn(
        n_classes, dim, generator=torch.Generator().manual_seed(4)))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    h = torch.relu(protos[labels] + spread * torch.randn(n, dim, generator=gen))
    return h.to(device), protos.to(device)


def hard_softmax_problem(n: int, c: int, d: int, device: str, rows: int | None = None):
    """The hard-softmax table's inputs: ``n`` rows of :func:`hard_softmax_features` (seed 1;
    the first ``rows`` of them when given), the prototypes and their mean as the OOD
    prototype; with the float64 reference and each row's probability of its nearest
    prototype. ``(h, protos, p_ood, ref, q_near)``."""
    h, protos = hard_softmax_features(n, c, d, seed=1, device=device)
    h = h[:rows]
    p_ood = protos.double().mean(0).float()
    ref = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
    return h, protos, p_ood, ref, torch.exp(-ref.min_dist - ref.lse)


def hard_softmax_table(device: str, backends: list[str], tiny: bool) -> list[str]:
    """Errors of every mode against float64 where the softmax is hard (no dominant term)."""
    n, c, d = (64, 100, 64) if tiny else (2000, 1000, 2048)
    h, protos, p_ood, ref, q_near = hard_softmax_problem(n, c, d, device)
    return [f"Hard softmax (N = {n}, C = {c}, D = {d}; the nearest prototype's probability: "
            f"median {float(q_near.median()):.3f}, max {float(q_near.max()):.3f}; feature norm "
            f"{float(h.norm(dim=1).mean()):.1f}), errors against float64:", "",
            *_mode_rows(h, protos, p_ood, ref, device, backends, flip_gate=True)]


def clustered_table(device: str, backends: list[str], tiny: bool) -> list[str]:
    """Errors of every mode against float64 on clustered post-ReLU features at ImageNet-1k's
    C and D (the configurations table's data), where the classes after the exactly re-ranked
    candidates hold enough of the softmax for TF32's operand rounding to show: truncated, it
    put tf32's q_ood 4.1e-3 off float64 there (emulated, 2026-12-04)."""
    n, c, d = (64, 100, 64) if tiny else (2000, 1000, 2048)
    h, protos = clustered_problem(n, c, d, device)
    p_ood = protos.double().mean(0).float()
    ref = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
    return [f"Clustered post-ReLU features at ImageNet-1k's C and D (N = {n}, C = {c}, "
            f"D = {d}; feature norm {float(h.norm(dim=1).mean()):.1f}), errors against "
            "float64:", "", *_mode_rows(h, protos, p_ood, ref, device, backends)]


def _mode_rows(h: Tensor, protos: Tensor, p_ood: Tensor, ref, device: str,
               backends: list[str], flip_gate: bool = False) -> list[str]:
    """An accuracy table's rows: per mode the torch closed form's errors and each backend's
    (with ``flip_gate`` also the Triton step with its re-rank gate the other way)."""
    lines = ["| backend | precision | max rel err grad | max rel err q_ood | pred changed |",
             "|---|---|---|---|---|"]
    for precision in PRECISIONS:
        if "torch" in backends and precision != "tf32x3":
            errs = _errors(*torch_closed_form(h, protos, p_ood, precision), ref)
            lines.append(f"| torch closed form | {precision} | {errs[0]:.2e} | {errs[1]:.2e} | "
                         f"{100 * errs[2]:.3f} % |")
        for backend in backends:
            if backend == "triton" and precision == "bf16" and device != "cuda":
                continue  # the interpreter's bf16 dot is not the hardware's
            res = ops.get_op("ncp_gradient", backend)(h, protos, p_ood, precision=precision)
            errs = _errors(res.grad, res.q_ood, res.pred, ref)
            lines.append(f"| {backend} | {precision} | {errs[0]:.2e} | {errs[1]:.2e} | "
                         f"{100 * errs[2]:.3f} % |")
            if flip_gate and backend == "triton":  # the re-rank gate the other way round
                lines.append(_flipped_gate_row(h, protos, p_ood, precision, ref))
    return lines


def _flipped_gate_row(h: Tensor, protos: Tensor, p_ood: Tensor, precision: str, ref) -> str:
    """The hard-softmax row of the Triton step in the launcher's configuration with its exact
    re-rank's gate (:func:`grood_kernels._ncp_configs.rerank_gate`) the other way: what the
    candidates the gate leaves out weigh in each mode."""
    from grood._bench.configs import step_outputs
    from grood_kernels._ncp_configs import rerank_gate

    gated = rerank_gate(protos.shape[0], protos.shape[1], precision)
    grad, q, pred = step_outputs(h, protos, p_ood, precision, rerank_gate=int(not gated))[:3]
    errs = _errors(grad, q, pred, ref)
    return (f"| triton, re-rank gate {'off' if gated else 'on'} | {precision} | {errs[0]:.2e} | "
            f"{errs[1]:.2e} | {100 * errs[2]:.3f} % |")


def _errors(grad: Tensor, q: Tensor, pred: Tensor, ref) -> tuple[float, float, float]:
    """Max relative error of grad (per row) and q_ood against ``ref``; fraction of changed pred."""
    g_err = float(((grad.double() - ref.grad).norm(dim=1)
                   / ref.grad.norm(dim=1).clamp_min(1e-30)).max())
    q_err = float(((q.double() - ref.q_ood).abs() / ref.q_ood).max())
    return g_err, q_err, float((pred != ref.pred).double().mean())


def timing_table(device: str, backends: list[str], shapes, repeat: int) -> Iterator[str]:
    """Timings of the gradient step against the torch closed form and the autograd loop."""
    yield ("| shape | N | C | D | backend | precision | ms | samples/s | TFLOP/s | % of peak | "
           "vs torch closed form | vs torch GEMM alone | vs autograd loop | peak extra MiB |")
    yield "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for name, n, c, d in shapes:
        yield from _time_shape(name, n, c, d, device, backends, repeat)


def _time_shape(name: str, n: int, c: int, d: int, device: str, backends: list[str],
                repeat: int) -> list[str]:
    peaks = device_peaks(device)
    h, protos = clustered_problem(n, c, d, device)
    p_ood = protos.mean(0)
    n_auto = min(n, 64)
    t_auto = median_time(partial(autograd_reference, h[:n_auto], protos, p_ood), device, 1)
    auto_rate = n_auto / t_auto
    flops = 2.0 * n * c * d
    lines = []
    for precision in PRECISIONS:
        t_ref, t_gemm = interleaved_median_times(
            [partial(torch_closed_form, h, protos, p_ood, precision),
             partial(torch_gemm, h, protos, precision)], device, repeat)
        # the baselines' own times (the table gives them as ratios)
        record_timing("ncp_gradient", (n, c, d), precision, "torch closed form", t_ref)
        record_timing("ncp_gradient", (n, c, d), precision, "torch GEMM alone", t_gemm)
        for backend in backends:
            if backend == "triton" and precision == "bf16" and device != "cuda":
                continue  # the interpreter's bf16 dot is not the hardware's
            op = ops.get_op("ncp_gradient", backend)
            call = partial(op, h, protos, p_ood, precision=precision)
            t = median_time(call, device, repeat)
            record_timing("ncp_gradient", (n, c, d), precision, backend, t)
            mem = peak_extra_mib(call, device)
            peak = f"{100 * flops / t / 1e12 / peaks[precision]:.1f}" if peaks else "n/a"
            lines.append(
                f"| {name} | {n} | {c} | {d} | {backend} | {precision} | {1e3 * t:.3f} | "
                f"{n / t:,.0f} | {flops / t / 1e12:.2f} | {peak} | {t_ref / t:.2f}x | "
                f"{t_gemm / t:.2f}x | {(n / t) / auto_rate:,.0f}x | {mem:.1f} |")
    return lines
