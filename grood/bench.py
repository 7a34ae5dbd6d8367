"""``grood bench`` / ``bench/gpu_report.py``: check the gradient step on the device, then time it.

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

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from functools import partial

import torch
from torch import Tensor

from grood import __version__, functional, ood_metrics

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
# Dense peak TFLOP/s of the math each precision uses (NVIDIA datasheets, SXM parts):
# ieee = fp32 FMA, tf32/tf32x3 = TF32 tensor cores, bf16 = BF16 tensor cores.
PEAKS = {
    "H100": {"ieee": 67.0, "tf32": 494.7, "tf32x3": 494.7, "bf16": 989.4},
    "H200": {"ieee": 67.0, "tf32": 494.7, "tf32x3": 494.7, "bf16": 989.4},
    "A100": {"ieee": 19.5, "tf32": 156.0, "tf32x3": 156.0, "bf16": 312.0},
}
FULL_SHAPES = [("CIFAR-10", 65536, 10, 512), ("CIFAR-100", 65536, 100, 512),
               ("ImageNet-1k", 65536, 1000, 2048), ("large-C", 65536, 21841, 1024)]
TINY_SHAPES = [("tiny-10", 96, 10, 40), ("tiny-100", 64, 100, 24)]


def realistic_features(n: int, n_classes: int, dim: int, *, seed: int, device: str,
                       novel: bool = False) -> tuple[Tensor, Tensor]:
    """Non-negative clustered features like post-ReLU penultimate activations, with labels.

    Class centres are sparse non-negative vectors (a ReLU of Gaussians, about half zero), the
    same for every ``seed``; samples are ReLU(centre + noise) drawn with ``seed``, so
    coordinates are often exactly zero and norms are large next to the distances between
    classes. ``novel=True`` gives near-OOD classes whose centres lie midway between two known
    classes.
    """
    centre_gen = torch.Generator().manual_seed(3)
    centres = torch.relu(torch.randn(n_classes, dim, generator=centre_gen)) * 2.0
    if novel:  # near-OOD: each new class sits midway between two known classes
        pairs = torch.randint(0, n_classes, (n_classes, 2), generator=centre_gen)
        centres = 0.5 * (centres[pairs[:, 0]] + centres[pairs[:, 1]])
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    noise = torch.randn(n, dim, generator=gen)
    x = torch.relu(centres[labels] + noise)
    return x.to(device), labels.to(device)


def torch_closed_form(h: Tensor, protos: Tensor, p_ood: Tensor, precision: str):
    """The straightforward torch closed form: full [N, C] distances, softmax, gradient."""
    dt = torch.float32
    a, b = h.to(dt), protos.to(dt)
    if precision == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32
    flags.allow_tf32 = precision == "tf32"
    try:
        dots = (a @ b.T).to(dt)
    finally:
        flags.allow_tf32 = saved
    d2 = (h * h).sum(1, keepdim=True) + (protos * protos).sum(1)[None] - 2 * dots
    dist = d2.clamp_min(0).sqrt()
    diff = h - p_ood
    d_ood = diff.norm(dim=1)
    s = torch.cat([-dist, -d_ood[:, None]], 1)
    lse = torch.logsumexp(s, 1)
    q = torch.exp(-d_ood - lse)
    grad = diff * (q / d_ood.clamp_min(1e-30))[:, None]
    return grad, q, dist.argmin(1)


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


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, repeat: int) -> float:
    fn()  # compile / warm up
    synchronize(device)
    times = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device: str) -> float:
    """Peak device memory during ``fn`` beyond what was allocated before, minus its outputs."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kept = torch.cuda.memory_allocated() - before  # the outputs
    del out
    return (peak - before - kept) / 2**20


def device_peaks(device: str) -> dict[str, float] | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


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
    ref_auroc = ood_metrics(ref_det.score_samples(id_x.double()).cpu(),
                            ref_det.score_samples(ood_x.double()).cpu())["auroc"]
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
        res = _op(backend)(id_x, protos, p_ood, precision=precision)
        g_err, q_err, changed = _errors(res.grad, res.q_ood, res.pred, ref)
        det = GROOD(backend=backend, precision=precision, device=device).fit(x, y)
        auroc = ood_metrics(det.score_samples(id_x).cpu(), det.score_samples(ood_x).cpu())[
            "auroc"]
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


def hard_softmax_table(device: str, backends: list[str], tiny: bool) -> list[str]:
    """Errors of every mode against float64 where the softmax is hard (no dominant term)."""
    n, c, d = (64, 100, 64) if tiny else (2000, 1000, 2048)
    h, protos = hard_softmax_features(n, c, d, seed=1, device=device)
    p_ood = protos.double().mean(0).float()
    ref = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
    q_near = torch.exp(-ref.min_dist - ref.lse)
    lines = [f"Hard softmax (N = {n}, C = {c}, D = {d}; the nearest prototype's probability: "
             f"median {float(q_near.median()):.3f}, max {float(q_near.max()):.3f}; feature norm "
             f"{float(h.norm(dim=1).mean()):.1f}), errors against float64:", "",
             "| backend | precision | max rel err grad | max rel err q_ood | pred changed |",
             "|---|---|---|---|---|"]
    for precision in PRECISIONS:
        if "torch" in backends and precision != "tf32x3":
            errs = _errors(*torch_closed_form(h, protos, p_ood, precision), ref)
            lines.append(f"| torch closed form | {precision} | {errs[0]:.2e} | {errs[1]:.2e} | "
                         f"{100 * errs[2]:.3f} % |")
        for backend in backends:
            if backend == "triton" and precision == "bf16" and device != "cuda":
                continue  # the interpreter's bf16 dot is not the hardware's
            res = _op(backend)(h, protos, p_ood, precision=precision)
            errs = _errors(res.grad, res.q_ood, res.pred, ref)
            lines.append(f"| {backend} | {precision} | {errs[0]:.2e} | {errs[1]:.2e} | "
                         f"{100 * errs[2]:.3f} % |")
    return lines


def _errors(grad: Tensor, q: Tensor, pred: Tensor, ref) -> tuple[float, float, float]:
    """Max relative error of grad (per row) and q_ood against ``ref``; fraction of changed pred."""
    g_err = float(((grad.double() - ref.grad).norm(dim=1)
                   / ref.grad.norm(dim=1).clamp_min(1e-30)).max())
    q_err = float(((q.double() - ref.q_ood).abs() / ref.q_ood).max())
    return g_err, q_err, float((pred != ref.pred).double().mean())


def _op(backend: str):
    if backend == "triton":
        from grood_kernels.ncp_gradient import ncp_gradient

        return ncp_gradient
    return functional.ncp_gradient


def timing_table(device: str, backends: list[str], shapes, repeat: int) -> list[str]:
    """Timings of the gradient step against the torch closed form and the autograd loop."""
    lines = ["| shape | N | C | D | backend | precision | ms | samples/s | TFLOP/s | % of peak | "
             "vs torch closed form | vs autograd loop | peak extra MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, c, d in shapes:
        lines += _time_shape(name, n, c, d, device, backends, repeat)
    return lines


def _time_shape(name: str, n: int, c: int, d: int, device: str, backends: list[str],
                repeat: int) -> list[str]:
    peaks = device_peaks(device)
    h, _ = realistic_features(n, c, d, seed=3, device=device)
    protos, _ = realistic_features(c, c, d, seed=4, device=device)
    p_ood = protos.mean(0)
    n_auto = min(n, 64)
    t_auto = median_time(partial(autograd_reference, h[:n_auto], protos, p_ood), device, 1)
    auto_rate = n_auto / t_auto
    flops = 2.0 * n * c * d
    lines = []
    for precision in PRECISIONS:
        t_ref = median_time(partial(torch_closed_form, h, protos, p_ood, precision), device, repeat)
        for backend in backends:
            if backend == "triton" and precision == "bf16" and device != "cuda":
                continue  # the interpreter's bf16 dot is not the hardware's
            call = partial(_op(backend), h, protos, p_ood, precision=precision)
            t = median_time(call, device, repeat)
            mem = peak_extra_mib(call, device)
            peak = f"{100 * flops / t / 1e12 / peaks[precision]:.1f}" if peaks else "n/a"
            lines.append(
                f"| {name} | {n} | {c} | {d} | {backend} | {precision} | {1e3 * t:.3f} | "
                f"{n / t:,.0f} | {flops / t / 1e12:.2f} | {peak} | {t_ref / t:.2f}x | "
                f"{(n / t) / auto_rate:,.0f}x | {mem:.1f} |")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by ``grood bench`` and ``bench/gpu_report.py``)."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, to check the script itself (e.g. on the CPU)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per entry; the median is reported (default: 5)")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the timing tables")
    parser.add_argument("--only", choices=["gradient", "search"], default=None,
                        help="run one part: the gradient step or the nearest-neighbour search")


def run(args: argparse.Namespace) -> int:
    """Print the report (Markdown) for parsed ``args``."""
    from grood import ops

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    triton_ok = ops.triton_unavailable_reason("ncp_gradient", torch.device(device)) is None
    backends = ["triton", "torch"] if triton_ok else ["torch"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends
    print(f"grood {__version__} | torch {torch.__version__} | triton {triton_version} | "
          f"{dev_name} | python {platform.python_version()} | {date.today().isoformat()}"
          + (" | TRITON_INTERPRET=1: Triton timings are the interpreter's" if interpreted
             else ""))
    print()
    if args.only != "search":
        print("## Gradient step\n")
        if not args.skip_accuracy:
            for backend in backends:
                print("\n".join(accuracy_table(device, backend, args.tiny)))
                print()
            print("\n".join(hard_softmax_table(device, backends, args.tiny)))
            print()
        shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
        print("\n".join(timing_table(device, backends, shapes, args.repeat)))
        print("\nTFLOP/s counts the distance GEMM only (2·N·C·D). 'vs torch closed form': the "
              "plain torch closed form (full [N, C] distances) in the same precision, same "
              "device, same run. 'vs autograd loop': one autograd call per sample, timed on up "
              "to 64 samples. Peak extra memory: device memory beyond inputs and outputs during "
              "one call.\n")
    if args.only != "gradient":
        from grood.bench_search import search_accuracy_table, search_timing_table

        print("## Nearest-neighbour search\n")
        if not args.skip_accuracy:
            print("\n".join(search_accuracy_table(device, backends, args.tiny)))
            print()
        print("\n".join(search_timing_table(device, backends, args.tiny, args.repeat)))
        print("\nTFLOP/s counts 2·Q·M·D. 'vs torch GEMM+min': chunked GEMM and running minimum "
              "in the same precision (on bf16 storage for bf16-storage rows), same device, same "
              "run. recall@1 is measured on the first 100 queries against float64 brute force.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/gpu_report.py``."""
    parser = argparse.ArgumentParser(prog="gpu_report.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
