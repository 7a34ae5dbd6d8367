"""torch.distributed (gloo, CPU): a sharded fit and score equal the single-process detector."""

import json
import os
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import clustered_features

from grood import GROOD, __version__, persistence
from grood.cli import main
from grood.index import ExactIndex
from grood.persistence import describe

pytestmark = pytest.mark.skipif(not tdist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def _data():
    x, y = clustered_features(157, 5, 12, seed=0, spread=0.6, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    logits = torch.nn.functional.one_hot(y, 5).float() * 2 + torch.randn(157, 5, generator=gen)
    test, _ = clustered_features(61, 5, 12, seed=2, spread=0.9, dtype=torch.float32)
    ood = torch.rand(23, 12, generator=gen) * 3
    return x, y, logits, test, ood


@contextmanager
def _process_group(rank, world, tmp, backend="gloo"):
    """This spawned process as ``rank`` of a ``world``-rank group (a file store in ``tmp``),
    left again at the end whatever the worker raised."""
    tdist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank,
                             world_size=world)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _worker(rank, world, tmp, kwargs, fit_kwargs_names):
    with _process_group(rank, world, tmp):
        reserved, real_reserve = [], ExactIndex.reserve
        ExactIndex.reserve = lambda self, n: (reserved.append(n), real_reserve(self, n))[1]
        x, y, logits, test, ood = _data()
        part = lambda t: torch.tensor_split(t, world)[rank]  # noqa: E731
        fit_kwargs = {}
        if "logits" in fit_kwargs_names:
            fit_kwargs["logits"] = part(logits)
        if "ood_features" in fit_kwargs_names:
            fit_kwargs["ood_features"] = part(ood)
        det = GROOD(distributed=True, batch_size=7, **kwargs).fit(part(x), part(y),
                                                                  **fit_kwargs)
        # Ranks score different numbers of rows (one rank none at all for world 3).
        rows = torch.tensor_split(test, world)[rank] if rank != world - 1 or world < 3 else \
            test[:0]
        # The queries travel round a ring: nothing of their width is gathered to every rank.
        gathered, real_all_gather = [], tdist.all_gather
        tdist.all_gather = lambda out, t, *a, **kw: (gathered.append(t.shape),
                                                     real_all_gather(out, t, *a, **kw))[1]
        try:
            scores = det.score_samples(rows)  # an idle rank still joins the searches
        finally:
            tdist.all_gather = real_all_gather
        # distributed changed after fit is for the next fit: scores still search every shard
        # (they searched this rank's shard only, silently, before).
        det.set_params(distributed=False)
        flipped = det.score_samples(rows)
        det.set_params(distributed=True)
        # Training rows among the calibration rows are counted over every rank.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det.calibrate(torch.cat([rows, part(x)]), tpr=0.8)
        # The threshold comes from every rank's rows (an idle rank gives none).
        det.calibrate(rows, tpr=0.8)
        try:  # a shard cannot be moved alone
            det.to("cpu")
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        torch.save({"threshold": det.calibration_, "refused": refused,
                    "protos": det.class_prototypes_, "p_ood": det.ood_prototype_,
                    "scores": scores, "flipped": flipped, "sizes": det.shard_sizes_,
                    "acc": det.train_accuracy_, "pred": det.predict(test),
                    "reserved": reserved, "local_rows": part(x).shape[0],
                    "gathered": gathered, "warned": [str(w.message) for w in caught],
                    "neighbours": det.kneighbors(rows, 2), "prints": det.ood_fingerprints_},
                   f"{tmp}/rank{rank}.pt")
        det.save(f"{tmp}/det.json")
        # Loaded back as shards, the detector names the same neighbours; each rank reads
        # only its own shard, once (checked against the manifest's digest as it is read).
        read, real_sha, real_read = [], persistence.file_sha256, persistence.read_file
        persistence.file_sha256 = lambda path: (read.append(("hash", path.name)),
                                                real_sha(path))[1]
        persistence.read_file = lambda path, **kw: (read.append(("read", path.name)),
                                                    real_read(path, **kw))[1]
        try:
            loaded = GROOD.load(f"{tmp}/det.json", distributed=True)
        finally:
            persistence.file_sha256, persistence.read_file = real_sha, real_read
        torch.save(read, f"{tmp}/rank{rank}.read.pt")
        torch.save(loaded.kneighbors(rows, 2), f"{tmp}/rank{rank}.loaded.pt")


CASES = [
    (1, {}, ("logits",)),
    (2, {}, ("logits",)),
    (3, {"k": 3}, ()),
    (2, {"ood_prototype": "features"}, ("logits", "ood_features")),
]


@pytest.mark.parametrize(("world", "kwargs", "fit_kwargs"), CASES,
                         ids=["1-rank", "2-ranks-logits", "3-ranks-k3", "2-ranks-ood-features"])
def test_sharded_detector_equals_single_process(tmp_path, world, kwargs, fit_kwargs):
    mp.spawn(_worker, args=(world, str(tmp_path), kwargs, fit_kwargs), nprocs=world,
             join=True)
    x, y, logits, test, ood = _data()
    fit_args = {"logits": logits} if "logits" in fit_kwargs else {}
    if "ood_features" in fit_kwargs:
        fit_args["ood_features"] = ood
    single = GROOD(batch_size=7, **kwargs).fit(x, y, **fit_args)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in results:
        assert torch.equal(res["protos"], single.class_prototypes_)
        assert torch.equal(res["p_ood"], single.ood_prototype_)
        assert res["acc"] == single.train_accuracy_
        assert sum(res["sizes"]) == single.index_.ntotal
        # A rank makes room for its own rows only (it reserved every rank's rows).
        assert res["reserved"] and max(res["reserved"]) <= res["local_rows"]
        assert torch.equal(res["pred"], single.predict(test))
        # Every rank keeps the fingerprints of every rank's OOD rows, in rank order (float64
        # projections of other batches: equal to the last bits, and matched within 1 %).
        assert (res["prints"] is None) == (single.ood_fingerprints_ is None)
        if res["prints"] is not None:
            torch.testing.assert_close(res["prints"], single.ood_fingerprints_, rtol=1e-12,
                                       atol=1e-12)
    assert all(torch.equal(r["flipped"], r["scores"]) for r in results)
    # Only 1-D counts and settings are gathered while scoring, no rows of queries or results.
    assert all(len(shape) == 1 for r in results for shape in r["gathered"])
    scores = torch.cat([r["scores"] for r in results])
    n_scored = scores.shape[0]
    assert torch.equal(scores, single.score_samples(test)[:n_scored])
    # Neighbours are named by training row over every shard (rank 0's rows first), as in
    # one process.
    want = single.kneighbors(test[:n_scored], 2)
    loaded = [torch.load(tmp_path / f"rank{r}.loaded.pt") for r in range(world)]
    assert [torch.load(tmp_path / f"rank{r}.read.pt") for r in range(world)] == [
        [("read", f"det.rank{r}.safetensors")] for r in range(world)]
    for found in ([r["neighbours"] for r in results], loaded):
        for got, ref in zip(zip(*found, strict=True), want, strict=True):
            assert torch.equal(torch.cat(got), ref)
    with pytest.warns(UserWarning, match="equal indexed training rows") as caught:
        single.calibrate(torch.cat([test[:n_scored], x]), tpr=0.8)
    assert all(r["warned"] == [str(w.message) for w in caught] for r in results)
    single.calibrate(test[:n_scored], tpr=0.8)
    assert all(r["threshold"] == single.calibration_ for r in results)
    assert all("to(): this detector is sharded across ranks" in r["refused"] for r in results)

    # The sharded detector, loaded whole into one process, is the single-process detector.
    joined = GROOD.load(tmp_path / "det.json")
    assert torch.equal(joined.index_.vectors, single.index_.vectors)
    assert torch.equal(joined.score_samples(test), single.score_samples(test))
    assert torch.equal(joined.indexed_rows_, single.indexed_rows_)
    if single.ood_fingerprints_ is not None:
        torch.testing.assert_close(joined.ood_fingerprints_, single.ood_fingerprints_,
                                   rtol=1e-12, atol=1e-12)
    assert joined.calibration_ == single.calibration_


def test_sharded_manifest_detects_a_damaged_shard(tmp_path, capsys):
    mp.spawn(_worker, args=(2, str(tmp_path), {}, ()), nprocs=2, join=True)
    # grood info describes the manifest and its shards, and refuses a shard on its own.
    info = describe(tmp_path / "det.json", check=True)
    det = GROOD.load(tmp_path / "det.json")
    assert info["sharded"] and info["written_by"] == f"grood {__version__}"
    sizes = [s["gradients"] for s in info["shards"]]
    assert len(sizes) == 2 and sum(sizes) == info["indexed"] == det.index_.ntotal
    assert info["digest"] is None  # each shard's, as the manifest lists it
    listed = json.loads((tmp_path / "det.json").read_text())["shards"]
    assert [s["digest"] for s in info["shards"]] == [s["digest"] for s in listed]
    assert info["rows_recorded"] and info["n_train"] == det.n_train_
    assert main(["info", str(tmp_path / "det.json")]) == 0
    assert "shards       2: det.rank0.safetensors (" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one shard of a detector saved by 2 ranks"):
        describe(tmp_path / "det.rank0.safetensors")
    shard = tmp_path / "det.rank1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the digest"):
        GROOD.load(tmp_path / "det.json")
    describe(tmp_path / "det.json")  # the headers alone do not see it
    with pytest.raises(ValueError, match="does not match the digest"):
        describe(tmp_path / "det.json", check=True)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="which is missing"):
        GROOD.load(tmp_path / "det.json")


def _recorder():
    """``(seen, attempt)``: ``attempt(name, call)`` runs ``call`` and records in ``seen[name]``
    None, or the type name and message of what it raised."""
    seen = {}

    def attempt(name, call):
        try:
            call()
            seen[name] = None
        except Exception as exc:
            seen[name] = (type(exc).__name__, str(exc))

    return seen, attempt


def _disagreeing_worker(rank, world, tmp):
    """Ranks that differ in what shapes the collectives: each case must raise the same
    ValueError on every rank (gloo aborted the process, or a rank waited forever), and the
    process group stays usable afterwards."""
    with _process_group(rank, world, tmp):
        seen, attempt = _recorder()
        x, y, logits, test, _ = _data()
        part = lambda t: torch.tensor_split(t, world)[rank]  # noqa: E731
        xr, yr = part(x), part(y)
        attempt("dimension", lambda: GROOD(distributed=True).fit(
            xr if rank == 0 else torch.cat([xr, xr[:, :1]], 1), yr))
        attempt("source", lambda: GROOD(distributed=True, ood_prototype="mean" if rank == 0
                                        else "features").fit(xr, yr, ood_features=xr[:3]
                                                             if rank else None))
        attempt("logits", lambda: GROOD(distributed=True).fit(
            xr, yr, logits=part(logits) if rank == 0 else None))
        det = GROOD(distributed=True).fit(xr, yr)
        det.k = 1 + rank
        attempt("score k", lambda: det.score_samples(part(test)))
        det.k = 1
        attempt("score dtype", lambda: det.score_samples(part(test).double() if rank
                                                         else part(test)))
        attempt("calibration tpr", lambda: det.calibrate(part(test), tpr=0.9 - 0.1 * rank))
        errors = {name: got[1] for name, got in seen.items() if got and got[0] == "ValueError"}
        torch.save({"errors": errors, "scores": det.score_samples(part(test))},
                   f"{tmp}/rank{rank}.pt")


def test_ranks_that_disagree_are_named_on_every_rank(tmp_path):
    mp.spawn(_disagreeing_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x, y, _, test, _ = _data()
    want = {"dimension": "feature dimension (rank 0: 12, rank 1: 13)",
            "source": "ood_prototype (rank 0: {'name': 'mean'",
            "logits": "logit columns (rank 0: 5, rank 1: None)",
            "score k": "a distributed score disagree on k (rank 0: 1, rank 1: 2)",
            "score dtype": "feature dtype (rank 0: 'float32', rank 1: 'float64')",
            "calibration tpr": "a distributed calibration disagree on tpr (rank 0: 0.9, "
                               "rank 1: 0.8"}
    single = GROOD().fit(x, y).score_samples(test)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert set(res["errors"]) == set(want)
        for name, text in want.items():
            assert text in res["errors"][name], (name, res["errors"][name])
    assert torch.equal(torch.cat([r["scores"] for r in results]), single)


def _failing_rank_worker(rank, world, tmp):
    """Each case fails on one rank only (bad input there, a loader or index that raises
    there): that rank raises its own error, every other rank a RankFailedError naming it, and
    the process group stays usable (before, the others waited in a collective the failed rank
    never joined, and met its next one: a baffling error, a gloo abort, or a hang)."""
    with _process_group(rank, world, tmp):
        seen, attempt = _recorder()
        x, y, logits, test, _ = _data()
        part = lambda t: torch.tensor_split(t, world)[rank]  # noqa: E731
        xr, yr, tr = part(x), part(y), part(test)
        bad_x = xr.clone()
        if rank == 1:
            bad_x[4, 2] = float("nan")
        attempt("fit nan", lambda: GROOD(distributed=True).fit(bad_x, yr))

        def batches():  # rank 1's loader fails in the gradient pass (its 4th iteration:
            calls = {"n": 0}  # the first batch, the class count, prototypes, gradients)

            def make():
                calls["n"] += 1
                for b in range(3):
                    if rank == 1 and calls["n"] == 4 and b == 2:
                        raise OSError("disk read failed")
                    yield xr[b::3], yr[b::3]
            return make
        attempt("fit loader", lambda: GROOD(distributed=True).fit_batches(batches()))
        attempt("fit ood features", lambda: GROOD(distributed=True, ood_prototype="features")
                .fit(xr, yr, ood_features=bad_x[:6]))
        attempt("fit labels", lambda: GROOD(distributed=True).fit(
            xr, yr - rank, logits=part(logits)))
        # The model fails on rank 1's first batch (its inputs are the wrong width), or rank
        # 1's loader has no batches: the fit stops there on every rank (the others went on
        # into the fit's collectives, to meet rank 1's next ones).
        attempt("fit model", lambda: GROOD(distributed=True).fit_model(
            _net(), [(xr[:, : 12 - 7 * rank], yr)], features="1"))
        attempt("fit model no batches", lambda: GROOD(distributed=True).fit_model(
            _net(), [(xr, yr)][: 1 - rank], features="1"))
        attempt("fit no batches", lambda: GROOD(distributed=True).fit_batches(
            [(xr, yr)][: 1 - rank]))
        det = GROOD(distributed=True, batch_size=8).fit(xr, yr)
        bad_t = tr.clone()
        if rank == 1:
            bad_t[11, 0] = float("inf")
        attempt("score nan", lambda: det.score_samples(bad_t))
        try:  # what a RankFailedError holds besides its message
            det.score_samples(bad_t)
        except ValueError as exc:
            detail = [getattr(exc, name, None) for name in ("ranks", "step", "errors")]
        attempt("score width", lambda: det.score_samples(tr if rank else tr[:, :5]))
        attempt("kneighbors nan", lambda: det.kneighbors(bad_t, 2))
        attempt("calibrate tpr", lambda: det.calibrate(tr, tpr=1.5 if rank else 0.9))
        search = det.index_.search
        if rank == 1:  # a registered index that fails in the ring's search, then one whose
            det.index_.search = lambda q, k: (_ for _ in ()).throw(RuntimeError("index down"))
        attempt("search raises", lambda: det.score_samples(tr))
        if rank == 0:  # ... results of the wrong shape (refused after the ring)
            det.index_.search = lambda q, k: tuple(t[:, :1] for t in search(q, k))
        else:
            det.index_.search = search
        det.k = 2
        attempt("search shape", lambda: det.score_samples(tr))
        det.index_.search, det.k = search, 1
        if rank == 1:  # its shard's path is taken by a folder
            os.mkdir(f"{tmp}/taken.rank1.safetensors")
        attempt("save", lambda: det.save(f"{tmp}/taken.json"))
        det.save(f"{tmp}/ok.json")
        load_file = persistence.load_file
        if rank == 1:  # reading its shard fails (out of memory on its device, say)
            persistence.load_file = lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("out of memory"))
        attempt("load", lambda: GROOD.load(f"{tmp}/ok.json", distributed=True))
        persistence.load_file = load_file
        again = GROOD.load(f"{tmp}/ok.json", distributed=True)
        assert torch.equal(again.score_samples(tr), det.score_samples(tr))
        # Gradients a float16 copy loses to its range: the fit's check makes the copy, and
        # rank 1 cannot (out of memory on its device, say).
        from grood._bench.common import far_prototype_data

        fx, fy, fo, _ = (torch.as_tensor(a) for a in far_prototype_data(100))
        searched = ExactIndex._searched
        if rank == 1:
            ExactIndex._searched = lambda self: (_ for _ in ()).throw(
                RuntimeError("out of memory"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (rank 0's copy warns of its lost rows)
            attempt("fit copy", lambda: GROOD(
                distributed=True, ood_prototype="features",
                index_options={"storage": "float16"}).fit(part(fx), part(fy),
                                                          ood_features=part(fo)))
        ExactIndex._searched = searched
        torch.save({"seen": seen, "scores": det.score_samples(tr), "detail": detail},
                   f"{tmp}/rank{rank}.pt")


def test_a_rank_that_fails_stops_every_rank_with_its_error(tmp_path):
    mp.spawn(_failing_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x, y, _, test, _ = _data()
    # case: (failing rank, its error type, text in its message, the step others name)
    want = {"fit nan": (1, "RowsRefusedError", "NaN or Inf", "(class prototypes)"),
            "fit loader": (1, "OSError", "disk read failed", "(gradient index)"),
            "fit ood features": (1, "RowsRefusedError", "ood_features",
                                 "averaging its ood_features"),
            "fit labels": (1, "ValueError", "label", "reading its training arrays"),
            "fit model": (1, "RuntimeError", "cannot be multiplied",
                          "running the model on its first training batch"),
            "fit no batches": (1, "ValueError", "every rank needs at least one batch, which "
                               "may have 0 rows", "reading its first training batch"),
            "fit model no batches": (1, "ValueError", "every rank's loader needs at least one",
                                     "running the model on its first training batch"),
            "score nan": (1, "RowsRefusedError", "row(s) 11", "its rows 8 to 15"),
            "score width": (0, "ValueError", "12", "reading its features"),
            "kneighbors nan": (1, "RowsRefusedError", "row(s) 11", "its rows 8 to 15"),
            "calibrate tpr": (1, "ValueError", "tpr", "checking tpr"),
            "search raises": (1, "RuntimeError", "index down", "searching the neighbours"),
            "search shape": (0, "ValueError", "shape", "searching the neighbours"),
            "save": (1, "ValueError", "taken.rank1.safetensors: it exists", "writing its shard"),
            "load": (1, "RuntimeError", "out of memory", "loading its shard"),
            "fit copy": (1, "RuntimeError", "out of memory",
                         "making its index's half-precision copy")}
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (bad, kind, text, step) in want.items():
        own, other = results[bad]["seen"][name], results[1 - bad]["seen"][name]
        assert own is not None and own[0] == kind and text in own[1], (name, own)
        assert other is not None and other[0] == "RankFailedError", (name, other)
        assert f"rank {bad} failed while" in other[1] and step in other[1], (name, other)
        assert own[1] in other[1], (name, other)  # the failed rank's message, whole
    assert results[0]["detail"] == [
        [1], "computing the gradients of its rows 8 to 15",
        {1: "RowsRefusedError: features contains NaN or Inf in row(s) 11"}]
    single = GROOD(batch_size=8).fit(x, y).score_samples(test)
    assert torch.equal(torch.cat([r["scores"] for r in results]), single)


def _net():
    """A small classifier over the test features (its penultimate layer: module "1")."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))


def _uneven_batches_worker(rank, world, tmp):
    """score_batches with as many batches as each rank has: rank 0 three (numpy), rank 1 one
    (a tensor), rank 2 none (it joins in float64, the others' dtype); and a loader that raises
    on rank 1."""
    with _process_group(rank, world, tmp):
        x, y, _, test, _ = _data()
        det = GROOD(distributed=True).fit(*(torch.tensor_split(t, world)[rank] for t in (x, y)))
        mine = {0: [test[:10].double().numpy(), test[10:20].double().numpy(),
                    test[20:25].double().numpy()],
                1: [test[25:32].double()], 2: []}[rank]
        results = list(det.score_batches(mine))

        def failing():
            yield test[:3]
            if rank == 1:
                raise OSError("shard file vanished")
            yield test[3:6]
        seen, attempt = _recorder()
        attempt("loader", lambda: list(det.score_batches(failing())))
        # score_model streams a loader the same way: 2, 1 and 0 batches.
        net = _net()
        mdet = GROOD(distributed=True).fit_model(  # (each rank's batches kept its own way)
            net, [(xs, ys) for xs, ys in zip(*(torch.tensor_split(t, world)[rank].split(20)
                                                for t in (x, y)), strict=True)],
            features="1", cache=tmp if rank == 1 else "host" if rank == 2 else None)
        loaders = {0: [(test[:9], None), (test[9:20], None)], 1: [(test[20:31], None)], 2: []}
        model_scores = mdet.score_model(net, [b for b, _ in loaders[rank]])
        # An OOD loader of 2, 1 and 0 batches (17, 6 and 0 rows): the prototype is the mean
        # of every rank's rows (not of each rank's mean), and every rank keeps every rank's
        # rows' fingerprints.
        fdet = GROOD(distributed=True, ood_prototype="features").fit_model(
            net, [(torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank])],
            features="1", ood_loader={0: [test[32:40], test[40:49]], 1: [test[49:55]],
                                      2: []}[rank])
        torch.save({"results": results, "seen": seen, "model": model_scores,
                    "p_ood": fdet.ood_prototype_, "prints": fdet.ood_fingerprints_},
                   f"{tmp}/rank{rank}.pt")


@pytest.mark.filterwarnings("ignore:the logits classify")  # an untrained net's logits
def test_score_batches_with_uneven_batch_counts_across_ranks(tmp_path):
    mp.spawn(_uneven_batches_worker, args=(3, str(tmp_path)), nprocs=3, join=True)
    x, y, _, test, _ = _data()
    single = GROOD().fit(x, y)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    assert [len(g["results"]) for g in got] == [3, 1, 0]
    scores = [torch.as_tensor(s) for g in got for s, _ in g["results"]]
    preds = [torch.as_tensor(p) for g in got for _, p in g["results"]]
    assert all(isinstance(s, np.ndarray) for s, _ in got[0]["results"])
    want_s, want_p = single.score_and_predict(test[:32].double())
    # float64 queries are scored in float64 over the ring too (float32 distances there
    # once differed by 4.5e-8); other batch shapes sum in another order, hence not bit-equal
    torch.testing.assert_close(torch.cat(scores), want_s, rtol=1e-12, atol=0)
    assert torch.equal(torch.cat(preds), want_p)
    net = _net()
    want = GROOD().fit_model(net, list(zip(x.split(20), y.split(20), strict=True)),
                             features="1").score_model(net, [test[:31]])
    assert [len(g["model"][0]) for g in got] == [20, 11, 0]
    assert not list(tmp_path.glob("grood-fit-cache-*"))  # rank 1's kept batches, removed
    for i in (0, 1):
        torch.testing.assert_close(torch.cat([g["model"][i] for g in got]), want[i],
                                   rtol=1e-6, atol=1e-7)
    fdet = GROOD(ood_prototype="features").fit_model(net, [(x, y)], features="1",
                                                      ood_loader=[test[32:55]])
    for g in got:
        torch.testing.assert_close(g["p_ood"], fdet.ood_prototype_, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g["prints"], fdet.ood_fingerprints_, rtol=1e-12, atol=1e-12)
    assert got[1]["seen"]["loader"] == ("OSError", "shard file vanished")
    for r in (0, 2):
        kind, text = got[r]["seen"]["loader"]
        assert kind == "RankFailedError" and "rank 1 failed while reading its next batch" in text


def _one_rank_worker(rank, world, tmp, backend):
    """A sharded detector on one rank of an NCCL group (gloo without a GPU): every collective
    grood makes (flags, JSON views, shard sizes, the ring's search) on the device's tensors."""
    with _process_group(rank, world, tmp, backend):
        dev = "cuda" if backend == "nccl" else "cpu"
        x, y, logits, test, _ = _data()
        det = GROOD(distributed=True).fit(x.to(dev), y.to(dev), logits=logits.to(dev))
        scores, preds = det.score_and_predict(test.to(dev))
        dists, rows = det.kneighbors(test.to(dev), 3)
        streamed = [s for s, _ in det.score_batches([test[:20].to(dev), test[20:].to(dev)])]
        det.save(f"{tmp}/one.json")
        again = GROOD.load(f"{tmp}/one.json", distributed=True, device=dev)
        bad = test.to(dev).clone()
        bad[3, 1] = float("nan")
        seen, attempt = _recorder()
        attempt("nan", lambda: det.score_samples(bad))
        torch.save({"scores": scores.cpu(), "preds": preds.cpu(), "dists": dists.cpu(),
                    "rows": rows.cpu(), "streamed": torch.cat(streamed).cpu(),
                    "again": again.score_samples(test.to(dev)).cpu(), "seen": seen},
                   f"{tmp}/out.pt")


@pytest.mark.gpu  # its NCCL half runs in bench/gpu_check.sh; gloo elsewhere
def test_one_rank_of_a_device_process_group_scores_as_one_process(tmp_path):
    backend = "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"
    mp.spawn(_one_rank_worker, args=(1, str(tmp_path), backend), nprocs=1, join=True)
    got = torch.load(tmp_path / "out.pt")
    x, y, logits, test, _ = _data()
    dev = "cuda" if backend == "nccl" else "cpu"
    single = GROOD().fit(x.to(dev), y.to(dev), logits=logits.to(dev))
    scores, preds = single.score_and_predict(test.to(dev))
    dists, rows = single.kneighbors(test.to(dev), 3)
    for name in ("scores", "streamed", "again"):
        torch.testing.assert_close(got[name], scores.cpu(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["dists"], dists.cpu(), rtol=1e-6, atol=1e-7)
    assert torch.equal(got["preds"], preds.cpu()) and torch.equal(got["rows"], rows.cpu())
    assert got["seen"]["nan"] == ("RowsRefusedError", "features contains NaN or Inf in row(s) 3")


def _empty_shard_worker(rank, world, tmp):
    """Rank 1 holds no training rows and no OOD rows (more ranks than a small file's rows
    split into, or a sampler that leaves a rank out)."""
    with _process_group(rank, world, tmp):
        x, y, logits, test, ood = _data()
        mine = slice(None) if rank == 0 else slice(0, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = GROOD(distributed=True, ood_prototype="features").fit(
                x[mine], y[mine], logits=logits[mine],
                ood_features=ood[: 0 if rank == 0 else None])
        det.save(f"{tmp}/det.json")
        seen, attempt = _recorder()
        attempt("no rows anywhere", lambda: GROOD(distributed=True).fit(x[:0], y[:0]))
        attempt("no OOD rows anywhere", lambda: GROOD(
            distributed=True, ood_prototype="features").fit(x[mine], y[mine],
                                                            ood_features=ood[:0]))
        torch.save({"warned": [str(w.message) for w in caught],
                    "scores": det.score_samples(test), "sizes": det.shard_sizes_,
                    "neighbours": det.kneighbors(test, 2), "seen": seen,
                    "loaded": GROOD.load(f"{tmp}/det.json", distributed=True).score_samples(
                        test)}, f"{tmp}/rank{rank}.pt")


def test_a_rank_with_an_empty_shard_joins_the_fit(tmp_path):
    mp.spawn(_empty_shard_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x, y, logits, test, ood = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = GROOD(ood_prototype="features").fit(x, y, logits=logits, ood_features=ood)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # (every rank warns as one process does: the rank without rows of nothing its own)
        assert got["warned"] == [str(w.message) for w in caught]
        assert got["sizes"] == [single.index_.ntotal, 0]
        assert torch.equal(got["scores"], single.score_samples(test))
        assert torch.equal(got["loaded"], got["scores"])
        for mine, want in zip(got["neighbours"], single.kneighbors(test, 2), strict=True):
            assert torch.equal(mine, want)
        # Every rank's data empty is still refused, on every rank alike.
        assert got["seen"] == {
            "no rows anywhere": ("ValueError", "the training data is empty: every batch has "
                                 "0 rows"),
            "no OOD rows anywhere": ("ValueError", "ood_features is empty: it has no rows on "
                                     "any rank")}
    assert torch.equal(GROOD.load(tmp_path / "det.json").score_samples(test),
                       single.score_samples(test))


def _far_worker(rank, world, tmp):
    from grood._bench.common import far_prototype_data

    with _process_group(rank, world, tmp):
        x, y, ood, test = (torch.as_tensor(a) for a in far_prototype_data(3e3))
        part = lambda t: torch.tensor_split(t, world)[rank]  # noqa: E731
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = GROOD(distributed=True, ood_prototype="features", progress=False).fit(
                part(x), part(y), ood_features=part(ood))
            # Rank 1 indexes nothing: it still takes part in the check and is held less the
            # same centre.
            mine = slice(None) if rank == 0 else slice(0, 0)
            lone = GROOD(distributed=True, ood_prototype="features", progress=False).fit(
                x[mine], y[mine], ood_features=ood[mine])
            # A bf16 copy is checked on each rank's blocks and held less the same mean.
            half = GROOD(distributed=True, ood_prototype="features", progress=False,
                         index_options={"storage": "bfloat16"}).fit(
                part(x), part(y), ood_features=part(ood))
        # A float16 copy loses these gradients to its range: each rank makes its copy at the
        # fit, together, and warns of its lost rows, once.
        with warnings.catch_warnings(record=True) as lossy:
            warnings.simplefilter("always")
            GROOD(distributed=True, ood_prototype="features", progress=False,
                  index_options={"storage": "float16"}).fit(
                part(x), part(y), ood_features=part(ood))
        det.save(f"{tmp}/det.json")
        torch.save({"centre": det.index_.centre, "lone": lone.index_.centre,
                    "half": half.index_.centre, "half_scores": half.score_samples(test),
                    "scores": det.score_samples(test), "lone_scores": lone.score_samples(test),
                    "warned": [str(w.message) for w in caught],
                    "lossy": [str(w.message) for w in lossy],
                    "loaded": GROOD.load(f"{tmp}/det.json", distributed=True).score_samples(
                        test)}, f"{tmp}/rank{rank}.pt")


def test_the_shards_of_a_multi_rank_fit_are_held_less_one_centre_where_that_resolves_them(
        tmp_path):
    """An OOD prototype far outside the training features: a multi-rank fit checks each
    rank's shard, reduces the counts and the gradients' mean over the ranks, and holds every
    shard less that one mean (before, it could only warn, the shards having to join): scores
    as the single-process detector's to float32 rounding, on every rank alike, loaded as
    shards and joined into one process (whose index is held less the same centre)."""
    from grood._bench.common import far_prototype_data

    mp.spawn(_far_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x, y, ood, test = far_prototype_data(3e3)
    single = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    want = torch.as_tensor(single.score_samples(test))
    assert single.index_.centre is not None
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for res in got:
        assert res["warned"] == []
        assert len(res["lossy"]) == 1 and "storage='float16': 300 of the 300 " in res["lossy"][0]
        assert torch.equal(res["centre"], got[0]["centre"])
        torch.testing.assert_close(res["centre"], single.index_.centre, rtol=1e-6, atol=0)
        assert torch.equal(res["lone"], single.index_.centre)  # (rank 0's rows: all of them)
        assert torch.equal(res["scores"], got[0]["scores"])
        assert torch.equal(res["loaded"], res["scores"])
        torch.testing.assert_close(res["scores"], want, rtol=1e-5, atol=1e-6 * float(
            want.max() - want.min()))
        assert torch.equal(res["lone_scores"], want)
        assert torch.equal(res["half"], res["centre"])
        torch.testing.assert_close(res["half_scores"], res["scores"], rtol=1e-5, atol=1e-6 * float(
            want.max() - want.min()))
    joined = GROOD.load(tmp_path / "det.json")
    assert torch.equal(joined.index_.centre, got[0]["centre"])
    assert np.array_equal(joined.score_samples(test), got[0]["scores"].numpy())
    assert describe(tmp_path / "det.json")["index_centred"]
    # Shards held less different centres (another writer's defect, with consistent digests)
    # are refused by the join.
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = tmp_path / "det.rank1.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["index.centre"] = tensors["index.centre"] * (1 + 2 ** -20)
    meta["digest"] = persistence.digest(tensors, meta)
    save_file(tensors, str(shard), metadata=meta)
    manifest = json.loads((tmp_path / "det.json").read_text())
    manifest["shards"][1].update(sha256=persistence.file_sha256(shard), digest=meta["digest"])
    (tmp_path / "det.json").write_text(json.dumps(manifest))
    with pytest.raises(persistence.DetectorFileError, match=r"shard det\.rank1\.safetensors "
                                                            r"holds its index less another "
                                                            r"centre than det\.rank0"):
        GROOD.load(tmp_path / "det.json")


def test_distributed_without_a_process_group_is_refused():
    x, y, *_ = _data()
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        GROOD(distributed=True).fit(x, y)
    # Set after a single-process fit it is for the next fit: scoring stays in this process
    # (it called collectives without a process group before).
    det = GROOD().fit(x, y)
    want = det.score_samples(x[:9])
    det.set_params(distributed=True)
    assert torch.equal(det.score_samples(x[:9]), want)


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(tmp_path):
    import subprocess

    import numpy as np

    x, y, logits, test, _ = _data()
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy(),
             logits=logits.numpy())
    np.save(tmp_path / "test.npy", test.numpy())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "grood"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(command):
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]

    # The threshold comes from both ranks' halves of the calibration file.
    calibrate = ["--calibrate", str(tmp_path / "test.npy"), "--tpr", "0.8"]
    for cmd in (["fit", "--distributed", str(tmp_path / "train.npz"), "-o",
                 str(tmp_path / "sharded.json"), *calibrate],
                ["score", "--distributed", str(tmp_path / "sharded.json"),
                 str(tmp_path / "test.npy"), "-o", str(tmp_path / "sharded.npy")],
                ["score", "--distributed", str(tmp_path / "sharded.json"),
                 str(tmp_path / "test.npy"), "-o", str(tmp_path / "sharded.npz"),
                 "--neighbours", "2"]):
        run(torchrun + cmd)
    # The one-process reference runs with the same thread count: BLAS sums in a different
    # order with more threads, which may move a score by one float32 ulp.
    for cmd in (["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "one.safetensors"),
                 *calibrate],
                ["score", str(tmp_path / "one.safetensors"), str(tmp_path / "test.npy"), "-o",
                 str(tmp_path / "one.npy")]):
        run([sys.executable, "-m", "grood", *cmd])
    np.testing.assert_array_equal(np.load(tmp_path / "sharded.npy"),
                                  np.load(tmp_path / "one.npy"))
    # Neighbours over both shards, named by the training file's rows.
    dist, near = GROOD.load(tmp_path / "one.safetensors").kneighbors(test.numpy(), 2)
    with np.load(tmp_path / "sharded.npz") as out:
        np.testing.assert_array_equal(out["score"], np.load(tmp_path / "one.npy"))
        np.testing.assert_array_equal(out["neighbour_row"], near)
        np.testing.assert_array_equal(out["neighbour_distance"], dist)
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"),
                               GROOD().fit(x, y, logits=logits).score_samples(test.numpy()),
                               rtol=1e-6)
    assert len(list(tmp_path.glob("sharded.rank*.safetensors"))) == 2
    assert GROOD.load(tmp_path / "sharded.json").calibration_ == \
        GROOD.load(tmp_path / "one.safetensors").calibration_
    # The training file in two pieces, cut away from the ranks' boundary: each rank reads its
    # block across them, and the detector scores and names neighbours as before.
    cut = len(x) // 3
    np.savez(tmp_path / "a.npz", features=x[:cut].numpy(), labels=y[:cut].numpy(),
             logits=logits[:cut].numpy())
    np.savez(tmp_path / "b.npz", features=x[cut:].numpy(), labels=y[cut:].numpy(),
             logits=logits[cut:].numpy())
    for cmd in (["fit", "--distributed", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                 "-o", str(tmp_path / "pieces.json")],
                ["score", "--distributed", str(tmp_path / "pieces.json"),
                 str(tmp_path / "test.npy"), "-o", str(tmp_path / "pieces.npz"),
                 "--neighbours", "2"]):
        run(torchrun + cmd)
    with np.load(tmp_path / "pieces.npz") as got, np.load(tmp_path / "sharded.npz") as want:
        for name in ("score", "pred", "neighbour_row", "neighbour_distance"):
            np.testing.assert_array_equal(got[name], want[name])
