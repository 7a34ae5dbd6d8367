"""The GROOD detector's contract: definitions, sign, types, errors, save/load."""

import os
import re
import warnings
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from conftest import clustered_features
from reference import grood_scores_naive

import grood._fit
from grood import GROOD, DetectorFileError, NotFittedError, __version__, evaluate, ops
from grood.metrics import threshold_acceptance
from grood.prototypes import OODPrototypeSource, register_source


def _data(seed=0, n=80, c=4, d=11):
    x, y = clustered_features(n, c, d, seed=seed, spread=0.5, dtype=torch.float32)
    test, _ = clustered_features(25, c, d, seed=seed + 100, spread=0.8, dtype=torch.float32)
    return x, y, test


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch_size", [7, 4096], ids=["batch7", "batch4096"])
def test_scores_equal_float64_definition(k, batch_size):
    x, y, test = _data()
    det = GROOD(k=k, batch_size=batch_size).fit(x, y)
    ref_scores, ref_pred = grood_scores_naive(x.double(), y, test.double(), k=k)
    scores, pred = det.score_and_predict(test)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-4, atol=1e-6)
    assert torch.equal(pred, ref_pred)
    assert torch.equal(det.predict(test), ref_pred)


def test_float64_input_is_exact():
    x, y, test = _data(seed=3)
    det = GROOD().fit(x.double(), y)
    ref, _ = grood_scores_naive(x.double(), y, test.double())
    torch.testing.assert_close(det.score_samples(test.double()), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:the logits classify")  # random logits, on purpose
def test_logits_choose_which_samples_are_indexed():
    x, y, test = _data(seed=4)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(x.shape[0], 4, generator=gen)
    det = GROOD().fit(x, y, logits=logits)
    assert det.index_.ntotal == int((logits.argmax(1) == y).sum())
    ref, _ = grood_scores_naive(x.double(), y, test.double(), logits=logits)
    torch.testing.assert_close(det.score_samples(test).double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:the logits classify")  # random logits, on purpose
def test_fit_reserves_the_index_it_will_hold(monkeypatch):
    """With logits the rows to index are known after the first pass: the exact index is
    made that size at once (nothing to copy when it is finished); without, room for every
    row, trimmed at the end. (A distributed rank reserved every rank's rows.)"""
    from grood.index import ExactIndex

    reserved = []
    real = ExactIndex.reserve
    monkeypatch.setattr(ExactIndex, "reserve",
                        lambda self, n: (reserved.append(n), real(self, n))[1])
    x, y, _ = _data(seed=4)
    logits = torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(0))
    det = GROOD(batch_size=16).fit(x, y, logits=logits)
    assert reserved == [det.index_.ntotal] == [int((logits.argmax(1) == y).sum())]
    reserved.clear()
    det = GROOD(batch_size=16).fit(x, y)
    assert reserved == [x.shape[0]] and det.index_.vectors.shape[0] == det.index_.ntotal


def test_a_class_without_samples_is_named_with_where_the_class_count_came_from():
    """A model's logits over more classes than the training labels use (a subset of
    ImageNet's classes) or labels with gaps: the error says how to fix it."""
    x, y, _ = _data(seed=4)
    logits = torch.randn(x.shape[0], 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"class\(es\) 4, 5 have no training samples.*"
                                         r"the class count, 6, is the logits' width"):
        GROOD().fit(x, y, logits=logits)
    with pytest.raises(ValueError, match=r"class\(es\) 0 have no .*renumber the labels"):
        GROOD().fit(x, y + 1)


def test_ood_features_source():
    x, y, test = _data(seed=5)
    ood = torch.rand(30, 11) * 3
    det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood.numpy())
    torch.testing.assert_close(det.ood_prototype_, ood.mean(0))
    ref, _ = grood_scores_naive(x.double(), y, test.double(), p_ood=ood.double().mean(0))
    torch.testing.assert_close(det.score_samples(test).double(), ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ood_features has 4 columns but the training "
                                         "features have 11"):
        GROOD(ood_prototype="features").fit(x, y, ood_features=ood[:, :4])


def test_higher_score_means_in_distribution(toy_set):
    x, y, ood = toy_set
    det = GROOD().fit(x, y)
    id_scores = det.score_samples(x)
    ood_scores = det.score_samples(ood)
    assert float(id_scores.min()) > float(ood_scores.max())
    assert torch.equal(id_scores, torch.zeros_like(id_scores))  # own gradient is in the index


def test_fit_returns_self_and_records_state():
    x, y, _ = _data()
    det = GROOD()
    assert det.fit(x, y) is det
    assert det.n_features_in_ == 11 and det.n_classes_ == 4 and det.n_train_ == 80
    assert det.backend_ == {"ncp_gradient": "torch", "knn": "torch"}
    assert det.class_prototypes_.shape == (4, 11)
    assert int(det.class_counts_.sum()) == 80
    assert 0 < det.train_accuracy_ <= 1
    assert det.index_.ntotal == round(det.train_accuracy_ * 80)


def test_unfitted_detector_raises():
    det = GROOD()
    with pytest.raises(NotFittedError, match="not fitted"):
        det.score_samples(np.zeros((2, 3), np.float32))
    with pytest.raises(NotFittedError, match="not fitted"):
        det.predict(torch.zeros(2, 3))
    with pytest.raises(NotFittedError):
        det.save("never-written.safetensors")


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    x, y, test = _data()
    det = GROOD().fit(x.numpy(), y.numpy())
    s_np, p_np = det.score_and_predict(test.numpy())
    assert isinstance(s_np, np.ndarray) and s_np.dtype == np.float32 and s_np.shape == (25,)
    assert isinstance(p_np, np.ndarray) and p_np.dtype == np.int64
    s_t = det.score_samples(test)
    assert isinstance(s_t, torch.Tensor)
    np.testing.assert_array_equal(s_np, s_t.numpy())
    assert isinstance(det.predict(test.numpy()), np.ndarray)


@pytest.mark.filterwarnings("ignore:the logits classify")  # random logits, on purpose
def test_inputs_are_not_modified():
    x, y, test = _data()
    logits = torch.randn(80, 4)
    ood = torch.rand(5, 11)
    copies = [t.clone() for t in (x, y, test, logits, ood)]
    det = GROOD(ood_prototype="features").fit(x, y, logits=logits, ood_features=ood)
    det.score_and_predict(test)
    det.predict(test)
    for t, c in zip((x, y, test, logits, ood), copies, strict=True):
        assert torch.equal(t, c)


def test_gradient_step_follows_in_place_prototype_changes():
    """The gradient step keeps the prototypes' squared norms between batches; a fitted
    detector's prototypes changed in place must not be scored with the old norms."""
    from grood import functional

    x, y, test = _data(n=200, c=10)  # more classes than exact candidates per row
    det = GROOD().fit(x, y)
    before = det.predict(test)
    det.class_prototypes_[0] = det.class_prototypes_[1] + 0.01  # class 0 moves onto class 1
    want = functional.ncp_gradient(test, det.class_prototypes_.clone(), det.ood_prototype_)
    got = det._grads(test)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(det.predict(test), before)


def test_read_only_numpy_inputs_are_accepted():
    x, y, test = _data()
    arrays = [x.numpy().copy(), y.numpy().copy(), test.numpy().copy()]
    for a in arrays:
        a.setflags(write=False)
    det = GROOD().fit(arrays[0], arrays[1])
    assert det.score_samples(arrays[2]).shape == (25,)


def test_scoring_works_in_batches_of_batch_size(monkeypatch):
    x, y, test = _data()
    det = GROOD(batch_size=6).fit(x, y)
    seen = []
    real = det.index_.search

    def spy(queries, k):
        seen.append(queries.shape[0])
        return real(queries, k)

    monkeypatch.setattr(det.index_, "search", spy)
    det.score_samples(test)
    assert max(seen) <= 6 and sum(seen) == 25


# Bad input: every case raises before any work, with a message naming the problem.


def _bad_fit_cases():
    x, y, _ = _data()
    nan_x = x.clone()
    nan_x[5, 2] = float("nan")
    inf_x = x.clone()
    inf_x[[3, 9]] = float("inf")
    gap_y = y.clone()
    gap_y[gap_y == 2] = 3  # class 2 disappears
    return [
        ("nan-row", (nan_x, y), {}, ValueError, r"features contains NaN or Inf in row\(s\) 5"),
        ("inf-rows", (inf_x, y), {}, ValueError, r"row\(s\) 3, 9"),
        ("1d-features", (x[:, 0], y), {}, ValueError, "must be a 2-D array"),
        ("pooled-map", (x[:, :, None, None], y), {}, ValueError,
         r"got shape \(80, \d+, 1, 1\); a pooled feature map \[N, D, 1, \.\.\.\]: flatten "
         r"it to \[N, D\] \(torch: x.flatten\(1\); numpy: x.reshape\(len\(x\), -1\)\)"),
        ("int-features", (x.long(), y), {}, TypeError, "must be floating point"),
        ("empty", (x[:0], y[:0]), {}, ValueError, "features is empty"),
        ("no-columns", (x[:, :0], y), {}, ValueError, "features has zero columns"),
        ("float-labels", (x, y.float()), {}, TypeError, "labels must hold integer class ids"),
        ("bool-labels", (x, y > 1), {}, TypeError, "labels must hold integer class ids"),
        # ("labels must be a torch.Tensor or a numpy array, got NoneType" before)
        ("no-labels", (x, None), {}, TypeError, r"^labels is None: the fit needs each training "
                                                r"row's integer class id \(it makes a prototype "
                                                r"of every class from them\)$"),
        # ("unsupported dtype <U5" before: scikit-learn's estimators take class names)
        ("name-labels", (x, np.array(["cat", "dog", "heron", "mouse"])[y.numpy()]), {},
         TypeError, r"labels holds class names \('.*', '.*', '.*', '.*'\), not integer class "
                    r"ids 0..C-1: number them, e.g. names, ids = np.unique\(labels, "
                    r"return_inverse=True\)"),
        ("name-list-labels", (x, [f"c{int(v)}" for v in y]), {}, TypeError,
         "labels holds class names"),
        ("one-hot-labels", (x, torch.nn.functional.one_hot(y).float()), {}, TypeError,
         r"got dtype float32; for one-hot or soft-target labels \[N, C\] pass their class "
         r"ids, labels.argmax\(1\)"),
        ("column-labels", (x, y[:, None]), {}, ValueError,
         r"got shape \(80, 1\); pass a column of class ids as labels.reshape\(-1\)"),
        ("negative-label", (x, y - 1), {}, ValueError, "labels must be >= 0"),
        ("length-mismatch", (x, y[:-1]), {}, ValueError, "labels has 79 entries"),
        ("empty-class", (x, gap_y), {}, ValueError, r"class\(es\) 2 have no training samples"),
        ("label-vs-logits", (x, y), {"logits": torch.randn(80, 3)}, ValueError,
         r"class id 3, out of range for 3 classes \(the logits' columns\)"),
        ("logits-rows", (x, y), {"logits": torch.randn(79, 4)}, ValueError,
         "logits has 79 rows"),
        ("1d-logits", (x, y), {"logits": torch.randn(80)}, ValueError,  # not "[N, D]"
         r"logits must be a 2-D array \[N, C\], got shape \(80,\)"),
        ("nan-logits", (x, y), {"logits": torch.full((80, 4), float("nan"))}, ValueError,
         "logits contains NaN"),
        ("model-source-on-arrays", (x, y), {"source": "noise"}, ValueError,
         r"ood_prototype='noise' needs model in fit\(\); it runs the model .*: fit with "
         r"fit_model\(model, train_loader, \.\.\.\)"),
        ("missing-ood-features", (x, y), {"source": "features"}, ValueError,
         "needs ood_features"),
        ("unused-ood-features", (x, y), {"ood_features": torch.rand(3, 11)}, ValueError,
         "does not use it"),
        ("ood-features-dim", (x, y), {"source": "features", "ood_features": torch.rand(3, 4)},
         ValueError, "ood_features has 4 columns"),
        ("not-an-array", ("features", y), {}, TypeError, "must be a torch.Tensor or a numpy"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"),
                         [c[1:] for c in _bad_fit_cases()], ids=[c[0] for c in _bad_fit_cases()])
def test_bad_fit_input_is_named(args, kwargs, exc, match):
    kwargs = dict(kwargs)
    source = kwargs.pop("source", "mean")
    with pytest.raises(exc, match=match):
        GROOD(ood_prototype=source).fit(*args, **kwargs)


@pytest.mark.parametrize(("param", "value", "match"), [
    ("k", 0, "k must be a positive integer"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("backend", "cuda", "backend must be one of"),
    ("ood_prototype", "nearest", "unknown ood_prototype 'nearest'; available: features, mean"),
    ("ood_prototype", 3, "ood_prototype must be a source name"),
    ("precision", "fp8", "precision must be one of"),
])
def test_bad_parameters_are_named(param, value, match):
    x, y, _ = _data()
    with pytest.raises((ValueError, TypeError), match=match):
        GROOD(**{param: value}).fit(x, y)


@pytest.mark.parametrize(("param", "value", "match"), [
    ("precision", "fp32", r"got 'fp32' \(for 'fp32' pass 'ieee'\)$"),
    ("precision", "highest", r"got 'highest' \(for 'highest' pass 'ieee'\)$"),
    ("precision", "TF32", r"got 'TF32' \(for 'TF32' pass 'tf32'\)$"),
    ("precision", "bfloat16", r"got 'bfloat16' \(for 'bfloat16' pass 'bf16'\)$"),
    ("index", "ivf", r"got 'ivf' \(for 'ivf' pass 'faiss-ivf'\)$"),
    ("index", "flat", r"got 'flat' \(for 'flat' pass 'faiss-flat'\)$"),
    ("backend", "cuda", r"got 'cuda' \(backend picks the implementation: torch, or the Triton "
                        r"kernels; where it runs is device=...\)$"),
    ("device", "gpu", r"^device 'gpu' is not a device name: torch calls a GPU 'cuda'$"),
    ("device", "GPU:1", r"^device 'GPU:1' is not a device name: torch calls a GPU 'cuda:1'$"),
    ("device", "1", r"^device '1' is not a device name: a GPU by its index is 'cuda:1'$"),
    ("device", "auto", r"^device 'auto' is the command line's choice; in Python leave "
                       r"device=None \(the default\), which follows the device of the "
                       r"features given, or name one \('cuda', 'cpu'\)$"),
    ("precision", "fp8", r"got 'fp8'$"),  # (no hint where none is meant)
    ("index", "hnsw", r"got 'hnsw'$"),
    ("backend", "numpy", r"got 'numpy'$"),
])
def test_names_from_elsewhere_are_refused_with_the_one_meant(param, value, match):
    """Names other libraries use (torch's matmul precision "highest", dtype names, a device
    given as the backend, faiss' kinds without their prefix) were refused with the valid
    names alone; the error now says which one to pass. Unrelated names get no such hint."""
    x, y, _ = _data()
    with pytest.raises(ValueError, match=match):
        GROOD(**{param: value}).fit(x, y)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="an accelerator is present")
def test_an_accelerator_index_without_an_accelerator_is_named_as_one():
    """device=0 (torch's index of the current accelerator) was called "not a device name"."""
    x, y, _ = _data()
    with pytest.raises(ValueError, match=r"^device 0 is an accelerator index \('cuda:0' where "
                                         r"torch sees CUDA\), but this torch \(.*\) sees no "
                                         r"accelerator"):
        GROOD(device=0).fit(x, y)


def test_labels_of_minus_one_are_named_as_pytorch_oods_ood_mark():
    """pytorch-ood marks OOD samples with label -1: a training set holding some was refused
    with "must be >= 0, found -1" alone; the error counts them and says how to keep the
    others. Other negative ids get no such hint."""
    x, y, _ = _data()
    marked = y.clone()
    marked[[3, 8]] = -1
    with pytest.raises(ValueError, match=r"^labels must be >= 0, found -1 \(2 row\(s\) labelled "
                                         r"-1, as pytorch-ood marks OOD samples: keep the "
                                         r"others, e.g. features\[labels >= 0\] and "
                                         r"labels\[labels >= 0\]\)$"):
        GROOD().fit(x, marked)
    kept = marked >= 0
    assert GROOD().fit(x[kept], marked[kept]).n_train_ == len(y) - 2
    marked[3] = -2
    with pytest.raises(ValueError, match=r"^labels must be >= 0, found -2$"):
        GROOD().fit(x, marked)


def test_calibration_names_a_percentage_given_as_tpr():
    x, y, _ = _data()
    det = GROOD().fit(x, y)
    with pytest.raises(ValueError, match=r"^tpr is a fraction in \(0, 1\], got 95 \(for 95 %, "
                                         r"pass 0.95\)$"):
        det.calibrate(x, tpr=95)
    with pytest.raises(ValueError, match=r"got 0$"):
        det.calibrate(x, tpr=0)


def test_k_larger_than_index_is_refused():
    x, y, _ = _data()
    with pytest.raises(ValueError, match="k=500 but only"):
        GROOD(k=500).fit(x, y)


def test_k_raised_past_the_index_after_fit_is_refused():
    """Parameters may change after fit; a k past the indexed count would score every row
    -inf (the k-th neighbour missing) instead of failing."""
    x, y, test = _data()
    det = GROOD().fit(x, y)
    det.k = det.index_.ntotal + 1
    for method in (det.score_samples, det.score_and_predict):
        with pytest.raises(ValueError, match=f"k={det.k} but the index holds only"):
            method(test)
    with pytest.raises(ValueError, match=f"k={det.k} but the index holds only"):
        det.kneighbors(test)  # the detector's k is its default
    # What does not search for the k-th neighbour still works: predict, kneighbors with
    # its own n_neighbors.
    assert torch.equal(det.predict(test), GROOD().fit(x, y).predict(test))
    assert det.kneighbors(test, 2)[0].shape == (test.shape[0], 2)
    det.k = det.index_.ntotal  # the largest k that is still a score
    assert torch.isfinite(det.score_samples(test)).all()


def test_precision_set_after_fit_is_checked_and_used(monkeypatch):
    x, y, test = _data()
    det = GROOD().fit(x, y)
    det.precision = "fp8"
    with pytest.raises(ValueError, match="precision must be one of"):
        det.score_samples(test)
    seen = []
    real = ops.get_op("knn", "torch")
    monkeypatch.setattr(det.index_, "search", lambda q, k: (
        seen.append(det.index_.precision), real(q, det.index_.vectors, k))[1])
    blocks = grood._fit.searched_in_blocks  # (the check's search)
    monkeypatch.setattr(grood._fit, "searched_in_blocks", lambda index, *a: (
        seen.append(index.precision), blocks(index, *a))[1])
    det.precision = "bf16"
    det.score_samples(test)
    # The search's check in the new precision (as the fit's), then the scores' search.
    assert det._grads.precision == "bf16" and seen == ["bf16", "bf16"]
    det.score_samples(test)  # (checked once)
    assert seen == ["bf16"] * 3


def test_backend_set_after_fit_is_checked_and_used(monkeypatch):
    x, y, test = _data()
    det = GROOD().fit(x, y)  # auto: torch on the CPU
    want = det.score_samples(test)
    det.backend = "gpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        det.score_samples(test)
    det.backend = "triton"
    monkeypatch.setattr(ops, "triton_unavailable_reason", lambda *a, **k: "no triton here")
    with pytest.raises(RuntimeError, match="no triton here"):
        det.score_samples(test)
    monkeypatch.undo()
    if find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        det.backend = "triton"  # the kernels (interpreted here) give the same scores
        torch.testing.assert_close(det.score_samples(test), want, rtol=1e-5, atol=1e-5)
        assert det.backend_ == {"ncp_gradient": "triton", "knn": "triton"}
    det.backend = "torch"
    assert torch.equal(det.score_samples(test), want) and det.backend_["knn"] == "torch"


def test_no_correct_training_sample_is_refused():
    x, y, _ = _data()
    wrong = torch.nn.functional.one_hot((y + 1) % 4, 4).float()
    with pytest.raises(ValueError, match="no training sample is classified correctly"):
        GROOD().fit(x, y, logits=wrong)


@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda t: t[:, :5], ValueError, "has 5 columns but the detector was fitted on 11 "
                                     "features$"),
    (lambda t: t[:, :11].T, ValueError, r"has 25 columns but the detector was fitted on 11 "
                                        r"features; it has 11 rows: are its samples its "
                                        r"columns\? Pass features\.T"),
    (lambda t: t[3], ValueError, r"must be a 2-D array \[N, D\], got shape \(11,\); one "
                                 r"sample of 11 features is a row: pass "
                                 r"features\.reshape\(1, -1\)"),
    (lambda t: t[:, :8].reshape(25, 2, 2, 2), ValueError,
     r"got shape \(25, 2, 2, 2\); GROOD reads one vector per sample: pool the other axes "
     r"\(a CNN's feature map \[N, C, H, W\]: x\.mean\(\(2, 3\)\)"),
    (lambda t: torch.where(torch.arange(25)[:, None] == 7, float("nan"), t), ValueError,
     r"NaN or Inf in row\(s\) 7"),
    (lambda t: t[:0], ValueError, "features is empty"),
    (lambda t: t[:, :0], ValueError, "features has zero columns"),
    (lambda t: t.long(), TypeError, r"floating point \(float16, bfloat16, float32 or "
                                    r"float64\), got int64; convert them: "
                                    r"x\.astype\(np\.float32\) \(numpy\), x\.float\(\) \(torch\)"),
    (lambda t: t.numpy().astype(np.uint16), TypeError, r"got uint16; convert them: "
                                                        r"x\.astype\(np\.float32\)"),
    pytest.param(lambda t: t.numpy().astype(np.longdouble), TypeError,
                 r"unsupported dtype float(96|128); convert them: x\.astype\(np\.float64\)",
                 marks=pytest.mark.skipif(np.dtype(np.longdouble).itemsize == 8,
                                          reason="long double is float64 here")),
    (lambda t: t.numpy().astype(str), TypeError, r"unsupported dtype <U\d+; it holds text "
                                                 r"\(a file read as strings\?\): parse the "
                                                 r"numbers, x\.astype\(np\.float32\)"),
    (lambda t: [row.tolist() for row in t[:3]] + [[1.0]], ValueError,
     "features is not a rectangular array"),
    (lambda t: np.rec.fromarrays(t[:, :3].numpy().T, names="a,b,c"), TypeError,
     r"features is a structured array \(fields 'a', 'b', 'c'\): pass its fields as the "
     r"columns of one array, numpy\.lib\.recfunctions\.structured_to_unstructured\(features\)"),
])
def test_bad_score_input_is_named(make, exc, match):
    x, y, test = _data()
    det = GROOD(batch_size=4).fit(x, y)
    with pytest.raises(exc, match=match):
        det.score_samples(make(test))


def test_triton_backend_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y, _ = _data()
    with pytest.raises(ops.BackendUnavailableError, match="backend='triton' cannot run"):
        GROOD(backend="triton").fit(x, y)


# Saving and loading.


def test_save_load_round_trip_is_bit_exact(tmp_path):
    x, y, test = _data()
    det = GROOD(k=2, batch_size=9).fit(x, y, logits=torch.randn(80, 4) + 3 * torch.nn.functional
                                       .one_hot(y, 4))
    path = tmp_path / "det.safetensors"
    det.save(path)
    loaded = GROOD.load(path)
    assert loaded.k == 2 and loaded.batch_size == 9
    for name in ("class_prototypes_", "class_counts_", "ood_prototype_"):
        assert torch.equal(getattr(loaded, name), getattr(det, name))
    assert torch.equal(loaded.index_.vectors, det.index_.vectors)
    assert torch.equal(loaded.score_samples(test), det.score_samples(test))
    assert torch.equal(loaded.predict(test), det.predict(test))
    assert loaded.train_accuracy_ == det.train_accuracy_
    assert not list(tmp_path.glob("*.tmp"))


def test_a_loaded_detector_does_not_change_when_its_file_is_overwritten_in_place(tmp_path):
    """Loaded tensors were views of the file's memory map: writing other bytes into the same
    file (cp, a non-atomic writer) changed a loaded detector's scores silently, and
    truncating it would crash it with SIGBUS."""
    x, y, test = _data()
    path = tmp_path / "det.safetensors"
    GROOD().fit(x, y).save(path)
    loaded = GROOD.load(path)
    want = loaded.score_samples(test)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # every tensor zeroed, in the same inode
    with open(path, "r+b") as f:
        f.write(data)
    assert torch.equal(loaded.score_samples(test), want)
    with open(path, "r+b") as f:
        f.truncate(header)
    assert torch.equal(loaded.score_samples(test), want)


def test_custom_source_is_saved_by_name_and_params(tmp_path):
    @register_source
    class Shifted(OODPrototypeSource):
        name = "test-shifted"

        def __init__(self, offset: float = 0.0):
            self.offset = offset

        def params(self):
            return {"offset": self.offset}

        def build(self, ctx):
            return ctx.class_prototypes.mean(0) + self.offset

    x, y, test = _data()
    det = GROOD(ood_prototype=Shifted(0.25)).fit(x, y)
    det.save(tmp_path / "d.safetensors")
    loaded = GROOD.load(tmp_path / "d.safetensors")
    assert isinstance(loaded.ood_prototype, Shifted) and loaded.ood_prototype.offset == 0.25
    assert torch.equal(loaded.score_samples(test), det.score_samples(test))


@pytest.fixture
def saved(tmp_path):
    x, y, _ = _data()
    path = tmp_path / "det.safetensors"
    GROOD().fit(x, y).save(path)
    return path


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable grood detector file"):
        GROOD.load(saved)


def test_bit_flip_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum does not match"):
        GROOD.load(saved)


def test_other_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a grood detector file: it is a safetensors file "
                                         "grood did not write"):
        GROOD.load(path)


@pytest.mark.parametrize("kind", ["npz", "npy", "pt", "legacy pt"])
def test_a_feature_file_or_checkpoint_given_as_the_detector_is_named(tmp_path, kind):
    """Arguments given in the wrong order (``grood score features.npz detector.safetensors``)
    were reported as a damaged safetensors file with a 'header too large'."""
    path = tmp_path / f"features.{kind.split()[-1]}"
    x = np.zeros((3, 4), np.float32)
    if kind == "npz":
        np.savez(path, features=x)
    elif kind == "npy":
        np.save(path, x)
    else:
        torch.save({"features": torch.from_numpy(x)}, path,
                   _use_new_zipfile_serialization=kind == "pt")
    what = {"npz": "a zip archive, as NumPy writes .npz files", "npy": "a NumPy .npy array",
            "pt": "a zip archive", "legacy pt": "a pickle from torch.save's legacy format"}[kind]
    with pytest.raises(DetectorFileError, match=f"is not a grood detector file: it is {what}.*"
                                                 "a detector is the .safetensors file"):
        GROOD.load(path)


def test_garbage_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable grood detector file"):
        GROOD.load(junk)
    with pytest.raises(FileNotFoundError, match="no detector file"):
        GROOD.load(tmp_path / "absent.safetensors")


def test_future_format_version_is_refused(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["written_by"] == f"grood {__version__}"  # files name their writer
    meta.update(format_version="99", written_by="grood 9.0.0")
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(ValueError, match=r"format version 99 \(written by grood 9\.0\.0\); "
                                         r"this grood \(.+\) reads versions 1, 2, 3: read it with "
                                         "the grood that wrote it, or a newer one"):
        GROOD.load(saved)
    del meta["written_by"]  # one that does not say (as format version 1 files do not)
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(ValueError, match=r"format version 99; this grood"):
        GROOD.load(saved)


@pytest.mark.parametrize("field, value, said", [
    ("format", "other-tool", r"is not a grood detector file \(format 'other-tool', expected "),
    ("format_version", "two", r": invalid format_version 'two'"),
    ("params", "{not json", r" is corrupt: unreadable metadata"),
    ("state", "[1, 2]", r" is corrupt: unreadable metadata"),
])
def test_a_damaged_header_is_refused_by_load_and_info(saved, field, value, said):
    """A header field that says another format, or does not parse, is refused with what is
    wrong, both where loading reads it (which checks the digest over the settings first) and
    where ``grood info`` reads the header alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood.persistence import describe

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(saved), metadata={**meta, field: value})
    with pytest.raises(DetectorFileError, match=said):
        describe(saved)
    if field in ("params", "state"):  # covered by the digest, which loading checks first
        said = " is corrupt: its checksum does not match its contents"
    with pytest.raises(DetectorFileError, match=said):
        GROOD.load(saved)


def test_info_refuses_a_truncated_or_missing_file(saved):
    from grood.persistence import describe

    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(DetectorFileError, match="not a readable grood detector file"):
        describe(saved)
    with pytest.raises(FileNotFoundError, match="no detector file"):
        describe(saved.with_name("absent.safetensors"))


def test_tampered_metadata_is_refused(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["params"] = meta["params"].replace('"k": 1', '"k": 2')
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(ValueError, match="checksum does not match"):
        GROOD.load(saved)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_modes_keep_scores_and_survive_save(precision, tmp_path):
    x, y, test = _data(seed=8)
    ref = GROOD().fit(x, y)
    det = GROOD(precision=precision).fit(x, y)
    torch.testing.assert_close(det.score_samples(test), ref.score_samples(test),
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(det.predict(test), ref.predict(test))
    det.save(tmp_path / "d.safetensors")
    loaded = GROOD.load(tmp_path / "d.safetensors")
    assert loaded.precision == precision
    assert torch.equal(loaded.score_samples(test), det.score_samples(test))


def test_a_threshold_chosen_on_too_few_rows_is_warned_of():
    """calibrate on 5 rows at tpr=0.95 took their lowest score, which accepts about 83 % of
    new ID samples (± 14 points), without a word; the warning gives the acceptance
    threshold_acceptance models, and enough rows get none."""
    x, y, _ = _data(seed=3, n=120)
    val, _ = clustered_features(200, 4, 11, seed=50, spread=0.5, dtype=torch.float32)
    det = GROOD().fit(x, y)
    for n, tpr in ((5, 0.95), (20, 0.95), (1, 0.5)):
        mean, std = threshold_acceptance(n, tpr)
        with pytest.warns(UserWarning, match=rf"^the threshold was chosen on {n} row\(s\): of "
                                             rf"new in-distribution samples it accepts "
                                             rf"{100 * mean:.1f} ± {100 * std:.1f} % .*, not "
                                             rf"the {100 * tpr:g} % asked for; calibrate on "
                                             rf"more held-out rows \(1,000 give"):
            det.calibrate(val[:n], tpr=tpr)
        assert det.calibration_["n"] == n  # (chosen all the same)
    for n in (40, 200):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            det.calibrate(val[:n])


def test_calibrate_chooses_the_threshold_is_ood_flags_by(tmp_path):
    """The threshold accepts tpr of the held-out ID rows; is_ood is score < threshold in the
    input's type; it is saved, dropped by a new fit, and refused once the search it was chosen
    for changed (k) or on the training rows."""
    x, y, test = _data(seed=3, n=120)
    val, _ = clustered_features(60, 4, 11, seed=50, spread=0.5, dtype=torch.float32)
    det = GROOD().fit(x, y)
    with pytest.raises(NotFittedError, match=r"no threshold yet: call calibrate"):
        det.is_ood(test)
    assert det.calibrate(val, tpr=0.9) is det
    scores = det.score_samples(val)
    assert det.threshold_ in scores.tolist()
    assert (scores >= det.threshold_).float().mean() >= 0.9
    assert (scores > det.threshold_).float().mean() < 0.9  # the largest such threshold
    assert det.calibration_ == {"threshold": det.threshold_, "tpr": 0.9, "n": 60, "k": 1,
                                "nprobe": None}
    with pytest.raises(AttributeError):  # one threshold: the one saved and used
        det.threshold_ = -1.0
    flags = det.is_ood(test)
    assert flags.dtype == torch.bool
    assert torch.equal(flags, det.score_samples(test) < det.threshold_)
    np.testing.assert_array_equal(det.is_ood(test.numpy()), flags.numpy())

    det.save(tmp_path / "d.safetensors")
    loaded = GROOD.load(tmp_path / "d.safetensors")
    assert loaded.calibration_ == det.calibration_
    assert torch.equal(loaded.is_ood(test), flags)

    det.k = 2
    with pytest.raises(ValueError, match=r"another search \(k=1 -> 2\); set it back"):
        det.is_ood(test)
    det.k = 1
    det.fit(x, y)  # a new fit: the threshold belonged to the old one
    assert not hasattr(det, "threshold_")
    with pytest.raises(ValueError, match=r"score 0 \(their gradients are indexed training"):
        det.calibrate(x)
    with pytest.warns(UserWarning, match=r"10 of the 70 calibration rows equal indexed "
                                         r"training rows \(an indexed gradient at distance 0 "
                                         r"up to rounding, so they score 0\).*part of the "
                                         r"calibration set from "
                                         r"the training set.*raises the threshold"):
        det.calibrate(torch.cat([val, x[:10]]), tpr=0.9)
    det.fit(x, y)
    with pytest.raises(ValueError, match=r"tpr is a fraction"):
        det.calibrate(val, tpr=95)
    assert not hasattr(det, "threshold_")


@pytest.mark.parametrize("index", ["exact", "faiss-flat", "faiss-ivf"])
def test_calibrating_on_training_rows_is_named_at_every_k(index):
    """With k >= 2 a training row does not score 0 (its k-th neighbour is another row), but
    its nearest indexed gradient is its own, at distance 0: counted while scoring and named,
    on every index; held-out rows alone are not."""
    if index != "exact":
        pytest.importorskip("faiss")
    x, y, _ = _data(seed=3, n=120)
    val, _ = clustered_features(60, 4, 11, seed=50, spread=0.5, dtype=torch.float32)
    options = {"nlist": 4, "nprobe": 4} if index == "faiss-ivf" else None
    det = GROOD(k=3, index=index, index_options=options).fit(x, y)
    mixed = torch.cat([val, x[:10]])
    assert bool((det.score_samples(mixed) < 0).all())  # no score of 0 to go by
    with pytest.warns(UserWarning, match=r"10 of the 70 calibration rows equal indexed training "
                                         r"rows \(an indexed gradient at distance 0 up to "
                                         r"rounding, one of their k=3 neighbours\)"):
        det.calibrate(mixed, tpr=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.calibrate(val, tpr=0.9)
        det.score_samples(x)  # outside calibrate nothing is counted
    from grood.calibration import _COUNTING
    assert id(det) not in _COUNTING.__dict__.get("by_detector", {})
    # With k=1 the training rows score 0, and a threshold on them alone is refused, naming
    # tpr as given (numpy's float32 0.9 is 0.8999999761581421 as a float).
    with pytest.raises(ValueError, match=r"10 of the 10 calibration rows score 0 .* accepting "
                                         r"tpr=0\.9 of them would flag every new sample"):
        det.set_params(k=1).calibrate(x[:10], tpr=np.float32(0.9))


@pytest.mark.parametrize("index", ["exact", "faiss-flat", "faiss-ivf"])
def test_float64_training_rows_are_named_by_a_float32_detector(index):
    """float64 features are scored in float64 by a float32 detector: its training rows, given
    as float64 (numpy's default dtype), have gradients ~1e-15 from their float32 indexed ones,
    not at 0, so calibrating on them (or evaluating) went unnamed and chose a threshold of
    -4e-15 instead of being refused. They are counted now, to the detector's rounding; held-out
    float64 rows are not."""
    if index != "exact":
        pytest.importorskip("faiss")
    x, y, _ = _data(seed=3, n=120)
    val, _ = clustered_features(60, 4, 11, seed=50, spread=0.5, dtype=torch.float32)
    options = {"nlist": 4, "nprobe": 4} if index == "faiss-ivf" else None
    det = GROOD(index=index, index_options=options).fit(x, y)
    wide = x.double()
    assert bool((det.score_samples(wide[:10]) < 0).all())  # not 0: computed in float64
    with pytest.warns(UserWarning, match=r"10 of the 70 calibration rows equal indexed training "
                                         r"rows \(an indexed gradient at distance 0 up to "
                                         r"rounding, so they score 0\)"):
        det.calibrate(torch.cat([val.double(), wide[:10]]), tpr=0.9)
    with pytest.raises(ValueError, match=r"10 of the 10 calibration rows score 0 up to "
                                         r"rounding \(their gradients are indexed training"):
        det.calibrate(wide[:10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.calibrate(val.double(), tpr=0.9)
    ev_warned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(det, val.double(), ood={"train": wide[:60].numpy()})
        ev_warned = [str(w.message) for w in caught if "equal indexed training" in str(w.message)]
    assert len(ev_warned) == 1 and ev_warned[0].startswith("train: "), ev_warned


@pytest.mark.parametrize("sep,offset,dim", [(3.0, 0.0, 16), (30.0, 0.0, 8), (3.0, 1e5, 64),
                                            (3.0, 0.0, 2)])
def test_rounding_distance_holds_a_rows_own_gradient_and_no_new_ones(sep, offset, dim):
    """A float32 training row's float64 gradient lies within rounding_distance of the float32
    one the fit indexed (measured up to 1.08 units of ROUNDING_UNITS = 8); new rows' nearest
    indexed gradients lie far beyond it (1,060 units at the closest, on a 2-D set). Rows
    whose float32 gradients are subnormal (far classes, sep=30) are apart: not counted."""
    from grood._gradients import ROUNDING_UNITS, rounding_distance, subnormal_rows

    gen = torch.Generator().manual_seed(dim)
    n_classes = 3 if dim <= 8 else 6
    centres = sep * torch.randn((n_classes, dim), generator=gen, dtype=torch.float64)
    y = torch.arange(300) % n_classes

    def draw():
        noise = torch.randn((300, dim), generator=gen, dtype=torch.float64)
        return (centres[y] + noise + offset).float()

    x, new = draw(), draw()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (sep=30: the fit warns of its tiny gradients)
        det = GROOD().fit(x, y)
    for rows, own in ((x, True), (new, False)):
        res = det._grads.resolved(rows.double(), 0)
        tol = rounding_distance(res, torch.float32)
        for wide in (rounding_distance(res, torch.float64), subnormal_rows(res, torch.float64)):
            assert not bool(wide.any())
        sub = subnormal_rows(res, torch.float32)
        assert sep == 30.0 or not bool(sub.any())
        dists, found = det.kneighbors(rows.double(), 1)
        if own:
            mine = (found[:, 0] == torch.arange(300)) & ~sub
            assert int(mine.sum()) > 50
            assert bool((dists[mine, 0] <= tol[mine] / (ROUNDING_UNITS / 2) ** 2).all())
        else:
            assert bool((dists[~sub, 0] > 50 ** 2 * tol[~sub]).all())


def rewrite_with_digest(path, where, key, value):
    """Set ``meta[where][key] = value`` in a saved detector and give it a matching digest: a
    change the checksum cannot catch (another writer's defect), only the field checks."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood.persistence import digest

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    values = json.loads(meta[where])
    values[key] = value
    meta[where] = json.dumps(values)
    meta["digest"] = digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("bad", [{"threshold": 0.5, "tpr": 0.95, "n": 3, "k": 1, "nprobe": None},
                                 {"threshold": -1.0, "tpr": 1.5, "n": 3, "k": 1, "nprobe": None},
                                 {"threshold": -1.0, "tpr": 0.9, "n": 0, "k": 1, "nprobe": None},
                                 {"threshold": -1.0, "tpr": 0.9}, [1, 2]])
def test_a_damaged_saved_threshold_is_refused(tmp_path, bad):
    """A calibration that passes the checksum (rewritten with a new digest) but is not one
    calibrate() makes is refused by name, not used to flag samples."""
    x, y, _ = _data(seed=3)
    val, _ = clustered_features(30, 4, 11, seed=50, spread=0.5, dtype=torch.float32)
    path = tmp_path / "d.safetensors"
    GROOD().fit(x, y).calibrate(val).save(path)
    rewrite_with_digest(path, "state", "calibration", bad)
    with pytest.raises(ValueError, match="inconsistent: invalid calibration"):
        GROOD.load(path)


@pytest.mark.parametrize("bad", [["avgpool"], "avgpool", {"features": 3},
                                 {"features": "fc1", "row_order": "sorted"},
                                 {"features": None, "layer": "fc1"}])
def test_a_damaged_saved_layer_record_is_refused(tmp_path, bad):
    """fit_model's record (the layer read, whether the loader shuffled) that passes the
    checksum but is not one fit_model makes is refused by load and info alike; it loaded, and
    failed later in score_model or kneighbors ("'list' object has no attribute 'get'") or
    named a module that was never read."""
    from grood.persistence import describe

    x, y, _ = _data(seed=3)
    path = tmp_path / "d.safetensors"
    GROOD().fit(x, y).save(path)
    rewrite_with_digest(path, "state", "extractor", bad)
    for read in (GROOD.load, describe):
        with pytest.raises(DetectorFileError, match=r"is corrupt: invalid metadata "
                                                    r"state\.extractor="):
            read(path)


@pytest.mark.parametrize("where, key, bad, said", [
    ("state", "index_options", [1], r"is corrupt: invalid metadata state\.index_options=\[1\]"),
    ("params", "index_options", "x", r"invalid metadata params\.index_options='x'"),
    ("params", "ood_prototype", {"name": "mean", "params": [1]},
     r"invalid metadata params\.ood_prototype="),
    ("state", "dtype", "int8", r"invalid metadata state\.dtype='int8'"),
    ("state", "feature_names_in", ["a", "b"], r"invalid metadata state\.feature_names_in="),
    ("state", "feature_names_in", [1] * 11, r"invalid metadata state\.feature_names_in="),
    ("state", "index_options", {"nprobe": 4},
     r": its saved settings build no detector in this grood \(.*'nprobe'"),
    ("params", "ood_prototype", {"name": "noise", "params": {"blur": 1}},
     r": its saved settings build no detector in this grood \(.*'blur'"),
    ("state", "index", "hnsw", r"build no detector in this grood \(unknown index kind 'hnsw'"),
])
def test_saved_settings_that_build_nothing_are_refused_as_the_files_error(
        tmp_path, where, key, bad, said):
    """Settings that pass the checksum but are ill-typed, or that this grood does not take
    (an option, a source parameter, an index kind), are named as the file's error; they
    failed deep inside ("argument after ** must be a mapping", "unexpected keyword
    argument"), or loaded (features of dtype int8)."""
    x, y, _ = _data(seed=3)
    path = tmp_path / "d.safetensors"
    GROOD().fit(x, y).save(path)
    rewrite_with_digest(path, where, key, bad)
    with pytest.raises(DetectorFileError, match=f"^{re.escape(str(path))}.*{said}"):
        GROOD.load(path)


def test_logits_in_another_class_order_than_the_labels_are_named():
    """Logits whose columns follow another class order (a permuted label map) would index an
    arbitrary subset of the training rows: fit warns, naming both accuracies; logits in the
    labels' order do not warn."""
    import warnings

    x, y = clustered_features(300, 5, 12, seed=4, spread=0.3, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 5).float() * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GROOD().fit(x, y, logits=logits)
    shuffled = logits[:, torch.tensor([0, 2, 3, 4, 1])]  # class 0 keeps its column
    with pytest.warns(UserWarning, match=r"the logits classify 20\.0 % of the training rows "
                                         r"correctly, their nearest class prototype 100\.0 %"):
        GROOD().fit(x, y, logits=shuffled)
    none_right = logits[:, torch.tensor([1, 2, 3, 4, 0])]
    with pytest.raises(ValueError, match=r"no training sample is classified correctly.*"
                                         r"prototype gets 100\.0 % right: are the logits'"):
        GROOD().fit(x, y, logits=none_right)


def test_warnings_point_at_the_callers_line_on_every_path():
    """A warning names the line that called grood, whichever path led to it (each warning
    had a fixed stack level, right for one path: through fit_batches or fit_model the logits'
    warning named a line inside grood, through evaluate_model the evaluation's)."""
    import warnings

    from grood import evaluate, evaluate_model

    x, y = clustered_features(300, 5, 12, seed=4, spread=0.3, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 5).float()[:, torch.tensor([0, 2, 3, 4, 1])] * 3
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(12, 5))
    det = GROOD().fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its logits: the one it warns of below)
        on_net = GROOD().fit_model(net, [(x, y)], features="0")
    calls = [lambda: GROOD().fit(x, y, logits=logits),
             lambda: GROOD().fit_batches([(x, y, logits)]),
             lambda: GROOD().fit_model(net, [(x, y)], features="0"),
             lambda: evaluate(det, x, {"a": x[:50]}),
             lambda: evaluate_model(det, net, [(x,)], {"a": [(x,)]}, features="0"),
             lambda: on_net.attach(net, features="1")]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught and {w.filename for w in caught} == {__file__}, [
            (w.filename, str(w.message)[:60]) for w in caught]


def test_labels_in_another_order_than_the_features_are_named():
    """Features and labels read in different orders (a shuffled loader for one of them) give
    prototypes near the overall mean and an index of a chance sample of the rows: fit warns
    where the nearest prototype gets at most 1.5x the largest class's share right (what labels
    unrelated to the features can give), with or without logits; labels in the features' order
    do not warn, nor do two classes (chance is a half there)."""
    import warnings

    x, y = clustered_features(3000, 10, 8, seed=0, spread=0.6, dtype=torch.float32)
    shuffled = y[torch.randperm(3000, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right = GROOD().fit(x, y).train_accuracy_
    assert right > 0.7
    said = (r"the nearest class prototype classifies 1\d\.\d % of the training rows correctly, "
            r"about what labels unrelated to the features give \(the largest class holds "
            r"10\.0 % of the rows\): are the labels in the order of the feature rows")
    with pytest.warns(UserWarning, match=said):
        det = GROOD().fit(x, shuffled)
    assert det.train_accuracy_ < 0.15
    logits = torch.nn.functional.one_hot(shuffled, 10).float()  # the labels' own: agree
    with pytest.warns(UserWarning, match=said):
        GROOD().fit(x, shuffled, logits=logits)
    two = (y % 2)[torch.randperm(3000, generator=torch.Generator().manual_seed(1))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GROOD().fit(x, two)


def test_an_ood_prototype_on_a_class_prototype_is_named():
    """OOD features that are one class's rows put the OOD prototype on that class's
    prototype: GROOD cannot tell the class from OOD (on this data, fitted on 300 rows,
    held-out rows of that class against noise gave AUROC 0.36, where noise as the OOD
    features gives 0.95), and fit warns, naming the class; OOD features elsewhere, the mean
    source, and the ID set's own mean do not warn."""
    import warnings

    x, y = clustered_features(400, 4, 8, seed=0, spread=0.6, dtype=torch.float32)
    noise = 3 * torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    said = (r"the OOD prototype \(ood_prototype='features'\) coincides with class 2's "
            r"prototype \(distance [0-9.e-]+; the nearest two class prototypes lie [0-9.]+ "
            r"apart\): GROOD cannot tell class 2 from OOD")
    for rows in (x[y == 2], x[y == 2].half()):  # equal but for float16 rounding too
        with pytest.warns(UserWarning, match=said):
            GROOD(ood_prototype="features").fit(x, y, ood_features=rows)
    with pytest.warns(UserWarning, match=r"coincides with class 0's prototype \(distance 0; "
                                         r"the class prototype's norm is"):
        GROOD(ood_prototype="features").fit(x[y == 0], y[y == 0], ood_features=x[y == 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rows in (noise, x):
            GROOD(ood_prototype="features").fit(x, y, ood_features=rows)
        GROOD().fit(x, y)


def test_a_class_without_an_indexed_row_is_named():
    """A class none of whose training rows is classified as it (by the logits; by the nearest
    prototype without them) has no indexed gradient: its samples are scored by their distance
    to other classes' gradients, as OOD samples are (here its held-out rows against noise:
    AUROC 0.37, where the fit that indexes it gives 0.77). Fit warns, naming the
    class and its rows, without logits the nearest other prototype (a second label on one
    class's rows: 0 away), and the first ten of many such classes; a fit that indexes every
    class does not warn."""
    import warnings

    from grood import ood_metrics

    x, y = clustered_features(1200, 4, 8, seed=1, spread=0.5, dtype=torch.float64)
    noise = x.mean(0) + x.std() * torch.randn(300, 8, generator=torch.Generator().manual_seed(5),
                                              dtype=torch.float64)
    protos = torch.stack([x[:900][y[:900] == c].mean(0) for c in range(4)])
    logits = -torch.cdist(x, protos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = GROOD(k=1).fit(x[:900], y[:900], logits=logits[:900])
        GROOD(k=1).fit(x[:900], y[:900])
    never = logits.clone()
    never[:, 3] = -1e9  # a model that never predicts class 3
    n3 = int((y[:900] == 3).sum())
    with pytest.warns(UserWarning, match=(
            rf"^class 3 holds {n3} training rows but no indexed gradient: the logits classify "
            r"none of its rows as its class, so its samples are scored as OOD samples are, by "
            r"their distance to other classes' gradients only; are the logits' columns in the "
            r"labels' class order, and does the model predict this class\?$")):
        det = GROOD(k=1).fit(x[:900], y[:900], logits=never[:900])
    held = y[900:] == 3
    auroc = {name: ood_metrics(d.score_samples(x[900:][held]), d.score_samples(noise))["auroc"]
             for name, d in (("whole", whole), ("without class 3", det))}
    assert auroc["whole"] > 0.7 and auroc["without class 3"] < 0.5, auroc  # (0.77, 0.37)
    # Without logits: one class's rows under a second label as well (class 4).
    twice = torch.cat([x[:900], x[:900][y[:900] == 0]])
    labels = torch.cat([y[:900], torch.full((int((y[:900] == 0).sum()),), 4)])
    with pytest.warns(UserWarning, match=(
            r"^class 4 holds \d+ training rows but no indexed gradient: none of its rows lies "
            r"nearest its own class prototype \(the nearest other prototype of class 4: class "
            r"0's, 0 away\), so its samples .* are this class's rows another class's under a "
            r"second label")):
        again = GROOD(k=1).fit(twice, labels)
    assert int(again.indexed_rows_.max()) < 900  # (class 0's copies: never nearest)
    # Many such classes: the first ten named, and how many more.
    x, y = clustered_features(900, 15, 8, seed=2, spread=0.5, dtype=torch.float64)
    logits = -torch.cdist(x, torch.stack([x[y == c].mean(0) for c in range(15)]))
    logits[:, 3:] = -1e9  # a model that predicts classes 0, 1 and 2 only
    with pytest.warns(UserWarning, match=(
            r"^classes 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 2 more \(12 of 15 classes\) hold "
            rf"{int((y >= 3).sum())} training rows but no indexed gradient: the logits "
            r"classify none of their rows as their class, so their samples")):
        GROOD(k=1).fit(x, y, logits=logits)


def test_the_ood_prototype_check_skips_the_pairwise_distances_where_a_bound_settles_it(
        monkeypatch):
    """The coincidence check compares the OOD prototype's distance to its nearest class with
    the nearest two classes' distance. The distance from that class to its own nearest
    bounds the latter from above, so where the OOD prototype lies beyond the threshold on the
    bound no C x C distances are computed (torch.pdist over 21,841 prototypes took 19 s of a
    42 s fit on 2 cores); where it does not settle it, they decide as before."""
    import warnings

    from grood._fit import check_ood_prototype_apart

    pdist_calls = []
    pdist = torch.pdist
    monkeypatch.setattr(torch, "pdist", lambda x: (pdist_calls.append(x.shape), pdist(x))[1])
    protos = torch.tensor([[100.0, 0.0], [0.0, 0.0], [0.0, 0.001], [50.0, 50.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ood_prototype_apart(protos, torch.tensor([30.0, 20.0]), "features")
        assert pdist_calls == []  # apart: the bound settles it
        # 0.05 from class 0, whose nearest class lies 70.7 away (threshold 0.07 on the
        # bound), but classes 1 and 2 lie 0.001 apart: no coincidence, found by pdist
        check_ood_prototype_apart(protos, torch.tensor([100.05, 0.0]), "features")
        assert pdist_calls == [(4, 2)]
    with pytest.warns(UserWarning, match=r"coincides with class 1's prototype \(distance "
                                         r"1e-07; the nearest two class prototypes lie 0\.001"):
        check_ood_prototype_apart(protos, torch.tensor([0.0, 1e-7], dtype=torch.float64),
                                  "features")
    assert len(pdist_calls) == 2


@pytest.mark.gpu  # its CUDA half runs in bench/gpu_check.sh; the rest runs anywhere
def test_gpu_features_scored_by_a_detector_in_host_memory_are_named():
    """A detector loaded without device= lives in host memory; features on a GPU were then
    copied to the CPU batch by batch and scored there, silently. The note names both devices
    and the way out; features in host memory going to a detector's GPU are the usual path."""
    from grood.detector import elsewhere_note

    note = elsewhere_note(torch.device("cuda:1"), torch.device("cpu"))
    assert note is not None and "features are on cuda:1, the detector in host memory" in note
    assert "GROOD.load(path, device='cuda:1')" in note
    assert elsewhere_note(torch.device("cpu"), torch.device("cuda:0")) is None
    assert elsewhere_note(torch.device("cpu"), torch.device("cpu")) is None
    assert elsewhere_note(torch.device("cuda:0"), torch.device("cuda:0")) is None
    # Apple's GPU: the CPU is where grood computes (no float64 on MPS), nothing to move.
    assert elsewhere_note(torch.device("mps"), torch.device("cpu")) is None
    x, y, test = _data(seed=4)
    det = GROOD().fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.score_samples(test)  # both in host memory: nothing to say
        if torch.cuda.is_available():
            GROOD(device="cuda").fit(x, y).score_samples(test)
    if torch.cuda.is_available():
        with pytest.warns(UserWarning, match=r"features are on cuda:0, the detector in host"):
            got = det.score_samples(test.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), det.score_samples(test))
        with warnings.catch_warnings():  # once per detector
            warnings.simplefilter("error")
            det.score_samples(test.cuda())


@pytest.mark.parametrize("index, options", [
    ("exact", None), ("exact", {"storage": "bfloat16"}), ("faiss-flat", None),
    ("faiss-ivf", {"nlist": 4, "nprobe": 4})], ids=["exact", "exact-bf16", "flat", "ivf"])
def test_a_moved_detector_gives_the_same_answers_and_keeps_its_threshold(index, options):
    """``to(device)`` rebuilds the fitted state on the device from the detector's own state
    (the path every move takes; run here onto the CPU it is on): the same scores, classes and
    flags bit for bit, the threshold, parameters and feature settings kept, a new index."""
    from grood.persistence import move

    if index != "exact":
        pytest.importorskip("faiss")
    x, y, test = _data(seed=6, n=120)
    det = GROOD(k=2, index=index, index_options=options, batch_size=16).fit(x, y)
    det.calibrate(test[:20], tpr=0.9)
    det.extractor_ = {"layer": "avgpool"}  # what fit_model records
    scores, pred = det.score_and_predict(test)
    flags, params, old_index = det.is_ood(test), det.get_params(), det.index_
    move(det, torch.device("cpu"))
    assert det.index_ is not old_index and det.index_.kind == index
    assert torch.equal(det.score_samples(test), scores) and torch.equal(det.predict(test), pred)
    assert torch.equal(det.is_ood(test), flags)
    assert det.get_params() == params and det.extractor_ == {"layer": "avgpool"}
    assert det.calibration_["tpr"] == 0.9 and det.device_ == torch.device("cpu")
    same = det.index_
    assert det.to("cpu") is det and det.index_ is same  # where it is already: nothing to do
    assert det.to("cpu:1").index_ is same and det.device_ == torch.device("cpu")


def test_moving_a_detector_fails_clearly_and_leaves_it_as_it_was(monkeypatch):
    """An unfitted detector, no device, a device that is not there, and a backend that cannot
    run where it is moved to are named; a failed move changes nothing."""
    from grood.errors import BackendUnavailableError
    from grood.persistence import move

    with pytest.raises(NotFittedError, match="not fitted yet"):
        GROOD().to("cpu")
    x, y, test = _data(seed=7)
    det = GROOD().fit(x, y)
    with pytest.raises(ValueError, match="to\\(\\) needs a device"):
        det.to(None)
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        det.to("gpu0")
    with pytest.raises(ValueError, match="'cuda:7'"):
        det.to("cuda:7")
    det.precision = "fp8"
    with pytest.raises(ValueError, match="precision must be one of"):
        det.to("cpu")
    det.precision = "ieee"
    scores, index = det.score_samples(test), det.index_

    def no_triton(op, device, dtype=None, precision=None):
        return "no Triton on this machine (simulated)"

    monkeypatch.setattr(ops, "triton_unavailable_reason", no_triton)
    det.backend = "triton"
    with pytest.raises(BackendUnavailableError, match=r"to move it to cpu, set det\.backend = "
                                                      r"'auto' \(or 'torch'\) first"):
        move(det, torch.device("cpu"))
    assert det.index_ is index and det.backend_ == {"ncp_gradient": "torch", "knn": "torch"}
    det.backend = "auto"
    assert torch.equal(det.score_samples(test), scores)


@pytest.mark.gpu  # run by bench/gpu_check.sh's torch-path step
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fits_on_the_gpu_are_reproducible_bit_for_bit(dtype):
    """The class sums are added in a fixed order on the GPU too (index_add_'s atomics would
    make float64 sums, and so prototypes, differ in their last bits between fits): three fits
    of 20,000 rows give the same prototypes, index and scores bit for bit, and prototypes
    equal to the CPU's float64 means within rounding."""
    x, y = clustered_features(20_000, 7, 48, seed=11, spread=0.5, dtype=dtype)
    test, _ = clustered_features(300, 7, 48, seed=12, spread=0.8, dtype=dtype)
    fits = [GROOD(device="cuda", backend="torch", batch_size=4096).fit(x, y) for _ in range(3)]
    scores = [det.score_samples(test.cuda()) for det in fits]
    for det, s in zip(fits[1:], scores[1:], strict=True):
        assert torch.equal(det.class_prototypes_, fits[0].class_prototypes_)
        assert torch.equal(det.ood_prototype_, fits[0].ood_prototype_)
        assert torch.equal(det.index_.vectors, fits[0].index_.vectors)
        assert torch.equal(s, scores[0])
    means = torch.stack([x[y == c].double().mean(0) for c in range(7)])
    torch.testing.assert_close(fits[0].class_prototypes_.cpu().double(), means,
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.gpu  # run by bench/gpu_check.sh's torch-tests step
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_detector_fitted_in_tf32_on_a_cpu_is_checked_again_on_the_gpu(tmp_path):
    """On a CPU tf32 computes in fp32, so a fit there in tf32 checks its search in fp32: at
    distance/spread 186 it resolves the far-prototype gradients, where a GPU's tf32 GEMM
    (emulated: 60 of 64 missed) does not. Moved to the GPU, or loaded there, the search is
    checked again in tf32, and the index held less the gradients' mean; a head made on the
    CPU and moved to the GPU is warned of."""
    from grood._bench.common import far_prototype_data, far_prototype_float64_scores

    x, y, ood, test = far_prototype_data(100)
    want = far_prototype_float64_scores(x, y, ood, test)
    det = GROOD(ood_prototype="features", precision="tf32", progress=False).fit(
        x, y, ood_features=ood)
    assert det.index_.centre is None
    head = det.as_module()
    with pytest.warns(UserWarning, match=r"moved to cuda:0, the head's index no longer "
                                         r"resolves .* make the head there from the detector"):
        head.cuda()
    det.save(tmp_path / "det.safetensors")
    for there in (GROOD.load(tmp_path / "det.safetensors", device="cuda"), det.to("cuda")):
        assert there.index_.centre is not None
        got = there.score_samples(torch.as_tensor(test).cuda()).cpu().numpy()
        assert np.abs(got - want).max() < 1e-2 * np.ptp(want)


@pytest.mark.gpu  # its CUDA half runs in bench/gpu_check.sh; the rest runs anywhere
def test_a_detector_moved_to_the_gpu_and_back_scores_as_before():
    """Fitted in host memory, moved to the GPU: the features' own device scores without a
    note, within rounding of the CPU's scores, with the same classes and threshold; moved
    back, bit for bit the detector it was."""
    x, y, test = _data(seed=8)
    det = GROOD().fit(x, y)
    det.calibrate(test[:15], tpr=0.9)
    scores, pred = det.score_and_predict(test)
    near = det.kneighbors(test, 2)[1]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            det.to("cuda")
        assert torch.equal(det.score_samples(test), scores)
        return
    assert det.to("cuda") is det and det.device_.type == "cuda"
    assert det.class_prototypes_.is_cuda and det.index_.vectors.is_cuda
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # features where the detector is: nothing to say
        got, got_pred = det.score_and_predict(test.cuda())
    torch.testing.assert_close(got.cpu(), scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_pred.cpu(), pred) and det.threshold_ == det.calibration_["threshold"]
    assert det.indexed_rows_.is_cuda and torch.equal(det.kneighbors(test.cuda(), 2)[1].cpu(), near)
    fitted_there = GROOD().fit(x.cuda(), y.cuda())  # rows recorded on the GPU
    assert torch.equal(fitted_there.indexed_rows_.cpu(), det.indexed_rows_.cpu())
    det.to("cpu")
    assert torch.equal(det.score_samples(test), scores)
