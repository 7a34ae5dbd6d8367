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
import statistics
import time
from datetime import date

import torch

from grood import __version__, functional


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.small:
        ncp_shapes = [(512, 10, 64), (512, 100, 128)]
        knn_shapes = [(128, 2000, 64)]
    else:
        ncp_shapes = [(16384, 10, 512), (16384, 100, 512), (4096, 1000, 2048)]
        knn_shapes = [(1024, 50000, 512), (256, 100000, 2048)]
    print(f"grood {__version__} | torch {torch.__version__} | {platform.processor() or 'cpu'} | "
          f"{torch.get_num_threads()} threads | {date.today().isoformat()}\n")
    print("| op | shape | ms | GFLOP/s | torch.mm same FLOPs (ms) | op / mm | one pass x*2 (ms) "
          "| check |")
    print("|---|---|---|---|---|---|---|---|")
    for n, c, d in ncp_shapes:
        h = torch.rand(n, d, generator=gen)
        protos = torch.rand(c, d, generator=gen)
        p_ood = protos.mean(0)
        err = _check_ncp(h, protos, p_ood)
        t_op = _time(lambda h=h, p=protos, o=p_ood: functional.ncp_gradient(h, p, o),
                     args.repeat)
        t_mm = _time(lambda h=h, p=protos: h @ p.T, args.repeat)
        t_pass = _time(lambda h=h: h * 2, args.repeat)
        flops = 2.0 * n * c * d
        print(f"| ncp_gradient | N={n} C={c} D={d} | {1e3 * t_op:.1f} | "
              f"{flops / t_op / 1e9:.1f} | {1e3 * t_mm:.1f} | {t_op / t_mm:.2f} | "
              f"{1e3 * t_pass:.1f} | q_ood max rel err {err:.1e} |")
    for q, m, d in knn_shapes:
        queries = torch.rand(q, d, generator=gen)
        db = torch.rand(m, d, generator=gen)
        recall = _check_knn(queries, db)
        t_op = _time(lambda a=queries, b=db: functional.knn(a, b, 1), args.repeat)
        t_mm = _time(lambda a=queries, b=db: a @ b.T, args.repeat)
        t_pass = _time(lambda b=db: b * 2, args.repeat)
        flops = 2.0 * q * m * d
        print(f"| knn k=1 | Q={q} M={m} D={d} | {1e3 * t_op:.1f} | {flops / t_op / 1e9:.1f} | "
              f"{1e3 * t_mm:.1f} | {t_op / t_mm:.2f} | {1e3 * t_pass:.1f} | "
              f"recall@1 vs fp64 {recall:.3f} |")


if __name__ == "__main__":
    main()
