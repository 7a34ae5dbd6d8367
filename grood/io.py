"""Reading and writing feature files for the command line.

A feature file holds ``features`` [N, D] and optionally ``labels`` [N] and ``logits`` [N, C]:

* ``.npy``: one 2-D array, the features.
* ``.npz``: arrays named ``features``, ``labels``, ``logits`` (loaded without pickle).
* ``.pt`` / ``.pth``: a tensor (the features) or a dict of tensors with those names, read with
  ``torch.load(weights_only=True)``, which refuses arbitrary objects (memory-mapped).
* ``.safetensors``: tensors with those names.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from grood._checks import path_hint

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
KEYS = ("features", "labels", "logits")
#: How to write a feature file, for the errors that find one lacking.
HOW_TO_WRITE = ("A feature file names its arrays: np.savez(path, features=X, labels=y) (logits "
                "too, if there are any), or torch.save({'features': X, 'labels': y}, path)")


class FeatureFile(NamedTuple):
    """Arrays read from a feature file; ``labels`` and ``logits`` may be None."""

    features: Any
    labels: Any
    logits: Any


def _text_hint(path: Path, suffix: str) -> str:
    """How to turn a text table of features into a file grood reads."""
    if suffix not in (".csv", ".tsv", ".txt"):
        return ""
    delimiter = {".csv": "','", ".tsv": "'\\t'"}.get(suffix, "None")
    return (f"; a text table converts once, e.g. np.savez({str(path.with_suffix('.npz'))!r}, "
            f"features=np.loadtxt({str(path)!r}, delimiter={delimiter}, dtype=np.float32)) "
            "(skiprows=1 past a header; labels=... as integer class ids beside them)")


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read a feature file (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature file at {path}{path_hint(path)}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}"
                         f"{_text_hint(path, suffix)}")
    _check_numpy_format(path, suffix)
    try:
        if suffix == ".npy":
            arrays = {"features": np.load(path, mmap_mode="r", allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix in (".pt", ".pth"):
            try:
                obj = _torch_load(path)
            except Exception as exc:  # pickled objects, or not a torch file at all
                raise ValueError(
                    f"{path} is not a tensors-only .pt file: grood reads .pt files with "
                    "torch.load(weights_only=True), which loads tensors and plain "
                    "containers and refuses anything else; save a tensor or a dict of "
                    "tensors (or use .npz / .safetensors)") from exc
            if not isinstance(obj, (dict, torch.Tensor)):  # e.g. torch.save((X, y), path)
                raise ValueError(
                    f"{path} holds a {type(obj).__name__}, not a tensor (the features) or a "
                    f"dict of tensors named {', '.join(KEYS)}. {HOW_TO_WRITE}")
            arrays = obj if isinstance(obj, dict) else {"features": obj}
        else:
            from safetensors.torch import load_file

            arrays = load_file(str(path))
    except ValueError as exc:
        if str(exc).startswith(str(path)):  # (already names the file and the problem)
            raise
        raise ValueError(f"{path}: could not read the file ({exc})") from exc
    except Exception as exc:
        raise ValueError(f"{path}: could not read the file ({exc})") from exc
    if "features" not in arrays:
        raise ValueError(f"{path} has no 'features' array; it holds {sorted(arrays)}. "
                         f"{HOW_TO_WRITE}")
    for key in KEYS:
        value = arrays.get(key)
        if value is not None and not isinstance(value, (np.ndarray, torch.Tensor)):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not an array")
    return FeatureFile(*(arrays.get(k) for k in KEYS))


def array_names(path: str | os.PathLike) -> set[str]:
    """The names of the arrays a feature file holds, read without loading them (a ``.npy``
    holds ``features`` alone; a ``.pt`` file is memory-mapped where its format allows); a
    file that cannot be read gives the error :func:`load_features` gives."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"features"}
        if suffix == ".npz" and zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as z:
                return set(z.files)
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return set(f.keys())
    except Exception:  # (named as load_features names it, below)
        pass
    return {k for k, v in load_features(path)._asdict().items() if v is not None}


def _check_numpy_format(path: Path, suffix: str) -> None:
    """A clear error for a ``.npy`` without numpy's header or a ``.npz`` that is no zip archive
    (numpy would take either for a pickle and say so, which they are not meant to be)."""
    if suffix == ".npy":
        with open(path, "rb") as f:
            ok = f.read(6) == b"\x93NUMPY"
        what = "a NumPy .npy file (no .npy header)"
    elif suffix == ".npz":
        ok = zipfile.is_zipfile(path)
        what = "a NumPy .npz file (not a zip archive)"
    else:
        return
    if not ok:
        raise ValueError(f"{path} is not {what}: damaged, truncated, or another format")


def _torch_load(path: Path) -> Any:
    """A tensors-only .pt file, memory-mapped where its format allows (so a file larger than
    memory is read batch by batch, as a .npy file is); files in torch's legacy format are read
    whole."""
    return torch.load(path, map_location="cpu", weights_only=True,
                      mmap=zipfile.is_zipfile(path))  # torch's zip format maps; legacy not


def save_scores(path: str | os.PathLike, scores: np.ndarray, preds: np.ndarray,
                flags: np.ndarray | None = None, threshold: float | None = None, *,
                neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Write scores to ``.npy`` (scores only), ``.npz`` (arrays ``score``, ``pred``, and
    ``ood`` (bool) and ``threshold`` when ``flags`` are given, ``neighbour_distance`` and
    ``neighbour_row`` [N, n] when ``neighbours`` (distances, training rows) are) or ``.csv``
    (``index,score,pred`` rows, then ``ood`` (1 = flagged) when ``flags`` are given, then
    ``neighbour_row_1..n`` and ``neighbour_distance_1..n``; each number the shortest decimal that
    reads back to the same value in the array's dtype). Written atomically, through
    symlinks: an interrupted write leaves no half-written file that looks complete."""
    from grood.persistence import written_atomically

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv"):
        raise ValueError(f"{path}: scores are written as .npy, .npz or .csv, not "
                         f"{path.suffix!r}")
    if suffix == ".npy" and neighbours is not None:
        raise ValueError(f"{path}: .npy holds the scores alone, not the neighbours")
    with written_atomically(path) as tmp:
        _write_scores(tmp, suffix, scores, preds, flags, threshold, neighbours)


def _write_scores(path: Path, suffix: str, scores: np.ndarray, preds: np.ndarray,
                  flags: np.ndarray | None, threshold: float | None,
                  neighbours: tuple[np.ndarray, np.ndarray] | None) -> None:
    """:func:`save_scores`' file contents, written to ``path`` in the format of ``suffix``."""
    if suffix == ".npy":
        with open(path, "wb") as f:  # through a file: np.save would append ".npy" to ".NPY"
            np.save(f, scores)
    elif suffix == ".npz":
        arrays: dict[str, Any] = {"score": scores, "pred": preds}
        if flags is not None:
            arrays.update(ood=flags, threshold=np.float64(threshold))
        if neighbours is not None:
            arrays.update(neighbour_distance=neighbours[0], neighbour_row=neighbours[1])
        with open(path, "wb") as f:  # through a file, as above
            np.savez(f, **arrays)
    else:  # .csv
        n = 0 if neighbours is None else neighbours[1].shape[1]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "score", "pred"] + (["ood"] if flags is not None else [])
                            + [f"neighbour_row_{j + 1}" for j in range(n)]
                            + [f"neighbour_distance_{j + 1}" for j in range(n)])
            # str of a NumPy scalar: the shortest decimal that reads back to the same value in
            # its own dtype (0.1 for float32's 0.1, not float64's 0.10000000149011612).
            for i, (s, p) in enumerate(zip(scores, preds.tolist(), strict=True)):
                writer.writerow([i, str(s), p] + ([int(flags[i])] if flags is not None else [])
                                + (neighbours[1][i].tolist() + [str(v) for v in neighbours[0][i]]
                                   if neighbours is not None else []))
