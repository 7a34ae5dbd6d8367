"""Compile report: what every shipped kernel launch compiles to, and a traffic/roofline model.

    python bench/compile_report.py            # every kernel, mode, shape; sm_90a and sm_100a
    python bench/compile_report.py --kernel knn --arch sm_90a --json out.json --dump dumps/
    python bench/compile_report.py --configs all         # every autotuning candidate too
    python bench/compile_report.py --plot roofline.png   # and the model's roofline picture
    grood bench --compile ...                            # the same

No GPU is needed. Each kernel module describes its launches with ``compile_launches`` (the
same :class:`grood_kernels._launch.KernelLaunch` its launcher runs, built on ``meta``
tensors), so the configuration compiled here is the one the launcher picks at that shape.
Each is compiled with ``triton.compile`` for the target, assembled with the ``ptxas-blackwell``
shipped in the triton wheel (registers, spills, and its note where it serialized every wgmma)
and disassembled with ``cuobjdump`` (MMA instructions, which spill instructions sit inside
the K-loops, how many wgmma groups their waits leave in flight, and the K-step's instruction
issue against its HGMMAs: :func:`hot_loop`, :func:`issue_ratio`; the instructions between a
one-block program's K-loop and its hand-off, which run while its tensor cores wait:
:func:`tile_epilogue`); TTGIR gives the MMA kind, and the wgmma groups triton asks to keep in
flight where nothing was assembled.

The model (:mod:`bench.traffic_model`) follows each kernel's tile schedule and gives FLOPs,
bytes from HBM, bytes through L2 and the lower-bound time under each roof; where the SASS has
an HGMMA K-loop, the K-step's issue / MMA ratio adds the time its instructions need to issue;
where it has a tile epilogue, an estimate of the time that needs to issue (not a bound).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from datetime import date
from pathlib import Path

import torch

from grood.environment import kernel_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic_model

#: The kernels' source digest (:func:`grood.environment.kernel_sources`), in the header and
#: every record: GPU timings name the same digest.
KERNEL_SOURCES = kernel_sources()

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
#: (label, N, C, D) for the gradient step: the GPU report's shapes.
NCP_SHAPES = [("CIFAR-10", 65536, 10, 512), ("CIFAR-100", 65536, 100, 512),
              ("ImageNet-1k", 65536, 1000, 2048), ("C=21841", 65536, 21841, 1024)]
#: (label, Q, M, D) for exact search.
KNN_SHAPES = [("ImageNet-1k", 10000, 1281167, 2048), ("CIFAR", 10000, 50000, 512)]
#: One small shape per kernel, for the test suite (``--shapes small``): the gradient step
#: past 16 classes, so that the launcher's GEMM kernel compiles (up to 16 a GPU takes the
#: kernel without a GEMM).
SMALL = {"ncp_gradient": [("small", 256, 20, 64)], "knn": [("small", 256, 4096, 64)]}
ARCHS = {"sm_90a": 90, "sm_100a": 100}


# --------------------------------------------------------------------------------------------
# Compiling one launch

def _type_of(value) -> tuple[str, bool]:
    """Triton's runtime specialisation of one argument: (type, divisible by 16)."""
    if isinstance(value, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}
        # The CUDA caching allocator returns 256-byte aligned blocks; meta tensors model that.
        return "*" + names[value.dtype], True
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot describe kernel argument {value!r}")


def specialise(launch) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``, as the JIT would build them:
    integers equal to 1 become constants, aligned pointers and integers divisible by 16 carry
    ``tt.divisibility``."""
    names = launch.fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args, strict=False)):
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
            continue
        ty, div16 = _type_of(value)
        signature[name] = ty
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in launch.constexprs.items():
        signature[name], constexprs[name] = "constexpr", value
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"launch of {launch.fn.__name__} lacks arguments {missing}")
    return {n: signature[n] for n in names}, constexprs, attrs


def _tool(name: str) -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def triton_compile(launch, capability: int):
    """``triton.compile`` of one launch for a CUDA compute capability, as the JIT would (as
    ``grood_kernels._launch.run`` launches it on a GPU of that capability)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from grood_kernels._launch import for_target

    launch = for_target(launch, capability // 10)
    signature, constexprs, attrs = specialise(launch)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})


def compile_launch(launch, arch: str) -> dict:
    """Compile (and assemble, where ``ptxas-blackwell`` exists) one launch for ``arch``."""
    compiled = triton_compile(launch, ARCHS[arch])
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    pendings = wgmma_pendings(ttgir)
    rec = {"smem_bytes": int(compiled.metadata.shared), "ttgir": ttgir, "ptx": ptx,
           "mma": mma_kind(ttgir), "wgmma_pendings": pendings,
           "wgmma_pendings_ttgir": pendings, "wgmma_serialized": None,
           "wgmma_a": wgmma_a_operand(ttgir),
           "registers": None, "spill_store_bytes": None, "spill_load_bytes": None,
           "cubin": None, "sass_counts": {}, "hot_loop": None, "tile_epilogue": None,
           "own_finish": None, "assembler": None}
    ptxas = _tool("ptxas-blackwell")
    if ptxas is None:
        rec["assembler"] = "ptxas-blackwell not found in this triton: TTGIR facts only"
        return rec
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(ptx_path), "-o",
                              str(cubin_path)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            rec["assembler"] = f"ptxas-blackwell failed: {out.stderr.strip()[:300]}"
            return rec
        rec.update(parse_ptxas(out.stdout + out.stderr))
        rec["assembler"] = "ptxas-blackwell"
        rec["cubin"] = cubin_path.read_bytes()
        cuobjdump = _tool("cuobjdump")
        if cuobjdump is not None:
            sass = subprocess.run([str(cuobjdump), "-sass", str(cubin_path)],
                                  capture_output=True, text=True, check=False).stdout
            rec["sass_counts"] = sass_counts(sass)
            rec["hot_loop"] = hot_loop(sass)
            rec["tile_epilogue"] = tile_epilogue(sass)
            if launch.fn.__name__ == "_ncp_gradient_kernel" and launch.constexprs["FINISH"]:
                d, block_d = launch.args[15], launch.constexprs["BLOCK_D"]
                rec["own_finish"] = own_finish(sass, launch.args[18], -(-d // block_d),
                                               bool(launch.constexprs["RERANK_GATE"]), ptx)
            # What runs: the waits ptxas left in the K-loops (TTGIR's are only asked for).
            if rec["hot_loop"] is not None and rec["hot_loop"]["gsb_waits"] is not None:
                rec["wgmma_pendings"] = rec["hot_loop"]["gsb_waits"]
    return rec


def parse_ptxas(text: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output, and why ptxas serialized the
    function's wgmma instructions (its "Potential Performance Loss" note, C7513 / C7515: each
    then waits for the one before, whatever the PTX's ``wgmma.wait_group`` allowed), or
    None."""
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    serial = re.search(r"wgmma\.mma_async instructions are serialized due to (.+?)"
                       r"(?: in the function|$)", text, re.MULTILINE)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "wgmma_serialized": serial.group(1).strip() if serial else None}


def mma_kind(ttgir: str) -> str:
    """The GEMM path TTGIR shows: wgmma, tcgen05, mma.sync or FMA."""
    if "ttng.warp_group_dot " in ttgir or "ttng.warp_group_dot\n" in ttgir:
        return "wgmma"
    if "ttng.tc_gen5_mma" in ttgir:
        return "tcgen05"
    if "tt.dot" in ttgir:
        return "mma.sync" if "#ttg.nvidia_mma" in ttgir else "FMA"
    return "none"


def wgmma_pendings(ttgir: str) -> int | None:
    """The smallest ``pendings`` of the wgmma waits inside loops (None without wgmma)."""
    waits = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]
    if "ttng.warp_group_dot " not in ttgir:
        return None
    if not waits:
        return None
    # The waits inside the K-loops decide the overlap; the wait after a loop drains it to 0.
    in_loop = _waits_in_loops(ttgir)
    return min(in_loop) if in_loop else min(waits)


def wgmma_a_operand(ttgir: str) -> str | None:
    """Where the wgmma's A operand comes from: ``"smem"`` (loaded into shared memory and read
    by the MMA as it is) or ``"registers"`` (changed in registers first: a conversion, a
    cast or arithmetic between the load and the MMA); None without wgmma. The first wgmma
    decides (a kernel's K-loop has one kind)."""
    found = re.search(r"ttng\.warp_group_dot %[^\n{:]*(?:\{[^}\n]*\})? : (\S+)", ttgir)
    if found is None:
        return None
    return "smem" if found.group(1).startswith("!ttg.memdesc") else "registers"


def _waits_in_loops(ttgir: str) -> list[int]:
    """``pendings`` of the wgmma waits in K-loops: those that wait on a just-issued dot. A wait
    on a loop's result (``%name#0``) drains that loop after its last step and is left out."""
    return [int(p) for p in
            re.findall(r"warp_group_dot_wait %[\w.]+(?:,| \{)[^\n]*pendings = (\d+)", ttgir)]


def sass_counts(sass: str) -> dict[str, int]:
    """Counts of the SASS instructions that say how the GEMM runs."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    keep = ("HGMMA", "HMMA", "FFMA", "FFMA2", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA",
            "LDL", "STL")
    return {op: sum(1 for o in ops if o == op) for op in keep if op in ops}


#: SASS opcodes of the GEMM's multiply-adds, by kind: tensor cores, then CUDA-core FMA.
MMA_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA")
FMA_OPS = ("FFMA", "FFMA2")


def hot_loop(sass: str) -> dict | None:
    """The K-loops in disassembled SASS, and the spill instructions inside them.

    Loops are the address ranges of backward branches (``BRA`` to a lower address); K-loops
    are the innermost ones (holding no other) with tensor-core MMA instructions, or, where
    there are none, those with at least half the most FMA instructions any innermost loop
    holds (an FMA kernel's finish has a few in its loops over D). Returns ``{"loops", "mma",
    "LDL", "STL", "outer_LDL", "outer_STL", "gsb_waits", "step_instructions", "step_hgmma"}``
    (how many K-loops, the instructions of each kind inside them, the spill instructions inside
    the loops that enclose a K-loop: the loop over class blocks or database tiles, and any loop
    around it; the fewest wgmma groups the K-loops' ``WARPGROUP.DEPBAR`` waits leave in
    flight, None without such a wait; and, for the K-loop with the most MMA instructions, its
    instructions per iteration and its HGMMA opcodes), or None without one. A
    spilled value reloaded inside a K-loop costs an L1 access per K-step; elsewhere in the
    outer loops (a top-k insertion after each tile's K-loop), up to one per tile; outside
    every loop, once."""
    code, loops, found = _k_loops(sass)
    if found is None:
        return None
    k_loops, ops = found
    outer = [lp for lp in loops if lp not in k_loops and any(
        lp[0] <= k[0] and k[1] <= lp[1] for k in k_loops)]
    # Hopper's wgmma waits in the K-loops: WARPGROUP.DEPBAR.LE gsb0, n lets n groups
    # stay in flight (0 after every HGMMA: serialized).
    waits = [int(w.group(1), 16) for a, _, rest, full in code
             if full == "WARPGROUP.DEPBAR.LE" and any(k[0] <= a <= k[1] for k in k_loops)
             and (w := re.search(r"gsb0\s*,\s*0x([0-9a-f]+)", rest))]
    in_outer = {op: sum(1 for a, o, _, _ in code if o == op
                        and any(lp[0] <= a <= lp[1] for lp in outer))
                for op in ("LDL", "STL")}
    main = max(k_loops, key=lambda lp: (_count(code, lp, ops), -lp[0]))  # ties: the first
    return {"loops": len(k_loops), "mma": sum(_count(code, lp, ops) for lp in k_loops),
            "LDL": sum(_count(code, lp, ("LDL",)) for lp in k_loops),
            "STL": sum(_count(code, lp, ("STL",)) for lp in k_loops),
            "outer_LDL": in_outer["LDL"], "outer_STL": in_outer["STL"],
            "gsb_waits": min(waits, default=None),
            "step_instructions": sum(1 for a, *_ in code if main[0] <= a <= main[1]),
            "step_hgmma": [(full + rest).split()[0] for a, _, rest, full in code
                           if main[0] <= a <= main[1] and full.startswith("HGMMA.")]}


def _count(code, lp, ops) -> int:
    """Instructions of the opcodes ``ops`` in the address range ``lp``."""
    return sum(1 for a, op, _, _ in code if lp[0] <= a <= lp[1] and op in ops)


def _k_loops(sass: str):
    """The SASS parsed as ``(code, loops, k_loops)``: ``code`` its instructions (address,
    opcode, operands, full opcode), ``loops`` the address ranges of backward branches, and
    ``k_loops`` ``(loops, opcodes)``: the innermost loops with tensor-core MMA instructions
    (those opcodes), or, where there are none, with at least half the most FMA instructions
    any innermost loop holds; None without either (see :func:`hot_loop`)."""
    code = [(int(a, 16), op.split(".")[0], rest, op) for a, op, rest in re.findall(
        r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)]
    loops = set()
    for addr, op, rest, _ in code:
        target = re.search(r"0x([0-9a-f]+)\s*$", rest.strip())
        if op == "BRA" and target and int(target.group(1), 16) <= addr:
            loops.add((int(target.group(1), 16), addr))
    inner = _innermost(loops)
    for ops, share in ((MMA_OPS, 0.0), (FMA_OPS, 0.5)):
        counts = {lp: _count(code, lp, ops) for lp in inner}
        most = max(counts.values(), default=0)
        k_loops = [lp for lp in inner if counts[lp] > 0 and counts[lp] >= share * most]
        if k_loops:
            return code, loops, (k_loops, ops)
    return code, loops, None


def _innermost(loops) -> list[tuple[int, int]]:
    """The loops (address or line ranges) that hold no other, in order."""
    return sorted(lp for lp in loops
                  if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops))


def tile_epilogue(sass: str) -> int | None:
    """The SASS instructions between a program's K-loop and the atomic that hands its partial
    results on (the gradient step's per-row-block arrival counter): where a program holds one
    class block, the distances, the softmax terms, the candidates and the partials' stores,
    run once per program while its tensor cores wait. Counted from the end of the last K-loop
    to the first ``ATOM`` / ``RED`` after it; None where a loop lies between them (a class
    loop, into which the compiler rotates each block's epilogue; on sm_100a the tensor-core
    kernels' code from the MMA's start to the end lies inside backward branches), without a
    K-loop or without an atomic (the search, the single-read and split variants). A static
    count: a fresh candidate list runs all of its insertion rounds, so every instruction
    counted runs."""
    code, loops, end, atomic = _hand_off(sass)
    if atomic is None or any(end < lp[1] and lp[0] < atomic for lp in loops):
        return None
    return sum(1 for a, *_ in code if end < a < atomic)


def _hand_off(sass: str):
    """``(code, loops, end, atomic)``: the SASS parsed (:func:`_k_loops`), the address where
    the last K-loop ends and that of the first ``ATOM`` / ``RED`` after it (the gradient
    step's arrival counter), None for either where there is none."""
    code, loops, found = _k_loops(sass)
    if found is None:
        return code, loops, None, None
    end = max(lp[1] for lp in found[0])
    atomic = min((a for a, op, _, _ in code if a > end and op in ("ATOMG", "ATOM", "RED")),
                 default=None)
    return code, loops, end, atomic


def own_finish(sass: str, groups: int, d_steps: int, gated: bool, ptx: str | None = None
               ) -> int | None:
    """The SASS instructions per warp of the finish that the last program of a row block
    runs (the gradient step's code after its arrival counter's atomic), loops counted by their
    trips: the merge of the class groups' partials (the loop with ``MUFU``, its
    exponentials; none where one group is specialised away) ``groups`` times, every other
    loop (the passes over D) ``d_steps`` times, except, where the re-rank is ``gated``, its
    second pass (the second of those loops without a global store: run only in a tile whose
    candidates tie within the GEMM's error), and the code outside them once. With the
    kernel's ``ptx``, a loop that ptxas unrolled (its global loads and stores a multiple of
    the PTX loop's: :func:`_unrolled`) runs that many times fewer. None without a K-loop,
    without the atomic (the search, the single-read and split variants, the finish apart), or
    where those loops nest."""
    code, loops, _, atomic = _hand_off(sass)
    if atomic is None:
        return None
    after = sorted(lp for lp in loops if lp[0] > atomic and lp[1] > lp[0])  # (not the trap)
    if _innermost(after) != after:
        return None
    bodies = [[op for a, op, _, _ in code if lp[0] <= a <= lp[1]] for lp in after]
    unroll = _unrolled(bodies, ptx)
    total = sum(1 for a, *_ in code if a > atomic)
    passes = 0
    for body, times in zip(bodies, unroll, strict=True):
        if "MUFU" in body:
            trips = groups
        elif "STG" not in body:  # a re-rank pass
            passes += 1
            trips = 0 if gated and passes == 2 else d_steps
        else:  # the gradient's pass
            trips = d_steps
        total += len(body) * (-(-trips // times) - 1)
    return total


#: Global memory instructions: SASS opcodes, and PTX instructions (the same accesses).
SASS_MEMORY_OPS = ("LDG", "STG", "LDGSTS")
PTX_MEMORY = re.compile(r"\b(?:ld\.global|st\.global|cp\.async\.c[ag])")


def _unrolled(bodies: list[list[str]], ptx: str | None) -> list[int]:
    """How many trips of the source loop each SASS loop body after the hand-off runs (ptxas
    unrolls loops whose loads and stores need no masks): its global loads and stores over
    those of the PTX loop in the same place (the loops after the PTX's atomic, innermost, in
    order). 1 for every loop without the PTX, where its loops do not line up with the SASS's,
    or where a ratio is not a whole number."""
    ones = [1] * len(bodies)
    if ptx is None:
        return ones
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\$L__BB\d+_\d+):", line))}
    atom = next((i for i, line in enumerate(lines) if re.search(r"^\s*(@%p\d+\s+)?atom\.", line)),
                None)
    if atom is None:
        return ones
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line))
             and atom < labels.get(m.group(1), -1) < i]
    inner = _innermost(loops)
    if len(inner) != len(bodies):
        return ones
    factors = []
    for body, (first, last) in zip(bodies, inner, strict=True):
        sass_mem = sum(1 for op in body if op in SASS_MEMORY_OPS)
        ptx_mem = sum(1 for line in lines[first:last + 1] if PTX_MEMORY.search(line))
        if not ptx_mem or sass_mem % ptx_mem:
            return ones
        factors.append(max(1, sass_mem // ptx_mem))
    return factors


#: Hopper tensor-core multiply-adds per SM per cycle, dense, by operand type (an H100 SXM's
#: 989 bf16 TFLOP/s at 1,830 MHz on 132 SMs: 2,048; tf32 half that).
HGMMA_MACS_PER_CYCLE = {"TF32": 1024, "BF16": 2048, "F16": 2048}


def issue_ratio(hot: dict | None) -> float | None:
    """The K-loop's instruction issue against its wgmma, per K-step: the cycles its SASS
    instructions need at one per scheduler per cycle (4 schedulers per SM) over the cycles the
    tensor cores need for its HGMMAs at their dense peak (both scale with the warpgroups, so
    the ratio needs neither). Above 1 the K-loop cannot keep the tensor cores busy: issuing
    its other instructions (loads, centring, casts, address arithmetic) takes longer than the
    MMA it feeds. A lower bound on the issue time (LDS, SHFL and MUFU issue slower); None
    without HGMMA (FMA, tcgen05)."""
    if not hot or not hot.get("step_hgmma"):
        return None
    cycles = 0.0
    for op in hot["step_hgmma"]:
        shape = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)", op)
        if shape is None or shape.group(4) not in HGMMA_MACS_PER_CYCLE:
            return None
        m, n, k = (int(shape.group(i)) for i in (1, 2, 3))
        cycles += m * n * k / HGMMA_MACS_PER_CYCLE[shape.group(4)]
    return hot["step_instructions"] / cycles


def ctas_per_sm(registers: int | None, num_warps: int, smem: int) -> tuple[int, str]:
    """Resident programs per SM (Hopper and Blackwell limits) and the binding limit."""
    limits = {"threads": 2048 // (32 * num_warps), "CTA slots": 32}
    if registers:
        per_warp = math.ceil(registers * 32 / 256) * 256  # allocated per warp, 256 at a time
        limits["registers"] = 65536 // (per_warp * num_warps)
    # 228 KB per SM with 1 KB reserved per resident block.
    limits["shared memory"] = (228 * 1024) // (smem + 1024)
    binding = min(limits, key=lambda k: limits[k])
    return limits[binding], binding


# --------------------------------------------------------------------------------------------
# The report

def kernel_cases(kernels, shapes: str):
    """(kernel, label, dims) for the requested kernels and shape set."""
    for kernel in kernels:
        table = SMALL[kernel] if shapes == "small" else (
            NCP_SHAPES if kernel == "ncp_gradient" else KNN_SHAPES)
        for label, *dims in table:
            yield kernel, label, tuple(dims)


def precisions_of(kernel: str) -> list[str]:
    """Precision modes (and, for search, index storage) each kernel is compiled in."""
    if kernel == "knn":
        return [*PRECISIONS, "bf16-storage"]
    return list(PRECISIONS)


def launches(kernel: str, dims, precision: str, configs: str, arch: str = "sm_90a"):
    """The launches ``kernel``'s launcher makes at ``dims`` for a GPU of ``arch`` (the search
    picks its tiles per target: :data:`grood_kernels._knn_configs.BLACKWELL_SMALL_TILES`; the
    gradient step its variant: :data:`grood_kernels._ncp_configs.WGMMA_CLASS_LOOP_FROM`)."""
    import importlib

    module = importlib.import_module(f"grood_kernels.{kernel}")
    major = ARCHS[arch] // 10
    if kernel == "knn":
        if precision == "bf16-storage":
            return module.compile_launches(*dims, "bf16", storage=torch.bfloat16,
                                           configs=configs, major=major)
        return module.compile_launches(*dims, precision, configs=configs, major=major)
    return module.compile_launches(*dims, precision, configs=configs, major=major)


def build_records(kernels, archs, precisions, shapes: str = "full", configs: str = "launcher",
                  dump: Path | None = None, progress: bool = True) -> list[dict]:
    """Compile every (kernel, shape, precision, arch, configuration); one record each."""
    records = []
    for kernel, label, dims in kernel_cases(kernels, shapes):
        for precision in precisions_of(kernel):
            if precisions and precision not in precisions:
                continue
            for arch in archs:
                for i, launch in enumerate(launches(kernel, dims, precision, configs, arch)):
                    if progress:
                        print(f"compiling {kernel} {precision} {label} {arch} "
                              f"[{launch.fn.__name__}]", file=sys.stderr)
                    records.append(_record(kernel, label, dims, precision, arch, i, launch,
                                           dump))
    return records


def _record(kernel, label, dims, precision, arch, index, launch, dump):
    facts = compile_launch(launch, arch)
    n_sm = traffic_model.ROOFS[arch]["sms"]
    ctas, binding = ctas_per_sm(facts["registers"], launch.num_warps, facts["smem_bytes"])
    grid = math.prod(launch.grid)
    block = {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "GROUP"))}
    name = f"{kernel}_{precision}_{label}_{arch}" + (f"_cfg{index}" if index else "") + (
        f"_{launch.fn.__name__.strip('_')}" if not launch.fn.__name__.startswith(
            f"_{kernel}") else "")
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ttgir").write_text(facts["ttgir"])
        (dump / f"{name}.ptx").write_text(facts["ptx"])
        if facts["cubin"] is not None:
            (dump / f"{name}.cubin").write_bytes(facts["cubin"])
    rec = {
        "kernel": kernel, "function": launch.fn.__name__, "precision": precision,
        "shape": label, "dims": list(dims), "arch": arch, "config": index,
        "block": block, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
        "registers": facts["registers"], "spill_store_bytes": facts["spill_store_bytes"],
        "spill_load_bytes": facts["spill_load_bytes"], "smem_bytes": facts["smem_bytes"],
        "ctas_per_sm": ctas, "ctas_limit": binding, "mma": facts["mma"],
        "wgmma_pendings": facts["wgmma_pendings"],
        "wgmma_pendings_ttgir": facts["wgmma_pendings_ttgir"],
        "wgmma_serialized": facts["wgmma_serialized"], "wgmma_a": facts["wgmma_a"],
        "sass": facts["sass_counts"], "hot_loop": facts["hot_loop"],
        "issue_ratio": issue_ratio(facts["hot_loop"]), "tile_epilogue": facts["tile_epilogue"],
        "own_finish": facts["own_finish"],
        "grid": grid, "waves": round(grid / (n_sm * ctas), 2), "assembler": facts["assembler"],
        "kernels": KERNEL_SOURCES,
    }
    rec.update(traffic_model.model(kernel, launch, dims, precision, arch, ctas,
                                   issue_ratio=rec["issue_ratio"],
                                   tile_epilogue=rec["tile_epilogue"],
                                   own_finish=rec["own_finish"]))
    return rec


def _kb(b):
    return f"{b / 1024:.0f} KB"


def _bytes(b):
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _pendings(r: dict) -> str:
    """The pendings cell: the SASS K-loops' waits where assembled (what runs), with TTGIR's
    where ptxas serialized the wgmma or the two differ."""
    p = r["wgmma_pendings"]
    if p is None:
        return "–"
    ttgir = r.get("wgmma_pendings_ttgir", p)  # reports saved before SASS waits were read
    if r.get("wgmma_serialized"):
        return f"{p} (serialized by ptxas; TTGIR {ttgir})"
    return str(p) if ttgir == p else f"{p} (TTGIR {ttgir})"


def _ratio(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(records: list[dict]) -> str:
    """The report as Markdown tables: one for the compiled facts, one for the model."""
    lines = [
        "| kernel | mode | shape | arch | function | tiles | warps/stages | regs | spills st/ld "
        "| smem | CTAs/SM (limit) | MMA (A from) | pendings | K-step issue / MMA "
        "| tile epilogue | own finish | grid | waves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tiles = ",".join(str(v) for v in r["block"].values())
        spills = ("?" if r["spill_store_bytes"] is None
                  else f"{r['spill_store_bytes']} / {r['spill_load_bytes']} B")
        hot = r.get("hot_loop")
        if r["spill_store_bytes"] and hot is not None:  # where they are: in the K-loop?
            spills += f" ({hot['STL']} / {hot['LDL']} in K-loop"
            if "outer_STL" in hot:  # reports saved before outer loops were counted lack it
                spills += f", {hot['outer_STL']} / {hot['outer_LDL']} in outer loops"
            spills += ")"
        lines.append(
            f"| {r['kernel']} | {r['precision']} | {r['shape']} | {r['arch']} | "
            f"{r['function']} | {tiles} | {r['num_warps']}/{r['num_stages']} | "
            f"{r['registers'] if r['registers'] is not None else '?'} | {spills} | "
            f"{_kb(r['smem_bytes'])} | {r['ctas_per_sm']} ({r['ctas_limit']}) | {r['mma']}"
            f"{'' if r.get('wgmma_a') is None else ' (' + r['wgmma_a'] + ')'} | "
            f"{_pendings(r)} | {_ratio(r.get('issue_ratio'))} | "
            f"{r.get('tile_epilogue') or '–'} | {r.get('own_finish') or '–'} | {r['grid']} | "
            f"{r['waves']} |")
    reasons = sorted({r["wgmma_serialized"] for r in records if r.get("wgmma_serialized")})
    if reasons:
        lines += ["", "Serialized by ptxas (its \"Potential Performance Loss\" note; every "
                  "wgmma then waits for the one before): " + "; ".join(reasons) + "."]
    lines += [
        "",
        "| kernel | mode | shape | arch | GFLOP | HBM | L2 | compute ms | HBM ms | L2 ms "
        "| K-loop issue ms | binding | best fraction of compute roof | tile epilogue ms "
        "| own finish ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in records:
        key = (r["kernel"], r["precision"], r["shape"], r["arch"], r["config"])
        if key in seen or r.get("model_total") is False:
            continue
        seen.add(key)
        b = r["bound_ms"]
        lines.append(
            f"| {r['kernel']} | {r['precision']} | {r['shape']} | {r['arch']} | "
            f"{r['flops'] / 1e9:.1f} | {_bytes(r['hbm_bytes'])} | {_bytes(r['l2_bytes'])} | "
            f"{b['compute']:.3f} | {b['hbm']:.3f} | {b['l2']:.3f} | "
            f"{_ratio(b.get('issue'), 3)} | {r['binding_roof']} | "
            f"{100 * r['structure_fraction']:.0f} % | {_ratio(r.get('epilogue_ms'), 3)} | "
            f"{_ratio(r.get('finish_ms'), 3)} |")
    return "\n".join(lines)


JSON_KEYS = ("kernel", "function", "precision", "shape", "dims", "arch", "config", "block",
             "num_warps", "num_stages", "registers", "spill_store_bytes", "spill_load_bytes",
             "smem_bytes", "ctas_per_sm", "ctas_limit", "mma", "wgmma_pendings",
             "wgmma_pendings_ttgir", "wgmma_serialized", "wgmma_a", "issue_ratio",
             "tile_epilogue", "own_finish", "sass", "hot_loop", "grid",
             "waves", "flops", "hbm_bytes", "l2_bytes", "bound_ms", "binding_roof",
             "structure_fraction", "epilogue_ms", "finish_ms", "model_notes", "assembler",
             "kernels")


def header() -> str:
    import triton

    return (f"kernels {KERNEL_SOURCES} | triton {triton.__version__} | "
            f"torch {torch.__version__} | assembler: "
            f"{'ptxas-blackwell' if _tool('ptxas-blackwell') else 'none (TTGIR only)'} | "
            f"{date.today().isoformat()}\n\n{traffic_model.describe_roofs()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by ``grood bench --compile``)."""
    parser.add_argument("--kernel", choices=["ncp_gradient", "knn"], action="append",
                        help="kernel(s) to report (default: all)")
    parser.add_argument("--arch", choices=list(ARCHS), action="append",
                        help="target(s) (default: sm_90a and sm_100a)")
    parser.add_argument("--precision", action="append",
                        help="precision mode(s) (default: all; search adds bf16-storage)")
    parser.add_argument("--shapes", choices=["full", "small"], default="full",
                        help="the GPU report's shapes, or one small shape per kernel")
    parser.add_argument("--configs", choices=["launcher", "all"], default="launcher",
                        help="the launcher's configuration, or every autotuning candidate too")
    parser.add_argument("--json", type=Path, help="write one record per configuration here")
    parser.add_argument("--dump", type=Path,
                        help="write each configuration's .ttgir, .ptx and .cubin here")
    parser.add_argument("--plot", type=Path,
                        help="draw the model's roofline (one panel per target) into this PNG "
                             "(needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    """Print the report for parsed ``args``."""
    records = build_records(args.kernel or ["ncp_gradient", "knn"], args.arch or list(ARCHS),
                            args.precision, args.shapes, args.configs, args.dump,
                            progress=not args.quiet)
    print(header())
    print()
    print(markdown(records))
    if args.json:
        args.json.write_text(json.dumps([{k: r.get(k) for k in JSON_KEYS} for r in records],
                                        indent=1))
    if args.plot:
        import roofline

        roofline.plot(records, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Compiled for a GPU target: the interpreter's kernels cannot be compiled.
    os.environ["TRITON_INTERPRET"] = "0"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
