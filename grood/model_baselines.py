"""Baselines that read the model's inputs rather than a set of features: :class:`ODIN`
and :class:`RankFeat`.

ODIN (Liang et al., ICLR 2018) moves each input a small step against the gradient of its
own cross-entropy before the model scores it; RankFeat (Song et al., NeurIPS 2022) removes
the largest singular component of an intermediate feature map and runs the rest of the
model on what is left. Both need the model and the inputs: each is scored by
``score_model`` over a loader, ``score_inputs`` on one batch, or beside GROOD by
:func:`grood.evaluate_model` (``baselines=[ODIN(), RankFeat()]``), which runs them on each
loader's batches as they pass through the model. A feature file holds no inputs, so
:func:`grood.evaluate` and ``grood eval`` cannot score them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence, Sized
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from grood._batches import check_loader, warn_if_shuffled
from grood._checks import (
    check_device,
    check_finite_rows,
    check_positive_real,
    check_real,
    prefixed_errors,
)
from grood._params import Parameters
from grood._progress import progress
from grood.extract import (
    autocast_context,
    check_split,
    eval_mode,
    flat_logits_of,
    model_device,
    split_batch,
    split_model,
)

#: The ``inputs`` of a baseline scored from the model's inputs (by the model).
MODEL_INPUTS = "inputs"


def scores_inputs(est: Any) -> bool:
    """Whether ``est`` is a baseline that scores the model's inputs (:class:`ODIN`,
    :class:`RankFeat`), which only :func:`grood.evaluate_model` can run beside GROOD."""
    return getattr(est, "inputs", None) == MODEL_INPUTS


class _InputBaseline(Parameters):
    """A baseline scored through the model on its inputs (``score_inputs``, one batch), with
    nothing learned; ``score_model`` runs it over a loader."""

    name: ClassVar[str]
    inputs: ClassVar[str] = MODEL_INPUTS
    fit_reads: ClassVar[tuple[str, ...]] = ()  # (nothing is learned)
    progress: bool | None

    def _checked(self) -> Any:
        """The parameters, checked before any batch runs."""
        raise NotImplementedError

    def score_inputs(self, model: nn.Module, x: Tensor, *,
                     autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Scores [B] (float32; float64 from a float64 model; higher = ID) and predictions
        [B] of one batch of inputs (on the model's device)."""
        checked = self._checked()
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name} scores a batch of inputs given as a tensor, got "
                            f"{type(x).__name__}")
        if x.ndim == 0:
            raise ValueError("the inputs must be a batch [B, ...], got a 0-d tensor")
        if x.shape[0] == 0:  # (many models cannot run on 0 rows)
            return (torch.empty(0, device=x.device),
                    torch.empty(0, dtype=torch.long, device=x.device))
        with eval_mode(model):
            return self._score_batch(model, x, checked, autocast)

    def _score_batch(self, model: nn.Module, x: Tensor, checked: Any,
                     autocast: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """:meth:`score_inputs` of a batch of at least one row, the model in eval mode."""
        raise NotImplementedError

    def score_model(self, model: nn.Module, loader: Iterable, *,
                    device: str | torch.device | None = None,
                    autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """CPU ``(scores [N], preds [N])`` of a loader's samples, in its order (a loader that
        shuffles is warned of, as :meth:`grood.GROOD.score_model` warns).

        Args:
            model (nn.Module): the classifier (its forward returns the logits, as
                :func:`grood.extract.logits_of` reads them).
            loader: batches as :meth:`grood.GROOD.score_model` takes them.
            device: where the inputs go (default: the model's).
            autocast (torch.dtype, optional): run the model under ``torch.autocast``.
        """
        self._checked()  # (before the first batch)
        check_loader(loader, "score_model takes a loader of batches",
                     ": pass [(inputs,)] or a DataLoader")
        warn_if_shuffled(loader, "score_model")
        dev = check_device(device, model=True) or model_device(model)
        dataset = getattr(loader, "dataset", None)
        total = len(dataset) if isinstance(dataset, Sized) else None
        scores, preds = [], []
        with progress(total=total, desc=f"grood: {self.name}", unit="img",
                      enabled=self.progress) as bar:
            for number, batch in enumerate(loader):
                x = split_batch(batch)[0].to(dev)
                with prefixed_errors(f"the loader's batch {number} (numbered from 0)"):
                    s, p = self.score_inputs(model, x, autocast=autocast)
                scores.append(s.cpu())
                preds.append(p.cpu())
                bar.update(x.shape[0])
        if not scores:
            raise ValueError("the loader yielded no batches")
        return torch.cat(scores), torch.cat(preds)


class ODIN(_InputBaseline):
    """ODIN: the largest softmax probability at temperature T of the input moved one step
    against the sign of the gradient of its cross-entropy with the class the model predicts,
    ``max softmax(f(x~) / T)`` with ``x~ = x - noise * sign(grad_x CE(f(x) / T, argmax f(x)))
    / input_std``. Higher = more in-distribution.

    Nothing is learned (there is no ``fit``). Each batch costs two forward passes and one
    backward pass (one forward with ``noise=0``: MSP at temperature T). Only the inputs'
    gradient is taken: the model's parameters collect none, its modules' train/eval modes
    are restored, and the inputs given are not changed. An input element whose gradient is
    exactly 0 is not moved (the paper's ``sign``, as pytorch-ood computes it; OpenOOD and the
    original code move it by ``-noise``, counting a 0 gradient as positive).

    Args:
        temperature (float): T (1000 in the paper and in OpenOOD).
        noise (float): the step ε, in units of the unnormalised input (0.0014, OpenOOD's for
            ImageNet; 0 makes no step).
        input_std (float | sequence of float, optional): the per-channel standard deviation
            the loader normalises inputs with (torchvision's ``Normalize(mean, std)``): the
            step on channel c (dimension 1) is divided by ``input_std[c]``, so it is ε in the
            unnormalised input. None: inputs as they are.
        progress (bool, optional): :meth:`score_model`'s progress bar over batches (None: on
            a terminal).
    """

    name = "ODIN"

    def __init__(self, temperature: float = 1000.0, noise: float = 0.0014,
                 input_std: float | Sequence[float] | None = None,
                 progress: bool | None = None) -> None:
        self.temperature = temperature
        self.noise = noise
        self.input_std = input_std
        self.progress = progress

    @property
    def display_name(self) -> str:
        """The name :func:`grood.evaluate_model` gives its rows."""
        t, noise, _ = self._checked()  # (a temperature that is no number: its own error)
        return f"ODIN (T={t:g}, eps={noise:g})"

    def _checked(self) -> tuple[float, float, tuple[float, ...] | None]:
        """The parameters, checked (a NaN step or a 0 temperature would give NaN scores)."""
        t = check_positive_real(self.temperature, "temperature")
        noise = check_real(self.noise, "noise")
        if noise < 0:
            raise ValueError(f"noise must be >= 0 (a step against the gradient), got "
                             f"{self.noise!r}")
        std = self.input_std
        if std is None:
            return t, noise, None
        values = [std] if isinstance(std, (int, float)) or getattr(std, "ndim", 1) == 0 \
            else list(std)
        if not values:
            raise ValueError("input_std is empty: give one standard deviation per channel, "
                             "or None")
        return t, noise, tuple(check_positive_real(v, "input_std") for v in values)

    def perturb(self, model: nn.Module, x: Tensor, *,
                autocast: torch.dtype | None = None) -> Tensor:
        """The inputs ``x`` moved by ODIN's step (a new tensor; ``x`` is unchanged), with the
        model in eval mode."""
        t, noise, std = self._checked()
        x = _checked_inputs(x, std)
        with eval_mode(model):
            moved = self._perturb(model, x, t, noise, std, autocast)
        return moved.clone() if moved is x else moved

    def _perturb(self, model: nn.Module, x: Tensor, t: float, noise: float,
                 std: tuple[float, ...] | None, autocast: torch.dtype | None) -> Tensor:
        if noise == 0 or x.shape[0] == 0:
            return x
        # (inference mode, where a caller runs in it, would leave no graph to differentiate)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            z = _logits(model, xg, autocast, xg.shape[0]) / t
            # The cross-entropy of each row with its own prediction, summed: each row's
            # gradient is its own loss's (a mean would scale it by 1 / B, towards underflow).
            own = z.gather(1, z.detach().argmax(1, keepdim=True))[:, 0]
            loss = (torch.logsumexp(z, 1) - own).sum()
            (grad,) = torch.autograd.grad(loss, xg)
        step = grad.sign()
        if std is not None:
            shape = (1, -1, *([1] * (x.ndim - 2)))
            step = step / torch.tensor(std, dtype=step.dtype, device=step.device).view(shape)
        return (x.detach() - noise * step).to(x.dtype)

    def _score_batch(self, model: nn.Module, x: Tensor, checked: Any,
                     autocast: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """The largest probability at T of the moved inputs and their classes (as OpenOOD's
        ODIN predicts)."""
        t, noise, std = checked
        moved = self._perturb(model, _checked_inputs(x, std), t, noise, std, autocast)
        with torch.no_grad():
            z = _logits(model, moved, autocast, x.shape[0])
        dtype = z.dtype  # float32, or a float64 model's float64
        z = z.double() / t
        top, pred = z.max(1)
        # exp(max - logsumexp) in float64, rounded once to float32: the scores of T = 1000
        # differ from 1 / C in their fourth or fifth digit
        return torch.exp(top - torch.logsumexp(z, 1)).to(dtype), pred


class RankFeat(_InputBaseline):
    """RankFeat: the energy ``T * logsumexp(z / T)`` of the logits ``z`` the model gives when
    each sample's feature map after ``layers`` (a matrix per sample: channels by positions,
    [C, H * W]) has its largest singular component ``s1 u1 v1^T`` removed before the rest of
    the model runs; with several layers, of the mean of their logits (the fusion the paper
    and OpenOOD use for a ResNet's "layer3" and "layer4"). Higher = more in-distribution.

    Nothing is learned. Each batch runs the model once per layer (the part up to the layer,
    the removal, the rest). The model is split after each layer by its top-level children,
    as :class:`grood.Mixup` splits it (torchvision's ResNets: ``"layer3"``, ``"layer4"``),
    checked once per model on the first batch it scores (the parts in turn must give the
    model's logits), or by ``splits``. The singular value decomposition runs in float32
    (float64 for a float64 model; under autocast too). The predictions are the fused logits'
    classes, as OpenOOD's.

    Args:
        layers (str | sequence of str): the top-level children after which the feature map
            is taken (default ``("layer3", "layer4")``, OpenOOD's for ResNets; ``"layer4"``
            alone is the paper's single-block RankFeat).
        splits (sequence of (stem, tail), optional): for a model whose top-level children do
            not run in order, one pair per layer with ``tail(stem(x)) == model(x)``; then
            ``layers`` only names them.
        temperature (float): the energy's T (1 in the paper and OpenOOD).
        progress (bool, optional): :meth:`score_model`'s progress bar over batches (None: on
            a terminal).
    """

    name = "RankFeat"

    def __init__(self, layers: str | Sequence[str] = ("layer3", "layer4"),
                 splits: Sequence[tuple[Any, Any]] | None = None, temperature: float = 1.0,
                 progress: bool | None = None) -> None:
        self.layers = layers
        self.splits = splits
        self.temperature = temperature
        self.progress = progress

    @property
    def display_name(self) -> str:
        """The name :func:`grood.evaluate_model` gives its rows."""
        return f"RankFeat ({'+'.join(map(str, self._layer_names()))})"

    def _layer_names(self) -> tuple[Any, ...]:
        return (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)

    def _checked(self) -> tuple[tuple[str, ...], float]:
        layers = self._layer_names()
        if not layers or not all(isinstance(n, str) and n for n in layers):
            raise TypeError(f"layers must name one or more modules (str), got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers names a module twice: {list(layers)}")
        if self.splits is not None:
            splits = list(self.splits)
            if len(splits) != len(layers) or not all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and all(map(callable, p))
                    for p in splits):
                raise TypeError(f"splits must be one (stem, tail) pair of modules (or "
                                f"functions) per layer ({len(layers)}), got {self.splits!r}")
        return layers, check_positive_real(self.temperature, "temperature")

    def __getstate__(self) -> dict[str, Any]:
        """The parameters, without the parts kept for the last model (a weak reference to
        it, which does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k != "_parts_of"}

    def _parts(self, model: nn.Module, x: Tensor, layers: tuple[str, ...]
               ) -> list[tuple[Any, Any]]:
        """The (stem, tail) pair of each layer, checked on ``x`` the first time ``model``
        comes with these ``layers`` and ``splits`` (and kept for them)."""
        kept = self.__dict__.get("_parts_of")
        if kept is not None and kept[0]() is model and kept[2] == (layers, id(self.splits)):
            return kept[1]
        pairs = ([tuple(p) for p in self.splits] if self.splits is not None
                 else [split_model(model, name) for name in layers])
        for stem, tail in pairs:
            check_split(model, stem, tail, x)
        self.__dict__["_parts_of"] = (weakref.ref(model), pairs, (layers, id(self.splits)))
        return pairs

    def _score_batch(self, model: nn.Module, x: Tensor, checked: Any,
                     autocast: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """The energy of the fused logits and their classes."""
        layers, t = checked
        ctx = autocast_context(x.device, autocast)
        with torch.no_grad():
            pairs = self._parts(model, x, layers)
            fused: Tensor | None = None
            for name, (stem, tail) in zip(layers, pairs, strict=True):
                with ctx:
                    z = _checked_logits(tail(without_rank1(stem(x), name)), x.shape[0],
                                        f"the rest of the model after {name!r}")
                fused = z if fused is None else fused + z
        assert fused is not None  # (one layer at least)
        dtype = fused.dtype
        lg = fused.double() / len(pairs)
        return (t * torch.logsumexp(lg / t, 1)).to(dtype), lg.argmax(1)


def without_rank1(fmap: Any, name: str = "the layer") -> Tensor:
    """Each sample's feature map ``fmap`` [B, C, ...] as a [C, prod(...)] matrix less its
    largest singular component ``s1 u1 v1^T``, in ``fmap``'s shape and dtype (the
    decomposition in float32, or float64 for float64)."""
    if not isinstance(fmap, Tensor) or fmap.ndim < 3:
        got = f"of shape {tuple(fmap.shape)}" if isinstance(fmap, Tensor) else \
            f"a {type(fmap).__name__}"
        raise ValueError(f"RankFeat removes the largest singular component of a feature map (a "
                         f"matrix per sample: [B, C, H, W] or [B, N, D]); the model's output "
                         f"after {name!r} is {got}")
    check_finite_rows(fmap, f"the feature map after {name!r}")
    m = fmap.reshape(fmap.shape[0], fmap.shape[1], -1)
    work = m if m.dtype == torch.float64 else m.float()
    u, sv, vh = torch.linalg.svd(work, full_matrices=False)
    work = work - (u[:, :, :1] * sv[:, None, :1]) @ vh[:, :1, :]
    return work.to(fmap.dtype).reshape(fmap.shape)


def _checked_inputs(x: Any, std: tuple[float, ...] | None) -> Tensor:
    """A batch of inputs, as a floating tensor whose channels (dimension 1) match
    ``input_std``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"ODIN moves a batch of inputs given as a tensor, got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"ODIN moves the inputs along their gradient, so they must be floating "
                        f"point; got {x.dtype} (convert images to float, e.g. "
                        "torchvision's ToTensor)")
    if x.ndim < 2:
        raise ValueError(f"the inputs must be a batch [B, ...], got shape {tuple(x.shape)}")
    if std is not None and len(std) != 1 and x.shape[1] != len(std):
        raise ValueError(f"input_std has {len(std)} values, one per channel, but the inputs "
                         f"have {x.shape[1]} channel(s) (dimension 1 of shape "
                         f"{tuple(x.shape)})")
    return x


def _logits(model: nn.Module, x: Tensor, autocast: torch.dtype | None, rows: int) -> Tensor:
    """The model's logits of ``x`` [rows, C], checked (:func:`_checked_logits`)."""
    with autocast_context(x.device, autocast):
        return _checked_logits(model(x), rows, "the model's output")


def _checked_logits(output: Any, rows: int, what: str) -> Tensor:
    """The logits [rows, C] in ``output`` (as :func:`grood.extract.flat_logits_of` reads them), in
    float32 (float64 kept), checked finite: a non-finite logit would make every later number
    NaN."""
    z = flat_logits_of(output)
    if z is None or z.ndim != 2 or z.shape[0] != rows:
        raise ValueError(f"the baseline needs the model's logits [{rows}, C] of a batch of "
                         f"{rows} input(s); {what} gave "
                         f"{'none' if z is None else f'shape {tuple(z.shape)}'}")
    z = z.float() if z.dtype != torch.float64 else z
    check_finite_rows(z.detach(), "the model's logits")
    return z


