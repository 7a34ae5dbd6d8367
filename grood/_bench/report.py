"""``grood bench`` (also ``bench/gpu_report.py``): check the kernels on the device, then time them.

Order of work: (1) correctness of the Triton kernels against float64 on realistic features
(non-negative, clustered like a ResNet's post-ReLU penultimate layer), in every precision mode;
(2) tables of timings against plain torch in the same precision, the per-sample autograd
reference and faiss, every number from the same run on the same device. Compilation is
excluded (warm-up runs) and the device is synchronised around every timed call. See
:mod:`grood._bench.gradient` and :mod:`grood._bench.search` for the columns.

This package is imported only when ``grood bench`` runs; the library never imports it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from datetime import date

import torch

from grood import __version__
from grood._bench.gradient import (
    FULL_SHAPES,
    TINY_SHAPES,
    accuracy_table,
    clustered_table,
    hard_softmax_table,
    timing_table,
)
from grood._bench.search import search_accuracy_table, search_k_table, search_timing_table
from grood._checks import bench_device_arg, positive_int_arg
from grood.environment import kernel_sources
from grood.persistence import written_atomically


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options (shared by ``grood bench`` and ``bench/gpu_report.py``)."""
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, to check the script itself (e.g. on the CPU)")
    parser.add_argument("--repeat", type=positive_int_arg, default=5,
                        help="timed runs per entry; the median is reported (default: 5)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], type=bench_device_arg,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the timing tables")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the kernel timings, with the device and versions, as "
                             "JSON (bench/roofline.py draws them beside the compile report's "
                             "model)")
    parser.add_argument("--only", choices=SECTIONS, action="append", default=None,
                        help="run these parts, in the report's order (repeatable): the "
                             "gradient step, the GROOD head in a compiled program, the "
                             "nearest-neighbour search, or (only when asked) the gradient "
                             "step's launch configurations side by side, its stages timed "
                             "apart, the torch backend's step operator by operator, and the "
                             "search at k up to 1,000")
    parser.add_argument("--configs-match", default=None, metavar="REGEX", type=_regex_arg,
                        help="in the launch configurations' table, time only the rows whose "
                             "label matches this regular expression, e.g. 'finish apart' "
                             "(the launcher's own row always runs first, as the reference "
                             "the others are compared with)")
    parser.add_argument("--warm", default=None, metavar="N", type=positive_int_arg,
                        help="only compile: run the asked tuning tables (--only configs, "
                             "--only anatomy; both by default) once in N processes side by "
                             "side, each a --shard of them, and print no table, so that the "
                             "tables run after it find their kernels in triton's cache")
    parser.add_argument("--shard", default=None, metavar="K/N", type=_shard_arg,
                        help="in the launch configurations' and the stages' tables, run only "
                             "every N-th entry from the K-th (0 <= K < N): N processes, one "
                             "per K, compile the tables' kernels side by side into triton's "
                             "cache, so a run of the whole tables after them times without "
                             "compiling (bench/gpu_check.sh's warm step)")


def _shard_arg(text: str) -> tuple[int, int]:
    """``--shard K/N``: ``(K, N)`` with 0 <= K < N, refused with argparse's message
    otherwise."""
    k, _, n = text.partition("/")
    try:
        shard = int(k), int(n)
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, e.g. 0/4; got {text!r}")
    return shard


def _regex_arg(text: str) -> re.Pattern:
    """``--configs-match``: a regular expression, refused with argparse's message if it
    does not compile."""
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression ({exc}): {text!r}") from None


#: The report's parts, in the order they run; all but the tuning ones by default.
SECTIONS = ("gradient", "head", "search", "configs", "anatomy", "torch-path", "search-k")
#: Parts run only when asked for (``--only``): measurements for tuning the kernels (and the
#: torch backend's operators, and the search for many neighbours).
TUNING_SECTIONS = ("configs", "anatomy", "torch-path", "search-k")
#: The tuning parts ``--warm`` compiles.
WARM_SECTIONS = ("configs", "anatomy")


def _emit(lines) -> None:
    """Print a table's lines as they come (a long table cut short keeps its finished rows)."""
    for line in lines:
        print(line, flush=True)


def warm(args: argparse.Namespace) -> int:
    """``--warm N``: the asked tuning tables (configs, anatomy) run once in N processes of
    ``python -m grood bench``, the k-th with ``--shard k/N --repeat 1``, side by side, so
    their kernels compile on N CPU cores into triton's cache at once instead of one after
    another while the tables run; the processes' output is dropped, and each one's exit
    status and time are printed (with the end of its output where it failed). Returns the
    number of processes that failed."""
    import subprocess
    import tempfile
    import time

    n = args.warm
    parts = [p for p in (args.only or WARM_SECTIONS) if p in WARM_SECTIONS]
    if not parts:
        print("grood bench --warm: nothing to compile (it warms --only configs and --only "
              "anatomy)", file=sys.stderr)
        return 1
    common = [arg for part in parts for arg in ("--only", part)] + ["--repeat", "1"]
    common += ["--tiny"] * args.tiny + (["--device", args.device] if args.device else [])
    if args.configs_match is not None:
        common += ["--configs-match", args.configs_match.pattern]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grood-warm-") as tmp:
        procs = []
        for k in range(n):
            log = open(os.path.join(tmp, f"{k}.log"), "w+")  # (closed below)
            cmd = [sys.executable, "-m", "grood", "bench", *common, "--shard", f"{k}/{n}"]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        failures = 0
        for k, (proc, log) in enumerate(procs):
            rc = proc.wait()
            print(f"warm {k}/{n} ({' '.join(parts)}): exit {rc} after "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failures += 1
                log.seek(0)
                print("".join(log.readlines()[-15:]), flush=True)
            log.close()
    return failures


def run(args: argparse.Namespace) -> int:
    """Print the report (Markdown) for parsed ``args``."""
    if args.warm:
        return min(warm(args), 1)
    from grood import ops
    from grood._bench.common import TIMINGS

    TIMINGS.clear()  # this run's timings only
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    triton_ok = ops.triton_unavailable_reason("ncp_gradient", torch.device(device)) is None
    backends = ["triton", "torch"] if triton_ok else ["torch"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends
    kernels = kernel_sources()
    print(f"grood {__version__} (kernels {kernels}) | torch {torch.__version__} | "
          f"triton {triton_version} | "
          f"{dev_name} | python {platform.python_version()} | {date.today().isoformat()}"
          + (" | TRITON_INTERPRET=1: Triton timings are the interpreter's" if interpreted
             else ""))
    print()
    if interpreted and not args.tiny:  # (nothing said otherwise until the first table ends)
        print("grood bench: the Triton interpreter runs the full-size shapes (up to N = 65,536, "
              "C = 21,841) on the CPU, which takes hours; --tiny checks the report in seconds, "
              "and without TRITON_INTERPRET the report times the torch path alone",
              file=sys.stderr, flush=True)

    def save() -> None:  # after each part: a run cut short keeps the timings taken so far
        if args.json:
            _write_json(args.json, TIMINGS, device, dev_name, triton_version, interpreted,
                        kernels)

    parts = args.only or [p for p in SECTIONS if p not in TUNING_SECTIONS]
    if "gradient" in parts:
        print("## Gradient step\n")
        if not args.skip_accuracy:
            for backend in backends:
                _emit(accuracy_table(device, backend, args.tiny))
                print()
            _emit(hard_softmax_table(device, backends, args.tiny))
            print()
            _emit(clustered_table(device, backends, args.tiny))
            print()
        shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
        _emit(timing_table(device, backends, shapes, args.repeat))
        print("\nTFLOP/s counts the distance GEMM only (2·N·C·D). 'vs torch closed form': the "
              "plain torch closed form (full [N, C] distances) in the same precision, same "
              "device, same run. 'vs torch GEMM alone': the distance GEMM h @ P.T by itself "
              "(cuBLAS on a GPU), the floor where the GEMM dominates. 'vs autograd loop': one "
              "autograd call per sample, timed on up to 64 samples. Peak extra memory: device "
              "memory beyond inputs and outputs during one call.\n")
        save()
    if "head" in parts:
        from grood._bench.head import attached_table, head_table

        print("\n## The GROOD head in a compiled program\n")
        _emit(head_table(device, backends[0], args.tiny, args.repeat))
        print()
        _emit(attached_table(device, backends[0], args.tiny, args.repeat))
        print("\nCompiled and exported heads run grood's custom ops as single nodes. With "
              "checks='raise' (the default) the head reads values on the host; the CUDA-graph "
              "rows use checks='flag', which reads none (unresolvable rows score NaN and are "
              "counted on the device).")
    if "search" in parts:
        print("\n## Nearest-neighbour search\n")
        if not args.skip_accuracy:
            _emit(search_accuracy_table(device, backends, args.tiny))
            print()
        _emit(search_timing_table(device, backends, args.tiny, args.repeat))
        print("\nTFLOP/s counts 2·Q·M·D. 'vs torch GEMM+min': chunked GEMM and running minimum "
              "in the same precision (on bf16 storage for bf16-storage rows), same device, same "
              "run. recall@1 is measured on the first 100 queries against float64 brute force.")
        save()
    if "search-k" in parts:
        print("\n## Nearest-neighbour search for many neighbours\n")
        _emit(search_k_table(device, backends, args.tiny, args.repeat))
        print("\nL2-normalised clustered rows (as KNN searches them); 'vs k = 1': against the "
              "same backend and precision at k = 1, same run.")
        save()
    if "configs" in parts:
        print("## Gradient step: launch configurations\n")
        if "triton" not in backends:
            print("The Triton kernels cannot run here; nothing to compare.")
        else:
            from grood._bench.configs import CONFIG_SHAPES, TINY_CONFIG_SHAPES, config_table

            _emit(config_table(device, TINY_CONFIG_SHAPES if args.tiny
                                         else CONFIG_SHAPES, repeat=args.repeat,
                               match=args.configs_match, shard=args.shard))
            print("\nThe launcher's configuration first, then the same with its exact "
                  "re-rank's gate the other way (off: every candidate re-ranked; on: the "
                  "GEMM-nearest, the others where the GEMM's error lets them be nearer), then "
                  "every autotuning candidate (GROOD_AUTOTUNE=1 picks among them), on the same "
                  "inputs; the differences are against the launcher's results.")
    if "anatomy" in parts:
        print("\n## Gradient step: where the time goes\n")
        if "triton" not in backends:
            print("The Triton kernels cannot run here; nothing to take apart.")
        else:
            from grood._bench.anatomy import anatomy_table, memory_roofs_table
            from grood._bench.configs import (
                CONFIG_PRECISIONS,
                CONFIG_SHAPES,
                TINY_CONFIG_SHAPES,
                in_shard,
            )

            if in_shard(0, args.shard):  # (its 3 GiB of buffers in one shard, not in each)
                _emit(memory_roofs_table(device, args.tiny, repeat=args.repeat))
            print("\nRead bandwidth of a plain streaming kernel (8 programs per SM, 2048 "
                  "fp32 per load), and a device copy: the roofs the compile report's model "
                  "assumes (L2 12 TB/s) or took from an earlier H200 run (HBM copy 4.13 TB/s).\n")
            # ImageNet-1k alone: each stage is a kernel of its own to compile on the device.
            _emit(anatomy_table(device, TINY_CONFIG_SHAPES if args.tiny else CONFIG_SHAPES[:1],
                                CONFIG_PRECISIONS, repeat=args.repeat, shard=args.shard))
            print("\nEach stage is a kernel that stops there, at the launcher's tiles (the "
                  "staged rows at the staged variant's), timed in turns with the others on the "
                  "same inputs; 'share' is against the whole step (launcher). The torch GEMM "
                  "is the floor a fused step approaches where the GEMM dominates.")
    if "torch-path" in parts:
        from grood._bench.torch_path import (
            TINY_TORCH_PATH_SHAPES,
            TORCH_PATH_SHAPES,
            torch_path_table,
        )

        print("\n## The torch backend's gradient step, operator by operator\n")
        _emit(torch_path_table(device, TINY_TORCH_PATH_SHAPES if args.tiny
                               else TORCH_PATH_SHAPES, ("ieee", "tf32", "bf16")
                               if device == "cuda" else ("ieee",), repeat=args.repeat))
        print("\nThe torch backend (grood.functional.ncp_gradient: what backend='auto' runs "
              "where the Triton kernels cannot), the same with row tiles 4 times the "
              "default's, and the plain torch closed form timed in "
              "turns; then one call of the step profiled (torch.profiler), its top-level "
              "operators grouped by name: host time, and the device time of the kernels they "
              "launched (on a GPU), as shares of the timed step. Device time well below the "
              "step's means the device waited on the host.")
    save()
    return 0


def _write_json(path: str, timings: list[dict], device: str, dev_name: str,
                triton_version: str, interpreted: bool, kernels: str) -> None:
    """The run's kernel timings (:data:`grood._bench.common.TIMINGS`) with what they ran on
    (``kernels``: :func:`grood.environment.kernel_sources`)."""
    import json

    capability = list(torch.cuda.get_device_capability()) if device == "cuda" else None
    meta = {"grood": __version__, "kernels": kernels, "torch": torch.__version__,
            "triton": triton_version, "device": dev_name, "capability": capability,
            "python": platform.python_version(), "date": date.today().isoformat(),
            "interpreted": interpreted}
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps({"run": meta, "timings": timings}, indent=1))


def main(argv: list[str] | None = None, prog: str = "grood bench") -> int:
    """Entry point of ``grood bench`` and ``bench/gpu_report.py``."""
    from grood.persistence import save_target

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0].replace("``", "'"))  # plain text
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.json:  # a usage error before any kernel runs (a run can take minutes)
        try:
            save_target(args.json, suffixes=None, what="timings")
        except (ValueError, OSError) as exc:
            parser.error(f"--json: {exc}")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
