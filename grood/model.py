"""From a model and data loaders to a fitted detector and scores: a thin layer over the
feature path.

The model runs batch by batch (:class:`grood.extract.FeatureExtractor`); its penultimate
features and logits go to :meth:`GROOD.fit_batches` and :meth:`GROOD.score_and_predict`, so
memory holds one batch, the prototypes and the index, never the training features (unless
``fit_model(cache="host")`` keeps them, to run the model once). ``GROOD.fit_model`` /
``score_model`` / ``predict_model`` call these.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from grood import distributed as dist
from grood._batches import check_reiterable, warn_if_shuffled
from grood._cache import BatchCache
from grood._checks import (
    check_finite_rows,
    check_positive_int,
    compute_device,
    prefixed_errors,
    user_stacklevel,
)
from grood._fit import distributing

if TYPE_CHECKING:
    from typing_extensions import Self

    from grood.detector import GROOD
    from grood.evaluation import Evaluation
    from grood.extract import FeatureExtractor
    from grood.head import GROODAttached, GROODHead
    from grood.io import FeatureFile


def fit_model(det: GROOD, model: nn.Module, train_loader: Iterable, *,
              features: str | None = None, ood_loader: Iterable | None = None,
              device: str | torch.device | None = None,
              autocast: torch.dtype | None = None,
              cache: str | os.PathLike | None = None) -> GROOD:
    """Fit ``det`` from a model and its training loader, streaming.

    Runs the model over ``train_loader`` twice (class prototypes, then the gradient index;
    model-level OOD prototype sources add their own passes), or once with ``cache``. A sample
    is indexed when the model classifies it correctly. Both passes must give the same samples,
    in any order (a loader that drops a different last batch each time is refused); use
    test-time transforms, since augmentation would give other features each pass.

    Args:
        det (GROOD): the detector to fit.
        model (nn.Module): the classifier.
        train_loader: batches of ``(inputs, labels)`` (tuples or ``data``/``label`` dicts).
        features (str, optional): the penultimate module's name (see
            :class:`grood.extract.FeatureExtractor`); without it the model must take
            ``return_feature_list=True``.
        ood_loader (optional): OOD batches for ``ood_prototype="features"`` (their mean
            penultimate feature is the OOD prototype; OpenOOD's ``val`` OOD set).
        device, autocast: where and in which autocast dtype the model runs.
        cache (optional): keep the first pass's features, labels and logits for the passes
            after it, which then read them instead of running the model: ``"host"`` keeps
            them in host memory, a folder keeps them in files in a temporary folder made
            inside it (removed when the fit ends, or fails). Either holds N x D values of
            the model's output dtype and 16 bytes a row (labels, and the class the logits
            pick: all the second pass reads of them; ImageNet-1k at D = 2048 in float32:
            10.5 GB), and gives the detector the model's two passes give.

    Returns:
        GROOD: ``det``, fitted.
    """
    from grood.extract import FeatureExtractor
    from grood.neighbours import order_record
    from grood.prototypes import resolve_source
    from grood.sources import ModelContext

    def model_batches() -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        for out, y, _ in extractor.batches(train_loader, desc="grood fit"):
            yield out.features, y, out.logits

    # Rank-local work: a rank that fails here (its loader, its first batch through the model)
    # stops every rank, instead of leaving them in the fit's first collective.
    with dist.together(distributing(det), "running the model on its first training batch"):
        check_reiterable(train_loader, "train_loader", factory=False)
        # (its folder is made by the fit's first read, inside the fit's own check)
        kept = None if cache is None else BatchCache(model_batches, cache, show=det.progress)
        source = resolve_source(det.ood_prototype)
        extractor = FeatureExtractor(model, features=features, device=device,
                                     autocast=autocast, progress=det.progress)
        probe = extractor.batches(train_loader, desc="grood: probing", limit=1)
        first = next(probe, None)
        probe.close()
        if first is None:
            raise ValueError("the training loader yielded no batches" + (
                "; in a distributed fit every rank's loader needs at least one batch (a "
                "DistributedSampler gives every rank samples)" if distributing(det) else ""))
        if first[1] is None:
            from grood.extract import missing_labels_hint

            raise ValueError("the training batches carry no labels"
                             + missing_labels_hint(train_loader))
    # where GROOD computes (the model runs on the extractor's device)
    dev = compute_device(det.device, extractor.device)
    d = first[0].features.shape[1]
    inputs: dict[str, Any] = {}
    if "model" in source.needs:
        inputs["model"] = ModelContext(extractor, train_loader, tuple(first[2].shape[1:]))
    ood_features = prints = None
    if ood_loader is not None:
        ood_features, prints = _ood_mean(det, extractor, ood_loader, d)

    def training_batches() -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        for xb, yb, lb in (model_batches() if kept is None else kept(dev)):
            yield (xb.to(dev), None if yb is None else yb.to(dev),
                   None if lb is None else lb.to(dev))

    if ood_features is not None:
        inputs["ood_features"] = ood_features
    # The extractor reports progress (it knows the loader's length); the fit adds no bar.
    # A shuffling loader does not repeat its order: kneighbors warns that its rows name no sample.
    try:
        det._fit_stream(training_batches, inputs, None, "fit_model()",
                        extractor={"features": features, **order_record(train_loader)},
                        bar=False)
    finally:
        if kept is not None:
            kept.close()
    if prints is not None:  # the loader's rows, where the fit saw their mean alone
        det.ood_fingerprints_ = prints
    return det


def _ood_mean(det: GROOD, extractor: FeatureExtractor, loader: Iterable, d: int
              ) -> tuple[Tensor, Tensor]:
    """The OOD loader's mean feature, as the one row ``ood_prototype="features"`` averages,
    and its rows' fingerprints (:func:`grood.prototypes.fingerprint_rows`); in a distributed
    fit, over every rank's rows (a rank may have none), the fingerprints in rank order."""
    from grood.prototypes import fingerprint_rows

    total, count, prints = torch.zeros(d, dtype=torch.float64), 0, [fingerprint_rows(
        torch.zeros((0, d)))]
    with dist.together(det.distributed, "reading its OOD loader"):
        for out, _, _ in extractor.batches(loader, desc="grood fit: OOD features"):
            check_finite_rows(out.features, "OOD features", row_offset=count)
            if out.features.shape[1] != d:  # e.g. a flattened conv map of other-sized images
                raise ValueError(f"the OOD loader gives features of width "
                                 f"{out.features.shape[1]}, the training loader {d}")
            total += out.features.double().sum(0).cpu()
            count += out.features.shape[0]
            prints.append(fingerprint_rows(out.features))
    rows = torch.cat(prints)
    if det.distributed:  # every rank the same mean, of every rank's rows
        total = dist.all_reduce(total)
        count = int(dist.all_reduce(torch.tensor([count], dtype=torch.float64)))
        rows = torch.cat(dist.all_gather_rows(rows))
    if count == 0:  # the mean of nothing would make the origin the OOD prototype
        raise ValueError("the OOD loader yielded no samples")
    return (total / count)[None].float(), rows


def score_model(det: GROOD, model: nn.Module, loader: Iterable, *,
                features: str | None = None, device: str | torch.device | None = None,
                autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Scores (higher = in-distribution) and nearest-prototype classes of a loader.

    Streams the loader through the model; returns CPU tensors ``(scores [N], preds [N])``,
    in the loader's order (a loader that shuffles is warned of: nothing would say which
    sample each score is). ``features`` defaults to the one used by :func:`fit_model`.
    """
    warn_if_shuffled(loader, "score_model")
    return scores_in_any_order(det, model, loader, features=features, device=device,
                               autocast=autocast)


def scores_in_any_order(det: GROOD, model: nn.Module, loader: Iterable, *,
                        features: str | None = None, device: str | torch.device | None = None,
                        autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """:func:`score_model` where the order of the results does not matter (calibration takes
    a quantile of the scores): a loader that shuffles is not warned of."""
    # (a batch of 0 rows, as a collate that dropped each of its images gives, scores as 0 rows)
    return _stream(det, model, loader, lambda f: det._score_and_predict(f, allow_empty=True),
                   features=features, device=device, autocast=autocast)


def kneighbors_model(det: GROOD, model: nn.Module, loader: Iterable,
                     n_neighbors: int | None = None, *, features: str | None = None,
                     device: str | torch.device | None = None,
                     autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """:meth:`grood.GROOD.kneighbors` of a loader's samples, streamed through the model: CPU
    tensors ``(distances [N, n], training rows [N, n])``; the training rows number the rows
    of the loader :func:`fit_model` read, in its order."""
    from grood.neighbours import check_within_index, neighbours_and_predict, warn_row_order

    det._check_fitted()
    warn_row_order(det)
    warn_if_shuffled(loader, "kneighbors_model")
    if n_neighbors is not None:  # before the model runs (on every rank alike, when sharded)
        with dist.together(det._sharded, "checking n_neighbors"):
            check_within_index(det, check_positive_int(n_neighbors, "n_neighbors"),
                               "n_neighbors")
    return _stream(det, model, loader,
                   lambda f: neighbours_and_predict(det, f, n_neighbors, allow_empty=True)[:2],
                   features=features, device=device, autocast=autocast)


def _stream(det: GROOD, model: nn.Module, loader: Iterable,
            fn: Callable[[Tensor], tuple[Any, Any]], *, features: str | None,
            device: str | torch.device | None, autocast: torch.dtype | None
            ) -> tuple[Tensor, Tensor]:
    """``fn`` (features -> two tensors) over a loader's batches of ``features`` (by default
    the layer :func:`fit_model` read), concatenated on the CPU."""
    det._check_fitted()
    extractor = _extractor(det, model, features, device, autocast)
    feats = (out.features for out, _, _ in extractor.batches(loader, desc="grood score"))
    # A sharded detector's ranks search together, each rank's loader as long as it is: the
    # empty batches a rank joins with add no rows (and give its results their shape when its
    # own loader had none).
    first, second = [], []
    for batch, _, number in dist.in_step(feats, det.n_features_in_, det.device_, det._sharded):
        with prefixed_errors(f"the loader's batch {number} (numbered from 0)"):
            a, b = fn(batch)
        first.append(a.cpu())
        second.append(b.cpu())
    if not first:
        raise ValueError("the loader yielded no batches")
    return torch.cat(first), torch.cat(second)


def _extractor(det: GROOD, model: nn.Module, features: str | None,
               device: str | torch.device | None, autocast: torch.dtype | None
               ) -> FeatureExtractor:
    """The extractor of ``model``'s ``features`` (by default the layer :func:`fit_model`
    read), with a warning where another layer is named."""
    from grood.extract import FeatureExtractor

    features, note = _layer(det, features)
    extractor = FeatureExtractor(model, features=features, device=device, autocast=autocast,
                                 progress=det.progress)  # refuses a name the model lacks
    if note:
        warnings.warn(note, UserWarning, stacklevel=user_stacklevel())
    return extractor


def _layer(det: GROOD, features: str | None) -> tuple[str | None, str | None]:
    """The module whose output ``det`` reads (``features``, by default the one
    :func:`fit_model` read), and what to warn of where another is named (to be warned once
    the model is known to have it)."""
    from grood.extract import bare_name

    fitted_on = getattr(det, "extractor_", {}).get("features")
    if features is None:
        return fitted_on, None
    if fitted_on is not None and bare_name(features) != bare_name(fitted_on):
        # Another layer of the same width would be scored against the wrong prototypes and
        # index without any error; the same one named through a wrapper is that layer.
        return features, (f"the detector reads features={features!r} here, but was fitted on "
                          f"features={fitted_on!r}; scores are only meaningful for the same "
                          "layer")
    return features, None


def evaluate_model(det: GROOD, model: nn.Module, id_loader: Iterable,
                   ood: Mapping[str, Iterable] | None = None, *,
                   near: Mapping[str, Iterable] | None = None,
                   far: Mapping[str, Iterable] | None = None, baselines: Sequence[Any] = (),
                   bootstrap: int | None = None, features: str | None = None,
                   device: str | torch.device | None = None,
                   autocast: torch.dtype | None = None) -> Evaluation:
    """:func:`grood.evaluation.evaluate` over data loaders: each loader runs through the
    model when its turn comes (as :func:`score_model` runs it, on the layer :func:`fit_model`
    read by default), and its features, logits and labels (the ID loader's give the
    accuracies) are the set, held on the CPU one set at a time.

    ``ood``, ``near`` and ``far`` give loaders by name (OpenOOD's ``ood_loader_dict["near"]``
    and ``["far"]`` as they are); ``baselines`` (fitted :mod:`grood.baselines` estimators)
    score each set's logits or features, and :class:`grood.ODIN` and :class:`grood.RankFeat`
    each batch's inputs through the model as the batch passes (under ``autocast`` too).
    """
    from grood.evaluation import LazySet, baseline_names, check_groups, evaluate
    from grood.model_baselines import scores_inputs

    check_groups(ood, near, far)
    extractor = _extractor(det, model, features, device, autocast)
    by_model = {n: est for n, est in baseline_names(baselines).items() if scores_inputs(est)}
    for est in by_model.values():
        est._checked()  # (before any loader runs)

    def lazy(loader: Iterable, name: str) -> LazySet:
        return LazySet(lambda: _loader_set(extractor, loader, name, by_model))

    def each(sets: Mapping[str, Iterable] | None) -> dict[str, LazySet] | None:
        return None if sets is None else {n: lazy(v, n) for n, v in sets.items()}

    return evaluate(det, lazy(id_loader, "the ID loader"), each(ood), near=each(near),
                    far=each(far), baselines=baselines, bootstrap=bootstrap,
                    id_name="the ID loader")


def _loader_set(extractor: FeatureExtractor, loader: Iterable, name: str,
                by_model: dict[str, Any]) -> FeatureFile:
    """A loader's features, labels and logits through the model, on the CPU (labels and
    logits None where a batch lacks them), and the scores and predictions of the baselines
    ``by_model`` (display name: estimator) that score each batch's inputs."""
    from grood.io import FeatureFile

    feats, labels, logits = [], [], []
    scored: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in by_model}
    for number, (out, y, x) in enumerate(extractor.batches(loader,
                                                            desc=f"grood evaluate: {name}")):
        feats.append(out.features.cpu())
        labels.append(None if y is None else y.cpu())
        logits.append(None if out.logits is None else out.logits.cpu())
        for method, est in by_model.items():
            with prefixed_errors(f"{method} on {name}'s batch {number} (numbered from 0)"):
                s, p = est.score_inputs(extractor.model, x, autocast=extractor.autocast)
            scored[method].append((s.cpu(), p.cpu()))
    if not feats:
        raise ValueError("the loader yielded no batches")

    def joined(parts: list[Tensor | None]) -> Tensor | None:
        return None if any(p is None for p in parts) else torch.cat(cast(list[Tensor], parts))

    return FeatureFile(torch.cat(feats), joined(labels), joined(logits),
                       {m: (torch.cat([s for s, _ in v]), torch.cat([p for _, p in v]))
                        for m, v in scored.items()} or None)


class ModelFrontEnd:
    """The model-facing methods of :class:`grood.detector.GROOD`: loaders in, scores out
    (:func:`fit_model`, :func:`score_model`), and the detector as a module
    (:mod:`grood.head`)."""

    def fit_model(self, model: nn.Module, train_loader: Iterable, *, features: str | None = None,
                  ood_loader: Iterable | None = None, device: str | torch.device | None = None,
                  autocast: torch.dtype | None = None,
                  cache: str | os.PathLike | None = None) -> Self:
        """Fit from a model and its training loader, streaming; ``cache`` (``"host"`` or a
        folder) runs the model once (:func:`grood.model.fit_model`)."""
        fit_model(cast("GROOD", self), model, train_loader, features=features,
                  ood_loader=ood_loader, device=device, autocast=autocast, cache=cache)
        return self

    def score_model(self, model: nn.Module, loader: Iterable, *, features: str | None = None,
                    device: str | torch.device | None = None,
                    autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """CPU ``(scores [N], preds [N])`` of a loader (:func:`grood.model.score_model`)."""
        return score_model(cast("GROOD", self), model, loader, features=features, device=device,
                           autocast=autocast)

    def _scores_in_any_order(self, model: nn.Module, loader: Iterable, *,
                             features: str | None = None,
                             device: str | torch.device | None = None,
                             autocast: torch.dtype | None = None) -> Tensor:
        """``score_model``'s scores where their order does not matter (``calibrate_model``)."""
        return scores_in_any_order(cast("GROOD", self), model, loader, features=features,
                                   device=device, autocast=autocast)[0]

    def kneighbors_model(self, model: nn.Module, loader: Iterable,
                         n_neighbors: int | None = None, *, features: str | None = None,
                         device: str | torch.device | None = None,
                         autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """CPU ``(distances, training rows)`` [N, n] of a loader's samples
        (:func:`grood.model.kneighbors_model`)."""
        return kneighbors_model(cast("GROOD", self), model, loader, n_neighbors, features=features,
                                device=device, autocast=autocast)

    def predict_model(self, model: nn.Module, loader: Iterable, **kwargs: Any) -> Tensor:
        """Nearest-prototype classes of a loader's samples (CPU tensor [N])."""
        return self.score_model(model, loader, **kwargs)[1]

    def as_module(self, checks: str = "raise", flags: bool = False) -> GROODHead:
        """This detector as an ``nn.Module``: ``forward(features) -> (score, pred)``, ready for
        ``torch.compile`` and ``torch.export``; ``checks="flag"`` makes it read nothing on the
        host, for CUDA graphs; ``flags=True`` (a calibrated detector) holds ``threshold_`` and
        returns ``(score, pred, is_ood)`` (see :mod:`grood.head`)."""
        from grood.head import as_module

        return as_module(cast("GROOD", self), checks, flags)

    def attach(self, model: nn.Module, features: str | None = None,
               checks: str = "raise", flags: bool = False) -> GROODAttached:
        """``model`` with this detector as a head on its ``features`` module (by default the
        one :meth:`fit_model` read): ``forward(x) -> (logits, score, pred)`` in one pass,
        ``(logits, score, pred, is_ood)`` with ``flags`` (see
        :class:`grood.head.GROODAttached`)."""
        from grood.head import GROODAttached

        features, note = _layer(cast("GROOD", self), features)
        attached = GROODAttached(model, self.as_module(checks, flags), features)
        if note:
            warnings.warn(note, UserWarning, stacklevel=user_stacklevel())
        return attached
