"""Top-k insertion rounds of the search kernel, gated against ungated, on GROOD gradients.

    TRITON_INTERPRET=1 python bench/topk_rounds.py        # on the CPU, under the interpreter
    python bench/topk_rounds.py                           # on a GPU

Fits GROOD on clustered post-ReLU-like features (``grood._bench.common.realistic_features``), then
searches query gradients against the indexed training gradients with the Triton kernel, which
counts the insertion rounds it runs (``insert_rounds``). Ungated, every database tile of every
program runs ``N_CAND`` rounds (argmin, min, argmax and two selects over the whole tile); gated,
a round runs only while some row of the tile still has an entry nearer than its worst
candidate. Results are checked against the torch twin first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from grood import GROOD, functional
from grood._bench.common import realistic_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--sms", type=int, default=None,
                        help="plan the split for this many SMs (default: the device's, or "
                             "132 on the CPU); few SMs give the long per-program streams "
                             "that ImageNet-scale searches have")
    args = parser.parse_args(argv)
    from grood_kernels import knn as kernel

    if args.sms:
        kernel.DEFAULT_SMS = args.sms
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = realistic_features(args.train, args.classes, args.dim, seed=0, device=device)
    q, _ = realistic_features(args.queries, args.classes, args.dim, seed=1, device=device)
    det = GROOD(backend="torch", device=device).fit(x, y)
    database = det.index_.vectors
    queries = functional.ncp_gradient(q, det.class_prototypes_, det.ood_prototype_).grad
    print(f"{database.shape[0]:,} indexed gradients, {queries.shape[0]} queries, "
          f"D = {args.dim}, C = {args.classes}; device {device}\n")
    print("| precision | k | candidates | programs | tiles per program | rounds ungated | "
          "rounds gated | gated / ungated |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in ("ieee", "tf32"):
        for k in (1, 4):
            rounds = torch.zeros(1, dtype=torch.int32, device=device)
            _, idx = kernel.knn(queries, database, k, precision=precision,
                                insert_rounds=rounds)
            _, ref = functional.knn(queries, database, k)
            if not torch.equal(idx, ref):
                print(f"mismatch against the torch twin ({precision}, k = {k})",
                      file=sys.stderr)
                return 1
            launch = kernel.compile_launches(queries.shape[0], database.shape[0],
                                             args.dim, precision, k=k)[0]
            n_cand = launch.constexprs["N_CAND"]
            rows, split = launch.args[10], launch.args[11]
            tiles = sum(-(-min(rows, database.shape[0] - s * rows) // launch.constexprs[
                "BLOCK_M"]) for s in range(split)) * launch.args[12]
            programs = launch.grid[0]
            print(f"| {precision} | {k} | {n_cand} | {programs} | {tiles / programs:,.1f} | "
                  f"{tiles * n_cand:,} | {int(rounds):,} | {int(rounds) / (tiles * n_cand):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
