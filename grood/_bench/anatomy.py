"""``grood bench --only anatomy``: the gradient step taken apart at the launcher's tiles.

First the device's memory roofs as a streaming kernel sees them (:func:`memory_roofs_table`:
read bandwidth from L2 and from HBM, and a device copy), the figures the compile report's model
divides by. Then where the step's time goes, from kernels that each stop at one stage, timed in
turns on the same inputs: the distance GEMM alone in torch (cuBLAS on a GPU) on the centred
operands; the kernel's K-loop alone (:func:`_kloop_kernel`: the shipped class-block GEMM, every
class block of every program, row maxima written), with the feature tile centred in registers
and, as the staged variant loads it, from the pre-pass's rows; that pre-pass alone; the whole
kernel without its finish (K-loop, softmax, candidates, partial results written: ``FINISH=0``),
and so again with the first tile's candidates by insertion where the launcher takes them by
``first_nearest`` (``ONE_BLOCK=0``: what that shorter tile epilogue saves); the whole step with
the finish's loops not pipelined (``FINISH=1``; the launcher pipelines them in the tensor-core
modes) and with its passes over D plain (``LEAN=0``, where the launcher runs them lean:
:func:`grood_kernels._ncp_configs.lean_finish`); the whole step, staged, split (the GEMM in
torch, then a Triton epilogue) and the launcher's. Where the launcher is the split variant
(``ieee`` on a GPU) the ``FINISH`` and ``LEAN`` stages are left out: its epilogue finishes its
rows itself. The differences between rows are the stages' costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import triton
import triton.language as tl

from grood._bench.common import interleaved_median_times
from grood._bench.configs import failed, in_shard, launch_step, tuning_problems
from grood._bench.gradient import torch_gemm
from grood_kernels import _ncp_configs, _ncp_kernel, _ncp_plan
from grood_kernels._launch import (
    KernelLaunch,
    one_block_target,
    run,
    sm_count,
    target_major,
)
from grood_kernels.contract import DOT_MODES


@triton.jit
def _kloop_kernel(
    h_ptr, op_ptr, pood_ptr, psq_ptr, out_ptr,
    N, C, D, inv_scale, n_groups, blocks_per_group,
    stride_hn, stride_hd, stride_oc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr, STAGED: tl.constexpr,
):
    """The gradient step's GEMM alone: the same grid and class blocks per program, the same
    K-loop (``_class_block_dots``), each row's largest shifted dot product written per class
    group (so nothing is optimised away), no softmax, candidates or finish."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // n_groups
    group = pid % n_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cb0 = group * blocks_per_group
    cb1 = tl.minimum(cb0 + blocks_per_group, tl.cdiv(C, BLOCK_C))
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for cb in range(cb0, cb1):
        dots, _ = _ncp_kernel._class_block_dots(
            h_ptr, op_ptr, pood_ptr, psq_ptr, offs_n, mask_n, cb * BLOCK_C, C, D, inv_scale,
            stride_hn, stride_hd, stride_oc, BLOCK_N, BLOCK_C, BLOCK_D, DOT_MODE, False, STAGED)
        best = tl.maximum(best, tl.max(dots, axis=1))
    tl.store(out_ptr + group * N + offs_n, best, mask=mask_n)


def _kloop_launch(rows: torch.Tensor, prep, n: int, c: int, d: int, precision: str, cfg,
                  out: torch.Tensor, staged: bool) -> KernelLaunch:
    per_group = triton.cdiv(triton.cdiv(c, cfg.block_cols), cfg.n_split)
    return KernelLaunch(
        _kloop_kernel, (triton.cdiv(n, cfg.block_rows) * cfg.n_split,),
        (rows, prep.operand, prep.p_o, prep.sq_norms, out, n, c, d, 1.0 / prep.scale,
         cfg.n_split, per_group, rows.stride(0), rows.stride(1), prep.operand.stride(0)),
        {"BLOCK_N": cfg.block_rows, "BLOCK_C": cfg.block_cols, "BLOCK_D": cfg.block_d,
         "DOT_MODE": DOT_MODES[precision], "STAGED": int(staged)},
        cfg.num_warps, cfg.num_stages)


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, passes, BLOCK: tl.constexpr):
    """Each program reads its grid-stride share of ``x`` [n] ``passes`` times and writes its
    sums (so no load is optimised away): with a buffer that fits L2, every pass after the first
    is served by L2."""
    offs = tl.arange(0, BLOCK)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(passes):
        for start in range(tl.program_id(0) * BLOCK, n, step):
            acc += tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + offs, acc)


#: (label, buffer bytes, passes) of the memory-roof measurements, full size and tiny: an L2-sized
#: buffer re-read (16 MB: within one of the H100/H200 L2's two 25 MB partitions' worth), and one
#: far larger than any L2 read once.
READ_ROOFS = {False: [("L2: 16 MB re-read 200 times", 16 << 20, 200),
                      ("HBM: 2 GiB read once", 2 << 30, 1)],
              True: [("L2: 64 KB re-read 4 times", 64 << 10, 4),
                     ("HBM: 1 MB read once", 1 << 20, 1)]}
READ_BLOCK, READ_PROGRAMS_PER_SM = 2048, 8


def memory_roofs_table(device: str, tiny: bool, repeat: int = 3) -> Iterator[str]:
    """Markdown rows: read bandwidth from L2 and from HBM, and a device copy, measured here.
    The compile report's model divides by an assumed L2 bandwidth (12 TB/s) and an HBM copy
    bandwidth measured on an H200; these rows say what this device does (the model's L2 roof
    is only as good as the first row)."""
    yield "| memory roof | bytes moved | ms | TB/s |"
    yield "|---|---|---|---|"
    sms = sm_count(torch.device(device))
    programs = 4 if tiny or sms is None else READ_PROGRAMS_PER_SM * sms
    out = torch.empty(programs * READ_BLOCK, device=device)
    fns: list[Callable[[], object]] = []
    moved: list[int] = []
    labels: list[str] = []
    for label, nbytes, passes in READ_ROOFS[tiny]:
        x = torch.ones(nbytes // 4, device=device)
        launch = KernelLaunch(_read_kernel, (programs,), (x, out, x.numel(), passes),
                              {"BLOCK": READ_BLOCK}, 8, 1)
        fns.append(partial(run, launch))
        moved.append(nbytes * passes)
        labels.append(label)
    src = torch.ones(READ_ROOFS[tiny][-1][1] // 8, device=device)
    dst = torch.empty_like(src)
    fns.append(partial(dst.copy_, src))
    moved.append(2 * src.numel() * 4)
    labels.append(f"HBM: device copy of {src.numel() * 4 / 2**20:.3g} MiB (read + write)")
    for label, nbytes, t in zip(labels, moved, interleaved_median_times(fns, device, repeat),
                                strict=True):
        yield f"| {label} | {nbytes / 1e9:.3g} GB | {1e3 * t:.3f} | {nbytes / t / 1e12:.2f} |"


def anatomy_table(device: str, shapes, precisions, repeat: int = 3,
                  shard: tuple[int, int] | None = None) -> Iterator[str]:
    """Markdown rows: the stages of the gradient step at the launcher's configuration (needs
    triton; imported only where the Triton kernels can run). With ``shard`` ``(k, n)``, only
    every n-th stage of the table from the k-th (:func:`grood._bench.configs.in_shard`; the
    shares then against the last one run), as :func:`grood._bench.configs.config_table`."""
    yield "| shape | precision | stage | ms | share of the whole step | GEMM TFLOP/s |"
    yield "|---|---|---|---|---|---|"
    entry = 0  # the table's stages, counted for ``shard``
    for p in tuning_problems(device, shapes, precisions):
        (n, c, d), precision, h, protos, prep = p.dims, p.precision, p.h, p.protos, p.prep
        scale = prep.scale
        cfg = _ncp_configs.launch_config(n, c, d, precision, h_bytes=h.element_size(),
                                         n_sm=p.n_sm, major=target_major(h.device))
        outs = p.outputs()
        p_ood = p.p_ood
        stages: list[tuple[str, Callable[[], object], bool]] = [
            ("torch GEMM alone (cuBLAS on a GPU), centred operands",
             partial(torch_gemm, h / scale - p_ood / scale, (protos - p_ood) / scale,
                     precision), True)]
        best = torch.empty((cfg.n_split, n), device=device)
        stages.append(("K-loop alone, feature tile centred in registers (launcher)",
                       partial(run, _kloop_launch(h, prep, n, c, d, precision, cfg, best,
                                                  False)), True))
        staged_cfg = _ncp_configs.staged_config(n, c, d, precision, h.element_size(), p.n_sm)
        if staged_cfg is not None:
            scratch = _ncp_plan.allocate_scratch(n, c, d, staged_cfg, precision, h.device)
            pre = _ncp_plan.plan(h, protos, prep, prep.sq_norms, scratch, outs, precision,
                                 staged_cfg)[0]
            run(pre)  # the pre-pass's rows, for the staged K-loop alone
            rows = pre.args[4]
            stages += [
                ("K-loop alone, A operand from the staged rows",
                 partial(run, _kloop_launch(rows, prep, n, c, d, precision, staged_cfg,
                                            best, True)), True),
                ("staged pre-pass alone (u and its norms written)",
                 partial(run, pre), False)]
        fused = not cfg.split  # (the split variant's epilogue has no partials to stop at)
        if fused:
            stages.append(("kernel without the finish (K-loop, softmax, top-4, partials)",
                           partial(launch_step, h, protos, prep, outs, precision, cfg, 0),
                           True))
        if (fused and _ncp_configs.one_block(c, cfg, precision)
                and one_block_target(target_major(h.device))):
            stages.append(("kernel without the finish, first tile's top-4 by insertion "
                           "(ONE_BLOCK off)",
                           partial(launch_step, h, protos, prep, outs, precision, cfg, 0,
                                   one_block=0), True))
        if fused and _ncp_configs.finish_stages(precision, cfg.block_cols) > 1:
            stages.append(("whole step, the finish's loops not pipelined",
                           partial(launch_step, h, protos, prep, outs, precision, cfg, 1),
                           True))
        if fused and _ncp_configs.lean_finish(
                precision, _ncp_configs.rerank_gate(c, d, precision), cfg.block_cols):
            stages.append(("whole step, the finish's passes plain (per-step gathers and sums)",
                           partial(launch_step, h, protos, prep, outs, precision, cfg,
                                   lean=0), True))
        if staged_cfg is not None:
            stages.append(("whole step, staged variant",
                           partial(launch_step, h, protos, prep, outs, precision, staged_cfg),
                           True))
        split_cfg = _ncp_configs.split_config(c, d, precision)
        if split_cfg is not None:
            stages.append(("whole step, split variant (torch GEMM, Triton epilogue)",
                           partial(launch_step, h, protos, prep, outs, precision, split_cfg),
                           True))
        stages.append(("whole step (launcher)",
                       partial(launch_step, h, protos, prep, outs, precision, cfg), True))
        stages, entry = ([stage for i, stage in enumerate(stages) if in_shard(entry + i, shard)],
                         entry + len(stages))
        working = []
        for i, stage in enumerate(stages):  # compile each first: a failure ends no table
            try:
                stage[1]()
            except Exception as exc:
                if i == len(stages) - 1 and shard is None:
                    raise  # the launcher's whole step: the shares' reference
                yield f"| {p.name} | {precision} | {stage[0]} | {failed(exc)} | – | – |"
                continue
            working.append(stage)
        stages = working
        times = interleaved_median_times([fn for _, fn, _ in stages], device, repeat)
        for (label, _, gemm), t in zip(stages, times, strict=True):
            tflops = f"{2 * n * c * d / t / 1e12:.1f}" if gemm else "–"
            yield (f"| {p.name} | {precision} | {label} | {1e3 * t:.3f} | "
                   f"{t / times[-1]:.2f} | {tflops} |")
