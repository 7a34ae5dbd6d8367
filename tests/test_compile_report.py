"""The compile report (bench/compile_report.py): compiled facts and the traffic model.

Compiles one small launch per kernel for sm_90a (no GPU needed). The facts need the
``ptxas-blackwell`` shipped in triton's wheel; without it only the TTGIR facts are checked.
"""

import json
import math
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import expected_spills

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import compile_report  # noqa: E402
import traffic_model  # noqa: E402

HAS_PTXAS = compile_report._tool("ptxas-blackwell") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    plot = ["--plot", str(out / "roofline.png")] if find_spec("matplotlib") else []
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compile_report.py"), "--shapes", "small", "--arch",
         "sm_90a", "--precision", "tf32", "--json", str(out / "r.json"), "--dump",
         str(out / "dump"), "--quiet", *plot], capture_output=True, text=True, check=True,
        env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    return proc.stdout, json.loads((out / "r.json").read_text()), out / "dump"


def test_tile_epilogue_counts_from_the_k_loop_to_the_hand_off():
    """The instructions after the last K-loop up to the first atomic (a one-block program's
    distances, softmax terms, candidates and partial stores); none where a loop lies between
    them (a class loop), without an atomic, or without a K-loop."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   FMNMX R2, R24, R25, PT ;
        /*0040*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0050*/               @P1 BRA 0x70 ;
        /*0060*/                   STG.E [R4.64], R2 ;
        /*0070*/                   ATOMG.E.ADD.STRONG.GPU PT, R5, [R6.64], R7 ;
        /*0080*/                   EXIT ;
    """
    assert compile_report.tile_epilogue(sass) == 4
    looped = sass.replace("/*0060*/                   STG.E [R4.64], R2 ;",
                          "/*0060*/               @P2 BRA 0x0 ;")
    assert compile_report.tile_epilogue(looped) is None
    assert compile_report.tile_epilogue(sass.replace("ATOMG.E.ADD.STRONG.GPU", "STG.E")) is None
    assert compile_report.tile_epilogue(sass.replace("HGMMA.64x128x8.F32.TF32", "IADD3")) is None
    row = {"kernel": "k", "precision": "tf32", "shape": "s", "arch": "sm_90a", "function": "f",
           "block": {}, "num_warps": 8, "num_stages": 3, "registers": 200,
           "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 0, "ctas_per_sm": 1,
           "ctas_limit": "registers", "mma": "wgmma", "wgmma_pendings": 1, "grid": 1,
           "waves": 1, "config": 0, "model_total": False, "issue_ratio": 0.5}
    assert "| 0.50 | 2799 | – | 1 | 1 |" in compile_report.markdown(
        [{**row, "tile_epilogue": 2799}])
    assert "| 0.50 | – | – | 1 | 1 |" in compile_report.markdown([row])
    assert "| 0.50 | – | 58921 | 1 | 1 |" in compile_report.markdown(
        [{**row, "own_finish": 58921}])


#: The finish after a K-loop and its hand-off, as SASS lays it out: the merge of the groups'
#: partials (exponentials: MUFU), a re-rank pass over D (loads, no store), a gated second
#: pass, the gradient's pass (stores), the exit's trap.
FINISH_SASS = """
        /*0000*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/                   ATOMG.E.ADD.STRONG.GPU PT, R5, [R6.64], R7 ;
        /*0030*/                   LDG.E R8, [R2.64] ;
        /*0040*/                   MUFU.EX2 R9, R8 ;
        /*0050*/               @P1 BRA 0x30 ;
        /*0060*/                   LDG.E R10, [R2.64] ;
        /*0070*/                   FFMA R11, R10, R10, R11 ;
        /*0080*/               @P2 BRA 0x60 ;
        /*0090*/                   LDG.E R12, [R2.64] ;
        /*00a0*/                   FADD R13, R12, -R10 ;
        /*00b0*/                   FFMA R14, R13, R13, R14 ;
        /*00c0*/               @P3 BRA 0x90 ;
        /*00d0*/                   FMUL R15, R10, R11 ;
        /*00e0*/                   LDG.E R16, [R2.64] ;
        /*00f0*/                   STG.E [R4.64], R15 ;
        /*0100*/               @P4 BRA 0xe0 ;
        /*0110*/                   EXIT ;
        /*0120*/                   BRA 0x120 ;
    """


def test_own_finish_counts_its_loops_by_their_trips():
    """After the hand-off: the merge loop (3 instructions) once per class group, the passes
    over D (3, 4 and 3 instructions) once per D-step, the gated second pass (4) not at all
    where the re-rank is gated, the rest (the FMUL, EXIT and the trap) once; none without the
    atomic or where the loops nest."""
    plain = 3 * 8 + 3 * 64 + 4 * 64 + 3 * 64 + 3
    assert compile_report.own_finish(FINISH_SASS, 8, 64, False) == plain
    assert compile_report.own_finish(FINISH_SASS, 8, 64, True) == plain - 4 * 64
    assert compile_report.own_finish(FINISH_SASS, 1, 16, False) == 3 + 3 * 16 + 4 * 16 + 3 * 16 + 3
    assert compile_report.own_finish(FINISH_SASS.replace("ATOMG.E.ADD.STRONG.GPU", "STG.E"),
                                     8, 64, False) is None
    nested = FINISH_SASS.replace("/*0100*/               @P4 BRA 0xe0 ;",
                                 "/*0100*/               @P4 BRA 0x30 ;")
    assert compile_report.own_finish(nested, 8, 64, False) is None


#: FINISH_SASS's loops as the PTX has them, before ptxas: one load (and the gradient's store)
#: per trip.
FINISH_PTX = """
    atom.global.acq_rel.gpu.add.u32 %r1, [%rd1], 1;
$L__BB0_2:
    ld.global.cg.b32 %r2, [%rd2];
    ex2.approx.f32 %f1, %f2;
    @%p1 bra $L__BB0_2;
$L__BB0_3:
    ld.global.b32 %r3, [%rd3];
    @%p2 bra $L__BB0_3;
$L__BB0_4:
    cp.async.ca.shared.global [%r4], [%rd4], 16;
    @%p3 bra $L__BB0_4;
$L__BB0_5:
    ld.global.b32 %r5, [%rd5];
    st.global.b32 [%rd6], %r5;
    @%p4 bra $L__BB0_5;
    ret;
"""


def test_own_finish_counts_a_loop_ptxas_unrolled_by_the_trips_it_runs():
    """A SASS loop holding twice the PTX loop's loads and stores (ptxas unrolled it twice)
    runs half the trips; the PTX that agrees changes nothing; PTX whose loops do not line up
    with the SASS's is not used."""
    plain = 3 * 8 + 3 * 64 + 4 * 64 + 3 * 64 + 3
    assert compile_report.own_finish(FINISH_SASS, 8, 64, False, FINISH_PTX) == plain
    unrolled = FINISH_SASS.replace(
        "/*00f0*/                   STG.E [R4.64], R15 ;\n",
        "/*00f0*/                   STG.E [R4.64], R15 ;\n"
        "        /*00f8*/                   LDG.E R17, [R2.64] ;\n"
        "        /*00fc*/                   STG.E [R4.64], R17 ;\n")
    assert compile_report.own_finish(unrolled, 8, 64, False) == plain + 2 * 64
    assert compile_report.own_finish(unrolled, 8, 64, False, FINISH_PTX) == plain + 2 * 64 - 5 * 32
    fewer = FINISH_PTX.replace("$L__BB0_3:", "").replace("@%p2 bra $L__BB0_3;", "")
    assert compile_report.own_finish(unrolled, 8, 64, False, fewer) == plain + 2 * 64


def test_every_kernel_has_a_record_with_the_documented_keys(report):
    from grood.environment import kernel_sources

    text, records, _ = report
    # the kernels' source digest, as the GPU report's timings name it
    assert text.startswith(f"kernels {kernel_sources()} | triton ")
    assert {r["kernels"] for r in records} == {kernel_sources()}
    assert {r["kernel"] for r in records} == {"ncp_gradient", "knn"}
    assert sorted(r["function"] for r in records) == [
        "_knn_candidates_kernel", "_merge_rerank_kernel", "_ncp_gradient_kernel"]
    for r in records:
        assert set(compile_report.JSON_KEYS) <= set(r)
        assert r["arch"] == "sm_90a" and r["precision"] == "tf32"
        if r["function"] == "_merge_rerank_kernel":  # no GEMM: gathers and CUDA-core math
            assert r["mma"] == "none"
        else:
            assert r["mma"] == "wgmma"
            assert r["wgmma_pendings"] >= 1
        assert r["smem_bytes"] >= 0 and r["grid"] >= 1 and r["ctas_per_sm"] >= 1
        assert r["flops"] > 0 and r["hbm_bytes"] > 0 and r["l2_bytes"] >= r["hbm_bytes"] / 2
        # the K-loop's issue bound where the SASS has an HGMMA K-loop (sm_90a, assembled)
        issue = r["issue_ratio"] is not None
        assert set(r["bound_ms"]) == {"compute", "hbm", "l2"} | ({"issue"} if issue else set())
        assert r["binding_roof"] in r["bound_ms"]
        assert 0 < r["structure_fraction"] <= 1
        if HAS_PTXAS:
            assert 0 < r["registers"] <= 255
            spills = r["spill_store_bytes"], r["spill_load_bytes"]
            assert spills == expected_spills(r["function"], r["arch"], r["precision"]), (
                r["function"], spills)
            # ptxas kept the groups in flight: without tl.assume(D > 0) the tf32 K-loop's
            # zeroed accumulator on the no-iteration path made it serialize every wgmma.
            assert r["wgmma_serialized"] is None, r["wgmma_serialized"]
        if r["sass"] and r["mma"] == "wgmma":  # disassembled: the K-loop found, no spill
            assert r["hot_loop"]["loops"] >= 1 and r["hot_loop"]["mma"] >= 1
            assert r["hot_loop"]["LDL"] == r["hot_loop"]["STL"] == 0
            # one class block per program at these shapes: its epilogue counted
            if r["function"] == "_ncp_gradient_kernel":
                assert r["tile_epilogue"] > 0
                # its own finish, loops by their trips, and the floor of its issue time
                assert r["own_finish"] > r["tile_epilogue"] and r["finish_ms"] > 0


def test_k_loop_spills_are_told_from_spills_outside_it():
    """The report says whether spills sit in a K-loop (one L1 access per K-step), elsewhere in
    the loop over tiles that holds it (one per class block or database tile), or outside:
    loops are backward branches, K-loops the innermost with MMAs."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R4 ;
        /*0020*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0030*/                   LDL R5, [R1+0x4] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDL R6, [R1] ;
        /*0060*/                   FFMA R7, R6, R6, R7 ;
        /*0070*/              @!P1 BRA 0x60 ;
        /*0080*/                   BRA 0x10 ;
        /*0090*/                   EXIT ;
    """
    # The loop 0x10-0x80 holds the K-loop: its spills run once per tile (the K-loop's too).
    outer = {"outer_LDL": 2, "outer_STL": 1, "gsb_waits": None}  # (no wgmma waits here)
    step = {"step_instructions": 3, "step_hgmma": ["HGMMA.64x128x8.F32.TF32"]}
    assert compile_report.hot_loop(sass) == {"loops": 1, "mma": 1, "LDL": 1, "STL": 0, **outer,
                                             **step}
    fma = sass.replace("HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24", "FFMA R2, R3, R3, R2")
    # Two FFMA loops of one FFMA each: both count (each holds at least half the most).
    assert compile_report.hot_loop(fma) == {"loops": 2, "mma": 2, "LDL": 1, "STL": 0, **outer,
                                            "step_instructions": 3, "step_hgmma": []}
    # Without the outer loop, the spills before and after the K-loop run once.
    flat = sass.replace("/*0080*/                   BRA 0x10 ;", "/*0080*/ NOP ;")
    assert compile_report.hot_loop(flat) == {"loops": 1, "mma": 1, "LDL": 1, "STL": 0,
                                             "outer_LDL": 0, "outer_STL": 0, "gsb_waits": None,
                                             **step}
    assert compile_report.hot_loop("/*0000*/ EXIT ;") is None
    rec = {"spill_store_bytes": 8, "spill_load_bytes": 8,
           "hot_loop": {"STL": 0, "LDL": 1, "outer_STL": 1, "outer_LDL": 2}}
    base = {"kernel": "k", "precision": "tf32", "shape": "s", "arch": "sm_90a",
            "function": "f", "block": {}, "num_warps": 8, "num_stages": 3, "registers": 255,
            "smem_bytes": 0, "ctas_per_sm": 1, "ctas_limit": "registers", "mma": "wgmma",
            "wgmma_pendings": 1, "grid": 1, "waves": 1, "config": 0, "model_total": False}
    assert "8 / 8 B (0 / 1 in K-loop, 1 / 2 in outer loops)" in compile_report.markdown(
        [{**base, **rec}])
    rec["hot_loop"] = {"STL": 0, "LDL": 1}  # a report saved before outer loops were counted
    assert "8 / 8 B (0 / 1 in K-loop)" in compile_report.markdown([{**base, **rec}])


def test_wgmma_waits_are_read_from_the_sass_and_the_ptxas_note():
    """TTGIR's pendings are what triton asks for; ptxas may serialize every wgmma anyway (its
    note C7513 / C7515), and then the SASS waits for each (``WARPGROUP.DEPBAR.LE gsb0, 0x0``
    after every HGMMA). The report takes the SASS K-loops' waits and the note's reason."""
    def sass(wait):
        return f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x128x8.F32.TF32 R24, R100, gdesc[UR12], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;
        /*0040*/                   HGMMA.64x128x8.F32.TF32 R24, R104, gdesc[UR16], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/                   EXIT ;
    """
    # The drain after the loop (0x70) does not count.
    hot = compile_report.hot_loop(sass("0x1"))
    assert hot["gsb_waits"] == 1
    # 6 instructions a K-step against 2 x 64 x 128 x 8 tf32 multiply-adds, 1,024 a cycle.
    assert hot["step_instructions"] == 6
    assert compile_report.issue_ratio(hot) == pytest.approx(6 / 128)
    bf16 = {**hot, "step_hgmma": ["HGMMA.64x128x16.F32.BF16"] * 2}
    assert compile_report.issue_ratio(bf16) == pytest.approx(6 / 128)
    assert compile_report.issue_ratio({**hot, "step_hgmma": []}) is None
    assert compile_report.issue_ratio(None) is None
    assert compile_report.hot_loop(sass("0x0"))["gsb_waits"] == 0
    ffma = sass("0x1").replace("HGMMA.64x128x8.F32.TF32 R24, R100, gdesc[UR12], R24, gsb0",
                               "FFMA R2, R3, R3, R2").replace(
        "HGMMA.64x128x8.F32.TF32 R24, R104, gdesc[UR16], R24, gsb0", "FFMA R2, R3, R3, R2")
    assert compile_report.hot_loop(ffma.replace("WARPGROUP.DEPBAR.LE gsb0, 0x1", "NOP")
                                   )["gsb_waits"] is None
    note = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
            "are serialized due to non wgmma instructions defining accumulator registers of a "
            "wgmma between start and end of the pipeline stage in the function '_k' in line "
            "1211\nptxas info    : Used 254 registers, used 1 barriers\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    facts = compile_report.parse_ptxas(note)
    assert facts["registers"] == 254 and facts["spill_store_bytes"] == 0
    assert facts["wgmma_serialized"] == ("non wgmma instructions defining accumulator "
                                         "registers of a wgmma between start and end of the "
                                         "pipeline stage")
    assert compile_report.parse_ptxas(note.split("\n", 1)[1])["wgmma_serialized"] is None
    base = {"kernel": "k", "precision": "tf32", "shape": "s", "arch": "sm_90a",
            "function": "f", "block": {}, "num_warps": 8, "num_stages": 3, "registers": 254,
            "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 0, "ctas_per_sm": 1,
            "ctas_limit": "registers", "mma": "wgmma", "grid": 1, "waves": 1, "config": 0,
            "model_total": False}
    text = compile_report.markdown([{**base, "wgmma_pendings": 0, "wgmma_pendings_ttgir": 3,
                                     "wgmma_serialized": facts["wgmma_serialized"]}])
    assert "| 0 (serialized by ptxas; TTGIR 3) |" in text
    assert "Serialized by ptxas" in text and "accumulator registers" in text
    text = compile_report.markdown([{**base, "wgmma_pendings": 1, "wgmma_pendings_ttgir": 3,
                                     "wgmma_serialized": None}])
    assert "| 1 (TTGIR 3) |" in text and "Serialized" not in text
    # A report saved before the SASS waits were read has TTGIR's only.
    assert "| 1 |" in compile_report.markdown([{**base, "wgmma_pendings": 1}])


def test_markdown_and_dumps(report):
    text, records, dump = report
    assert "| kernel | mode | shape | arch |" in text
    assert text.count("| ncp_gradient | tf32 | small | sm_90a |") == 2  # facts and model rows
    for suffix in ("ttgir", "ptx") + (("cubin",) if HAS_PTXAS else ()):
        assert len(list(dump.glob(f"*.{suffix}"))) == len(records)
    assert "warp_group_dot" in next(dump.glob("ncp_gradient_*.ttgir")).read_text()


def test_occupancy_rule():
    # 8 warps at 168 registers: 168 * 32 rounds to 5376 per warp, 43008 per CTA -> 1 CTA.
    assert compile_report.ctas_per_sm(168, 8, 16 * 1024) == (1, "registers")
    assert compile_report.ctas_per_sm(64, 4, 100 * 1024) == (2, "shared memory")
    assert compile_report.ctas_per_sm(32, 4, 1024) == (16, "threads")


def test_pendings_ignore_the_drain_after_a_loop():
    ttgir = ("%a = ttng.warp_group_dot %x, %y, %z {isAsync = true}\n"
             "%b:2 = ttng.warp_group_dot_wait %a, %y {pendings = 1 : i32}\n"
             "%c = ttng.warp_group_dot_wait %loop#0 {pendings = 0 : i32}\n")
    assert compile_report.wgmma_pendings(ttgir) == 1


def test_search_model_bytes_by_hand():
    """knn at Q = 1000, M = 100,000, D = 256, tf32, counted by hand from the schedule."""
    from grood_kernels import knn

    launch, merge = knn.compile_launches(1000, 100_000, 256, "tf32")
    bq, bm = launch.constexprs["BLOCK_Q"], launch.constexprs["BLOCK_M"]
    group_q, n_cand = launch.constexprs["GROUP_Q"], launch.constexprs["N_CAND"]
    rows_per_split, split, n_qb = launch.args[10], launch.args[11], launch.args[12]
    assert (bq, bm, n_qb) == (128, 256, 8)
    tiles = math.ceil(rows_per_split / bm)
    programs = n_qb * split
    # Every program streams `tiles` database tiles, re-loading its query tile with each.
    l2_gemm = programs * tiles * (128 * 256 * 4 + 256 * 256 * 4)
    # HBM: the queries once (the group's tiles stay resident), the database once per group.
    groups = math.ceil(8 / group_q)
    hbm_gemm = 1000 * 256 * 4 + 100_000 * 256 * 4 * groups
    cand = programs * 128 * n_cand * 8  # each program writes its candidate list once
    m = traffic_model.model("knn", launch, (1000, 100_000, 256), "tf32", "sm_90a", 1)
    assert m["hbm_bytes"] == hbm_gemm + cand
    assert m["l2_bytes"] == l2_gemm + cand
    assert m["flops"] == 2.0 * programs * tiles * 128 * 256 * 256
    # The fused merge: reads every candidate list and the query, gathers k + 4 = 5 exact
    # rows per query, writes k = 1 result (distance fp32 + index int64).
    assert merge.fn.__name__ == "_merge_rerank_kernel"
    mm = traffic_model.model("knn", merge, (1000, 100_000, 256), "tf32", "sm_90a", 1)
    read = 1000 * split * n_cand * 8  # the real queries' lists, not the padded tile rows
    assert mm["hbm_bytes"] == read + 1000 * 256 * 4 + 1000 * 5 * 256 * 4 + 1000 * 12


def test_issue_bound_joins_the_model_with_the_k_loop_ratio():
    """A K-loop whose instructions take longer to issue than its HGMMAs take to run binds on
    issue; one under 1 adds the bound and changes nothing else; no ratio, no bound."""
    from grood_kernels import ncp_gradient

    (launch,) = ncp_gradient.compile_launches(65536, 1000, 2048, "bf16", major=9)
    dims = (65536, 1000, 2048)
    plain = traffic_model.model("ncp_gradient", launch, dims, "bf16", "sm_90a", 1)
    assert "issue" not in plain["bound_ms"]
    roof = traffic_model.ROOFS["sm_90a"]
    at_peak = plain["flops"] / (roof["mma_peak_tflops"]["bf16"] * 1e12) * 1e3
    light = traffic_model.model("ncp_gradient", launch, dims, "bf16", "sm_90a", 1,
                                issue_ratio=0.5)
    assert light["bound_ms"]["issue"] == pytest.approx(0.5 * at_peak * plain["wave_quant"],
                                                       abs=1e-4)
    assert (light["binding_roof"], light["structure_fraction"]) == (
        plain["binding_roof"], plain["structure_fraction"])
    ratio = 10 * plain["binding_ms"] / (at_peak * plain["wave_quant"])  # issue 10x the slowest
    heavy = traffic_model.model("ncp_gradient", launch, dims, "bf16", "sm_90a", 1,
                                issue_ratio=ratio)
    assert heavy["binding_roof"] == "issue"
    assert heavy["structure_fraction"] == pytest.approx(plain["structure_fraction"] / 10,
                                                        abs=1e-3)
    # sm_100a's tcgen05 K-loop has no ratio; the FMA mode has no tensor-core peak
    b200 = traffic_model.model("ncp_gradient", launch, dims, "bf16", "sm_100a", 1, issue_ratio=2)
    assert "issue" not in b200["bound_ms"]


#: The issue estimates beside the model's bounds: (the count the model takes, its estimate,
#: the programs each SM issues it for at ImageNet-1k on 132 SMs).
ESTIMATES = [("tile_epilogue", "epilogue_ms", 32),  # every program: 4,096
             ("own_finish", "finish_ms", 4)]  # the last of each row block's 8: 512


@pytest.mark.parametrize(("count", "estimate", "per_sm"), ESTIMATES, ids=["epilogue", "finish"])
def test_issue_estimates_sit_beside_the_bounds(count, estimate, per_sm):
    """The tile epilogue's and the own finish's instructions per warp, issued one per cycle on
    each of 4 schedulers over the programs an SM runs them in, at the target's clock: an
    estimate beside the bounds that moves none of them; none without a count or on sm_100a
    (no clock)."""
    from grood_kernels import ncp_gradient

    dims = (65536, 1000, 2048)
    (launch,) = ncp_gradient.compile_launches(*dims, "tf32", major=9)
    assert launch.grid == (512 * 8,) and launch.args[18] == 8
    plain = traffic_model.model("ncp_gradient", launch, dims, "tf32", "sm_90a", 1)
    timed = traffic_model.model("ncp_gradient", launch, dims, "tf32", "sm_90a", 1,
                                **{count: 2799})
    # 8 warps on 4 schedulers; 1.83 GHz
    assert timed[estimate] == pytest.approx(per_sm * 2799 * 2 / 1.83e9 * 1e3, abs=1e-4)
    assert plain[estimate] is None
    assert {k: v for k, v in timed.items() if k != estimate} == {
        k: v for k, v in plain.items() if k != estimate}
    b200 = traffic_model.model("ncp_gradient", launch, dims, "tf32", "sm_100a", 1,
                               **{count: 2799})
    assert b200[estimate] is None


def test_gradient_model_reads_h_once_at_imagenet_shape():
    from grood_kernels import ncp_gradient

    (launch,) = ncp_gradient.compile_launches(65536, 1000, 2048, "tf32")
    m = traffic_model.model("ncp_gradient", launch, (65536, 1000, 2048), "tf32", "sm_90a", 1)
    h_and_grad = 2 * 65536 * 2048 * 4
    assert h_and_grad < m["hbm_bytes"] < 1.1 * h_and_grad
    assert launch.grid[0] == 512 * launch.args[18]  # row blocks x class groups
    assert torch.empty(0, device="meta").device.type == "meta"


def test_roofline_picture_of_the_report(report, tmp_path):
    """The model's roofline is drawn from the report's records: one point per kernel launch
    and mode at the launcher's configuration, the merge once per shape."""
    pytest.importorskip("matplotlib")
    import roofline

    _, records, _ = report
    pts = roofline.points(records, "sm_90a")
    funcs = {(p["function"], p["mode"]) for p in pts}
    assert ("_ncp_gradient_kernel", "tf32") in funcs and ("_knn_candidates_kernel", "tf32") in funcs
    for p in pts:  # the point sits at the binding bound: on or under every roof
        roof = traffic_model.ROOFS["sm_90a"]
        assert p["tflops"] <= roof["hbm_tbs"] * p["intensity"] * (1 + 1e-9)
        if p["mode"]:
            assert p["tflops"] <= roof["tflops"][p["mode"]] * (1 + 1e-9)
    drawn = report[2].parent / "roofline.png"  # by compile_report.py --plot
    assert drawn.read_bytes()[:4] == b"\x89PNG"
    out = roofline.plot(records, tmp_path / "roof.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # Bounds round to 0.1 us: at tiny shapes all can be 0; the point comes from the raw bytes.
    zeroed = [{**r, "bound_ms": {k: 0.0 for k in r["bound_ms"]}} for r in records]
    assert all(0 < p["tflops"] < math.inf for p in roofline.points(zeroed, "sm_90a"))
    earlier = [{**r, "hbm_bytes": 2 * r["hbm_bytes"]} for r in records]  # arrows from these
    assert roofline.plot(records, tmp_path / "b.png", before=earlier).stat().st_size > 10_000
    with pytest.raises(ValueError, match="no records for sm_100a"):
        roofline.plot(records, tmp_path / "none.png", archs=["sm_100a"])


def test_roofline_draws_a_gpu_runs_timings_beside_the_model(report, tmp_path):
    """A GPU run's Triton timings (gpu_report --json) join the panel of their device's target,
    matched by kernel, dimensions and mode; the star sits at model flops / measured time."""
    pytest.importorskip("matplotlib")
    import roofline

    _, records, _ = report
    pts = [p for p in roofline.points(records, "sm_90a") if p["mode"]]
    timings = [{"kernel": p["kernel"], "dims": p["dims"], "precision": p["mode"],
                "backend": backend, "seconds": max(p["bound_ms"].values()) / 1e3 * 4}
               for p in pts for backend in ("triton", "torch")]
    run = {"device": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0", "triton": "3.6.0",
           "date": "2026-11-29", "interpreted": False}
    measured = {"run": run, "timings": timings}
    got = roofline.measured_points(pts, measured)
    assert len(got) == len(pts)
    for p, tflops in got:
        assert tflops == pytest.approx(p["tflops"] / 4)
    assert roofline.plot(records, tmp_path / "m.png", measured=measured).stat().st_size > 10_000
    for bad, match in (({**run, "capability": [8, 0]}, "have no model panel"),
                       ({**run, "interpreted": True}, "Triton interpreter")):
        with pytest.raises(ValueError, match=match):
            roofline.plot(records, tmp_path / "x.png", measured={"run": bad, "timings": timings})
    other = [{**t, "dims": [1, 2, 3]} for t in timings]
    with pytest.raises(ValueError, match="no Triton timing"):
        roofline.plot(records, tmp_path / "y.png", measured={"run": run, "timings": other})


def test_wgmma_a_operand_reads_where_the_mma_takes_a_from():
    """A read by the MMA from shared memory as loaded, or changed in registers first (the
    gradient step's centring or a cast between the load and tl.dot)."""
    smem = ("%d = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : "
            "!ttg.memdesc<128x32xf32, #shared> * !ttg.memdesc<32x128xf32, #shared1> -> t\n")
    regs = ("%d = ttng.warp_group_dot %a, %b, %c {isAsync = true} : tensor<128x16xf32, "
            "#ttg.dot_op<{opIdx = 0}>> * !ttg.memdesc<16x128xf32, #shared3> -> t\n")
    assert compile_report.wgmma_a_operand(smem) == "smem"
    assert compile_report.wgmma_a_operand(regs) == "registers"
    assert compile_report.wgmma_a_operand("%d = tt.dot %a, %b, %c : tensor<16x16xf32>") is None


def test_staged_gradient_step_feeds_both_operands_from_shared_memory():
    """The staged variant's K-loop takes the centred rows into the MMA as loaded (the
    launcher's centres them in registers first), with a memory-bound pre-pass before it.
    Compiled in a process without the interpreter, as the report itself runs."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import compile_report
from grood_kernels import ncp_gradient
every = ncp_gradient.compile_launches(4096, 256, 512, "tf32", configs="all")
def staged_main(launch):  # (with its finish inside: the finish-apart plans are tested below)
    return launch.fn.__name__ == "_ncp_gradient_kernel" and bool(
        launch.constexprs["STAGED"] and launch.constexprs["FINISH"])
launches = [l for i, l in enumerate(every) if staged_main(l)
            or ("BF16_ROWS" in l.constexprs and staged_main(every[i + 1]))]
records = [compile_report._record("ncp_gradient", "t", (4096, 256, 512), "tf32", "sm_90a",
                                  i, l, None) for i, l in enumerate(launches)]
print(json.dumps([{{k: r.get(k) for k in compile_report.JSON_KEYS}} for r in records]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    records = json.loads(proc.stdout)
    # the staged variants of the launcher's 128-class tile and of the 256-class wide tile
    # (not a candidate under triton 3.8, where it spills: WIDE_TILE_SPILLS_UNDER)
    from grood_kernels._ncp_candidates import wide_config

    wide = [256] if wide_config(4096, 256, 512, "tf32", 4) else []
    assert sorted(r["block"]["BLOCK_C"] for r in records[1::2]) == [128, *wide]
    for pre, main in zip(records[::2], records[1::2], strict=True):
        assert (pre["function"], main["function"]) == ("_centre_rows_kernel",
                                                       "_ncp_gradient_kernel")
        assert pre["mma"] == "none" and pre["binding_roof"] == "hbm"
        assert pre["hbm_bytes"] == 4096 * 512 * 8 + 4096 * 4
        assert main["mma"] == "wgmma" and main["wgmma_a"] == "smem"
        assert main["wgmma_pendings"] >= 1
        if HAS_PTXAS:
            assert main["spill_store_bytes"] == 0


def test_split_gradient_step_reports_its_epilogue():
    """The split variant's Triton part (pre-pass, then the epilogue over the BLAS's results)
    compiles without spills and is modelled as memory-bound;
    its GEMM runs in torch and is not among the compiled launches."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import compile_report
from grood_kernels import ncp_gradient
every = ncp_gradient.compile_launches(4096, 256, 512, "tf32", configs="all")
i = [l.fn.__name__ for l in every].index("_ncp_epilogue_kernel")
records = [compile_report._record("ncp_gradient", "t", (4096, 256, 512), "tf32", "sm_90a",
                                  j, every[j], None) for j in (i - 1, i)]
print(json.dumps([{{k: r.get(k) for k in compile_report.JSON_KEYS}} for r in records]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    pre, epi = json.loads(proc.stdout)
    assert pre["function"] == "_centre_rows_kernel"
    assert epi["mma"] == "none" and epi["binding_roof"] == "hbm"
    assert "GEMM runs in the BLAS" in epi["model_notes"]
    # the GEMM's results read once, the centred rows read twice and written once
    assert epi["hbm_bytes"] >= 4096 * 256 * 4 + 3 * 4096 * 512 * 4
    if HAS_PTXAS:
        spills = epi["spill_store_bytes"], epi["spill_load_bytes"]
        assert spills == expected_spills("_ncp_epilogue_kernel"), spills
        assert pre["spill_store_bytes"] == pre["spill_load_bytes"] == 0


def test_finish_apart_compiles_spill_free_and_reads_h_from_hbm_once():
    """The finish as a launch of its own (an autotuning candidate) after the class-group
    kernel with ``FINISH=0``: at ImageNet-1k in tf32 the kernel writes partials only, the
    finish compiles without spills for sm_90a and is modelled memory-bound, its grid keeping
    the row tiles in L2 (h from HBM once in each launch, the gradient written once)."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import compile_report
from grood_kernels import ncp_gradient
dims = (65536, 1000, 2048)
every = ncp_gradient.compile_launches(*dims, "tf32", configs="all", major=9)
i = [l.fn.__name__ for l in every].index("_ncp_finish_kernel")
records = [compile_report._record("ncp_gradient", "t", dims, "tf32", "sm_90a", j, every[j],
                                  None) for j in (i - 1, i)]
print(json.dumps([{{k: r.get(k) for k in compile_report.JSON_KEYS}} for r in records]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    main, fin = json.loads(proc.stdout)
    assert main["function"] == "_ncp_gradient_kernel" and main["mma"] == "wgmma"
    assert "partials only" in main["model_notes"]
    n, d, groups = 65536, 2048, main["grid"] // 512
    h, partials = n * d * 4, groups * n * 40
    assert main["hbm_bytes"] < 1.05 * (h + partials)  # h once, the prototypes, the partials
    assert fin["function"] == "_ncp_finish_kernel" and fin["mma"] == "none"
    assert fin["binding_roof"] == "hbm" and "re-read from L2" in fin["model_notes"]
    # partials and h read once, the gradient written once (the prototypes stay in L2)
    assert 2 * h < fin["hbm_bytes"] < 2.05 * h + partials
    if HAS_PTXAS:
        assert fin["spill_store_bytes"] == fin["spill_load_bytes"] == 0
        assert main["spill_store_bytes"] == 0 and main["wgmma_pendings"] >= 1


def test_lean_own_finish_compiles_spill_free_with_its_loads_up_to_two_steps_ahead():
    """The launcher's class-group kernel at ImageNet-1k in tf32 (its own finish lean), and
    the same with the finish's loops 3 stages deep (the configurations table's row): for
    sm_90a no spills, one CTA per SM, a wgmma group in flight, the finish counted, the deeper
    prefetch within the 227 KB of shared memory a Hopper block may take."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import compile_report
from grood_kernels import ncp_gradient
dims = (65536, 1000, 2048)
(launch,) = ncp_gradient.compile_launches(*dims, "tf32", major=9)
deep = launch._replace(constexprs={{**launch.constexprs, "FINISH": 3}})
records = [compile_report._record("ncp_gradient", "t", dims, "tf32", "sm_90a", 0, x, None)
           for x in (launch, deep)]
print(json.dumps([{{k: r.get(k) for k in compile_report.JSON_KEYS}} for r in records]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    lean, deep = json.loads(proc.stdout)
    for r in (lean, deep):
        assert r["function"] == "_ncp_gradient_kernel" and r["mma"] == "wgmma"
        assert r["smem_bytes"] <= 227 * 1024
        if HAS_PTXAS:
            assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0
            assert r["ctas_per_sm"] == 1 and r["wgmma_pendings"] >= 1
            assert r["own_finish"] > 0 and r["finish_ms"] > 0
    assert deep["smem_bytes"] > lean["smem_bytes"]  # a second step's loads in flight


def test_exact_kernel_compiles_spill_free_its_d_step_mostly_fma():
    """The launcher's kernel at CIFAR-10 on a GPU (no GEMM: every class by fp32 differences)
    compiles for sm_90a without spills, four programs per SM, no MMA; its D-step issues at
    most 1.6x the 128 FMA-pipe instructions per thread it needs (a difference and a fused
    multiply-add for each of 32 rows x 16 classes x 16 columns over 128 threads); modelled
    HBM-bound (``h`` read, the gradient written), with no candidate, re-rank or finish."""
    script = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import compile_report
from grood_kernels import ncp_gradient
dims = (65536, 10, 512)
(launch,) = ncp_gradient.compile_launches(*dims, "tf32", major=9)
r = compile_report._record("ncp_gradient", "t", dims, "tf32", "sm_90a", 0, launch, None)
print(json.dumps({{k: r.get(k) for k in compile_report.JSON_KEYS}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    r = json.loads(proc.stdout)
    assert r["function"] == "_ncp_exact_kernel" and r["mma"] == "none"
    assert r["binding_roof"] == "hbm" and "no GEMM" in r["model_notes"]
    n, d = 65536, 512
    assert 2 * n * d * 4 < r["hbm_bytes"] < 3.05 * n * d * 4  # h (once or twice), the gradient
    assert r["own_finish"] is None and r["tile_epilogue"] is None
    if HAS_PTXAS:
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0
        assert r["ctas_per_sm"] == 4
        assert 128 <= r["hot_loop"]["step_instructions"] <= 204  # 3.9: 184, 3.6: 194


def test_other_gpus_walks_the_shared_memory_fallback():
    """bench/other_gpus.py compiles a launch for a smaller GPU and reports the pipelining
    stages it falls back to (the tf32 gradient step's 4-stage tile does not fit sm_86's 99 KB
    per block, 3 stages do); on sm_90 the same launch fits as configured (no row). Compiled
    in a fresh process without the interpreter."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import other_gpus\n"
        "from grood_kernels import ncp_gradient\n"
        "launch = ncp_gradient.compile_launches(65536, 1000, 2048, 'tf32')[0]\n"
        "other_gpus.launches = lambda quick, cc: iter([('ncp_gradient', 'ImageNet-1k', 'tf32',"
        " launch)])\n"
        "print(json.dumps([other_gpus.check(86, True), other_gpus.check(90, True)]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True,
                         text=True, check=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"}).stdout
    (rows86, count86), (rows90, count90) = json.loads(out.strip().splitlines()[-1])
    assert count86 == count90 == 1 and len(rows86) == 1 and rows90 == []
    assert "| sm_86 | ncp_gradient" in rows86[0] and "fits at 3 stages" in rows86[0]
    assert "mma.sync" in rows86[0]


def test_candidates_report_measures_what_each_count_buys(tmp_path):
    """bench/candidates.py: TF32 operands keep 10 mantissa bits (rounded to nearest, ties
    away from zero, as the kernels round them; ``tf32-truncated`` as the MMA reads unrounded
    fp32), tf32x3's split another 10 (truncated), bf16 rounds to nearest; near-tie rows are
    equally far (to 1e-5) from 2-4 prototypes, the first nearest; with as many candidates as
    the widest tie no prediction changes, with one some do, and the gate of the kernels gets
    every one right re-ranking only the tied; the HBM model's bytes grow with the rows
    gathered, from 1.17x (one, the gate shut) to 1.67x (all four; tf32, C = 21,841); the
    fine-grained classes' gate table is in the report."""
    import candidates

    x = torch.tensor([1 + 2 ** -10 + 2 ** -12, -3.0, 1 + 2 ** -7 + 2 ** -8 + 2 ** -12,
                      -(1 + 2 ** -11), 1 + 2 ** -11 + 2 ** -12])
    assert candidates.rounded(x, "tf32").tolist() == [
        1 + 2 ** -10, -3.0, 1 + 2 ** -7 + 2 ** -8, -(1 + 2 ** -10), 1 + 2 ** -10]
    assert candidates.rounded(x, "tf32-truncated").tolist() == [
        1 + 2 ** -10, -3.0, 1 + 2 ** -7 + 2 ** -8, -1.0, 1.0]
    assert candidates.rounded(x[:3], "bf16").tolist() == [1.0, -3.0, 1 + 2 ** -6]
    assert candidates.OPERAND_ERROR["tf32"] == 2 ** -11
    # tf32x3: hi truncated to TF32, the rest in lo, itself truncated to TF32 by the MMA
    hi, lo = candidates.split_tf32(torch.tensor([1 + 2 ** -10 + 2 ** -12, 1 + 2 ** -12 + 2 ** -23]))
    assert hi.tolist() == [1 + 2 ** -10, 1.0] and lo.tolist() == [2 ** -12, 2 ** -12]
    gen = torch.Generator().manual_seed(0)
    protos = torch.relu(torch.randn(40, 24, generator=gen)) + 1
    tied, groups = candidates.near_ties(60, protos, seed=1)
    for row, group in zip(tied.double(), groups, strict=True):
        d = (row - protos[group].double()).norm(dim=1)
        assert len(group) in (2, 3, 4) and int(d.argmin()) == 0
        assert float(d.max() - d.min()) < 3e-5 * float(d.min())  # (the float32 rows' error)
    nearest = torch.cdist(tied.double(), protos.double()).argmin(1)
    keep = nearest == torch.stack([g[0] for g in groups])  # no other prototype nearer
    tied = tied[keep]
    u, centred = tied - protos.mean(0), protos - protos.mean(0)
    ref_pred = torch.cdist(u.double(), centred.double()).argmin(1)
    gemm = candidates.emulated_distances(u, centred, "bf16")
    _, _, one = candidates.step(u, centred, gemm, 1)
    _, _, four = candidates.step(u, centred, gemm, 4)
    assert torch.equal(four, ref_pred) and not torch.equal(one, ref_pred)
    bound = candidates.gemm_error_bound(u, centred, "bf16")
    _, _, gated, gathered = candidates.gated_step(u, centred, gemm, bound, always=1)
    assert torch.equal(gated, ref_pred) and 1 < float(gathered.double().mean()) <= 4
    text = candidates.hbm_table((65536, 21841, 1024))
    tf32 = next(line for line in text if line.startswith("| tf32 |")).split(" | ")
    assert "(1.17x)" in tf32[1] and "(1.34x)" in tf32[2] and "(1.67x)" in tf32[4]
    out = tmp_path / "c.md"
    assert candidates.main(["--tiny", "--out", str(out)]) == 0
    assert "Near ties" in out.read_text() and "Gate on fine-grained classes" in out.read_text()


def test_search_model_charges_the_bf16_copy_before_the_kernel():
    """bf16 mode on an fp32 database with many queries searches a bf16 copy: the model adds
    the copy's pass (fp32 read, bf16 written) to the HBM bytes and its time to every bound,
    against the same launch modelled as bf16 storage (no copy)."""
    from grood_kernels import knn

    launch, _ = knn.compile_launches(4096, 100_000, 256, "bf16")
    assert launch.args[1].dtype == torch.bfloat16
    dims = (4096, 100_000, 256)
    copied = traffic_model.model("knn", launch, dims, "bf16", "sm_90a", 1)
    stored = traffic_model.model("knn", launch, dims, "bf16-storage", "sm_90a", 1)
    cast = 100_000 * 256 * 6
    assert copied["hbm_bytes"] == stored["hbm_bytes"] + cast
    before = cast / (traffic_model.ROOFS["sm_90a"]["hbm_tbs"] * 1e12) * 1e3
    for roof in ("compute", "hbm", "l2"):
        assert copied["bound_ms"][roof] == pytest.approx(stored["bound_ms"][roof] + before,
                                                         abs=1e-4)
    assert "rows cast to bf16 first" in copied["model_notes"]
    issue = traffic_model.with_issue_bound(copied, 0.5, "bf16", "sm_90a")
    plain = traffic_model.with_issue_bound(stored, 0.5, "bf16", "sm_90a")
    assert issue["bound_ms"]["issue"] == pytest.approx(plain["bound_ms"]["issue"] + before,
                                                       abs=1e-4)
