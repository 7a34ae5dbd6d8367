"""``grood bench --only configs``: the gradient step's launch configurations side by side.

For each shape and tensor-core mode it runs the Triton gradient step with the configuration
the launcher picks, the same with its exact re-rank's gate the other way
(:func:`grood_kernels._ncp_configs.rerank_gate`), and every autotuning candidate (what
``GROOD_AUTOTUNE=1`` chooses from), on the same inputs: time, and the largest difference from
the launcher's results, so a candidate is judged on speed and agreement together. This is the
evidence for changing the launcher's heuristic on a device; each configuration is compiled
once (warm-up, not timed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import torch

from grood._bench.common import clustered_problem, median_time
from grood_kernels import _ncp_candidates, _ncp_configs, _ncp_plan
from grood_kernels import ncp_gradient as kernel
from grood_kernels._launch import KernelLaunch, LaunchConfig, run, sm_count, target_major
from grood_kernels._prepare import PreparedPrototypes, prepare_prototypes
from grood_kernels.contract import ncp_scale

#: (name, N, C, D): the report's shapes where the choice of tiles is open (C = 21,841 is
#: timed by the main table), ImageNet-1k first: a run cut short keeps the shape that matters most.
CONFIG_SHAPES = [("ImageNet-1k", 65536, 1000, 2048), ("CIFAR-100", 65536, 100, 512),
                 ("CIFAR-10", 65536, 10, 512)]
TINY_CONFIG_SHAPES = [("tiny-10", 96, 10, 40), ("tiny-100", 64, 100, 24)]
CONFIG_PRECISIONS = ("ieee", "tf32", "bf16")


class TuningProblem(NamedTuple):
    """One shape and precision of the tuning tables, its inputs made and prepared."""

    name: str
    dims: tuple[int, int, int]
    precision: str
    h: torch.Tensor
    protos: torch.Tensor
    p_ood: torch.Tensor
    prep: PreparedPrototypes
    n_sm: int | None

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """Fresh outputs of the step: grad, q_ood, pred, min_dist, lse."""
        return step_buffers(self.dims[0], self.dims[2], self.h.device)


def step_buffers(n: int, d: int, device) -> tuple[torch.Tensor, ...]:
    """Empty outputs of one gradient step of ``n`` rows of width ``d``: grad, q_ood, pred,
    min_dist, lse."""
    return (torch.empty((n, d), device=device), torch.empty(n, device=device),
            torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, device=device),
            torch.empty(n, device=device))


def tuning_problems(device: str, shapes, precisions) -> Iterator[TuningProblem]:
    """The tuning tables' inputs: clustered features and prototypes per shape, the operand
    prepared per precision (bf16 only on a GPU: the interpreter's bf16 dot is not the
    hardware's)."""
    for name, n, c, d in shapes:
        h, protos = clustered_problem(n, c, d, device)
        p_ood = protos.mean(0)
        for precision in precisions:
            if precision == "bf16" and device != "cuda":
                continue
            prep = prepare_prototypes(protos, p_ood, precision, ncp_scale(protos, p_ood))
            yield TuningProblem(name, (n, c, d), precision, h, protos, p_ood, prep,
                                sm_count(h.device))


def in_shard(index: int, shard: tuple[int, int] | None) -> bool:
    """Whether the table entry ``index`` (counted over the whole table) is in ``shard``
    ``(k, n)``: every n-th entry from the k-th; every entry without one."""
    return shard is None or index % shard[1] == shard[0]


def config_table(device: str, shapes, precisions=CONFIG_PRECISIONS,
                 repeat: int = 3, match: re.Pattern | None = None,
                 shard: tuple[int, int] | None = None) -> Iterator[str]:
    """Markdown rows: every candidate configuration of the gradient step, timed (needs
    triton: this module is imported only where the Triton kernels can run); after the table,
    per shape and mode the fastest run whose results agree with the launcher's (as the
    autotuner judges agreement), the evidence for changing the launcher's choice. With
    ``match``, only the runs whose label it finds (:func:`config_runs`) besides the
    launcher's own, which runs first as the reference. With ``shard`` ``(k, n)``, only every
    n-th run of the table from the k-th (:func:`in_shard`; the first one run per shape and
    mode is the reference): n processes then compile the table's kernels side by side into
    triton's cache, for a run of the whole table after them (``--shard``)."""
    yield ("| shape | precision | tiles (rows, classes, K) / warps / stages | class groups | "
           "ms | launcher ms / this | max rel diff q_ood vs launcher | pred differs |")
    yield "|---|---|---|---|---|---|---|---|"
    fastest: dict[tuple[str, str], tuple[float, float, str]] = {}
    entry = -1  # the table's runs, counted for ``shard``
    for p in tuning_problems(device, shapes, precisions):
        name, n, c, d, precision, h, protos = p.name, *p.dims, p.precision, p.h, p.protos
        cands = _ncp_candidates.candidate_configs(n, c, d, precision, h.element_size(),
                                                  p.n_sm, target_major(h.device))
        ref, base_ms = None, 0.0  # (the launcher's, timed first)
        for i, (cfg, label, override) in enumerate(config_runs(cands, c, d, precision)):
            if i and match is not None and not match.search(label):
                continue
            entry += 1
            if not in_shard(entry, shard):
                continue
            tiles = f"{cfg.block_rows}, {cfg.block_cols}, {cfg.block_d}"
            row = (f"| {name} | {precision} | {tiles} / {cfg.num_warps} / {cfg.num_stages}"
                   f"{label} | {cfg.n_split} | ")
            outs = p.outputs()
            try:
                t = median_time(partial(launch_step, h, protos, p.prep, outs, precision, cfg,
                                        **override), device, repeat)
            except Exception as exc:  # a candidate that fails here must not end the table
                if ref is None:
                    raise
                yield row + f"{failed(exc)} | – | – | – |"
                continue
            if ref is None:
                ref, base_ms = outs, t
            q_diff = float(((outs[1] - ref[1]).abs() / ref[1].abs().clamp_min(1e-30)).max())
            pred_diff = float((outs[2] != ref[2]).double().mean())
            yield (row + f"{1e3 * t:.3f} | {base_ms / t:.2f}x | {q_diff:.1e} | "
                   f"{pred_diff:.4f} |")
            best = fastest.get((name, precision))
            if (best is None or t < best[0]) and kernel._agree((ref[1], ref[2]),
                                                               (outs[1], outs[2])):
                fastest[(name, precision)] = (t, base_ms, f"{tiles} / {cfg.num_warps} / "
                                              f"{cfg.num_stages}{label}")
    if fastest:
        yield ""
        yield "Fastest configuration per shape and mode whose results agree with the launcher's:"
        yield ""
        for (name, precision), (t, base_ms, desc) in fastest.items():
            yield (f"- {name} {precision}: {desc}, {1e3 * t:.3f} ms, {base_ms / t:.2f}x as fast "
                   "as the launcher")


#: The configurations table's label of the kernel without a GEMM.
EXACT_LABEL = " (exact: every class by fp32 differences, no GEMM)"


def config_runs(cands: list[LaunchConfig], c: int, d: int, precision: str
                ) -> list[tuple[LaunchConfig, str, dict[str, int]]]:
    """The configurations table's runs, as (configuration, label, :func:`launch_step`'s
    overrides): the launcher's (``cands[0]``) as it is, with its exact re-rank's gate the
    other way (not the exact kernel's: it has no candidates), where its finish's loops are
    pipelined with them not and with their loads two D-steps ahead instead of one (the
    finish waits on latency: on an H200 it took about 7x the time its instructions need to
    issue, bench/RESULTS.md 2026-12-05; 160 KB of shared memory at this table's shapes, no
    spills, sm_90a), and where its finish's passes are lean
    (:func:`grood_kernels._ncp_configs.lean_finish`) with them plain, as they were when an
    H200 timed the launcher (2026-12-04); then every other candidate (the finish-apart ones
    among them; where the launcher is the exact kernel, the GEMM kernels' launcher
    configuration first), the wide staged tile with its gate the other way too (the choices
    a GPU run leaves open: on an H200 the wide tile was the fastest with the gate on,
    2026-12-04)."""
    base = cands[0]
    gated = _ncp_configs.rerank_gate(c, d, precision)
    flip = f"re-rank gate {'off' if gated else 'on'}"
    runs: list[tuple[LaunchConfig, str, dict[str, int]]] = [(base, " (launcher)", {})]
    if not base.exact:  # (no candidates, no re-rank)
        runs.append((base, f" (launcher, {flip})", {"rerank_gate": int(not gated)}))
    own_finish = not (base.split or base.single_read or base.finish_apart or base.exact)
    if own_finish and _ncp_configs.finish_stages(precision, base.block_cols) > 1:
        runs.append((base, " (launcher, the finish's loops not pipelined)", {"finish": 1}))
        runs.append((base, " (launcher, the finish's loops 3 stages deep)", {"finish": 3}))
    if own_finish and _ncp_configs.lean_finish(precision, gated, base.block_cols):
        runs.append((base, " (launcher, the finish's passes plain: per-step gathers and sums)",
                     {"lean": 0}))
    for cfg in cands[1:]:
        label = (EXACT_LABEL if cfg.exact else
                 " (wide tile, staged)" if cfg.block_cols > 128 else
                 " (single read: all of D in registers)" if cfg.single_read else
                 " (staged: u centred by a pre-pass)" if cfg.staged else
                 " (split: torch GEMM over row chunks, Triton epilogue)" if cfg.split else "")
        if cfg.finish_apart:  # (the launcher's tiles, or the wide or staged ones)
            waves = (f", {cfg.finish_waves} finish programs per SM" if cfg.finish_waves
                     else "")
            label = (f"{label[:-1]}, finish apart{waves})" if label else
                     f" (launcher, finish apart{waves})")
        if base.exact and cfg == cands[1]:  # the GEMM kernels' launcher configuration
            label = f"{label[:-1]}, the GEMM launcher's)" if label else " (GEMM launcher)"
        runs.append((cfg, label, {}))
        if cfg.block_cols > 128 and not cfg.finish_apart:
            runs.append((cfg, f" (wide tile, staged, {flip})", {"rerank_gate": int(not gated)}))
    return runs


def failed(exc: Exception) -> str:
    """The cell of a table row whose candidate or stage failed on the device."""
    return f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def launch_step(h, protos, prep, outs, precision: str, cfg, finish: int | None = None, *,
                rerank_gate: int | None = None, one_block: int | None = None,
                lean: int | None = None) -> None:
    """One gradient step in configuration ``cfg`` with fresh scratch, as the launcher makes it
    (the arrival counters start at zero); ``finish`` overrides the kernel's ``FINISH`` (0: no
    finish; 1: its loops not pipelined), for the anatomy's measurements, ``rerank_gate`` its
    exact re-rank's ``RERANK_GATE`` (0: every candidate re-ranked; 1: gated) and ``one_block``
    its ``ONE_BLOCK`` (0: the first tile's candidates by insertion; 1 only where each program
    holds one class block) and ``lean`` its own finish's ``LEAN`` (0: the passes over D
    plain; 1: lean, with ``EVEN_D`` where D is a whole number of K-steps)."""
    (n, d), c = h.shape, protos.shape[0]
    if one_block and _ncp_configs.blocks_per_group(c, cfg) != 1:
        raise ValueError(f"ONE_BLOCK needs one class block per program; this configuration's "
                         f"programs hold {_ncp_configs.blocks_per_group(c, cfg)}")
    scratch = _ncp_plan.allocate_scratch(n, c, d, cfg, precision, h.device)
    plan = _ncp_plan.plan(h, protos, prep, prep.sq_norms, scratch, outs, precision, cfg)
    last = plan[-1]
    override = {"FINISH": finish, "RERANK_GATE": rerank_gate, "ONE_BLOCK": one_block,
                **(_ncp_configs.finish_flags(lean, d, cfg.block_d) if lean is not None else {})}
    override = {key: value for key, value in override.items() if value is not None}
    if (finish is not None or lean is not None) and (cfg.finish_apart or cfg.split):
        name = "FINISH" if finish is not None else "LEAN"
        raise ValueError(f"{name} is the class-group kernel's own finish; this configuration "
                         + ("finishes in a launch of its own" if cfg.finish_apart else
                            "is the split variant, whose epilogue finishes its rows itself"))
    if override:
        assert isinstance(last, KernelLaunch)  # (the step's own kernels come last)
        steps = {p.fn for p in plan[-2 if cfg.finish_apart else -1:]}
        taken = {key for p in plan if isinstance(p, KernelLaunch) and p.fn in steps
                 for key in p.constexprs}
        missing = set(override) - taken
        if missing:
            raise ValueError(f"{last.fn.__name__} takes no {', '.join(sorted(missing))}")
        # every launch of them that takes it (the split variant runs its epilogue once per
        # chunk of rows; with the finish apart, its kernel takes the re-rank's gate)
        plan = tuple(p._replace(constexprs={**p.constexprs, **{
            key: value for key, value in override.items() if key in p.constexprs}})
            if isinstance(p, KernelLaunch) and p.fn in steps else p for p in plan)
    for launch in plan:
        run(launch)


def step_outputs(h, protos, p_ood, precision: str, *, rerank_gate: int | None = None
                 ) -> tuple[torch.Tensor, ...]:
    """The Triton gradient step's outputs (grad, q_ood, pred, min_dist, lse) in the launcher's
    configuration, with ``rerank_gate`` as :func:`launch_step` takes it."""
    (n, d), c = h.shape, protos.shape[0]
    prep = prepare_prototypes(protos, p_ood, precision, ncp_scale(protos, p_ood))
    cfg = _ncp_configs.launch_config(n, c, d, precision, h_bytes=h.element_size(),
                                     n_sm=sm_count(h.device), major=target_major(h.device))
    outs = step_buffers(n, d, h.device)
    launch_step(h, protos, prep, outs, precision, cfg, rerank_gate=rerank_gate)
    return outs
