"""GROOD as an OpenOOD postprocessor.

OpenOOD drives a postprocessor with ``setup(net, id_loader_dict, ood_loader_dict)``, then
``inference(net, data_loader)`` per dataset (or ``postprocess(net, data)`` per batch); its nets
return ``(logits, feature_list)`` from ``forward(x, return_feature_list=True)`` and its loaders
yield dicts with ``data`` and ``label``. ``conf`` is higher for in-distribution samples, as
OpenOOD expects. When ``openood`` imports, :class:`GROODPostprocessor` subclasses its
``BasePostprocessor`` (so OpenOOD's ``Evaluator`` takes it); without OpenOOD it offers the same
methods on its own.

``reference=True`` reproduces the official postprocessor's numbers: the ``val`` OOD prototype
is the mean feature of the first whole ``val`` batches that reach 100 rows; the index is
faiss IVF-Flat trained on the gradients of the first ``T = min(600, int(0.8 * B))`` of the B
training-loader batches (misclassified rows count in the batches, only correct rows are
indexed), ``nlist = int(4 * sqrt(T))``, ``nprobe = 4``. ``omit_batch_t=True`` also leaves out
the gradients of batch T, as the official code does (a defect there: off unless asked for).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from grood._progress import progress as progress_bar
from grood.detector import GROOD
from grood.extract import FeatureExtractor, split_batch

try:  # OpenOOD is optional (and not on PyPI): its base class when it imports
    from openood.postprocessors.base_postprocessor import BasePostprocessor as _Base
except ImportError:
    _Base = object

#: Rows of ``val`` OOD batches the reference averages for its OOD prototype (whole batches).
REFERENCE_VAL_ROWS = 100

#: OpenOOD-style names of the OOD prototype sources.
SOURCES = ("mean", "val", "noise", "mixup")


class GROODPostprocessor(_Base):
    """OpenOOD postprocessor computing GROOD scores (``conf``, higher = ID) and predictions.

    Args:
        config (optional): an OpenOOD config; ``config.postprocessor.postprocessor_args`` may
            set ``ood_prototype``, ``use_val_ood`` (True: ``"val"``), ``k`` (or OpenOOD's
            ``K``), ``batch_size``, ``reference`` and ``omit_batch_t`` (keyword arguments win).
        ood_prototype (str | OODPrototypeSource): ``"mean"`` (mean of the class prototypes),
            ``"val"`` (mean feature of ``ood_loader_dict["val"]``, OpenOOD's shipped default),
            ``"noise"``, or a source object (e.g. ``Mixup(..., split=(stem, tail))``; OpenOOD's
            ResNets need the explicit split).
        features (str, optional): the penultimate module's name; by default the last entry of
            the net's ``return_feature_list`` output.
        reference (bool): reproduce the official postprocessor (see the module notes).
        omit_batch_t (bool): with ``reference``, leave out batch T's gradients as it does.
        **grood_kwargs: passed to :class:`grood.GROOD` (``k``, ``index``, ``backend``, ...).
    """

    def __init__(self, config: Any = None, *, ood_prototype: Any = None,
                 features: str | None = None, reference: bool | None = None,
                 omit_batch_t: bool | None = None, **grood_kwargs: Any) -> None:
        if _Base is not object:
            super().__init__(config)
        args = {}
        if config is not None:
            try:
                args = dict(config.postprocessor.postprocessor_args)
            except (AttributeError, TypeError):
                args = {}
        if "K" in args and "k" not in args:
            args["k"] = args["K"]
        default = "val" if args.get("use_val_ood") else "mean"
        self.ood_prototype = ood_prototype or args.get("ood_prototype", default)
        self.features = features
        self.reference = bool(args.get("reference", False) if reference is None else reference)
        self.omit_batch_t = bool(args.get("omit_batch_t", False) if omit_batch_t is None
                                 else omit_batch_t)
        if self.omit_batch_t and not self.reference:
            raise ValueError("omit_batch_t emulates the official code's index: it needs "
                             "reference=True")
        given = sorted({"index", "index_options"} & set(grood_kwargs))
        if self.reference and given:  # they would be replaced by the reference's index
            raise ValueError(f"reference=True builds the official code's index (faiss-ivf, "
                             f"nprobe 4); {' and '.join(given)} cannot be given with it")
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
            if self.reference:
                ood_loader = _first_batches(ood_loader, REFERENCE_VAL_ROWS)
        kwargs = dict(self.grood_kwargs)
        train = id_loader_dict["train"]
        if self.reference:
            if not hasattr(train, "__len__"):  # a generator: the rule counts the batches
                raise ValueError("reference=True needs a training loader with a length (the "
                                 "official index is trained on a share of its batches); "
                                 f"got {type(train).__name__}")
            kwargs["index"] = "faiss-ivf"
            kwargs["index_options"] = {"nprobe": 4, "loader_batches": len(train),
                                       "omit_batch_t": self.omit_batch_t}
        self.detector = GROOD(ood_prototype=source, **kwargs).fit_model(
            net, train, features=self.features, ood_loader=ood_loader)

    def _extractor(self, net: torch.nn.Module) -> FeatureExtractor:
        if self.detector is None:
            raise RuntimeError("GROODPostprocessor.setup() must run before scoring")
        return FeatureExtractor(net, features=self.features, progress=False)

    @torch.no_grad()
    def postprocess(self, net: torch.nn.Module, data: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred, conf)`` for one batch: nearest-prototype classes and GROOD scores."""
        out = self._extractor(net)(data)
        assert self.detector is not None  # (checked by _extractor)
        conf, pred = self.detector.score_and_predict(out.features)
        return pred, conf

    def inference(self, net: torch.nn.Module, data_loader: Any, progress: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pred_list, conf_list, label_list)`` over a loader, as OpenOOD's evaluator reads;
        ``progress`` shows a bar over its batches (plain lines when stderr is no terminal)."""
        preds, confs, labels = [], [], []
        for batch in progress_bar(data_loader, desc="grood: scoring", unit="batch",
                                  enabled=None if progress else False):
            x, y = split_batch(batch)
            pred, conf = self.postprocess(net, x)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            labels.append(torch.full((x.shape[0],), -1) if y is None else y.cpu())
        if not preds:
            raise ValueError("the data loader yielded no batches")
        return (torch.cat(preds).numpy().astype(int), torch.cat(confs).numpy(),
                torch.cat(labels).numpy().astype(int))


def _first_batches(loader: Any, rows: int) -> list:
    """The loader's first whole batches that together hold at least ``rows`` rows."""
    taken, n = [], 0
    for batch in loader:
        taken.append(batch)
        n += split_batch(batch)[0].shape[0]
        if n >= rows:
            break
    return taken
