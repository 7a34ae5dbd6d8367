"""``grood env`` / ``grood.show_versions()``: the versions, packages and devices a bug report
needs, read without importing any optional package."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from types import SimpleNamespace

import torch

import grood
from grood import environment as env_mod
from grood import ops
from grood.cli import main
from grood.environment import environment, format_environment, kernel_sources


def test_env_reports_the_installed_versions_and_the_cpus_backends(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["grood"] == grood.__version__ and env["kernels"] == kernel_sources() != "none"
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    packages = {p["name"]: p for p in env["packages"]}
    assert list(packages)[:4] == ["torch", "numpy", "safetensors", "tqdm"]
    assert packages["torch"]["version"] == metadata.version("torch")
    assert packages["torch"]["cuda"] == torch.version.cuda
    assert packages["numpy"]["version"] == metadata.version("numpy")
    assert all(p["extras"] == [] for p in list(packages.values())[:4])
    assert packages["onnxruntime"]["extras"] == ["onnx"]
    cpu = env["devices"][0]
    assert cpu["device"] == "cpu" and cpu["threads"] == torch.get_num_threads()
    assert cpu["auto"] == ops.resolve_backends("auto", "cpu", torch.float32)
    assert len(env["devices"]) == 1 + (torch.cuda.device_count()
                                       if torch.cuda.is_available() else 0)

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"grood {grood.__version__} (kernels {kernel_sources()})\n")
    assert f"  torch        {metadata.version('torch')}" in text
    assert "  cpu          " in text and "backend='auto': ncp_gradient on " in text


def test_a_missing_package_names_its_extra_and_two_of_one_module_are_named(monkeypatch):
    """faiss-cpu and faiss-gpu install the same module (whichever came last wins): both at
    once is named; a package not installed gives the extra that installs it."""
    real = metadata.version
    present = {"faiss-cpu": "1.8.0", "faiss-gpu-cu12": "1.8.0"}

    def version(dist):
        if dist in present:
            return present[dist]
        if dist in ("onnxruntime", "onnxruntime-gpu", "scikit-learn", "faiss-gpu-cu11",
                    "faiss-gpu"):
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(env_mod.metadata, "version", version)
    env = environment()
    packages = {p["name"]: p for p in env["packages"]}
    assert packages["faiss"]["distribution"] == "faiss-cpu"
    assert packages["faiss"]["note"] == ("faiss-cpu and faiss-gpu-cu12 are both installed and "
                                         "provide the same module: uninstall all but one")
    assert packages["onnxruntime"]["version"] is None
    text = format_environment(env)
    assert "  onnxruntime  not installed: pip install 'grood[onnx]'\n" in text
    assert "  scikit-learn not installed: pip install 'grood[demo]'\n" in text
    assert "  faiss        1.8.0 (faiss-cpu); faiss-cpu and faiss-gpu-cu12 are both" in text
    del present["faiss-cpu"], present["faiss-gpu-cu12"]
    monkeypatch.setattr(env_mod, "_installed", lambda dists: [])  # nothing at all
    text = format_environment(environment())
    assert ("  faiss        not installed: pip install 'grood[faiss-cpu]' or pip install "
            "'grood[faiss-gpu]'\n") in text
    assert "  torch        not installed: required: pip install grood\n" in text


def test_a_rocm_torch_and_apple_gpu_are_named_as_such(monkeypatch):
    """A ROCm build of torch has no CUDA version (it said "CPU build"), and Apple's GPU is
    listed with why grood computes elsewhere. (Stand-ins: this machine has neither.)"""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    env = environment()
    assert env["packages"][0]["hip"] == "6.4.43482"
    assert env["devices"][-1]["device"] == "mps"
    text = format_environment(env)
    assert f"  torch        {env['packages'][0]['version']} (ROCm 6.4.43482)\n" in text
    assert ("  mps          Apple GPU (MPS)\n               not used by grood: device 'mps' "
            "(Apple's GPU): grood computes parts of every step in float64") in text


def test_each_gpu_is_named_with_its_backends_and_why_not_triton(monkeypatch):
    """(A stand-in for torch's CUDA queries: this machine may have no GPU.)"""
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    gpus = environment()["devices"][1:]
    assert [d["device"] for d in gpus] == ["cuda:0", "cuda:1"]
    assert gpus[0]["capability"] == "9.0" and gpus[0]["memory_gib"] == 150.0
    assert gpus[0]["auto"] == ops.resolve_backends("auto", "cuda:0", torch.float32)
    text = format_environment(environment())
    assert "  cuda:1       NVIDIA H200; compute capability 9.0; 150.0 GiB\n" in text
    if find_spec("triton"):  # the search in ieee runs on torch; the tensor-core modes' not
        assert gpus[0]["auto"] == {"ncp_gradient": "triton", "knn": "torch"}
        assert ("backend='auto': ncp_gradient on triton, knn on torch\n"
                "                 (precision='ieee'; in tf32, tf32x3 and bf16: "
                "ncp_gradient on triton, knn on triton)") in text

    # Without triton the GPUs run torch, and say why.
    real_find_spec = ops.importlib.util.find_spec
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    gpu = environment()["devices"][1]
    assert gpu["auto"] == {"ncp_gradient": "torch", "knn": "torch"}
    assert "triton is not installed" in gpu["triton_unavailable"]
    assert ("Triton kernels: triton is not installed (pip install 'grood[triton]')"
            in format_environment(environment()))


def test_a_gpu_torch_cannot_query_is_listed_with_its_error(monkeypatch):
    """The report a bug needs most must not fail itself on a broken driver or device."""
    def broken(dev):
        raise RuntimeError("CUDA error: unknown error\nCUDA kernel errors might be ...")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    env = environment()
    assert env["devices"][0]["device"] == "cpu" and "auto" in env["devices"][0]
    assert env["devices"][1] == {"device": "cuda:0",
                                 "error": "RuntimeError: CUDA error: unknown error"}
    assert ("  cuda:0       torch could not query it: RuntimeError: CUDA error: unknown "
            "error") in format_environment(env)

    def no_count():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "device_count", no_count)
    assert environment()["devices"][1:] == [
        {"device": "cuda", "error": "RuntimeError: Found no NVIDIA driver on your system"}]


def test_show_versions_prints_the_report_and_imports_no_optional_package():
    code = ("import sys, grood; grood.show_versions(); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('faiss', 'onnx', 'onnxscript', 'onnxruntime', 'sklearn', "
            "'matplotlib', 'PIL', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.startswith(f"grood {grood.__version__} (kernels ")
    assert "\npackages\n" in out and "\ndevices" in out
    assert out.rstrip().splitlines()[-1] == "[]"
