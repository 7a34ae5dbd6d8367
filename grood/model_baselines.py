"""Baselines that read the model's inputs rather than a set of features: :class:`ODIN`.

ODIN (Liang et al., ICLR 2018) moves each input a small step against the gradient of its
own cross-entropy before the model scores it, so it needs the model and the inputs: it is
scored by :meth:`ODIN.score_model` over a loader, :meth:`ODIN.score_inputs` on one batch, or
beside GROOD by :func:`grood.evaluate_model` (``baselines=[ODIN()]``), which runs it on each
loader's batches as they pass through the model. A feature file holds no inputs to move, so
:func:`grood.evaluate` and ``grood eval`` cannot score it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from grood._batches import check_loader, warn_if_shuffled
from grood._checks import check_device, check_positive_real, check_real
from grood._params import Parameters
from grood._progress import progress
from grood.extract import eval_mode, logits_of, model_device, split_batch

#: The ``inputs`` of a baseline scored from the model's inputs (by the model).
MODEL_INPUTS = "inputs"


def scores_inputs(est: Any) -> bool:
    """Whether ``est`` is a baseline that scores the model's inputs (:class:`ODIN`), which
    only :func:`grood.evaluate_model` can run beside GROOD."""
    return getattr(est, "inputs", None) == MODEL_INPUTS


class ODIN(Parameters):
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

    name: ClassVar[str] = "ODIN"
    inputs: ClassVar[str] = MODEL_INPUTS
    fit_reads: ClassVar[tuple[str, ...]] = ()  # (nothing is learned)

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
        return f"ODIN (T={self.temperature:g}, eps={self.noise:g})"

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
            return self._perturb(model, x, t, noise, std, autocast)

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

    def score_inputs(self, model: nn.Module, x: Tensor, *,
                     autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Scores [B] (float32; float64 from a float64 model; higher = ID) and predictions [B]
        of one batch of inputs (on the model's device): the model's classes of the moved
        inputs, as OpenOOD's ODIN gives them."""
        t, noise, std = self._checked()
        x = _checked_inputs(x, std)
        if x.shape[0] == 0:  # (many models cannot run on 0 rows)
            return (torch.empty(0, device=x.device),
                    torch.empty(0, dtype=torch.long, device=x.device))
        with eval_mode(model):
            moved = self._perturb(model, x, t, noise, std, autocast)
            with torch.no_grad():
                z = _logits(model, moved, autocast, x.shape[0])
        dtype = z.dtype  # float32, or a float64 model's float64
        z = z.double() / t
        top, pred = z.max(1)
        # exp(max - logsumexp) in float64, rounded once to float32: the scores of T = 1000
        # differ from 1 / C in their fourth or fifth digit
        return torch.exp(top - torch.logsumexp(z, 1)).to(dtype), pred

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
        with progress(total=total, desc="grood: ODIN", unit="img",
                      enabled=self.progress) as bar:
            for batch in loader:
                x = split_batch(batch)[0].to(dev)
                s, p = self.score_inputs(model, x, autocast=autocast)
                scores.append(s.cpu())
                preds.append(p.cpu())
                bar.update(x.shape[0])
        if not scores:
            raise ValueError("the loader yielded no batches")
        return torch.cat(scores), torch.cat(preds)


def _checked_inputs(x: Any, std: tuple[float, ...] | None) -> Tensor:
    """A batch of inputs, as a floating tensor whose channels (dimension 1) match
    ``input_std``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"ODIN scores a batch of inputs given as a tensor, got "
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
    """The model's logits of ``x`` [rows, C], checked: read from its output and finite (a
    non-finite logit would make every later number NaN)."""
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast else nullcontext()
    with ctx:
        z = logits_of(model(x))
    if z is None or z.ndim != 2 or z.shape[0] != rows:
        raise ValueError(f"ODIN needs the model's logits [{rows}, C] of a batch of {rows} "
                         f"input(s); its output gave "
                         f"{'none' if z is None else f'shape {tuple(z.shape)}'}")
    z = z.float() if z.dtype != torch.float64 else z
    bad = ~torch.isfinite(z.detach()).all(1)
    if bool(bad.any()):
        rows_bad = bad.nonzero()[:, 0]
        raise ValueError(f"the model's logits of {len(rows_bad)} input(s) of the batch are NaN "
                         f"or infinite (rows {rows_bad[:5].tolist()}"
                         f"{', ...' if len(rows_bad) > 5 else ''}): ODIN cannot score them")
    return z

