"""GROOD as an OpenOOD postprocessor.

OpenOOD drives a postprocessor with ``setup(net, id_loader_dict, ood_loader_dict)``, then
``inference(net, data_loader)`` per dataset (or ``postprocess(net, data)`` per batch); its nets
return ``(logits, feature_list)`` from ``forward(x, return_feature_list=True)`` and its loaders
yield dicts with ``data`` and ``label``. ``conf`` is higher for in-distribution samples, as
OpenOOD expects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from grood.detector import GROOD
from grood.extract import FeatureExtractor, split_batch

#: OpenOOD-style names of the OOD prototype sources.
SOURCES = ("mean", "val", "noise", "mixup")


class GROODPostprocessor:
    """OpenOOD postprocessor computing GROOD scores (``conf``, higher = ID) and predictions.

    Args:
        config (optional): an OpenOOD config; ``config.postprocessor.postprocessor_args`` may
            set ``ood_prototype``, ``k`` and ``batch_size`` (keyword arguments win).
        ood_prototype (str | OODPrototypeSource): ``"mean"`` (mean of the class prototypes),
            ``"val"`` (mean feature of ``ood_loader_dict["val"]``, OpenOOD's shipped default),
            ``"noise"``, or a source object (e.g. ``Mixup(..., split=(stem, tail))``; OpenOOD's
            ResNets need the explicit split).
        features (str, optional): the penultimate module's name; by default the last entry of
            the net's ``return_feature_list`` output.
        **grood_kwargs: passed to :class:`grood.GROOD` (``k``, ``index``, ``backend``, ...).
    """

    def __init__(self, config: Any = None, *, ood_prototype: Any = None,
                 features: str | None = None, **grood_kwargs: Any) -> None:
        args = {}
        if config is not None:
            try:
                args = dict(config.postprocessor.postprocessor_args)
            except (AttributeError, TypeError):
                args = {}
        self.ood_prototype = ood_prototype or args.get("ood_prototype", "mean")
        self.features = features
        self.grood_kwargs = {**{k: args[k] for k in ("k", "batch_size") if k in args},
                             **grood_kwargs}
        self.APS_mode = False  # no hyper-parameter search
        self.hyperparam_search_done = True
        self.detector: GROOD | None = None

    def setup(self, net: torch.nn.Module, id_loader_dict: dict, ood_loader_dict: dict) -> None:
        """Fit GROOD on ``id_loader_dict["train"]`` with the configured OOD prototype."""
        source = self.ood_prototype
        ood_loader = None
        if source == "val":
            if "val" not in ood_loader_dict:
                raise ValueError("ood_prototype='val' needs ood_loader_dict['val']")
            source, ood_loader = "features", ood_loader_dict["val"]
        self.detector = GROOD(ood_prototype=source, **self.grood_kwargs).fit_model(
            net, id_loader_dict["train"], features=self.features, ood_loader=ood_loader)

    def _extractor(self, net: torch.nn.Module) -> FeatureExtractor:
        if self.detector is None:
            raise RuntimeError("GROODPostprocessor.setup() must run before scoring")
        return FeatureExtractor(net, features=self.features, progress=False)

    @torch.no_grad()
    def postprocess(self, net: torch.nn.Module, data: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred, conf)`` for one batch: nearest-prototype classes and GROOD scores."""
        out = self._extractor(net)(data)
        conf, pred = self.detector.score_and_predict(out.features)
        return pred, conf

    def inference(self, net: torch.nn.Module, data_loader: Any, progress: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pred_list, conf_list, label_list)`` over a loader, as OpenOOD's evaluator reads."""
        preds, confs, labels = [], [], []
        for batch in data_loader:
            x, y = split_batch(batch)
            pred, conf = self.postprocess(net, x)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            labels.append(torch.full((x.shape[0],), -1) if y is None else y.cpu())
        return (torch.cat(preds).numpy().astype(int), torch.cat(confs).numpy(),
                torch.cat(labels).numpy().astype(int))
