"""Opt-in autotuning (``GROOD_AUTOTUNE=1``) shared by the kernel launchers.

Each launcher has one known-good configuration from a small named heuristic; with the
environment variable set and a CUDA device, it instead times a short list of configurations
once per shape class on the call's own inputs and keeps the fastest for the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.testing

_tuned: dict[tuple, tuple[int, ...]] = {}


def autotune_enabled(device: torch.device) -> bool:
    """Autotuning is opt-in (``GROOD_AUTOTUNE=1``) and needs a GPU, not the interpreter."""
    return (os.environ.get("GROOD_AUTOTUNE") == "1" and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1")


def tune(launch: Callable[[tuple[int, ...]], None], key: tuple, n_rows: int, n_cols: int,
         configs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Time every config (first two entries: row and column blocks) once; cache the fastest."""
    if key not in _tuned:
        best, best_ms = None, float("inf")
        for cfg in configs:
            if cfg[0] > max(16, triton.next_power_of_2(n_rows)) or cfg[1] > max(
                    16, triton.next_power_of_2(n_cols)):
                continue
            launch(cfg)  # compile
            ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
            if ms < best_ms:
                best, best_ms = cfg, ms
        _tuned[key] = best
    return _tuned[key]
