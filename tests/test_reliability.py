"""Hostile use that must give a clear error or the right answer, never a silent wrong score.

Each test reproduces one case of adversarial testing: partial or edited sharded detectors,
parameters changed after loading, save targets that are links or device nodes, file modes,
stray huge labels, unusable devices, far-away rows, float64 queries, threads scoring at once.
"""

import importlib.util
import json
import os
import re
import shutil
import stat
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import clustered_features, rewrite_detector_file

from grood import GROOD, DetectorFileError, Mahalanobis, evaluate, persistence
from grood._bench.common import (
    far_prototype_data,
    far_prototype_float64_scores,
    offset_errors,
)
from grood._fit import check_search_again, crowded_probes, probe_ids
from grood.cli import main
from grood.head import as_module
from grood.index import ExactIndex, rounds_past_fp32
from grood.portable import PortableHead


def _shard_worker(rank, world, tmp):
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                             world_size=world)
    try:
        x, y = clustered_features(120, 4, 6, seed=rank, spread=0.5, dtype=torch.float32)
        GROOD(distributed=True, progress=False).fit(x, y).save(f"{tmp}/det.json")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A detector saved by 2 gloo ranks: det.json, det.rank0/1.safetensors."""
    if not tdist.is_available() or sys.platform == "win32":
        pytest.skip("needs torch.distributed with gloo")
    tmp = tmp_path_factory.mktemp("sharded")
    mp.spawn(_shard_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return tmp


def _copy(src, dst):
    dst.mkdir()
    for f in src.glob("det*"):
        shutil.copy(f, dst / f.name)
    return dst / "det.json"


def test_a_single_shard_is_refused(sharded):
    with pytest.raises(ValueError, match="one shard of a detector saved by 2 ranks"):
        GROOD.load(sharded / "det.rank1.safetensors")
    assert GROOD.load(sharded / "det.json").index_.ntotal > 0  # the manifest still loads


@pytest.mark.parametrize("edit", ["one shard", "twice", "huge world", "no shards", "itself",
                                  "foreign", "not json", "other format", "no file key",
                                  "newer version"])
def test_edited_manifests_are_refused(sharded, tmp_path, edit):
    manifest_path = _copy(sharded, tmp_path / "copy")
    manifest = json.loads(manifest_path.read_text())
    if edit == "one shard":
        manifest["shards"] = manifest["shards"][:1]
        match = "world_size 2 but 1 shard"
    elif edit == "twice":
        manifest["shards"] = [manifest["shards"][0]] * 2
        match = "same shard file more than once"
    elif edit == "huge world":
        manifest["world_size"] = 10**9
        match = "world_size 1000000000 but 2 shard"
    elif edit == "no shards":
        manifest["shards"] = []
        match = "lists no shards"
    elif edit == "itself":
        manifest["shards"][1]["file"] = "det.json"
        match = "lists itself"
    elif edit == "other format":
        manifest["format"] = "something.else"
        match = "is not a grood shard manifest"
    elif edit == "no file key":
        del manifest["shards"][0]["file"]
        match = "is not a valid grood shard manifest: 'file'"
    elif edit == "newer version":
        manifest.update(format_version=3, written_by="grood 9.0.0")
        match = (r"manifest version 3 \(written by grood 9\.0\.0\); this grood \(.+\) reads "
                 r"manifest versions 1, 2:")
    elif edit == "not json":
        manifest_path.write_text("{" + json.dumps(manifest)[:40])
        with pytest.raises(ValueError, match="is not a grood detector file"):
            GROOD.load(manifest_path)
        return
    else:  # a shard of another 2-rank detector, with a matching digest
        x, y = clustered_features(90, 4, 6, seed=9, spread=0.5, dtype=torch.float32)
        other = GROOD(progress=False).fit(x, y)
        other.shard_sizes_ = [other.index_.ntotal, 5]  # as if saved by rank 0 of 2
        other.save(tmp_path / "copy" / "det.rank1.safetensors")
        import hashlib

        from safetensors import safe_open

        foreign = tmp_path / "copy" / "det.rank1.safetensors"
        with safe_open(str(foreign), framework="pt") as f:
            manifest["shards"][1]["digest"] = f.metadata()["digest"]
        manifest["shards"][1]["sha256"] = hashlib.sha256(foreign.read_bytes()).hexdigest()
        match = "inconsistent|another detector"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match):
        GROOD.load(manifest_path)


@pytest.mark.parametrize("listed", ["digest", "sha256 only"])
def test_a_shard_is_checked_against_its_manifest_as_it_is_read(sharded, tmp_path, listed):
    """A manifest lists each shard's SHA-256 and its digest: loading checks the digest on the
    bytes it reads (one pass over each shard); a manifest without digests (written before
    they were listed) has each shard hashed whole first. Either way a shard changed after the
    manifest was written is refused, also when its own digest was made to fit its contents,
    and a listed digest that was edited is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest_path = _copy(sharded, tmp_path / "copy")
    manifest = json.loads(manifest_path.read_text())
    assert all(len(s["digest"]) == len(s["sha256"]) == 64 for s in manifest["shards"])
    if listed == "sha256 only":
        for entry in manifest["shards"]:
            del entry["digest"]
    manifest_path.write_text(json.dumps(manifest))
    x, _ = clustered_features(20, 4, 6, seed=5, spread=0.5, dtype=torch.float32)
    expected = GROOD.load(sharded / "det.json").score_samples(x)
    assert torch.equal(GROOD.load(manifest_path).score_samples(x), expected)
    # Shard 1 rewritten with one index value changed and a digest that fits it.
    shard = tmp_path / "copy" / "det.rank1.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["index.vectors"][0, 0] += 1
    meta["digest"] = persistence.digest(tensors, meta)
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(DetectorFileError, match=r"det\.rank1\.safetensors does not match the "
                                                "digest in"):
        GROOD.load(manifest_path)
    if listed == "digest":  # the manifest's digest edited, the shard as saved
        shutil.copy(sharded / "det.rank1.safetensors", shard)
        manifest["shards"][0]["digest"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(DetectorFileError, match=r"det\.rank0\.safetensors does not match"):
            GROOD.load(manifest_path)
        manifest["shards"][0]["digest"] = 7
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(DetectorFileError, match="not a valid grood shard manifest"):
            GROOD.load(manifest_path)


@pytest.fixture
def fitted():
    x, y = clustered_features(200, 4, 8, seed=1, dtype=torch.float32)
    return GROOD(progress=False).fit(x, y), x


@pytest.mark.parametrize("value", [-5, 0, 2.5, True])
def test_batch_size_and_k_are_checked_where_used(fitted, tmp_path, value):
    det, x = fitted
    det.save(tmp_path / "d.safetensors")
    loaded = GROOD.load(tmp_path / "d.safetensors")
    loaded.batch_size = value
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        loaded.score_samples(x)
    loaded.batch_size, loaded.k = 64, value
    with pytest.raises(ValueError, match="k must be a positive integer"):
        loaded.score_samples(x)


@pytest.mark.parametrize("value", ["-5", "0"])
def test_cli_batch_size_must_be_positive(fitted, tmp_path, capsys, value):
    det, x = fitted
    det.save(tmp_path / "d.safetensors")
    np.save(tmp_path / "x.npy", x.numpy())
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path / "d.safetensors"), str(tmp_path / "x.npy"), "-o",
              str(tmp_path / "s.npy"), "--batch-size", value])
    assert "positive integer" in capsys.readouterr().err
    assert not (tmp_path / "s.npy").exists()


def test_save_writes_through_a_symlink(fitted, tmp_path):
    det, x = fitted
    real = tmp_path / "store" / "real.safetensors"
    real.parent.mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    det.save(link)
    assert link.is_symlink() and real.is_file()
    assert torch.equal(GROOD.load(link).score_samples(x), det.score_samples(x))


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_save_refuses_to_replace_what_is_not_a_regular_file(fitted, tmp_path):
    det, _ = fitted
    link = tmp_path / "null.safetensors"
    link.symlink_to("/dev/null")
    with pytest.raises(ValueError, match="not a regular file"):
        det.save(link)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        det.save(tmp_path / "dir.safetensors")


def test_saved_files_get_the_umask_mode_or_keep_their_own(fitted, tmp_path):
    det, _ = fitted
    old = os.umask(0o022)
    try:
        det.save(tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "d.safetensors").st_mode) == 0o644
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    # A file replaced keeps its own mode (a private one became world-readable).
    os.chmod(tmp_path / "d.safetensors", 0o600)
    det.save(tmp_path / "d.safetensors")
    assert stat.S_IMODE(os.stat(tmp_path / "d.safetensors").st_mode) == 0o600


def test_save_names_and_folders_are_checked_first(fitted, tmp_path):
    det, _ = fitted
    with pytest.raises(ValueError, match=r"written as \.safetensors"):
        det.save(tmp_path / "det.pkl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        det.save(tmp_path / "missing" / "det.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        GROOD.load(tmp_path)


def test_a_path_under_a_literal_tilde_is_named_not_made(fitted, tmp_path, monkeypatch, capsys):
    """Python expands no leading '~' (numpy, torch and safetensors neither): a detector saved to
    "~/d.safetensors" failed on "the folder <cwd>/~ does not exist", a plot folder
    "~/plots" (or --plots=~/plots, where the shell does not expand it) was made as a folder
    named '~' in the working directory. Each names the '~' and how to expand it; an existing
    folder named '~' is still used as given."""
    from grood import evaluate
    from grood.io import load_features

    det, x = fitted
    monkeypatch.chdir(tmp_path)
    said = r"'~' is not expanded: pass os.path.expanduser\('~/"
    with pytest.raises(FileNotFoundError, match=said):
        det.save("~/d.safetensors")
    with pytest.raises(FileNotFoundError, match=said):
        GROOD.load("~/d.safetensors")
    with pytest.raises(FileNotFoundError, match=said):
        load_features("~/x.npz")
    plots = importlib.util.find_spec("matplotlib") is not None  # (grood[plots])
    result = evaluate(det, x[:40] + 0.01, {"shifted": x[40:80] + 3.0})
    if plots:
        with pytest.raises(ValueError, match=r"^plot\(\): ~/plots would be made in the "
                                             r"working directory, in a folder named '~'"):
            result.plot("~/plots")
    det.save("d.safetensors")
    np.save("x.npy", x.numpy())
    if plots:
        assert main(["eval", "d.safetensors", "--id", "x.npy", "--ood", "x.npy",
                     "--plots=~/plots"]) == 2
        assert "--plots: ~/plots would be made" in capsys.readouterr().err
    assert main(["score", "~/d.safetensors", "x.npy", "-o", "s.npy"]) == 2
    assert "'~' is not expanded" in capsys.readouterr().err
    from grood.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"^the demo's output folder: ~/demo would be made"):
        run_demo(DemoConfig(out=Path("~/demo")))  # refused before any training
    assert not os.path.exists("~") and not os.path.exists("s.npy")
    # A folder given where a feature file belongs is named as one.
    with pytest.raises(FileNotFoundError, match=r"that is a folder: name the file in it"):
        load_features(tmp_path)
    # A folder really named '~' is used as given.
    os.mkdir("~")
    det.save("~/d.safetensors")
    assert torch.equal(GROOD.load("~/d.safetensors").score_samples(x), det.score_samples(x))
    if plots:
        result.plot("~/plots")
        assert os.path.isfile("~/plots/roc.png")


def test_cli_fit_checks_the_output_before_fitting(tmp_path, capsys):
    x, y = clustered_features(50, 2, 4, seed=1, dtype=torch.float32)
    np.savez(tmp_path / "t.npz", features=x.numpy(), labels=y.numpy())
    for out, message in ((tmp_path / "nowhere" / "d.safetensors", "does not exist"),
                         (tmp_path / "d.txt", "written as .safetensors")):
        assert main(["fit", str(tmp_path / "t.npz"), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert "fitted on" not in capsys.readouterr().out


def test_a_stray_huge_label_is_refused_before_allocating():
    x, y = clustered_features(100, 3, 4, seed=1, dtype=torch.float32)
    y[0] = 10**12
    with pytest.raises(ValueError, match="cannot exceed the number of samples"):
        GROOD(progress=False).fit(x, y)
    # A class count given to fit_batches (the rows are not counted before the first pass)
    # too large to allocate sums for: named, not the allocator's error.
    with pytest.raises(ValueError, match=r"10,000,000,000,000 classes \(n_classes, else the "
                       r"logits' width or the largest label \+ 1\): their float64 class sums "
                       r"\(10,000,000,000,000 x 4, 298,023.2 GiB\) cannot be allocated on "
                       "cpu; check the class count"):
        GROOD(progress=False).fit_batches([(x, y % 3)], n_classes=10**13)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_unusable_device_is_a_one_line_error(tmp_path, capsys):
    x, y = clustered_features(30, 2, 4, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="sees no usable CUDA device"):
        GROOD(device="cuda").fit(x, y)
    with pytest.raises(ValueError, match="not a device name"):
        GROOD(device="tpu:7").fit(x, y)
    # Device types torch knows but cannot use here failed inside the fit (meta: in .item()).
    with pytest.raises(ValueError, match="'meta' holds no values"):
        GROOD(device="meta").fit(x, y)
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(ValueError, match="'xpu' cannot be used by this torch"):
            GROOD(device="xpu").fit(x, y)
    # Apple's GPU takes no float64, which every step computes in part: named, whether this
    # torch has MPS or not (where it has, torch's cast error came midway through the fit).
    for device in ("mps", torch.device("mps", 0)):
        with pytest.raises(ValueError, match=r"\(Apple's GPU\): grood computes parts of every "
                           r"step in float64 .* GROOD\(device='cpu'\) takes features from any"):
            GROOD(device=device).fit(x, y)
    np.savez(tmp_path / "t.npz", features=x.numpy(), labels=y.numpy())
    assert main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / "d.safetensors"),
                 "--device", "cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err


def test_one_far_row_is_scored_in_float64_not_failed(fitted):
    det, x = fitted
    far = x[:5].clone()
    far[2] += 1e6  # float32 cannot resolve the softmax at this distance
    scores, _ = det.score_and_predict(far)
    assert bool(torch.isfinite(scores).all())
    near = det.score_samples(x[:5])
    assert torch.equal(scores[[0, 1, 3, 4]], near[[0, 1, 3, 4]])
    assert float(scores[2]) < float(near.min())  # far out of distribution scores lowest
    ref, _ = det.score_and_predict(far.double())  # the whole batch in float64
    torch.testing.assert_close(scores[2].double(), ref[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="even in float64"):
        det.score_samples(x[:2] + 1e15)


def test_float64_rows_beyond_what_float64_resolves_are_refused_as_float32_ones_are(fitted):
    """float64 features farther than float64's softmax resolves were scored from rounding
    alone, without a word, where the same rows in float32 were refused (3 classes, a row at
    1e20 along the diagonal: q_ood 1.0 where the exact softmax gives 0.2494, since the
    distances' differences stay bounded by the prototypes' spread; another class; a score
    17x too low). Now both are refused alike, by the detector, the op and the flagging head;
    rows within the limit score as before."""
    from grood import functional
    from grood._gradients import FLOAT64_DISTANCE_LIMIT

    det, x = fitted
    d = x.shape[1]
    diag = torch.ones(1, d, dtype=torch.float64) / d**0.5  # unit length
    near = diag * FLOAT64_DISTANCE_LIMIT / 4  # within the limit: scored
    far = diag * FLOAT64_DISTANCE_LIMIT * 4**5
    assert bool(torch.isfinite(det.score_samples(torch.cat([x[:3].double(), near]))).all())
    for rows in (far, far.float()):
        top = re.escape(f"{float(rows.abs().max()):.3g}")  # the row's, not a farther one's
        with pytest.raises(ValueError, match=rf"row 1 \(values up to {top}\) .* even in float64"):
            det.score_samples(torch.cat([x[:1].to(rows.dtype), rows, rows * 100]))
    protos, p_ood = det.class_prototypes_.double(), det.ood_prototype_.double()
    res = functional.ncp_gradient(far, protos, p_ood)
    with pytest.raises(ValueError, match="even in float64"):
        torch.ops.grood.resolve_rows(far, protos, p_ood, *res)
    head = det.as_module(checks="flag")
    score, pred = head(torch.cat([x[:2].double(), far]))
    assert bool(torch.isfinite(score[:2]).all()) and bool(score[2].isnan()) and int(pred[2]) == -1
    assert int(head.unresolved_rows) == 1


def _tight_classes(sep, n=200, c=5, d=16, seed=0):
    """Classes ``sep`` from their mean and of unit spread: q_ood falls like exp(-sep)."""
    from grood._bench.common import tight_classes

    return tight_classes(sep, n, c, d, seed)[:2]


def test_gradients_too_small_for_the_dtype_are_warned_of():
    """Tight classes far apart give q_ood (the indexed gradients' norm) below 2**-63: float32
    squared distances between such gradients underflow, and every in-distribution score tied
    at 0 where float64 ranks them (the AUROC fell from 0.99 to 0.5, silently). The fit says
    so, with the share and the way out; beyond float64's range too, in float64."""
    x, y = _tight_classes(100.0, n=240)
    (x, test), y = x.split([200, 40]), y[:200]
    with pytest.warns(UserWarning, match=r"200 of the 200 indexed training gradients "
                                         r"\(100\.0 %\) have norm q_ood below 1\.1e-19 .* "
                                         r"below float32's range, .* tie at 0; fit and score "
                                         r"float64 features"):
        det32 = GROOD(progress=False).fit(x.float(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 resolves these gradients: no warning
        det64 = GROOD(progress=False).fit(x, y)
    assert bool((det32.score_samples(test.float()) == 0).all())  # what the warning is about
    s64 = det64.score_samples(test)
    assert bool((s64 < 0).all()) and len(set(s64.tolist())) == len(s64)
    # Calibrating and evaluating name those zeros for what they are (they were called
    # training rows: "calibrate on held-out in-distribution data, not on the training set").
    with pytest.raises(ValueError, match=r"40 of the 40 calibration rows score 0 \(their "
                                         r"gradients' norm q_ood is below .* 1\.1e-19 in "
                                         r"float32.*: score float64 features"):
        det32.calibrate(test.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert det32.calibrate(test).threshold_ < 0  # float64 queries are resolved
    with pytest.warns(UserWarning) as caught:
        evaluate(det32, test.float(), {"near": 0.9 * test.float()})
    said = [str(w.message) for w in caught]
    for name in ("the ID set", "near"):
        assert any(re.match(rf"{name}: 40 of its 40 rows score 0 \(their gradients' norm "
                            r"q_ood .* they tie", m) for m in said), said
    with pytest.warns(UserWarning, match=r"have norm q_ood below 1\.5e-154 .* float64 "
                                         r"resolves no smaller ones"):
        GROOD(progress=False).fit(x * 1e8, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # classes near for their width: no warning
        GROOD(progress=False).fit(_tight_classes(20.0)[0].float(), y)


def test_float64_gradients_held_in_a_narrower_dtype_are_checked_against_its_range():
    """A faiss index holds float32 gradients whatever the features' dtype, and an exact index
    may search a lower-precision copy of float64 ones: tight classes far apart, whose q_ood
    float64 resolves and float32 does not, scored 0 through faiss (every score) or came from
    lost copies (scores 16 times off through a float32 copy), without a word. The fit's range
    check counts against the dtype the index holds them in and names the exact index; a copy
    that loses rows of a float64 index says so when it is made, and calibration names the
    zeros for what they are."""
    x, y = _tight_classes(100.0, n=240)
    (x, test), y = x.split([200, 40]), y[:200]
    want = GROOD(progress=False).fit(x, y).score_samples(test)
    for storage, n_lost in (("float32", r"\d+"), ("bfloat16", r"\d+"), ("float16", "200")):
        # (the fit's search check misses them, and makes the copy: it warns there, once)
        with pytest.warns(UserWarning, match=rf"storage='{storage}': {n_lost} of the 200 "
                                             r"indexed gradients .* their norm in that copy "
                                             r"\(\w+ holds its precision only above .* use no "
                                             r"storage \(a float64 index's") as caught:
            det = GROOD(progress=False, index_options={"storage": storage}).fit(x, y)
            got = det.score_samples(test)
        assert [" that copy " in str(w.message) for w in caught].count(True) == 1
        assert not any("searched for as themselves" in str(w.message) for w in caught)
        assert not torch.equal(got, want)  # (what the warning is about)
    pytest.importorskip("faiss")
    with pytest.warns(UserWarning, match=r"200 of the 200 indexed training gradients "
                                         r"\(100\.0 %\) have norm q_ood below 1\.1e-19 .* "
                                         r"below float32's range, .* with index='exact'.*\(a "
                                         r"faiss index holds and searches float32 gradients"):
        det = GROOD(index="faiss-flat", progress=False).fit(x, y)
    assert bool((det.score_samples(test) == 0).all())
    with pytest.raises(ValueError, match=r"40 of the 40 calibration rows score 0 \(their "
                                         r"gradients' norm q_ood is below .* with "
                                         r"index='exact'"):
        det.calibrate(test)


def test_a_faiss_search_that_cannot_tell_the_gradients_apart_names_the_exact_index(
        monkeypatch):
    """A faiss index is not centred (it holds float32 gradients of its own): where its
    search misses the sampled gradients the fit names grood's exact index, which it centres,
    not float64 features, which faiss would round to float32 again."""
    pytest.importorskip("faiss")
    import grood._fit

    x, y, ood, _ = far_prototype_data(3e3)
    monkeypatch.setattr(grood._fit, "missed_as_themselves", lambda index, ids, held: len(ids))
    for dtype in (np.float32, np.float64):
        with pytest.warns(UserWarning, match=r"searched for as themselves, 64 of 64 .* the "
                                             r"float32 search's rounding .* fit with "
                                             r"index='exact', which the fit holds less the "
                                             r"gradients' mean") as caught:
            det = GROOD(index="faiss-flat", ood_prototype="features", progress=False).fit(
                x.astype(dtype), y, ood_features=ood.astype(dtype))
        assert not any("float64 resolves them no better" in str(w.message) for w in caught)
        assert det.index_.centre is None


def test_float64_queries_are_scored_in_float64(fitted):
    det, x = fitted
    s64 = det.score_samples(x.double())
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64, det.score_samples(x).double(), rtol=1e-4, atol=1e-6)


def test_index_repr_describes_it(fitted):
    det, _ = fitted
    assert repr(det.index_).startswith(f"ExactIndex({det.index_.ntotal} vectors of dimension 8")


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_cli_refuses_non_tensor_pt_files_without_unsafe_advice(tmp_path, capsys, content):
    path = tmp_path / "x.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a torch file at all")
    else:
        torch.save({"features": torch.rand(4, 3), "extra": np.random.default_rng(0)}, path)
    assert main(["fit", str(path), "-o", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a tensors-only .pt file" in err
    assert "weights_only=False" not in err


def test_cli_eval_names_sets_by_path_and_fit_takes_an_index(tmp_path, capsys):
    pytest.importorskip("faiss")
    x, y = clustered_features(120, 3, 6, seed=1, dtype=torch.float32)
    np.savez(tmp_path / "t.npz", features=x.numpy(), labels=y.numpy())
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "set.npy", (torch.rand(20, 6) * 3).numpy())
    det_path = tmp_path / "d.safetensors"
    assert main(["fit", str(tmp_path / "t.npz"), "-o", str(det_path), "--index",
                 "faiss-flat"]) == 0
    assert GROOD.load(det_path).index == "faiss-flat"
    assert "FaissFlatIndex(" in repr(GROOD.load(det_path).index_)
    capsys.readouterr()
    assert main(["eval", str(det_path), "--id", str(tmp_path / "t.npz"), "--ood",
                 str(tmp_path / "a" / "set.npy"), str(tmp_path / "b" / "set.npy")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "a" / "set.npy") in out and str(tmp_path / "b" / "set.npy") in out


def test_fit_batches_progress_counts_batches_against_their_number_where_known(monkeypatch):
    """A list or a DataLoader says how many batches it holds: the progress counts them
    against it (an ETA); a function's iterator is counted by rows, with no total."""
    import grood._batches

    shown = []

    class Recorder:
        def __init__(self, **kw):
            shown.append((kw["total"], kw["unit"], []))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def update(self, n):
            shown[-1][2].append(n)

    monkeypatch.setattr(grood._batches, "progress", lambda **kw: Recorder(**kw))
    x, y = clustered_features(50, 2, 4, seed=1, dtype=torch.float32)
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 50, 20)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    for source in (batches, loader):
        shown.clear()
        GROOD().fit_batches(source)
        assert shown == [(3, "batches", [1, 1, 1])] * 2  # both passes
    shown.clear()
    GROOD().fit_batches(lambda: iter(batches))
    assert shown == [(None, "rows", [20, 20, 10])] * 2


def test_plain_progress_lines_off_a_terminal(capsys):
    from grood._progress import PlainProgress

    with PlainProgress(total=4, desc="grood fit", unit="rows", every_s=0.0) as bar:
        bar.update(2)
        bar.update(2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "grood fit: at 2/4 rows (50 %), 0 s"
    assert lines[-1].startswith("grood fit: done 4/4 rows (100 %)")
    with PlainProgress(total=4, desc="quick", every_s=60.0) as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""  # short operations stay silent


def test_progress_is_a_bar_in_a_jupyter_kernel_and_plain_lines_in_logs(monkeypatch):
    """A kernel's stderr is no terminal, yet a notebook shows tqdm's bar; a log gets lines."""
    import types

    from grood._progress import PlainProgress, progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert isinstance(progress(total=3, desc="fit"), PlainProgress)
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    bar = progress(total=3, desc="fit")
    assert not isinstance(bar, PlainProgress)
    bar.close()
    terminal = types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace())  # IPython REPL
    monkeypatch.setitem(sys.modules, "IPython", terminal)
    assert isinstance(progress(total=3, desc="fit"), PlainProgress)


def test_progress_off_starts_no_thread():
    """``progress=False`` shows nothing and leaves nothing running: a disabled tqdm bar
    started tqdm's monitor thread, which then woke every 10 s for the rest of the process
    (and could warn from there, into whatever the program was recording)."""
    import subprocess

    code = ("import threading, torch, grood\n"
            "y = torch.arange(200) % 4\n"
            "x = (torch.randn(200, 8, generator=torch.Generator().manual_seed(0))\n"
            "     + 3 * torch.nn.functional.one_hot(y, 8))\n"
            "det = grood.GROOD(progress=False).fit(x, y)\n"
            "det.score_samples(x)\n"
            "grood.metrics.resampled_set_metrics(det.score_samples(x),\n"
            "                                    [det.score_samples(x + 5)], n_boot=100,\n"
            "                                    progress=False)\n"
            "print(sorted(type(t).__name__ for t in threading.enumerate()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "['_MainThread']", out.stdout
    assert out.stderr == ""
    from grood._progress import PlainProgress, progress

    bar = progress(range(3), total=3, desc="fit", enabled=False)
    assert isinstance(bar, PlainProgress) and list(bar) == [0, 1, 2]


# Property-based: any edit of a manifest, any save target.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EDITS = st.fixed_dictionaries({
    "order": st.lists(st.sampled_from([0, 1, 2]), min_size=0, max_size=4),
    "world": st.one_of(st.just("keep"), st.integers(-1, 5), st.just(True), st.just("2")),
})


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=EDITS)
def test_any_manifest_edit_is_refused_or_scores_the_same(sharded, tmp_path_factory, edit):
    folder = tmp_path_factory.mktemp("edit")
    manifest_path = _copy(sharded, folder / "copy")
    original = json.loads(manifest_path.read_text())
    x, _ = clustered_features(30, 4, 6, seed=5, spread=0.5, dtype=torch.float32)
    expected = GROOD.load(manifest_path).score_samples(x)
    # Entry 2 is a foreign shard: a one-process detector's file, listed with its digest.
    xf, yf = clustered_features(40, 4, 6, seed=8, spread=0.5, dtype=torch.float32)
    GROOD(progress=False).fit(xf, yf).save(folder / "copy" / "foreign.safetensors")
    import hashlib

    foreign = {"file": "foreign.safetensors", "sha256": hashlib.sha256(
        (folder / "copy" / "foreign.safetensors").read_bytes()).hexdigest()}
    pool = [*original["shards"], foreign]
    manifest = dict(original, shards=[pool[i] for i in edit["order"]])
    if edit["world"] != "keep":
        manifest["world_size"] = edit["world"]
    manifest_path.write_text(json.dumps(manifest))
    try:
        scores = GROOD.load(manifest_path).score_samples(x)
    except (ValueError, FileNotFoundError):
        return
    assert torch.equal(scores, expected)


TARGETS = st.sampled_from(["new", "existing", "link-to-file", "dangling-link", "link-to-dir",
                           "dir", "link-to-dev-null", "missing-folder", "wrong-suffix"])


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=TARGETS)
def test_any_save_target_is_written_correctly_or_refused_untouched(fitted, tmp_path_factory,
                                                                    kind):
    det, x = fitted
    root = tmp_path_factory.mktemp("target")
    target = root / "det.safetensors"
    other = root / "other.safetensors"
    if kind == "existing":
        target.write_bytes(b"old")
    elif kind == "link-to-file":
        other.write_bytes(b"old")
        target.symlink_to(other)
    elif kind == "dangling-link":
        target.symlink_to(root / "not-yet.safetensors")
    elif kind == "link-to-dir":
        (root / "d").mkdir()
        target.symlink_to(root / "d")
    elif kind == "dir":
        target.mkdir()
    elif kind == "link-to-dev-null":
        target.symlink_to("/dev/null")
    elif kind == "missing-folder":
        target = root / "missing" / "det.safetensors"
    elif kind == "wrong-suffix":
        target = root / "det.pkl"
    before = {p.name: (p.is_symlink(), p.is_file() and p.read_bytes()) for p in root.iterdir()}
    try:
        det.save(target)
    except (ValueError, OSError):
        after = {p.name: (p.is_symlink(), p.is_file() and p.read_bytes())
                 for p in root.iterdir()}
        assert after == before  # nothing replaced, nothing left behind
        return
    assert torch.equal(GROOD.load(target).score_samples(x), det.score_samples(x))
    if kind in ("link-to-file", "dangling-link"):
        assert target.is_symlink()  # written through the link, which stays


def test_fit_batches_refuses_a_stray_huge_label_too():
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    y[5] = 10**9
    with pytest.raises(ValueError, match="cannot exceed the number of samples"):
        GROOD(progress=False).fit_batches([(x[:30], y[:30]), (x[30:], y[30:])])


def test_mahalanobis_refuses_a_stray_huge_label_before_allocating():
    """Its class sums are [C, D] float64: a stray class id of 1e9 asked for 4 TB and ended in
    the allocator's error."""
    x, y = clustered_features(60, 3, 512, seed=1, dtype=torch.float32)
    y[5] = 10**9
    with pytest.raises(ValueError, match=r"holds class id 1000000000.*cannot exceed"):
        Mahalanobis().fit(x, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_load_on_an_unusable_device_is_a_one_line_error(fitted, tmp_path):
    det, _ = fitted
    det.save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="no usable CUDA device"):
        GROOD.load(tmp_path / "d.safetensors", device="cuda")


@pytest.fixture
def busy_thread_switching():
    """Switch threads as often as CPython allows, so races show within a short test."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(saved)


def _in_threads(work, n_threads=6):
    """Run ``work()`` in ``n_threads`` threads at once; the exceptions they raised."""
    errors = []

    def guarded():
        try:
            work()
        except Exception as e:  # every failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_gradient_step_from_many_threads_with_fresh_prototypes(busy_thread_switching):
    """Threads computing gradients at once, each with new prototype tensors (so the kept
    per-prototype values are added and dropped concurrently): no error, right results."""
    from grood import functional

    x, _ = clustered_features(40, 3, 5, seed=2, dtype=torch.float32)
    h = x[:8]
    want = functional.ncp_gradient(h.double(), x[8:11].double(), x[11].double())

    def work():
        for _ in range(150):
            res = functional.ncp_gradient(h, x[8:11].clone(), x[11].clone())
            torch.testing.assert_close(res.q_ood.double(), want.q_ood, rtol=1e-5, atol=1e-7)

    assert _in_threads(work) == []


def test_one_detector_scores_from_many_threads(busy_thread_switching):
    """A fitted detector shared by several threads (a server's workers) gives each caller the
    scores it gives alone."""
    x, y = clustered_features(600, 5, 12, seed=3, dtype=torch.float32)
    det = GROOD(progress=False).fit(x, y)
    test = x[:120] + 0.1
    want = det.score_samples(test)

    def work():
        for i in range(20):
            rows = slice(3 * i, 3 * i + 40)
            assert torch.equal(det.score_samples(test[rows]), want[rows])

    assert _in_threads(work) == []


def test_one_detector_calibrates_in_threads_while_others_score(busy_thread_switching):
    """Threads calibrating one detector on held-out rows while others score its training rows
    (a server recalibrating while it serves): each calibration counts the training rows its
    own scoring met, no other thread's. The count lived on the detector: calibrations at once
    failed ("'GROOD' object has no attribute '_exact_matches'") and counted the scoring
    threads' rows, warning of training rows in held-out data."""
    import warnings

    x, y = clustered_features(600, 5, 12, seed=3, dtype=torch.float32)
    held_out, _ = clustered_features(200, 5, 12, seed=13, dtype=torch.float32)
    det = GROOD(progress=False, batch_size=16).fit(x, y)
    want = det.calibrate(held_out, tpr=0.9).calibration_["threshold"]
    train_scores = det.score_samples(x)
    assert int((train_scores == 0).sum()) > 500  # (their own gradients: indexed)
    turn = iter(range(1000))

    def work():
        calibrating = next(turn) % 2
        for _ in range(4):
            if calibrating:
                det.calibrate(held_out, tpr=0.9)
                assert det.calibration_["threshold"] == want
            else:
                assert torch.equal(det.score_samples(x), train_scores)

    with warnings.catch_warnings(record=True) as caught:  # (every thread's)
        warnings.simplefilter("always")
        assert _in_threads(work) == []
    assert [str(w.message) for w in caught] == []


def test_fit_and_score_under_inference_mode():
    """OOD evaluation code often runs under ``torch.inference_mode()``, whose tensors have no
    version counter: fitting, scoring, predicting and the functional op work there (and a
    detector fitted there scores outside it), with the scores of ordinary mode; the fitted
    prototypes are ordinary tensors."""
    from grood import functional

    x, y = clustered_features(300, 4, 8, seed=5, dtype=torch.float32)
    test = x[:25] + 0.05
    det = GROOD(progress=False).fit(x, y)
    want, want_pred = det.score_samples(test), det.predict(test)
    with torch.inference_mode():
        inside = GROOD(progress=False).fit(x, y)
        # Ordinary tensors, so what is derived from them is kept (and a head from them can
        # be captured in a CUDA graph without remaking it).
        assert not inside.class_prototypes_.is_inference()
        assert not inside.as_module().class_prototypes.is_inference()
        assert torch.equal(inside.score_samples(test), want)
        assert torch.equal(det.score_samples(test), want)
        assert torch.equal(inside.predict(test), want_pred)
        protos, p_ood = x[:4].clone(), x[4].clone()  # inference tensors
        got = functional.ncp_gradient(test, protos, p_ood)
    assert torch.equal(inside.score_samples(test), want)
    # The squared norms a detector passes are ordinary too, so the ops check them once, not
    # on every batch (first made under inference mode here).
    from grood_kernels import contract

    checks = []
    real = contract._check_sq_norms
    contract._check_sq_norms = lambda *a, **k: checks.append(1) or real(*a, **k)
    try:
        with torch.inference_mode():
            fresh = GROOD(progress=False).fit(x, y)
            for rows in (test[:10], test[10:]):
                fresh.score_samples(rows)
    finally:
        contract._check_sq_norms = real
    assert len(checks) == 1
    ref = functional.ncp_gradient(test, x[:4].clone(), x[4].clone())
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_a_head_made_moved_or_loaded_under_inference_mode_holds_ordinary_tensors():
    """A head built, moved with ``.to()`` or loaded under ``torch.inference_mode`` (a serving
    script's ``@torch.inference_mode() def main()``) held inference tensors: the squared
    norms' check ran on every call, and with ``checks="flag"`` every call outside that mode
    failed ("Inplace update to inference tensor outside InferenceMode")."""
    from grood_kernels import contract

    x, y = clustered_features(300, 4, 8, seed=6, dtype=torch.float32)
    test = x[:20] + 0.05
    det = GROOD(progress=False).fit(x, y)
    want = det.score_samples(test)
    state = det.as_module().state_dict()

    def loaded():
        head = det.as_module(checks="flag")
        head.load_state_dict(state)
        return head

    makers = {"made": lambda: det.as_module(checks="flag"),
              "moved": lambda: det.as_module(checks="flag").double().float(),
              "loaded": loaded}
    checks = []
    real = contract._check_sq_norms
    contract._check_sq_norms = lambda *a, **k: checks.append(1) or real(*a, **k)
    try:
        for how, make in makers.items():
            checks.clear()
            with torch.inference_mode():
                head = make()
                for _ in range(3):
                    head(test)
            assert len(checks) == 1, how
            assert not any(b.is_inference() for b in head.buffers()), how
            score, _ = head(test)  # outside the mode
            torch.testing.assert_close(score, want, rtol=1e-5, atol=1e-6)
            assert int(head.unresolved_rows) == 0
    finally:
        contract._check_sq_norms = real


def test_kept_values_are_dropped_quietly_while_the_interpreter_shuts_down(monkeypatch):
    """A tensor with a kept value freed during shutdown (module globals already None) raised
    in its weak reference's callback: "Exception ignored in ... 'NoneType' object is not
    callable" at the end of a script."""
    import gc

    from grood_kernels import _derived, contract

    protos, p_ood = torch.randn(3, 4), torch.randn(4)
    contract.ncp_scale(protos, p_ood)
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    for name in ("_kept", "_kept_lock", "_drop_kept"):
        monkeypatch.setattr(_derived, name, None)
    del protos
    gc.collect()
    assert not raised


def test_detector_saved_on_triton_loads_where_triton_cannot_run(tmp_path, monkeypatch, capsys):
    """A detector fitted with backend="triton" on a GPU, loaded on a machine where Triton
    cannot run: a clear error that says how to load it, and ``backend=`` (``--backend`` on the
    command line) runs it there with the scores of a torch-backend detector."""
    import numpy as np

    from grood import ops
    from grood.errors import BackendUnavailableError

    x, y = clustered_features(300, 4, 8, seed=6, dtype=torch.float32)
    path = tmp_path / "det.safetensors"
    GROOD(backend="triton", progress=False).fit(x, y).save(path)
    want = GROOD(backend="torch", progress=False).fit(x, y).score_samples(x[:20])

    def no_triton(op, device, dtype=None, precision=None):
        return "no Triton on this machine (simulated)"

    monkeypatch.setattr(ops, "triton_unavailable_reason", no_triton)
    with pytest.raises(BackendUnavailableError, match=r"GROOD.load\(path, backend='auto'\)"):
        GROOD.load(path)
    det = GROOD.load(path, backend="auto")
    assert det.backend == "auto" and det.backend_ == {"ncp_gradient": "torch", "knn": "torch"}
    torch.testing.assert_close(det.score_samples(x[:20]), want, rtol=1e-5, atol=1e-6)
    feats = tmp_path / "test.npz"
    np.savez(feats, features=x[:20].numpy())
    assert main(["score", str(path), str(feats), "-o", str(tmp_path / "s.npy"),
                 "--backend", "torch"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_meta_and_masked_inputs_get_clear_errors():
    """Inputs whose values cannot be read as given are refused by name: sparse tensors (the
    API, the functional ops and the kernels), scipy sparse matrices, meta tensors, and masked
    arrays with masked entries (their hidden values would be scored); a masked array with
    nothing masked is an ordinary array."""
    from grood import functional

    x, y = clustered_features(200, 3, 6, seed=7, dtype=torch.float32)
    det = GROOD(progress=False).fit(x, y)
    test = x[:5]
    for bad in (test.to_sparse(), test.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"features is a sparse_c.. tensor; pass a dense one"):
            det.score_samples(bad)
    with pytest.raises(ValueError, match="features is on the meta device"):
        det.score_samples(torch.empty(5, 6, device="meta"))
    masked = np.ma.masked_array(test.numpy(), mask=np.zeros((5, 6), dtype=bool))
    np.testing.assert_array_equal(det.score_samples(masked), det.score_samples(test.numpy()))
    masked[1, 2] = np.ma.masked
    with pytest.raises(ValueError, match="masked array with 1 masked entries"):
        det.score_samples(masked)
    protos = det.class_prototypes_
    calls = [lambda: functional.ncp_gradient(test, protos.to_sparse(), protos[0]),
             lambda: functional.knn(test, x, 1, rerank_database=x.to_sparse())]
    if importlib.util.find_spec("triton") is not None:
        from grood_kernels.knn import knn as kernel_knn
        from grood_kernels.ncp_gradient import ncp_gradient as kernel_ncp

        calls += [lambda: kernel_ncp(test.to_sparse(), protos, protos[0]),
                  lambda: kernel_knn(test, x.to_sparse(), 1)]
    for call in calls:
        with pytest.raises(TypeError, match="is a sparse_coo tensor; pass a dense one"):
            call()
    if importlib.util.find_spec("scipy") is not None:
        from scipy import sparse

        with pytest.raises(TypeError, match="features is a sparse csr_matrix; pass a dense"):
            det.score_samples(sparse.csr_matrix(test.numpy()))


def test_the_functional_ops_and_kernels_name_a_numpy_argument():
    """They take tensors; a NumPy array failed inside with "'numpy.ndarray' object has no
    attribute 'layout'"."""
    from grood import functional

    x = torch.randn(6, 4)
    calls = {"h": lambda: functional.ncp_gradient(x.numpy(), x[:2], x[0]),
             "ood_prototype": lambda: functional.ncp_gradient(x, x[:2], x[0].numpy()),
             "database": lambda: functional.knn(x, x.numpy(), 1),
             "features": lambda: functional.class_prototypes(x.numpy(), torch.zeros(6), 1)}
    if importlib.util.find_spec("triton") is not None:
        from grood_kernels.knn import knn as kernel_knn
        from grood_kernels.ncp_gradient import ncp_gradient as kernel_ncp

        calls["prototypes"] = lambda: kernel_ncp(x, x[:2].numpy(), x[0])
        calls["queries"] = lambda: kernel_knn(x.numpy(), x, 1)
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got ndarray "
                                            r"\(torch.from_numpy\(x\) makes one"):
            call()
    with pytest.raises(TypeError, match=r"queries must be a torch\.Tensor, got list$"):
        functional.knn(x.tolist(), x, 1)


def test_arrays_in_any_numpy_layout_score_as_the_plain_array(tmp_path):
    """Big-endian, Fortran-ordered, negatively strided, read-only and memory-mapped arrays,
    nested lists and tensors that autograd tracks score as the plain array does (fit on
    big-endian features and labels too); arrays of Python objects or strings are refused."""
    x, y = clustered_features(150, 3, 6, seed=3, dtype=torch.float32)
    det = GROOD(progress=False).fit(x, y)
    test = clustered_features(12, 3, 6, seed=4, dtype=torch.float32)[0].numpy()
    want = det.score_samples(test)
    np.save(tmp_path / "t.npy", test)
    frozen = test.copy()
    frozen.flags.writeable = False
    layouts = {"big-endian": test.astype(">f4"), "fortran": np.asfortranarray(test),
               "reversed twice": test[::-1][::-1], "negative stride": test[::-1],
               "read-only": frozen, "memory map": np.load(tmp_path / "t.npy", mmap_mode="r")}
    for name, arr in layouts.items():
        got = det.score_samples(arr)
        expected = want[::-1] if name == "negative stride" else want
        np.testing.assert_array_equal(got, expected, err_msg=name)
    np.testing.assert_allclose(det.score_samples(test.tolist()), want, rtol=1e-4)  # float64
    tracked = torch.from_numpy(test).requires_grad_()
    scores = det.score_samples(tracked)
    assert not scores.requires_grad and torch.equal(scores, torch.from_numpy(want))
    swapped = GROOD(progress=False).fit(x.numpy().astype(">f4"), y.numpy().astype(">i8"))
    assert torch.equal(swapped.index_.vectors, det.index_.vectors)
    with pytest.raises(TypeError, match="features must be a numeric array, got an array of "
                                        "Python objects"):
        det.score_samples(test.astype(object))
    # Class ids written as text: read as numbers (np.unique would order '10' before '2').
    with pytest.raises(TypeError, match=r"labels holds class ids as text \('\d', '\d', '\d'\): "
                                        r"read them as numbers, labels.astype\(int\)"):
        GROOD().fit(x, y.numpy().astype(str))


class _Column:
    """An array-like of Python objects, as a pandas column of strings (or a Categorical)
    gives to np.asarray."""

    def __init__(self, values):
        self.values = values

    def __array__(self, dtype=None, copy=None):
        return np.array(self.values, dtype=object)


def test_labels_as_text_in_an_array_like_column_are_named():
    """A pandas column of class names or of ids as text (dtype object) gets the same advice as
    a numpy array of strings (it was "must be a numeric array, got an array of Python
    objects"); so does a numpy object array of ids as text (it was called class names)."""
    x, y = clustered_features(60, 3, 5, seed=2, dtype=torch.float32)
    names = np.array(["cat", "dog", "emu"])[y.numpy()]
    with pytest.raises(TypeError, match=r"labels holds class names \('\w{3}', '\w{3}', '\w{3}'\), "
                                        r"not integer class ids 0..C-1: number them, e\.g\. "
                                        r"names, ids = np\.unique\(labels, return_inverse"):
        GROOD().fit(x, _Column(names.tolist()))
    ids_as_text = [str(v) for v in y.tolist()]
    for labels in (_Column(ids_as_text), np.array(ids_as_text, dtype=object)):
        with pytest.raises(TypeError, match=r"labels holds class ids as text \('\d', '\d', "
                                            r"'\d'\): read them as numbers"):
            GROOD().fit(x, labels)
    with pytest.raises(TypeError, match="labels must be a numeric array, got an array of "
                                        "Python objects"):
        GROOD().fit(x, _Column(y.tolist()))


def test_numpy_and_torch_integer_parameters(tmp_path):
    """k, batch_size and integer index options from a config or an array (numpy or 0-d torch
    integers) work like Python ints (a saved file holds JSON ints); booleans, floats and
    strings are refused by name, as are index_options that are not a dict."""
    x, y = clustered_features(300, 3, 8, seed=9, dtype=torch.float32)
    want = GROOD(k=3, batch_size=64, progress=False).fit(x, y).score_samples(x[:20])
    det = GROOD(k=np.int64(3), batch_size=np.int32(64), progress=False).fit(x, y)
    assert torch.equal(det.score_samples(x[:20]), want)
    assert type(det.k) is int and type(det.batch_size) is int
    det.k, det.batch_size = torch.tensor(3), np.uint16(7)  # set after fit, saved unchecked
    det.save(tmp_path / "d.safetensors")
    again = GROOD.load(tmp_path / "d.safetensors")
    assert (again.k, again.batch_size) == (3, 7)
    assert torch.equal(again.score_samples(x[:20]), want)
    for bad in (2.0, True, np.bool_(True), torch.tensor(True), np.float64(3), "3", 0):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            GROOD(k=bad, progress=False).fit(x, y)
    from grood.baselines import KNN, Mahalanobis

    knn = KNN(k=np.int64(5), batch_size=np.int32(16)).fit(x)
    assert torch.equal(knn.score_samples(x[:20]), KNN(k=5, batch_size=16).fit(x).score_samples(
        x[:20]))
    for baseline in (KNN(batch_size=0), Mahalanobis(batch_size=0), KNN(k=2.0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            baseline.fit(x, y)
    with pytest.raises(TypeError, match="index_options must be a dict"):
        GROOD(index_options=["storage"], progress=False).fit(x, y)
    if importlib.util.find_spec("faiss") is None:
        return
    opts = {"nlist": np.int64(4), "nprobe": np.int32(2)}
    ivf = GROOD(index="faiss-ivf", index_options=opts, progress=False).fit(x, y)
    plain = GROOD(index="faiss-ivf", index_options={"nlist": 4, "nprobe": 2}, progress=False)
    assert torch.equal(ivf.score_samples(x[:20]), plain.fit(x, y).score_samples(x[:20]))
    assert type(opts["nlist"]) is np.int64  # the caller's options are left as given
    ivf.save(tmp_path / "ivf.safetensors")
    assert GROOD.load(tmp_path / "ivf.safetensors").index_options == {"nlist": 4, "nprobe": 2}


def test_training_batches_that_change_between_passes_are_refused():
    """Fitting reads the batches twice (prototypes, then gradients): a loader that gives
    other rows the second time (drop_last with shuffling, resampling, another split) used to
    build prototypes and index from different data. Row and per-class label counts are
    compared; the same rows in another order (a shuffling loader) are fine."""
    x, y = clustered_features(600, 3, 8, seed=10, dtype=torch.float32)
    want = GROOD(progress=False).fit(x, y).score_samples(x[:30])

    # fit_batches reads: the first batch, a pass counting classes, the prototype pass and
    # the gradient pass (the 4th call).
    def loader(last_rows: int):
        calls = []

        def batches():
            calls.append(None)
            order = torch.randperm(600, generator=torch.Generator().manual_seed(len(calls)))
            rows = order[:last_rows] if len(calls) == 4 else order
            return iter([(x[rows[i:i + 100]], y[rows[i:i + 100]])
                         for i in range(0, rows.numel(), 100)])
        return batches

    shuffled = GROOD(progress=False).fit_batches(loader(600))
    torch.testing.assert_close(shuffled.score_samples(x[:30]), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="600 rows in the class-prototype pass, 500 in the "
                                         "gradient pass"):
        GROOD(progress=False).fit_batches(loader(500))

    def relabelled():  # the same rows, some other labels in the gradient pass
        relabelled.calls = getattr(relabelled, "calls", 0) + 1
        labels = y if relabelled.calls < 4 else torch.where(torch.arange(600) < 60, 0, y)
        return iter([(x[i:i + 100], labels[i:i + 100]) for i in range(0, 600, 100)])

    with pytest.raises(ValueError, match="changed between fitting's two passes"):
        GROOD(progress=False).fit_batches(relabelled)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_numpy_labels_are_class_ids(dtype):
    """numpy's wide unsigned labels were refused as "not integer class ids" (torch computes
    little in uint16/32/64); they are read as int64, the caller's array left as it was."""
    from grood.baselines import Mahalanobis

    x, y = clustered_features(80, 3, 5, seed=2, dtype=torch.float32)
    want = GROOD().fit(x, y).score_samples(x[:9])
    labels = y.numpy().astype(dtype)
    before = labels.copy()
    assert torch.equal(GROOD().fit(x, labels).score_samples(x[:9]), want)
    assert torch.equal(GROOD().fit_batches([(x, labels)]).score_samples(x[:9]), want)
    Mahalanobis().fit(x, labels)
    np.testing.assert_array_equal(labels, before)
    if dtype is np.uint64:
        with pytest.raises(ValueError, match=r"class id of 2\*\*63 or more"):
            GROOD().fit(x, np.full(80, 2**64 - 1, np.uint64))


def test_whole_number_float_labels_are_refused_with_how_to_pass_them():
    """Class ids stored as floats (a CSV column, a pandas frame) were refused with the dtype
    alone; where every value is a whole number >= 0 the message says how to pass them as ids.
    Fractions, negative values and NaN get no such advice (no cast would make them ids)."""
    from grood.functional import class_prototypes

    x, y = clustered_features(40, 3, 4, seed=1, dtype=torch.float32)
    advice = "its values are whole numbers: pass them as integers"
    for labels in (y.numpy().astype(np.float64), y.float()):
        with pytest.raises(TypeError, match=advice):
            GROOD().fit(x, labels)
        with pytest.raises(TypeError, match=advice):
            class_prototypes(x, torch.as_tensor(labels), 3)
    for labels in (y.double() + 0.5, y.double() - 1, torch.full((40,), float("nan"))):
        with pytest.raises(TypeError, match="must hold integer class ids") as caught:
            GROOD().fit(x, labels)
        assert "whole numbers" not in str(caught.value)


def test_flags_must_be_booleans(tmp_path):
    """progress="no" counted as true (bars shown), distributed="no" asked for a process
    group; numpy booleans are fine."""
    x, y = clustered_features(40, 2, 4, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="progress must be True, False or None, got 'no'"):
        GROOD(progress="no").fit(x, y)
    with pytest.raises(ValueError, match="distributed must be True or False, got 'no'"):
        GROOD(distributed="no").fit(x, y)
    det = GROOD(progress=np.bool_(False), distributed=np.bool_(False)).fit(x, y)
    assert det.progress is False and det.distributed is False
    det.progress = "off"  # set after fit: checked where it is used
    with pytest.raises(ValueError, match="progress must be"):
        det.score_samples(x)
    det.progress = None
    det.save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="distributed must be True or False"):
        GROOD.load(tmp_path / "d.safetensors", distributed="yes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_row_check_finds_every_non_finite_row_and_only_those(dtype):
    """The check reads rows' sums first (one pass, no [N, D] temporary) and looks element by
    element only where a sum is not finite: rows whose finite values overflow the sum pass,
    a row with +inf and -inf (sum NaN) and one with a single NaN are named, with the offset."""
    from grood._checks import check_finite_rows

    big = torch.finfo(dtype).max
    x = torch.rand(9, 6).to(dtype)
    x[1] = big  # finite, but its sum overflows
    check_finite_rows(x, "features")
    for rows, values in (([4], [float("nan")]), ([2, 7], [float("inf"), -float("inf")]),
                         ([0, 8], [float("nan"), float("inf")])):
        bad = x.clone()
        for r, v in zip(rows, values, strict=True):
            bad[r, 3] = v
        bad[rows[0], 4] = -float("inf")  # +inf and -inf in one row sum to NaN
        shown = ", ".join(str(r + 100) for r in sorted(rows))
        with pytest.raises(ValueError, match=rf"features contains NaN or Inf in row\(s\) "
                                             rf"{shown}$"):
            check_finite_rows(bad, "features", row_offset=100)
    vector = torch.ones(5, dtype=dtype)
    vector[2] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) 2"):
        check_finite_rows(vector, "ood_prototype")
    # a batch of feature maps [B, C, H, W]: its samples are the rows
    maps = torch.rand(4, 3, 2, 2).to(dtype)
    check_finite_rows(maps, "the feature map")
    maps[3, 2, 1, 0] = float("inf")
    maps[1, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the feature map contains NaN or Inf in row\(s\) "
                                         r"1, 3$"):
        check_finite_rows(maps, "the feature map")


@pytest.mark.parametrize(("where", "key", "value", "shown"), [
    ("state", "n_classes", None, "state.n_classes missing"),
    ("state", "train_accuracy", "97 %", "state.train_accuracy='97 %'"),
    ("params", "k", 0, "params.k=0"),
    ("params", "ood_prototype", "mean", "params.ood_prototype='mean'"),
])
def test_metadata_fields_are_checked_when_read(fitted, tmp_path, capsys, where, key, value,
                                               shown):
    """A header whose JSON parses but lacks a field (or holds one of the wrong kind) failed
    deep inside: 'grood info' with "unsupported format string passed to NoneType", loading
    with a KeyError. Now both name the field, even under a digest that fits."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    det, _ = fitted
    path = tmp_path / "d.safetensors"
    det.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    fields = json.loads(meta[where])
    if value is None:
        del fields[key]
    else:
        fields[key] = value
    meta[where] = json.dumps(fields, sort_keys=True)
    meta["digest"] = persistence.digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    message = f"d.safetensors is corrupt: invalid metadata {shown}"
    with pytest.raises(DetectorFileError, match=re.escape(message)):
        GROOD.load(path)
    assert main(["info", str(path)]) == 3
    assert message in capsys.readouterr().err


class _Table:
    """A table of named columns, as a pandas or polars DataFrame: ``columns`` in order and
    ``__array__`` giving its values in that order (``table[names]`` selects columns)."""

    def __init__(self, values, columns):
        self.values, self.columns = np.asarray(values), list(columns)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __getitem__(self, names):
        order = [self.columns.index(n) for n in names]
        return _Table(self.values[:, order], names)


def test_a_table_scored_with_its_columns_in_another_order_is_refused(tmp_path):
    """A detector fitted on a table records its column names (``feature_names_in_``, as
    scikit-learn's estimators) and, saved or not, refuses a table whose columns are other or
    in another order: it had scored such a table's values as the fitted columns, silently.
    Arrays beside tables are warned of; mixed-type names are refused at fit."""
    x, y = clustered_features(300, 3, 6, seed=4, dtype=torch.float32)
    names = ["pc1", "pc2", "pc3", "pc4", "pc5", "pc6"]
    table = _Table(x.numpy(), names)
    det = GROOD(progress=False).fit(table, y)
    assert det.feature_names_in_.tolist() == names
    assert det.feature_names_in_.dtype == object
    plain = GROOD(progress=False).fit(x, y)
    want = plain.score_samples(x.numpy())
    swapped = table[["pc2", "pc1", "pc3", "pc4", "pc5", "pc6"]]
    assert not np.array_equal(plain.score_samples(swapped.values), want)  # what it had given
    path = tmp_path / "det.safetensors"
    det.save(path)
    loaded = GROOD.load(path)
    assert loaded.feature_names_in_.tolist() == names
    from grood.cli import info_lines
    from grood.persistence import describe

    assert ("  columns      'pc1', 'pc2', 'pc3', 'pc4', 'pc5', 'pc6' (a table's, checked in "
            "every table scored)") in info_lines(describe(path))
    for d in (det, loaded):
        assert np.array_equal(d.score_samples(table), want)
        with pytest.raises(ValueError, match=r"features hold the columns the detector was "
                                             r"fitted on in another order \(column 0 is 'pc2', "
                                             r"was 'pc1'\): select them in that order, e\.g\. "
                                             r"df\[det\.feature_names_in_\]"):
            d.score_samples(swapped)
        with pytest.raises(ValueError, match=r"features' columns are not those the detector "
                                             r"was fitted on \(not among them: 'PC1'; "
                                             r"missing: 'pc1'\)"):
            d.predict(_Table(x.numpy(), ["PC1", *names[1:]]))
        with pytest.raises(ValueError, match=r"features' columns are not those the detector "
                                             r"was fitted on \(not among them: 'label'\): "
                                             r"select those, e\.g\. df\[det\.feature_names_in_\]"):
            d.score_samples(_Table(np.c_[x.numpy(), y.numpy()], [*names, "label"]))
        with pytest.warns(UserWarning, match=r"features have no column names, but those the "
                                             r"detector was fitted on were named \('pc1', "
                                             r"'pc2', 'pc3', 'pc4', 'pc5', 'pc6'\): the columns "
                                             r"are taken in the order given"):
            assert np.array_equal(d.score_samples(x.numpy()), want)
    assert not hasattr(plain, "feature_names_in_")
    with pytest.warns(UserWarning, match="features have named columns, but those the detector "
                                         "was fitted on had none"):
        plain.score_samples(table)
    det.fit(x, y)  # refitted on an array: the names go
    assert not hasattr(det, "feature_names_in_")
    assert not hasattr(GROOD(progress=False).fit(_Table(x.numpy(), range(6)), y),
                       "feature_names_in_")  # numbered columns, as pandas' default
    with pytest.raises(TypeError, match=r"features' column names are of several types "
                                        r"\(int, str\); name every column by a string"):
        GROOD().fit(_Table(x.numpy(), ["pc1", 2, 3, 4, 5, 6]), y)
    with pytest.raises(ValueError, match=r"ood_features hold the columns of the training "
                                         r"features in another order \(column 0 is 'pc2', was "
                                         r"'pc1'\): select them in that order, e\.g\. "
                                         r"ood_features\[features\.columns\]"):
        GROOD(ood_prototype="features").fit(table, y, ood_features=swapped)
    halves = [(_Table(x[:150].numpy(), names), y[:150]), (_Table(x[150:].numpy(), names),
                                                            y[150:])]
    streamed = GROOD(progress=False).fit_batches(halves)  # (chunks of a table read in parts)
    assert streamed.feature_names_in_.tolist() == names
    assert np.array_equal(streamed.score_samples(table), want)
    with pytest.raises(ValueError, match=r"batch 1's features hold the columns of the first "
                                         r"batch in another order \(column 0 is 'pc2'"):
        GROOD().fit_batches([halves[0], (halves[1][0][swapped.columns], y[150:])])
    with pytest.raises(ValueError, match="ood_features hold the columns of the training "
                                         "features in another order"):
        GROOD(ood_prototype="features").fit_batches(halves, ood_features=swapped)


def test_baselines_check_a_tables_columns_too_and_evaluate_keeps_them():
    """The baselines record a table's column names as the detector does, and refuse another
    order; ``evaluate`` (which moves each set to a tensor for them) checks the sets' tables
    against them without warning of the names the tensor lost."""
    import warnings

    from grood import evaluate
    from grood.baselines import KNN, MSP

    x, y = clustered_features(300, 3, 6, seed=4, dtype=torch.float32)
    names = [f"pc{i}" for i in range(1, 7)]
    table = _Table(x.numpy(), names)
    swapped = table[names[::-1]]
    logits = _Table(np.eye(3, dtype=np.float32)[y.numpy()] * 4, ["cat", "dog", "fox"])
    knn, msp = KNN(k=5).fit(table), MSP().fit(logits)
    assert knn.feature_names_in_.tolist() == names
    assert msp.feature_names_in_.tolist() == ["cat", "dog", "fox"]
    with pytest.raises(ValueError, match=r"features hold the columns this KNN was fitted on in "
                                         r"another order \(column 0 is 'pc6', was 'pc1'\)"):
        knn.score_samples(swapped)
    with pytest.raises(ValueError, match=r"logits' columns are not those this MSP was fitted "
                                         r"on \(not among them: 'cow'; missing: 'fox'\)"):
        msp.score_samples(_Table(logits.values, ["cat", "dog", "cow"]))
    with pytest.warns(UserWarning, match="features have no column names, but those this KNN "
                                         "was fitted on were named"):
        knn.score_samples(x.numpy())
    det = GROOD(progress=False).fit(table, y)
    held, held_y = clustered_features(90, 3, 6, seed=5, dtype=torch.float32)
    held_logits = _Table(np.eye(3, dtype=np.float32)[held_y.numpy()] * 4, logits.columns)
    id_set = {"features": _Table(held.numpy(), names), "logits": held_logits}
    ood = {"features": _Table(held.numpy()[:50] * 3, names),
           "logits": _Table(np.full((50, 3), 1.0, dtype=np.float32), logits.columns)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev = evaluate(det, id_set, {"far": ood}, baselines=[knn, msp])
    assert "far" in ev.results
    with pytest.raises(ValueError, match=r"features hold the columns this KNN was fitted on in "
                                         r"another order"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GROOD's and the KNN's about the ID array)
        evaluate(GROOD(progress=False).fit(x, y), {"features": held.numpy()},
                 {"far": {"features": ood["features"][names[::-1]]}}, baselines=[knn])


def test_evaluate_leaves_the_warnings_filters_and_other_threads_alone():
    """``evaluate`` silenced the baselines' "no column names" warning (a table's names it had
    checked, lost by the tensor it made) by adding a process-wide ``warnings`` filter, which
    another thread's warning met, and whose restoring undid filters other threads set in the
    meantime. The names are now marked checked for the calling context alone."""
    import threading
    import warnings

    from grood import evaluate
    from grood.baselines import KNN

    x, y = clustered_features(200, 3, 6, seed=4, dtype=torch.float32)
    names = [f"pc{i}" for i in range(1, 7)]
    knn = KNN(k=5).fit(_Table(x.numpy(), names))
    det = GROOD(progress=False).fit(_Table(x.numpy(), names), y)
    held, _ = clustered_features(60, 3, 6, seed=5, dtype=torch.float32)
    seen = []
    score = knn.score_samples

    def watched(features):
        seen.append(list(warnings.filters))
        return score(features)

    knn.score_samples = watched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = list(warnings.filters)
        evaluate(det, {"features": _Table(held.numpy(), names)},
                 {"far": {"features": _Table(held.numpy()[:30] * 3, names)}}, baselines=[knn])
    assert seen and all(filters == before for filters in seen)
    # Marked in one thread, not in another: there a tensor where names were fitted is warned of.
    from grood._columns import check_feature_names, names_checked

    caught = []

    def other_thread():
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            check_feature_names(names, x, against="this KNN was fitted on")
        caught.extend(str(w.message) for w in got)

    with names_checked(), warnings.catch_warnings():
        warnings.simplefilter("error")
        check_feature_names(names, x)  # (checked: no warning here)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert caught and caught[0].startswith("features have no column names, but those this KNN")


def _float32_and_float64_scores(x, y, ood, test, **params):
    """A float32 detector, its scores of ``test`` as float64, and float64's on the same
    inputs (fitted with every warning an error)."""
    det = GROOD(ood_prototype="features", **params).fit(x, y, ood_features=ood)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = GROOD(ood_prototype="features", **params).fit(
            x.astype(np.float64), y, ood_features=ood.astype(np.float64))
        assert wide.index_.centre is None
        return det, det.score_samples(test).astype(np.float64), wide.score_samples(
            test.astype(np.float64))


def test_a_search_that_cannot_tell_the_gradients_apart_is_centred_at_the_fit(tmp_path, capsys):
    """An OOD prototype far outside the training features for their width leaves every
    gradient pointing nearly the same way, closer together than the float32 search's
    expansion resolves next to their norms: it returned other neighbours than the nearest,
    and scores 14 % of their spread off float64's came with a warning only. The fit finds it
    by searching indexed gradients for themselves and holds the index less the gradients'
    mean, where the search tells them apart: scores within 0.2 % of float64's, without a
    warning, and so after saving and loading, from a GROOD head and from its portable twin."""
    x, y, ood, test = far_prototype_data(3e3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det, got, want = _float32_and_float64_scores(x, y, ood, test)
    assert det.index_.centre is not None and "held less their mean" in repr(det.index_)
    assert np.abs(got - want).max() < 5e-3 * np.ptp(want)
    det.save(tmp_path / "far.safetensors")
    described = persistence.describe(tmp_path / "far.safetensors")
    assert described["index_centred"] and described["format_version"] == 3
    assert main(["info", str(tmp_path / "far.safetensors")]) == 0
    assert f"{det.index_.ntotal} gradients, held less their mean;" in capsys.readouterr().out
    loaded = GROOD.load(tmp_path / "far.safetensors")
    assert torch.equal(loaded.index_.centre, det.index_.centre)
    np.testing.assert_array_equal(loaded.score_samples(test), got.astype(np.float32))
    head = det.as_module()
    np.testing.assert_array_equal(head(torch.as_tensor(test))[0].numpy(),
                                  got.astype(np.float32))
    portable = PortableHead.from_head(head)(torch.as_tensor(test))[0].double().numpy()
    assert np.abs(portable - want).max() < 5e-3 * np.ptp(want)
    # What the same index searched uncentred gave.
    det.index_.drop_centre()
    assert np.abs(det.score_samples(test) - want).max() > 0.05 * np.ptp(want)
    # Ordinary spread (1/19 of the distance): found as built, scored as float64 scores.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        near, got, want = _float32_and_float64_scores(*far_prototype_data(10))
    assert near.index_.centre is None and np.abs(got - want).max() < 1e-3 * np.ptp(want)


def test_a_search_whose_rows_lie_within_its_rounding_is_centred_though_it_finds_them():
    """At distance/spread 557 the search finds every sampled gradient as itself, so the fit
    held the index as built, but each lies nearer its nearest other row than the expansion's
    error bound (16 times it at the median): a query between rows got candidates by its
    GEMM's rounding, and the Triton search, rounding otherwise than the CPU's BLAS, scored
    the far-prototype test rows 0.24 % of their spread off float64's (torch's 0.008 %). The
    fit counts such crowded rows and holds the index less the gradients' mean where half or
    more are (none then): both backends score within 0.03 % (Triton 0.014 % under triton
    3.9's interpreter, 0.022 % under 3.6's). Ordinary features' gradients
    are not crowded (none of 64; their median bound is 9e-5 of the distance)."""
    x, y, ood, test = far_prototype_data(300)
    want = far_prototype_float64_scores(x, y, ood, test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = GROOD(ood_prototype="features", backend="torch", progress=False).fit(
            x, y, ood_features=ood)
    index = det.index_
    assert index.centre is not None
    ids = probe_ids(index.ntotal)
    rows = index.vectors_at(ids)
    assert crowded_probes(index, ids, rows, torch.float32) == [0, 64]
    as_built = rows + index.centre
    index.drop_centre()
    assert crowded_probes(index, ids, as_built, torch.float32) == [64, 64]
    index.centre_on(index.vectors_mean())
    for backend in ("torch", "triton"):
        got = det.set_params(backend=backend).score_samples(test)
        assert np.abs(got - want).max() < 3e-4 * np.ptp(want), backend
    ordinary = GROOD(progress=False).fit(*clustered_features(3000, 10, 64, seed=1, spread=0.3,
                                                             dtype=torch.float32))
    ids = probe_ids(ordinary.index_.ntotal)
    assert ordinary.index_.centre is None
    assert crowded_probes(ordinary.index_, ids, ordinary.index_.vectors_at(ids),
                          torch.float32) == [0, 64]


def test_the_fits_search_check_reads_an_exact_index_once(monkeypatch):
    """The check searches the sampled rows for as themselves and for their nearest other row:
    one search for the two nearest gives both, where it made two (each a read of the whole
    index: 0.3 s of a 1.9 s CPU fit at 200,000 x 512). Held less the mean (crowded rows),
    one more: the same counts as from the searches made apart."""
    import grood._fit

    searched = []
    real = grood._fit.searched_in_blocks
    monkeypatch.setattr(grood._fit, "searched_in_blocks",
                        lambda *a, **kw: searched.append(a[2]) or real(*a, **kw))
    monkeypatch.setattr(grood.index.ExactIndex, "search", lambda *a, **kw: pytest.fail(
        "the check searched the index a second time"))
    x, y = clustered_features(3000, 10, 64, seed=1, spread=0.3, dtype=torch.float32)
    det = GROOD(progress=False).fit(x, y)
    assert searched == [2] and det.index_.centre is None
    x, y, ood, _ = far_prototype_data(300)
    searched.clear()
    det = GROOD(ood_prototype="features", backend="torch", progress=False).fit(
        x, y, ood_features=ood)
    assert searched == [2, 2] and det.index_.centre is not None
    index, ids = det.index_, probe_ids(det.index_.ntotal)
    rows, centre = index.vectors_at(ids) + index.centre, index.centre.clone()
    index.drop_centre()
    for shift in (None, centre):
        assert grood._fit.probed(index, ids, rows, shift) == (
            grood._fit.missed_in_blocks(index, ids, rows, shift),
            crowded_probes(index, ids, rows, torch.float32, shift))


def test_a_half_precision_copy_that_cannot_tell_the_gradients_apart_is_centred_at_the_fit(
        tmp_path):
    """A bf16 copy of the index rounds each gradient by up to 2**-8 of its norm: with an OOD
    prototype 186 times the features' spread away (where the float32 index resolves them)
    its search returned other neighbours, and scores 140 % of their spread off float64's
    came without a word (the fit did not check such an index). The fit checks it on blocks
    of the rows rounded as the copy holds them, without making the copy, and holds the index
    less the gradients' mean, whose copy resolves them: within 1 % of float64's, after
    loading too. A float16 copy, whose range loses such gradients, is warned of once, by the
    copy the check makes (before, the check's warning blamed the gradients' directions)."""
    x, y, ood, test = far_prototype_data(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = far_prototype_float64_scores(x, y, ood, test)
        det = GROOD(ood_prototype="features", index_options={"storage": "bfloat16"}).fit(
            x, y, ood_features=ood)
        assert det.index_._stored is None  # (made by the first search, as before)
        got = det.score_samples(test).astype(np.float64)
    assert det.index_.centre is not None and det.index_.storage == torch.bfloat16
    assert np.abs(got - want).max() < 1e-2 * np.ptp(want)
    det.save(tmp_path / "half.safetensors")
    loaded = GROOD.load(tmp_path / "half.safetensors")
    assert loaded.index_.storage == torch.bfloat16 and loaded.index_.centre is not None
    np.testing.assert_array_equal(loaded.score_samples(test), got.astype(np.float32))
    np.testing.assert_array_equal(det.as_module()(torch.as_tensor(test))[0].numpy(),
                                  got.astype(np.float32))
    det.index_.drop_centre()  # what the copy of the unshifted rows gave
    assert np.abs(det.score_samples(test) - want).max() > 0.5 * np.ptp(want)
    # (its search misses them: the copy, made there, names the cause, as the only warning)
    with pytest.warns(UserWarning, match=r"storage='float16': 600 of the 600 indexed "
                                         r"gradients .* lose more than 3\.12 % of their norm "
                                         r"in that copy \(float16 holds its precision only "
                                         r"above .* use storage='bfloat16'") as caught:
        GROOD(ood_prototype="features", index_options={"storage": "float16"}).fit(
            x, y, ood_features=ood)
    assert len(caught) == 1


def _fitted_far_in_ieee() -> tuple[GROOD, np.ndarray]:
    """A detector fitted in ieee on the far-prototype data at distance/spread 28, where its
    search resolves the gradients uncentred, none crowded (a bf16 one misses 47 of 64), and
    float64's scores of the data's test rows."""
    x, y, ood, test = far_prototype_data(15)
    det = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
    assert det.index_.centre is None
    return det, far_prototype_float64_scores(x, y, ood, test)


def test_a_search_precision_set_after_the_fit_is_checked_again():
    """The fit checks its search in the precision it is fitted in: at distance/spread 28 the
    ieee search resolves the gradients, a bf16 one does not, and a detector fitted in ieee and
    then set to precision='bf16' scored 0.7 % of the score spread off float64's without a
    word (130 % at 186, where an ieee fit now finds its search crowded and centres it). The
    first search in the new precision checks it again, and holds the index less the
    gradients' mean as a fit in bf16 would; a detector already held so is checked as it is
    held; a shard of a multi-rank detector (whose other ranks need not be scoring) is warned
    of, not centred."""
    x, y, ood, test = far_prototype_data(15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det, want = _fitted_far_in_ieee()
        det.set_params(precision="bf16")
        got = det.score_samples(test)
        assert det.index_.centre is not None
        assert np.abs(got - want).max() < 1e-4 * np.ptp(want)
        # Held less the mean already (at the fit, in ieee): checked as held, quietly.
        far = GROOD(ood_prototype="features", progress=False).fit(*far_prototype_data(3e3)[:2],
                                                                  ood_features=ood)
        centre = far.index_.centre.clone()
        far.set_params(precision="bf16").score_samples(test)
        assert torch.equal(far.index_.centre, centre)
        # A head made in the new precision (before any score) is made of the checked index;
        # one made before, holding the index's rows themselves, is left as it was.
        again = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
        shared = as_module(again, copy=False)
        before = shared(torch.as_tensor(test))[0]
        head = again.set_params(precision="bf16").as_module()
        assert torch.equal(shared(torch.as_tensor(test))[0], before)
        assert again.index_.centre is not None and torch.equal(head.index_centre,
                                                               again.index_.centre)
    held = det.index_.vectors + det.index_.centre
    shard = ExactIndex(16, precision="bf16")
    shard.add(held)
    with pytest.warns(UserWarning, match=r"searched for as themselves, \d+ of 64 .* or "
                                         r"precision='ieee' \(the bf16 GEMM rounds more\)"):
        check_search_again(shard, torch.float32, "bf16", torch.device("cpu"), sharded=True)
    assert shard.centre is None


def test_a_precision_set_after_the_fit_and_saved_is_checked_at_the_load(tmp_path):
    """Set to precision='bf16' after an ieee fit and saved before any score, a detector was
    written with its search unchecked in bf16, and loaded so: at distance/spread 28 its
    scores strayed by 0.7 % of their spread from float64's (130 % at 186, where an ieee fit
    now centres the index itself), without a word. A load now checks
    the search wherever it rounds past the features' own arithmetic (bf16 anywhere, tf32 on a
    GPU), the file saying neither where nor in which precision the fit checked it: the file
    loads held less the gradients' mean, as a fit in bf16 holds it. The save leaves the
    detector as it was."""
    x, y, ood, test = far_prototype_data(15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det, want = _fitted_far_in_ieee()
        det.set_params(precision="bf16").save(tmp_path / "bf16.safetensors")
        assert det.index_.centre is None
        loaded = GROOD.load(tmp_path / "bf16.safetensors")
        assert loaded.index_.centre is not None
        assert np.abs(loaded.score_samples(test) - want).max() < 1e-4 * np.ptp(want)
        fitted = GROOD(ood_prototype="features", precision="bf16", progress=False).fit(
            x, y, ood_features=ood)
        assert torch.equal(loaded.index_.centre, fitted.index_.centre)
        # In ieee nothing rounds past the features' arithmetic: loaded as saved.
        plain = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
        plain.save(tmp_path / "ieee.safetensors")
        assert GROOD.load(tmp_path / "ieee.safetensors").index_.centre is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rounds_past_fp32("bf16", cpu, torch.float32) and rounds_past_fp32("bf16", cpu,
                                                                             torch.float64)
    assert rounds_past_fp32("tf32", cuda, torch.float32)
    assert not rounds_past_fp32("tf32", cpu, torch.float32)
    assert not rounds_past_fp32("tf32", cuda, torch.float64)
    assert not any(rounds_past_fp32(p, cuda, torch.float32) for p in ("ieee", "tf32x3"))


def test_a_save_refuses_parameters_its_file_could_not_be_scored_with(tmp_path):
    """A ``k`` past the index was saved, and the file then refused at every load as
    "inconsistent", as if damaged; an unknown precision was saved and loaded, and refused at
    the first score. A save checks them as a score does and writes nothing."""
    x, y = clustered_features(300, 3, 8, seed=4, dtype=torch.float32)
    det = GROOD(progress=False).fit(x, y)
    target = tmp_path / "det.safetensors"
    with pytest.raises(ValueError, match=r"k=100000 but the index holds only \d+ training "
                                         r"gradients; lower k"):
        det.set_params(k=100_000).save(target)
    with pytest.raises(ValueError, match=r"precision must be one of .* got 'fp16'"):
        det.set_params(k=1, precision="fp16").save(target)
    assert not target.exists()
    det.set_params(precision="ieee").save(target)
    assert torch.equal(GROOD.load(target).score_samples(x), det.score_samples(x))


def test_a_head_converted_to_a_narrower_dtype_is_checked_as_its_search_reads_it():
    """``head.half()`` (or ``.bfloat16()``, or a model with the head attached, converted
    whole) narrows the head's index and centre: on far-prototype data float16 flushed the
    gradients below its range and scored 6.5 times (distance/spread 19) to 1.6e6 times the
    score spread off the detector (on the same rounded features), bfloat16 up to 14 times;
    on tight classes float16 13 times;
    a float64 head narrowed by ``.float()`` (or its state loaded into a float32 head) alike.
    The conversion now searches sampled
    gradients as the forward does and warns, naming the way out; ordinary features convert
    quietly (the conversion's own rounding: scores within 0.2 % of the spread in float16,
    1.2 % in bfloat16, of the detector's on the same rounded features)."""
    x, y, ood, _ = far_prototype_data(10)
    det = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
    with pytest.warns(UserWarning, match=r"converted to float16, the head's index no longer "
                                         r"resolves its gradients: .* \d+ of 64 sampled .* "
                                         r"keep the head in float32 \(head.float\(\) after "
                                         r"converting the model: it scores float16 features"):
        det.as_module().half()
    far = GROOD(ood_prototype="features", progress=False).fit(*far_prototype_data(1000)[:2],
                                                              ood_features=ood)
    assert far.index_.centre is not None  # (its centre, rounded, moves every query)
    with pytest.warns(UserWarning, match="converted to bfloat16, the head's index no longer"):
        far.as_module().bfloat16()
    x, y = far_prototype_data(3e4)[:2]
    wide = GROOD(ood_prototype="features", progress=False).fit(
        x.astype(np.float64), y, ood_features=ood.astype(np.float64))
    with pytest.warns(UserWarning, match=r"converted to float32, .* keep the head in float64 "
                                         r"\(head.double\(\), and score float64 features"):
        wide.as_module().float()
    narrow = GROOD(ood_prototype="features", progress=False).fit(
        *far_prototype_data(10)[:2], ood_features=ood)
    assert narrow.index_.centre is None and wide.index_.centre is None  # (buffers alike)
    with pytest.warns(UserWarning, match=r"loaded into float32 buffers, .* \(head.double\(\) "
                                         r"before load_state_dict, and score float64"):
        narrow.as_module().load_state_dict(wide.as_module().state_dict())
    tight, labels = _tight_classes(40, 2000, d=32)
    with pytest.warns(UserWarning, match="converted to float16, the head's index no longer"):
        GROOD(progress=False).fit(tight.float(), labels).as_module().half()
    rows, classes = clustered_features(3000, 10, 64, seed=1, spread=0.3, dtype=torch.float32)
    ordinary = GROOD(progress=False).fit(rows, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dt, within in ((torch.float16, 5e-3), (torch.bfloat16, 2e-2)):
            near = (rows[:200] + 0.1).to(dt)
            want = ordinary.score_samples(near.float())
            got = ordinary.as_module().to(dt)(near)[0].float()
            assert (got - want).abs().max() < within * (want.max() - want.min())
        ordinary.as_module().to(torch.float64)  # (widening: nothing to check)


def test_gradients_whose_spread_float32_rounds_past_are_warned_of_at_the_fit():
    """Farther still (distance 180,000 times the features' spread), the centred search
    resolves the indexed gradients, but the gradient step's own float32 rounding is a sizeable
    part of the distances between them (they spread about their mean by 4e-5 of their norm):
    scores 6 % of their spread off float64's. The fit says so; float64 fits quietly."""
    x, y, ood, test = far_prototype_data(1e5)
    with pytest.warns(UserWarning, match=r"gradients spread about their mean by 4\.\de-05 of "
                                         r"their norm \(64 sampled\): float32's rounding .* "
                                         r"fit and score float64 features"):
        _, got, want = _float32_and_float64_scores(x, y, ood, test)
    assert np.abs(got - want).max() > 0.02 * np.ptp(want)


def test_a_search_that_centring_does_not_resolve_is_warned_of_at_the_fit():
    """Two tight classes on either side of the (mean) OOD prototype: the gradients point
    two ways, each nearly the same, and their mean lies between them, so a search less it
    misses them too: the fit leaves the index as built and warns (scores 17 % of their
    spread off float64's)."""
    gen = np.random.default_rng(0)
    y = gen.integers(0, 2, 600)
    side = np.where(y == 0, 5.0, -5.0)
    x = (side[:, None] * np.eye(16)[0] + gen.normal(size=(600, 16)) * 1e-4).astype(np.float32)
    test = (np.eye(16)[0] * 5 * gen.choice([-1, 1], 100)[:, None]
            + gen.normal(size=(100, 16)) * 2e-4).astype(np.float32)
    with pytest.warns(UserWarning, match=r"searched for as themselves, (\d+) of 64 sampled "
                                         r"indexed training gradients were not found .* fit "
                                         r"and score float64 features") as record:
        det = GROOD().fit(x, y)
    assert int(re.search(r"themselves, (\d+) of", str(record[0].message)).group(1)) >= 7
    assert det.index_.centre is None
    with pytest.warns(UserWarning, match=r"searched for as themselves, \d+ of 64 .* the "
                                         r"search's rounding on the index's bfloat16 copy "
                                         r".* fit without index_options storage \(the "
                                         r"bfloat16 copy rounds each gradient by up to 2\*\*-8"):
        half = GROOD(index_options={"storage": "bfloat16"}).fit(x, y)
    assert half.index_.centre is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = GROOD().fit(x.astype(np.float64), y).score_samples(test.astype(np.float64))
    assert np.abs(det.score_samples(test) - want).max() > 0.05 * np.ptp(want)


def test_a_file_whose_index_is_held_less_a_centre_is_version_3_and_refused_where_unread(
        tmp_path, monkeypatch):
    """Written as format version 3 (version 2 plus index.centre), so that a grood reading
    only versions 1 and 2 refuses it instead of searching its index unshifted; a file whose
    version and centre disagree is refused as inconsistent."""
    x, y, ood, _ = far_prototype_data(3e3)
    det = GROOD(ood_prototype="features", progress=False).fit(x, y, ood_features=ood)
    path = tmp_path / "far.safetensors"
    det.save(path)
    with monkeypatch.context() as patched:  # a grood that reads versions 1 and 2
        patched.setattr(persistence, "READABLE_VERSIONS", (1, 2))
        with pytest.raises(DetectorFileError, match=r"format version 3 \(written by grood "):
            GROOD.load(path)
    plain = GROOD(progress=False).fit(x * 3e3, y)
    plain.save(tmp_path / "plain.safetensors")
    assert persistence.describe(tmp_path / "plain.safetensors")["format_version"] == 2

    def as_version_2(meta, tensors):
        meta["format_version"] = "2"

    rewrite_detector_file(path, as_version_2)
    with pytest.raises(DetectorFileError, match=r"is inconsistent: format version 2 holds an "
                                                r"index\.centre \(only version 3 files do\)"):
        GROOD.load(path)

    def without_centre(meta, tensors):
        meta["format_version"] = "3"

    rewrite_detector_file(tmp_path / "plain.safetensors", without_centre)
    with pytest.raises(DetectorFileError, match=r"is inconsistent: format version 3 holds no "
                                                r"index\.centre"):
        GROOD.load(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_float32_scores_of_features_sharing_a_large_offset_are_as_exact_as_the_features(
        offset, backend):
    """Features sharing an offset far above their spread hold their differences in the bits
    below it: at 1e5 a float32 feature resolves 1/128 where the classes spread by 1. GROOD's
    float32 scores then differ from float64's of the same float32 inputs by what moving each
    input one unit in its last place does to float64's (bench/offset_scores.py, offsets 1e3
    to 1e6: 0.9 to 1.2 times it, 2e-5 to 2e-2 of the scores' spread; here 1.2 and 1.4 times,
    and prototypes 2 units off give 3.7 and 4.0 times it): the class sums are taken in
    float64, and a row less its OOD prototype, both near the offset, is exact in float32 (in
    the Triton kernels too). A float32 sum, or a subtraction that rounds, would add its own
    error on top. The data and the two errors are grood._bench.common.offset_errors, as the
    bench computes them."""
    if backend == "triton":
        pytest.importorskip("triton")
    own, inputs = offset_errors(offset, 600, backend)
    assert inputs > 1e-5  # (the offset's rounding is what is measured)
    assert own < 2 * inputs


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("rounded", ["bfloat16 copy", "bf16 GEMM"])
def test_a_centred_index_searched_in_half_precision_is_as_exact_as_the_rows(rounded, k):
    """Gradients held less their mean (an OOD prototype far outside the features) lie about
    the rounding of a bfloat16 copy, or of the bf16 GEMM's operands, apart, and the search's
    k + 4 candidates left out nearer rows: at distance/spread 557 scores 0.5-0.6 % of their
    spread off float64's where a search of the exact rows is 0.008-0.07 % off; k + 12 left
    them out at k = 3 (0.08 % against the exact rows' 0.02 %, held less their mean as the
    fit now holds them there). k + 20 candidates, re-ranked on the exact rows (the first k
    kept), score as the exact rows do; its head and kneighbors alike."""
    x, y, ood, test = far_prototype_data(300)
    want = GROOD(k=k, ood_prototype="features").fit(
        x.astype(np.float64), y, ood_features=ood.astype(np.float64)).score_samples(
        test.astype(np.float64))
    rows = GROOD(k=k, ood_prototype="features").fit(x, y, ood_features=ood)
    how = ({"index_options": {"storage": "bfloat16"}} if rounded == "bfloat16 copy"
           else {"precision": "bf16"})
    half = GROOD(k=k, ood_prototype="features", **how).fit(x, y, ood_features=ood)
    assert half.index_.centre is not None
    spread = np.ptp(want)
    exact = np.abs(rows.score_samples(test) - want).max()
    got = half.score_samples(test)
    assert np.abs(got - want).max() < max(2 * exact, 1e-4 * spread)
    assert np.array_equal(half.as_module()(torch.as_tensor(test))[0].numpy(), got)
    d, i = half.kneighbors(test, k)
    assert np.array_equal(-np.asarray(d)[:, k - 1], got) and np.asarray(i).shape[1] == k
