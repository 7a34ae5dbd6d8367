"""pytest-benchmark suite for the pure-torch fallback (run: pytest bench --benchmark-only).

Each op is checked against float64 before it is timed.
"""

import pytest
import torch

from grood import functional

NCP = [(4096, 10, 512), (4096, 100, 512), (1024, 1000, 2048)]


@pytest.mark.parametrize(("n", "c", "d"), NCP, ids=[f"N{n}-C{c}-D{d}" for n, c, d in NCP])
def test_ncp_gradient(benchmark, n, c, d):
    gen = torch.Generator().manual_seed(0)
    h, protos = torch.rand(n, d, generator=gen), torch.rand(c, d, generator=gen)
    p_ood = protos.mean(0)
    ref = functional.ncp_gradient(h[:64].double(), protos.double(), p_ood.double())
    res = functional.ncp_gradient(h[:64], protos, p_ood)
    torch.testing.assert_close(res.q_ood.double(), ref.q_ood, rtol=1e-4, atol=1e-7)
    benchmark(functional.ncp_gradient, h, protos, p_ood)


KNN = [(256, 20000, 512), (64, 50000, 2048)]


@pytest.mark.parametrize(("q", "m", "d"), KNN, ids=[f"Q{q}-M{m}-D{d}" for q, m, d in KNN])
def test_knn(benchmark, q, m, d):
    gen = torch.Generator().manual_seed(0)
    queries, db = torch.rand(q, d, generator=gen), torch.rand(m, d, generator=gen)
    _, idx = functional.knn(queries[:16], db, 1)
    _, ref = functional.knn(queries[:16].double(), db.double(), 1)
    assert torch.equal(idx, ref)
    benchmark(functional.knn, queries, db, 1)
