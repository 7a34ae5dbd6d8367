"""Opt-in autotuning (``GROOD_AUTOTUNE=1``) shared by the kernel launchers.

Each launcher has one known-good configuration from a small named heuristic; with the
environment variable set and a CUDA device, it instead times a short list of configurations
once per device and shape class on the call's own inputs and keeps the fastest. Choices are
remembered across processes in a JSON file (``$GROOD_CACHE_DIR/autotune.json``, by default
``~/.cache/grood/autotune.json``), keyed by device name, triton version and shape class.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import triton
import triton.testing

_tuned: dict[str, list[int]] = {}
#: A configuration: a sequence of ints, the first two the row and column blocks.
_Config = TypeVar("_Config", bound=Sequence[int])


def autotune_enabled(device: torch.device) -> bool:
    """Autotuning is opt-in (``GROOD_AUTOTUNE=1``) and needs a GPU, not the interpreter."""
    return (os.environ.get("GROOD_AUTOTUNE") == "1" and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1")


def cache_file() -> Path:
    """Where tuned choices are remembered."""
    root = os.environ.get("GROOD_CACHE_DIR") or Path.home() / ".cache" / "grood"
    return Path(root) / "autotune.json"


def _load() -> dict[str, list[int]]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(entries: dict[str, list[int]]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_load(), **entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice is kept for this process only
        pass


def tune(launch: Callable[[_Config], None], key: tuple, n_rows: int, n_cols: int,
         configs: Sequence[_Config], device: torch.device, *,
         results: Callable[[], Any] | None = None,
         agree: Callable[[Any, Any], bool] | None = None) -> _Config:
    """The fastest of ``configs`` (first two entries: row and column blocks) for ``key`` on
    this device: timed once, then remembered (in this process and in the cache file).

    With ``results`` (a snapshot of the call's outputs, taken after a launch) and ``agree``
    (two snapshots -> bool), a configuration whose results disagree with the first one's (the
    launcher's) is left out with a warning: speed alone would otherwise let a variant the
    compiler got wrong win, and every later call would score with it. A candidate that fails
    to compile or launch on this device is left out with a warning too (the first, the
    launcher's, must work)."""
    name = f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}|{key!r}"
    if name not in _tuned:
        stored = _load().get(name)
        usable = [list(c) for c in configs]
        if stored is not None and stored in usable:
            _tuned[name] = stored
        else:
            best, best_ms, reference = None, float("inf"), None
            for i, cfg in enumerate(configs):
                if cfg[0] > max(16, triton.next_power_of_2(n_rows)) or cfg[1] > max(
                        16, triton.next_power_of_2(n_cols)):
                    continue
                try:
                    launch(cfg)  # compile
                except Exception as exc:  # any candidate may fail to build on a device
                    if i == 0:  # the launcher's own configuration must work
                        raise
                    warnings.warn(f"grood autotuning: configuration {tuple(cfg)} fails on "
                                  f"this device ({type(exc).__name__}: {exc}); not used",
                                  RuntimeWarning, stacklevel=2)
                    continue
                if results is not None and agree is not None:
                    if reference is None:
                        reference = results()
                    elif not agree(reference, results()):
                        warnings.warn(f"grood autotuning: configuration {tuple(cfg)} gives "
                                      "results that disagree with the launcher's on this "
                                      f"device (triton {triton.__version__}); not used",
                                      RuntimeWarning, stacklevel=2)
                        continue
                ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
                if ms < best_ms:
                    best, best_ms = list(cfg), ms
            _tuned[name] = best if best is not None else list(configs[0])
            _save({name: _tuned[name]})
    chosen = _tuned[name]
    return next(c for c in configs if list(c) == chosen)
