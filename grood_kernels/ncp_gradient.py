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
:func:`prepare_prototypes`) and kept while the caller keeps its prototype tensor. The feature
tile is centred in registers on the A operand. ``||u||^2`` comes out of the first class block's
K-loop. Each program walks its group's class blocks with a running max / sum-exp and the
``N_CAND`` nearest prototypes by GEMM distance (insertion gated: a block that holds nothing
nearer than a row's current worst candidate costs one comparison; where a group is one block,
in the tensor-core modes on Hopper, the candidates come from one reduction a round instead:
:func:`one_block`), and writes them as a partial result. The last program of a row block to
finish (an atomic counter) merges the partials, recomputes the candidates' distances exactly
from fp32 differences (they replace their GEMM estimates in the sum, the prediction and
``min_dist``), and writes the gradient, while the row tile is still in L2. Only a [BLOCK_N,
BLOCK_C] tile of distances ever exists. The same computation in PyTorch is
:func:`grood.functional.ncp_gradient`.

Where every class fits one block the class split cannot share the row tile, and the finish
re-reads it from L2 twice. For small C and D (:func:`single_read_config`) an autotuning
candidate, :func:`_ncp_single_read_kernel`, holds the whole centred tile in registers from its
load to the gradient's store, so ``h`` is read once; ``GROOD_AUTOTUNE=1`` times it against the
class-group kernel on the device. Another candidate, the staged variant (``ieee``, ``tf32``,
``bf16``; :func:`staged_config`), centres the rows in a pre-pass (:mod:`grood_kernels._centre`)
into the gradient's rows, so the K-loop hands both operands to ``tl.dot`` as loaded; the finish
reads ``u`` back from those rows and scales them in place. A third, the split variant
(:func:`split_config`, :mod:`grood_kernels._split`), runs the GEMM of those rows in torch
(cuBLAS on a GPU) chunk by chunk and everything after it in one Triton epilogue per chunk;
the launcher takes it in ``ieee`` on a GPU, where the BLAS's fp32 GEMM is far ahead of
Triton's FMA dot (:func:`launch_config`). With ``finish_apart`` the class-group kernel only
writes its partials and the finish runs as a launch of its own over 8-row tiles
(:func:`grood_kernels._ncp_finish._ncp_finish_kernel`): every SM then finishes rows at once,
where otherwise one program per 128-row block finishes them alone on its SM. The split
variant takes it too: its epilogues run the class loop only, and one finish launch follows
the chunks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from grood_kernels._centre import CENTRE_TILE, _centre_rows_kernel
from grood_kernels._dot import check_bf16_runs, dot_t
from grood_kernels._launch import (
    DEFAULT_SMS,
    KernelLaunch,
    LaunchConfig,
    TorchCall,
    fit_tile,
    on_device,
    run,
    sm_count,
    target_major,
    triton_version,
)
from grood_kernels._ncp_exact import EXACT_CANDIDATE_MAX_C, _ncp_exact_kernel, exact_config
from grood_kernels._ncp_finish import (
    FINISH_OCCUPANCY,
    FINISH_TILE,
    _ncp_finish_kernel,
    add_exact_sq,
    distances,
    finish_programs,
    finish_rows,
    load_u,
    row_results,
    store_partials,
    store_row_results,
)
from grood_kernels._prepare import (
    PAD_COLS,
    PAD_ROWS,
    PreparedPrototypes,
    operand_dtype,
    prepare_prototypes,
)
from grood_kernels._split import _ncp_epilogue_kernel, padded_classes, split_gemm, split_rows
from grood_kernels._topk import first_nearest, insert_nearest
from grood_kernels._tuning import autotune_enabled, tune
from grood_kernels.contract import (
    DOT_MODES,
    KERNEL_DTYPES,
    NCP_CANDIDATES,
    NCPGradient,
    check_dense,
    check_has_columns,
    check_precision,
    check_sq_norms,
    ncp_scale,
)

#: Bytes of feature tiles the programs resident at one time may keep re-reading from L2
#: (half of an H100's 50 MB L2, which is two partitions).
L2_BUDGET = 24 << 20


def rerank_gate(c: int, d: int, precision: str) -> bool:
    """Whether the finish gates its exact re-rank (the GEMM-nearest candidate in every row,
    the others only where the GEMM's error bound lets them be nearer; see
    :func:`grood_kernels._ncp_finish.rerank_and_write`): where the fp32 prototypes exceed
    ``L2_BUDGET`` (C = 21,841 at D = 1,024), so that their rows would come from HBM, in every
    mode. Below it the gate saves only L2 traffic and costs a pass over D (in a tile of 128
    rows one row tied within the GEMM's error runs the second pass): on an H200 (2026-12-04,
    triton 3.6) the launcher with the gate took 1.64x the time of re-ranking all 4 at
    ImageNet-1k in tf32 (6.06 / 3.71 ms) and bf16 (5.79 / 3.55 ms), 1.88x and 1.73x at
    CIFAR-100, with ``q_ood`` as near float64 either way (hard softmax, tf32: 2.47e-5 gated,
    2.43e-5 not)."""
    return c * d * 4 > L2_BUDGET


def lean_finish(precision: str, gate: int, block_cols: int) -> bool:
    """Whether the class-group kernel's own finish (the last program of a row block) runs
    its passes over D lean (:func:`grood_kernels._ncp_finish.exact_sq_lean`: each candidate's
    prototype row picked once per tile, squares summed per element and across the row once
    after the loop, no select after a load), as the separate finish does: in the tensor-core
    modes where every candidate is re-ranked (no ``gate``). Compiled for sm_90a at ImageNet-1k
    (128 x 128 tiles, 8 warps) the finish's SASS instructions per warp and row block fall
    from 58,900 to 28,200 in tf32 (triton 3.6: 55,500 to 31,500; bf16 alike; tf32x3 47,100 to
    26,600, under 3.6 50,600 to 30,300), within the registers the K-loop leaves (tf32 235 ->
    255, no spills, one CTA per SM before and after) and with the same wgmma groups in flight;
    that program runs the finish alone on its SM while the tensor cores wait (the finish took
    about 1.67 of the tf32 step's 3.71 ms on an H200, 2026-12-04). Not in tf32x3 on 16-class
    tiles (C <= 16), where its kernel would lose its second CTA per SM (126 -> 144 registers),
    nor where the gate is on (C = 21,841: there the counts went both ways)."""
    if gate or precision not in ("tf32", "tf32x3", "bf16"):
        return False
    return precision != "tf32x3" or block_cols > 16


def finish_flags(lean: int, d: int, block_d: int) -> dict[str, int]:
    """The class-group kernel's ``LEAN`` and ``EVEN_D`` (D a whole number of its K-steps,
    taken by the lean passes only: the plain ones keep their column masks, as timed)."""
    return {"LEAN": lean, "EVEN_D": int(bool(lean) and d % block_d == 0)}


#: Triton releases before this one compile a tf32 K-loop that centres its feature tile in
#: registers (the wgmma's A operand) so that, inside the class loop, ptxas serializes every
#: wgmma of the kernel (its note C7513, "non wgmma instructions defining input registers of a
#: wgmma": each then waits for the one before). Triton 3.6 does so for Hopper at C = 21,841
#: in tf32 and tf32x3 (bf16 stays pipelined); 3.7.1, 3.8 and 3.9 do not. There a program that
#: holds more than one class block takes the staged variant in tf32 (both operands from shared
#: memory, pipelined under 3.6); tf32x3 has no staged variant and stays serialized.
WGMMA_CLASS_LOOP_FROM = (3, 7)


def launch_config(n: int, c: int, d: int, precision: str, *, h_bytes: int = 4,
                  n_sm: int | None = None, major: int = 0, exact: bool = True
                  ) -> LaunchConfig:
    """One known-good launch configuration for this shape, on a GPU of compute capability
    ``major``.x (0: the interpreter).

    On a GPU, up to :data:`grood_kernels._ncp_exact.EXACT_MAX_C` classes (CIFAR-10), the
    kernel without a GEMM (:func:`grood_kernels._ncp_exact.exact_config`; not with
    ``exact=False``, which gives the GEMM kernels' configuration): every class's distance from
    fp32 differences, so every mode gives the same results, as near float64 as ``ieee``'s
    re-ranked candidates. Compiled for sm_90a at CIFAR-10 (N = 65,536, D = 512) its
    instructions issue in about 0.07 ms, as long as its HBM traffic takes (``h`` read once,
    the gradient written), where an H200 timed the GEMM kernels at 0.57-1.21 ms
    (2026-12-04; ``bench/RESULTS.md``); not yet timed itself.

    Tensor-core modes: 128-row x 128-class tiles on two warpgroups (8 warps), 32-wide K-steps,
    4 stages (128 KB of shared memory in tf32; ``tf32x3``: 16-wide K-steps of 4 x 16 operand
    columns, 3 stages). ``ieee`` (FMA): 32 x 64 tiles on 4 warps so
    nothing spills. The class groups: as few as keep the feature tiles of the programs resident
    at one time within ``L2_BUDGET`` (each row tile is then read from HBM once), each a whole
    number of class blocks. On Hopper under triton before :data:`WGMMA_CLASS_LOOP_FROM`, tf32
    programs that loop over class blocks take the staged variant.

    ``ieee`` on a GPU: the split variant (:func:`split_config`; the BLAS's fp32 GEMM, then
    the fused epilogue), since Triton's FMA dot runs far below it: on an H200 (2026-12-04,
    triton 3.6) 5.4x faster than the FMA kernel at ImageNet-1k (7.13 against 38.58 ms), 2.4x
    at CIFAR-100, 1.15x at CIFAR-10. At C = 21,841 (D = 1,024) that H200 took 401.6 ms for
    the FMA kernel, 92.4 ms for torch's fp32 closed form and 56 ms for cuBLAS's fp32 GEMM
    alone, the split variant's GEMM; its epilogue, at about 0.74 ms per 65.5 M distances at
    ImageNet-1k, would add some 16-22 ms for the 1.43 G there (its chunks of 3,040 rows give
    95 programs to 132 SMs). Not yet timed at that shape: the report's main table times it.
    """
    small = exact_config(c, d) if major > 0 and exact else None
    if small is not None:
        return small
    if precision == "ieee" and major > 0:
        split = split_config(c, d, precision)
        if split is not None:
            return split
    if precision == "ieee":
        tiles, ctas = (32, 64, 32, 4, 3), 3
    else:
        tiles, ctas = (128, 128, 32, 8, 4), 1
        if precision == "tf32x3":  # its K-step carries 4 x BLOCK_D operand columns
            tiles = (128, 128, 16, 8, 3)
    cfg = _fit_config(tiles, n, c, d, h_bytes, (n_sm or DEFAULT_SMS) * ctas)
    if (major == 9 and precision == "tf32" and triton_version() < WGMMA_CLASS_LOOP_FROM
            and blocks_per_group(c, cfg) > 1):
        return staged_config(n, c, d, precision, h_bytes, n_sm) or cfg
    return cfg


def one_block(c: int, cfg: LaunchConfig, precision: str) -> bool:
    """Whether the class-group kernel takes its candidates by
    :func:`grood_kernels._topk.first_nearest` (``ONE_BLOCK``): where each program holds one
    class block of up to 128 classes (ImageNet-1k and below at the launcher's tiles), in the
    tensor-core modes. There the tile's epilogue runs while the program's tensor cores wait
    (one CTA per SM), and one reduction a round instead of the gated insertion's two takes
    ~470 of its ~3,300 SASS instructions per warp away (sm_90a, triton 3.9 and 3.6), with no
    spill or CTA lost. Not on the 256-class tile (it spills 264-444 bytes), nor in ``ieee``
    (under triton 3.6 CIFAR-10 would lose its fifth CTA per SM: 96 -> 117 registers), nor from
    sm_100 (:func:`grood_kernels._launch.for_target`). The results are the same bit for bit
    either way."""
    return (blocks_per_group(c, cfg) == 1 and cfg.block_cols <= 128
            and precision != "ieee")


def blocks_per_group(c: int, cfg: LaunchConfig) -> int:
    """Class blocks each program of ``cfg``'s class-group kernel loops over (the last group
    may hold fewer)."""
    return triton.cdiv(triton.cdiv(c, cfg.block_cols), cfg.n_split)


def _fit_config(tiles: tuple[int, ...], n: int, c: int, d: int, h_bytes: int,
                resident: int) -> LaunchConfig:
    """``tiles`` (BLOCK_N, BLOCK_C, BLOCK_D, warps, stages) shrunk to the shape (every block
    at least 16, as ``tl.dot`` needs), with the class groups for ``resident`` programs."""
    block_n, block_c, block_d, warps, stages = tiles
    block_n, block_c, block_d = fit_tile(block_n, n), fit_tile(block_c, c), fit_tile(block_d, d)
    return LaunchConfig(block_n, block_c, block_d, warps, stages,
                        n_split=n_groups(n, c, d, block_n, block_c, h_bytes, resident))


def n_groups(n: int, c: int, d: int, block_n: int, block_c: int, h_bytes: int,
             resident: int) -> int:
    """Class groups per row tile: the fewest that keep the row tiles of ``resident`` programs
    within ``L2_BUDGET``, rounded to whole class blocks per group."""
    n_cb = triton.cdiv(c, block_c)
    row_blocks = triton.cdiv(n, block_n)
    tile = block_n * d * h_bytes
    need = max(1, math.ceil(min(resident, row_blocks * n_cb) * tile / L2_BUDGET))
    per_group = max(1, n_cb // min(need, n_cb))
    return triton.cdiv(n_cb, per_group)


#: Launch configurations tried when ``GROOD_AUTOTUNE=1``, per GEMM kind:
#: (BLOCK_N, BLOCK_C, BLOCK_D, warps, stages); the class groups follow from the shape. Every
#: one compiles without spills for sm_90a (``bench/compile_report.py --configs all``; of the
#: other candidates, the staged 32-row FMA tile spills 4 B at C = 10 and the split variant's
#: epilogue 12 B at C = 100 and 1,000 in ``ieee``, where its re-rank is not gated; none in the
#: tensor-core modes, triton 3.9).
TUNE_CONFIGS: dict[str, list[tuple[int, ...]]] = {
    "fma": [(32, 64, 32, 4, 3), (32, 64, 32, 8, 3)],
    "tensor": [(128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (64, 128, 32, 4, 4),
               (64, 128, 32, 8, 4), (128, 64, 32, 8, 4), (64, 64, 32, 4, 3)],
}


def tune_configs(precision: str) -> list[tuple[int, ...]]:
    """The autotuning candidates of ``precision``."""
    return TUNE_CONFIGS["fma" if precision == "ieee" else "tensor"]


#: Largest class count (per tensor-core mode) and feature width at which the single-read
#: variant compiles spill-free for sm_90a under triton 3.6 and 3.9: 16-row tiles on 8 warps
#: (``mma.sync``), the centred tile held in registers (``bench/compile_report.py --configs
#: all``; tf32 at C = 100 and 32- or 64-row tiles spill).
SINGLE_READ_LIMITS = {"tf32": 16, "bf16": 128}
SINGLE_READ_MAX_D = 512


def single_read_config(c: int, d: int, precision: str) -> LaunchConfig | None:
    """The single-read variant's configuration for this shape, where it applies: every class
    in one block and the feature tile in registers, so ``h`` is read once at any C it takes
    (the class-group kernel re-reads its row tile from L2 when C fits one block)."""
    if c > SINGLE_READ_LIMITS.get(precision, 0) or d > SINGLE_READ_MAX_D:
        return None
    return LaunchConfig(16, max(16, triton.next_power_of_2(c)),
                        max(16, triton.next_power_of_2(d)), 8, 1, single_read=True)


#: Modes of the variants whose pre-pass centres the rows for the GEMM (staged, split): their
#: A operand then goes to the MMA (or the BLAS) as written. Not tf32x3: the staged kernel would
#: split it in registers again, and no BLAS runs the three-product tf32 GEMM.
PREPASS_PRECISIONS = ("ieee", "tf32", "bf16")


def rounded_rows(cfg: LaunchConfig, precision: str) -> bool:
    """Whether the pre-pass writes ``u`` rounded to the nearest TF32 value: tf32's
    :func:`operand_rows`. The MMA would truncate the rows it loads, and truncated A operands
    put ``q_ood`` some 20x further from float64 on clustered post-ReLU features (2.1e-3
    against 1.0e-4 relative at ImageNet-1k's C and D; ``bench/operand_rounding.py``). The
    kernel then takes the A operand the launcher's K-loop makes in registers, and the BLAS
    (split) operands whose TF32 conversion is exact however it converts."""
    return operand_rows(cfg, precision) and precision == "tf32"


def operand_rows(cfg: LaunchConfig, precision: str) -> bool:
    """Whether the pre-pass leaves the gradient's rows holding the GEMM's A operand only, not
    ``u``: in tf32 ``u`` rounded to TF32 (:func:`rounded_rows`), in bf16 ``u`` in bf16, in the
    first half of each row's bytes (no [N, D] copy beside the gradient: 256 MiB at
    ImageNet-1k's D = 2,048 and N = 65,536). The finish then centres ``h`` again for the
    exact re-rank and the gradient, with the pre-pass's ``||u||^2``, and writes each row's
    gradient over its operand once every program that reads the row has read it (the last
    class group of a row block, the chunk's epilogue after its GEMM, or the finish launched
    after them all). Staged and split variants in tf32 and bf16; ``ieee``'s rows hold ``u``."""
    return (cfg.staged or cfg.split) and precision in ("tf32", "bf16")


def staged_config(n: int, c: int, d: int, precision: str, h_bytes: int,
                  n_sm: int | None = None) -> LaunchConfig | None:
    """The staged variant of the launcher's configuration, where it applies: a pre-pass
    writes ``u = h / scale - p_o`` (in tf32 rounded to TF32: :func:`rounded_rows`) and
    ``||u||^2`` into the gradient's rows, and the kernel's K-loop loads both GEMM operands
    straight into the MMA (the centring otherwise sits between the feature tile's load and
    ``tl.dot``). Costs one more write and read of the [N, D] rows (in bf16 of bf16 rows of
    ``u``, the A operand as the MMA takes it, held in the gradient's rows:
    :func:`operand_rows`)."""
    if precision not in PREPASS_PRECISIONS:
        return None
    # The kernel's A operand is then the fp32 rows: the class groups are sized for 4 bytes.
    return launch_config(n, c, d, precision, h_bytes=4, n_sm=n_sm)._replace(staged=True)


#: A tensor-core tile twice as wide in classes (each row tile's re-reads halved), in the staged
#: variant (A and B from shared memory, as in a plain GEMM). It compiles without spills for
#: sm_90a under triton 3.6, 3.7.1 and 3.9 where a program holds one class block (the class
#: loop's running state then needs no registers), so it is a candidate only there; centred in
#: registers instead, it spills under triton 3.6.
WIDE_TILE = (128, 256, 32, 8, 3)
#: Triton releases under which :data:`WIDE_TILE` spills even there, so it is no candidate:
#: 3.8.0 (torch 2.14's) for sm_90a, 68-124 bytes per thread stored and reloaded inside the
#: tile epilogue's loops (ImageNet-1k and a 256-class problem, tf32, with the finish and
#: apart).
WIDE_TILE_SPILLS_UNDER = ((3, 8),)


def wide_config(n: int, c: int, d: int, precision: str, h_bytes: int,
                n_sm: int | None = None) -> LaunchConfig | None:
    """The staged 256-class tile where every class group is one block of it and C needs more
    than 128 classes (tf32 and bf16, not under :data:`WIDE_TILE_SPILLS_UNDER`; None
    otherwise). Its class groups are sized for the staged rows' 4 bytes per element."""
    if (precision not in ("tf32", "bf16") or c <= 128
            or triton_version() in WIDE_TILE_SPILLS_UNDER):
        return None
    cfg = _tuned_config(WIDE_TILE, n, c, d, 4, precision, n_sm)
    if cfg.n_split != triton.cdiv(c, cfg.block_cols):
        return None
    return cfg._replace(staged=True)


def split_config(c: int, d: int, precision: str, tiles: tuple[int, ...] = (32, 64, 64, 4)
                 ) -> LaunchConfig | None:
    """The split variant (:mod:`grood_kernels._split`: pre-pass, ``torch.mm`` over row
    chunks, a Triton epilogue per chunk) where its mode applies; ``tiles`` are the
    epilogue's (rows, classes, D-step of the re-rank, warps): by default 32 x 64, 64-wide
    D-steps, 4 warps, the configuration an H200 timed (2026-12-04). For sm_90a it compiles
    without spills (190 registers, 2 CTAs/SM, as triton 3.6 compiled the timed kernel; with
    the GEMM's results in unpadded rows, triton 3.9 held it to 168 registers and spilled 12
    B); for sm_100a it spills 12 B outside its loops at C = 100 and 1,000. In tf32 and bf16,
    whose finish centres ``h`` (:func:`operand_rows`), it holds 246-248 registers for sm_90a
    (still 2 CTAs/SM, no spills) and spills only for sm_100a at C = 21,841 (24 B, triton
    3.9)."""
    if precision not in PREPASS_PRECISIONS:
        return None
    rows, cols, step, warps = tiles
    return LaunchConfig(rows, fit_tile(cols, c), fit_tile(step, d), warps, 2, split=True)


#: The split variant's other epilogue tiles, autotuning candidates in ``ieee`` (where the
#: launcher takes the split variant on a GPU): spill-free for sm_90a and sm_100a (triton 3.9)
#: at every report shape: 32 x 32 with 32-wide D-steps on 4 warps (126 registers, 4 CTAs/SM
#: at C = 1,000), the launcher's tiles on 8 warps (128 registers, 2 CTAs/SM), and 16 rows of
#: the launcher's tile on 4 warps (116-128 registers under 3.9, 106-110 under 3.6; 4 CTAs/SM):
#: twice the programs per chunk of rows, where the buffer's bound makes the chunks short
#: (C = 21,841: 191 programs of 16 rows per chunk for an H100's 132 SMs, against 95 of 32).
#: Not timed on a GPU yet.
SPLIT_EPILOGUE_TILES = ((32, 32, 32, 4), (32, 64, 64, 8), (16, 64, 64, 4))


def candidate_configs(n: int, c: int, d: int, precision: str, h_bytes: int,
                      n_sm: int | None = None, major: int = 0) -> list[LaunchConfig]:
    """Every distinct autotuning candidate at this shape, the launcher's configuration first
    (the tuner checks the others' results against it), then the GEMM kernels' launcher
    configuration and the kernel without a GEMM (up to
    :data:`grood_kernels._ncp_exact.EXACT_CANDIDATE_MAX_C` classes; up to 16 one of the two is
    the launcher's):
    the tile list fitted to it (small
    shapes shrink several tiles to the same one), the wide tile, the single-read, staged and
    split variants where they apply (in ``ieee`` the split variant with each of
    :data:`SPLIT_EPILOGUE_TILES` too), and in the tensor-core modes the launcher's, the wide
    tile's and the staged variant's class-group kernels with the finish apart (the
    launcher's also with the finish's programs filling the SMs, where the L2 rule leaves
    fewer); last, in every mode the split variant has, its epilogue with the finish apart."""
    fitted: list[LaunchConfig | None] = [
        launch_config(n, c, d, precision, h_bytes=h_bytes, n_sm=n_sm, major=major)]
    gemm = launch_config(n, c, d, precision, h_bytes=h_bytes, n_sm=n_sm, major=major,
                         exact=False)
    fitted += [gemm, exact_config(c, d, every_c=c <= EXACT_CANDIDATE_MAX_C)]
    fitted += [_tuned_config(t, n, c, d, h_bytes, precision, n_sm)
               for t in tune_configs(precision)]
    wide = wide_config(n, c, d, precision, h_bytes, n_sm)
    fitted.append(wide)
    fitted.append(single_read_config(c, d, precision))
    staged = staged_config(n, c, d, precision, h_bytes, n_sm)
    fitted.append(staged)
    split = split_config(c, d, precision)
    fitted.append(split)
    if precision == "ieee":
        fitted += [split_config(c, d, precision, tiles) for tiles in SPLIT_EPILOGUE_TILES]
    else:  # the finish apart (in ieee the FMA K-loop, or the BLAS's, sets the pace)
        apart = [cfg._replace(finish_apart=True) for cfg in (gemm, wide, staged)
                 if cfg is not None and not (cfg.split or cfg.single_read)]
        sms = n_sm or DEFAULT_SMS
        if apart and (finish_programs(n, d, L2_BUDGET, sms)
                      < finish_programs(n, d, L2_BUDGET, sms, FINISH_OCCUPANCY)):
            # the launcher's tiles with the finish's programs filling the SMs instead
            apart.insert(1, apart[0]._replace(finish_waves=FINISH_OCCUPANCY))
        fitted += apart
    if split is not None:  # its epilogue's class loop only, the finish over every row after
        fitted.append(split._replace(finish_apart=True))
    return [cfg for i, cfg in enumerate(fitted) if cfg is not None and cfg not in fitted[:i]]


@triton.jit
def _split_tf32(x):
    """``x = hi + lo`` with ``hi`` exact in tf32 (10 mantissa bits kept) and ``lo = x - hi``
    exact in fp32: the operands of a three-product tf32 GEMM that is fp32-faithful."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _class_block_dots(
    # pointers: features, the prepared operand, the OOD prototype
    h_ptr, op_ptr, pood_ptr, psq_ptr,
    # the row tile, the class block; sizes and scalars
    offs_n, mask_n, c0, C, D, inv_scale,
    # strides
    stride_hn, stride_hd, stride_oc,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr, WITH_SQ: tl.constexpr, STAGED: tl.constexpr,
):
    """``u . P_c - ||P_c||^2 / 2`` for one class block [BLOCK_N, BLOCK_C] (-inf for classes
    past C), and ``||u||^2`` when WITH_SQ.

    The accumulator starts at zero and ``||P_c||^2 / 2`` is subtracted after the K-loop: started
    there, the accumulator's magnitude would set the precision every product is added at (the
    tensor cores align a step's products to the accumulator; FMA rounds to it), which on an
    H200 put tf32x3 at 4e-5 relative in q_ood where the softmax is hard (ieee 1.8e-6); the
    norms are loaded after the loop, so they hold no registers during it. The prepared operand
    is padded to whole tiles, so its loads need no mask and go to ``tl.dot`` as loaded; the
    feature tile is centred in registers (the A operand), or with ``STAGED`` loaded centred
    from the pre-pass's rows and passed on as loaded.
    """
    offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    arange_d = tl.arange(0, BLOCK_D)  # int32: see _ncp_finish._wide
    dots = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    # ||u||^2 summed per element over the K-steps and across the row once after the loop: a
    # row sum in every K-step cost the tf32 K-loop 31 of its 206 instructions (shuffles).
    sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DOT_MODE != 0:
        # At least one K-step: without it the compiled code keeps a path that skips the K-loop,
        # where the zeroed accumulator meets the final wgmma wait, and ptxas then serializes
        # every wgmma of the kernel (its note C7515; tf32 at every shape, bf16 at some, triton
        # 3.6-3.9). (Not in ieee: no wgmma, and on sm_100a more registers, spilled in the
        # K-loop.)
        tl.assume(D > 0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, offs_d < D, stride_hd,
                    inv_scale, STAGED, SPARE_ROWS=1)  # [BLOCK_N, BLOCK_D]
        if WITH_SQ:
            sq += u * u
        p = tl.load(op_ptr + offs_c[:, None] * stride_oc + offs_d[None, :])  # [BLOCK_C, BLOCK_D]
        if DOT_MODE == 2:
            # Split precision as one tf32 GEMM over 4 x BLOCK_D: per feature, (u_hi, u_hi,
            # u_lo, u_lo) (join appends the new axis last) against the prepared
            # (P_hi, P_lo, P_hi, P_lo). One dot keeps the MMA
            # asynchronous (three separate dots each wait for their own).
            u_hi, u_lo = _split_tf32(u)
            pair = tl.join(u_hi, u_lo)
            a = tl.reshape(tl.join(pair, pair), [BLOCK_N, 4 * BLOCK_D])
            p4 = tl.load(op_ptr + offs_c[:, None] * stride_oc + 4 * d0
                         + tl.arange(0, 4 * BLOCK_D)[None, :])
            dots = dot_t(a, p4, dots, 1)
        else:  # (the tile centred here rounded to TF32; the staged rows go as loaded)
            dots = dot_t(u, p, dots, DOT_MODE, ROUND_A=1 - STAGED)
    p_sq = tl.load(psq_ptr + offs_c, mask=offs_c < C, other=float("inf"))
    if WITH_SQ:
        u_sq = tl.sum(sq, axis=1)
    else:
        u_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    return dots - 0.5 * p_sq[None, :], u_sq


@triton.jit
def _ncp_gradient_kernel(
    # pointers: inputs
    h_ptr, op_ptr, proto_ptr, pood_ptr, psq_ptr,
    # pointers: partial results per (class group, row) and the per-row-block arrival counters
    part_f_ptr, part_i_ptr, count_ptr,
    # pointers: outputs
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale, n_groups, blocks_per_group,
    # strides
    stride_hn, stride_hd, stride_oc, stride_pc, stride_pd, stride_gn, stride_gd,
    # the pre-pass's ||u||^2 per row (STAGED; unread otherwise)
    usq_ptr,
    # the features h and their strides, for the finish where the staged rows hold the GEMM's
    # operand only (OPERAND_ROWS; unread otherwise)
    raw_ptr, stride_rn, stride_rd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr, STAGED: tl.constexpr,
    FINISH: tl.constexpr, FLAT_GATE: tl.constexpr = False, RERANK_GATE: tl.constexpr = 0,
    ONE_BLOCK: tl.constexpr = 0, LEAN: tl.constexpr = 0, EVEN_D: tl.constexpr = 0,
    OPERAND_ROWS: tl.constexpr = 0,
):
    # FINISH: the software-pipelining stages of the finish's loops over D (1: plain loads; 2:
    # each step's loads issued during the one before, in the shared memory the K-loop's
    # stages leave free; see finish_stages). 0 (measurement only, ``grood bench --only
    # anatomy``): the partials are written and no program finishes the rows, so the finish's
    # share can be taken apart. ONE_BLOCK: every class group is one class block (the launcher
    # knows; ``blocks_per_group`` is then 1). LEAN: the finish's passes over D as the separate
    # finish runs them (see lean_finish); EVEN_D: D a whole number of K-steps (no column masks
    # in those passes). OPERAND_ROWS (with STAGED): the staged rows hold the MMA's A operand
    # only (u rounded to TF32, or in bf16 within the gradient's rows: operand_rows); the finish
    # centres h (``raw_ptr``) itself, as without STAGED, and reads the pre-pass's ||u||^2 (of
    # the unrounded rows), as with it.
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid // n_groups
    group = pid % n_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slots = tl.arange(0, N_CAND)
    n_cb = tl.cdiv(C, BLOCK_C)
    cb0 = group * blocks_per_group
    cb1 = tl.minimum(cb0 + blocks_per_group, n_cb)
    # The rows the K-loop loads: its rows past N load row 0 (load_u's SPARE_ROWS), but bf16
    # rows in the gradient's (OPERAND_ROWS) may hold a finished row's fp32 gradient by then,
    # bytes that are no bf16 values: there they load the tile's first row, which no other
    # program writes before this one is done with it.
    ld_n, ld_mask = offs_n, mask_n
    if OPERAND_ROWS and DOT_MODE == 3:
        ld_n = tl.where(mask_n, offs_n, pid_n * BLOCK_N)
        ld_mask = ld_n < N

    # First class block of the group: also ||u||^2 (the pre-pass's, STAGED); seeds the
    # running max / sum-exp.
    c0 = cb0 * BLOCK_C
    dots, u_sq = _class_block_dots(h_ptr, op_ptr, pood_ptr, psq_ptr, ld_n, ld_mask, c0, C, D,
                                   inv_scale,
                                   stride_hn, stride_hd, stride_oc, BLOCK_N, BLOCK_C, BLOCK_D,
                                   DOT_MODE, STAGED == 0, STAGED)
    if STAGED:
        u_sq = tl.load(usq_ptr + offs_n, mask=mask_n, other=0.0)
    dist = distances(dots, u_sq, scale)
    if ONE_BLOCK:
        # The group is this block: its candidates are the tile's nearest, one reduction a
        # round (while the tensor cores wait), and no class loop is compiled.
        cand_d, cand_i, nearest = first_nearest(dist, c0, BLOCK_N, N_CAND, BLOCK_C)
        m = -nearest
        acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
    else:
        m = -tl.min(dist, axis=1)
        acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
        cand_d = tl.full([BLOCK_N, N_CAND], float("inf"), dtype=tl.float32)
        cand_i = tl.full([BLOCK_N, N_CAND], -1, dtype=tl.int32) - slots[None, :]  # empty
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C,
                                        FLAT_GATE=FLAT_GATE)
        for cb in range(cb0 + 1, cb1):
            c0 = cb * BLOCK_C
            dots, _ = _class_block_dots(h_ptr, op_ptr, pood_ptr, psq_ptr, ld_n, ld_mask, c0,
                                        C, D, inv_scale, stride_hn, stride_hd, stride_oc,
                                        BLOCK_N, BLOCK_C, BLOCK_D, DOT_MODE, False, STAGED)
            dist = distances(dots, u_sq, scale)
            m_new = tl.maximum(m, -tl.min(dist, axis=1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(-dist - m_new[:, None]), axis=1)
            m = m_new
            cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C,
                                            FLAT_GATE=FLAT_GATE)

    store_partials(part_f_ptr, part_i_ptr, group * N + offs_n, mask_n, m, acc, cand_d, cand_i,
                   N_CAND)
    if FINISH:
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_groups - 1:
            tl.debug_barrier()
            x_ptr, stride_xn, stride_xd = h_ptr, stride_hn, stride_hd
            if OPERAND_ROWS:
                x_ptr, stride_xn, stride_xd = raw_ptr, stride_rn, stride_rd
            finish_rows(x_ptr, proto_ptr, pood_ptr, part_f_ptr, part_i_ptr,
                        grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr, usq_ptr, psq_ptr,
                        offs_n, mask_n, N, C, D, scale, inv_scale, n_groups,
                        stride_xn, stride_xd, stride_pc, stride_pd, stride_gn, stride_gd,
                        BLOCK_N, BLOCK_D, N_CAND, STAGED * (1 - OPERAND_ROWS), FINISH,
                        DOT_MODE, RERANK_GATE, LEAN, EVEN_D, OPERAND_ROWS)


@triton.jit
def _ncp_single_read_kernel(
    # pointers: inputs
    h_ptr, op_ptr, proto_ptr, pood_ptr, psq_ptr,
    # pointers: outputs
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    # sizes and scalars
    N, C, D, scale, inv_scale,
    # strides
    stride_hn, stride_hd, stride_oc, stride_pc, stride_pd, stride_gn, stride_gd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """The whole step for one row tile with every class in one block and the whole centred
    tile [BLOCK_N, D_PAD] held in registers from its load to the gradient's store: ``h`` is
    read from memory once. One ``tl.dot`` over all of D, the softmax and candidates of the
    single class block, the exact re-rank against the held tile, the results (an autotuning
    candidate for small C and D; see :func:`single_read_config`)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    mask_d = offs_d < D
    u = load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd, inv_scale)
    u_sq = tl.sum(u * u, axis=1)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    p_sq = tl.load(psq_ptr + offs_c, mask=offs_c < C, other=float("inf"))
    # The prepared operand is zero-padded to whole tiles of 64 columns; D_PAD may pass them.
    p = tl.load(op_ptr + offs_c[:, None] * stride_oc + offs_d[None, :], mask=mask_d[None, :],
                other=0.0)
    dots = dot_t(u, p, tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32), DOT_MODE, ROUND_A=1) \
        - 0.5 * p_sq[None, :]
    dist = distances(dots, u_sq, scale)
    cand_d, cand_i, nearest = first_nearest(dist, 0, BLOCK_N, N_CAND, BLOCK_C)
    m = -nearest
    acc = tl.sum(tl.exp(-dist - m[:, None]), axis=1)
    # Every candidate re-ranked: the tile is held, and the prototypes fit in L2 at these C.
    valid = cand_i >= 0
    exact_sq = add_exact_sq(tl.zeros([BLOCK_N, N_CAND], dtype=tl.float32), u, cand_i, valid,
                            proto_ptr, pood_ptr, mask_n, offs_d, mask_d, stride_pc, stride_pd,
                            inv_scale, N_CAND, 0, N_CAND, 0)
    q, lse, best, pred, g_scale = row_results(m, acc, cand_d, cand_i, exact_sq, valid, u_sq,
                                              scale, C)
    store_row_results(q_ptr, lse_ptr, mind_ptr, pred_ptr, offs_n, mask_n, q, lse, best, pred)
    tl.store(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             u * g_scale[:, None], mask=mask_n[:, None] & mask_d[None, :])


def _plan(h, prototypes, prep: PreparedPrototypes, psq, scratch, outputs, precision: str,
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


def finish_stages(precision: str, block_cols: int) -> int:
    """Pipelining stages of the finish's loops: 2 in tf32 and bf16 on tiles of up to 128
    classes (the loads of one D-step in flight during the one before: the exact re-rank
    gathers a prototype row per candidate it takes, and the last program of a row block runs it
    alone; it fits in the shared memory the K-loop's stages leave, with no spills and the same
    CTAs per SM, sm_90a); otherwise 1: ``ieee``'s 32-row tiles would spill at C = 100,
    ``tf32x3`` would lose its second CTA per SM at C = 10 (and spill on sm_100a), and the
    256-class tile would spill."""
    return 2 if precision in ("tf32", "bf16") and block_cols <= 128 else 1


class Scratch(NamedTuple):
    """What one call of the gradient step allocates besides its outputs (None where unused)."""

    part_f: torch.Tensor | None  # partial results per (class group, row): m, sum, 4 distances
    part_i: torch.Tensor | None  # and the 4 candidate ids
    counters: torch.Tensor | None  # arrivals per row block (none with the finish apart)
    u_sq: torch.Tensor | None  # ||u||^2 per row (staged and split variants)
    dots: torch.Tensor | None  # the split variant's fp32 GEMM results [rows, C padded], per chunk


def _scratch(n: int, c: int, d: int, cfg: LaunchConfig, precision: str, device):
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


def compile_launches(n: int, c: int, d: int, precision: str, *, dtype=torch.float32,
                     configs: str = "launcher", major: int = 0,
                     exact: bool = True) -> list[KernelLaunch]:
    """The Triton launches :func:`ncp_gradient` makes at this shape on a GPU of compute
    capability ``major``.x (0: none named), on ``meta`` tensors (for the compile report);
    ``configs="all"`` adds every autotuning candidate; ``exact=False``: the GEMM kernels'
    launcher configuration where the launcher would take the kernel without a GEMM."""
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
        s = _scratch(n, c, d, cfg, precision, "meta")
        return s._replace(dots=meta(n, padded_classes(c, cfg.block_cols))) if cfg.split else s

    return [launch for cfg in cfgs
            for launch in _plan(meta(n, d, dt=dtype), meta(c, d, dt=dtype), prep, meta(c),
                                scratch(cfg), outs, precision, cfg)
            if isinstance(launch, KernelLaunch)]  # the split variant's GEMM runs in torch


def _tuned_config(t: tuple[int, ...], n: int, c: int, d: int, h_bytes: int, precision: str,
                  n_sm: int | None = None) -> LaunchConfig:
    if precision == "tf32x3":  # its K-step carries 4 x BLOCK_D operand columns
        t = (*t[:2], 16, *t[3:])
    return _fit_config(t, n, c, d, h_bytes, n_sm or DEFAULT_SMS)


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
        for planned in _plan(h, prototypes, prep, psq, _scratch(n, c, d, cfg, precision, dev),
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
