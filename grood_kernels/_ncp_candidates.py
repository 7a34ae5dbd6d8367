"""Autotuning candidates of the gradient step (``GROOD_AUTOTUNE=1``).

The tile list per GEMM kind, the wide staged tile, the split variant's other epilogue tiles,
and :func:`candidate_configs`: every distinct candidate at a shape, the launcher's
configuration (:func:`grood_kernels._ncp_configs.launch_config`) first. The compile report
compiles them all (``bench/compile_report.py --configs all``); the tuner times them on the
device (:mod:`grood_kernels._tuning`).
"""

from __future__ import annotations

import triton

from grood_kernels._launch import DEFAULT_SMS, LaunchConfig, triton_version
from grood_kernels._ncp_configs import (
    L2_BUDGET,
    fit_config,
    launch_config,
    split_config,
    staged_config,
)
from grood_kernels._ncp_exact import EXACT_CANDIDATE_MAX_C, exact_config
from grood_kernels._ncp_finish import FINISH_OCCUPANCY, finish_programs
from grood_kernels._ncp_single_read import single_read_config

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


def _tuned_config(t: tuple[int, ...], n: int, c: int, d: int, h_bytes: int, precision: str,
                  n_sm: int | None = None) -> LaunchConfig:
    """``t`` (BLOCK_N, BLOCK_C, BLOCK_D, warps, stages), a tile of the autotuning list, fitted to
    the shape (:func:`grood_kernels._ncp_configs.fit_config`); in tf32x3 with 16-wide K-steps."""
    if precision == "tf32x3":  # its K-step carries 4 x BLOCK_D operand columns
        t = (*t[:2], 16, *t[3:])
    return fit_config(t, n, c, d, h_bytes, n_sm or DEFAULT_SMS)
