"""Both kernels' tensor-core launches compile for Blackwell (sm_100a) as the launchers make
them, and the gradient step's keep Hopper's (sm_90a) wgmma in flight (no GPU needed:
``bench/compile_report.py`` compiles the launchers' own launches). The CI's floor environment
runs this under triton 3.6, the main one under the newest triton."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import expected_spills

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_tensor_core_modes_of_both_kernels_compile_for_blackwell(tmp_path):
    """Under triton 3.6, compiling for sm_100 (tcgen05), every tensor-core mode of both
    kernels failed in the TMEM layout pass ("parent layout must have at least rank >= 2": the
    top-k gate's scalar reduction of a row reduction of the accumulator), so on a Blackwell
    GPU with torch 2.11's triton every tf32, tf32x3 and bf16 call failed. (sm_90a: the
    compile report's tests; tf32x3 shares tf32's MMA path.) And the search's tiles compile
    without a spill (under triton 3.6 its Hopper tiles spilled 8,036 bytes per thread in tf32
    and with a bf16-stored index: the launcher takes smaller Blackwell tiles there), or, under
    triton 3.8, with the few bytes :data:`conftest.KNOWN_SPILLS` names, none in or around
    the K-loop."""
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
            spills = r["spill_store_bytes"], r["spill_load_bytes"]
            assert spills == expected_spills(r["function"], "sm_100a", r["precision"]), r
            if r["hot_loop"] is not None:  # disassembled: none in or around the K-loop
                hot = r["hot_loop"]
                assert hot["LDL"] == hot["STL"] == hot["outer_LDL"] == hot["outer_STL"] == 0


HOPPER_PLAN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import compile_report
from grood_kernels import ncp_gradient
out = []
for dims in ((256, 10, 64), (256, 300, 64)):
    for mode in ("tf32", "bf16"):
        for launch in ncp_gradient.compile_launches(*dims, mode, major=9, exact=False):
            facts = compile_report.compile_launch(launch, "sm_90a")
            out.append({"dims": dims, "mode": mode, "function": launch.fn.__name__,
                        **{k: facts[k] for k in ("mma", "wgmma_pendings", "wgmma_serialized",
                                                 "assembler")}})
print(json.dumps(out))
"""


def test_gradient_step_keeps_hopper_wgmma_in_flight():
    """The gradient step's tensor-core launches for sm_90a, as the launcher plans them, keep
    wgmma groups in flight in the SASS, not only in TTGIR: ptxas serialized every wgmma
    (each waiting for the one before) when the K-loop's zeroed accumulator reached the wait
    on the path with no K-step (tf32 under triton 3.6-3.9, bf16 at C = 10; fixed by
    ``tl.assume(D > 0)``), and under triton 3.6 when a tf32 tile centred in registers sat in
    the class loop (C = 300 here: three class blocks in one program; the launcher takes the
    staged variant there)."""
    proc = subprocess.run([sys.executable, "-c", HOPPER_PLAN, str(BENCH)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "0"},
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.splitlines()[-1])
    gemm = [r for r in records if r["function"] == "_ncp_gradient_kernel"]
    assert len(gemm) == 4 and all(r["mma"] == "wgmma" for r in gemm), records
    if records[0]["assembler"] != "ptxas-blackwell":
        pytest.skip("needs triton's ptxas-blackwell to read the SASS")
    for r in gemm:
        assert r["wgmma_serialized"] is None and r["wgmma_pendings"] >= 1, r
