"""GROOD as a pytorch-ood detector.

When ``pytorch_ood`` imports, :class:`GROODDetector` is a ``pytorch_ood.api.FeaturesDetector``
(so ``Benchmark.evaluate``, ``GridSearch`` and ``OODMetrics`` take it) and raises pytorch-ood's
``RequiresFittingException`` / ``ModelNotSetException``; without pytorch-ood it offers the same
methods on its own. pytorch-ood detectors score *outliers*: this one returns minus the GROOD
score, so larger = more likely OOD.

Conventions followed: an ``encoder`` callable maps inputs to pooled features [B, D]; rows
labelled < 0 (OOD) are skipped when fitting; ``fit(loader)`` extracts features and calls
``fit_features``, so both paths fit the same detector; the hyper-parameters ``k``,
``ood_prototype`` and ``precision`` are attributes listed in ``hyperparameter_space``.

Which training rows are indexed (one rule on both paths): a row is indexed when the classifier
gets it right — ``argmax(head(features)) == label`` when a ``head`` (features → logits, e.g.
``model.fc``) is given, or ``logits`` passed to ``fit_features`` — and otherwise when its
nearest class prototype is its label.

An ``encoder`` or ``head`` that is an ``nn.Module`` runs in eval mode (as grood's own model
front end does), and each submodule's mode is restored after the call: a network left in
training mode would otherwise fit and score on features its dropout draws at random and its
batch norm takes from each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from grood import persistence
from grood._batches import check_loader, dict_batch_hint
from grood._checks import as_labels, as_tensor, check_matrix
from grood.detector import GROOD
from grood.extract import as_rows, eval_mode
from grood.integrations import check_grood_kwargs

try:  # pytorch-ood is optional: its classes when it imports, stand-ins otherwise
    from pytorch_ood.api import FeaturesDetector as _Base
    from pytorch_ood.api import ModelNotSetException, RequiresFittingException
except ImportError:
    _Base = None

    class RequiresFittingException(Exception):  # type: ignore[no-redef]
        """``predict`` was called before ``fit``."""

        def __init__(self, msg: str = "You have to call fit() before predict()") -> None:
            super().__init__(msg)

    class ModelNotSetException(ValueError):  # type: ignore[no-redef]
        """``predict`` or ``fit`` needs an encoder, and none was given."""

        def __init__(self, msg: str = "this detector needs an encoder for inputs; use "
                                      "fit_features / predict_features") -> None:
            super().__init__(msg)


def _shape_of(batch: Any) -> str:
    """What a batch is, for an error: its type, and the length of a tuple or list."""
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    if isinstance(batch, Mapping):  # (a dataset of dict samples: say how to give the arrays)
        return f"a {type(batch).__name__}" + dict_batch_hint(batch, "(({}, {}) for b in loader)")
    return f"a {type(batch).__name__}"


def _inference(fn: Any) -> AbstractContextManager:
    """Eval mode for a module (restored after), nothing for another callable."""
    return eval_mode(fn) if isinstance(fn, nn.Module) else nullcontext()


class _StandIn:
    """The part of pytorch-ood's ``Detector`` API used here, for when it is not installed."""

    requires_fit = True
    hyperparameter_space: ClassVar[dict[str, list]] = {}
    encoder: Any  # the detector's, as pytorch-ood's Detector has them
    head: Any

    if TYPE_CHECKING:
        def predict(self, x: Tensor) -> Tensor: ...

    @property
    def device(self) -> torch.device | None:
        for value in (self.encoder, self.head):
            if isinstance(value, nn.Module):
                for t in (*value.parameters(), *value.buffers()):
                    return t.device
        return getattr(self, "_device", None)

    def to(self, device: str | torch.device) -> Any:
        self._device = torch.device(device)
        for value in (self.encoder, self.head):
            if isinstance(value, nn.Module):
                value.to(self._device)
        return self

    def get_hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.hyperparameter_space}

    def set_hyperparameters(self, **kwargs: Any) -> Any:
        for name, value in kwargs.items():
            if name not in self.hyperparameter_space:
                raise ValueError(f"unknown hyperparameter {name!r} for GROODDetector; known: "
                                 f"{list(self.hyperparameter_space)}")
            setattr(self, name, value)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        return self.predict(x)


class GROODDetector(_Base or _StandIn):  # type: ignore[misc]
    """GROOD (ElAraby et al., arXiv 2312.14427) for pytorch-ood: outlier scores, larger = OOD.

    Args:
        encoder (callable, optional): inputs -> pooled penultimate features [B, D] (e.g. the
            network without its last layer). ``None`` when only ``fit_features`` /
            ``predict_features`` are used.
        head (callable, optional): features -> logits (e.g. ``model.fc``); decides which
            training rows are indexed (see the module notes).
        k (int): score by the k-th nearest indexed gradient.
        ood_prototype (str): ``"mean"`` (of the class prototypes) — the sources that need only
            features; model-level sources are for :class:`grood.GROOD` itself.
        precision (str): GEMM precision (``"ieee"``, ``"tf32"``, ``"tf32x3"``, ``"bf16"``).
        **grood_kwargs: further :class:`grood.GROOD` arguments (``index``, ``backend``, ...).
    """

    requires_fit = True
    #: Search space for ``pytorch_ood.utils.GridSearch`` (every hyper-parameter is listed, so
    #: ``get_hyperparameters`` / ``set_hyperparameters`` reach all three; widen a list to
    #: search it, e.g. ``"precision": ["ieee", "bf16"]``).
    hyperparameter_space: ClassVar[dict[str, list]] = {
        "k": [1, 2, 5, 10, 20, 50], "ood_prototype": ["mean"], "precision": ["ieee"]}

    def __init__(self, encoder: Callable[[Tensor], Tensor] | None = None, *,
                 head: Callable[[Tensor], Tensor] | None = None, k: int = 1,
                 ood_prototype: str = "mean", precision: str = "ieee",
                 **grood_kwargs: Any) -> None:
        check_grood_kwargs(grood_kwargs, "GROODDetector",
                           ("encoder", "head", "k", "ood_prototype", "precision"))
        self.encoder = encoder
        self.head = head
        self.k = k
        self.ood_prototype = ood_prototype
        self.precision = precision
        self.grood_kwargs = grood_kwargs
        self.grood: GROOD | None = None

    def _params(self) -> dict[str, Any]:
        return {"k": self.k, "ood_prototype": self.ood_prototype, "precision": self.precision,
                **self.grood_kwargs}

    def to(self, device: str | torch.device) -> GROODDetector:
        """Move the encoder, the head and the fitted detector's state to ``device``."""
        super().to(device)
        if self.grood is not None:  # rebuilt from its own state on the new device
            params, state, tensors = persistence.detector_state(self.grood)
            self.grood = persistence.restore(GROOD, params, state, tensors, device)
        return self

    @torch.no_grad()
    def fit(self, data_loader: Iterable, device: str | torch.device | None = None
            ) -> GROODDetector:
        """Fit on a loader of ``(x, y)`` batches through the encoder; rows labelled < 0 are
        skipped. Equals ``fit_features`` on the extracted features."""
        if self.encoder is None:
            raise ModelNotSetException()
        device = device or self.device or "cpu"
        with _inference(self.encoder):
            x, y = self._extract(data_loader, device)
        return self.fit_features(x, y)

    def _extract(self, data_loader: Iterable, device: str | torch.device
                 ) -> tuple[Tensor, Tensor]:
        """The encoder's features and the labels of the loader's rows labelled >= 0."""
        assert self.encoder is not None  # (checked by fit)
        check_loader(data_loader, "fit takes a loader of (inputs, labels) batches",
                     ": pass [(inputs, labels)], a DataLoader, or features to fit_features")
        feats, labels = [], []
        for number, batch in enumerate(data_loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"the loader's batch {number} (numbered from 0) must be "
                                f"(inputs, labels), got {_shape_of(batch)}")
            x, y = torch.as_tensor(batch[0]), as_labels(batch[1])  # (or NumPy arrays)
            known = y >= 0
            if not bool(known.any()):  # (an OOD batch, or one of 0 rows: the encoder not run)
                continue
            if bool(known.all()):  # the usual training batch: no copy through the mask
                x_known, y_known = x, y
            else:
                x_known, y_known = x[known], y[known]
            z = self.encoder(x_known.to(device))
            feats.append(as_rows(z).detach())
            labels.append(y_known.to(z.device))
        if not feats:
            raise ValueError("the loader holds no in-distribution rows (labels >= 0)")
        x, y = torch.cat(feats), torch.cat(labels)
        feats.clear()  # the batches, once joined: one copy of the features while fitting
        return x, y

    def fit_features(self, x: Tensor, y: Tensor, logits: Tensor | None = None
                     ) -> GROODDetector:
        """Fit on features ``x`` [N, D] and labels ``y`` [N]; rows labelled < 0 are skipped.

        ``logits`` [N, C] (or the ``head``'s logits of ``x``) decide which rows are indexed;
        without either, the nearest class prototype does.
        """
        # (as GROOD reads them: any NumPy layout; class names refused with how to number them)
        x, y = as_tensor(x, "features")[0], as_labels(y)
        # Shapes are checked before the unknown rows are dropped (a mask of the wrong shape
        # fails inside torch's indexing).
        check_matrix(x, "features")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape [{x.shape[0]}] (one per feature row), "
                             f"got {tuple(y.shape)}")
        if logits is not None:
            logits = torch.as_tensor(logits)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"logits must have shape [{x.shape[0]}, C] (one row per "
                                 f"feature row), got {tuple(logits.shape)}")
        known = y >= 0
        if not bool(known.any()):
            raise ValueError("no in-distribution rows (labels >= 0) to fit on")
        every = bool(known.all())
        if not every:  # (a mask index copies the rows even when it keeps them all)
            x, y = x[known], y[known]
        if logits is None and self.head is not None:
            with torch.no_grad(), _inference(self.head):
                logits = self.head(x)
        elif logits is not None and not every:
            logits = logits[known]
        self.grood = GROOD(**self._params()).fit(x.detach(), y, logits=logits)
        return self

    def _fitted(self) -> GROOD:
        if self.grood is None:
            raise RequiresFittingException()
        # Hyper-parameters set after fit that need no refit take effect here.
        self.grood.k, self.grood.precision = self.k, self.precision
        return self.grood

    def predict_features(self, x: Tensor) -> Tensor:
        """Outlier scores of features ``x`` [B, D] (larger = more OOD), on ``x``'s device; a
        batch of 0 rows gives 0 scores, as pytorch-ood's own detectors do."""
        det = self._fitted()
        return 0.0 - det._score_and_predict(as_tensor(x, "features")[0].detach(),
                                            allow_empty=True)[0]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores of model inputs ``x`` through the encoder (larger = more OOD)."""
        if self.encoder is None:
            raise ModelNotSetException()
        det = self._fitted()
        device = self.device
        x = torch.as_tensor(x)  # (NumPy inputs too, as predict_features takes them)
        if x.shape[0] == 0:  # (the encoder need not take 0 rows: as fit, it is not run)
            z = torch.empty((0, det.n_features_in_), device=device or x.device)
        else:
            with _inference(self.encoder):
                z = self.encoder(x if device is None else x.to(device))
        return self.predict_features(as_rows(z))
