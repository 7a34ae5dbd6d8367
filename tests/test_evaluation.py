"""grood.evaluate: grood eval's measurements for Python, on arrays, mappings and files."""

import copy
import csv
import io
import warnings

import numpy as np
import pytest
import torch
from conftest import clustered_features

from grood import (
    GROOD,
    KNN,
    MSP,
    Evaluation,
    Mahalanobis,
    NotFittedError,
    evaluate,
    ood_metrics,
)
from grood.metrics import mean_of_sets, percentile_intervals, resampled_set_metrics


@pytest.fixture
def fitted():
    """A detector on 3 classes, a held-out ID set with labels and logits, and four OOD sets
    (two near, two far) with logits."""
    x, y = clustered_features(150, 3, 6, seed=9, spread=0.5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    det = GROOD().fit(x[:90], y[:90])
    logits = 4 * torch.nn.functional.one_hot(y, 3).float() + torch.randn(150, 3, generator=gen)
    noise = torch.randn(80, 6, generator=gen)
    near = {"n0": x[:20] + 1.2 * noise[:20], "n1": x[20:40] + 1.6 * noise[20:40]}
    far = {"f0": 4 * noise[40:60], "f1": 6 * noise[60:]}
    ood_logits = torch.randn(20, 3, generator=gen)
    id_set = {"features": x[90:], "labels": y[90:], "logits": logits[90:]}
    return det, id_set, near, far, ood_logits


def test_evaluate_measures_each_set_and_group_as_ood_metrics_does(fitted):
    """Each set's metrics are ood_metrics of the detector's scores; each group of two or more
    has a mean row (unweighted, as OpenOOD), in the table's order; the ID set's accuracy is
    its nearest-prototype accuracy; arrays, tensors and mappings are all sets."""
    det, id_set, near, far, _ = fitted
    ev = evaluate(det, id_set, {"other": far["f1"].numpy()}, near=near,
                  far={"f0": {"features": far["f0"]}})
    assert isinstance(ev, Evaluation)
    assert list(ev.results) == ["n0", "n1", "near-OOD mean of 2 sets", "f0", "other"]
    id_scores = det.score_samples(id_set["features"]).numpy()
    for name, x in (*near.items(), ("f0", far["f0"]), ("other", far["f1"])):
        got = {k: ev.results[name][k] for k in ("auroc", "fpr95", "aupr_in", "aupr_out")}
        assert got == ood_metrics(id_scores, det.score_samples(x).numpy())
        assert ev.results[name]["n_ood"] == 20 and ev.results[name]["n_id"] == 60
    assert [ev.results[n].get("group") for n in ("n0", "f0", "other")] == ["near", "far", None]
    mean = ev.results["near-OOD mean of 2 sets"]
    assert mean["mean_of"] == ["n0", "n1"] and mean["group"] == "near"
    assert mean["auroc"] == pytest.approx((ev.results["n0"]["auroc"]
                                           + ev.results["n1"]["auroc"]) / 2, abs=1e-15)
    accuracy = float((det.predict(id_set["features"]) == id_set["labels"]).float().mean())
    assert ev.results["n0"]["id_accuracy"] == pytest.approx(accuracy)
    assert ev.id_info["id_logits_accuracy"] == pytest.approx(float(
        (id_set["logits"].argmax(1) == id_set["labels"]).float().mean()))
    np.testing.assert_array_equal(ev.scores["GROOD"][ev.id_key], id_scores)
    table = ev.table()
    assert table.splitlines()[0].startswith("| OOD set ") and "near-OOD mean of 2 sets" in table
    assert ev.difference_table() is None and ev.threshold is None


def test_evaluate_scores_baselines_with_intervals_and_openood_csv(fitted):
    """Fitted baselines are scored on each set's logits or features beside GROOD, paired
    intervals come with bootstrap, and openood_csv has a method column; a set without the
    logits a baseline scores is named."""
    det, id_set, near, far, ood_logits = fitted
    msp = MSP().fit(id_set["logits"])
    knn = KNN(k=3).fit(id_set["features"])
    sets = {name: {"features": x, "logits": ood_logits} for name, x in near.items()}
    ev = evaluate(det, id_set, sets, baselines=[msp, knn], bootstrap=100)
    assert ev.baselines == ["MSP", "KNN (k=3)"]
    id_msp = msp.score_samples(id_set["logits"]).numpy()
    got = ev.results["n0"]["baselines"]["MSP"]
    assert got["auroc"] == ood_metrics(id_msp, msp.score_samples(ood_logits).numpy())["auroc"]
    assert "grood_minus_ci95" in got and "ci95" in ev.results["n0"]
    per = resampled_set_metrics(ev.scores["GROOD"][ev.id_key],
                                [ev.scores["GROOD"][n] for n in near], n_boot=100)
    lo_hi = percentile_intervals(mean_of_sets(per))["auroc"]
    assert ev.results["mean of 2 sets"]["ci95"]["auroc"] == pytest.approx(list(lo_hi),
                                                                           abs=1e-15)
    assert "KNN (k=3)" in ev.difference_table()
    table = list(csv.reader(io.StringIO(ev.openood_csv())))
    assert table[0] == ["dataset", "method", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert [r[:2] for r in table[1:4]] == [["n0", "GROOD"], ["n0", "MSP"], ["n0", "KNN (k=3)"]]
    assert table[-1][0] == "ood"
    # ACC: MSP's and KNN's, the logits' (OpenOOD's postprocessors predict from them), on the
    # baseline's entry of every row and in the CSV.
    logits_acc = ev.id_info["id_logits_accuracy"]
    for row in table[1:]:
        key = "mean of 2 sets" if row[0] == "ood" else row[0]
        m = ev.results[key] if row[1] == "GROOD" else ev.results[key]["baselines"][row[1]]
        assert m["id_accuracy"] == (ev.id_info["id_accuracy"] if row[1] == "GROOD"
                                    else logits_acc)
        assert float(row[-1]) == pytest.approx(100 * m["id_accuracy"], abs=1e-4)
    # A baseline that predicts (Mahalanobis: the nearest class mean) is scored on its own
    # predictions: here fitted on labels shifted by one class, so it gets none right.
    y = np.asarray(id_set["labels"])
    maha = Mahalanobis().fit(id_set["features"], (y + 1) % 3)
    ev = evaluate(det, id_set, sets, baselines=[maha, msp])
    assert [ev.results[k]["baselines"]["Mahalanobis"]["id_accuracy"]
            for k in ("n0", "mean of 2 sets")] == [0.0, 0.0]
    assert ev.results["n0"]["baselines"]["MSP"]["id_accuracy"] == logits_acc > 0.9
    # Without labels there is no accuracy for anyone: ACC is empty.
    unlabelled = {"features": id_set["features"], "logits": id_set["logits"]}
    ev = evaluate(det, unlabelled, sets, baselines=[maha, msp])
    assert {row[-1] for row in csv.reader(io.StringIO(ev.openood_csv()))} == {"ACC", ""}
    with pytest.raises(ValueError, match="f0: the MSP baseline scores logits: this set has no "
                                         "'logits'"):
        evaluate(det, id_set, far, baselines=[msp])


def test_an_evaluation_shows_its_tables_not_its_scores(fitted):
    """Shown in a notebook (or printed with repr), an Evaluation dumped every score array of
    every method and set; it now shows the ID line and the tables grood eval prints, as
    Markdown where the notebook renders it."""
    det, id_set, near, _far, ood_logits = fitted
    det = copy.deepcopy(det).calibrate(id_set["features"][:30])
    msp = MSP().fit(id_set["logits"])
    sets = {name: {"features": x, "logits": ood_logits} for name, x in near.items()}
    ev = evaluate(det, id_set, sets, baselines=[msp], bootstrap=100, id_name="val")
    summary = ev.summary()
    assert summary.startswith(f"ID: val ({len(id_set['features'])} samples); nearest-prototype "
                              f"accuracy {100 * ev.id_info['id_accuracy']:.2f} %, the logits' ")
    assert f"accepted at the detector's threshold {det.threshold_:.6g}\n\n" in summary
    assert ev.table() in summary and ev.difference_table() in summary
    assert "GROOD minus each baseline on the same samples" in summary
    assert repr(ev) == f"<grood Evaluation>\n{summary}" and ev._repr_markdown_() == summary
    assert "array(" not in repr(ev) and len(repr(ev)) < 4000
    plain = evaluate(det, id_set["features"], near)  # no labels, baselines or intervals
    assert plain.summary() == (f"ID: the ID set ({len(id_set['features'])} samples); "
                               f"{100 * plain.id_info['id_accepted']:.2f} % accepted at the "
                               f"detector's threshold {det.threshold_:.6g}\n\n{plain.table()}")


def test_evaluate_applies_the_threshold_and_draws_the_pictures(fitted, tmp_path):
    """A calibrated detector's threshold gives the fraction of ID rows accepted and of each
    OOD set flagged (a column of the table); plot() draws the ROC curves, the histograms and,
    with bootstrap and baselines, the differences."""
    pytest.importorskip("matplotlib")
    det, id_set, near, _, ood_logits = fitted
    det.calibrate(id_set["features"][:30], tpr=0.9)
    msp = MSP().fit(id_set["logits"])
    sets = {name: {"features": x, "logits": ood_logits} for name, x in near.items()}
    ev = evaluate(det, id_set, sets, baselines=[msp], bootstrap=100)
    assert (ev.threshold, ev.threshold_tpr) == (det.threshold_, 0.9)
    scores = det.score_samples(id_set["features"]).numpy()
    assert ev.id_info["id_accepted"] == float(np.mean(scores >= det.threshold_))
    flagged = float(np.mean(det.score_samples(near["n1"]).numpy() < det.threshold_))
    assert ev.results["n1"]["flagged"] == flagged
    assert ev.table().splitlines()[0].rstrip("|").rstrip().endswith("flagged")
    written = ev.plot(tmp_path / "plots")
    assert [p.name for p in written] == ["roc.png", "histograms.png", "differences.png"]
    assert all(p.stat().st_size > 0 for p in written)
    # A file, or an image's name, where the folder belongs: refused before anything is drawn
    # (a file gave "[Errno 17] File exists"; "roc.png" became a folder holding roc.png).
    with pytest.raises(ValueError, match=r"^plot\(\) takes a folder \(it draws roc.png, "
                                         r"histograms.png, differences.png there\); .*roc.png "
                                         r"is a file$"):
        ev.plot(written[0])
    with pytest.raises(ValueError, match=r"names an image file: give the folder to draw into, "
                                         r"e.g. .*/plots/new$"):
        ev.plot(tmp_path / "plots" / "new.pdf")
    assert not (tmp_path / "plots" / "new.pdf").exists()


def test_plot_without_matplotlib_names_the_extra(fitted, tmp_path, monkeypatch):
    """Without matplotlib, plot names grood's extra before it makes any folder."""
    import sys

    from grood import MissingExtraError

    det, id_set, near, _, _ = fitted
    ev = evaluate(det, id_set, {"n0": near["n0"]})
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (import matplotlib fails)
    with pytest.raises(MissingExtraError, match=r"pip install 'grood\[plots\]'"):
        ev.plot(tmp_path / "figures")
    assert not (tmp_path / "figures").exists()


def test_evaluate_reads_feature_files_and_warns_as_grood_eval(fitted, tmp_path):
    """A set may be a feature file's path; the ID set given as the training set gets grood
    eval's warning, naming it (id_name)."""
    det, id_set, near, _, _ = fitted
    np.savez(tmp_path / "id.npz", **{k: v.numpy() for k, v in id_set.items()})
    np.savez(tmp_path / "n0.npz", features=near["n0"].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_path = evaluate(det, str(tmp_path / "id.npz"), {"n0": tmp_path / "n0.npz"})
    assert by_path.results["n0"]["auroc"] == evaluate(det, id_set, {"n0": near["n0"]}
                                                      ).results["n0"]["auroc"]
    x, y = clustered_features(150, 3, 6, seed=9, spread=0.5, dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"the training set: \d+ of its 90 rows equal indexed "
                                         "training rows"):
        evaluate(det, {"features": x[:90], "labels": y[:90]}, near, id_name="the training set")


def test_an_ood_set_that_repeats_id_rows_is_named(fitted):
    """The ID set given again as an OOD set measured AUROC 0.5 without a word; it is named
    now, with the count, and so is a set that holds some ID rows in another dtype and order
    among its own. Sets of other samples are not, however near the ID rows they lie."""
    det, id_set, near, far, _ = fitted
    x = id_set["features"]
    mixed = torch.cat([far["f0"], x[:7].flip(0).half().float()])  # 7 of its 27 rows
    close = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ev = evaluate(det, id_set, {"again": x.clone(), "mixed": mixed, "close": close},
                      near=near)
    said = [str(w.message) for w in seen]
    assert said == [
        "again: 60 of its 60 rows repeat rows of the ID set (100.0%): they score as those "
        "in-distribution rows do, so the metrics on this set measure that overlap, not the "
        "detector: is it the ID set given again, or do the two datasets share samples?",
        "mixed: 7 of its 27 rows repeat rows of the ID set (25.9%): they score as those "
        "in-distribution rows do, so the metrics on this set measure that overlap, not the "
        "detector: is it the ID set given again, or do the two datasets share samples?"]
    assert ev.results["again"]["warnings"] == said[:1]
    assert ev.results["again"]["auroc"] == 0.5
    assert all("warnings" not in ev.results[n] for n in ("n0", "n1", "close"))


def _sharded(det):
    """``det`` as a rank's shard of a detector loaded with ``distributed=True`` says it is."""
    det._sharded = True
    return det


def _not_scored(det):
    """``det``, failing the test if anything is scored with it."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("scored before the baselines were checked")

    det = copy.deepcopy(det)
    det.score_and_predict = det.score_samples = refuse
    return det


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda det, s, n: evaluate(det, s), ValueError, "give the OOD sets"),
    (lambda det, s, n: evaluate(det, s, {"n0": n["n0"]}, near=n), ValueError,
     "an OOD set is named more than once"),
    (lambda det, s, n: evaluate(det, s, {1: n["n0"], "1": n["n1"]}), ValueError,
     r"an OOD set is named more than once \(names compare as text, across groups\): 1$"),
    # One set given bare failed in "Boolean value of Tensor ... is ambiguous" (a list, in
    # "'list' object has no attribute 'items'").
    (lambda det, s, n: evaluate(det, s, n["n0"]), TypeError,
     r"ood takes OOD sets by name, a mapping \(ood=\{'name': set, ...\}; one set: "
     r"ood=\{'ood': x\}\), got Tensor"),
    (lambda det, s, n: evaluate(det, s, far=[n["n0"]]), TypeError, "far takes OOD sets by "
                                                                    "name.*got list"),
    (lambda det, s, n: evaluate(det, s, {"mean of 2 sets": n["n0"], "a": n["n1"]}), ValueError,
     "an OOD set is named like a mean row"),
    (lambda det, s, n: evaluate(det, {"features": s["features"], "label": s["labels"]}, n),
     ValueError, r"holds 'features' and optionally 'labels' and 'logits'; got keys "
                 r"\['features', 'label'\]"),
    (lambda det, s, n: evaluate(det, s, n, bootstrap=20), ValueError, "at least 100"),
    (lambda det, s, n: evaluate(det, s, n, baselines=[object()]), TypeError,
     "fitted grood.baselines estimators"),
    # The class given for an instance failed in "type object 'type' has no attribute 'name'";
    # an unfitted one, after GROOD had scored the ID set.
    (lambda det, s, n: evaluate(det, s, n, baselines=MSP().fit(s["logits"])), TypeError,
     r"^baselines takes a list of fitted grood.baselines estimators, got MSP \(one estimator: "
     r"baselines=\[est\]\)$"),  # ("'MSP' object is not iterable")
    (lambda det, s, n: evaluate(det, s, n, bootstrap="1000"), ValueError,
     r"^bootstrap must be a positive integer, got '1000'$"),  # ("'<' not supported ...")
    (lambda det, s, n: evaluate(det, s, n, device="gpu"), ValueError,
     "torch calls a GPU 'cuda'"),  # (ignored without baselines)
    (lambda det, s, n: evaluate(det, s, n, baselines=[KNN]), TypeError,
     r"got the class KNN: pass KNN\(\).fit\(...\)$"),
    (lambda det, s, n: evaluate(_not_scored(det), s, n, baselines=[MSP()]), NotFittedError,
     r"^the MSP baseline is not fitted yet: call fit\(\) on the training set's logits first$"),
    (lambda det, s, n: evaluate(GROOD(), s, n), NotFittedError, "not fitted"),
    (lambda det, s, n: evaluate(_sharded(det), s, n), ValueError,
     "evaluate scores in one process, and this detector is sharded across ranks"),
    (lambda det, s, n: evaluate(det, {**s, "labels": s["labels"] + 5}, n), ValueError,
     "the ID set: .*out of range"),
])
def test_evaluate_refuses_what_it_cannot_measure(fitted, call, exc, match):
    det, id_set, near, _, _ = fitted
    with pytest.raises(exc, match=match):
        call(det, id_set, near)


class _Net(torch.nn.Module):
    """A classifier whose penultimate module is ``body``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.fc(self.body(x))


def test_evaluate_model_runs_each_loader_through_the_model():
    """evaluate_model gives what evaluate gives on the loaders' features, logits and labels
    (the layer fit_model read), OOD loaders by name as OpenOOD's loader dicts hold them; an
    empty loader is named."""
    from torch.utils.data import DataLoader, TensorDataset

    from grood import evaluate_model

    x, y = clustered_features(200, 3, 6, seed=11, spread=0.4, dtype=torch.float32)
    net = _Net().eval()
    with torch.no_grad():  # the head: nearest class mean of the body's features
        centres = torch.stack([net.body(x[y == c]).mean(0) for c in range(3)])
        net.fc.weight.copy_(centres)
        net.fc.bias.copy_(-0.5 * (centres ** 2).sum(1))
        feats, logits = net.body(x), net(x)
    gen = torch.Generator().manual_seed(1)
    ood = {"a": 3 * torch.randn(30, 6, generator=gen), "b": 5 * torch.rand(25, 6, generator=gen)}

    def loader(inputs, labels=None):
        data = TensorDataset(inputs) if labels is None else TensorDataset(inputs, labels)
        return DataLoader(data, batch_size=16)

    det = GROOD(progress=False).fit_model(net, loader(x[:140], y[:140]), features="body")
    ev = evaluate_model(det, net, loader(x[140:], y[140:]),
                        near={n: loader(v, torch.full((len(v),), -1)) for n, v in ood.items()},
                        baselines=[MSP().fit(logits[140:])])
    with torch.no_grad():
        sets = {n: {"features": net.body(v), "logits": net(v)} for n, v in ood.items()}
    want = evaluate(det, {"features": feats[140:], "labels": y[140:], "logits": logits[140:]},
                    near=sets, baselines=[MSP().fit(logits[140:])])
    assert list(ev.results) == list(want.results) == ["a", "b", "near-OOD mean of 2 sets"]
    for name in ev.results:
        for k in ("auroc", "fpr95", "id_accuracy", "id_logits_accuracy"):
            assert ev.results[name][k] == pytest.approx(want.results[name][k], abs=1e-12)
        assert ev.results[name]["baselines"]["MSP"]["auroc"] == pytest.approx(
            want.results[name]["baselines"]["MSP"]["auroc"], abs=1e-12)
    assert ev.id_info["id_accuracy"] == pytest.approx(float(
        (det.predict(feats[140:]) == y[140:]).float().mean()))
    with pytest.raises(ValueError, match="the ID loader: the loader yielded no batches"):
        evaluate_model(det, net, [], {"a": loader(ood["a"])})
    # One OOD loader given bare ("'DataLoader' object has no attribute 'items'" before).
    with pytest.raises(TypeError, match=r"ood takes OOD sets by name, a mapping .*got "
                                        r"DataLoader"):
        evaluate_model(det, net, loader(x[140:], y[140:]), loader(ood["a"]))


def test_fingerprint_matches_equal_the_full_search():
    """The windowed search (both sides sorted by the first fingerprint coordinate) decides as
    a float64 search over every recorded row does: exact and rounded copies, near copies on
    both sides of the tolerance, unrelated rows, a NaN row, rows tied in the first coordinate
    (zero rows), and more rows than one block."""
    from grood.prototypes import FINGERPRINT_TOLERANCE, fingerprint_matches, fingerprint_rows

    gen = torch.Generator().manual_seed(11)
    recorded = torch.randn(3000, 24, generator=gen).relu()
    x = torch.randn(2500, 24, generator=gen).relu()
    x[::5] = recorded[:500].half().float()
    for step, scale in ((7, 1e-3), (11, 3e-2), (13, 1e-2)):
        rows = x[3::step].shape[0]
        x[3::step] = recorded[1000:1000 + rows] + scale * torch.randn(rows, 24, generator=gen)
    x[1], x[2], recorded[7] = float("nan"), 0.0, 0.0
    centre = recorded.mean(0)
    prints = fingerprint_rows(recorded)
    origin = fingerprint_rows(centre[None])
    mine, theirs = fingerprint_rows(x) - origin, prints - origin
    nearest = torch.cdist(mine, theirs, compute_mode="donot_use_mm_for_euclid_dist").min(1)[0]
    nearest = nearest.square()
    full = nearest <= FINGERPRINT_TOLERANCE ** 2 * mine.square().sum(1)
    got = fingerprint_matches(prints, x, centre)
    assert torch.equal(got, full)
    assert 500 < int(got.sum()) < 1200 and not bool(got[1]) and bool(got[2])


def test_ood_fit_rows_are_fingerprinted_and_found_again(tmp_path):
    """Under ood_prototype="features" the fit keeps a fingerprint of each row it averaged;
    evaluate warns on a set that repeats more than 1 % of them (rounded, reordered or mixed
    with other rows), with the count, and not on other rows of the distribution. The
    fingerprints survive save / load and to(); a detector without them (loaded from a file
    saved before fingerprints) falls back to comparing the set's mean with the prototype; a damaged
    record is refused on load."""
    from conftest import rewrite_detector_file

    from grood import DetectorFileError
    from grood.prototypes import FINGERPRINT_DIMS, fingerprint_matches, fingerprint_rows

    x, y = clustered_features(150, 3, 6, seed=9, spread=0.5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    fit_rows, other = (2 * torch.randn(50, 6, generator=gen) + 1 for _ in range(2))
    det = GROOD(ood_prototype="features").fit(x[:90], y[:90], ood_features=fit_rows)
    prints = det.ood_fingerprints_
    assert prints.dtype == torch.float64 and prints.shape == (50, FINGERPRINT_DIMS)
    assert prints.device.type == "cpu"
    torch.testing.assert_close(prints, fingerprint_rows(fit_rows), rtol=0, atol=0)
    # Rounded copies match; rows a few % of their distance from the prototype apart do not.
    centre = det.ood_prototype_
    assert bool(fingerprint_matches(prints, fit_rows.half(), centre).all())
    assert bool(fingerprint_matches(prints, fit_rows.double() * (1 + 1e-6), centre).all())
    assert not bool(fingerprint_matches(prints, other, centre).any())
    assert not bool(fingerprint_matches(prints, fit_rows + 0.1 * other, centre).any())
    id_set = {"features": x[90:], "labels": y[90:]}
    mixed = torch.cat([other[:45], fit_rows[7:12]])[torch.randperm(50, generator=gen)]
    with pytest.warns(UserWarning) as caught:
        ev = evaluate(det, id_set, {"mixed": mixed, "other": other, "one": torch.cat(
            [other, 2 * other, fit_rows[:1]])})
    said = [str(w.message) for w in caught]
    assert ev.results["mixed"]["warnings"] == said  # kept with the metrics
    assert "warnings" not in ev.results["other"] and "id_warnings" not in ev.results["mixed"]
    assert said == ["mixed: 5 of its 50 rows repeat rows the detector's OOD prototype was "
                    "averaged from (10.0%; of those 50 rows): the detector was shaped on them "
                    "(grood fit --ood-features, fit(..., ood_features=...)), so the metrics on "
                    "this set are optimistic; fit on a validation OOD set kept apart from the "
                    "test sets, as OpenOOD does"]  # 1 of 101 rows: within the 1 % allowed
    path = tmp_path / "d.safetensors"
    det.save(path)
    assert torch.equal(GROOD.load(path).ood_fingerprints_, prints)
    assert torch.equal(GROOD.load(path).to("cpu").ood_fingerprints_, prints)
    # The fitted source decides, not ood_prototype set since (it applies from the next fit).
    det.set_params(ood_prototype="mean")
    with pytest.warns(UserWarning, match="mixed: 5 of its 50 rows repeat"):
        evaluate(det, id_set, {"mixed": mixed})
    # Without fingerprints: the whole set, by its mean.
    det.ood_fingerprints_ = None
    with pytest.warns(UserWarning, match="fit_rows: its mean is the detector's OOD prototype: "
                                         "it is the OOD set its rows were averaged from"):
        evaluate(det, id_set, {"fit_rows": fit_rows.flip(0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(det, id_set, {"mixed": mixed})  # (the fallback cannot see a part)

    def damage(meta, tensors):
        tensors["ood_fingerprints"] = tensors["ood_fingerprints"][:, :3].contiguous()

    rewrite_detector_file(path, damage)
    with pytest.raises(DetectorFileError, match="its ood_fingerprints are not finite float64 "
                                                "rows of 16 columns"):
        GROOD.load(path)


def test_fingerprint_directions_are_fixed():
    """Fingerprints saved with a detector are compared with ones made later, by another grood
    and another numpy: the directions are pinned."""
    from grood.prototypes import _fingerprint_directions

    got = _fingerprint_directions(3)
    assert got.shape == (3, 16) and got.dtype == torch.float64
    assert torch.equal(_fingerprint_directions(5)[:3], got)
    assert got[0, :3].tolist() == [-1.0021970223604166, -0.9083481338984757, 1.2204583505861923]
    assert got[2, -1].item() == -0.2455845406922956


def test_evaluate_holds_one_set_at_a_time(fitted):
    """A set's rows are let go once it is scored, before the next set is read: memory holds
    one set's features (and every set's scores), as evaluate_model's loaders need at
    ImageNet scale."""
    import gc
    import weakref

    from grood.evaluation import LazySet
    from grood.io import FeatureFile

    det, id_set, near, far, _ = fitted
    alive: list[weakref.ref] = []
    order = []

    def reading(name, x):
        def read():
            gc.collect()
            order.append((name, [ref() is not None for ref in alive]))
            features = x.clone()
            alive.append(weakref.ref(features))
            return FeatureFile(features, None, None)
        return LazySet(read)

    ev = evaluate(det, reading("id", id_set["features"]),
                  {name: reading(name, x) for name, x in {**near, **far}.items()})
    assert order == [("id", []), ("n0", [False]), ("n1", [False, False]),
                     ("f0", [False, False, False]), ("f1", [False, False, False, False])]
    assert list(ev.results) == ["n0", "n1", "f0", "f1", "mean of 4 sets"]
