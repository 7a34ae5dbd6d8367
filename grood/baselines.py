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
  largest entries and shaped (Djurisic et al., ICLR 2023): they read the features through
  the classifier's last linear layer, given (``weight``, ``bias``) or recovered by least
  squares from the training features and logits.
"""

from __future__ import annotations

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
    check_labels,
    check_matrix,
    check_positive_int,
    check_positive_real,
    check_real,
    compute_dtype,
)
from grood._columns import check_feature_names, feature_names, set_feature_names
from grood._params import Parameters
from grood.errors import NotFittedError
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
        t = getattr(self, "temperature", 1.0)
        return kind.wrap(self._score((x - top) / t, top[:, 0]))

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


def _normalise(x: Tensor) -> Tensor:
    """Rows divided by their L2 norms (zero rows stay zero), at any magnitude: each row is
    first scaled by the power of two that brings its largest entry into [0.5, 1), which is
    exact, so the norm neither overflows (rows above ~1e19 in float32) nor underflows (below
    ~1e-19) and rows of ordinary magnitude get the same bits as without it."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    _, exponent = torch.frexp(x.abs().amax(dim=1, keepdim=True))
    x = torch.ldexp(x, -exponent)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class KNN(_Baseline):
    """Deep nearest neighbours on L2-normalised features.

    Args:
        k (int): which neighbour's distance scores a sample (Sun et al. use 50 on CIFAR-10).
        backend (str): backend of the nearest-neighbour search (see :mod:`grood.ops`).
        batch_size (int): queries per search batch.
    """

    inputs = "features"
    name = "KNN"

    def __init__(self, k: int = 50, backend: str = "auto", batch_size: int = 4096) -> None:
        self.k = k
        self.backend = backend
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``KNN (k=50)``: its neighbour sets it apart."""
        return f"KNN (k={self.k})"

    def fit(self, features: ArrayLike, labels: ArrayLike | None = None) -> Self:
        """Store the normalised training features."""
        x, _ = self._read(features, fitting=True)
        if not 1 <= self.k <= x.shape[0]:
            raise ValueError(f"k={self.k} needs 1 <= k <= {x.shape[0]} training samples")
        self.train_features_ = _normalise(x)
        self._fitted_on(features, x.shape[1])
        return self

    def score_samples(self, features: ArrayT) -> ArrayT:
        """Minus the Euclidean distance to the k-th nearest training feature, shape [N]."""
        x, kind = self._read(features)
        n_train = self.train_features_.shape[0]
        if self.k > n_train:  # the search would pad with inf: every score -inf
            raise ValueError(f"k={self.k} but {n_train} training features were stored; "
                             "lower k (or refit)")
        q = _normalise(x).to(self.train_features_.device)
        out = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
        for r0, r1 in batches(q.shape[0], self.batch_size):
            dist, _ = ops.knn(q[r0:r1], self.train_features_, self.k, backend=self.backend)
            out[r0:r1] = 0.0 - dist[:, self.k - 1].sqrt()  # 0.0 - x: no "-0.0"
        return kind.wrap(out)


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
        state = shift = None
        scatter = torch.zeros((d, d), dtype=torch.float64, device=x.device)
        for r0, r1 in batches(n, self.batch_size):
            xb = x[r0:r1].to(torch.float64)
            state = class_prototypes(xb, y[r0:r1], n_classes, state=state, in_place=True)
            # Second moments about the first batch's mean: about the origin, features whose
            # offset dwarfs their spread (1e6 : 1) would cancel most digits below.
            shift = xb.mean(0) if shift is None else shift
            scatter += (xb - shift).T @ (xb - shift)
        assert state is not None and shift is not None  # (x has rows: fit checked it)
        means = state.prototypes(torch.float64)
        counts = state.counts.to(torch.float64)
        cov = (scatter - ((means - shift).T * counts) @ (means - shift)) / n
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        keep = evals > rcond * evals.max().clamp_min(0)
        if not bool(keep.any()):
            raise ValueError("the features have zero within-class variance")
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        whitening = evecs[:, keep] / evals[keep].sqrt()  # [D, r]
        # Whiten around the overall mean, so float32 scoring does not cancel large offsets.
        center = state.sums.sum(0) / n
        self.center_ = center.to(dt)
        self.whitening_ = whitening.to(dt)
        self.class_means_ = means.to(dt)
        self.whitened_means_ = ((means - center) @ whitening).to(dt)  # [C, r]
        self._fit_background((scatter - n * torch.outer(center - shift, center - shift)) / n,
                             rcond, dt)
        self._fitted_on(features, d)
        return self

    def _fit_background(self, cov: Tensor, rcond: float, dt: torch.dtype) -> None:
        """What a subclass keeps of the training features' overall covariance ``cov`` (about
        their mean, float64)."""

    def _background(self, centred: Tensor) -> Tensor | None:
        """What a subclass subtracts from each row's distance, from the rows centred on the
        training mean; None: nothing."""
        return None

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
                z = (xb - center) @ whitening
                offset = self._background(xb - center)
            d, i = ops.knn(z, means, 1, backend=self.backend)
            dist[r0:r1] = d[:, 0] if offset is None else d[:, 0] - offset
            idx[r0:r1] = i[:, 0]
        return dist, idx, kind


class RMD(Mahalanobis):
    """Relative Mahalanobis distance: the smallest squared Mahalanobis distance to a class
    mean (one shared covariance, as :class:`Mahalanobis`) minus the squared Mahalanobis
    distance to the training features' overall mean under their overall covariance (the
    "background" Gaussian), negated; ``predict`` is the nearest class mean, as
    :class:`Mahalanobis`'s. Arguments as :class:`Mahalanobis`'s (``rcond`` for both
    covariances). After ``fit``: also ``background_whitening_`` [D, r0].
    """

    name = "RMD"

    def _fit_background(self, cov: Tensor, rcond: float, dt: torch.dtype) -> None:
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        keep = evals > rcond * evals.max().clamp_min(0)
        self.background_whitening_ = (evecs[:, keep] / evals[keep].sqrt()).to(dt)

    def _background(self, centred: Tensor) -> Tensor | None:
        return (centred @ self.background_whitening_.to(centred.dtype)).square().sum(dim=1)


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
        from them) or the last layer's ``weight`` and ``bias``; ``labels`` are not used. A
        fit that fails leaves the estimator as it was."""
        x, _ = self._read(features, fitting=True)
        checked = self._checked_params(x.shape[1])
        w, b, err, least_squares = self._head(x, logits, weight, bias)
        dt = compute_dtype(x.dtype)
        fitted = self._fit_more(x, w, b, dt, checked, least_squares)
        self.weight_, self.bias_, self.head_error_ = w.to(dt), b.to(dt), err
        for name, value in fitted.items():
            setattr(self, name, value)
        self._fitted_on(features, x.shape[1])
        return self

    def _checked_params(self, d: int) -> Any:
        """The parameters ``_read`` does not check, checked before a fit's work (for
        features of width ``d``), as :meth:`_fit_more` takes them."""
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

    def _scores(self, features: Any) -> tuple[Tensor, Tensor, Any]:
        x, kind = self._read(features)
        dev = self.weight_.device
        dt = torch.float64 if torch.float64 in (x.dtype, self.weight_.dtype) else torch.float32
        scores = torch.empty(x.shape[0], dtype=dt, device=dev)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=dev)
        for r0, r1 in batches(x.shape[0], self.batch_size):
            xb = x[r0:r1].to(device=dev, dtype=dt)
            with matmul_precision("ieee", dev):  # fp32, whatever the program's setting
                scores[r0:r1], preds[r0:r1] = self._score_rows(xb, dt)
        return scores, preds, kind

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


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
    basis of the rest), ``alpha_``, ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "ViM"
    dim_: int  # set by fit (through _fit_more)
    origin_: Tensor
    null_space_: Tensor
    alpha_: float

    def __init__(self, dim: int | None = None, batch_size: int = 4096) -> None:
        self.dim = dim
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``ViM (dim=1000)``."""
        return f"ViM (dim={self.dim_})"

    def _checked_params(self, d: int) -> int:
        dim = default_vim_dim(d) if self.dim is None else check_positive_int(self.dim, "dim")
        if not 1 <= dim < d:
            raise ValueError(f"dim={dim}: the principal space must leave part of the {d} "
                             f"feature dimensions outside it (1 <= dim < {d})")
        return dim

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, dim: int,
                  least_squares: Any) -> dict[str, Any]:
        n, d = x.shape
        origin = -(torch.linalg.pinv(w) @ b)
        if least_squares is not None:  # (its sums hold them: no pass over the rows)
            moments = least_squares.moments_about(origin)
        else:
            moments = x.new_zeros((d, d), dtype=torch.float64)
            for r0, r1 in batches(n, self.batch_size):
                xc = x[r0:r1].to(torch.float64) - origin
                moments += xc.T @ xc
        _, evecs = torch.linalg.eigh((moments + moments.T) / 2)  # ascending
        null = evecs[:, : d - dim]  # all but the dim leading directions
        residual = whole = largest = 0.0
        for r0, r1 in batches(n, self.batch_size):
            xb = x[r0:r1].to(torch.float64)
            xc = xb - origin
            residual += float((xc @ null).norm(dim=1).sum())
            whole += float(xc.norm(dim=1).sum())
            largest += float((xb @ w.T + b).amax(dim=1).sum())
        if not residual > 1e-9 * whole:  # (float64 rounding leaves ~1e-15 of it)
            raise ValueError(f"the training features lie inside their principal space of "
                             f"dim={dim} (all but {residual / whole:.1e} of their norm): "
                             "nothing is left to score by; lower dim")
        return {"dim_": dim, "origin_": origin.to(dt), "null_space_": null.to(dt).contiguous(),
                "alpha_": largest / residual}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = x @ self.weight_.to(dt).T + self.bias_.to(dt)
        virtual = ((x - self.origin_.to(dt)) @ self.null_space_.to(dt)).norm(dim=1)
        return torch.logsumexp(lg, dim=1) - self.alpha_ * virtual, lg.argmax(dim=1)


class ReAct(_HeadBaseline):
    """Rectified activations: the energy ``logsumexp`` of the logits of the features clipped
    from above at the ``percentile``-th percentile of every entry of the training features.

    The percentile is exact (a radix selection over the entries' bits, streamed, never a
    sort or a copy of the N x D entries), interpolated as ``np.percentile`` does, and kept
    in the features' dtype (float32 unless float64), as numpy 2 gives it.

    Args:
        percentile (float): in (0, 100]; 90 in the ReAct paper.
        batch_size (int): rows per batch while fitting and scoring.

    After ``fit``: ``clip_``, ``weight_``, ``bias_``, ``head_error_``.
    """

    name = "ReAct"
    clip_: float  # set by fit (through _fit_more)
    percentile_: float

    def __init__(self, percentile: float = 90.0, batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``ReAct (p90)``."""
        return f"ReAct (p{self.percentile_:g})"

    def _checked_params(self, d: int) -> float:
        return checked_percentile(self.percentile, upper_closed=True)

    def _fit_more(self, x: Tensor, w: Tensor, b: Tensor, dt: torch.dtype, q: float,
                  least_squares: Any) -> dict[str, Any]:
        from grood import _linear

        n, d = x.shape

        def chunks() -> Any:
            return (x[r0:r1] for r0, r1 in batches(n, max(1, (1 << 22) // d)))

        clip = _linear.percentile(chunks, n * d, q, x.dtype)
        return {"clip_": float(torch.tensor(clip, dtype=dt)), "percentile_": q}

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = x.clamp(max=self.clip_) @ self.weight_.to(dt).T + self.bias_.to(dt)
        return torch.logsumexp(lg, dim=1), lg.argmax(dim=1)


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

    def __init__(self, temperature: float = 1.0, batch_size: int = 4096) -> None:
        self.temperature = temperature
        self.batch_size = batch_size

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = x @ self.weight_.to(dt).T + self.bias_.to(dt)
        p = torch.softmax(lg / self.temperature, dim=1)
        spread = (p * lg.shape[1] - 1).abs().sum(dim=1)
        return spread * x.abs().sum(dim=1) / self.temperature, lg.argmax(dim=1)


#: ASH's ways of shaping the entries it keeps: scaled (by exp of the sum's ratio), binarised
#: (each set to the row's mean over the kept), or pruned alone.
ASH_VARIANTS = ("s", "b", "p")


class ASH(_HeadBaseline):
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

    def __init__(self, percentile: float = 90.0, variant: str = "s",
                 batch_size: int = 4096) -> None:
        self.percentile = percentile
        self.variant = variant
        self.batch_size = batch_size

    @property
    def display_name(self) -> str:
        """``ASH-S (p90)``: its variant and percentile (the ones it scores with now)."""
        return f"ASH-{self.variant.upper()} (p{self._checked_percentile():g})"

    def _checked_params(self, d: int) -> float:
        return self._checked_percentile()

    def _checked_percentile(self) -> float:
        """``percentile`` as a float, after checking it and ``variant``."""
        q = checked_percentile(self.percentile, upper_closed=False)
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
        s2 = kept.sum(dim=1, keepdim=True)
        scale = torch.where(s2 > 0, torch.exp(total / s2.where(s2 > 0, 1.0)), 1.0)
        shaped = kept * scale
        bad = ~torch.isfinite(shaped).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()
            raise ValueError(
                f"ASH-S scales row(s) {rows[:10]} by exp(s1 / s2) = "
                f"{float(scale[rows[0], 0]):.3g} beyond {x.dtype}'s range (their largest "
                f"{100 - self._checked_percentile():g} % of entries hold a small part of their "
                "sum): lower percentile, or give float64 features")
        return shaped

    def _score_rows(self, x: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        lg = self.shape(x) @ self.weight_.to(dt).T + self.bias_.to(dt)
        return torch.logsumexp(lg, dim=1), lg.argmax(dim=1)


#: The baselines by the names ``grood eval --baselines`` and :func:`fit_baselines` give
#: them: name -> (class, what it scores).
BY_NAME: dict[str, tuple[type[_Baseline], str]] = {
    "msp": (MSP, "logits"), "maxlogit": (MaxLogit, "logits"), "energy": (Energy, "logits"),
    "gen": (GEN, "logits"), "knn": (KNN, "features"), "mahalanobis": (Mahalanobis, "features"),
    "rmd": (RMD, "features"), "vim": (ViM, "features"), "react": (ReAct, "features"),
    "gradnorm": (GradNorm, "features"), "ash": (ASH, "features")}
#: The names of those that read the features through the classifier's last layer.
LAST_LAYER_NAMES = tuple(n for n, (cls, _) in BY_NAME.items() if issubclass(cls, _HeadBaseline))


def fit_baselines(names: Any, *, features: Any = None, labels: Any = None, logits: Any = None,
                  weight: Any = None, bias: Any = None,
                  options: dict[str, dict[str, Any]] | None = None) -> list[_Baseline]:
    """The baselines ``names`` (as :data:`BY_NAME` and ``grood eval --baselines`` name them),
    fitted on one training set, in that order, for :func:`grood.evaluate`'s ``baselines``:
    those of logits on ``logits``, KNN on ``features``, Mahalanobis and RMD on ``features``
    and ``labels``, and the last-layer ones (ViM, ReAct, GradNorm, ASH) on ``features``
    with the layer's ``weight`` and ``bias`` or, without them, ``logits`` to recover it
    from. ``options``: constructor arguments by name (``{"knn": {"k": 50}}``). What a
    baseline needs and was not given is named before any is fitted."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    options = dict(options or {})
    unknown = [n for n in [*names, *options] if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; the names are "
                         f"{', '.join(BY_NAME)}")
    stray = [n for n in options if n not in names]
    if stray:
        raise ValueError(f"options for {stray[0]!r}, which is not among the baselines asked "
                         "for")
    given = {"features": features, "labels": labels, "logits": logits}
    head = {"weight": weight, "bias": bias} if weight is not None or bias is not None else None
    plans = []
    for name in names:
        cls, inputs = BY_NAME[name]
        needs: tuple[str, ...]
        if cls in (Mahalanobis, RMD):
            needs = ("features", "labels")
        elif name in LAST_LAYER_NAMES:
            needs = ("features",) if head is not None else ("features", "logits")
        else:
            needs = (inputs,)
        missing = [k for k in needs if given[k] is None]
        if missing:
            raise ValueError(f"the {name} baseline is fitted on {' and '.join(needs)}: give "
                             f"{' and '.join(missing)}"
                             + (" (or the last layer's weight and bias)"
                                if "logits" in missing and inputs == "features" else ""))
        plans.append((name, cls, needs))
    out = []
    for name, cls, needs in plans:
        est: Any = cls(**options.get(name, {}))
        if cls in (Mahalanobis, RMD):
            out.append(est.fit(features, labels))
        elif name in LAST_LAYER_NAMES:
            out.append(est.fit(features, **(head or {"logits": logits})))
        else:
            out.append(est.fit(given[needs[0]]))
    return out
