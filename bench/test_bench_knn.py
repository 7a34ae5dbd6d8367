"""pytest-benchmark suite for exact nearest-neighbour search (pytest bench --benchmark-only).

Each case is checked against float64 brute force on a few queries before it is timed. Triton
cases need a CUDA device; on the CPU the torch backend is timed at a smaller size.
"""

import pytest
import torch

from grood import functional

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(10000, 50000, 512), (10000, 1281167, 2048)] if CUDA else [(256, 20000, 512)]
CASES = [("torch", "ieee", torch.float32)]
if CUDA:
    CASES += [("torch", "tf32", torch.float32), ("torch", "bf16", torch.bfloat16)]
    CASES += [("triton", p, torch.float32) for p in ("ieee", "tf32x3", "tf32", "bf16")]
    CASES += [("triton", "bf16", torch.bfloat16)]


def _op(backend):
    if backend == "triton":
        from grood_kernels.knn import knn

        return knn
    return functional.knn


@pytest.mark.parametrize(("q", "m", "d"), SHAPES, ids=[f"Q{q}-M{m}-D{d}" for q, m, d in SHAPES])
@pytest.mark.parametrize(("backend", "precision", "storage"), CASES,
                         ids=[f"{b}-{p}-{str(s)[6:]}" for b, p, s in CASES])
def test_knn(benchmark, backend, precision, storage, q, m, d):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    db = torch.randn(m, d, generator=gen, device=DEVICE).abs_().to(storage)
    queries = torch.randn(q, d, generator=gen, device=DEVICE).abs_()
    op = _op(backend)
    _, idx = op(queries[:8], db, 1, precision=precision)
    _, ref = functional.knn(queries[:8].double(), db.double(), 1)
    assert float((idx == ref).double().mean()) >= 0.875

    def search():
        op(queries, db, 1, precision=precision)
        if CUDA:
            torch.cuda.synchronize()

    benchmark(search)
