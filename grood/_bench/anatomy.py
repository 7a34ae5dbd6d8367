"""``grood bench --only configs``: the gradient step taken apart at the launcher's tiles.

Where the step's time goes, from kernels that each stop at one stage, timed in turns on the
same inputs: the distance GEMM alone in torch (cuBLAS on a GPU) on the centred operands; the
kernel's K-loop alone (:func:`_kloop_kernel`: the shipped class-block GEMM, every class block
of every program, row maxima written), with the feature tile centred in registers and, as the
staged variant loads it, from the pre-pass's rows; that pre-pass alone; the whole kernel
without its finish (K-loop, softmax, candidates, partial results written: ``FINISH=0``); the
whole step with the finish's loops not pipelined (``FINISH=1``; the launcher pipelines them in
the tensor-core modes); the whole step, staged, split (the GEMM in torch, then a Triton
epilogue) and the launcher's. The differences between rows are the stages' costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import triton
import triton.language as tl

from grood._bench.common import interleaved_median_times
from grood._bench.configs import failed, launch_step, tuning_problems
from grood._bench.gradient import torch_gemm
from grood_kernels import ncp_gradient as kernel
from grood_kernels._launch import KernelLaunch, run
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
        dots, _ = kernel._class_block_dots(
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


def anatomy_table(device: str, shapes, precisions, repeat: int = 3) -> Iterator[str]:
    """Markdown rows: the stages of the gradient step at the launcher's configuration (needs
    triton; imported only where the Triton kernels can run)."""
    yield "| shape | precision | stage | ms | share of the whole step | GEMM TFLOP/s |"
    yield "|---|---|---|---|---|---|"
    for p in tuning_problems(device, shapes, precisions):
        (n, c, d), precision, h, protos, prep = p.dims, p.precision, p.h, p.protos, p.prep
        scale = prep.scale
        cfg = kernel.launch_config(n, c, d, precision, h_bytes=h.element_size(),
                                   n_sm=p.n_sm)
        outs = p.outputs()
        p_ood = p.p_ood
        stages = [("torch GEMM alone (cuBLAS on a GPU), centred operands",
                   partial(torch_gemm, h / scale - p_ood / scale,
                           (protos - p_ood) / scale, precision), True)]
        best = torch.empty((cfg.n_split, n), device=device)
        stages.append(("K-loop alone, feature tile centred in registers (launcher)",
                       partial(run, _kloop_launch(h, prep, n, c, d, precision, cfg, best,
                                                  False)), True))
        staged_cfg = kernel.staged_config(n, c, d, precision, h.element_size(), p.n_sm)
        if staged_cfg is not None:
            pre = kernel._plan(h, protos, prep, prep.sq_norms,
                               kernel._scratch(n, c, d, staged_cfg, precision, h.device),
                               outs, precision, staged_cfg)[0]
            run(pre)  # the pre-pass's rows, for the staged K-loop alone
            rows = pre.args[4]
            stages += [
                ("K-loop alone, A operand from the staged rows",
                 partial(run, _kloop_launch(rows, prep, n, c, d, precision, staged_cfg,
                                            best, True)), True),
                ("staged pre-pass alone (u and its norms written)",
                 partial(run, pre), False)]
        stages.append(("kernel without the finish (K-loop, softmax, top-4, partials)",
                       partial(launch_step, h, protos, prep, outs, precision, cfg, 0), True))
        if kernel.finish_stages(precision, cfg.block_cols) > 1:
            stages.append(("whole step, the finish's loops not pipelined",
                           partial(launch_step, h, protos, prep, outs, precision, cfg, 1),
                           True))
        if staged_cfg is not None:
            stages.append(("whole step, staged variant",
                           partial(launch_step, h, protos, prep, outs, precision, staged_cfg),
                           True))
        split_cfg = kernel.split_config(c, d, precision)
        if split_cfg is not None:
            stages.append(("whole step, split variant (torch GEMM, Triton epilogue)",
                           partial(launch_step, h, protos, prep, outs, precision, split_cfg),
                           True))
        stages.append(("whole step (launcher)",
                       partial(launch_step, h, protos, prep, outs, precision, cfg), True))
        working = []
        for i, stage in enumerate(stages):  # compile each first: a failure ends no table
            try:
                stage[1]()
            except Exception as exc:
                if i == len(stages) - 1:  # the launcher's whole step, the shares' reference
                    raise
                yield f"| {p.name} | {precision} | {stage[0]} | {failed(exc)} | – | – |"
                continue
            working.append(stage)
        stages = working
        times = interleaved_median_times([fn for _, fn, _ in stages], device, repeat)
        for (label, _, gemm), t in zip(stages, times, strict=True):
            tflops = f"{2 * n * c * d / t / 1e12:.1f}" if gemm else "–"
            yield (f"| {p.name} | {precision} | {label} | {1e3 * t:.3f} | "
                   f"{t / times[-1]:.2f} | {tflops} |")
