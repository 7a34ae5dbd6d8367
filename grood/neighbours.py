"""Which training samples a sample is nearest to in gradient space: ``GROOD.kneighbors``, and
the search over every row that it and the scores share (:func:`search_all`).

A score is the distance to the k-th nearest indexed training gradient; :class:`Neighbours` (a
part of :class:`grood.GROOD`) names those gradients by the training rows they were computed
from, so a score can be checked against the training images behind it (an OOD sample scored
as in-distribution, and the training sample it lies next to).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from grood._checks import ArrayLike, ArrayT, check_positive_int, compute_dtype, user_stacklevel


class Neighbours:
    """``kneighbors`` of a fitted detector."""

    def kneighbors(self, features: ArrayT, n_neighbors: int | None = None
                   ) -> tuple[ArrayT, ArrayT]:
        """The nearest indexed training gradients of each sample's gradient.

        Returns ``(distances, rows)``, both [N, n_neighbors], nearest first: the squared L2
        distances in gradient space (as the score uses them: ``score_samples`` is
        ``-distances[:, k - 1]`` for ``n_neighbors >= k``; squared, as faiss gives them, where
        scikit-learn's ``kneighbors`` gives plain distances) and the training-row numbers of
        those gradients (int64): the position of the row among the rows ``fit`` read
        (``fit``'s arrays, ``fit_batches``' batches or ``fit_model``'s loader, in order; in a
        distributed fit, rank 0's rows, then rank 1's, ...). Only correctly classified
        training rows are indexed (``indexed_rows_`` lists them); equal distances list the
        lower row first. ``n_neighbors`` defaults to ``k``; numpy in, numpy out, else tensors
        on the input's device. A detector loaded from a version 1 file (saved before
        detectors recorded their indexed rows) does not know its rows and says so.
        """
        warn_row_order(self)
        dists, rows, _, kind = neighbours_and_predict(self, features, n_neighbors)
        return kind.wrap(dists), kind.wrap(rows)


#: ``fit_model``'s and ``fit_batches``' record (``extractor_``) of a training loader that
#: shuffles.
SHUFFLED = {"row_order": "shuffled"}


def order_record(loader: Any) -> dict[str, str]:
    """The fit's record of its training loader's order: :data:`SHUFFLED` for a loader that
    shuffles (its training-row numbers then name no sample), empty otherwise."""
    from grood._batches import shuffles

    return dict(SHUFFLED) if shuffles(loader) else {}


def rows_shuffled(extractor: dict | None) -> bool:
    """Whether the fit's record (a detector's ``extractor_``, a file's
    ``state.extractor``) says its loader shuffled: its row numbers name no dataset sample."""
    return (extractor or {}).get("row_order") == SHUFFLED["row_order"]


def warn_row_order(det: Any) -> None:
    """Warn that the training-row numbers cannot be looked up where the fit read a loader that
    shuffles (``fit_model`` or ``fit_batches``; recorded with the detector, saved with it)."""
    if rows_shuffled(getattr(det, "extractor_", None)):
        warnings.warn(
            "this detector was fitted on a loader that shuffles: its training-row numbers "
            "count the rows in the order of the fit's own pass, which the loader "
            "does not repeat, so they name no particular sample of the dataset (the scores "
            "are unaffected); to look neighbours up in the dataset, fit on a loader that does "
            "not shuffle (shuffle=False)", stacklevel=user_stacklevel())


def neighbours_and_predict(det: Any, features: ArrayLike, n_neighbors: int | None,
                           allow_empty: bool = False) -> tuple[Tensor, Tensor, Tensor, Any]:
    """One pass of :meth:`Neighbours.kneighbors` that also keeps the predictions: ``(distances,
    rows, preds, kind)`` as tensors on the detector's device, ``kind`` what to return them as
    (the scores are ``-distances[:, det.k - 1]`` where ``n_neighbors >= det.k``); features of
    0 rows are refused unless ``allow_empty`` (one batch of a stream)."""
    x, kind = det._read(features, allow_empty, search=True, uses_k=n_neighbors is None)
    if n_neighbors is not None:  # (the detector's k was checked with the features)
        k = check_positive_int(n_neighbors, "n_neighbors")
        check_within_index(det, k, "n_neighbors")
    else:
        k = det.k
    dists, rows, preds = search_all(det, x, k, rows=True)
    assert rows is not None  # (asked for)
    return dists, rows, preds, kind


def scores_by_k(det: Any, features: ArrayLike, ks: Sequence[int]
                ) -> tuple[dict[int, Any], Any] | None:
    """The scores at each of ``ks`` from one search at the largest (what :func:`grood.tune`
    and OpenOOD's parameter search share between values of ``k``): ``-distances[:, k - 1]``,
    as :meth:`Neighbours.kneighbors` and the scores relate; with the predictions, which no k
    changes. Numpy in, numpy out, else tensors on the input's device. None for an approximate
    index (IVF), whose search at the largest k refuses rows it found fewer neighbours for
    than that k, which a smaller k does not need."""
    det._check_fitted()
    if det.index_.approximate:
        return None
    x, kind = det._read(features, search=True, uses_k=False)
    k_max = max(check_positive_int(k, "k") for k in ks)
    check_within_index(det, k_max, "k")
    dt = result_dtype(det, x.dtype)
    out = {k: torch.empty(x.shape[0], dtype=dt, device=det.device_) for k in ks}
    preds = torch.empty(x.shape[0], dtype=torch.int64, device=det.device_)
    for r0, r1, (d, _), p in det._passes(x, k=k_max):  # no [N, k_max] tensor kept
        preds[r0:r1] = p
        for k, scores in out.items():
            scores[r0:r1] = 0.0 - d[:, k - 1]  # 0.0 - x: no "-0.0"
    return {k: kind.wrap(scores) for k, scores in out.items()}, kind.wrap(preds)


def result_dtype(det: Any, dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores and distances for features of ``dtype``: float64 features are
    scored in float64 (gradient step and exact search)."""
    return torch.promote_types(det.dtype_, compute_dtype(dtype))


def check_within_index(det: Any, value: int, name: str) -> None:
    """``value`` neighbours (``k`` or ``n_neighbors``) exist among every rank's indexed
    gradients: a missing one would be a -inf score or an empty row."""
    indexed = sum(det.shard_sizes_)
    if value > indexed:
        raise ValueError(f"{name}={value} but the index holds only {indexed} training "
                         f"gradients; lower {name} (or refit)")


def search_all(det: Any, x: Tensor, k: int, rows: bool = False
               ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Every row of the checked features ``x``, batch by batch: ``(distances [N, k], ids
    [N, k] as training-row numbers with ``rows`` (None without), preds [N])`` of its k nearest
    indexed gradients, on the detector's device."""
    n = x.shape[0]
    dists = torch.empty((n, k), dtype=result_dtype(det, x.dtype), device=det.device_)
    ids = torch.empty((n, k), dtype=torch.int64, device=det.device_) if rows else None
    preds = torch.empty(n, dtype=torch.int64, device=det.device_)
    for r0, r1, (d, i), p in det._passes(x, k=k, rows=rows):
        dists[r0:r1], preds[r0:r1] = d, p
        if ids is not None:
            ids[r0:r1] = i
    return dists, ids, preds
