"""The prototypes' GEMM operand for the gradient-step kernel, prepared once and kept.

The kernel loads the prototypes straight into ``tl.dot``, so whatever sits between memory and
the MMA — centring on the OOD prototype, the power-of-two scale, the cast to the operand dtype,
padding to whole tiles, the tf32x3 split — is done here, once per (prototype tensor, OOD
prototype, precision, scale), and kept while the caller keeps those tensors unchanged.
Imports torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grood_kernels.contract import kept_per_prototypes

#: The prepared operand is zero-padded to these multiples (rows, columns), which cover every
#: BLOCK_C and BLOCK_D the launcher and the autotuning candidates use (up to the wide tile's
#: 256 classes), so its tiles load without masks.
PAD_ROWS, PAD_COLS = 256, 64


class PreparedPrototypes(NamedTuple):
    """The GEMM operand made from the prototypes, once per (prototypes, p_o, mode, scale)."""

    operand: torch.Tensor  # [C_pad, D_pad] fp32 or bf16: (p_c - p_o) / scale, zero-padded;
    #                        tf32: rounded to nearest TF32; tf32x3: [C_pad, 4 D_pad], per
    #                        feature (hi, lo, hi, lo)
    sq_norms: torch.Tensor  # [C] fp32, ||p_c / scale - p_o / scale||^2
    p_o: torch.Tensor  # [D] fp32, p_o / scale
    scale: float


def operand_dtype(precision: str) -> torch.dtype:
    """The dtype the prototypes are stored in for the GEMM of ``precision``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def prepare_prototypes(prototypes: torch.Tensor, ood_prototype: torch.Tensor, precision: str,
                       scale: float = 1.0) -> PreparedPrototypes:
    """The GEMM operand of the prototypes: ``(p_c - p_o) / scale`` in the mode's operand dtype,
    zero-padded to whole tiles, with its fp32 squared norms.

    Kept (one per prototype tensor, mode and scale) while the caller's tensors live and are
    not modified in place (their version counters are checked), so a detector prepares it
    once. Costs one [C_pad, D_pad] tensor (fp32, or bf16 in ``bf16`` mode).
    """
    return kept_per_prototypes(prototypes, ood_prototype, ("operand", precision, scale),
                               lambda: _prepare(prototypes, ood_prototype, precision, scale))


def _prepare(prototypes: torch.Tensor, ood_prototype: torch.Tensor, precision: str,
             scale: float) -> PreparedPrototypes:
    c, d = prototypes.shape
    p_o = (ood_prototype.to(torch.float32) / scale).contiguous()
    c_pad, d_pad = _cdiv(c, PAD_ROWS) * PAD_ROWS, _cdiv(d, PAD_COLS) * PAD_COLS
    split = precision == "tf32x3"
    operand = torch.zeros((c_pad, (4 if split else 1) * d_pad), dtype=operand_dtype(precision),
                          device=prototypes.device)
    sq = torch.empty(c, dtype=torch.float32, device=prototypes.device)
    for r0 in range(0, c, 4096):
        centred = prototypes[r0:r0 + 4096].to(torch.float32) / scale - p_o
        r1 = r0 + centred.shape[0]
        if split:  # tf32x3: per feature (hi, lo, hi, lo); hi exact in tf32, lo the rest
            hi = tf32_truncated(centred)
            quad = operand[r0:r1].view(r1 - r0, d_pad, 4)
            quad[:, :d, 0] = quad[:, :d, 2] = hi
            quad[:, :d, 1] = quad[:, :d, 3] = centred - hi
        elif precision == "tf32":  # rounded to nearest (the MMA would truncate)
            operand[r0:r1, :d] = tf32_nearest(centred)
        else:
            operand[r0:r1, :d] = centred
        sq[r0:r1] = (centred * centred).sum(1)
    return PreparedPrototypes(operand, sq, p_o, scale)


def tf32_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest TF32 value (10 mantissa bits, ties away from zero,
    as :func:`grood_kernels._dot.round_tf32` in the kernels and ``cvt.rna.tf32.f32``): tensor
    cores truncate a TF32 operand, and truncated products all err one way."""
    return ((x.contiguous().view(torch.int32) + 4096) & -8192).view(torch.float32)


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` with its low 13 mantissa bits dropped: what tensor cores read of an fp32
    operand of a TF32 MMA (and tf32x3's ``hi`` part)."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
