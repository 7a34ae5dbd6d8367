#!/usr/bin/env bash
# One prepared call for a GPU machine: the kernel and custom-op/head tests with compiled Triton (not the
# interpreter), then the full report (bench/gpu_report.py), written to $OUT/gpu_report.md,
# with its timings as JSON in $OUT/gpu_report.json and drawn beside the compile report's model
# in $OUT/roofline_measured.png (bench/roofline.py, where matplotlib imports), then the whole
# ImageNet-1k fit + score pipeline (bench/pipeline.py) in tf32 and with bf16 index storage,
# written to $OUT/pipeline.md, and last (so a run cut short loses only it) the gradient step's
# launch configurations side by side in $OUT/gpu_configs.md (the launcher's choice against
# every autotuning candidate, tf32, CIFAR-10/100 and ImageNet-1k shapes).
#
# The lent machines' image has everything grood needs except faiss: carry faiss-cpu's wheel
# (as the device README describes, on PYTHONPATH) for the report's faiss row; without it the
# report says faiss is not installed. REPEAT sets the timed runs per entry (default 3). Each
# step's start time (seconds since the script began) goes to $OUT/gpu_check_steps.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import sys

import torch
import triton

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device")
print(f"torch {torch.__version__} | triton {triton.__version__} | {torch.cuda.get_device_name()}")
PY
step() { echo "[gpu_check] ${SECONDS}s: $*" | tee -a "${OUT:-.}/gpu_check_steps.log"; }  # for the budget
step "kernel, custom-op and head tests (compiled Triton)"
# Compiling the kernels' variants dominates this step: with pytest-xdist (on the lent machines'
# image) 8 processes compile side by side.
parallel=()
if python -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
torch_capture="tests/test_library.py::test_flag_head_captures_in_a_cuda_graph[torch]"
python -m pytest -q -x -p no:cacheprovider "${parallel[@]}" tests/test_kernel_ncp_gradient.py \
    tests/test_library.py tests/test_kernel_knn.py --deselect "$torch_capture"
# The torch path on the device (sync-free candidate picking in both ops, the head captured in a
# CUDA graph on the torch backend); a failure here is reported, not fatal, so the timings below
# are still taken.
python -m pytest -q -p no:cacheprovider -m gpu tests/test_functional.py "$torch_capture" \
    || echo "[gpu_check] torch-path GPU tests failed (see above)"
step "report"
python bench/gpu_report.py --repeat "${REPEAT:-3}" --json "${OUT:-.}/gpu_report.json" \
    | tee "${OUT:-.}/gpu_report.md"
# The timings beside the compile report's model (needs matplotlib; otherwise draw it later with
# the same command from the returned gpu_report.json).
python bench/roofline.py bench/compile_report.json "${OUT:-.}/roofline_measured.png" \
    --measured "${OUT:-.}/gpu_report.json" || echo "[gpu_check] roofline not drawn (see above)"
step "pipeline, tf32"
python bench/pipeline.py --precision tf32 --quiet | tee "${OUT:-.}/pipeline.md"
step "pipeline, bf16 with bf16 index storage"
python bench/pipeline.py --precision bf16 --index-storage bfloat16 --quiet \
    | tee -a "${OUT:-.}/pipeline.md"
step "gradient-step launch configurations (tf32: the launcher's and each autotuning candidate)"
python bench/gpu_report.py --only configs --repeat "${REPEAT:-3}" | tee "${OUT:-.}/gpu_configs.md"
step "done"
