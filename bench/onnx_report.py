"""GROOD exported to ONNX (grood.export_onnx) against the detector, on the CPU: throughput
of ONNX Runtime and of the detector's torch path in the same run, the file's size and export
time, and how far the file's scores and classes are from the detector's, with and without
float64 in the graph; then ONNX Runtime's memory and speed by search block on a larger index,
and the export's own memory (a fitted detector, with the weights in the file and beside it).

Features are the clustered post-ReLU-like ones of the other tables
(``grood._bench.common.realistic_features``); the queries include near-OOD classes.

    python bench/onnx_report.py            # C = 10 / D = 512 and C = 1000 / D = 2048
    python bench/onnx_report.py --tiny     # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import grood
from grood._bench.common import realistic_features


def rows_per_second(run, queries: torch.Tensor, batch: int, repeat: int) -> tuple[float, list]:
    """Best of ``repeat`` passes over ``queries`` in batches: rows/s and the last outputs."""
    run(queries[:batch])  # warm-up (allocations, the runtime's first-run work)
    best, outs = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        outs = [run(queries[i:i + batch]) for i in range(0, queries.shape[0], batch)]
        best = min(best, time.perf_counter() - start)
    return queries.shape[0] / best, outs


def shape_rows(n: int, c: int, d: int, n_queries: int, batch: int, repeat: int,
               folder: str) -> list[str]:
    import onnxruntime

    x, y = realistic_features(n, c, d, seed=0, device="cpu")
    known, _ = realistic_features(n_queries // 2, c, d, seed=1, device="cpu")
    novel, _ = realistic_features(n_queries - n_queries // 2, c, d, seed=2, device="cpu",
                                  novel=True)
    queries = torch.cat([known, novel])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = grood.GROOD(progress=False).fit(x, y)
    want_s, want_p = det.score_and_predict(queries)
    det_speed, _ = rows_per_second(lambda q: det.score_and_predict(q), queries, batch, repeat)
    shape = f"C = {c}, D = {d}, {det.index_.ntotal:,} indexed"
    rows = [f"| {shape} | detector (torch) | – | – | {det_speed:,.0f} | – | – |"]
    for float64 in (True, False):
        path = os.path.join(folder, f"grood-{c}-{int(float64)}.onnx")
        start = time.perf_counter()
        with warnings.catch_warnings():  # torch's exporter's own deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            grood.export_onnx(det, queries[:16], path, float64=float64)
        took = time.perf_counter() - start
        mib = os.path.getsize(path) / 2**20
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        speed, outs = rows_per_second(
            lambda q, s=session: s.run(None, {"input": q.numpy()}), queries, batch, repeat)
        score = np.concatenate([o[0] for o in outs])
        pred = np.concatenate([o[1] for o in outs])
        err = float(np.abs(score - want_s.numpy()).max() / np.abs(want_s.numpy()).max())
        same = float((pred == want_p.numpy()).mean())
        rows.append(f"| {shape} | ONNX Runtime, float64={float64} | {mib:,.1f} MiB | "
                    f"{took:.1f} s | {speed:,.0f} | {err:.2g} | {100 * same:.2f} % |")
    return rows


# Both child processes' reading of their resident memory in MiB (VmHWM: the peak; ru_maxrss in
# a child would count the parent's memory at the fork). The session's child imports nothing
# else of grood or torch, so that its memory is ONNX Runtime's.
RESIDENT = r"""
def resident(field="VmRSS"):
    with open("/proc/self/status") as status:
        return int(status.read().split(field + ":")[1].split()[0]) / 1024
"""


# Run in a process of its own, so that its memory is the session's alone: ONNX Runtime with
# its defaults (the CPU arena, weights prepacked for its matmul; the last argument "1" turns
# prepacking off: session.disable_prepacking) loads the file, then scores
# batches of random rows; resident memory (VmRSS) after the load and after the batches, the
# peak while loading (VmHWM), and rows/s (the best of 3 batches after a warm-up).
SESSION_CHILD = RESIDENT + r"""
import sys, time
import numpy as np
import onnxruntime
path, rows, dim, unpacked = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
options = onnxruntime.SessionOptions()
options.add_session_config_entry("session.disable_prepacking", unpacked)
session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
loaded = resident()
load_peak = resident("VmHWM")
x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
session.run(None, {"input": x})
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    session.run(None, {"input": x})
    best = min(best, time.perf_counter() - start)
print(loaded, load_peak, resident(), rows / best)
"""


# A process of its own, so that its peak is the export's alone: a detector fitted on
# clustered features (``realistic_features``; every row classified right is indexed), the
# features then freed and the peak reset (/proc/self/clear_refs), exported and checked
# (export_onnx), with the weights in the file or beside it (external data); resident memory
# (VmRSS) with the detector fitted, and the peak (VmHWM) at the end.
EXPORT_CHILD = RESIDENT + r"""
import os, sys, time, warnings
warnings.simplefilter("ignore")
import grood
from grood._bench.common import realistic_features
n, c, d, external = (int(v) for v in sys.argv[1:5])
path = sys.argv[5]
x, y = realistic_features(n, c, d, seed=0, device="cpu")
det = grood.GROOD(progress=False).fit(x, y)
del x, y
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # VmHWM from here: the export's peak, not the fit's
start, ready = time.perf_counter(), resident()
grood.export_onnx(det, realistic_features(16, c, d, seed=1, device="cpu")[0], path,
                  external_data=bool(external))
print(det.index_.ntotal, ready, resident("VmHWM"), time.perf_counter() - start)
"""


def random_index(n_indexed: int, c: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prototypes [c, d] and an index of random gradients [n_indexed, d] of norm below
    1, as GROOD's are."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(c, d, generator=gen)
    vectors = torch.randn(n_indexed, d, generator=gen)
    vectors *= torch.rand(n_indexed, 1, generator=gen) / vectors.norm(dim=1, keepdim=True)
    return prototypes, vectors


def export_memory_rows(n: int, c: int, d: int, folder: str) -> list[str]:
    """The export's peak memory with the weights in the file and beside it."""
    rows = []
    for external in (0, 1):
        path = os.path.join(folder, f"export-{external}.onnx")
        out = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(n), str(c), str(d),
                              str(external), path], capture_output=True, text=True, check=True)
        n_indexed, ready, peak, took = (float(v) for v in out.stdout.split()[-4:])
        index_mib = n_indexed * d * 4 / 2**20
        where = "beside it (external_data=True)" if external else "in the file"
        rows.append(f"| C = {c}, D = {d}, {n_indexed:,.0f} indexed ({index_mib:,.0f} MiB) | "
                    f"{where} | {ready:,.0f} MiB | {peak:,.0f} MiB | {peak - ready:+,.0f} MiB "
                    f"| {took:.1f} s |")
        for name in (path, path + ".data"):
            if os.path.exists(name):
                os.remove(name)
    return rows


def search_block_rows(n_indexed: int, c: int, d: int, batch: int, blocks: list[int],
                      folder: str) -> list[str]:
    """One file per search block (one block: the whole index in one matmul), the same head:
    prototypes and an index of random gradients of norm below 1, as GROOD's are
    (:func:`random_index`); the last block's file also without prepacking."""
    from grood.portable import PortableHead

    prototypes, vectors = random_index(n_indexed, c, d)
    rows = []
    for block in blocks:  # (OOD prototype: the prototypes' mean)
        head = PortableHead(prototypes, prototypes.mean(0), vectors, search_block=block).eval()
        path = os.path.join(folder, f"blocks-{block}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            grood.export_onnx(head, prototypes[:16], path)
        mib = os.path.getsize(path) / 2**20
        for unpacked in ("0", "1") if block == blocks[-1] else ("0",):
            out = subprocess.run([sys.executable, "-c", SESSION_CHILD, path, str(batch), str(d),
                                  unpacked], capture_output=True, text=True, check=True)
            loaded, load_peak, after, speed = (float(v) for v in out.stdout.split())
            name = f"{block:,}" + (" (one block)" if block >= n_indexed else "")
            session = "prepacking off" if unpacked == "1" else "defaults"
            rows.append(f"| C = {c}, D = {d}, {n_indexed:,} indexed | {name} | "
                        f"{head.n_index_blocks} | {session} | {mib:,.0f} MiB | "
                        f"{load_peak:,.0f} MiB | {loaded:,.0f} MiB | {after:,.0f} MiB | "
                        f"{after - loaded:+,.0f} MiB | {speed:,.0f} |")
        os.remove(path)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--batch", type=int, default=256, help="rows per call (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="passes timed, best kept")
    args = parser.parse_args()
    import onnxruntime

    shapes = ([(600, 5, 32, 200)] if args.tiny
              else [(45_000, 10, 512, 4096), (50_000, 1000, 2048, 2048)])
    print(f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, grood {grood.__version__}; CPU, {os.cpu_count()} "
          f"cores; batches of {args.batch}, best of {args.repeat}\n")
    print("| shape | scored by | file | export + check | rows/s | max score diff (of the "
          "largest) | classes equal |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for n, c, d, n_queries in shapes:
            print("\n".join(shape_rows(n, c, d, n_queries, args.batch, args.repeat, folder)),
                  flush=True)
        n_indexed, c, d, batch, blocks = ((3000, 5, 32, 64, [3000, 512]) if args.tiny else
                                          (200_000, 100, 512, 512, [200_000, 65_536, 16_384]))
        print(f"\nONNX Runtime's memory by search block (batches of {batch}):\n")
        print("| shape | search block | blocks | session | file | peak while loading | "
              "resident after load | after batches | batches added | rows/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(search_block_rows(n_indexed, c, d, batch, blocks, folder)), flush=True)
        print("\nThe export's own memory (export_onnx with its check, in a process of its "
              "own):\n")
        print("| shape | weights | resident with the detector fitted | peak | export added | "
              "export + check |")
        print("|---|---|---|---|---|---|")
        print("\n".join(export_memory_rows(n_indexed, c, d, folder)), flush=True)


if __name__ == "__main__":
    main()
