"""kneighbors: the nearest indexed training gradients, named by training row."""

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from conftest import clustered_features, rewrite_detector_file

from grood import GROOD, DetectorFileError, NotFittedError
from grood.index import INDEXES, GradientIndex, register_index

needs_faiss = pytest.mark.skipif(find_spec("faiss") is None, reason="needs faiss")


def _data(seed=0, n=120, c=4, d=9):
    x, y = clustered_features(n, c, d, seed=seed, spread=0.7, dtype=torch.float32)
    test, _ = clustered_features(31, c, d, seed=seed + 100, spread=1.0, dtype=torch.float32)
    return x, y, test


def _brute_force(det, x, test, k):
    """The k nearest indexed gradients by a float64 scan over every training row's gradient,
    restricted to the rows the detector indexed: (squared distances, training rows)."""
    g_train = det._grads.resolved(x, 0).grad.double()
    g_test = det._grads.resolved(test, 0).grad.double()
    rows = det.indexed_rows_
    d = torch.cdist(g_test, g_train[rows]).square()
    dist, pos = torch.topk(d, k, dim=1, largest=False)
    return dist, rows[pos]


@pytest.mark.parametrize("k", [1, 3])
def test_neighbours_are_the_nearest_indexed_training_rows(k):
    x, y, test = _data()
    gen = torch.Generator().manual_seed(3)
    logits = torch.nn.functional.one_hot(y, 4).float() + 0.8 * torch.randn(120, 4, generator=gen)
    det = GROOD(k=k, batch_size=7).fit(x, y, logits=logits)
    # The indexed rows are the rows the logits get right, in order.
    right = (logits.argmax(1) == y).nonzero().squeeze(1)
    assert 0 < right.numel() < 120
    assert torch.equal(det.indexed_rows_, right)
    dist, rows = det.kneighbors(test, n_neighbors=k + 2)
    assert dist.shape == rows.shape == (31, k + 2) and rows.dtype == torch.int64
    want_d, want_r = _brute_force(det, x, test, k + 2)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-4, atol=1e-7)
    assert torch.equal(rows, want_r)
    # The score is minus the k-th distance, bit for bit.
    assert torch.equal(det.score_samples(test), 0.0 - dist[:, k - 1])
    assert torch.equal(det.kneighbors(test)[0], dist[:, :k])  # n_neighbors defaults to k
    # Every indexed training row is its own nearest neighbour, at distance 0.
    d0, r0 = det.kneighbors(x[right], 1)
    assert torch.equal(r0[:, 0], right) and not d0.any()


def test_numpy_in_numpy_out_and_float64():
    x, y, test = _data(seed=1)
    det = GROOD().fit(x.numpy(), y.numpy())
    dist, rows = det.kneighbors(test.numpy(), 2)
    assert isinstance(dist, np.ndarray) and dist.dtype == np.float32
    assert isinstance(rows, np.ndarray) and rows.dtype == np.int64 and rows.shape == (31, 2)
    d64, r64 = det.kneighbors(test.double().numpy(), 2)
    assert d64.dtype == np.float64 and np.array_equal(r64, rows)


def test_rows_count_across_batches_and_fit_batches():
    """Rows are numbered in the order fit read them, across batches."""
    x, y, test = _data(seed=2)
    whole = GROOD().fit(x, y)
    batched = GROOD().fit_batches([(x[i:i + 13], y[i:i + 13]) for i in range(0, 120, 13)])
    assert torch.equal(batched.indexed_rows_, whole.indexed_rows_)
    assert all(torch.equal(a, b) for a, b in zip(batched.kneighbors(test, 2),
                                                  whole.kneighbors(test, 2), strict=True))


@pytest.mark.parametrize("index", [
    "exact", "exact-bf16",
    pytest.param("faiss-flat", marks=needs_faiss), pytest.param("faiss-ivf", marks=needs_faiss)])
def test_every_index_kind_names_its_rows_and_keeps_them_through_save_load_and_move(
        index, tmp_path):
    x, y, test = _data(seed=4)
    kwargs = ({"index": "exact", "index_options": {"storage": "bfloat16"}}
              if index == "exact-bf16" else {"index": index})
    if index == "faiss-ivf":
        kwargs["index_options"] = {"nlist": 4, "nprobe": 4}  # every list: the exact answer
    det = GROOD(k=2, **kwargs).fit(x, y)
    dist, rows = det.kneighbors(test, 3)
    want_d, want_r = _brute_force(det, x, test, 3)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-4, atol=1e-6)
    assert torch.equal(rows, want_r)
    det.save(tmp_path / "d.safetensors")
    again = GROOD.load(tmp_path / "d.safetensors")
    assert torch.equal(again.indexed_rows_, det.indexed_rows_)
    assert all(torch.equal(a, b) for a, b in zip(again.kneighbors(test, 3), (dist, rows),
                                                  strict=True))
    from grood.persistence import move

    move(again, torch.device("cpu"))  # the rebuild every move to another device takes
    assert torch.equal(again.indexed_rows_, det.indexed_rows_)
    assert torch.equal(again.kneighbors(test, 3)[1], rows)


@pytest.mark.gpu  # run by bench/gpu_check.sh's torch-path step
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("storage", ["float32", "bfloat16-host"])
def test_neighbours_on_the_gpu_name_the_rows_the_cpu_names(storage):
    """Fitted on the GPU (the torch backend, and the bf16 index whose exact rows stay in
    pinned host memory): the same training rows as a float64 scan, distances within rounding,
    the score minus the k-th distance bit for bit, results on the features' device."""
    x, y, test = _data(seed=6)
    options = ({"storage": "bfloat16", "exact_copy": "host"} if storage == "bfloat16-host"
               else None)
    det = GROOD(k=2, backend="torch", device="cuda", index_options=options).fit(x, y)
    dist, rows = det.kneighbors(test.cuda(), 3)
    assert dist.device.type == rows.device.type == "cuda"
    want_d, want_r = _brute_force(det, x.cuda(), test.cuda(), 3)
    torch.testing.assert_close(dist.double(), want_d, rtol=1e-4, atol=1e-6)
    assert torch.equal(rows, want_r)
    assert torch.equal(det.score_samples(test.cuda()), 0.0 - dist[:, 1])
    cpu_dist, cpu_rows = det.kneighbors(test, 3)  # host features: results in host memory
    assert cpu_rows.device.type == "cpu" and torch.equal(cpu_rows, rows.cpu())
    assert torch.equal(cpu_dist, dist.cpu())


def test_bad_requests_are_named():
    x, y, test = _data(seed=5)
    with pytest.raises(NotFittedError):
        GROOD().kneighbors(test)
    det = GROOD().fit(x, y)
    n = det.index_.ntotal
    with pytest.raises(ValueError, match="n_neighbors must be a positive integer, got 0"):
        det.kneighbors(test, 0)
    with pytest.raises(ValueError, match=f"n_neighbors={n + 1} but the index holds only {n}"):
        det.kneighbors(test, n + 1)
    with pytest.raises(ValueError, match="features has 3 columns"):
        det.kneighbors(test[:, :3])
    bad = test.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) 4"):
        det.kneighbors(bad)
    assert torch.equal(det.kneighbors(test, n)[1].sort(dim=1).values,
                       det.indexed_rows_.expand(31, n))  # all of them, each once


def test_a_version_1_file_loads_and_says_it_cannot_name_rows(tmp_path):
    x, y, test = _data(seed=6)
    det = GROOD().fit(x, y)
    path = tmp_path / "old.safetensors"
    det.save(path)

    def as_version_1(meta, tensors):
        meta["format_version"] = "1"
        del tensors["indexed_rows"]

    rewrite_detector_file(path, as_version_1)
    old = GROOD.load(path)
    assert old.indexed_rows_ is None
    assert torch.equal(old.score_samples(test), det.score_samples(test))
    with pytest.raises(ValueError, match=r"does not know which training rows.*refit"):
        old.kneighbors(test)
    old.save(tmp_path / "resaved.safetensors")  # and saves as it is
    assert GROOD.load(tmp_path / "resaved.safetensors").indexed_rows_ is None

    def version_1_with_rows(meta, tensors):  # version 1 files had no such tensor
        meta["format_version"] = "1"

    det.save(path)
    rewrite_detector_file(path, version_1_with_rows)
    with pytest.raises(DetectorFileError, match="holds tensors"):
        GROOD.load(path)


@pytest.mark.parametrize("bad", ["decreasing", "out-of-range", "negative", "short", "float"])
def test_damaged_row_numbers_are_refused(tmp_path, bad):
    x, y, _ = _data(seed=7)
    path = tmp_path / "d.safetensors"
    GROOD().fit(x, y).save(path)

    def damage(meta, tensors):
        rows = tensors["indexed_rows"]
        n_train = json.loads(meta["state"])["n_train"]
        tensors["indexed_rows"] = {
            "decreasing": rows.flip(0), "out-of-range": rows + n_train,
            "negative": rows - 1 - rows[0], "short": rows[:-1],
            "float": rows.double()}[bad]

    rewrite_detector_file(path, damage)
    with pytest.raises(DetectorFileError, match="inconsistent"):
        GROOD.load(path)


class _DroppingIndex(GradientIndex):
    """A test index that leaves out every other row it is given, without saying so."""

    kind = "test-dropping"

    def __init__(self, dim):
        self.dim, self.rows = dim, torch.empty(0, dim)

    @classmethod
    def create(cls, dim, **_):
        return cls(dim)

    @classmethod
    def from_state_dict(cls, state, **_):
        index = cls(state["rows"].shape[1])
        index.rows = state["rows"]
        return index

    @property
    def ntotal(self):
        return self.rows.shape[0]

    def add(self, x):
        self.rows = torch.cat([self.rows, x.float()[::2]])

    def search(self, queries, k=1):
        d, i = torch.topk(torch.cdist(queries.float(), self.rows).square(), k, largest=False)
        return d, i

    def state_dict(self):
        return {"rows": self.rows}


def test_an_index_that_drops_rows_is_not_named_wrongly(tmp_path):
    register_index(_DroppingIndex)
    try:
        x, y, test = _data(seed=8)
        det = GROOD(index="test-dropping").fit(x, y)
        assert det.indexed_rows_ is None
        assert det.score_samples(test).shape == (31,)
        with pytest.raises(ValueError, match="does not know which training rows"):
            det.kneighbors(test)
        det.save(tmp_path / "d.safetensors")
        assert GROOD.load(tmp_path / "d.safetensors").indexed_rows_ is None
    finally:
        INDEXES.pop("test-dropping", None)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_triton_backend_names_the_same_rows(precision):
    pytest.importorskip("triton")
    x, y, test = _data(seed=9, n=70, d=7)
    ref = GROOD(k=2, batch_size=16).fit(x, y)
    det = GROOD(k=2, batch_size=16, backend="triton", precision=precision).fit(x, y)
    assert det.backend_["knn"] == "triton"
    assert torch.equal(det.indexed_rows_, ref.indexed_rows_)
    dist, rows = det.kneighbors(test, 3)
    want_d, want_r = ref.kneighbors(test, 3)
    assert torch.equal(rows, want_r)
    torch.testing.assert_close(dist, want_d, rtol=1e-5, atol=1e-7)


def test_a_file_written_before_rows_were_recorded_still_loads():
    """tests/data/detector_v1.safetensors was saved by the version-1 writer (this repository
    before indexed rows were recorded) from the data below: it loads, scores as a detector
    fitted now, and cannot name neighbours."""
    from pathlib import Path

    x, y = clustered_features(64, 3, 6, seed=11, spread=0.6, dtype=torch.float32)
    old = GROOD.load(Path(__file__).parent / "data" / "detector_v1.safetensors")
    new = GROOD(k=2).fit(x, y)
    assert old.indexed_rows_ is None and old.k == 2
    assert torch.equal(old.score_samples(x), new.score_samples(x))
    with pytest.raises(ValueError, match="version 1 detector file"):
        old.kneighbors(x)
