"""The one ``tl.dot`` of both kernels, in the precision mode ``DOT_MODE`` names.

``DOT_MODE`` is :data:`grood_kernels.contract.DOT_MODES` of the user's ``precision``:
0 ``ieee`` (fp32 FMA), 1 ``tf32``, 2 ``tf32x3`` (Triton's three-product split), 3 ``bf16``
(operands rounded to bf16; a cast of an operand already stored in bf16 is free). fp32 results
in every mode. The gradient-step kernel does its own tf32x3 split (one 4-way tf32 product over
a prepared operand, see :mod:`grood_kernels.ncp_gradient`) and then calls this in mode 1.
"""

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
def dot_t(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b.T`` for ``a`` [M, K] and ``b`` [N, K] (rows of both operands along K)."""
    if DOT_MODE == 3:
        acc = tl.dot(to_bf16(a), tl.trans(to_bf16(b)), acc)
    elif DOT_MODE == 2:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                     input_precision="tf32x3")
    elif DOT_MODE == 1:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return acc
