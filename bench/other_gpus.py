"""Do grood's kernels build and fit on GPUs other than the H100 / H200? No GPU needed.

The launch configurations are sized for sm_90 (227 KB of shared memory per block). For each
target GPU this compiles every launch the launchers make at the report's shapes (gradient
step: CIFAR-10/100, ImageNet-1k, C = 21,841; search: 10,000 queries over the ImageNet-1k
training set) in every precision mode, with ``triton.compile`` for that compute capability,
and walks the launcher's fallback (``grood_kernels._launch.run``: fewer pipelining stages
while the block's shared memory exceeds the device's) to the stages that fit. One row per
launch that needs the fallback or fails; the rest fit as configured.

    python bench/other_gpus.py                   # sm_75, sm_80, sm_86, sm_89
    python bench/other_gpus.py --cc 86 --quick   # one target, the ImageNet-1k shapes only
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_report import mma_kind, triton_compile

#: Shared memory per block (opt-in maximum, bytes) by compute capability, with an example GPU.
TARGETS = {70: (98304, "V100"), 75: (65536, "T4"), 80: (166912, "A100"),
           86: (101376, "A10 / RTX 30"), 89: (101376, "L4 / L40S / RTX 40"),
           90: (232448, "H100 / H200")}
NCP_SHAPES = [("CIFAR-10", 65536, 10, 512), ("CIFAR-100", 65536, 100, 512),
              ("ImageNet-1k", 65536, 1000, 2048), ("C=21841", 65536, 21841, 1024)]
KNN_SHAPES = [("ImageNet-1k", 10000, 1281167, 2048)]
STORAGES = {"": None, "bf16-storage": torch.bfloat16, "fp16-storage": torch.float16}


def compiled(launch, cc: int, stages: int) -> tuple[int, str]:
    """(shared memory bytes, MMA kind) of ``launch`` compiled for ``cc`` with ``stages``."""
    out = triton_compile(launch._replace(num_stages=stages), cc)
    return int(out.metadata.shared), mma_kind(out.asm["ttgir"])


def launches(quick: bool, cc: int):
    """(kernel, shape, mode, launch) for every launch the launchers make at the shapes on a
    GPU of compute capability ``cc`` (e.g. 89)."""
    from grood_kernels import knn, ncp_gradient

    ncp = [s for s in NCP_SHAPES if s[0] == "ImageNet-1k"] if quick else NCP_SHAPES
    for precision in ("ieee", "tf32", "tf32x3", "bf16"):
        for label, n, c, d in ncp:
            for launch in ncp_gradient.compile_launches(n, c, d, precision, major=cc // 10):
                yield "ncp_gradient", label, precision, launch
        for label, q, m, d in KNN_SHAPES:
            for name, storage in STORAGES.items():
                mode = f"{precision} {name}".strip()
                for launch in knn.compile_launches(q, m, d, precision, storage=storage,
                                                   major=cc // 10):
                    yield "knn", label, mode, launch


def check(cc: int, quick: bool) -> tuple[list[str], int]:
    """Table rows for target ``cc`` (launches that fall back or fail) and the launch count."""
    limit, _ = TARGETS[cc]
    rows, count = [], 0
    for kernel, label, mode, launch in launches(quick, cc):
        count += 1
        name = launch.fn.__name__
        stages = launch.num_stages
        try:
            smem, kind = compiled(launch, cc, stages)
            trail = [f"{stages}: {smem:,}"]
            while smem > limit and stages > 1:
                stages -= 1
                smem, kind = compiled(launch, cc, stages)
                trail.append(f"{stages}: {smem:,}")
        except Exception as err:  # a failed build is what this reports
            rows.append(f"| sm_{cc} | {kernel} ({name}) | {label} | {mode} | – | "
                        f"FAILS to build: {type(err).__name__} |")
            continue
        if len(trail) > 1 or smem > limit:
            verdict = f"fits at {stages} stages" if smem <= limit else "DOES NOT FIT"
            rows.append(f"| sm_{cc} | {kernel} ({name}) | {label} | {mode} | {kind} | "
                        f"{' → '.join(trail)} ({verdict}) |")
    return rows, count


def main() -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, action="append", choices=sorted(TARGETS),
                        help="compute capability to check (repeatable; default 75 80 86 89)")
    parser.add_argument("--quick", action="store_true",
                        help="the ImageNet-1k gradient-step shape only")
    args = parser.parse_args()
    ccs = args.cc or [75, 80, 86, 89]
    print(f"triton {triton.__version__} | torch {torch.__version__} | "
          f"{date.today().isoformat()} | no GPU: compiled for each target\n")
    print("| target | kernel | shape | mode | MMA | stages: shared memory bytes |")
    print("|---|---|---|---|---|---|")
    summary = []
    for cc in ccs:
        rows, count = check(cc, args.quick)
        for row in rows:
            print(row)
        limit, example = TARGETS[cc]
        failed = sum("FAILS" in r or "DOES NOT FIT" in r for r in rows)
        summary.append(f"sm_{cc} ({example}, {limit:,} B per block): {count} launches, "
                       f"{len(rows) - failed} fall back to fewer stages, {failed} fail")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
