"""Reading and writing feature files for the command line.

A feature file holds ``features`` [N, D] and optionally ``labels`` [N] and ``logits`` [N, C]:

* ``.npy``: one 2-D array, the features.
* ``.npz``: arrays named ``features``, ``labels``, ``logits`` (loaded without pickle; those
  stored uncompressed, as ``np.savez`` writes them, are memory-mapped; compressed ones of
  more than 64 MiB, as ``np.savez_compressed`` writes them, are decompressed once into an
  unlinked temporary file, under ``TMPDIR``, and memory-mapped there; smaller ones, or any
  where that file cannot be written, are read whole).
* ``.pt`` / ``.pth``: a tensor (the features) or a dict of tensors with those names, read with
  ``torch.load(weights_only=True)``, which refuses arbitrary objects (memory-mapped).
* ``.safetensors``: tensors with those names (memory-mapped).

Memory-mapped arrays are read as they are used: a file larger than memory is scored or fitted
on batch by batch. A mapped ``.npz`` member's CRC-32 is not checked (``np.load`` checks it
as it reads a member whole, and so does the decompression into a temporary file), as no
checksum guards the other mapped formats.
"""

from __future__ import annotations

import csv
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from grood._checks import path_hint

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
#: A compressed ``.npz`` member larger than this (decompressed) is decompressed into a
#: temporary file and memory-mapped, not read into the process's memory.
SPILL_BYTES = 64 << 20
KEYS = ("features", "labels", "logits")
#: How to write a feature file, for the errors that find one lacking.
HOW_TO_WRITE = ("A feature file names its arrays: np.savez(path, features=X, labels=y) (logits "
                "too, if there are any), or torch.save({'features': X, 'labels': y}, path)")


class FeatureFile(NamedTuple):
    """Arrays read from a feature file; ``labels`` and ``logits`` may be None."""

    features: Any
    labels: Any
    logits: Any
    #: A set :func:`grood.evaluate_model` read through the model: the scores and predictions
    #: of the baselines that score the model's inputs (ODIN, RankFeat), by display name.
    scores: dict[str, tuple[Any, Any]] | None = None


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
    arrays = _arrays(path, "feature file")
    if "features" not in arrays:
        raise ValueError(f"{path} has no 'features' array; it holds {sorted(arrays)}. "
                         f"{HOW_TO_WRITE}")
    for key in KEYS:
        value = arrays.get(key)
        if value is not None and not isinstance(value, (np.ndarray, torch.Tensor)):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not an array")
    return FeatureFile(*(arrays.get(k) for k in KEYS))


def load_head(path: str | os.PathLike) -> tuple[Any, Any]:
    """A classifier's last linear layer from a file of the same formats holding ``weight``
    [C, D] and ``bias`` [C] (``torch.save({"weight": fc.weight, "bias": fc.bias}, path)``,
    or ``np.savez(path, weight=W, bias=b)``): ``(weight, bias)``, checked by the baseline
    that reads them."""
    return _named_arrays(path, ("weight", "bias"), "last-layer file",
                         "torch.save({'weight': fc.weight, 'bias': fc.bias}, path) or "
                         "np.savez(path, weight=W, bias=b)")


def load_held_out(path: str | os.PathLike) -> tuple[Any, Any]:
    """A held-out set's ``logits`` [N, C] and ``labels`` [N] (a validation set's, for
    :class:`grood.TempScale`) from a file of the same formats: a feature file that holds both
    serves, and so does one that holds nothing else. ``(logits, labels)``, checked by the
    baseline that reads them."""
    return _named_arrays(path, ("logits", "labels"), "held-out file",
                         "np.savez(path, logits=Z, labels=y), or a feature file with both")


def _named_arrays(path: str | os.PathLike, names: tuple[str, ...], what: str,
                  how: str) -> tuple[Any, ...]:
    """The arrays ``names`` of a file (:data:`SUFFIXES`' formats), each refused by name where
    it is missing (``how`` says how such a file is written) or is no array."""
    path = Path(path)
    arrays = _arrays(path, what)
    missing = [k for k in names if k not in arrays]
    if missing:
        raise ValueError(
            f"{path} has no {' or '.join(repr(k) for k in missing)} array; it holds "
            f"{sorted(arrays)}. A {what} names them: {how}")
    for key in names:
        if not isinstance(arrays[key], (np.ndarray, torch.Tensor)):
            raise ValueError(f"{path}: {key!r} is a {type(arrays[key]).__name__}, not an "
                             "array")
    return tuple(arrays[k] for k in names)


def _arrays(path: Path, what: str) -> dict[str, Any]:
    """The arrays of a file in one of :data:`SUFFIXES`' formats, by name (a ``.npy`` or a
    bare tensor's as ``features``)."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}{path_hint(path)}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}"
                         f"{_text_hint(path, suffix)}")
    _check_numpy_format(path, suffix)
    try:
        if suffix == ".npy":
            arrays = {"features": np.load(path, mmap_mode="r", allow_pickle=False)}
        elif suffix == ".npz":
            arrays = _npz_arrays(path)
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
    return arrays


def training_file(path: str | os.PathLike) -> FeatureFile:
    """A feature file to fit on: :func:`load_features`, which must have found labels."""
    f = load_features(path)
    if f.labels is None:
        raise ValueError(f"{path} has no 'labels' array; fitting needs class labels. "
                         f"{HOW_TO_WRITE}")
    return f


class TrainingFiles:
    """Several training feature files read as one training set, in the order given (the rows
    ``kneighbors`` names are counted through them), for :meth:`grood.GROOD.fit_batches`: each
    file is checked against the others before any work (its features' width and dtype, its
    labels, logits in every file or in none), and each batch is checked as it is read, so a
    bad row is named by its file and its row there. ``rank`` of ``world`` reads its contiguous
    block of the rows, as a distributed fit of one file does. Files are memory-mapped where
    their format allows (see the module docstring; a compressed ``.npz`` member of more than
    64 MiB through a temporary file, decompressed at each read of the file: for the checks
    and once per pass), one file at a time."""

    def __init__(self, paths: list[str], *, batch_size: int, ignore_logits: bool = False,
                 rank: int = 0, world: int = 1) -> None:
        from grood._checks import (
            as_tensor,
            check_class_count,
            check_labels,
            check_matrix,
            prefixed_errors,
        )

        self.paths, self.batch_size = paths, batch_size
        self.rows, widths, dtypes, logits = [], [], [], []
        self.n_classes, largest = 0, paths[0]  # (and the file that holds the largest label)
        for path in paths:
            f = training_file(path)
            with prefixed_errors(path):
                x = as_tensor(f.features, "features")[0]
                check_matrix(x, "features", allow_empty=True)
                y = as_tensor(f.labels, "labels")[0]
                check_labels(y, "labels", x.shape[0], allow_empty=True)
                lg = None if ignore_logits or f.logits is None else as_tensor(f.logits,
                                                                            "logits")[0]
                if lg is not None:
                    check_matrix(lg, "logits", allow_empty=True)
                    if lg.shape[0] != x.shape[0]:
                        raise ValueError(f"logits has {lg.shape[0]} rows but features have "
                                         f"{x.shape[0]}")
            self.rows.append(x.shape[0])
            widths.append(x.shape[1])
            dtypes.append(x.dtype)
            logits.append(None if lg is None else lg.shape[1])
            if y.numel() and int(y.max()) + 1 > self.n_classes:
                self.n_classes, largest = int(y.max()) + 1, path
        for what, values, fix in (
                ("features of width {}", widths, ""),
                ("logits of width {}", logits, " (logits decide which rows are indexed: give "
                 "them in every file or in none; --ignore-logits reads none)"),
                ("{} features", dtypes, " (float64 features are computed in float64, the "
                 "others in float32: convert the files to one of them)")):
            # (float16, bfloat16 and float32 features are all computed in float32)
            if len({v == torch.float64 if values is dtypes else v for v in values}) > 1:
                raise ValueError("the training files differ: " + ", ".join(
                    f"{p} has " + ("no logits" if v is None else
                                   what.format(str(v).removeprefix("torch.")))
                    for p, v in zip(paths, values, strict=True)) + fix)
        if logits[0] is not None:
            self.n_classes = logits[0]
        self.n_features, self.with_logits = widths[0], logits[0] is not None
        n = sum(self.rows)
        if n == 0:
            raise ValueError(f"the training files ({', '.join(paths)}) hold no rows")
        if not self.with_logits:  # before anything is allocated for the classes
            with prefixed_errors(largest):
                check_class_count(self.n_classes - 1, n)
        self.start, self.stop = n * rank // world, n * (rank + 1) // world

    def _pieces(self) -> list[tuple[str, int, int]]:
        """This rank's rows of each file: ``(path, first, stop)`` in the file, none empty."""
        pieces, first = [], 0  # first: the file's first row in the whole set
        for path, n in zip(self.paths, self.rows, strict=True):
            lo, hi = max(self.start - first, 0), min(self.stop - first, n)
            first += n
            if lo < hi:
                pieces.append((path, lo, hi))
        return pieces

    def __len__(self) -> int:
        """This rank's batches (for the fit's progress)."""
        return sum(-(-(hi - lo) // self.batch_size) for _, lo, hi in self._pieces())

    def __iter__(self) -> Any:
        """This rank's batches ``(features, labels, logits or None)``, none across two
        files."""
        from grood._batches import check_batch
        from grood._checks import as_tensor, prefixed_errors

        for path, lo, hi in self._pieces():
            f = load_features(path)
            for r0 in range(lo, hi, self.batch_size):
                r1 = min(r0 + self.batch_size, hi)
                xb = as_tensor(f.features[r0:r1], "features")[0]
                yb = as_tensor(f.labels[r0:r1], "labels")[0]
                lb = as_tensor(f.logits[r0:r1], "logits")[0] if self.with_logits else None
                with prefixed_errors(path):  # a bad row named by its file and its row there
                    check_batch(xb, yb, lb, self.n_features, self.n_classes, r0,
                                self.with_logits)
                yield xb, yb, lb


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


def _npz_arrays(path: Path) -> dict[str, Any]:
    """The arrays of a ``.npz`` file: those stored uncompressed (``np.savez``) memory-mapped,
    large compressed ones (``np.savez_compressed``) decompressed into a temporary file and
    mapped there, the others read whole, as ``np.load`` reads them."""
    arrays = {}
    with np.load(path, allow_pickle=False) as z, open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        for info in z.zip.infolist():  # (the archive np.load opened)
            key = info.filename.removesuffix(".npy")
            if key in z.files:
                mapped = _mapped_member(path, z.zip, raw, size, info)
                if mapped is None:
                    mapped = _spilled_member(z.zip, info)
                arrays[key] = z[key] if mapped is None else mapped
    return arrays


def _npy_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """The ``.npy`` header of a member stream (shape, Fortran order, dtype), read up to its
    data; None for a format version or dtype grood does not map."""
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        return None
    read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                   else fmt.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(member)
    return None if dtype.hasobject else (shape, fortran_order, dtype)


def _spilled_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A compressed ``.npy`` member of more than :data:`SPILL_BYTES`, decompressed into an
    unlinked temporary file (removed when the map is) and memory-mapped there, so the page
    cache holds it and not the process; its CRC-32 is checked as the stream ends. None where
    it is small, unusual, or the file cannot be written (no room: it is then read whole)."""
    if (info.compress_type == zipfile.ZIP_STORED or info.flag_bits & 0x1
            or info.file_size <= SPILL_BYTES or not info.filename.endswith(".npy")):
        return None
    try:
        with archive.open(info) as member, tempfile.TemporaryFile(prefix="grood-npz-") as tmp:
            header = _npy_header(member)
            if header is None:
                return None
            shape, fortran_order, dtype = header
            nbytes = dtype.itemsize * math.prod(shape)
            copied = 0
            while chunk := member.read(1 << 20):
                tmp.write(chunk)
                copied += len(chunk)
            if nbytes == 0 or copied != nbytes:  # (np.load's whole read names the damage)
                return None
            tmp.flush()
            return np.memmap(tmp, dtype=dtype, mode="r", shape=shape,
                             order="F" if fortran_order else "C")
    except OSError:  # no room for it under TMPDIR, or none writable
        return None


def _mapped_member(path: Path, archive: zipfile.ZipFile, raw: Any, size: int,
                   info: zipfile.ZipInfo) -> np.ndarray | None:
    """A memory map of an uncompressed, unencrypted ``.npy`` member of a zip archive, or None
    where it cannot be mapped (it is then read as ``np.load`` reads it, which names any damage):
    its bytes start after the member's local header (30 bytes, its name and its extra field)
    and the ``.npy`` header."""
    if (info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1
            or not info.filename.endswith(".npy")):
        return None
    with archive.open(info) as member:
        header = _npy_header(member)
        if header is None:
            return None
        shape, fortran_order, dtype = header
        start = member.tell()
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_length + extra_length + start
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes == 0 or offset + nbytes > size or start + nbytes != info.file_size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran_order else "C")


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
