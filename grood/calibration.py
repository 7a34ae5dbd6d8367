"""An OOD decision threshold for a fitted detector, chosen on held-out in-distribution data.

Scores rank samples; a deployment has to decide. :class:`Calibration` (a part of
:class:`grood.GROOD`) chooses the threshold that accepts a fraction ``tpr`` of held-out ID
samples (:func:`grood.metrics.threshold_at_tpr`) and flags samples scoring below it. The
threshold belongs to the scores it was chosen on: it is recorded with the search settings they
depend on beyond the fitted state (``k``, IVF's ``nprobe``), saved with the detector
(:mod:`grood.persistence`, checked by :func:`check_calibration` when read), refused once those
settings changed, and dropped by a new ``fit``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import numpy as np
import torch

from grood import distributed as dist
from grood._checks import ArrayLike, ArrayT, check_fraction, is_count, user_stacklevel
from grood._gradients import rounding_distance, subnormal_rows, tiny_gradient_norm
from grood.errors import DetectorFileError, NotFittedError
from grood.metrics import as_score_array, threshold_acceptance, threshold_at_tpr

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import Tensor, nn
    from typing_extensions import Self

    from grood.functional import NCPGradient
    from grood.index import GradientIndex

#: What ``calibration_`` records.
RECORD_KEYS = ("threshold", "tpr", "n", "k", "nprobe")


#: The share of scored rows at distance 0 (training rows, or unresolved) past which
#: calibrating and evaluating warn.
ZERO_SHARE = 0.01


def training_rows_clause(zero: int, n: int, k: int) -> str | None:
    """Where ``zero`` of ``n`` scored rows have an indexed gradient at distance 0 — more than
    1 %, more than exact duplicates explain — how such rows score at ``k``: ``"so they score
    0"`` (k = 1) or ``"one of their k=K neighbours"``; else None. Calibrating and ``grood eval``
    warn by it."""
    if zero <= ZERO_SHARE * n:
        return None
    return "so they score 0" if k == 1 else f"one of their k={k} neighbours"


#: Why a row scores 0 when its own gradient is too small for its squared distances, and
#: what resolves it (calibration's and evaluation's warnings).
UNRESOLVED_ZEROS = ("their gradients' norm q_ood is below the square root of the dtype's "
                    f"smallest normal number, {tiny_gradient_norm(torch.float32):.2g} in "
                    "float32: squared distances between such gradients fall below its range, "
                    "whatever their true order")
UNRESOLVED_FIX = ("score float64 features (fitted in float64 too where the fit warned; with "
                  "index='exact': a faiss index holds float32 gradients)")


#: The spread (or mean shortfall from ``tpr``), as a fraction, of a threshold's acceptance of
#: new ID samples past which :meth:`Calibration.calibrate` warns that it was chosen on too few
#: rows: 20 rows at tpr = 0.95 (90.5 ± 6.3 %) are too few, 40 (92.7 ± 4.0 %) not.
ACCEPTANCE_SLACK = 0.05


def _warn_if_few(n: int, tpr: float) -> None:
    """Warn where a threshold chosen on ``n`` rows accepts, of new ID samples, a fraction
    whose spread or mean shortfall from ``tpr`` exceeds :data:`ACCEPTANCE_SLACK`."""
    mean, std = threshold_acceptance(n, tpr)
    if max(abs(tpr - mean), std) > ACCEPTANCE_SLACK:
        more, more_std = threshold_acceptance(1000, tpr)
        warnings.warn(
            f"the threshold was chosen on {n} row(s): of new in-distribution samples it "
            f"accepts {100 * mean:.1f} ± {100 * std:.1f} % "
            f"(grood.metrics.threshold_acceptance), not the {100 * tpr:g} % asked for; "
            f"calibrate on more held-out rows (1,000 give {100 * more:.1f} ± "
            f"{100 * more_std:.1f} %)", UserWarning, stacklevel=user_stacklevel())


def unresolved_share(unresolved: int, n: int) -> bool:
    """Whether more than :data:`ZERO_SHARE` of ``n`` scored rows scored 0 unresolved."""
    return unresolved > ZERO_SHARE * n


def zero_counts(found: list) -> Tensor:
    """``[training rows, unresolved rows]`` among the scored rows at distance 0, summed over
    the batches' counts (one host read of them all)."""
    if not found:
        return torch.zeros(2, dtype=torch.int64)
    return torch.stack(found).sum(0).cpu()


#: Per thread, by detector (``id``): the counts :meth:`Calibration._counting_training_rows`
#: collects, one list per scored batch of the rows whose nearest indexed gradient is at
#: distance 0 (indexed training rows; device tensors, read once at the end).
_COUNTING = threading.local()


class Calibration:
    """``calibrate`` / ``calibrate_model`` / ``is_ood`` of a fitted detector (it scores with
    ``score_samples`` / ``score_model``)."""

    if TYPE_CHECKING:  # what the detector class provides
        k: int
        index_: GradientIndex
        class_prototypes_: Tensor
        _sharded: bool

        def score_samples(self, features: ArrayT) -> ArrayT: ...

        def _scores_in_any_order(self, model: nn.Module, loader: Iterable, *,
                                 features: str | None = None,
                                 device: str | torch.device | None = None,
                                 autocast: torch.dtype | None = None) -> Tensor: ...

    def calibrate(self, features: ArrayLike, *, tpr: float = 0.95) -> Self:
        """Choose the threshold :meth:`is_ood` flags by, on held-out in-distribution features.

        ``threshold_`` becomes the largest score that accepts at least a fraction ``tpr`` of
        ``features`` (:func:`grood.metrics.threshold_at_tpr`); ``calibration_`` records it
        with ``tpr``, the number of rows and the search it holds for (``k``, and IVF's
        ``nprobe``). Saved with the detector; a new ``fit`` drops it. A distributed detector
        chooses it from every rank's rows. Of *new* ID samples it accepts a fraction whose
        mean and spread over calibration sets of this size
        :func:`grood.metrics.threshold_acceptance` gives (90.5 ± 6.3 % for 20 rows at
        ``tpr=0.95``, 94.9 ± 0.7 % for 1,000).

        Use data the detector was not fitted on: training rows score higher than new samples
        (with ``k=1`` an indexed row scores 0), so a threshold of 0 — at least ``tpr`` of the
        rows are indexed gradients — is refused.

        Returns:
            the detector.
        """
        level = self._checked_tpr(tpr)  # before any scoring
        with self._counting_training_rows() as found:
            scores = self.score_samples(features)
        return self._calibrate_on(scores, level, found)

    def calibrate_model(self, model: Any, loader: Any, *, tpr: float = 0.95,
                        **kwargs: Any) -> Self:
        """:meth:`calibrate` on a held-out ID loader's samples, through ``model``
        (``score_model``'s streaming and options: ``features``, ``device``, ``autocast``)."""
        level = self._checked_tpr(tpr)
        with self._counting_training_rows() as found:
            # (a quantile: the order does not matter, a loader that shuffles is fine)
            scores = self._scores_in_any_order(model, loader, **kwargs)
        return self._calibrate_on(scores, level, found)

    def _checked_tpr(self, tpr: Any) -> float:
        """``tpr`` checked; a sharded detector's ranks must give the same one (each would
        otherwise keep another threshold, chosen on the same gathered scores)."""
        sharded = getattr(self, "_sharded", False)
        with dist.together(sharded, "checking tpr"):
            level = check_fraction(tpr, "tpr")
        if sharded:
            dist.check_agree(dist.gather_json({"tpr": level}), ("tpr",), "calibration")
        return level

    @contextmanager
    def _counting_training_rows(self) -> Iterator[list[Tensor]]:
        """Collect, while this thread scores with this detector, how many rows have an
        indexed gradient at distance 0. Per thread: other threads scoring with the same
        detector meanwhile (a server's workers) are not counted, and each thread's
        calibration or evaluation keeps its own count."""
        found: list[Tensor] = []
        counting = _COUNTING.__dict__.setdefault("by_detector", {})
        outer = counting.get(id(self))
        counting[id(self)] = found
        try:
            yield found
        finally:
            if outer is None:
                del counting[id(self)]
            else:  # (a calibration inside an evaluation, say)
                counting[id(self)] = outer

    def _count_training_rows(self, found: tuple[Tensor, Tensor] | None,
                             res: NCPGradient) -> None:
        """While this thread calibrates or evaluates, count the rows of a scored batch (its
        gradient step's results ``res``) whose nearest indexed gradient (``found``: the
        search's distances and ids, None where the pass searched nothing) is at distance 0,
        as ``[training rows, unresolved rows]`` (device sums, read at the end). At distance
        0 to the detector's rounding: float64 rows scored by a float32 detector lie within
        :func:`grood._gradients.rounding_distance` of their own float32 gradients (those
        whose float32 gradients are subnormal, :func:`grood._gradients.subnormal_rows`, lie
        as near other such rows, and are not counted). A distance of 0 is an indexed
        training row's, unless the row's own gradient (norm ``q_ood``) is too small for its
        squared distances (:func:`grood._gradients.tiny_gradient_norm`): then it may be an
        underflow, and the row is counted as unresolved."""
        counts = _COUNTING.__dict__.get("by_detector", {}).get(id(self))
        if counts is not None and found is not None:
            q_ood, held = res.q_ood, self.index_.holds_dtype
            indexed = held or self.class_prototypes_.dtype  # (what the gradients were held in)
            zero = (found[0][:, 0] <= rounding_distance(res, indexed)) & ~subnormal_rows(
                res, indexed)
            # (float64 rows' gradients held as float32 ones by a faiss index underflow so)
            small = q_ood < tiny_gradient_norm(held or q_ood.dtype)
            counts.append(torch.stack(((zero & ~small).sum(), (zero & small).sum())))

    def _calibrate_on(self, scores: Any, tpr: float, found: list) -> Self:
        """Set the threshold from held-out ID ``scores`` (every rank's, when sharded);
        ``found``: the scoring's counts of rows equal to indexed training rows."""
        scores = torch.from_numpy(as_score_array(scores, "scores"))
        counts = zero_counts(found)
        if self._sharded:
            scores = torch.cat(dist.all_gather_rows(scores))
            counts = dist.all_reduce(counts)
        threshold = threshold_at_tpr(scores.numpy(), tpr)
        zero, unresolved, n = int(counts[0]), int(counts[1]), scores.numel()
        # With k = 1, rows at distance 0 up to rounding (float64 rows of a float32 detector's
        # training set) score within rounding of 0, not at it: a threshold chosen among them
        # is refused as one of 0 is.
        rounded = threshold < 0 and self.k == 1 and zero + unresolved >= tpr * n
        if threshold >= 0 or rounded:
            why, fix = (("their gradients are indexed training gradients", "calibrate on "
                         "held-out in-distribution data, not on the training set")
                        if zero >= unresolved else (UNRESOLVED_ZEROS, UNRESOLVED_FIX))
            said = (f"{zero + unresolved} of the {n} calibration rows score 0 up to rounding"
                    if rounded else f"{int((scores == 0).sum())} of the {n} calibration rows "
                    "score 0")
            raise ValueError(f"{said} ({why}), so a threshold accepting tpr={tpr:g} of them "
                             f"would flag every new sample: {fix}")
        if unresolved_share(unresolved, n):
            warnings.warn(
                f"{unresolved} of the {n} calibration rows score 0 ({UNRESOLVED_ZEROS}): "
                f"their order is lost, and the threshold with it; {UNRESOLVED_FIX}",
                UserWarning, stacklevel=user_stacklevel())
        held = training_rows_clause(zero, n, self.k)
        if held is not None:
            warnings.warn(
                f"{zero} of the {n} calibration rows equal indexed training rows (an indexed "
                f"gradient at distance 0 up to rounding, {held}): is part of the calibration "
                "set from the training set? Such rows score higher than new in-distribution "
                "samples, which raises the threshold: more of those would be flagged than tpr "
                "says",
                UserWarning, stacklevel=user_stacklevel())
        _warn_if_few(n, tpr)
        self.calibration_ = {"threshold": threshold, "tpr": tpr, "n": n,
                             **self._search_setting()}
        return self

    @property
    def threshold_(self) -> float:
        """The threshold :meth:`is_ood` flags by (read-only: it is ``calibration_``'s, which
        is what a saved detector keeps)."""
        try:
            return self.calibration_["threshold"]
        except AttributeError:
            raise AttributeError("threshold_: the detector has no threshold yet (call "
                                 "calibrate)") from None

    def is_ood(self, features: ArrayT) -> ArrayT:
        """Whether each sample of features [N, D] scores below ``threshold_`` (set by
        :meth:`calibrate` or loaded with the detector): bool [N], numpy for numpy input, else
        a tensor on the input's device."""
        threshold = current_threshold(self)
        return cast(ArrayT, self.score_samples(features) < threshold)  # (same type as scores)

    def _search_setting(self) -> dict[str, Any]:
        """What the scores a threshold was chosen on depend on beyond the fitted state."""
        return {"k": self.k, "nprobe": getattr(self.index_, "nprobe", None)}

    def _drop_calibration(self) -> None:
        """Forget the threshold (a new fit: it was chosen on the old one's scores)."""
        self.__dict__.pop("calibration_", None)


@overload
def current_threshold(det: Any, *, required: Literal[True] = True) -> float: ...
@overload
def current_threshold(det: Any, *, required: bool) -> float | None: ...
def current_threshold(det: Any, *, required: bool = True) -> float | None:
    """``det.threshold_``, after checking that the detector still scores as it did when the
    threshold was chosen (``k`` and IVF's ``nprobe`` may have changed since: its scores, and
    the fraction of ID samples the threshold accepts, with them). Without a threshold: an
    error, or ``None`` when not ``required``."""
    det._check_fitted()
    if not hasattr(det, "calibration_"):
        if not required:
            return None
        raise NotFittedError("this GROOD detector has no threshold yet: call "
                             "calibrate(held_out_id_features) after fit()")
    det._apply_score_params()  # k checked, the index's search options brought up to date
    now, then = det._search_setting(), det.calibration_
    changed = [f"{key}={then[key]} -> {now[key]}" for key in now if now[key] != then[key]]
    if changed:
        raise ValueError(f"the threshold was chosen on scores of another search "
                         f"({', '.join(changed)}); set it back or calibrate again")
    return det.threshold_


def check_calibration(path: Any, record: Any) -> None:
    """A saved threshold is one :meth:`Calibration.calibrate` records, or the file is refused:
    a damaged one would flag samples by a wrong threshold without a word."""
    if record is None:
        return

    ok = (isinstance(record, dict) and set(record) == set(RECORD_KEYS)
          and isinstance(record["threshold"], float)
          and bool(np.isfinite(record["threshold"])) and record["threshold"] < 0
          and isinstance(record["tpr"], float) and 0 < record["tpr"] <= 1
          and is_count(record["n"]) and is_count(record["k"])
          and (record["nprobe"] is None or is_count(record["nprobe"])))
    if not ok:
        raise DetectorFileError(f"{path} is inconsistent: invalid calibration {record!r}")
