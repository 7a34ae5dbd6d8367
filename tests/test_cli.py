"""The grood command: demo at a reduced size, fit / score / eval on feature files, help."""

import csv
import importlib.util
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clustered_features

from grood import GROOD, __version__
from grood.cli import build_parser, main
from grood.metrics import (
    bootstrap_difference,
    bootstrap_mean_metrics,
    bootstrap_metrics,
    mean_of_sets,
    percentile_intervals,
    resampled_set_metrics,
)


@pytest.mark.slow
def test_demo_over_several_seeds_is_deterministic_and_writes_its_tables_and_pictures(
        tmp_path, capsys):
    """The demo at a reduced size (one epoch, 20 noise images), three runs in all: seeds 0
    and 1 (their mean ± std table, a folder each, other metrics), then seed 0 alone again,
    from another state of torch's global generator: its table of every method, its pictures,
    its results file, and the metrics of the first seed 0, exactly."""
    rc = main(["demo", "--out", str(tmp_path / "seeds"), "--epochs", "1", "--n-noise", "20",
               "--seeds", "2", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seeds 0..1" in text and "| GROOD" in text and " ± " in text
    seeds = [json.loads((tmp_path / "seeds" / f"seed{s}" / "results.json").read_text())
             for s in (0, 1)]
    assert (tmp_path / "seeds" / "seed1" / "roc.png").is_file()
    assert seeds[0]["metrics"] != seeds[1]["metrics"]
    # Seed 0 again, one run: the run seeds the global generator for itself and gives the
    # caller's state back.
    torch.manual_seed(1234)
    torch.rand(7)
    state = torch.random.get_rng_state()
    out = tmp_path / "again"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--n-noise", "20", "--quiet"]) == 0
    assert torch.equal(torch.random.get_rng_state(), state)
    text = capsys.readouterr().out
    for method in ("GROOD (mixup)", "GROOD (noise)", "GROOD (mean)", "MSP", "MaxLogit",
                   "Energy", "GEN", "KNN (k=10)", "Mahalanobis", "RMD", "ViM (dim=64)",
                   "ReAct (p90)",
                   "GradNorm", "ASH-S (p65)", "KLM", "SHE", "DICE (p90)", "fDBD", "SCALE (p85)",
                   "NNGuide (k=10)", "ODIN (T=1000, eps=0.0014)", "RankFeat (pool)"):
        assert f"| {method}" in text
    assert "near AUROC" in text and "far FPR@95" in text
    for png in ("roc.png", "score_histograms.png", "differences.png", "neighbours.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == seeds[0]["metrics"]
    assert results["sizes"]["noise (far-OOD)"] == 20
    from datetime import date

    from grood.environment import environment

    assert results["environment"] == environment() and results["date"] == str(date.today())
    auroc = results["metrics"]["GROOD (mixup)"]["noise (far-OOD)"]["auroc"]
    assert 0.5 < auroc <= 1.0


def test_demo_training_leaves_the_callers_global_generator_alone():
    from grood.demo import DemoConfig, train_classifier

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=gen), torch.arange(20) % 6
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    nets = [train_classifier(x, y, DemoConfig(epochs=1, progress=False)) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)


def _write(path, **arrays):
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    elif path.suffix == ".pt":
        torch.save(arrays, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(arrays, str(path))
    else:
        np.save(path, arrays["features"].numpy())


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_fit_score_eval_round_trip(tmp_path, capsys, suffix):
    x, y = clustered_features(90, 3, 8, seed=0, spread=0.2, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 3).float() * 4
    train = tmp_path / f"train{suffix}"
    _write(train, features=x[:60], labels=y[:60], logits=logits[:60])
    test = tmp_path / f"test{suffix}"
    _write(test, features=x[60:], labels=y[60:])
    ood = tmp_path / "ood.npy"
    _write(ood, features=torch.rand(25, 8) * 4 + 2)
    det_path = tmp_path / "det.safetensors"

    assert main(["fit", str(train), "-o", str(det_path), "-k", "2"]) == 0
    assert "indexed 60 gradients" in capsys.readouterr().out

    assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "s.npy")]) == 0
    expected = GROOD.load(det_path).score_samples(x[60:].numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), expected)
    assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as out:  # no threshold: scores and classes
        assert set(out.files) == {"score", "pred"}
        np.testing.assert_array_equal(out["score"], expected)
        np.testing.assert_array_equal(out["pred"], GROOD.load(det_path).predict(x[60:].numpy()))
    assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "s.csv")]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "index,score,pred" and len(rows) == 31
    assert np.float32(float(rows[1].split(",")[1])) == expected[0]  # exactly, as float32
    # --neighbours: the nearest training rows beside the same scores (k = 2 > 1 neighbour).
    dist, near = GROOD.load(det_path).kneighbors(x[60:].numpy(), 3)
    for n in (1, 3):
        assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "n.npz"),
                     "--neighbours", str(n)]) == 0
        with np.load(tmp_path / "n.npz") as out:
            assert set(out.files) == {"score", "pred", "neighbour_distance", "neighbour_row"}
            np.testing.assert_array_equal(out["score"], expected)
            np.testing.assert_array_equal(out["neighbour_row"], near[:, :n])
            np.testing.assert_array_equal(out["neighbour_distance"], dist[:, :n])
    assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "n.csv"),
                 "--neighbours", "2"]) == 0
    rows = (tmp_path / "n.csv").read_text().splitlines()
    assert rows[0] == ("index,score,pred,neighbour_row_1,neighbour_row_2,"
                       "neighbour_distance_1,neighbour_distance_2")
    first = rows[1].split(",")
    assert [int(v) for v in first[3:5]] == near[0, :2].tolist()
    np.testing.assert_array_equal(np.float32([float(v) for v in first[5:]]), dist[0, :2])
    capsys.readouterr()
    assert main(["score", str(det_path), str(test), "-o", str(tmp_path / "n.npy"),
                 "--neighbours", "2"]) == 2
    assert "holds the scores alone" in capsys.readouterr().err

    assert main(["eval", str(det_path), "--id", str(test), "--ood", str(ood),
                 "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert f"| {ood} |" in text and "nearest-prototype accuracy" in text
    metrics = json.loads((tmp_path / "m.json").read_text())[str(ood)]
    assert set(metrics) == {"n_id", "id_accuracy", "n_ood", "auroc", "fpr95", "aupr_in",
                            "aupr_out"}  # no logits in the ID file: no id_logits_accuracy
    assert (metrics["n_id"], metrics["n_ood"]) == (30, 25)
    accuracy = float(np.mean(GROOD.load(det_path).predict(x[60:].numpy()) == y[60:].numpy()))
    assert metrics["id_accuracy"] == accuracy
    assert f"nearest-prototype accuracy {100 * accuracy:.2f} %" in text


def test_eval_draws_roc_curves_and_histograms(tmp_path, capsys):
    """``grood eval --plots DIR`` writes two PNGs (the folder made if missing); a folder that
    is a file is refused before any scoring."""
    pytest.importorskip("matplotlib")
    x, y = clustered_features(60, 3, 8, seed=0, spread=0.2, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x[:40], labels=y[:40])
    _write(tmp_path / "test.npy", features=x[40:])
    oods = [tmp_path / f"ood{i}.npy" for i in range(4)]  # four panels: two rows of ROC curves
    for i, path in enumerate(oods):
        _write(path, features=torch.rand(15, 8) * (i + 2))
    det = tmp_path / "det.safetensors"
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det)]) == 0
    args = ["eval", str(det), "--id", str(tmp_path / "test.npy"), "--ood", *map(str, oods)]
    assert main([*args, "--plots", str(tmp_path / "figs" / "run1")]) == 0
    assert "(ROC curves)" in capsys.readouterr().out
    for name in ("roc.png", "histograms.png"):
        assert (tmp_path / "figs" / "run1" / name).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "figs" / "run1" / "differences.png").exists()  # no baselines
    assert main([*args, "--plots", str(tmp_path / "test.npy")]) == 2
    assert "--plots takes a folder" in capsys.readouterr().err


def test_eval_says_under_its_tables_what_they_were_taken_with(tmp_path, capsys):
    """A table pasted elsewhere keeps the detector's settings, backends, device, versions and
    day; a faiss index searches with faiss, so no knn backend is named for it."""
    from datetime import date

    from safetensors import safe_open

    from grood.environment import kernel_sources

    x, y = clustered_features(60, 3, 8, seed=0, spread=0.2, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x[:40], labels=y[:40])
    _write(tmp_path / "test.npy", features=x[40:])
    _write(tmp_path / "ood.npy", features=torch.rand(15, 8) * 3)
    tail = (f", cpu · grood {__version__} (kernels {kernel_sources()}), torch "
            f"{torch.__version__} · {date.today().isoformat()}\n")
    for index, words in (("exact", "exact index, precision tf32; ncp_gradient on torch, knn "
                                   "on torch"),
                         ("faiss-ivf", "faiss-ivf index (nprobe 4), precision tf32; "
                                       "ncp_gradient on torch")):
        if index != "exact" and importlib.util.find_spec("faiss") is None:
            continue
        det = tmp_path / f"{index}.safetensors"
        assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det), "--index", index]) == 0
        metrics = tmp_path / f"{index}.json"
        assert main(["eval", str(det), "--id", str(tmp_path / "test.npy"), "--ood",
                     str(tmp_path / "ood.npy"), "--precision", "tf32", "--json",
                     str(metrics), "--baselines", "knn", "--knn-k", "5", "--train",
                     str(tmp_path / "train.npz")]) == 0
        out = capsys.readouterr().out
        assert f"\n\nGROOD: OOD prototype 'mean', k=1, {words}{tail}" in out, out
        # The JSON says it too, and names the detector by its digest and the inputs by path.
        saved = json.loads(metrics.read_text())
        assert list(saved) == [str(tmp_path / "ood.npy"), "taken_with"]
        with safe_open(str(det), framework="pt") as f:
            digest = f.metadata()["digest"]
        assert saved["taken_with"] == {
            "detector": str(det), "digest": digest, "id": str(tmp_path / "test.npy"),
            "ood_prototype": "mean", "k": 1, "index": index,
            "nprobe": None if index == "exact" else 4, "precision": "tf32",
            "backends": ({"ncp_gradient": "torch", "knn": "torch"} if index == "exact"
                         else {"ncp_gradient": "torch"}),
            "device": "cpu", "bootstrap": None, "baselines": ["knn"], "knn_k": 5,
            "train": str(tmp_path / "train.npz"), "grood": __version__,
            "kernels": kernel_sources(), "torch": torch.__version__,
            "date": date.today().isoformat()}


def test_fit_reads_several_training_files_as_one_set(tmp_path, capsys):
    """Shards of one extraction (any of the formats, one of them empty) fit the detector the
    same file concatenated fits: prototypes, index, recorded rows (numbered through the files
    in the order given) and scores; a batch never spans two files."""
    x, y = clustered_features(150, 3, 8, seed=2, spread=0.3, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 3).float() * 4
    logits[::7] = logits[::7].roll(1, dims=1)  # rows the logits get wrong are not indexed
    cuts = [0, 61, 61, 62, 150]  # an empty file, and a file of one row
    names = ["a.npz", "b.npz", "c.pt", "d.safetensors"]
    for name, r0, r1 in zip(names, cuts[:-1], cuts[1:], strict=True):
        _write(tmp_path / name, features=x[r0:r1], labels=y[r0:r1], logits=logits[r0:r1])
    _write(tmp_path / "all.npz", features=x, labels=y, logits=logits)
    files = [str(tmp_path / n) for n in names]
    for extra, by in (([], "the logits"), (["--ignore-logits"], "the nearest prototype")):
        capsys.readouterr()
        assert main(["fit", *files, "-o", str(tmp_path / "m.safetensors"), "--batch-size",
                     "16", *extra]) == 0
        assert capsys.readouterr().out.startswith("fitted on 150 samples from 4 files, 3 "
                                                  "classes, dimension 8; indexed ")
        assert main(["fit", str(tmp_path / "all.npz"), "-o", str(tmp_path / "s.safetensors"),
                     *extra]) == 0
        assert f"classified correctly by {by})" in capsys.readouterr().out
        multi, single = (GROOD.load(tmp_path / f) for f in ("m.safetensors", "s.safetensors"))
        for name in ("class_prototypes_", "ood_prototype_", "indexed_rows_"):
            assert torch.equal(getattr(multi, name), getattr(single, name)), name
        assert torch.equal(multi.index_.vectors, single.index_.vectors)
        q = x[::5] + 0.05
        assert torch.equal(multi.score_samples(q), single.score_samples(q))
    from grood.io import TrainingFiles

    whole = TrainingFiles(files, batch_size=16)
    batches = [b[0].shape[0] for b in whole]
    assert batches == [16, 16, 16, 13, 1, 16, 16, 16, 16, 16, 8]  # cut at every file's end
    assert len(whole) == len(batches)  # (the fit's progress counts them)
    # Ranks read contiguous blocks that together are every row, once, in order.
    blocks = [torch.cat([b[0] for b in TrainingFiles(files, batch_size=16, rank=r, world=3)])
              for r in range(3)]
    assert [len(b) for b in blocks] == [50, 50, 50] and torch.equal(torch.cat(blocks), x)


@pytest.mark.parametrize("second, said", [
    ("nan", "b.npz: features contains NaN or Inf in row(s) 17"),
    ("wide", "the training files differ: a.npz has features of width 8, b.npz has features "
             "of width 9"),
    ("float64", "the training files differ: a.npz has float32 features, b.npz has float64 "
                "features (float64 features are computed in float64"),
    ("logits", "the training files differ: a.npz has no logits, b.npz has logits of width 3 "
               "(logits decide which rows are indexed"),
    ("no labels", "b.npz has no 'labels' array; fitting needs class labels"),
    ("label", "b.npz: labels must hold integer class ids, got dtype float32"),
    ("twice", "a training file is named more than once: "),
    ("huge label", "b.npz: labels holds class id 1000000000000, but there are only 60 samples"),
])
def test_fit_of_several_files_names_the_file_at_fault(tmp_path, capsys, second, said):
    """Checked file by file before any work, or batch by batch as read: the error names the
    file, and a row by its number in that file."""
    x, y = clustered_features(60, 3, 8, seed=2, dtype=torch.float32)
    _write(tmp_path / "a.npz", features=x[:30], labels=y[:30])
    xb, yb = x[30:].clone(), y[30:]
    bad = xb.clone()
    bad[17, 2] = float("nan")
    arrays = {"nan": {"features": bad, "labels": yb},
              "wide": {"features": torch.ones(30, 9), "labels": yb},
              "float64": {"features": xb.double(), "labels": yb},
              "logits": {"features": xb, "labels": yb, "logits": torch.zeros(30, 3)},
              "no labels": {"features": xb},
              "label": {"features": xb, "labels": yb.float()},
              "twice": {"features": xb, "labels": yb},
              "huge label": {"features": xb, "labels": yb.clone().index_fill_(0, torch.tensor(
                  [4]), 10**12)}}[second]
    _write(tmp_path / "b.npz", **arrays)
    files = [str(tmp_path / "a.npz"), str(tmp_path / ("a.npz" if second == "twice" else "b.npz"))]
    capsys.readouterr()
    assert main(["fit", *files, "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert said.replace("a.npz", str(tmp_path / "a.npz")).replace(
        "b.npz", str(tmp_path / "b.npz")) in err, err
    assert not (tmp_path / "m.safetensors").exists()
    if second == "float64":  # float16 beside float32 is computed in float32 alike
        _write(tmp_path / "b.npz", features=xb.half(), labels=yb)
        assert main(["fit", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o",
                     str(tmp_path / "m.safetensors")]) == 0


def test_fit_with_ood_features_file(tmp_path, capsys):
    x, y = clustered_features(30, 2, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "t.npz", features=x, labels=y)
    _write(tmp_path / "o.npy", features=torch.rand(7, 4))
    rc = main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / "d.safetensors"),
               "--ood-features", str(tmp_path / "o.npy")])
    assert rc == 0
    det = GROOD.load(tmp_path / "d.safetensors")
    assert det.ood_source_.name == "features"
    np.testing.assert_allclose(det.ood_prototype_.numpy(), np.load(tmp_path / "o.npy").mean(0),
                               rtol=1e-6)
    capsys.readouterr()
    out = ["-o", str(tmp_path / "e.safetensors")]
    assert main(["fit", str(tmp_path / "t.npz"), *out, "--ood-prototype", "features"]) == 2
    assert "--ood-prototype features needs --ood-features FILE" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "t.npz"), *out, "--ood-prototype", "mean",
                 "--ood-features", str(tmp_path / "o.npy")]) == 2
    assert "--ood-features is read only with --ood-prototype features" in \
        capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    x, _ = clustered_features(10, 2, 4, dtype=torch.float32)
    _write(tmp_path / "nolabels.npz", features=x)
    rc = main(["fit", str(tmp_path / "nolabels.npz"), "-o", str(tmp_path / "d.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no 'labels' array" in err
    assert "np.savez(path, features=X, labels=y)" in err  # how to write one that works
    rc = main(["score", str(tmp_path / "missing.safetensors"), str(tmp_path / "nolabels.npz"),
               "-o", str(tmp_path / "s.npy")])
    assert rc == 2
    assert "no detector file" in capsys.readouterr().err
    np.savez(tmp_path / "wrongkey.npz", feats=x.numpy())
    rc = main(["fit", str(tmp_path / "wrongkey.npz"), "-o", str(tmp_path / "d.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no 'features' array; it holds ['feats']" in err
    assert "np.savez(path, features=X, labels=y)" in err


def test_distributed_outside_torchrun_names_the_command_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    x, y = clustered_features(30, 3, 4, seed=3, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    for command in (["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "d.json")],
                    ["score", det, str(tmp_path / "train.npz"), "-o", str(tmp_path / "s.csv")]):
        assert main([*command, "--distributed"]) == 2
        assert (f"--distributed runs under torchrun (e.g. torchrun --nproc-per-node 4 -m grood "
                f"{command[0]} --distributed ...)") in capsys.readouterr().err


def test_eval_names_the_file_an_error_comes_from(tmp_path, capsys):
    """eval reads several feature files: a bad one is named, and ID labels or logits the
    accuracy cannot use are refused (labels [N, 1] broadcast against the predictions into an
    N x N accuracy; ids out of range or logits of another width were counted as wrong)."""
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    _write(tmp_path / "id.npz", features=x[:20], labels=y[:20])
    _write(tmp_path / "far.npz", features=x[:5] + 9)
    bad = x[:5].clone()
    bad[2, 1] = float("nan")
    _write(tmp_path / "bad.npz", features=bad)
    capsys.readouterr()
    rc = main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "far.npz"),
               str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'bad.npz'}: features contains NaN or Inf in row(s) 2" in err
    # ID labels and logits the accuracy (and the logits baselines) could not mean anything
    # with are refused before any scoring, by file: a column, float ids, an id past the
    # detector's classes, OpenOOD's -1 for OOD rows, logits of another width.
    features = x[:20].numpy()
    labels = y[:20].numpy()
    for bad_arrays, said in (
            ({"labels": labels[:, None]}, "labels must be a 1-D array, got shape (20, 1); pass "
                                          "a column of class ids as labels.reshape(-1)"),
            ({"labels": labels.astype(np.float32)},
             "labels must hold integer class ids, got dtype float32"),
            ({"labels": np.where(np.arange(20) == 4, 3, labels)},
             "labels holds class id 3, out of range for 3 classes (the detector's)"),
            ({"labels": np.where(np.arange(20) == 4, -1, labels)}, "labels must be >= 0, found -1"),
            ({"labels": labels[:19]}, "labels has 19 entries but features have 20 rows"),
            ({"logits": np.zeros((20, 2), np.float32)},
             "'logits' has 2 columns but the detector has 3 classes: these are not the logits "
             "of the classifier it was fitted for"),
            ({"logits": np.zeros((19, 3), np.float32)},
             "'logits' has shape (19, 3), expected (20, C) (one row per feature row)")):
        np.savez(tmp_path / "id_bad.npz", features=features, **bad_arrays)
        rc = main(["eval", det, "--id", str(tmp_path / "id_bad.npz"), "--ood",
                   str(tmp_path / "far.npz")])
        assert rc == 2
        assert f"grood eval: error: {tmp_path / 'id_bad.npz'}: {said}" in capsys.readouterr().err
    # More logits columns than classes: a classifier over a superset of them, accepted.
    np.savez(tmp_path / "id_wide.npz", features=features, labels=labels,
             logits=np.eye(5, dtype=np.float32)[labels])
    assert main(["eval", det, "--id", str(tmp_path / "id_wide.npz"), "--ood",
                 str(tmp_path / "far.npz")]) == 0
    assert ", the logits' 100.00 %" in capsys.readouterr().out


def test_fit_and_score_name_the_file_a_bad_array_comes_from(tmp_path, capsys):
    """fit reads a training file and maybe an OOD file, score a feature file: an error about
    an array names its file (as eval and calibrate do), and only that file; errors about
    something else (k, the detector) carry no file name."""
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    bad = x[:9].clone()
    bad[5, 0] = float("inf")
    _write(tmp_path / "bad.npz", features=bad)
    _write(tmp_path / "narrow.npz", features=x[:9, :3])
    _write(tmp_path / "train_bad.npz", features=torch.cat([x[:20], bad]),
           labels=torch.cat([y[:20], y[:9]]))
    _write(tmp_path / "floats.npz", features=x, labels=y.float())
    capsys.readouterr()
    out = ["-o", str(tmp_path / "d2.safetensors")]
    for argv, said in (
            (["score", det, str(tmp_path / "bad.npz"), "-o", str(tmp_path / "s.npy")],
             f"{tmp_path / 'bad.npz'}: features contains NaN or Inf in row(s) 5"),
            (["score", det, str(tmp_path / "narrow.npz"), "-o", str(tmp_path / "s.npz"),
              "--neighbours", "2"],
             f"{tmp_path / 'narrow.npz'}: features has 3 columns but the detector was fitted "
             "on 4 features"),
            (["fit", str(tmp_path / "train_bad.npz"), *out],
             f"{tmp_path / 'train_bad.npz'}: features contains NaN or Inf in row(s) 25"),
            (["fit", str(tmp_path / "floats.npz"), *out],
             f"{tmp_path / 'floats.npz'}: labels must hold integer class ids"),
            (["fit", str(tmp_path / "train.npz"), "--ood-features", str(tmp_path / "narrow.npz"),
              *out], f"{tmp_path / 'narrow.npz'}: ood_features has 3 columns but the training "
                     "features have 4"),
            (["fit", str(tmp_path / "train.npz"), "-k", "500", *out],
             "k=500 but only")):
        assert main(argv) == 2
        assert f"grood {argv[0]}: error: {said}" in capsys.readouterr().err, argv


def test_eval_takes_repeated_ood_flags_and_refuses_a_set_named_twice(tmp_path, capsys):
    """``--ood a --ood b`` evaluates both (argparse's default action kept only b, silently);
    the same file named twice (as given or by another path) is refused."""
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    _write(tmp_path / "id.npz", features=x[:20])
    _write(tmp_path / "a.npz", features=x[:7] + 9)
    _write(tmp_path / "b.npz", features=x[40:45] + 0.3)  # near the ID rows: no clean split
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "a.npz"),
                 "--ood", str(tmp_path / "b.npz"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"| {tmp_path / 'a.npz'} | 7 " in table and f"| {tmp_path / 'b.npz'} | 5 " in table
    metrics = json.loads(out.read_text())
    assert list(metrics) == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "mean of 2 sets",
                             "taken_with"]
    # OpenOOD's summary row: each metric averaged over the sets, unweighted.
    mean_row = [line for line in table.splitlines() if line.startswith("| mean of 2 sets ")]
    assert len(mean_row) == 1
    cells = [c.strip() for c in mean_row[0].split("|")[3:-1]]
    a, b = metrics[str(tmp_path / "a.npz")], metrics[str(tmp_path / "b.npz")]
    keys = ("auroc", "fpr95", "aupr_in", "aupr_out")
    assert cells == [f"{100 * (a[k] + b[k]) / 2:.2f}" for k in keys]
    assert [metrics["mean of 2 sets"][k] for k in keys] == [(a[k] + b[k]) / 2 for k in keys]
    # --bootstrap: each metric's 95 % interval in the cells and the JSON, seeded (seed 0).
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "b.npz"),
                 "--bootstrap", "100", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    got = json.loads(out.read_text())[str(tmp_path / "b.npz")]
    loaded = GROOD.load(det)
    ci = bootstrap_metrics(loaded.score_samples(x[:20].numpy()),
                           loaded.score_samples(x[40:45].numpy() + 0.3), n_boot=100)
    assert got["ci95"] == {k: list(v) for k, v in ci.items()}
    lo, hi = ci["auroc"]
    assert f"| {100 * got['auroc']:.2f} ({100 * lo:.2f}–{100 * hi:.2f}) |" in table
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "b.npz"),
                 "--bootstrap", "50"]) == 2
    assert "a percentile interval needs at least 100 resamples" in capsys.readouterr().err
    again = tmp_path / "sub" / ".." / "a.npz"
    (tmp_path / "sub").mkdir()
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "a.npz"),
                 str(tmp_path / "b.npz"), "--ood", str(again)]) == 2
    assert (f"an OOD file is named more than once (by --ood, --near and --far together): "
            f"{again}") in capsys.readouterr().err
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--near", str(tmp_path / "a.npz"),
                 "--far", str(again)]) == 2
    assert f"more than once (by --ood, --near and --far together): {again}" in (
        capsys.readouterr().err)
    assert main(["eval", det, "--id", str(tmp_path / "id.npz")]) == 2
    assert "give the OOD feature files: --ood FILE ..., or OpenOOD's groups" in (
        capsys.readouterr().err)


def test_eval_bootstrap_over_several_sets_resamples_the_id_set_once_for_all(tmp_path, capsys):
    """--bootstrap under several OOD sets: each method is resampled once for all of them, the
    ID set drawn once per resample (grood.metrics.resampled_set_metrics), so the mean row
    carries the interval of the mean (bootstrap_mean_metrics) and, with --baselines, GROOD
    minus each baseline on the mean too, paired."""
    from grood import KNN

    x, y = clustered_features(90, 3, 6, seed=5, spread=0.5, dtype=torch.float32)
    noise = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    _write(tmp_path / "id.npz", features=x[60:])
    _write(tmp_path / "near.npz", features=x[:25] + 1.5 * noise[:25])
    _write(tmp_path / "far.npz", features=3 * noise[25:])
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    sets = [str(tmp_path / "near.npz"), str(tmp_path / "far.npz")]
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", *sets, "--bootstrap",
                 "100", "--baselines", "knn", "--knn-k", "2", "--train",
                 str(tmp_path / "train.npz"), "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    got = json.loads((tmp_path / "m.json").read_text())
    grood_det, knn = GROOD.load(det), KNN(k=2).fit(x[:60].numpy())
    ood = [x[:25] + 1.5 * noise[:25], 3 * noise[25:]]
    grood_id, knn_id = (m.score_samples(x[60:].numpy()) for m in (grood_det, knn))
    grood_ood, knn_ood = ([m.score_samples(v.numpy()) for v in ood] for m in (grood_det, knn))
    per_grood = resampled_set_metrics(grood_id, grood_ood, n_boot=100)
    per_knn = resampled_set_metrics(knn_id, knn_ood, n_boot=100)
    for path, g, k in zip(sets, per_grood, per_knn, strict=True):
        assert got[path]["ci95"] == {m: list(v) for m, v in percentile_intervals(g).items()}
        assert got[path]["baselines"]["KNN (k=2)"]["ci95"] == {
            m: list(v) for m, v in percentile_intervals(k).items()}
    mean_ci = bootstrap_mean_metrics(grood_id, grood_ood, n_boot=100)
    mean_auroc = (got[sets[0]]["auroc"] + got[sets[1]]["auroc"]) / 2
    lo, hi = mean_ci["auroc"]
    mean_row = [line for line in text.splitlines() if line.startswith("| mean of 2 sets ")]
    assert len(mean_row) == 2  # the metrics' table and the differences'
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in mean_row]
    assert cells[0][2:4] == ["GROOD", f"{100 * mean_auroc:.2f} ({100 * lo:.2f}–{100 * hi:.2f})"]
    diff = percentile_intervals({m: mean_of_sets(per_grood)[m] - mean_of_sets(per_knn)[m]
                                 for m in per_grood[0]})
    knn_mean = (got[sets[0]]["baselines"]["KNN (k=2)"]["auroc"]
                + got[sets[1]]["baselines"]["KNN (k=2)"]["auroc"]) / 2
    lo, hi = diff["auroc"]
    assert cells[1][1:3] == ["KNN (k=2)", f"{100 * (mean_auroc - knn_mean):+.2f} "
                                          f"({100 * lo:+.2f} to {100 * hi:+.2f})"]
    # the files, then their mean, then what they were taken with
    assert list(got) == [*sets, "mean of 2 sets", "taken_with"]
    assert got["taken_with"]["bootstrap"] == 100
    mean = got["mean of 2 sets"]
    assert mean["mean_of"] == sets and mean["auroc"] == pytest.approx(mean_auroc, abs=1e-15)
    assert mean["ci95"]["auroc"] == pytest.approx(list(mean_ci["auroc"]), abs=1e-15)
    assert mean["baselines"]["KNN (k=2)"]["auroc"] == pytest.approx(knn_mean, abs=1e-15)
    assert mean["baselines"]["KNN (k=2)"]["grood_minus_ci95"]["auroc"] == pytest.approx(
        [lo, hi], abs=1e-15)
    if find_spec("matplotlib") is not None:  # --plots: the differences drawn as well
        assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", *sets,
                     "--bootstrap", "100", "--baselines", "knn", "--knn-k", "2", "--train",
                     str(tmp_path / "train.npz"), "--plots", str(tmp_path / "figs")]) == 0
        assert "differences.png (GROOD minus each baseline)" in capsys.readouterr().out
        assert (tmp_path / "figs" / "differences.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_summarises_near_and_far_ood_groups_as_openood(tmp_path, capsys, monkeypatch):
    """--near and --far: OpenOOD's two summaries, each group's files then its mean (with
    --bootstrap, the interval of the group's mean from the resamples of every file drawn
    together), the files marked by group in the JSON; a group of one file has no mean row."""
    x, y = clustered_features(90, 3, 6, seed=7, spread=0.5, dtype=torch.float32)
    noise = torch.randn(80, 6, generator=torch.Generator().manual_seed(3))
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    _write(tmp_path / "id.npz", features=x[60:])
    near = [x[:20] + 1.2 * noise[:20], x[20:40] + 1.6 * noise[20:40]]
    far = [4 * noise[40:60], 6 * noise[60:]]
    files = {f"n{i}.npz": v for i, v in enumerate(near)} | {
        f"f{i}.npz": v for i, v in enumerate(far)}
    for name, v in files.items():
        _write(tmp_path / name, features=v)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the files by their names, as the table shows them
    assert main(["eval", det, "--id", "id.npz", "--far", "f0.npz", "f1.npz", "--near",
                 "n0.npz", "n1.npz", "--bootstrap", "100", "--json", "m.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:]
    assert labels == ["n0.npz", "n1.npz", "near-OOD mean of 2 sets", "f0.npz", "f1.npz",
                      "far-OOD mean of 2 sets"]
    got = json.loads((tmp_path / "m.json").read_text())
    assert [got[f]["group"] for f in ("n0.npz", "n1.npz", "f0.npz", "f1.npz")] == [
        "near", "near", "far", "far"]
    loaded = GROOD.load(det)
    per = resampled_set_metrics(loaded.score_samples(x[60:].numpy()),
                                [loaded.score_samples(v.numpy()) for v in (*near, *far)],
                                n_boot=100)
    for row, members in ((2, per[:2]), (5, per[2:])):
        lo, hi = percentile_intervals(mean_of_sets(members))["auroc"]
        sets = ("n0.npz", "n1.npz") if row == 2 else ("f0.npz", "f1.npz")
        mean = sum(got[f]["auroc"] for f in sets) / 2
        row_line = [line for line in lines if line.startswith("| ")][1 + row]
        assert f"{100 * mean:.2f} ({100 * lo:.2f}–{100 * hi:.2f})" in row_line
        # The JSON has the mean row too, under its label, with the same interval.
        entry = got[labels[row]]
        assert entry["mean_of"] == list(sets) and entry["group"] == got[sets[0]]["group"]
        assert entry["auroc"] == pytest.approx(mean, abs=1e-15)
        assert entry["ci95"]["auroc"] == pytest.approx([lo, hi], abs=1e-15)
        assert entry["n_id"] == 30 and "n_ood" not in entry
    assert list(got) == [*labels, "taken_with"]  # the table's order
    # One far file: no far-OOD mean; --ood beside the groups has its own mean.
    assert main(["eval", det, "--id", "id.npz", "--near", "n0.npz", "n1.npz", "--far",
                 "f0.npz", "--ood", "f1.npz", "id.npz", "--json", "m.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split("|")[1].strip() for line in lines if line.startswith("| ")][1:]
    assert labels == ["n0.npz", "n1.npz", "near-OOD mean of 2 sets", "f0.npz", "f1.npz",
                      "id.npz", "OOD mean of 2 sets"]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["f0.npz"]["group"] == "far" and "group" not in got["f1.npz"]
    assert list(got) == [*labels, "taken_with"]
    assert got["OOD mean of 2 sets"]["mean_of"] == ["f1.npz", "id.npz"]
    assert "group" not in got["OOD mean of 2 sets"]
    # A file spelled like a mean row's label would share its row and its JSON key: refused
    # before anything is read.
    assert main(["eval", det, "--id", "id.npz", "--near", "n0.npz", "n1.npz", "--far",
                 "near-OOD mean of 2 sets", "--json", "m.json"]) == 2
    assert ("an OOD set is named like a mean row ('near-OOD mean of 2 sets'); name it another "
            "way (a path, e.g. with ./ in front)") in capsys.readouterr().err


def test_eval_writes_openood_csv(tmp_path, capsys, monkeypatch):
    """--csv: OpenOOD's table (its ood.csv): a row per file and per group mean, named nearood,
    farood or ood, FPR@95 / AUROC / AUPR_IN / AUPR_OUT in percent from the same metrics as
    the JSON, ACC the ID file's nearest-prototype accuracy; with --baselines a method column,
    a row per method, MSP's and Energy's ACC the logits' accuracy. --csv and --json naming
    one file is refused before any work."""
    x, y = clustered_features(150, 3, 6, seed=8, spread=0.5, dtype=torch.float32)
    noise = torch.randn(60, 6, generator=torch.Generator().manual_seed(4))
    logits = torch.randn(90, 3, generator=torch.Generator().manual_seed(5))
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    _write(tmp_path / "id.npz", features=x[60:], labels=y[60:], logits=logits)
    for i in range(3):
        _write(tmp_path / f"o{i}.npz", features=(2 + i) * noise[20 * i:20 * (i + 1)],
               logits=logits[:20])
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", det, "--id", "id.npz", "--near", "o0.npz", "o1.npz", "--far",
                 "o2.npz", "--json", "m.json", "--csv", "ood.csv"]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    with open(tmp_path / "ood.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert [row[0] for row in table[1:]] == ["o0.npz", "o1.npz", "nearood", "o2.npz"]
    for row, key in zip(table[1:], list(got)[:-1], strict=True):  # (then "taken_with")
        m = got[key]
        assert [float(v) for v in row[1:]] == pytest.approx(
            [100 * m[k] for k in ("fpr95", "auroc", "aupr_in", "aupr_out", "id_accuracy")],
            abs=1e-4)
    assert main(["eval", det, "--id", "id.npz", "--ood", "o0.npz", "o1.npz", "--baselines",
                 "msp", "energy", "--json", "m.json", "--csv", "ood.csv"]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    with open(tmp_path / "ood.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:2] == ["dataset", "method"]
    assert [row[:2] for row in table[1:]] == [[name, method] for name in ("o0.npz", "o1.npz",
                                                                         "ood")
                                              for method in ("GROOD", "MSP", "Energy")]
    for row in table[1:]:
        m = got[row[0] if row[0] != "ood" else "mean of 2 sets"]
        m = m if row[1] == "GROOD" else m["baselines"][row[1]]
        assert float(row[3]) == pytest.approx(100 * m["auroc"], abs=1e-4)
        assert float(row[6]) == pytest.approx(100 * m["id_accuracy"], abs=1e-4)
        if row[1] != "GROOD":
            assert m["id_accuracy"] == got["o0.npz"]["id_logits_accuracy"]
    capsys.readouterr()
    assert main(["eval", det, "--id", "id.npz", "--ood", "o0.npz", "--csv", "x.csv", "--json",
                 "x.csv"]) == 2
    assert "--json and --csv name the same file (x.csv)" in capsys.readouterr().err


def test_eval_warns_where_a_file_holds_training_rows(tmp_path, capsys):
    """An ID file that is (part of) the training set scores as high as scores get and inflates
    the metrics without a word: eval warns, as calibrate does, naming the file and how many of
    its rows equal indexed training rows (an OOD file with them, the other way); held-out
    files get no warning."""
    x, y = clustered_features(90, 3, 6, seed=4, spread=0.5, dtype=torch.float32)
    train, held_out, ood = (str(tmp_path / f) for f in ("train.npz", "id.npz", "ood.npz"))
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    _write(tmp_path / "id.npz", features=x[60:])
    _write(tmp_path / "ood.npz",
           features=4 * torch.randn(20, 6, generator=torch.Generator().manual_seed(0)))
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", train, "-o", det]) == 0
    capsys.readouterr()
    assert main(["eval", det, "--id", held_out, "--ood", ood]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["eval", det, "--id", train, "--ood", ood, train]) == 0
    err = capsys.readouterr().err
    indexed = GROOD.load(det).index_.ntotal  # the training rows behind the index
    assert indexed > 0.01 * 60
    said = (f"grood eval: warning: {train}: {indexed} of its 60 rows equal indexed training "
            "rows (an indexed gradient at distance 0 up to rounding, so they score 0, the "
            "highest score): ")
    assert said + "is it (part of) the training set?" in err
    assert said + "they score as training samples do" in err


def test_eval_warns_on_the_ood_set_the_detector_was_fitted_with(tmp_path, capsys):
    """An OOD file that repeats rows the OOD prototype was averaged from (--ood-features) has
    optimistic metrics: eval warns, naming it and the count, whatever their dtype (float64,
    float16) or row order, also for a file that holds only part of them; another set from the
    same distribution, and any set under another OOD prototype, get no warning. grood info
    says how many rows were fingerprinted."""
    x, y = clustered_features(90, 3, 6, seed=6, spread=0.5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    fit_set, other = (2 * torch.randn(40, 6, generator=gen) + 1 for _ in range(2))
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    _write(tmp_path / "id.npz", features=x[60:])
    _write(tmp_path / "val_ood.npz", features=fit_set)
    np.savez(tmp_path / "same64.npz", features=fit_set.flip(0).double().numpy())
    np.savez(tmp_path / "half16.npz", features=torch.cat([fit_set[:20], other[20:]]).half()
             .numpy())
    _write(tmp_path / "test_ood.npz", features=other)
    det, plain = str(tmp_path / "d.safetensors"), str(tmp_path / "p.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "--ood-features",
                 str(tmp_path / "val_ood.npz"), "-o", det]) == 0
    assert main(["fit", str(tmp_path / "train.npz"), "-o", plain]) == 0
    capsys.readouterr()
    files = [str(tmp_path / f) for f in ("val_ood.npz", "same64.npz", "half16.npz",
                                         "test_ood.npz")]
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", *files]) == 0
    err = capsys.readouterr().err
    for path, n in zip(files[:3], (40, 40, 20), strict=True):
        assert (f"grood eval: warning: {path}: {n} of its 40 rows repeat rows the detector's "
                f"OOD prototype was averaged from ({n / 40:.1%}; of those 40 rows): the "
                "detector was shaped on them") in err
    assert files[3] not in err
    assert main(["eval", plain, "--id", str(tmp_path / "id.npz"), "--ood", *files]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["info", det]) == 0
    assert ("OOD          prototype 'features', averaged from 40 rows (fingerprinted: grood "
            "eval warns on an OOD set that repeats them)") in capsys.readouterr().out


def test_eval_warns_where_the_id_labels_are_no_better_than_chance(tmp_path, capsys):
    """ID rows the detector's nearest prototype gets right hardly more often than the largest
    class's share (features of another model, labels in another order) give metrics without
    meaning: eval warns, naming the file, its accuracy and the training set's, and where the
    logits still get the rows right, that the features are what is wrong; a held-out file
    with its own labels gets no warning."""
    x, y = clustered_features(420, 3, 6, seed=7, spread=0.4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    _write(tmp_path / "train.npz", features=x[:240], labels=y[:240])
    logits = 5 * torch.nn.functional.one_hot(y[240:], 3).float()
    _write(tmp_path / "id.npz", features=x[240:], labels=y[240:], logits=logits)
    other = x[240:][torch.randperm(180, generator=gen)]  # rows in another order than labels
    _write(tmp_path / "other.npz", features=other, labels=y[240:], logits=logits)
    _write(tmp_path / "shuffled.npz", features=other, labels=y[240:])
    _write(tmp_path / "ood.npz", features=4 * torch.randn(30, 6, generator=gen))
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    ood = str(tmp_path / "ood.npz")
    assert main(["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", ood]) == 0
    assert "warning" not in capsys.readouterr().err
    train_acc = 100 * GROOD.load(det).train_accuracy_
    largest = 100 * np.bincount(y[240:].numpy()).max() / 180
    for name, hint in (("other.npz", "while its logits get 100.0 % right: are its features "
                                     "from the model and preprocessing"),
                       ("shuffled.npz", "are its features from the model the detector was "
                                        "fitted with, and its labels in the detector's class "
                                        "order and in the order of the rows?")):
        path = str(tmp_path / name)
        assert main(["eval", det, "--id", path, "--ood", ood, "--json",
                     str(tmp_path / "m.json")]) == 0
        out, err = capsys.readouterr()
        accuracy = re.search(r"nearest-prototype accuracy (\d+\.\d\d) %", out).group(1)
        assert float(accuracy) < 50
        said = (f"{path}: the detector's nearest class prototype "
                f"classifies {float(accuracy):.1f} % of its rows correctly (the training set: "
                f"{train_acc:.1f} %), about what labels unrelated to the features give (the "
                f"largest class holds {largest:.1f} % of the rows)")
        assert f"grood eval: warning: {said}" in err and hint in err
        # The JSON keeps the warning with the metrics it concerns.
        (kept,) = json.loads((tmp_path / "m.json").read_text())[ood]["id_warnings"]
        assert kept.startswith(said) and hint in kept


def _last_layer_files(tmp_path, *, seed, ood_seed, post_relu=False):
    """Feature files of a 3-class classifier whose last layer is linear with a bias (rows
    160, width 6): train.npz (100 rows with labels and logits), bare.npz (no logits),
    unlabelled.npz (no labels), id.npz (the other 60) and ood.npz (40, with logits), and a
    detector fitted on train.npz. Returns the features, labels, logits, the layer's weight,
    the OOD features and logits, and the detector's path."""
    x, y = clustered_features(160, 3, 6, seed=seed, spread=0.6, dtype=torch.float32)
    noise = 3 * torch.randn(40, 6, generator=torch.Generator().manual_seed(ood_seed))
    ood = x[:40] * 0.5 + noise
    if post_relu:
        x, ood = x.abs(), ood.abs()
    means = torch.stack([x[:100][y[:100] == c].mean(0) for c in range(3)])
    logits, ood_l = (v @ means.T + torch.tensor([0.5, -0.25, 0.0]) for v in (x, ood))
    _write(tmp_path / "train.npz", features=x[:100], labels=y[:100], logits=logits[:100])
    _write(tmp_path / "bare.npz", features=x[:100], labels=y[:100])
    _write(tmp_path / "unlabelled.npz", features=x[:100], logits=logits[:100])
    _write(tmp_path / "id.npz", features=x[100:], labels=y[100:], logits=logits[100:])
    _write(tmp_path / "ood.npz", features=ood, logits=ood_l)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    return x, y, logits, means, ood, ood_l, det


def test_eval_scores_the_logit_and_last_layer_baselines(tmp_path, capsys):
    """--baselines maxlogit gen (from each file's logits), vim react gradnorm ash (their last
    layer recovered from --train's features and logits) and rmd (--train's features and
    labels): the metrics grood.baselines give by hand, the accuracy of those that predict
    from their own predictions; a training file without logits is named for what they
    need."""
    from grood import ASH, GEN, RMD, GradNorm, MaxLogit, ReAct, ViM, ood_metrics

    x, y, logits, means, ood, ood_l, det = _last_layer_files(tmp_path, seed=3, ood_seed=1)
    capsys.readouterr()
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
            "--json", str(tmp_path / "m.json"), "--baselines", "maxlogit", "gen", "vim",
            "react", "gradnorm", "ash", "rmd", "--train"]
    assert main([*argv, str(tmp_path / "train.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[3].strip() for line in lines[4:12]] == [
        "GROOD", "MaxLogit", "GEN", "ViM (dim=3)", "ReAct (p90)", "GradNorm", "ASH-S (p90)",
        "RMD"]
    got = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    id_x, id_l, labels = x[100:].numpy(), logits[100:].numpy(), y[100:].numpy()
    train = (x[:100].numpy(), logits[:100].numpy())
    for name, est, a, b in (
            ("MaxLogit", MaxLogit().fit(id_l), id_l, ood_l.numpy()),
            ("GEN", GEN().fit(id_l), id_l, ood_l.numpy()),
            ("ViM (dim=3)", ViM().fit(train[0], logits=train[1]), id_x, ood.numpy()),
            ("ReAct (p90)", ReAct().fit(train[0], logits=train[1]), id_x, ood.numpy()),
            ("GradNorm", GradNorm().fit(train[0], logits=train[1]), id_x, ood.numpy()),
            ("ASH-S (p90)", ASH().fit(train[0], logits=train[1]), id_x, ood.numpy()),
            ("RMD", RMD().fit(train[0], y[:100].numpy()), id_x, ood.numpy())):
        own = hasattr(est, "score_and_predict")
        pred = est.score_and_predict(id_x)[1] if own else id_l.argmax(1)
        assert got["baselines"][name] == {"id_accuracy": float(np.mean(pred == labels)),
                                          **ood_metrics(est.score_samples(a),
                                                        est.score_samples(b))}
    assert main([*argv, str(tmp_path / "bare.npz")]) == 2
    assert ("--baselines vim reads the features through the classifier's last layer, which it "
            "recovers from the training file's logits: the file has no 'logits' array"
            in capsys.readouterr().err)
    # Their parameters, recorded with the tables.
    train = str(tmp_path / "train.npz")
    assert main([*argv, train, "--vim-dim", "2", "--react-percentile", "99.5",
                 "--ash-percentile", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[3].strip() for line in lines[7:11]] == [
        "ViM (dim=2)", "ReAct (p99.5)", "GradNorm", "ASH-S (p50)"]
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]
    assert (taken["vim_dim"], taken["react_percentile"], taken["ash_percentile"]) == (
        2, 99.5, 50.0)
    for extra, said in (
            (["--vim-dim", "6"], "--vim-dim 6: ViM's principal space must leave part of the 6 "
                                 "feature dimensions outside it"),
            (["--react-percentile", "0"], "--react-percentile must be a number in (0, 100], "
                                          "got 0"),
            (["--ash-percentile", "100"], "--ash-percentile must be a number in [0, 100), "
                                          "got 100"),
            (["--knn-k", "3"], "--knn-k is read only by --baselines knn")):
        assert main([*argv, train, *extra]) == 2
        assert said in capsys.readouterr().err
    assert main([*argv[:-8], "msp", "--vim-dim", "3"]) == 2
    assert "--vim-dim is read only by --baselines vim" in capsys.readouterr().err
    # The layer itself (--head), where the training file has no logits: the same metrics.
    metrics = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    torch.save({"weight": means, "bias": torch.tensor([0.5, -0.25, 0.0])}, tmp_path / "fc.pt")
    torch.save({"weight": means[:, :5], "bias": torch.zeros(3)}, tmp_path / "narrow.pt")
    bare = str(tmp_path / "bare.npz")
    assert main([*argv, bare, "--head", str(tmp_path / "fc.pt"), "--vim-dim", "2",
                 "--react-percentile", "99.5", "--ash-percentile", "50"]) == 0
    capsys.readouterr()
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["taken_with"]["head"] == str(tmp_path / "fc.pt")
    for name in ("ViM (dim=2)", "ReAct (p99.5)", "GradNorm", "ASH-S (p50)"):
        for key, value in metrics["baselines"][name].items():
            assert got[str(tmp_path / "ood.npz")]["baselines"][name][key] == pytest.approx(
                value, abs=1e-6), (name, key)
    for extra, said in (
            (["--head", str(tmp_path / "narrow.pt")],
             "narrow.pt: weight has 5 columns but the features have 6 columns"),
            (["--head", str(tmp_path / "bare.npz")],
             "bare.npz has no 'weight' or 'bias' array; it holds ['features', 'labels']")):
        assert main([*argv, bare, *extra]) == 2
        assert said in capsys.readouterr().err
    assert main([*argv[:-8], "msp", "--head", str(tmp_path / "fc.pt")]) == 2
    assert ("--head is read only by --baselines vim, react, gradnorm, ash, she, dice, fdbd, "
            "scale and nnguide"
            in capsys.readouterr().err)


def test_eval_baselines_all_scores_every_baseline_once(tmp_path, capsys):
    """--baselines all: a row for every baseline grood.baselines names, in its order, each
    once (with a name repeated beside it), with the same metrics as when named alone."""
    from grood.baselines import BY_NAME

    *_, det = _last_layer_files(tmp_path, seed=6, ood_seed=4, post_relu=True)
    capsys.readouterr()
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
            "--json", str(tmp_path / "m.json"), "--train", str(tmp_path / "train.npz"),
            "--baselines"]
    assert main([*argv, "msp", "all", "--knn-k", "3", "--nnguide-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["taken_with"]["baselines"] == list(BY_NAME)
    rows = [line.split("|")[3].strip() for line in lines[5:5 + len(BY_NAME)]]
    names = list(got[str(tmp_path / "ood.npz")]["baselines"])
    assert rows == names and len(names) == len(BY_NAME) == 17
    assert main([*argv, "fdbd"]) == 0
    alone = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    assert (alone["baselines"]["fDBD"]
            == got[str(tmp_path / "ood.npz")]["baselines"]["fDBD"])


def test_eval_baselines_all_takes_those_the_files_allow(tmp_path, capsys):
    """--baselines all without --train, or with files that lack logits or labels, scores the
    baselines those files allow (it refused the whole command, naming a training set or
    logits) and names those it leaves out, with what each needs, in one warning; a baseline
    named beside it is still refused for what it lacks."""
    from grood.baselines import BY_NAME, learned_from

    *_, ood, _, det = _last_layer_files(tmp_path, seed=6, ood_seed=4)
    _write(tmp_path / "ood_bare.npz", features=ood)
    capsys.readouterr()
    id_, ood_, bare = (str(tmp_path / f) for f in ("id.npz", "ood.npz", "ood_bare.npz"))
    argv = ["eval", det, "--id", id_, "--json", str(tmp_path / "m.json"), "--baselines", "all"]
    of_logits = [k for k, (_, inputs) in BY_NAME.items() if inputs == "logits"]
    untrained = [k for k, (cls, _) in BY_NAME.items() if not learned_from(cls, head_given=False)]
    assert main([*argv, "--ood", ood_]) == 0  # no --train: those of each file's logits
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]["baselines"]
    assert taken == untrained and set(taken) <= set(of_logits) and len(taken) == 4
    err = capsys.readouterr().err
    assert "--baselines all leaves out klm, knn, mahalanobis" in err
    assert "(no training set to fit on: give --train FILE); tempscale (no held-out logits " \
        "and labels to fit on: give --held-out FILE)" in err
    # An OOD file without logits: those of logits left out, those of features fitted.
    train = [*("--train", str(tmp_path / "train.npz")), "--knn-k", "3", "--nnguide-k", "1"]
    assert main([*argv, "--ood", ood_, bare, *train]) == 0
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]["baselines"]
    assert taken == [k for k in BY_NAME if k not in of_logits]
    assert f"{', '.join(of_logits)} (no logits in {bare})" \
        in capsys.readouterr().err
    # A training file without labels: those that fit on them left out.
    train[1] = str(tmp_path / "unlabelled.npz")
    assert main([*argv, "--ood", ood_, *train]) == 0
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]["baselines"]
    assert "mahalanobis" not in taken and "knn" in taken and "vim" in taken
    assert "mahalanobis, rmd, she (no labels in the training file)" \
        in capsys.readouterr().err
    assert main([*argv, "msp", "--ood", bare]) == 2
    assert "msp scores logits: the file has no 'logits' array" in capsys.readouterr().err
    assert main([*argv, "--ood", ood_, "--knn-k", "3"]) == 2
    assert ("--knn-k is read only by --baselines knn, which --baselines all leaves out here"
            in capsys.readouterr().err)


def test_eval_scores_tempscale_fitted_on_the_held_out_file(tmp_path, capsys, monkeypatch):
    """--baselines tempscale --held-out FILE: the temperature fitted on that file's logits and
    labels (a feature file with both, or a file of those two alone), the metrics
    grood.TempScale gives by hand, the file and the temperature recorded with the tables;
    `all` takes it with --held-out. Without the file, a file with the wrong arrays or width,
    or logits no temperature is best for, it is refused by name; `grood tune` refuses it."""
    from grood import TempScale, ood_metrics
    from grood.baselines import BY_NAME

    _, y, logits, _, _, ood_l, det = _last_layer_files(tmp_path, seed=4, ood_seed=2)
    capsys.readouterr()
    noise = 2 * torch.randn(100, 3, generator=torch.Generator().manual_seed(9))
    val_l, val_y = logits[:100] + noise, y[:100]
    val = tmp_path / "val.npz"
    _write(val, logits=val_l, labels=val_y)  # no features: not needed
    _write(tmp_path / "val_features.npz", features=torch.ones(100, 6), logits=val_l,
           labels=val_y)
    id_l, labels = logits[100:].numpy(), y[100:].numpy()
    est = TempScale().fit(val_l.numpy(), val_y.numpy())
    assert 0 < est.temperature_ != 1  # (a fit that moved it)
    want = {"id_accuracy": float(np.mean(id_l.argmax(1) == labels)),
            **ood_metrics(est.score_samples(id_l), est.score_samples(ood_l.numpy()))}
    ood = str(tmp_path / "ood.npz")
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", ood,
            "--json", str(tmp_path / "m.json"), "--baselines", "msp", "tempscale"]
    for held in (val, tmp_path / "val_features.npz"):
        assert main([*argv, "--held-out", str(held)]) == 0
        rows = [line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines()[4:7]]
        assert rows == ["GROOD", "MSP", "TempScale"]
        got = json.loads((tmp_path / "m.json").read_text())
        assert got[ood]["baselines"]["TempScale"] == pytest.approx(want, abs=1e-12)
        assert got["taken_with"]["held_out"] == str(held)
        assert got["taken_with"]["tempscale_temperature"] == pytest.approx(est.temperature_,
                                                                           rel=1e-9)
    # `all` with --held-out: every baseline, TempScale last; without it, as before.
    assert main([*argv[:-2], "all", "--held-out", str(val), "--train",
                 str(tmp_path / "train.npz"), "--knn-k", "3", "--nnguide-k", "1"]) == 0
    capsys.readouterr()
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]
    assert taken["baselines"] == [*BY_NAME, "tempscale"]
    _write(tmp_path / "wide.npz", logits=torch.randn(20, 4), labels=torch.arange(20) % 4)
    shutil.copy(ood, tmp_path / "bare_ood.npz")  # (no labels)
    _write(tmp_path / "fitted.npz", logits=logits[:100], labels=logits[:100].argmax(1))
    for extra, said in (
            ([], "--baselines tempscale fits its temperature on held-out logits and labels (a "
                 "validation set, not the rows the model was trained on): give their file "
                 "with --held-out"),
            (["--held-out", str(tmp_path / "bare_ood.npz")],
             "bare_ood.npz has no 'labels' array; it holds ['features', 'logits']. A held-out "
             "file names them: np.savez(path, logits=Z, labels=y), or a feature file with "
             "both"),
            (["--held-out", str(tmp_path / "wide.npz")],
             "wide.npz: the held-out logits have 4 columns, the detector's classes are 3: "
             "--held-out is not a validation set of the same classifier"),
            (["--held-out", str(tmp_path / "fitted.npz")],
             "fitted.npz: every row's label holds its largest logit"),
            (["--held-out", str(tmp_path / "missing.npz")], "no held-out file at"),
            (["--held-out", str(tmp_path / "id.npz")],
             "id.npz is the ID test file (--id): TempScale's temperature is fitted on held-out "
             "ID rows (a validation set), apart from the test sets and the training rows"),
            (["--held-out", ood], "ood.npz is an OOD file"),
            (["--held-out", str(tmp_path / "train.npz"), "--train",
              str(tmp_path / "train.npz"), "--baselines", "knn"],
             "train.npz is the training file (--train)")):
        assert main([*argv, *extra]) == 2
        assert said in capsys.readouterr().err
    # `all` leaves out a baseline whose fit refuses the files (it ended the whole command
    # after every other fit), saying why; named, or given an option, it still ends it, and
    # its refusal comes before the fits on the training set.
    every = [*argv[:-2], "all", "--held-out", str(tmp_path / "fitted.npz"), "--train",
             str(tmp_path / "train.npz"), "--nnguide-k", "1"]
    import grood._progress

    monkeypatch.setattr(grood._progress, "PLAIN_EVERY_S", 0.0)  # (every progress line)
    assert main(every) == 0
    err = capsys.readouterr().err
    assert (f"--baselines all leaves out tempscale, which refuses the files: {tmp_path}"
            "/fitted.npz: every row's label holds its largest logit") in err
    done = [re.fullmatch(r"grood eval: fitting baselines: done (\d+)/(\d+) baselines "
                         r"\(100 %\), \d+ s, fitted=(\d+), left_out=tempscale", line)
            for line in err.splitlines() if "fitting baselines: done" in line]
    assert len(done) == 1 and done[0] is not None  # (counted as done, named as left out)
    n_done, n_all, n_fitted = map(int, done[0].groups())
    assert n_done == n_all == n_fitted + 1 > 2
    monkeypatch.setattr(grood._progress, "PLAIN_EVERY_S", 15.0)
    taken = json.loads((tmp_path / "m.json").read_text())["taken_with"]
    assert taken["baselines"] == list(BY_NAME) and "tempscale_temperature" not in taken
    knn_too = ["--knn-k", "1000"]  # (it refuses too, later: it fits on the training set)
    assert main([*every[:len(argv) - 1], "tempscale", *every[len(argv) - 1:], *knn_too]) == 2
    err = capsys.readouterr().err
    assert f"--baselines tempscale: {tmp_path}/fitted.npz: every row's label holds" in err
    assert "knn" not in err
    assert main([*every[:-2], "--nnguide-k", "1000"]) == 2  # (an option: asked for)
    assert f"--baselines nnguide: {tmp_path}/train.npz: the bank holds" \
        in capsys.readouterr().err
    assert main([*argv[:-1], "--held-out", str(val)]) == 2
    assert "--held-out is read only by --baselines tempscale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["tune", "tempscale", "--grid", "batch_size=1,2", "--train", "t.npz",
              "--id-val", "v.npz", "--ood-val", "o.npz"])
    assert stop.value.code == 2
    assert ("TempScale has nothing to tune: its temperature is fitted on held-out logits and "
            "labels; score it beside GROOD with grood eval --baselines tempscale --held-out "
            "FILE" in capsys.readouterr().err)


def test_eval_scores_layer_only_baselines_with_head_and_no_training_file(tmp_path, capsys):
    """--baselines gradnorm ash scale --head FILE: given the layer they learn nothing from a
    training set, so they need no --train (it was refused without one); the same metrics as
    by hand. --train beside them alone is named as read by nothing."""
    from grood import ASH, SCALE, GradNorm, ood_metrics

    x, _, _, means, ood, _, det = _last_layer_files(tmp_path, seed=5, ood_seed=3,
                                                    post_relu=True)
    capsys.readouterr()
    bias = torch.tensor([0.5, -0.25, 0.0])
    torch.save({"weight": means, "bias": bias}, tmp_path / "fc.pt")
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
            "--json", str(tmp_path / "m.json"), "--baselines", "gradnorm", "ash", "scale",
            "--head", str(tmp_path / "fc.pt")]
    assert main(argv) == 0
    got = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    for name, est in (("GradNorm", GradNorm()), ("ASH-S (p90)", ASH()),
                      ("SCALE (p85)", SCALE())):
        est.fit(x[100:].numpy(), weight=means, bias=bias)
        expected = ood_metrics(est.score_samples(x[100:].numpy()),
                               est.score_samples(ood.numpy()))
        for key, value in expected.items():
            assert got["baselines"][name][key] == pytest.approx(value, abs=1e-12), (name, key)
    assert main([*argv, "--train", str(tmp_path / "train.npz")]) == 2
    assert ("--train is read only by --baselines klm, knn, mahalanobis, rmd, vim, react, she, "
            "dice, fdbd and nnguide (given --head)" in capsys.readouterr().err)


def test_eval_fits_klm_she_dice_fdbd_scale_nnguide_on_the_training_file(tmp_path, capsys):
    """--baselines klm she dice fdbd scale nnguide: each fitted on --train (KLM on its
    logits, not the ID file's, which would fit it on the test set; SHE on its labels too),
    their metrics those grood.baselines give by hand, their parameters recorded; a training
    file without labels or logits is named for what they need."""
    from grood import DICE, FDBD, KLM, SCALE, SHE, NNGuide, ood_metrics

    # (post-ReLU features, as SCALE expects)
    x, y, logits, _, ood, ood_l, det = _last_layer_files(tmp_path, seed=4, ood_seed=2,
                                                         post_relu=True)
    capsys.readouterr()
    base = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
            "--json", str(tmp_path / "m.json"), "--baselines"]
    options = ["--dice-percentile", "70", "--scale-percentile", "60", "--nnguide-k", "5",
               "--nnguide-bank", "0.5"]
    argv = [*base, "klm", "she", "dice", "fdbd", "scale", "nnguide", *options, "--train"]
    assert main([*argv, str(tmp_path / "train.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[3].strip() for line in lines[4:11]] == [
        "GROOD", "KLM", "SHE", "DICE (p70)", "fDBD", "SCALE (p60)", "NNGuide (k=5)"]
    out = json.loads((tmp_path / "m.json").read_text())
    got = out[str(tmp_path / "ood.npz")]
    assert [out["taken_with"][k] for k in ("dice_percentile", "scale_percentile", "nnguide_k",
                                           "nnguide_bank")] == [70.0, 60.0, 5, 0.5]
    tx, tl, ty = x[:100].numpy(), logits[:100].numpy(), y[:100].numpy()
    id_x, id_l = x[100:].numpy(), logits[100:].numpy()
    for name, est, a, b in (
            ("KLM", KLM().fit(tl), id_l, ood_l.numpy()),
            ("SHE", SHE().fit(tx, ty, logits=tl), id_x, ood.numpy()),
            ("DICE (p70)", DICE(percentile=70).fit(tx, logits=tl), id_x, ood.numpy()),
            ("fDBD", FDBD().fit(tx, logits=tl), id_x, ood.numpy()),
            ("SCALE (p60)", SCALE(percentile=60).fit(tx, logits=tl), id_x, ood.numpy()),
            ("NNGuide (k=5)", NNGuide(k=5, bank_fraction=0.5).fit(tx, logits=tl), id_x,
             ood.numpy())):
        expected = ood_metrics(est.score_samples(a), est.score_samples(b))
        for key, value in expected.items():
            assert got["baselines"][name][key] == value, (name, key)
    on_id = KLM().fit(id_l)  # (what fitting on the ID file would have scored)
    assert not np.array_equal(on_id.score_samples(id_l), KLM().fit(tl).score_samples(id_l))
    for args, said in (
            ([*argv, str(tmp_path / "unlabelled.npz")],
             "unlabelled.npz: --baselines she fits one mean per class: the file needs "
             "'labels'"),
            ([*base, "dice", "--dice-percentile", "100", "--train",
              str(tmp_path / "train.npz")],
             "--dice-percentile must be a number in [0, 100), got 100"),
            ([*base, "nnguide", "--nnguide-k", "60", "--nnguide-bank", "0.5", "--train",
              str(tmp_path / "train.npz")],
             "the bank holds 50 training row(s) (bank_fraction=0.5 of 100), fewer than k=60")):
        assert main(args) == 2
        assert said in capsys.readouterr().err
    assert main([*base, "klm"]) == 2
    assert ("--baselines klm fits on a training set: give the training feature file with "
            "--train" in capsys.readouterr().err)


def test_eval_names_the_baseline_a_fit_refuses_and_its_options(tmp_path, capsys):
    """A baseline's fit refusing its parameters under grood eval names the baseline (with
    --baselines all, one of eighteen) and the options that set the parameters its message
    speaks of; a refusal that names no parameter gets no options."""
    x, y = clustered_features(200, 4, 8, seed=3, dtype=torch.float32)
    means = torch.stack([x[:120][y[:120] == c].mean(0) for c in range(4)])
    logits = x[:120] @ means.T - 0.5 * (means * means).sum(1)  # nearest class mean
    _write(tmp_path / "train.npz", features=x[:120], labels=y[:120], logits=logits)
    _write(tmp_path / "test.npz", features=x[120:160])
    _write(tmp_path / "ood.npz", features=x[160:] + 3.0)
    det = tmp_path / "det.safetensors"
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det)]) == 0
    capsys.readouterr()
    base = ["eval", str(det), "--id", str(tmp_path / "test.npz"), "--ood",
            str(tmp_path / "ood.npz"), "--train", str(tmp_path / "train.npz"), "--baselines"]
    for args, said in (
            (["knn", "--knn-k", "500"],
             "--baselines knn: " + str(tmp_path / "train.npz") + ": k=500 needs 1 <= k <= 120 "
             "training samples (options: --knn-k sets k)"),
            (["knn", "nnguide", "--nnguide-k", "5"],
             "--baselines nnguide: " + str(tmp_path / "train.npz") + ": the bank holds 1 "
             "training row(s) (bank_fraction=0.01 of 120), fewer than k=5: raise "
             "bank_fraction or lower k (options: --nnguide-k sets k, --nnguide-bank sets "
             "bank_fraction)"),
            (["vim", "--vim-dim", "8"], "--baselines vim: " + str(tmp_path / "train.npz")
             + ": --vim-dim 8: ViM's principal space must leave part of the 8 feature "
             "dimensions outside it\n")):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert said in err, err
    _write(tmp_path / "train.npz", features=x[:120], logits=logits)
    assert main([*base, "she"]) == 2
    err = capsys.readouterr().err
    assert "--baselines she fits one mean per class" in err and "options" not in err


def test_eval_counts_the_baselines_it_fits_and_scores(tmp_path, capsys, monkeypatch):
    """At ImageNet scale each baseline's fit and its scoring of each set take seconds to
    minutes: grood eval counts them as they finish, naming the baseline (and the set), as
    periodic plain lines off a terminal (here every line: PLAIN_EVERY_S = 0); with no
    baselines nothing is said of them."""
    import grood._progress

    monkeypatch.setattr(grood._progress, "PLAIN_EVERY_S", 0.0)
    x, y = clustered_features(160, 3, 6, seed=3, spread=0.6, dtype=torch.float32)
    logits = x @ torch.stack([x[:100][y[:100] == c].mean(0) for c in range(3)]).T
    _write(tmp_path / "train.npz", features=x[:100], labels=y[:100], logits=logits[:100])
    _write(tmp_path / "id.npz", features=x[100:], labels=y[100:], logits=logits[100:])
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    ood = 3 * torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    _write(tmp_path / "ood.npz", features=ood, logits=ood @ logits.new_ones(6, 3))
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz")]
    assert main([*argv, "--baselines", "msp", "knn", "--train",
                 str(tmp_path / "train.npz")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "baselines" in line]
    fits = [line for line in err if line.startswith("grood eval: fitting baselines: ")]
    assert [line.split(": ", 2)[2].split(", ")[0] for line in fits] == [
        "at 1/2 baselines (50 %)", "at 2/2 baselines (100 %)", "done 2/2 baselines (100 %)"]
    assert fits[0].endswith("baseline=MSP") and fits[1].endswith("baseline=KNN")
    for name in ("id", "ood"):
        scored = [line for line in err
                  if line.startswith(f"baselines on {tmp_path / name}.npz: ")]
        assert len(scored) == 3 and scored[0].endswith("baseline=MSP")
        assert scored[1].endswith("baseline=KNN (k=50)") and " done 2/2 " in scored[2]
    assert main(argv) == 0
    assert not [line for line in capsys.readouterr().err.splitlines()
                if line.startswith(("grood eval: fitting baselines", "baselines on"))]


def test_eval_scores_baselines_on_the_same_files(tmp_path, capsys):
    """--baselines: each baseline's metrics, fitted as grood.baselines would be by hand, in
    the table (a row per method under each set), the JSON and the plots."""
    from grood import KNN, MSP, Energy, Mahalanobis, ood_metrics

    x, y = clustered_features(160, 3, 6, seed=3, spread=0.6, dtype=torch.float32)
    means = torch.stack([x[:100][y[:100] == c].mean(0) for c in range(3)])
    logits = x @ means.T  # a linear head: columns in the labels' order
    ood = x[:40] * 0.5 + 3 * torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    _write(tmp_path / "train.npz", features=x[:100], labels=y[:100], logits=logits[:100])
    _write(tmp_path / "id.npz", features=x[100:], labels=y[100:], logits=logits[100:])
    _write(tmp_path / "ood.npz", features=ood, logits=ood @ means.T)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()
    argv = ["eval", det, "--id", str(tmp_path / "id.npz"), "--ood", str(tmp_path / "ood.npz"),
            "--json", str(tmp_path / "m.json"), "--train", str(tmp_path / "train.npz")]
    plots = importlib.util.find_spec("matplotlib") is not None  # (grood[plots])
    assert main([*argv, "--baselines", "msp", "energy", "--baselines", "knn",
                 "mahalanobis", "--knn-k", "3",
                 *(["--plots", str(tmp_path / "plots")] if plots else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    right = float((logits[100:].argmax(1) == y[100:]).float().mean()) * 100
    assert f", the logits' {right:.2f} %" in lines[0]
    assert lines[2].startswith("| OOD set") and "| method " in lines[2]
    assert [line.split("|")[3].strip() for line in lines[4:9]] == [
        "GROOD", "MSP", "Energy", "KNN (k=3)", "Mahalanobis"]
    got = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    assert got["id_logits_accuracy"] == float(np.mean(logits[100:].numpy().argmax(1)
                                                       == y[100:].numpy()))
    id_x, id_l = x[100:].numpy(), logits[100:].numpy()
    ood_x, ood_l = ood.numpy(), (ood @ means.T).numpy()
    for name, est, a, b in (
            ("MSP", MSP().fit(id_l), id_l, ood_l), ("Energy", Energy().fit(id_l), id_l, ood_l),
            ("KNN (k=3)", KNN(k=3).fit(x[:100].numpy()), id_x, ood_x),
            ("Mahalanobis", Mahalanobis().fit(x[:100].numpy(), y[:100].numpy()), id_x, ood_x)):
        # ACC as OpenOOD's postprocessors predict: Mahalanobis its nearest class mean, the
        # others the logits
        pred = est.predict(id_x) if name == "Mahalanobis" else id_l.argmax(1)
        assert got["baselines"][name] == {
            "id_accuracy": float(np.mean(pred == y[100:].numpy())),
            **ood_metrics(est.score_samples(a), est.score_samples(b))}
    assert set(got) == {"n_id", "id_accuracy", "id_logits_accuracy", "n_ood", "auroc", "fpr95",
                        "aupr_in", "aupr_out", "baselines"}
    assert not plots or (tmp_path / "plots" / "roc.png").stat().st_size > 0
    # --bootstrap with baselines: GROOD minus each baseline, with its paired interval.
    assert main([*argv[:-2], "--baselines", "msp", "--bootstrap", "100"]) == 0
    text = capsys.readouterr().out
    got = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npz")]
    grood_scores = [GROOD.load(det).score_samples(v) for v in (id_x, ood_x)]
    msp = MSP().fit(id_l)
    ci = bootstrap_difference(grood_scores, [msp.score_samples(v) for v in (id_l, ood_l)],
                              n_boot=100)
    assert got["baselines"]["MSP"]["grood_minus_ci95"] == {k: list(v) for k, v in ci.items()}
    lo, hi = ci["auroc"]
    delta = got["auroc"] - got["baselines"]["MSP"]["auroc"]
    assert "GROOD minus each baseline on the same samples" in text
    assert f"| {100 * delta:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}) |" in text
    # What each baseline needs is named, before any scoring where it can be.
    refused = [
        (["--baselines", "knn"], "--baselines knn fits on a training set: give the "
                                 "training feature file with --train"),
        (["--train", str(tmp_path / "train.npz")], "--train is read only by --baselines"),
        (["--knn-k", "3", "--baselines", "msp"], "--knn-k is read only by --baselines knn"),
        (["--baselines", "knn", "--train", str(tmp_path / "narrow.npz")],
         "narrow.npz: the training features have 5 columns, the detector's 6"),
        (["--id", str(tmp_path / "short.npz")],
         "short.npz: 'logits' has shape (10, 3), expected (60, C)"),
        # An OOD file without logits: named before the ID file is scored (it was named at
        # its turn, after the ID file's scoring), whatever its format.
        (["--baselines", "msp", "--id", str(tmp_path / "train.npz"), "--ood",
          str(tmp_path / "a.npz")], "a.npz: --baselines msp scores logits: the file has no "
                                    "'logits' array"),
        (["--baselines", "msp", "energy", "--ood", str(tmp_path / "a.safetensors")],
         "a.safetensors: --baselines msp and energy score logits: the file has no 'logits' "
         "array"),
        (["--baselines", "mahalanobis", "--train", str(tmp_path / "ood.npz")],
         "ood.npz: --baselines mahalanobis fits one mean per class: the file needs 'labels'"),
    ]
    _write(tmp_path / "a.npz", features=ood)
    from safetensors.torch import save_file

    save_file({"features": ood.contiguous()}, str(tmp_path / "a.safetensors"))
    _write(tmp_path / "narrow.npz", features=x[:100, :5], labels=y[:100])
    _write(tmp_path / "short.npz", features=x[100:], labels=y[100:], logits=logits[:10])
    scored = []
    real_score = GROOD.score_and_predict
    GROOD.score_and_predict = lambda self, f: (scored.append(1), real_score(self, f))[1]
    try:
        for extra, message in refused:
            base = ["eval", det, *([] if "--id" in extra else
                                   ["--id", str(tmp_path / "id.npz")]),
                    "--ood", str(tmp_path / "ood.npz")]
            assert main([*base, *extra]) == 2, extra
            assert message in capsys.readouterr().err
    finally:
        GROOD.score_and_predict = real_score
    assert not scored


def test_a_missing_input_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A misspelt last OOD set (or feature file to score) was found only after the detector
    was loaded and the ID set scored."""
    from grood import GROOD

    x, y = clustered_features(40, 2, 4, seed=2, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "train.npz"), "-o", det]) == 0
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the detector was loaded before the inputs were checked")

    monkeypatch.setattr(GROOD, "load", no_load)
    missing = str(tmp_path / "ood_typo.npz")
    for argv, what in (
            (["eval", det, "--id", str(tmp_path / "train.npz"), "--ood",
              str(tmp_path / "train.npz"), missing], "feature file"),
            (["score", det, missing, "-o", str(tmp_path / "s.npy")], "feature file"),
            (["fit", str(tmp_path / "train.npz"), "--ood-features", missing, "-o", det],
             "OOD feature file")):
        assert main(argv) == 2
        assert f"no {what} at {missing}" in capsys.readouterr().err


def test_help_lists_commands_and_options():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("demo", "fit", "score", "eval", "info"):
        assert cmd in text
    out = subprocess.run([sys.executable, "-m", "grood", "fit", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert "--ood-prototype" in out.stdout and "Feature files:" in out.stdout


def test_a_single_valued_option_given_twice_is_refused(capsys):
    """argparse keeps the last of a repeated option without a word (``--id a --id b`` would
    evaluate b alone): grood's parsers refuse it, naming the option and both values, while
    the options that take lists (--ood, --near, --far, --baselines) still accumulate."""
    for argv, option, values in (
            (["eval", "d", "--id", "a.npz", "--ood", "o.npz", "--id", "b.npz"], "--id",
             "('a.npz', then 'b.npz')"),
            (["score", "d", "f.npz", "-o", "s.npy", "--precision", "tf32", "--precision",
              "ieee"], "--precision", "('tf32', then 'ieee')"),
            (["fit", "t.npz", "-o", "a.safetensors", "-o", "b.safetensors"], "-o",
             "('a.safetensors', then 'b.safetensors')")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert f"argument {option}: given more than once {values}; give it once" in (
            capsys.readouterr().err)
    args = build_parser().parse_args(["eval", "d", "--id", "a", "--ood", "x", "--near", "n1",
                                      "--ood", "y", "--near", "n2", "--baselines", "msp",
                                      "--baselines", "knn"])
    assert (args.ood, args.near, args.baselines) == (["x", "y"], ["n1", "n2"], ["msp", "knn"])
    # each parse starts afresh (the parser may be reused)
    parser = build_parser()
    for _ in range(2):
        assert parser.parse_args(["info", "d.safetensors"]).detector == "d.safetensors"


def test_device_defaults_to_a_gpu_where_torch_sees_one(tmp_path, monkeypatch, capsys):
    """--device auto (the default) is cuda where torch sees a GPU and cpu elsewhere; a device
    named on the command line is kept."""
    x, y = clustered_features(40, 3, 4, seed=0, dtype=torch.float32)
    np.savez(tmp_path / "train.npz", features=x.numpy(), labels=y.numpy())
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "d.safetensors")]) == 0
    assert build_parser().parse_args(["score", "d", "f", "-o", "o"]).device == "auto"
    seen = []

    def load(path, device=None, **kwargs):
        seen.append(device)
        raise ValueError("stop here")

    monkeypatch.setattr(GROOD, "load", staticmethod(load))
    argv = ["score", str(tmp_path / "d.safetensors"), str(tmp_path / "train.npz"), "-o",
            str(tmp_path / "s.npy")]
    for available, extra, want in ((True, [], "cuda"), (False, [], "cpu"),
                                   (True, ["--device", "cpu"], "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert main(argv + extra) == 2 and "stop here" in capsys.readouterr().err
        assert seen.pop() == want


@pytest.mark.slow
def test_bench_report_runs_at_tiny_size(capsys, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "timings.json"
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "takes hours" not in captured.err  # (the note on full-size interpreted runs)
    saved = json.loads(out.read_text())
    assert saved["run"]["device"] and saved["run"]["capability"] is None
    # which kernels were timed: the digest the compile report names too
    from grood.environment import kernel_sources

    assert saved["run"]["kernels"] == kernel_sources() != "none"
    assert text.startswith(f"grood {__version__} (kernels {kernel_sources()}) | ")
    kinds = {(t["kernel"], t["precision"], t["backend"]) for t in saved["timings"]}
    assert ("ncp_gradient", "tf32", "triton") in kinds and ("knn", "bf16-storage", "torch") in kinds
    assert all(t["seconds"] > 0 for t in saved["timings"])
    # the baselines' times too, not only the ratios the table prints
    assert {("ncp_gradient", "tf32", "torch closed form"),
            ("ncp_gradient", "tf32", "torch GEMM alone")} <= kinds
    assert "| triton | ieee |" in text and "| torch | bf16 |" in text
    assert "| tiny-100 | 64 | 100 | 24 | triton | tf32 |" in text
    assert "## Nearest-neighbour search" in text and "| triton | tf32 | float32 | " in text
    assert "faiss" in text
    assert "for many neighbours" not in text  # (--only search-k: when asked)
    # The accuracy rows carry real numbers, not placeholders.
    row = next(line for line in text.splitlines() if line.startswith("| triton | ieee | "))
    assert float(row.split("|")[4]) < 1e-5  # q_ood max relative error
    # The hard-softmax table has the launcher's re-rank gate the other way round beside it.
    for gate, precision in (("on", "ieee"), ("on", "tf32")):
        row = next(line for line in text.splitlines()
                   if line.startswith(f"| triton, re-rank gate {gate} | {precision} | "))
        assert float(row.split("|")[4]) < 1e-5 and row.endswith("| 0.000 % |")
    # Then clustered features at ImageNet-1k's C and D (here tiny): every mode of each backend.
    table = text.split("Clustered post-ReLU features at ImageNet-1k's C and D")[1]
    table = table.split("\n\n", 2)[1].splitlines()
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table[2:]}
    assert {("triton", "ieee"), ("triton", "tf32"), ("torch", "bf16"),
            ("torch closed form", "tf32")} <= set(cells)
    assert float(cells[("triton", "ieee")].split("|")[4]) < 1e-5


def test_bench_search_k_times_each_k_against_k_one(capsys):
    """--only search-k: every backend and precision at each k (up to a quarter of the
    database), each checked against a float64 search and timed against its own k = 1."""
    pytest.importorskip("triton")
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only",
                 "search-k"]) == 0
    text = capsys.readouterr().out
    assert "## Nearest-neighbour search for many neighbours" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| tiny |")]
    assert {(r[4], r[5], r[6]) for r in rows} == {
        (b, p, k) for b in ("triton", "torch") for p in ("ieee", "tf32") for k in ("1", "50")}
    assert all(float(r[-1]) < 1e-5 and float(r[7]) > 0 for r in rows)
    assert all(r[9] == "1.00x" for r in rows if r[6] == "1")
    assert "## Gradient step" not in text  # only this part


def test_search_table_times_the_narrowed_pick_with_the_flag_set(monkeypatch):
    """The GPU report's search table times the torch search a second time with its tiles
    narrowed (off the CPU): a row of its own, labelled, run with
    functional.DEVICE_NARROWED_PICK set and the flag set back after (here on the CPU, where
    the variant is forced in)."""
    from grood import functional
    from grood._bench import search

    seen = []
    real = functional.knn

    def knn(*args, **kwargs):
        seen.append(functional.DEVICE_NARROWED_PICK)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "knn", knn)
    monkeypatch.setattr(search, "_search_variants", lambda backends, *rest: iter(
        [("torch", {}), ("torch", {"narrowed_pick": True})]))
    rows = [line for line in search.search_timing_table("cpu", ["torch"], True, 1)
            if line.startswith("| tiny")]
    narrowed = [r for r in rows if "tiles narrowed by group minima (sync-free)" in r]
    assert rows and len(narrowed) == len(rows) // 2
    assert True in seen and False in seen and functional.DEVICE_NARROWED_PICK is False


def test_bench_at_full_size_under_the_interpreter_says_it_takes_hours(capsys, monkeypatch):
    """Full-size shapes under TRITON_INTERPRET=1 ran for hours with nothing said past the
    header; the run now says so on stderr first, with the ways out."""
    pytest.importorskip("triton")
    from grood._bench import report

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(report, "search_timing_table", lambda *args: iter(["| (timings) |"]))
    assert main(["bench", "--device", "cpu", "--only", "search", "--skip-accuracy"]) == 0
    captured = capsys.readouterr()
    assert "| (timings) |" in captured.out
    assert re.search(r"the Triton interpreter runs the full-size shapes .* which takes hours; "
                     r"--tiny checks the report in seconds", captured.err)


def test_kernel_sources_digest_names_the_kernel_files(tmp_path):
    """The digest covers every kernel source file by name and content, and nothing else."""
    from grood.environment import kernel_sources

    for name, text in (("a.py", "x = 1\n"), ("b.py", "y = 2\n"), ("notes.txt", "-")):
        (tmp_path / name).write_text(text)
    first = kernel_sources(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    (tmp_path / "notes.txt").write_text("changed")  # not a source file
    assert kernel_sources(tmp_path) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    assert kernel_sources(tmp_path) != first
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "b.py").rename(tmp_path / "c.py")  # the same bytes under another name
    assert kernel_sources(tmp_path) != first


def test_bench_configs_table_times_every_candidate_against_the_launcher(capsys):
    """``grood bench --only configs``: the launcher's tiles first, then each distinct autotuning
    candidate, with its time and its agreement with the launcher's results."""
    pytest.importorskip("triton")
    from grood._bench.configs import config_runs
    from grood_kernels._ncp_candidates import candidate_configs
    from grood_kernels._ncp_configs import launch_config

    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only", "configs"]) == 0
    text = capsys.readouterr().out
    for name, n, c, d in (("tiny-10", 96, 10, 40), ("tiny-100", 64, 100, 24)):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} | tf32 |")]
        assert "(launcher)" in rows[0] and "| 1.00x | 0.0e+00 | 0.0000 |" in rows[0]
        assert "(launcher, re-rank gate on)" in rows[1]  # ungated here: the gate the other way
        ieee = [line for line in text.splitlines() if line.startswith(f"| {name} | ieee |")]
        assert "(launcher, re-rank gate on)" in ieee[1]
        cands = candidate_configs(n, c, d, "tf32", 4)
        assert cands[0] == launch_config(n, c, d, "tf32")
        assert len(rows) == len(config_runs(cands, c, d, "tf32")) == 5 + len(set(cands[1:]))
        assert "(launcher, the finish's loops not pipelined)" in rows[2]
        assert "(launcher, the finish's loops 3 stages deep)" in rows[3]
        assert "(launcher, the finish's passes plain: per-step gathers and sums)" in rows[4]
        assert sum("single read" in row for row in rows) == (c <= 16)
        # every candidate agrees with the launcher's results: in ieee to fp32 rounding; in
        # tf32 within the autotuner's agreement (ncp_gradient._agree), as the operands' TF32
        # rounding differs (the launcher rounds its centred tile, the staged rows reach the
        # MMA truncated, the split variant's BLAS takes them in fp32 here) and the gate
        # leaves GEMM terms in the sum
        for row in rows + ieee:
            cells = [cell.strip() for cell in row.split("|")]
            assert float(cells[-3]) < (1e-3 if "| tf32 |" in row else 1e-5)
            assert float(cells[-2]) == 0.0
        # after the table, the fastest of them, one line per shape and mode
        (best,) = [re.fullmatch(rf"- {name} tf32: (.*), ([0-9.]+) ms, [0-9.]+x as fast as "
                                r"the launcher", line) for line in text.splitlines()
                   if line.startswith(f"- {name} tf32: ")]
        timed = [(float(row.split("|")[5]), row.split("|")[3].strip()) for row in rows]
        assert best is not None and float(best[2]) == min(timed)[0]
        assert (float(best[2]), best[1]) in timed


def test_bench_configs_table_times_only_the_rows_asked_for(capsys):
    """``--configs-match``: per shape and mode the launcher's own row (the reference) and the
    rows whose label matches, nothing else; a pattern that is no regular expression is
    refused by the parser."""
    pytest.importorskip("triton")
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only", "configs",
                 "--configs-match", "finish apart"]) == 0
    text = capsys.readouterr().out
    for name in ("tiny-10", "tiny-100"):
        for precision in ("ieee", "tf32"):
            rows = [line for line in text.splitlines()
                    if line.startswith(f"| {name} | {precision} |")]
            assert "(launcher)" in rows[0] and "| 1.00x |" in rows[0]
            assert len(rows) > 1 and all("finish apart" in row for row in rows[1:])
            assert all("re-rank gate" not in row for row in rows)
    with pytest.raises(SystemExit):
        main(["bench", "--tiny", "--device", "cpu", "--only", "configs",
              "--configs-match", "finish (apart"])
    assert "not a regular expression" in capsys.readouterr().err


def test_bench_configs_table_flips_what_a_gpu_run_left_open(wide_tile_offered):
    """At ImageNet-1k on Hopper the table runs the launcher with its gate the other way, its
    finish unpipelined or 3 stages deep and its passes plain (as an H200 timed it), and the
    wide staged tile both ways; in ieee (the split variant) the gate only, which its epilogue
    takes on every chunk; where the gate is on (C = 21,841) the finish is plain already."""
    pytest.importorskip("triton")
    from grood._bench.configs import config_runs
    from grood_kernels._ncp_candidates import candidate_configs, wide_config

    dims = (65536, 1000, 2048)
    runs = config_runs(candidate_configs(*dims, "tf32", 4, major=9), *dims[1:], "tf32")
    labels = [label for _, label, _ in runs]
    assert labels[:5] == [" (launcher)", " (launcher, re-rank gate on)",
                          " (launcher, the finish's loops not pipelined)",
                          " (launcher, the finish's loops 3 stages deep)",
                          " (launcher, the finish's passes plain: per-step gathers and sums)"]
    assert [over for _, _, over in runs[:5]] == [{}, {"rerank_gate": 1}, {"finish": 1},
                                                 {"finish": 3}, {"lean": 0}]
    wide = [(cfg, over) for cfg, label, over in runs if label.startswith(" (wide tile")]
    assert [over for _, over in wide] == [{}, {"rerank_gate": 1}, {}]
    assert wide[0][0] == wide[1][0] == wide_config(*dims, "tf32", 4)
    assert wide[2][0] == wide[0][0]._replace(finish_apart=True)
    apart = [label for cfg, label, _ in runs if cfg.finish_apart]
    assert apart == [" (launcher, finish apart)",
                     " (launcher, finish apart, 3 finish programs per SM)",
                     " (wide tile, staged, finish apart)",
                     " (staged: u centred by a pre-pass, finish apart)",
                     " (split: torch GEMM over row chunks, Triton epilogue, finish apart)"]
    runs = config_runs(candidate_configs(*dims, "ieee", 4, major=9), *dims[1:], "ieee")
    assert runs[0][0].split and [over for _, _, over in runs[:2]] == [{}, {"rerank_gate": 1}]
    assert not any("finish" in over or "lean" in over for _, _, over in runs)
    assert [label for cfg, label, _ in runs if cfg.finish_apart] == [
        " (split: torch GEMM over row chunks, Triton epilogue, finish apart)"]
    big = (65536, 21841, 1024)
    runs = config_runs(candidate_configs(*big, "tf32", 4, major=9), *big[1:], "tf32")
    assert not any("lean" in over for _, _, over in runs)
    # CIFAR-10 on a GPU: the launcher is the kernel without a GEMM (no gate, no finish to
    # override), the GEMM kernels' launcher configuration right after it, named
    small = (65536, 10, 512)
    for precision, gemm in (("tf32", " (GEMM launcher)"),
                            ("ieee", " (split: torch GEMM over row chunks, Triton epilogue, "
                                     "the GEMM launcher's)")):
        runs = config_runs(candidate_configs(*small, precision, 4, major=9),
                           *small[1:], precision)
        assert runs[0][0].exact and runs[0][1:] == (" (launcher)", {})
        assert runs[1][1:] == (gemm, {}) and not runs[1][0].exact
        assert not any(cfg.exact for cfg, _, _ in runs[1:])


def test_bench_overrides_reach_every_chunk_of_the_split_variant(monkeypatch):
    """The anatomy's and configs table's constexpr overrides apply to every epilogue launch of
    the split variant (one per chunk of rows), not only to the last chunk's."""
    pytest.importorskip("triton")
    from grood._bench import configs
    from grood._bench.gradient import hard_softmax_features
    from grood_kernels import _split
    from grood_kernels._launch import KernelLaunch
    from grood_kernels._ncp_configs import split_config
    from grood_kernels._prepare import prepare_prototypes
    from grood_kernels.contract import ncp_scale

    monkeypatch.setattr(_split, "SPLIT_BUFFER_ELEMENTS", 32 * 30)  # chunks of 32 rows
    seen: list = []
    monkeypatch.setattr(configs, "run", seen.append)
    h, protos = hard_softmax_features(100, 30, 24, seed=2, device="cpu")
    p_ood = protos.mean(0)
    prep = prepare_prototypes(protos, p_ood, "ieee", ncp_scale(protos, p_ood))
    cfg = split_config(30, 24, "ieee")
    configs.launch_step(h, protos, prep, configs.step_buffers(100, 24, "cpu"), "ieee", cfg,
                        rerank_gate=1)
    gates = [launch.constexprs["RERANK_GATE"] for launch in seen
             if isinstance(launch, KernelLaunch)
             and launch.fn is _split._ncp_epilogue_kernel]
    assert gates == [1, 1, 1, 1]
    # the epilogue's FINISH is not the class-group kernel's: no partials to stop at
    with pytest.raises(ValueError, match="split variant, whose epilogue finishes"):
        configs.launch_step(h, protos, prep, configs.step_buffers(100, 24, "cpu"), "ieee", cfg,
                            0)
    with pytest.raises(ValueError, match="split variant, whose epilogue finishes"):
        configs.launch_step(h, protos, prep, configs.step_buffers(100, 24, "cpu"), "ieee", cfg,
                            lean=1)


def test_bench_overrides_reach_the_finish_launched_apart(monkeypatch):
    """With the finish apart, the re-rank's gate reaches the finish kernel (the class-group
    kernel's own finish stays off), ONE_BLOCK the class-group kernel; an override of the
    class-group kernel's finish is refused, not turned into a second finish."""
    pytest.importorskip("triton")
    from grood._bench import configs
    from grood._bench.gradient import hard_softmax_features
    from grood_kernels._launch import KernelLaunch, LaunchConfig
    from grood_kernels._ncp_finish import _ncp_finish_kernel
    from grood_kernels._prepare import prepare_prototypes
    from grood_kernels.contract import ncp_scale

    seen: list = []
    monkeypatch.setattr(configs, "run", seen.append)
    h, protos = hard_softmax_features(40, 30, 24, seed=2, device="cpu")
    p_ood = protos.mean(0)
    prep = prepare_prototypes(protos, p_ood, "tf32", ncp_scale(protos, p_ood))
    cfg = LaunchConfig(16, 16, 16, 4, 2, 2, finish_apart=True)
    outs = configs.step_buffers(40, 24, "cpu")
    configs.launch_step(h, protos, prep, outs, "tf32", cfg, rerank_gate=1, one_block=1)
    main, fin = (launch for launch in seen if isinstance(launch, KernelLaunch))
    assert fin.fn is _ncp_finish_kernel and fin.constexprs["RERANK_GATE"] == 1
    assert main.constexprs["FINISH"] == 0 and main.constexprs["ONE_BLOCK"] == 1
    with pytest.raises(ValueError, match="finishes in a launch of its own"):
        configs.launch_step(h, protos, prep, outs, "tf32", cfg, finish=1)
    with pytest.raises(ValueError, match="LEAN is the class-group kernel's own finish"):
        configs.launch_step(h, protos, prep, outs, "tf32", cfg, lean=0)


def test_bench_step_outputs_are_the_ops_with_the_re_rank_gate_either_way():
    """The GPU report's flipped-gate rows run the launcher's configuration as the op does:
    with the launcher's own gate its outputs are the op's, bit for bit; the other way round
    the prediction and min_dist stay the same (the gate only leaves out candidates that
    provably are not the nearest) and q_ood moves by the far terms' rounding."""
    pytest.importorskip("triton")
    from grood._bench.configs import step_outputs
    from grood._bench.gradient import hard_softmax_features
    from grood_kernels._ncp_configs import rerank_gate
    from grood_kernels.ncp_gradient import ncp_gradient

    h, protos = hard_softmax_features(40, 30, 24, seed=2, device="cpu")
    p_ood = protos.mean(0)
    for precision in ("ieee", "tf32"):
        res = ncp_gradient(h, protos, p_ood, precision=precision)
        for got, want in zip(step_outputs(h, protos, p_ood, precision), res, strict=True):
            assert torch.equal(got, want)
        flipped = step_outputs(h, protos, p_ood, precision,
                               rerank_gate=int(not rerank_gate(30, 24, precision)))
        assert torch.equal(flipped[2], res.pred) and torch.equal(flipped[3], res.min_dist)
        torch.testing.assert_close(flipped[1], res.q_ood, rtol=1e-5, atol=0)
    # The single-read variant has no gate to flip: said so, not ignored.
    from grood._bench.configs import launch_step, step_buffers
    from grood_kernels._launch import LaunchConfig
    from grood_kernels._ncp_single_read import single_read_config
    from grood_kernels._prepare import prepare_prototypes
    from grood_kernels.contract import ncp_scale

    few = protos[:10]
    cfg = single_read_config(10, 24, "tf32")
    assert cfg is not None
    prep = prepare_prototypes(few, p_ood, "tf32", ncp_scale(few, p_ood))
    outs = step_buffers(40, 24, h.device)
    with pytest.raises(ValueError, match="_ncp_single_read_kernel takes no RERANK_GATE"):
        launch_step(h, few, prep, outs, "tf32", cfg, rerank_gate=0)
    # ONE_BLOCK only where a program holds one class block: on elsewhere would drop classes.
    looping = LaunchConfig(16, 16, 16, 4, 2, 1)  # 30 classes: 2 blocks a program
    prep = prepare_prototypes(protos, p_ood, "tf32", ncp_scale(protos, p_ood))
    with pytest.raises(ValueError, match="ONE_BLOCK needs one class block per program"):
        launch_step(h, protos, prep, outs, "tf32", looping, one_block=1)


def test_bench_anatomy_times_each_stage_of_the_gradient_step(capsys):
    """``grood bench --only anatomy``: the step's stages, each a kernel that stops there, with
    the whole step (launcher) last at a share of 1.00."""
    pytest.importorskip("triton")
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only", "anatomy"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| tiny-100 | tf32 |")]
    stages = [row.split("|")[3].strip() for row in rows]
    assert stages[0].startswith("torch GEMM alone") and stages[-1] == "whole step (launcher)"
    assert any(s.startswith("K-loop alone, A operand from the staged rows") for s in stages)
    assert any(s.startswith("kernel without the finish") for s in stages)
    # the tile epilogue the other way: tiny-100 in tf32 holds one class block per program
    assert "kernel without the finish, first tile's top-4 by insertion (ONE_BLOCK off)" in stages
    # the launcher's lean finish the other way (the kernel as an H200 timed it)
    assert "whole step, the finish's passes plain (per-step gathers and sums)" in stages
    assert rows[-1].split("|")[5].strip() == "1.00"
    assert all(float(row.split("|")[4]) > 0 for row in rows)
    # First the memory roofs the model divides by, each measured with its bytes and time.
    roofs = [line.split("|") for line in text.splitlines()
             if line.startswith(("| L2:", "| HBM:"))]
    assert [cells[1].split(":")[0].strip() for cells in roofs] == ["L2", "HBM", "HBM"]
    assert all(float(cells[3]) > 0 and float(cells[4]) >= 0 for cells in roofs)
    assert text.index("| L2:") < text.index("| tiny-100 |")


def test_bench_shards_split_the_tuning_tables_between_processes(monkeypatch, capsys):
    """``--shard k/n`` runs every n-th entry of the configurations' and the stages' tables
    from the k-th (counted over the whole table, after ``--configs-match``): n shards run
    each entry once between them. ``--warm N`` runs N such processes and prints no table;
    a shard that is not K/N with 0 <= K < N is refused."""
    pytest.importorskip("triton")
    from grood._bench import anatomy, configs
    from grood._bench.configs import TINY_CONFIG_SHAPES

    launched = []
    monkeypatch.setattr(configs, "launch_step", lambda *a, **kw: launched.append(a[5]))
    monkeypatch.setattr(anatomy, "launch_step", lambda *a, **kw: launched.append(a[5]))
    monkeypatch.setattr(anatomy, "run", lambda launch: None)

    def entries(table, **kw):
        return [row.split("|")[1:4] for row in table(**kw) if row.startswith("| tiny")]

    for table, args in ((configs.config_table, dict(precisions=("ieee", "tf32"))),
                        (anatomy.anatomy_table, dict(precisions=("ieee", "tf32")))):
        whole = entries(table, device="cpu", shapes=TINY_CONFIG_SHAPES, repeat=1, **args)
        for n in (2, 3):
            shards = [entries(table, device="cpu", shapes=TINY_CONFIG_SHAPES, repeat=1,
                              shard=(k, n), **args) for k in range(n)]
            assert sorted(tuple(e) for shard in shards for e in shard) == sorted(
                map(tuple, whole))
            assert all(0 < len(shard) < len(whole) for shard in shards)
    assert launched  # (the kernels' launches were recorded, not run)
    for k in (0, 1):  # the memory roofs (3 GiB of buffers on a GPU) in the first shard alone
        assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only",
                     "anatomy", f"--shard={k}/2"]) == 0
        assert ("| L2:" in capsys.readouterr().out) == (k == 0)
    assert main(["bench", "--tiny", "--device", "cpu", "--only", "configs", "--warm", "2",
                 "--configs-match", "no such row"]) == 0
    out = capsys.readouterr().out
    assert "warm 0/2 (configs): exit 0" in out and "warm 1/2 (configs): exit 0" in out
    assert "| tiny" not in out
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit):
            main(["bench", "--only", "configs", f"--shard={bad}"])
        assert "expected K/N with 0 <= K < N" in capsys.readouterr().err


def test_bench_torch_path_takes_the_torch_backend_apart_by_operator(capsys):
    """``grood bench --only torch-path``: the torch backend's step and the closed form timed,
    then the step's top-level operators (each counted once: an operator's own sub-operators
    are not listed beside it), the rest summed, and all of them; on the CPU by host time."""
    from grood._bench.torch_path import profiled_ops

    x = torch.randn(64, 32)
    ops = profiled_ops(lambda: torch.linalg.vector_norm(x @ x.T, dim=1).sum(), "cpu")
    names = [op[0] for op in ops]
    assert names.count("aten::linalg_vector_norm") == 1 and "aten::matmul" in names
    assert "aten::mm" not in names  # (inside aten::matmul)
    assert all(calls >= 1 and host >= 0 and dev == 0 for _, calls, host, dev in ops)
    assert [op[2] for op in ops] == sorted((op[2] for op in ops), reverse=True)
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only",
                 "torch-path"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny-100 | ieee |")]
    whats = [cells[2].strip() for cells in rows]
    assert whats[:3] == ["whole step, timed",
                         "whole step in 1 row tile(s) of 64 (default: 1 of 64), timed",
                         "torch closed form, timed"]
    assert whats[-1] == "all operators of the profiled call"
    assert any(what.startswith("aten::addmm") for what in whats)  # the distance GEMM
    assert whats[-2].endswith("other operators") and len(rows) == 3 + 12 + 2
    total = [float(cells[5]) for cells in rows[3:-1]]
    assert sum(total) == pytest.approx(float(rows[-1][5]), abs=0.01)


def test_bench_anatomy_of_the_split_launcher_leaves_out_the_finish_stages(monkeypatch):
    """Where the launcher is the split variant (``ieee`` on a GPU) the anatomy has no kernel
    without its finish, nor with its finish's loops plain: every stage it lists runs."""
    pytest.importorskip("triton")
    from grood._bench import anatomy
    from grood._bench.configs import TINY_CONFIG_SHAPES
    from grood_kernels import _ncp_configs

    monkeypatch.setattr(_ncp_configs, "launch_config", lambda n, c, d, precision, **kw:
                        _ncp_configs.split_config(c, d, precision))
    text = "\n".join(anatomy.anatomy_table("cpu", TINY_CONFIG_SHAPES[:1], ["ieee"], repeat=1))
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| tiny")]
    stages = [cells[3].strip() for cells in rows]
    assert stages[-1] == "whole step (launcher)" and "failed" not in text
    assert not any("finish" in stage for stage in stages)
    assert "whole step, split variant (torch GEMM, Triton epilogue)" in stages


def test_bench_pipeline_runs_every_stage_and_checks_itself(capsys):
    from grood.cli import main

    assert main(["bench", "--pipeline", "--scale", "0.001", "--classes", "10", "--dim", "16",
                 "--device", "cpu", "--backend", "torch", "--quiet"]) == 0
    out = capsys.readouterr().out
    for stage in ("prototype pass", "gradient pass", "index build", "gradient step",
                  "exact 1-NN search"):
        assert f"| {stage} |" in out or f"| fit: {stage} |" in out or f"| score: {stage} |" in out
    diff = float(out.split("check: max |score - GROOD.score_samples| = ")[1].split()[0])
    assert diff < 1e-6
    # The torch backend compiles nothing: its warm-up rows say what they hold.
    assert "JIT" not in out
    for op in ("gradient step", "search"):
        assert (f"| warm-up: first calls of the {op} (torch: nothing compiled, one untimed "
                "call per batch shape; not in the totals) |") in out


def test_fit_with_half_precision_index_storage(tmp_path, capsys):
    x, y = clustered_features(200, 4, 8, seed=2, dtype=torch.float32)
    _write(tmp_path / "t.npz", features=x, labels=y)
    for name, extra in (("plain", []), ("half", ["--index-storage", "bfloat16",
                                                 "--exact-copy", "host"])):
        assert main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / f"{name}.safetensors"),
                     *extra]) == 0
    half = GROOD.load(tmp_path / "half.safetensors")
    assert half.index_options == {"storage": "bfloat16", "exact_copy": "host"}
    assert torch.equal(half.score_samples(x[:40]),
                       GROOD.load(tmp_path / "plain.safetensors").score_samples(x[:40]))
    assert main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / "dev.safetensors"),
                 "--index-storage", "float16"]) == 0
    assert GROOD.load(tmp_path / "dev.safetensors").index_options == {
        "storage": "float16", "exact_copy": "device"}
    # An fp32 index has no exact copy: the option was dropped without a word.
    assert main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / "no.safetensors"),
                 "--exact-copy", "host"]) == 2
    assert not (tmp_path / "no.safetensors").exists()
    # faiss keeps its own fp32 vectors: a storage dtype for them would be dropped too.
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "t.npz"), "-o", str(tmp_path / "no.safetensors"),
                 "--index", "faiss-flat", "--index-storage", "bfloat16"]) == 2
    assert "--index-storage applies to --index exact only" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()


def test_interleaved_timing_calls_every_entry_once_per_round():
    """The CPU report's baselines are timed in the same rounds as the op (a drifting machine
    slows all of them alike): one warm-up round, then a, b, a, b, ..."""
    from grood._bench.common import interleaved_median_times

    calls = []
    times = interleaved_median_times([lambda: calls.append("a"), lambda: calls.append("b")],
                                     "cpu", 3)
    assert calls == ["a", "b"] * 4
    assert len(times) == 2 and all(t >= 0 for t in times)


def test_cpu_report_runs_at_small_size():
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_report.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--repeat", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("| ncp_gradient |") == 2 and out.count("| knn k=1 |") == 1
    assert "interleaved" in out


def test_calibration_digits_runs_at_small_size():
    """bench/calibration_digits.py: one seed, a short training; one row per seed and the
    mean, every fraction a percentage."""
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "bench" / "calibration_digits.py"
    out = subprocess.run([sys.executable, str(script), "--seeds", "1", "--epochs", "2"],
                         capture_output=True, text=True, check=True).stdout
    rows = [r for r in out.splitlines() if r.startswith("| 0 |")]
    assert len(rows) == 1 and "| mean ± std |" in out
    assert all(0 <= float(v) <= 100 for v in rows[0].strip("|").split("|")[1:])


def test_score_range_tables_at_tiny_size():
    """bench/score_range.py --tiny: the tight-class table (float32 falls to chance where the
    indexed gradients leave its range, and the fit says so) and the storage table."""
    script = Path(__file__).resolve().parents[1] / "bench" / "score_range.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True)
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in out.stdout.splitlines()
            if r.startswith("| ")}
    assert rows["40"][-1].strip() == "no" and rows["100"][-1].strip() == "yes"
    assert float(rows["100"][1]) == 0.5 < float(rows["100"][2])  # float32, float64 AUROC
    assert set(rows) >= {"float16", "bfloat16"} and "storage=" not in out.stderr


def test_fit_check_table_at_tiny_size():
    """bench/fit_check.py --tiny: the fit's one-search check and the two searches it made
    before give the same counts (the script refuses to time them otherwise), on every row."""
    script = Path(__file__).resolve().parents[1] / "bench" / "fit_check.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True)
    rows = [r.split("|")[1:-1] for r in out.stdout.splitlines() if r.startswith("| 3,000")]
    assert len(rows) == 1 and rows[0][2].strip() == "0 / 0"
    assert all(float(rows[0][i].strip()) > 0 for i in (3, 4))


def test_rounding_distance_table_at_tiny_size():
    """bench/rounding_distance.py --tiny: every own row within the bound (8 units), no new
    row within it, on every set."""
    script = Path(__file__).resolve().parents[1] / "bench" / "rounding_distance.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--seeds", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| Gaussian")]
    assert len(rows) == 4
    for row in rows:
        assert int(row[4].replace(",", "")) > 0 and float(row[5]) < 8 < float(row[8])
        assert row[9] == "0"


def test_class_spread_table_at_tiny_size():
    """bench/class_spread.py --tiny: Mahalanobis within 1e-9 of the two-pass float64 scores
    in float64 up to 1e10 : 1 between / within variance, RMD within 1e-8 (its background
    covariance's small eigenvalues are found to about 1e-9 where they are kept), and both
    within 1e-3 in float32 up to 1e6 : 1."""
    script = Path(__file__).resolve().parents[1] / "bench" / "class_spread.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    rows = [[float(c) for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| 1e+")]
    assert [r[0] for r in rows] == [1e2, 1e6, 1e10]
    for ratio, maha64, maha32, rmd64, rmd32 in rows:
        assert maha64 < 1e-9 and rmd64 < 1e-8, (ratio, maha64, rmd64)
        if ratio <= 1e6:
            assert maha32 < 1e-3 and rmd32 < 1e-3, (ratio, maha32, rmd32)


def test_export_margins_table_at_tiny_size():
    """bench/export_margins.py --tiny: ONNX Runtime's scores of rows 1 to 63,000 units out lie
    within a unit of the head's (the check allows 8), and more than 1e-4 of the largest score
    off it (the flat tolerance the check used alone, which refused these files)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    script = Path(__file__).resolve().parents[1] / "bench" / "export_margins.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| 200,")]
    assert len(rows) == 4
    for row in rows:
        units, relative = (float(v) for v in row[3].split(","))
        assert units < 1 and relative > 1e-4, row


def test_far_rows_tables_at_tiny_size():
    """bench/far_rows.py --tiny: a row far along the diagonal scored as the exact softmax
    scores it, in either dtype, until the detector refuses it; float32's error near 2**16
    below 1 %."""
    script = Path(__file__).resolve().parents[1] / "bench" / "far_rows.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in out.splitlines() if r.startswith("| ") and not r.startswith("| t ")}
    exact_q, exact_class, f64, f32 = rows["1e+05"]
    assert f64 == f32 == f"{exact_q}, {exact_class}"
    assert rows["1e+20"][2:] == ["refused", "refused"]
    assert 0 < float(rows["6e+04"][0].split()[0]) < 1e-2


def test_far_prototype_table_at_tiny_size():
    """bench/far_prototype.py --tiny: features of ordinary spread fit as built; 186 times
    farther from the OOD prototype than wide, the self-search finds every sampled gradient,
    but each lies nearer its neighbour than ten times the expansion's error bound, and the
    fit holds the index less its mean; at 18,570 the self-search misses them, the fit holds
    the index so, which finds every sampled gradient, scores as a float64 search of the same
    gradients does, and warns of the gradients' spread. With a bf16 copy searched, the fit
    holds the index less its mean at 186 (scores off by more than their spread before); a
    float16 copy is warned of once, by the copy. Heads converted to half precision are
    warned of where they are off; a detector set to bf16 and saved is checked at the load."""
    script = Path(__file__).resolve().parents[1] / "bench" / "far_prototype.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| ") and r[2].isdigit()]
    near, crowded, far = (r for r in rows if len(r) == 9)
    stored = {(r[0], r[1]): r[2:] for r in rows if len(r) == 7}
    bf16 = stored[("186", "bfloat16")]
    assert int(bf16[0]) >= 7 and bf16[1] == "yes (0)" and bf16[-1] == "-"
    assert float(bf16[2]) > 0.5 and float(bf16[3]) < 0.01
    assert stored[("186", "float16")][-1] == "lost rows"  # (the copy names the cause, alone)
    # Fitted in ieee and set to bf16: unchecked, the bf16 search is off at 28 (where the
    # ieee search is neither missed nor crowded); checked again, it is centred and scores as
    # a fit in bf16.
    precision = {r[0]: r[1:] for r in rows if len(r) == 8}
    ieee, fitted, unchecked, after, centred, in_bf16, _ = precision["28"]
    assert fitted == "no" and float(ieee) < 1e-4
    assert centred == "yes" and float(unchecked) > 100 * float(ieee)
    assert float(after) == float(in_bf16) < 1e-4
    assert near[1:4] == ["0", "0 of 64", "no (0)"] and near[-1] == "-"
    assert crowded[1:4] == ["0", "64 of 64", "yes (0)"] and float(crowded[6]) < 1e-4
    assert int(far[1]) >= 7 and far[3] == "yes (0)" and far[-1] == "spread"
    assert float(far[5]) > 0.5 and float(far[6]) == float(far[7]) < 0.05
    # The emulated modes: tf32 misses the far gradients as built, finds them less the mean;
    # ordinary features are found in every mode.
    modes = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
             for r in out.splitlines() if r.startswith("| distance") or r.startswith("| clus")}
    built, less = modes["distance / spread 18,570"]
    assert int(built.split(" / ")[1]) >= 7 and less.split(" / ")[:2] == ["0", "0"]
    assert list(modes.values())[-1] == ["0 / 0 / 0", "0 / 0 / 0"]
    # Heads converted to half precision: float16 far off and warned of at 18; bfloat16 close
    # and quiet there, far off and warned of at 1,857 (a centred index: its centre rounded).
    heads = {r[0]: r[1:] for r in rows if len(r) == 6}
    centred, f16, f16_warned, b16, b16_warned = heads["18"]
    assert centred == "no" and float(f16) > 1 and f16_warned == "yes"
    assert float(b16) < 0.01 and b16_warned == "no"
    centred, f16, f16_warned, b16, b16_warned = heads["1,857"]
    assert centred == "yes" and f16_warned == b16_warned == "yes" and float(b16) > 0.5
    # Set to bf16 and saved before any score: unchecked the load was off; checked, it is
    # centred and scores as a fit in bf16.
    unchecked, checked, centred = next(r[1:] for r in rows if len(r) == 4 and r[0] == "28")
    assert float(unchecked) > 100 * float(checked) and centred == "yes"
    assert float(checked) == float(precision["28"][5])


def test_offset_scores_table_at_tiny_size():
    """bench/offset_scores.py --tiny: at each offset float32's own error is a positive share
    of the scores' spread, and under twice what moving the inputs one unit does."""
    script = Path(__file__).resolve().parents[1] / "bench" / "offset_scores.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| 1e")]
    assert [r[:2] for r in rows] == [["1e+03", "torch"], ["1e+05", "torch"]]
    for _, _, _, own, inputs, ratio in rows:
        assert 0 < float(own) < 2 * float(inputs) and float(ratio) < 2


def test_logit_scale_table_at_tiny_size():
    """bench/logit_scale.py --tiny: KLM's float32 scores within a few times their own
    rounding of float64's at logit spreads 1e-3 to 1e3, GradNorm's at temperatures to 1e4
    (where ``p - 1/C`` had cancelled: 1e7 and 1e4 times); ViM's and fDBD's at feature scales
    1e-30 to 1e20, where SHE refuses the rows it cannot score; ReAct warned of at p40 of
    ReLU features, half of whose entries are 0, and ASH-S's and SCALE's at p99 within a few
    times their own rounding (263 and 76 times it before their sums were taken again)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "logit_scale.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                         text=True, check=True).stdout
    klm = next(r for r in out.splitlines() if r.startswith("| klm |"))
    ratios = [float(c.split("/")[1].strip().rstrip("x")) for c in klm.strip("|").split("|")[1:]]
    assert len(ratios) == 3 and max(ratios) < 20
    temps = [[c.strip() for c in r.strip("|").split("|")] for r in out.splitlines()
             if re.match(r"\| 1(e\+0\d|00|0000)? \|", r)]
    assert [t[0] for t in temps] == ["1", "100", "10000"]
    assert all(float(t[1]) < 1e-5 and float(t[2].rstrip("x")) < 100 for t in temps)
    # features of 1e-30 and 1e20, the layer over the scale: ViM's and fDBD's norms squared
    # out of float32's range (0.2 of the spread off, and non-finite); SHE's score is outside it
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
            for r in out.split("logits unchanged")[1].splitlines() if r.startswith("| ")}
    assert rows["she"] == ["refused", rows["she"][1], "refused"]
    for name in ("vim", "fdbd", "she"):
        ratios = [float(c.split("/")[1].strip().rstrip("x")) for c in rows[name]
                  if c != "refused"]
        assert ratios and max(ratios) < 20, name
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
            for r in out.split("with a percentile")[1].splitlines() if r.startswith("| ")}
    assert rows["react"][0] == "warned" and len(rows["react"]) == 2
    for name in ("ash", "scale"):
        assert float(rows[name][1].split("/")[1].strip().rstrip("x")) < 20, name


def test_cpu_report_stages_table():
    """--stages prints one row per gradient-step shape: the op, both baselines, every stage,
    their sum, the op's remainder and the two partial sums, all numbers."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_report.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--stages", "--repeat", "1"],
                         capture_output=True, text=True, check=True).stdout
    table = out.split("taken apart")[1]
    header = next(line for line in table.splitlines() if line.startswith("| shape |"))
    rows = [line for line in table.splitlines() if line.startswith("| N=")]
    assert len(rows) == 2
    assert "re-rank" in header and "first write + GEMM" in header
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1
        assert all(float(c) == float(c) for c in cells[1:])  # numbers, none NaN


def test_cpu_report_class_blocks_table():
    """--class-blocks --small: one shape, the default class block first, then the former
    default (every class in one block) and the narrower widths, each with its block count
    and its time against the default's (the script checks every width's outputs bit for
    bit against the default's first)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_report.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--class-blocks",
                          "--repeat", "1"], capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| N=")]
    assert [r[1:3] for r in rows] == [["1000 (default)", "3"], ["3000 (former default)", "1"],
                                      ["2048", "2"], ["512", "6"]]
    assert rows[0][4] == "1.00" and all(float(r[3]) > 0 for r in rows)
    assert "| ncp_gradient |" not in out  # only this table


def test_cpu_report_search_k_table():
    """--search-k --small: the exact search at each k up to 1,000, each row checked against
    a float64 search and timed against the GEMM of the same FLOPs."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_report.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--search-k",
                          "--repeat", "1"], capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| knn k=")]
    assert [r[0] for r in rows] == [f"knn k={k}" for k in (1, 10, 50, 200, 1000)]
    assert all(float(r[-1].rsplit(" ", 1)[1]) < 1e-5 for r in rows)
    assert "| ncp_gradient |" not in out  # only this table


def test_cpu_report_search_pick_table():
    """--search-pick --small: the search with wide tiles narrowed by group minima against
    whole-tile picking (the script checks both return the same neighbours first), each
    timed against the GEMM of the same FLOPs."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_report.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--search-pick",
                          "--repeat", "1"], capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| Q=64 M=6000 D=32")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("1", "6,000", "yes"), ("20", "6,000", "yes")]
    assert all(float(r[6].removesuffix("x")) > 0 for r in rows)
    assert "| knn k=" not in out and "| ncp_gradient |" not in out  # only this table


def test_tune_search_table():
    """bench/tune_search.py --small: GROOD's, KNN's and NNGuide's grids of k, each timed
    with the shared search and with each point on its own (the script checks both give the
    same metrics first), one fit each."""
    script = Path(__file__).resolve().parents[1] / "bench" / "tune_search.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--repeat", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| GROOD", "| KNN", "| NNGuide"))]
    assert [r[:2] for r in rows] == [["GROOD", "1, 2, 5, 10, 20, 50"],
                                     ["KNN", "50, 100, 200, 500, 1000"],
                                     ["NNGuide", "1, 10, 100"]]
    assert all(float(r[2].removesuffix(" s")) > 0 and r[5] == "1" for r in rows)


def test_bootstrap_speed_table():
    """bench/bootstrap_speed.py --small: grood's resamples against ood_metrics and
    scikit-learn on the same draws (the script checks their metrics agree first), for
    distinct and tied scores; then six methods, and one method's three sets, in one thread
    and in threads (checked equal first), with the default's choice."""
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "bench" / "bootstrap_speed.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--repeat", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| small")]
    assert [r[1] for r in rows[:2]] == ["distinct", "rounded to 0.01"]
    assert all(float(r[c].removesuffix(" ms")) > 0 for r in rows[:2] for c in (2, 3, 5))
    assert len(rows) == 4 and rows[2][-1] == "one thread"  # six methods, threads or not
    assert rows[3][0] == "small: 2,000 x 500, 500, 500"  # one method, three sets


def test_outputs_never_overwrite_the_inputs(tmp_path, capsys, monkeypatch):
    """An output named like an input (directly or through a link) is refused before any
    work, for every command; output names are checked before scoring; an upper-case .NPY is
    written under exactly that name."""
    x, y = clustered_features(120, 3, 6, seed=4, dtype=torch.float32)
    train, test = tmp_path / "train.safetensors", tmp_path / "test.npy"
    _write(train, features=x, labels=y)
    np.save(test, x[:20].numpy())
    (tmp_path / "link.npy").symlink_to(test)
    det = tmp_path / "det.safetensors"
    assert main(["fit", str(train), "-o", str(det)]) == 0
    before = test.read_bytes(), train.read_bytes(), det.read_bytes()
    attempts = [
        ["score", str(det), str(test), "-o", str(test)],
        ["score", str(det), str(tmp_path / "link.npy"), "-o", str(test)],
        ["score", str(det), str(test), "-o", str(tmp_path / "link.npy")],
        ["fit", str(train), "-o", str(train)],
        ["eval", str(det), "--id", str(test), "--ood", str(test), "--json", str(test)],
        ["eval", str(det), "--id", str(test), "--ood", str(test), "--json", str(det)],
    ]
    for argv in attempts:
        assert main(argv) == 2, argv
        assert "this command reads: writing there would overwrite it" in capsys.readouterr().err
    assert (test.read_bytes(), train.read_bytes(), det.read_bytes()) == before

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking the output name")

    with monkeypatch.context() as m:
        m.setattr(GROOD, "score_and_predict", no_scoring)
        assert main(["score", str(det), str(test), "-o", str(tmp_path / "s.txt")]) == 2
    assert "scores are written as .npy or .npz or .csv" in capsys.readouterr().err
    assert main(["score", str(det), str(test), "-o", str(tmp_path / "S.NPY")]) == 0
    assert np.load(tmp_path / "S.NPY").shape == (20,)
    assert not (tmp_path / "S.NPY.npy").exists()


def test_score_files_are_written_atomically_through_links(tmp_path, monkeypatch):
    """Scores were written in place: a write that failed or was interrupted halfway (a full
    disk, Ctrl-C during a long CSV) left a truncated file that looked complete. Now the old
    file stays until the new one is whole, and nothing else is left in the folder."""
    from grood import io

    scores, preds = np.linspace(-1, 0, 50), np.arange(50) % 3
    out = tmp_path / "scores.csv"
    out.write_text("old\n")
    real = io._write_scores

    def halfway(path, *args):
        path.write_text("index,score,pred\n0,-1.0,0\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_scores", halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_scores(out, scores, preds)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "scores.csv"]
    monkeypatch.setattr(io, "_write_scores", real)
    io.save_scores(out, scores, preds)
    assert len(out.read_text().splitlines()) == 51
    # Through a link, to what it points at (the link stays a link).
    (tmp_path / "real.npz").write_bytes(b"")
    (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
    io.save_scores(tmp_path / "link.npz", scores, preds)
    assert (tmp_path / "link.npz").is_symlink()
    with np.load(tmp_path / "real.npz") as saved:
        np.testing.assert_array_equal(saved["score"], scores)
    # A missing folder is named with the file asked for, not the temporary file beside it.
    with pytest.raises(FileNotFoundError, match=r"cannot write .*gone.scores\.npz: the "
                                                r"folder .*gone does not exist"):
        io.save_scores(tmp_path / "gone" / "scores.npz", scores, preds)


def test_score_counts_its_rows_in_words(tmp_path, capsys):
    """One row is "1 sample", and counts are grouped by thousands as elsewhere."""
    x, y = clustered_features(30, 2, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "t.npz", features=x, labels=y)
    det = str(tmp_path / "d.safetensors")
    assert main(["fit", str(tmp_path / "t.npz"), "-o", det]) == 0
    for n, words in ((1, "scored 1 sample (higher"), (1200, "scored 1,200 samples (higher")):
        _write(tmp_path / "q.npy", features=torch.rand(n, 4))
        capsys.readouterr()
        assert main(["score", det, str(tmp_path / "q.npy"), "-o", str(tmp_path / "s.npy")]) == 0
        assert capsys.readouterr().out.startswith(words)


def test_score_names_a_file_of_training_rows(tmp_path, capsys):
    """A file whose rows are the training rows scores them as the training set scores (an
    indexed gradient at distance 0: 0 at k = 1, the highest), above new samples of their
    distribution: `grood score` said nothing (calibrating and `grood eval` warn). It warns
    where more than 1 % of the rows do, with or without --neighbours, and not for new rows."""
    x, y = clustered_features(200, 4, 6, seed=2, dtype=torch.float32)
    _write(tmp_path / "t.npz", features=x, labels=y)
    det, out = str(tmp_path / "d.safetensors"), str(tmp_path / "s.npz")
    assert main(["fit", str(tmp_path / "t.npz"), "-o", det]) == 0
    new, _ = clustered_features(200, 4, 6, seed=2, dtype=torch.float32, spread=1.1)
    _write(tmp_path / "half.npy", features=torch.cat([x[:100], new[100:]]))
    _write(tmp_path / "new.npy", features=new)
    indexed = int((GROOD.load(det).indexed_rows_ < 100).sum())  # (the rows classified right)
    assert 90 < indexed < 100
    for extra in ([], ["--neighbours", "2"]):
        capsys.readouterr()
        assert main(["score", det, str(tmp_path / "half.npy"), "-o", out, *extra]) == 0
        err = capsys.readouterr().err
        assert (f"half.npy: {indexed} of its 200 rows equal indexed training rows (an indexed "
                "gradient at distance 0 up to rounding, so they score 0, the highest score): "
                "they score as the training set does" in err), err
        assert main(["score", det, str(tmp_path / "new.npy"), "-o", out, *extra]) == 0
        assert "training rows" not in capsys.readouterr().err
    # The same rows in float64 (scored in float64, ~1e-15 from their float32 gradients).
    _write(tmp_path / "wide.npy", features=torch.cat([x[:100], new[100:]]).double())
    _write(tmp_path / "new64.npy", features=new.double())
    capsys.readouterr()
    assert main(["score", det, str(tmp_path / "wide.npy"), "-o", out]) == 0
    assert f"wide.npy: {indexed} of its 200 rows equal indexed" in capsys.readouterr().err
    assert main(["score", det, str(tmp_path / "new64.npy"), "-o", out]) == 0
    assert "training rows" not in capsys.readouterr().err
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "t.npz"), "-o", det, "-k", "3"]) == 0
    assert main(["score", det, str(tmp_path / "half.npy"), "-o", out]) == 0
    assert "(an indexed gradient at distance 0 up to rounding, one of their k=3 neighbours): " \
        in capsys.readouterr().err


def test_score_csv_writes_each_value_as_its_dtype_reads_it(tmp_path):
    """A CSV score file wrote float32 scores and distances with their float64 repr
    (-0.10000000149011612 for float32's -0.1): longer than the value holds, and read as the
    wrong number by anything that keeps the text. Each value is now the shortest decimal that
    reads back to the same value in the array's dtype; float64 keeps every digit it needs."""
    from grood import io

    rng = np.random.default_rng(3)
    scores = np.concatenate([np.float32([-0.1, -1e-20, -3.4e38, 0.0]),
                             -rng.exponential(size=200).astype(np.float32)])
    preds = np.arange(len(scores)) % 5
    dist = np.float32(rng.exponential(size=(len(scores), 2)))
    rows = np.arange(2 * len(scores)).reshape(-1, 2)
    io.save_scores(tmp_path / "s.csv", scores, preds, neighbours=(dist, rows))
    with open(tmp_path / "s.csv", newline="") as f:
        table = list(csv.reader(f))[1:]
    assert [r[1] for r in table[:4]] == ["-0.1", "-1e-20", "-3.4e+38", "0.0"]
    read = np.float32([float(r[1]) for r in table])
    np.testing.assert_array_equal(read, scores)  # every value reads back exactly
    np.testing.assert_array_equal(np.float32([[float(v) for v in r[5:]] for r in table]), dist)
    assert [[int(v) for v in r[3:5]] for r in table] == rows.tolist()
    assert max(len(r[1]) for r in table) <= len("-1.2345678e-05")  # 9 digits at most
    # float64 scores (float64 features) keep their full precision.
    io.save_scores(tmp_path / "d.csv", scores.astype(np.float64) / 3, preds)
    with open(tmp_path / "d.csv", newline="") as f:
        read64 = np.array([float(r[1]) for r in list(csv.reader(f))[1:]])
    np.testing.assert_array_equal(read64, scores.astype(np.float64) / 3)


def test_warnings_print_as_one_line_named_by_the_command(tmp_path, capsys):
    """A warning printed Python's path and line of grood's code, then that line's source."""
    x, y = clustered_features(100, 3, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x[:60], labels=y[:60])
    # Calibration rows partly taken from the training set: grood warns about them.
    _write(tmp_path / "val.npy", features=x[50:])
    det = tmp_path / "d.safetensors"
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det)]) == 0
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["calibrate", str(det), str(tmp_path / "val.npy"), "-o",
                     str(tmp_path / "c.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("grood calibrate: warning: 10 of the 50 calibration rows equal "
                          "indexed training rows"), err
    assert err.count("\n") == 1 and "cli.py" not in err
    assert warnings.showwarning is shown  # the caller's display is back


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """A Ctrl-C during a long fit printed a full traceback; the detector file is not made."""
    x, y = clustered_features(60, 3, 4, seed=1, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x, labels=y)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GROOD, "fit", interrupted)
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "d.safetensors")]) \
        == 130
    assert capsys.readouterr().err == "\ngrood fit: interrupted\n"
    assert not (tmp_path / "d.safetensors").exists()


def test_demo_refuses_counts_of_zero_and_a_file_as_its_folder(tmp_path, capsys):
    """--epochs / --n-noise / --knn-k / --seeds of 0 meant an untrained net, "the loader
    yielded no batches" or a k error from inside; --out naming a file failed with a raw
    errno. All are usage errors now, before anything runs."""
    for flag in ("--epochs", "--n-noise", "--knn-k", "--seeds"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(tmp_path / "d"), flag, "0"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be a positive integer" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--out", str(tmp_path / "afile"), "--quiet"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["fit", "t.npz", "-o", "d.safetensors", "--precision", "fp32"],
     "argument --precision: must be one of ('ieee', 'tf32', 'tf32x3', 'bf16'), got 'fp32' "
     "(for 'fp32' pass 'ieee')"),
    (["score", "d.safetensors", "t.npz", "-o", "s.csv", "--precision", "TF32"],
     "argument --precision: must be one of ('ieee', 'tf32', 'tf32x3', 'bf16'), got 'TF32' "
     "(for 'TF32' pass 'tf32')"),
    (["fit", "t.npz", "-o", "d.safetensors", "--index", "ivf"],
     "got 'ivf' (for 'ivf' pass 'faiss-ivf')"),
    (["eval", "d.safetensors", "--id", "t.npz", "--ood", "o.npz", "--backend", "cuda"],
     "argument --backend: must be one of ('auto', 'torch', 'triton'), got 'cuda' (backend "
     "picks the implementation: torch, or the Triton kernels; where it runs is --device)"),
    (["fit", "t.npz", "-o", "d.safetensors", "--precision", "fp8"],
     "got 'fp8'\n"),  # (no hint where none is meant)
])
def test_names_from_elsewhere_are_refused_on_the_command_line_with_the_one_meant(
        argv, message, capsys):
    """argparse's "invalid choice: 'fp32'" named the valid choices alone, where the Python
    API names the one meant; both now say it, before any file is read."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeat", "0"], "--repeat: must be a positive integer"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--json", "/nonexistent-folder/t.json"], "the folder /nonexistent-folder does not exist"),
])
def test_bench_usage_errors_come_before_any_run(argv, message, capsys):
    """A zero repeat count failed after the kernels ran (no median of nothing); an unknown
    device or an unwritable --json path failed in torch or at the very end."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tiny", "--only", "head", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["bench", "--device", "cuda"])
        assert "no CUDA device is available here" in capsys.readouterr().err


def test_pt_feature_files_are_memory_mapped_and_legacy_ones_still_read(tmp_path):
    """A .pt feature file larger than memory is read batch by batch, as a .npy file is;
    files in torch's legacy (pre-zip) format cannot be mapped and are read whole."""
    from grood.io import load_features

    x = torch.arange(24, dtype=torch.float32).view(6, 4)
    torch.save({"features": x, "labels": torch.arange(6)}, tmp_path / "new.pt")
    torch.save(x, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    mapped = load_features(tmp_path / "new.pt")
    assert torch.equal(mapped.features, x) and torch.equal(mapped.labels, torch.arange(6))
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / "new.pt") in maps.read_text()
    assert torch.equal(load_features(tmp_path / "legacy.pt").features, x)


def test_npz_feature_files_are_memory_mapped_where_stored_uncompressed(tmp_path):
    """np.savez stores its arrays uncompressed (zip64 local headers): they are mapped, so a
    .npz larger than memory is read batch by batch, with the values, dtypes, shapes and memory
    order written; np.savez_compressed's arrays cannot be mapped and are read whole."""
    from grood.io import load_features

    rng = np.random.default_rng(0)
    arrays = {"features": rng.standard_normal((7, 5)).astype(np.float16),
              "labels": rng.integers(0, 3, 7),
              "logits": np.asfortranarray(rng.standard_normal((7, 3)))}
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    np.savez(tmp_path / "empty.npz", features=np.zeros((0, 5), np.float32),
             labels=np.zeros(0, np.int64))
    read = {name: load_features(tmp_path / name) for name in ("stored.npz", "deflated.npz")}
    for name, mapped in (("stored.npz", True), ("deflated.npz", False)):
        for key, want in arrays.items():
            got = getattr(read[name], key)
            assert isinstance(got, np.memmap) == mapped, (name, key)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want) and got.flags.c_contiguous == (key != "logits")
            assert not got.flags.writeable or not mapped
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / "stored.npz") in maps.read_text()
    empty = load_features(tmp_path / "empty.npz")
    assert empty.features.shape == (0, 5) and empty.labels.shape == (0,)
    # a member shorter than its header says is not mapped past its end: it is refused
    header = io.BytesIO()
    np.save(header, np.ones((100, 5), np.float32))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("features.npy", header.getvalue()[:-40])
    with pytest.raises(ValueError, match=r"short\.npz: could not read the file \(EOF"):
        load_features(tmp_path / "short.npz")


def test_large_compressed_npz_members_are_decompressed_to_a_mapped_temporary_file(
        tmp_path, monkeypatch):
    """np.savez_compressed's members above grood.io.SPILL_BYTES are decompressed once into
    an unlinked temporary file (under TMPDIR) and mapped there, with the values, dtypes,
    shapes and memory order written; the smaller ones are read whole, and so is a member
    where the temporary file cannot be written; a damaged one is named by its CRC-32."""
    import tempfile

    import grood.io
    from grood.io import load_features

    rng = np.random.default_rng(1)
    arrays = {"features": rng.standard_normal((300, 40)).astype(np.float32),
              "labels": rng.integers(0, 3, 300),
              "logits": np.asfortranarray(rng.standard_normal((300, 3)))}
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    monkeypatch.setattr(grood.io, "SPILL_BYTES", 5_000)  # features and logits, not labels
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("TMPDIR", str(spill))
    monkeypatch.setattr(tempfile, "tempdir", None)  # (TMPDIR read again)
    read = load_features(tmp_path / "deflated.npz")
    for key, want in arrays.items():
        got = getattr(read, key)
        assert isinstance(got, np.memmap) == (key != "labels"), key
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want) and got.flags.c_contiguous == (key != "logits")
    assert list(spill.iterdir()) == []  # unlinked: gone with the maps
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(spill) in maps.read_text()
    del read, got
    # No room (or no folder) for the temporary file: read whole, as before.
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    whole = load_features(tmp_path / "deflated.npz")
    assert not isinstance(whole.features, np.memmap)
    assert np.array_equal(whole.features, arrays["features"])
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    # A flipped bit in the deflated features: the decompression's CRC-32 check names it.
    raw = bytearray((tmp_path / "deflated.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "deflated.npz") as archive:
        info = archive.getinfo("features.npy")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                    info.header_offset + 30])
    data = info.header_offset + 30 + name_len + extra_len
    raw[data + info.compress_size // 2] ^= 0x10
    (tmp_path / "damaged.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"damaged\.npz: could not read the file"):
        load_features(tmp_path / "damaged.npz")


def test_bench_tuning_tables_report_a_failing_candidate_and_go_on(capsys, monkeypatch):
    """A candidate that fails on the device gets a 'failed' row in the configs and anatomy
    tables; the rows after it are still measured (a one-shot GPU run keeps its table)."""
    pytest.importorskip("triton")
    from grood._bench import anatomy, configs

    real = configs.launch_step

    def failing(h, protos, prep, outs, precision, cfg, finish=None, **kwargs):
        if cfg.split:
            raise RuntimeError("no such GEMM here")
        return real(h, protos, prep, outs, precision, cfg, finish, **kwargs)

    monkeypatch.setattr(configs, "launch_step", failing)
    monkeypatch.setattr(anatomy, "launch_step", failing)
    assert main(["bench", "--tiny", "--device", "cpu", "--repeat", "1", "--only", "configs",
                 "--only", "anatomy"]) == 0
    text = capsys.readouterr().out
    for table_row in ("(split: torch GEMM over row chunks, Triton epilogue) | 1 | failed: "
                      "RuntimeError: no such GEMM here",
                      "whole step, split variant (torch GEMM, Triton epilogue) | failed: "
                      "RuntimeError"):
        assert table_row in text
    assert "| tiny-100 | tf32 | whole step (launcher) | " in text


def test_a_numpy_file_that_is_not_one_is_named_as_such(tmp_path):
    """A damaged .npz (or a .npy without numpy's header) was reported in numpy's words, that
    the file "contains pickled (object) data"."""
    from grood.io import load_features

    np.savez(tmp_path / "good.npz", features=np.ones((3, 2), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:40])
    (tmp_path / "text.npy").write_text("0.5, 1.5\n")
    for name, what in (("cut.npz", r"not a NumPy \.npz file \(not a zip archive\)"),
                       ("text.npy", r"not a NumPy \.npy file \(no \.npy header\)")):
        with pytest.raises(ValueError, match=what) as exc:
            load_features(tmp_path / name)
        assert "pickle" not in str(exc.value)
    assert load_features(tmp_path / "good.npz").features.shape == (3, 2)


def test_feature_and_score_files_that_cannot_be_used_are_named(tmp_path):
    from safetensors.numpy import save_file

    from grood.io import load_features, save_scores

    with pytest.raises(FileNotFoundError, match="no feature file at"):
        load_features(tmp_path / "absent.npz")
    (tmp_path / "f.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; use one of") as exc:
        load_features(tmp_path / "f.csv")
    # the conversion the error names reads the table and writes a file grood reads
    convert = re.search(r"converts once, e\.g\. (np\.savez\(.*\)\)) \(skiprows=1 past a header",
                        str(exc.value))
    assert convert, str(exc.value)
    exec(convert.group(1).replace("dtype=np.float32)", "dtype=np.float32, skiprows=1)"),
         {"np": np})
    assert load_features(tmp_path / "f.npz").features.tolist() == [[1, 2], [3, 4]]
    (tmp_path / "f.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"f\.safetensors: could not read the file"):
        load_features(tmp_path / "f.safetensors")
    torch.save({"features": torch.ones(3, 2), "labels": [0, 1, 2]}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="'labels' is a list, not an array"):
        load_features(tmp_path / "f.pt")
    torch.save((torch.ones(3, 2), torch.zeros(3, dtype=torch.long)), tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"t\.pt holds a tuple, not a tensor \(the features\) "
                                         r"or a dict of tensors named features, labels, "
                                         r"logits\. A feature file names its arrays"):
        load_features(tmp_path / "t.pt")
    save_file({"features": np.ones((3, 2), np.float32)}, str(tmp_path / "g.safetensors"))
    assert load_features(tmp_path / "g.safetensors").features.shape == (3, 2)
    scores, preds = np.zeros(3), np.zeros(3, np.int64)
    neighbours = (np.zeros((3, 2)), np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"\.npy holds the scores alone, not the neighbours"):
        save_scores(tmp_path / "s.npy", scores, preds, None, None, neighbours=neighbours)
    with pytest.raises(ValueError, match=r"scores are written as \.npy, \.npz or \.csv, not "
                                         r"'\.txt'"):
        save_scores(tmp_path / "s.txt", scores, preds, None, None)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.txt").exists()


def test_calibrate_saves_a_threshold_that_score_and_eval_apply(tmp_path, capsys):
    """``fit --calibrate`` and ``grood calibrate`` (in place) save the threshold GROOD.calibrate
    chooses; ``score`` then writes an ``ood`` column (.csv) and ``eval`` the fraction of each
    set flagged; the training file and --tpr without --calibrate are refused."""
    x, y = clustered_features(150, 3, 8, seed=0, spread=0.3, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x[:90], labels=y[:90])
    _write(tmp_path / "val.npy", features=x[90:130])
    _write(tmp_path / "test.npy", features=x[130:])
    _write(tmp_path / "ood.npy", features=torch.rand(25, 8) * 4 + 2)
    det_path, plain = tmp_path / "det.safetensors", tmp_path / "plain.safetensors"
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det_path), "--calibrate",
                 str(tmp_path / "val.npy"), "--tpr", "0.9"]) == 0
    assert "threshold" in capsys.readouterr().out
    expected = GROOD().fit(x[:90], y[:90]).calibrate(x[90:130], tpr=0.9)
    assert GROOD.load(det_path).calibration_ == expected.calibration_

    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(plain)]) == 0
    assert main(["calibrate", str(plain), str(tmp_path / "val.npy"), "-o", str(plain),
                 "--tpr", "0.9"]) == 0
    assert GROOD.load(plain).calibration_ == expected.calibration_
    capsys.readouterr()

    assert main(["score", str(det_path), str(tmp_path / "test.npy"), "-o",
                 str(tmp_path / "s.csv")]) == 0
    assert "flagged as OOD" in capsys.readouterr().out
    rows = [r.split(",") for r in (tmp_path / "s.csv").read_text().splitlines()]
    assert rows[0] == ["index", "score", "pred", "ood"]
    flags = expected.is_ood(x[130:].numpy())
    assert [int(r[3]) for r in rows[1:]] == flags.astype(int).tolist()
    assert main(["score", str(det_path), str(tmp_path / "test.npy"), "-o",
                 str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as out:  # the flags and the threshold they came from
        assert out["ood"].dtype == bool and np.array_equal(out["ood"], flags)
        assert float(out["threshold"]) == expected.threshold_
        np.testing.assert_array_equal(out["score"], expected.score_samples(x[130:].numpy()))

    assert main(["eval", str(det_path), "--id", str(tmp_path / "test.npy"), "--ood",
                 str(tmp_path / "ood.npy"), "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "| flagged |" in text and "accepted at the detector's threshold" in text
    m = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "ood.npy")]
    assert m["flagged"] == float(expected.is_ood(np.load(tmp_path / "ood.npy")).mean())
    accepted = 1 - float(expected.is_ood(np.load(tmp_path / "test.npy")).mean())
    assert m["id_accepted"] == accepted  # what the line above the table says
    assert f"; {100 * accepted:.2f} % accepted at the detector's threshold" in text
    if find_spec("matplotlib"):  # the pictures mark the threshold (tests/test_metrics.py)
        assert main(["eval", str(det_path), "--id", str(tmp_path / "test.npy"), "--ood",
                     str(tmp_path / "ood.npy"), "--plots", str(tmp_path / "figs")]) == 0
        assert (tmp_path / "figs" / "histograms.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["calibrate", str(plain), str(tmp_path / "train.npz"), "-o",
                 str(tmp_path / "c.safetensors")]) == 2
    assert "not on the training set" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(plain), "--tpr", "0.9"]) == 2
    assert "--tpr applies with --calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["fit", str(tmp_path / "train.npz"), "-o", str(tmp_path / "new.safetensors"),
              "--calibrate", str(tmp_path / "val.npy"), "--tpr", "95"])
    assert usage.value.code == 2
    assert ("argument --tpr: must be a fraction in (0, 1], got '95' (for 95 %, pass 0.95)\n"
            in capsys.readouterr().err)
    assert not (tmp_path / "new.safetensors").exists()
    # a usage error, not one of the feature file's (it was named as the file's before)
    with pytest.raises(SystemExit) as usage:
        main(["calibrate", str(plain), str(tmp_path / "val.npy"), "-o",
              str(tmp_path / "c.safetensors"), "--tpr", "nan"])
    assert usage.value.code == 2
    assert "argument --tpr: must be a fraction in (0, 1], got 'nan'" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_info_describes_a_detector_file_and_checks_it_on_request(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from grood import __version__

    x, y = clustered_features(90, 3, 6, seed=1, dtype=torch.float32)
    det = GROOD(k=2, ood_prototype="features").fit(x, y, ood_features=x[:5] + 3)
    det.calibrate(clustered_features(30, 3, 6, seed=5, dtype=torch.float32)[0], tpr=0.9)
    path = tmp_path / "d.safetensors"
    det.save(path)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    for part in (f"GROOD detector, format version 2, written by grood {__version__}",
                 "90 rows, 3 classes, 6-d float32 features",
                 f"{det.index_.ntotal} gradients; training rows recorded",
                 "k = 2, precision ieee", "prototype 'features'",
                 f"{det.threshold_:.6g}: accepts 90 % of the 30 held-out ID rows",
                 "chosen on, 87.1 ± 5.9 % of new ones",  # 27 of 30: Beta(27, 4)
                 "header only"):
        assert part in text, (part, text)
    with safe_open(str(path), framework="pt") as f:
        digest = f.metadata()["digest"]
    assert f"  digest       {digest} (SHA-256 of its tensors and settings)\n" in text
    assert main(["info", "--json", "--check", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checked"] and info["n_train"] == 90 and info["indexed"] == det.index_.ntotal
    assert info["index_centred"] is False
    assert info["digest"] == digest and info["shards"] is None
    assert info["calibration"] == det.calibration_ and info["k"] == 2
    # A damaged tensor: the header still reads, --check refuses it (exit 3, as score does).
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["class_prototypes"][0, 0] += 1
    save_file(tensors, str(path), metadata=meta)
    assert main(["info", str(path)]) == 0
    capsys.readouterr()
    assert main(["info", "--check", str(path)]) == 3
    assert "is corrupt: its checksum does not match" in capsys.readouterr().err
    # A file of a newer format: refused, naming its writer.
    meta.update(format_version="4", written_by="grood 7.1.0")
    save_file(tensors, str(path), metadata=meta)
    assert main(["info", str(path)]) == 3
    assert "format version 4 (written by grood 7.1.0)" in capsys.readouterr().err
    # A format version 1 file names no writer and no training rows.
    assert main(["info", str(Path(__file__).parent / "data" / "detector_v1.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "format version 1 (" in text and "training rows not recorded" in text
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 2
    assert "no detector file" in capsys.readouterr().err
    # A manifest naming two copies of a one-process file: not one sharded detector's files.
    from grood.persistence import SHARDED_FORMAT, file_sha256
    det.save(path)
    shutil.copy(path, tmp_path / "e.safetensors")
    (tmp_path / "m.json").write_text(json.dumps({
        "format": SHARDED_FORMAT, "format_version": 2, "world_size": 2,
        "shards": [{"file": f, "sha256": file_sha256(tmp_path / f)}
                   for f in ("d.safetensors", "e.safetensors")]}))
    assert main(["info", str(tmp_path / "m.json")]) == 3
    assert "lists 2 shard(s) but d.safetensors records 1 shard size(s)" in (
        capsys.readouterr().err)
    # fit_model's feature layer, which score_model reads again.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained net's logits
        GROOD().fit_model(net, [(x[:45], y[:45]), (x[45:], y[45:])], features="1").save(path)
    assert main(["info", str(path)]) == 0
    assert "  model        fit_model read features '1'" in capsys.readouterr().out

    class Listing(torch.nn.Module):  # gives its features with return_feature_list=True
        def __init__(self):
            super().__init__()
            self.body, self.head = net[:2], net[2]

        def forward(self, inputs, return_feature_list=False):
            f = self.body(inputs)
            return (self.head(f), [f]) if return_feature_list else self.head(f)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GROOD().fit_model(Listing(), [(x[:45], y[:45]), (x[45:], y[45:])]).save(path)
    assert main(["info", str(path)]) == 0  # (the line ended "fit_model read ")
    assert ("  model        fit_model read the features the model returns with "
            "return_feature_list=True\n") in capsys.readouterr().out


def test_score_eval_and_calibrate_take_precision_and_batch_size(tmp_path, capsys, monkeypatch):
    """--precision and --batch-size replace the saved settings for the run (a detector fitted
    in ieee scores in tf32 on a GPU without a refit); calibrate saves them with its threshold,
    score and eval leave the file as it was."""
    import grood.detector

    x, y = clustered_features(120, 3, 8, seed=0, spread=0.3, dtype=torch.float32)
    _write(tmp_path / "train.npz", features=x[:80], labels=y[:80])
    _write(tmp_path / "val.npy", features=x[80:])
    det_path = tmp_path / "det.safetensors"
    assert main(["fit", str(tmp_path / "train.npz"), "-o", str(det_path)]) == 0
    seen = []
    real = grood.detector.GROOD.score_and_predict

    def spy(self, features):
        seen.append((self.precision, self.batch_size))
        return real(self, features)

    monkeypatch.setattr(grood.detector.GROOD, "score_and_predict", spy)
    flags = ["--precision", "tf32", "--batch-size", "7"]
    assert main(["score", str(det_path), str(tmp_path / "val.npy"), "-o",
                 str(tmp_path / "s.npy"), *flags]) == 0
    assert main(["eval", str(det_path), "--id", str(tmp_path / "val.npy"), "--ood",
                 str(tmp_path / "train.npz"), *flags]) == 0
    assert len(seen) >= 3 and set(seen) == {("tf32", 7)}  # score; eval: ID and OOD sets
    saved = GROOD.load(det_path)
    assert (saved.precision, saved.batch_size) == ("ieee", 4096)
    # The CPU computes every mode in fp32: the same scores.
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"),
                                  saved.score_samples(x[80:].numpy()))
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", str(det_path), str(tmp_path / "val.npy"), "-o", str(out),
                 *flags]) == 0
    cal = GROOD.load(out)
    assert (cal.precision, cal.batch_size) == ("tf32", 7)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["score", str(det_path), str(tmp_path / "val.npy"), "-o", str(tmp_path / "t.npy"),
              "--precision", "fp8"])
    assert ("argument --precision: must be one of ('ieee', 'tf32', 'tf32x3', 'bf16'), got "
            "'fp8'") in capsys.readouterr().err


def test_tune_chooses_on_validation_files_and_saves_the_chosen_detector(tmp_path, capsys):
    from grood import KNN, ood_metrics

    x, y, logits, means, ood, _, _ = _last_layer_files(tmp_path, seed=0, ood_seed=1)
    files = ["--train", str(tmp_path / "train.npz"), "--id-val", str(tmp_path / "id.npz"),
             "--ood-val", str(tmp_path / "ood.npz")]
    out, js, png = (str(tmp_path / n) for n in ("best.safetensors", "r.json", "k.png"))
    capsys.readouterr()
    argv = ["tune", "grood", "--grid", "k=1,3,7", *files, "--json", js, "-o", out]
    if find_spec("matplotlib"):
        argv += ["--plot", png]
    assert main(argv) == 0
    text = capsys.readouterr().out
    result = json.loads(Path(js).read_text())
    assert result["fits"] == 1 and [p["params"] for p in result["points"]] == [
        {"k": 1}, {"k": 3}, {"k": 7}]
    best = result["best_params"]["k"]
    det = GROOD.load(out)
    assert det.k == best and f"saved the detector fitted with {{'k': {best}}}" in text
    want = GROOD(k=best).fit(x[:100], y[:100], logits=logits[:100])
    assert ood_metrics(want.score_samples(x[100:]), want.score_samples(ood)) == \
        result["points"][result["best_index"]]["metrics"][str(tmp_path / "ood.npz")]
    assert "| k " in text and " *" in text
    # the OOD features for the points whose prototype reads them
    assert main(["tune", "grood", "--grid", "ood_prototype=mean,features", *files,
                 "--ood-features", str(tmp_path / "ood.npz")]) == 0
    assert "(2 points, 2 fits)" in capsys.readouterr().out
    if find_spec("matplotlib"):
        assert Path(png).read_bytes()[:4] == b"\x89PNG" and "against k" in text
    # a baseline, its grid over two parameters; fpr95 chooses the lowest
    assert main(["tune", "knn", "--grid", "k=1,5", "--grid", "backend=torch", *files,
                 "--metric", "fpr95"]) == 0
    text = capsys.readouterr().out
    fpr = [ood_metrics(KNN(k=k).fit(x[:100]).score_samples(x[100:]),
                       KNN(k=k).fit(x[:100]).score_samples(ood))["fpr95"] for k in (1, 5)]
    assert f"k={(1, 5)[int(np.argmin(fpr))]}, backend=torch has the lowest FPR@95" in text
    # the last layer from --head, in place of --train's logits
    head = tmp_path / "head.npz"
    np.savez(head, weight=means.numpy(), bias=np.array([0.5, -0.25, 0.0], np.float32))
    assert main(["tune", "react", "--grid", "percentile=80,90", "--train",
                 str(tmp_path / "bare.npz"), "--id-val", str(tmp_path / "id.npz"),
                 "--ood-val", str(tmp_path / "ood.npz"), "--head", str(head)]) == 0
    assert "ReAct: percentile=" in capsys.readouterr().out


def test_tune_refuses_bad_grids_and_options_before_any_fit(tmp_path, capsys, monkeypatch):
    _last_layer_files(tmp_path, seed=0, ood_seed=1)
    files = ["--train", str(tmp_path / "train.npz"), "--id-val", str(tmp_path / "id.npz"),
             "--ood-val", str(tmp_path / "ood.npz")]
    capsys.readouterr()

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted")

    monkeypatch.setattr(GROOD, "fit", no_fit)
    for argv, said, code in (
            (["tune", "grood", "--grid", "k", *files], "--grid: takes NAME=VALUE,VALUE", 2),
            (["tune", "grood", "--grid", "k=1,", *files], "--grid: takes NAME=VALUE", 2),
            (["tune", "odin", "--grid", "noise=0", *files], "ODIN scores the model's inputs",
             2),
            (["tune", "grood", "--grid", "k=1", "--grid", "k=2", *files],
             "--grid names k twice", 2),
            (["tune", "grood", "--grid", "kk=1,2", *files], "has no parameter 'kk'", 2),
            (["tune", "msp", "--grid", "temperature=1,2", *files, "-o",
              str(tmp_path / "m.safetensors")], "msp has no detector file", 2),
            (["tune", "knn", "--grid", "k=1,2", *files, "--head", str(tmp_path / "id.npz")],
             "--head is read only by the last-layer baselines", 2),
            (["tune", "knn", "--grid", "k=1,2", *files, "--ood-features",
              str(tmp_path / "ood.npz")], "--ood-features is read only by grood", 2),
            (["tune", "grood", "--grid", "k=1,2", *files, "--json",
              str(tmp_path / "id.npz")], "is the ID validation file this command reads", 2),
            (["tune", "grood", "--grid", "k=1,2", *files, "--json",
              str(tmp_path / "o.safetensors"), "-o", str(tmp_path / "o.safetensors")],
             "two of --json, --plot and --out name the same file", 2),
            (["tune", "grood", "--grid", "k=1", *files, "--plot", str(tmp_path / "k.png")],
             "every --grid here gives one", 2),
            (["tune", "grood", "--grid", "k=1", "--train", str(tmp_path / "nope.npz"),
              *files[2:]], "no training feature file at", 2)):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            rc = exit_.code
        assert rc == code, argv
        assert said in capsys.readouterr().err, argv
    from grood.cli import grid_arg

    assert grid_arg("variant=s,b") == ("variant", ["s", "b"])
    assert grid_arg(" k = 1, 2 ") == ("k", [1, 2])
    assert grid_arg("t=1e3,0.5,none,True") == ("t", [1000.0, 0.5, None, True])
