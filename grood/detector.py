"""The GROOD estimator: fit on training features, score new features (higher = ID).

The model front end (``fit_model`` / ``score_model``) is :mod:`grood.model`, the sharded
search :mod:`grood.distributed`, detector files :mod:`grood.persistence`; the gradient step of
a fitted detector is :mod:`grood._gradients`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from grood import distributed as dist
from grood import ops
from grood._batches import (
    batch_progress,
    check_loader,
    check_reiterable,
    dict_batch_hint,
    iter_batches,
    label_count,
    peek_batch,
    warn_if_shuffled,
)
from grood._checks import (
    ArrayLike,
    ArrayT,
    as_tensor,
    batches,
    check_device,
    check_finite_rows,
    check_flag,
    check_matrix,
    check_positive_int,
    compute_device,
    compute_dtype,
    prefixed_errors,
    user_stacklevel,
)
from grood._columns import check_feature_names, feature_names, ood_columns, set_feature_names
from grood._fit import (
    FittedState,
    check_inputs,
    check_ranks_agree,
    check_search_again,
    class_count,
    distributing,
    fit_passes,
    training_arrays,
)
from grood._gradients import GradientStep
from grood._params import Parameters
from grood._progress import progress
from grood.calibration import Calibration
from grood.errors import NotFittedError
from grood.functional import check_precision
from grood.index import ExactIndex, check_index_options, check_search_result, index_class
from grood.model import ModelFrontEnd
from grood.neighbours import (
    Neighbours,
    check_within_index,
    order_record,
    result_dtype,
    search_all,
)
from grood.persistence import Placement
from grood.prototypes import OODPrototypeSource, resolve_source

if TYPE_CHECKING:
    from typing_extensions import Self


class GROOD(Parameters, ModelFrontEnd, Calibration, Neighbours, Placement):
    """Gradient-aware out-of-distribution detector (ElAraby et al., arXiv 2312.14427).

    Fitting builds class prototypes (mean training feature per class) and an OOD prototype,
    then indexes the gradient of the nearest-class-prototype softmax loss with respect to the
    OOD prototype for every training sample the classifier gets right. A new sample's score is
    minus the squared L2 distance from its gradient to the k-th nearest indexed gradient.

    **Scores are higher for in-distribution samples** (as scikit-learn's ``score_samples``).

    Args:
        ood_prototype (str | OODPrototypeSource): how to make the OOD prototype: ``"mean"`` (mean
            of the class prototypes, the default; needs two classes), ``"features"`` (mean of
            the ``ood_features`` given to ``fit``), or a source object (see
            :mod:`grood.prototypes`).
        k (int): score by the distance to the k-th nearest training gradient.
        index (str): a registered index kind (:mod:`grood.index`): ``"exact"`` (default),
            ``"faiss-flat"`` (exact, faiss) or ``"faiss-ivf"`` (the reference's approximate
            IVF-Flat). index_options (dict, optional): that kind's ``option_names``.
        backend (str): ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`grood.ops`).
        precision (str): precision of the distance GEMMs (gradient step and exact search):
            ``"ieee"`` (fp32, the default), ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` (tensor
            cores on CUDA); the nearest prototypes' and neighbours' distances are recomputed
            exactly in every mode (see :mod:`grood.functional`).
        device (str | torch.device, optional): where the detector's state lives and is
            computed; by default the device of the features given to ``fit``.
        distributed (bool): fit and score across the processes of the initialized
            ``torch.distributed`` group, each rank passing its own shard (see
            :mod:`grood.distributed`).
        batch_size (int): rows processed at a time; bounds working memory when scoring.
        progress (bool, optional): show progress bars; by default only on a terminal.

    Changed after ``fit`` (``set_params``, assignment), ``k`` (``score_params``: it scores as a
    fit with it), ``batch_size``, ``precision``, ``backend``, ``progress`` and IVF's ``nprobe``
    apply at the next score; the rest (OOD prototype, index and build options, device,
    ``distributed``) at the next ``fit``; a saved detector keeps what it was fitted with.

    Attributes (after ``fit``):
        class_prototypes_ (Tensor): [C, D]. class_counts_ (Tensor): [C] training samples.
        ood_prototype_ (Tensor): [D]. index_ (GradientIndex): the training gradients
            (an ``ExactIndex``, ``FaissFlatIndex`` or ``FaissIVFIndex`` by ``index``).
        n_features_in_ (int), n_classes_ (int), n_train_ (int). feature_names_in_ (ndarray):
            the column names of a table fitted on (a DataFrame's), checked at every score.
        train_accuracy_ (float): fraction of training samples classified correctly (by the
            given logits, or by the nearest class prototype), i.e. indexed.
        backend_ (dict): the backend used for each operation. device_, dtype_.
        indexed_rows_ (Tensor): the training-row number of each indexed gradient, in index
            order (see :meth:`kneighbors`); None for one loaded from a version 1 file.
        ood_fingerprints_ (Tensor): fingerprints of the rows ``ood_prototype="features"``
            averaged (float64 [M, 16], CPU; see :func:`grood.evaluate`), or None.
        threshold_ (float), calibration_ (dict): after :meth:`calibrate` (``is_ood``).
    """

    score_params: ClassVar[tuple[str, ...]] = ("k",)  # (:func:`grood.tune` need not refit)

    def __init__(self, ood_prototype: str | OODPrototypeSource = "mean", k: int = 1,
                 index: str = "exact", index_options: dict[str, Any] | None = None,
                 backend: str = "auto", precision: str = "ieee",
                 device: str | torch.device | None = None, batch_size: int = 4096,
                 progress: bool | None = None, distributed: bool = False) -> None:
        self.ood_prototype = ood_prototype
        self.k = k
        self.index = index
        self.index_options = index_options
        self.backend = backend
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.distributed = distributed

    def _check_params(self) -> OODPrototypeSource:
        check_score_time_params(self)
        self.distributed = check_flag(self.distributed, "distributed")
        check_device(self.device)
        # An unknown kind, or options it refuses, before any pass over the data.
        index_class(self.index).check_options(check_index_options(self.index_options))
        if self.distributed and not dist.is_initialized():
            raise ValueError("distributed=True needs an initialized torch.distributed process "
                             "group (start with torchrun and call init_process_group)")
        return resolve_source(self.ood_prototype)

    def fit(self, features: ArrayLike, labels: ArrayLike, *, logits: ArrayLike | None = None,
            ood_features: ArrayLike | None = None) -> Self:
        """Fit the detector on training features.

        Args:
            features (Tensor | ndarray): training features, shape [N, D] (or a DataFrame:
                its column names are kept as ``feature_names_in_`` and checked at scoring).
            labels (Tensor | ndarray): integer class ids in ``[0, C)``, shape [N]. Without
                logits, C is ``labels.max() + 1``; every class needs at least one sample.
            logits (Tensor | ndarray, optional): the classifier's logits, shape [N, C]; a sample
                is indexed when ``argmax(logits) == label``. Without logits, when its nearest
                class prototype is its label.
            ood_features (Tensor | ndarray, optional): OOD features [M, D], for
                ``ood_prototype="features"``.

        Returns:
            GROOD: ``self``.
        """
        with dist.together(distributing(self), "reading its training arrays"):
            source = self._check_params()  # (a rank's shard may be empty, not the union)
            x, y, lg = training_arrays(features, labels, logits, distributing(self))
            names = ood_columns(feature_names(features), ood_features)
            inputs = {} if ood_features is None else {"ood_features": ood_features}
            check_inputs(source, inputs, "fit()")
        (n, d), n_classes = x.shape, None if lg is None else lg.shape[1]
        check_ranks_agree(self, source, x, lg)
        if n_classes is None:
            n_classes = class_count(*label_count(y), self.distributed)
        device = compute_device(self.device, x.device)

        def passes(desc: str) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
            with progress(total=n, desc=desc, unit="rows", enabled=self.progress,
                          unit_scale=True) as bar:
                for r0, r1 in batches(n, self.batch_size) if n else [(0, 0)]:
                    yield (x[r0:r1].to(device), y[r0:r1].to(device),
                           None if lg is None else lg[r0:r1].to(device))
                    bar.update(r1 - r0)

        self._set_fitted(*fit_passes(self, source, inputs, passes, n_classes=n_classes, d=d,
                                     device=device, dtype=compute_dtype(x.dtype),
                                     feature_names=names))
        return self

    def fit_batches(self, batches: Any, *, ood_features: ArrayLike | None = None,
                    n_classes: int | None = None,
                    source_inputs: dict[str, Any] | None = None) -> Self:
        """Fit from batches instead of whole arrays (datasets larger than memory).

        Args:
            batches: a re-iterable (list, DataLoader) or a function returning a new iterator of
                ``(features [B, D], labels [B])`` or ``(features, labels, logits [B, C])``
                batches (tensors or numpy arrays). It is read twice: class prototypes, then the
                gradient index; memory holds one batch at a time, the prototypes and the index.
                Both passes must give the same rows, in any order: a second pass with other
                row or per-class label counts (drop_last with shuffling, resampling) is
                refused. Augmented batches are not detected: pass test-time transforms.
                The detector computes in the first batch's precision (float64, else
                float32): float64 batches after a float32 first one are rounded to it, with
                a warning.
            ood_features (optional): for ``ood_prototype="features"``.
            n_classes (int, optional): the number of classes; by default the logits' width,
                or one more than the largest label of the first pass.
            source_inputs (dict, optional): further inputs an OOD-prototype source ``needs``
                (e.g. ``model``, which :meth:`fit_model` gives), by name.

        Returns:
            GROOD: ``self``.
        """
        inputs = dict(source_inputs or {}, **({} if ood_features is None
                                              else {"ood_features": ood_features}))
        return self._fit_stream(batches, inputs, n_classes, "fit_batches()")

    def _fit_stream(self, batches: Any, inputs: dict[str, Any], n_classes: int | None,
                    where: str, *, extractor: dict[str, Any] | None = None,
                    bar: bool = True) -> Self:
        """:meth:`fit_batches` with the sources' ``inputs``; ``extractor`` (else
        :func:`order_record`) kept with the fitted state; ``bar=False``: batches show progress."""
        with dist.together(distributing(self), "reading its first training batch"):
            check_reiterable(batches, "batches")
            source = self._check_params()
            check_inputs(source, inputs, where)
            first, names = peek_batch(batches, distributing(self))
            names = ood_columns(names, inputs.get("ood_features"))
        d = first[0].shape[1]
        check_ranks_agree(self, source, first[0], first[2], n_classes)
        device = compute_device(self.device, first[0].device)
        if n_classes is not None:
            n_classes = check_positive_int(n_classes, "n_classes")
        elif first[2] is None:  # one pass to count the classes
            with dist.together(self.distributed, "counting the classes of its batches"):
                counts = [label_count(yb) for _, yb, _ in iter_batches(batches, "first pass")]
            n_classes = class_count(max(c for c, _ in counts), sum(r for _, r in counts),
                                    self.distributed)

        def passes(desc: str) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
            shown, counted = batch_progress(batches, desc, self.progress and bar)
            with shown:
                for xb, yb, lb in iter_batches(batches, desc):
                    yield (xb.to(device), None if yb is None else yb.to(device),
                           None if lb is None else lb.to(device))
                    shown.update(1 if counted else xb.shape[0])

        fitted, grads = fit_passes(self, source, inputs, passes, n_classes=n_classes, d=d,
                                   device=device, dtype=compute_dtype(first[0].dtype))
        fitted.extractor = extractor if extractor is not None else order_record(batches) or None
        fitted.feature_names = names
        self._set_fitted(fitted, grads)
        return self

    def score_batches(self, batches: Iterable[ArrayLike]
                      ) -> Iterator[tuple[ArrayLike, ArrayLike]]:
        """Score batches one at a time: yields ``(scores, preds)`` per batch of features.

        A batch is a features array [B, D] or a DataLoader's batch (:func:`batch_features`).
        Memory holds one batch (and the index); each result has the type of its features. An
        empty batch [0, D] yields empty results (``score_and_predict`` refuses one). A sharded
        detector's ranks call it together, each with its own batches, as many as it has.
        """
        return score_stream(self, batches)

    def _set_fitted(self, fitted: FittedState, grads: GradientStep | None = None) -> None:
        """Set every learned attribute at once (from ``fit`` or from a detector file)."""
        self.class_prototypes_ = fitted.class_prototypes
        self.class_counts_ = fitted.class_counts
        self.ood_prototype_ = fitted.ood_prototype
        self.ood_source_ = fitted.source
        self.index_ = fitted.index
        self._grads = grads or GradientStep(fitted.class_prototypes, fitted.ood_prototype,
                                            fitted.backend["ncp_gradient"], self.precision)
        # Sizes of every rank's index shard, in rank order (one entry in one process).
        self.shard_sizes_ = list(fitted.shard_sizes or [fitted.index.ntotal])
        self.indexed_rows_, self.ood_fingerprints_ = fitted.indexed_rows, fitted.ood_fingerprints
        self.n_classes_, self.n_features_in_ = fitted.class_prototypes.shape
        set_feature_names(self, fitted.feature_names)
        self.n_train_ = fitted.n_train
        self.train_accuracy_ = fitted.train_accuracy
        self.backend_ = fitted.backend
        self._backend_asked = (self.backend, self.precision)  # what backend_ came from
        # Scoring joins the other ranks' searches when the fit (or load) was distributed;
        # ``distributed`` changed afterwards is for the next fit.
        self._sharded = bool(self.distributed)
        self.device_ = fitted.device
        self.dtype_ = fitted.class_prototypes.dtype
        self.__dict__.pop("_told_elsewhere", None)  # a note about another device's state
        if fitted.extractor is not None:
            self.extractor_ = fitted.extractor
        elif hasattr(self, "extractor_"):  # refitted from arrays: the old layer no longer holds
            del self.extractor_
        self._drop_calibration()  # a threshold chosen on another fit's scores

    def _apply_score_params(self) -> None:
        apply_score_time_params(self)

    def _check_score_params(self) -> None:
        check_score_time_params(self, uses_k=True)

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError("this GROOD detector is not fitted yet: call fit() or "
                                 "GROOD.load() first")

    def _read(self, features: Any, allow_empty: bool = False, *, search: bool = False,
              uses_k: bool = True) -> tuple[Tensor, Any]:
        """Check the detector is fitted and ``features`` fits it; returns (tensor, kind).
        ``search``: they will be searched, by every rank where sharded (a rank whose features
        are refused stops every rank); ``uses_k``: ``k`` is searched for (within the index)."""
        self._check_fitted()
        with dist.together(search and self._sharded, "reading its features"):
            apply_score_time_params(self, uses_k=uses_k)
            return read_features(self, features, allow_empty)

    def _passes(self, x: Tensor, *, k: int | None, rows: bool = False
                ) -> Iterator[tuple[int, int, tuple[Tensor, Tensor] | None, Tensor]]:
        """Yield ``(start, stop, found, preds)`` for each batch of rows of ``x``: ``found`` is
        the batch's k nearest indexed gradients ``(distances, ids)`` [B, k] (ids as training-row
        numbers with ``rows``), None without ``k``."""
        n = x.shape[0]
        n_batches = -(-n // self.batch_size)
        if self._sharded and k:  # every rank joins every collective search
            n_batches = sharded_batch_count(self, n_batches, x.dtype, k, rows)
        if rows and self.indexed_rows_ is None:
            raise ValueError(UNNAMED_ROWS)
        with progress(total=n, desc="grood score", unit="rows", enabled=self.progress,
                      unit_scale=True) as bar:
            for b in range(n_batches):
                r0, r1 = min(b * self.batch_size, n), min((b + 1) * self.batch_size, n)
                with dist.together(self._sharded and k is not None,
                                   f"computing the gradients of its rows {r0} to {r1 - 1}"):
                    xb = x[r0:r1].to(self.device_)
                    check_finite_rows(xb, "features", row_offset=r0)
                    res = self._grads.resolved(xb, r0)
                found = None if k is None else search(self, res.grad, k, (r0, r1), rows)
                self._count_training_rows(found, res)  # while calibrating
                bar.update(r1 - r0)
                yield r0, r1, found, res.pred

    def score_and_predict(self, features: ArrayT) -> tuple[ArrayT, ArrayT]:
        """``(scores [N], preds [N])`` of features [N, D] in one pass: scores higher for
        in-distribution, nearest-prototype classes; numpy for numpy input, else tensors on
        the input's device."""
        return self._score_and_predict(features)

    def _score_and_predict(self, features: ArrayLike, allow_empty: bool = False
                           ) -> tuple[Any, Any]:
        x, kind = self._read(features, allow_empty, search=True)
        dists, _, preds = search_all(self, x, self.k)
        return kind.wrap(0.0 - dists[:, self.k - 1]), kind.wrap(preds)  # 0.0 - x: no "-0.0"

    def score_samples(self, features: ArrayT) -> ArrayT:
        """GROOD score per sample of features [N, D]: ``-||g(x) - g_k||^2``, higher = more
        in-distribution; shape [N], the same type as the input."""
        return self.score_and_predict(features)[0]

    def predict(self, features: ArrayT) -> ArrayT:
        """Nearest class prototype for each sample (int64), shape [N]."""
        x, kind = self._read(features, uses_k=False)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=self.device_)
        for r0, r1, _, p in self._passes(x, k=None):
            preds[r0:r1] = p
        return kind.wrap(preds)


#: Why ``kneighbors`` cannot name a detector's neighbours.
UNNAMED_ROWS = ("this detector does not know which training rows its indexed gradients come "
                "from (a version 1 detector file, saved before rows were recorded, or an index "
                "that drops rows it was given): refit it to name neighbours")


def sharded_batch_count(det: GROOD, n_batches: int, dtype: torch.dtype, k: int,
                        rows: bool) -> int:
    """The most batches any rank of a sharded detector scores (every rank joins every search),
    after checking the ranks search alike (k, the queries' dtype, neighbours named by training
    row), in one exchange: ranks that differ would exchange lists of other shapes, which aborts
    in gloo and hangs in NCCL."""
    views = dist.gather_json({"k": k, "feature dtype": str(result_dtype(det, dtype))
                                                       .removeprefix("torch."),
                              "rows named": rows and det.indexed_rows_ is not None,
                              "batches": n_batches})
    dist.check_agree(views, ("k", "feature dtype", "rows named"), "score")
    return max(view["batches"] for view in views)


def score_stream(det: GROOD, batches: Iterable[ArrayLike]
                 ) -> Iterator[tuple[ArrayLike, ArrayLike]]:
    """:meth:`GROOD.score_batches`' generator (its checks run at the first ``next``)."""
    det._check_fitted()
    check_loader(batches, "score_batches takes an iterable of batches [B, D]",
                 ": score one array with score_and_predict or score_samples")
    warn_if_shuffled(batches, "score_batches")
    for batch, own, number in dist.in_step(map(batch_features, batches), det.n_features_in_,
                                           det.device_, det._sharded):
        with prefixed_errors(f"batch {number} (numbered from 0)"):
            result = det._score_and_predict(batch, allow_empty=True)
        if own:
            yield result


def batch_features(batch: Any) -> Any:
    """The features of one batch given to ``score_batches``: the batch itself, or the first
    item of a DataLoader's ``[features]``, ``(features, labels)`` or ``(features, labels,
    logits)``: a tuple or list of 1 to 3 items whose first is a 2-D array or tensor (a batch
    given as a list of rows holds 1-D rows)."""
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3 \
            and getattr(batch[0], "ndim", None) == 2:
        return batch[0]
    if isinstance(batch, Mapping):  # (features must be an array: say how to give one)
        raise TypeError("score_batches takes batches of features [B, D], got a dict"
                        + dict_batch_hint(batch, "({} for b in loader)"))
    return batch


def search(det: GROOD, grads: Tensor, k: int, batch: tuple[int, int], rows: bool
           ) -> tuple[Tensor, Tensor]:
    """The k nearest indexed gradients of a batch's ``grads`` over every shard: ``(distances,
    ids)`` [B, k], ids as training-row numbers with ``rows``; checked by :func:`check_found`."""
    named = det.indexed_rows_ if rows else None
    if det._sharded:  # checked on every rank at once
        d, i = dist.search_sharded(det.index_, grads, k, det.shard_sizes_,
                                   result_dtype(det, grads.dtype), named,
                                   check=lambda found: check_found(found, k, batch, det.index_),
                                   what=f"searching the neighbours of its rows {batch[0]} to "
                                        f"{batch[1] - 1}")
    else:
        d, i = det.index_.search(grads, k)
        check_search_result(d, i, grads.shape[0], k, det.index_)
        check_found(d, k, batch, det.index_)
    if named is not None and not det._sharded:
        i = dist.row_numbers(i, named, det.index_)
    return d, i


def check_found(dist_k: Tensor, k: int, rows: tuple[int, int], index: Any) -> None:
    """Refuse rows whose k-th neighbour the search (of every shard, where sharded; its
    result's shape checked by :func:`grood.index.check_search_result`) did not find. An
    approximate index (IVF) visits a few inverted lists, which may hold fewer than k
    vectors: faiss pads the missing neighbours at distance FLT_MAX, a score of -3.4e38
    (silently the most OOD sample of any set). Exact searches find every neighbour (k never
    exceeds the indexed count)."""
    row_offset = rows[0]
    if not index.approximate:
        return
    missing = (dist_k[:, k - 1] >= torch.finfo(torch.float32).max).nonzero()[:, 0]
    if missing.numel():
        nprobe = getattr(index, "nprobe", None)
        raise ValueError(
            f"the {index.kind} search found fewer than k={k} neighbours for row "
            f"{row_offset + int(missing[0])} ({missing.numel()} of rows {row_offset}.."
            f"{row_offset + dist_k.shape[0] - 1})"
            + (f": the nprobe={nprobe} inverted lists it visits hold fewer vectors; raise "
               "nprobe (index_options, applied at the next score) or lower k" if nprobe else ""))


def read_features(det: GROOD, features: Any, allow_empty: bool) -> tuple[Tensor, Any]:
    """``features`` as a tensor (and what to return results as), checked to fit the fitted
    ``det``. Features on a GPU that a detector in host memory scores are named once per
    detector: every batch goes to the CPU, is scored there, and comes back, silently slow."""
    check_feature_names(getattr(det, "feature_names_in_", None), features)
    x, kind = as_tensor(features, "features")
    # A rank of a distributed detector may have no rows; it still joins the searches.
    check_matrix(x, "features", n_cols=det.n_features_in_, allow_empty=allow_empty or det._sharded)
    note = elsewhere_note(x.device, det.device_)
    if note is not None and not det.__dict__.get("_told_elsewhere"):
        det.__dict__["_told_elsewhere"] = True  # (a note per fitted state, not a parameter)
        warnings.warn(note, UserWarning, stacklevel=user_stacklevel())
    return x, kind


def elsewhere_note(features_device: torch.device, detector_device: torch.device) -> str | None:
    """What to say when features on an accelerator are scored by a detector on the CPU (the
    other way round, features in host memory going to the detector's GPU, is the usual
    path: nothing to say; so is Apple's MPS, where grood cannot compute)."""
    if features_device.type in ("cpu", "mps") or detector_device.type != "cpu":
        return None
    return (f"features are on {features_device}, the detector in host memory: every batch is "
            f"copied to the CPU and scored there, and the results copied back; move it to the "
            f"GPU (det.to('{features_device}'), or GROOD.load(path, device="
            f"'{features_device}')) or fit it there to score where the features are")


def check_score_time_params(det: GROOD, *, uses_k: bool = False) -> None:
    """Check the parameters a detector also applies at every score (``fit`` checks them too);
    numpy / torch integers and numpy bools are kept as Python ones. ``uses_k``: ``k`` must
    lie within the fitted detector's index too."""
    for name in ("k", "batch_size"):
        setattr(det, name, check_positive_int(getattr(det, name), name))
    det.progress = check_flag(det.progress, "progress", allow_none=True)
    check_precision(det.precision)
    ops.check_backend_name(det.backend)
    if uses_k:
        check_within_index(det, det.k, "k")


def apply_score_time_params(det: GROOD, *, uses_k: bool = True) -> None:
    """Check the parameters a fitted detector applies at every score (they may have been
    changed after fit or load: see the class) and bring its gradient step and index up to
    date with them; ``uses_k``: ``k`` must lie within the index (not for ``predict``, nor for
    ``kneighbors`` with its own ``n_neighbors``)."""
    check_score_time_params(det, uses_k=uses_k)
    searched_anew = det.precision != det._grads.precision
    if searched_anew:
        det._grads.precision = det.precision
        if isinstance(det.index_, ExactIndex):
            det.index_.precision = det.precision
    if det.index == det.index_.kind:  # search options (IVF nprobe); others: next fit
        det.index_.set_search_options(check_index_options(det.index_options))
    # A new backend: another implementation, the same answers (or a new precision, which
    # one may not run in: bf16 under Triton's interpreter).
    asked = (det.backend, det.precision)
    if asked != getattr(det, "_backend_asked", asked):
        resolved = ops.resolve_backends(det.backend, det.device_, det.dtype_, det.precision)
        det._grads.fn = ops.get_op("ncp_gradient", resolved["ncp_gradient"])
        if isinstance(det.index_, ExactIndex):
            det.index_.backend = resolved["knn"]
        det.backend_, det._backend_asked = resolved, asked
    if searched_anew:  # (the fit checked the search in the precision it was fitted in)
        check_search_again(det.index_, det.dtype_, det.precision, det.device_, det._sharded)
