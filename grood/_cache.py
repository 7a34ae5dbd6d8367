"""A fit's training batches kept from its first pass for the passes after it
(``fit_model(cache=...)``), so the model runs over the training loader once: in host memory,
or in files in a temporary folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from grood._progress import progress

#: A training batch: features, labels (or None), logits (or None).
Batch = tuple[Tensor, Tensor | None, Tensor | None]
KINDS = ("features", "labels", "logits")


class BatchCache:
    """A factory of iterators over ``make()``'s batches that calls ``make`` until one of its
    iterations runs to the end, keeping every batch of that one as it passes: in host memory
    (``where="host"``) or appended to files in a new temporary folder inside the folder
    ``where``. Every later iteration reads the kept batches back, in the same order, as they
    were given (dtype, shape, values), on the CPU. An iteration left before its end (a peek at
    the first batch) keeps nothing. :meth:`close` removes the folder and drops what was kept.
    """

    def __init__(self, make: Callable[[], Iterator[Batch]], where: str | os.PathLike, *,
                 desc: str = "grood fit (kept batches)", show: bool | None = None) -> None:
        self._make, self._desc, self._show = make, desc, show
        self._kept: list[Any] = []
        self._complete = False
        self.folder: Path | None = None  # made by the first iteration, inside self._parent
        self._parent = None if isinstance(where, str) and where == "host" else where
        if self._parent is None:
            return
        parent = Path(where) if isinstance(where, (str, os.PathLike)) else None
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            what = (type(where).__name__ if parent is None else
                    "no such folder" if not parent.exists() else
                    "not a folder" if not parent.is_dir() else "not writable")
            raise ValueError(f"cache must be 'host' (the batches kept in host memory) or a "
                             f"folder to keep them in, got {where!r} ({what})")
        self._parent = parent

    def __call__(self) -> Iterator[Batch]:
        return self._replay() if self._complete else self._record()

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
        try:
            for batch in self._make():
                if files is None:
                    self._kept.append(tuple(None if t is None else t.detach().cpu()
                                            for t in batch))
                else:
                    self._kept.append(tuple(_write(f, t) for f, t in zip(files, batch,
                                                                         strict=True)))
                yield batch
        finally:
            for f in files or ():
                f.close()
        self._complete = True

    def _replay(self) -> Iterator[Batch]:
        shown = progress(total=len(self._kept), desc=self._desc, unit="batches",
                         enabled=self._show)
        with shown:
            if self.folder is None:
                for batch in self._kept:
                    yield batch
                    shown.update(1)
                return
            files = [open(self.folder / k, "rb") for k in KINDS]
            try:
                for specs in self._kept:
                    yield cast(Batch, tuple(_read(f, spec)
                                            for f, spec in zip(files, specs, strict=True)))
                    shown.update(1)
            finally:
                for f in files:
                    f.close()


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
