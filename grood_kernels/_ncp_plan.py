"""The gradient step's launch plan: for one configuration, the launches in order.

:func:`plan` turns a :class:`grood_kernels._launch.LaunchConfig` into the kernel launches
(and, for the split variant, the torch GEMM calls) of one call: the staged and split variants'
pre-pass, the class-group kernel (:mod:`grood_kernels._ncp_kernel`), the single-read or exact
kernel, the split variant's GEMM and epilogue per chunk of rows, and the finish launched apart;
:func:`allocate_scratch` what they need besides the outputs. The launcher
(:func:`grood_kernels.ncp_gradient.ncp_gradient`) runs the plan; the compile report compiles
it unlaunched, on ``meta`` tensors (:func:`compile_launches`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from grood_kernels._centre import CENTRE_TILE, _centre_rows_kernel
from grood_kernels._launch import (
    DEFAULT_SMS,
    KernelLaunch,
    LaunchConfig,
    TorchCall,
    fit_tile,
    sm_count,
)
from grood_kernels._ncp_candidates import candidate_configs
from grood_kernels._ncp_configs import (
    L2_BUDGET,
    PREPASS_PRECISIONS,
    blocks_per_group,
    finish_flags,
    finish_stages,
    launch_config,
    lean_finish,
    one_block,
    operand_rows,
    rerank_gate,
    rounded_rows,
)
from grood_kernels._ncp_exact import _ncp_exact_kernel
from grood_kernels._ncp_finish import FINISH_TILE, _ncp_finish_kernel, finish_programs
from grood_kernels._ncp_kernel import _ncp_gradient_kernel
from grood_kernels._ncp_single_read import _ncp_single_read_kernel
from grood_kernels._prepare import PAD_COLS, PAD_ROWS, PreparedPrototypes, operand_dtype
from grood_kernels._split import _ncp_epilogue_kernel, padded_classes, split_gemm, split_rows
from grood_kernels.contract import DOT_MODES, NCP_CANDIDATES


class Scratch(NamedTuple):
    """What one call of the gradient step allocates besides its outputs (None where unused)."""

    part_f: torch.Tensor | None  # partial results per (class group, row): m, sum, 4 distances
    part_i: torch.Tensor | None  # and the 4 candidate ids
    counters: torch.Tensor | None  # arrivals per row block (none with the finish apart)
    u_sq: torch.Tensor | None  # ||u||^2 per row (staged and split variants)
    dots: torch.Tensor | None  # the split variant's fp32 GEMM results [rows, C padded], per chunk


def allocate_scratch(n: int, c: int, d: int, cfg: LaunchConfig, precision: str, device):
    """Partial results per (class group, row) and one arrival counter per row block (the
    class-group kernel); ``||u||^2`` per row (staged and split variants; their rows of ``u``
    live in the gradient's, in bf16 too: :func:`operand_rows`); the split variant's chunk of
    GEMM results; nothing for the single-read variant or the exact kernel."""
    if cfg.single_read or cfg.exact:
        return ()
    centred = cfg.staged or cfg.split
    u_sq = torch.empty(n, dtype=torch.float32, device=device) if centred else None
    if cfg.split:
        cols = padded_classes(c, cfg.block_cols)
        dots = torch.empty((split_rows(n, cols, cfg.block_rows), cols), dtype=torch.float32,
                           device=device)
        dots[:, c:].zero_()  # the padding: the GEMM writes the first C columns of a row
        if not cfg.finish_apart:
            return Scratch(None, None, None, u_sq, dots)
    else:
        dots = None
    counters = (None if cfg.finish_apart else
                torch.zeros(triton.cdiv(n, cfg.block_rows), dtype=torch.int32, device=device))
    return Scratch(
        torch.empty((cfg.n_split, n, 2 + NCP_CANDIDATES), dtype=torch.float32, device=device),
        torch.empty((cfg.n_split, n, NCP_CANDIDATES), dtype=torch.int32, device=device),
        counters, u_sq, dots)


def plan(h, prototypes, prep: PreparedPrototypes, psq, scratch, outputs, precision: str,
          cfg: LaunchConfig) -> tuple[KernelLaunch | TorchCall, ...]:
    """The launches for one configuration, in order (also compiled, unlaunched, by the compile
    report): the gradient-step kernel, after the staged variant's pre-pass, before the
    separate finish (``finish_apart``)."""
    grad, q_ood, pred, min_dist, lse = outputs
    n, d = h.shape
    c = prototypes.shape[0]
    if cfg.exact:
        return (KernelLaunch(
            _ncp_exact_kernel, (triton.cdiv(n, cfg.block_rows),),
            (h, prototypes, prep.p_o, grad, q_ood, pred, min_dist, lse,
             n, c, d, prep.scale, 1.0 / prep.scale,
             h.stride(0), h.stride(1), prototypes.stride(0), prototypes.stride(1),
             grad.stride(0), grad.stride(1)),
            {"BLOCK_N": cfg.block_rows, "BLOCK_C": cfg.block_cols, "BLOCK_D": cfg.block_d,
             "STAGES": cfg.num_stages, "EVEN_D": int(d % cfg.block_d == 0)},
            cfg.num_warps, cfg.num_stages),)
    if cfg.single_read:
        return (KernelLaunch(
            _ncp_single_read_kernel, (triton.cdiv(n, cfg.block_rows),),
            (h, prep.operand, prototypes, prep.p_o, psq, grad, q_ood, pred, min_dist, lse,
             n, c, d, prep.scale, 1.0 / prep.scale,
             h.stride(0), h.stride(1), prep.operand.stride(0), prototypes.stride(0),
             prototypes.stride(1), grad.stride(0), grad.stride(1)),
            {"BLOCK_N": cfg.block_rows, "BLOCK_C": cfg.block_cols, "D_PAD": cfg.block_d,
             "N_CAND": NCP_CANDIDATES, "DOT_MODE": DOT_MODES[precision]},
            cfg.num_warps, cfg.num_stages),)
    part_f, part_i, counters, u_sq, dots = scratch
    n_cb = triton.cdiv(c, cfg.block_cols)
    per_group = blocks_per_group(c, cfg)
    if not cfg.split and (cfg.n_split - 1) * per_group >= n_cb:
        # An empty group's partial (no class: running max -inf, sum NaN) would poison the merge.
        raise ValueError(f"{cfg.n_split} class groups of {per_group} blocks leave a group "
                         f"without classes ({n_cb} blocks of {cfg.block_cols} classes)")
    pre: tuple[KernelLaunch, ...] = ()
    rows = h
    if cfg.staged or cfg.split:  # u into the gradient's rows: the GEMM's A operand
        if precision not in PREPASS_PRECISIONS:
            raise ValueError(f"the {'split' if cfg.split else 'staged'} variant takes "
                             f"{', '.join(PREPASS_PRECISIONS)}, not {precision}")
        bn, bd, warps = CENTRE_TILE
        bf16_rows = precision == "bf16"  # the A operand in bf16, as the MMA takes it
        # (in the first half of each gradient row's bytes: operand_rows)
        rows = grad.view(torch.bfloat16)[:, :d] if bf16_rows else grad
        pre = (KernelLaunch(
            _centre_rows_kernel, (triton.cdiv(n, bn),),
            (h, prep.p_o, grad, u_sq, rows, n, d, 1.0 / prep.scale, h.stride(0), h.stride(1),
             grad.stride(0), grad.stride(1), rows.stride(0)),
            {"BLOCK_N": bn, "BLOCK_D": bd, "BF16_ROWS": int(bf16_rows),
             "ROUND_TF32": int(rounded_rows(cfg, precision))}, warps, 1),)
    if cfg.split:
        return (*pre, *_split_steps(h, rows, prototypes, prep, psq, u_sq, dots, outputs,
                                    precision, cfg, part_f, part_i))
    if prep.operand.shape[0] % cfg.block_cols:  # its tiles are loaded without masks
        raise ValueError(f"a {cfg.block_cols}-class tile passes the prepared operand's "
                         f"{prep.operand.shape[0]} padded rows")
    gate = int(rerank_gate(c, d, precision))
    stages = finish_stages(precision, cfg.block_cols)
    lean = int(lean_finish(precision, gate, cfg.block_cols))
    usq_arg = u_sq if cfg.staged else psq  # unread unless staged
    after: tuple[KernelLaunch, ...] = ()
    if cfg.finish_apart:
        after = (_finish_launch(h, prototypes, prep, psq, usq_arg, part_f, part_i, outputs,
                                precision, cfg, gate),)
        stages, counters, lean = 0, part_i, 0  # no program of the class-group kernel finishes
    return (*pre, KernelLaunch(
        _ncp_gradient_kernel, (triton.cdiv(n, cfg.block_rows) * cfg.n_split,),
        (rows, prep.operand, prototypes, prep.p_o, psq, part_f, part_i, counters,
         grad, q_ood, pred, min_dist, lse,
         n, c, d, prep.scale, 1.0 / prep.scale, cfg.n_split, per_group,
         rows.stride(0), rows.stride(1), prep.operand.stride(0), prototypes.stride(0),
         prototypes.stride(1), grad.stride(0), grad.stride(1),
         usq_arg, h, h.stride(0), h.stride(1)),
        {"BLOCK_N": cfg.block_rows, "BLOCK_C": cfg.block_cols, "BLOCK_D": cfg.block_d,
         "N_CAND": NCP_CANDIDATES, "DOT_MODE": DOT_MODES[precision],
         "STAGED": int(cfg.staged), "FINISH": stages, "RERANK_GATE": gate,
         "ONE_BLOCK": int(one_block(c, cfg, precision)),
         "OPERAND_ROWS": int(operand_rows(cfg, precision)),
         **finish_flags(lean, d, cfg.block_d)},
        cfg.num_warps, cfg.num_stages), *after)


def _finish_launch(h, prototypes, prep: PreparedPrototypes, psq, usq_arg, part_f, part_i,
                   outputs, precision: str, cfg: LaunchConfig, gate: int) -> KernelLaunch:
    """The finish as a launch of its own (``finish_apart``) over every row, after the
    kernels that wrote ``cfg.n_split`` class groups' partials; with the staged and split
    variants it reads ``u`` from the gradient's rows and ``||u||^2`` from ``usq_arg`` (where
    those rows hold the GEMM's operand only, :func:`operand_rows`, ``u`` from ``h``, as
    without them)."""
    grad, q_ood, pred, min_dist, lse = outputs
    n, d = grad.shape
    bn, bd, warps, f_stages = FINISH_TILE
    bd = fit_tile(bd, d)
    from_h = operand_rows(cfg, precision)
    staged = (cfg.staged or cfg.split) and not from_h
    return KernelLaunch(
        _ncp_finish_kernel,
        (finish_programs(n, d, L2_BUDGET, sm_count(h.device) or DEFAULT_SMS,
                         cfg.finish_waves),),
        (h, prototypes, prep.p_o, part_f, part_i,  # (STAGED: u from the gradient's rows)
         grad, q_ood, pred, min_dist, lse, usq_arg, psq,
         n, prototypes.shape[0], d, prep.scale, 1.0 / prep.scale, cfg.n_split, h.stride(0),
         h.stride(1), prototypes.stride(0), prototypes.stride(1), grad.stride(0),
         grad.stride(1)),
        {"BLOCK_N": bn, "BLOCK_D": bd, "N_CAND": NCP_CANDIDATES,
         "STAGED": int(staged), "FINISH_STAGES": f_stages,
         "DOT_MODE": DOT_MODES[precision], "RERANK_GATE": gate, "EVEN_D": int(d % bd == 0),
         "USQ_GIVEN": int(from_h)},
        warps, 1)


def _split_steps(h, rows, prototypes, prep: PreparedPrototypes, psq, u_sq, dots, outputs,
                 precision: str, cfg: LaunchConfig, part_f=None, part_i=None
                 ) -> tuple[TorchCall | KernelLaunch, ...]:
    """The split variant after its pre-pass: per chunk of rows, the GEMM of the centred rows
    by the prepared prototypes in torch, then the epilogue kernel over its results; with the
    finish apart the epilogues write partials (``part_f``, ``part_i``) and one finish launch
    over every row follows the chunks. Where the rows hold the GEMM's operand only
    (:func:`operand_rows`) the finish reads ``h``."""
    grad, q_ood, pred, min_dist, lse = outputs
    n, d = grad.shape
    c = prototypes.shape[0]
    chunk = dots.shape[0]
    operand = prep.operand[:c, :d]  # the padding holds zeros; the BLAS needs none
    gate = int(rerank_gate(c, d, precision))
    apart = int(cfg.finish_apart)
    # the partials' pointers are written only with the finish apart (FINISH=0), and the
    # results' then only by the finish kernel
    parts = (part_f, part_i) if apart else (psq, psq)
    steps: list[TorchCall | KernelLaunch] = []
    for r0 in range(0, n, chunk):
        r = min(chunk, n - r0)
        steps.append(TorchCall(split_gemm, (rows[r0:r0 + r], operand, dots[:r, :c],
                                            precision)))
        steps.append(KernelLaunch(
            _ncp_epilogue_kernel, (triton.cdiv(r, cfg.block_rows),),
            (dots, prototypes, prep.p_o, psq, u_sq, grad, q_ood, pred, min_dist, lse, *parts,
             r, r0, c, d, prep.scale, 1.0 / prep.scale,
             dots.stride(0), prototypes.stride(0), prototypes.stride(1), grad.stride(0),
             grad.stride(1), h, h.stride(0), h.stride(1)),
            {"BLOCK_N": cfg.block_rows, "BLOCK_C": cfg.block_cols, "BLOCK_D": cfg.block_d,
             "N_CAND": NCP_CANDIDATES, "FINISH_STAGES": 2, "DOT_MODE": DOT_MODES[precision],
             "RERANK_GATE": gate, "FINISH": 1 - apart,
             "OPERAND_ROWS": int(operand_rows(cfg, precision))},
            cfg.num_warps, cfg.num_stages))
    if apart:
        steps.append(_finish_launch(h, prototypes, prep, psq, u_sq, part_f, part_i,
                                    outputs, precision, cfg, gate))
    return tuple(steps)


def compile_launches(n: int, c: int, d: int, precision: str, *, dtype=torch.float32,
                     configs: str = "launcher", major: int = 0,
                     exact: bool = True) -> list[KernelLaunch]:
    """The Triton launches :func:`grood_kernels.ncp_gradient.ncp_gradient` makes at this shape
    on a GPU of compute capability ``major``.x (0: none named), on ``meta`` tensors (for the
    compile report); ``configs="all"`` adds every autotuning candidate; ``exact=False``: the
    GEMM kernels' launcher configuration where the launcher would take the kernel without a
    GEMM."""
    def meta(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    outs = (meta(n, d), meta(n), meta(n, dt=torch.int64), meta(n), meta(n))
    size = torch.empty((), dtype=dtype).element_size()
    cfgs = (candidate_configs(n, c, d, precision, size, major=major) if configs == "all"
            else [launch_config(n, c, d, precision, h_bytes=size, major=major, exact=exact)])
    prep = PreparedPrototypes(meta(triton.cdiv(c, PAD_ROWS) * PAD_ROWS,
                                   (4 if precision == "tf32x3" else 1)
                                   * triton.cdiv(d, PAD_COLS) * PAD_COLS,
                                   dt=operand_dtype(precision)), meta(c), meta(d), 1.0)
    def scratch(cfg):  # the split variant as one chunk: its epilogue's facts for all N rows
        s = allocate_scratch(n, c, d, cfg, precision, "meta")
        return s._replace(dots=meta(n, padded_classes(c, cfg.block_cols))) if cfg.split else s

    return [launch for cfg in cfgs
            for launch in plan(meta(n, d, dt=dtype), meta(c, d, dt=dtype), prep, meta(c),
                                scratch(cfg), outs, precision, cfg)
            if isinstance(launch, KernelLaunch)]  # the split variant's GEMM runs in torch
