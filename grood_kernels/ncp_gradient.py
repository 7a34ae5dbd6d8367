"""Fused NCP gradient: prototype distances, online softmax and the OOD-prototype gradient.

For a feature row ``h``, class prototypes centred on the OOD prototype, ``P_c = p_c - p_o``,
and ``u = h - p_o``::

    d_c  = sqrt(max(||u||^2 + ||P_c||^2 - 2 u.P_c, 0))     (GEMM, tile by tile)
    d_o  = ||u||
    lse  = log(exp(-d_o) + sum_c exp(-d_c))                (online: running max and sum)
    q_o  = exp(-d_o - lse)
    grad = q_o * u / d_o                                   (0 where d_o == 0)

Schedule. The grid is (row block x class group), group index fastest, so the ``n_groups``
programs that share a ``BLOCK_N``-row tile of ``h`` run side by side and read it from HBM once
between them (L2 serves the rest). The prototypes reach ``tl.dot`` untouched: they are prepared
once (centred on ``p_o``, scaled, cast to the GEMM's operand dtype, zero-padded to whole tiles;
:func:`grood_kernels._prepare.prepare_prototypes`) and kept while the caller keeps its
prototype tensor. The feature tile is centred in registers on the A operand. ``||u||^2`` comes
out of the first class block's K-loop. Each program walks its group's class blocks with a
running max / sum-exp and the ``N_CAND`` nearest prototypes by GEMM distance (insertion gated:
a block that holds nothing nearer than a row's current worst candidate costs one comparison;
where a group is one block, in the tensor-core modes on Hopper, the candidates come from one
reduction a round instead: :func:`grood_kernels._ncp_configs.one_block`), and writes them as a
partial result. The last program of a row block to finish (an atomic counter) merges the
partials, recomputes the candidates' distances exactly from fp32 differences (they replace
their GEMM estimates in the sum, the prediction and ``min_dist``), and writes the gradient,
while the row tile is still in L2. Only a [BLOCK_N, BLOCK_C] tile of distances ever exists.
The same computation in PyTorch is :func:`grood.functional.ncp_gradient`.

Where every class fits one block the class split cannot share the row tile, and the finish
re-reads it from L2 twice. For small C and D an autotuning candidate, the single-read variant
(:mod:`grood_kernels._ncp_single_read`), holds the whole centred tile in registers from its
load to the gradient's store, so ``h`` is read once; ``GROOD_AUTOTUNE=1`` times it against the
class-group kernel on the device. Another candidate, the staged variant (``ieee``, ``tf32``,
``bf16``; :func:`grood_kernels._ncp_configs.staged_config`), centres the rows in a pre-pass
(:mod:`grood_kernels._centre`) into the gradient's rows, so the K-loop hands both operands to
``tl.dot`` as loaded; the finish reads ``u`` back from those rows and scales them in place. A
third, the split variant (:func:`grood_kernels._ncp_configs.split_config`,
:mod:`grood_kernels._split`), runs the GEMM of those rows in torch (cuBLAS on a GPU) chunk by
chunk and everything after it in one Triton epilogue per chunk; the launcher takes it in
``ieee`` on a GPU, where the BLAS's fp32 GEMM is far ahead of Triton's FMA dot
(:func:`grood_kernels._ncp_configs.launch_config`). With ``finish_apart`` the class-group
kernel only writes its partials and the finish runs as a launch of its own over 8-row tiles
(:func:`grood_kernels._ncp_finish._ncp_finish_kernel`): every SM then finishes rows at once,
where otherwise one program per 128-row block finishes them alone on its SM. The split variant
takes it too: its epilogues run the class loop only, and one finish launch follows the chunks.

Where each part lives: the class-group kernel in :mod:`grood_kernels._ncp_kernel`, the finish
in :mod:`grood_kernels._ncp_finish` (its exact re-rank, results and gradient in
:mod:`grood_kernels._ncp_rerank`), the kernel without a GEMM (up to 16 classes) in
:mod:`grood_kernels._ncp_exact`; the launcher's configuration per shape and GPU in
:mod:`grood_kernels._ncp_configs`, the autotuning candidates in
:mod:`grood_kernels._ncp_candidates`; the launches one configuration makes, in order, in
:mod:`grood_kernels._ncp_plan`. This module is the launcher: it checks its inputs, allocates
the outputs, prepares the prototypes once, and runs the plan of the launcher's configuration
(or of the one the tuner picks).
"""

from __future__ import annotations

import torch
import triton

from grood_kernels._dot import check_bf16_runs
from grood_kernels._launch import LaunchConfig, on_device, run, sm_count, target_major
from grood_kernels._ncp_candidates import candidate_configs
from grood_kernels._ncp_configs import launch_config
from grood_kernels._ncp_plan import allocate_scratch, compile_launches, plan
from grood_kernels._prepare import prepare_prototypes
from grood_kernels._tuning import autotune_enabled, tune
from grood_kernels.contract import (
    KERNEL_DTYPES,
    NCPGradient,
    check_dense,
    check_has_columns,
    check_precision,
    check_sq_norms,
    ncp_scale,
)

#: The launcher, and its launches compiled unlaunched for the compile report (every kernel
#: module has both).
__all__ = ["compile_launches", "ncp_gradient"]


def _agree(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Two configurations' ``(q_ood, pred)`` agree: q_ood to the spread the launch
    configurations show on a GPU (summation order; at most 1.2e-5 relative on an H200), with a
    margin for the tensor-core modes' rounding, and at most 0.1 % of predictions changed
    (exact ties may go either way)."""
    (q_a, p_a), (q_b, p_b) = a, b
    return (torch.allclose(q_b, q_a, rtol=1e-3, atol=1e-6, equal_nan=True)
            and float((p_a != p_b).float().mean()) <= 1e-3)


def ncp_gradient(
    h: torch.Tensor,
    prototypes: torch.Tensor,
    ood_prototype: torch.Tensor,
    *,
    precision: str = "ieee",
    prototype_sq_norms: torch.Tensor | None = None,
) -> NCPGradient:
    """Triton twin of :func:`grood.functional.ncp_gradient` (same arguments and results).

    Args:
        h (Tensor): features [N, D], float32 / float16 / bfloat16, any strides.
        prototypes (Tensor): class prototypes [C, D]. The GEMM operand prepared from this
            tensor and ``ood_prototype`` is kept for later calls with the same two tensors
            while both live unmodified (identity and version counter); a change torch does not
            see (through a NumPy array sharing the memory, or ``.data``) needs new tensors.
        ood_prototype (Tensor): OOD prototype [D].
        precision (str): ``"ieee"``, ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` for the GEMM.
        prototype_sq_norms (Tensor, optional): ``||p_c - p_o||^2``, shape [C], fp32; refused
            where they are not those of the prototypes (checked once per tensor).

    Returns:
        NCPGradient: ``grad`` [N, D] fp32, ``q_ood``, ``pred`` (int64), ``min_dist``, ``lse``.

    ``h`` is read in place through its strides and centred on the OOD prototype inside the
    kernel. The prototypes' GEMM operand is prepared once and kept while the caller keeps the
    same prototype tensors (:func:`prepare_prototypes`). Extra device memory: that operand, and
    per class group 24 bytes of partial results per row. The split variant (``ieee`` on a GPU,
    :func:`launch_config`) and those ``GROOD_AUTOTUNE=1`` may pick
    add 4 bytes per row (staged, split; their centred rows live in the gradient's), and for
    the split variant a buffer of GEMM results of at most 256 MiB.
    """
    check_precision(precision)
    check_dense(h=h, prototypes=prototypes, ood_prototype=ood_prototype,
                prototype_sq_norms=prototype_sq_norms)
    if h.ndim != 2 or prototypes.ndim != 2 or ood_prototype.ndim != 1:
        raise ValueError("expected h [N, D], prototypes [C, D] and ood_prototype [D], got "
                         f"{tuple(h.shape)}, {tuple(prototypes.shape)}, "
                         f"{tuple(ood_prototype.shape)}")
    n, d = h.shape
    c = prototypes.shape[0]
    if prototypes.shape[1] != d or ood_prototype.shape[0] != d:
        raise ValueError(f"feature dimensions differ: h {d}, prototypes {prototypes.shape[1]}, "
                         f"ood_prototype {ood_prototype.shape[0]}")
    if c == 0:
        raise ValueError("prototypes is empty: need at least one class")
    check_has_columns(d, "h and the prototypes")
    for name, t in (("h", h), ("prototypes", prototypes), ("ood_prototype", ood_prototype)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton ncp_gradient takes float32, float16 or bfloat16; "
                            f"{name} is {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
    check_bf16_runs(precision, h.device)
    if prototype_sq_norms is not None:
        check_sq_norms(prototype_sq_norms, prototypes, ood_prototype)

    dev = h.device
    grad = torch.empty((n, d), dtype=torch.float32, device=dev)
    q_ood = torch.empty(n, dtype=torch.float32, device=dev)
    pred = torch.empty(n, dtype=torch.int64, device=dev)
    min_dist = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return NCPGradient(grad, q_ood, pred, min_dist, lse)
    # Work in units of a power of two near the prototypes' magnitude (exact rescaling; the
    # twin's rule): kept with the prototypes, so nothing here reads a value of h and the
    # launch never synchronises with the device.
    scale = ncp_scale(prototypes, ood_prototype)
    prep = prepare_prototypes(prototypes, ood_prototype, precision, scale)
    psq = prep.sq_norms
    if prototype_sq_norms is not None and scale == 1.0:
        psq = prototype_sq_norms.to(device=dev, dtype=torch.float32).contiguous()
    n_sm, major = sm_count(dev), target_major(dev)

    def launch(cfg: LaunchConfig) -> None:
        scratch = allocate_scratch(n, c, d, cfg, precision, dev)
        for planned in plan(h, prototypes, prep, psq, scratch,
                            (grad, q_ood, pred, min_dist, lse), precision, cfg):
            run(planned)

    if autotune_enabled(dev):
        key = ("ncp_gradient", precision, str(h.dtype), triton.next_power_of_2(c),
               triton.next_power_of_2(d), n >= 4096)
        cands = candidate_configs(n, c, d, precision, h.element_size(), n_sm, major)
        with on_device(dev):  # the timing's events and synchronisations on h's device too
            cfg = tune(launch, key, n, c, cands, dev,
                       results=lambda: (q_ood.clone(), pred.clone()), agree=_agree)
        launch(cfg)
    else:
        launch(launch_config(n, c, d, precision, h_bytes=h.element_size(), n_sm=n_sm,
                             major=major))
    return NCPGradient(grad, q_ood, pred, min_dist, lse)

