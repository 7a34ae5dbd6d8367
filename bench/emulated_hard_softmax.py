"""The Triton gradient step's errors against float64 where the softmax is hard, in every
precision mode, on the CPU: Triton's interpreter computing bf16 and TF32 as tensor cores do.

The interpreter on its own computes a bf16 ``tl.dot`` from the operands' raw bits (garbage)
and a TF32 one in plain fp32, so the GPU report's hard-softmax table has no interpreter rows
for them. Here the interpreter is patched as the tests patch it (``tests/conftest.py``: fp32
to bf16 rounds to nearest even and bf16 operands are widened to fp32, exactly, before the
dot; TF32 operands are truncated to 10 mantissa bits and tf32x3's split into truncated hi and
lo parts), so each mode's row is the kernels' arithmetic on emulated tensor cores: operand
rounding as on the GPU, accumulation in fp32 in numpy's order (the hardware's order and its
partial-sum truncation differ, so GPU figures may be somewhat larger). The data are
``grood._bench.gradient.hard_softmax_problem`` (C = 1,000, D = 2,048; the nearest prototype
holds a few per cent of the mass), the first ``--rows`` of the GPU report's 2,000; the torch
backend on the same rows is printed beside each row (on the CPU its tf32 is fp32; its bf16
rounds the operands as tensor cores do).

    python bench/emulated_hard_softmax.py --rows 2000   # about 2 minutes a mode on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows of the 2,000 (default 256)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args(argv)
    import conftest  # patches the interpreter's bf16 on import

    from grood import functional
    from grood._bench.gradient import _errors, hard_softmax_problem
    from grood_kernels.ncp_gradient import ncp_gradient

    if not (conftest.INTERPRETER_BF16 and conftest.emulate_tensor_core_tf32(setattr)):
        sys.exit("this triton's interpreter cannot be made to compute bf16 and TF32 as the GPU")
    c, d = args.classes, args.dim
    h, protos, p_ood, ref, q_near = hard_softmax_problem(max(2000, args.rows), c, d, "cpu",
                                                         rows=args.rows)
    print(f"Hard softmax, N = {args.rows}, C = {c}, D = {d} (the nearest prototype's "
          f"probability: median {float(q_near.median()):.3f}, max {float(q_near.max()):.3f}), "
          "errors against float64:\n")
    print("| precision | triton: max rel err grad | max rel err q_ood | pred changed | "
          "torch: max rel err grad | max rel err q_ood |")
    print("|---|---|---|---|---|---|")
    for precision in ("ieee", "tf32x3", "tf32", "bf16"):
        res = ncp_gradient(h, protos, p_ood, precision=precision)
        tri = _errors(res.grad, res.q_ood, res.pred, ref)
        twin = functional.ncp_gradient(h, protos, p_ood, precision=precision)
        tor = _errors(twin.grad, twin.q_ood, twin.pred, ref)
        print(f"| {precision} | {tri[0]:.2e} | {tri[1]:.2e} | {100 * tri[2]:.3f} % | "
              f"{tor[0]:.2e} | {tor[1]:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
