"""One launch description shared by the launchers and the compile report.

A launcher builds a :class:`KernelLaunch` (kernel, grid, arguments, compile-time constants,
warps, stages) and runs it with :func:`run`. ``bench/compile_report.py`` builds the very same
record from tensors on the ``meta`` device and compiles it for a GPU target without launching
it, so the report sees exactly the configuration the launcher picks at a shape.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

#: SMs assumed when planning a launch off a GPU (the interpreter, the compile report): an
#: H100 / H200 SXM.
DEFAULT_SMS = 132


class KernelLaunch(NamedTuple):
    """Everything that decides what a kernel launch compiles to.

    Attributes:
        fn: the ``@triton.jit`` kernel.
        grid (tuple[int, ...]): program grid.
        args (tuple): positional runtime arguments (tensors, ints, floats), in kernel order.
        constexprs (dict[str, Any]): ``tl.constexpr`` arguments by name.
        num_warps (int): warps per program.
        num_stages (int): software-pipelining depth.
    """

    fn: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


class TorchCall(NamedTuple):
    """A step of a launch plan that runs in torch, not Triton (the split gradient step's
    GEMM): ``fn(*args)``. The compile report skips it."""

    fn: Any
    args: tuple


class LaunchConfig(NamedTuple):
    """How a launcher tiles its GEMM and splits the work (one shape for every kernel).

    Attributes:
        block_rows (int): rows of the streamed operand per program (features, queries).
        block_cols (int): columns of the GEMM per inner step (classes, database rows).
        block_d (int): the K-step (feature dimensions per ``tl.dot``).
        num_warps (int): warps per program.
        num_stages (int): software-pipelining depth.
        n_split (int): programs sharing one row block, each over its own part of the columns
            (class groups of the gradient step; database splits of the search).
        group_rows (int): row blocks launched next to each other so they share the column
            tiles in L2 (the search's query groups; 1 where unused).
        single_read (bool): the gradient step's variant that holds the whole feature tile in
            registers (``block_d`` is then all of D, padded to a power of two).
        staged (bool): the gradient step's variant whose pre-pass writes the centred features
            into the gradient's rows, so both GEMM operands reach ``tl.dot`` as loaded.
        split (bool): the gradient step's variant whose GEMM runs in torch (cuBLAS on a GPU)
            over chunks of those rows, each followed by a Triton epilogue over its results
            (the tiles then describe the epilogue).
        finish_apart (bool): the class-group kernel (or the split variant's epilogue)
            writes its partial results only, and a launch of its own over small row tiles
            merges them, re-ranks and writes the gradient
            (:func:`grood_kernels._ncp_finish._ncp_finish_kernel`), instead of the last
            program of each row block (the epilogue's program).
        finish_waves (int): with ``finish_apart``, at least this many programs per SM for
            the finish (0: as many as keep their row tiles in L2,
            :func:`grood_kernels._ncp_finish.finish_programs`).
        exact (bool): the gradient step without a GEMM: every class's distance from fp32
            differences (:mod:`grood_kernels._ncp_exact`; ``block_cols`` is then its block of
            classes, ``block_d`` its D-step).
    """

    block_rows: int
    block_cols: int
    block_d: int
    num_warps: int
    num_stages: int
    n_split: int = 1
    group_rows: int = 1
    single_read: bool = False
    staged: bool = False
    split: bool = False
    finish_apart: bool = False
    finish_waves: int = 0
    exact: bool = False


def fit_tile(block: int, size: int) -> int:
    """``block`` shrunk to a dimension of ``size`` (a power of two, at least 16 as ``tl.dot``
    needs)."""
    return min(block, max(16, 1 << max(0, size - 1).bit_length()))


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device for what runs inside (nothing off CUDA).

    Triton launches a kernel on the *current* device and that device's current stream, not
    on its tensors' device: a kernel for tensors on ``cuda:1`` while ``cuda:0`` is current
    would run on the other GPU, unordered with the work on ``cuda:1`` that made its inputs.
    Under this guard it runs on ``cuda:1``'s current stream, where torch queues that work."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: Pipelining stages that fit the device's shared memory, per launch that needed fewer than
#: it asked for (keyed by :func:`_stages_key`).
_FITTING_STAGES: dict[tuple, int] = {}


def run(launch: KernelLaunch | TorchCall) -> None:
    """Launch a described kernel (or run a plan's torch step), on its tensors' device.

    The configurations are sized for the H100 / H200's 227 KB of shared memory per block.
    Where a GPU has less (99 KB on sm_86 / sm_89, 163 KB on the A100, 64 KB on the T4), the
    launch is retried with fewer software-pipelining stages, which changes no result (only
    how far loads run ahead), and the stages that fit are remembered for this process. Triton
    checks shared memory before it launches anything, so a refused attempt writes nothing.
    A kernel Triton fails to compile for the device is named in a RuntimeError with the
    device, the triton version and the way out (``backend='torch'``)."""
    if isinstance(launch, TorchCall):
        launch.fn(*launch.args)
        return
    device = next(a.device for a in launch.args if isinstance(a, torch.Tensor))
    launch = for_target(launch, target_major(device))
    # The table is empty unless a launch was refused: only then is the key worth building.
    stages = (_FITTING_STAGES.get(_stages_key(launch, device), launch.num_stages)
              if _FITTING_STAGES else launch.num_stages)
    with on_device(device):
        while True:
            try:
                launch.fn[launch.grid](*launch.args, **launch.constexprs,
                                       num_warps=launch.num_warps, num_stages=stages)
                break
            except OutOfResources as err:
                if err.name != "shared memory":
                    raise
                if stages <= 1:
                    name = getattr(launch.fn, "__name__", str(launch.fn))
                    raise RuntimeError(
                        f"{name} needs {err.required} bytes of shared memory per block even "
                        f"unpipelined; this GPU ({device}) allows {err.limit}: use "
                        "backend='torch' on it") from err
                stages -= 1
            except (CompilationError, PTXASError, RuntimeError) as err:
                if not _from_compiler(err):
                    raise
                name = getattr(launch.fn, "__name__", str(launch.fn))
                first = next((line for line in str(err).splitlines() if line.strip()),
                             type(err).__name__)
                raise RuntimeError(
                    f"{name} did not compile for this GPU ({device}, compute capability "
                    f"{_capability(device)}) with triton {triton.__version__}: {first[:300]}. "
                    "backend='torch' runs the operation without Triton (another triton "
                    "version may compile it)") from err
    if stages != launch.num_stages:
        _FITTING_STAGES[_stages_key(launch, device)] = stages


def _from_compiler(err: BaseException) -> bool:
    """Whether ``err`` is Triton failing to compile a kernel (its front end, an MLIR pass,
    ptxas), not the launch or the kernel failing on the device: the frame that raised it is in
    triton's compiler package or a backend's ``compiler.py`` (not its driver)."""
    if isinstance(err, (CompilationError, PTXASError)):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    path = Path(frames[-1].filename) if frames else Path()
    return "triton" in path.parts and ("compiler" in path.parts or path.name == "compiler.py")


def _capability(device: torch.device) -> str:
    if device.type != "cuda":
        return "none"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _stages_key(launch: KernelLaunch, device: torch.device) -> tuple:
    """What decides a launch's shared memory: kernel, device, warps, stages asked,
    compile-time constants and tensor dtypes."""
    return (launch.fn, device, launch.num_warps, launch.num_stages,
            tuple(sorted(launch.constexprs.items())),
            tuple(a.dtype for a in launch.args if isinstance(a, torch.Tensor)))


def one_block_target(major: int) -> bool:
    """Whether a GPU of compute capability ``major``.x keeps the gradient step's ``ONE_BLOCK``
    (before sm_100; see :func:`for_target`)."""
    return major < 10


def for_target(launch: KernelLaunch, major: int) -> KernelLaunch:
    """``launch`` as compiled for a GPU of compute capability ``major``.x: kernels that take
    ``FLAT_GATE`` get it on from sm_100 (tcgen05; see :func:`grood_kernels._topk.any_row`),
    off before; ``ONE_BLOCK`` (the gradient step's first-tile candidates, see
    :func:`grood_kernels._ncp_configs.one_block`) is turned off from sm_100, where the tile's
    epilogue reads a tensor-memory accumulator and one reduction a round saves 50-130 of
    ~3,500 instructions while lengthening some K-loops (sm_100a, triton 3.9: bf16
    ImageNet-1k's K-step 166 -> 185 instructions). :func:`run` applies it for the device,
    the compile report for its target, so both compile the same kernel."""
    names = getattr(launch.fn, "arg_names", ())
    constexprs = dict(launch.constexprs)
    if "FLAT_GATE" in names:
        constexprs["FLAT_GATE"] = major >= 10
    if constexprs.get("ONE_BLOCK") and not one_block_target(major):
        constexprs["ONE_BLOCK"] = 0
    if constexprs == launch.constexprs:
        return launch
    return launch._replace(constexprs=constexprs)


#: Triton releases before this one compile a tensor-core (tcgen05) accumulator's row
#: reductions on Blackwell with register spills at the tiles Hopper takes (the search's
#: 128 x 256 fp32 accumulator, sm_100a: 8,036 bytes per thread under triton 3.6, 8,112 under
#: 3.7.1, 7,308 under 3.8.0; none under 3.9): kernels pick smaller Blackwell tiles there
#: (:func:`blackwell_small_tiles`).
TCGEN05_SPILL_FREE_FROM = (3, 9)


@functools.cache
def triton_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def blackwell_small_tiles(major: int) -> bool:
    """Whether a GPU of compute capability ``major``.x needs the smaller tensor-core tiles
    under the installed triton (see :data:`TCGEN05_SPILL_FREE_FROM`)."""
    return major >= 10 and triton_version() < TCGEN05_SPILL_FREE_FROM


def target_major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA ``device``, which its launches compile
    for (0 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 0
    return _cuda_major(device.index if device.index is not None
                       else torch.cuda.current_device())


@functools.cache
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device`` (looked up once per device), else None
    (the launch heuristics then plan for ``DEFAULT_SMS``)."""
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device.index if device.index is not None
                          else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
