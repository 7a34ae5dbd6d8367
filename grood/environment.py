"""What grood runs with here, for a bug report: its version and its kernels' digest, Python,
the packages it uses (required and optional, with the extra that installs each), and every
device with the backend ``backend="auto"`` takes there and why not Triton where it does not
(``grood env``, :func:`show_versions`).

Versions are read from the installed distributions' metadata: nothing optional is imported
(faiss or ONNX Runtime can take seconds to load, or fail in ways of their own).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from grood import ops
from grood._version import __version__

#: What grood uses, in the order reported: a name, the distributions that provide it (the
#: first one installed is reported) and the extras of grood that install it (none: required).
PACKAGES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("torch", ("torch",), ()),
    ("numpy", ("numpy",), ()),
    ("safetensors", ("safetensors",), ()),
    ("tqdm", ("tqdm",), ()),
    ("triton", ("triton", "pytorch-triton", "triton-windows"), ("triton",)),
    ("faiss", ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"),
     ("faiss-cpu", "faiss-gpu")),
    ("onnx", ("onnx",), ("onnx",)),
    ("onnxscript", ("onnxscript",), ("onnx",)),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), ("onnx",)),
    ("scikit-learn", ("scikit-learn",), ("demo",)),
    ("matplotlib", ("matplotlib",), ("plots",)),
    ("pillow", ("pillow",), ("images",)),
)


def kernel_sources(root: Path | None = None) -> str:
    """Which Triton kernels a timing or a compile report is of: the first 12 hex digits of a
    SHA-256 over the kernel package's source files (``grood_kernels/*.py`` by name, or those
    under ``root``), without importing it. A GPU run gets a copy of the tree without its git
    history, so this is what ties its timings to a commit and to the compile report of the
    same kernels. "none" where the package is not found."""
    if root is None:
        spec = importlib.util.find_spec("grood_kernels")
        if spec is None or not spec.submodule_search_locations:
            return "none"
        root = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _installed(distributions: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(distribution, version)`` of each of ``distributions`` that is installed."""
    found = []
    for dist in distributions:
        try:
            found.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return found


def _package(name: str, distributions: tuple[str, ...], extras: tuple[str, ...]
             ) -> dict[str, Any]:
    """One package's entry: its version and distribution, or how to install it; a note where
    two of its distributions are installed at once (faiss-cpu beside faiss-gpu: one module,
    whichever was installed last)."""
    found = _installed(distributions)
    entry: dict[str, Any] = {"name": name, "extras": list(extras),
                             "version": found[0][1] if found else None,
                             "distribution": found[0][0] if found else None}
    if name == "torch" and found:
        entry["cuda"] = torch.version.cuda  # None for a CPU build (and a ROCm one)
        entry["hip"] = torch.version.hip  # ROCm's version, None elsewhere
    if len(found) > 1:
        entry["note"] = (f"{' and '.join(d for d, _ in found)} are "
                         f"{'both' if len(found) == 2 else 'all'} installed and provide the "
                         f"same module: uninstall all but one")
    return entry


def _cpu_name() -> str:
    """The CPU's model name where the system says it (Linux's /proc/cpuinfo), else what
    :mod:`platform` knows (often only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices() -> list[dict[str, Any]]:
    """Every device torch sees, with the backend each operation gets there by default, and
    why not Triton where it does not. A device torch fails to query (a driver that does not
    match, a GPU in a bad state) is listed with torch's error: a bug report needs it most."""
    try:
        cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())
                ] if torch.cuda.is_available() else []
    except Exception as exc:  # any failure of the query is what the report must show
        return [_device(torch.device("cpu")), {"device": "cuda", "error": _said(exc)}]
    return [_device(dev) for dev in [torch.device("cpu"), *cuda]] + _apple_gpu()


def _apple_gpu() -> list[dict[str, Any]]:
    """Apple's GPU where this torch can use it: listed with why grood computes elsewhere."""
    from grood._checks import check_float64_device

    try:
        if not torch.backends.mps.is_available():
            return []
        check_float64_device(torch.device("mps"))
    except ValueError as exc:
        return [{"device": "mps", "name": "Apple GPU (MPS)", "refused": str(exc)}]
    except Exception as exc:  # (a failed query, as for a CUDA device)
        return [{"device": "mps", "error": _said(exc)}]
    return []


def _device(dev: torch.device) -> dict[str, Any]:
    """One device's entry (see :func:`_devices`)."""
    entry: dict[str, Any] = {"device": str(dev)}
    try:
        if dev.type == "cpu":
            entry["name"] = _cpu_name()
            entry["threads"] = torch.get_num_threads()
        else:
            props = torch.cuda.get_device_properties(dev)
            entry["name"] = props.name
            entry["capability"] = f"{props.major}.{props.minor}"
            entry["memory_gib"] = round(props.total_memory / 2**30, 1)
        entry["auto"] = ops.resolve_backends("auto", dev, torch.float32, "ieee")
        # the tensor-core modes where they differ (on a GPU the search in ieee runs on torch)
        entry["auto_tensor_cores"] = ops.resolve_backends("auto", dev, torch.float32, "tf32")
        entry["triton_unavailable"] = ops.triton_unavailable_reason("ncp_gradient", dev,
                                                                    torch.float32)
    except Exception as exc:
        entry["error"] = _said(exc)
    return entry


def _said(exc: BaseException) -> str:
    """An exception as one line: its type and its first line."""
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def environment() -> dict[str, Any]:
    """What grood runs with here, as a JSON-able dict: ``grood`` (version), ``kernels`` (the
    kernels' source digest, as the GPU and compile reports name them), ``python``,
    ``platform``, ``triton_interpret`` (whether ``TRITON_INTERPRET=1`` is set), ``packages``
    (per package: ``name``, ``version`` or None, ``distribution``, the ``extras`` that install
    it, none for a required one, and a ``note`` where two distributions of it are installed)
    and ``devices`` (per device: ``device``, ``name``, ``auto`` — the backend of each
    operation under ``backend="auto"`` — and ``triton_unavailable``, why the Triton kernels
    cannot run there, or None; in their place ``error``, torch's, where it could not query
    the device, or ``refused``, why grood does not compute on it: Apple's MPS)."""
    return {
        "grood": __version__,
        "kernels": kernel_sources(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "packages": [_package(*spec) for spec in PACKAGES],
        "devices": _devices(),
    }


def backend_words(backends: dict[str, str]) -> str:
    """A mapping of operation to backend (``backend_``, :func:`grood.ops.resolve_backends`)
    in words: ``"ncp_gradient on torch, knn on torch"``."""
    return ", ".join(f"{op} on {backend}" for op, backend in backends.items())


def format_environment(env: dict[str, Any]) -> str:
    """:func:`environment`'s dict as the lines ``grood env`` prints."""
    lines = [f"grood {env['grood']} (kernels {env['kernels']})",
             f"python {env['python']} ({env['platform']})", "packages"]
    for p in env["packages"]:
        if p["version"] is None:
            text = "not installed: " + (" or ".join(f"pip install 'grood[{e}]'"
                                                    for e in p["extras"])
                                        or "required: pip install grood")
        else:
            text = p["version"]
            if p["distribution"] != p["name"]:
                text += f" ({p['distribution']})"
            if "cuda" in p:
                text += (f" (CUDA {p['cuda']})" if p["cuda"] else
                         f" (ROCm {p['hip']})" if p.get("hip") else " (CPU build)")
        if "note" in p:
            text += f"; {p['note']}"
        lines.append(f"  {p['name']:<13}{text}")
    lines.append("devices" + (" (TRITON_INTERPRET=1: backend='triton' runs the kernels on the "
                              "CPU under Triton's interpreter)" if env["triton_interpret"]
                              else ""))
    for d in env["devices"]:
        if "error" in d:
            lines.append(f"  {d['device']:<13}torch could not query it: {d['error']}")
            continue
        about = [d["name"]]
        if "threads" in d:
            about.append(f"{d['threads']} torch threads")
        if "capability" in d:
            about += [f"compute capability {d['capability']}", f"{d['memory_gib']} GiB"]
        lines.append(f"  {d['device']:<13}{'; '.join(about)}")
        if "refused" in d:  # (a device grood does not compute on)
            lines.append(f"  {'':<13}not used by grood: {d['refused']}")
            continue
        lines.append(f"  {'':<13}backend='auto': {backend_words(d['auto'])}")
        if d.get("auto_tensor_cores", d["auto"]) != d["auto"]:
            lines.append(f"  {'':<13}  (precision='ieee'; in tf32, tf32x3 and bf16: "
                         f"{backend_words(d['auto_tensor_cores'])})")
        if d["triton_unavailable"]:
            lines.append(f"  {'':<13}Triton kernels: {d['triton_unavailable']}")
    return "\n".join(lines)


def show_versions() -> None:
    """Print what grood runs with here (``grood env``): paste it into a bug report."""
    print(format_environment(environment()))
