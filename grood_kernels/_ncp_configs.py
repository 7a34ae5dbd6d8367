"""Launch configurations of the gradient step (:mod:`grood_kernels.ncp_gradient`).

The launcher's one known-good configuration per shape and GPU (:func:`launch_config`), the
class groups that keep the row tiles of resident programs in L2 (:func:`n_groups`), the staged
and split variants' configurations, and the switches the launch plan
(:mod:`grood_kernels._ncp_plan`) sets from a configuration: the re-rank gate, the lean and
pipelined finish, the one-block epilogue. Each choice names the compile-report or GPU figure it
rests on. The autotuning candidates built from these are in
:mod:`grood_kernels._ncp_candidates`.
"""

from __future__ import annotations

import math

import triton

from grood_kernels._launch import DEFAULT_SMS, LaunchConfig, fit_tile, triton_version
from grood_kernels._ncp_exact import exact_config

#: Bytes of feature tiles the programs resident at one time may keep re-reading from L2
#: (half of an H100's 50 MB L2, which is two partitions).
L2_BUDGET = 24 << 20


def rerank_gate(c: int, d: int, precision: str) -> bool:
    """Whether the finish gates its exact re-rank (the GEMM-nearest candidate in every row,
    the others only where the GEMM's error bound lets them be nearer; see
    :func:`grood_kernels._ncp_rerank.rerank_and_write`): where the fp32 prototypes exceed
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
    its passes over D lean (:func:`grood_kernels._ncp_rerank.exact_sq_lean`: each candidate's
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


def finish_stages(precision: str, block_cols: int) -> int:
    """Pipelining stages of the finish's loops: 2 in tf32 and bf16 on tiles of up to 128
    classes (the loads of one D-step in flight during the one before: the exact re-rank
    gathers a prototype row per candidate it takes, and the last program of a row block runs it
    alone; it fits in the shared memory the K-loop's stages leave, with no spills and the same
    CTAs per SM, sm_90a); otherwise 1: ``ieee``'s 32-row tiles would spill at C = 100,
    ``tf32x3`` would lose its second CTA per SM at C = 10 (and spill on sm_100a), and the
    256-class tile would spill."""
    return 2 if precision in ("tf32", "bf16") and block_cols <= 128 else 1


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
    cfg = fit_config(tiles, n, c, d, h_bytes, (n_sm or DEFAULT_SMS) * ctas)
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


def fit_config(tiles: tuple[int, ...], n: int, c: int, d: int, h_bytes: int,
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
