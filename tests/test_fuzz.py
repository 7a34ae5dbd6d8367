"""Hostile and broken inputs: every call returns finite, correct results or a clear error.

Property-based (hypothesis) over shapes, dtypes, magnitudes from 1e-30 to 1e30, NaN/Inf,
duplicated rows, a single class, C > N and strided layouts, for the functional ops, the
kernels (interpreter), the index, the detector and saved files; rows at any distance up to
1e40 against a softmax in 60-digit arithmetic.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from reference import grood_scores_naive, knn_naive, ncp_naive

from grood import GROOD, functional
from grood._bench.common import exact_softmax
from grood.baselines import BY_NAME, fit_baselines
from grood.index import ExactIndex

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EXPONENTS = [-30, -10, -3, 0, 3, 10, 30]
CLEAR_ERRORS = (ValueError, TypeError)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def training_sets(draw):
    n = draw(st.integers(1, 24))
    c = draw(st.integers(1, 5))
    d = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.sampled_from(EXPONENTS))
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()) and n > 1:  # duplicated rows
        x[n - 1] = x[0]
    y = torch.randint(0, c, (n,), generator=gen)
    dtype = draw(st.sampled_from(DTYPES))
    poison = draw(st.sampled_from(["none", "none", "nan", "inf"]))
    xd = x.to(dtype)
    if poison != "none":
        xd[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = float(poison)
    layout = draw(st.sampled_from(["contiguous", "strided", "column-major"]))
    if layout == "strided":
        wide = torch.zeros(n, 2 * d, dtype=dtype)
        wide[:, ::2] = xd
        xd = wide[:, ::2]
    elif layout == "column-major":
        xd = xd.T.contiguous().T
    return xd, y


@FAST
@given(training_sets(), st.integers(1, 3))
# Found by CI: float32 squared distances of 2e-68 (float64) underflow to 0.
@example((torch.tensor([[34.0938], [286.75], [773.0]], dtype=torch.float16),
          torch.tensor([0, 2, 1])), 1)
# Found by a longer run: 1-D rows of 1e-4..1e-3 whose gradients all lie within 2 units in the
# last place of +-1/3: squared distances of 3e-33, below the centred index's rounding.
@example((torch.tensor([[v] for v in (
    0.0009175606656465919, 9.691521241229228e-05, 0.0007087511767056517, 0.0005402614997621042,
    0.0009132577517206365, 0.000525712086881006, 0.00012040696089872804, 0.0002669473266365737,
    0.0006927792955283712, 0.00046226245533834967, 8.20907679685221e-05, 0.000683001367104528,
    0.00061972212722834, 0.0008079855855927367, 0.0007328394507189898, 0.0003663822453012855,
    0.0009413960200344642, 0.00019704933514968516, 0.0007579341778681869,
    0.00011392496568317778, 0.0007439900860873985, 0.0007067595900863742)],
    dtype=torch.float64),
    torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1])), 1)
def test_detector_fit_and_score_are_finite_and_correct_or_refused(data, k):
    x, y = data
    try:
        det = GROOD(k=k, progress=False).fit(x, y)
    except CLEAR_ERRORS as exc:
        msg = str(exc)
        assert any(s in msg for s in ("NaN or Inf", "no training samples", "classified",
                                      "k=", "float64", "number of samples",
                                      "at least two classes")), msg
        return
    assert bool(torch.isfinite(x).all())
    scores, preds = det.score_and_predict(x)
    assert bool(torch.isfinite(scores).all())
    ref_scores, ref_pred = grood_scores_naive(x.double(), y, x.double(), k=k)
    tol = 1e-9 if x.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(scores.double(), ref_scores, rtol=tol, atol=tol)
    assert torch.equal(preds, ref_pred)
    # The neighbours behind the scores: indexed training rows, the k-th at minus the score,
    # each at the distance of its own gradient.
    dists, rows = det.kneighbors(x, k)
    assert torch.equal(0.0 - dists[:, k - 1], scores)
    assert bool(torch.isin(rows, det.indexed_rows_).all())
    assert bool((dists[:, 1:] >= dists[:, :-1]).all())
    g = det._grads.resolved(x, 0).grad.double()
    again = (g[:, None, :] - g[rows]).square().sum(-1)
    # (squared distances below the dtype's smallest normal number, e.g. 2e-68 in float64 from
    # float32 gradients 1e-34 apart, are 0 or subnormal in float32)
    floor = torch.finfo(dists.dtype).tiny
    # (an index held less a centre, ExactIndex.centre_on, is exact to within a rounding of its
    # rows' distance from it: the distances' roots agree to a few units of the gradients' norm)
    slack = 4 * torch.finfo(dists.dtype).eps * float(g.norm(dim=1).max())
    torch.testing.assert_close(again, dists.double(), rtol=tol, atol=tol * float(again.max())
                               + slack * (2 * float(again.max()) ** 0.5 + slack) + floor)


@FAST
@given(st.integers(1, 12), st.integers(1, 40), st.integers(1, 7), st.integers(1, 6),
       st.sampled_from(EXPONENTS), st.booleans(), st.integers(0, 2**16))
def test_knn_matches_brute_force(n_q, n_db, d, k, exponent, duplicates, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** exponent
    db = torch.randn(n_db, d, generator=gen, dtype=torch.float64) * scale
    if duplicates and n_db > 2:
        db[1] = db[0]
    queries = torch.randn(n_q, d, generator=gen, dtype=torch.float64) * scale
    dist, idx = functional.knn(queries, db, k, block_size=5)
    ref_d, ref_i = knn_naive(queries, db, k)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist, ref_d, rtol=1e-9, atol=0)
    index = ExactIndex(d, dtype=torch.float64)
    for start in range(0, n_db, 7):
        index.add(db[start:start + 7])
    assert torch.equal(index.search(queries, k)[1], ref_i)


@FAST
@given(st.integers(1, 6), st.integers(2048, 9000), st.integers(1, 70), st.integers(1, 60),
       st.sampled_from([-20, -5, 0, 5, 20]), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**16))
def test_knn_on_wide_tiles_matches_brute_force(n_q, n_db, k, levels, exponent, dtype, seed):
    """Database tiles of 2,048 rows or more, narrowed by group minima before the pick: the
    neighbours of a float64 brute force, ties (few distinct values, duplicate rows) to the
    lower index. Points on an integer grid times a power of two: every distance is exact in
    both dtypes, so every tie is a true one."""
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 ** exponent
    db = torch.randint(0, levels, (n_db, 3), generator=gen).to(dtype) * scale
    queries = torch.randint(0, levels, (n_q, 3), generator=gen).to(dtype) * scale
    dist, idx = functional.knn(queries, db, k)
    ref_d, ref_i = knn_naive(queries, db, k)
    assert torch.equal(idx, ref_i)
    assert torch.equal(dist.double(), ref_d)


@FAST
@given(st.integers(1, 20), st.integers(1, 30), st.integers(1, 9), st.sampled_from(EXPONENTS),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**16))
def test_ncp_gradient_matches_loop_c_may_exceed_n(n, c, d, exponent, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** exponent
    h = (torch.rand(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    protos = (torch.rand(c, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    p_ood = protos.double().mean(0).to(dtype)
    res = functional.ncp_gradient(h, protos, p_ood, block_classes=4)
    for t in res[:2] + res[3:]:
        assert bool(torch.isfinite(t).all())
    grad, q, pred, min_dist, lse = ncp_naive(h, protos, p_ood)
    # float32 distances are accurate to about 1e-7 of their size, and the softmax of negative
    # distances turns that absolute error into a relative error of q and grad.
    size = float(torch.maximum(min_dist, -lse).max())
    tol = 1e-9 if dtype == torch.float64 else 2e-5 + 1e-6 * size
    assume(dtype == torch.float64 or size < 2.0**16)  # beyond, the detector refuses
    torch.testing.assert_close(res.grad.double(), grad, rtol=tol, atol=tol)
    torch.testing.assert_close(res.q_ood.double(), q, rtol=tol, atol=tol)
    # Rounding may swap the order of prototypes closer than float32 resolution.
    d_pred = ((h.double() - protos.double()[res.pred]) ** 2).sum(1)
    d_best = ((h.double() - protos.double()[pred]) ** 2).sum(1)
    torch.testing.assert_close(d_pred, d_best, rtol=1e-5 if dtype == torch.float32 else 0,
                               atol=0)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.integers(1, 20), st.integers(1, 70), st.integers(1, 40), st.sampled_from(EXPONENTS),
       st.integers(0, 2**16))
def test_kernels_match_twins_under_the_interpreter(n, c, d, exponent, seed):
    pytest.importorskip("triton")
    from grood_kernels.knn import knn as knn_kernel
    from grood_kernels.ncp_gradient import ncp_gradient as ncp_kernel

    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** exponent
    h = torch.rand(n, d, generator=gen) * scale
    protos = torch.rand(c, d, generator=gen) * scale
    p_ood = protos.mean(0)
    got = ncp_kernel(h, protos, p_ood)
    ref = functional.ncp_gradient(h.double(), protos.double(), p_ood.double())
    assume(float(ref.min_dist.max()) < 2.0**16)  # beyond, float32 cannot resolve the softmax
    for t in got[:2] + got[3:]:
        assert bool(torch.isfinite(t).all())
    # q_ood = exp(-d_ood - lse): float32 distances of size d carry about d * 2**-23 of rounding
    # each, which the exponential turns into relative error of q.
    rtol = 1e-4 + 4 * float(ref.min_dist.max()) * 2.0**-23
    torch.testing.assert_close(got.grad.double(), ref.grad, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(got.q_ood.double(), ref.q_ood, rtol=rtol, atol=1e-6)
    dist, _ = knn_kernel(got.grad, got.grad[: max(1, n // 2)], 2)
    ref_d, _ = knn_naive(got.grad, got.grad[: max(1, n // 2)], 2)
    torch.testing.assert_close(dist.double(), ref_d.to(dist.device), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.*")  # NaN/Inf arithmetic, expected
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 16), st.integers(1, 40), st.integers(1, 24), st.sampled_from(EXPONENTS),
       st.integers(0, 2**16), st.sampled_from(["ieee", "tf32", "tf32x3"]))
def test_kernels_and_twins_agree_on_rows_without_an_answer(n, c, d, exponent, seed, precision):
    """Rows and database rows with NaN, +Inf or -Inf among finite ones: the same answer from the
    kernels and the twins (gradient step: NaN results and class -1 for those rows, the other
    rows' exact nearest distances equal; search: no neighbour for those queries, those rows
    never found, the same distances; where squared norms overflow float32, at 1e30, nothing
    is found on either)."""
    pytest.importorskip("triton")
    from grood_kernels.knn import knn as knn_kernel
    from grood_kernels.ncp_gradient import ncp_gradient as ncp_kernel

    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** exponent
    h = torch.rand(n, d, generator=gen) * scale
    protos = torch.rand(c, d, generator=gen) * scale
    bad = torch.rand(n, generator=gen) < 0.3
    values = torch.tensor([float("nan"), float("inf"), -float("inf")])
    cols = torch.randint(0, d, (n,), generator=gen)
    h[bad, cols[bad]] = values[torch.randint(0, 3, (n,), generator=gen)][bad]
    got = ncp_kernel(h, protos, protos.mean(0), precision=precision)
    ref = functional.ncp_gradient(h, protos, protos.mean(0), precision=precision)
    for res in (got, ref):
        assert res.pred[bad].tolist() == [-1] * int(bad.sum())
        for t in (res.grad[bad], res.q_ood[bad], res.min_dist[bad], res.lse[bad]):
            assert bool(torch.isnan(t).all())
    torch.testing.assert_close(got.min_dist[~bad], ref.min_dist[~bad], rtol=1e-5, atol=0)
    db = torch.rand(n, d, generator=gen) * scale
    db[bad, cols[bad]] = h[bad, cols[bad]]  # the same bad entries in the database's rows
    for dist, idx in (knn_kernel(h, db, 3), functional.knn(h, db, 3)):
        assert bool((idx[bad] == -1).all()) and bool(torch.isinf(dist[bad]).all())
        assert not bool(torch.isin(idx, bad.nonzero().flatten()).any())
    torch.testing.assert_close(knn_kernel(h, db, 3)[0], functional.knn(h, db, 3)[0],
                               rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    x, y = torch.rand(40, 6), torch.arange(40) % 3
    path = tmp_path_factory.mktemp("saved") / "det.safetensors"
    GROOD(progress=False).fit(x, y).save(path)
    return path.read_bytes()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damaged_byte_is_refused(saved_bytes, tmp_path, data):
    pos = data.draw(st.integers(0, len(saved_bytes) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(saved_bytes)
    damaged[pos] ^= 1 << bit
    path = tmp_path / f"d{pos}-{bit}.safetensors"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError):
        GROOD.load(path)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_truncation_is_refused(saved_bytes, tmp_path, data):
    cut = data.draw(st.integers(0, len(saved_bytes) - 1))
    path = tmp_path / f"t{cut}.safetensors"
    path.write_bytes(saved_bytes[:cut])
    with pytest.raises(ValueError):
        GROOD.load(path)


def test_consistent_digest_but_mismatched_dimension_is_refused(saved_bytes, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood.persistence import digest

    src = tmp_path / "src.safetensors"
    src.write_bytes(saved_bytes)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["ood_prototype"] = torch.zeros(7)  # dimension 7 against 6 everywhere else
    meta.pop("digest")
    meta["digest"] = digest(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="inconsistent"):
        GROOD.load(tmp_path / "bad.safetensors")


def test_a_pickle_file_is_refused_without_running_it(tmp_path, capsys):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a readable grood detector file"):
        GROOD.load(path)
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "evil.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a grood shard manifest"):
        GROOD.load(tmp_path / "evil.json")


def test_single_class_and_more_classes_than_samples():
    x = torch.rand(5, 3)
    one_class = torch.zeros(5, dtype=torch.int64)
    det = GROOD(ood_prototype="features", progress=False).fit(
        x, one_class, ood_features=torch.rand(4, 3) + 2)
    assert det.n_classes_ == 1 and bool(torch.isfinite(det.score_samples(x)).all())
    # The mean of one prototype is the prototype: q_ood would be 1/2 for every sample.
    with pytest.raises(ValueError, match="'mean' OOD prototype needs at least two classes"):
        GROOD(progress=False).fit(x, one_class)
    # C > N: some class has no sample, which is named.
    with pytest.raises(ValueError, match=r"class\(es\) 5, 6, 7 have no training samples"):
        GROOD(progress=False).fit(x, torch.arange(5), logits=torch.eye(5, 8))


@pytest.mark.filterwarnings("ignore:the nearest class prototype classifies")  # random labels
def test_scores_are_bitwise_reproducible():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 16, generator=gen), torch.randint(0, 6, (300,), generator=gen)
    q = torch.rand(100, 16, generator=gen)
    runs = [GROOD(batch_size=64, progress=False).fit(x, y).score_samples(q) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    numpy_run = GROOD(batch_size=64, progress=False).fit(x.numpy(), y.numpy())
    np.testing.assert_array_equal(numpy_run.score_samples(q.numpy()), runs[0].numpy())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.floats(0, 40),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**16))
def test_far_rows_match_an_exact_softmax_or_are_refused(c, d, log_t, dtype, seed):
    """A row at any distance from the prototypes (up to 1e40), through the detector's path
    (the gradient step, then its far-row check and float64 redo): q_ood and the class of a
    softmax computed in 60 digits from the same values, within the dtype's distance
    resolution (about 1e-7 of the distance in float32, 1e-16 in float64), or the far-row
    error. float64 rows past what float64 resolves were scored from rounding alone."""
    gen = torch.Generator().manual_seed(seed)
    protos = (torch.randn(c, d, generator=gen, dtype=torch.float64) * 4).to(dtype)
    p_ood = protos.double().mean(0).to(dtype)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    t = 10.0**log_t
    h = (p_ood.double() + t * direction / direction.norm()).to(dtype)[None]
    assume(bool(torch.isfinite(h).all()))
    ops = torch.ops.grood
    res = ops.ncp_gradient(h, protos, p_ood, "ieee", None, "torch")
    dist = float((h.double() - p_ood.double()).norm())
    try:
        _, q, pred, _, _ = ops.resolve_rows(h, protos, p_ood, *res)
    except ValueError as exc:
        assert "even in float64" in str(exc)
        assert dist > 2.0**44 / 2  # refused only past what float64 resolves
        return
    assert dist < 2.0**44 * 2  # and past it, nothing is returned
    want_q, want_pred, gap = exact_softmax(h[0], protos, p_ood)
    # float32 rows past 2**16 are redone in float64 (the detector's rule), their results
    # returned in float32 (rounded: 6e-8)
    resolution = 2e-16 if dtype == torch.float64 or dist > 2.0**16 else 1.2e-7
    tol = (1e-9 if dtype == torch.float64 else 1.2e-7) + 8 * resolution * (dist + 8)
    if want_q > 1e-30:
        assert abs(float(q[0]) - want_q) <= tol * want_q, (float(q[0]), want_q, tol)
    if gap > tol:
        assert int(pred[0]) == want_pred


@st.composite
def baseline_sets(draw):
    """A training set for every baseline: features at a scale from 1e-30 to 1e30 (signed or
    not, a duplicated row), a last layer given or recovered from the logits, and rows to
    score at the training scale, 1e3 times it or 1e-3 times it."""
    n, c, d = draw(st.integers(1, 30)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = 10.0 ** draw(st.sampled_from(EXPONENTS))
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):
        x = x - x.mean(0)
    if draw(st.booleans()) and n > 1:
        x[n - 1] = x[0]
    size = 10.0 ** draw(st.sampled_from([-3, 0, 3]))
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64) * size
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * size
    test = torch.rand(7, d, generator=gen, dtype=torch.float64) * scale * draw(
        st.sampled_from([1.0, 1e-3, 1e3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return ([t.to(dtype) for t in (x, weight, bias, test)],
            torch.randint(0, c, (n,), generator=gen), draw(st.booleans()))


@pytest.mark.filterwarnings("ignore")  # (random labels, clipped rows: named, not the point)
@pytest.mark.parametrize("name", list(BY_NAME))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=baseline_sets())
def test_every_baseline_scores_finite_or_refuses(name, data):
    """Each baseline, fitted as fit_baselines fits it, on hostile training sets: the fit and
    each score of finite rows (the training rows and new ones) give finite scores or a clear
    error. Found this way: Mahalanobis whitening a covariance of rounding (-inf), ASH-S and
    SCALE logits past float32 (inf), fDBD at all-zero training features (inf), ViM on one
    row (-inf)."""
    (x, weight, bias, test), y, head = data
    logits = x @ weight.T + bias
    assume(bool(torch.isfinite(logits).all()))
    given_layer = {"weight": weight, "bias": bias} if head else {}
    try:
        (est,) = fit_baselines([name], features=x, labels=y, logits=logits, **given_layer)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        return
    for rows in (x, test):
        inputs = rows if BY_NAME[name][1] == "features" else rows @ weight.T + bias
        if not bool(torch.isfinite(inputs).all()):
            continue
        try:
            scores = est.score_samples(inputs)
        except CLEAR_ERRORS as exc:
            assert str(exc)
            continue
        assert scores.shape == (rows.shape[0],) and bool(torch.isfinite(scores).all()), scores
