"""CPU report for the pure-torch fallback: how close each op runs to the matrix-multiply bound.

For each shape it times the grood op and, as named baselines in the same run, one plain
``torch.mm`` with the same multiply-add count (the GEMM the op cannot avoid) and one
element-wise pass over the input (``x * 2``, the memory-traffic floor that dominates when C is
small). It checks the op
against a float64 computation first. Prints one table; nothing is asserted.

    python bench/cpu_report.py            # default shapes (about a minute on 2 cores)
    python bench/cpu_report.py --small    # quick check
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from functools import partial

import torch

from grood import __version__, functional
from grood._bench.common import interleaved_median_times
from grood._checks import positive_int_arg


def _check_ncp(h, protos, p_ood) -> float:
    res = functional.ncp_gradient(h[:256], protos, p_ood)
    ref = functional.ncp_gradient(h[:256].double(), protos.double(), p_ood.double())
    return float(((res.q_ood.double() - ref.q_ood).abs() / ref.q_ood.abs()).max())


def _check_knn(q, db) -> float:
    _, i = functional.knn(q[:64], db, 1)
    _, ref_i = functional.knn(q[:64].double(), db.double(), 1)
    return float((i == ref_i).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes, quick")
    parser.add_argument("--repeat", type=positive_int_arg, default=5,
                        help="rounds; each calls the op and both baselines once (default 5)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.small:
        ncp_shapes = [(512, 10, 64), (512, 100, 128)]
        knn_shapes = [(128, 2000, 64)]
    else:
        ncp_shapes = [(16384, 10, 512), (16384, 100, 512), (4096, 1000, 2048)]
        knn_shapes = [(1024, 50000, 512), (256, 100000, 2048)]
    print(f"grood {__version__} | torch {torch.__version__} | {platform.processor() or 'cpu'} | "
          f"{torch.get_num_threads()} threads | {date.today().isoformat()} | medians of "
          f"{args.repeat} rounds, op and baselines interleaved\n")
    print("| op | shape | ms | GFLOP/s | torch.mm same FLOPs (ms) | op / mm | one pass x*2 (ms) "
          "| op / pass | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, c, d in ncp_shapes:
        h = torch.rand(n, d, generator=gen)
        protos = torch.rand(c, d, generator=gen)
        p_ood = protos.mean(0)
        _row(args.repeat, f"ncp_gradient | N={n} C={c} D={d}",
             partial(functional.ncp_gradient, h, protos, p_ood), h, protos,
             f"q_ood max rel err {_check_ncp(h, protos, p_ood):.1e}")
    for q, m, d in knn_shapes:
        queries = torch.rand(q, d, generator=gen)
        db = torch.rand(m, d, generator=gen)
        _row(args.repeat, f"knn k=1 | Q={q} M={m} D={d}", partial(functional.knn, queries, db, 1),
             queries, db, f"recall@1 vs fp64 {_check_knn(queries, db):.3f}")


def _row(repeat: int, label: str, op, a: torch.Tensor, b: torch.Tensor, check: str) -> None:
    """Time ``op`` against ``a @ b.T`` (same FLOPs) and one pass over the larger input, the
    three called in turn in every round (medians over the rounds)."""
    big = a if a.numel() >= b.numel() else b
    t_op, t_mm, t_pass = interleaved_median_times(
        [op, partial(torch.mm, a, b.T), partial(torch.mul, big, 2)], "cpu", repeat)
    flops = 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
    print(f"| {label} | {1e3 * t_op:.1f} | {flops / t_op / 1e9:.1f} | {1e3 * t_mm:.1f} | "
          f"{t_op / t_mm:.2f} | {1e3 * t_pass:.1f} | {t_op / t_pass:.2f} | {check} |")

if __name__ == "__main__":
    main()
