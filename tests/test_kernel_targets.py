"""Both kernels' tensor-core launches compile for Blackwell (sm_100a) as the launchers make
them (no GPU needed: ``bench/compile_report.py`` compiles the launchers' own launches). The
CI's floor environment runs this under triton 3.6, the main one under the newest triton."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_tensor_core_modes_of_both_kernels_compile_for_blackwell(tmp_path):
    """Under triton 3.6, compiling for sm_100 (tcgen05), every tensor-core mode of both
    kernels failed in the TMEM layout pass ("parent layout must have at least rank >= 2": the
    top-k gate's scalar reduction of a row reduction of the accumulator), so on a Blackwell
    GPU with torch 2.11's triton every tf32, tf32x3 and bf16 call failed. (sm_90a: the
    compile report's tests; tf32x3 shares tf32's MMA path.) And the search's tiles compile
    without a spill: under triton 3.6 its Hopper tiles spilled 8,036 bytes per thread in tf32
    and with a bf16-stored index (the launcher takes smaller Blackwell tiles there)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compile_report.py"), "--shapes", "small", "--arch",
         "sm_100a", "--precision", "tf32", "--precision", "bf16", "--precision",
         "bf16-storage", "--json", str(tmp_path / "r.json"), "--quiet"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| ncp", "| knn"))]
    for kernel in ("ncp_gradient", "knn"):
        for mode in ("tf32", "bf16"):
            compiled = [r for r in rows if r.startswith(f"| {kernel} | {mode} |")]
            assert any("| tcgen05" in r for r in compiled), (kernel, mode, compiled)
    records = json.loads((tmp_path / "r.json").read_text())
    search = [r for r in records if r["function"] == "_knn_candidates_kernel"]
    assert {r["precision"] for r in search} == {"tf32", "bf16", "bf16-storage"}
    if records[0]["assembler"] == "ptxas-blackwell":  # assembled: registers and spills known
        for r in search:
            assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
