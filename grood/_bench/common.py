"""What every part of ``grood bench`` shares: test features, timing, memory and peaks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
# Dense peak TFLOP/s of the math each precision uses (NVIDIA datasheets, SXM parts):
# ieee = fp32 FMA, tf32/tf32x3 = TF32 tensor cores, bf16 = BF16 tensor cores.
PEAKS = {
    "H100": {"ieee": 67.0, "tf32": 494.7, "tf32x3": 494.7, "bf16": 989.4},
    "H200": {"ieee": 67.0, "tf32": 494.7, "tf32x3": 494.7, "bf16": 989.4},
    "A100": {"ieee": 19.5, "tf32": 156.0, "tf32x3": 156.0, "bf16": 312.0},
}


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


def clustered_problem(n: int, c: int, d: int, device: str) -> tuple[Tensor, Tensor]:
    """``(h, prototypes)``: ``n`` rows of :func:`realistic_features` (seed 3) and ``c``
    prototypes drawn the same way (seed 4): the gradient step's timing table's data, the launch
    configurations' and the clustered accuracy table's."""
    h = realistic_features(n, c, d, seed=3, device=device)[0]
    return h, realistic_features(c, c, d, seed=4, device=device)[0]


def tight_classes(sep: float, n: int, c: int, d: int, seed: int) -> tuple[Tensor, ...]:
    """``(train, labels, id_test, near_ood)`` in float64: ``c`` classes ``sep`` from their mean,
    of unit spread (q_ood falls like exp(-sep)); the near-OOD rows' centres are pulled 10 %
    towards the mean, spread 1.5. ``train`` is drawn first: the same for any later draws."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64))
    y = torch.arange(n) % c
    x = sep * dirs[y] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    yt = torch.arange(n // 2) % c
    test = sep * dirs[yt] + torch.randn(n // 2, d, generator=gen, dtype=torch.float64)
    near = 0.9 * sep * dirs[yt] + 1.5 * torch.randn(n // 2, d, generator=gen,
                                                    dtype=torch.float64)
    return x, y, test, near


def far_prototype_data(ratio: float) -> tuple[np.ndarray, ...]:
    """``(train, labels, ood, test)`` in float32 (D = 16): 4 classes at 1/``ratio`` of their
    scale, OOD features (for ``ood_prototype="features"``) about 20 times the scale away (the
    features' RMS spread is 1/(1.86 ``ratio``) of their distance from them), and test rows,
    half like the classes and half wider: every gradient then points nearly the same way
    from the OOD prototype."""
    gen = np.random.default_rng(0)
    means = gen.normal(size=(4, 16)) * 3
    y = gen.integers(0, 4, 600)
    x = ((means[y] + gen.normal(size=(600, 16))) / ratio).astype(np.float32)
    test = (np.concatenate([means[gen.integers(0, 4, 60)] + gen.normal(size=(60, 16)),
                            gen.normal(size=(60, 16)) * 4]) / ratio).astype(np.float32)
    return x, y, np.full((20, 16), 5.0, dtype=np.float32), test


def far_prototype_float64_scores(x: np.ndarray, y: np.ndarray, ood: np.ndarray,
                                 test: np.ndarray) -> np.ndarray:
    """float64's scores of ``test`` by a detector fitted on the same (float32-rounded) inputs
    of :func:`far_prototype_data` (the OOD prototype from ``ood``; no index copy): the
    reference the far-prototype tables and tests hold float32 to."""
    from grood import GROOD

    return GROOD(ood_prototype="features").fit(
        x.astype(np.float64), y, ood_features=ood.astype(np.float64)).score_samples(
        test.astype(np.float64))


#: Timings of this run, one dict per timed kernel call (``--json`` writes them): ``kernel``
#: (``ncp_gradient`` / ``knn``), ``dims`` (N, C, D or Q, M, D), ``precision`` (search rows on
#: bf16 storage: ``bf16-storage``), ``backend`` (``torch``, ``triton``, and for the gradient
#: step's baselines ``torch closed form`` and ``torch GEMM alone``) and the median ``seconds``.
TIMINGS: list[dict] = []


def offset_data(offset: float, n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(train, labels, test)``: ``n`` rows of 10 classes (D = 64, spread 1, means 2 apart)
    plus ``offset``, in float32; ``n // 5`` test rows, half like the classes, half noise of
    spread 3."""
    gen = np.random.default_rng(seed)
    means = gen.normal(size=(10, 64)) * 2
    y = gen.integers(0, 10, n)
    x = ((means[y] + gen.normal(size=(n, 64))) + offset).astype(np.float32)
    m = n // 10
    test = (np.concatenate([means[gen.integers(0, 10, m)] + gen.normal(size=(m, 64)),
                            3 * gen.normal(size=(m, 64))]) + offset).astype(np.float32)
    return x, y, test


def offset_errors(offset: float, n: int, backend: str) -> tuple[float, float]:
    """On :func:`offset_data`, over the float64 scores' spread: the largest difference of
    float32's scores (on ``backend``) from float64's of the same float32 inputs, and the
    largest change of float64's when every input moves one unit in its last place."""
    import warnings

    from grood import GROOD

    def scores(train: np.ndarray, rows: np.ndarray, backend: str) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = GROOD(progress=False, backend=backend).fit(train, y)
            return det.score_samples(rows).astype(np.float64)

    x, y, test = offset_data(offset, n)
    want = scores(x.astype(np.float64), test.astype(np.float64), "torch")
    ulp = float(np.spacing(np.float32(offset)))
    gen = np.random.default_rng(1)
    moved = scores(x + ulp * gen.choice([-1.0, 1.0], x.shape),
                   test + ulp * gen.choice([-1.0, 1.0], test.shape), "torch")
    spread = float(np.ptp(want))
    own = float(np.abs(scores(x, test, backend) - want).max()) / spread
    return own, float(np.abs(moved - want).max()) / spread


def exact_softmax(h: Tensor, protos: Tensor, p_ood: Tensor) -> tuple[float, int, float]:
    """``(q_ood, the nearest class, the gap between the two nearest classes' distances)`` of
    one row [D] in 60-digit arithmetic (mpmath, a dependency of torch's), from the float
    values given (prototypes [C, D], OOD prototype [D]): the reference no float64
    implementation can be for rows far out, where the distances' rounding exceeds their
    differences."""
    import mpmath

    with mpmath.workdps(60):
        rows = [*protos.double().tolist(), p_ood.double().tolist()]
        x = [mpmath.mpf(v) for v in h.double().tolist()]
        dist = [mpmath.sqrt(sum((a - mpmath.mpf(b)) ** 2 for a, b in zip(x, r, strict=True)))
                for r in rows]
        top = min(dist)
        total = sum(mpmath.exp(top - s) for s in dist)
        classes = sorted(range(len(rows) - 1), key=lambda j: dist[j])
        gap = dist[classes[1]] - dist[classes[0]] if len(classes) > 1 else mpmath.inf
        return float(mpmath.exp(top - dist[-1]) / total), classes[0], float(gap)


def record_timing(kernel: str, dims: tuple[int, ...], precision: str, backend: str,
                  seconds: float) -> None:
    """Keep one timing for the machine-readable report."""
    TIMINGS.append({"kernel": kernel, "dims": list(dims), "precision": precision,
                    "backend": backend, "seconds": seconds})


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median seconds of ``repeat`` synchronised calls of ``fn``, after one warm-up call."""
    return interleaved_median_times([fn], device, repeat)[0]


def interleaved_median_times(fns: list[Callable[[], object]], device: str,
                             repeat: int) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeat`` rounds that call them in turn (one
    warm-up round first), so a machine whose speed drifts during the run slows every entry
    alike and the ratios between them hold."""
    for fn in fns:
        fn()  # compile / warm up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times, strict=True):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


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
    """Peak TFLOP/s per precision of the current CUDA device, if it is in ``PEAKS``."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)
