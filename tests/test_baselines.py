"""The baselines against direct float64 computations of their definitions."""

import numpy as np
import pytest
import torch
from conftest import clustered_features
from reference import knn_naive

from grood import KNN, MSP, Energy, Mahalanobis, NotFittedError


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
