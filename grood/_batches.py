"""Training data given as batches: iterate a re-iterable or a factory, peek, check."""

from __future__ import annotations

import warnings
from collections.abc import Generator, Mapping, Sized
from typing import Any

import numpy as np
from torch import Tensor

from grood._checks import (
    as_labels,
    as_tensor,
    check_finite_rows,
    check_labels,
    check_matrix,
    user_stacklevel,
)
from grood._columns import check_feature_names, feature_names
from grood._progress import progress


def check_loader(loader: Any, what: str, advice: str) -> None:
    """Refuse a tensor or array given where a loader of batches belongs (iterating it gives
    its single rows, each of which would run as a batch of its own), or a dict (one batch:
    iterating it gives its keys); ``what`` and ``advice`` frame the message."""
    if isinstance(loader, (Tensor, np.ndarray)):
        raise TypeError(f"{what}, got a {type(loader).__name__} (iterating it gives single "
                        f"rows){advice}")
    if isinstance(loader, Mapping):
        raise TypeError(f"{what}, got a {type(loader).__name__} (iterating it gives its "
                        f"keys){advice}")


def dict_batch_hint(batch: Mapping, example: str) -> str:
    """What to say of a batch given as a dict (a dataset of dict samples, as Hugging Face
    datasets and OpenOOD give them): its keys, and ``example`` (a format string taking
    ``b[key]`` for its first keys) of how to give the arrays instead."""
    keys = list(batch)
    picks = [f"b[{k!r}]" for k in keys[:2]] + ["b[...]"] * (2 - min(2, len(keys)))
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    return (f" (keys {shown}): pass the arrays themselves, e.g. "
            + example.format(*picks))


def _samplers(loader: Any) -> tuple[Any, Any]:
    """``loader``'s sampler and its batch sampler's (either may be None)."""
    return (getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None))


def _distributed_shuffle(sampler: Any) -> bool:
    """Whether ``sampler`` is a ``DistributedSampler`` that permutes the samples
    (``shuffle=True``, its default)."""
    from torch.utils.data import DistributedSampler

    return isinstance(sampler, DistributedSampler) and bool(getattr(sampler, "shuffle", False))


def shuffles(loader: Any) -> bool:
    """Whether ``loader`` (a ``DataLoader``) reads its samples in an order drawn at random: a
    ``RandomSampler``, ``SubsetRandomSampler``, ``WeightedRandomSampler`` or a
    ``DistributedSampler`` with ``shuffle=True`` (its default), its own or under its batch
    sampler."""
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    return any(isinstance(s, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))
               or _distributed_shuffle(s) for s in _samplers(loader))


def shuffle_advice(loader: Any) -> str:
    """How to read ``loader`` in a fixed order: ``shuffle=False`` on the loader, or on its
    ``DistributedSampler`` (whose default is to shuffle)."""
    if any(_distributed_shuffle(s) for s in _samplers(loader)):
        return ("give its DistributedSampler shuffle=False (its default is True; each rank "
                "then reads the samples rank, rank + world_size, ... in order)")
    return "give it a loader with shuffle=False"


def warn_if_shuffled(loader: Any, method: str) -> None:
    """Warn that ``method``'s results, one per sample of a loader that shuffles, come in the
    order of its own pass: nothing returned says which sample each belongs to."""
    if shuffles(loader):
        warnings.warn(
            f"{method} reads a loader that shuffles: its results come in the order of this "
            "pass, drawn at random, so they cannot be matched to the dataset's samples or "
            f"labels; {shuffle_advice(loader)}",
            UserWarning, stacklevel=user_stacklevel())


def check_reiterable(batches: Any, what: str, *, factory: bool = True) -> None:
    """Refuse a one-pass iterator (a generator, ``iter(loader)``) before any work: fitting
    reads its data more than once, and a used-up iterator would only be found empty on the
    second pass, after the first had run over the whole set. ``factory``: a function
    returning a new iterator is also taken."""
    if factory and callable(batches):
        return
    if iter(batches) is batches:
        raise TypeError(f"{what} must be re-iterable (a list, a DataLoader"
                        + (") or a function returning a new iterator" if factory else ")")
                        + ": fitting reads it more than once, and an iterator or generator "
                        "is used up after one pass")


def iter_batches(batches: Any, desc: str, distributed: bool = False
                 ) -> Generator[tuple[Tensor, Tensor | None, Tensor | None], None, None]:
    """``(features, labels or None, logits or None)`` tensors from a re-iterable or a factory
    (a batch's labels may be None where the fit needs none: the checks name them);
    ``distributed``: a rank of a distributed fit, for the message where there are none."""
    for x, y, lg, _ in named_batches(batches, desc, distributed):
        yield x, y, lg


def named_batches(batches: Any, desc: str, distributed: bool = False
                  ) -> Generator[tuple[Tensor, Tensor | None, Tensor | None,
                                   tuple[str, ...] | None], None, None]:
    """:func:`iter_batches`' batches with the column names of their features where they are
    tables (see :mod:`grood._columns`): every batch's are checked against the first's."""
    if not callable(batches):
        check_loader(batches, "the training data must be an iterable of (features, labels) "
                     "batches", ": fit one array with fit(features, labels)")
    source = batches() if callable(batches) else batches
    empty, first = True, None
    for i, batch in enumerate(source):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError(f"batch {i} must be (features, labels) or (features, labels, "
                            f"logits), got {type(batch).__name__}" + (dict_batch_hint(
                                batch, "lambda: (({}, {}) for b in loader)")
                                if isinstance(batch, Mapping) else ""))
        names = feature_names(batch[0])
        if i == 0:
            first = names
        elif names != first:
            check_feature_names(first, batch[0], f"batch {i}'s features",
                                against="of the first batch", reorder="b[first.columns]")
        x, _ = as_tensor(batch[0], "features")
        y = None if batch[1] is None else as_labels(batch[1])
        lg = as_tensor(batch[2], "logits")[0] if len(batch) == 3 and batch[2] is not None \
            else None
        empty = False
        yield x, y, lg, names
    if empty:
        raise ValueError(f"batches yielded nothing in the {desc}; pass a list, a DataLoader "
                         "or a function returning a new iterator (a generator is used up "
                         "after one pass)" + (
                             "; in a distributed fit every rank needs at least one batch, "
                             "which may have 0 rows (features [0, D], labels [0]), where "
                             "its share of the data is empty" if distributed else ""))


def peek_batch(batches: Any, distributed: bool = False
               ) -> tuple[tuple[Tensor, Tensor | None, Tensor | None], tuple[str, ...] | None]:
    """The first batch, checked, and its features' column names (a table's; else None),
    without consuming a re-iterable (``distributed``: for the message where there is none)."""
    it = named_batches(batches, "first pass", distributed)
    x, y, lg, names = next(it)
    it.close()
    check_matrix(x, "features", allow_empty=True)  # an empty batch still has D columns
    return (x, y, lg), names


def batch_count(batches: Any) -> int | None:
    """How many batches a re-iterable says it holds (a list, a DataLoader over a map-style
    dataset), else None (a function, an iterable dataset's loader, which may not know)."""
    try:
        return len(batches) if isinstance(batches, Sized) and not callable(batches) else None
    except TypeError:  # (a DataLoader over an IterableDataset without __len__)
        return None


def batch_progress(batches: Any, desc: str, enabled: bool | None) -> tuple[Any, bool]:
    """A streamed pass's progress, and whether it counts batches: against their number where
    the batches say it (:func:`batch_count`), with an estimate of the time left; else rows."""
    total = batch_count(batches)
    return progress(desc=desc, unit="batches" if total else "rows", total=total,
                    enabled=enabled, unit_scale=not total), bool(total)


def label_count(yb: Tensor | None) -> tuple[int, int]:
    """``(largest label + 1, rows)`` of one batch's labels (0 for an empty batch)."""
    if yb is None:
        raise ValueError("the training batches carry no labels")
    return (int(yb.max()) + 1 if yb.numel() else 0), yb.shape[0]


def check_batch(xb: Tensor, yb: Tensor | None, lb: Tensor | None, d: int, n_classes: int,
                offset: int, with_logits: bool) -> Tensor:
    """Validate one streamed training batch, returning its labels; row numbers are counted
    from the first batch. A batch may be empty; ``with_logits``: whether the first batch gave
    logits (every batch must do as it did: logits decide which rows are indexed)."""
    check_matrix(xb, "features", n_cols=d, allow_empty=True,
                 cols_from="the first training batch has {}")
    check_finite_rows(xb, "features", row_offset=offset)
    if yb is None:
        raise ValueError("the training batches carry no labels")
    if (lb is not None) != with_logits:
        raise ValueError(f"the batch at row {offset} {'has no' if with_logits else 'has'} "
                         f"logits and the first batch {'has' if with_logits else 'has none'}: "
                         "logits decide which rows are indexed, so give them for every batch "
                         "or for none")
    if lb is not None:
        if lb.shape != (xb.shape[0], n_classes):
            raise ValueError(f"logits of shape {tuple(lb.shape)} do not match "
                             f"{xb.shape[0]} rows and {n_classes} classes")
        check_finite_rows(lb, "logits", row_offset=offset)
    check_labels(yb, "labels", xb.shape[0], n_classes=n_classes, allow_empty=True,
                 n_classes_from="the logits' columns" if lb is not None else "n_classes")
    return yb
