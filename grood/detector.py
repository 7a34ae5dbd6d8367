"""The GROOD detector: fit on training features, score new features (higher = in-distribution)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grood import distributed as dist
from grood import functional, ops
from grood._checks import (
    NotFittedError,
    as_tensor,
    batches,
    check_class_count,
    check_device,
    check_finite_rows,
    check_labels,
    check_matrix,
    check_positive_int,
    compute_dtype,
)
from grood._progress import progress
from grood.functional import NCPGradient, PrototypeState, check_precision, class_prototypes
from grood.index import INDEX_KINDS, index_from_state, make_index
from grood.prototypes import (
    OODPrototypeSource,
    PrototypeContext,
    resolve_source,
    source_from_config,
)


class GROOD:
    """Gradient-aware out-of-distribution detector (ElAraby et al., arXiv 2312.14427).

    Fitting builds class prototypes (mean training feature per class) and an OOD prototype,
    then indexes the gradient of the nearest-class-prototype softmax loss with respect to the
    OOD prototype for every training sample the classifier gets right. A new sample's score is
    minus the squared L2 distance from its gradient to the k-th nearest indexed gradient.

    **Scores are higher for in-distribution samples** (as scikit-learn's ``score_samples``).

    Args:
        ood_prototype (str | OODPrototypeSource): how to make the OOD prototype: ``"mean"`` (mean
            of the class prototypes, the default), ``"features"`` (mean of the ``ood_features``
            given to ``fit``), or a source object (see :mod:`grood.prototypes`).
        k (int): score by the distance to the k-th nearest training gradient.
        index (str): how the training gradients are searched: ``"exact"`` (default; grood's
            kernel or its torch twin), ``"faiss-flat"`` (exact, faiss) or ``"faiss-ivf"``
            (approximate IVF-Flat, as the reference implementation; see
            :class:`grood.index.FaissIVFIndex`).
        index_options (dict, optional): options of the index (``faiss-ivf``: ``nlist``,
            ``nprobe``, ``reference_batch_size``).
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

    Attributes (after ``fit``):
        class_prototypes_ (Tensor): [C, D]. class_counts_ (Tensor): [C] training samples.
        ood_prototype_ (Tensor): [D]. index_ (ExactIndex): the training gradients.
        n_features_in_ (int), n_classes_ (int), n_train_ (int).
        train_accuracy_ (float): fraction of training samples classified correctly (by the
            given logits, or by the nearest class prototype), i.e. indexed.
        backend_ (dict): the backend used for each operation. device_, dtype_.
    """

    def __init__(
        self,
        ood_prototype: str | OODPrototypeSource = "mean",
        k: int = 1,
        index: str = "exact",
        index_options: dict[str, Any] | None = None,
        backend: str = "auto",
        precision: str = "ieee",
        device: str | torch.device | None = None,
        batch_size: int = 4096,
        progress: bool | None = None,
        distributed: bool = False,
    ) -> None:
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

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as scikit-learn estimators report them."""
        return {name: getattr(self, name) for name in
                ("ood_prototype", "k", "index", "index_options", "backend", "precision",
                 "device", "batch_size", "progress", "distributed")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"GROOD({args})"

    def _check_params(self) -> OODPrototypeSource:
        for name in ("k", "batch_size"):
            check_positive_int(getattr(self, name), name)
        check_device(self.device)
        ops.check_backend_name(self.backend)
        check_precision(self.precision)
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.distributed and not dist.is_initialized():
            raise ValueError("distributed=True needs an initialized torch.distributed process "
                             "group (start with torchrun and call init_process_group)")
        return resolve_source(self.ood_prototype)

    def _bar(self, total: int | None, desc: str):
        return progress(total=total, desc=desc, unit="rows", enabled=self.progress,
                        unit_scale=True)

    def fit(self, features: Any, labels: Any, *, logits: Any = None,
            ood_features: Any = None) -> GROOD:
        """Fit the detector on training features.

        Args:
            features (Tensor | ndarray): training features, shape [N, D].
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
        source = self._check_params()
        x, _ = as_tensor(features, "features")
        check_matrix(x, "features")
        y, _ = as_tensor(labels, "labels")
        n, d = x.shape
        lg = None
        n_classes = None
        if logits is not None:
            lg, _ = as_tensor(logits, "logits")
            check_matrix(lg, "logits")
            if lg.shape[0] != n:
                raise ValueError(f"logits has {lg.shape[0]} rows but features have {n}")
            n_classes = lg.shape[1]
        check_labels(y, "labels", n, n_classes=n_classes)
        if n_classes is None:
            n_classes = int(y.max()) + 1
            n_total = n
            if self.distributed:  # every rank needs the same class count
                n_classes = int(dist.all_reduce(torch.tensor([n_classes]), "max"))
                n_total = int(dist.all_reduce(torch.tensor([n])))
            check_class_count(n_classes - 1, n_total)

        inputs = {} if ood_features is None else {"ood_features": ood_features}
        self._check_inputs(source, inputs, "fit()")
        device = torch.device(self.device) if self.device is not None else x.device

        def passes(desc: str):
            with self._bar(n, desc) as bar:
                for r0, r1 in batches(n, self.batch_size):
                    yield (x[r0:r1].to(device), y[r0:r1].to(device),
                           None if lg is None else lg[r0:r1].to(device))
                    bar.update(r1 - r0)

        return self._fit_core(source, inputs, passes, n_classes=n_classes, d=d, device=device,
                              dtype=compute_dtype(x.dtype))

    def fit_batches(self, batches: Any, *, ood_features: Any = None,
                    n_classes: int | None = None) -> GROOD:
        """Fit from batches instead of whole arrays (datasets larger than memory).

        Args:
            batches: a re-iterable (list, DataLoader) or a function returning a new iterator of
                ``(features [B, D], labels [B])`` or ``(features, labels, logits [B, C])``
                batches (tensors or numpy arrays). It is read twice: class prototypes, then the
                gradient index; memory holds one batch at a time, the prototypes and the index.
            ood_features (optional): for ``ood_prototype="features"``.
            n_classes (int, optional): the number of classes; by default the logits' width,
                or one more than the largest label of the first pass.

        Returns:
            GROOD: ``self``.
        """
        source = self._check_params()
        if not callable(batches) and iter(batches) is batches:
            raise TypeError("batches must be re-iterable (a list, a DataLoader) or a function "
                            "returning a new iterator: fitting reads them twice, and an "
                            "iterator or generator is used up after one pass")
        inputs = {} if ood_features is None else {"ood_features": ood_features}
        self._check_inputs(source, inputs, "fit_batches()")
        first = _peek_batch(batches)
        d = first[0].shape[1]
        device = torch.device(self.device) if self.device is not None else first[0].device
        if n_classes is None and first[2] is None:
            n_classes, n_rows = 0, 0
            for _, yb, _ in _iter_batches(batches, "first pass"):
                n_classes = max(n_classes, int(yb.max()) + 1)
                n_rows += yb.shape[0]
            if self.distributed:
                n_classes = int(dist.all_reduce(torch.tensor([n_classes]), "max"))
                n_rows = int(dist.all_reduce(torch.tensor([n_rows])))
            check_class_count(n_classes - 1, n_rows)

        def passes(desc: str):
            with self._bar(None, desc) as bar:
                for xb, yb, lb in _iter_batches(batches, desc):
                    yield (xb.to(device), yb.to(device), None if lb is None else lb.to(device))
                    bar.update(xb.shape[0])

        return self._fit_core(source, inputs, passes, n_classes=n_classes, d=d, device=device,
                              dtype=compute_dtype(first[0].dtype))

    def score_batches(self, batches: Any) -> Iterator[tuple[Any, Any]]:
        """Score batches one at a time: yields ``(scores, preds)`` per batch of features.

        Memory holds one batch (and the index); each result has the type of its batch.
        """
        self._check_fitted()
        for batch in batches:
            yield self.score_and_predict(batch)

    def fit_model(self, model: Any, train_loader: Any, *, features: str | None = None,
                  ood_loader: Any = None, device: str | torch.device | None = None,
                  autocast: torch.dtype | None = None) -> GROOD:
        """Fit from a model and its training loader, streaming (no feature matrix is kept).

        Runs the model over ``train_loader`` twice (class prototypes, then the gradient index;
        model-level OOD prototype sources add their own passes), so memory holds the
        prototypes and the index, not the training features. A sample is indexed when the
        model classifies it correctly.

        Args:
            model (nn.Module): the classifier.
            train_loader: batches of ``(inputs, labels)`` (tuples or ``data``/``label`` dicts).
            features (str, optional): the penultimate module's name (see
                :class:`grood.extract.FeatureExtractor`); without it the model must take
                ``return_feature_list=True``.
            ood_loader (optional): OOD batches for ``ood_prototype="features"`` (their mean
                penultimate feature is the OOD prototype; OpenOOD's ``val`` OOD set).
            device, autocast: where and in which autocast dtype the model runs.

        Returns:
            GROOD: ``self``.
        """
        from grood.extract import FeatureExtractor
        from grood.sources import ModelContext

        source = self._check_params()
        extractor = FeatureExtractor(model, features=features, device=device,
                                     autocast=autocast, progress=self.progress)
        probe = extractor.batches(train_loader, desc="grood: probing", limit=1)
        first = next(probe, None)
        probe.close()
        if first is None:
            raise ValueError("the training loader yielded no batches")
        d = first[0].features.shape[1]
        inputs: dict[str, Any] = {}
        if "model" in source.needs:
            inputs["model"] = ModelContext(extractor, train_loader, tuple(first[2].shape[1:]))
        if ood_loader is not None:
            total, count = torch.zeros(d, dtype=torch.float64), 0
            for out, _, _ in extractor.batches(ood_loader, desc="grood fit: OOD features"):
                check_finite_rows(out.features, "OOD features")
                total += out.features.double().sum(0).cpu()
                count += out.features.shape[0]
            inputs["ood_features"] = (total / max(count, 1))[None].float()
        self._check_inputs(source, inputs, "fit_model()")
        dev = torch.device(self.device) if self.device is not None else extractor.device

        def passes(desc: str):
            for out, y, _ in extractor.batches(train_loader, desc=desc):
                yield (out.features.to(dev), None if y is None else y.to(dev),
                       None if out.logits is None else out.logits.to(dev))

        self._fit_core(source, inputs, passes, n_classes=None, d=d, device=dev,
                       dtype=torch.float32)
        self.extractor_ = {"features": features}
        return self

    def score_model(self, model: Any, loader: Any, *, features: str | None = None,
                    device: str | torch.device | None = None,
                    autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Scores (higher = in-distribution) and nearest-prototype classes of a loader.

        Streams the loader through the model; returns CPU tensors ``(scores [N], preds [N])``.
        ``features`` defaults to the one used by :meth:`fit_model`.
        """
        from grood.extract import FeatureExtractor

        self._check_fitted()
        if features is None:
            features = getattr(self, "extractor_", {}).get("features")
        extractor = FeatureExtractor(model, features=features, device=device,
                                     autocast=autocast, progress=self.progress)
        scores, preds = [], []
        for out, _, _ in extractor.batches(loader, desc="grood score"):
            s, p = self.score_and_predict(out.features)
            scores.append(s.cpu())
            preds.append(p.cpu())
        if not scores:
            raise ValueError("the loader yielded no batches")
        return torch.cat(scores), torch.cat(preds)

    def predict_model(self, model: Any, loader: Any, **kwargs: Any) -> Tensor:
        """Nearest-prototype classes of a loader's samples (CPU tensor [N])."""
        return self.score_model(model, loader, **kwargs)[1]

    @staticmethod
    def _check_inputs(source: OODPrototypeSource, inputs: dict[str, Any], where: str) -> None:
        missing = [name for name in source.needs if name not in inputs]
        if missing:
            raise ValueError(f"ood_prototype={source.name!r} needs {', '.join(missing)} in "
                             f"{where}")
        unused = [name for name in inputs if name not in source.needs]
        if unused:
            raise ValueError(f"{', '.join(unused)} given to {where} but ood_prototype="
                             f"{source.name!r} does not use it")

    def _fit_core(self, source: OODPrototypeSource, inputs: dict[str, Any], passes, *,
                  n_classes: int | None, d: int, device: torch.device,
                  dtype: torch.dtype) -> GROOD:
        """Fit from two streamed passes over the training set.

        ``passes(desc)`` yields ``(features [B, D], labels [B], logits [B, C] or None)``
        batches on ``device``; it is called twice: class prototypes, then the gradient index.
        Without ``n_classes`` it is the width of the first batch's logits.
        """
        backend = ops.resolve_backends(self.backend, device, dtype)
        state, n = None, 0
        for xb, yb, lb in passes("grood fit: class prototypes"):
            if n_classes is None:
                if lb is None:
                    raise ValueError("the number of classes is unknown: the model gave no "
                                     "logits")
                n_classes = lb.shape[1]
            _check_batch(xb, yb, lb, d, n_classes, n)
            state = class_prototypes(xb, yb, n_classes, state=state)
            n += xb.shape[0]
        if state is None:
            raise ValueError("the training data is empty")
        reduce = dist.all_reduce if self.distributed else (lambda t: t)
        if self.distributed:
            state = PrototypeState(reduce(state.sums), reduce(state.counts))
            n = int(reduce(torch.tensor([n])))
        protos = state.prototypes(dtype)
        p_ood = source.build(PrototypeContext(protos, inputs, self.batch_size, reduce))
        if p_ood.shape != (d,) or not bool(torch.isfinite(p_ood).all()):
            raise ValueError(f"OOD prototype source {source!r} did not give a finite vector of "
                             f"shape [{d}]")
        p_ood = p_ood.to(device=device, dtype=dtype)
        grads = _GradientStep(protos, p_ood, backend["ncp_gradient"], self.precision)

        index = make_index(self.index, d, dtype=dtype, device=device, backend=backend["knn"],
                           precision=self.precision, options=self.index_options)
        index.reserve(n)
        offset = 0
        for xb, yb, lb in passes("grood fit: gradient index"):
            res = _far_rows_in_float64(grads(xb), xb, grads, offset)
            offset += xb.shape[0]
            guess = res.pred if lb is None else lb.argmax(dim=1)
            index.add(res.grad[yb == guess])
        shard_sizes = ([int(t) for t in dist.all_gather_rows(torch.tensor([index.ntotal]))]
                       if self.distributed else [index.ntotal])
        total = sum(shard_sizes)
        if total == 0:
            raise ValueError("no training sample is classified correctly, so the gradient index "
                             "would be empty; check that labels match the features/logits")
        if self.k > total:
            raise ValueError(f"k={self.k} but only {total} training samples are "
                             "classified correctly and indexed")
        if index.ntotal:
            index.trim()
        self._set_fitted(protos, state.counts, p_ood, source, index, grads, n_train=n,
                         train_accuracy=total / n, backend=backend, device=device,
                         shard_sizes=shard_sizes)
        return self

    def _set_fitted(self, protos: Tensor, counts: Tensor, p_ood: Tensor,
                    source: OODPrototypeSource, index: Any, grads: _GradientStep,
                    *, n_train: int, train_accuracy: float, backend: dict[str, str],
                    device: torch.device, shard_sizes: list[int] | None = None) -> None:
        """Set every learned attribute (from ``fit`` or ``load``)."""
        self.class_prototypes_ = protos
        self.class_counts_ = counts
        self.ood_prototype_ = p_ood
        self.ood_source_ = source
        self.index_ = index
        self._grads = grads
        # Sizes of every rank's index shard, in rank order (one entry in one process).
        self.shard_sizes_ = shard_sizes if shard_sizes is not None else [index.ntotal]
        self.n_classes_, self.n_features_in_ = protos.shape
        self.n_train_ = n_train
        self.train_accuracy_ = train_accuracy
        self.backend_ = backend
        self.device_ = device
        self.dtype_ = protos.dtype

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError("this GROOD detector is not fitted yet: call fit() or "
                                 "GROOD.load() first")

    def _read(self, features: Any) -> tuple[Tensor, Any]:
        """Check the detector is fitted and ``features`` fits it; returns (tensor, kind)."""
        self._check_fitted()
        # Parameters may be changed after fit or load: check them where they are used.
        for name in ("k", "batch_size"):
            check_positive_int(getattr(self, name), name)
        x, kind = as_tensor(features, "features")
        # A rank of a distributed detector may have no rows; it still joins the searches.
        check_matrix(x, "features", n_cols=self.n_features_in_, allow_empty=self.distributed)
        return x, kind

    def _passes(self, x: Tensor, *, with_scores: bool
                ) -> Iterator[tuple[int, int, Tensor | None, Tensor]]:
        """Yield ``(start, stop, scores, preds)`` for each batch of rows of ``x``."""
        n = x.shape[0]
        n_batches = -(-n // self.batch_size)
        if self.distributed and with_scores:  # every rank joins every collective search
            n_batches = int(dist.all_reduce(torch.tensor([n_batches]), "max"))
        with self._bar(n, "grood score") as bar:
            for b in range(n_batches):
                r0, r1 = min(b * self.batch_size, n), min((b + 1) * self.batch_size, n)
                xb = x[r0:r1].to(self.device_)
                check_finite_rows(xb, "features", row_offset=r0)
                res = _far_rows_in_float64(self._grads(xb), xb, self._grads, r0)
                scores = None
                if with_scores:
                    dist_k = (self._search_sharded(res.grad) if self.distributed
                              else self.index_.search(res.grad, self.k)[0])
                    scores = 0.0 - dist_k[:, self.k - 1]  # 0.0 - x: no "-0.0" scores
                bar.update(r1 - r0)
                yield r0, r1, scores, res.pred

    def _search_sharded(self, grads: Tensor) -> Tensor:
        """k nearest over all ranks' shards for this rank's query gradients; distances."""
        rank, _ = dist.rank_and_world()
        per_rank = dist.all_gather_rows(grads)
        queries = torch.cat(per_rank)
        k, offset = self.k, sum(self.shard_sizes_[:rank])
        if self.index_.ntotal:
            d, i = self.index_.search(queries, k)
            i = torch.where(i >= 0, i + offset, i)
        else:
            d = torch.full((queries.shape[0], k), float("inf"), dtype=self.dtype_,
                           device=queries.device)
            i = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
        d_all = dist.all_gather_rows(d.to(self.dtype_))
        i_all = dist.all_gather_rows(i)
        merged, _ = dist.merge_topk(d_all, i_all, k)
        start = sum(t.shape[0] for t in per_rank[:rank])
        return merged[start:start + grads.shape[0]]

    def score_and_predict(self, features: Any) -> tuple[Any, Any]:
        """Scores (higher = in-distribution) and nearest-prototype classes in one pass.

        Args:
            features (Tensor | ndarray): shape [N, D].

        Returns:
            tuple: ``(scores [N], preds [N])``, numpy arrays for numpy input, tensors on the
            input's device for tensor input.
        """
        x, kind = self._read(features)
        # float64 features are scored in float64 (gradient step and exact search).
        out_dtype = torch.promote_types(self.dtype_, compute_dtype(x.dtype))
        scores = torch.empty(x.shape[0], dtype=out_dtype, device=self.device_)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=self.device_)
        for r0, r1, s, p in self._passes(x, with_scores=True):
            scores[r0:r1] = s
            preds[r0:r1] = p
        return kind.wrap(scores), kind.wrap(preds)

    def score_samples(self, features: Any) -> Any:
        """GROOD score per sample: ``-||g(x) - g_k||^2``; higher = more in-distribution.

        Args:
            features (Tensor | ndarray): shape [N, D].

        Returns:
            Tensor | ndarray: scores, shape [N], the same type as the input.
        """
        return self.score_and_predict(features)[0]

    def predict(self, features: Any) -> Any:
        """Nearest class prototype for each sample (int64), shape [N]."""
        x, kind = self._read(features)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=self.device_)
        for r0, r1, _, p in self._passes(x, with_scores=False):
            preds[r0:r1] = p
        return kind.wrap(preds)

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to a ``.safetensors`` file (atomically).

        The file holds tensors and JSON metadata only (no pickle) and a SHA-256 digest over
        both. A distributed detector is saved by every rank: rank r writes its index shard to
        ``<path stem>.rank<r>.safetensors`` and rank 0 writes ``path`` as a JSON manifest
        listing the shards with their SHA-256 digests. See :mod:`grood.persistence`.
        """
        from grood import persistence

        self._check_fitted()
        persistence.save(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
             distributed: bool = False) -> GROOD:
        """Read a detector written by :meth:`save` (a file, or a sharded detector's manifest).

        Everything is checked before use — format and version, the digest, the consistency of
        all shapes — and nothing in the file is executed. A sharded detector loads on as many
        ranks as saved it with ``distributed=True`` (each rank reads its shard), or whole into
        one process, its shards' indexes joined in rank order (exact and faiss-flat indexes).

        Args:
            path: the ``.safetensors`` file or the shard manifest.
            device: where to put the detector (default: CPU).
            distributed: load this rank's shard of a sharded detector.
        """
        from grood import persistence

        return persistence.load(cls, Path(path), device=check_device(device),
                                distributed=distributed)

    def _state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
        """``(params, state, tensors)``: everything :meth:`_restore` needs, for saving."""
        params = {
            "ood_prototype": {"name": self.ood_source_.name, "params": self.ood_source_.params()},
            "k": self.k,
            "index": self.index,
            "index_options": self.index_options,
            "backend": self.backend,
            "precision": self.precision,
            "batch_size": self.batch_size,
        }
        state = {
            "n_features_in": self.n_features_in_,
            "n_classes": self.n_classes_,
            "n_train": self.n_train_,
            "train_accuracy": self.train_accuracy_,
            "dtype": str(self.dtype_).removeprefix("torch."),
            "index": self.index_.kind,
            "extractor": getattr(self, "extractor_", None),
            "shard_sizes": self.shard_sizes_,
        }
        tensors = {
            "class_prototypes": self.class_prototypes_,
            "class_counts": self.class_counts_,
            "ood_prototype": self.ood_prototype_,
            **{f"index.{name}": t for name, t in self.index_.state_dict().items()},
        }
        return params, state, {n: t.detach().cpu().contiguous() for n, t in tensors.items()}

    @classmethod
    def _restore(cls, params: dict[str, Any], state: dict[str, Any],
                 tensors: dict[str, Tensor], device: str | torch.device | None) -> GROOD:
        """Rebuild a fitted detector from checked, saved parts (see :mod:`grood.persistence`)."""
        source_cfg = params["ood_prototype"]
        source = source_from_config(source_cfg["name"], source_cfg["params"])
        det = cls(
            # A source with no parameters is given back by name, as it was most likely given.
            ood_prototype=source if source_cfg["params"] else source_cfg["name"],
            k=params["k"], index=params["index"], index_options=params["index_options"],
            backend=params["backend"], precision=params["precision"], device=device,
            batch_size=params["batch_size"],
        )
        dev = torch.device(device) if device is not None else torch.device("cpu")
        protos = tensors["class_prototypes"].to(dev)
        p_ood = tensors["ood_prototype"].to(dev)
        backend = ops.resolve_backends(det.backend, dev, protos.dtype)
        index_state = {n.removeprefix("index."): t for n, t in tensors.items()
                       if n.startswith("index.")}
        index = index_from_state(state["index"], index_state, device=dev,
                                 backend=backend["knn"], precision=det.precision,
                                 options=params["index_options"])
        grads = _GradientStep(protos, p_ood, backend["ncp_gradient"], det.precision)
        if state.get("extractor") is not None:
            det.extractor_ = state["extractor"]
        det._set_fitted(protos, tensors["class_counts"].to(dev), p_ood, source, index, grads,
                        n_train=state["n_train"], train_accuracy=state["train_accuracy"],
                        backend=backend, device=dev)
        return det

class _GradientStep:
    """The NCP gradient of feature batches against fixed prototypes, on one backend.

    Holds what is computed once per fit: the squared norms of the prototypes relative to the
    OOD prototype, and the implementation chosen by :mod:`grood.ops`.
    """

    def __init__(self, protos: Tensor, p_ood: Tensor, backend: str, precision: str) -> None:
        self.protos, self.p_ood, self.precision = protos, p_ood, precision
        centred = protos.to(torch.float64) - p_ood.to(torch.float64)
        self.sq_norms = (centred * centred).sum(1).to(protos.dtype)  # [C]
        self.fn = ops.get_op("ncp_gradient", backend)

    def __call__(self, h: Tensor) -> NCPGradient:
        if h.dtype == torch.float64 and self.protos.dtype != torch.float64:
            # float64 features are computed in float64 (the kernels take no float64).
            return functional.ncp_gradient(h, self.protos, self.p_ood)
        return self.fn(h, self.protos, self.p_ood, precision=self.precision,
                       prototype_sq_norms=self.sq_norms)


# Largest feature-to-prototype distance the float32 softmax resolves: at 2**16 a float32
# distance is accurate to 2**-8, so exp(-distance) terms carry errors under 0.4 %.
FLOAT32_DISTANCE_LIMIT = 2.0**16


# float64 resolves the softmax of distances up to 2**44 (the same relative resolution).
FLOAT64_DISTANCE_LIMIT = 2.0**44


def _far_rows_in_float64(res: NCPGradient, xb: Tensor, step: _GradientStep,
                         offset: int) -> NCPGradient:
    """Recompute in float64 the rows float32 cannot resolve; refuse only beyond float64.

    Finite features can give non-finite or meaningless softmax terms in float32 when the
    distances are huge: the softmax of negative distances is not scale-invariant, and float32
    cannot resolve distance differences below its resolution at that magnitude. Such a row is
    far out of distribution, not an error: it alone is redone in float64 (on every backend),
    and its float64 results replace the float32 ones.
    """
    ok = torch.isfinite(res.q_ood) & torch.isfinite(res.lse) & torch.isfinite(res.grad).all(1)
    if res.lse.dtype != torch.float64:
        ok &= (res.min_dist <= FLOAT32_DISTANCE_LIMIT) & (-res.lse <= FLOAT32_DISTANCE_LIMIT)
    if bool(ok.all()):
        return res
    bad = (~ok).nonzero()[:, 0]
    r64 = functional.ncp_gradient(xb[bad].double(), step.protos.double(),
                                  step.p_ood.double())
    good64 = (torch.isfinite(r64.q_ood) & torch.isfinite(r64.lse)
              & torch.isfinite(r64.grad).all(1) & (r64.min_dist <= FLOAT64_DISTANCE_LIMIT)
              & (-r64.lse <= FLOAT64_DISTANCE_LIMIT))
    if not bool(good64.all()):
        row = int(bad[int((~good64).nonzero()[0])]) + offset
        raise ValueError(f"features in row {row} (values up to {float(xb.abs().max()):.3g}) "
                         f"lie farther than {FLOAT64_DISTANCE_LIMIT:.3g} from the prototypes, "
                         "beyond what the softmax of distances resolves even in float64; "
                         "rescale them (GROOD's scores depend on the scale)")
    fields = []
    for mine, fixed in zip(res, r64, strict=True):
        out = mine.clone()
        out[bad] = fixed.to(mine.dtype)
        fields.append(out)
    return NCPGradient(*fields)


def _iter_batches(batches: Any, desc: str) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(features, labels, logits or None)`` tensors from a re-iterable or a factory."""
    source = batches() if callable(batches) else batches
    empty = True
    for i, batch in enumerate(source):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError(f"batch {i} must be (features, labels) or (features, labels, "
                            f"logits), got {type(batch).__name__}")
        x, _ = as_tensor(batch[0], "features")
        y, _ = as_tensor(batch[1], "labels")
        lg = as_tensor(batch[2], "logits")[0] if len(batch) == 3 and batch[2] is not None \
            else None
        empty = False
        yield x, y, lg
    if empty:
        raise ValueError(f"batches yielded nothing in the {desc}; pass a list, a DataLoader "
                         "or a function returning a new iterator (a generator is used up "
                         "after one pass)")


def _peek_batch(batches: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """The first batch, checked, without consuming a re-iterable."""
    it = _iter_batches(batches, "first pass")
    first = next(it)
    it.close()
    check_matrix(first[0], "features")
    return first


def _check_batch(xb: Tensor, yb: Tensor | None, lb: Tensor | None, d: int, n_classes: int,
                 offset: int) -> None:
    """Validate one streamed training batch; row numbers are counted from the first batch."""
    check_matrix(xb, "features", n_cols=d)
    check_finite_rows(xb, "features", row_offset=offset)
    if yb is None:
        raise ValueError("the training batches carry no labels")
    check_labels(yb, "labels", xb.shape[0], n_classes=n_classes)
    if lb is not None:
        if lb.shape != (xb.shape[0], n_classes):
            raise ValueError(f"logits of shape {tuple(lb.shape)} do not match "
                             f"{xb.shape[0]} rows and {n_classes} classes")
        check_finite_rows(lb, "logits", row_offset=offset)
