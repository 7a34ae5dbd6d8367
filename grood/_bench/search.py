"""The search part of ``grood bench``: exact k-NN over the gradient index.

First the accuracy of every precision mode on real GROOD gradients (recall@1 and distance error
against float64 brute force), then timings of exact 1-NN search: grood's kernel (and its torch
twin) against torch chunked GEMM + min in the same precision, in the same run on the same
device, and faiss-cpu's exact flat search on a smaller database, compared per TFLOP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor

from grood import functional, ops
from grood._bench.common import (
    PRECISIONS,
    device_peaks,
    median_time,
    peak_extra_mib,
    realistic_features,
    record_timing,
    synchronize,
)
from grood.index import ExactIndex, faiss_gpu_refusal

FULL_SEARCH_SHAPES = [("ImageNet-1k", 10000, 1281167, 2048), ("CIFAR", 10000, 50000, 512)]
TINY_SEARCH_SHAPES = [("tiny", 40, 700, 24)]
#: ``--only search-k``: the search for many neighbours (KNN's sweeps: OpenOOD's K up to
#: 1,000; GROOD at a large k), on L2-normalised rows as KNN searches them.
SEARCH_K_SHAPES = [("CIFAR-10 KNN", 10000, 50000, 512), ("ImageNet subset", 4096, 200000, 2048)]
TINY_SEARCH_K_SHAPES = [("tiny", 16, 300, 16)]
SEARCH_KS = (1, 50, 200, 1000)
#: Precisions of ``--only search-k`` (the default, and the tensor cores' fastest exact one).
SEARCH_K_PRECISIONS = ("ieee", "tf32")


def torch_gemm_min(queries: Tensor, database: Tensor, precision: str,
                   chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """The plain baseline: chunked GEMM over the database and a running minimum."""
    q = queries.bfloat16() if precision == "bf16" else queries
    q_sq = (queries.float() ** 2).sum(1)
    best_d = torch.full((queries.shape[0],), float("inf"), device=queries.device)
    best_i = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    with functional.matmul_precision(precision, queries.device):
        for m0 in range(0, database.shape[0], chunk):
            x = database[m0:m0 + chunk]
            x = x.bfloat16() if precision == "bf16" else x
            d = (q_sq[:, None] + (x.float() ** 2).sum(1)[None] - 2 * (q @ x.T).float())
            v, i = d.min(1)
            better = v < best_d
            best_d = torch.where(better, v, best_d)
            best_i = torch.where(better, i + m0, best_i)
    return best_d, best_i


def gradient_index(device: str, tiny: bool) -> tuple[Tensor, Tensor]:
    """Real GROOD gradients: an index from training features, queries from ID and OOD tests."""
    from grood import GROOD

    c, d = (10, 24) if tiny else (100, 512)
    n_train, n_test = (600, 100) if tiny else (50000, 2000)
    x, y = realistic_features(n_train, c, d, seed=0, device=device)
    det = GROOD(backend="torch").fit(x, y)
    ids, _ = realistic_features(n_test, c, d, seed=1, device=device)
    ood, _ = realistic_features(n_test, c, d, seed=2, device=device, novel=True)
    queries = det._grads(torch.cat([ids, ood])).grad
    index = cast(ExactIndex, det.index_)
    if index.centre is not None:  # (as the index searches them: both less its centre)
        queries = queries - index.centre
    return queries, index.vectors


def search_accuracy_table(device: str, backends: list[str], tiny: bool) -> list[str]:
    """Recall@1 and distance error of every precision mode against float64 brute force."""
    queries, db = gradient_index(device, tiny)
    ref_d, ref_i = functional.knn(queries.double(), db.double(), 1)
    lines = [f"Search accuracy on GROOD gradients ({db.shape[0]} indexed, {queries.shape[0]} "
             f"queries, D = {db.shape[1]}; against float64 brute force):", "",
             "| backend | precision | storage | recall@1 | max rel err of distance |",
             "|---|---|---|---|---|"]
    for backend in backends:
        for precision in PRECISIONS:
            if backend == "triton" and precision == "bf16" and device != "cuda":
                continue  # the interpreter's bf16 dot is not the hardware's
            for storage in (torch.float32, torch.bfloat16):
                if storage == torch.bfloat16 and precision != "bf16":
                    continue
                dist, idx = ops.get_op("knn", backend)(queries.to(storage), db.to(storage), 1,
                                             precision=precision)
                recall = float((idx[:, 0] == ref_i[:, 0]).double().mean())
                err = float(((dist[:, 0].double() - ref_d[:, 0]).abs()
                             / ref_d[:, 0].clamp_min(1e-30)).max())
                lines.append(f"| {backend} | {precision} | {str(storage)[6:]} | {recall:.4f} "
                             f"| {err:.2e} |")
    return lines


def _faiss_rate(device: str, d: int, tiny: bool) -> str:
    """faiss-cpu exact flat search, TFLOP/s on a smaller database (or why it was not run)."""
    try:
        import faiss
    except ImportError:
        return "faiss not installed"
    q, m = (20, 500) if tiny else (1000, 100000)
    gen = torch.Generator().manual_seed(5)
    db = torch.randn(m, d, generator=gen).numpy()
    queries = torch.randn(q, d, generator=gen).numpy()
    index = faiss.IndexFlatL2(d)
    index.add(db)
    index.search(queries[:2], 1)
    t0 = time.perf_counter()
    index.search(queries, 1)
    t = time.perf_counter() - t0
    return (f"faiss-cpu {faiss.__version__} IndexFlatL2 ({faiss.omp_get_max_threads()} "
            f"threads): {2.0 * q * m * d / t / 1e12:.3f} TFLOP/s on Q = {q}, M = {m}, D = {d}")


def _faiss_gpu_row(queries: Tensor, db: Tensor, ref_i: Tensor, repeat: int) -> str | None:
    """faiss-gpu's exact flat search on the same data, when the installed faiss can search on
    the GPU (None otherwise: a CPU build, or a GPU build that sees no GPU)."""
    try:
        import faiss
    except ImportError:
        return None
    if queries.device.type != "cuda" or faiss_gpu_refusal(faiss) is not None:
        return None
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatL2(res, db.shape[1])
    index.add(db.cpu().numpy())
    q = queries.cpu().numpy()
    index.search(q[:2], 1)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _, idx = index.search(q, 1)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    recall = float((torch.from_numpy(idx[: ref_i.shape[0], 0]).to(ref_i.device) == ref_i)
                   .double().mean())
    n_q, (m, d) = queries.shape[0], db.shape
    return (f"faiss-gpu {faiss.__version__} GpuIndexFlatL2 (fp32, host queries): {t:.4f} s, "
            f"{2.0 * n_q * m * d / t / 1e12:.2f} TFLOP/s, recall@1 vs fp64 {recall:.3f}")


def search_timing_table(device: str, backends: list[str], tiny: bool,
                        repeat: int) -> Iterator[str]:
    """1-NN search timings against torch GEMM + min in the same precision."""
    peaks = device_peaks(device)
    yield ("| shape | Q | M | D | backend | precision | storage | s | queries/s | TFLOP/s | "
           "% of peak | vs torch GEMM+min | peak extra MiB | recall@1 vs fp64 | recall@1 vs "
           "exact fp32 |")
    yield "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    notes = []
    for name, q, m, d in (TINY_SEARCH_SHAPES if tiny else FULL_SEARCH_SHAPES):
        gen = torch.Generator(device=device).manual_seed(11)
        db = torch.randn(m, d, generator=gen, device=device).abs_()
        queries = torch.randn(q, d, generator=gen, device=device).abs_()
        n_check = min(q, 100)
        ref_i = _exact_reference(queries[:n_check], db)
        ref32_i = functional.knn(queries[:n_check], db, 1)[1][:, 0]
        flops = 2.0 * q * m * d
        for precision in PRECISIONS:
            storages = [torch.float32] + ([torch.bfloat16] if precision == "bf16" else [])
            for storage in storages:
                data = db if storage == torch.float32 else db.to(storage)
                t_ref = median_time(partial(torch_gemm_min, queries, data, precision), device,
                                    repeat)
                for backend, variant in _search_variants(backends, precision, storage, q,
                                                         device):
                    if backend == "triton" and precision == "bf16" and device != "cuda":
                        continue
                    # bf16 storage: candidates from the bf16 rows, re-ranked on the fp32 ones.
                    extra = {} if storage == torch.float32 else {"rerank_database": db}
                    variant = dict(variant)
                    narrowed = variant.pop("narrowed_pick", False)
                    extra.update(variant)
                    op = ops.get_op("knn", backend)
                    call = _narrowing(narrowed, partial(op, queries, data, 1,
                                                        precision=precision, **extra))
                    t = median_time(call, device, repeat)
                    if not variant and not narrowed:  # the launcher's own choice
                        record_timing("knn", (q, m, d), precision if storage == torch.float32
                                      else f"{precision}-storage", backend, t)
                    mem = peak_extra_mib(call, device)
                    _, idx = _narrowing(narrowed, partial(op, queries[:n_check], data, 1,
                                                          precision=precision, **extra))()
                    recall = float((idx[:, 0] == ref_i).double().mean())
                    recall32 = float((idx[:, 0] == ref32_i).double().mean())
                    peak = (f"{100 * flops / t / 1e12 / peaks[precision]:.1f}" if peaks
                            else "n/a")
                    label = str(storage)[6:] + (", tiles cast in the K-loop" if variant else "")
                    if narrowed:
                        label += ", tiles narrowed by group minima (sync-free)"
                    yield (
                        f"| {name} | {q} | {m} | {d} | {backend} | {precision} | "
                        f"{label} | {t:.4f} | {q / t:,.0f} | "
                        f"{flops / t / 1e12:.2f} | {peak} | {t_ref / t:.2f}x | {mem:.1f} | "
                        f"{recall:.3f} | {recall32:.3f} |")
        gpu_row = _faiss_gpu_row(queries, db, ref_i, repeat)
        if gpu_row is not None:
            notes.append(f"{name}: {gpu_row}")
        del db, queries
        notes.append(_faiss_rate(device, d, tiny))
    yield ""
    yield from notes


def search_k_table(device: str, backends: list[str], tiny: bool,
                   repeat: int) -> Iterator[str]:
    """The exact search at each of :data:`SEARCH_KS` (those up to a quarter of the database) per
    backend and precision, against the same search at k = 1; each row checked first: its
    k-th distances against a float64 search's, on 64 queries."""
    yield ("| shape | Q | M | D | backend | precision | k | s | queries/s | vs k = 1 | k-th "
           "distance max rel err vs fp64 |")
    yield "|---|---|---|---|---|---|---|---|---|---|---|"
    for name, q, m, d in (TINY_SEARCH_K_SHAPES if tiny else SEARCH_K_SHAPES):
        queries, db = normalised_rows(q, m, d, device)
        ks = [k for k in SEARCH_KS if k <= m // 4]
        want = functional.knn(queries[:64].double(), db.double(), max(ks))[0]
        for precision in SEARCH_K_PRECISIONS:
            for backend in backends:
                op = ops.get_op("knn", backend)
                t_one = None
                for k in ks:
                    err = kth_distance_error(op(queries[:64], db, k, precision=precision)[0],
                                             want, k)
                    t = median_time(partial(op, queries, db, k, precision=precision), device,
                                    repeat)
                    t_one = t if t_one is None else t_one
                    yield (f"| {name} | {q} | {m} | {d} | {backend} | {precision} | {k} | "
                           f"{t:.4f} | {q / t:,.0f} | {t / t_one:.2f}x | {err:.1e} |")
        del db, queries


def normalised_rows(q: int, m: int, d: int, device: str) -> tuple[Tensor, Tensor]:
    """``(queries [q, d], database [m, d])``: L2-normalised :func:`realistic_features` (seeds
    1 and 0), as KNN searches its features."""
    db = realistic_features(m, 100, d, seed=0, device=device)[0]
    queries = realistic_features(q, 100, d, seed=1, device=device)[0]
    return torch.nn.functional.normalize(queries), torch.nn.functional.normalize(db)


def kth_distance_error(got: Tensor, want: Tensor, k: int) -> float:
    """Largest relative error of the k-th distances ``got[:, k - 1]`` against a float64
    search's ``want`` (at k or more neighbours, the same queries)."""
    ref = want[:, k - 1]
    return float(((got[:, k - 1].double() - ref).abs() / ref.abs().clamp_min(1e-30)).max())


def _search_variants(backends: list[str], precision: str, storage: torch.dtype, n_q: int,
                     device: str):
    """(backend, extra keyword arguments) to time: each backend as its launcher chooses, and
    where the Triton search copies an fp32 database to bf16 per call, also the same search
    casting each tile in the K-loop instead (``cast_database=False``), for the comparison;
    off the CPU, in ``ieee`` (the search ``auto`` runs on torch there) and ``tf32`` on an
    fp32 database, the torch search also with its tiles narrowed by group minima
    (``narrowed_pick``: ``functional.DEVICE_NARROWED_PICK`` set while it runs)."""
    for backend in backends:
        yield backend, {}
        if backend == "torch" and device != "cpu" and precision in ("ieee", "tf32") \
                and storage == torch.float32:
            yield backend, {"narrowed_pick": True}
        if backend == "triton":
            from grood_kernels._knn_configs import casts_database  # the Triton backend is installed

            if casts_database(n_q, precision, storage):
                yield backend, {"cast_database": False}


def _narrowing(on: bool, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with ``functional.DEVICE_NARROWED_PICK`` set to ``on`` while it runs (and set
    back after)."""
    def run() -> Any:
        was = functional.DEVICE_NARROWED_PICK
        functional.DEVICE_NARROWED_PICK = on
        try:
            return call()
        finally:
            functional.DEVICE_NARROWED_PICK = was
    return run


def _exact_reference(queries: Tensor, database: Tensor, chunk: int = 65536) -> Tensor:
    """Nearest row of ``database`` for each query, by float64 differences (the ground truth)."""
    best = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64,
                      device=queries.device)
    arg = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    q = queries.double()
    for m0 in range(0, database.shape[0], chunk):
        x = database[m0:m0 + chunk].double()
        d = torch.cdist(q, x).square()
        v, i = d.min(1)
        better = v < best
        best, arg = torch.where(better, v, best), torch.where(better, i + m0, arg)
    synchronize(str(queries.device.type))
    return arg
