"""Whole-pipeline benchmark: fit and score GROOD at ImageNet-1k scale, stage by stage.

    python bench/pipeline.py          # 1,281,167 x 2048 train rows, C = 1000, 132,000 queries
    python bench/pipeline.py --scale 0.02 --device cpu     # 2 % of the rows
    grood bench --pipeline ...        # the same

Features are ``grood._bench.common.realistic_features`` (non-negative, clustered like a ResNet's
post-ReLU penultimate layer), made on the device before timing starts. Stages, in the order
``GROOD.fit`` / ``score_samples`` run them: the prototype pass (float64 sums and counts), the
gradient pass over the training rows (each row indexed when its nearest class prototype is its
label), the index build (row norms), then scoring: the gradient step of the queries and the
exact 1-NN search. Each stage is timed with the device synchronised and reports its peak extra
memory. The first call of each op at each batch shape (Triton's JIT compilation, where the op
runs on Triton) is made before the timed stages and reported on its own rows. At ``--check``
(default when the training set is at most 200,000 rows) the staged scores are compared with
``GROOD(...).fit(...).score_samples(...)`` on the same data.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from datetime import date

import torch

from grood import GROOD, __version__, functional, ops
from grood._bench.common import realistic_features, synchronize
from grood._checks import bench_device_arg, positive_int_arg, positive_real_arg

#: OpenOOD v1.5 ImageNet-1k: 1,281,167 training images; the ID test set (45,000) plus its
#: near-OOD (SSB-hard 49,000, NINCO 5,879) and far-OOD (iNaturalist 10,000, Textures 5,160,
#: OpenImage-O 17,000) sets: about 132,000 queries.
FULL = {"n_train": 1_281_167, "n_query": 132_000, "classes": 1000, "dim": 2048}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stage:
    """Times one stage (device synchronised) and its peak extra memory: the CUDA allocator's
    peak on a GPU, the process's resident set sampled every 5 ms on the CPU."""

    def __init__(self, name: str, device: str, rows: list) -> None:
        self.name, self.device, self.rows = name, device, rows

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        synchronize(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        ms = (time.perf_counter() - self.t0) * 1e3
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.sampler.join()
            peak = max(self.peak, _rss())
        self.rows.append((self.name, ms, max(0, peak - self.base) / 2**20))
        return False


def _warm_up(backend: str, op: str, device: str, precision: str) -> str:
    """What a warm-up row holds for ``op``: Triton's compilation, or on the torch backend
    (nothing to compile) one untimed call at each batch shape."""
    if ops.resolve_backend(backend, op, device, torch.float32, precision) == "triton":
        return "triton: JIT compilation"
    return "torch: nothing compiled, one untimed call per batch shape"


def run_pipeline(n_train: int, n_query: int, c: int, d: int, *, device: str, backend: str,
                 precision: str, batch: int, progress: bool,
                 storage: torch.dtype = torch.float32) -> tuple[list, torch.Tensor, tuple]:
    """Run every stage once; returns the stage rows, the scores and the data."""
    from tqdm import tqdm

    x, y = realistic_features(n_train, c, d, seed=0, device=device)
    q, _ = realistic_features(n_query, c, d, seed=1, device=device)
    rows: list = []
    starts = range(0, n_train, batch)
    bar = (lambda it, desc: tqdm(it, desc=desc, leave=False, file=sys.stderr)) if progress \
        else (lambda it, desc: it)
    with Stage("fit: prototype pass", device, rows):
        state = None
        for r0 in bar(starts, "prototypes"):
            state = functional.class_prototypes(x[r0:r0 + batch], y[r0:r0 + batch], c,
                                                state=state)
        protos = state.prototypes(torch.float32)
        p_ood = protos.double().mean(0).float()
    def shapes(n: int) -> list[int]:  # the distinct batch sizes a pass over n rows makes
        return sorted({min(batch, n - r0) for r0 in range(0, n, batch)})

    # The first call at each batch shape compiles the Triton kernel (seconds): made here, on
    # its own row, so the timed stages measure the steady state.
    grad_warm = _warm_up(backend, "ncp_gradient", device, precision)
    with Stage(f"warm-up: first calls of the gradient step ({grad_warm})", device, rows):
        for n in sorted(set(shapes(n_train) + shapes(n_query))):
            ops.ncp_gradient(x[:n], protos, p_ood, backend=backend, precision=precision)
    with Stage("fit: gradient pass", device, rows):
        grads = torch.empty((n_train, d), dtype=torch.float32, device=device)
        keep = torch.empty(n_train, dtype=torch.bool, device=device)
        for r0 in bar(starts, "gradients"):
            res = ops.ncp_gradient(x[r0:r0 + batch], protos, p_ood, backend=backend,
                                   precision=precision)
            grads[r0:r0 + batch] = res.grad
            keep[r0:r0 + batch] = res.pred == y[r0:r0 + batch]
    with Stage("fit: index build", device, rows):
        index = grads[keep]
        del grads
        sq = functional.database_sq_norms_of(index)
        # Half-precision storage: searched in bf16 / fp16, re-ranked on the fp32 rows.
        searched = index if storage == torch.float32 else index.to(storage)
        extra = {} if storage == torch.float32 else {"rerank_database": index}
    with Stage("score: gradient step", device, rows):
        qg = torch.cat([ops.ncp_gradient(q[r0:r0 + batch], protos, p_ood, backend=backend,
                                         precision=precision).grad
                        for r0 in bar(range(0, n_query, batch), "query gradients")])
    knn_warm = _warm_up(backend, "knn", device, precision)
    with Stage(f"warm-up: first calls of the search ({knn_warm})", device, rows):
        for n in shapes(n_query):
            ops.knn(qg[:n], searched, 1, backend=backend, precision=precision,
                    database_sq_norms=sq, **extra)
    with Stage("score: exact 1-NN search", device, rows):
        dist = torch.cat([ops.knn(qg[r0:r0 + batch], searched, 1, backend=backend,
                                  precision=precision, database_sq_norms=sq, **extra)[0]
                          for r0 in bar(range(0, n_query, batch), "search")])
    return rows, -dist[:, 0], (x, y, q, int(keep.sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``grood bench --pipeline``)."""
    parser.add_argument("--scale", type=positive_real_arg, default=1.0,
                        help="fraction of the ImageNet-1k row counts (default 1.0)")
    parser.add_argument("--classes", type=positive_int_arg, default=FULL["classes"],
                        help="classes C (default: %(default)s)")
    parser.add_argument("--dim", type=positive_int_arg, default=FULL["dim"],
                        help="feature dimension D (default: %(default)s)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], type=bench_device_arg,
                        help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                        help="implementation of the hot paths (default: %(default)s)")
    parser.add_argument("--precision", default="ieee", choices=["ieee", "tf32", "tf32x3", "bf16"],
                        help="GEMM precision (default: %(default)s)")
    parser.add_argument("--index-storage", choices=["float32", "bfloat16", "float16"],
                        default="float32", help="dtype the index is searched in (re-ranked "
                        "on the fp32 rows)")
    parser.add_argument("--batch", type=positive_int_arg, default=16384, help="rows per call")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with GROOD.fit/score_samples (default: <= 200,000 rows)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # At least 20 rows per class, so that random labels leave no class empty.
    n_train = max(20 * args.classes, round(FULL["n_train"] * args.scale))
    n_query = max(1, round(FULL["n_query"] * args.scale))
    rows, scores, (x, y, q, n_indexed) = run_pipeline(
        n_train, n_query, args.classes, args.dim, device=device, backend=args.backend,
        precision=args.precision, batch=args.batch, progress=not args.quiet,
        storage=getattr(torch, args.index_storage))
    name = torch.cuda.get_device_name() if device == "cuda" else (
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    print(f"grood {__version__} | torch {torch.__version__} | {name} | python "
          f"{platform.python_version()} | {date.today().isoformat()}")
    print(f"train {n_train:,} x {args.dim} (C = {args.classes}; {n_indexed:,} indexed), "
          f"queries {n_query:,}; backend {args.backend}, precision {args.precision}, index "
          f"storage {args.index_storage}, batch {args.batch}\n")
    print("| stage | ms | rows/s | peak extra MiB |")
    print("|---|---|---|---|")
    total = {"fit": 0.0, "score": 0.0}
    for stage, ms, mib in rows:
        n = n_query if stage.startswith("score") else n_train
        if stage.startswith("warm-up"):
            print(f"| {stage[:-1]}; not in the totals) | {ms:,.1f} | | {mib:,.0f} |")
            continue
        total[stage.split(":")[0]] += ms
        print(f"| {stage} | {ms:,.1f} | {n / ms * 1e3:,.0f} | {mib:,.0f} |")
    print(f"| **fit total** | {total['fit']:,.1f} | {n_train / total['fit'] * 1e3:,.0f} | |")
    print(f"| **score total** | {total['score']:,.1f} | {n_query / total['score'] * 1e3:,.0f} | |")
    print(f"| **fit + score** | {total['fit'] + total['score']:,.1f} | | |")
    check = args.check if args.check is not None else n_train <= 200_000
    if check:
        options = (None if args.index_storage == "float32"
                   else {"storage": args.index_storage})
        det = GROOD(ood_prototype="mean", backend=args.backend, precision=args.precision,
                    device=device, index_options=options).fit(x, y)
        ref = det.score_samples(q)
        diff = float((ref.to(scores.device) - scores).abs().max())
        print(f"\ncheck: max |score - GROOD.score_samples| = {diff:.3g} "
              f"(indexed {det.index_.ntotal:,} vs {n_indexed:,})")
        if det.index_.ntotal != n_indexed or diff > 1e-4 * float(scores.abs().max()):
            print("check FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
