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

The model counts MMA FLOPs only: the softmax / top-k epilogue and latency are not in it (the
SASS counts in the compile report show how heavy the epilogue is). Given the compile report's
K-step issue / MMA ratio (the K-loop's SASS instructions against its HGMMA cycles, sm_90a), the
K-loop's instruction issue is a fourth bound: :func:`with_issue_bound`. It is a lower bound on
time, not a prediction; a GPU run beats it. Beside the bounds, the tile epilogue's instructions
(the report's count for a program that holds one class block) give an estimate of the time they
need to issue, :func:`epilogue_ms`, which the binding roof does not take.
"""

from __future__ import annotations

import math

import torch

from grood._bench.common import PEAKS

#: Roofs per target. sm_90a: H200 figures measured on the device (dense GEMM and device copy;
#: the L2 bandwidth by ``grood bench --only anatomy`` on 2026-12-04: a streaming kernel
#: re-reading a 16 MB buffer 200 times, 8 programs per SM, 16.7 TB/s; 12 TB/s was assumed
#: before). sm_100a: B200 datasheet figures, not measured; its L2 bandwidth is assumed.
ROOFS = {
    "sm_90a": {"device": "H200", "sms": 132, "tflops": {"ieee": 50.0, "tf32": 406.0,
                                                          "tf32x3": 406.0 / 3, "bf16": 765.0},
               "hbm_tbs": 4.13, "l2_tbs": 16.7, "l2_source": "measured", "l2_bytes": 50e6,
               "source": "measured",
               # the datasheet's dense tensor-core peak (grood._bench.common.PEAKS, 989 bf16
               # TFLOP/s at 1,830 MHz): the rate the compile report's issue / MMA ratio counts
               # HGMMA at; tf32x3 at a third, as above
               "mma_peak_tflops": {"tf32": PEAKS["H200"]["tf32"],
                                   "tf32x3": PEAKS["H200"]["tf32"] / 3,
                                   "bf16": PEAKS["H200"]["bf16"]},
               # the SM clock those peaks are quoted at: the tile epilogue's issue estimate
               "clock_ghz": 1.83},
    "sm_100a": {"device": "B200", "sms": 148, "tflops": {"ieee": 80.0, "tf32": 1100.0,
                                                           "tf32x3": 1100.0 / 3, "bf16": 2250.0},
                "hbm_tbs": 8.0, "l2_tbs": 20.0, "l2_source": "assumed", "l2_bytes": 126e6,
                "source": "datasheet"},
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
                   f"TB/s ({r['l2_source']}); L2 residency budget {l2_budget(arch) / 1e6:.0f} MB"
                   + ("" if "mma_peak_tflops" not in r else
                      "; K-loop issue against the dense tensor-core peak (tf32 "
                      f"{r['mma_peak_tflops']['tf32']:.0f}, bf16 "
                      f"{r['mma_peak_tflops']['bf16']:.0f} TFLOP/s)") + ".")
    return "\n".join(out)


def _esize(t) -> int:
    return t.element_size()


def _mode_roof(precision: str) -> str:
    return "bf16" if precision.startswith("bf16") else precision


def finish(flops_exec: float, flops_useful: float, hbm: float, l2: float, precision: str,
           arch: str, waves: float, notes: list[str], before_ms: float = 0.0) -> dict:
    """Bounds per roof, the binding one, and the best fraction of the compute roof.
    ``before_ms``: a pass the launch waits for (its bytes are in ``hbm``), added to every
    bound since nothing overlaps it."""
    r = ROOFS[arch]
    compute_ms = flops_exec / (r["tflops"][_mode_roof(precision)] * 1e12) * 1e3
    # Programs of equal work: a last partial wave leaves SMs idle.
    quant = math.ceil(waves) / waves if waves > 0 else 1.0
    bounds = {"compute": compute_ms * quant + before_ms,
              "hbm": hbm / (r["hbm_tbs"] * 1e12) * 1e3,
              "l2": l2 / (r["l2_tbs"] * 1e12) * 1e3 + before_ms}
    binding = max(bounds, key=lambda k: bounds[k])
    ideal = flops_useful / (r["tflops"][_mode_roof(precision)] * 1e12) * 1e3
    if quant > 1.001:
        notes.append(f"last wave {100 * (waves - math.floor(waves)):.0f} % full")
    return {"flops": flops_exec, "hbm_bytes": hbm, "l2_bytes": l2,
            "bound_ms": {k: round(v, 4) for k, v in bounds.items()},
            "binding_roof": binding, "structure_fraction": round(ideal / bounds[binding], 3),
            "model_notes": "; ".join(notes),
            # unrounded, for with_issue_bound (the JSON report leaves them out)
            "ideal_ms": ideal, "binding_ms": bounds[binding], "wave_quant": quant,
            "before_ms": before_ms}


def with_issue_bound(rec: dict, issue_ratio: float | None, precision: str, arch: str) -> dict:
    """``rec`` (a model of one launch) with the K-loop's instruction issue as a fourth bound,
    ``issue``: the time its MMA takes at the dense tensor-core peak (not the measured roof)
    times ``issue_ratio``, the compile report's K-step issue / MMA ratio, with the same last
    wave. The binding roof and the best fraction follow. Unchanged without a ratio or where
    the target has no peak for the mode (FMA; tcgen05 on sm_100a is not counted)."""
    peak = ROOFS[arch].get("mma_peak_tflops", {}).get(_mode_roof(precision))
    if issue_ratio is None or peak is None:
        return rec
    issue = (issue_ratio * rec["flops"] / (peak * 1e12) * 1e3 * rec["wave_quant"]
             + rec["before_ms"])
    bounds = {**rec["bound_ms"], "issue": round(issue, 4)}
    binding = max(bounds, key=lambda k: bounds[k])
    slowest = max(issue, rec["binding_ms"])
    return {**rec, "bound_ms": bounds, "binding_roof": binding, "binding_ms": slowest,
            "structure_fraction": round(rec["ideal_ms"] / slowest, 3)}


def epilogue_ms(tile_epilogue: int | None, launch, arch: str) -> float | None:
    """The time a launch's tile epilogues need to issue (the compile report's count of SASS
    instructions per warp between a one-block program's K-loop and its hand-off), at one
    instruction per cycle on each of the SM's 4 schedulers, over the programs each SM runs:
    ``ceil(grid / SMs) x count x warps / 4`` cycles at the target's clock. An estimate, not a
    bound the binding roof takes: with one CTA per SM it does not overlap that SM's MMA, but
    other SMs' loads may fill the time; MUFU, SHFL and latency make it longer. None without a
    count or a clock (sm_100a)."""
    clock = ROOFS[arch].get("clock_ghz")
    if tile_epilogue is None or clock is None:
        return None
    programs = math.ceil(math.prod(launch.grid) / ROOFS[arch]["sms"])
    return round(programs * tile_epilogue * launch.num_warps / 4 / (clock * 1e9) * 1e3, 4)


def finish_ms(own_finish: int | None, launch, arch: str) -> float | None:
    """The time the gradient step's own finish needs to issue (the compile report's count of
    SASS instructions per warp that the last program of a row block runs after the hand-off,
    loops counted by their trips), at one instruction per cycle on each of the SM's 4
    schedulers, over the row blocks each SM finishes: ``ceil(row blocks / SMs) x count x
    warps / 4`` cycles at the target's clock. A floor, not a bound the binding roof takes:
    that program runs it alone on its SM (one CTA per SM in the tensor-core modes) while the
    tensor cores wait, and its loads wait on L2 (the H200 took about 1.67 ms for it in tf32
    at ImageNet-1k, 2026-12-04, where this floor is 0.24 ms for triton 3.6's code). None
    without a count or a clock (sm_100a)."""
    clock = ROOFS[arch].get("clock_ghz")
    if own_finish is None or clock is None:
        return None
    row_blocks = math.prod(launch.grid) // launch.args[18]  # (programs: row blocks x groups)
    per_sm = math.ceil(row_blocks / ROOFS[arch]["sms"])
    return round(per_sm * own_finish * launch.num_warps / 4 / (clock * 1e9) * 1e3, 4)


def model(kernel: str, launch, dims, precision: str, arch: str, ctas: int,
          issue_ratio: float | None = None, tile_epilogue: int | None = None,
          own_finish: int | None = None) -> dict:
    """The model of one launch; dispatched on the kernel function's name. ``issue_ratio`` (the
    compile report's, where it has one) adds the K-loop's issue bound, ``tile_epilogue`` the
    epilogue's issue estimate (:func:`epilogue_ms`), ``own_finish`` the gradient step's
    finish's (:func:`finish_ms`)."""
    fn = MODELS.get(launch.fn.__name__)
    if fn is None:
        raise KeyError(f"no traffic model for {launch.fn.__name__}")
    rec = with_issue_bound(fn(launch, precision, arch, ctas), issue_ratio, precision, arch)
    return {**rec, "epilogue_ms": epilogue_ms(tile_epilogue, launch, arch),
            "finish_ms": finish_ms(own_finish, launch, arch)}


def _rerank_rows(launch) -> int:
    """Prototype rows the gradient step's re-rank gathers per feature row: every candidate's
    where the launch does not gate it (no ``RERANK_GATE``); where it does and no classes tie
    within the GEMM's error bound, the GEMM-nearest candidate's (the others only where that
    bound lets them be nearer; see ``grood_kernels._ncp_rerank.rerank_and_write``)."""
    from grood_kernels._ncp_rerank import ALWAYS_EXACT

    n_cand = launch.constexprs["N_CAND"]
    if not launch.constexprs.get("RERANK_GATE"):
        return n_cand
    return min(n_cand, int(getattr(ALWAYS_EXACT, "value", ALWAYS_EXACT)))


def _ncp_class_groups(launch, precision, arch, ctas):
    """The gradient step: program (row block, class group), group fastest; the last program of
    a row block merges the groups' partials, re-ranks and writes the gradient.

    Per program and class block: the feature tile (BLOCK_N x D) and the prepared prototype tile
    (BLOCK_C x D_pad) go through L2. The feature tile comes from HBM once when the row tiles of
    the resident programs (resident / n_groups row blocks) fit the L2 budget; the prepared
    prototypes once, or once per wave when they do not fit. The finishing program reads its
    row tile twice more (exact re-rank, gradient) from L2, gathers the raw prototype rows of
    the candidates it re-ranks (:func:`_rerank_rows` per feature row; all ``N_CAND`` where
    classes tie within the GEMM's error, a worst case the notes give too), and writes the
    gradient.
    """
    h, op, protos = launch.args[0], launch.args[1], launch.args[2]
    n, c, d = launch.args[13], launch.args[14], launch.args[15]
    groups = launch.args[18]
    # tf32x3 runs one tf32 GEMM over 4 x D (u_hi, u_lo against P_hi, P_lo): 4/3 of the work
    # the tf32x3 roof (tf32 / 3) assumes.
    k_factor = op.shape[1] / (math.ceil(d / 64) * 64)
    bn, bc, bd = (launch.constexprs[k] for k in ("BLOCK_N", "BLOCK_C", "BLOCK_D"))
    n_cand = launch.constexprs["N_CAND"]
    eh, eo, ep = _esize(h), _esize(op), _esize(protos)
    n_cb, n_rb = math.ceil(c / bc), math.ceil(n / bn)
    d_pad = math.ceil(d / bd) * bd
    programs = n_rb * groups
    conc = ROOFS[arch]["sms"] * ctas
    waves = programs / conc
    budget = l2_budget(arch)
    notes = [f"{groups} class group(s)"]
    flops = 2.0 * n_rb * bn * n_cb * bc * d_pad * (4 / 3 if k_factor > 1 else 1)
    h_bytes, op_bytes = n * d * eh, op.shape[0] * op.shape[1] * eo
    l2 = n_rb * n_cb * (bn * d * eh + bc * d_pad * k_factor * eo)
    resident = min(conc, programs) / groups * bn * d * eh <= budget
    hbm = h_bytes if resident else h_bytes * (n_cb / groups + 2)
    if not resident:
        notes.append("row tiles of the resident programs exceed the L2 budget")
    p_passes = 1 if op_bytes <= budget else math.ceil(waves)
    hbm += op_bytes * p_passes
    if p_passes > 1:
        notes.append(f"prepared prototypes streamed from HBM once per wave ({p_passes} waves)")
    part = groups * n * (4 * (2 + n_cand) + 4 * n_cand)
    if not launch.constexprs.get("FINISH", 1):  # the finish is a launch of its own
        hbm += part
        l2 += part
        minimum = h_bytes + op_bytes * p_passes
        notes.append("partials only (the finish runs after it); HBM "
                     f"{hbm / minimum:.2f}x the minimum (h once, prototypes once per wave)")
        return finish(flops, 2.0 * n * c * d, hbm, l2, precision, arch, waves, notes)
    rerank = _rerank_rows(launch)
    l2 += 2 * part + 2 * h_bytes + rerank * n * d * ep
    hbm += part
    missed = c * d * ep > budget  # gathered rows of prototypes that do not stay in L2
    if missed:
        hbm += rerank * n * d * ep
    out = n * d * 4 + n * (4 * 4 + 8)
    hbm += out
    l2 += out
    minimum = h_bytes + n * d * 4 + op_bytes * p_passes
    notes.append(f"HBM {hbm / minimum:.2f}x the minimum (h once, grad once, prototypes once "
                 "per wave)")
    if missed and n_cand > rerank:
        worst = hbm + (n_cand - rerank) * n * d * ep
        notes.append(f"{worst / minimum:.2f}x where every row's {n_cand} candidates tie within "
                     "the GEMM's error")
    return finish(flops, 2.0 * n * c * d, hbm, l2, precision, arch, waves, notes)


def _ncp_single_read(launch, precision, arch, ctas):
    """The gradient step's single-read variant: one program per row tile holds the tile in
    registers from load to store; every class in one block. Per program: the feature tile and
    the prepared operand (all classes, D_PAD wide) through L2, 4 gathered raw prototype rows
    per feature row, the gradient written once. The prototypes fit L2 wherever it applies, so
    HBM sees h once, the operand once, the gradient once."""
    h, op, protos = launch.args[0], launch.args[1], launch.args[2]
    n, c, d = launch.args[10], launch.args[11], launch.args[12]
    bn, bc, dp = (launch.constexprs[k] for k in ("BLOCK_N", "BLOCK_C", "D_PAD"))
    n_cand = launch.constexprs["N_CAND"]
    eh, eo, ep = _esize(h), _esize(op), _esize(protos)
    n_rb = math.ceil(n / bn)
    conc = ROOFS[arch]["sms"] * ctas
    waves = n_rb / conc
    flops = 2.0 * n_rb * bn * bc * dp
    h_bytes, op_bytes = n * d * eh, bc * dp * eo
    out = n * d * 4 + n * (4 * 4 + 8)
    l2 = n_rb * (bn * d * eh + op_bytes) + n_cand * n * d * ep + out
    hbm = h_bytes + min(op.shape[0], bc) * op.shape[1] * eo + c * d * ep + out
    minimum = h_bytes + n * d * 4 + min(op.shape[0], bc) * op.shape[1] * eo
    notes = ["single read (tile held in registers)",
             f"HBM {hbm / minimum:.2f}x the minimum (h once, grad once, prototypes once "
             "per wave)"]
    return finish(flops, 2.0 * n * c * d, hbm, l2, precision, arch, waves, notes)


def _ncp_exact(launch, precision, arch, ctas):
    """The gradient step without a GEMM (:mod:`grood_kernels._ncp_exact`): each program reads
    its row tile once per block of classes (the distances; ``||u||^2`` with the first) and once
    more for the gradient, and the prototypes' rows of every block; two FMA-pipe operations
    (a difference, a fused multiply-add: 4 FLOP at the FMA roof) per row, class and element,
    padding included, in every mode. Where the row tiles of the programs resident at one time
    fit the L2 budget the re-reads hit L2; otherwise the model takes them from HBM."""
    h, protos = launch.args[0], launch.args[1]
    n, c, d = launch.args[8], launch.args[9], launch.args[10]
    bn, bc = launch.constexprs["BLOCK_N"], launch.constexprs["BLOCK_C"]
    eh, ep = _esize(h), _esize(protos)
    n_rb, n_cb = math.ceil(n / bn), math.ceil(c / bc)
    conc = ROOFS[arch]["sms"] * ctas
    waves = n_rb / conc
    flops = 4.0 * n_rb * bn * n_cb * bc * d
    h_bytes, p_bytes = n * d * eh, c * d * ep
    out = n * d * 4 + n * (4 * 4 + 8)
    passes = n_cb + 1
    resident = bn * d * eh * min(conc, n_rb) <= l2_budget(arch)
    hbm = h_bytes * (1 if resident else passes) + p_bytes + out
    l2 = passes * h_bytes + n_rb * n_cb * bc * d * ep + out
    minimum = h_bytes + n * d * 4 + p_bytes
    notes = ["no GEMM: every class by fp32 differences on the FMA pipe, in every mode",
             f"row tiles read {passes}x (" + ("from L2 after the first" if resident
                                              else "from HBM: past the L2 budget") + ")",
             f"HBM {hbm / minimum:.2f}x the minimum (h once, grad once, prototypes once)"]
    return finish(flops, 4.0 * n * c * d, hbm, l2, "ieee", arch, waves, notes)


def _knn_grouped(launch, precision, arch, ctas):
    """Exact search: program (query block, database split) streams its split; programs run in
    groups of GROUP_Q query blocks x every split, query block fastest.

    Per program and database tile: the query tile and the database tile go through L2. Each
    database tile is read from HBM once per query group (the group's programs running together
    share it); the group's query tiles stay L2-resident while it streams. Each program writes
    its candidate list once; the merge and exact re-rank that read them are the next launch
    (:func:`_knn_merge`).
    """
    q, x = launch.args[0], launch.args[1]
    n_q, m, d, rows_per_split, split, n_qb = launch.args[7:13]
    bq, bm, bd, group_q, n_cand = (launch.constexprs[k] for k in (
        "BLOCK_Q", "BLOCK_M", "BLOCK_D", "GROUP_Q", "N_CAND"))
    eq, ex = _esize(q), _esize(x)
    tiles = math.ceil(rows_per_split / bm)
    programs = n_qb * split
    conc = ROOFS[arch]["sms"] * ctas
    notes = []
    flops = 2.0 * programs * tiles * bq * bm * math.ceil(d / bd) * bd
    l2 = programs * tiles * (bq * d * eq + bm * d * ex)
    groups = math.ceil(n_qb / group_q)
    q_resident = min(group_q, n_qb) * bq * d * eq <= l2_budget(arch)
    hbm = n_q * d * eq if q_resident else programs * tiles * bq * d * eq
    if not q_resident:
        notes.append("a group's query tiles exceed the L2 budget")
    hbm += m * d * ex * groups
    notes.append(f"database read {groups}x from HBM ({groups} query group(s) of {group_q} "
                 "blocks)")
    before = 0.0
    if precision == "bf16" and x.dtype == torch.bfloat16:  # the launcher's copy of fp32 rows
        cast = m * d * (4 + 2)  # fp32 read, bf16 written, before the kernel starts
        before = cast / (ROOFS[arch]["hbm_tbs"] * 1e12) * 1e3
        hbm += cast
        notes.append(f"rows cast to bf16 first (grood_kernels.knn.casts_database): "
                     f"{cast / 1e9:.2f} GB, {before:.3f} ms added to every bound")
    cand = programs * bq * n_cand * 8
    hbm += cand
    l2 += cand
    return finish(flops, 2.0 * n_q * m * d, hbm, l2, precision, arch, programs / conc, notes,
                  before_ms=before)


def _knn_merge(launch, precision, arch, ctas):
    """The search's fused merge and exact re-rank: per query, the splits' candidate lists
    (distance + id) are read, ``N_KEEP`` exact rows gathered (from HBM: random rows of an index
    far larger than L2), the query row read once, k results written. Its arithmetic (3 FMA-pipe
    operations per gathered element) runs on the CUDA cores; it is a memory-bound step."""
    q, x = launch.args[0], launch.args[1]
    n_q, w, d, k = launch.args[6:10]
    n_keep = launch.constexprs["N_KEEP"]
    gathered = n_q * n_keep * d * _esize(x)
    hbm = n_q * w * 8 + n_q * d * _esize(q) + gathered + n_q * k * 12
    flops = 3.0 * n_q * n_keep * d
    notes = [f"{n_keep} exact rows gathered per query; memory-bound by design"]
    return finish(flops, flops, hbm, hbm, "ieee", arch, launch.grid[0] / (ROOFS[arch]["sms"]
                                                                          * ctas), notes)


def _centre_rows(launch, precision, arch, ctas):
    """The gradient step's staged pre-pass: ``h`` read once, ``u`` written once into the
    gradient's rows (fp32; in bf16 as bf16 rows, in the first half of each gradient row's
    bytes), ``||u||^2`` per row. Its arithmetic (3 FMA-pipe operations per element) runs on
    the CUDA cores; memory-bound by design. The kernel after it reads those rows as its A
    operand."""
    h, u, op = launch.args[0], launch.args[2], launch.args[4]
    n, d = launch.args[5], launch.args[6]
    bf16_rows = launch.constexprs["BF16_ROWS"]
    hbm = n * d * (_esize(h) + _esize(op if bf16_rows else u)) + n * 4
    flops = 3.0 * n * d
    notes = ["centred rows for the staged gradient step; memory-bound by design"]
    return finish(flops, flops, hbm, hbm, "ieee", arch,
                  launch.grid[0] / (ROOFS[arch]["sms"] * ctas), notes)


def _ncp_epilogue(launch, precision, arch, ctas):
    """The split gradient step's epilogue over one chunk of rows: its fp32 GEMM results read
    once, the centred rows (the gradient's, written by the pre-pass) read twice (exact re-rank,
    gradient) and written once scaled, the re-ranked candidates' raw prototype rows gathered
    (:func:`_rerank_rows` per feature row; from L2 where the prototypes fit the budget, else
    from HBM). With ``FINISH=0`` (the finish apart) it reads the results and ``||u||^2`` and
    writes the rows' partials only: the finish kernel after the chunks does the rest. The
    GEMM before it runs in the BLAS
    (cuBLAS on a GPU) and is not modelled: it reads the rows and the prototypes and writes the
    results this kernel reads."""
    dots, protos = launch.args[0], launch.args[1]
    r, c, d = launch.args[12], launch.args[14], launch.args[15]
    n_cand = launch.constexprs["N_CAND"]
    ep = _esize(protos)
    results = r * dots.shape[1] * _esize(dots)  # (C padded to whole class blocks)
    notes = ["split variant: the GEMM runs in the BLAS before this kernel (not modelled)"]
    if not launch.constexprs.get("FINISH", 1):
        hbm = results + r * 4 + r * (2 + 2 * n_cand) * 4
        notes.append("finish apart: the rows' partials written; memory-bound by design")
        return finish(8.0 * r * c, 8.0 * r * c, hbm, hbm, "ieee", arch,
                      launch.grid[0] / (ROOFS[arch]["sms"] * ctas), notes)
    rerank = _rerank_rows(launch)
    gathered = rerank * r * d * ep
    rows = 3 * r * d * 4
    out = r * (4 * 4 + 8)
    hbm = results + rows + out + (gathered if c * d * ep > l2_budget(arch) else c * d * ep)
    l2 = results + rows + out + gathered
    flops = 3.0 * r * rerank * d + 8.0 * r * c
    notes.append(f"{rerank} exact row(s) gathered per feature row (up to {n_cand} where "
                 "classes tie within the GEMM's error); memory-bound by design")
    return finish(flops, flops, hbm, l2, "ieee", arch,
                  launch.grid[0] / (ROOFS[arch]["sms"] * ctas), notes)


def _ncp_finish(launch, precision, arch, ctas):
    """The gradient step's finish as a launch of its own (after the class-group kernel with
    ``FINISH=0``): per row, the class groups' partials read once; the row (``h``, or with
    ``STAGED`` the centred fp32 rows in the gradient's, scaled in place) read twice, the second
    time from L2 where the resident programs' tiles, read and written, fit the L2 budget (the
    launcher sizes the grid so: ``grood_kernels._ncp_finish.finish_programs``); the re-ranked
    candidates' raw prototype rows gathered (:func:`_rerank_rows` per feature row; from L2
    where the prototypes fit the budget); the gradient and the results written. Its
    arithmetic (3 FMA-pipe operations per gathered element) runs on the CUDA cores;
    memory-bound by design."""
    h, protos, part_f, part_i = (launch.args[i] for i in (0, 1, 3, 4))
    n, c, d = launch.args[12], launch.args[13], launch.args[14]
    bn, n_cand = launch.constexprs["BLOCK_N"], launch.constexprs["N_CAND"]
    row_e = 4 if launch.constexprs["STAGED"] else _esize(h)
    ep = _esize(protos)
    budget = l2_budget(arch)
    conc = ROOFS[arch]["sms"] * ctas
    part = part_f.numel() * _esize(part_f) + part_i.numel() * _esize(part_i)
    rerank = _rerank_rows(launch)
    gathered = rerank * n * d * ep
    tiles = -(-n // bn)
    resident = min(launch.grid[0], conc) * bn * d * (row_e + 4) <= budget
    out = n * d * 4 + n * (4 * 4 + 8)
    hbm = part + n * d * row_e * (1 if resident else 2) + out
    hbm += gathered if c * d * ep > budget else c * d * ep
    l2 = part + 2 * n * d * row_e + gathered + out
    flops = 3.0 * n * (rerank + 1) * d
    notes = [f"finish apart: {launch.grid[0]} programs over {tiles} row tiles",
             "row tiles re-read from L2" if resident else
             "row tiles of the resident programs exceed the L2 budget: rows read twice",
             f"{rerank} exact row(s) gathered per feature row (up to {n_cand} where classes "
             "tie within the GEMM's error); memory-bound by design"]
    # programs that loop over row tiles all work to the end: no partial last wave
    waves = launch.grid[0] / conc if launch.grid[0] >= tiles else 1.0
    return finish(flops, flops, hbm, l2, "ieee", arch, waves, notes)


MODELS = {
    "_ncp_finish_kernel": _ncp_finish,
    "_centre_rows_kernel": _centre_rows,
    "_ncp_epilogue_kernel": _ncp_epilogue,
    "_ncp_gradient_kernel": _ncp_class_groups,
    "_ncp_single_read_kernel": _ncp_single_read,
    "_ncp_exact_kernel": _ncp_exact,
    "_knn_candidates_kernel": _knn_grouped,
    "_merge_rerank_kernel": _knn_merge,
}
