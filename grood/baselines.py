"""Standard OOD baselines with GROOD's interface, for comparisons on the same inputs.

All of them follow the scikit-learn outlier-estimator shape — ``fit(X, y=None)`` returns
``self``, ``score_samples(X)`` returns one score per row, **higher = more in-distribution** —
and return the input's type (numpy in, numpy out; torch in, torch out). ``inputs`` says what
``X`` is: the classifier's ``"logits"`` or its penultimate ``"features"``.

* :class:`MSP` — maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).
* :class:`MaxLogit` — the largest logit (Hendrycks et al., ICML 2022).
* :class:`Energy` — negative free energy ``T * logsumexp(logits / T)`` (Liu et al., NeurIPS 2020).
* :class:`GEN` — generalized entropy of the top-M softmax probabilities (Liu et al., CVPR
  2023).
* :class:`KNN` — distance to the k-th nearest L2-normalised training feature (Sun et al.,
  ICML 2022).
* :class:`Mahalanobis` — minimum Mahalanobis distance to the class means under one shared
  covariance (Lee et al., NeurIPS 2018; features of one layer, without input perturbation),
  and :class:`RMD`, that distance relative to the training features' overall Gaussian's (Ren
  et al., 2021).
* :class:`ViM` — virtual-logit matching (Wang et al., CVPR 2022), :class:`ReAct` — energy
  of features clipped at a percentile (Sun et al., NeurIPS 2021), :class:`GradNorm` — the
  norm of the last layer's gradient of a cross-entropy to the uniform distribution (Huang et
  al., NeurIPS 2021; in closed form) and :class:`ASH` — energy of features pruned to their
  largest entries and shaped (Djurisic et al., ICLR 2023), :class:`SHE` — inner product
  with the predicted class's mean correctly classified training feature (Zhang et al., ICLR
  2023), :class:`DICE` — energy through the last layer's weights of largest contribution
  (Sun & Li, ECCV 2022), :class:`FDBD` — mean distance to the decision boundaries (Liu &
  Qin, ICML 2024), :class:`SCALE` — energy of features scaled as ASH-S scales them,
  unpruned (Xu et al., ICLR 2024) and :class:`NNGuide` — energy times the similarity to
  the nearest energy-scaled training features (Park et al., ICCV 2023): they read the
  features through the classifier's last linear layer, given (``weight``, ``bias``) or
  recovered by least squares from the training features and logits.
* :class:`KLM` — KL divergence of the softmax from the nearest class-typical softmax
  learned on training logits (Hendrycks et al., ICML 2022), and :class:`TempScale` — MSP at
  the temperature fitted to held-out logits and labels (Guo et al., ICML 2017).

``fit_reads`` says what each one's ``fit`` learns from; :func:`fit_baselines` fits several
by name on one training set. ODIN and RankFeat, which score the model's inputs rather than
features or logits, are in :mod:`grood.model_baselines`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from grood import ops
from grood._checks import (
    ArrayLike,
    ArrayT,
    as_labels,
    as_tensor,
    batches,
    check_class_count,
    check_finite_rows,
    check_fraction,
    check_integer,
    check_labels,
    check_matrix,
    check_positive_int,
    check_positive_real,
    check_real,
    compute_dtype,
    rows_from,
    user_stacklevel,
)
from grood._columns import check_feature_names, feature_names, set_feature_names
from grood._params import Parameters
from grood.errors import NotFittedError, RowsRefusedError
from grood.functional import class_prototypes, matmul_precision

if TYPE_CHECKING:
    from typing_extensions import Self


def check_fitted(est: Any, who: str | None = None) -> None:
    """Refuse a baseline (``est``, with its ``inputs``) that has not been fitted; ``who``
    names it in the message (default: "this <class>")."""
    if not hasattr(est, "n_features_in_"):
        raise NotFittedError(f"{who or f'this {type(est).__name__}'} is not fitted yet: call "
                             f"fit() on the training set's {est.inputs} first")


class _Baseline(Parameters):
    inputs: ClassVar[str]
    name: ClassVar[str]
    #: What ``fit`` learns from, beyond the width of the ``inputs`` it will score: the
    #: training set's ``"features"``, ``"labels"`` or ``"logits"``, and ``"head"``: the
    #: classifier's last layer (its ``weight`` and ``bias``, or the training logits it is
    #: recovered from). Empty: nothing is learned (any logits of the right width fit).
    fit_reads: ClassVar[tuple[str, ...]] = ()
    #: The parameters it applies when scoring: set after ``fit``, the scores are those of a
    #: fit with them (:func:`grood.tune` fits once for the points of a grid that differ in
    #: these alone). The others take effect at the next ``fit``.
    score_params: ClassVar[tuple[str, ...]] = ()
    n_features_in_: int  # set by fit

    if TYPE_CHECKING:  # each baseline's own
        def score_samples(self, x: ArrayT, /) -> ArrayT: ...

    def _read(self, x: Any, *, fitting: bool = False) -> tuple[Tensor, Any]:
        if not fitting:
            check_fitted(self)
        # Where a baseline has them: numpy ints become ints; a temperature of 0 or NaN gave
        # NaN scores, one below 0 inverted them.
        for name, check in (("k", check_positive_int), ("batch_size", check_positive_int),
                            ("temperature", check_positive_real), ("M", check_positive_int),
                            ("gamma", check_positive_real)):
            if hasattr(self, name):
                setattr(self, name, check(getattr(self, name), name))
        if hasattr(self, "backend"):  # before a fit's work, not at the first score after it
            ops.check_backend_name(self.backend)
        if fitting:  # (names of mixed types are refused before the fit's work)
            feature_names(x, self.inputs)
        else:
            self.check_columns(x)
        t, kind = as_tensor(x, self.inputs)
        check_matrix(t, self.inputs, n_cols=None if fitting else self.n_features_in_,
                     cols_from=f"this {type(self).__name__} was fitted on {self.inputs} of {{}} "
                               "columns")
        check_finite_rows(t, self.inputs)
        return t, kind

    def check_columns(self, x: Any) -> None:
        """Check the column names of ``x`` (a table's) against those fitted on, if any (see
        :func:`grood._columns.check_feature_names`)."""
        check_feature_names(getattr(self, "feature_names_in_", None), x, self.inputs,
                            against=f"this {type(self).__name__} was fitted on",
                            reorder="df[est.feature_names_in_]")

    def _fitted_on(self, x: Any, d: int) -> None:
        """Record the width ``d`` of the input ``x`` fitted on, and its column names (a
        table's; see :mod:`grood._columns`)."""
        self.n_features_in_ = d
        set_feature_names(self, feature_names(x, self.inputs))

    @property
    def display_name(self) -> str:
        """The name :func:`grood.evaluate` gives its rows (with what sets it apart from the
        same method with other parameters, where there is such a thing)."""
        return self.name


class _LogitBaseline(_Baseline):
    """A score computed from the logits alone, with a temperature; nothing is learned."""

    inputs = "logits"
    score_params: ClassVar[tuple[str, ...]] = ("temperature",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def fit(self, logits: ArrayLike, labels: ArrayLike | None = None) -> Self:
        """Record the number of classes (for input checks); returns ``self``."""
        x, _ = self._read(logits, fitting=True)
        self._fitted_on(logits, x.shape[1])
        return self

    def score_samples(self, logits: ArrayT) -> ArrayT:
        """One score per row of ``logits`` [N, C], shape [N]; higher = in-distribution."""
        x, kind = self._read(logits)
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        # Shifted by each row's largest logit before the temperature divides them, so large
        # logits or a small temperature cannot overflow to inf (and NaN scores).
        top = x.amax(dim=1, keepdim=True)
        return kind.wrap(self._score((x - top) / self._temperature(), top[:, 0]))

    def _temperature(self) -> float:
        """The temperature the logits are divided by (1 for those without one)."""
        return getattr(self, "temperature", 1.0)

    def _score(self, shifted: Tensor, top: Tensor) -> Tensor:
        """The score from ``(logits - top) / T`` and each row's largest logit ``top``."""
        raise NotImplementedError


class MSP(_LogitBaseline):
    """Maximum softmax probability ``max softmax(logits / T)``.

    Args:
        temperature (float): softmax temperature T.
    """

    name = "MSP"

    def _score(self, shifted: Tensor, top: Tensor) -> Tensor:
        return torch.softmax(shifted, dim=1).amax(dim=1)


class MaxLogit(_LogitBaseline):
    """The largest logit ``max(logits)`` (no parameters)."""

    name = "MaxLogit"
    score_params = ()

    def __init__(self) -> None:
        pass

    def _score(self, shifted: Tensor, top: Tensor) -> Tensor:
        return top


class GEN(_LogitBaseline):
    """Minus the generalized entropy of the M largest softmax probabilities,
    ``-sum_j p_j^gamma (1 - p_j)^gamma``.

    Computed from log-probabilities, and ``1 - p`` of the largest probability as the sum of
    the others (a log-sum-exp), not subtracted from 1: a confident row keeps its terms where
    float32's ``1 - p`` would round to 0 and its small probabilities underflow (which would
    tie every such row), down to logit gaps of about ``87 / gamma`` times T.

    Args:
        gamma (float): the entropy's exponent (0.1 in the paper).
        M (int): how many of the largest probabilities count (100 in the paper for
            ImageNet-1k; every class where there are fewer).
    """

    name = "GEN"
    score_params = ("gamma", "M")

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        self.gamma = gamma
        self.M = M

    def _score(self, shifted: Tensor, top: Tensor) -> Tensor:
        lse = torch.logsumexp(shifted, dim=1, keepdim=True)
        log_p, cols = (shifted - lse).topk(min(self.M, shifted.shape[1]), dim=1)  # largest 1st
        # log(1 - p): of the largest, the log of the others' sum; the rest hold p <= 1/2
        others = shifted.scatter(1, cols[:, :1], float("-inf"))
        log_rest = torch.cat((torch.logsumexp(others, dim=1, keepdim=True) - lse,
                              torch.log1p(-log_p[:, 1:].exp())), dim=1)
        return -torch.exp(self.gamma * (log_p + log_rest)).sum(dim=1)


class Energy(_LogitBaseline):
    """Negative free energy ``T * logsumexp(logits / T)``.

    Args:
        temperature (float): energy temperature T.
    """

    name = "Energy"

    def _score(self, shifted: Tensor, top: Tensor) -> Tensor:
        # T * logsumexp(x / T) = top + T * logsumexp((x - top) / T)
        return top + self.temperature * torch.logsumexp(shifted, dim=1)


class TempScale(_LogitBaseline):
    """Temperature scaling: the maximum softmax probability ``max softmax(logits / T)`` at the
    temperature T that minimises the labels' negative log-likelihood on held-out logits
    (Guo et al., ICML 2017; OpenOOD fits it on the ID validation set).

    The fit is exact: the likelihood is convex in ``1 / T``, whose optimum is found by
    safeguarded Newton steps in float64 (bracketed, then to a relative 1e-12), not by a
    fixed number of gradient steps. Logits whose labels fare no better than the uniform
    distribution (no positive T is best) and logits whose every label already holds the
    largest logit (the likelihood only grows as T falls to 0: no finite optimum, which
    fitting on the model's own training rows often gives) are refused, naming why.

    Args:
        batch_size (int): rows per batch while fitting.

    After ``fit``: ``temperature_`` (T), ``nll_`` (the mean negative log-likelihood there).
    """

    fit_reads = ("logits", "labels")
    name = "TempScale"
    score_params = ()  # (its temperature is fitted)
    temperature_: float  # set by fit
    nll_: float

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Self:  # type: ignore[override]
        """Fit T on held-out ``logits`` [N, C] and their ``labels`` [N]."""
        x, _ = self._read(logits, fitting=True)
        y = as_labels(labels)
        check_labels(y, "labels", x.shape[0], n_classes=x.shape[1],
                     n_classes_from="the logits' columns", rows_of="the logits")
        y = y.to(device=x.device, dtype=torch.int64)

        def slope(beta: float) -> tuple[float, float]:
            """d/dbeta and d2/dbeta2 of the mean NLL at 1 / T = beta, in float64."""
            d1 = d2 = 0.0
            for r0, r1 in batches(x.shape[0], self.batch_size):
                z = x[r0:r1].to(torch.float64)
                p = torch.softmax(beta * z, dim=1)
                mean = (p * z).sum(1)
                d1 += float((mean - z.gather(1, y[r0:r1, None])[:, 0]).sum())
                d2 += float((p * (z - mean[:, None]) ** 2).sum())
            return d1 / x.shape[0], d2 / x.shape[0]

        if slope(0.0)[0] >= 0:
            raise ValueError("the labels fare no better under these logits than under the "
                             "uniform distribution (no positive temperature improves their "
                             "likelihood): are the logits' columns in the labels' class order?")
        z_max = x.amax(dim=1)
        if bool((x.gather(1, y[:, None])[:, 0] == z_max).all()):
            raise ValueError("every row's label holds its largest logit, so the labels' "
                             "likelihood only grows as the temperature falls to 0 (no finite "
                             "optimum): fit on held-out logits (a validation set), as "
                             "temperature scaling is meant, not on rows the model was "
                             "trained on")
        lo, hi = 0.0, 1.0
        while slope(hi)[0] < 0:  # bracket the root of the slope (it exists: see above)
            lo, hi = hi, hi * 2
            if hi > 1e300:  # (a root beyond float64: the check above all but rules it out)
                raise ValueError("the labels' likelihood keeps growing as the temperature "
                                 "falls towards 0: no finite optimum in float64")
        beta = hi
        for _ in range(200):
            d1, d2 = slope(beta)
            if d1 < 0:
                lo = beta
            else:
                hi = beta
            step = beta - d1 / d2 if d2 > 0 else (lo + hi) / 2
            nxt = step if lo < step < hi else (lo + hi) / 2  # Newton, else bisection
            if abs(nxt - beta) <= 1e-12 * beta or hi - lo <= 1e-12 * hi:
                beta = nxt
                break
            beta = nxt
        self.temperature_ = 1.0 / beta
        nll = 0.0
        for r0, r1 in batches(x.shape[0], self.batch_size):
            lz = torch.log_softmax(beta * x[r0:r1].to(torch.float64), dim=1)
            nll -= float(lz.gather(1, y[r0:r1, None]).sum())
        self.nll_ = nll / x.shape[0]
        self._fitted_on(logits, x.shape[1])
        return self

    def _temperature(self) -> float:
        return self.temperature_

    _score = MSP._score  # (MSP's, at the fitted temperature)


class KLM(_Baseline):
    """KL matching: the negated smallest KL divergence ``KL(p || d_k)`` of a row's softmax
    ``p`` from the typical softmaxes ``d_k``, each the mean softmax of the training rows the
    classifier predicts as class ``k`` (Hendrycks et al., ICML 2022; labels are not used).

    The typical softmaxes are averaged in log space in float64, so a class whose probability
    underflows in every row still has a finite ``log d_k``; classes no training row is
    predicted as have none. Each is kept as ``log d_k`` less its largest entry (logits whose
    softmax is ``d_k``), which keeps the digits in which nearly uniform softmaxes differ
    (``log d_k`` itself sits near ``-log C`` there, where float32 holds 2.4e-7 of it). The
    nearest templates are found by one matrix product of ``p - 1/C`` (from ``expm1``) with
    those logits, every term of the size of the divergences compared; the
    :data:`KLM_CANDIDATES` nearest then have their divergences computed in float64, ``sum p
    log p - p . w_k + logsumexp(w_k)``, and the smallest is taken. Float32 logits of any
    scale so score as float64 scores them, to about twice the scores' own rounding
    (measured at logit spreads from 2e-4 to 1,500; float32 scores at spread 0.015 had been
    1e-2 of the scores' spread off).

    Fitting holds a C x C float64 array (8 MB at C = 1,000; 3.8 GB at C = 21,841), and the
    K x C templates are kept in the logits' dtype (float32 unless float64).

    Args:
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``template_logits_`` [K, C] (``log d_k`` less its largest entry, in the
    logits' dtype), ``template_lse_`` [K] (float64: the logsumexp of those logits ``w_k``),
    ``template_offsets_`` [K] (float64: ``mean(w_k) - log(mean(exp(w_k)))``),
    ``template_classes_`` [K] (the class each belongs to); ``log_templates_`` is ``log d_k``
    [K, C] in float64.
    """

    inputs = "logits"
    fit_reads = ("logits",)
    name = "KLM"
    template_logits_: Tensor  # set by fit
    template_lse_: Tensor
    template_offsets_: Tensor
    template_classes_: Tensor

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    @property
    def log_templates_(self) -> Tensor:
        """``log d_k`` [K, C] in float64: the log-softmax of ``template_logits_``."""
        check_fitted(self)
        return torch.log_softmax(self.template_logits_.to(torch.float64), dim=1)

    def fit(self, logits: ArrayLike, labels: ArrayLike | None = None) -> Self:
        """Fit the typical softmaxes on the training (or validation) ``logits`` [N, C];
        ``labels`` are not used (the classes are those predicted)."""
        x, _ = self._read(logits, fitting=True)
        n, c = x.shape
        sums = torch.full((c, c), float("-inf"), dtype=torch.float64, device=x.device)
        counts = torch.zeros(c, dtype=torch.int64, device=x.device)
        for r0, r1 in batches(n, self.batch_size):
            lp = torch.log_softmax(x[r0:r1].to(torch.float64), dim=1)
            classes, rows = torch.unique(lp.argmax(dim=1), return_inverse=True)
            # log of each predicted class's sum of probabilities: its rows' logsumexp
            top = torch.full((len(classes), c), float("-inf"), dtype=torch.float64,
                             device=x.device).scatter_reduce_(0, rows[:, None].expand(-1, c),
                                                              lp, "amax")
            part = torch.zeros_like(top).index_add_(0, rows, torch.exp(lp - top[rows]))
            sums[classes] = torch.logaddexp(sums[classes], top + torch.log(part))
            counts.index_add_(0, classes, torch.bincount(rows, minlength=len(classes)))
        present = (counts > 0).nonzero()[:, 0]
        dt = compute_dtype(x.dtype)
        log_d = sums[present]  # (less log count: the same logits)
        w = (log_d - log_d.amax(dim=1, keepdim=True)).clamp_min(-torch.finfo(dt).max)
        self.template_logits_ = w.to(dt)
        w64 = self.template_logits_.to(torch.float64)
        self.template_lse_ = torch.logsumexp(w64, dim=1)
        self.template_offsets_ = w64.mean(dim=1) - (self.template_lse_ - math.log(c))
        self.template_classes_ = present
        self._fitted_on(logits, c)
        return self

    def score_samples(self, logits: ArrayT) -> ArrayT:
        """One score per row of ``logits`` [N, C], shape [N]: ``-min_k KL(p || d_k)``,
        at most 0; higher = in-distribution."""
        x, kind = self._read(logits)
        w = self.template_logits_
        dev = w.device
        dt = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        w_dt, offsets = w.to(dt), self.template_offsets_.to(device=dev, dtype=dt)
        r = min(KLM_CANDIDATES, w.shape[0])
        lse = self.template_lse_.to(dev)
        scores = torch.empty(x.shape[0], dtype=dt, device=dev)
        for r0, r1 in batches(x.shape[0], self.batch_size):
            xb = x[r0:r1].to(device=dev)
            with matmul_precision("ieee", dev):  # fp32, whatever the program's setting
                # p . log d_k + log C = (p - 1/C) . w_k + offsets_k: largest = nearest
                near = (_uniform_excess(xb.to(dt)) @ w_dt.T + offsets).topk(r, dim=1).indices
            scores[r0:r1] = (0.0 - _least_divergence(xb, w, lse, near)).to(dt)
        return kind.wrap(scores)


#: How many templates KLM sums exactly for each row (the nearest by the float32 product):
#: that product's rounding grows with the templates' largest logit gaps, so near-ties
#: between confident templates are settled in float64.
KLM_CANDIDATES = 4


def _uniform_excess(x: Tensor) -> Tensor:
    """``softmax(x) - 1/C`` of each row of ``x`` [B, C], from ``expm1`` of the row less its
    largest entry: exact to its dtype where the softmax is nearly uniform, as ``p - 1/C``
    is not."""
    z = x - x.amax(dim=1, keepdim=True)  # (at most 0: no exp overflows)
    log_mean = torch.log1p(torch.expm1(z).mean(dim=1, keepdim=True))  # lse(z) - log C
    return torch.expm1(z - log_mean) / x.shape[1]


def _least_divergence(x: Tensor, w: Tensor, lse: Tensor, near: Tensor) -> Tensor:
    """The smallest ``KL(softmax(x) || softmax(w_k))`` [B] over the templates ``near``
    [B, r] of each row of ``x`` [B, C] (``lse``: the templates' logsumexp), in float64, as
    ``sum p log p - p . w_k + lse_k`` (0 log 0 = 0: a probability that underflows adds
    nothing), in row chunks of about 2M template entries."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, (1 << 21) // (x.shape[1] * near.shape[1]))
    for r0, r1 in batches(x.shape[0], step):
        lp = torch.log_softmax(x[r0:r1].to(torch.float64), dim=1)
        p = lp.exp()
        own = torch.where(p > 0, p * lp, 0.0).sum(dim=1, keepdim=True)
        k = near[r0:r1]
        cross = torch.einsum("bc,brc->br", p, w[k].to(torch.float64))
        out[r0:r1] = (own - cross + lse[k]).amin(dim=1).clamp_min(0)  # (KL >= 0, rounding)
    return out


def _normalise(x: Tensor) -> Tensor:
    """Rows divided by their L2 norms (zero rows stay zero), at any magnitude: each row is
    first scaled by the power of two that brings its largest entry into [0.5, 1), which is
    exact, so the norm neither overflows (rows above ~1e19 in float32) nor underflows (below
    ~1e-19) and rows of ordinary magnitude get the same bits as without it."""
    x, _ = _unit_scaled(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _unit_scaled(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows`` [N, D] each scaled by the power of two that brings its largest entry into
    [0.5, 1) (exact), and that power's exponent [N, 1] (``ldexp`` by it undoes the scale)."""
    _, exponent = torch.frexp(rows.abs().amax(dim=1, keepdim=True))
    return torch.ldexp(rows, -exponent), exponent


class KNN(_Baseline):
    """Deep nearest neighbours on L2-normalised features.

    Args:
        k (int): which neighbour's distance scores a sample (Sun et al. use 50 on CIFAR-10).
        backend (str): backend of the nearest-neighbour search (see :mod:`grood.ops`).
        batch_size (int): queries per search batch.
    """

    inputs = "features"
    fit_reads = ("features",)
    name = "KNN"
    score_params = ("k",)

    def __init__(self, k: int = 50, backend: str = "auto", batch_size: int = 4096) -> None:
        self.k = k
        self.backend = backend
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``KNN (k=50)``: its neighbour sets it apart."""
        return f"KNN (k={self.k})"

    def fit(self, features: ArrayLike, labels: ArrayLike | None = None) -> Self:
        """Store the normalised training features, less their mean (``centre_``).

        Distances do not change when queries and training rows are moved by the same vector,
        but the search's candidates do: it picks them by ``||q||^2 + ||x||^2 - 2 q.x``, whose
        rounding grows with the rows' norms, and normalised rows that all point nearly the same
        way (features sharing an offset far above their spread) lie far closer together than
        that rounding: uncentred, their float32 scores were mostly noise."""
        x, _ = self._read(features, fitting=True)
        if not 1 <= self.k <= x.shape[0]:
            raise ValueError(f"k={self.k} needs 1 <= k <= {x.shape[0]} training samples")
        normalised = _normalise(x)
        self.centre_ = normalised.mean(0)
        self.train_features_ = normalised.sub_(self.centre_)
        self._fitted_on(features, x.shape[1])
        return self

    def score_samples(self, features: ArrayT) -> ArrayT:
        """Minus the Euclidean distance to the k-th nearest training feature, shape [N]."""
        return self._scores_by_k(features, (self.k,))[self.k]

    def _scores_by_k(self, features: ArrayT, ks: Sequence[int]) -> dict[int, ArrayT]:
        """The scores at each of ``ks`` from one search at the largest (what :func:`grood.tune`
        shares between points that differ in ``k`` alone), as ``score_samples`` at each."""
        x, kind = self._read(features)
        n_train, k_max = self.train_features_.shape[0], max(ks)
        if k_max > n_train:  # the search would pad with inf: every score -inf
            raise ValueError(f"k={k_max} but {n_train} training features were stored; "
                             "lower k (or refit)")
        q = _normalise(x).to(self.train_features_.device).sub_(self.centre_)
        out = {k: torch.empty(q.shape[0], dtype=q.dtype, device=q.device) for k in ks}
        for r0, r1 in batches(q.shape[0], self.batch_size):
            dist, _ = ops.knn(q[r0:r1], self.train_features_, k_max, backend=self.backend)
            for k, scores in out.items():
                scores[r0:r1] = 0.0 - dist[:, k - 1].sqrt()  # 0.0 - x: no "-0.0"
        return {k: kind.wrap(scores) for k, scores in out.items()}


#: How many units of float64's rounding of the features' largest size each coordinate of a
#: class mean may be off (:class:`Mahalanobis`): within-class covariance eigenvalues below
#: ``D`` times that squared are rounding.
MEAN_ROUNDING_UNITS = 8.0


class Mahalanobis(_Baseline):
    """Minimum Mahalanobis distance to the class means with one shared (tied) covariance.

    The covariance is the within-class scatter over all training samples; its pseudo-inverse
    is applied by whitening (eigenvectors with eigenvalues above ``rcond * max``), so the
    search for the nearest class mean is a plain L2 search in whitened space.

    Args:
        rcond (float): relative cut-off for small eigenvalues of the covariance.
        backend (str): backend of the nearest-mean search.
        batch_size (int): rows per batch while fitting and scoring.
    """

    inputs = "features"
    fit_reads = ("features", "labels")
    name = "Mahalanobis"

    def __init__(self, rcond: float = 1e-10, backend: str = "auto",
                 batch_size: int = 4096) -> None:
        self.rcond = rcond
        self.backend = backend
        self.batch_size = batch_size

    def fit(self, features: ArrayLike, labels: ArrayLike) -> Self:
        """Fit class means and the shared covariance (float64, streamed over batches)."""
        x, _ = self._read(features, fitting=True)
        try:
            rcond = check_real(self.rcond, "rcond")
        except ValueError:
            rcond = -1.0
        if not 0.0 <= rcond < 1.0:
            raise ValueError(f"rcond must be a number in [0, 1), got {self.rcond!r}")
        y = as_labels(labels)
        check_labels(y, "labels", x.shape[0])
        y = y.to(x.device)  # (labels given on another device than the features)
        n, d = x.shape
        n_classes = int(y.max()) + 1
        check_class_count(n_classes - 1, n)  # before the [C, D] sums are allocated
        state = None
        peak = torch.zeros((), dtype=torch.float64, device=x.device)  # (read once, at the end)
        # Second moments about a row of each row's own class (the first one read): about the
        # origin or one point for all, the within-class digits cancel where the classes lie
        # far apart for their spread (1.2e-5 of the largest float64 score at 1e10 : 1 in variance;
        # identical rows in a class gave a covariance of rounding, whitened to -inf scores).
        shifts = torch.zeros((n_classes, d), dtype=torch.float64, device=x.device)
        shifted = torch.zeros(n_classes, dtype=torch.bool, device=x.device)
        scatter = torch.zeros((d, d), dtype=torch.float64, device=x.device)
        for r0, r1 in batches(n, self.batch_size):
            xb, yb = x[r0:r1].to(torch.float64), y[r0:r1]
            state = class_prototypes(xb, yb, n_classes, state=state, in_place=True)
            first = torch.full((n_classes,), r1 - r0, dtype=torch.int64, device=x.device)
            first.scatter_reduce_(0, yb, torch.arange(r1 - r0, device=x.device), "amin")
            new = ~shifted & (first < r1 - r0)
            shifts[new] = xb[first[new]]
            shifted |= new
            zb = xb - shifts[yb]
            scatter += zb.T @ zb
            peak = torch.maximum(peak, xb.abs().max())
        assert state is not None  # (x has rows: fit checked it)
        size = float(peak)
        means = state.prototypes(torch.float64)
        counts = state.counts.to(torch.float64)
        cov = (scatter - ((means - shifts).T * counts) @ (means - shifts)) / n
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        # Below the rounding of the class means (a few units of the features' largest size
        # in each of the d coordinates), an eigenvalue is rounding, not variance.
        floor = d * (MEAN_ROUNDING_UNITS * torch.finfo(torch.float64).eps * size) ** 2
        keep = evals > max(rcond * float(evals.max()), floor)
        if not bool(keep.any()):
            raise ValueError(
                "the features have zero within-class variance" + ("" if float(evals.max()) <= 0
                else f" up to rounding (the within-class covariance's largest eigenvalue, "
                     f"{float(evals.max()):.3g}, is the rounding of features of size "
                     f"{size:.3g})"))
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        whitening = evecs[:, keep] / evals[keep].sqrt()  # [D, r]
        if not bool(torch.isfinite(whitening.to(dt)).all()):
            name = str(dt).removeprefix("torch.")
            raise ValueError(
                f"the within-class covariance has eigenvalues down to "
                f"{float(evals[keep].min()):.3g}, too small for {name}'s whitening (it "
                f"would scale them by more than {name} holds): "
                + ("fit on float64 features (x.double()), or raise rcond"
                   if dt != torch.float64 else "rescale the features, or raise rcond"))
        # Whiten around the overall mean, so float32 scoring does not cancel large offsets.
        center = state.sums.sum(0) / n
        self.center_ = center.to(dt)
        self.whitening_ = whitening.to(dt)
        self.class_means_ = means.to(dt)
        self.whitened_means_ = ((means - center) @ whitening).to(dt)  # [C, r]
        between = ((means - center).T * counts) @ (means - center) / n
        self._fit_background(cov + between, rcond, dt, whitening, means - center)
        self._fitted_on(features, d)
        return self

    def _fit_background(self, cov: Tensor, rcond: float, dt: torch.dtype, whitening: Tensor,
                        centred_means: Tensor) -> None:
        """What a subclass keeps of the training features' overall covariance ``cov`` (about
        their mean), with the class covariance's ``whitening`` [D, r] and the class means
        centred on the overall mean [C, D] (all float64)."""

    def _distance(self, centred: Tensor, nearest: Tensor, idx: Tensor) -> Tensor:
        """Each row's distance, from the rows centred on the training mean, their smallest
        squared whitened distance to a class mean ``nearest`` and that class ``idx``."""
        return nearest

    def score_samples(self, features: ArrayT) -> ArrayT:
        """Minus the smallest squared Mahalanobis distance to a class mean, shape [N]; float64
        when the fit or the features are float64 (as for the other detectors), else float32."""
        dist, _, kind = self._nearest_mean(features)
        return kind.wrap(0.0 - dist)  # 0.0 - x: no "-0.0"

    def predict(self, features: ArrayT) -> ArrayT:
        """The class whose mean is nearest in Mahalanobis distance, shape [N], int64 (the
        lowest class id on exact ties): the classifier this baseline implies, whose accuracy
        OpenOOD reports beside its metrics."""
        _, idx, kind = self._nearest_mean(features)
        return kind.wrap(idx)

    def score_and_predict(self, features: ArrayT) -> tuple[ArrayT, ArrayT]:
        """``(score_samples(features), predict(features))`` from one search, as
        :meth:`grood.GROOD.score_and_predict`."""
        dist, idx, kind = self._nearest_mean(features)
        return kind.wrap(0.0 - dist), kind.wrap(idx)

    def _nearest_mean(self, features: Any) -> tuple[Tensor, Tensor, Any]:
        """Each row's smallest squared Mahalanobis distance to a class mean and that class,
        and the input's kind."""
        x, kind = self._read(features)
        dev = self.whitening_.device
        dt = torch.float64 if torch.float64 in (x.dtype, self.whitening_.dtype) else torch.float32
        center, whitening = self.center_.to(dt), self.whitening_.to(dt)
        means = self.whitened_means_.to(dt)
        dist = torch.empty(x.shape[0], dtype=dt, device=dev)
        idx = torch.empty(x.shape[0], dtype=torch.int64, device=dev)
        for r0, r1 in batches(x.shape[0], self.batch_size):
            xb = x[r0:r1].to(device=dev, dtype=dt)
            # fp32 whatever the program's float32 matmul setting (TF32 on CUDA, bf16 on some
            # CPUs), as grood's own GEMMs in ieee mode.
            with matmul_precision("ieee", dev):
                centred = xb - center
                d, i = ops.knn(centred @ whitening, means, 1, backend=self.backend)
                dist[r0:r1] = self._distance(centred, d[:, 0], i[:, 0])
            idx[r0:r1] = i[:, 0]
        return dist, idx, kind


class RMD(Mahalanobis):
    """Relative Mahalanobis distance: the smallest squared Mahalanobis distance to a class
    mean (one shared covariance, as :class:`Mahalanobis`) minus the squared Mahalanobis
    distance to the training features' overall mean under their overall covariance (the
    "background" Gaussian), negated; ``predict`` is the nearest class mean, as
    :class:`Mahalanobis`'s. Arguments as :class:`Mahalanobis`'s (``rcond`` for both
    covariances).

    The two distances share their largest terms (directions of small variance weigh in both),
    so their difference is not taken from the two: for ``z`` the row less the training mean,
    the nearest class's ``(z - m)' P (z - m) - z' Q z`` (``P``, ``Q`` the two covariances'
    pseudo-inverses, ``m`` the class mean less the training mean) is ``(z - m)' (P - Q) (z -
    m) - 2 z' Q m + m' Q m``, with ``P - Q`` (of rank about the number of classes) formed in
    float64 at the fit: float32 keeps the digits the difference has, for rows far out (where
    ``P`` and ``Q`` weigh alike) and for rows near a class whose spread is small for the
    classes' distances (where ``P`` dwarfs ``Q``, and ``z - m`` is small: taken from ``z``,
    ``z' P z - 2 z' P m + m' P m`` lost digits in proportion to that ratio, 0.32 of the
    largest score at 1e6 : 1 in variance, ``bench/class_spread.py``).

    After ``fit``: also ``background_whitening_`` [D, r0] (``Q``'s), ``contrast_`` [D, k] and
    ``contrast_sign_`` [k] (``P - Q`` as ``contrast_ diag(contrast_sign_) contrast_'``: its
    eigenvectors scaled by the square roots of its eigenvalues' sizes, and their signs),
    ``centred_means_`` [C, D] (``m`` of each class), ``class_directions_`` [D, C] (``Q m``)
    and ``class_offsets_`` [C] (``m' Q m``).
    """

    name = "RMD"

    def _fit_background(self, cov: Tensor, rcond: float, dt: torch.dtype, whitening: Tensor,
                        centred_means: Tensor) -> None:
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        keep = evals > rcond * evals.max().clamp_min(0)
        background = evecs[:, keep] / evals[keep].sqrt()
        self.background_whitening_ = background.to(dt)
        class_precision = whitening @ whitening.T
        background_precision = background @ background.T
        contrast = class_precision - background_precision
        sizes, axes = torch.linalg.eigh((contrast + contrast.T) / 2)
        # what is left below the two terms' rounding is rounding (float64: ~1e-16 of them);
        # their largest eigenvalues are the whitenings' largest squared column norms
        cut = contrast.shape[0] * torch.finfo(torch.float64).eps * max(
            float(whitening.square().sum(0).max()), float(background.square().sum(0).max()))
        kept = sizes.abs() > cut
        self.contrast_ = (axes[:, kept] * sizes[kept].abs().sqrt()).to(dt).contiguous()
        self.contrast_sign_ = sizes[kept].sign().to(dt)
        self.centred_means_ = centred_means.to(dt)
        self.class_directions_ = (background @ (centred_means @ background).T).to(
            dt).contiguous()
        self.class_offsets_ = (centred_means @ background).square().sum(dim=1).to(dt)

    def _distance(self, centred: Tensor, nearest: Tensor, idx: Tensor) -> Tensor:
        dt = centred.dtype
        near = centred - self.centred_means_.to(dt)[idx]  # (z - m: small near a tight class)
        quadratic = ((near @ self.contrast_.to(dt)).square()
                     * self.contrast_sign_.to(dt)).sum(dim=1)
        linear = (centred * self.class_directions_.to(dt).T[idx]).sum(dim=1)
        return quadratic - 2 * linear + self.class_offsets_.to(dt)[idx]


def checked_percentile(value: Any, *, upper_closed: bool) -> float:
    """``percentile`` as a float in (0, 100] (``upper_closed``) or [0, 100), else a clear
    error."""
    try:
        q = check_real(value, "percentile")
    except ValueError:
        q = -1.0
    inside = 0 < q <= 100 if upper_closed else 0 <= q < 100
    if not inside:
        raise ValueError(f"percentile must be a number in "
                         f"{'(0, 100]' if upper_closed else '[0, 100)'}, got {value!r}")
    return q


class _HeadBaseline(_Baseline):
    """A score of the features read through the classifier's last linear layer: given to
    ``fit`` (``weight`` [C, D], ``bias`` [C], an ``nn.Linear``'s), or recovered there by
    least squares from the training features and their ``logits``, which must then be an
    affine function of the features (the recovered layer's residual, a fraction of the
    logits' spread, is ``head_error_``; at most 1 %)."""

    inputs = "features"
    fit_reads: ClassVar[tuple[str, ...]] = ("features", "head")
    batch_size: int

    def _head(self, x: Tensor, logits: Any, weight: Any, bias: Any
              ) -> tuple[Tensor, Tensor, float | None, Any]:
        """The last layer ``(weight, bias)`` in float64 on the features' device, the
        residual it leaves of the logits it was recovered from and the least squares
        (:class:`grood._linear.HeadFit`) it was recovered by (both None: given). Nothing is
        stored: a fit that fails after it leaves the estimator as it was."""
        from grood import _linear

        name = type(self).__name__
        if (weight is None) != (bias is None):
            raise ValueError(f"{name}.fit takes the last layer's weight and bias together "
                             "(an nn.Linear's .weight and .bias)")
        if weight is not None:
            if logits is not None:
                raise ValueError(f"{name}.fit takes the training logits or the last layer's "
                                 "weight and bias, not both")
            w, b = _linear.checked_head(weight, bias, x.shape[1], torch.float64, x.device)
            return w, b, None, None
        if logits is None:
            raise ValueError(
                f"{name} reads the features through the classifier's last linear layer: pass "
                f"it, {name}().fit(features, weight=fc.weight, bias=fc.bias), or the training "
                f"logits, {name}().fit(features, logits=train_logits), which it is recovered "
                "from")
        lg = as_tensor(logits, "logits")[0]
        check_matrix(lg, "logits")
        if lg.shape[0] != x.shape[0]:
            raise ValueError(f"logits has {lg.shape[0]} rows but features have {x.shape[0]}")
        check_finite_rows(lg, "logits")
        fit = _linear.HeadFit()
        for r0, r1 in batches(x.shape[0], self.batch_size):
            fit.add(x[r0:r1], lg[r0:r1].to(x.device))
        w, b = fit.solve()
        err = _linear.relative_residual(
            ((x[r0:r1], lg[r0:r1].to(x.device)) for r0, r1 in batches(x.shape[0],
                                                                      self.batch_size)), w, b)
        if not err <= _linear.HEAD_TOLERANCE:
            raise ValueError(
                f"the logits are not an affine function of these features: the best affine "
                f"fit leaves {err:.2%} of their spread (root mean square; "
                f"{_linear.HEAD_TOLERANCE:.0%} allowed), so {name} cannot recover the last "
                "layer from them. Give the features that layer reads (the penultimate "
                "layer's pooled output), or pass the layer's weight and bias (grood eval: "
                "--head FILE)")
        return w, b, err, fit

    def fit(self, features: ArrayLike, labels: ArrayLike | None = None, *,
            logits: ArrayLike | None = None, weight: Any = None, bias: Any = None) -> Self:
        """Fit on the training features, with their ``logits`` (the last layer is recovered
        from them) or the last layer's ``weight`` and ``bias``; ``labels`` are used by those
        whose ``fit_reads`` name them (SHE). A fit that fails leaves the estimator as it
        was."""
        x, _ = self._read(features, fitting=True)
        checked = self._checked_params(x, labels)
        w, b, err, least_squares = self._head(x, logits, weight, bias)
        dt = compute_dtype(x.dtype)
        fitted = self._fit_more(x, w, b, dt, checked, least_squares)
        self.weight_, self.bias_, self.head_error_ = w.to(dt), b.to(dt), err
        for name, value in fitted.items():
            setattr(self, name, value)
        self._fitted_on(features, x.shape[1])
        return self

    def _checked_params(self, x: Tensor, labels: Any) -> Any:
        """The parameters ``_read`` does not check (and the ``labels``, where they are
        read), checked before a fit's work on the features ``x``, as :meth:`_fit_more`
        takes them."""
        return None

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, checked: Any,
                  least_squares: Any) -> dict[str, Any]:
        """What a baseline learns beyond the layer ``w``, ``b`` (float64) from the training
        features ``x``, by attribute name, in ``dt``: set only once the whole fit is done.
        ``least_squares``: the layer's recovery (:class:`grood._linear.HeadFit`, with the
        features' second moments), or None where the layer was given."""
        return {}

    def score_and_predict(self, features: ArrayT) -> tuple[ArrayT, ArrayT]:
        """The scores and the class the layer's logits pick (as OpenOOD's postprocessor
        returns them), shape [N] each, from one pass."""
        scores, preds, kind = self._scores(features)
        return kind.wrap(scores), kind.wrap(preds)

    def score_samples(self, features: ArrayT) -> ArrayT:
        """One score per row of ``features`` [N, D], shape [N]; higher = in-distribution;
        float64 when the fit or the features are float64, else float32."""
        scores, _, kind = self._scores(features)
        return kind.wrap(scores)

    def _scores(self, features: Any, rows: Any = None, n: int | None = None
                ) -> tuple[Tensor, Tensor, Any]:
        """``(scores, preds, kind)`` of every row of ``features``: ``rows(x, dt)`` (by default
        :meth:`_score_rows`) gives each batch's scores, [B] or [n, B] for ``n`` of them, and
        classes [B] (``x`` on the layer's device, in ``dt``: float64 where the fit or the
        features are); ``kind``, what to return them as."""
        x, kind = self._read(features)
        dev = self.weight_.device
        dt = torch.float64 if torch.float64 in (x.dtype, self.weight_.dtype) else torch.float32
        shape = (x.shape[0],) if n is None else (n, x.shape[0])
        scores = torch.empty(shape, dtype=dt, device=dev)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=dev)
        for r0, r1 in batches(x.shape[0], self.batch_size):
            xb = x[r0:r1].to(device=dev, dtype=dt)
            with rows_from(r0), matmul_precision("ieee", dev):  # fp32, whatever the setting
                got, preds[r0:r1] = (rows or self._score_rows)(xb, dt)
                check_scores_finite(got, self.name)
                scores[..., r0:r1] = got
        return scores, preds, kind

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _logits(self, x: Tensor, dt: torch.dtype, weight: Tensor | None = None) -> Tensor:
        """The last layer's logits of the rows ``x`` in ``dt`` (through ``weight`` in place
        of the layer's, where given: DICE's sparse one)."""
        return x @ (self.weight_ if weight is None else weight).to(dt).T + self.bias_.to(dt)


def check_scores_finite(scores: Tensor, who: str) -> None:
    """Refuse, naming them, the rows whose score (``scores`` [B], or [n, B] for ``n``
    settings) is not finite, though their features are: a step of the score (the logits of
    features shaped or scaled, a norm, a quotient) left the dtype's range at the features'
    size, and an inf or NaN would rank the row first or last without a sign. ``who``: the
    method."""
    bad = ~torch.isfinite(scores).reshape(-1, scores.shape[-1]).all(dim=0)
    if not bool(bad.any()):
        return
    rows = bad.nonzero()[:, 0].tolist()
    first = scores.reshape(-1, scores.shape[-1])[:, rows[0]]
    value = float(first[~torch.isfinite(first)][0])
    fix = ("give float64 features, or features rescaled" if scores.dtype != torch.float64
           else "give features rescaled")
    raise RowsRefusedError(rows, lambda named: (
        f"{who}'s scores of row(s) {named[:10]} are not finite ({value} for the first): a "
        f"step of the score left {scores.dtype}'s range at these features' size; {fix}"))


def _redone(values: Tensor, width: int) -> Tensor:
    """Where a sum of ``width`` products (``values`` [N], float32 or float64) may have lost
    digits to its dtype's range: not finite (a product past its largest value), or no
    larger than what ``width`` products each below its smallest normal number could take
    from a sum of that dtype's precision. The row numbers [R]."""
    info = torch.finfo(values.dtype)
    floor = width * info.tiny / info.eps
    return (~torch.isfinite(values) | (values.abs() <= floor)).nonzero()[:, 0]


def _norms(rows: Tensor) -> Tensor:
    """The Euclidean norm of each of ``rows`` [N, D], in their dtype. Float32 squares of
    entries past about 1e19 overflow and below about 1e-19 underflow (float64's past 1e154
    and below 1e-154), though the norms stay in its range: the rows whose norm that may have
    touched (:func:`_redone`) are taken again at unit scale (:func:`_unit_scaled`, exact, as
    :func:`_normalise` scales them)."""
    norms = rows.norm(dim=1)
    redo = _redone(norms * norms, rows.shape[1])
    if redo.numel():
        scaled, exponent = _unit_scaled(rows[redo])
        norms[redo] = torch.ldexp(scaled.norm(dim=1), exponent[:, 0])
    return norms


def _energy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The energy ``logsumexp`` of each row of ``logits`` and the class it picks."""
    return torch.logsumexp(logits, dim=1), logits.argmax(dim=1)


#: ViM refuses a last layer whose origin ``-pinv(W) b`` lies farther than this many times the
#: training features' spread (root mean square about their mean) from their mean: float64's
#: rounding of the offset, ~1e-16 of it, would reach 1e-10 of the spread, and the residual
#: check (1e-9 of it) could no longer tell rounding from what is left to score by.
VIM_FAR_ORIGIN = 1e6


def default_vim_dim(d: int) -> int:
    """ViM's principal dimension for features of width ``d`` when none is given: 1000 from
    2048 on and 512 from 768 on, as ViM's own benchmark takes them, and half the width
    below (where 512 would leave little or nothing outside the principal space)."""
    return 1000 if d >= 2048 else 512 if d >= 768 else d // 2


class ViM(_HeadBaseline):
    """Virtual-logit matching: the energy of the logits minus ``alpha`` times the norm of the
    feature's part outside the principal space of the training features.

    The principal space is spanned by the ``dim`` leading eigenvectors of the training
    features' second moments about ``origin_ = -pinv(W) b`` (the point the last layer maps
    to zero logits); ``alpha`` = the training set's mean largest logit over its mean
    residual norm. Fitted in float64, streamed over batches.

    Args:
        dim (int, optional): the principal space's dimension, below the feature width
            (default: :func:`default_vim_dim`).
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``dim_``, ``origin_`` [D], ``null_space_`` [D, D - dim_] (an orthonormal
    basis of the rest), ``null_origin_`` (``origin_ @ null_space_``, from float64),
    ``alpha_``, ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "ViM"
    dim_: int  # set by fit (through _fit_more)
    origin_: Tensor
    null_space_: Tensor
    null_origin_: Tensor
    alpha_: float

    def __init__(self, dim: int | None = None, batch_size: int = 4096) -> None:
        self.dim = dim
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``ViM (dim=1000)``."""
        return f"ViM (dim={self.dim_})"

    def _checked_params(self, x: Tensor, labels: Any) -> int:
        d = x.shape[1]
        dim = default_vim_dim(d) if self.dim is None else check_positive_int(self.dim, "dim")
        if not 1 <= dim < d:
            raise ValueError(f"dim={dim}: the principal space must leave part of the {d} "
                             f"feature dimensions outside it (1 <= dim < {d})")
        return dim

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, dim: int,
                  least_squares: Any) -> dict[str, Any]:
        from grood import _linear

        n = x.shape[0]
        # Singular values below the layer's own rounding are no part of it: where its rows
        # sum to (almost) nothing along the bias, the origin is where its logits are all
        # equal, which the softmax cannot tell from zero, not a point its rounding placed.
        # A layer recovered from logits is known to the precision they were held in.
        held = _linear.held_in(w, b) if least_squares is None else least_squares.held
        eps = torch.finfo(held).eps
        origin = -(torch.linalg.pinv(w, rtol=max(w.shape) * eps) @ b)
        if least_squares is not None:  # (its sums hold them: no pass over the rows)
            mean, scatter = least_squares.scatter()
        else:
            mean, scatter = _linear.scatter(x[r0:r1] for r0, r1 in batches(n, self.batch_size))
        offset = mean - origin
        spread = (float(scatter.trace().clamp_min(0)) / n) ** 0.5
        if float(offset.norm()) > VIM_FAR_ORIGIN * spread > 0:
            sv = torch.linalg.svdvals(w)
            raise ValueError(
                f"the last layer's origin -pinv(W) b, where its logits are zero, lies "
                f"{float(offset.norm()):.3g} from the training features' mean, "
                f"{float(offset.norm()) / spread:.2g} times their spread (root mean square): "
                "too far for ViM's principal space about it to be told from rounding. A "
                "combination of the logits all but constant over the features and far from "
                f"zero puts it there (the weight's singular values run {float(sv[0]):.3g} to "
                f"{float(sv[-1]):.3g}): check that the layer is the classifier's last, as "
                "an nn.Linear holds it (weight [C, D], bias [C]), or its raw logits")
        null = _linear.least_moments_null(scatter, offset, n, dim)
        null_origin = origin @ null
        residual = whole = size = largest = 0.0
        for r0, r1 in batches(n, self.batch_size):
            xb = x[r0:r1].to(torch.float64)
            residual += float((xb @ null - null_origin).norm(dim=1).sum())
            whole += float((xb - mean).norm(dim=1).sum())
            size += float(xb.norm(dim=1).sum())
            largest += float((xb @ w.T + b).amax(dim=1).sum())
        # One row, or one row repeated (up to the rounding of their mean): no spread to find a
        # space in, and the residual left is rounding.
        if not whole > 8 * torch.finfo(torch.float64).eps * size:
            rows = "one training feature row" if n == 1 else \
                f"{n} copies of one training feature row"
            raise ValueError(f"ViM was given {rows}: its principal space about their mean "
                             "needs rows that differ")
        if not residual > 1e-9 * whole:  # (float64 rounding leaves ~1e-15 of it)
            few = (f" ({n} training rows span at most {n - 1} directions about their mean: "
                   f"dim must stay below that, or give more rows)" if n - 1 <= dim else "")
            raise ValueError(f"the training features lie inside their principal space of "
                             f"dim={dim} (all but {residual / max(whole, 1e-300):.1e} of their "
                             f"spread about their mean): nothing is left to score by; lower "
                             f"dim{few}")
        return {"dim_": dim, "origin_": origin.to(dt), "null_space_": null.to(dt).contiguous(),
                "null_origin_": null_origin.to(dt), "alpha_": largest / residual}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        energy, pred = _energy(self._logits(x, dt))
        # (x - origin) @ null as x @ null less the origin's part: an origin far from the
        # features would take their digits with it in float32
        residual = x @ self.null_space_.to(dt) - self.null_origin_.to(dt)
        return energy - self.alpha_ * _norms(residual), pred


class _PercentileBaseline(_HeadBaseline):
    """A last-layer baseline with one ``percentile`` parameter, in [0, 100) (or (0, 100]
    where ``upper_closed``), which its display name shows: the one fitted with
    (``percentile_``) where the fit learns from it, else the one it scores with now."""

    percentile: float
    upper_closed: ClassVar[bool] = False

    @property
    def display_name(self) -> str:
        """``ReAct (p90)``."""
        q = getattr(self, "percentile_", None)
        return f"{self.name} (p{self._checked_percentile() if q is None else q:g})"

    def _checked_params(self, x: Tensor, labels: Any) -> float:
        return self._checked_percentile()

    def _checked_percentile(self) -> float:
        """``percentile`` as a float, checked."""
        return checked_percentile(self.percentile, upper_closed=self.upper_closed)


class ReAct(_PercentileBaseline):
    """Rectified activations: the energy ``logsumexp`` of the logits of the features clipped
    from above at the ``percentile``-th percentile of every entry of the training features.

    The percentile is exact (a radix selection over the entries' bits, streamed, never a
    sort or a copy of the N x D entries), interpolated as ``np.percentile`` does in float64,
    and rounded to the features' dtype (float32 unless float64), as numpy 2.4 gives it (numpy
    2.0 to 2.3 interpolate float32 entries in float32, a few ulps away).

    Args:
        percentile (float): in (0, 100]; 90 in the ReAct paper.
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``clip_``, ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "ReAct"
    upper_closed = True
    clip_: float  # set by fit (through _fit_more)
    percentile_: float

    def __init__(self, percentile: float = 90.0, batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.batch_size = batch_size

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, q: float,
                  least_squares: Any) -> dict[str, Any]:
        from grood import _linear

        n, d = x.shape

        def chunks() -> Any:
            return (x[r0:r1] for r0, r1 in batches(n, max(1, (1 << 22) // d)))

        clip = float(torch.tensor(_linear.percentile(chunks, n * d, q, x.dtype), dtype=dt))
        _warn_if_clipped_whole(chunks, n * d, clip, q)
        return {"clip_": clip, "percentile_": q}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        return _energy(self._logits(x.clamp(max=self.clip_), dt))


def _warn_if_clipped_whole(chunks: Any, entries: int, clip: float, q: float) -> None:
    """Warn where ReAct's ``clip`` (the ``q``-th percentile of the ``entries`` training
    feature entries ``chunks()`` yields) is their smallest value: every training row is then
    clipped to one vector, the same score for them all (on ReLU features, a percentile no
    larger than their share of zeros)."""
    if min(float(c.min()) for c in chunks()) < clip:
        return
    held = sum(int((c <= clip).sum()) for c in chunks())
    warnings.warn(
        f"ReAct's clip, the {q:g}th percentile of the training features' entries, is "
        f"{clip:g}, their smallest value ({held / entries:.1%} of the entries hold it): "
        "every training row is clipped to the same vector, so all of them score alike, and "
        f"a row scores apart only by its entries below {clip:g}. A percentile above that "
        "share clips only the largest entries (90 in the ReAct paper)", UserWarning,
        stacklevel=user_stacklevel())


class GradNorm(_HeadBaseline):
    """The L1 norm of the gradient, with respect to the last layer's weight, of the
    cross-entropy between the softmax of ``logits / T`` and the uniform distribution (summed
    over the classes, as GradNorm's code does), in closed form: ``||C p - 1||_1 ||h||_1 / T``
    for the softmax ``p`` over C classes and the feature ``h`` (the gradient is the outer
    product ``(C p - 1) h^T / T``), never a per-sample backward pass.

    Args:
        temperature (float): softmax temperature T (1 in the paper).
        batch_size (int): rows per batch while scoring.

    After ``fit``: ``weight_``, ``bias_``, ``head_error_`` (the training features are read
    only to recover the layer from ``logits``).
    """

    name = "GradNorm"
    score_params = ("temperature",)
    fit_reads = ("head",)  # (the features only for the layer's recovery, and their width)

    def __init__(self, temperature: float = 1.0, batch_size: int = 4096) -> None:
        self.temperature = temperature
        self.batch_size = batch_size

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = self._logits(x, dt)
        # ||C p - 1||_1 = 2 sum (1 - C p)^+ (the entries sum to 0), those below 1/C, each
        # from expm1: exact where p is nearly uniform, where C p - 1 cancels
        spread = 2 * (_uniform_excess(lg / self.temperature) * -lg.shape[1]).clamp_min(0).sum(1)
        return spread * x.abs().sum(dim=1) / self.temperature, lg.argmax(dim=1)


#: The ratio ``s1 / s2`` of ASH-S's and SCALE's scale ``exp(s1 / s2)`` past which a float32
#: row's sums are taken again in float64: the exponential multiplies their rounding by the
#: ratio (42 times float32's rounding of the score at ASH's p99 on D = 2,048, 5 times so).
RATIO_RESUMMED = 4.0


def _sums_in_float64(rows: Tensor) -> bool:
    """Whether :func:`_ratio` sums every row of ``rows`` in float64 (off the CPU), rather
    than in float32 with the large ratios' rows summed again."""
    return rows.device.type != "cpu"


def _ratio(rows: Tensor, kept: Tensor) -> Tensor:
    """``s1 / s2`` [N, 1] in float64, ``s1`` each row of ``rows`` [N, D] summed, ``s2`` each
    row of ``kept`` (its largest entries); 0 where ``s2`` is not above 0 (nothing kept: a
    scale of 1). Off the CPU every row is summed in float64, where choosing rows to sum again
    would read the host once a batch (the float64 sums' cost there is not measured); on the
    CPU, where a float64 sum of float32 entries costs 20 times a float32 one, in the rows'
    dtype, and again in float64 for the float32 rows whose ratio passes
    :data:`RATIO_RESUMMED` or whose sums left float32's range."""
    wide = torch.float64 if _sums_in_float64(rows) else None
    total, part = (t.sum(dim=1, keepdim=True, dtype=wide).double() for t in (rows, kept))
    if wide is None and rows.dtype != torch.float64:
        again = ~((total / part.where(part > 0, 1.0)).abs() <= RATIO_RESUMMED) | \
            ~torch.isfinite(part)
        if bool(again.any()):
            at = again.nonzero()[:, 0]
            total[at] = rows[at].sum(dim=1, keepdim=True, dtype=torch.float64)
            part[at] = kept[at].sum(dim=1, keepdim=True, dtype=torch.float64)
    return (total / part.where(part > 0, 1.0)).where(part > 0, 0.0)


def _exp_scaled(values: Tensor, whole: Tensor, kept: Tensor, who: str, q: float) -> Tensor:
    """``values`` [N, D] times ``exp(s1 / s2)`` row by row, as ASH-S and SCALE scale them
    (``s1``: the sum of each feature row of ``whole``, ``s2``: of ``kept``, its largest
    ``100 - q`` % of entries; :func:`_ratio`); a row whose ``s2`` is not above 0 (all zero)
    is left as it is, where the ratio would make it NaN, and a row scaled beyond the dtype's
    range is refused, naming it (``who``: the method)."""
    scale = torch.exp(_ratio(whole, kept))
    shaped = values * scale.to(values.dtype)
    bad = ~torch.isfinite(shaped).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        factor, top = float(scale[rows[0], 0]), float(values[rows[0]].abs().max())
        if top * 1e3 <= torch.finfo(values.dtype).max:  # (the factor took it there)
            why = f"their largest {100 - q:g} % of entries hold a small part of their sum"
            fix = "lower percentile, or give float64 features"
        else:
            why, fix = f"an entry of {top:.3g}, near the dtype's largest value", \
                "give float64 features"
        raise RowsRefusedError(rows, lambda named: (
            f"{who} scales row(s) {named[:10]} by exp(s1 / s2) = {factor:.3g} beyond "
            f"{values.dtype}'s range ({why}): {fix}"))
    return shaped


#: ASH's ways of shaping the entries it keeps: scaled (by exp of the sum's ratio), binarised
#: (each set to the row's mean over the kept), or pruned alone.
ASH_VARIANTS = ("s", "b", "p")


class ASH(_PercentileBaseline):
    """Activation shaping: each feature row keeps its largest ``100 - percentile`` % of
    entries (the others set to 0), shaped by ``variant``, and the energy ``logsumexp`` of the
    logits of the result scores it.

    ``"s"`` (ASH-S) multiplies the kept entries by ``exp(s1 / s2)``, the row's sum over the
    sum of what it kept; ``"b"`` (ASH-B) sets each kept entry to ``s1 / k``; ``"p"`` (ASH-P)
    prunes alone. A row keeps ``k = D - round(D * percentile / 100)`` entries (at least 1);
    of entries that tie at the cut, the lower-indexed ones are kept, so the result does not
    depend on a top-k's order. ASH is meant for non-negative (post-ReLU) features: under
    ASH-S a row whose kept entries do not sum above 0 (an all-zero row) is left pruned,
    where ``s1 / s2`` would make it NaN, and a row scaled beyond the features' dtype is
    refused, naming it (float64 features reach far further).

    Args:
        percentile (float): in [0, 100); 90 for ImageNet-1k in the ASH paper.
        variant (str): ``"s"``, ``"b"`` or ``"p"``.
        batch_size (int): rows per batch while scoring.

    After ``fit``: ``weight_``, ``bias_``, ``head_error_`` (the training features are read
    only to recover the layer from ``logits``).
    """

    name = "ASH"
    score_params = ("percentile", "variant")
    fit_reads = ("head",)  # (the features only for the layer's recovery, and their width)

    def __init__(self, percentile: float = 90.0, variant: str = "s",
                 batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.variant = variant
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``ASH-S (p90)``: its variant and percentile (the ones it scores with now)."""
        return f"ASH-{self.variant.upper()} (p{self._checked_percentile():g})"

    def _checked_percentile(self) -> float:
        """``percentile`` as a float, after checking it and ``variant``."""
        q = super()._checked_percentile()
        if self.variant not in ASH_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, ASH_VARIANTS))} "
                             f"(ASH-S, ASH-B, ASH-P), got {self.variant!r}")
        return q

    def shape(self, x: Tensor) -> Tensor:
        """The rows of ``x`` [N, D] as ASH shapes them (a new tensor)."""
        d = x.shape[1]
        k = max(1, d - round(d * self._checked_percentile() / 100))
        # the k largest of each row, ties to the lower index: a stable sort, descending
        cols = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
        total = x.sum(dim=1, keepdim=True)
        if self.variant == "b":
            return torch.zeros_like(x).scatter_(1, cols, (total / k).expand(-1, k))
        kept = torch.zeros_like(x).scatter_(1, cols, x.gather(1, cols))
        if self.variant == "p":
            return kept
        return _exp_scaled(kept, x, kept, "ASH-S", self._checked_percentile())

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        return _energy(self._logits(self.shape(x), dt))


def _feature_moments(x: Tensor, least_squares: Any, batch_size: int) -> tuple[Tensor, float]:
    """The training features' mean [D] and mean squared row norm, in float64: from the
    layer's least squares where it was recovered (its sums about its shift hold them),
    else summed over the rows in one pass."""
    n = x.shape[0]
    if least_squares is not None:
        fit = least_squares  # sums of xc = x - shift: sx = sum xc, xx = sum xc xc^T
        shift = fit.shift
        squares = float(fit.xx.trace() + 2 * shift @ fit.sx + n * shift @ shift)
        return fit.sx / n + shift, squares / n
    total = x.new_zeros(x.shape[1], dtype=torch.float64)
    squares = 0.0
    for r0, r1 in batches(n, batch_size):
        xb = x[r0:r1].to(torch.float64)
        total += xb.sum(dim=0)
        squares += float((xb * xb).sum())
    return total / n, squares / n


class SHE(_HeadBaseline):
    """Simplified Hopfield energy: the inner product of a feature row with the stored
    pattern of the class the last layer predicts for it, each pattern the mean of the
    training features of that class the layer classifies correctly (Zhang et al., ICLR
    2023). Every class needs such a row.

    Args:
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``patterns_`` [C, D], ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "SHE"
    fit_reads = ("features", "labels", "head")
    patterns_: Tensor  # set by fit (through _fit_more)

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    def fit(self, features: ArrayLike, labels: ArrayLike, *,  # type: ignore[override]
            logits: ArrayLike | None = None, weight: Any = None, bias: Any = None) -> Self:
        """Fit the patterns on the training features and ``labels`` (required), with the
        training ``logits`` (the last layer is recovered from them) or the layer's
        ``weight`` and ``bias``. A fit that fails leaves the estimator as it was."""
        return super().fit(features, labels, logits=logits, weight=weight, bias=bias)

    def _checked_params(self, x: Tensor, labels: Any) -> Tensor:
        if labels is None:
            raise TypeError("SHE.fit needs the training labels: its patterns are the mean "
                            "features of each class's correctly classified rows")
        y = as_labels(labels)
        check_labels(y, "labels", x.shape[0])
        return y.to(x.device)

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, y: Tensor,
                  least_squares: Any) -> dict[str, Any]:
        c, d = w.shape
        top = int(y.max())
        if top >= c:
            raise ValueError(f"labels hold class id {top}, but the last layer has {c} classes")
        sums = x.new_zeros((c, d), dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.int64, device=x.device)
        wd, bd = w.to(dt), b.to(dt)
        for r0, r1 in batches(x.shape[0], self.batch_size):
            xb, yb = x[r0:r1].to(dt), y[r0:r1]
            with matmul_precision("ieee", x.device):  # as scoring predicts them
                right = (xb @ wd.T + bd).argmax(dim=1) == yb
            sums.index_add_(0, yb[right], xb[right].to(torch.float64))
            counts += torch.bincount(yb[right], minlength=c)
        empty = (counts == 0).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(f"{len(empty)} class(es), {empty[:10]}"
                             f"{' and more' if len(empty) > 10 else ''}, have no training row "
                             "the last layer classifies correctly, so SHE has no pattern to "
                             "store for them")
        return {"patterns_": (sums / counts[:, None]).to(dt)}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        pred = self._logits(x, dt).argmax(dim=1)
        scores = (x * self.patterns_.to(dt)[pred]).sum(dim=1)
        # The score goes with the square of the features' scale: float32 rows far from unit
        # scale are summed again in float64, and refused where float32 cannot hold them.
        if dt != torch.float64:
            redo = _redone(scores, x.shape[1])
            if redo.numel():
                rows = x[redo].to(torch.float64)
                patterns = self.patterns_.to(torch.float64)[pred[redo]]
                exact = (rows * patterns).sum(dim=1)
                _check_she_range(exact, rows, patterns, redo, dt)
                scores[redo] = exact.to(dt)
        return scores, pred


def _check_she_range(scores: Tensor, x: Tensor, patterns: Tensor, rows: Tensor,
                     dt: torch.dtype) -> None:
    """Refuse the ``rows`` [R] (of a batch) whose SHE score (``scores`` [R] of their features
    ``x`` and ``patterns``, all float64) ``dt`` cannot hold: past its largest value, or
    below its normal range where every term of the inner product is (it would keep few of
    their digits or none)."""
    info = torch.finfo(dt)
    size = scores.abs()
    over = size > info.max
    small = ((size < info.tiny) & (size > 0)).nonzero()[:, 0]
    under = torch.zeros_like(over)
    if small.numel():  # (a small sum of larger terms is held as well as any)
        under[small] = (x[small].abs() * patterns[small].abs()).sum(1) < info.tiny
    bad = (over | under).nonzero()[:, 0]
    if not bad.numel():
        return
    value, past = float(scores[bad[0]]), bool(over[bad[0]])
    where = (f"past {dt}'s largest value, {info.max:.3g}" if past
             else f"below {dt}'s normal range, {info.tiny:.3g}, where it keeps few digits")
    raise RowsRefusedError(rows[bad].tolist(), lambda named: (
        f"SHE's scores of row(s) {named[:10]} (the feature's inner product with its class "
        f"pattern, {value:.3g} for the first) lie {where}: they go with the square of the "
        "features' scale; give float64 features, or features rescaled"))


class DICE(_PercentileBaseline):
    """Directed sparsification: the energy ``logsumexp`` of the logits of a last layer that
    keeps only the weights whose contribution on the training set (the weight times the
    mean training feature it multiplies) is above the ``percentile``-th percentile of all
    C x D contributions (Sun & Li, ECCV 2022). Contributions and their percentile (exact,
    interpolated as ``np.percentile``) are computed in float64.

    Args:
        percentile (float): in [0, 100): the share of weights dropped (90, as OpenOOD's
            configuration).
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``masked_weight_`` [C, D], ``threshold_``, ``mean_`` [D], ``weight_``,
    ``bias_``, ``head_error_``.
    """

    name = "DICE"
    masked_weight_: Tensor  # set by fit (through _fit_more)
    percentile_: float

    def __init__(self, percentile: float = 90.0, batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.batch_size = batch_size

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, q: float,
                  least_squares: Any) -> dict[str, Any]:
        from grood import _linear

        mean, _ = _feature_moments(x, least_squares, self.batch_size)
        contribution = w * mean
        rows = max(1, (1 << 22) // contribution.shape[1])
        threshold = _linear.percentile(lambda: contribution.split(rows), contribution.numel(),
                                       q, torch.float64)
        masked = torch.where(contribution > threshold, w, 0.0)
        return {"masked_weight_": masked.to(dt), "threshold_": threshold,
                "mean_": mean.to(dt), "percentile_": q}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        return _energy(self._logits(x, dt, self.masked_weight_))


#: fDBD's normalisers: the feature's distance to the training features' mean (the paper's)
#: or to the origin (its norm; OpenOOD's alternative).
FDBD_NORMALIZERS = ("mean", "origin")


class FDBD(_HeadBaseline):
    """Fast decision-boundary distance: the mean, over the classes ``c`` other than the
    predicted ``k``, of the feature's distance to the last layer's boundary between them,
    ``(l_k - l_c) / ||w_k - w_c||``, divided by the feature's distance to the training
    features' mean (``normalizer="mean"``, Liu & Qin, ICML 2024) or by its norm
    (``"origin"``). The C x C weight-row distances are computed once, in float64, exactly
    where the Gram form would cancel; a feature within rounding of the point it is measured
    from is taken at ``floor_`` from it, ``eps`` times the training features' root mean
    square norm (so scores stay finite).

    Args:
        normalizer (str): ``"mean"`` or ``"origin"``.
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``boundary_norms_`` [C, C] (``||w_k - w_c||``, 1 on the diagonal),
    ``centre_`` [D], ``floor_``, ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "fDBD"
    boundary_norms_: Tensor  # set by fit (through _fit_more)
    centre_: Tensor
    floor_: float

    def __init__(self, normalizer: str = "mean", batch_size: int = 4096) -> None:
        self.normalizer = normalizer
        self.batch_size = batch_size

    def _checked_params(self, x: Tensor, labels: Any) -> str:
        if self.normalizer not in FDBD_NORMALIZERS:
            raise ValueError(f"normalizer must be one of "
                             f"{', '.join(map(repr, FDBD_NORMALIZERS))}, got "
                             f"{self.normalizer!r}")
        return str(self.normalizer)

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, normalizer: str,
                  least_squares: Any) -> dict[str, Any]:
        c = w.shape[0]
        if c < 2:
            raise ValueError("fDBD measures distances to the boundaries between classes: the "
                             "last layer has 1 class")
        w = w.to(dt).to(torch.float64)  # the weights the scores read
        sq = (w * w).sum(dim=1)
        norms = torch.empty((c, c), dtype=dt, device=w.device)
        for r0, r1 in batches(c, max(1, (1 << 22) // c)):  # row blocks: C x C float64 is big
            scale = sq[r0:r1, None] + sq[None, :]
            d2 = (scale - 2 * (w[r0:r1] @ w.T)).clamp_min(0)
            diagonal = (torch.arange(r1 - r0), torch.arange(r0, r1))
            d2[diagonal] = 1.0  # (no boundary; its gap is 0)
            close = d2 <= 1e-6 * scale
            close[diagonal] = False
            # Where rows are close the Gram form loses their difference: recompute exactly.
            for i, j in close.nonzero().tolist():
                d2[i, j] = ((w[r0 + i] - w[j]) ** 2).sum()
                if d2[i, j] == 0:
                    raise ValueError(f"classes {r0 + i} and {j} have the same weights in the "
                                     "last layer: there is no boundary between them to "
                                     "measure a distance to")
            norms[r0:r1] = d2.sqrt()
        mean, mean_square = _feature_moments(x, least_squares, self.batch_size)
        centre = mean if normalizer == "mean" else torch.zeros_like(mean)
        floor = max(torch.finfo(dt).eps * mean_square ** 0.5, torch.finfo(dt).tiny)
        return {"boundary_norms_": norms.to(dt), "centre_": centre.to(dt), "floor_": floor}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = self._logits(x, dt)
        top, pred = lg.max(dim=1)
        distances = ((top[:, None] - lg) / self.boundary_norms_.to(dt)[pred]).sum(dim=1)
        spread = _norms(x - self.centre_.to(dt)).clamp_min(self.floor_)
        return distances / ((lg.shape[1] - 1) * spread), pred


class SCALE(_PercentileBaseline):
    """Activation scaling: the energy ``logsumexp`` of the logits of each feature row
    multiplied, whole, by ``exp(s1 / s2)``, its sum over the sum of its largest
    ``100 - percentile`` % of entries (Xu et al., ICLR 2024): ASH-S's scale without its
    pruning. As there, a row of ``k = D - round(D * percentile / 100)`` entries (at least
    1) whose largest do not sum above 0 is left unscaled, and a row scaled beyond the
    features' dtype is refused.

    Args:
        percentile (float): in [0, 100); 85, as OpenOOD's configuration.
        batch_size (int): rows per batch while scoring.

    After ``fit``: ``weight_``, ``bias_``, ``head_error_`` (the training features are read
    only to recover the layer from ``logits``).
    """

    name = "SCALE"
    score_params = ("percentile",)
    fit_reads = ("head",)  # (the features only for the layer's recovery, and their width)

    def __init__(self, percentile: float = 85.0, batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.batch_size = batch_size

    def shape(self, x: Tensor) -> Tensor:
        """The rows of ``x`` [N, D] as SCALE scales them (a new tensor)."""
        q = self._checked_percentile()
        d = x.shape[1]
        k = max(1, d - round(d * q / 100))
        return _exp_scaled(x, x, torch.topk(x, k, dim=1).values, "SCALE", q)

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        return _energy(self._logits(self.shape(x), dt))


#: The most entries of one block of NNGuide's inner products (rows scored x bank rows).
GUIDANCE_ENTRIES = 1 << 24


class NNGuide(_HeadBaseline):
    """Nearest-neighbour guidance: the energy ``logsumexp`` of the logits times the mean of
    the ``k`` largest inner products of the L2-normalised feature with a bank of training
    features, each L2-normalised and scaled by its own energy (Park et al., ICCV 2023). The
    bank is a random ``bank_fraction`` of the training rows, drawn with ``seed`` (by
    default 1 %, with ``k=100``, as the paper on ImageNet-1k and OpenOOD's configuration),
    searched exactly, in blocks of bank rows. It is a copy of those rows: 105 MB of float32
    for 1 % of ImageNet-1k's 1.28 M at D = 2048 (10.5 GB for all of them), and scoring
    costs 2 M D multiply-adds a row for a bank of M.

    Args:
        k (int): how many of the largest inner products are averaged.
        bank_fraction (float): in (0, 1]: the share of the training rows in the bank.
        seed (int): seed of the bank's draw.
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``bank_`` [M, D], ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "NNGuide"
    score_params = ("k",)
    bank_: Tensor  # set by fit (through _fit_more)

    def __init__(self, k: int = 100, bank_fraction: float = 0.01, seed: int = 0,
                 batch_size: int = 4096) -> None:
        self.k = k
        self.bank_fraction = bank_fraction
        self.seed = seed
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``NNGuide (k=100)``."""
        return f"NNGuide (k={self.k})"

    def _checked_params(self, x: Tensor, labels: Any) -> tuple[float, int]:
        return (check_fraction(self.bank_fraction, "bank_fraction"),
                check_integer(self.seed, "seed"))

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype,
                  checked: tuple[float, int], least_squares: Any) -> dict[str, Any]:
        fraction, seed = checked
        n = x.shape[0]
        m = n if fraction == 1.0 else max(1, round(n * fraction))
        if m < self.k:
            raise ValueError(f"the bank holds {m} training row(s) (bank_fraction="
                             f"{fraction:g} of {n}), fewer than k={self.k}: raise "
                             "bank_fraction or lower k")
        rows = (None if m == n else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed))[:m].sort().values)
        bank = torch.empty((m, x.shape[1]), dtype=dt, device=x.device)
        wd, bd = w.to(dt), b.to(dt)
        for r0, r1 in batches(m, self.batch_size):
            xb = (x[r0:r1] if rows is None else x[rows[r0:r1].to(x.device)]).to(dt)
            with matmul_precision("ieee", x.device):  # as scoring computes the energies
                energy = torch.logsumexp(xb @ wd.T + bd, dim=1)
            bank[r0:r1] = _normalise(xb) * energy[:, None]
        return {"bank_": bank}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        energy, pred, top = self._guidance(x, dt, self.k)
        return top.mean(dim=1) * energy, pred

    def _scores_by_k(self, features: ArrayT, ks: Sequence[int]) -> dict[int, ArrayT]:
        """The scores at each of ``ks`` from one pass over the bank keeping the largest k's
        inner products (what :func:`grood.tune` shares between points that differ in ``k``
        alone), as ``score_samples`` at each."""
        k_max = max(ks)

        def rows(x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
            energy, pred, top = self._guidance(x, dt, k_max)
            return torch.stack([top[:, :k].mean(dim=1) * energy for k in ks]), pred

        scores, _, kind = self._scores(features, rows, len(ks))
        return {k: kind.wrap(scores[j]) for j, k in enumerate(ks)}

    def _guidance(self, x: Tensor, dt: torch.dtype, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The energy of each row of ``x``, its class, and its ``k`` largest inner products
        with the bank [rows, k], largest first."""
        if k > self.bank_.shape[0]:  # (k raised after the fit)
            raise ValueError(f"k={k} is more than the {self.bank_.shape[0]} rows of the "
                             "bank fitted: lower k, or fit again")
        energy, pred = _energy(self._logits(x, dt))
        z = _normalise(x)
        top = z.new_empty((x.shape[0], 0))
        block = max(1, GUIDANCE_ENTRIES // max(1, x.shape[0]))  # bank rows per product
        for r0, r1 in batches(self.bank_.shape[0], block):
            inner = z @ self.bank_[r0:r1].to(dt).T
            merged = torch.cat([top, inner], dim=1)
            top = merged.topk(min(k, merged.shape[1]), dim=1).values
        return energy, pred, top


#: The baselines by the names ``grood eval --baselines`` and :func:`fit_baselines` give
#: them: name -> (class, what it scores).
BY_NAME: dict[str, tuple[type[_Baseline], str]] = {
    "msp": (MSP, "logits"), "maxlogit": (MaxLogit, "logits"), "energy": (Energy, "logits"),
    "gen": (GEN, "logits"), "klm": (KLM, "logits"), "knn": (KNN, "features"),
    "mahalanobis": (Mahalanobis, "features"), "rmd": (RMD, "features"), "vim": (ViM, "features"),
    "react": (ReAct, "features"), "gradnorm": (GradNorm, "features"), "ash": (ASH, "features"),
    "she": (SHE, "features"), "dice": (DICE, "features"), "fdbd": (FDBD, "features"),
    "scale": (SCALE, "features"), "nnguide": (NNGuide, "features")}
#: The names of those that read the features through the classifier's last layer.
LAST_LAYER_NAMES = tuple(n for n, (cls, _) in BY_NAME.items() if issubclass(cls, _HeadBaseline))


#: Baselines :data:`BY_NAME` leaves out, by the name ``grood eval --baselines`` would give
#: them, and why a training set cannot feed them: ODIN and RankFeat score the model's
#: inputs (:mod:`grood.model_baselines`), TempScale is fitted on held-out logits.
_THROUGH_MODEL = ("{cls} scores the model's inputs, which {{what}} do not hold: use grood.{cls} "
                  "in Python, alone (score_model) or beside GROOD in grood.evaluate_model")
NOT_BY_NAME = {
    **{cls.lower(): _THROUGH_MODEL.format(cls=cls) for cls in ("ODIN", "RankFeat")},
    "tempscale": "TempScale's temperature is fitted on held-out logits and labels (a "
                 "validation set), not on the rows the model was trained on: fit "
                 "grood.TempScale().fit(val_logits, val_labels) in Python and give it to "
                 "grood.evaluate"}


def not_by_name(name: str, what: str) -> str:
    """Why ``what`` (feature files, training arrays) cannot feed the baseline ``name`` (a key
    of :data:`NOT_BY_NAME`)."""
    return NOT_BY_NAME[name.lower()].format(what=what)


def learned_from(cls: type[_Baseline], *, head_given: bool) -> tuple[str, ...]:
    """The training arrays ``cls.fit`` learns from: its ``fit_reads``, with the last layer
    (``"head"``) as the training features and logits it is recovered from unless
    ``head_given``. Empty: any array of the right width fits it."""
    out: list[str] = []
    for read in cls.fit_reads:
        out += ([] if head_given else ["features", "logits"]) if read == "head" else [read]
    return tuple(dict.fromkeys(out))


def fitting_inputs(cls: type[_Baseline], *, head_given: bool) -> tuple[str, ...]:
    """The arrays ``cls.fit`` is given (by :func:`fit_baselines`): what it learns from
    (:func:`learned_from`), or where that is nothing, the ``inputs`` whose width it
    records."""
    return learned_from(cls, head_given=head_given) or (cls.inputs,)


def fit_baselines(names: Any, *, features: Any = None, labels: Any = None, logits: Any = None,
                  weight: Any = None, bias: Any = None,
                  options: dict[str, dict[str, Any]] | None = None) -> list[_Baseline]:
    """The baselines ``names`` (as :data:`BY_NAME` and ``grood eval --baselines`` name them),
    fitted on one training set, in that order, for :func:`grood.evaluate`'s ``baselines``,
    each on what its ``fit_reads`` name: those of logits on ``logits`` (KLM learns from
    them), KNN on ``features``, Mahalanobis and RMD on ``features`` and ``labels``, and the
    last-layer ones (ViM, ReAct, GradNorm, ASH, SHE, DICE, fDBD, SCALE, NNGuide) on
    ``features`` (SHE with ``labels``) and the layer's ``weight`` and ``bias`` or, without
    them, ``logits`` to recover it from. ``options``: constructor arguments by name (``{"knn":
    {"k": 50}}``). What a baseline needs and was not given is named before any is
    fitted."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    options = dict(options or {})
    unknown = [n for n in [*names, *options] if n not in BY_NAME]
    if unknown and str(unknown[0]).lower() in NOT_BY_NAME:
        raise ValueError(not_by_name(str(unknown[0]), "training arrays"))
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; the names are "
                         f"{', '.join(BY_NAME)}")
    stray = [n for n in options if n not in names]
    if stray:
        raise ValueError(f"options for {stray[0]!r}, which is not among the baselines asked "
                         "for")
    arrays = {"features": features, "labels": labels, "logits": logits, "weight": weight,
              "bias": bias}
    for name in names:
        check_fitting_inputs(BY_NAME[name][0], f"the {name} baseline", **arrays)
    return [fit_baseline(BY_NAME[name][0](**options.get(name, {})), **arrays)
            for name in names]


def check_fitting_inputs(cls: type[_Baseline], who: str, *, features: Any = None,
                         labels: Any = None, logits: Any = None, weight: Any = None,
                         bias: Any = None) -> None:
    """Refuse, naming ``who``, a training set that lacks what ``cls.fit`` is given
    (:func:`fitting_inputs`: the last layer is the ``weight`` and ``bias`` where given, else
    recovered from ``logits``)."""
    given = {"features": features, "labels": labels, "logits": logits}
    needs = fitting_inputs(cls, head_given=weight is not None or bias is not None)
    missing = [k for k in needs if given[k] is None]
    if missing:
        raise ValueError(f"{who} is fitted on {' and '.join(needs)}: give "
                         f"{' and '.join(missing)}"
                         + (" (or the last layer's weight and bias)"
                            if "logits" in missing and "head" in cls.fit_reads else ""))


def fit_baseline(est: _Baseline, *, features: Any = None, labels: Any = None,
                 logits: Any = None, weight: Any = None, bias: Any = None) -> _Baseline:
    """``est`` fitted on one training set, each array given to ``fit`` where its
    ``fit_reads`` name it (as :func:`fit_baselines` fits them; check the arrays first with
    :func:`check_fitting_inputs`); returns ``est``."""
    given = {"features": features, "labels": labels, "logits": logits}
    reads = est.fit_reads
    head = {"weight": weight, "bias": bias} if weight is not None or bias is not None else None
    more = [labels] if "labels" in reads else []
    fit: Any = est.fit  # type: ignore[attr-defined]  # (each baseline's own)
    return fit(given[est.inputs], *more,
               **((head or {"logits": logits}) if "head" in reads else {}))
