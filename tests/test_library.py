"""grood inside torch programs: the torch.ops.grood custom ops, the GROOD head, attach()."""

from __future__ import annotations

import copy
import os
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import clustered_features
from torch import nn

from grood import GROOD, NotFittedError, functional
from grood.head import GROODHead, as_module, capture_cuda_graph

OPS = torch.ops.grood
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _data(n=37, c=5, d=9, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.rand(n, d, generator=gen, dtype=torch.float64).to(dtype)
    protos = torch.rand(c, d, generator=gen, dtype=torch.float64).to(dtype)
    return h, protos, protos.mean(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_on_the_torch_implementation(dtype):
    h, protos, p_ood = _data(dtype=dtype)
    torch.library.opcheck(OPS.ncp_gradient.default, (h, protos, p_ood),
                          {"precision": "ieee", "backend": "torch"})
    res = OPS.ncp_gradient(h, protos, p_ood)
    torch.library.opcheck(OPS.resolve_rows.default, (h, protos, p_ood, *res))
    db = torch.rand(23, 9, dtype=dtype)
    torch.library.opcheck(OPS.knn.default, (h, db, 3), {"backend": "torch"})
    norms = (db.double() ** 2).sum(1).to(dtype)
    torch.library.opcheck(OPS.knn.default, (h, db, 2),
                          {"database_sq_norms": norms, "backend": "torch"})


@pytest.mark.skipif(not INTERPRETER, reason="the Triton registration runs under the interpreter")
def test_opcheck_on_the_triton_kernels():
    h, protos, p_ood = _data(n=19, c=6, d=16)
    torch.library.opcheck(OPS.ncp_gradient.default, (h, protos, p_ood),
                          {"precision": "ieee", "backend": "triton"})
    torch.library.opcheck(OPS.knn.default, (h, torch.rand(21, 16), 2),
                          {"precision": "tf32x3", "backend": "triton"})


def _refuse_host_reads(monkeypatch):
    """Make every tensor-to-Python conversion fail (until ``monkeypatch.undo()``)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.skipif(not INTERPRETER, reason="the Triton launchers run under the interpreter")
def test_triton_launchers_read_no_tensor_value_on_the_host(monkeypatch):
    """Nothing in the Triton path of either op turns a tensor into a Python value (which on
    a GPU waits for the device and breaks CUDA-graph capture); only the prototypes' cached
    facts are computed on first use, so one warm call comes first."""
    from grood_kernels.knn import knn
    from grood_kernels.ncp_gradient import ncp_gradient

    h, protos, p_ood = _data(n=37, c=5, d=20)
    db = torch.rand(50, 20)
    first = ncp_gradient(h, protos, p_ood, precision="tf32")

    _refuse_host_reads(monkeypatch)
    again = ncp_gradient(h * 3.0, protos, p_ood, precision="tf32")
    dist, idx = knn(again.grad, db, 4, precision="tf32")
    monkeypatch.undo()
    assert dist.shape == (37, 4) and bool((idx >= 0).all())
    assert not torch.equal(again.grad, first.grad)


def test_ops_equal_the_functional_twins():
    h, protos, p_ood = _data()
    want = functional.ncp_gradient(h, protos, p_ood)
    got = OPS.ncp_gradient(h, protos, p_ood, "ieee", None, "torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    d, i = OPS.knn(h, protos, 2, "ieee", None, None, "torch")
    wd, wi = functional.knn(h, protos, 2)
    assert torch.equal(d, wd) and torch.equal(i, wi)


def test_resolve_rows_refuses_nan_and_recomputes_far_rows():
    h, protos, p_ood = _data()
    bad = h.clone()
    bad[4, 2] = float("nan")
    res = OPS.ncp_gradient(h, protos, p_ood)
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) 4"):
        OPS.resolve_rows(bad, protos, p_ood, *res)
    far = h.clone()
    far[3] = 1e5  # distances far beyond what the float32 softmax resolves
    res = OPS.ncp_gradient(far, protos, p_ood)
    fixed = OPS.resolve_rows(far, protos, p_ood, *res)
    ref = functional.ncp_gradient(far.double(), protos.double(), p_ood.double())
    torch.testing.assert_close(fixed[1].double(), ref.q_ood, rtol=1e-5, atol=0)
    assert torch.equal(fixed[2], ref.pred)


@pytest.mark.parametrize("tracked", ["h", "prototypes"])
def test_ops_run_on_tracked_inputs_and_refuse_a_backward_pass_by_name(tracked):
    """The ops are not differentiable: they run forward on tensors autograd tracks, and a
    backward pass through their outputs raises grood's error naming the op and the fix (it was
    torch's "no autograd formula was registered", which suggests writing one)."""
    h, protos, p_ood = _data()
    res = OPS.ncp_gradient(h, protos, p_ood)
    calls = {"ncp_gradient": lambda a, b: OPS.ncp_gradient(a, b, p_ood),
             "resolve_rows": lambda a, b: OPS.resolve_rows(a, b, p_ood, *res),
             "knn": lambda a, b: OPS.knn(a, b, 2)}
    for name, call in calls.items():
        want = call(h, protos)
        a, b = ((h.clone().requires_grad_(True), protos) if tracked == "h"
                else (h, protos.clone().requires_grad_(True)))
        got = call(a, b)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
        with pytest.raises(ValueError, match=rf"torch\.ops\.grood\.{name} is not "
                                             r"differentiable .* under torch\.no_grad\(\)"):
            got[0].sum().backward()


@pytest.fixture(scope="module")
def fitted():
    x, y = clustered_features(240, 4, 12, seed=5, dtype=torch.float32)
    test = torch.cat([clustered_features(40, 4, 12, seed=6, dtype=torch.float32)[0],
                      3 * torch.rand(20, 12)])
    return GROOD(k=3).fit(x, y), test


def test_head_gives_the_detectors_scores(fitted):
    det, test = fitted
    head = det.as_module()
    want_s, want_p = det.score_and_predict(test)
    score, pred = head(test)
    assert torch.equal(score, want_s) and torch.equal(pred, want_p)
    # float64 features are scored in float64, as the detector does.
    s64, p64 = head(test.double())
    w64, wp64 = det.score_and_predict(test.double())
    assert s64.dtype == torch.float64 and torch.equal(s64, w64) and torch.equal(p64, wp64)


@pytest.mark.parametrize("k", [0, 10**6])
def test_head_refuses_a_k_set_beyond_its_index(fitted, k):
    """k set after construction past the indexed count would leave the k-th neighbour
    missing: a -inf score for every row, not a score."""
    det, test = fitted
    head = det.as_module()
    head.k = k
    with pytest.raises(ValueError, match=f"k={k} but the index holds"):
        head(test)


@pytest.mark.parametrize("k", [2.0, True, torch.tensor(2)], ids=["float", "bool", "tensor"])
def test_head_refuses_a_k_that_is_not_an_integer(fitted, k):
    """A k set after construction that is not an int gets a clear error in the forward (a
    float used to reach the custom op's schema check; a numpy integer works)."""
    det, test = fitted
    head = det.as_module()
    want = head(test)[0]
    head.k = np.int64(det.k)
    assert torch.equal(head(test)[0], want)
    head.k = k
    with pytest.raises(ValueError, match="k must be a positive Python or numpy integer"):
        head(test)


def test_head_names_features_of_the_wrong_shape(fitted):
    """Features of another width were reported as the prototypes' dimension being wrong,
    integer features as a wrong "h", and a NumPy array as a missing attribute."""
    det, test = fitted
    head = det.as_module()
    d = test.shape[1]
    for bad in (test[:, :-1], test.reshape(-1), test[:, :, None]):
        with pytest.raises(ValueError, match=rf"features must have shape \[N, {d}\]"):
            head(bad)
    # Each shape a caller's own code gives by mistake gets the way out the detector's
    # methods give (grood._checks.shape_hint; the head said the shape alone).
    row, n = test[0], test.shape[0]
    pool = "GROOD reads one vector per sample: pool the other axes"
    for bad, hint in ((row, f"one sample of {d} features is a row: pass "
                            "features.reshape(1, -1)"),
                      (test[:, :, None], "a pooled feature map [N, D, 1, ...]: flatten it"),
                      (test[:, None, :].expand(n, 5, d), pool),
                      (test[:, :, None, None].expand(n, d, 3, 3), pool),
                      (test.new_zeros(d, d + 1), f"it has {d} rows: are its samples its "
                                                 "columns? Pass features.T")):
        with pytest.raises(ValueError, match=re.escape(f"; {hint}")):
            head(bad)
    with pytest.raises(ValueError, match=r"got \(\d+, \d+\)$"):
        head(test[:, :-1])  # (another width: no hint)
    with pytest.raises(TypeError, match=r"features must be floating point, got torch\.int64"):
        head(test.long())  # the op named its own argument, "h"
    with pytest.raises(TypeError, match=r"features must be a torch\.Tensor, got ndarray"):
        head(test.numpy())  # it failed on a missing attribute, is_floating_point
    with pytest.raises(ValueError, match=r"prototypes has dimension \d+, expected \d+ \(the "
                                         r"dimension of h\)"):
        functional.ncp_gradient(test[:, :-1], det.class_prototypes_, det.ood_prototype_)


def test_head_refuses_a_state_that_does_not_fit_together():
    """A head built directly from tensors: mismatched widths failed in torch's broadcasting
    or were blamed on "queries", NaN prototypes were reported as far features at the first
    forward, and k=0 was accepted until then; each is named at construction now."""
    protos, p_ood, vectors = torch.rand(3, 4), torch.rand(4), torch.rand(10, 4)
    nan_protos = protos.clone()
    nan_protos[1, 2] = float("nan")
    for args, kwargs, match in [
        ((protos, torch.rand(5), vectors), {}, r"ood_prototype must be a floating-point "
                                               r"vector \[4\]"),
        ((protos, p_ood, torch.rand(10, 5)), {}, "index_vectors have dimension 5, the "
                                                 "prototypes 4"),
        ((protos[0], p_ood, vectors), {}, "class_prototypes must be a 2-D array"),
        ((nan_protos, p_ood, vectors), {}, r"class_prototypes contains NaN or Inf in row\(s\) 1"),
        ((protos, p_ood, vectors), {"k": 0}, "k must be a positive integer"),
        ((protos, p_ood, vectors), {"precision": "fp8"}, "precision must be one of"),
        ((protos, p_ood, vectors), {"backend": "cuda"}, "backend must be one of"),
        ((protos, p_ood, vectors), {"index_storage": vectors[:5].bfloat16()},
         "index_storage must be a floating-point copy of index_vectors"),
        ((protos, p_ood, vectors), {"index_storage": vectors.flip(0).bfloat16()},
         "index_storage is not a rounded copy of index_vectors"),
    ]:
        with pytest.raises(ValueError, match=match):
            GROODHead(*args, **kwargs)


def test_head_with_half_precision_index_storage():
    x, y = clustered_features(200, 4, 12, seed=7, dtype=torch.float32)
    det = GROOD(index_options={"storage": "bfloat16"}).fit(x, y)
    head = det.as_module()
    assert head.index_storage.dtype == torch.bfloat16
    assert torch.equal(head(x)[0], det.score_samples(x))


@pytest.mark.parametrize("fitted_in", [np.float32, np.float64])
def test_a_head_searches_float64_features_as_the_detector_does_through_its_stored_copy(
        fitted_in, monkeypatch):
    """float64 features, an index searched through a bfloat16 copy: the detector takes the
    candidates from the copy and re-ranks them on the exact rows; the head searched the
    exact rows whole. Where the copy's candidates leave out a nearer row (an OOD prototype
    far outside the features: the copy rounds each gradient by 2**-8 of its distance from
    their mean), their scores differed, by up to 0.2 % of the spread, where the head is the
    detector's bit for bit. The head now searches as the detector does. (With the extra
    candidates a centred index's rounded search asks for, the copy's candidates find the
    exact rows' neighbours here: the test asks for none, so that they differ.)"""
    import grood.index
    from grood._bench.common import far_prototype_data

    monkeypatch.setattr(grood.index, "CENTRED_EXTRA", 0)

    x, y, ood, test = far_prototype_data(30)
    det = GROOD(k=3, ood_prototype="features", index_options={"storage": "bfloat16"}).fit(
        x.astype(fitted_in), y, ood_features=ood.astype(fitted_in))
    assert det.index_.centre is not None  # (the fit held it less the gradients' mean)
    wide = torch.as_tensor(test, dtype=torch.float64)
    exact = GROOD(k=3, ood_prototype="features").fit(
        x.astype(fitted_in), y, ood_features=ood.astype(fitted_in)).score_samples(wide)
    want = det.score_samples(wide)
    assert not torch.equal(want, exact)  # (the copy's candidates matter here)
    assert torch.equal(det.as_module()(wide)[0], want)


def test_a_head_made_with_copy_false_holds_the_index_itself():
    """A head copied the detector's index (and its stored copy), so a detector and its head
    held it twice, as did every export. copy=False holds the tensors themselves, scoring the
    same; an index made under inference_mode is still copied (an inference tensor cannot be
    a head's buffer); copy must be a bool. A state loaded into such a head is written into
    tensors of its own, not into the detector's index."""
    x, y = clustered_features(200, 4, 12, seed=7, dtype=torch.float32)
    det = GROOD(k=2, index_options={"storage": "bfloat16"}).fit(x, y)
    stored = det.index_._searched()
    copied, shared = det.as_module(), as_module(det, copy=False)
    assert shared.index_vectors.data_ptr() == det.index_.vectors.data_ptr()
    assert shared.index_storage.data_ptr() == stored.data_ptr()
    assert copied.index_vectors.data_ptr() != det.index_.vectors.data_ptr()
    for a, b in zip(shared(x), copied(x), strict=True):
        assert torch.equal(a, b)
    with torch.inference_mode():
        vectors = det.index_.vectors.clone()
    assert vectors.is_inference()
    made = GROODHead(det.class_prototypes_, det.ood_prototype_, vectors, k=2, copy=False)
    assert not made.index_vectors.is_inference()
    assert torch.equal(made(x)[0], copied(x)[0])
    with pytest.raises(ValueError, match="copy must be True or False"):
        GROODHead(det.class_prototypes_, det.ood_prototype_, vectors, copy=1)
    # A state loaded into the sharing head goes into tensors of its own: the detector's index
    # (and so its scores) stay as they were.
    index, scores = det.index_.vectors.clone(), det.score_samples(x)
    other = GROODHead(det.class_prototypes_, det.ood_prototype_, index.flip(0), k=2,
                      index_storage=stored.flip(0))
    shared.load_state_dict(other.state_dict())
    assert torch.equal(shared.index_vectors, index.flip(0))
    assert torch.equal(shared.index_storage, stored.flip(0))
    assert torch.equal(det.index_.vectors, index) and torch.equal(det.index_._searched(), stored)
    assert torch.equal(det.score_samples(x), scores)
    assert torch.equal(shared(x)[0], other(x)[0])


def test_head_state_dict_round_trip_and_to(fitted):
    det, test = fitted
    head = det.as_module()
    # A head of the same shapes, all zeros, takes the saved buffers and scores the same.
    fresh = GROODHead(torch.zeros_like(head.class_prototypes), torch.zeros(12),
                      torch.zeros_like(head.index_vectors), k=3)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh(test)[0], head(test)[0])
    assert set(head.state_dict()) == {"class_prototypes", "ood_prototype", "prototype_sq_norms",
                                      "index_vectors", "index_sq_norms"}
    wide = det.as_module().to(torch.float64)
    assert wide.index_vectors.dtype == torch.float64
    torch.testing.assert_close(wide(test.double())[0], det.score_samples(test.double()))


def _spoil(state, other, name, how):
    """``state`` with its entry ``name`` taken from ``other``, given a NaN, or tripled."""
    if how == "other fit":
        state[name] = other[name]
    elif how == "nan":
        state[name] = state[name].clone()
        state[name].view(-1)[1] = float("nan")
    else:
        state[name] = state[name] * 3


@pytest.mark.parametrize("name,how,match", [
    ("class_prototypes", "nan", r"class_prototypes contains NaN or Inf in row\(s\) 0"),
    ("class_prototypes", "other fit", "prototype_sq_norms are not the squared norms of the "
                                      "state's prototypes"),
    ("ood_prototype", "other fit", "prototype_sq_norms are not"),
    ("prototype_sq_norms", "nan", r"prototype_sq_norms are not .* at 1 \(given nan"),
    ("prototype_sq_norms", "scaled", "prototype_sq_norms are not"),
    ("index_vectors", "nan", r"index_vectors contains NaN or Inf in row\(s\) 0"),
    ("index_vectors", "other fit", "index_storage is not a rounded copy of index_vectors"),
    ("index_sq_norms", "scaled", "index_sq_norms are not the squared norms of the state's "
                                 "index_vectors"),
    ("index_storage", "other fit", "index_storage is not a rounded copy of index_vectors"),
])
def test_head_refuses_a_corrupt_or_mismatched_state(name, how, match):
    """A state dict with NaN, norms of other prototypes or another index, or buffers from two
    fits loaded silently and scored wrong (the forward reads no value): it is refused, naming
    the reason, and the head keeps its state."""
    def head_of(seed):
        x, y = clustered_features(120, 4, 12, seed=seed, dtype=torch.float32)
        return GROOD(k=2, index_options={"storage": "bfloat16"}).fit(x, y).as_module()

    head, other = head_of(5), head_of(8)
    test = clustered_features(30, 4, 12, seed=6, dtype=torch.float32)[0]
    before = head(test)
    state = head.state_dict()
    _spoil(state, other.state_dict(), name, how)
    with pytest.raises(RuntimeError, match=match):
        head.load_state_dict(state)
    for a, b in zip(head(test), before, strict=True):
        assert torch.equal(a, b)
    head.load_state_dict(other.state_dict())  # a whole other fit loads
    assert torch.equal(head(test)[0], other(test)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_head_derives_its_norms_from_its_own_buffers(backend, dtype):
    """``.to(half)`` converted the squared norms with the prototypes: float16 norms past 65504
    were inf (every row unresolvable in float32: NaN with checks="flag"), bfloat16 ones were
    the unconverted prototypes' norms, rounded. The head derives them again in float32 from
    its converted buffers, and again after loading a float32 state."""
    dev = "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
        if not INTERPRETER:  # compiled Triton runs on CUDA tensors only
            if not torch.cuda.is_available():
                pytest.skip("compiled Triton needs a CUDA device")
            dev = "cuda"
    x, y = clustered_features(120, 4, 64, seed=1, dtype=torch.float32)
    x, y = x.to(dev), y.to(dev)
    det = GROOD(k=2, backend=backend, device=dev).fit(100 * x, y)
    head = det.as_module(checks="flag").to(dtype)
    assert head.prototype_sq_norms.dtype == head.index_sq_norms.dtype == torch.float32
    torch.testing.assert_close(head.prototype_sq_norms.double(),
                               ((head.class_prototypes.double() - head.ood_prototype.double())
                                ** 2).sum(1), rtol=1e-6, atol=0)
    test = (100 * x[:20]).to(dtype)
    score, pred = head(test)
    assert int(head.unresolved_rows) == 0
    want_s, want_p = det.score_and_predict(test)
    assert torch.equal(pred, want_p)
    torch.testing.assert_close(score, want_s, rtol=1e-4, atol=1e-6)
    fresh = GROODHead(torch.zeros(4, 64), torch.zeros(64), torch.zeros_like(det.index_.vectors),
                      k=2, backend=backend, checks="flag").to(device=dev, dtype=dtype)
    fresh.load_state_dict(det.as_module().state_dict())
    assert torch.equal(fresh.prototype_sq_norms, head.prototype_sq_norms)
    assert torch.equal(fresh(test)[0], score)


def test_head_has_no_graph_break_and_exports(fitted):
    det, test = fitted
    head = det.as_module()
    explained = torch._dynamo.explain(head)(test)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    exported = torch.export.export(head, (test,))
    score, pred = exported.module()(test)
    want = head(test)
    assert torch.equal(score, want[0]) and torch.equal(pred, want[1])


def test_head_exports_with_a_dynamic_batch_and_reloads(fitted, tmp_path):
    """One exported program for every batch size, saved and loaded with torch.export (the
    ops are found again once grood is imported)."""
    det, test = fitted
    batch = torch.export.Dim("batch")
    exported = torch.export.export(det.as_module(), (test[:5],),
                                   dynamic_shapes=({0: batch},))
    torch.export.save(exported, tmp_path / "head.pt2")
    program = torch.export.load(tmp_path / "head.pt2").module()
    for n in (1, 7, test.shape[0]):
        score, pred = program(test[:n])
        assert torch.equal(score, det.score_samples(test[:n]))
        assert torch.equal(pred, det.predict(test[:n]))


@pytest.mark.slow
def test_head_compiles_with_fullgraph(fitted):
    det, test = fitted
    head = det.as_module()
    compiled = torch.compile(head, fullgraph=True)
    score, pred = compiled(test)
    want = head(test)
    torch.testing.assert_close(score, want[0], rtol=1e-6, atol=0)
    assert torch.equal(pred, want[1])


def _with_bad_rows(test):
    bad = test.clone()
    bad[3, 5] = float("nan")
    bad[7] += 1e6  # distances far beyond what the float32 softmax resolves
    return bad


def test_flag_checks_score_unresolvable_rows_nan_and_count_them(fitted):
    det, test = fitted
    bad = _with_bad_rows(test)
    with pytest.raises(ValueError, match=r"row\(s\) 3"):
        det.as_module()(bad)  # checks="raise": the detector's behaviour
    head = det.as_module(checks="flag")
    score, pred = head(bad)
    flagged = torch.zeros(len(test), dtype=torch.bool)
    flagged[[3, 7]] = True
    assert bool(score[flagged].isnan().all()) and bool((pred[flagged] == -1).all())
    want_s, want_p = det.score_and_predict(bad[~flagged])
    assert torch.equal(score[~flagged], want_s) and torch.equal(pred[~flagged], want_p)
    assert int(head.unresolved_rows) == 2
    head(bad)
    assert int(head.unresolved_rows) == 4  # counted across calls until reset
    head.unresolved_rows.zero_()
    assert torch.equal(head(test)[0], det.score_samples(test))
    assert int(head.unresolved_rows) == 0
    assert "unresolved_rows" not in head.state_dict()  # a counter, not a parameter
    with pytest.raises(ValueError, match="checks must be one of"):
        det.as_module(checks="ignore")
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        capture_cuda_graph(head, test)


def test_flag_checks_compile_without_graph_break_and_export(fitted):
    det, test = fitted
    bad = _with_bad_rows(test)
    head = det.as_module(checks="flag")
    explained = torch._dynamo.explain(head)(bad)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    exported = torch.export.export(det.as_module(checks="flag"), (bad,))
    got, want = exported.module()(bad), det.as_module(checks="flag")(bad)
    assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num())
    assert torch.equal(got[1], want[1])


def test_a_head_with_flags_gives_the_detectors_flags_and_keeps_its_threshold(tmp_path):
    """as_module(flags=True) holds the calibrated threshold (float64, in state_dict) and
    returns the detector's is_ood bit for bit, eager, compiled without a graph break and
    exported; unscored rows (checks="flag") come out flagged; .to() keeps the threshold."""
    x, y = clustered_features(240, 4, 12, seed=5, dtype=torch.float32)
    val, _ = clustered_features(60, 4, 12, seed=7, dtype=torch.float32)
    test = torch.cat([clustered_features(40, 4, 12, seed=6, dtype=torch.float32)[0],
                      3 * torch.rand(20, 12)])
    det = GROOD(k=3).fit(x, y).calibrate(val, tpr=0.9)
    head = det.as_module(flags=True)
    score, pred, is_ood = head(test)
    assert torch.equal(score, det.score_samples(test)) and torch.equal(pred, det.predict(test))
    assert is_ood.dtype == torch.bool and torch.equal(is_ood, det.is_ood(test))
    assert 0 < int(is_ood.sum()) < len(test)  # the threshold splits these rows
    s64, _, f64 = head(test.double())
    assert torch.equal(s64, det.score_samples(test.double()))
    assert torch.equal(f64, det.is_ood(test.double()))
    assert head.threshold.dtype == torch.float64 and float(head.threshold) == det.threshold_
    assert "threshold=" in repr(head) and "threshold" in head.state_dict()
    half = det.as_module(flags=True).to(torch.bfloat16)
    assert half.threshold.dtype == torch.float64 and float(half.threshold) == det.threshold_
    assert torch._dynamo.explain(head)(test).graph_break_count == 0
    exported = torch.export.export(head, (test,)).module()(test)
    assert all(torch.equal(a, b) for a, b in zip(exported, (score, pred, is_ood), strict=True))
    flag_head = det.as_module(checks="flag", flags=True)
    bad = _with_bad_rows(test)
    f_score, _, f_ood = flag_head(bad)
    assert bool(f_score[[3, 7]].isnan().all()) and bool(f_ood[[3, 7]].all())
    keep = torch.ones(len(test), dtype=torch.bool)
    keep[[3, 7]] = False
    assert torch.equal(f_ood[keep], det.is_ood(bad[keep]))
    # A state round trip carries the threshold; a damaged one is refused whole.
    other = det.as_module(flags=True)
    state = head.state_dict()
    state["threshold"] = torch.tensor(-1.0e30, dtype=torch.float64)
    other.load_state_dict(state)
    assert not bool(other(test)[2].any())  # no score is below -1e30
    state["threshold"] = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"threshold must be one finite real number.*"
                                           r"nothing was loaded"):
        other.load_state_dict(state)
    assert not bool(other(test)[2].any())  # as it was
    assert int(head.state_dict()["threshold_k"]) == 3
    det.k = 1  # the same buffers, a threshold chosen on k=1 scores
    at_1 = det.calibrate(val, tpr=0.9).as_module(flags=True)
    with pytest.raises(RuntimeError, match=r"the state's threshold was chosen on scores at "
                                           r"k=3; this head scores at k=1"):
        at_1.load_state_dict(head.state_dict())
    assert float(at_1.threshold) == det.threshold_  # refused whole


def test_a_head_with_flags_needs_a_threshold_for_its_search(fitted, cnn):
    """flags=True on a detector without a threshold, or with one chosen at another k, is
    refused by name, as is a head whose k is changed after it was made, a threshold that is
    not a finite number, and a flags value that is not a bool; attach passes flags on."""
    det, _ = fitted
    with pytest.raises(NotFittedError, match="no threshold yet: call calibrate"):
        det.as_module(flags=True)
    with pytest.raises(ValueError, match="flags must be True or False"):
        det.as_module(flags="yes")
    with pytest.raises(ValueError, match="threshold must be one finite real number"):
        GROODHead(det.class_prototypes_, det.ood_prototype_, det.index_.vectors,
                  threshold=float("inf"))
    net, cdet, images = cnn
    held_out = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    cdet = copy.deepcopy(cdet).calibrate_model(net, [held_out], tpr=0.9)
    attached = cdet.attach(net, features="avgpool", flags=True)
    logits, score, pred, is_ood = attached(images)
    want_s, want_p = cdet.score_model(net, [images])
    assert torch.equal(logits, net(images)) and torch.equal(score, want_s)
    assert torch.equal(pred, want_p)
    assert torch.equal(is_ood, want_s < cdet.threshold_) and 0 < int(is_ood.sum()) < 60
    attached.head.k = 1  # the threshold was chosen on k=2 scores
    with pytest.raises(ValueError, match=r"threshold was chosen on scores at k=2, and k is "
                                         r"now 1: set k back"):
        attached(images)
    cdet.k = 1
    with pytest.raises(ValueError, match=r"another search \(k=2 -> 1\)"):
        cdet.as_module(flags=True)

@pytest.mark.skipif(not INTERPRETER, reason="the Triton launchers run under the interpreter")
def test_flag_checks_on_triton_read_no_tensor_value_on_the_host(fitted, monkeypatch):
    det, test = fitted
    bad = _with_bad_rows(test)
    head = GROODHead(det.class_prototypes_, det.ood_prototype_, det.index_.vectors, k=3,
                     backend="triton", checks="flag")
    first = head(bad)  # the prototypes' cached facts are made on first use

    _refuse_host_reads(monkeypatch)
    again = head(bad)
    monkeypatch.undo()
    assert torch.equal(again[0].nan_to_num(), first[0].nan_to_num())
    assert int(head.unresolved_rows) == 4


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2))
        self.avgpool = nn.Flatten()
        self.fc = nn.Linear(24, n_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.body(x)))


class FeatureListNet(SmallCNN):
    def forward(self, x, return_feature_list=False):
        feats = self.avgpool(self.body(x))
        logits = self.fc(feats)
        return (logits, [feats]) if return_feature_list else logits


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    images = torch.rand(60, 1, 6, 6)
    labels = torch.arange(60) % 3  # 3 classes; the correctly classified ones are indexed
    with warnings.catch_warnings():  # an untrained net's features: labels they miss
        warnings.filterwarnings("ignore", "the nearest class prototype classifies")
        det = GROOD(k=2).fit_model(net, [(images, labels)], features="avgpool")
    return net, det, images


def test_attach_gives_logits_and_the_detectors_scores_in_one_pass(cnn):
    net, det, images = cnn
    attached = det.attach(net, features="avgpool")
    logits, score, pred = attached(images)
    want_s, want_p = det.score_model(net, [images])
    assert torch.equal(logits, net(images))
    assert torch.equal(score, want_s) and torch.equal(pred, want_p)
    assert any(name.startswith("head.") for name in attached.state_dict())
    explained = torch._dynamo.explain(attached)(images)
    assert explained.graph_break_count == 0
    exported = torch.export.export(attached, (images,)).module()(images)
    assert all(torch.equal(a, b) for a, b in zip(exported, (logits, score, pred), strict=True))
    # An empty batch gives empty outputs (the [0, 4, 1, 1] features failed in reshape(0, -1)).
    empty = attached(images[:0])
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0,), (0,)]
    assert empty[1].dtype == score.dtype and empty[2].dtype == pred.dtype
    # Without features= it reads the layer fit_model read, as score_model does (it asked the
    # model for return_feature_list, which a plain model refused with a TypeError); another
    # layer is named in a warning.
    again = det.attach(net)(images)
    assert all(torch.equal(a, b) for a, b in zip(again, (logits, score, pred), strict=True))
    with pytest.warns(UserWarning, match=r"reads features='body' here, but was fitted on "
                                         r"features='avgpool'") as caught:
        det.attach(net, features="body")
    assert caught[0].filename == __file__  # the caller's line


@pytest.mark.slow
def test_an_attached_model_runs_with_grad_enabled_eager_and_compiled(cnn):
    """With grad enabled (a saliency map, an input-gradient attack) an attached model scores
    its features detached: eager and compiled, its logits backpropagate as the model's own do,
    and its scores are the detector's and carry no gradient (compiled, it failed: torch.compile
    traced a backward pass through the ops)."""
    net, det, images = cnn
    attached = det.attach(net, features="avgpool")
    want_s, want_p = det.score_model(net, [images])
    x = images[:12].clone().requires_grad_(True)
    (want_x,) = torch.autograd.grad(net(x)[:, 0].sum(), x)
    for run in (attached, torch.compile(attached, fullgraph=True)):
        logits, score, pred = run(x)
        assert logits.requires_grad and not score.requires_grad and not pred.requires_grad
        torch.testing.assert_close(score, want_s[:12], rtol=1e-6, atol=1e-6)
        assert torch.equal(pred, want_p[:12])
        (grad_x,) = torch.autograd.grad(logits[:, 0].sum(), x)
        torch.testing.assert_close(grad_x, want_x, rtol=1e-6, atol=1e-7)


class DictOutputNet(SmallCNN):
    """Logits returned under "logits" in a dict (the Hugging Face convention)."""

    def forward(self, x):
        feats = self.avgpool(self.body(x))
        return {"features": feats, "logits": self.fc(feats)}


def test_attach_reads_logits_from_a_dict_output(cnn):
    net, det, images = cnn
    dict_net = DictOutputNet().eval()
    dict_net.load_state_dict(net.state_dict())
    attached = det.attach(dict_net, features="avgpool")
    logits, score, pred = attached(images)
    want_s, want_p = det.score_model(net, [images])
    assert torch.equal(logits, net(images))
    assert torch.equal(score, want_s) and torch.equal(pred, want_p)
    assert torch._dynamo.explain(attached)(images).graph_break_count == 0


def test_attach_with_flag_checks(cnn):
    """attach(checks="flag"): the same scores on images it can score, NaN (and a count) for
    an image whose features are not finite, no graph break."""
    net, det, images = cnn
    attached = det.attach(net, features="avgpool", checks="flag")
    assert attached.head.checks == "flag"
    bad = images.clone()
    bad[4] = float("inf")
    logits, score, pred = attached(bad)
    want_s, want_p = det.score_model(net, [images])
    keep = torch.arange(60) != 4
    assert torch.equal(logits[keep], net(images)[keep])
    assert torch.equal(score[keep], want_s[keep]) and torch.equal(pred[keep], want_p[keep])
    assert bool(score[4].isnan()) and int(pred[4]) == -1
    assert int(attached.head.unresolved_rows) == 1
    assert torch._dynamo.explain(attached)(bad).graph_break_count == 0


def test_attach_with_a_feature_list_model(cnn):
    _, det, images = cnn
    net = FeatureListNet().eval()
    net.load_state_dict(cnn[0].state_dict())
    _, score, _ = det.attach(net, features=None)(images)
    assert torch.equal(score, det.score_model(net, [images])[0])


def test_attach_and_as_module_refuse_what_they_cannot_hold(cnn, tmp_path):
    net, det, _ = cnn
    with pytest.raises(ValueError, match="is not a module of the model"):
        det.attach(net, features="nope")

    with pytest.raises(ValueError, match="features='' names the whole model"):
        det.attach(net, features="")
    with pytest.raises(ValueError, match="not fitted"):
        GROOD().as_module()
    pytest.importorskip("faiss")
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="'faiss-flat'"):
        GROOD(index="faiss-flat").fit(x, y).as_module()


class Untraceable(SmallCNN):
    """Data-dependent control flow (torch.fx cannot trace it); the features module also kept
    in a plain list and registered under a second name, and run twice on request."""

    def __init__(self):
        super().__init__()
        self.listed = [self.avgpool]  # not a registered path
        self.alias = self.avgpool  # a second registered name

    def forward(self, x, route="name"):
        body = self.body(x) if x.sum() > 0 else self.body(x.flip(0)).flip(0)
        if route == "list":
            return self.fc(self.listed[0](body))
        if route == "alias":
            return self.fc(self.alias(body))
        if route == "twice":
            self.avgpool(body)
        return self.fc(self.avgpool(body))


def test_attach_reads_any_forward_and_leaves_the_model_as_it_was(cnn):
    """A forward torch.fx cannot trace is attached all the same; the model given is not
    changed (its modules, their classes, hooks and mode), the attached one shares its
    parameters under the same names, copies and pickles, and follows train/eval."""
    import copy
    import pickle

    net, det, images = cnn
    model = Untraceable().eval()
    model.load_state_dict(net.state_dict())
    modules = dict(model.named_modules())
    attached = det.attach(model, features="avgpool")
    logits, score, pred = attached(images)
    want_s, want_p = det.score_model(net, [images])
    assert torch.equal(logits, net(images))
    assert torch.equal(score, want_s) and torch.equal(pred, want_p)
    assert dict(model.named_modules()) == modules  # the same objects, nothing added
    assert all(type(m) is type(modules[n]) for n, m in model.named_modules())
    assert type(model.avgpool) is nn.Flatten and not model.avgpool._forward_hooks
    assert "_grood_box" not in vars(model.avgpool)
    assert isinstance(attached.model.avgpool, nn.Flatten)  # a copy, of the module's class
    shared = attached.model.state_dict(keep_vars=True)
    assert {k: v for k, v in shared.items()} == dict(model.state_dict(keep_vars=True))
    assert all(shared[k] is v for k, v in model.state_dict(keep_vars=True).items())
    for twin in (copy.deepcopy(attached), pickle.loads(pickle.dumps(attached))):
        got = twin(images)
        assert all(torch.equal(a, b) for a, b in zip(got, (logits, score, pred), strict=True))
    attached.train()
    assert attached.model.training and attached.model.avgpool.training
    attached.eval()
    assert not attached.model.avgpool.training

    class Routed(nn.Module):
        def __init__(self, route):
            super().__init__()
            self.net, self.route = model, route

        def forward(self, x):
            return self.net(x, route=self.route)

    with pytest.raises(ValueError, match=r"'net.avgpool' \(features\) ran 0 times in the "
                                         r"forward pass \(its forward reaches the module by "
                                         r"another route"):
        det.attach(Routed("list"), features="net.avgpool")(images)
    with pytest.raises(ValueError, match=r"ran 2 times in the forward pass; attach\(\) needs "
                                         "a module that runs exactly once"):
        det.attach(Routed("twice"), features="net.avgpool")(images)
    again = det.attach(attached.model, features="avgpool")  # the model of an attached model
    assert torch.equal(again(images)[1], score) and torch.equal(attached(images)[1], score)
    compiled = torch.compile(net, backend="eager")  # its forward calls the original module
    for name in ("_orig_mod.avgpool", "avgpool"):  # (refused when attached, not at a forward)
        with pytest.raises(ValueError, match=r"a model compiled before attaching runs past: "
                                             r"attach the model itself and compile the "
                                             r"attached one, torch.compile\(det.attach"):
            det.attach(compiled, features=name)
    for route in ("name", "alias"):  # a module registered under two names: read through either
        assert torch.equal(det.attach(Routed(route), features="net.avgpool")(images)[1], score)


def test_attaching_a_model_in_training_mode_is_named():
    """A model still in training mode (as torchvision and timm build them) would have its
    batch norm use batch statistics and its dropout drop: the attached model's scores would
    not be the detector's. attach() names those layers; in eval mode it is silent."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(4, 3))
    images = torch.rand(30, 1, 6, 6)
    det = GROOD().fit_model(model, [(images, torch.arange(30) % 3)], features="4")
    with pytest.warns(UserWarning, match=r"attach\(\): the model is in training mode, where "
                                         r"1, 5 compute differently.*call \.eval\(\)"):
        attached = det.attach(model, features="4")
    assert not torch.equal(attached(images)[1], det.score_model(model, [images])[0])
    attached.eval()
    assert torch.equal(attached(images)[1], det.score_model(model, [images])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.attach(model.eval(), features="4")
        warnings.filterwarnings("ignore", "the detector reads features='0' here")
        det.attach(nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(36, 3)),
                   features="0")  # nothing that depends on the mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ops_and_compiled_head_on_a_cuda_device():
    h, protos, p_ood = (t.cuda() for t in _data(n=300, c=40, d=64))
    torch.library.opcheck(OPS.ncp_gradient.default, (h, protos, p_ood),
                          {"precision": "tf32", "backend": "triton"})
    torch.library.opcheck(OPS.knn.default, (h, protos, 3), {"backend": "triton"})
    x, y = clustered_features(2000, 10, 64, seed=8, dtype=torch.float32)
    det = GROOD(device="cuda", backend="triton").fit(x.cuda(), y.cuda())
    test = x[:500].cuda()
    want_s, want_p = det.score_and_predict(test)
    score, pred = torch.compile(det.as_module(), fullgraph=True)(test)
    assert torch.equal(score, want_s) and torch.equal(pred, want_p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flag_head_captures_in_a_cuda_graph(backend):
    """checks="flag" reads nothing on the host, on either backend: the ops run with sync
    debugging set to error, and the head captured in a CUDA graph and replayed on new
    features equals eager."""
    x, y = clustered_features(2000, 10, 64, seed=9, dtype=torch.float32)
    det = GROOD(device="cuda", backend=backend, precision="tf32").fit(x.cuda(), y.cuda())
    det.calibrate(x[:300].cuda() + 0.05, tpr=0.9)
    head = det.as_module(checks="flag", flags=True)  # the threshold as a buffer: no host read
    static = _with_bad_rows(x[:512]).cuda()
    head(static)  # warm: compile the kernels, cache the prototypes' facts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        head(static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    run = capture_cuda_graph(head, static)
    fresh = _with_bad_rows(x[512:1024]).cuda()
    head.unresolved_rows.zero_()
    out_s, out_p, out_f = run(fresh)
    torch.cuda.synchronize()
    want_s, want_p, want_f = det.as_module(checks="flag", flags=True)(fresh)
    assert torch.equal(out_s.nan_to_num(), want_s.nan_to_num()) and torch.equal(out_p, want_p)
    assert torch.equal(out_f, want_f) and bool(out_f[[3, 7]].all())
    assert int(head.unresolved_rows) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_of_a_temporary_head_keeps_its_memory(backend):
    """capture_cuda_graph(det.as_module(checks="flag"), x) with no other reference to the head:
    the replay read the freed buffers and prepared operands once other allocations reused
    their memory (garbage scores on some rows in the GPU report), and a kept operand of live
    prototypes could be evicted by other prototype sets."""
    import gc

    x, y = clustered_features(3000, 40, 96, seed=4, dtype=torch.float32)
    det = GROOD(device="cuda", backend=backend, precision="tf32").fit(x.cuda(), y.cuda())
    test = x[:700].cuda()
    run = capture_cuda_graph(det.as_module(checks="flag"), test)
    gc.collect()
    junk = [torch.full((1 << 20,), 3e38, device="cuda") for _ in range(64)]  # reuse freed memory
    for i in range(40):  # other prototype sets, each with its own kept operands
        GROOD(device="cuda", backend=backend, precision="tf32").fit(
            x[:1000].cuda() * (1 + i), y[:1000].cuda()).score_samples(test[:8])
    want_s, want_p = det.as_module(checks="flag")(test)
    score, pred = run(test)
    torch.cuda.synchronize()
    del junk
    assert torch.equal(score.nan_to_num(), want_s.nan_to_num()) and torch.equal(pred, want_p)
