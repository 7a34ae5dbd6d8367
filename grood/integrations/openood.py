"""GROOD as an OpenOOD postprocessor.

OpenOOD drives a postprocessor with ``setup(net, id_loader_dict, ood_loader_dict)``, then
``inference(net, data_loader)`` per dataset (or ``postprocess(net, data)`` per batch); its nets
return ``(logits, feature_list)`` from ``forward(x, return_feature_list=True)`` and its loaders
yield dicts with ``data`` and ``label``. ``conf`` is higher for in-distribution samples, as
OpenOOD expects. When ``openood`` imports, :class:`GROODPostprocessor` subclasses its
``BasePostprocessor`` (so OpenOOD's ``Evaluator`` takes it); without OpenOOD it offers the same
methods on its own.

``reference=True`` reproduces the official postprocessor's numbers: the ``val`` OOD prototype
is the mean feature of the first whole ``val`` batches that reach ``n_noise_samples`` rows (100
when the config does not say); the index is
faiss IVF-Flat trained on the gradients of the first ``T = min(600, int(0.8 * B))`` of the B
training-loader batches (misclassified rows count in the batches, only correct rows are
indexed), ``nlist = int(4 * sqrt(T))``, ``nprobe = 4``, scored by the nearest gradient (the
official code reads ``k`` but searches one neighbour, so a ``k`` other than 1 is refused
there). ``omit_batch_t=True`` also leaves out
the gradients of batch T, as the official code does (a defect there: off unless asked for).

With ``APS_mode`` in the config, OpenOOD's evaluator searches ``postprocessor_sweep`` after
``setup`` (``set_hyperparam`` / ``get_hyperparam``, chosen by AUROC on its ``val`` loaders):
here over ``k`` (``k_list``), which GROOD applies at scoring without a refit; a sweep that
varies anything the fit fixes is refused (:func:`grood.tune` searches those, a fit per point).

``postprocessor_args`` may hold the official postprocessor's keys (its config can be passed as
it is): the ones grood follows are read, the ones that change nothing here are accepted, and a
switch for a variant grood does not implement, or a key neither knows, is refused by name —
never silently ignored, which would score with another method than the config asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from grood._batches import check_loader
from grood._checks import check_positive_int, is_count
from grood._progress import progress as progress_bar
from grood.detector import GROOD
from grood.errors import NotFittedError
from grood.extract import FeatureExtractor, split_batch
from grood.integrations import check_grood_kwargs
from grood.neighbours import check_within_index, scores_by_k

try:  # OpenOOD is optional (and not on PyPI): its base class when it imports
    from openood.postprocessors.base_postprocessor import BasePostprocessor as _Base
except ImportError:
    _Base = object

#: Rows of ``val`` OOD batches the reference averages for its OOD prototype (whole batches),
#: when the config gives no ``n_noise_samples``.
REFERENCE_VAL_ROWS = 100

#: OpenOOD-style names of the OOD prototype sources.
SOURCES = ("mean", "val", "noise", "mixup")

#: ``postprocessor_args`` keys grood reads.
READ_ARGS = ("ood_prototype", "use_val_ood", "use_proto_mean", "k", "K", "batch_size",
             "reference", "omit_batch_t", "n_noise_samples", "sampling_ratio", "cache")

#: The official postprocessor's keys that change nothing here, and why.
INERT_ARGS = {
    "use_direct_grad": "the gradient is the same closed form either way",
    "pre_layer_indx": "read only by the official synthetic (mixup) prototype",
    "lam": "read only by the official synthetic (mixup) prototype",
    "synthetic_name": "read only by the official synthetic (mixup) prototype",
}

#: The official postprocessor's switches for variants grood does not implement (refused when
#: true), and what each does there.
VARIANT_ARGS = {
    "distance_loss": "a mean-distance loss in place of the cross-entropy",
    "use_val": "prototypes and index from the ID validation set",
    "use_gaussian_noise": "blurred-noise images in its OOD prototype (grood's own: "
                          "ood_prototype='noise')",
    "use_synthetic": "mixup features in its OOD prototype (grood's own: a Mixup source)",
    "filter_ood": "OOD features filtered by distance before averaging",
    "use_cosine": "an inner-product index",
    "use_pseudo_prototype": "the distance to the predicted class's prototype as the score",
    "no_gradients": "the distance to the OOD prototype as the score",
    "use_grad_norm": "the gradient norm as the score",
}


#: ``postprocessor_sweep`` keys that name GROOD's ``k``: the one parameter OpenOOD's automatic
#: parameter search (``APS_mode``) can vary, since it runs after ``setup`` (the fit) and
#: GROOD applies ``k`` at scoring.
SWEEP_K = ("k_list", "K_list", "k", "K")


def _config_sweep(config: Any, reference: bool) -> tuple[bool, dict[str, list[Any]]]:
    """``(APS_mode, postprocessor_sweep)`` of an OpenOOD config, checked where the search is
    on: a sweep of ``k`` (which OpenOOD's evaluator searches after ``setup``), any other key
    holding one value (nothing to search; the official config's are read by its
    ``setup``)."""
    post = getattr(config, "postprocessor", None)
    aps = bool(getattr(post, "APS_mode", False))
    raw = getattr(post, "postprocessor_sweep", None)
    try:
        sweep = {str(name): list(values) for name, values in dict(raw or {}).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"postprocessor_sweep must map names to lists of values, got "
                         f"{raw!r}") from exc
    if not aps:
        return False, sweep
    ks = [name for name in sweep if name in SWEEP_K]
    if len(ks) != 1:
        raise ValueError("APS_mode searches postprocessor_sweep after setup, and GROOD applies "
                         "only k there without a fit: give k's values once, as k_list"
                         + (f" (got {', '.join(ks)})" if ks else ""))
    varied = [name for name, values in sweep.items() if name not in SWEEP_K and len(values) != 1]
    if varied:
        raise ValueError(f"APS_mode would search {', '.join(varied)}, which GROOD fixes at "
                         "setup (the fit) while OpenOOD searches after it: give each one value "
                         "(postprocessor_args sets it), or search them with grood.tune, a fit "
                         "per point")
    values = sweep[ks[0]]
    if not values:
        raise ValueError(f"postprocessor_sweep {ks[0]} is empty: give the k values to search")
    for value in values:
        check_positive_int(value, f"postprocessor_sweep {ks[0]}")
    if reference and values != [1]:
        raise ValueError(f"reference=True scores by the nearest gradient, as the official "
                         f"postprocessor does: a sweep of {ks[0]}={values} has nothing to "
                         "search (drop reference=True to search k)")
    return True, sweep


def _config_args(config: Any) -> dict[str, Any]:
    """``config.postprocessor.postprocessor_args`` checked key by key (see the module notes)."""
    try:
        args = dict(config.postprocessor.postprocessor_args)
    except (AttributeError, TypeError):  # a config without postprocessor arguments
        return {}
    unknown = sorted(set(args) - set(READ_ARGS) - set(INERT_ARGS) - set(VARIANT_ARGS), key=str)
    if unknown:
        raise ValueError(f"postprocessor_args has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"GROODPostprocessor reads {', '.join(READ_ARGS)}, and accepts the "
                         f"official postprocessor's {', '.join(INERT_ARGS)}")
    variants = [name for name in VARIANT_ARGS if args.get(name)]
    if variants:
        raise ValueError("postprocessor_args switches on variant(s) of the official "
                         "postprocessor that grood does not implement: "
                         + "; ".join(f"{name} ({VARIANT_ARGS[name]})" for name in variants)
                         + "; set them to false (or leave them out)")
    if "K" in args and "k" in args and args["K"] != args["k"]:
        raise ValueError(f"postprocessor_args gives both K={args['K']!r} and k={args['k']!r}; "
                         "give one")
    if "K" in args:
        args["k"] = args.pop("K")
    ratio = args.get("sampling_ratio", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio != 1:
        raise ValueError(f"postprocessor_args sampling_ratio={ratio!r}: grood fits on every "
                         "training batch (the official postprocessor's sampling_ratio=1); "
                         "pass a loader over the share to use instead")
    rows = args.get("n_noise_samples", REFERENCE_VAL_ROWS)
    if not is_count(rows):
        raise ValueError(f"postprocessor_args n_noise_samples must be a positive integer, "
                         f"got {rows!r}")
    return args


class GROODPostprocessor(_Base):
    """OpenOOD postprocessor computing GROOD scores (``conf``, higher = ID) and predictions.

    Args:
        config (optional): an OpenOOD config; ``config.postprocessor.postprocessor_args`` may
            set ``ood_prototype``, ``use_val_ood`` (True: ``"val"``), ``use_proto_mean`` (True:
            ``"mean"``, over ``use_val_ood`` as in the official code), ``n_noise_samples``
            (the ``val`` rows averaged), ``k`` (or OpenOOD's ``K``), ``batch_size``,
            ``reference`` and ``omit_batch_t`` (keyword arguments win); other keys as the
            module notes say.
        ood_prototype (str | OODPrototypeSource): ``"mean"`` (mean of the class prototypes),
            ``"val"`` (mean feature of ``ood_loader_dict["val"]``, OpenOOD's shipped default),
            ``"noise"``, or a source object (e.g. ``Mixup(..., split=(stem, tail))``; OpenOOD's
            ResNets need the explicit split).
        features (str, optional): the penultimate module's name; by default the last entry of
            the net's ``return_feature_list`` output.
        reference (bool): reproduce the official postprocessor (see the module notes).
        omit_batch_t (bool): with ``reference``, leave out batch T's gradients as it does.
        cache (str, optional): ``"host"`` or a folder: ``setup`` runs the net over the
            training loader once instead of twice (:func:`grood.model.fit_model`'s
            ``cache``; also a ``postprocessor_args`` key).
        **grood_kwargs: passed to :class:`grood.GROOD` (``k``, ``index``, ``backend``, ...).
    """

    def __init__(self, config: Any = None, *, ood_prototype: Any = None,
                 features: str | None = None, reference: bool | None = None,
                 omit_batch_t: bool | None = None, cache: Any = None,
                 **grood_kwargs: Any) -> None:
        if _Base is not object:
            super().__init__(config)
        args: dict[str, Any] = {} if config is None else _config_args(config)
        # The official postprocessor sets its OOD prototype to the class prototypes' mean last,
        # over any other source it was given.
        default = "mean" if args.get("use_proto_mean") or not args.get("use_val_ood") else "val"
        self.ood_prototype = ood_prototype or args.get("ood_prototype", default)
        #: With the ``val`` source, the whole first ``val`` batches reaching this many rows are
        #: averaged (``n_noise_samples``); ``None``: the whole loader (reference mode: 100).
        self.val_rows: int | None = args.get("n_noise_samples")
        self.features = features
        self.cache = args.get("cache") if cache is None else cache
        self.reference = bool(args.get("reference", False) if reference is None else reference)
        self.omit_batch_t = bool(args.get("omit_batch_t", False) if omit_batch_t is None
                                 else omit_batch_t)
        switches = ("use_val_ood", "use_proto_mean", "use_gaussian_noise", "use_synthetic")
        if (self.reference and ood_prototype is None and "ood_prototype" not in args
                and any(name in args for name in switches)
                and not any(args.get(name) for name in switches)):
            raise ValueError("reference=True with every OOD prototype switch of the official "
                             f"postprocessor off ({', '.join(switches)}): its OOD prototype "
                             "would be the zero vector, which grood does not reproduce; set "
                             "use_val_ood or use_proto_mean, or give ood_prototype")
        if self.omit_batch_t and not self.reference:
            raise ValueError("omit_batch_t emulates the official code's index: it needs "
                             "reference=True")
        given = sorted({"index", "index_options"} & set(grood_kwargs))
        if self.reference and given:  # they would be replaced by the reference's index
            raise ValueError(f"reference=True builds the official code's index (faiss-ivf, "
                             f"nprobe 4); {' and '.join(given)} cannot be given with it")
        from_config: dict[str, Any] = {name: args[name] for name in ("k", "batch_size")
                                       if name in args}
        check_grood_kwargs(grood_kwargs, "GROODPostprocessor", ("config", "ood_prototype",
                                                               "features", "reference",
                                                               "omit_batch_t", "cache"))
        self.grood_kwargs: dict[str, Any] = {**from_config, **grood_kwargs}
        k = self.grood_kwargs.get("k", 1)
        if self.reference and (isinstance(k, bool) or k != 1):
            raise ValueError(f"reference=True scores as the official postprocessor does, by "
                             f"the nearest indexed gradient: it reads k but searches 1 "
                             f"neighbour; got k={k!r} (leave k out or set it to 1, or drop "
                             "reference=True to score by the k-th neighbour)")
        # OpenOOD's automatic parameter search (its evaluator calls set_hyperparam with each
        # combination of args_dict's values after setup): over k alone.
        aps, self.args_dict = (False, {}) if config is None else _config_sweep(
            config, self.reference)
        self.APS_mode = aps
        self.hyperparam_search_done = not aps
        self.detector: GROOD | None = None
        # While OpenOOD searches k: each val loader's scores at every k of the sweep, from
        # one pass of the net and one search at the largest k (id of the loader -> the
        # loader, its classes, its scores by k, its labels).
        self._swept: dict[int, tuple[Any, np.ndarray, dict[int, np.ndarray], np.ndarray]] = {}

    def setup(self, net: torch.nn.Module, id_loader_dict: dict, ood_loader_dict: dict) -> None:
        """Fit GROOD on ``id_loader_dict["train"]`` with the configured OOD prototype."""
        if "train" not in id_loader_dict:
            raise ValueError("setup fits on id_loader_dict['train'], which it lacks; "
                             f"id_loader_dict holds {sorted(map(str, id_loader_dict))}")
        source = self.ood_prototype
        ood_loader = None
        if source == "val":
            if "val" not in ood_loader_dict:
                raise ValueError("ood_prototype='val' needs ood_loader_dict['val']")
            source, ood_loader = "features", ood_loader_dict["val"]
            rows = REFERENCE_VAL_ROWS if self.reference else None
            rows = self.val_rows or rows
            if rows is not None:
                ood_loader = _first_batches(ood_loader, rows)
        self._swept.clear()  # (scores of another fit)
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
            net, train, features=self.features, ood_loader=ood_loader, cache=self.cache)

    def set_hyperparam(self, hyperparam: list[Any]) -> None:
        """Take one combination of ``postprocessor_sweep``'s values, in its keys' order, as
        OpenOOD's automatic parameter search passes them: ``k`` applies from the next score
        (no refit); the other keys hold one value each, checked at construction."""
        values = list(hyperparam)
        if len(values) != len(self.args_dict):
            raise ValueError(f"set_hyperparam takes one value per postprocessor_sweep key "
                             f"({', '.join(self.args_dict) or 'none'}), got {values!r}")
        for name, value in zip(self.args_dict, values, strict=True):
            if name in SWEEP_K:
                k = check_positive_int(value, name)
                self.grood_kwargs["k"] = k
                if self.detector is not None:
                    self.detector.k = k

    def get_hyperparam(self) -> list[Any]:
        """The values :meth:`set_hyperparam` takes, as they stand (``k``: the detector's)."""
        k = self.detector.k if self.detector is not None else self.grood_kwargs.get("k", 1)
        return [k if name in SWEEP_K else values[0]
                for name, values in self.args_dict.items()]

    def _extractor(self, net: torch.nn.Module) -> FeatureExtractor:
        if self.detector is None:
            raise NotFittedError("this GROODPostprocessor is not set up yet: call setup(net, "
                                 "id_loader_dict, ood_loader_dict) before scoring (it fits "
                                 "GROOD on id_loader_dict['train'])")
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
        ``progress`` shows a bar over its batches (plain lines when stderr is no terminal).

        While OpenOOD's automatic parameter search runs (``APS_mode``, until its evaluator
        sets ``hyperparam_search_done``), a loader is run through the net once and its rows
        searched once, at the sweep's largest k: the scores at every k of the sweep are kept
        and each later call with that loader returns those at the k set (the same scores as
        scoring at that k; an IVF index, whose search at the largest k may refuse rows a
        smaller k does not, scores each call on its own)."""
        check_loader(data_loader, "inference takes a loader of batches",
                     ": pass [{'data': inputs, 'label': labels}] (one batch: [batch]) or a "
                     "DataLoader")
        ks = self._searched_ks()
        if ks is None:
            self._swept.clear()  # (the search is over)
        else:
            assert self.detector is not None  # (_searched_ks: set up)
            if id(data_loader) not in self._swept:
                self._sweep(net, data_loader, progress, ks)
            _, swept_preds, by_k, swept_labels = self._swept[id(data_loader)]
            return swept_preds.copy(), by_k[self.detector.k].copy(), swept_labels.copy()
        preds, confs, labels = [], [], []
        for x, y in self._batches(data_loader, progress):
            pred, conf = self.postprocess(net, x)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            labels.append(y)
        return (torch.cat(preds).numpy().astype(int), torch.cat(confs).numpy(),
                torch.cat(labels).numpy().astype(int))

    def _searched_ks(self) -> list[int] | None:
        """The sweep's values of k while OpenOOD's parameter search runs over two or more of
        them with this postprocessor set up at one of them (with an index searched exactly
        that holds the largest), else None."""
        if (not self.APS_mode or self.hyperparam_search_done or self.detector is None
                or self.detector.index_.approximate):
            return None
        ks = [int(v) for name, values in self.args_dict.items() if name in SWEEP_K
              for v in values]  # (checked by _config_sweep)
        try:
            check_within_index(self.detector, max(ks), "k")
        except ValueError:  # (refused when its turn comes)
            return None
        return ks if len(set(ks)) > 1 and self.detector.k in ks else None

    @torch.no_grad()
    def _sweep(self, net: torch.nn.Module, data_loader: Any, progress: bool,
               ks: list[int]) -> None:
        """Score ``data_loader`` at every k of ``ks`` in one pass into ``_swept`` (an exact
        index: :meth:`_searched_ks` leaves IVF out)."""
        extractor = self._extractor(net)
        preds: list[torch.Tensor] = []
        confs: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
        labels: list[torch.Tensor] = []
        for x, y in self._batches(data_loader, progress):
            got = scores_by_k(self.detector, extractor(x).features, ks)
            assert got is not None  # (no approximate index here)
            for k, conf in got[0].items():
                confs[k].append(conf.cpu())
            preds.append(got[1].cpu())
            labels.append(y)
        self._swept[id(data_loader)] = (
            data_loader, torch.cat(preds).numpy().astype(int),
            {k: torch.cat(c).numpy() for k, c in confs.items()},
            torch.cat(labels).numpy().astype(int))

    @staticmethod
    def _batches(data_loader: Any, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches with rows, as ``(inputs, labels)``: labels -1 where a batch
        has none; a batch whose labels are not one per input refused."""
        found = False
        for number, batch in enumerate(progress_bar(data_loader, desc="grood: scoring",
                                                    unit="batch",
                                                    enabled=None if progress else False)):
            x, y = split_batch(batch)
            if y is not None and tuple(y.shape) != (x.shape[0],):  # (a label list per row)
                raise ValueError(f"batch {number} (numbered from 0) has labels of shape "
                                 f"{tuple(y.shape)} for {x.shape[0]} inputs; give one label "
                                 "per input")
            if x.shape[0] == 0:  # (a batch of 0 rows adds none; the net need not take it)
                continue
            found = True
            yield x, torch.full((x.shape[0],), -1) if y is None else y.cpu()
        if not found:
            raise ValueError("the data loader yielded no batches with rows")


def _first_batches(loader: Any, rows: int) -> list:
    """The loader's first whole batches that together hold at least ``rows`` rows."""
    taken, n = [], 0
    for batch in loader:
        taken.append(batch)
        n += split_batch(batch)[0].shape[0]
        if n >= rows:
            break
    return taken
