"""The baselines against direct float64 computations of their definitions."""

import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import clustered_features
from reference import knn_naive

from grood import (
    ASH,
    DICE,
    FDBD,
    GEN,
    KLM,
    KNN,
    MSP,
    RMD,
    SCALE,
    SHE,
    Energy,
    GradNorm,
    Mahalanobis,
    MaxLogit,
    NNGuide,
    NotFittedError,
    ReAct,
    RowsRefusedError,
    TempScale,
    ViM,
)
from grood._linear import order_statistics, percentile


@pytest.fixture
def logits():
    return torch.randn(40, 7, generator=torch.Generator().manual_seed(0)) * 3


def test_msp(logits):
    s = MSP(temperature=2.0).fit(logits).score_samples(logits)
    torch.testing.assert_close(s, torch.softmax(logits / 2.0, 1).max(1).values)


def test_energy(logits):
    s = Energy(temperature=0.5).fit(logits.numpy()).score_samples(logits.numpy())
    assert isinstance(s, np.ndarray)
    np.testing.assert_allclose(s, 0.5 * torch.logsumexp(logits / 0.5, 1).numpy(), rtol=1e-6)


def test_knn_is_kth_normalised_distance():
    x, _ = clustered_features(60, 3, 9, seed=1)
    q, _ = clustered_features(13, 3, 9, seed=2)
    s = KNN(k=4).fit(x).score_samples(q)
    xn, qn = x / x.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    ref_d, _ = knn_naive(qn, xn, 4)
    torch.testing.assert_close(s, -ref_d[:, 3].sqrt(), rtol=1e-9, atol=1e-12)


def test_knn_refuses_k_above_the_stored_features_and_gives_no_negative_zero():
    """k raised above the training set after fit scored every sample -inf (the search pads
    with inf); an exact match scored -0.0."""
    x, _ = clustered_features(20, 2, 5, seed=1, dtype=torch.float32)
    det = KNN(k=3).fit(x)
    det.k = 21
    with pytest.raises(ValueError, match="k=21 but 20 training features were stored"):
        det.score_samples(x)
    det.k = 1
    s = det.score_samples(x[:1])
    assert s.item() == 0.0 and not torch.signbit(s).any()


def test_knn_scores_do_not_depend_on_the_features_magnitude():
    """Normalising rows of 1e30 overflowed the float32 norm (every row became zero and every
    sample scored 0, the most in-distribution score) and rows of 1e-30 underflowed it (all
    scores ~1e-18); normalised features do not depend on the scale."""
    x, _ = clustered_features(60, 3, 9, seed=1, dtype=torch.float32)
    q, _ = clustered_features(13, 3, 9, seed=2, dtype=torch.float32)
    ref = KNN(k=4).fit(x).score_samples(q)
    for scale in (2.0 ** -110, 2.0 ** 110):  # powers of two: the same bits
        assert torch.equal(KNN(k=4).fit(x * scale).score_samples(q * scale), ref)
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(KNN(k=4).fit(x * scale).score_samples(q * scale), ref)
    zero = KNN(k=1).fit(x).score_samples(torch.zeros(1, 9))  # as in Sun et al.: distance 1
    assert zero.item() == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_knn_scores_of_features_sharing_a_large_offset_are_right_in_float32(offset):
    """Features sharing an offset far above their spread normalise to rows pointing nearly
    the same way; the search's expansion ``||q||^2 + ||x||^2 - 2 q.x`` rounded away their
    differences and picked wrong neighbours: float32 scores at offset 1e4 were off by 88 %
    of their spread (rank correlation 0.89 with the exact ones)."""
    x, _ = clustered_features(300, 3, 16, seed=1)
    q, _ = clustered_features(40, 3, 16, seed=2)
    x32, q32 = (x + offset).float(), (q + offset).float()
    s = KNN(k=3).fit(x32).score_samples(q32).double()
    xn, qn = (t.double() / t.double().norm(dim=1, keepdim=True) for t in (x32, q32))
    ref = -knn_naive(qn, xn, 3)[0][:, 2].sqrt()
    assert (s - ref).abs().max() < 1e-3 * (ref.max() - ref.min())


def test_logit_baselines_do_not_overflow_for_large_logits_or_small_temperatures():
    """logits / T overflowed float32 to inf: MSP scored NaN and Energy inf or NaN."""
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    big = (logits * 1e37).float()
    msp = MSP(temperature=0.5).fit(big).score_samples(big)
    torch.testing.assert_close(msp.double(), torch.softmax(big.double() / 0.5, 1).amax(1))
    energy = Energy(temperature=1e-3).fit(big).score_samples(big)
    assert torch.isfinite(energy).all()
    torch.testing.assert_close(energy.double(),
                               1e-3 * torch.logsumexp(big.double() / 1e-3, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_mahalanobis_matches_pinv_definition(offset):
    """Also for features whose common offset dwarfs their spread (second moments about the
    origin cancelled all but a few digits there: 1.5 % error at 1e6 : 1). ``predict`` is the
    class of the smallest distance (numpy in, numpy int64 out)."""
    x, y = clustered_features(120, 4, 6, seed=3)
    q, _ = clustered_features(17, 4, 6, seed=4, spread=0.6)
    maha = Mahalanobis().fit(x + offset, y)
    s = maha.score_samples(q + offset)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    centred = x - means[y]
    precision = torch.linalg.pinv(centred.T @ centred / 120, hermitian=True)
    diffs = q[:, None, :] - means[None]
    dist = torch.einsum("ncd,de,nce->nc", diffs, precision, diffs)
    torch.testing.assert_close(s, -dist.min(1).values, rtol=1e-8 if offset == 0 else 1e-7,
                               atol=1e-8)
    pred = maha.predict((q + offset).numpy())
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, dist.argmin(1).numpy())
    both = maha.score_and_predict(q + offset)
    assert torch.equal(both[0], s) and torch.equal(both[1], torch.from_numpy(pred))
    assert len(set(pred.tolist())) > 1  # (the queries are spread over the classes)


def test_mahalanobis_and_rmd_keep_their_digits_where_classes_lie_far_apart_for_their_spread():
    """Second moments about one point for every class cancel the within-class digits where
    the classes lie far apart for their spread: at 1e10 : 1 in variance the float64 scores
    were 1.2e-5 of their largest off the two-pass covariance's; about a row of each class,
    8.3e-11 (what whitening the search's operands leaves). RMD's class term was taken from
    the row less the training mean, whose three parts cancel in proportion to that ratio
    (float64: 1.3e-5 at 1e10 : 1; float32: 2.8e-3 at 1e4 : 1); from the row less its class
    mean, 9e-11 and 4e-6 (bench/class_spread.py)."""
    gen = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(10, 32, generator=gen, dtype=torch.float64)

    def whitening(cov):
        evals, evecs = torch.linalg.eigh(cov)
        kept = evals > 1e-10 * evals.max()  # (rcond: within-class directions drop out of Q)
        return evecs[:, kept] / evals[kept].sqrt()

    for noise, dtype, bound in ((1e-4, torch.float64, 1e-9), (0.1, torch.float32, 1e-4)):
        y = torch.randint(0, 10, (5000,), generator=gen)
        x = centres[y] + noise * torch.randn(5000, 32, generator=gen, dtype=torch.float64)
        q = centres[torch.arange(500) % 10] + 1.5 * noise * torch.randn(
            500, 32, generator=gen, dtype=torch.float64)
        means = torch.stack([x[y == c].mean(0) for c in range(10)])
        centred = x - means[y]  # (two passes: the covariance without cancellation)
        w = whitening(centred.T @ centred / 5000)
        exact = -((q @ w)[:, None] - (means @ w)[None]).square().sum(-1).amin(1)
        mu = x.mean(0)
        background = ((q - mu) @ whitening((x - mu).T @ (x - mu) / 5000)).square().sum(1)
        for est, want in ((Mahalanobis(), exact), (RMD(), exact + background)):
            s = est.fit(x.to(dtype), y).score_samples(q.to(dtype)).double()
            err = float((s - want).abs().max() / want.abs().max())
            assert err < bound, (type(est).__name__, dtype, err)


def test_mahalanobis_refuses_a_covariance_of_rounding_or_beyond_float32():
    """Identical rows within each class have no within-class variance; where their class
    means round (float64 rows whose sums are inexact), the covariance was rounding, and
    whitening it gave scores of -inf (float32 rows of 1e-31) or of noise. Both are refused
    as zero within-class variance, as exactly zero ones were. Float32 features whose kept
    eigenvalues (rcond=1e-20 here) need a whitening beyond float32's range scored -inf: that
    is refused, naming float64 and rcond."""
    row = torch.tensor([[0.1, 0.7, 1 / 3]], dtype=torch.float64)
    rows = torch.cat([row.expand(3, 3), 3 * row.expand(4, 3)])
    tiny = torch.tensor([[3.4108196981e-32, 2.8674021779e-31, 7.7291494819e-31, 1.7492703057e-31],
                         [7.5536984865e-31, 6.0825061808e-31, 1.9872714714e-31,
                          4.3341553468e-31]]).float()
    for x, y in ((rows, torch.tensor([0, 0, 0, 1, 1, 1, 1])),
                 (tiny[[0, 1, 0]], torch.tensor([0, 1, 0])),
                 (tiny[[0, 1, 0]].double(), torch.tensor([0, 1, 0]))):
        for cls in (Mahalanobis, RMD):
            with pytest.raises(ValueError, match="the features have zero within-class "
                                                 "variance"):
                cls().fit(x, y)
    gen = torch.Generator().manual_seed(3)
    sizes = torch.tensor([1e-33] * 4 + [1e-41], dtype=torch.float64)
    x = (torch.rand(40, 5, generator=gen, dtype=torch.float64) * sizes).float()
    y = torch.arange(40) % 3
    assert bool(torch.isfinite(Mahalanobis().fit(x, y).score_samples(x)).all())
    with pytest.raises(ValueError, match=r"eigenvalues down to [0-9.e-]+, too small for "
                                         r"float32's whitening .* fit on float64 features "
                                         r"\(x\.double\(\)\), or raise rcond"):
        Mahalanobis(rcond=1e-20).fit(x, y)
    s = Mahalanobis(rcond=1e-20).fit(x.double(), y).score_samples(x.double())
    assert bool(torch.isfinite(s).all())


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_rmd_is_the_mahalanobis_distance_relative_to_the_training_gaussians(offset):
    """Minus (the smallest squared class distance, shared covariance, minus the squared
    distance to the overall mean under the overall covariance), by pseudo-inverses; its
    classes are Mahalanobis's."""
    x, y = clustered_features(120, 4, 6, seed=3)
    q, _ = clustered_features(17, 4, 6, seed=4, spread=1.5)
    rmd = RMD().fit(x + offset, y)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    centred = x - means[y]
    precision = torch.linalg.pinv(centred.T @ centred / 120, hermitian=True)
    diffs = q[:, None, :] - means[None]
    md = torch.einsum("ncd,de,nce->nc", diffs, precision, diffs)
    mu = x.mean(0)
    whole = torch.linalg.pinv((x - mu).T @ (x - mu) / 120, hermitian=True)
    md0 = torch.einsum("nd,de,ne->n", q - mu, whole, q - mu)
    s, pred = rmd.score_and_predict(q + offset)
    torch.testing.assert_close(s, -(md.min(1).values - md0), rtol=1e-7, atol=1e-6)
    assert torch.equal(pred, Mahalanobis().fit(x + offset, y).predict(q + offset))
    assert float(s.max() - s.min()) > 1.0  # (the queries differ in score)


def test_rmd_in_float32_keeps_the_digits_its_difference_has():
    """RMD's two distances share their largest terms: on ReLU features of the digits, rows
    far outside them have both near 1e6 and their difference near 5e3. Taken from the two
    in float32, the scores were 7.9e-5 of their spread off float64's, 500 times what
    moving every input by one float32 ulp does to float64's; from the quadratic form of
    the two precisions' difference, under 10 times it (4.7)."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits, y = datasets.load_digits(return_X_y=True)
    gen = np.random.default_rng(0)
    x = np.maximum(digits @ (gen.normal(size=(64, 48)) / 8), 0).astype(np.float32)
    q = np.r_[x[1200:], (np.abs(gen.normal(size=(100, 48))) * x.std() + x.mean()
                         ).astype(np.float32)]
    x, y = x[:1200], y[:1200]
    exact = RMD().fit(x.astype(np.float64), y).score_samples(q.astype(np.float64))
    spread = exact.max() - exact.min()

    def ulp(a):
        return a.astype(np.float64) + gen.choice([-1, 1], a.shape) * np.spacing(a)

    moved = np.abs(RMD().fit(ulp(x), y).score_samples(ulp(q)) - exact).max() / spread
    rmd = RMD().fit(x, y)
    err = np.abs(rmd.score_samples(q) - exact).max() / spread
    assert err < 10 * moved, (err, moved)
    # (its classes are still Mahalanobis's)
    np.testing.assert_array_equal(rmd.predict(q), Mahalanobis().fit(x, y).predict(q))


def test_feature_baselines_score_float64_features_in_float64():
    """A Mahalanobis fitted on float32 rounded float64 features to float32 and returned
    float32 scores (GROOD and KNN return float64 for float64 input)."""
    x, y = clustered_features(80, 3, 6, seed=6, dtype=torch.float32)
    q, _ = clustered_features(9, 3, 6, seed=7, dtype=torch.float64)
    for det in (Mahalanobis().fit(x, y), KNN(k=2).fit(x)):
        assert det.score_samples(q).dtype == torch.float64
        assert det.score_samples(q.float()).dtype == torch.float32
    maha = Mahalanobis().fit(x, y)
    torch.testing.assert_close(maha.score_samples(q).float(), maha.score_samples(q.float()))


def test_scores_are_higher_for_in_distribution():
    x, y = clustered_features(90, 3, 5, seed=5, spread=0.1, dtype=torch.float32)
    # Far in both angle (for KNN's normalised features) and position: scaled unit vectors.
    far = 5.0 * torch.eye(5).repeat(4, 1) - 2.0 * torch.eye(5).roll(1, 0).repeat(4, 1)
    for det in (KNN(k=3).fit(x), Mahalanobis().fit(x, y)):
        assert float(det.score_samples(x).min()) > float(det.score_samples(far).max())


def test_baselines_check_input():
    with pytest.raises(NotFittedError, match="MSP is not fitted"):
        MSP().score_samples(torch.zeros(2, 3))
    msp = MSP().fit(torch.zeros(2, 3))
    # The baseline, not "the detector" (a GROOD beside it in a comparison), is named.
    with pytest.raises(ValueError, match="logits has 4 columns but this MSP was fitted on "
                                         "logits of 3 columns"):
        msp.score_samples(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="features has 2 columns but this KNN was fitted on "
                                         "features of 3 columns"):
        KNN(k=1).fit(torch.rand(5, 3)).score_samples(torch.rand(2, 2))
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) 1"):
        msp.score_samples(torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]]))
    with pytest.raises(ValueError, match="k=10 needs"):
        KNN(k=10).fit(torch.rand(5, 2))


def test_baseline_parameters_that_would_give_nan_or_inverted_scores_are_refused():
    """A temperature of 0 or NaN gave NaN scores and a negative one inverted the ranking
    silently; a negative rcond whitens by roundoff-negative eigenvalues. Numpy numbers work."""
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    for temperature in (0, -1.0, float("nan"), "1", True, None):
        for cls in (MSP, Energy):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                cls(temperature=temperature).fit(logits)
    assert torch.equal(Energy(temperature=np.float32(2)).fit(logits).score_samples(logits),
                       Energy(temperature=2.0).fit(logits).score_samples(logits))
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(2))
    y = torch.arange(60) % 3
    for rcond in (-1e-3, 1.0, float("nan"), None, "0"):
        with pytest.raises(ValueError, match=r"rcond must be a number in \[0, 1\)"):
            Mahalanobis(rcond=rcond).fit(x, y)


def test_an_unknown_backend_is_refused_before_the_fit_does_its_work():
    """A misspelt backend was stored and only refused at the first score, after the fit had
    done its work (normalised every training feature, or summed the covariance)."""
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(30) % 3
    for det in (KNN(k=2, backend="cuda"), Mahalanobis(backend="Torch")):
        with pytest.raises(ValueError, match="backend must be one of"):
            det.fit(x, y)
        assert not hasattr(det, "n_features_in_")
    knn = KNN(k=2).fit(x)
    knn.backend = "gpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        knn.score_samples(x)


def test_maxlogit_is_the_largest_logit(logits):
    s = MaxLogit().fit(logits).score_samples(logits.numpy())
    np.testing.assert_array_equal(s, logits.amax(1).numpy())
    assert MaxLogit().get_params() == {}


def _gen_float64(logits, gamma, m):
    p = torch.softmax(logits.double(), 1).sort(1).values[:, -m:]
    return -(p ** gamma * (1 - p) ** gamma).sum(1)


@pytest.mark.parametrize("m", [1, 3, 100])
def test_gen_matches_its_definition(logits, m):
    s = GEN(gamma=0.3, M=m).fit(logits).score_samples(logits)
    torch.testing.assert_close(s.double(), _gen_float64(logits, 0.3, min(m, 7)), rtol=2e-6,
                               atol=0)


def test_gen_keeps_every_term_of_confident_rows():
    """``1 - p`` of a probability near 1 rounds to 0 in float32 (and in float64 beyond
    ~37 nats), and the small probabilities underflow (float32 beyond ~87 nats), which drops
    their terms and ties every confident row; from log-probabilities, with the largest one's
    ``1 - p`` summed from the others, they stay: for logits (a, 0, 0), 1 - p = 2e^-a / (1 +
    2e^-a) and each other p = e^-a / (1 + 2e^-a)."""
    a = torch.tensor([10.0, 30.0, 60.0, 90.0, 150.0, 400.0], dtype=torch.float64)
    rows = torch.stack((a, torch.zeros(6), torch.zeros(6)), 1)
    g = 0.1
    log_norm = torch.log1p(2 * torch.exp(-a))
    log_top, log_rest = -log_norm, torch.log(torch.tensor(2.0)) - a - log_norm
    log_other = -a - log_norm
    exact = -(torch.exp(g * (log_top + log_rest))
              + 2 * torch.exp(g * (log_other + torch.log1p(-torch.exp(log_other)))))
    for dt in (torch.float32, torch.float64):
        s = GEN(gamma=g).fit(rows.to(dt)).score_samples(rows.to(dt))
        torch.testing.assert_close(s.double(), exact, rtol=1e-5, atol=0)
    assert len(set(GEN().fit(rows).score_samples(rows.float()).tolist())) == 6


def _head_data(seed=0, n=400, d=24, c=6, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, d, generator=gen)) + torch.rand(d, generator=gen) + offset
    fc = torch.nn.Linear(d, c)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(c, d, generator=gen) * 0.3)
        fc.bias.copy_(torch.randn(c, generator=gen))
        logits = fc(x)
    q = torch.relu(torch.randn(37, d, generator=gen)) * 1.5 + offset
    return x, logits, fc, q


def _vim_float64(x, w, b, q, dim):
    x, w, b, q = (t.detach().double() for t in (x, w, b, q))
    u = -torch.linalg.pinv(w) @ b
    evals, evecs = torch.linalg.eigh((x - u).T @ (x - u) / x.shape[0])
    null = evecs[:, evals.argsort(descending=True)[dim:]]
    alpha = (x @ w.T + b).amax(1).mean() / ((x - u) @ null).norm(dim=1).mean()
    return torch.logsumexp(q @ w.T + b, 1) - alpha * ((q - u) @ null).norm(dim=1)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_vim_matches_its_definition_with_the_layer_given_or_recovered(offset):
    """The last layer recovered from the training logits gives the scores the layer itself
    gives (to float32 rounding), on features far from the origin too."""
    x, logits, fc, q = _head_data(offset=offset)
    ref = _vim_float64(x, fc.weight, fc.bias, q, 10)
    given = ViM(dim=10).fit(x, weight=fc.weight, bias=fc.bias)
    recovered = ViM(dim=10).fit(x.numpy(), logits=logits.numpy())
    assert given.head_error_ is None and recovered.head_error_ < 1e-5
    torch.testing.assert_close(recovered.weight_, fc.weight.detach(), rtol=0, atol=1e-4)
    for det in (given, recovered):
        s = det.score_samples(q)
        assert s.dtype == torch.float32 and det.display_name == "ViM (dim=10)"
        torch.testing.assert_close(s.double(), ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))
        scores, preds = det.score_and_predict(q.numpy())
        np.testing.assert_array_equal(scores, s.numpy())
        np.testing.assert_array_equal(preds, fc(q).argmax(1).numpy())
    # float64 in, float64 out, to float64 rounding of the definition
    s64 = ViM(dim=10).fit(x.double(), weight=fc.weight.double(), bias=fc.bias.double())
    torch.testing.assert_close(s64.score_samples(q.double()), ref, rtol=1e-9, atol=1e-9)


def _vim_far_origin(ratio, n=400, d=12, c=4, dim=4, seed=0):
    """Features whose ViM origin lies ``ratio`` times their spread away, with the exact
    scores known: the features vary along the axes of an orthonormal basis ``v`` with
    spreads falling from 3 to 0.1 (exactly whitened); the layer's weakest row (singular
    value ``2 / ratio``, the others 2) lies along ``v``'s first axis and its bias puts the
    origin there, ``ratio`` spreads away, with logits of the features' own size. The
    moments about it have ``v``'s axes for eigenvectors, and the null space is the last
    d - dim. Returns the training features, the layer (float64), queries and their exact
    scores."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    sigma = torch.logspace(np.log10(3), -1, d, dtype=torch.float64)
    rms = float(sigma.square().sum()) ** 0.5
    rows = torch.cat([v[:, :1], torch.linalg.qr(torch.randn(d, c - 1, generator=gen,
                                                              dtype=torch.float64)).Q], 1)
    rows = rows - v[:, :1] * (v[:, :1].T @ rows) * torch.tensor([0.0] + [1.0] * (c - 1),
                                                                    dtype=torch.float64)
    w = (torch.linalg.qr(rows).Q * torch.tensor([2 / ratio / rms] + [2.0] * (c - 1),
                                                 dtype=torch.float64)).T
    origin = v[:, 0] * ratio * rms
    b = -(w @ origin)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = (torch.linalg.qr(z - z.mean(0)).Q * n ** 0.5 * sigma) @ v.T  # mean 0, covariance exact
    q = torch.cat([torch.randn(30, d, generator=gen, dtype=torch.float64) * sigma,
                   torch.randn(10, d, generator=gen, dtype=torch.float64)]) @ v.T
    null = v[:, dim:]  # v[:, 0] (the origin's way, and the widest) and the next dim - 1
    alpha = (x @ w.T + b).amax(1).mean() / (x @ null).norm(dim=1).mean()
    exact = torch.logsumexp(q @ w.T + b, 1) - alpha * (q @ null).norm(dim=1)
    return x, w, b, q, exact


@pytest.mark.parametrize("ratio", [1e3, 1e5])
def test_vim_is_exact_with_its_origin_far_from_the_features(ratio):
    """An origin -pinv(W) b 1e3 and 1e5 times the features' spread from them: moments formed
    about it left the features' own eigenvalues to the rounding of the origin's offset (its
    square, 1e10 times theirs at 1e5), and float32 scoring of x - origin lost the features'
    digits to the origin's; float64 is now exact to 1e-9 of the score spread, the layer given
    or recovered from the logits, and float32 to float32's rounding."""
    x, w, b, q, exact = _vim_far_origin(ratio)
    spread = float(exact.max() - exact.min())
    for given in (True, False):
        layer = {"weight": w, "bias": b} if given else {"logits": x @ w.T + b}
        vim = ViM(dim=4).fit(x, **layer)
        err = float((vim.score_samples(q) - exact).abs().max()) / spread
        assert err < 1e-9, (given, err)
    # float32 features and layer against float64 arithmetic on the same float32 values
    x32, q32, w32, b32 = x.float(), q.float(), w.float(), b.float()
    exact32 = ViM(dim=4).fit(x32.double(), weight=w32.double(), bias=b32.double()
                             ).score_samples(q32.double())
    s = ViM(dim=4).fit(x32, weight=w32, bias=b32).score_samples(q32)
    assert s.dtype == torch.float32
    assert float((s.double() - exact32).abs().max()) / spread < 1e-5


def test_vim_takes_singular_values_below_the_layers_rounding_for_zero():
    """A float32 layer whose rows sum to nothing along a bias that does not (a classifier
    trained long with weight decay on its weights but not its bias leaves its rows' sum at
    float32's rounding): its origin was where that rounding put it, far away (4e6 times the
    features' largest norm here) and different for each rounding of the same layer; it is now the
    point where the logits are all equal, the same whether the layer is given in float32 or
    as a float64 copy or recovered from its float32 logits, and float32 scores agree with
    float64 ones."""
    x, _, fc, q = _head_data(d=24, c=6)
    w = fc.weight.detach().double()
    w = (w - w.mean(0)).float()  # rows summing to float32's rounding of zero
    b = fc.bias.detach().float() + 1.0
    assert float(w.double().sum(0).norm()) < 1e-6 * float(w.norm())
    # the float64 pseudo-inverse of the float32 layer takes the rounding for a direction
    far = float((torch.linalg.pinv(w.double()) @ b.double()).norm())
    assert far > 1e6 * float(x.norm(dim=1).max())
    vims = [ViM(dim=10).fit(x.to(dt), weight=w.to(dt), bias=b.to(dt))
            for dt in (torch.float32, torch.float64)]
    for vim in vims:
        at_origin = w.double() @ vim.origin_.double() + b.double()
        assert float(vim.origin_.norm()) < 10 * float(x.norm(dim=1).max())
        assert float(at_origin.max() - at_origin.min()) < 1e-5 * float(at_origin.abs().max())
    torch.testing.assert_close(vims[0].origin_.double(), vims[1].origin_, rtol=0,
                               atol=1e-5 * float(vims[1].origin_.norm()))
    s32, s64 = vims[0].score_samples(q), vims[1].score_samples(q.double())
    spread = float(s64.max() - s64.min())
    assert float((s32.double() - s64).abs().max()) / spread < 1e-5
    # recovered from the float32 logits that layer gives (known to their precision), as
    # given; it had been refused, the recovered rows' sum at the logits' rounding putting
    # the origin 6e6 spreads away
    recovered = ViM(dim=10).fit(x, logits=x @ w.T + b)
    assert recovered.head_error_ < 1e-6
    torch.testing.assert_close(recovered.origin_, vims[0].origin_, rtol=0,
                               atol=1e-5 * float(vims[1].origin_.norm()))
    assert float((recovered.score_samples(q).double() - s64).abs().max()) / spread < 1e-5
    # a float64 layer keeps its small singular values (nothing rounded them): its origin
    # -pinv(W) b as before
    exact = w.double() + 1e-6 * torch.randn(w.shape, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(1))
    vim = ViM(dim=10).fit(x.double(), weight=exact, bias=b.double())
    torch.testing.assert_close(vim.origin_, -(torch.linalg.pinv(exact) @ b.double()))


def test_vim_refuses_an_origin_too_far_to_resolve():
    """A float64 layer singular to 1e-14 along a bias that is not: its origin lies ~1e12
    times the features' spread away, where the residual is rounding; it was refused as
    features lying 'inside their principal space' (wrongly: at dim=1 too, with 'lower dim'
    for advice) or, with a little less, scored by rounding."""
    x, w, b, _, _ = _vim_far_origin(1e12)
    with pytest.raises(ValueError, match=r"origin -pinv\(W\) b, where its logits are zero, "
                                         r"lies .* 1e\+12 times their spread .* singular "
                                         r"values run 2 to 4\.53e-13\)"):
        ViM(dim=1).fit(x, weight=w, bias=b)


def test_vim_default_dimension():
    assert [ViM().fit(torch.relu(torch.randn(80, d)) + 0.1, logits=None,
                      weight=torch.randn(3, d), bias=torch.zeros(3)).dim_
            for d in (16, 40)] == [8, 20]
    from grood.baselines import default_vim_dim

    assert [default_vim_dim(d) for d in (512, 768, 1024, 2048, 4096)] == [256, 512, 512, 1000,
                                                                          1000]


@pytest.mark.parametrize("q", [90.0, 99.0, 100.0, 0.5])
def test_react_clips_at_the_training_entries_percentile(q):
    x, logits, fc, test = _head_data(seed=1)
    # the float64 percentile rounded to the features' dtype: what numpy 2.4 gives for float32
    # entries (numpy 1 gives the float64 value; numpy 2.0 to 2.3 interpolate in float32, a few
    # ulps off: 1.8242313 for 1.824232 at q = 90 here)
    clip = np.float32(np.percentile(x.double().numpy(), q))
    # (at q = 0.5 the clip is the smallest entry, which ~2 % hold: warned of, as tested below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if q < 1 else "error")
        fitted = (ReAct(percentile=q).fit(x, logits=logits),
                  ReAct(percentile=q, batch_size=7).fit(
                      x.numpy(), weight=fc.weight.detach().numpy(), bias=fc.bias.detach().numpy()))
    for det in fitted:
        assert det.clip_ == float(clip) and det.display_name == f"ReAct (p{q:g})"
        ref = torch.logsumexp(test.double().clamp(max=float(clip)) @ fc.weight.double().T
                              + fc.bias.double(), 1)
        torch.testing.assert_close(det.score_samples(test).double(), ref.detach(), rtol=1e-5,
                                   atol=1e-5)
        _, preds = det.score_and_predict(test)
        assert torch.equal(preds, fc(test.clamp(max=float(clip))).argmax(1))


def test_react_warns_where_its_clip_is_the_smallest_entry():
    """A percentile no larger than the share of the training features' smallest entry (ReLU
    features' zeros) puts ReAct's clip there: every training row clips to one vector and
    scores alike. That fit warns, naming the share; one clipping above it does not."""
    gen = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(300, 16, generator=gen))  # about half the entries are 0
    w, b = torch.randn(5, 16, generator=gen), torch.randn(5, generator=gen)
    share = float((x == 0).double().mean())
    with pytest.warns(UserWarning, match=rf"ReAct's clip, the 40th percentile of the training "
                                         rf"features' entries, is 0, their smallest value "
                                         rf"\({100 * share:.1f}% of the entries hold it\): "
                                         rf"every training row is clipped to the same vector"):
        det = ReAct(percentile=40).fit(x, weight=w, bias=b)
    assert det.clip_ == 0.0 and det.score_samples(x).unique().numel() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = ReAct(percentile=60).fit(x, weight=w, bias=b)
    assert det.clip_ > 0 and det.score_samples(x).unique().numel() > 100
    with pytest.warns(UserWarning, match=r"the 50th percentile .* is 2\.5, their smallest "
                                         r"value \(100\.0% of the entries"):
        ReAct(percentile=50).fit(torch.full((10, 16), 2.5), weight=w, bias=b)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gradnorm_closed_form_equals_autograd(temperature):
    """GradNorm's score is the L1 norm of the last layer's weight gradient of the summed
    cross-entropy to the uniform distribution: per sample, by torch.autograd.grad, in
    float64, against the closed form from the layer given and the layer recovered."""
    x, logits, fc, q = _head_data(seed=2)
    fc64 = torch.nn.Linear(24, 6).double()
    with torch.no_grad():
        fc64.weight.copy_(fc.weight)
        fc64.bias.copy_(fc.bias)
    ref = []
    for row in q.double():
        loss = -torch.log_softmax(fc64(row[None]) / temperature, 1).sum()
        (grad,) = torch.autograd.grad(loss, fc64.weight)
        ref.append(grad.abs().sum())
    ref = torch.stack(ref)
    for det in (GradNorm(temperature=temperature).fit(x, weight=fc.weight, bias=fc.bias),
                GradNorm(temperature=temperature).fit(x, logits=logits)):
        torch.testing.assert_close(det.score_samples(q).double(), ref, rtol=1e-5, atol=0)
        assert torch.equal(det.score_and_predict(q)[1], fc(q).argmax(1))
    s64 = GradNorm(temperature=temperature).fit(x.double(), weight=fc64.weight, bias=fc64.bias)
    torch.testing.assert_close(s64.score_samples(q.double()), ref, rtol=1e-12, atol=0)
    for t in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            GradNorm(temperature=t).fit(x, logits=logits)


@pytest.mark.parametrize("temperature", [1e2, 1e3, 1e4])
def test_gradnorm_float32_at_high_temperature(temperature):
    """At a high temperature the softmax is nearly uniform and ``C p - 1`` cancels in
    float32 (7.1e-4 of the scores' spread off at T = 1e4, 1.7e-5 at 1e2); from ``expm1``,
    float32 scores stay within 2e-6 of float64's on the same float32 layer and features."""
    x, _, fc, q = _head_data(seed=2)
    w, b = fc.weight.detach(), fc.bias.detach()
    p = torch.softmax((q.double() @ w.double().T + b.double()) / temperature, 1)
    want = (p * 6 - 1).abs().sum(1) * q.double().abs().sum(1) / temperature
    got = GradNorm(temperature=temperature).fit(x, weight=w, bias=b).score_samples(q)
    assert float((got.double() - want).abs().max()) <= 2e-6 * float(want.std())


def _ash_float64(x, percentile, variant):
    """ASH as its paper's code shapes a batch of features (top-k of each row), in float64."""
    x = x.double().clone()
    n = x.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s1 = x.sum(1)
    v, i = torch.topk(x, k, dim=1)
    if variant == "b":
        return torch.zeros_like(x).scatter_(1, i, (s1 / k)[:, None].expand(v.shape))
    kept = torch.zeros_like(x).scatter_(1, i, v)
    return kept if variant == "p" else kept * torch.exp(s1 / kept.sum(1))[:, None]


@pytest.mark.parametrize("variant", ["s", "b", "p"])
@pytest.mark.parametrize("percentile", [90.0, 65.0, 0.0])
def test_ash_matches_its_definition(variant, percentile):
    x, logits, fc, q = _head_data(seed=3)
    q = q + 0.01 * torch.rand(q.shape, generator=torch.Generator().manual_seed(5))  # no ties
    w, b = fc.weight.detach().double(), fc.bias.detach().double()
    lg = _ash_float64(q, percentile, variant) @ w.T + b
    for det in (ASH(percentile, variant).fit(x, weight=fc.weight, bias=fc.bias),
                ASH(percentile, variant).fit(x.numpy(), logits=logits.numpy())):
        s, pred = det.score_and_predict(q)
        torch.testing.assert_close(s.double(), torch.logsumexp(lg, 1), rtol=2e-5, atol=2e-5)
        assert torch.equal(pred, lg.argmax(1))
        assert det.display_name == f"ASH-{variant.upper()} (p{percentile:g})"


def test_ash_ties_all_zero_rows_and_overflow():
    """Ties at the cut keep the lower-indexed entries (a top-k's order would decide which
    get ASH-B's fill); an all-zero row scores the bias's energy under ASH-S, where s1 / s2
    gave NaN; a scale beyond float32 is refused, naming the row, and float64 reaches it."""
    w, b = torch.eye(4), torch.zeros(4)
    tied = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    shaped = ASH(50.0, "b").fit(torch.rand(8, 4), weight=w, bias=b).shape(tied)
    assert shaped.tolist() == [[2.0, 2.0, 0.0, 0.0]]
    ash = ASH(90.0, "s").fit(torch.rand(8, 4), weight=w, bias=b)
    zero = ash.score_samples(torch.zeros(2, 4))
    torch.testing.assert_close(zero, torch.full((2,), float(np.log(4.0))))
    wide = torch.zeros(1, 400)
    wide[0, 0], wide[0, 1:] = 1.0, 1.0  # a sum 400 times the one entry kept: exp(400)
    big = ASH(99.9, "s").fit(torch.rand(8, 400), weight=torch.ones(1, 400),
                             bias=torch.zeros(1))
    with pytest.raises(ValueError, match=r"ASH-S scales row\(s\) \[0\] by exp\(s1 / s2\)"):
        big.score_samples(wide)
    assert torch.isfinite(big.score_samples(wide.double())).all()
    for kwargs, message in (({"percentile": 100}, r"percentile must be a number in \[0, 100\)"),
                            ({"variant": "S"}, "variant must be one of 's', 'b', 'p'")):
        with pytest.raises(ValueError, match=message):
            ASH(**kwargs).fit(torch.rand(8, 4), weight=w, bias=b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_order_statistics_are_exact_over_chunks(dtype):
    """The radix selection gives the sorted entries' values at any rank, over values of
    every sign and magnitude (zeros of both signs, subnormal and huge ones)."""
    gen = torch.Generator().manual_seed(4)
    scale = torch.tensor([1e-40, 1e-30, 1.0, 1e20, 1e30])[torch.randint(0, 5, (300, 11),
                                                                        generator=gen)]
    x = (torch.randn(300, 11, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x[::5, 2], x[::7, 3] = 0.0, -0.0
    x[0, 0] = x[1, 0]  # ties
    flat = x.double().flatten().sort().values

    def chunks():
        return (x[r:r + 23] for r in range(0, 300, 23))

    ranks = [0, 1, 17, 1649, 1650, 3299, 2000]
    assert order_statistics(chunks, ranks, dtype) == [float(flat[r]) for r in ranks]
    for q in (0.0, 12.5, 50.0, 90.0, 99.9, 100.0):
        assert percentile(chunks, x.numel(), q, dtype) == pytest.approx(
            float(np.percentile(x.double().numpy(), q)), rel=1e-12, abs=0)


def test_head_baselines_refuse_what_they_cannot_read_a_layer_from():
    x, logits, fc, _ = _head_data()
    w, b = fc.weight.detach(), fc.bias.detach()
    const = x.clone()
    const[:, 3] = 1.0
    refused = [
        (ViM(dim=5), {}, re.escape("pass it, ViM().fit(features, weight=fc.weight, "
                                   "bias=fc.bias), or the training logits")),
        (ReAct(), {"weight": w}, "weight and bias together"),
        (ViM(dim=5), {"logits": logits, "weight": w, "bias": b}, "not both"),
        (ViM(dim=5), {"logits": torch.tanh(logits)},
         r"the logits are not an affine function of these features: the best affine fit "
         r"leaves \d+\.\d+% of their spread"),
        (ReAct(), {"logits": logits[:-1]}, "logits has 399 rows but features have 400"),
        (ViM(dim=5), {"weight": w[:, :-1], "bias": b}, "weight has 23 columns"),
        (ViM(dim=5), {"weight": w, "bias": b[:-1]}, "bias must be a floating-point vector of 6"),
        (ViM(dim=5), {"weight": w, "bias": b * float("nan")}, "bias holds NaN"),
        (ViM(dim=24), {"weight": w, "bias": b}, r"dim=24: .*1 <= dim < 24"),
        (ViM(dim=0), {"weight": w, "bias": b}, "dim must be"),
        (ReAct(percentile=0), {"weight": w, "bias": b},
         r"percentile must be a number in \(0, 100\]"),
        (ReAct(percentile=float("nan")), {"weight": w, "bias": b}, "percentile must be"),
    ]
    for det, kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            det.fit(x, **kwargs)
        assert not hasattr(det, "n_features_in_")
    with pytest.raises(ValueError, match=r"the training features span 23 of their 24 "
                                         r"dimensions .*a column constant over the training"):
        ReAct().fit(const, logits=const @ w.T + b)
    with pytest.raises(ValueError, match="span 9 of their 24 dimensions \\(10 training rows "
                                         "for 24 feature columns"):
        ViM(dim=5).fit(x[:10], logits=logits[:10])
    with pytest.raises(ValueError, match=r"principal space of dim=12 .* lower dim \(10 "
                                         r"training rows span at most 9 directions about "
                                         r"their mean: dim must stay below that"):
        ViM(dim=12).fit(x[:10], weight=w, bias=b)  # (the layer given: no recovery to refuse)
    for det in (GEN(gamma=0), GEN(M=0), GEN(M=2.5)):
        with pytest.raises(ValueError, match="must be"):
            det.fit(logits)
    with pytest.raises(NotFittedError, match="ViM is not fitted"):
        ViM().score_samples(x)
    # Features with nothing outside the principal space (3 of 24 columns vary, dim=5), and
    # a refit that fails (there, or earlier) leaves the fitted estimator as it was.
    flat = torch.zeros_like(x)
    flat[:, :3] = x[:, :3]
    vim = ViM(dim=5).fit(x, logits=logits)
    error, scores = vim.head_error_, vim.score_samples(x[:5])
    for kwargs, message in (({"logits": torch.tanh(logits)}, "not an affine function"),
                            ({"weight": w, "bias": b}, "lie inside their principal space of "
                                                       "dim=5")):
        with pytest.raises(ValueError, match=message):
            vim.fit(flat if "weight" in kwargs else x, **kwargs)
        assert vim.head_error_ == error and torch.equal(vim.score_samples(x[:5]), scores)
    with pytest.raises(ValueError, match="features has 5 columns but this ReAct was fitted"):
        ReAct().fit(x, logits=logits).score_samples(x[:, :5])


def test_fit_baselines_fits_each_by_its_name_as_by_hand():
    """grood.baselines.fit_baselines: every baseline grood eval names, fitted on one training
    set as by hand (the last-layer ones from logits, or from the layer given), in the order
    asked; what one needs and was not given is named before any is fitted."""
    from grood.baselines import BY_NAME, fit_baselines

    x, logits, fc, q = _head_data(seed=8)  # (every class predicted)
    labels = logits.argmax(1)
    labels[::7] = (labels[::7] + 1) % 6  # (rows SHE leaves out of its patterns)
    fitted = fit_baselines(list(BY_NAME), features=x, labels=labels, logits=logits,
                           options={"knn": {"k": 3}, "vim": {"dim": 8}, "nnguide": {"k": 3}})
    by_hand = [MSP().fit(logits), MaxLogit().fit(logits), Energy().fit(logits),
               GEN().fit(logits), KLM().fit(logits), KNN(k=3).fit(x),
               Mahalanobis().fit(x, labels), RMD().fit(x, labels),
               ViM(dim=8).fit(x, logits=logits), ReAct().fit(x, logits=logits),
               GradNorm().fit(x, logits=logits), ASH().fit(x, logits=logits),
               SHE().fit(x, labels, logits=logits), DICE().fit(x, logits=logits),
               FDBD().fit(x, logits=logits), SCALE().fit(x, logits=logits),
               NNGuide(k=3).fit(x, logits=logits)]  # (a bank of 1 % of 400 rows)
    test_logits = fc(q).detach()
    for ours, ref in zip(fitted, by_hand, strict=True):
        assert type(ours) is type(ref) and ours.get_params() == ref.get_params()
        data = test_logits if ref.inputs == "logits" else q
        assert torch.equal(ours.score_samples(data), ref.score_samples(data))
    given = fit_baselines("vim", features=x, weight=fc.weight, bias=fc.bias)
    assert len(given) == 1 and given[0].head_error_ is None
    for kwargs, message in (
            ({"names": ["knn", "vim"], "features": x},
             r"the vim baseline is fitted on features and logits: give logits \(or the last "
             r"layer's weight and bias\)"),
            ({"names": ["msp"], "features": x}, "the msp baseline is fitted on logits: give "
                                                "logits"),
            ({"names": ["rmd"], "features": x}, "fitted on features and labels: give labels"),
            ({"names": ["she"], "features": x, "weight": fc.weight, "bias": fc.bias},
             "the she baseline is fitted on features and labels: give labels"),
            ({"names": ["klm"], "features": x}, "the klm baseline is fitted on logits: give "
                                                "logits$"),
            ({"names": ["vit"], "features": x}, "unknown baseline 'vit'; the names are msp, "),
            ({"names": ["knn"], "features": x, "options": {"vim": {"dim": 3}}},
             "options for 'vim', which is not among the baselines asked for")):
        names = kwargs.pop("names")
        with pytest.raises(ValueError, match=message):
            fit_baselines(names, **kwargs)


def _klm_float64(train_logits, logits):
    """KLM's definition in float64, the typical softmaxes' logs as logsumexps of the rows'
    log-probabilities (a probability underflowing in every row of a class keeps its log)."""
    lp = torch.log_softmax(train_logits.double(), 1)
    pred = lp.argmax(1)
    log_d = torch.stack([torch.logsumexp(lp[pred == k], 0) - math.log(int((pred == k).sum()))
                         for k in pred.unique()])
    lq = torch.log_softmax(logits.double(), 1)
    q = lq.exp()[:, None, :]
    kl = torch.where(q > 0, q * (lq[:, None, :] - log_d[None]), 0.0).sum(-1)
    return -kl.min(1).values


def test_klm_is_the_smallest_divergence_from_the_predicted_classes_typical_softmax():
    """KLM against its definition in float64 (OpenOOD's and the paper's: the nearest of the
    typical softmaxes), with one class no training row is predicted as (no template), on
    float32 and float64 logits; labels are not read."""
    gen = torch.Generator().manual_seed(11)
    train = torch.randn(203, 7, generator=gen) * 2
    train[:, 6] -= 8.0  # (class 6 predicted by no row)
    test = torch.randn(41, 7, generator=gen) * 3
    klm = KLM(batch_size=50).fit(train, labels=np.full(203, -5))
    assert klm.template_classes_.tolist() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(klm.score_samples(test).double(), _klm_float64(train, test),
                               rtol=1e-5, atol=2e-6)
    assert klm.score_samples(test.double()).dtype == torch.float64
    torch.testing.assert_close(KLM().fit(train.double()).score_samples(test.double()),
                               _klm_float64(train, test), rtol=1e-12, atol=1e-13)
    assert float(klm.score_samples(test).max()) <= 0.0
    # A training row's own template: its divergence is the templates' rounding (kept in
    # float32), and an exact 0 (a uniform softmax) scores +0.0, not -0.0.
    assert float(KLM().fit(test[:1]).score_samples(test[:1])[0]) == pytest.approx(0.0,
                                                                                 abs=1e-12)
    flat = KLM().fit(torch.full((1, 5), 3.0)).score_samples(torch.zeros(2, 5))
    assert flat.tolist() == [0.0, 0.0] and not torch.signbit(flat).any()
    # Logits ~1e38 apart: a log-probability of -inf (0 log 0 taken as 0, not NaN).
    far = torch.tensor([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]])
    assert torch.isfinite(KLM().fit(far).score_samples(far)).all()
    # A training row's own softmax, where it is the only one predicted as its class: 0.
    one = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [0, 8.0, 0]])
    assert float(KLM().fit(one).score_samples(one[:1])[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 1e2])
def test_klm_float32_scores_as_float64_at_any_logit_scale(scale):
    """Float32 logits of small spread (raw cosine similarities, say): every softmax nearly
    uniform, ``log p`` and ``log d_k`` near ``-log C``, where float32 holds 2.4e-7 of them;
    the divergences are far smaller. Scored as float64 scores the same logits, to 2e-6 of
    the scores' spread at every scale (before: 39 times the spread at 1e-4, 4.5e-3 of it at
    1e-2)."""
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(12, 12, generator=gen) * 3
    labels = torch.randint(0, 12, (2000,), generator=gen)
    train = ((means[labels] + torch.randn(2000, 12, generator=gen)) * scale).float()
    test = (torch.randn(500, 12, generator=gen) * 2 * scale).float()
    want = _klm_float64(train, test)
    got = KLM(batch_size=128).fit(train).score_samples(test)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= 2e-6 * float(want.std())


def test_klm_templates_stay_finite_where_a_probability_underflows():
    """A class whose probability underflows in every training row (logit gaps of 2000): the
    mean softmax would hold 0 there, its log -inf, and every divergence from it inf or NaN;
    kept in log space it is finite, and so are the scores, however confident the rows."""
    train = torch.tensor([[2000.0, 0.0, 1.0], [1990.0, 3.0, 0.0], [0.0, 50.0, 1.0]])
    klm = KLM().fit(train)
    assert torch.isfinite(klm.log_templates_).all()
    test = torch.tensor([[0.0, 0.0, 3000.0], [2000.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
    scores = klm.score_samples(test)
    assert torch.isfinite(scores).all() and scores[1] == 0.0
    # The third row against the second class's template (softmax of [0, 50, 1], exactly):
    q = torch.softmax(test[2].double(), 0)
    d = torch.log_softmax(train[2].double(), 0)
    assert float(scores[2]) == pytest.approx(-float((q * (q.log() - d)).sum()), rel=1e-5)


def test_she_is_the_inner_product_with_the_predicted_classes_correct_mean():
    x, logits, fc, q = _head_data(seed=28, n=300, c=4)  # (every class predicted)
    y = logits.argmax(1)
    y[::5] = (y[::5] + 1) % 4  # misclassified rows: left out of the patterns
    w, b = fc.weight.detach().double(), fc.bias.detach().double()
    xd = x.double()
    right = (xd @ w.T + b).argmax(1) == y
    patterns = torch.stack([xd[right & (y == k)].mean(0) for k in range(4)])
    expected = (q.double() * patterns[(q.double() @ w.T + b).argmax(1)]).sum(1)
    for she in (SHE().fit(x, y, weight=fc.weight, bias=fc.bias),
                SHE(batch_size=64).fit(x.numpy(), y.numpy(), logits=logits.numpy())):
        torch.testing.assert_close(torch.as_tensor(she.score_samples(q.numpy())).double(),
                                   expected, rtol=1e-5, atol=1e-5)
    she = SHE().fit(x, y, weight=fc.weight, bias=fc.bias)
    _, pred = she.score_and_predict(q)
    assert torch.equal(pred, (q.double() @ w.T + b).argmax(1))
    torch.testing.assert_close(she.patterns_.double(), patterns, rtol=1e-6, atol=1e-6)
    # Labels are needed, in range, and every class needs a correctly classified row; a
    # refit that fails leaves the fitted one as it was.
    scores = she.score_samples(q)
    bad = y.clone()
    bad[(y == 2) & right] = 3  # no correctly classified row of class 2 left
    for labels, message in ((None, "SHE.fit needs the training labels"),
                            (y[:-1], "labels has 299 entries but features have 300 rows"),
                            (y + 4, "labels hold class id 7, but the last layer has 4 classes"),
                            (bad, r"1 class\(es\), \[2\], have no training row the last "
                                  "layer classifies correctly")):
        with pytest.raises((ValueError, TypeError), match=message):
            she.fit(x, labels, weight=fc.weight, bias=fc.bias)
        assert torch.equal(she.score_samples(q), scores)


@pytest.mark.parametrize("percentile", [90.0, 33.3, 0.0])
def test_dice_keeps_the_weights_above_the_contributions_percentile(percentile):
    x, logits, fc, q = _head_data(seed=13, offset=0.5)
    w, b = fc.weight.detach().double(), fc.bias.detach().double()
    contribution = (w * x.double().mean(0)).numpy()
    threshold = np.percentile(contribution, percentile)
    masked = torch.where(torch.from_numpy(contribution > threshold), w, 0.0)
    expected = torch.logsumexp(q.double() @ masked.T + b, 1)
    dice = DICE(percentile=percentile).fit(x, weight=fc.weight, bias=fc.bias)
    assert dice.threshold_ == pytest.approx(threshold, rel=1e-12, abs=1e-15)
    assert int((dice.masked_weight_ != 0).sum()) == int((contribution > threshold).sum())
    torch.testing.assert_close(dice.score_samples(q).double(), expected, rtol=1e-5, atol=1e-5)
    recovered = DICE(percentile=percentile).fit(x, logits=logits)  # (mean from its sums)
    torch.testing.assert_close(recovered.score_samples(q.double()), expected, rtol=1e-6,
                               atol=1e-6)
    assert dice.display_name == f"DICE (p{percentile:g})"
    for p in (100, -1, float("nan")):
        with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
            DICE(percentile=p).fit(x, logits=logits)


def _fdbd_float64(x, w, b, q, centre):
    w, b, q = (t.detach().double() for t in (w, b, q))
    lg = q @ w.T + b
    top, k = lg.max(1)
    norms = (w[k][:, None, :] - w[None]).norm(dim=-1)
    norms[torch.arange(len(q)), k] = 1.0
    spread = (q - centre.double()).norm(dim=1)
    return ((top[:, None] - lg) / norms).sum(1) / (w.shape[0] - 1) / spread


def test_fdbd_is_the_mean_boundary_distance_over_the_normaliser():
    x, logits, fc, q = _head_data(seed=14, offset=2.0)
    mean = x.double().mean(0)
    for normalizer, centre in (("mean", mean), ("origin", torch.zeros_like(mean))):
        expected = _fdbd_float64(x, fc.weight, fc.bias, q, centre)
        for det in (FDBD(normalizer=normalizer).fit(x, weight=fc.weight, bias=fc.bias),
                    FDBD(normalizer=normalizer).fit(x.double(), logits=logits.double())):
            got = det.score_samples(q).double()
            torch.testing.assert_close(got, expected, rtol=2e-5, atol=0)
    with pytest.raises(ValueError, match="normalizer must be one of 'mean', 'origin'"):
        FDBD(normalizer="norm").fit(x, logits=logits)


def test_fdbd_measures_close_weight_rows_exactly_and_refuses_equal_ones():
    """Two classes whose weight rows differ by 1e-9 of their norm: the Gram form
    ||a||^2 + ||b||^2 - 2ab cancels every digit of the distance (the score came out 0 or
    inf); it is recomputed from the difference. Equal rows are refused, naming the classes;
    a feature at the training mean scores finite."""
    gen = torch.Generator().manual_seed(15)
    w = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    w[2] = w[1]
    w[2, 0] += 1e-9 * float(w[1].norm())
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 10, generator=gen, dtype=torch.float64)
    det = FDBD().fit(x, weight=w, bias=b)
    assert float(det.boundary_norms_[1, 2]) == pytest.approx(float(abs(w[2, 0] - w[1, 0])),
                                                             rel=1e-6)
    q = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(det.score_samples(q), _fdbd_float64(x, w, b, q, x.mean(0)),
                               rtol=1e-9, atol=0)
    assert torch.isfinite(det.score_samples(x.mean(0, keepdim=True))).all()
    # A zero feature measured from the origin: at floor_ (eps times the training rows' RMS
    # norm) from it, so finite, where the distance 0 gave inf.
    origin = FDBD(normalizer="origin").fit(x.float(), weight=w.float(), bias=b.float())
    assert origin.floor_ == pytest.approx(
        torch.finfo(torch.float32).eps * float(x.norm(dim=1).square().mean().sqrt()))
    assert torch.isfinite(origin.score_samples(torch.zeros(1, 10))).all()
    # Weights of norm ~5e4 (scaled exactly, by 2^14): a row's distance to itself (no
    # boundary) is not taken for a pair of close rows.
    big = FDBD().fit(x, weight=w * 2.0**14, bias=b * 2.0**14)
    torch.testing.assert_close(big.score_samples(q), det.score_samples(q), rtol=1e-9, atol=0)
    w[2] = w[1]
    with pytest.raises(ValueError, match="classes 1 and 2 have the same weights"):
        FDBD().fit(x, weight=w, bias=b)
    with pytest.raises(ValueError, match="the last layer has 1 class"):
        FDBD().fit(x, weight=w[:1], bias=b[:1])


@pytest.mark.parametrize("percentile", [85.0, 50.0, 0.0])
def test_scale_scales_whole_rows_by_ash_s_factor(percentile):
    x, _, fc, q = _head_data(seed=16)
    w, b = fc.weight.detach().double(), fc.bias.detach().double()
    qd = q.double()
    k = max(1, qd.shape[1] - round(qd.shape[1] * percentile / 100))
    top = qd.sort(1, descending=True).values[:, :k].sum(1)
    expected = torch.logsumexp((qd * torch.exp(qd.sum(1) / top)[:, None]) @ w.T + b, 1)
    det = SCALE(percentile=percentile).fit(x, weight=fc.weight, bias=fc.bias)
    torch.testing.assert_close(det.score_samples(q).double(), expected, rtol=1e-5, atol=1e-5)
    assert det.display_name == f"SCALE (p{percentile:g})"
    if percentile == 0.0:  # every entry kept: ASH-S's scale and nothing pruned
        ash = ASH(percentile=0.0).fit(x, weight=fc.weight, bias=fc.bias)
        torch.testing.assert_close(det.score_samples(q), ash.score_samples(q))
    # An all-zero row is left as it is.
    zero = det.score_samples(torch.zeros(1, q.shape[1]))
    assert float(zero[0]) == pytest.approx(float(torch.logsumexp(b, 0)), rel=1e-6)


def test_ash_s_and_scale_keep_float32s_digits_at_a_large_ratio():
    """ASH-S's and SCALE's ``exp(s1 / s2)`` multiplies the rounding of the float32 row sums
    by the ratio, 6 to 13 at p99 on D = 512 (k = 5 entries kept): such rows' sums are taken
    again in float64 (past RATIO_RESUMMED), and the shaped float32 entries stay within 4
    half-ulps of those shaped in float64 from the same float32 values (they were 38 off);
    rows below it (p90: ratios 1.6 to 2) are summed in float32, as before."""
    from grood.baselines import RATIO_RESUMMED

    gen = torch.Generator().manual_seed(21)
    x = (torch.relu(torch.randn(200, 512, generator=gen, dtype=torch.float64) + 0.3) ** 2
         ).float()
    w, b = torch.randn(20, 512, generator=gen) * 0.02, torch.zeros(20)
    top = x.double().sort(1, descending=True).values[:, :5].sum(1)
    assert float((x.double().sum(1) / top).min()) > RATIO_RESUMMED
    for det in (ASH(99.0, "s"), SCALE(99.0)):
        det.fit(x[:10], weight=w, bias=b)
        got, exact = det.shape(x).double(), det.shape(x.double())
        assert exact.dtype == torch.float64
        nonzero = exact != 0
        off = (got - exact).abs()[nonzero] / exact.abs()[nonzero]
        assert float(off.max()) <= 4 * 2.0 ** -24, det.display_name


def test_ash_s_and_scale_sum_every_row_in_float64_off_the_cpu(monkeypatch):
    """Off the CPU every row's sums are taken in float64 (no host read to choose rows): the
    shaped entries within 2 half-ulps of float64's at every ratio, and the same scores as
    where only the large ratios' rows are summed so, to the float32 GEMM's rounding."""
    import grood.baselines as baselines

    gen = torch.Generator().manual_seed(22)
    x = (torch.relu(torch.randn(100, 256, generator=gen, dtype=torch.float64) + 0.3) ** 2
         ).float()
    w, b = torch.randn(10, 256, generator=gen) * 0.02, torch.zeros(10)
    for det in (ASH(90.0, "s"), SCALE(85.0), ASH(99.0, "s")):
        det.fit(x[:10], weight=w, bias=b)
        chosen = det.score_samples(x)
        with monkeypatch.context() as m:
            m.setattr(baselines, "_sums_in_float64", lambda rows: True)
            got, every = det.shape(x).double(), det.score_samples(x)
        exact = det.shape(x.double())
        nonzero = exact != 0
        off = (got - exact).abs()[nonzero] / exact.abs()[nonzero]
        assert float(off.max()) <= 2 * 2.0 ** -24, det.display_name
        torch.testing.assert_close(every, chosen, rtol=1e-5, atol=0)


def test_scale_refuses_a_row_scaled_past_its_dtype():
    """exp(s1 / s2) is at most exp(D / k): past float32 with one entry kept of 200 equal
    ones (exp(200)); that row is named, and float64 features score it."""
    gen = torch.Generator().manual_seed(17)
    w, b = torch.randn(3, 200, generator=gen) * 1e-3, torch.zeros(3)
    det = SCALE(percentile=99.9).fit(torch.rand(30, 200, generator=gen), weight=w, bias=b)
    rows = torch.rand(3, 200, generator=gen) * 0.01
    rows[:, 0] = 5.0  # (its largest entry holds most of a row's sum: exp(1.2) or so)
    rows[2] = 1.0
    with pytest.raises(ValueError, match=r"SCALE scales row\(s\) \[2\] by exp\(s1 / s2\) = "
                                         r"7\.23e\+86 beyond torch.float32's range"):
        det.score_samples(rows)
    assert torch.isfinite(det.score_samples(rows.double())).all()


def _nnguide_float64(bank_x, w, b, q, k):
    bank_x, w, b, q = (t.detach().double() for t in (bank_x, w, b, q))
    bank = bank_x / bank_x.norm(dim=1, keepdim=True) * torch.logsumexp(bank_x @ w.T + b, 1)[:, None]
    inner = (q / q.norm(dim=1, keepdim=True)) @ bank.T
    return inner.topk(k, dim=1).values.mean(1) * torch.logsumexp(q @ w.T + b, 1)


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_nnguide_is_the_energy_guided_by_the_nearest_scaled_training_features(
        fraction, monkeypatch):
    """NNGuide against its definition in float64, with the whole training set as its bank
    or a seeded draw of 30 % of it, searched in blocks of bank rows (forced small here: the
    k largest merged across them)."""
    import grood.baselines as baselines

    x, logits, fc, q = _head_data(seed=18)
    rows = torch.arange(len(x)) if fraction == 1.0 else torch.randperm(
        len(x), generator=torch.Generator().manual_seed(7))[:120].sort().values
    expected = _nnguide_float64(x[rows], fc.weight, fc.bias, q, 5)
    monkeypatch.setattr(baselines, "GUIDANCE_ENTRIES", 37 * 8)  # blocks of 8 bank rows
    for det in (NNGuide(k=5, bank_fraction=fraction, seed=7).fit(x, weight=fc.weight,
                                                                 bias=fc.bias),
                NNGuide(k=5, bank_fraction=fraction, seed=7, batch_size=64).fit(
                    x.double(), logits=logits.double())):
        assert det.bank_.shape == (len(rows), 24)
        torch.testing.assert_close(det.score_samples(q).double(), expected, rtol=2e-5,
                                   atol=2e-5)
    assert det.display_name == "NNGuide (k=5)"
    # By default, as OpenOOD: a bank of 1 % of the training rows, k=100 (so here, k=3).
    assert NNGuide(k=3).fit(x, weight=fc.weight, bias=fc.bias).bank_.shape == (4, 24)


def test_nnguide_refuses_a_bank_smaller_than_k_and_bad_parameters():
    x, _, fc, q = _head_data(seed=19, n=50)
    head = {"weight": fc.weight, "bias": fc.bias}
    for det, message in (
            (NNGuide(k=10, bank_fraction=0.1), r"the bank holds 5 training row\(s\) "
                                               r"\(bank_fraction=0.1 of 50\), fewer than k=10"),
            (NNGuide(bank_fraction=0), r"bank_fraction is a fraction in \(0, 1\], got 0"),
            (NNGuide(bank_fraction=50), "bank_fraction is a fraction"),
            (NNGuide(k=0), "k must be"),
            (NNGuide(k=5, seed=1.5), "seed must be an integer")):
        with pytest.raises(ValueError, match=message):
            det.fit(x, **head)
        assert not hasattr(det, "n_features_in_")
    det = NNGuide(k=50, bank_fraction=1.0).fit(x, **head)
    det.k = 51
    with pytest.raises(ValueError, match="k=51 is more than the 50 rows of the bank fitted"):
        det.score_samples(q)


def _held_out(n=301, c=7, seed=0, noise=1.0):
    """Logits whose labels are the argmax of a noisier copy: some rows are wrong."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    y = (z + noise * 3 * torch.randn(n, c, generator=gen, dtype=torch.float64)).argmax(1)
    return z, y


def _nll(z, y, t):
    return float(-torch.log_softmax(z / t, 1).gather(1, y[:, None]).mean())


def test_tempscale_finds_the_temperature_of_least_nll():
    z, y = _held_out()
    est = TempScale(batch_size=64).fit(z, y)  # (several batches)
    t = est.temperature_
    beta = torch.tensor(1 / t, dtype=torch.float64, requires_grad=True)
    loss = -torch.log_softmax(z * beta, 1).gather(1, y[:, None]).mean()
    (g,) = torch.autograd.grad(loss, beta)
    assert abs(float(g)) < 1e-10  # the likelihood's slope is 0 there
    assert est.nll_ == pytest.approx(_nll(z, y, t), rel=1e-12)
    assert all(_nll(z, y, t * f) > est.nll_ for f in (0.999, 1.001))
    # a dense grid on log T agrees to the grid's spacing
    grid = np.exp(np.linspace(np.log(t) - 0.01, np.log(t) + 0.01, 2001))
    best = grid[int(np.argmin([_nll(z, y, g_) for g_ in grid]))]
    assert best == pytest.approx(t, rel=2e-5)
    # the scores: MSP at that temperature, float32 from float32
    np.testing.assert_allclose(est.score_samples(z).numpy(),
                               MSP(temperature=t).fit(z).score_samples(z).numpy(), rtol=1e-12)
    assert est.score_samples(z.float()).dtype == torch.float32
    # confident logits with noisy labels: a temperature above 1 (it softens them)
    assert TempScale().fit(z * 10, y).temperature_ > 1


def test_tempscale_refuses_logits_without_a_finite_positive_optimum():
    z, _ = _held_out()
    with pytest.raises(ValueError, match=r"every row's label holds its largest logit.*fit on "
                                         r"held-out logits"):
        TempScale().fit(z, z.argmax(1))
    with pytest.raises(ValueError, match="no better under these logits than under the "
                                         "uniform distribution"):
        TempScale().fit(z, z.argmin(1))
    with pytest.raises(ValueError, match=r"class id 7, out of range for 7 classes \(the "
                                         r"logits' columns\)"):
        TempScale().fit(z, torch.full((len(z),), 7))
    with pytest.raises(ValueError, match=f"labels has 3 entries but the logits have {len(z)} "
                                         "rows$"):
        TempScale().fit(z, z.argmin(1)[:3])
    with pytest.raises(NotFittedError):
        TempScale().score_samples(z)


def _scaled_head_data(scale, seed=41):
    """Post-ReLU-like features of 6 classes times ``scale`` and a last layer divided by it
    (logits as at scale 1), float32: train, labels, weight, bias, test."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(6, 32, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (1500,), generator=gen)
    train = torch.relu(means[labels] + torch.randn(1500, 32, generator=gen, dtype=torch.float64))
    test = torch.cat([torch.relu(means[torch.randint(0, 6, (100,), generator=gen)]
                                 + torch.randn(100, 32, generator=gen, dtype=torch.float64)),
                      torch.randn(100, 32, generator=gen, dtype=torch.float64).abs() * 2])
    weight, bias = means / 4 / scale, -(means * means).sum(1) / 8
    return ((train * scale).float(), labels, weight.float(), bias.float(),
            (test * scale).float())


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e20])
@pytest.mark.parametrize("method", [ViM, FDBD])
def test_norms_of_features_far_from_unit_scale_are_taken_in_float64(method, scale):
    """ViM's residual norm and fDBD's distance to the mean square the features' entries:
    float32 squares overflow past about 1e19 and underflow below about 1e-19, where the norms
    themselves and the scores are well inside float32. Scored as float64 scores the same
    rounded inputs, to 1e-6 of the scores' spread at every scale (before: ViM 0.2 of it at
    1e-25 and non-finite at 1e20, fDBD 9e6 times it at 1e-25 and all of it at 1e20)."""
    train, _, weight, bias, test = _scaled_head_data(scale)
    want = method().fit(train.double(), weight=weight.double(), bias=bias.double()) \
        .score_samples(test.double())
    got = method().fit(train, weight=weight, bias=bias).score_samples(test)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert float((got.double() - want).abs().max()) <= 1e-6 * float(want.max() - want.min())


@pytest.mark.parametrize(("scale", "where"), [(1e-25, "below torch.float32's normal range"),
                                              (1e20, "past torch.float32's largest value")])
def test_she_refuses_float32_scores_past_float32s_range(scale, where):
    """SHE's score, a feature's inner product with a mean of features, goes with the square
    of their scale: features of 1e-25 score about 1e-50, below float32's smallest normal
    number, and of 1e20 about 1e41, past its largest (before: zeros and denormals with no
    digits left, or inf, unsaid). The rows are refused with the way out; float64 features
    score them, as the inner product in float64."""
    train, labels, weight, bias, test = _scaled_head_data(scale)
    she = SHE(batch_size=64).fit(train, labels, weight=weight, bias=bias)
    with pytest.raises(ValueError, match=rf"SHE's scores of row\(s\) \[0, 1, .* lie {where}.* "
                                         r"give float64 features"):
        she.score_samples(test)
    x = test.double()
    she64 = SHE().fit(train.double(), labels, weight=weight.double(), bias=bias.double())
    pred = (x @ weight.double().T + bias.double()).argmax(1)
    want = (x * she64.patterns_[pred]).sum(1)
    assert torch.allclose(she64.score_samples(x), want, rtol=1e-12, atol=0)


def test_she_scores_small_sums_of_ordinary_terms():
    """A score below float32's normal range because its terms cancel (features of either
    sign) is not refused: float32 holds it to a far smaller part of its terms than their
    own rounding."""
    w, b = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]), torch.zeros(2)
    train = torch.tensor([[2.0, 1, 3], [2, 3, 1], [-1, -2, -3], [-3, -2, -1]])
    she = SHE().fit(train, torch.tensor([0, 0, 1, 1]), weight=w, bias=b)  # [2, 2, 2], -[2, 2, 2]
    rows = torch.tensor([[1.0, -1.0, 1e-39], [4.0, 0.0, 1e-3]])
    want = (rows.double() * 2).sum(1).float()
    assert float(want[0]) != 0 and torch.equal(she.score_samples(rows), want)


def test_a_refused_row_is_named_by_its_place_in_the_input_not_its_batch():
    """ASH-S refuses a row it scales past float32; scored in batches of 4, the eighth row
    was named as row 3, its place in its batch. The error pickles, its message as said."""
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(3, 16, generator=gen), torch.zeros(3)
    ash = ASH(percentile=90, batch_size=4).fit(torch.rand(50, 16, generator=gen), weight=w,
                                               bias=b)
    rows = torch.rand(10, 16, generator=gen)
    rows[7, 2] = 3e38
    with pytest.raises(RowsRefusedError, match=r"ASH-S scales row\(s\) \[7\] by exp\(s1 / s2\)"
                                               r" = .* \(an entry of 3e\+38, near the dtype's "
                                               r"largest value\): give float64 features") as caught:
        ash.score_samples(rows)
    assert caught.value.rows == [7]
    back = pickle.loads(pickle.dumps(caught.value))  # (as a worker process hands it back)
    assert type(back) is RowsRefusedError and back.rows == [7]
    assert str(back) == str(caught.value)


def test_head_baselines_refuse_rows_whose_score_leaves_the_dtypes_range():
    """Finite features whose score does not fit the dtype: ASH-S's and SCALE's logits of
    float32 rows of 3e33 shaped through a layer of weights near 1e3, fDBD's quotient for a
    row at the mean of all-zero training features (the floor, float32's smallest normal
    number, under a boundary distance of 707). Each scored inf or -inf without a sign, which
    ranks the row first or last; each is refused, naming the rows, as SHE's are."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 7, generator=gen, dtype=torch.float64) * 1e30).float()
    weight = (2e3 * torch.randn(2, 7, generator=gen, dtype=torch.float64)).float()
    bias = (5e2 * torch.randn(2, generator=gen, dtype=torch.float64)).float()
    far = (torch.rand(7, 7, generator=gen, dtype=torch.float64) * 3e33).float()
    for est in (ASH(), SCALE()):
        est.fit(x, weight=weight, bias=bias)
        assert bool(torch.isfinite(est.score_samples(x)).all())
        with pytest.raises(RowsRefusedError, match=(
                rf"^{est.name}'s scores of row\(s\) \[\d+(, \d+)*\] are not finite \(-?inf for "
                r"the first\): a step of the score left torch\.float32's range at these "
                r"features' size; give float64 features, or features rescaled$")) as refused:
            est.score_samples(far)
        s = est.fit(x.double(), weight=weight.double(), bias=bias.double()).score_samples(
            far.double())
        assert refused.value.rows == (~torch.isfinite(s.float())).nonzero()[:, 0].tolist()
    zeros = torch.zeros(3, 2)
    fdbd = FDBD().fit(zeros, weight=torch.tensor([[1e-3, 0.0], [0.0, 1e-3]]),
                      bias=torch.tensor([1.0, 0.0]))
    assert bool(torch.isfinite(fdbd.score_samples(torch.ones(2, 2))).all())
    with pytest.raises(RowsRefusedError, match=r"^fDBD's scores of row\(s\) \[1\] are not "
                                               r"finite \(inf for the first\)"):
        fdbd.score_samples(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_vim_refuses_one_training_row_or_copies_of_one():
    """One training row, or copies of one, have no spread about their mean: the principal
    space was found in rounding and alpha, the training logits over a residual of rounding,
    took the scores to -inf (float32 rows of 1e30) or to noise; refused, saying so."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    row = torch.tensor([[0.1, 0.7, 1 / 3, 0.9]], dtype=torch.float64)
    for x, said in ((row, "one training feature row"),
                    (row.expand(5, 4), "5 copies of one training feature row"),
                    ((1e30 * row).float(), "one training feature row"),
                    (row.expand(5, 4).float(), "5 copies of one training feature row")):
        with pytest.raises(ValueError, match=f"^ViM was given {said}: its principal space "
                                             "about their mean needs rows that differ$"):
            ViM(dim=2).fit(x, weight=weight.to(x.dtype), bias=bias.to(x.dtype))
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    assert bool(torch.isfinite(ViM(dim=2).fit(x, weight=weight, bias=bias).score_samples(
        x)).all())
