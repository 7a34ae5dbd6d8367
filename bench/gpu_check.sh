#!/usr/bin/env bash
# One prepared call for a GPU machine. Its steps, in their default order: the kernel and
# custom-op/head tests with compiled Triton (not the interpreter); the tuning tables' kernels
# compiled in WARM_JOBS processes side by side (default 12; triton's cache keeps them for the
# steps after it, whose tables then time without compiling one kernel after another); the
# report's gradient step and head into $OUT/gpu_report.md, its timings as JSON in
# $OUT/gpu_report.json, drawn beside the compile report's model in
# $OUT/roofline_measured.png (bench/roofline.py, where matplotlib imports); the gradient
# step's launch configurations side by side in $OUT/gpu_configs.md (the launcher's choice
# against every autotuning candidate, the wide tile, the staged variant and the finish
# launched apart included, and at CIFAR-10 the kernel without a GEMM against the GEMM
# kernels' configuration; ieee, tf32, bf16; ImageNet-1k, CIFAR-10/100 shapes); the device's
# L2 and HBM read bandwidth (the compile report's model assumes the first) and the gradient
# step taken apart (its stages timed apart, bench/gpu_report.py --only anatomy) into
# $OUT/gpu_anatomy.md, and after it the torch backend's step operator by operator
# (--only torch-path); the search's timings
# into $OUT/gpu_search.md, and after them the search at k up to 1,000 (--only search-k: KNN's
# sweeps, GROOD at a large k; torch and Triton, ieee and tf32); the torch path's GPU tests; the whole ImageNet-1k fit + score
# pipeline (bench/pipeline.py) in tf32, then with bf16 index storage, into $OUT/pipeline.md.
# Eight files in all with a log of the whole call (the device tool's limit).
# STEPS picks some of the steps and their order (names: tests warm torch-tests anatomy
# torch-path configs report roofline search search-k pipeline pipeline-bf16), e.g. STEPS="warm anatomy
# configs" for a short second call; by default all of them, the issue's own numbers (tests,
# report) first.
#
# Every step has its own time limit and a failing step does not stop the ones after it (its
# status is printed and logged), so one call always ends inside BUDGET seconds (default 560)
# with whatever the steps produced. The lent machines' image has everything grood needs
# except faiss: carry faiss-cpu's wheel (as the device README describes, on PYTHONPATH) for the
# report's faiss row; without it the report says faiss is not installed. REPEAT sets the timed
# runs per entry (default 3); CONFIGS_MATCH (a regular expression) limits the configs step to
# the launcher's row and the rows whose label it matches, e.g. CONFIGS_MATCH="finish apart".
# Each step's start time and end status (seconds since the script began) are printed with a
# "[gpu_check]" prefix.
#
#   TINY=1 bash bench/gpu_check.sh    # the same steps at tiny sizes on the CPU (interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export CONFIGS_MATCH="${CONFIGS_MATCH:-}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget="${BUDGET:-560}"
if [[ "${TINY:-0}" == 1 ]]; then
    export TRITON_INTERPRET=1
    size=(--tiny --device cpu) pipe=(--scale 0.0001 --classes 10 --dim 32 --device cpu)
else
    export TRITON_INTERPRET=0
    size=() pipe=()
    python - <<'PY' || exit 1
import sys

import torch
import triton

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device (TINY=1 runs it on the CPU at tiny sizes)")
from grood.environment import kernel_sources

print(f"kernels {kernel_sources()} | torch {torch.__version__} | triton {triton.__version__} | "
      f"{torch.cuda.get_device_name()}")
PY
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total \
        --format=csv 2>/dev/null || true
fi
# What this call runs with (versions, packages, each device's backends), for the log.
python -m grood env || true
log() { echo "[gpu_check] ${SECONDS}s: $*"; }
# step LIMIT NAME COMMAND: run the shell COMMAND for at most LIMIT seconds (less where the
# budget has less left), killing its whole process group at the limit
step() {
    local limit=$1 name=$2 cmd=$3
    local left=$((budget - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then log "skipped (budget spent): $name"; return; fi
    log "start (limit ${limit}s): $name"
    timeout --kill-after=5 "$limit" bash -o pipefail -c "$cmd"
    local rc=$?
    case $rc in
        0) log "done: $name" ;;
        124 | 137) log "TIMED OUT after ${limit}s: $name" ;;
        *) log "FAILED (exit $rc): $name" ;;
    esac
}

# Compiling the kernels' variants dominates the tests: with pytest-xdist (on the lent machines'
# image) 12 processes compile side by side on its 16 cores (on the H200 machine 8 took 94 s on
# 2026-11-29; 12 took 172 s on 2026-12-04, with the variants' tests at every shape: hence 220 s);
# the compiled kernels stay in triton's cache for the report after them.
parallel=()
if [[ "${TINY:-0}" != 1 ]] && python -c "import xdist" 2>/dev/null; then parallel=(-n 12); fi
torch_capture="tests/test_library.py::test_flag_head_captures_in_a_cuda_graph[torch]"
# The steps, run in the order STEPS names them (default below: what the gradient-step issue
# is judged by first, since a lease's 15 minutes, its start included, fit about one full call).
steps="${STEPS:-tests warm report roofline configs anatomy torch-path search search-k \
torch-tests pipeline pipeline-bf16}"
# The warm step's processes (each compiles every WARM_JOBS-th entry of the configurations'
# and stages' tables, at their shapes, which are the report's too; 2 on the CPU).
warm_jobs="${WARM_JOBS:-12}"
[[ "${TINY:-0}" == 1 ]] && warm_jobs=2
# The timings beside the compile report's model (needs matplotlib; otherwise draw it later with
# the same command from the returned gpu_report.json).
roofline=(python bench/roofline.py bench/compile_report.json "$out/roofline_measured.png"
          --measured "$out/gpu_report.json")
pipeline="python bench/pipeline.py ${pipe[*]} --quiet"
run_step() {
    case $1 in
    tests) step 220 "kernel, custom-op and head tests (compiled Triton)" \
        "python -m pytest -q --maxfail=10 -p no:cacheprovider ${parallel[*]} \
        tests/test_kernel_ncp_gradient.py tests/test_library.py tests/test_kernel_knn.py \
        --deselect '$torch_capture'" ;;
    # The torch path on the device (sync-free candidate picking in both ops, the head captured
    # in a CUDA graph on the torch backend; a one-rank NCCL group's collectives).
    torch-tests) step 60 "torch-path GPU tests" \
        "python -m pytest -q -p no:cacheprovider -m gpu tests/test_functional.py '$torch_capture' \
        tests/test_detector.py tests/test_distributed.py tests/test_neighbours.py \
        tests/test_portable.py" ;;
    # On the H200 (2026-12-04) the configs step reached CIFAR-10 in 170 s, nearly all of it
    # compiling one configuration after the other on one core; the warm step compiles them
    # on WARM_JOBS cores at once (each process runs a shard of the tables once, untimed).
    warm) step 150 "compile the tuning tables' kernels (${warm_jobs} processes side by side)" \
        "python bench/gpu_report.py ${size[*]} --only configs --only anatomy --warm $warm_jobs \
        ${CONFIGS_MATCH:+--configs-match \"\$CONFIGS_MATCH\"}" ;;
    # Where the gradient step's time goes (the K-loop alone, without the finish, the pre-pass,
    # the torch GEMM), then the launcher's tiles against every autotuning candidate (the wide
    # tile and the staged variant included).
    anatomy) step 110 "gradient step taken apart (stages timed apart)" \
        "python bench/gpu_report.py ${size[*]} --only anatomy --repeat ${REPEAT:-3} \
        | tee '$out/gpu_anatomy.md'" ;;
    # The torch backend (what auto runs without the kernels) operator by operator: on the H200
    # it took 5.7x the plain closed form's time at ImageNet-1k in tf32 (2026-12-04).
    torch-path) step 40 "torch backend's gradient step, operator by operator" \
        "python bench/gpu_report.py ${size[*]} --only torch-path --repeat ${REPEAT:-3} \
        | tee -a '$out/gpu_anatomy.md'" ;;
    configs) step 300 "gradient-step launch configurations (the launcher's and each candidate)" \
        "python bench/gpu_report.py ${size[*]} --only configs --repeat ${REPEAT:-3} \
        ${CONFIGS_MATCH:+--configs-match \"\$CONFIGS_MATCH\"} | tee '$out/gpu_configs.md'" ;;
    report) step 200 "report: accuracy and timings of the gradient step, the head in compiled programs" \
        "python bench/gpu_report.py ${size[*]} --only gradient --only head --repeat ${REPEAT:-3} \
        --json '$out/gpu_report.json' | tee '$out/gpu_report.md'" ;;
    roofline)
        if ! python -c "import matplotlib" 2>/dev/null; then
            log "skipped (matplotlib not installed): roofline picture; draw it from the returned JSON"
            log "    with: $(printf '%q ' "${roofline[@]}")"
        elif [[ ! -s "$out/gpu_report.json" ]]; then
            log "skipped (no gpu_report.json: run the report step first): roofline picture"
        elif ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
            log "skipped (no GPU: the model has no panel for the interpreter's timings): roofline picture"
        else
            step 30 "roofline picture" "$(printf '%q ' "${roofline[@]}")"
        fi ;;
    # The search's rows print as they are measured, so a run cut short keeps the finished ones.
    search) step 150 "report: nearest-neighbour search" \
        "python bench/gpu_report.py ${size[*]} --only search --repeat ${REPEAT:-3} \
        | tee '$out/gpu_search.md'" ;;
    # The search for many neighbours (k = 1 to 1,000), each backend and precision against its
    # own k = 1: on the CPU k = 1,000 took 5.3x the GEMM (2026-12-05).
    search-k) step 90 "report: nearest-neighbour search at k up to 1,000" \
        "python bench/gpu_report.py ${size[*]} --only search-k --repeat ${REPEAT:-3} \
        | tee -a '$out/gpu_search.md'" ;;
    pipeline) step 70 "pipeline, tf32" "$pipeline --precision tf32 | tee -a '$out/pipeline.md'" ;;
    pipeline-bf16) step 70 "pipeline, bf16 with bf16 index storage" \
        "$pipeline --precision bf16 --index-storage bfloat16 | tee -a '$out/pipeline.md'" ;;
    *) log "unknown step: $1 (steps: tests warm torch-tests anatomy torch-path configs report" \
           "roofline search search-k pipeline pipeline-bf16)" ;;
    esac
}
for name in $steps; do run_step "$name"; done
log "end"
