"""Byte/FLOP model of each kernel's tile schedule, and its lower-bound time under each roof.

For one launch (the :class:`grood_kernels._launch.KernelLaunch` the launcher makes) it counts:

- ``flops``: the MMA work the tiles execute, padding included (2 per multiply-add);
- ``hbm_bytes``: bytes from and to HBM;
- ``l2_bytes``: bytes the SMs move through L2 (every load and store of a tile, hit or miss);

and the time each needs at its roof. Which operands stay L2-resident is decided by one rule:
the bytes that the programs resident at one time (SMs x CTAs/SM) keep re-reading must fit in
``l2_budget`` — half the L2, because Hopper's L2 is two partitions and data the far partition
holds costs a crossing. Operands that fit are read from HBM once (or once per wave, where the
schedule moves on to new data every wave); operands that do not fit are re-read from HBM.

The model counts MMA FLOPs only: the softmax / top-k epilogue, address arithmetic and latency
are not in it (the SASS counts in the compile report show how heavy the epilogue is). It is a
lower bound on time, not a prediction; a GPU run beats it.
"""

from __future__ import annotations

import math

#: Roofs per target. sm_90a: H200 figures measured on the device (dense GEMM and device copy);
#: the L2 bandwidth is an assumption (12 TB/s SM<->L2 aggregate, the commonly quoted H100 SXM
#: figure). sm_100a: B200 datasheet figures, not measured; its L2 bandwidth is assumed.
ROOFS = {
    "sm_90a": {"device": "H200", "sms": 132, "tflops": {"ieee": 50.0, "tf32": 406.0,
                                                          "tf32x3": 406.0 / 3, "bf16": 765.0},
               "hbm_tbs": 4.13, "l2_tbs": 12.0, "l2_bytes": 50e6, "source": "measured"},
    "sm_100a": {"device": "B200", "sms": 148, "tflops": {"ieee": 80.0, "tf32": 1100.0,
                                                           "tf32x3": 1100.0 / 3, "bf16": 2250.0},
                "hbm_tbs": 8.0, "l2_tbs": 20.0, "l2_bytes": 126e6, "source": "datasheet"},
}


def l2_budget(arch: str) -> float:
    """Bytes of re-read operands the model lets stay L2-resident: half the (H100-sized) L2."""
    return ROOFS[arch]["l2_bytes"] / 2


def describe_roofs() -> str:
    """One line per target: the roofs the model divides by."""
    out = []
    for arch, r in ROOFS.items():
        t = r["tflops"]
        out.append(f"- {arch} model roofs ({r['device']}, {r['source']}; {r['sms']} SMs): "
                   f"fp32 FMA {t['ieee']:.0f}, tf32 {t['tf32']:.0f}, tf32x3 {t['tf32x3']:.0f}, "
                   f"bf16 {t['bf16']:.0f} TFLOP/s; HBM {r['hbm_tbs']} TB/s; L2 {r['l2_tbs']} "
                   f"TB/s (assumed); L2 residency budget {l2_budget(arch) / 1e6:.0f} MB.")
    return "\n".join(out)


def _esize(t) -> int:
    return t.element_size()


def _mode_roof(precision: str) -> str:
    return "bf16" if precision.startswith("bf16") else precision


def finish(flops_exec: float, flops_useful: float, hbm: float, l2: float, precision: str,
           arch: str, waves: float, notes: list[str]) -> dict:
    """Bounds per roof, the binding one, and the best fraction of the compute roof."""
    r = ROOFS[arch]
    compute_ms = flops_exec / (r["tflops"][_mode_roof(precision)] * 1e12) * 1e3
    # Programs of equal work: a last partial wave leaves SMs idle.
    quant = math.ceil(waves) / waves if waves > 0 else 1.0
    bounds = {"compute": compute_ms * quant, "hbm": hbm / (r["hbm_tbs"] * 1e12) * 1e3,
              "l2": l2 / (r["l2_tbs"] * 1e12) * 1e3}
    binding = max(bounds, key=lambda k: bounds[k])
    ideal = flops_useful / (r["tflops"][_mode_roof(precision)] * 1e12) * 1e3
    if quant > 1.001:
        notes.append(f"last wave {100 * (waves - math.floor(waves)):.0f} % full")
    return {"flops": flops_exec, "hbm_bytes": hbm, "l2_bytes": l2,
            "bound_ms": {k: round(v, 4) for k, v in bounds.items()},
            "binding_roof": binding, "structure_fraction": round(ideal / bounds[binding], 3),
            "model_notes": "; ".join(notes)}


def model(kernel: str, launch, dims, precision: str, arch: str, ctas: int) -> dict:
    """The model of one launch; dispatched on the kernel function's name."""
    fn = MODELS.get(launch.fn.__name__)
    if fn is None:
        raise KeyError(f"no traffic model for {launch.fn.__name__}")
    return fn(launch, precision, arch, ctas)


def _ncp_single_pass(launch, precision, arch, ctas):
    """grood 0.1's gradient step: one program per BLOCK_N rows walks every class block.

    Per program: the h tile is read once for ||u||^2, once per class block for the GEMM
    (centred in registers on the way), once for the exact re-rank and once for the gradient;
    every program reads all prototypes; the re-rank gathers 4 prototype rows per feature row.
    """
    h, protos = launch.args[0], launch.args[1]
    n, c, d = launch.args[9], launch.args[10], launch.args[11]
    bn, bc, bd = (launch.constexprs[k] for k in ("BLOCK_N", "BLOCK_C", "BLOCK_D"))
    eh, ep = _esize(h), _esize(protos)
    n_cb = math.ceil(c / bc)
    programs = math.ceil(n / bn)
    conc = ROOFS[arch]["sms"] * ctas
    notes = []
    flops = 2.0 * programs * bn * n_cb * bc * math.ceil(d / bd) * bd
    h_reads = n_cb + 3
    h_bytes = n * d * eh
    l2 = h_bytes * h_reads
    resident = min(conc, programs) * bn * d * eh <= l2_budget(arch)
    hbm = h_bytes * (1 if resident else h_reads)
    notes.append(f"h read {h_reads}x per row tile, "
                 + ("re-reads L2-resident" if resident else "re-reads from HBM (tiles of the "
                    "resident programs exceed the L2 budget)"))
    p_bytes = c * d * ep
    l2 += programs * p_bytes
    waves = programs / conc
    if p_bytes <= l2_budget(arch):
        hbm += p_bytes
    else:
        hbm += math.ceil(waves) * p_bytes
        notes.append("prototypes re-read from HBM every wave")
    rerank = n * 4 * d * ep
    l2 += rerank
    out = n * d * 4 + n * (4 * 4 + 8)
    hbm += out
    l2 += out
    return finish(flops, 2.0 * n * c * d, hbm, l2, precision, arch, waves, notes)


def _knn_split(launch, precision, arch, ctas):
    """grood 0.1's search: program (query block, database split) streams its split; every
    database tile re-loads the query tile; the first grid axis (query blocks) runs fastest."""
    q, x = launch.args[0], launch.args[1]
    n_q, m, d, rows_per_split, split = launch.args[6:11]
    bq, bm, bd = (launch.constexprs[k] for k in ("BLOCK_Q", "BLOCK_M", "BLOCK_D"))
    eq, ex = _esize(q), _esize(x)
    n_qb = math.ceil(n_q / bq)
    tiles = math.ceil(rows_per_split / bm)
    programs = n_qb * split
    conc = ROOFS[arch]["sms"] * ctas
    notes = []
    flops = 2.0 * programs * tiles * bq * bm * math.ceil(d / bd) * bd
    q_tile, x_tile = bq * d * eq, bm * d * ex
    l2 = programs * tiles * (q_tile + x_tile)
    # Resident programs: consecutive query blocks of one or two splits.
    q_resident = min(conc, n_qb) * q_tile <= l2_budget(arch)
    if q_resident:
        hbm = n_q * d * eq * math.ceil(programs / conc)
        notes.append("query tiles L2-resident within a wave")
    else:
        hbm = programs * tiles * q_tile
        notes.append("query tiles of the resident programs exceed the L2 budget: re-read "
                     "from HBM with every database tile")
    db_passes = math.ceil(n_qb / conc)
    hbm += m * d * ex * db_passes
    cand = programs * bq * launch.constexprs["N_CAND"] * 12
    hbm += cand
    l2 += cand
    return finish(flops, 2.0 * n_q * m * d, hbm, l2, precision, arch, programs / conc, notes)


MODELS = {
    "_ncp_gradient_kernel": _ncp_single_pass,
    "_knn_candidates_kernel": _knn_split,
}
