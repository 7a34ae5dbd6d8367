"""pytest-benchmark suite for exact nearest-neighbour search (pytest bench --benchmark-only).

Each case is checked on a few queries against a float64 brute-force scan (every distance
computed as a sum of squared differences, no GEMM) before it is timed. Triton
cases need a CUDA device; on the CPU the torch backend is timed at a smaller size.
"""

import pytest
import torch

from grood import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(10000, 50000, 512), (10000, 1281167, 2048)] if CUDA else [(256, 20000, 512)]
CASES = [("torch", "ieee", torch.float32)]
if CUDA:
    CASES += [("torch", "tf32", torch.float32), ("torch", "bf16", torch.bfloat16)]
    CASES += [("triton", p, torch.float32) for p in ("ieee", "tf32x3", "tf32", "bf16")]
    CASES += [("triton", "bf16", torch.bfloat16)]


def brute_force_nearest(queries, db, chunk=16384):
    """Index of each query's nearest database row: float64 sums of squared differences."""
    best_d = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64,
                        device=queries.device)
    best_i = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    q = queries.double()
    for m0 in range(0, db.shape[0], chunk):
        diff = q[:, None, :] - db[m0:m0 + chunk].double()[None]
        d, i = (diff * diff).sum(-1).min(1)
        better = d < best_d
        best_d = torch.where(better, d, best_d)
        best_i = torch.where(better, i + m0, best_i)
    return best_i


@pytest.mark.parametrize(("q", "m", "d"), SHAPES, ids=[f"Q{q}-M{m}-D{d}" for q, m, d in SHAPES])
@pytest.mark.parametrize(("backend", "precision", "storage"), CASES,
                         ids=[f"{b}-{p}-{str(s)[6:]}" for b, p, s in CASES])
def test_knn(benchmark, backend, precision, storage, q, m, d):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    db = torch.randn(m, d, generator=gen, device=DEVICE).abs_().to(storage)
    queries = torch.randn(q, d, generator=gen, device=DEVICE).abs_()
    op = ops.get_op("knn", backend)
    _, idx = op(queries[:8], db, 1, precision=precision)
    ref = brute_force_nearest(queries[:8], db, chunk=2048 if d > 1024 else 16384)
    assert float((idx[:, 0] == ref).double().mean()) >= 0.875

    def search():
        op(queries, db, 1, precision=precision)
        if CUDA:
            torch.cuda.synchronize()

    benchmark(search)
