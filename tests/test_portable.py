"""GROOD in plain torch operations (PortableHead) and as an ONNX file (export_onnx)."""

import sys
import warnings
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from conftest import clustered_features
from test_library import SmallCNN

from grood import GROOD, MissingExtraError, NotFittedError, functional
from grood._bench.common import far_prototype_data
from grood.cli import main
from grood.portable import SCORE_TOLERANCE, PortableHead, export_onnx, score_tolerance


def _hard_rows(d: int, gen: torch.Generator) -> torch.Tensor:
    """Rows no float32 head scores: NaN, Inf, and features far out of distribution."""
    rows = torch.rand(3, d, generator=gen)
    rows[0, 1], rows[1, 0], rows[2] = float("nan"), float("inf"), 1e30
    return rows


def _detector(n_classes: int, k: int, *, n: int = 120, d: int = 11, seed: int = 0,
              dtype: torch.dtype = torch.float32):
    x, y = clustered_features(n, n_classes, d, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    test = torch.cat([clustered_features(30, n_classes, d, seed=seed + 2, dtype=dtype)[0],
                      (3 * torch.rand(9, d, generator=gen)).to(dtype), x[:4]])
    with warnings.catch_warnings():  # few rows per class in the small cases
        warnings.simplefilter("ignore")
        if n_classes == 1:  # the OOD prototype from OOD features (the mean needs two)
            det = GROOD(k=k, ood_prototype="features").fit(
                x, y, ood_features=(3 * torch.rand(20, d, generator=gen)).to(dtype))
        else:
            det = GROOD(k=k).fit(x, y)
        det.calibrate(clustered_features(60, n_classes, d, seed=seed + 3, dtype=dtype)[0])
    return det, test, gen


@pytest.mark.parametrize(("n_classes", "k", "n"), [(1, 1, 40), (3, 2, 60), (5, 1, 120),
                                                   (7, 4, 120), (4, 3, 12)])
def test_portable_head_gives_the_flag_heads_scores_classes_and_flags(n_classes, k, n):
    """Fewer classes than the re-rank's candidates, k near the index's size, rows it cannot
    score: the portable head's outputs are the custom-op head's (checks="flag")."""
    det, test, gen = _detector(n_classes, k, n=n)
    test = torch.cat([test, _hard_rows(test.shape[1], gen)])
    head = det.as_module(checks="flag", flags=True)
    portable = PortableHead.from_head(head)
    want, got = head(test), portable(test)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[0].isnan(), want[0].isnan())
    assert int(got[0].isnan().sum()) == 3  # the three hard rows
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6 * float(
        want[0].nan_to_num().abs().max()), equal_nan=True)
    # Float64 features are scored by the portable head in float32 (the head's are in
    # float64): the same to float32 rounding.
    wide = portable(test.double())
    torch.testing.assert_close(wide[0], got[0], rtol=1e-5, atol=1e-7, equal_nan=True)
    # Without float64 (the softmax in float32): the same classes and flags, scores as close.
    narrow = PortableHead.from_head(head, float64=False)(test)
    assert torch.equal(narrow[1], want[1]) and torch.equal(narrow[2], want[2])
    torch.testing.assert_close(narrow[0], want[0], rtol=1e-5, atol=1e-6 * float(
        want[0].nan_to_num().abs().max()), equal_nan=True)


@pytest.mark.parametrize("float64", [True, False])
def test_q_ood_near_one_at_large_distances_in_either_softmax_dtype(float64):
    """Rows 1,200-1,400 from the OOD prototype, every class 8-12 units further: ``q_ood``
    about 1 - 4e-4 under a log-sum-exp near -1,300. Without float64 the softmax is float32,
    whose lse carries an ulp of 1.2e-4; ``q_ood`` is taken from the OOD term less the running
    maximum first, so it keeps float64's (2.3e-5 relative off before)."""
    from test_kernel_ncp_gradient import far_ood_rows_problem

    h, protos, p_ood = far_ood_rows_problem()
    rows = protos.repeat(2, 1).float()  # each class's rows are its prototype
    det = GROOD(ood_prototype="features").fit(rows, torch.arange(3).repeat(2),
                                              ood_features=p_ood[None].float())
    q = PortableHead.from_head(det.as_module(), float64=float64)._gradient(h.float())[1]
    ref = functional.ncp_gradient(h, protos, p_ood).q_ood
    assert float(((q.double() - ref).abs() / ref).max()) < 2e-6


def test_a_float32_threshold_flags_float32_scores_as_the_float64_one_does():
    """The float64-free head compares float32 scores with the smallest float32 at or above
    the threshold: the same flags, at every score next to it."""
    from grood.portable import _threshold_tensor

    rng = np.random.default_rng(0)
    thresholds = np.concatenate([-rng.random(200) * 10.0 ** rng.integers(-30, 3, 200),
                                 np.float32([-0.5, -1e-20, -3.0]).astype(np.float64)])
    for t in thresholds:
        t32 = _threshold_tensor(float(t), float64=False)
        assert t32.dtype == torch.float32 and float(t32) >= t
        centre = np.float32(t)
        scores = [centre]
        for direction in (np.inf, -np.inf):
            s = centre
            for _ in range(3):
                s = np.nextafter(s, np.float32(direction))
                scores.append(s)
        scores = torch.tensor(np.array(scores, dtype=np.float32))
        assert torch.equal(scores < t32, scores.double() < float(t))


def test_portable_head_is_as_close_to_float64_as_the_detector():
    """Against the float64 twin (the detector fitted and scoring in float64), the portable
    head's float32 scores are no farther than the float32 detector's own."""
    det64, test64, _ = _detector(6, 2, n=180, d=13, seed=4, dtype=torch.float64)
    det32, test32, _ = _detector(6, 2, n=180, d=13, seed=4, dtype=torch.float32)
    truth = det64.score_samples(test64)
    scale = float(truth.abs().max())
    detector_err = float((det32.score_samples(test32).double() - truth).abs().max()) / scale
    portable = PortableHead.from_head(det32.as_module())
    portable_err = float((portable(test32)[0].double() - truth).abs().max()) / scale
    assert portable_err <= max(2 * detector_err, 1e-6)
    assert torch.equal(portable(test32)[1], det64.predict(test64))


def test_a_float64_detectors_gradients_float32_does_not_resolve_are_warned_of():
    """A portable head computes in float32: made from a float64 detector whose gradients
    float32 does not resolve, it scored every row of tight classes far apart 0 (their norm
    below 2**-63), or strayed where the gradients spread little about their mean (an OOD
    prototype far outside the features), without a word. It says so; an ordinary float64
    detector's head and a float32 detector's (whose fit warned) say nothing."""
    from test_reliability import _tight_classes

    x, y = _tight_classes(100.0, n=240)
    (x, test), y = x.split([200, 40]), y[:200]
    head = GROOD(progress=False).fit(x, y).as_module()
    with pytest.warns(UserWarning, match=r"this portable head computes in float32, and 100 % "
                                         r"of the detector's float64 indexed gradients "
                                         r"\(sampled\) have norm q_ood below 1\.1e-19, .* tie "
                                         r"at 0; the detector and its GROODHead"):
        portable = PortableHead.from_head(head)
    assert bool((portable(test.float())[0] == 0).all()) and bool((head(test)[0] < 0).all())
    far, labels, ood, _ = far_prototype_data(1e5)
    det = GROOD(ood_prototype="features", progress=False).fit(
        far.astype(np.float64), labels, ood_features=ood.astype(np.float64))
    with pytest.warns(UserWarning, match=r"computes in float32, and the detector's float64 "
                                         r"indexed gradients spread about their mean by "
                                         r"4\.\de-05 of their norm"):
        PortableHead.from_head(det.as_module())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PortableHead.from_head(_detector(3, 1, dtype=torch.float64)[0].as_module())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the fit's own warning)
            det32 = GROOD(progress=False).fit(x.float(), y)
        PortableHead.from_head(det32.as_module())


@pytest.mark.parametrize("search_block", [1, 7, 64])
def test_a_search_block_by_block_finds_what_one_search_finds(search_block):
    """The index held and searched in blocks of 1, 7 and 64 rows (the last block shorter):
    the candidates nearest over all blocks are the whole index's, so the scores, classes and
    flags are the unblocked head's and the custom-op head's."""
    det, test, gen = _detector(5, 3, n=150)
    test = torch.cat([test, _hard_rows(test.shape[1], gen)])
    head = det.as_module(checks="flag", flags=True)
    whole = PortableHead.from_head(head)
    blocked = PortableHead.from_head(head, search_block=search_block)
    n_indexed = head.index_vectors.shape[0]
    assert whole.n_index_blocks == 1 and (search_block == 1 or n_indexed % search_block)
    assert blocked.n_index_blocks == -(-n_indexed // search_block)
    assert max(vectors.shape[0] for vectors, _ in blocked.index_blocks()) == search_block
    assert torch.equal(blocked.index_vectors, head.index_vectors.float())
    assert f"search_block={search_block}" in repr(blocked)
    want, got = head(test), blocked(test)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], whole(test)[0], rtol=1e-6, atol=0.0, equal_nan=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6 * float(
        want[0].nan_to_num().abs().max()), equal_nan=True)
    with pytest.raises(ValueError, match="search_block must be a positive integer"):
        PortableHead.from_head(head, search_block=0)


def test_an_export_searches_views_of_the_heads_index_not_a_copy(tmp_path, monkeypatch):
    """The portable head an export makes copied the index into its blocks, and a detector's
    export first copied it into a head: an export held it twice more than the detector (390
    MiB each at 200,000 x 512). With copy=False (the export's) the blocks are views of the
    head's index, and a detector's export searches the detector's own; the scores are the
    copy's, and the index is left as it was. A float64 or strided index is copied once, to
    float32 rows."""
    det, test, _ = _detector(5, 3, n=150)
    head = det.as_module(checks="flag", flags=True)  # 150 rows: 4 search blocks of 40
    source, before = head.index_vectors, head.index_vectors.clone()
    at = source.untyped_storage().data_ptr()
    copied = PortableHead.from_head(head, search_block=40)
    shared = PortableHead.from_head(head, search_block=40, copy=False)
    assert shared.n_index_blocks == copied.n_index_blocks > 1
    assert all(v.untyped_storage().data_ptr() == at for v, _ in shared.index_blocks())
    assert not any(v.untyped_storage().data_ptr() == at for v, _ in copied.index_blocks())
    assert torch.equal(shared.index_vectors, copied.index_vectors)
    for a, b in zip(shared(test), copied(test), strict=True):
        assert torch.equal(a, b)
    strided = torch.stack([source, source], 2)[:, :, 0]  # (not contiguous)
    assert not strided.is_contiguous()
    for odd in (source.double(), strided):
        made = PortableHead(head.class_prototypes, head.ood_prototype, odd, k=3,
                            search_block=40, copy=False)
        assert all(v.is_contiguous() and v.dtype == torch.float32
                   for v, _ in made.index_blocks())
        assert torch.equal(made.index_vectors, source)
    with pytest.raises(ValueError, match="copy must be True or False"):
        PortableHead.from_head(head, copy="no")
    # A state loaded into the head of views goes into blocks of its own, not the index.
    other = PortableHead(head.class_prototypes, head.ood_prototype, source.flip(0), k=3,
                         search_block=40, threshold=float(head.threshold))
    shared.load_state_dict(other.state_dict())
    assert torch.equal(shared.index_vectors, source.flip(0)) and torch.equal(source, before)
    assert torch.equal(shared(test)[0], other(test)[0])

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    exported, export = [], torch.onnx.export

    def recorded(module, *args, **kwargs):
        exported.append(module)
        return export(module, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", recorded)
    _strict_export(head, test[:5], tmp_path / "head.onnx", search_block=40)
    # A detector's export searches the detector's own index: no copy in the head it makes.
    scores = det.score_samples(test)
    _strict_export(det, test[:5], tmp_path / "det.onnx", search_block=40)
    [portable, of_det] = exported
    assert portable.n_index_blocks == of_det.n_index_blocks == shared.n_index_blocks
    assert all(v.untyped_storage().data_ptr() == at for v, _ in portable.index_blocks())
    assert head.index_vectors is source and torch.equal(source, before)
    at_det = det.index_.vectors.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == at_det for v, _ in of_det.index_blocks())
    assert torch.equal(det.index_.vectors, before) and torch.equal(det.score_samples(test),
                                                                   scores)


@pytest.mark.gpu  # run by bench/gpu_check.sh's torch-path step
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_portable_head_on_the_gpu_gives_the_gpu_heads_outputs(backend):
    """On a CUDA device (cuBLAS's matmul, the device's exp and log) the portable head still
    gives the custom-op head's classes and flags, and its scores to float32 rounding, with
    the index in one search block or several."""
    if backend == "triton":
        pytest.importorskip("triton")
    det, test, gen = _detector(9, 3, n=400, d=24, seed=7)
    test = torch.cat([test, _hard_rows(test.shape[1], gen)]).cuda()
    head = det.to("cuda").as_module(checks="flag", flags=True)
    head.backend = backend
    want = head(test)
    for float64, search_block in ((True, 1 << 14), (False, 1 << 14), (True, 64)):
        got = PortableHead.from_head(head, float64=float64, search_block=search_block)(test)
        assert got[0].device == test.device
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6 * float(
            want[0].nan_to_num().abs().max()), equal_nan=True)


def test_portable_head_exports_to_a_graph_of_standard_ops():
    """torch.export traces it (no host read stops it) into aten ops alone: no grood op."""
    det, test, _ = _detector(5, 2)
    portable = PortableHead.from_head(det.as_module(flags=True))
    batch = torch.export.Dim("batch")
    program = torch.export.export(portable, (test,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("grood" in t for t in targets)
    for rows in (test[:2], test):
        for a, b in zip(program.module()(rows), portable(rows), strict=True):
            assert torch.equal(a, b)


def _session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _strict_export(*args, **kwargs):
    with warnings.catch_warnings():  # an export warns of nothing (see the test below)
        warnings.simplefilter("error")
        return export_onnx(*args, **kwargs)


def test_an_export_says_nothing_that_asks_nothing_of_the_caller(tmp_path):
    """In a fresh process, an export printed four log lines (one per torchvision operator
    torch's exporter would register, where torchvision is not installed) and a FutureWarning
    from inside torch (its tree specs copied by ``torch.export``); neither asked anything of
    the caller. Both are dropped during the export alone: no filter of either is left after
    it, and other warnings pass."""
    import subprocess

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    code = f"""
import logging, warnings, torch
from grood import GROOD, export_onnx
noisy = "torch.onnx._internal.exporter._registration"  # (torch's module that logs it)
x = torch.randn(60, 6) + 4 * torch.nn.functional.one_hot(torch.arange(60) % 3, 6)
det = GROOD(progress=False).fit(x, torch.arange(60) % 3)
export_onnx(det, x[:5], {str(tmp_path / "det.onnx")!r})
assert not any(f[1] is not None and "LeafSpec" in f[1].pattern for f in warnings.filters)
assert not logging.getLogger(noisy).filters
logging.getLogger(noisy).warning("torchvision is not installed: passes")
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated: passes", FutureWarning)
"""
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("torchvision is not installed") == 1, out.stderr
    assert out.stderr.count("LeafSpec") == 1, out.stderr
    assert "passes" in out.stderr and out.stderr.count("Warning") == 1, out.stderr


def test_an_index_held_less_its_mean_is_exported_with_its_centre(tmp_path):
    """A detector whose fit held the index less its gradients' mean (every gradient pointing
    nearly the same way): the exported file searches its queries less that mean too, and
    scores as float64 does to the detector's own accuracy (without it, 14 % of the scores'
    spread off)."""
    pytest.importorskip("onnxscript")
    x, y, ood, test = far_prototype_data(3e3)
    det = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
    assert det.index_.centre is not None
    want = GROOD(ood_prototype="features", progress=False).fit(
        x.astype(np.float64), y, ood_features=ood.astype(np.float64)).score_samples(
        test.astype(np.float64))
    path = _strict_export(det, test[:5], tmp_path / "far.onnx")
    score = _session(path).run(None, {"input": test})[0].astype(np.float64)
    assert np.abs(score - want).max() < 5e-3 * np.ptp(want)
    # Two float32 computations differ by more than 1e-4 of the largest score there (their
    # gradients' own rounding, next to gradients 1.4e-3 of their norm apart): the export's
    # check allows for it, and for nothing more on ordinary gradients.
    portable = PortableHead.from_head(det.as_module())
    assert 1e-2 < score_tolerance(portable) < 3e-2
    ordinary, _, _ = _detector(5, 3)
    assert score_tolerance(PortableHead.from_head(ordinary.as_module())) == SCORE_TOLERANCE


def test_an_exported_detector_scores_any_batch_in_onnx_runtime(tmp_path, monkeypatch):
    """A calibrated detector's file: score, pred and is_ood for batches of any size, as the
    detector gives them; rows it cannot score NaN, -1 and flagged. The export's check loads
    the file without prepacking (the weights held once)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    det, test, gen = _detector(5, 3)
    test = torch.cat([test, _hard_rows(test.shape[1], gen)])
    head = det.as_module(checks="flag")
    sessions, session_class = [], ort.InferenceSession

    def recorded(path, options=None, **kwargs):
        sessions.append(None if options is None else
                        options.get_session_config_entry("session.disable_prepacking"))
        return session_class(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recorded)
    path = _strict_export(det, test[:7].double().numpy(), tmp_path / "grood.onnx")
    monkeypatch.undo()
    # The check held the weights once: no copy prepacked for the matmuls.
    assert sessions == ["1"]
    assert path == tmp_path / "grood.onnx" and int(head.unresolved_rows) == 0
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["score", "pred", "is_ood"]
    assert session.get_inputs()[0].type == "tensor(float)"  # float32 whatever the example
    # By default the softmax is computed in float64, as the detector computes it.
    onnx = pytest.importorskip("onnx")
    assert any(a.i == onnx.TensorProto.DOUBLE for node in onnx.load(str(path)).graph.node
               if node.op_type == "Cast" for a in node.attribute)
    for rows in (test[:1], test[5:7], test):
        score, pred, is_ood = session.run(None, {"input": rows.numpy()})
        assert score.shape == (rows.shape[0],) and pred.dtype == np.int64
        ok = torch.isfinite(rows).all(1) & (rows.abs().amax(1) < 1e20)
        want_s, want_p = det.score_and_predict(rows[ok])
        np.testing.assert_allclose(score[ok.numpy()], want_s.numpy(), rtol=1e-5,
                                   atol=1e-6 * float(want_s.abs().max()))
        assert np.array_equal(pred[ok.numpy()], want_p.numpy())
        assert np.array_equal(is_ood[ok.numpy()], det.is_ood(rows[ok]).numpy())
        bad = ~ok.numpy()
        assert np.isnan(score[bad]).all() and (pred[bad] == -1).all() and is_ood[bad].all()


def test_an_export_without_float64_holds_no_float64(tmp_path):
    """float64=False: no float64 tensor, initializer or cast in the graph (runtimes such as
    TensorRT have none), and the file passes the same check."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    det, test, _ = _detector(4, 2)
    # The detector asked for it, and a portable head made so, exported with its own setting.
    narrow = PortableHead.from_head(det.as_module(), float64=False)
    for module, kwargs in ((det, {"float64": False}), (narrow, {})):
        path = _strict_export(module, test, tmp_path / "narrow.onnx", **kwargs)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        graph = model.graph
        types = {v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input,
                                                        *graph.output]}
        types |= {t.data_type for t in graph.initializer}
        types |= {a.i for node in graph.node if node.op_type == "Cast" for a in node.attribute
                  if a.name == "to"}
        assert onnx.TensorProto.FLOAT in types and onnx.TensorProto.DOUBLE not in types


def test_an_exported_attached_model_gives_logits_scores_and_classes(tmp_path):
    """A model with the head attached: one graph from images to logits, scores and classes;
    the attached model and the model are left as they were."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = SmallCNN().eval()
    images = torch.rand(60, 1, 6, 6)
    with warnings.catch_warnings():  # an untrained net's features
        warnings.simplefilter("ignore")
        det = GROOD(k=2).fit_model(net, [(images, torch.arange(60) % 3)], features="avgpool")
    attached = det.attach(net, features="avgpool").eval()
    head = attached.head
    path = _strict_export(attached, images[:8], tmp_path / "model.onnx")
    assert attached.head is head and type(head).__name__ == "GROODHead"
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["logits", "score", "pred"]
    logits, score, pred = session.run(None, {"input": images[10:15].numpy()})
    want = attached(images[10:15])
    np.testing.assert_allclose(logits, want[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score, want[1].numpy(), rtol=1e-5,
                               atol=1e-6 * float(want[1].abs().max()))
    assert np.array_equal(pred, want[2].numpy())


def test_export_checks_the_file_and_removes_one_that_disagrees(tmp_path, monkeypatch):
    """A graph whose scores are not the detector's is named and not left behind."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    det, test, _ = _detector(3, 1)
    wrong = PortableHead._kth_sq_distance
    monkeypatch.setattr(PortableHead, "_kth_sq_distance",
                        lambda self, grad: wrong(self, grad) * 1.01)
    for external in (False, True):
        with pytest.raises(ValueError, match=r"ONNX Runtime's scores differ from the module's "
                                             r"\(relative 0\.01 in row \d+, beyond 0\.0001 "
                                             r"and its float32 rounding \d\.\d+e-0[5-9]\)"):
            _strict_export(det, test, tmp_path / "wrong.onnx", external_data=external)
        assert not list(tmp_path.iterdir())  # neither the file, its data nor a temporary one


def _far_rows_example(x: torch.Tensor, dists: list[float], seed: int = 0) -> torch.Tensor:
    """Training rows moved ``dists`` units each in a random direction, float32."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(len(dists), x.shape[1], generator=gen, dtype=torch.float64)
    moved = x[: len(dists)].double() + dirs / dirs.norm(dim=1, keepdim=True) * torch.tensor(
        dists, dtype=torch.float64)[:, None]
    return moved.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_export_checks_rows_far_out_of_distribution_at_their_own_rounding(tmp_path, dtype):
    """Rows 1 to 1e5 units from training features about 1 wide: float32's softmax of
    distances carries some 1e-7 of a row's distance into its q_ood (the float32 detector's own
    scores as much), and beyond 2**16 the graph leaves a row NaN, which a float64 head scores.
    The check refused both files (relative 0.00117 beyond 1e-4 at 1e4; NaN rows differ at
    1e5); it allows each row its own rounding, and the file gives the head's scores so."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    x, y = clustered_features(300, 5, 16, seed=0, dtype=dtype)
    det = GROOD(progress=False).fit(x, y)
    dists = [1.0, 30.0, 1e3, 1e4, 2e4, 4e4, 6e4, 1e5, 1e6]
    example = torch.cat([_far_rows_example(x, dists), x[:5].float()])
    path = _strict_export(det, example, tmp_path / "far.onnx")
    score, pred = _session(path).run(None, {"input": example.numpy()})
    want, want_pred = det.as_module(checks="flag")(example)
    beyond = np.array([d > 2**16 for d in dists] + [False] * 5)
    assert np.array_equal(np.isnan(score), beyond)
    assert bool(want[torch.from_numpy(beyond)].isnan().all()) == (dtype == torch.float32)
    # (off by more than 1e-4 of the largest score; about 1e-7 of 4e4 units in q_ood)
    rel = np.nanmax(np.abs(score - want.numpy())) / np.nanmax(np.abs(want.numpy()))
    assert 1e-4 < rel < 1e-2
    assert np.array_equal(pred[~beyond], want_pred.numpy()[~beyond])


def test_an_export_check_still_refuses_wrong_scores_classes_and_flags_at_any_distance(
        tmp_path, monkeypatch):
    """Row by row margins leave no room for a wrong graph: scores 30 % off at rows 1e4 and 2e4
    units out (where the margins allow 9 and 14 % of them), another class, a NaN where
    float32 resolves the row, a score where it does not."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    x, y = clustered_features(300, 5, 16, seed=0)
    det = GROOD(progress=False).fit(x, y)
    example = torch.cat([_far_rows_example(x, [1e4, 2e4, 1e5]), x[:3].float()])
    forward = PortableHead.forward
    edits = {
        "off": (lambda s, p: (torch.where(torch.arange(len(s)) < 2, s * 1.3, s), p),
                r"scores differ from the module's \(relative 0\.\d+ in row [01], beyond"),
        "class": (lambda s, p: (s, (p + 1) % 5), r"pred differs from the module's in rows "
                                                r"\[0, 1, 3, 4, 5\]"),
        "nan": (lambda s, p: (torch.where(torch.arange(len(s)) == 4, float("nan"), s), p),
                r"scores are NaN in rows \[4\], which the module scores and float32 "
                r"resolves"),
        "scored": (lambda s, p: (s.nan_to_num(-1.0), p),
                   r"ONNX Runtime scores rows \[2\], which the module leaves NaN or float32 "
                   r"does not resolve \(its distances beyond 65536\)"),
    }
    for name, (edit, message) in edits.items():
        monkeypatch.setattr(PortableHead, "forward",
                            lambda self, f, edit=edit: edit(*forward(self, f)))
        with pytest.raises(ValueError, match=message):
            _strict_export(det, example, tmp_path / f"{name}.onnx")
        assert not list(tmp_path.iterdir())


def test_export_refuses_what_it_cannot_export(tmp_path, monkeypatch):
    det, test, _ = _detector(3, 1)
    with pytest.raises(ValueError, match=r"ONNX files are written as \.onnx"):
        export_onnx(det, test, tmp_path / "grood.pt")
    with pytest.raises(TypeError, match=r"example must be a torch\.Tensor or a numpy array"):
        export_onnx(det, test.tolist(), tmp_path / "grood.onnx")
    with pytest.raises(ValueError, match="at least one row"):
        export_onnx(det, test[:0], tmp_path / "grood.onnx")
    with pytest.raises(ValueError, match=r"example must be features of shape \[N, 11\] \(the "
                                         r"detector's dimension\), got \(5, 10\)"):
        export_onnx(det, test[:5, :10], tmp_path / "grood.onnx")
    with pytest.raises(TypeError, match="export_onnx takes a fitted GROOD detector"):
        export_onnx(torch.nn.Linear(11, 2), test, tmp_path / "grood.onnx")
    # A portable head is exported as it was made: other settings are not silently dropped.
    portable = PortableHead.from_head(det.as_module(), search_block=7)
    with pytest.raises(ValueError, match=r"this PortableHead was made with search_block=7 and "
                                         r"is exported as it is, not with search_block=5"):
        export_onnx(portable, test, tmp_path / "grood.onnx", search_block=5)
    with pytest.raises(ValueError, match=r"made with float64=True .* not with float64=False"):
        export_onnx(portable, test, tmp_path / "grood.onnx", float64=False)
    with pytest.raises(NotFittedError):
        export_onnx(GROOD(), test, tmp_path / "grood.onnx")
    if find_spec("faiss") is not None:
        flat = GROOD(index="faiss-flat").fit(*clustered_features(60, 3, 11, dtype=torch.float32))
        with pytest.raises(ValueError, match=r"export_onnx writes grood's exact index into the "
                                             r"graph; this detector's index is 'faiss-flat'"):
            export_onnx(flat, test, tmp_path / "grood.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'grood\[onnx\]'"):
        export_onnx(det, test, tmp_path / "grood.onnx")
    assert not list(tmp_path.iterdir())


def test_a_file_in_one_piece_is_joined_from_the_graph_and_its_external_data(tmp_path,
                                                                            monkeypatch):
    """With the weights in the .onnx file, torch's exporter serialised them into one message
    and held them about three times more (+1,419 MiB for a 391 MiB index). The exporter now
    writes them beside the graph and the file is joined from the two, streamed: it parses to
    the model the external pair loads to, weights and all, in their order. Weights past
    ONE_FILE_LIMIT stay beside it, as the exporter's own threshold did; a data file that ends
    early or a weight kept elsewhere is refused."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    from grood import portable

    det, test, _ = _detector(5, 2, n=150)
    one = _strict_export(det, test[:4], tmp_path / "one.onnx", search_block=16)
    pair = _strict_export(det, test[:4], tmp_path / "pair.onnx", search_block=16,
                         external_data=True)
    assert not (tmp_path / "one.onnx.data").exists() and (tmp_path / "pair.onnx.data").exists()
    joined, loaded = onnx.load(str(one)), onnx.load(str(pair))
    for t in loaded.graph.initializer:  # (onnx.load marks the weights it read in as inline)
        assert t.data_location == onnx.TensorProto.DEFAULT
        t.ClearField("data_location")
    assert joined == loaded and len(joined.graph.initializer) > 10
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
               for t in joined.graph.initializer)
    onnx.checker.check_model(str(one))
    # The join itself, on the pair as the exporter wrote it.
    graph = onnx.load(str(pair), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer) > 5
    portable._join_external_data(pair, tmp_path / "pair.onnx.data", tmp_path / "again.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")) == loaded
    short = tmp_path / "short" / "pair.onnx.data"
    short.parent.mkdir()
    short.write_bytes((tmp_path / "pair.onnx.data").read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"ends before weight bytes"):
        portable._join_external_data(pair, short, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match=r"is kept in 'pair\.onnx\.data' \(\d+ bytes\), not "
                                         r"in 'other\.data'"):
        portable._join_external_data(pair, tmp_path / "other.data", tmp_path / "bad.onnx")
    monkeypatch.setattr(portable, "ONE_FILE_LIMIT", 100)
    big = _strict_export(det, test[:4], tmp_path / "big.onnx", search_block=16)
    assert (tmp_path / "big.onnx.data").stat().st_size == (tmp_path / "pair.onnx.data"
                                                           ).stat().st_size
    kept = onnx.load(str(big), load_external_data=False).graph.initializer
    assert [t.data_location for t in kept] == [t.data_location for t in graph.graph.initializer]


def test_a_weight_outside_the_initializers_is_joined_too(tmp_path):
    """The streamed join copies the graph's initializers in; a weight kept externally
    anywhere else (a Constant node's, a subgraph's: torch's exporter writes none there today)
    still pointed at the data file, deleted after the join. Such a model is joined by onnx
    itself."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    from grood import portable

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "w")
    const = numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "c")
    inner = numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "i")
    branch = helper.make_graph([helper.make_node("Identity", ["i"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 8])],
                               initializer=[inner])
    nodes = [helper.make_node("Constant", [], ["c"], value=const),
             helper.make_node("Add", ["w", "c"], ["s"]),
             helper.make_node("If", ["flag"], ["b"], then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["s", "b"], ["out"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 8])],
        initializer=[weight]))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="m.onnx.data",
                                   size_threshold=0, convert_attribute=True)
    onnx.save(model, str(tmp_path / "m.onnx"))
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert {t.name for t in portable._tensors_beyond_initializers(stored.graph)
            if t.data_location == TensorProto.EXTERNAL} == {"c", "i"}
    (tmp_path / "joined").mkdir()
    portable._join_external_data(tmp_path / "m.onnx", tmp_path / "m.onnx.data",
                                 tmp_path / "joined" / "m.onnx")
    joined = onnx.load(str(tmp_path / "joined" / "m.onnx"))  # (no data file beside it)
    tensors = [joined.graph.initializer[0], joined.graph.node[0].attribute[0].t,
               joined.graph.node[2].attribute[0].g.initializer[0]]
    for got, expected in zip(tensors, (weight, const, inner), strict=True):
        assert got.data_location == TensorProto.DEFAULT
        np.testing.assert_array_equal(numpy_helper.to_array(got),
                                      numpy_helper.to_array(expected))
    onnx.checker.check_model(joined)


def test_grood_export_writes_a_checked_file(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    x, y = clustered_features(90, 3, 6, seed=2, dtype=torch.float32)
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy())
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "d.safetensors")]) == 0
    assert main(["export", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "d.onnx"),
                 "--no-float64", "--search-block", "32", "--external-data"]) == 0
    out = capsys.readouterr().out
    assert "input 'input' [N, 6] float32 features; outputs score, pred; checked in ONNX " \
           "Runtime on 4 rows" in out
    det = GROOD.load(tmp_path / "d.safetensors")
    # The index (float32, D = 6) beside the graph.
    assert (tmp_path / "d.onnx.data").stat().st_size >= det.index_.ntotal * 6 * 4
    # The index went into the graph as blocks of 32 rows: no weight holds more. Each row of
    # the prototypes and the index is stored once (no transposed copy folded in), and the
    # matmuls read them as stored.
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    assert max(max(w.dims, default=1) for w in graph.initializer) == 32
    matrices = [w for w in graph.initializer if len(w.dims) == 2 and 6 in w.dims]  # D = 6
    assert sum(w.dims[0] * w.dims[1] for w in matrices) == (3 + det.index_.ntotal) * 6
    assert all(w.dims[1] == 6 for w in matrices)
    assert not any(node.op_type == "Transpose" and set(node.input) & {w.name for w in matrices}
                   for node in graph.node)
    score, pred = _session(tmp_path / "d.onnx").run(None, {"input": x[:9].numpy()})
    want_s, want_p = det.score_and_predict(x[:9])
    np.testing.assert_allclose(score, want_s.numpy(), rtol=1e-5, atol=1e-7)
    assert np.array_equal(pred, want_p.numpy())
    assert main(["export", str(tmp_path / "d.safetensors"), "-o",
                 str(tmp_path / "train.npz")]) == 2
    assert "ONNX files are written as .onnx" in capsys.readouterr().err
