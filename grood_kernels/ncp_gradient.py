"""Fused NCP gradient: prototype distances, online softmax and the OOD-prototype gradient.

For a feature row ``h``, class prototypes centred on the OOD prototype, ``P_c = p_c - p_o``,
and ``u = h - p_o`` (both centred tile by tile as they are loaded)::

    d_c  = sqrt(max(||u||^2 + ||P_c||^2 - 2 u.P_c, 0))     (GEMM, tile by tile)
    d_o  = ||u||
    lse  = log(exp(-d_o) + sum_c exp(-d_c))                (online: running max and sum)
    q_o  = exp(-d_o - lse)
    grad = q_o * u / d_o                                   (0 where d_o == 0)

One program owns ``BLOCK_N`` rows. It walks the prototypes in ``BLOCK_C`` blocks, each a
``tl.dot`` over ``BLOCK_D`` slices of D, so only a [BLOCK_N, BLOCK_C] tile of distances ever
exists (in registers); no [N, C] tensor is written. While walking it keeps the running
max / sum-exp and the ``N_CAND`` nearest prototypes by GEMM distance. Those candidates' distances
are then recomputed exactly from differences in fp32 and replace their GEMM estimates in the
sum, the prediction and ``min_dist``: the nearest prototypes dominate ``q_o``, so a tensor-core
GEMM (``tf32``, ``bf16``) changes only the small far terms. A last pass over D writes the
gradient. The same computation in PyTorch is :func:`grood.functional.ncp_gradient`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from grood_kernels._launch import KernelLaunch, run
from grood_kernels._topk import insert_nearest
from grood_kernels._tuning import autotune_enabled, tune

#: ``precision`` name -> the kernel's DOT_MODE (the same names as ``grood.functional``).
DOT_MODES = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}
#: Nearest prototypes per row re-ranked exactly (equal to ``grood.functional``'s; a test
#: holds them together, since this package does not import ``grood``).
NCP_CANDIDATES = 4


class NCPGradient(NamedTuple):
    """The kernel's results; the same fields as ``grood.functional.NCPGradient``."""

    grad: torch.Tensor  # [N, D] fp32
    q_ood: torch.Tensor  # [N] fp32
    pred: torch.Tensor  # [N] int64
    min_dist: torch.Tensor  # [N] fp32
    lse: torch.Tensor  # [N] fp32
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _max_abs(x: torch.Tensor) -> float:
    """Largest absolute value of ``x``, by a reduction (no ``|x|`` temporary)."""
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def pow2_scale(magnitude: float) -> float:
    """1 for magnitudes in [2**-20, 2**20], else the power of two nearest ``magnitude`` (the same
    rule as ``grood.functional.pow2_scale``)."""
    if magnitude == 0.0 or not math.isfinite(magnitude) or 2.0**-20 <= magnitude <= 2.0**20:
        return 1.0
    return 2.0 ** round(math.log2(magnitude))


def block_sizes(n: int, c: int, d: int, precision: str) -> tuple[int, int, int, int]:
    """One known-good launch configuration: (BLOCK_N, BLOCK_C, BLOCK_D, num_warps).

    Tensor-core modes take a wider class block, so each row tile of ``h`` is re-read from
    memory fewer times (C / BLOCK_C passes); fp32 FMA dots keep a 64 x 64 tile of
    registers. Every block is at least 16, as ``tl.dot`` needs.
    """
    wide = precision != "ieee"
    block_c = min(128 if wide else 64, max(16, triton.next_power_of_2(c)))
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_d = min(32, max(16, triton.next_power_of_2(d)))
    num_warps = 8 if wide and block_c * block_n >= 8192 else 4
    return block_n, block_c, block_d, num_warps


#: Launch configurations tried when ``GROOD_AUTOTUNE=1`` (BLOCK_N, BLOCK_C, BLOCK_D, warps).
TUNE_CONFIGS = [(64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (64, 128, 64, 8),
                (128, 128, 32, 8), (32, 128, 64, 4)]


@triton.jit
def _load_centred(x_ptr, offs_r, mask_r, stride_r, offs_d, mask_d, stride_d, p_o, inv_scale):
    """Rows of ``x / scale`` minus the (scaled) OOD prototype, in fp32; zero outside."""
    mask = mask_r[:, None] & mask_d[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, x * inv_scale - p_o[None, :], 0.0)  # [rows, BLOCK_D]


@triton.jit
def _load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd, inv_scale):
    """The centred feature tile ``u`` [BLOCK_N, BLOCK_D] and the scaled ``p_o`` slice."""
    p_o = tl.load(pood_ptr + offs_d, mask=mask_d, other=0.0)
    u = _load_centred(h_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d, stride_hd, p_o,
                      inv_scale)
    return u, p_o


@triton.jit
def _ncp_gradient_kernel(
    h_ptr, proto_ptr, pood_ptr, psq_ptr,
    grad_ptr, q_ptr, pred_ptr, mind_ptr, lse_ptr,
    N, C, D, scale, inv_scale,
    stride_hn, stride_hd, stride_pc, stride_pd, stride_gn, stride_gd,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    N_CAND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # int64 offsets: a transposed h of 1.28 M rows has stride_hd * D beyond 2**31.
    arange_c = tl.arange(0, BLOCK_C).to(tl.int64)
    arange_d = tl.arange(0, BLOCK_D).to(tl.int64)
    slots = tl.arange(0, N_CAND)

    # ||u||^2, the squared distance to the OOD prototype (in units of ``scale``).
    u_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u, p_o = _load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d,
                         stride_hd, inv_scale)
        u_sq += tl.sum(u * u, axis=1)
    u_norm = tl.sqrt(u_sq)
    d_ood = u_norm * scale

    # Online log-sum-exp seeded with the OOD term, and the N_CAND nearest prototypes.
    m = -d_ood
    acc = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    cand_d = tl.full([BLOCK_N, N_CAND], float("inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_N, N_CAND], -1, dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + arange_c
        mask_c = offs_c < C
        dots = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            mask_d = offs_d < D
            u, p_o = _load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d,
                             stride_hd, inv_scale)
            p = _load_centred(proto_ptr, offs_c, mask_c, stride_pc, offs_d, mask_d, stride_pd,
                              p_o, inv_scale)  # [BLOCK_C, BLOCK_D]
            if DOT_MODE == 3:
                dots = tl.dot(u.to(tl.bfloat16), tl.trans(p.to(tl.bfloat16)), dots)
            elif DOT_MODE == 2:
                dots = tl.dot(u, tl.trans(p), dots, input_precision="tf32x3")
            elif DOT_MODE == 1:
                dots = tl.dot(u, tl.trans(p), dots, input_precision="tf32")
            else:
                dots = tl.dot(u, tl.trans(p), dots, input_precision="ieee")
        p_sq = tl.load(psq_ptr + offs_c, mask=mask_c, other=0.0)
        dist = tl.sqrt(tl.maximum(u_sq[:, None] + p_sq[None, :] - 2.0 * dots, 0.0)) * scale
        dist = tl.where(mask_c[None, :], dist, float("inf"))  # [BLOCK_N, BLOCK_C]

        m_new = tl.maximum(m, -tl.min(dist, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(-dist - m_new[:, None]), axis=1)
        m = m_new

        # Insert this block's N_CAND nearest into the candidates (replacing the worst).
        cand_d, cand_i = insert_nearest(dist, cand_d, cand_i, c0, N_CAND, BLOCK_C)

    # Exact distances of the candidates, from differences.
    exact_sq = tl.zeros([BLOCK_N, N_CAND], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u, p_o = _load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d,
                         stride_hd, inv_scale)
        for r in tl.static_range(N_CAND):
            idx = tl.sum(tl.where(slots[None, :] == r, cand_i, 0), axis=1)  # [BLOCK_N]
            ok = mask_n & (idx >= 0)
            p = _load_centred(proto_ptr, tl.maximum(idx, 0), ok, stride_pc, offs_d, mask_d,
                              stride_pd, p_o, inv_scale)  # row idx of each candidate slot r
            diff = tl.where(mask_d[None, :], u - p, 0.0)
            part = tl.sum(diff * diff, axis=1)
            exact_sq = tl.where(slots[None, :] == r, exact_sq + part[:, None], exact_sq)
    valid = cand_i >= 0
    exact = tl.where(valid, tl.sqrt(exact_sq) * scale, float("inf"))

    # Swap the candidates' GEMM terms for exact ones in the sum.
    rest = acc - tl.sum(tl.where(valid, tl.exp(-cand_d - m[:, None]), 0.0), axis=1)
    rest = tl.maximum(rest, 0.0)
    best = tl.min(exact, axis=1)
    lse_exact = -best + tl.log(tl.sum(tl.exp(-exact + best[:, None]), axis=1))
    lse_rest = m + tl.log(rest)  # -inf when the candidates were all of the sum
    top = tl.maximum(lse_rest, lse_exact)
    lse = top + tl.log(tl.exp(lse_rest - top) + tl.exp(lse_exact - top))
    pred = tl.min(tl.where(exact == best[:, None], cand_i, C), axis=1)  # lowest index on ties
    q = tl.exp(-d_ood - lse)
    g_scale = tl.where(u_norm > 0, q / tl.where(u_norm > 0, u_norm, 1.0), 0.0)
    tl.store(q_ptr + offs_n, q, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(mind_ptr + offs_n, best, mask=mask_n)
    tl.store(pred_ptr + offs_n, pred, mask=mask_n)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + arange_d
        mask_d = offs_d < D
        u, p_o = _load_u(h_ptr, pood_ptr, offs_n, mask_n, stride_hn, offs_d, mask_d,
                         stride_hd, inv_scale)
        tl.store(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                 u * g_scale[:, None], mask=mask_n[:, None] & mask_d[None, :])


def _plan(h, prototypes, p_o, p_sq, outputs, scale: float, precision: str,
          cfg: tuple[int, int, int, int]) -> KernelLaunch:
    """The launch for one configuration (also compiled, unlaunched, by the compile report)."""
    grad, q_ood, pred, min_dist, lse = outputs
    n, d = h.shape
    block_n, block_c, block_d, num_warps = cfg
    return KernelLaunch(
        _ncp_gradient_kernel, (triton.cdiv(n, block_n),),
        (h, prototypes, p_o, p_sq, grad, q_ood, pred, min_dist, lse,
         n, prototypes.shape[0], d, scale, 1.0 / scale,
         h.stride(0), h.stride(1), prototypes.stride(0), prototypes.stride(1),
         grad.stride(0), grad.stride(1)),
        {"BLOCK_N": block_n, "BLOCK_C": block_c, "BLOCK_D": block_d,
         "N_CAND": NCP_CANDIDATES, "DOT_MODE": DOT_MODES[precision]},
        num_warps, 3)


def compile_launches(n: int, c: int, d: int, precision: str, *, dtype=torch.float32,
                     configs: str = "launcher") -> list[KernelLaunch]:
    """The launches :func:`ncp_gradient` makes at this shape, on ``meta`` tensors (for the
    compile report); ``configs="all"`` adds every autotuning candidate."""
    def meta(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    outs = (meta(n, d), meta(n), meta(n, dt=torch.int64), meta(n), meta(n))
    cfgs = [block_sizes(n, c, d, precision)]
    if configs == "all":
        cfgs += [cfg for cfg in TUNE_CONFIGS if cfg not in cfgs]
    return [_plan(meta(n, d, dt=dtype), meta(c, d, dt=dtype), meta(d), meta(c), outs, 1.0,
                  precision, cfg) for cfg in cfgs]


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
        prototypes (Tensor): class prototypes [C, D].
        ood_prototype (Tensor): OOD prototype [D].
        precision (str): ``"ieee"``, ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` for the GEMM.
        prototype_sq_norms (Tensor, optional): ``||p_c - p_o||^2``, shape [C], fp32.

    Returns:
        NCPGradient: ``grad`` [N, D] fp32, ``q_ood``, ``pred`` (int64), ``min_dist``, ``lse``.

    Nothing is copied: ``h`` and ``prototypes`` are read in place through their strides and
    centred on the OOD prototype inside the kernel. Extra device memory is ``p_o`` in fp32
    ([D]) and, when ``prototype_sq_norms`` is not given, the norms ([C]; computed 4096
    prototypes at a time).
    """
    if precision not in DOT_MODES:
        raise ValueError(f"precision must be one of {tuple(DOT_MODES)}, got {precision!r}")
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
    for name, t in (("h", h), ("prototypes", prototypes), ("ood_prototype", ood_prototype)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton ncp_gradient takes float32, float16 or bfloat16; "
                            f"{name} is {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")

    # Work in units of a power of two near the largest magnitude (exact rescaling), so
    # squared distances neither overflow nor underflow for huge or tiny features.
    biggest = max(_max_abs(t) for t in (h, prototypes, ood_prototype)) if n else 0.0
    scale = pow2_scale(biggest)
    p_o = (ood_prototype.to(torch.float32) / scale).contiguous()
    if prototype_sq_norms is None or scale != 1.0:
        p_sq = torch.cat([((blk.to(torch.float32) / scale - p_o) ** 2).sum(1)
                          for blk in prototypes.split(4096)])
    else:
        if tuple(prototype_sq_norms.shape) != (c,):
            raise ValueError(f"prototype_sq_norms must have shape [{c}], "
                             f"got {tuple(prototype_sq_norms.shape)}")
        p_sq = prototype_sq_norms.to(device=h.device, dtype=torch.float32).contiguous()

    dev = h.device
    grad = torch.empty((n, d), dtype=torch.float32, device=dev)
    q_ood = torch.empty(n, dtype=torch.float32, device=dev)
    pred = torch.empty(n, dtype=torch.int64, device=dev)
    min_dist = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return NCPGradient(grad, q_ood, pred, min_dist, lse)

    def launch(cfg: tuple[int, int, int, int]) -> None:
        run(_plan(h, prototypes, p_o, p_sq, (grad, q_ood, pred, min_dist, lse), scale,
                  precision, cfg))

    if autotune_enabled(h.device):
        key = (precision, h.dtype, triton.next_power_of_2(c), triton.next_power_of_2(d),
               n >= 4096, torch.cuda.get_device_name(h.device))
        launch(tune(launch, key, n, c, TUNE_CONFIGS))
    else:
        launch(block_sizes(n, c, d, precision))
    return NCPGradient(grad, q_ood, pred, min_dist, lse)
