"""OOD prototype sources that need the model: the paper's synthetic samples.

Both are values of ``GROOD(ood_prototype=...)`` and work with :meth:`GROOD.fit_model`, which
hands them the model, its feature extractor and the training loader (``needs = ("model",)``).

* ``"mixup"`` (:class:`Mixup`): mix an intermediate-layer feature of a training image with the
  intermediate-layer prototype of its second most likely class, run the rest of the network,
  and average the penultimate features.
* ``"noise"`` (:class:`UniformNoise`): uniform-noise images, Gaussian-blurred, of which the
  most OOD-like by energy are kept; their penultimate features are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grood._checks import (
    check_fraction,
    check_integer,
    check_positive_int,
    check_real,
    prefixed_errors,
)
from grood.extract import (
    FeatureExtractor,
    check_split,
    eval_mode,
    flat_logits_of,
    split_batch,
    split_model,
)
from grood.functional import add_rows_by_class
from grood.prototypes import OODPrototypeSource, PrototypeContext, register_source


@dataclass
class ModelContext:
    """What model-level sources receive as ``PrototypeContext.inputs["model"]``.

    Attributes:
        extractor (FeatureExtractor): the model and how its features are taken.
        train_loader (Iterable): the training loader (batches with labels).
        input_shape (tuple): shape of one input, e.g. ``(3, 224, 224)``.
    """

    extractor: FeatureExtractor
    train_loader: Iterable
    input_shape: tuple[int, ...]


def _model_context(ctx: PrototypeContext) -> ModelContext:
    return ctx.inputs["model"]


@register_source
class Mixup(OODPrototypeSource):
    """The paper's synthetic OOD prototype from intermediate-layer mixup.

    For each training image (up to ``n_samples``): take its feature ``e`` at the intermediate
    layer and its second most likely class ``c2`` (by the model's logits), form
    ``lam * e + (1 - lam) * P_early[c2]`` with ``P_early`` the class prototypes at that layer,
    run the rest of the network on it, and average the resulting penultimate features.

    Cost: one extra pass over the training loader for the intermediate prototypes and one over
    ``n_samples`` images for the mixing. The intermediate prototypes take ``C x E`` float32
    values (E = the layer's size per image): for layer3 of a ResNet-50 at 224x224 that is
    1024 x 14 x 14 = 200,704 values per class, 0.8 GB for ImageNet's 1,000 classes, on the
    model's device.

    Args:
        layer (str): the intermediate module, a top-level child of the model when the split is
            derived (e.g. ``"layer3"``); None where ``split`` is given.
        lam (float): weight of the image's own feature (the paper's λ; default 0.5).
        n_samples (int, optional): images to mix; all training images by default.
        split (tuple, optional): ``(stem, tail)`` modules with ``tail(stem(x)) == model(x)``,
            for models whose top-level children do not run in order. The penultimate module
            named by ``features`` must run inside ``tail``.
    """

    name = "mixup"
    needs = ("model",)

    def __init__(self, layer: str | None = "layer3", lam: float = 0.5,
                 n_samples: int | None = None,
                 split: tuple[nn.Module, nn.Module] | None = None) -> None:
        if layer is not None and not (isinstance(layer, str) and layer):
            raise TypeError(f"layer must name a top-level child module of the model (a str, "
                            f"e.g. 'layer3'; None with split), got {layer!r}")
        if split is not None and not (isinstance(split, (tuple, list)) and len(split) == 2
                                      and all(callable(m) for m in split)):
            raise TypeError("split must be (stem, tail): two modules (or functions) with "
                            f"tail(stem(x)) == model(x), got {split!r}")
        lam = check_real(lam, "lam")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        if n_samples is not None:  # 0 would read as "all" further on: refuse it here
            n_samples = check_positive_int(n_samples, "n_samples")
        self.layer, self.lam, self.n_samples, self.split = layer, lam, n_samples, split

    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "lam": self.lam, "n_samples": self.n_samples}

    def _stem_tail(self, mc: ModelContext, probe: Tensor) -> tuple[nn.Module, nn.Module]:
        model = mc.extractor.model
        if self.split is None and self.layer is None:
            raise ValueError("mixup needs the intermediate layer: layer='name' of a top-level "
                             "child module, or split=(stem, tail)")
        stem, tail = self.split if self.split is not None else split_model(
            model, str(self.layer))
        check_split(model, stem, tail, probe)
        if mc.extractor.features is None:
            raise ValueError("mixup needs the penultimate module by name (features=...) so it "
                             "can read it while the tail runs")
        return stem, tail

    def _mixed_sum(self, ex: Any, stem: Any, tail: Any, early_protos: Tensor, batch: Any,
                   seen: int, total: Tensor) -> int:
        """Add one batch's mixed penultimate features into ``total`` (float64, in place);
        returns the batch's rows used (``n_samples`` caps them)."""
        x, _ = split_batch(batch)
        x = x.to(ex.device)
        if self.n_samples is not None:
            x = x[: self.n_samples - seen]
        if x.shape[0] == 0:  # (an empty batch: nothing to mix; the model need not take 0 rows)
            return 0
        e = stem(x)
        logits = flat_logits_of(tail(e.clone()))  # the tail may change its input in place
        if logits is None or logits.ndim != 2:
            raise ValueError("Mixup needs the model's logits [B, C] (to pick each sample's "
                             "second most likely class); the tail returned "
                             f"{'none' if logits is None else tuple(logits.shape)}")
        second = logits.topk(2, dim=1).indices[:, 1] if logits.shape[1] > 1 else \
            logits.argmax(1)
        mixed = self.lam * e + (1 - self.lam) * early_protos[second].view_as(e)
        with ex.capture() as captured:
            tail(mixed.to(e.dtype))
        total += ex.output_of(captured, "features").flatten(1).double().sum(0)
        return x.shape[0]

    @torch.no_grad()
    def build(self, ctx: PrototypeContext) -> Tensor:
        mc = _model_context(ctx)
        ex = mc.extractor
        n_classes = ctx.class_prototypes.shape[0]
        sums: Tensor | None = None
        counts = torch.zeros(n_classes, dtype=torch.int64, device=ex.device)
        stem = tail = None
        with eval_mode(ex.model):
            with ctx.together("reading its training loader (mixup's early prototypes)"):
                for batch in mc.train_loader:
                    x, y = split_batch(batch)
                    if y is None:
                        raise ValueError("mixup's early prototypes need the training "
                                         "loader's labels; a batch came without them")
                    if x.shape[0] == 0:  # (as the extractor, it does not run the model)
                        continue
                    x, y = x.to(ex.device), y.to(ex.device)
                    if stem is None:
                        stem, tail = self._stem_tail(mc, x[:4])
                    e = stem(x).flatten(1).float()
                    if sums is None:
                        sums = torch.zeros((n_classes, e.shape[1]), device=ex.device)
                    with prefixed_errors("mixup's pass over the training loader"):
                        add_rows_by_class(sums, y, e)  # (its labels, another pass's)
                    counts += torch.bincount(y, minlength=n_classes)
                if sums is None:
                    raise ValueError("the training loader yielded no batches with rows")
            sums, counts = ctx.reduce(sums), ctx.reduce(counts)
            early_protos = sums / counts.clamp_min(1)[:, None]

            total = torch.zeros(ctx.class_prototypes.shape[1], dtype=torch.float64,
                                device=ex.device)
            seen = 0
            with ctx.together("reading its training loader (mixup's mixed features)"):
                for batch in mc.train_loader:
                    seen += self._mixed_sum(ex, stem, tail, early_protos, batch, seen, total)
                    if self.n_samples is not None and seen >= self.n_samples:
                        break
        total = ctx.reduce(total)
        every = float(ctx.reduce(torch.tensor([float(seen)], dtype=torch.float64,
                                              device=total.device)))  # over every rank
        if every == 0:  # the mean of nothing would make the origin the OOD prototype
            raise ValueError("mixup's pass over the training loader yielded no samples (a "
                             "loader that can be iterated only once?)")
        return (total / every).to(ctx.class_prototypes.dtype)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image [B, C, H, W] with its own Gaussian ``sigma`` [B] (separable, reflect).

    Args:
        images (Tensor): images, shape [B, C, H, W].
        sigma (Tensor): standard deviation per image, shape [B], > 0.
        kernel_size (int): odd kernel width (clipped to the image size).
    """
    b, c, h, w = images.shape
    k = min(kernel_size, 2 * ((min(h, w) - 1) // 2) + 1)
    half = k // 2
    t = torch.arange(k, dtype=images.dtype, device=images.device) - half
    kern = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(images.dtype)) ** 2)
    kern = kern / kern.sum(1, keepdim=True)  # [B, k]
    kern = kern.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    x = images.reshape(1, b * c, h, w)
    if half:
        x = nn.functional.pad(x, (half, half, 0, 0), mode="reflect")
        x = nn.functional.conv2d(x, kern[:, None, None, :], groups=b * c)
        x = nn.functional.pad(x, (0, 0, half, half), mode="reflect")
        x = nn.functional.conv2d(x, kern[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _real_pair(value: Any, name: str) -> tuple[float, float]:
    """``(low, high)`` (a tuple, list or array of two) as two finite floats, else an error
    naming ``name``."""
    try:
        items = [] if isinstance(value, (str, bytes)) else list(value)
    except TypeError:  # not a sequence
        items = []
    if len(items) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    return check_real(items[0], name), check_real(items[1], name)


@register_source
class UniformNoise(OODPrototypeSource):
    """OOD prototype from blurred uniform-noise images, keeping the most OOD-like ones.

    Batches of images uniform in ``value_range`` (the model's input shape) are blurred with a
    Gaussian of a random sigma in ``sigma_range`` per image (smooth blobs instead of pixel
    noise). Of each batch, the ``keep`` fraction with the lowest energy score
    ``logsumexp(logits)`` is kept — the least in-distribution by the model's own judgement,
    since the OOD prototype should stand for what the model considers foreign — and the
    penultimate features of the kept images are averaged.

    Args:
        n_samples (int): noise images to generate.
        keep (float): fraction of each batch kept (lowest energy).
        batch_size (int): images per forward pass.
        sigma_range (tuple[float, float]): range of the blur's standard deviation, in pixels.
        kernel_size (int): blur kernel width (odd).
        value_range (tuple[float, float]): range of the uniform pixel values, in the model's
            input space (after any normalisation the model expects).
        seed (int): seed of the noise, so the prototype is reproducible.
        input_shape (tuple, optional): one input's shape; by default the training loader's.
    """

    name = "noise"
    needs = ("model",)

    def __init__(self, n_samples: int = 1000, keep: float = 0.1, batch_size: int = 100,
                 sigma_range: tuple[float, float] = (0.2, 5.0), kernel_size: int = 7,
                 value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 input_shape: tuple[int, ...] | None = None) -> None:
        keep = check_fraction(keep, "keep")
        n_samples = check_positive_int(n_samples, "n_samples")
        batch_size = check_positive_int(batch_size, "batch_size")
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred blur), got {kernel_size}")
        s0, s1 = _real_pair(sigma_range, "sigma_range")
        if not 0.0 < s0 <= s1:
            raise ValueError(f"sigma_range must be (low, high) with 0 < low <= high, got "
                             f"{tuple(sigma_range)}")
        lo, hi = _real_pair(value_range, "value_range")
        if not lo < hi:
            raise ValueError(f"value_range must be (low, high) with low < high, got "
                             f"{tuple(value_range)}")
        if input_shape is not None and not isinstance(input_shape, (tuple, list, torch.Size)):
            raise TypeError("input_shape must be one input's shape as a tuple (e.g. (3, 224, "
                            f"224)), got {input_shape!r}")
        self.n_samples, self.keep, self.batch_size = n_samples, keep, batch_size
        self.sigma_range, self.kernel_size = (s0, s1), kernel_size
        self.value_range, self.seed = (lo, hi), check_integer(seed, "seed")
        self.input_shape = None if input_shape is None else tuple(
            check_positive_int(v, "input_shape") for v in input_shape)

    def params(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "keep": self.keep, "batch_size": self.batch_size,
                "sigma_range": list(self.sigma_range), "kernel_size": self.kernel_size,
                "value_range": list(self.value_range), "seed": self.seed,
                "input_shape": None if self.input_shape is None else list(self.input_shape)}

    def images(self, n: int, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        """``n`` blurred noise images of ``shape`` (on the CPU, from ``gen``)."""
        lo, hi = self.value_range
        x = torch.rand((n, *shape), generator=gen) * (hi - lo) + lo
        if len(shape) == 3:
            s0, s1 = self.sigma_range
            sigma = torch.rand(n, generator=gen) * (s1 - s0) + s0
            x = gaussian_blur(x, sigma, self.kernel_size)
        return x

    @torch.no_grad()
    def build(self, ctx: PrototypeContext) -> Tensor:
        mc = _model_context(ctx)
        shape = self.input_shape or mc.input_shape
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros(ctx.class_prototypes.shape[1], dtype=torch.float64,
                            device=mc.extractor.device)
        kept = 0
        for start in range(0, self.n_samples, self.batch_size):
            n = min(self.batch_size, self.n_samples - start)
            out = mc.extractor(self.images(n, shape, gen))
            if out.logits is None:
                raise ValueError("the noise source needs the model's logits (energy score)")
            energy = torch.logsumexp(out.logits.double(), dim=1)
            n_keep = max(1, math.ceil(self.keep * n))
            idx = torch.topk(energy, n_keep, largest=False).indices
            total += out.features[idx].double().sum(0)
            kept += n_keep
        return (total / kept).to(ctx.class_prototypes.dtype)
