"""GROOD inside a model: a scoring head (an ``nn.Module``), and a model with the head attached.

``GROOD.as_module()`` gives a :class:`GROODHead` whose ``forward(features)`` returns
``(score, pred)`` — the detector's own scores (higher = in-distribution) and nearest-prototype
classes. ``GROOD.attach(model, features="avgpool")`` gives a :class:`GROODAttached` whose
``forward(x)`` returns ``(logits, score, pred)`` from one forward pass of the model. With
``flags=True`` (a calibrated detector) both hold its threshold and also return ``is_ood``.
Scores and flags carry no gradient: the head scores its features detached, so a model with the
head attached runs with grad enabled (eager or compiled) and its logits backpropagate as the
model's own do.

Both hold everything as buffers (prototypes, the OOD prototype, the prototypes' squared norms
relative to it, the exact index and its squared norms), so they follow ``.to(device)``,
survive ``state_dict`` round trips and save with the model. Their forward is made of grood's
custom ops (:mod:`grood.library`) and plain torch, so ``torch.compile(fullgraph=True)``
compiles it with no graph break and ``torch.export.export`` exports it.

CUDA graphs: with ``checks="flag"`` nothing in the forward reads a value on the host (either
backend; see :mod:`grood.library`), so the head (or a model attached with it) can be captured
and replayed (:func:`capture_cuda_graph`; ``torch.compile(mode="reduce-overhead")`` works the
same way).
Rows it cannot score in the compute dtype then come out as score NaN and pred -1, counted in
the ``unresolved_rows`` buffer: score those rows with the detector, which resolves far rows in
float64 and names non-finite ones. The default ``checks="raise"`` behaves like the detector and
reads values on the host.

Limits: the index must be grood's exact index (a faiss index stays outside: score with the
detector); a distributed detector's sharded index cannot be held by one module.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

import grood.library  # noqa: F401  (registers torch.ops.grood.*)
from grood._checks import (
    check_finite_rows,
    check_flag,
    check_matrix,
    check_positive_int,
    compute_dtype,
    shape_hint,
    user_stacklevel,
)
from grood._fit import UNRESOLVED_SHARE, probe_ids
from grood._gradients import centred_sq_norms, resolved_rows
from grood.errors import BackendUnavailableError
from grood.extract import (
    as_rows,
    check_module_name,
    copy_of_feature,
    logits_of,
    wrapper_path,
)
from grood.functional import NCPGradient, check_precision, database_sq_norms_of
from grood.index import rounds_past_fp32, searched_count
from grood.ops import check_backend_name
from grood_kernels import contract
from grood_kernels.contract import pinning_kept_values, sq_norms_mismatch

if TYPE_CHECKING:
    from grood.detector import GROOD

#: What the head does with rows it cannot score in the compute dtype (non-finite features,
#: or distances beyond what the float32 softmax resolves): ``"raise"`` as the detector does
#: (an error naming a non-finite row; far rows redone in float64), reading values on the
#: host; ``"flag"`` without reading anything on the host (CUDA-graph capturable): such rows
#: get score NaN and pred -1, and ``unresolved_rows`` counts them.
CHECKS = ("raise", "flag")


class GROODHead(nn.Module):
    """GROOD scoring of penultimate features as a module.

    Args:
        class_prototypes (Tensor): [C, D]. ood_prototype (Tensor): [D].
        index_vectors (Tensor): the indexed training gradients [M, D] (exact rows), as the
            index holds them: less ``index_centre`` where that is given.
        k (int): score by the k-th nearest indexed gradient.
        precision (str): GEMM precision of both ops (see :mod:`grood.functional`).
        backend (str): ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`grood.ops`).
        index_storage (Tensor, optional): a half-precision copy of ``index_vectors`` that the
            search streams (``index_options={"storage": ...}``); distances stay exact.
        checks (str): ``"raise"`` (default; the detector's behaviour, which reads values on
            the host) or ``"flag"`` (nothing read on the host: unresolvable rows score NaN,
            pred -1, and are counted in the ``unresolved_rows`` buffer). See :data:`CHECKS`.
        threshold (float, optional): a calibrated threshold (``det.threshold_``, chosen at
            this ``k``). Given, the forward also returns ``is_ood`` = not ``score >=
            threshold`` (the detector's ``is_ood``; rows scored NaN by ``checks="flag"`` are
            flagged), and the threshold is a float64 buffer (``state_dict``; ``.to()`` moves
            it and keeps its dtype).
        copy (bool): hold copies of the given tensors (default), or with ``False`` the index
            tensors themselves (``index_vectors``, ``index_storage``; copied where made under
            ``torch.inference_mode``): no second copy of a large index, the head sharing
            their memory (a state loaded into it is copied into tensors of its own).
        index_centre (Tensor, optional): [D], the vector an index centred on its mean holds
            its rows less (``ExactIndex.centre``): the gradients are searched less it too.

    The buffers are one fitted state (the squared norms are derived from the prototypes and
    the index): replace them together, through ``load_state_dict`` or a new head, never one
    tensor in place. The constructor checks them once (shapes that fit together, floating
    dtypes, finite values, a stored copy within rounding of the index) and its settings;
    ``load_state_dict`` checks a loaded state the same way and its squared norms against the
    prototypes and the index, and refuses it whole; the forward reads no value of them.
    """

    # Buffers (registered in the constructor).
    class_prototypes: Tensor
    ood_prototype: Tensor
    prototype_sq_norms: Tensor
    index_vectors: Tensor
    index_sq_norms: Tensor
    index_storage: Tensor | None
    index_centre: Tensor | None
    unresolved_rows: Tensor
    threshold: Tensor | None
    threshold_k: Tensor

    def __init__(self, class_prototypes: Tensor, ood_prototype: Tensor, index_vectors: Tensor,
                 *, k: int = 1, precision: str = "ieee", backend: str = "auto",
                 index_storage: Tensor | None = None, checks: str = "raise",
                 threshold: float | None = None, copy: bool = True,
                 index_centre: Tensor | None = None) -> None:
        super().__init__()
        _check_state(class_prototypes, ood_prototype, index_vectors, index_storage,
                     index_centre)
        k = check_positive_int(k, "k")
        if index_vectors.shape[0] < k:
            raise ValueError(f"k={k} but the index holds {index_vectors.shape[0]} vectors")
        check_precision(precision)
        check_backend_name(backend)
        if checks not in CHECKS:
            raise ValueError(f"checks must be one of {CHECKS}, got {checks!r}")
        if threshold is not None:
            threshold = _check_threshold(threshold)
        copy = check_flag(copy, "copy")

        def held(t: Tensor) -> Tensor:  # (an inference tensor is copied: see below)
            return t.detach().clone() if copy or t.is_inference() else t.detach()

        # Ordinary tensors even when made under torch.inference_mode (a serving script's
        # decorated main): inference tensors have no version counter, so the ops' values
        # derived from them (the squared norms' check) were remade on every call, and they
        # cannot be updated in place outside that mode (the checks="flag" counter failed
        # there). The same holds for .to() and the derived norms, below.
        with torch.inference_mode(False):
            self.register_buffer("class_prototypes", class_prototypes.detach().clone())
            self.register_buffer("ood_prototype", ood_prototype.detach().clone())
            # The same squared norms the detector's gradient step and exact index use.
            self.register_buffer("prototype_sq_norms", None)
            self.register_buffer("index_vectors", held(index_vectors))
            self.register_buffer("index_sq_norms", None)
            self._derive_norms()
            self.register_buffer("index_storage", None if index_storage is None
                                 else held(index_storage))
            # Without a centre, no buffer (as the threshold): torch.export miscounts the
            # graph's buffer inputs past a second buffer that is None.
            if index_centre is not None:
                self.register_buffer("index_centre", index_centre.detach().clone())
            else:
                self.index_centre = None
            # Rows scored NaN by checks="flag" (not resolvable in the compute dtype), counted
            # on the device across calls; read it once per batch or epoch, reset with zero_().
            self.register_buffer("unresolved_rows",
                                 torch.zeros((), dtype=torch.int64,
                                             device=class_prototypes.device),
                                 persistent=False)
            if threshold is not None:  # is_ood: score below it; float64 holds it as chosen
                self.register_buffer("threshold", torch.tensor(
                    threshold, dtype=torch.float64, device=class_prototypes.device))
                # The k it was chosen at, saved with it: a state's threshold of another k is
                # refused on load (the forward reads none of it).
                self.register_buffer("threshold_k", torch.tensor(k, dtype=torch.int64))
            else:
                self.threshold = None
        self.k, self.precision, self.backend, self.checks = k, precision, backend, checks
        self._threshold_k = k  # the same, read by the forward without a host read
        # Buffers shared with the tensors given (copy=False), until a state is loaded.
        self._shared_buffers = () if copy else ("index_vectors", "index_storage")

    def _derive_norms(self) -> None:
        """The squared norms from the head's own prototypes and index, in their compute dtype
        (float32 for half-precision buffers: half-precision norms overflow or round past the
        prototypes' own rounding), by the detector's and the exact index's own rules."""
        with torch.no_grad(), torch.inference_mode(False):  # ordinary tensors (see init)
            self.prototype_sq_norms = centred_sq_norms(self.class_prototypes, self.ood_prototype)
            self.index_sq_norms = database_sq_norms_of(self.index_vectors)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GROODHead:
        """``.to()``, ``.half()``, ``.cuda()``...: the norms are derived again from the
        converted prototypes and index (converted norms would be norms of the unconverted
        ones, and half-precision ones overflow). The converted buffers are ordinary tensors
        even under ``torch.inference_mode`` (see the constructor), made so without a copy.
        An index narrowed to another dtype, or moved to where its precision rounds more, is
        checked as its search reads it (:func:`check_converted_index`)."""
        threshold = self.threshold
        before = (self.index_vectors, self.index_centre)  # (references: the check's queries)
        with torch.inference_mode(False):
            super()._apply(fn, recurse)
            converted = self.threshold
            if threshold is not None and converted is not None:
                # The device follows; the value stays as chosen.
                self.threshold = threshold.to(converted.device, torch.float64)
        self._derive_norms()
        check_converted_index(self, *before)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """A loaded state is checked as the constructor checks its tensors, and its derived
        buffers against what they derive from, before anything is copied: a state with NaN or
        Inf, squared norms of other prototypes or another index, or a stored copy of other
        vectors would score silently wrong (the forward reads no value). A refused state
        leaves the head as it was; ``load_state_dict`` raises naming the reason."""
        state = {}
        for name, buf in self._buffers.items():
            if name in self._non_persistent_buffers_set or (
                    buf is None and prefix + name not in state_dict):
                continue  # a counter; an index without a stored copy or a centre
            t = state_dict.get(prefix + name, buf)
            if buf is None or not isinstance(t, Tensor) or t.shape != buf.shape:
                break  # missing, extra or misshapen entries: torch's own errors name them
            state[name] = t.detach()
        else:
            try:
                _check_state(state["class_prototypes"], state["ood_prototype"],
                             state["index_vectors"], state.get("index_storage"),
                             state.get("index_centre"))
                _check_derived(state)
                if "threshold" in state:
                    _check_threshold(state["threshold"])
                    _check_threshold_k(state["threshold_k"], self._threshold_k)
            except ValueError as exc:
                error_msgs.append(f"{exc} (nothing was loaded: a head's buffers are one fitted "
                                  "state, saved and loaded together)")
                return
        own_shared_buffers(self)
        told = (len(missing_keys), len(error_msgs))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._derive_norms()  # of the buffers as loaded (rounded to the head's dtype)
        if "index_vectors" in state and told == (len(missing_keys), len(error_msgs)):
            # (a wider state's rows, narrowed into the head's dtype)
            check_converted_index(self, state["index_vectors"], state.get("index_centre"),
                                  loaded=True)

    def _search(self, gradients: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest indexed gradients ``(distances, ids)`` of ``gradients`` [N, D]
        (unshifted), searched as the detector's exact index searches them: less its centre,
        candidates from the half-precision copy where there is one (float64 gradients too),
        re-ranked on the exact rows with their norms; float64 gradients of a narrower index in
        float64, in ieee; more candidates where the rows are centred and the search rounds
        them (:func:`grood.index.searched_count`)."""
        held, stored = self.index_vectors, self.index_storage is not None
        wide = gradients.dtype == torch.float64 and held.dtype != torch.float64
        precision = "ieee" if wide else self.precision
        queries = gradients if self.index_centre is None else gradients - self.index_centre
        n = searched_count(k, held.shape[0], stored=stored,
                           centred=self.index_centre is not None, precision=precision,
                           device=held.device, dtype=held.dtype)
        dist, ids = torch.ops.grood.knn(
            queries, self.index_storage if stored else held, n, precision,
            self.index_sq_norms.double() if wide else self.index_sq_norms,
            held if stored else None, self.backend)
        return dist[:, :k], ids[:, :k]

    def extra_repr(self) -> str:
        c, d = self.class_prototypes.shape
        threshold = "" if self.threshold is None else f", threshold={float(self.threshold):.6g}"
        return (f"classes={c}, dim={d}, indexed={self.index_vectors.shape[0]}, k={self.k}, "
                f"precision={self.precision!r}, backend={self.backend!r}, checks={self.checks!r}"
                + threshold)

    def check_k(self) -> None:
        """``k`` as the head can score at it: an integer within the index, and the ``k`` its
        threshold was chosen at. ``k`` may be set after construction: a static check (no graph
        break when compiled)."""
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)):
            raise ValueError(f"k must be a positive Python or numpy integer, got {self.k!r}")
        if not 1 <= self.k <= self.index_vectors.shape[0]:
            raise ValueError(f"k={self.k} but the index holds {self.index_vectors.shape[0]} "
                             "vectors (k must be at least 1 and at most that)")
        if self.threshold is not None and self.k != self._threshold_k:
            raise ValueError(f"the head's threshold was chosen on scores at "
                             f"k={self._threshold_k}, and k is now {self.k}: set k back, or "
                             "calibrate the detector at this k and make a new head")

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        """``(score [N], pred [N])`` for features [N, D]: the detector's scores (higher =
        in-distribution) and nearest-prototype classes (int64); with a threshold also
        ``is_ood [N]`` (bool)."""
        self.check_k()
        contract.check_dense(features=features)  # (a NumPy array failed on an attribute)
        check_feature_batch(features, self.class_prototypes.shape[1])
        # Scores are not trained through: tracked features (a model run with grad enabled)
        # are scored detached, so neither a backward pass nor torch.compile, which traces one
        # for outputs that require grad, reaches the ops (the logits' graph is untouched).
        features = features.detach()
        grood_ops = torch.ops.grood
        wide = features.dtype == torch.float64  # float64 features are scored in float64
        finite = None
        if self.checks == "flag":  # non-finite rows go to the kernels as zeros, then flagged
            finite = torch.isfinite(features).all(1)
            features = torch.where(finite[:, None], features, 0.0)
        res = grood_ops.ncp_gradient(features, self.class_prototypes, self.ood_prototype,
                                     self.precision, None if wide else self.prototype_sq_norms,
                                     self.backend)
        bad = None
        if self.checks == "raise":
            res = grood_ops.resolve_rows(features, self.class_prototypes, self.ood_prototype,
                                         *res)
        else:  # "flag": decided on the device; the search gets zeros for the flagged rows
            assert finite is not None  # (found above)
            bad = ~(finite & resolved_rows(NCPGradient(*res)))
            res = (torch.where(bad[:, None], 0.0, res[0]), *res[1:])
        dist, _ = self._search(res[0], self.k)
        score, pred = 0.0 - dist[:, self.k - 1], res[2]
        if bad is not None:
            self.unresolved_rows.add_(bad.sum())
            score = torch.where(bad, float("nan"), score)
            pred = torch.where(bad, -1, pred)
        if self.threshold is None:
            return score, pred
        return score, pred, ~(score >= self.threshold)  # NaN (unscored) rows: flagged


def check_feature_batch(features: Tensor, d: int) -> None:
    """A head's input: floating-point features of shape [N, d] (static checks: no graph
    break; the ops would blame their argument "h")."""
    if features.ndim != 2 or features.shape[1] != d:
        shape = tuple(features.shape)
        raise ValueError(f"features must have shape [N, {d}] (the detector's dimension), "
                         f"got {shape}{shape_hint(shape, 'features', d)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")


def _check_state(protos: Tensor, p_ood: Tensor, vectors: Tensor,
                 storage: Tensor | None, centre: Tensor | None = None) -> None:
    """A head's tensors: one fitted state of matching shapes and finite values, checked once
    (the forward reads no values of them)."""
    check_matrix(protos, "class_prototypes")
    d = protos.shape[1]
    if p_ood.shape != (d,) or not p_ood.is_floating_point():
        raise ValueError(f"ood_prototype must be a floating-point vector [{d}] (the "
                         f"prototypes' dimension), got {p_ood.dtype} of shape "
                         f"{tuple(p_ood.shape)}")
    check_matrix(vectors, "index_vectors")
    if vectors.shape[1] != d:
        raise ValueError(f"index_vectors have dimension {vectors.shape[1]}, the prototypes {d}")
    if storage is not None and (storage.shape != vectors.shape
                                or not storage.is_floating_point()):
        raise ValueError(f"index_storage must be a floating-point copy of index_vectors, shape "
                         f"{tuple(vectors.shape)}; got {storage.dtype} {tuple(storage.shape)}")
    if centre is not None and (centre.shape != (d,) or not centre.is_floating_point()):
        raise ValueError(f"index_centre must be a floating-point vector [{d}] (the "
                         f"prototypes' dimension), got {centre.dtype} of shape "
                         f"{tuple(centre.shape)}")
    for name, t in (("class_prototypes", protos), ("ood_prototype", p_ood[None]),
                    ("index_vectors", vectors),
                    *((("index_centre", centre[None]),) if centre is not None else ())):
        check_finite_rows(t, name)
    if storage is not None:
        # A rounded copy: within half-precision rounding of the exact vectors (bf16's 2**-8
        # relative, fp16's subnormal spacing) — another set's copy would steer the search.
        near = torch.empty(vectors.shape[0], dtype=torch.bool, device=vectors.device)
        dt = compute_dtype(vectors.dtype)
        step = 65536  # rows at a time: no [M, D] temporaries
        for m0 in range(0, vectors.shape[0], step):
            v = vectors[m0:m0 + step].to(dt)
            s = storage[m0:m0 + step].to(vectors.device, dt)
            near[m0:m0 + step] = ((s - v).abs() <= 2.0**-8 * v.abs() + 2.0**-24).all(1)
        if not bool(near.all()):
            rows = (~near).nonzero().flatten()[:3].tolist()
            raise ValueError(f"index_storage is not a rounded copy of index_vectors (row(s) "
                             f"{rows} differ by more than half-precision rounding)")


def _check_threshold(threshold: float | Tensor) -> float:
    """A head's threshold as a Python float: one finite real number (a 0-d tensor in a
    state)."""
    if isinstance(threshold, Tensor):
        ok = threshold.ndim == 0 and threshold.is_floating_point()
    else:
        ok = isinstance(threshold, (int, float, np.floating, np.integer)) and not isinstance(
            threshold, (bool, np.bool_))
    value = float(threshold) if ok else None
    if value is None or not np.isfinite(value):
        raise ValueError(f"threshold must be one finite real number (a calibrated "
                         f"det.threshold_), got {threshold!r}")
    return value


def _check_threshold_k(saved: Tensor, k: int) -> None:
    """A state's threshold was chosen at the head's own ``k`` (scores at another k are other
    numbers: its flags would be silently wrong). ``saved``: the state's 0-d ``threshold_k``
    (its shape already checked against the head's)."""
    if saved.is_floating_point() or saved.is_complex() or int(saved) != k:
        raise ValueError(f"the state's threshold was chosen on scores at k={saved.item()}; "
                         f"this head scores at k={k}: make the head from a detector calibrated "
                         f"at k={saved.item()}, or calibrate at k={k}")


def _check_derived(state: dict) -> None:
    """A state's squared norms against the prototypes and index they derive from."""
    for name, source, expected in (
            ("prototype_sq_norms", "prototypes",
             contract.centred_sq_norms(state["class_prototypes"], state["ood_prototype"])),
            ("index_sq_norms", "index_vectors",
             database_sq_norms_of(state["index_vectors"], torch.float64))):
        bad = sq_norms_mismatch(state[name], expected)
        if bad:
            raise ValueError(f"{name} are not the squared norms of the state's {source} at {bad}")


class _Tap:
    """Mixed into the attached model's copy of the ``features`` module: while the attached
    forward runs (``_grood_box`` is its list), the module's output (or input) is copied into
    it. A class per module class (:func:`_tapped_class`), so the copy is still an instance of
    the module's own class and holds the same parameters under the same names."""

    _grood_box: list[Tensor] | None
    _grood_tap: tuple[str, bool]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        box, (name, takes_input) = self._grood_box, self._grood_tap
        if box is not None and takes_input:  # before it runs: it may change its input
            box.append(copy_of_feature(args, name, "features", True))
        out = super().forward(*args, **kwargs)  # type: ignore[misc]  # the module's own class
        if box is not None and not takes_input:
            box.append(copy_of_feature(out, name, "features", False))
        return out

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Pickled and deep-copied as the module's own class.
        return _rebuild_tap, (type(self).__bases__[1], dict(self.__dict__))


@functools.cache
def _tapped_class(cls: type) -> type:
    return type(cls.__name__, (_Tap, cls), {"__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__})


def _rebuild_tap(cls: type, state: dict) -> nn.Module:
    module: nn.Module = object.__new__(_tapped_class(cls))
    module.__dict__.update(state)
    return module


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing everything with ``module`` (parameters, buffers, hooks,
    submodules) but its own dict of submodules, which can then be changed."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    twin.__dict__["_modules"] = dict(module._modules)
    return twin


def _tapped_model(model: nn.Module, module: str, features: str, takes_input: bool
                  ) -> nn.Module:
    """``model`` with the module ``module`` replaced by a tapped copy, and every module on a
    path to it by a shallow copy: the user's model is left as it was, and the parameters are
    the same tensors. Every path to the module (one registered under two names) is tapped."""
    target = model.get_submodule(module)
    copies = {id(model): _shallow(model)}
    for path, sub in model.named_modules(remove_duplicate=False):
        if sub is target:
            parts = path.split(".")
            for i in range(1, len(parts) + 1):
                ancestor = model.get_submodule(".".join(parts[:i]))
                if id(ancestor) not in copies:
                    copies[id(ancestor)] = _shallow(ancestor)
    for twin in copies.values():
        twin._modules.update({n: copies[id(child)] for n, child in twin._modules.items()
                              if child is not None and id(child) in copies})
    twin, cls = copies[id(target)], cast(type, type(target))
    if issubclass(cls, _Tap):  # the model of an attached model
        cls = cls.__bases__[1]
    twin.__class__ = _tapped_class(cls)
    tap = cast(_Tap, twin)
    tap._grood_box, tap._grood_tap = None, (features, takes_input)
    return copies[id(model)]


def _warn_if_training(model: nn.Module) -> None:
    """Name the layers of ``model`` that compute differently in training mode (batch norm
    with running statistics, dropout), if it is in that mode: the attached model would score
    the features that mode gives, not those ``fit_model`` read (in eval mode), silently."""
    moving = [name for name, m in model.named_modules() if m.training and (
        (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats)
        or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0))]
    if moving:
        shown = ", ".join(moving[:3]) + (f" and {len(moving) - 3} more" if len(moving) > 3
                                         else "")
        warnings.warn(f"attach(): the model is in training mode, where {shown} compute "
                      "differently (batch statistics, dropout): the attached model would score "
                      "features unlike those fit_model and score_model read in eval mode; "
                      "call .eval() on the model or the attached model to score as the "
                      "detector does", UserWarning, stacklevel=user_stacklevel())


class GROODAttached(nn.Module):
    """A classifier with a GROOD head on its penultimate features: ``forward(x)`` returns
    ``(logits, score, pred)`` from one pass of the model.

    The ``features`` module's output (or, with ``:input``, its input) is read as the model's
    forward runs, by a copy of that module that hands it over — any model's forward, traceable
    or not (Hugging Face and timm models, data-dependent control flow). The model itself is not
    changed: the attached one holds shallow copies of the modules on the path to ``features``
    and shares every parameter, buffer and other module with it (same names in
    ``state_dict``). Switch train/eval on the attached model: the copies keep their own mode.
    ``features=None`` uses a ``return_feature_list=True`` forward (OpenOOD's networks), whose
    last feature is read. The ``features`` module must run exactly once per forward, reached
    through its registered name (a module kept in a plain list, or a model compiled before
    attaching, bypasses the copy: an error says so). One forward at a time per attached model.
    """

    def __init__(self, model: nn.Module, head: GROODHead, features: str | None) -> None:
        super().__init__()
        _warn_if_training(model)
        self.head = head
        self.features = features
        self._module = None
        if features is None:
            self.model = model
            return
        if "_orig_mod" in wrapper_path(model):  # (its traced forward runs past any copy)
            raise ValueError("attach() reads the features through a copy of their module, "
                             "which a model compiled before attaching runs past: attach the "
                             "model itself and compile the attached one, "
                             "torch.compile(det.attach(model))")
        module, takes_input = check_module_name(dict(model.named_modules()), features,
                                                "features")
        if not module:
            raise ValueError(f"features={features!r} names the whole model; name its "
                             "penultimate module (e.g. 'avgpool', or 'fc:input')")
        self.model = _tapped_model(model, module, features, takes_input)
        self._module = module

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``(logits, score, pred)``, and ``is_ood`` when the head holds a threshold."""
        if self._module is None:
            logits, feature_list = self.model(x, return_feature_list=True)
            feats = feature_list[-1]
        else:
            tap = cast(_Tap, self.model.get_submodule(self._module))
            box: list[Tensor] = []
            tap._grood_box = box
            try:
                logits = self.model(x)
            finally:
                tap._grood_box = None
            if len(box) != 1:
                why = (" (its forward reaches the module by another route than its "
                       "registered name: a module kept in a plain list, a model compiled "
                       "or wrapped before attaching)" if not box else "")
                raise ValueError(f"module {self.features!r} (features) ran {len(box)} times "
                                 f"in the forward pass{why}; attach() needs a module that "
                                 "runs exactly once")
            feats = box[0]
        logits = logits_of(logits)  # a tensor, a tuple's first, a mapping's or object's "logits"
        return (logits, *self.head(as_rows(feats).float()))  # (as the extractor flattens)


def own_shared_buffers(head: Any) -> None:
    """Give ``head`` (a :class:`GROODHead` or a portable head made with ``copy=False``) its
    own copies of the buffers it shares with the tensors it was made from (its
    ``_shared_buffers``), before a state is loaded into it: the load then writes into those
    copies, not into the detector's index."""
    for name in head._shared_buffers:
        if head._buffers[name] is not None:
            head._buffers[name] = head._buffers[name].clone()
    head._shared_buffers = ()


def check_converted_index(head: GROODHead, rows: Tensor, centre: Tensor | None, *,
                          loaded: bool = False) -> None:
    """Warn where a conversion of ``head`` left its search unable to find the indexed
    gradients: a narrower dtype (``.half()``, ``.bfloat16()``, ``.float()`` of a float64 head;
    a model the head is attached to, converted whole; with ``loaded``, a wider state loaded
    into its buffers by ``load_state_dict``), or a move to a device where its
    precision rounds more (``tf32`` onto a GPU: on the CPU it computes in fp32). Sampled
    gradients of the index as it was (``rows`` [M, D], held less ``centre``; the centre added
    back) are searched for as the forward searches a feature's gradient, less the converted
    centre, among the converted rows. float16 flushes gradients below its range (tight
    classes, whose q_ood is tiny), a half-precision row or centre rounds by up to 2**-11 or
    2**-8 of its norm (an OOD prototype far from the training features, whose gradients all
    point nearly the same way), and the scores then come from other neighbours: on such data a
    float16 head scored 6.5 to 1.6e6 times the score spread off the detector, a bfloat16 one up
    to 14 times."""
    held = head.index_vectors
    dt = compute_dtype(held.dtype)
    narrowed = torch.finfo(held.dtype).eps > torch.finfo(rows.dtype).eps
    to_tf32 = (rounds_past_fp32(head.precision, held.device, dt)
               and not rounds_past_fp32(head.precision, rows.device, rows.dtype))
    if held.device.type == "meta" or not (narrowed or to_tf32):
        return
    ids = probe_ids(held.shape[0]).to(rows.device)
    with torch.no_grad():
        gradients = rows[ids].to(held.device, torch.float64)
        if centre is not None:
            gradients += centre.to(held.device, torch.float64)
        try:  # (as the gradient step gives them, in the compute dtype)
            _, found = head._search(gradients.to(dt), 1)
        except BackendUnavailableError:  # (its backend cannot search here: its forward says so)
            return
        found = found[:, 0]
        # (another row with the same gradient is as near: not a miss)
        missed = int((rows[found.to(rows.device)] != rows[ids]).any(1).sum())
    if missed < UNRESOLVED_SHARE * ids.numel():
        return
    name, was = (str(t).removeprefix("torch.") for t in (held.dtype, rows.dtype))
    if narrowed:
        what = f"loaded into {name} buffers" if loaded else f"converted to {name}"
        why = (f"{name} rounds each gradient by its precision of the norm, and float16 "
               "flushes those below its range")
        wide = rows.dtype == torch.float64
        when = (" before load_state_dict" if loaded else "" if wide
                else " after converting the model")
        fix = (f"keep the head in {was} (head.{'double' if wide else 'float'}(){when}" + (
            ", and score float64 features)" if wide else f": it scores {name} features)"))
    else:
        what = f"moved to {held.device}"
        why = "its tf32 GEMM rounds each operand by up to 2**-11 of its norm there"
        fix = ("make the head there from the detector moved there (det.to(device).as_module(), "
               "which checks its search and holds the index less the gradients' mean where "
               "that resolves them), or use precision='ieee'")
    warnings.warn(
        f"{what}, the head's index no longer resolves its gradients: searched for as the "
        f"forward searches, {missed} of {ids.numel()} sampled indexed gradients were not "
        f"found, so its scores come from other neighbours than before ({why}: where the OOD "
        f"prototype lies far outside the training features for their width, or the classes "
        f"are tight); {fix}", UserWarning, stacklevel=user_stacklevel())


def as_module(det: GROOD, checks: str = "raise", flags: bool = False, *,
              copy: bool = True) -> GROODHead:
    """The fitted detector ``det`` as a :class:`GROODHead` on the detector's device (``checks``:
    see :data:`CHECKS`); with ``flags`` it holds the detector's calibrated threshold and also
    returns ``is_ood``; with ``copy=False`` it holds the detector's index tensors themselves
    (see :class:`GROODHead`)."""
    from grood.calibration import current_threshold
    from grood.index import ExactIndex

    det._check_fitted()
    index = det.index_
    if not isinstance(index, ExactIndex):
        raise ValueError(f"as_module() holds grood's exact index; this detector's index is "
                         f"{index.kind!r} (a faiss index stays outside a module: score with "
                         "the detector, or fit with index='exact')")
    if det._sharded:
        raise ValueError("as_module() needs the whole index in one process; this detector is "
                         "sharded across ranks (load it without distributed=True)")
    det._apply_score_params()  # (k, and a precision set since the fit: its search checked)
    # Checked for the search it was chosen for; an uncalibrated detector says how to get one.
    threshold = current_threshold(det) if check_flag(flags, "flags") else None
    storage = index._searched() if index.storage is not None else None
    return GROODHead(det.class_prototypes_, det.ood_prototype_,
                     index.vectors.to(det.device_), k=det.k, precision=det.precision,
                     backend=det.backend, index_storage=storage, checks=checks,
                     threshold=threshold, copy=copy,
                     index_centre=None if index.centre is None else index.centre.to(
                         det.device_))


def capture_cuda_graph(module: Callable[[Tensor], tuple], example: Tensor
                       ) -> Callable[[Tensor], tuple]:
    """``module``'s forward on inputs shaped like ``example``, captured in a CUDA graph.

    Returns ``run(x)``: copies ``x`` into the graph's input, replays the graph and returns its
    outputs, which the next call overwrites (clone what you keep). The module must read
    nothing on the host: a GROOD head with ``checks="flag"`` (or a model attached with it).
    Warm-up runs on a side stream first, as capture needs. ``run`` holds the module and the
    values the ops derived from its prototypes (the graph reads their memory on every replay),
    so ``capture_cuda_graph(det.as_module(checks="flag"), x)`` needs no other reference. The
    graph replays the state it was captured with: after changing the module's buffers, capture
    again.
    """
    if example.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors; the example is on {example.device}")
    static = example.clone()
    # Streams and the capture belong to the current device: make it the example's (a module
    # on cuda:1 while cuda:0 is current would otherwise be warmed up and captured elsewhere).
    dev = example.device
    with torch.cuda.device(dev), pinning_kept_values() as derived:
        module(static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            module(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = module(static)

    def run(x: Tensor) -> tuple:
        if x.shape != static.shape:
            raise ValueError(f"the graph was captured for inputs of shape {tuple(static.shape)}"
                             f", got {tuple(x.shape)}")
        with torch.cuda.device(dev):
            static.copy_(x)
            graph.replay()
        return out

    # The graph reads these tensors' memory by address: freed, it would be reused and the
    # replay would read other data (a silent wrong score).
    run.__dict__.update(module=module, derived=derived)
    return run
