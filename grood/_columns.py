"""Column names of tables given as features (a pandas or polars DataFrame).

A table's columns are read in the order it holds them. A detector fitted on a table records
its column names (``feature_names_in_``, as scikit-learn estimators do) and checks every table
it scores against them: the same columns in another order would otherwise be scored as other
features, silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
from torch import Tensor

from grood._checks import user_stacklevel

__all__ = ["check_feature_names", "feature_names", "listed", "names_checked", "ood_columns",
           "set_feature_names"]

#: Set (per thread and task) while a caller scores a tensor made from a table whose names it
#: has checked already: the tensor has none, and is not warned of.
_NAMES_CHECKED: ContextVar[bool] = ContextVar("grood_names_checked", default=False)
#: Names listed in a message before the rest are counted.
_SHOWN = 6


def listed(names: Any) -> str:
    """``names`` quoted and joined, the first few of many and a count of the rest."""
    names = [str(n) for n in names]
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def feature_names(x: Any, name: str = "features") -> tuple[str, ...] | None:
    """The column names of ``x`` where it is a table whose columns are all named by strings
    (a DataFrame with a ``columns`` attribute); None for arrays, tensors and tables whose
    columns are numbered. Names of mixed types are refused: they could be neither recorded nor
    ignored without a doubt about what was meant."""
    if isinstance(x, (Tensor, np.ndarray)) or not hasattr(x, "columns"):
        return None
    try:
        names = list(x.columns)
    except TypeError:  # a ``columns`` that is not a list of names
        return None
    text = [isinstance(n, str) for n in names]
    if not names or not any(text):
        return None
    if not all(text):
        kinds = sorted({type(n).__name__ for n in names})
        raise TypeError(f"{name}' column names are of several types ({', '.join(kinds)}); "
                        "name every column by a string (df.columns = df.columns.astype(str)) "
                        "to have them recorded and checked, or none (e.g. df.to_numpy())")
    return tuple(names)


def ood_columns(names: tuple[str, ...] | None, ood_features: Any) -> tuple[str, ...] | None:
    """``names``, the training features' column names (see :func:`feature_names`), after
    checking that ``ood_features`` (when given) hold the same columns in the same order."""
    if ood_features is not None:
        check_feature_names(names, ood_features, "ood_features",
                            against="of the training features",
                            reorder="ood_features[features.columns]")
    return names


def check_feature_names(fitted: Any, x: Any, name: str = "features", *,
                        against: str = "the detector was fitted on",
                        reorder: str = "df[det.feature_names_in_]") -> None:
    """Check ``x``'s column names against ``fitted`` (the names recorded at fit, any sequence
    such as ``feature_names_in_``; None where there were none; ``against`` says whose they
    are): other names or another order raise; a table where an array was fitted, or the other
    way round, is warned of (its columns are taken in the order given). ``reorder``: how to
    select them in order."""
    names = feature_names(x, name)
    fitted = None if fitted is None else tuple(fitted)
    if names == fitted:
        return
    if fitted is None or names is None:
        if names is None and _NAMES_CHECKED.get():
            return
        said = (f"have named columns, but those {against} had none" if fitted is None else
                f"have no column names, but those {against} were named ({listed(fitted)})")
        warnings.warn(f"{name} {said}: the columns are taken in the order given",
                      UserWarning, stacklevel=user_stacklevel())
        return
    known, given = set(fitted), set(names)
    unseen = [n for n in names if n not in known]
    missing = [n for n in fitted if n not in given]
    if unseen or missing or len(names) != len(fitted):
        parts = ([f"not among them: {listed(unseen)}"] if unseen else []) + (
            [f"missing: {listed(missing)}"] if missing else []) or [
            f"{len(names)} columns, {len(fitted)} there"]  # the same names, some repeated
        select = "" if missing or not unseen else f": select those, e.g. {reorder}"
        raise ValueError(f"{name}' columns are not those {against} ({'; '.join(parts)})"
                         f"{select}")
    moved = next(i for i, (a, b) in enumerate(zip(names, fitted, strict=True)) if a != b)
    raise ValueError(f"{name} hold the columns {against} in another order (column {moved} is "
                     f"{names[moved]!r}, was {fitted[moved]!r}): select them in that order, "
                     f"e.g. {reorder}")


@contextmanager
def names_checked() -> Iterator[None]:
    """Within it, an input without column names where names were fitted is not warned of: the
    caller checked the table it came from (:func:`check_feature_names`) before making it a
    tensor. A context variable, not a ``warnings`` filter: other threads' warnings and
    filters are left alone."""
    token = _NAMES_CHECKED.set(True)
    try:
        yield
    finally:
        _NAMES_CHECKED.reset(token)


def set_feature_names(det: Any, names: tuple[str, ...] | None) -> None:
    """Record ``names`` on a fitted ``det`` as ``feature_names_in_`` (a numpy array of
    objects, as scikit-learn's); a detector fitted without names has no such attribute."""
    if names is None:
        det.__dict__.pop("feature_names_in_", None)
    else:
        det.feature_names_in_ = np.asarray(names, dtype=object)
