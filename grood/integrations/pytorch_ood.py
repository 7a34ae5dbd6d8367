"""GROOD as a pytorch-ood detector.

pytorch-ood detectors score *outliers*: larger = more likely OOD. This adapter returns
``-score`` of :class:`grood.GROOD` (whose scores are higher for in-distribution samples). It
follows pytorch-ood's feature-detector API by name — ``fit(loader)``, ``fit_features(x, y)``,
``predict(x)``, ``predict_features(x)``, and calling the detector predicts — without importing
pytorch-ood.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grood.detector import GROOD
from grood.extract import FeatureExtractor


class GROODDetector:
    """pytorch-ood style GROOD detector (outlier scores: larger = more OOD).

    Args:
        model (nn.Module, optional): the classifier, for ``fit(loader)`` and ``predict(x)``.
        features (str, optional): name of its penultimate module (see
            :class:`grood.extract.FeatureExtractor`).
        **grood_kwargs: passed to :class:`grood.GROOD` (``ood_prototype``, ``k``, ...).
    """

    requires_fit = True

    def __init__(self, model: torch.nn.Module | None = None, features: str | None = None,
                 **grood_kwargs: Any) -> None:
        self.model = model
        self.features = features
        self.detector = GROOD(**grood_kwargs)

    def _need_model(self) -> torch.nn.Module:
        if self.model is None:
            raise ValueError("this GROODDetector was created without a model; use "
                             "fit_features / predict_features, or pass model=...")
        return self.model

    def fit(self, data_loader: Any, device: Any = None) -> GROODDetector:
        """Fit on a loader of ``(x, y)`` batches through the model."""
        self.detector.fit_model(self._need_model(), data_loader, features=self.features,
                                device=device)
        return self

    def fit_features(self, x: Tensor, y: Tensor, logits: Tensor | None = None
                     ) -> GROODDetector:
        """Fit on penultimate features ``x`` [N, D] and labels ``y`` [N]."""
        self.detector.fit(x, y, logits=logits)
        return self

    def predict_features(self, x: Tensor) -> Tensor:
        """Outlier scores of features ``x`` [B, D] (larger = more OOD)."""
        return -self.detector.score_samples(x)

    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores of model inputs ``x`` (larger = more OOD)."""
        out = FeatureExtractor(self._need_model(), features=self.features, progress=False)(x)
        return self.predict_features(out.features)

    def __call__(self, x: Tensor) -> Tensor:
        return self.predict(x)
