"""``grood bench --only torch-path``: the torch backend's gradient step, operator by operator.

The pure-PyTorch implementation (:func:`grood.functional.ncp_gradient`, what ``backend="auto"``
runs where the Triton kernels cannot: AMD GPUs, no triton, float64) streams row tiles through a
sequence of ATen operators. On an H200 (2026-12-04) it took 21.5 ms at ImageNet-1k in tf32
against 3.78 ms for the plain torch closed form, more than its bytes moved explain. This table
says where the time goes: the step timed whole (synchronised, median), beside the closed form,
then one call under :mod:`torch.profiler` with its top-level operators grouped by name — calls,
host time, device time (the kernels they launched), each as a share of the step — so a device
that waits on the host (launch-bound tiles, synchronisations) shows as device time well below
the step's. The step is also timed with row tiles :data:`WIDER_TILES` times the default's:
some 115-140 ATen operators run per row tile (counted on the CPU), so where the host's
launches set the pace, fewer tiles take less time. Needs no Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from grood import functional
from grood._bench.common import clustered_problem, interleaved_median_times, synchronize
from grood._bench.gradient import torch_closed_form

#: (name, N, C, D) of the table: ImageNet-1k, where the H200 timed the gap.
TORCH_PATH_SHAPES = [("ImageNet-1k", 65536, 1000, 2048)]
TINY_TORCH_PATH_SHAPES = [("tiny-100", 64, 100, 24)]
#: Operators listed per shape and mode (the rest summed in one row).
TOP_OPS = 12
#: Row tiles this many times the default's for the second timing of the step.
WIDER_TILES = 4


def torch_path_table(device: str, shapes, precisions, repeat: int = 3) -> Iterator[str]:
    """Markdown rows: per shape and mode the torch backend's step and the torch closed form
    timed, then the step's top-level operators by device time (host time off a GPU)."""
    on_gpu = device == "cuda"
    yield ("| shape | precision | what | calls | wall ms | host ms | device ms | "
           "share of the step |")
    yield "|---|---|---|---|---|---|---|---|"
    for name, n, c, d in shapes:
        h, protos = clustered_problem(n, c, d, device)
        p_ood = protos.mean(0)
        tile_rows = functional.gradient_tile_rows(
            h.device.type, functional.gradient_class_block(h.device.type, c), d)
        wider = WIDER_TILES * tile_rows
        tiles = f"{-(-n // wider)} row tile(s) of {min(wider, n):,} (default: " \
                f"{-(-n // tile_rows)} of {min(tile_rows, n):,})"
        for precision in precisions:
            step = partial(functional.ncp_gradient, h, protos, p_ood, precision=precision)
            step_wider = partial(step, block_rows=wider)
            closed = partial(torch_closed_form, h, protos, p_ood, precision)
            t_step, t_wider, t_closed = interleaved_median_times([step, step_wider, closed],
                                                                 device, repeat)
            ops = profiled_ops(step, device)
            head = f"| {name} | {precision} |"
            yield f"{head} whole step, timed | 1 | {1e3 * t_step:.3f} | – | – | 1.00 |"
            yield (f"{head} whole step in {tiles}, timed | 1 | {1e3 * t_wider:.3f} | – | – | "
                   f"{t_wider / t_step:.2f} |")
            yield (f"{head} torch closed form, timed | 1 | {1e3 * t_closed:.3f} | – | – | "
                   f"{t_closed / t_step:.2f} |")
            rest = ops[TOP_OPS:]
            rows = (ops[:TOP_OPS] + ([_summed(f"{len(rest)} other operators", rest)] if rest
                                     else []) + [_summed("all operators of the profiled call",
                                                         ops)])
            for op, calls, host, dev in rows:
                yield (f"{head} {op} | {calls} | – | {1e3 * host:.3f} | "
                       f"{f'{1e3 * dev:.3f}' if on_gpu else '–'} | "
                       f"{(dev if on_gpu else host) / t_step:.2f} |")


def _summed(label: str, ops: list[tuple[str, int, float, float]]
            ) -> tuple[str, int, float, float]:
    """``ops``' calls, host and device seconds summed, as one row named ``label``."""
    return (label, sum(o[1] for o in ops), sum(o[2] for o in ops), sum(o[3] for o in ops))


def profiled_ops(fn, device: str) -> list[tuple[str, int, float, float]]:
    """One call of ``fn`` under :mod:`torch.profiler` (after the caller's warm-up): its
    top-level operators grouped by name as ``(name, calls, host s, device s)``, by device
    time on a GPU (host time elsewhere), largest first. Top-level: no operator inside
    another is counted twice; device time is that of every kernel an operator launched."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    grouped: dict[str, list[float]] = {}
    for event in prof.events() or []:
        if event.cpu_parent is not None or event.device_type != DeviceType.CPU:
            continue
        dev = float(getattr(event, "device_time_total", 0.0) or 0.0)
        entry = grouped.setdefault(event.name, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += event.cpu_time_total * 1e-6  # (microseconds)
        entry[2] += dev * 1e-6
    key = 2 if device == "cuda" else 1
    rows = sorted(grouped.items(), key=lambda item: -item[1][key])
    return [(name, int(calls), host, dev) for name, (calls, host, dev) in rows]
