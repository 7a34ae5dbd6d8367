"""The one ``tl.dot`` of both kernels, in the precision mode ``DOT_MODE`` names.

``DOT_MODE`` is :data:`grood_kernels.contract.DOT_MODES` of the user's ``precision``:
0 ``ieee`` (fp32 FMA), 1 ``tf32``, 2 ``tf32x3`` (Triton's three-product split), 3 ``bf16``
(operands rounded to bf16; a cast of an operand already stored in bf16 is free). fp32 results
in every mode. The gradient-step kernel does its own tf32x3 split (one 4-way tf32 product over
a prepared operand, see :mod:`grood_kernels.ncp_gradient`) and then calls this in mode 1.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def to_bf16(x):
    """``x`` rounded to bf16. An fp16 tile goes through fp32 (exact), which rounds to the
    same values: PTX converts fp16 to bf16 directly only from sm_80 on, fp32 to bf16 on every
    target Triton compiles for."""
    if x.dtype == tl.float16:
        x = x.to(tl.float32)
    return x.to(tl.bfloat16)


@triton.jit
def round_tf32(x):
    """fp32 values rounded to the nearest TF32 value (10 mantissa bits; ties away from zero,
    as ``cvt.rna.tf32.f32``). Tensor cores read a TF32 operand's top 19 bits, truncating:
    every product then errs the same way, and over D terms of one sign the errors add up
    instead of cancelling. Rounded first, they are unbiased."""
    return ((x.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def dot_t(a, b, acc, DOT_MODE: tl.constexpr, ROUND_A: tl.constexpr = 0):
    """``acc + a @ b.T`` for ``a`` [M, K] and ``b`` [N, K] (rows of both operands along K).
    With ``ROUND_A`` a tf32 dot's ``a`` (fp32, in registers) is rounded to TF32 first
    (:func:`round_tf32`), as bf16's operands are rounded; without it the MMA truncates it (an
    operand loaded straight for the MMA, or one prepared rounded)."""
    if DOT_MODE == 3:
        acc = tl.dot(to_bf16(a), tl.trans(to_bf16(b)), acc)
    elif DOT_MODE == 2:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                     input_precision="tf32x3")
    elif DOT_MODE == 1:
        if ROUND_A:
            a = round_tf32(a.to(tl.float32))
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return acc


@triton.jit
def _bf16_probe_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr, DOT_MODE: tl.constexpr):
    """``a @ b.T`` of two [N, N] fp32 tiles through :func:`dot_t` (the kernels' own dot)."""
    idx = tl.arange(0, N)
    offs = idx[:, None] * N + idx[None, :]
    acc = dot_t(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.zeros((N, N), tl.float32),
                DOT_MODE)
    tl.store(out_ptr + offs, acc)


@functools.cache
def interpreter_bf16_error() -> str | None:
    """Why the kernels' ``bf16`` mode computes wrongly under Triton's interpreter, or None
    where it computes as a GPU does (fp32 rounded to nearest even in bf16, exact bf16
    products, fp32 sums).

    Triton's interpreter (3.6 to 3.9 at least) holds bf16 values as their uint16 bits: its
    ``tl.dot`` multiplies those bit patterns, and its casts from fp32 truncate. Scores came
    out wrong without an error. One 16 x 16 tile through the kernels' dot, of values whose
    rounding tells nearest-even from truncation and whose bf16 products sum exactly in fp32,
    decides it once per process, on the CPU.
    """
    n = 16
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    # 1 + m * 2**-9: m = 3 rounds up to 1 + 2**-7 (nearest even), truncation keeps 1.
    a = (1 + ((7 * i + 3 * j) % 4) * 2.0 ** -9).float().contiguous()
    b = (1 + ((5 * i + j) % 4) * 2.0 ** -9).float().contiguous()
    out = torch.full((n, n), float("nan"))
    _bf16_probe_kernel[(1,)](a, b, out, N=n, DOT_MODE=3)
    want = (a.bfloat16().double() @ b.bfloat16().double().T).float()
    if torch.equal(out, want):
        return None
    worst = float(((out.double() - want.double()).abs() / want.double()).nan_to_num(
        float("inf")).max())
    return (f"this triton's ({triton.__version__}) interpreter computes bf16 wrongly (a "
            f"probe bf16 GEMM of the kernels' dot was off by up to {worst:.3g} relative: its "
            "dot multiplies bf16 bit patterns and its casts truncate), so precision='bf16' "
            "would score wrongly; on the CPU use backend='torch' (bf16 as a GPU rounds it) or "
            "precision 'ieee', 'tf32' or 'tf32x3' (which the interpreter computes in fp32); "
            "compiled Triton on a GPU computes bf16 right")


def check_bf16_runs(precision: str, device: torch.device) -> None:
    """Refuse ``precision="bf16"`` off a GPU (Triton's interpreter) where the interpreter
    computes bf16 wrongly (:func:`interpreter_bf16_error`), with that reason."""
    if precision == "bf16" and device.type != "cuda":
        reason = interpreter_bf16_error()
        if reason is not None:
            raise RuntimeError(reason)
