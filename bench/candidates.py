"""How many nearest prototypes must the gradient step re-rank exactly? Errors against float64
and modelled HBM bytes for each candidate count, on the CPU.

The gradient step ranks the classes of each row by a GEMM distance in the chosen precision,
then recomputes the ``N_CAND`` nearest exactly (fp32 differences) and puts those distances in
place of their GEMM estimates in the log-sum-exp, the prediction and ``min_dist``
(``grood_kernels.contract.NCP_CANDIDATES``, 4 today). At C = 21,841 those re-rank gathers
are 40 % of the kernel's modelled HBM bytes (the prototypes do not fit in L2), so the count is
what keeps the kernel above 1.5x the minimum traffic. This script measures what each count
costs in accuracy and what it saves in bytes, so the choice can be made on numbers.

The reduced-precision GEMM is emulated, since the CPU has no tensor cores:

- ``tf32``: both operands rounded to the nearest TF32 value (10 explicit mantissa bits, ties
  away from zero), as the kernels hand them to the MMA (``grood_kernels._prepare.tf32_nearest``,
  ``grood_kernels._dot.round_tf32``; the tensor cores would truncate fp32 data not already
  rounded: mode ``tf32-truncated`` emulates that), the products summed exactly and the sum
  rounded to fp32. Real hardware also truncates partial sums (about 2e-5 in ``q_ood`` on an
  H200 where this model gave 1.4e-5 with truncated operands: ``bench/RESULTS.md``), so its
  errors are somewhat larger.
- ``tf32x3``: each operand split as the kernels split it, ``x = hi + lo`` with ``hi``
  truncated to TF32 and ``lo = x - hi`` (exact in fp32) truncated again by the tensor cores;
  the three products ``hi.hi + hi.lo + lo.hi`` summed exactly, the sum rounded to fp32.
- ``bf16``: both operands rounded to bfloat16 (nearest even), the same summation.
- ``ieee``: fp32 operands, the same summation (an fp32 FMA loop's own rounding is not modelled).

Everything after the GEMM follows the kernel: ``d_c = sqrt(max(||u||^2 + ||P_c||^2 -
2 u.P_c, 0))`` in fp32, the ``N_CAND`` smallest re-computed from fp32 differences, the
log-sum-exp over every class and the OOD term (here in float64, so its own fp32 rounding,
about 1e-7, is left out), the lowest class id on exact ties.

Usage: ``python bench/candidates.py [--tiny] [--out FILE]`` (a Markdown report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from grood._fit import expansion_error_bound
from grood_kernels._prepare import tf32_nearest, tf32_truncated

sys.path.insert(0, str(Path(__file__).resolve().parent))

COUNTS = (1, 2, 3, 4, 8)
MODES = ("ieee", "tf32", "tf32x3", "bf16")


def truncated_tf32(x: Tensor) -> Tensor:
    """``x`` (float32) with its low 13 mantissa bits dropped (sign, exponent and 10 mantissa
    bits kept), in float64: what the tensor cores read of an fp32 operand."""
    return tf32_truncated(x).double()


def rounded(x: Tensor, mode: str) -> Tensor:
    """``x`` (float32) as the GEMM's operand in ``mode``, returned in float64."""
    if mode == "tf32-truncated":
        return truncated_tf32(x)
    if mode == "tf32":  # 10 mantissa bits, to nearest with ties away from zero
        return tf32_nearest(x).double()
    if mode == "bf16":
        return x.bfloat16().double()
    return x.double()


def split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as tf32x3's two operands, in float64: ``hi`` (TF32-truncated, as the
    kernels split it) and ``lo = x - hi`` TF32-truncated, as the tensor cores take it."""
    hi = truncated_tf32(x)
    return hi, truncated_tf32((x.double() - hi).float())


def emulated_dots(u: Tensor, centred: Tensor, mode: str) -> Tensor:
    """The GEMM's ``u . P_c`` [N, C] in fp32 from fp32 ``u`` and centred prototypes."""
    if mode == "tf32x3":
        (u_hi, u_lo), (p_hi, p_lo) = split_tf32(u), split_tf32(centred)
        return (u_hi @ p_hi.T + u_hi @ p_lo.T + u_lo @ p_hi.T).float()
    return (rounded(u, mode) @ rounded(centred, mode).T).float()


def emulated_distances(u: Tensor, centred: Tensor, mode: str) -> Tensor:
    """The GEMM distances [N, C] in fp32 from fp32 ``u`` and centred prototypes."""
    dots = emulated_dots(u, centred, mode)
    d2 = (u * u).sum(1, keepdim=True) + (centred * centred).sum(1)[None] - 2 * dots
    return d2.clamp_min(0).sqrt()


def step(u: Tensor, centred: Tensor, gemm: Tensor, n_cand: int
         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad, q_ood, pred)`` with the ``n_cand`` GEMM-nearest classes re-ranked exactly."""
    order = torch.sort(gemm, dim=1, stable=True).indices[:, :n_cand]  # lowest id on ties
    diff = u[:, None, :] - centred[order]  # fp32 differences, as the kernel's re-rank
    exact = diff.square().sum(2).sqrt()
    dist = gemm.double().scatter(1, order, exact.double())
    d_ood = u.double().norm(dim=1)
    lse = torch.logsumexp(torch.cat([-dist, -d_ood[:, None]], 1), 1)
    q = torch.exp(-d_ood - lse)
    best = exact.argmin(1)  # first minimum: the lower-ranked, lower-id candidate
    pred = order.gather(1, best[:, None])[:, 0]
    return u.double() * (q / d_ood)[:, None], q, pred


#: Relative error of one GEMM operand in each mode: TF32 rounding to nearest keeps 10 of
#: fp32's 23 mantissa bits (half a unit in the 10th bit: <= 2**-11; truncation, 2**-10),
#: bf16 rounding to nearest 7 (half a unit in the 7th bit: <= 2**-8), tf32x3's hi + lo split
#: (lo truncated to TF32 in its turn) 2**-19. ``tf32-truncated``: TF32 operands as the tensor
#: cores read unrounded fp32 (the kernels before they rounded them).
OPERAND_ERROR = {"ieee": 0.0, "tf32": 2.0 ** -11, "tf32x3": 2.0 ** -19, "bf16": 2.0 ** -8,
                 "tf32-truncated": 2.0 ** -10}


def accumulated_terms(mode: str, d: int) -> int:
    """Products the GEMM accumulates in fp32 per dot: ``D``, or ``4 D`` in tf32x3 (its
    K-step carries 4 x BLOCK_D operand columns), as the kernels' bound counts them."""
    return 4 * d if mode == "tf32x3" else d


def gemm_error_bound(u: Tensor, centred: Tensor, mode: str, r: float | None = None) -> Tensor:
    """A bound [N, C] on |GEMM squared distance - exact squared distance|: operand rounding
    (2r + r^2 of sum |u_k P_k| <= |u| |P|, twice in the distance), fp32 accumulation over D
    terms of the dot and of both squared norms (gamma_D = D u / (1 - D u) with u = 2**-23,
    not 2**-24: tensor cores truncate their partial sums), and the
    three fp32 roundings of ``|u|^2 + |P|^2 - 2 u.P``. ``r``: another operand error than
    ``mode``'s."""
    r = OPERAND_ERROR[mode] if r is None else r
    return expansion_error_bound(u.double().norm(dim=1)[:, None],
                                 centred.double().norm(dim=1)[None],
                                 accumulated_terms(mode, u.shape[1]), r)


def gated_step(u: Tensor, centred: Tensor, gemm: Tensor, bound: Tensor, n_cand: int = 4,
               always: int = 2, terms: int | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`step` with ``n_cand`` candidates of which only the first ``always`` are
    re-ranked unconditionally; each later one only where its GEMM squared distance, less the
    error bound, is not above the best exact one of those (computed in fp32, so both sides
    carry a ``gamma_D`` margin), all later ones gated at once, as the kernels do
    (``grood_kernels._ncp_rerank.rerank_and_write``, ``always`` = ``ALWAYS_EXACT`` = 1). A
    skipped candidate provably cannot be the nearest, so ``pred`` and ``min_dist`` are those
    of :func:`step` with ``n_cand``; its term keeps its GEMM estimate in the log-sum-exp.
    ``terms``: the products per dot behind the margin (:func:`accumulated_terms`; default D).
    Returns ``(grad, q_ood, pred, gathered rows per row)``."""
    k = (terms or u.shape[1]) * 2.0 ** -23
    gamma = k / (1 - k)
    order = torch.sort(gemm, dim=1, stable=True).indices[:, :n_cand]
    dist = gemm.double().clone()
    best = torch.full((u.shape[0],), float("inf"), dtype=torch.float64)
    pred = order[:, 0].clone()
    gathered = torch.zeros(u.shape[0], dtype=torch.int64)
    reference_sq = None
    for j in range(n_cand):
        cls = order[:, j]
        if j == always:
            reference_sq = best ** 2  # the gate's reference: the unconditional ones' best
        low = (gemm.gather(1, cls[:, None])[:, 0].double() ** 2
               - bound.gather(1, cls[:, None])[:, 0]) * (1 - 2 * gamma)
        take = (torch.ones_like(gathered, dtype=torch.bool) if reference_sq is None
                else low <= reference_sq)
        exact = (u[take] - centred[cls[take]]).square().sum(1).sqrt().double()
        dist[take.nonzero()[:, 0], cls[take]] = exact
        full = torch.full_like(best, float("inf"))
        full[take] = exact
        better = full < best  # strictly: a later candidate wins no exact tie
        pred = torch.where(better, cls, pred)
        best = torch.minimum(best, full)
        gathered += take.long()
    d_ood = u.double().norm(dim=1)
    lse = torch.logsumexp(torch.cat([-dist, -d_ood[:, None]], 1), 1)
    q = torch.exp(-d_ood - lse)
    return u.double() * (q / d_ood)[:, None], q, pred, gathered


def reference(h: Tensor, protos: Tensor, p_ood: Tensor):
    """float64 ``(grad, q_ood, pred)``."""
    u = h.double() - p_ood.double()
    dist = torch.cdist(u, protos.double() - p_ood.double())
    d_ood = u.norm(dim=1)
    lse = torch.logsumexp(torch.cat([-dist, -d_ood[:, None]], 1), 1)
    q = torch.exp(-d_ood - lse)
    return u * (q / d_ood)[:, None], q, dist.argmin(1), dist


def near_ties(n: int, protos: Tensor, *, seed: int, tie: float = 1e-5
              ) -> tuple[Tensor, list[Tensor]]:
    """Rows tied between 2, 3 or 4 prototypes (a third of the rows each) to ``tie`` of their
    distance: each the point of its prototypes' affine hull equally far from all of them, moved
    by ``tie`` of that distance toward the first, whose class it then is. Its distances to the
    others exceed its own by about ``tie``, far below a TF32 or bf16 GEMM's resolution: only an
    exact re-rank of every tied class gets them right, the case the candidates are kept for.
    Returns the rows (float32) and each row's tied classes, the nearest first. (Another
    prototype may lie nearer than the tied ones; the report counts those rows.)"""
    gen = torch.Generator().manual_seed(seed)
    rows, tied = [], []
    for i in range(n):
        k = 2 + i % 3
        tied.append(torch.randperm(protos.shape[0], generator=gen)[:k])
        chosen = protos[tied[-1]].double()
        # x = p_0 + E a with E's columns p_j - p_0: 2 (p_j - p_0).x = |p_j|^2 - |p_0|^2
        edges = (chosen[1:] - chosen[0]).T
        rhs = 0.5 * (chosen[1:].square().sum(1) - chosen[0].square().sum()) - edges.T @ chosen[0]
        centre = chosen[0] + edges @ torch.linalg.solve(edges.T @ edges, rhs)
        rows.append(centre + tie * (chosen[0] - centre))
    return torch.stack(rows).float(), tied


def errors_table(name: str, h: Tensor, protos: Tensor) -> list[str]:
    """Rows of (mode, N_CAND) errors for one distribution."""
    p_ood = protos.double().mean(0).float()
    u, centred = h.float() - p_ood, protos.float() - p_ood
    g_ref, q_ref, pred_ref, dist_ref = reference(h, protos, p_ood)
    q_near = torch.exp(-dist_ref.min(1).values - torch.logsumexp(
        torch.cat([-dist_ref, -u.double().norm(dim=1)[:, None]], 1), 1))
    lines = [f"**{name}** (N = {h.shape[0]}, C = {protos.shape[0]}, D = {h.shape[1]}; the "
             f"nearest prototype's probability: median {float(q_near.median()):.3f}; feature "
             f"norm {float(h.norm(dim=1).mean()):.1f})", "",
             "| mode | N_CAND | max rel err q_ood | max rel err grad | pred changed | "
             "rows whose nearest is outside the GEMM's N_CAND |", "|---|---|---|---|---|---|"]
    gated_rows = []
    for mode in MODES:
        gemm = emulated_distances(u, centred, mode)
        rank_of_true = (gemm < gemm.gather(1, pred_ref[:, None])).sum(1)
        for n_cand in COUNTS:
            grad, q, pred = step(u, centred, gemm, n_cand)
            q_err = float(((q - q_ref).abs() / q_ref).max())
            g_err = float(((grad - g_ref).norm(dim=1) / g_ref.norm(dim=1)).max())
            changed = float((pred != pred_ref).double().mean())
            missed = float((rank_of_true >= n_cand).double().mean())
            lines.append(f"| {mode} | {n_cand} | {q_err:.2e} | {g_err:.2e} | "
                         f"{100 * changed:.2f} % | {100 * missed:.2f} % |")
            if n_cand == 4:
                pred4 = pred
        bound = gemm_error_bound(u, centred, mode)
        for always in (1, 2):
            grad, q, pred, gathered = gated_step(u, centred, gemm, bound, always=always,
                                                 terms=accumulated_terms(mode, u.shape[1]))
            q_err = float(((q - q_ref).abs() / q_ref).max())
            g_err = float(((grad - g_ref).norm(dim=1) / g_ref.norm(dim=1)).max())
            gated_rows.append(
                f"| {mode} | {always} | {q_err:.2e} | {g_err:.2e} | "
                f"{100 * float((pred != pred_ref).double().mean()):.2f} % | "
                f"{int((pred != pred4).sum())} | {float(gathered.double().mean()):.3f} |")
    return [*lines, "", "Gated: 4 candidates, the first 1 or 2 (`always`) re-ranked in every "
            "row, each later one only where the GEMM's error bound lets it be the nearest:", "",
            "| mode | always | max rel err q_ood | max rel err grad | pred changed | pred "
            "differing from N_CAND = 4 | rows gathered per row |", "|---|---|---|---|---|---|---|",
            *gated_rows, ""]


def fine_grained(n: int, c: int, d: int, *, seed: int, sub: float, groups: int = 1000
                 ) -> tuple[Tensor, Tensor]:
    """``(h, prototypes)``: ``c`` classes in ``groups`` groups (a class hierarchy's leaves:
    breeds of one animal) whose prototypes scatter by ``sub`` around their group's
    post-ReLU-like centre (:func:`grood._bench.common.realistic_features`' centres), and ``n``
    rows scattered by ``sub`` around their class's prototype: a row's nearest classes are its
    group's, their distances close together where ``sub`` is small."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.relu(torch.randn(groups, d, generator=gen)) * 2.0
    protos = torch.relu(centres[torch.arange(c) % groups] + sub * torch.randn(c, d, generator=gen))
    labels = torch.randint(0, c, (n,), generator=gen)
    return torch.relu(protos[labels] + sub * torch.randn(n, d, generator=gen)), protos


#: The gate table's rows: (label, the GEMM's operand rounding, the bound's operand term).
GATE_ROWS = (("tf32, bound 2**-10 (before)", "tf32", 2.0 ** -10),
             ("tf32, bound 2**-11", "tf32", 2.0 ** -11),
             ("tf32 truncated, bound 2**-10", "tf32-truncated", 2.0 ** -10),
             ("bf16, bound 2**-8", "bf16", 2.0 ** -8))


def gate_table(dims: tuple[int, int, int], subs: tuple[float, ...], tile: int = 128
               ) -> list[str]:
    """How often the gate opens (the kernels' ``ALWAYS_EXACT`` = 1) on :func:`fine_grained`
    classes at ``dims`` for each scatter ``sub``: rows that gather more than their
    GEMM-nearest prototype, and tiles of ``tile`` rows (the launcher's at C = 21,841) that run
    the second pass over D, for each of :data:`GATE_ROWS`: TF32 operands rounded to nearest
    (the kernels') under the bound's operand term before (2**-10, a truncated operand's) and
    after (2**-11), operands truncated (as the MMA reads unrounded fp32), and bf16."""
    n, c, d = dims
    lines = [f"Gate on fine-grained classes (N = {n:,}, C = {c:,}, D = {d:,}; 1,000 groups, "
             f"prototypes and rows scattered by `sub` within them; tiles of {tile} rows):", "",
             "| sub | squared gap from the nearest to the 2nd, median (/ `||u||^2`) | "
             "operands, bound | rows gathering > 1 | tiles running the second pass | "
             "rows gathered per row | pred differing from float64 |",
             "|---|---|---|---|---|---|---|"]
    for sub in subs:
        h, protos = fine_grained(n, c, d, seed=5, sub=sub)
        p_ood = protos.double().mean(0).float()
        u, centred = h.float() - p_ood, protos.float() - p_ood
        _, _, pred_ref, dist = reference(h, protos, p_ood)
        two = dist.topk(2, dim=1, largest=False).values.square()
        gap = float(((two[:, 1] - two[:, 0]) / u.double().square().sum(1)).median())
        del dist
        gemms: dict[str, Tensor] = {}  # one emulated GEMM per mode (tf32 has two bounds)
        for label, mode, r in GATE_ROWS:
            if mode not in gemms:
                gemms[mode] = emulated_distances(u, centred, mode)
            gemm = gemms[mode]
            _, _, pred, gathered = gated_step(u, centred, gemm,
                                              gemm_error_bound(u, centred, mode, r), always=1)
            more = gathered > 1
            tiles = more[:n - n % tile].view(-1, tile).any(1)
            lines.append(
                f"| {sub} | {gap:.2e} | {label} | {100 * float(more.double().mean()):.2f} % | "
                f"{int(tiles.sum())} / {tiles.numel()} | {float(gathered.double().mean()):.3f}"
                f" | {int((pred != pred_ref).sum())} |")
    return [*lines, ""]


def hbm_table(dims: tuple[int, int, int]) -> list[str]:
    """The traffic model's HBM bytes of the launcher's gradient step at ``dims`` (sm_90a) for
    each number of prototype rows the re-rank gathers per feature row (1: the kernels where
    the gate stays shut; 4: every candidate, as before the gate, or where every row ties),
    against the minimum (h once, grad once, prototypes once per wave)."""
    import traffic_model

    from grood_kernels.ncp_gradient import compile_launches

    gathers = (1, 2, 3, 4)
    lines = [f"Modelled HBM traffic of the launcher's gradient step, sm_90a, N = {dims[0]:,}, "
             f"C = {dims[1]:,}, D = {dims[2]:,}, by prototype rows gathered per feature row "
             "(`bench/traffic_model.py`; one CTA per SM in the tensor-core modes, three in "
             "ieee, as compiled):", "",
             "| mode | " + " | ".join(f"{g} row{'s' if g > 1 else ''}" for g in gathers) + " |",
             "|---|" + "---|" * len(gathers)]
    real = traffic_model._rerank_rows
    try:
        for mode in ("ieee", "tf32", "tf32x3", "bf16"):
            launch = compile_launches(*dims, mode, configs="launcher")[0]
            cells = []
            for g in gathers:
                traffic_model._rerank_rows = lambda launch, g=g: g
                rec = traffic_model.model("ncp_gradient", launch, dims, mode, "sm_90a",
                                          3 if mode == "ieee" else 1)
                ratio = next(note for note in rec["model_notes"].split("; ")
                             if note.startswith("HBM "))
                cells.append(f"{rec['hbm_bytes'] / 1e9:.2f} GB ({ratio.split()[1]})")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    finally:
        traffic_model._rerank_rows = real
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--out", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    from grood._bench.common import realistic_features
    from grood._bench.gradient import hard_softmax_features

    torch.manual_seed(0)
    n, c, d, big = (48, 60, 32, (64, 300, 32)) if args.tiny else (
        1000, 1000, 2048, (200, 21841, 1024))
    x, y = realistic_features(20 * c if not args.tiny else 600, c, d, seed=0, device="cpu")
    protos = torch.stack([x[y == j].mean(0) for j in range(c)])
    easy, _ = realistic_features(n, c, d, seed=1, device="cpu")
    hard, hard_protos = hard_softmax_features(n, c, d, seed=1, device="cpu")
    many, many_protos = hard_softmax_features(big[0], big[1], big[2], seed=2, device="cpu")
    tied, groups = near_ties(n, protos, seed=3)
    first = torch.stack([g[0] for g in groups])
    held = float((torch.cdist(tied.double(), protos.double()).argmin(1) == first).double().mean())
    out = ["# Exactly re-ranked candidates: accuracy and HBM traffic", "",
           f"torch {torch.__version__}, CPU emulation (see the script's docstring).", ""]
    out += errors_table("Clustered post-ReLU-like features", easy, protos)
    out += errors_table("Hard softmax", hard, hard_protos)
    out += errors_table("Hard softmax, many classes", many, many_protos)
    out += errors_table(f"Near ties (2, 3 or 4 prototypes within 1e-5 of each other; "
                        f"{100 * held:.1f} % of the rows nearest the tied ones), clustered "
                        "prototypes", tied, protos)
    out += gate_table((256, 2000, 64) if args.tiny else (4096, 21841, 1024),
                      (0.05, 0.06, 0.07, 0.08, 0.1, 0.2))
    out += hbm_table((65536, 21841, 1024))
    out += hbm_table((65536, 1000, 2048))
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
