"""The gradient step's errors against float64 from its GEMM's operand rounding alone, per way
of feeding the tensor cores, on the CPU.

Tensor cores read an fp32 operand of a TF32 GEMM by its top 19 bits: truncated, so on
features of one sign every product errs the same way and the errors add up over D. The
kernels now round the prepared prototypes and the feature tile they centre in registers to
the nearest TF32 value first, and so does the staged variant's pre-pass with the rows it
writes (they reached the MMA truncated before 2026-12-05: the "staged" row below). A
third way would run the GEMM on raw ``h`` (``u . P_c = (h . P_c) / scale - p_o . P_c``, the
per-class term once in fp32), handing ``h`` to the tensor cores as loaded with no pre-pass
and no centring; its rounding grows by about ``||h|| / ||u||``.

Each variant's arithmetic is emulated in float64 after rounding the GEMM's operands its way
(TF32 truncated to 10 mantissa bits, as ``tests/conftest.py`` emulates tensor cores, or
rounded to nearest; bf16 rounded to nearest even), so the rows isolate the operand rounding;
the rest follows the kernels: GEMM distances for every class, the 4 GEMM-nearest re-ranked
exactly (their GEMM terms replaced in the sum), the OOD term exact, q_ood from the
log-sum-exp. Errors are against the float64 twin (:func:`grood.functional.ncp_gradient`);
the gradient's relative error is q_ood's (it is ``q_ood * u / ||u||``). Two data sets at
C = 1,000, D = 2,048: the GPU report's hard-softmax problem (the nearest prototype holds a few
per cent of the mass) and clustered post-ReLU features (``realistic_features``), far from the
origin as penultimate activations are.

    python bench/operand_rounding.py --rows 2000     # under a minute on 2 cores
"""

from __future__ import annotations

import argparse

import torch

N_CAND = 4  # the kernels' candidates re-ranked exactly


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 values truncated to TF32's 10 mantissa bits: what tensor cores read of an fp32
    operand (``tests/conftest.py`` emulates them so)."""
    from grood_kernels._prepare import tf32_truncated

    return tf32_truncated(x.float())


def tf32_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest TF32 value, as the kernels round the prepared
    prototypes and the feature tile they centre in registers."""
    from grood_kernels._prepare import tf32_nearest

    return tf32_nearest(x.float())


def bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to bf16 (nearest even), as the bf16 GEMM's operands are."""
    return x.float().to(torch.bfloat16).float()


#: (precision, variant, A operand: "u" or "h", its rounding, the prototypes' rounding)
VARIANTS = [
    ("tf32", "centred, both truncated (the kernels before rounding)", "u", tf32_truncated,
     tf32_truncated),
    ("tf32", "centred in registers, both rounded (launcher)", "u", tf32_rounded,
     tf32_rounded),
    ("tf32", "centred rows as loaded, truncated (staged, before its rows were rounded)", "u",
     tf32_truncated, tf32_rounded),
    ("tf32", "raw h as loaded, cross term", "h", tf32_truncated, tf32_rounded),
    ("bf16", "centred", "u", bf16, bf16),
    ("bf16", "raw h, cross term", "h", bf16, bf16),
]


def emulated_q_ood(h: torch.Tensor, protos: torch.Tensor, p_ood: torch.Tensor, a_side: str,
                   round_a, round_p) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_ood, pred)`` of the gradient step with its GEMM's operands rounded by ``round_a``
    and ``round_p``: the A operand the centred rows ``u`` (``a_side="u"``, the kernels as they
    are) or ``h`` as loaded with the per-class term ``p_o . P_c`` subtracted after
    (``"h"``)."""
    from grood_kernels.contract import ncp_scale

    scale = ncp_scale(protos, p_ood)  # a power of two: h / scale is exact
    p_o = p_ood.float() / scale
    operand = protos.float() / scale - p_o  # the prepared prototypes, (p_c - p_o) / scale
    u = h.float() / scale - p_o  # fp32, as the kernels centre it
    u64, op64 = u.double(), operand.double()
    if a_side == "h":
        cross = (round_a(h).double() / scale) @ round_p(operand).double().T
        dots = cross - (p_o.double() @ op64.T)[None, :]
    else:
        dots = round_a(u).double() @ round_p(operand).double().T
    u_sq = (u64 * u64).sum(1)
    p_sq = (op64 * op64).sum(1)
    dist = (u_sq[:, None] - 2.0 * dots + p_sq[None, :]).clamp_min(0.0).sqrt() * scale
    cand = dist.topk(N_CAND, dim=1, largest=False).indices
    exact = (u64[:, None, :] - op64[cand]).norm(dim=2) * scale
    dist = dist.scatter(1, cand, exact)
    d_ood = u64.norm(dim=1) * scale
    logits = torch.cat([-dist, -d_ood[:, None]], dim=1)
    q = torch.exp(-d_ood - torch.logsumexp(logits, dim=1))
    pred = cand.gather(1, exact.argmin(1, keepdim=True)).squeeze(1)
    return q, pred


def rows_of(h, protos, p_ood) -> list[tuple[str, str, float, float, float]]:
    """Per variant: (precision, variant, max and 99.9th-percentile relative error of q_ood,
    share of changed predictions) against the float64 twin."""
    from grood import functional

    ref = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
    out = []
    for precision, variant, a_side, round_a, round_p in VARIANTS:
        q, pred = emulated_q_ood(h, protos, p_ood, a_side, round_a, round_p)
        err = ((q - ref.q_ood) / ref.q_ood).abs()
        out.append((precision, variant, float(err.max()), float(err.quantile(0.999)),
                    float((pred != ref.pred).double().mean())))
    return out


def norm_ratio(h: torch.Tensor, p_ood: torch.Tensor) -> tuple[float, float]:
    """Median and max of ``||h|| / ||h - p_ood||`` over the rows: the factor the raw GEMM's
    rounding grows by."""
    r = h.double().norm(dim=1) / (h.double() - p_ood.double()).norm(dim=1)
    return float(r.median()), float(r.max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500, help="feature rows (default 500)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args(argv)
    from grood._bench.common import clustered_problem
    from grood._bench.gradient import hard_softmax_features

    n, c, d = args.rows, args.classes, args.dim
    hard_h, hard_p = hard_softmax_features(max(2000, n), c, d, seed=1, device="cpu")
    sets = [("hard softmax", hard_h[:n], hard_p),
            ("clustered post-ReLU", *clustered_problem(n, c, d, "cpu"))]
    print(f"The GEMM's operands rounded each way (emulated), N = {n}, C = {c}, D = {d}; "
          "errors against float64:\n")
    print("| data | ||h|| / ||u|| median, max | precision | GEMM operands | "
          "max rel err q_ood (= grad's) | 99.9th percentile | pred changed |")
    print("|---|---|---|---|---|---|---|")
    for name, h, protos in sets:
        p_ood = protos.double().mean(0).float()
        med, top = norm_ratio(h, p_ood)
        for precision, variant, err, p999, changed in rows_of(h, protos, p_ood):
            print(f"| {name} | {med:.2f}, {top:.2f} | {precision} | {variant} | {err:.2e} | "
                  f"{p999:.2e} | {100 * changed:.3f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
