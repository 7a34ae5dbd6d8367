"""Features and logits from any ``nn.Module``, streamed from a DataLoader.

:class:`FeatureExtractor` takes the penultimate features (and optionally an intermediate
layer) with forward hooks on named modules, or from a model whose forward returns them
(``forward(x, return_feature_list=True) -> (logits, [..., penultimate])``, the OpenOOD
convention). A name ending in ``:input`` reads the module's input instead of its output
(``"heads.head:input"``: what a ViT's classifier receives, the class token that ``forward``
selects by slicing). Every output is flattened to ``[N, D]``. Extraction runs under
``torch.no_grad`` in eval mode, and the model's previous train/eval mode is restored
afterwards.

Loaders may yield tensors, ``(x, y, ...)`` tuples or lists, or dicts with ``data`` and
``label`` keys (the OpenOOD convention; Hugging Face's ``pixel_values`` / ``labels`` and a few
other common names too: :data:`INPUT_KEYS`, :data:`LABEL_KEYS`). Models may return their
logits as a tensor, as the first element of a tuple, or under ``logits`` in a mapping or an
output object (Hugging Face's ``ModelOutput``): see :func:`logits_of`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from grood._batches import check_loader
from grood._checks import check_device, text_values, user_stacklevel
from grood._progress import progress

#: Keys of a dict batch that hold the inputs (OpenOOD's ``data``, Hugging Face's
#: ``pixel_values``, datasets' ``image``), then those that hold the labels; the first present
#: is used.
INPUT_KEYS = ("data", "pixel_values", "image", "images", "input", "inputs")
LABEL_KEYS = ("label", "labels", "target", "targets")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels or None)`` from a loader's batch (tensor, tuple/list or dict).

    Labels given as a list or NumPy array (a custom ``collate_fn``) are read as a tensor; a
    second element that is not numbers (file names, a metadata dict) is not labels. A dict's
    inputs and labels are under the first of :data:`INPUT_KEYS` and :data:`LABEL_KEYS` it
    has."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"a dict batch needs its inputs under one of {list(INPUT_KEYS)}; "
                             f"it has {sorted(map(str, batch))}")
        if not isinstance(batch[key], Tensor):
            raise TypeError(f"a dict batch's {key!r} must be a tensor of inputs, got "
                            f"{type(batch[key]).__name__}")
        label = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return batch[key], _labels_of(label)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], _labels_of(batch[1]) if len(batch) > 1 else None
    raise TypeError("a loader must yield tensors, (inputs, labels) tuples or dicts with "
                    f"inputs under {INPUT_KEYS[0]!r} (or {', '.join(map(repr, INPUT_KEYS[1:]))})"
                    f" and labels under {LABEL_KEYS[0]!r}; got {type(batch).__name__}")


def missing_labels_hint(loader: Any) -> str:
    """Why the loader's first batch gave no labels, for the error that says so: its labels are
    text (class names, which :func:`split_batch` takes for a sample's names), or where
    labels would be."""
    batch = next(iter(loader), None)
    key = next((k for k in LABEL_KEYS if k in batch), None) if isinstance(batch, Mapping) \
        else None
    if isinstance(batch, Mapping) and key is not None:
        value, where = batch[key], f"under {key!r}"
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        value, where = batch[1], "as the second element"
    else:
        return (f"; each batch must carry them: (inputs, labels) tuples, or dicts with labels "
                f"under {LABEL_KEYS[0]!r}")
    text = text_values(value, 60)
    if text is None:
        return ""
    return (f"; the first batch holds text {where} ({text[1]}): class names? give integer "
            "class ids 0..C-1 (e.g. a dataset's class_to_idx), or read them as numbers where "
            "they are ids written as text")


def _labels_of(obj: Any) -> Tensor | None:
    if obj is None or isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (list, tuple, np.ndarray)):
        try:  # numbers of any dtype: the label checks name a wrong one
            return torch.as_tensor(np.asarray(obj))
        except (TypeError, ValueError, RuntimeError):  # strings, objects, ragged lists
            return None
    return None


def logits_of(output: Any) -> Tensor | None:
    """The logits in a model's output.

    A tensor is the logits; a tuple or list holds them first (torchvision's auxiliary outputs,
    ``(logits, features)``); a mapping (a dict, Hugging Face's ``ModelOutput``) or another
    object holds them as ``logits``; ``None`` has none. Anything else is an error naming what
    came back, so that a model's logits are never silently left out (without them, ``fit``
    would index the samples their nearest prototype gets right instead of the samples the
    model gets right).
    """
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    if isinstance(output, Mapping):
        if "logits" in output:
            return logits_of(output["logits"])
        raise ValueError(f"the model returned a {type(output).__name__} with keys "
                         f"{sorted(map(str, output))[:10]} and no 'logits'; wrap the model so "
                         "that its forward returns the logits (a tensor)")
    found = getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    raise TypeError(f"the model returned a {type(output).__name__}, from which grood cannot "
                    "read logits: return a tensor, a tuple with the logits first, or a mapping "
                    "or object with 'logits'")


def flat_logits_of(output: Any) -> Tensor | None:
    """:func:`logits_of`, with a convolutional classifier's [B, C, 1, ...] logits (trailing
    dimensions of size 1) read as [B, C]; logits of other shapes as they are."""
    logits = logits_of(output)
    if logits is not None and logits.ndim > 2 and all(s == 1 for s in logits.shape[2:]):
        return logits.reshape(logits.shape[0], logits.shape[1])
    return logits


def class_logits(logits: Tensor, rows: int) -> Tensor:
    """A batch of ``rows`` inputs' logits (as :func:`flat_logits_of` reads them), checked to
    be [rows, C]; any other shape is an error naming it, where leaving the logits out would
    index the samples their nearest prototype gets right instead of those the model gets
    right."""
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(
            f"the model's logits have shape {tuple(logits.shape)} for a batch of {rows} "
            f"input(s); grood reads one row of class logits per input, [{rows}, C] (a "
            f"convolutional classifier's [{rows}, C, 1, 1] is taken so): wrap the model so "
            "that its forward returns them")
    return logits


#: Appended to a module's name, its input rather than its output: ``"heads.head:input"`` is
#: what a ViT's classifier receives (the class token, selected in ``forward`` by slicing, which
#: no module outputs).
INPUT_SUFFIX = ":input"


#: The attribute through which each wrapper holds the model it wraps, the first part of
#: every module name it lists: torch.compile's ``OptimizedModule`` (``_orig_mod``),
#: ``DataParallel`` and ``DistributedDataParallel`` (``module``).
WRAPPER_ATTRIBUTES = ("_orig_mod", "module")


def wrapper_path(model: nn.Module | None) -> list[str]:
    """The attributes leading from ``model`` through the wrappers around it to the model
    they wrap (``["_orig_mod", "module"]`` for ``torch.compile(nn.DataParallel(net))``; none
    for a model not wrapped)."""
    path: list[str] = []
    while model is not None:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            step = "module"
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            step = "_orig_mod"
        else:
            break
        path.append(step)
        model = getattr(model, step)
    return path


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers :func:`wrapper_path` goes through (``model`` itself
    where there are none)."""
    for step in wrapper_path(model):
        model = getattr(model, step)
    return model


def bare_name(name: str) -> str:
    """A module name less the wrappers' parts it begins with (``"_orig_mod.avgpool"`` and
    ``"module.avgpool"`` are ``"avgpool"``), as the wrapped model itself names it."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_ATTRIBUTES:
        parts = parts[1:]
    return ".".join(parts)


def check_module_name(names: dict[str, nn.Module], name: Any, role: str) -> tuple[str, bool]:
    """``(module name, whether its input is meant)`` for ``name`` (a module name, or one with
    :data:`INPUT_SUFFIX`), or an error. A model wrapped by torch.compile, DataParallel or
    DistributedDataParallel is read through its wrappers: ``"avgpool"`` is its
    ``"_orig_mod.avgpool"`` (a detector fitted on the bare model scores the compiled one),
    and a wrapped name reads the bare model (``"module.avgpool"`` fitted on DataParallel). A
    name not in ``names`` (a model's ``named_modules()``) otherwise lists them, and suggests
    the one name ending in ``.name`` (the model in another container)."""
    if not isinstance(name, str):
        raise TypeError(f"{role} must be a module name (e.g. 'avgpool', as in "
                        f"model.named_modules()), got {name!r}")
    if isinstance(names.get(""), torch.jit.ScriptModule):
        raise ValueError(f"{role}={name!r} names a module of a TorchScript model, whose "
                         "modules take no hooks to read it by: give the model before "
                         "torch.jit.script (or torch.jit.trace)")
    if name in names:
        return name, False
    module, takes_input = name, False
    if name.endswith(INPUT_SUFFIX):
        module, takes_input = name[: -len(INPUT_SUFFIX)], True
        if module in names:
            return module, True
    wrapped = ".".join([*wrapper_path(names.get("")), bare_name(module)])
    if wrapped in names:
        return wrapped, takes_input
    near = [n for n in names if n.endswith("." + module)]
    hint = (f" (did you mean {near[0] + (INPUT_SUFFIX if takes_input else '')!r}? the model "
            "is wrapped)" if len(near) == 1 else "")
    shown = ", ".join(n for n in names if n)[:300]
    raise ValueError(f"{role}={name!r} is not a module of the model{hint}; its modules are: "
                     f"{shown}")


def copy_of_feature(value: Any, name: str, role: str, takes_input: bool) -> Tensor:
    """A copy of the tensor a named module gave (its output, or a tuple's first element) or
    received (``value``: its positional arguments), or an error naming the module. A copy: a
    later in-place op (an ``nn.ReLU(inplace=True)`` after the module, as in VGG or MobileNet,
    or inside it for an input) would change it."""
    out = value[0] if isinstance(value, (tuple, list)) and value else value
    if not isinstance(out, Tensor):
        what = ("was called without a tensor as its first positional argument" if takes_input
                else f"returned a {type(value).__name__}, not a tensor (or a tuple with one "
                "first)")
        raise TypeError(f"module {name!r} ({role}) {what}; name a module whose "
                        f"{'input' if takes_input else 'output'} is the feature tensor")
    return out.clone()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's previous mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` on ``device``'s type with ``dtype``, or nothing where it is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def as_rows(t: Tensor) -> Tensor:
    """A module's output [B, ...] as rows [B, D] (D = 1 for [B]), an empty batch's too
    (``reshape(0, -1)`` has no answer for 0 rows)."""
    return t.flatten(1) if t.ndim > 1 else t[:, None]


def _widths(out: Extracted) -> tuple[int | None, ...]:
    """The widths of a batch's features, logits and early outputs (None: not given)."""
    return tuple(None if t is None else t.shape[1]
                 for t in (out.features, out.logits, out.early))


@dataclass
class Extracted:
    """One batch of extraction: ``features`` [B, D] and, when available, ``logits`` [B, C]
    and ``early`` [B, E] (the intermediate layer), all flattened; ``feature_shape``: the
    features' shape as the model gave them, before flattening (None for an empty batch,
    which does not run the model)."""

    features: Tensor
    logits: Tensor | None
    early: Tensor | None
    feature_shape: tuple[int, ...] | None = None


class FeatureExtractor:
    """Penultimate features (and logits, and an intermediate layer) of a model.

    Args:
        model (nn.Module): the classifier; its forward returns logits, or
            ``(logits, feature_list)`` when called with ``return_feature_list=True``. A model
            wrapped by torch.compile, DataParallel or DistributedDataParallel is run as the
            model they wrap (eagerly, on one device), its modules named either way.
        features (str, optional): name of the module whose output is the penultimate feature
            (as in ``model.named_modules()``, e.g. ``"avgpool"``). Without it the model must
            accept ``return_feature_list=True``; its last feature is used.
        early (str, optional): name of an intermediate module to capture as well (e.g.
            ``"layer3"``), or an index into the feature list of a ``return_feature_list`` model.
        device (str | torch.device, optional): where inputs are sent; by default the model's.
        autocast (torch.dtype, optional): run the forward under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``); features are returned in float32.
        progress (bool, optional): show a progress bar over batches (None: on a terminal).
    """

    def __init__(self, model: nn.Module, *, features: str | None = None,
                 early: str | int | None = None, device: str | torch.device | None = None,
                 autocast: torch.dtype | None = None, progress: bool | None = None) -> None:
        # Run as the model they wrap: a compiled forward that has run runs past hooks added
        # since (the named module then never reports), and DataParallel's replicas would each
        # call them; the batches go to one device anyway.
        model = unwrapped(model)
        self.model = model
        self.features = features
        self.early = early
        self.device: torch.device = check_device(device, model=True) or model_device(model)
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast must be torch.float16, torch.bfloat16 or None, got "
                             f"{autocast!r}")
        self.autocast = autocast
        self.progress = progress
        if early is not None and (isinstance(early, bool)
                                  or not isinstance(early, (str, int))):
            raise TypeError(f"early must be a module name or an index into the feature list, "
                            f"got {early!r}")
        if isinstance(early, int) and features is not None:
            # (it would index a feature list that a hooked forward does not make: no output)
            raise ValueError(f"early={early!r} indexes the feature list of a model called with "
                             "return_feature_list=True, so it needs features=None; with "
                             f"features={features!r} name the early module instead")
        names = dict(model.named_modules())
        # role -> (module name, whether its input is read)
        # (an integer early indexes the feature list; any other features is checked here)
        self._targets = {role: check_module_name(names, name, role)
                         for role, name in (("features", features), ("early", early))
                         if name is not None and not (role == "early" and isinstance(name, int))}
        self._modules = names
        self._logits_checked = False  # _check_not_logits runs on the first batch only

    @contextmanager
    def capture(self) -> Iterator[dict[str, list[Tensor]]]:
        """Context manager: a dict that the named modules write their outputs (their inputs,
        for names ending in ``:input``) into (a list per role: one entry per call)."""
        captured: dict[str, list[Tensor]] = {}
        handles = []
        for role, (module, takes_input) in self._targets.items():
            name = getattr(self, role)

            def keep(value: Any, role: str = role, name: str = name,
                     takes_input: bool = takes_input) -> None:
                captured.setdefault(role, []).append(
                    copy_of_feature(value, name, role, takes_input))

            target = self._modules[module]
            if takes_input:  # before the module runs: it may change its input in place
                handles.append(target.register_forward_pre_hook(
                    lambda _module, args, keep=keep: keep(args)))
            else:
                handles.append(target.register_forward_hook(
                    lambda _module, _args, output, keep=keep: keep(output)))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    def _forward(self, x: Tensor, captured: dict[str, list[Tensor]]) -> Extracted:
        x = x.to(self.device)
        ctx = autocast_context(self.device, self.autocast)
        with ctx:
            if self.features is None:
                try:
                    out = self.model(x, return_feature_list=True)
                except TypeError as exc:
                    raise ValueError("the model's forward does not take "
                                     "return_feature_list=True: name the penultimate module "
                                     "with features=...") from exc
                logits, feature_list = out
                if not feature_list:
                    raise ValueError("the model's forward returned an empty feature list: "
                                     "name the penultimate module with features=...")
                logits = flat_logits_of(logits)
                captured.setdefault("features", [feature_list[-1]])
                if isinstance(self.early, int):
                    captured["early"] = [feature_list[self.early]]
            else:
                logits = flat_logits_of(self.model(x))
        feats = self.output_of(captured, "features")
        early = self.output_of(captured, "early")
        assert feats is not None  # (captured above, or named and checked by output_of)

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else as_rows(t).float()

        if logits is not None:
            logits = class_logits(logits, x.shape[0])
        return Extracted(as_rows(feats).float(), flat(logits), flat(early), tuple(feats.shape))

    def output_of(self, captured: dict[str, list[Tensor]], role: str) -> Tensor | None:
        """The one output of the ``role`` (``"features"`` / ``"early"``) module in
        ``captured`` (None when none is asked for); an error unless a named module ran once."""
        name, outputs = getattr(self, role), captured.get(role, [])
        if not isinstance(name, str):  # from the model's feature list, or not asked for
            return outputs[0] if outputs else None
        if len(outputs) != 1:
            # A module used at several places (a shared activation) has no one output.
            raise ValueError(f"module {name!r} ({role}) ran {len(outputs)} times in the "
                             "forward pass; name a module that runs exactly once")
        return outputs[0]

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Extracted:
        """Extract one batch of inputs."""
        with eval_mode(self.model), self.capture() as captured:
            return self._forward(x, captured)

    def batches(self, loader: Iterable, *, desc: str = "grood: extracting",
                limit: int | None = None
                ) -> Generator[tuple[Extracted, Tensor | None, Tensor], None, None]:
        """Yield ``(extracted, labels, inputs)`` batch by batch (inputs on the model's device).

        Args:
            loader: any iterable of batches (DataLoader, list, generator).
            desc: the progress bar's label.
            limit: stop after this many samples.
        """
        check_loader(loader, "the loader must yield batches",
                     ": pass [(inputs,)] or [(inputs, labels)] (one dict batch: [batch]), or "
                     "a DataLoader")
        total = None
        if limit is not None:
            total = limit
        elif hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__"):
            total = len(loader.dataset)
        seen = 0
        # Empty batches (0 rows: a collate that dropped every unreadable image of one) do not
        # run the model (many cannot take 0 rows); each yields empty outputs of the widths the
        # model's outputs have, learnt from the first batch with rows. Until then they are held
        # back, and yielded in order before it, so that every batch yields once, in order.
        widths: tuple[int | None, ...] | None = None
        held: list[tuple[Tensor | None, Tensor]] = []
        # Eval mode and no_grad hold while the model runs on a batch (_run), not across the
        # yields: a generator left suspended (its consumer raised between two batches, and a
        # traceback keeps it alive) would otherwise leave the caller without gradients and the
        # model in eval mode.
        with progress(total=total, desc=desc, unit="img", enabled=self.progress) as bar:
            for number, batch in enumerate(loader):
                x, y = split_batch(batch)
                if limit is not None and seen + x.shape[0] > limit:
                    x = x[: limit - seen]
                    y = None if y is None else y[: limit - seen]
                x = x.to(self.device)
                y = None if y is None else y.to(self.device)
                if x.shape[0] == 0:
                    if widths is None:
                        held.append((y, x))
                    else:
                        yield self._empty(widths), y, x
                    continue
                out = self._run(x, number, desc)
                if not self._logits_checked:
                    self._check_not_logits(out)
                    self._logits_checked = True
                widths = _widths(out)
                for hy, hx in held:
                    yield self._empty(widths), hy, hx
                held.clear()
                yield out, y, x
                seen += x.shape[0]
                bar.update(x.shape[0])
                if limit is not None and seen >= limit:
                    break
            if held:  # every batch was empty: the model's outputs of the first give the widths
                try:
                    widths = _widths(self._run(held[0][1], 0, desc))
                except Exception as exc:
                    raise ValueError(f"each of the loader's {len(held)} batch(es) has 0 rows, "
                                     "and the model gives no outputs for an empty batch"
                                     ) from exc
                for hy, hx in held:
                    yield self._empty(widths), hy, hx

    def _run(self, x: Tensor, number: int, desc: str) -> Extracted:
        """The model's outputs of the loader's batch ``number``, its own errors noted with
        where they happened."""
        try:
            with eval_mode(self.model), torch.no_grad(), self.capture() as captured:
                return self._forward(x, captured)
        except Exception as exc:  # the model's own error, with where it happened
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"grood ({desc}): raised running the model on the "
                             f"loader's batch {number} (numbered from 0), inputs of "
                             f"shape {tuple(x.shape)}")
            raise

    def _empty(self, widths: tuple[int | None, ...]) -> Extracted:
        """Outputs of a batch of 0 rows: features, logits and early of these widths."""
        d, c, e = (None if w is None else torch.empty((0, w), device=self.device)
                   for w in widths)
        assert d is not None  # (every batch has features)
        return Extracted(d, c, e)

    def _check_not_logits(self, out: Extracted) -> None:
        """Warn when the features read are the model's logits (``features="fc"`` for the
        classifier itself), or a map or a sequence flattened (``"layer4"``'s [B, 2048, 7, 7]
        read as 100,352 columns, a transformer block's every token): GROOD's prototypes and
        gradients are meant for the penultimate feature, and nothing else would say so."""
        shape = out.feature_shape
        if shape is not None and len(shape) > 2 and math.prod(shape[2:]) > 1:
            shown = ", ".join(map(str, shape[1:]))
            which = (f"features={self.features!r}" if isinstance(self.features, str) else
                     "the last feature of the model's feature list")
            warnings.warn(
                f"{which} gives a [B, {shown}] output each batch, read "
                f"flattened as {math.prod(shape[1:]):,} columns: GROOD works on the "
                "penultimate feature, one vector per input (a map pooled: 'avgpool'; what the "
                "classifier receives: 'fc:input', 'head:input'), and memory grows with the "
                "columns (the index holds a row of them per training input)",
                UserWarning, stacklevel=user_stacklevel())
        if (out.logits is not None and out.features.shape == out.logits.shape
                and torch.equal(out.features, out.logits)):
            hint = (f" (e.g. '{self.features}:input' when {self.features!r} is the classifier)"
                    if isinstance(self.features, str) else "")
            warnings.warn(
                f"features={self.features!r} reads the model's logits (the same values): GROOD "
                f"works on the penultimate feature, what the classifier receives{hint}",
                UserWarning, stacklevel=user_stacklevel())

    def extract(self, loader: Iterable) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """All features [N, D], logits [N, C] and labels [N] of a loader, on the CPU.

        Holds the whole set in memory; ``GROOD.fit_model`` / ``score_model`` stream instead.
        """
        feats, logits, labels = [], [], []
        for out, y, _ in self.batches(loader):
            feats.append(out.features.cpu())
            if out.logits is not None:
                logits.append(out.logits.cpu())
            if y is not None:
                labels.append(y.cpu())
        if not feats:
            raise ValueError("the loader yielded no batches")
        return (torch.cat(feats), torch.cat(logits) if logits else None,
                torch.cat(labels) if labels else None)


def split_model(model: nn.Module, at: str) -> tuple[nn.Module, nn.Module]:
    """Split a model whose top-level children run in order into ``(stem, tail)`` after ``at``.

    ``stem(x)`` is the output of child ``at``; ``tail(h)`` runs the remaining children (with a
    flatten before the first ``nn.Linear`` on a >2-D input). A model wrapped by
    torch.compile, DataParallel or DistributedDataParallel is split as the model they wrap
    (its children run uncompiled, on one device). Check the split with :func:`check_split`,
    which :class:`~grood.sources.Mixup` does before using it.
    """
    model, at = unwrapped(model), bare_name(at)
    children = list(model.named_children())
    names = [n for n, _ in children]
    if at not in names:
        raise ValueError(f"cannot split the model at {at!r}: it is not one of its top-level "
                         f"children ({', '.join(names)}); pass split=(stem, tail) instead")
    cut = names.index(at) + 1
    return _Chain([m for _, m in children[:cut]]), _Chain([m for _, m in children[cut:]])


class _Chain(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            if isinstance(layer, nn.Linear) and x.ndim > 2:
                x = x.flatten(1)
            x = layer(x)
        return x


@torch.no_grad()
def check_split(model: nn.Module, stem: nn.Module, tail: nn.Module, probe: Tensor) -> None:
    """Raise unless ``tail(stem(x))`` reproduces the model's logits on a probe batch."""
    wrong = ("the model cannot be split into stem and tail by its top-level children "
             "(running them in order does not reproduce its output{}); pass split=(stem, "
             "tail) with tail(stem(x)) == model(x)")
    with eval_mode(model):
        # (a forward that flattens [B, C, 1, 1] logits its children leave splits as well)
        full = flat_logits_of(model(probe))
        try:
            parts = flat_logits_of(tail(stem(probe)))
        except (RuntimeError, ValueError, TypeError) as exc:  # (children out of order)
            raise ValueError(wrong.format(f": {type(exc).__name__}: {exc}")) from exc
    if not isinstance(full, Tensor) or not isinstance(parts, Tensor):
        raise ValueError("the model's output holds no logits to check a split against (see "
                         "grood.extract.logits_of)")
    # (NaN where the model gives NaN agrees: a probe row of non-finite inputs is the caller's
    # to name, not a reason to call the split wrong)
    if parts.shape != full.shape or not torch.allclose(parts, full, rtol=1e-4, atol=1e-5,
                                                       equal_nan=True):
        raise ValueError(wrong.format(""))
