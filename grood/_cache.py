"""A fit's training batches kept from its first pass for the passes after it
(``fit_model(cache=...)``), so the model runs over the training loader once: in host memory,
or in files in a temporary folder.

The passes after the first read the logits only for which class they pick (their argmax: the
rows the model gets right are the ones indexed); the first pass checks them whole. So the
logits are kept as that class alone and given back as its one-hot row, in their dtype: the
same argmax, at 8 bytes a row instead of C values (ImageNet-21k's C = 21,841 logits in
float32 would be ten times the size of its D = 2048 features).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from grood._progress import progress

#: A training batch: features, labels (or None), logits (or None).
Batch = tuple[Tensor, Tensor | None, Tensor | None]
KINDS = ("features", "labels", "logits")


class Picked(NamedTuple):
    """Logits kept as the class each row's logits pick: ``rows`` (that class, int64 [B]; a
    tensor in host memory, else its place in a file), of ``classes`` columns and ``dtype``."""

    rows: Any
    classes: int
    dtype: torch.dtype


class BatchCache:
    """A factory of iterators over ``make()``'s batches that calls ``make`` until one of its
    iterations runs to the end, keeping every batch of that one as it passes: in host memory
    (``where="host"``) or appended to files in a new temporary folder inside the folder
    ``where``. Every later iteration gives the kept batches back, in the same order, on
    ``device`` (default: the CPU): features and labels as they were given (dtype, shape,
    values), logits as one-hot rows of the class they picked (see the module notes). An
    iteration left before its end (a peek at the first batch) keeps nothing. :meth:`close`
    removes the folder and drops what was kept.
    """

    def __init__(self, make: Callable[[], Iterator[Batch]], where: str | os.PathLike, *,
                 desc: str = "grood fit (kept batches)", show: bool | None = None) -> None:
        self._make, self._desc, self._show = make, desc, show
        self._kept: list[Any] = []
        self._complete = False
        self.folder: Path | None = None  # made by the first iteration, inside self._parent
        self._parent: Path | None = None
        if isinstance(where, str) and where == "host":
            return
        parent = Path(where) if isinstance(where, (str, os.PathLike)) else None
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            what = (type(where).__name__ if parent is None else
                    "no such folder" if not parent.exists() else
                    "not a folder" if not parent.is_dir() else "not writable")
            raise ValueError(f"cache must be 'host' (the batches kept in host memory) or a "
                             f"folder to keep them in, got {where!r} ({what})")
        self._parent = parent

    def __call__(self, device: torch.device | str | None = None) -> Iterator[Batch]:
        return self._replay(device) if self._complete else self._record()

    def close(self) -> None:
        """Drop the kept batches and remove their folder (if any)."""
        self._kept, self._complete = [], False
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _record(self) -> Iterator[Batch]:
        self._kept = []
        if self._parent is not None and self.folder is None:
            try:
                self.folder = Path(tempfile.mkdtemp(prefix="grood-fit-cache-",
                                                    dir=self._parent))
            except OSError as exc:
                raise OSError(f"fit_model(cache={str(self._parent)!r}): cannot make a folder "
                              f"there ({exc})") from None
        files = None if self.folder is None else [open(self.folder / k, "wb") for k in KINDS]
        keep = _host if files is None else _writer(files)
        try:
            for xb, yb, lb in self._make():
                self._kept.append((keep(0, xb), keep(1, yb), _picked(lb, keep)))
                yield xb, yb, lb
        finally:
            for f in files or ():
                f.close()
        self._complete = True

    def _replay(self, device: torch.device | str | None) -> Iterator[Batch]:
        shown = progress(total=len(self._kept), desc=self._desc, unit="batches",
                         enabled=self._show)
        files = None if self.folder is None else [open(self.folder / k, "rb") for k in KINDS]

        def get(i: int, kept: Any) -> Any:  # a kept tensor (or None), read back
            return kept if files is None else _read(files[i], kept)

        try:
            with shown:
                for x_kept, y_kept, l_kept in self._kept:
                    lb = get(2, l_kept.rows if isinstance(l_kept, Picked) else l_kept)
                    if isinstance(l_kept, Picked):  # (one-hot rows made where they are used)
                        lb = torch.nn.functional.one_hot(lb.to(device), l_kept.classes)
                        lb = lb.to(l_kept.dtype)
                    yield cast(Batch, tuple(None if t is None else t.to(device)
                                            for t in (get(0, x_kept), get(1, y_kept), lb)))
                    shown.update(1)
        finally:
            for f in files or ():
                f.close()


def _picked(lb: Tensor | None, keep: Callable[[int, Tensor | None], Any]) -> Any:
    """Logits to keep: as :class:`Picked` where they are a matrix with columns (anything else
    is kept whole; the fit's first pass refuses it)."""
    if lb is None or lb.ndim != 2 or lb.shape[1] == 0 or not lb.is_floating_point():
        return keep(2, lb)
    return Picked(keep(2, lb.argmax(dim=1)), lb.shape[1], lb.dtype)


def _host(_i: int, t: Tensor | None) -> Tensor | None:
    """``t`` kept in host memory."""
    return None if t is None else t.detach().cpu()


def _writer(files: list[Any]) -> Callable[[int, Tensor | None], Any]:
    """Keep a tensor of kind ``i`` by appending its bytes to ``files[i]``."""
    return lambda i, t: _write(files[i], t)


def _write(f: Any, t: Tensor | None) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Append ``t``'s bytes to ``f``; its shape and dtype, to read it back (None for None)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    if t.numel():
        try:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        except OSError as exc:
            raise OSError(f"fit_model(cache=...): could not keep a training batch in "
                          f"{f.name} ({exc})") from None
    return tuple(t.shape), t.dtype


def _read(f: Any, spec: tuple[tuple[int, ...], torch.dtype] | None) -> Tensor | None:
    """The next tensor of ``f``, of shape and dtype ``spec``."""
    if spec is None:
        return None
    t = torch.empty(spec[0], dtype=spec[1])
    if t.numel():
        buffer = t.reshape(-1).view(torch.uint8).numpy()
        if f.readinto(buffer.data) != buffer.size:
            raise OSError(f"fit_model(cache=...): {f.name} is shorter than the batches kept "
                          "in it (changed since they were written?)")
    return t
