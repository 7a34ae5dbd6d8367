"""Shared fixtures. Triton's interpreter must be chosen before triton is first imported."""

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import tqdm
from torch.utils.data import Dataset

# No tqdm monitor thread in the test processes: it starts with the first tqdm bar (the tests
# that draw one) and wakes every 10 s for the rest of the process, and a warning it gives
# there would land in whichever test is recording every warning at the time.
tqdm.tqdm.monitor_interval = 0


def _patch_the_language_once_per_launch():
    """Triton's interpreter (3.6 to 3.9: CI runs 3.6 and 3.9) patches ``triton.language``
    for each launch and then again for every call of a ``@triton.jit`` helper inside it:
    ``inspect.getmembers`` over ``tl``, ``tl.tensor`` and ``tl.math``, about 1 ms a call. The
    second pass finds every builtin patched already and sets the rest to what they are, but the
    top-4 insertion calls its helpers thousands of times per launch: the whole suite took 543 s
    with it and 437 s without (2 cores). Here a helper called while its launch's patch is in
    place (``tl.load`` no longer Triton's builtin, in each language module the helper sees)
    skips it; a launch patches and restores as before. Where the interpreter's internals
    differ, nothing is changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch, scope = getattr(interpreter, "_patch_lang", None), getattr(interpreter,
                                                                      "_LangPatchScope", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if patch is None or scope is None or is_builtin is None or not is_builtin(tl.load):
        return

    @functools.cache
    def langs_of(fn):
        return tuple(v for v in fn.__globals__.values() if v is tl or v is tl.core)

    def patch_lang(fn):
        langs = langs_of(fn)
        if langs and not any(is_builtin(lang.load) for lang in langs):
            return scope()
        return patch(fn)

    interpreter._patch_lang = patch_lang


_patch_the_language_once_per_launch()


def _interpreter_builder(*methods: str):
    """``(InterpreterBuilder, TensorHandle)`` of Triton's interpreter where the builder has
    ``methods`` (as in triton 3.6 to 3.9), else ``(None, None)``."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None, None
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not all(hasattr(builder, m) for m in methods):
        return None, None
    return builder, handle


def _bf16_as_the_hardware_computes_it() -> bool:
    """Triton's interpreter keeps bf16 values as their uint16 bits (numpy has no bf16), casts
    fp32 to bf16 by truncation, and multiplies the raw bits in ``tl.dot``: a bf16 GEMM comes
    out as garbage (the gradient step's predictions 15 % right on random rows). The GPU
    rounds to nearest even (``cvt.rn.bf16.f32``) and the tensor cores multiply bf16 values
    exactly, accumulating in fp32. Here the interpreter does the same: fp32 -> bf16 casts
    round to nearest even (NaN stays NaN, overflow goes to Inf), bf16 -> fp32 widens the bits,
    and a dot widens bf16 operands to fp32 before its fp32 matmul (their products are exact
    in fp32). Returns whether it is in place (the interpreter's internals as in triton 3.6 to
    3.9); bf16 kernel tests that need it skip otherwise."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy as np
        import triton.language as tl
    except ImportError:
        return False
    builder, handle = _interpreter_builder("cast_impl", "create_dot")
    if builder is None:
        return False
    cast, dot = builder.cast_impl, builder.create_dot

    def to_bf16(x):  # torch's cast: round to nearest even, as cvt.rn.bf16.f32
        x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return x32.bfloat16().view(torch.int16).numpy().view(np.uint16)

    def to_f32(x):
        return (np.asarray(x).astype(np.uint32) << 16).view(np.float32)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == tl.float32 and d == tl.bfloat16:
            return handle(to_bf16(src.data), d)
        if s == tl.bfloat16 and d == tl.float32:
            return handle(to_f32(src.data), d)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = handle(to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = handle(to_f32(b.data), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = cast_impl
    builder.create_dot = create_dot
    return True


#: Whether the interpreter computes bf16 as the GPU does
#: (:func:`_bf16_as_the_hardware_computes_it`).
INTERPRETER_BF16 = _bf16_as_the_hardware_computes_it()
#: Skips a bf16 kernel test where its dot is not the hardware's: it runs on a GPU (compiled
#: Triton) or under the interpreter as patched above.
NEEDS_BF16 = pytest.mark.skipif(
    not INTERPRETER_BF16 and not (torch.cuda.is_available()
                                  and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="this triton's interpreter computes bf16 dots wrongly")


@pytest.fixture
def tensor_core_tf32(monkeypatch):
    """Triton's interpreter with ``tl.dot``'s ``tf32`` and ``tf32x3`` as tensor cores compute
    them (:func:`emulate_tensor_core_tf32`) for one test; skips where the interpreter is off
    or its internals are not those of triton 3.6 / 3.9."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("emulates tensor cores under Triton's interpreter")
    if not emulate_tensor_core_tf32(monkeypatch.setattr):
        pytest.skip("this triton's interpreter differs")


def emulate_tensor_core_tf32(setattr_) -> bool:
    """Make Triton's interpreter compute ``tl.dot``'s ``tf32`` and ``tf32x3`` as tensor cores
    do, through ``setattr_(obj, name, value)`` (``monkeypatch.setattr`` in a test); it
    computes both in fp32. TF32 keeps 10 of fp32's 23 mantissa bits (the MMA reads fp32
    operands and drops the low 13: truncation; the kernels hand it operands already rounded
    to the nearest TF32 value, which it reads exactly, and their error bound counts that
    rounding's 2**-11); tf32x3 splits each operand into ``hi`` (truncated) and ``lo = x - hi``
    (truncated in its turn) and sums ``hi.lo + lo.hi + hi.hi`` in fp32. Returns whether the
    interpreter's internals allowed it."""
    import numpy as np
    import triton.language as tl

    builder, handle = _interpreter_builder("create_dot")
    if builder is None:
        return False
    dot = builder.create_dot

    def tf32(x):
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return (bits & np.uint32(0xFFFFE000)).view(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        mode = str(input_precision).rsplit(".", 1)[-1].upper()
        if a.dtype.scalar != tl.float32 or b.dtype.scalar != tl.float32 or mode not in (
                "TF32", "TF32X3"):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.asarray(d.data, dtype=np.float32)
        a_hi, b_hi = tf32(a.data), tf32(b.data)
        if mode == "TF32X3":
            a_lo, b_lo = tf32(a.data - a_hi), tf32(b.data - b_hi)
            acc = acc + np.matmul(a_hi, b_lo, dtype=np.float32)
            acc = acc + np.matmul(a_lo, b_hi, dtype=np.float32)
        return handle(acc + np.matmul(a_hi, b_hi, dtype=np.float32), d.dtype.scalar)

    setattr_(builder, "create_dot", create_dot)
    return True


def clustered_features(n: int, n_classes: int, dim: int, *, seed: int = 0, spread: float = 0.3,
                       dtype: torch.dtype = torch.float64):
    """Non-negative, clustered features like a post-ReLU penultimate layer, with labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand((n_classes, dim), generator=gen, dtype=torch.float64) * 2.0
    labels = torch.arange(n) % n_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, dim), generator=gen, dtype=torch.float64) * spread
    return (centres[labels] + noise).clamp_min(0).to(dtype), labels


def rewrite_detector_file(path, edit):
    """Rewrite a detector file through ``edit(meta, tensors)``, with a valid digest (a file
    damaged in a way its checksum does not catch)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood.persistence import digest

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    meta.pop("digest")
    meta["digest"] = digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture
def toy_set():
    """Three well separated classes in 5-D (float32), with an OOD set far from all of them."""
    x, y = clustered_features(90, 3, 5, seed=1, spread=0.15, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    ood = torch.rand((30, 5), generator=gen) * 6.0 + 3.0
    return x, y, ood


class DictDataset(Dataset):
    """Samples as OpenOOD's loaders give them: dicts with ``data`` and ``label``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"data": self.x[i], "label": self.y[i]}


#: Spills ptxas leaves where a triton release compiles a kernel with any, at the shapes the
#: tests compile (the compile report's small ones, the variants' own): ``{(major, minor):
#: {(arch, function, precision): (store, load)}}``, bytes per thread, none in a K-loop
#: (bench/RESULTS.md: "Hopper under triton 3.7.1", and "Triton 3.8.0", which lists the
#: full-size shapes' too). Under 3.6 (the lent GPU machines') and 3.9 (CI's) nothing spills
#: there. Triton 3.7's split epilogue, 8 B / 8 B there on 2026-12-03, compiles without a
#: spill since dd27765 (2026-12-04).
KNOWN_SPILLS = {
    (3, 7): {("sm_90a", "_knn_candidates_kernel", "tf32"): (12, 8),
             ("sm_90a", "_knn_candidates_kernel", "bf16-storage"): (12, 8)},
    (3, 8): {("sm_100a", "_knn_candidates_kernel", "tf32"): (8, 4),
             ("sm_100a", "_knn_candidates_kernel", "bf16-storage"): (8, 4)},
}


def expected_spills(function: str, arch: str = "sm_90a", precision: str = "tf32"
                    ) -> tuple[int, int]:
    """The (store, load) spill bytes per thread ``function`` compiles to for ``arch`` in
    ``precision`` under the installed triton (:data:`KNOWN_SPILLS`)."""
    from grood_kernels._launch import triton_version

    return KNOWN_SPILLS.get(triton_version(), {}).get((arch, function, precision), (0, 0))


@pytest.fixture
def wide_tile_offered(monkeypatch):
    """The gradient step's autotuning candidates see triton 3.9, a release where the staged
    256-class tile (``WIDE_TILE``) is one (it is none under ``WIDE_TILE_SPILLS_UNDER``), so
    tests of that candidate run under any installed triton."""
    from grood_kernels import _ncp_candidates

    monkeypatch.setattr(_ncp_candidates, "triton_version", lambda: (3, 9))
