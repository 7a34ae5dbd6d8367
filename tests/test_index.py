"""Gradient index kinds: exact, faiss-flat and faiss-ivf; building, search, save/load."""

import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import clustered_features
from reference import knn_naive

from grood import GROOD
from grood.index import ExactIndex, make_index


def _vectors(n=300, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(25, d, generator=gen)


def test_exact_index_grows_in_batches_and_searches_exactly():
    db, q = _vectors()
    index = ExactIndex(16)
    for start in range(0, 300, 37):
        index.add(db[start:start + 37])
    index.trim()
    assert index.ntotal == 300 and torch.equal(index.vectors, db)
    dist, idx = index.search(q, 3)
    ref_d, ref_i = knn_naive(q, db, 3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-6)


def test_exact_index_refuses_wrong_shape_and_empty_search():
    index = ExactIndex(4)
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        index.add(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(torch.zeros(1, 4))


@pytest.mark.parametrize("kind", ["exact", "faiss-flat"])
def test_add_where_appends_the_kept_rows_as_add_does(kind):
    """fit adds each batch's correctly classified gradients with add_where; the exact index
    selects them straight into its storage (x[keep] first made a copy of them)."""
    if kind != "exact":
        pytest.importorskip("faiss")
    db, _ = _vectors()
    gen = torch.Generator().manual_seed(3)
    by_mask = make_index(kind, 16, dtype=torch.float32, device=torch.device("cpu"),
                         backend="torch")
    ref = make_index(kind, 16, dtype=torch.float32, device=torch.device("cpu"),
                     backend="torch")
    by_mask.reserve(40)  # grows past it
    for start in range(0, 300, 64):
        x = db[start:start + 64]
        keep = torch.rand(x.shape[0], generator=gen) < 0.7
        by_mask.add_where(x if start % 128 else x.double(), keep)  # float64: converted
        ref.add(x[keep])
    assert by_mask.ntotal == ref.ntotal and torch.equal(by_mask.vectors, ref.vectors)
    bad = torch.zeros(5, 16)
    bad[3, 0] = float("inf")
    keep = torch.tensor([True, False, True, True, False])
    with pytest.raises(ValueError, match=rf"NaN or Inf in row\(s\) {ref.ntotal + 2}"):
        by_mask.add_where(bad, keep)  # numbered by its place in the index
    assert by_mask.ntotal == ref.ntotal and torch.equal(by_mask.vectors, ref.vectors)
    by_mask.add_where(bad, ~keep | torch.tensor([False, False, False, False, False]))
    assert by_mask.ntotal == ref.ntotal + 2
    with pytest.raises(ValueError, match=r"keep must be a bool mask of shape \[5\]"):
        by_mask.add_where(bad, torch.ones(5, dtype=torch.int64))


@pytest.mark.parametrize("kind", ["exact", "faiss-flat", "faiss-ivf"])
def test_non_finite_or_integer_vectors_are_refused(kind):
    """A NaN row would silently never be found and an Inf row found wrongly: refused, named
    by its row number in the index; nothing is added. Queries are checked the same way."""
    if kind != "exact":
        pytest.importorskip("faiss")
    index = make_index(kind, 4, dtype=torch.float32, device=torch.device("cpu"),
                       backend="torch")
    index.add(torch.zeros(3, 4))
    bad = torch.zeros(4, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"index vectors contains NaN or Inf in row\(s\) 5"):
        index.add(bad)
    with pytest.raises(TypeError, match="floating point"):
        index.add(torch.zeros(2, 4, dtype=torch.int64))
    assert index.ntotal == 3
    # Queries too: a NaN query found no neighbour (distance inf, index -1), silently.
    for bad_rows in (bad, bad.double()):
        with pytest.raises(ValueError, match=r"queries contains NaN or Inf in row\(s\) 2"):
            index.search(bad_rows, 1)
    with pytest.raises(ValueError, match=r"queries must have shape \[n, 4\], got \(4,\)"):
        index.search(torch.zeros(4), 1)
    with pytest.raises(TypeError, match="queries must be floating point"):
        index.search(torch.zeros(2, 4, dtype=torch.int64), 1)


def test_unknown_index_and_options_are_named():
    with pytest.raises(ValueError, match="index must be one of"):
        GROOD(index="hnsw").fit(torch.rand(10, 3), torch.arange(10) % 2)
    with pytest.raises(ValueError, match="takes no index_options"):
        make_index("faiss-flat", 3, dtype=torch.float32, device=torch.device("cpu"),
                   backend="torch", options={"nprobe": 2})


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install 'grood\[faiss-cpu\]'"):
        GROOD(index="faiss-flat").fit(torch.rand(10, 3), torch.arange(10) % 2)


def test_faiss_gpu_index_goes_to_the_current_device_for_plain_cuda(monkeypatch):
    """device "cuda" means the current GPU (where torch puts the detector's tensors: each
    rank's own after torch.cuda.set_device), so the faiss index goes there, not to GPU 0."""
    from grood.index import _to_gpu_if_possible

    moved = []

    class FakeGpuFaiss:
        StandardGpuResources = object

        @staticmethod
        def get_num_gpus():
            return 4

        @staticmethod
        def index_cpu_to_gpu(resources, gpu, index):
            moved.append(gpu)
            return index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    for device, want in (("cuda", 2), ("cuda:3", 3), ("cuda:0", 0)):
        _to_gpu_if_possible(FakeGpuFaiss, "index", torch.device(device))
        assert moved.pop() == want
    assert _to_gpu_if_possible(FakeGpuFaiss, "index", torch.device("cpu")) == ("index", None)


def test_a_faiss_index_that_cannot_go_to_the_gpu_says_so(monkeypatch):
    """A detector on a GPU whose faiss is a CPU build, or a GPU build that sees no GPU (a
    CUDA runtime the driver refuses), searches in host memory: said, with the way out, not
    left for the user to find in the timings. Nothing is said for a detector in host memory
    or where faiss takes the index to the GPU. (Stand-ins: this machine may have no GPU.)"""
    from grood.index import _to_gpu_if_possible, faiss_gpu_refusal

    class CpuFaiss:  # faiss-cpu: no GPU classes at all
        pass

    class BlindGpuFaiss:
        StandardGpuResources = object

        @staticmethod
        def get_num_gpus():
            return 0

    class GpuFaiss(BlindGpuFaiss):
        @staticmethod
        def get_num_gpus():
            return 1

        @staticmethod
        def index_cpu_to_gpu(resources, gpu, index):
            return "gpu " + index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.warns(UserWarning, match=r"this faiss index of a detector on cuda:1 searches "
                      r"on the CPU, in host memory.*a CPU build \(faiss-cpu\): for GPU search "
                      r"install grood\[faiss-gpu\] in its place.*or use index='exact'"):
        assert _to_gpu_if_possible(CpuFaiss, "index", torch.device("cuda:1")) == ("index", None)
    with pytest.warns(UserWarning, match=r"on cuda searches on the CPU.*a GPU build, sees no "
                                         r"GPU \(faiss.get_num_gpus\(\) is 0"):
        assert _to_gpu_if_possible(BlindGpuFaiss, "index", torch.device("cuda")) == (
            "index", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _to_gpu_if_possible(CpuFaiss, "index", torch.device("cpu")) == ("index", None)
        assert _to_gpu_if_possible(GpuFaiss, "index", torch.device("cuda"))[0] == "gpu index"
    assert faiss_gpu_refusal(GpuFaiss) is None
    real = pytest.importorskip("faiss")
    if faiss_gpu_refusal(real) is not None:  # this machine's faiss, through a real index
        from grood.index import FaissFlatIndex

        with pytest.warns(UserWarning, match="searches on the CPU, in host memory"):
            index = FaissFlatIndex(4, device="cuda")
        assert "IndexFlatL2" in repr(index) and "Gpu" not in repr(index)


faiss = pytest.importorskip("faiss")


def test_faiss_flat_equals_exact():
    db, q = _vectors(seed=1)
    flat = make_index("faiss-flat", 16, dtype=torch.float32, device=torch.device("cpu"),
                      backend="torch")
    exact = ExactIndex(16)
    for start in range(0, 300, 64):
        flat.add(db[start:start + 64])
        exact.add(db[start:start + 64])
    d_f, i_f = flat.search(q, 4)
    d_e, i_e = exact.search(q, 4)
    assert torch.equal(i_f, i_e)
    torch.testing.assert_close(d_f, d_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(flat.vectors, db)


def test_faiss_ivf_follows_the_reference_rule_and_trains_early():
    index = make_index("faiss-ivf", 8, dtype=torch.float32, device=torch.device("cpu"),
                       backend="torch", options={"reference_batch_size": 2})
    index.expect_training_rows(100)  # B = 50 batches, T = min(600, 40) = 40 batches = 80 rows
    x, _ = clustered_features(100, 5, 8, seed=2, dtype=torch.float32)
    index.add(x[:70])
    assert index.index is None and index.ntotal == 70  # still collecting training rows
    index.add(x[70:84])
    assert index.index is not None and index.index.nlist == int(4 * 40 ** 0.5)
    index.add(x[84:])
    assert index.ntotal == 100 and index.index.nprobe == 4


def test_faiss_ivf_says_when_a_given_nlist_exceeds_its_training_vectors():
    """nlist is capped at the training vectors (faiss needs one per list at least): silently,
    before, for an nlist the user gave; the reference's rule is capped without a word."""
    x, _ = clustered_features(30, 3, 4, seed=2, dtype=torch.float32)
    index = make_index("faiss-ivf", 4, dtype=torch.float32, device=torch.device("cpu"),
                       backend="torch", options={"nlist": 50})
    index.add(x)
    with pytest.warns(UserWarning, match="nlist=50 is more than the 30 gradients the IVF "
                                         "quantizer is trained on; it gets 30 lists"):
        index.trim()
    assert index.index.nlist == 30
    default = make_index("faiss-ivf", 4, dtype=torch.float32, device=torch.device("cpu"),
                         backend="torch", options={"reference_batch_size": 1})
    default.add(x[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default.trim()  # the rule asks for int(4 * sqrt(2)) = 5 lists
    assert default.index.nlist == 3


def test_faiss_ivf_is_exact_when_it_probes_every_list():
    x, _ = clustered_features(400, 8, 12, seed=3, dtype=torch.float32)
    q, _ = clustered_features(50, 8, 12, seed=4, spread=0.6, dtype=torch.float32)
    index = make_index("faiss-ivf", 12, dtype=torch.float32, device=torch.device("cpu"),
                       backend="torch", options={"nlist": 8, "nprobe": 8})
    index.add(x)
    _, idx = index.search(q, 1)
    _, ref = knn_naive(q, x, 1)
    assert torch.equal(idx, ref)


def test_faiss_ivf_recall_against_exact():
    x, y = clustered_features(3000, 10, 32, seed=5, spread=0.5, dtype=torch.float32)
    test, _ = clustered_features(300, 10, 32, seed=6, spread=0.6, dtype=torch.float32)
    exact = GROOD().fit(x, y)
    ivf = GROOD(index="faiss-ivf", index_options={"reference_batch_size": 32}).fit(x, y)
    g = exact._grads(test).grad
    _, i_exact = exact.index_.search(g, 1)
    _, i_ivf = ivf.index_.search(g, 1)
    recall = float((i_exact == i_ivf).double().mean())
    # Approximate by design: nprobe = 4 of int(4 * sqrt(min(600, 0.8 * 94))) = 34 lists.
    assert ivf.index_.index.nlist == 34
    assert recall > 0.5
    # Its scores are never better than exact (it can only miss the true nearest neighbour).
    assert bool((ivf.score_samples(test) <= exact.score_samples(test) + 1e-6).all())


@pytest.mark.parametrize("kind", ["exact", "faiss-flat", "faiss-ivf"])
def test_detector_save_load_with_each_index(kind, tmp_path):
    x, y = clustered_features(200, 4, 10, seed=7, spread=0.4, dtype=torch.float32)
    test, _ = clustered_features(30, 4, 10, seed=8, spread=0.7, dtype=torch.float32)
    options = {"nlist": 6, "nprobe": 2} if kind == "faiss-ivf" else None
    det = GROOD(index=kind, index_options=options).fit(x, y)
    det.save(tmp_path / "d.safetensors")
    loaded = GROOD.load(tmp_path / "d.safetensors")
    assert loaded.index == kind and loaded.index_.kind == kind
    assert loaded.index_options == options
    assert torch.equal(loaded.score_samples(test), det.score_samples(test))
    if kind != "faiss-ivf":
        exact = GROOD().fit(x, y)
        torch.testing.assert_close(det.score_samples(test), exact.score_samples(test),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exact_copy", ["device", "host"])
def test_half_precision_storage_searches_exactly(exact_copy, tmp_path):
    from grood import GROOD

    x, y = clustered_features(600, 5, 24, seed=4, dtype=torch.float32)
    q, _ = clustered_features(50, 5, 24, seed=5, dtype=torch.float32)
    plain = GROOD(ood_prototype="mean").fit(x, y)
    half = GROOD(ood_prototype="mean", index_options={"storage": "bfloat16",
                                                      "exact_copy": exact_copy}).fit(x, y)
    assert half.index_._searched().dtype == torch.bfloat16
    assert half.index_.vectors.dtype == torch.float32
    assert torch.equal(half.score_samples(q), plain.score_samples(q))
    half.save(tmp_path / "d.safetensors")
    again = GROOD.load(tmp_path / "d.safetensors")
    assert again.index_.storage == torch.bfloat16
    assert torch.equal(again.score_samples(q), plain.score_samples(q))


def test_float16_storage_that_loses_gradients_is_warned_of_once_at_the_fit():
    """Tight classes give gradients of norm ~1e-9, whose entries float16 flushes (its
    precision ends at 6.1e-5): the candidate search on the float16 copy then missed
    neighbours and 99 % of the scores came out wrong, silently. The copy's lost rows are
    counted when it is made and named; bfloat16 (float32's range) keeps them all. The fit's
    check of its search finds the misses and makes the copy there, whose warning names their
    cause: one warning, at the fit (before, the check's own warning blamed the gradients'
    directions, and the first score warned again)."""
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(5, 64, generator=gen))
    y = torch.arange(400) % 5
    x = 30 * dirs[y] + torch.randn(400, 64, generator=gen)
    plain = GROOD().fit(x[:300], y[:300]).score_samples(x[300:])
    with pytest.warns(UserWarning) as caught:
        fp16 = GROOD(index_options={"storage": "float16"}).fit(x[:300], y[:300])
    assert len(caught) == 1
    assert re.search(r"storage='float16': 300 of the 300 indexed gradients \(100 %\) lose more "
                     r"than 3\.12 % of their norm .* use storage='bfloat16'",
                     str(caught[0].message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = fp16.score_samples(x[300:])
    assert not torch.equal(scores, plain)  # what the warning is about
    bf16 = GROOD(index_options={"storage": "bfloat16"}).fit(x[:300], y[:300])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bf16.score_samples(x[300:]), plain)


def test_exact_index_options_are_checked():
    from grood import GROOD

    x, y = clustered_features(60, 3, 4, seed=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="storage must be one of"):
        GROOD(index_options={"storage": "int8"}).fit(x, y)
    with pytest.raises(ValueError, match="exact_copy must be one of"):
        GROOD(index_options={"storage": "bf16", "exact_copy": "disk"}).fit(x, y)
    with pytest.raises(ValueError, match="takes index_options storage and exact_copy"):
        GROOD(index_options={"nprobe": 3}).fit(x, y)
    # A misspelt name is matched to the option it is close to.
    with pytest.raises(ValueError, match=r"not \['storge'\] \(did you mean 'storage'\?\)$"):
        GROOD(index_options={"storge": "bf16"}).fit(x, y)


@pytest.mark.parametrize("kind, options, message", [
    ("exact", {"storage": "int8"}, "storage must be one of"),
    ("exact", {"exact_copy": "host"}, "exact_copy='host' .* but no storage is given"),
    ("exact", {"bogus": 1}, "takes index_options storage and exact_copy"),
    ("faiss-ivf", {"nprobe": 0}, "nprobe must be a positive integer, got 0"),
    ("faiss-ivf", {"omit_batch_t": True}, "True only with loader_batches"),
    ("faiss-flat", {}, r"pip install 'grood\[faiss-cpu\]'"),
])
def test_index_options_are_refused_before_any_pass_over_the_data(monkeypatch, kind, options,
                                                                 message):
    """They were checked where the index is made, after the prototype pass: with fit_model a
    whole pass of the model over the training set (faiss missing too)."""
    if kind == "faiss-flat":  # faiss missing: named before the data is read too
        monkeypatch.setitem(sys.modules, "faiss", None)
    elif kind == "faiss-ivf":
        pytest.importorskip("faiss")
    x, y = clustered_features(60, 3, 4, seed=4, dtype=torch.float32)
    reads = []

    def batches():
        reads.append(1)
        yield x, y

    with pytest.raises((ValueError, ImportError), match=message):
        GROOD(index=kind, index_options=options).fit_batches(batches)
    assert not reads


def test_an_exact_copy_in_host_memory_needs_a_lower_precision_copy_to_search():
    x, y = clustered_features(60, 3, 4, seed=4, dtype=torch.float32)
    # storage that is the vectors' own dtype: no second copy (refused when the index is made)
    with pytest.raises(ValueError, match="storage 'float32' is the vectors' own dtype"):
        GROOD(index_options={"storage": "float32", "exact_copy": "host"}).fit(x, y)
    # float64 features: a float32 copy is lower precision, and the exact rows may live on the
    # host
    det = GROOD(index_options={"storage": "float32", "exact_copy": "host"}).fit(x.double(), y)
    assert det.index_.exact_copy == "host" and det.index_.storage == torch.float32


def test_index_options_changed_after_fit_take_effect_at_the_next_fit_even_through_a_file(
        tmp_path):
    """The index kind and build options set after fit are for the next fit: the detector, and
    the one loaded from its file, keep the index it was fitted with (a changed kind made the
    file unloadable, with another kind's options given to this index's constructor)."""
    x, y = clustered_features(200, 4, 10, seed=7, spread=0.4, dtype=torch.float32)
    test, _ = clustered_features(30, 4, 10, seed=8, spread=0.7, dtype=torch.float32)
    det = GROOD().fit(x, y)
    want = det.score_samples(test)
    det.set_params(index="faiss-ivf", index_options={"nprobe": 8})
    assert torch.equal(det.score_samples(test), want)
    det.save(tmp_path / "kind.safetensors")
    loaded = GROOD.load(tmp_path / "kind.safetensors")
    assert loaded.index_.kind == "exact" and loaded.index == "faiss-ivf"
    assert torch.equal(loaded.score_samples(test), want)

    det = GROOD().fit(x, y)
    det.set_params(index_options={"storage": "bfloat16"})
    det.save(tmp_path / "storage.safetensors")
    loaded = GROOD.load(tmp_path / "storage.safetensors")
    assert loaded.index_.storage is None and loaded.index_options == {"storage": "bfloat16"}
    assert torch.equal(loaded.score_samples(test), want)
    det.set_params(index_options=["storage", "bfloat16"])
    with pytest.raises(TypeError, match="index_options must be a dict"):
        det.score_samples(test)


def test_ivf_nprobe_set_after_fit_applies_to_scores_and_to_the_saved_file(tmp_path):
    """nprobe steers searches only: changed after fit it applies at the next score, as k does,
    and the detector loaded from the file scores the same (the file used it, memory did not)."""
    pytest.importorskip("faiss")
    x, y = clustered_features(400, 4, 10, seed=3, spread=0.6, dtype=torch.float32)
    test, _ = clustered_features(60, 4, 10, seed=4, spread=0.9, dtype=torch.float32)
    det = GROOD(index="faiss-ivf", index_options={"nlist": 16, "nprobe": 1}).fit(x, y)
    one = det.score_samples(test)
    det.set_params(index_options={"nlist": 16, "nprobe": 16})  # every list: exact search
    every = det.score_samples(test)
    assert det.index_.nprobe == 16 and not torch.equal(every, one)
    exact = GROOD().fit(x, y).score_samples(test)
    torch.testing.assert_close(every, exact, rtol=1e-5, atol=1e-6)
    det.save(tmp_path / "d.safetensors")
    assert torch.equal(GROOD.load(tmp_path / "d.safetensors").score_samples(test), every)
    det.set_params(index_options={"nlist": 16})  # back to the default, 4
    det.score_samples(test)
    assert det.index_.nprobe == 4 and det.index_.index.nprobe == 4
    det.set_params(index_options={"nprobe": 0})
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        det.score_samples(test)
    # None for an option with a default (it failed inside faiss, or in arithmetic).
    for name in ("nprobe", "reference_batch_size"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got None"):
            GROOD(index="faiss-ivf", index_options={name: None}).fit(x, y)


def test_ivf_search_that_finds_fewer_than_k_neighbours_is_refused():
    """The few inverted lists an IVF search visits may hold fewer than k vectors: faiss pads
    the k-th neighbour at distance FLT_MAX, which scored -3.4e38 (silently the most OOD
    sample). Refused with the row and the remedy; a larger nprobe, set after fit, scores."""
    pytest.importorskip("faiss")
    x, y = clustered_features(400, 4, 10, seed=3, spread=0.6, dtype=torch.float32)
    test, _ = clustered_features(60, 4, 10, seed=4, spread=0.9, dtype=torch.float32)
    det = GROOD(index="faiss-ivf", index_options={"nlist": 64, "nprobe": 1}, k=20,
                batch_size=16).fit(x, y)
    with pytest.raises(ValueError, match=r"fewer than k=20 neighbours for row \d+ .*raise "
                                         r"nprobe"):
        det.score_samples(test)
    det.set_params(index_options={"nlist": 64, "nprobe": 64})
    scores = det.score_samples(test)
    assert bool((scores > -1e30).all())
    torch.testing.assert_close(scores, GROOD(k=20).fit(x, y).score_samples(test), rtol=1e-5,
                               atol=1e-6)


def test_files_without_the_fitted_index_options_still_load(tmp_path):
    """Files written before the index's own options were saved rebuild the index with the
    saved index_options when those were meant for its kind, and with defaults when not."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood.persistence import digest

    x, y = clustered_features(200, 4, 10, seed=7, spread=0.4, dtype=torch.float32)
    test, _ = clustered_features(30, 4, 10, seed=8, spread=0.7, dtype=torch.float32)
    for kind_after, options in (("exact", {"storage": "bfloat16"}),
                                ("faiss-ivf", {"nprobe": 8})):
        det = GROOD().fit(x, y)
        det.set_params(index=kind_after, index_options=options)
        det.save(tmp_path / "new.safetensors")
        with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
        del state["index_options"]  # as an older grood wrote it
        meta["state"] = json.dumps(state)
        meta.pop("digest")
        meta["digest"] = digest(tensors, meta)
        save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
        old = GROOD.load(tmp_path / "old.safetensors")
        assert old.index_.kind == "exact"
        want_storage = torch.bfloat16 if kind_after == "exact" else None
        assert old.index_.storage == want_storage
        assert torch.equal(old.score_samples(test), det.score_samples(test))


@pytest.mark.parametrize("kind", ["faiss-flat", "faiss-ivf"])
def test_detectors_with_a_faiss_index_pickle_and_deepcopy(kind):
    """A fitted detector holding a faiss index could not be pickled or deep-copied ("cannot
    pickle 'module' object"), so it could not go through joblib or multiprocessing."""
    import copy
    import pickle

    x, y = clustered_features(300, 4, 10, seed=5, spread=0.5, dtype=torch.float32)
    test, _ = clustered_features(40, 4, 10, seed=6, spread=0.8, dtype=torch.float32)
    options = {"nlist": 8, "nprobe": 3} if kind == "faiss-ivf" else None
    det = GROOD(index=kind, index_options=options).fit(x, y)
    want = det.score_samples(test)
    for other in (pickle.loads(pickle.dumps(det)), copy.deepcopy(det)):
        assert other.index_.ntotal == det.index_.ntotal
        assert torch.equal(other.score_samples(test), want)
    copied = copy.deepcopy(det)  # a copy is independent of the original
    copied.index_.add(torch.zeros(2, 10))
    assert copied.index_.ntotal == det.index_.ntotal + 2
    if kind == "faiss-ivf":
        assert copied.index_.index.nprobe == 3


@pytest.mark.filterwarnings("ignore:the nearest class prototype classifies")  # random labels
def test_threads_scoring_a_fresh_half_precision_index_see_a_whole_copy(monkeypatch):
    """The half-precision copy is made at the first search. It was published before it was
    filled, so threads scoring a fresh detector at once searched half-written rows and gave
    other scores than one thread (seen with 8 threads and the default chunk; a chunk of a few
    rows widens the window)."""
    import grood.index

    monkeypatch.setattr(grood.index, "STORAGE_CHUNK_ROWS", 4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2000, 16, generator=gen), torch.randint(0, 5, (2000,), generator=gen)
    queries = [torch.rand(64, 16, generator=gen) for _ in range(8)]
    want = [GROOD(k=2, index_options={"storage": "bfloat16"}).fit(x, y).score_samples(q)
            for q in queries]
    for _ in range(3):
        det = GROOD(k=2, index_options={"storage": "bfloat16"}).fit(x, y)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(det.score_samples, queries))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_an_index_filled_under_inference_mode_takes_adds_outside_it():
    """A fit under ``torch.inference_mode`` left the exact index's buffer an inference tensor:
    an add outside that mode into reserved capacity failed ("Inplace update to inference
    tensor outside InferenceMode")."""
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        index = ExactIndex(6)
        index.add(torch.randn(10, 6, generator=gen))
        index.reserve(20)
    more = torch.randn(4, 6, generator=gen)
    index.add(more)
    index.add_where(more, torch.tensor([True, False, True, False]))
    assert index.ntotal == 16 and torch.equal(index.vectors[10:14], more)
    assert torch.equal(index.vectors[14:], more[[0, 2]])
    with torch.inference_mode():
        index.trim()
    index.add(more)
    assert index.ntotal == 20


def test_a_threshold_holds_for_the_nprobe_it_was_chosen_with():
    """IVF's nprobe changes its scores (it visits more or fewer lists): a threshold chosen at
    one nprobe is refused at another, and holds again when set back."""
    pytest.importorskip("faiss")
    x, y = clustered_features(300, 4, 10, seed=7, spread=0.4, dtype=torch.float32)
    val, _ = clustered_features(40, 4, 10, seed=9, spread=0.7, dtype=torch.float32)
    det = GROOD(index="faiss-ivf", index_options={"nlist": 6, "nprobe": 2}).fit(x, y)
    det.calibrate(val)
    assert det.calibration_["nprobe"] == 2
    det.set_params(index_options={"nlist": 6, "nprobe": 6})
    with pytest.raises(ValueError, match=r"another search \(nprobe=2 -> 6\)"):
        det.is_ood(val)
    det.set_params(index_options={"nlist": 6, "nprobe": 2})
    assert det.is_ood(val).float().mean() <= 0.05


def test_an_index_held_less_its_mean_searches_as_before_and_resolves_a_tight_cluster():
    """Held less its mean, an exact index returns the same neighbours at the same distances
    (to rounding) on ordinary vectors, takes later rows shifted as they come, and saves the
    shift with its rows; on vectors that all lie in one tight cluster far from the origin
    (closer together than the expansion's rounding at their norms) it finds what the
    uncentred search misses."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen)
    q = torch.randn(40, 12, generator=gen)
    index = ExactIndex(12)
    index.add(x[:250])
    want = index.search(q, 3)
    index.centre_on(index.vectors_mean())
    assert index.centre is not None
    torch.testing.assert_close(index.centre, x[:250].double().mean(0).float())
    got = index.search(q, 3)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    index.add_where(x[250:], torch.arange(50) % 2 == 0)
    index.add(x[250:255])
    d, i = index.search(x[250:260:2], 1)
    assert i[:, 0].tolist() == list(range(250, 255)) and d.abs().max() < 1e-10
    again = ExactIndex.from_state_dict(index.state_dict())
    assert torch.equal(again.centre, index.centre)
    assert torch.equal(again.search(q, 3)[1], index.search(q, 3)[1])
    index.drop_centre()
    assert index.centre is None and "centre" not in index.state_dict()
    torch.testing.assert_close(index.vectors[:250], x[:250], rtol=0, atol=1e-6)

    # A tight cluster: rows 1e-7 of their norm apart.
    far = torch.full((1, 12), 3.0) + torch.randn(200, 12, generator=gen) * 3e-7
    tight = ExactIndex(12)
    tight.add(far)
    truth = knn_naive(far.double(), far.double(), 2)[1][:, 1]  # each row's nearest other
    probe = far + (far[truth] - far) * 0.25  # a quarter of the way to that neighbour
    uncentred = tight.search(probe, 1)[1][:, 0]
    tight.centre_on(tight.vectors_mean())
    centred = tight.search(probe, 1)[1][:, 0]
    assert (uncentred == torch.arange(200)).float().mean() < 0.5
    assert (centred == torch.arange(200)).float().mean() > 0.95


@pytest.mark.parametrize("exact_copy", ["device", "host"])
def test_a_half_precision_copy_is_made_anew_from_the_rows_held_less_a_centre(exact_copy):
    """Centred, a bf16-storage index searches a copy of the shifted rows (the copy made
    before is dropped), which rounds each row by bf16's precision of its distance from the
    centre: on a tight cluster far from the origin it finds what the copy of the unshifted
    rows misses; rows added later are shifted as they come; the centre is saved and loaded
    with the storage option; unshifted again, the copy is remade once more."""
    gen = torch.Generator().manual_seed(1)
    far = torch.full((1, 12), 3.0) + torch.randn(200, 12, generator=gen) * 3e-3
    truth = knn_naive(far.double(), far.double(), 2)[1][:, 1]
    probe = far + (far[truth] - far) * 0.25  # a quarter of the way to each row's nearest
    half = ExactIndex(12, storage="bfloat16", exact_copy=exact_copy)
    half.add(far[:150])
    half.add_where(far[150:], torch.ones(50, dtype=torch.bool))
    uncentred = half.search(probe, 1)[1][:, 0]
    first_copy = half._searched()
    half.centre_on(half.vectors_mean())
    assert half._searched() is not first_copy and half._searched().dtype == torch.bfloat16
    torch.testing.assert_close(half._searched().float(), half.vectors, rtol=2 ** -8, atol=0)
    centred = half.search(probe, 1)[1][:, 0]
    assert (uncentred == torch.arange(200)).float().mean() < 0.5
    assert (centred == torch.arange(200)).float().mean() > 0.95
    half.add(far[:3])  # (copies of the first three rows: their own distance 0)
    d, i = half.search(far[:3], 2)
    assert sorted(i[:, :2].flatten().tolist()) == [0, 1, 2, 200, 201, 202]
    assert d.abs().max() < 1e-10
    again = ExactIndex.from_state_dict(half.state_dict(), options=half.options())
    assert again.storage == torch.bfloat16 and torch.equal(again.centre, half.centre)
    assert torch.equal(again.search(probe, 1)[1], half.search(probe, 1)[1])
    kept = half._searched()
    half.drop_centre()
    assert half._searched() is not kept
    torch.testing.assert_close(half.vectors[:200], far, rtol=0, atol=1e-6)


def test_an_index_centre_that_does_not_fit_is_refused():
    index = ExactIndex(4)
    index.add(torch.randn(10, 4))
    index.centre_on(index.vectors_mean())
    with pytest.raises(ValueError, match="already held less a centre"):
        index.centre_on(torch.zeros(4))
    state = index.state_dict()
    for centre in (torch.zeros(3), torch.zeros(4, dtype=torch.float64),
                   torch.tensor([0.0, float("nan"), 0.0, 0.0])):
        with pytest.raises(ValueError, match="the index's centre must be a finite float32 "
                                             "vector \\[4\\]"):
            ExactIndex.from_state_dict({**state, "centre": centre})
    index.drop_centre()
    for centre in (torch.zeros(3), torch.tensor([0.0, float("inf"), 0.0, 0.0])):
        with pytest.raises(ValueError, match=r"centre must be a finite vector \[4\]"):
            index.centre_on(centre)
