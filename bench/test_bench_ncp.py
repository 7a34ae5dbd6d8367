"""pytest-benchmark suite for the gradient step (run: pytest bench --benchmark-only).

Each case is checked against the float64 torch twin before it is timed. Triton cases need a
CUDA device (compiled kernels); on the CPU only the torch backend is timed.
"""

import pytest
import torch

from grood import functional, ops
from grood._bench.common import realistic_features

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(65536, 10, 512), (65536, 100, 512), (65536, 1000, 2048)] if CUDA else [
    (4096, 10, 512), (4096, 100, 512), (1024, 1000, 2048)]
CASES = [("torch", p) for p in ("ieee", "bf16")]
if CUDA:
    CASES += [("triton", p) for p in ("ieee", "tf32x3", "tf32", "bf16")] + [("torch", "tf32")]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize(("n", "c", "d"), SHAPES, ids=[f"N{n}-C{c}-D{d}" for n, c, d in SHAPES])
@pytest.mark.parametrize(("backend", "precision"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_ncp_gradient(benchmark, backend, precision, n, c, d):
    h, _ = realistic_features(n, c, d, seed=0, device=DEVICE)
    protos, _ = realistic_features(c, c, d, seed=1, device=DEVICE)
    p_ood = protos.mean(0)
    op = ops.get_op("ncp_gradient", backend)
    ref = functional.ncp_gradient(h[:256].double(), protos.double(), p_ood.double())
    got = op(h[:256], protos, p_ood, precision=precision)
    rtol = 1e-2 if precision == "bf16" else 1e-3 if precision == "tf32" else 1e-4
    torch.testing.assert_close(got.q_ood.double(), ref.q_ood, rtol=rtol, atol=1e-9)

    def step():
        op(h, protos, p_ood, precision=precision)
        _sync()

    benchmark(step)
