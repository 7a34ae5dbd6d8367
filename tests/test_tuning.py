"""grood.tune: every point of a grid measured as a separate fit would measure it, the best
kept, points differing only in score_params sharing one fit, and bad grids and sets refused
before any fit."""

import json

import numpy as np
import pytest
import torch
from conftest import clustered_features
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import grood
from grood import (
    ASH,
    GEN,
    GROOD,
    KNN,
    MSP,
    ODIN,
    SCALE,
    Energy,
    GradNorm,
    Mahalanobis,
    NNGuide,
    ReAct,
    ood_metrics,
    tune,
)
from grood.baselines import BY_NAME, fit_baseline
from grood.tuning import grid_points, plot_searches

C, D = 4, 6


@pytest.fixture(scope="module")
def sets():
    """A training set whose logits are an affine function of its features, an ID
    validation set of the same classes, and two OOD validation sets."""
    x, y = clustered_features(160, C, D, seed=0, spread=0.5)
    gen = torch.Generator().manual_seed(1)
    means = torch.stack([x[y == c].mean(0) for c in range(C)])
    w, b = means, -0.5 * (means**2).sum(1)  # the nearest class mean, as a linear layer
    head = (w, b)
    xv, yv = clustered_features(60, C, D, seed=2, spread=0.5)
    near = clustered_features(50, C, D, seed=3, spread=1.2)[0]
    far = torch.rand(40, D, generator=gen, dtype=torch.float64) * 3

    def as_set(f, labels=None):
        return {"features": f, "logits": f @ w.T + b,
                **({} if labels is None else {"labels": labels})}

    return {"train": as_set(x, y), "id": as_set(xv, yv),
            "ood": {"near": as_set(near), "far": as_set(far)}, "head": head}


def direct(est, s, ood_name):
    """The metrics of ``est`` (fitted) on one OOD set, computed without tune."""
    inputs = est.inputs if hasattr(est, "inputs") else "features"
    return ood_metrics(np.asarray(est.score_samples(s["id"][inputs])),
                       np.asarray(est.score_samples(s["ood"][ood_name][inputs])))


def test_grid_points_in_order_and_bad_grids_refused():
    assert grid_points({"k": [1, 2], "t": ["a", "b"]}) == [
        {"k": 1, "t": "a"}, {"k": 1, "t": "b"}, {"k": 2, "t": "a"}, {"k": 2, "t": "b"}]
    assert grid_points([{"k": [1]}, {"t": (3, 4)}]) == [{"k": 1}, {"t": 3}, {"t": 4}]
    assert grid_points({}) == [{}]
    points = grid_points({"k": np.arange(1, 3), "t": np.array([0.5])})
    assert points == [{"k": 1, "t": 0.5}, {"k": 2, "t": 0.5}]
    assert type(points[0]["k"]) is int and type(points[0]["t"]) is float  # (JSON writes them)
    with pytest.raises(TypeError, match=r"grid\['k'\] takes a list .* \(one value: \[5\]\)"):
        grid_points({"k": 5})
    with pytest.raises(TypeError, match=r"grid\['variant'\] takes a list"):
        grid_points({"variant": "s"})  # (a string is not a list of strings)
    with pytest.raises(ValueError, match=r"grid\['k'\] is empty"):
        grid_points({"k": []})
    with pytest.raises(ValueError, match="grid is an empty list"):
        grid_points([])
    with pytest.raises(TypeError, match="a list holding int"):
        grid_points([{"k": [1]}, 3])
    with pytest.raises(TypeError, match="grid takes a mapping"):
        grid_points("k")


def test_knn_points_equal_separate_fits_and_share_one(sets):
    given = KNN(k=7)
    t = tune(given, {"k": [1, 3, 12]}, train=sets["train"], id_val=sets["id"],
             ood_val=sets["ood"], progress=False)
    assert t.fits == 1 and t.sets == ["near", "far"] and len(t.results) == 3
    for point, result in zip(t.points, t.results, strict=True):
        est = KNN(**point).fit(sets["train"]["features"])
        for name in ("near", "far"):
            assert result[name] == direct(est, sets, name)
    means = [np.mean([r[s]["auroc"] for s in ("near", "far")]) for r in t.results]
    assert t.best_index == int(np.argmax(means)) and t.best_score == pytest.approx(max(means))
    want = KNN(**t.best_params).fit(sets["train"]["features"])
    assert t.best_estimator.k == t.best_params["k"]
    assert torch.equal(t.best_estimator.score_samples(sets["id"]["features"]),
                       want.score_samples(sets["id"]["features"]))
    assert given.k == 7 and not hasattr(given, "n_features_in_")  # the estimator given: as it was


def test_grood_k_grid_fits_once_and_scores_as_separate_fits(sets, monkeypatch):
    calls = []
    fit = GROOD.fit

    def counted(self, *args, **kwargs):
        calls.append(self.k)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(GROOD, "fit", counted)
    tr = sets["train"]
    t = tune(GROOD(), {"k": [1, 2, 5]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             progress=False)
    assert calls == [1] and t.fits == 1
    for point, result in zip(t.points, t.results, strict=True):
        det = fit(GROOD(**point), tr["features"], tr["labels"], logits=tr["logits"])
        assert result == {name: direct(det, sets, name) for name in ("near", "far")}
    # a parameter the fit depends on: a fit per value
    calls.clear()
    t = tune(GROOD(), {"batch_size": [16, 4096], "k": [1, 2]}, train=tr,
             id_val=sets["id"], ood_val=sets["ood"], progress=False)
    assert calls == [1, 1] and t.fits == 2
    assert t.best_estimator.batch_size == t.best_params["batch_size"]
    # OOD features given to the points whose prototype reads them
    ood_x = sets["ood"]["near"]["features"][:20]
    t = tune(GROOD(), {"ood_prototype": ["mean", "features"]}, train=tr, id_val=sets["id"],
             ood_val=sets["ood"], fit_params={"ood_features": ood_x}, progress=False)
    assert t.fits == 2
    det = fit(GROOD(ood_prototype="features"), tr["features"], tr["labels"],
              logits=tr["logits"], ood_features=ood_x)
    assert t.results[1] == {name: direct(det, sets, name) for name in ("near", "far")}
    assert t.results[0] != t.results[1]


#: For each estimator whose score_params are declared: its fit's other arguments, and two
#: values of each of those parameters.
SCORE_PARAM_CASES = {
    GROOD: ({}, {"k": (1, 3)}),
    MSP: ({}, {"temperature": (1.0, 3.0)}),
    Energy: ({}, {"temperature": (1.0, 0.5)}),
    GEN: ({}, {"gamma": (0.1, 0.5), "M": (2, 3)}),
    KNN: ({}, {"k": (1, 4)}),
    GradNorm: ({}, {"temperature": (1.0, 2.0)}),
    ASH: ({}, {"percentile": (60.0, 85.0), "variant": ("s", "p")}),
    SCALE: ({}, {"percentile": (60.0, 85.0)}),
    NNGuide: ({"bank_fraction": 1.0}, {"k": (2, 5)}),
}


def _fitted(cls, params, tr):
    est = cls(**params)
    if cls is GROOD:
        return est.fit(tr["features"], tr["labels"], logits=tr["logits"])
    return fit_baseline(est, features=tr["features"], labels=tr["labels"], logits=tr["logits"])


@pytest.mark.parametrize("cls", list(SCORE_PARAM_CASES), ids=lambda c: c.__name__)
def test_score_params_set_after_fit_score_as_a_fit_with_them(cls, sets):
    """What lets tune share a fit: a score parameter changed after the fit gives the scores
    of a fit made with it, exactly."""
    fixed, cases = SCORE_PARAM_CASES[cls]
    assert set(cases) == set(cls.score_params)
    tr, inputs = sets["train"], getattr(cls, "inputs", "features")
    for name, (a, b) in cases.items():
        moved = _fitted(cls, {**fixed, name: a}, tr).set_params(**{name: b})
        fresh = _fitted(cls, {**fixed, name: b}, tr)
        for x in (sets["id"][inputs], sets["ood"]["far"][inputs]):
            assert torch.equal(moved.score_samples(x), fresh.score_samples(x)), name
        assert not torch.equal(_fitted(cls, {**fixed, name: a}, tr).score_samples(
            sets["id"][inputs]), fresh.score_samples(sets["id"][inputs])), name


@pytest.mark.parametrize("cls", list(SCORE_PARAM_CASES), ids=lambda c: c.__name__)
def test_a_point_without_a_score_param_scores_at_the_estimators_value(cls, sets):
    """A point that leaves a score parameter out (a grid given as a list of mappings) is
    scored at the estimator's own value, not at the one the point before it in its fit
    group set; and the best estimator, where that point wins, keeps that value."""
    fixed, cases = SCORE_PARAM_CASES[cls]
    tr, inputs = sets["train"], getattr(cls, "inputs", "features")
    given = {name: a for name, (a, _) in cases.items()}
    other = {name: [b] for name, (_, b) in cases.items()}
    t = tune(cls(**fixed, **given), [other, {}], train=tr, id_val=sets["id"],
             ood_val=sets["ood"], progress=False)
    assert t.fits == 1
    want = _fitted(cls, {**fixed, **given}, tr)
    assert t.results[1] == {name: direct(want, sets, name) for name in ("near", "far")}
    assert t.results[0] != t.results[1]
    # the best estimator: order the values so that the point without them wins, first
    def mean_auroc(values):
        est = _fitted(cls, {**fixed, **values}, tr)
        return np.mean([direct(est, sets, name)["auroc"] for name in ("near", "far")])

    b_values = {name: b for name, (_, b) in cases.items()}
    if mean_auroc(b_values) > mean_auroc(given):
        given, b_values = b_values, given
    t = tune(cls(**fixed, **given), [{}, {name: [v] for name, v in b_values.items()}],
             train=tr, id_val=sets["id"], ood_val=sets["ood"], progress=False)
    assert t.best_index == 0
    best = t.best_estimator
    assert {name: getattr(best, name) for name in cases} == given
    assert torch.equal(best.score_samples(sets["id"][inputs]),
                       _fitted(cls, {**fixed, **given}, tr).score_samples(sets["id"][inputs]))


def test_every_declared_score_param_is_covered():
    declared = {cls for cls, _ in BY_NAME.values() if cls.score_params} | {GROOD}
    assert declared == set(SCORE_PARAM_CASES)


def test_a_fit_time_parameter_refits_each_value(sets):
    tr = sets["train"]
    t = tune(ReAct(), {"percentile": [70, 90]}, train=tr, id_val=sets["id"],
             ood_val=sets["ood"], progress=False)
    assert t.fits == 2
    for point, result in zip(t.points, t.results, strict=True):
        est = ReAct(**point).fit(tr["features"], logits=tr["logits"])
        assert result == {name: direct(est, sets, name) for name in ("near", "far")}
    # the last layer given in fit_params in place of the logits it is recovered from
    w, b = sets["head"]
    t2 = tune(ReAct(), {"percentile": [70, 90]}, train={"features": tr["features"]},
              id_val=sets["id"], ood_val=sets["ood"], fit_params={"weight": w, "bias": b},
              progress=False)
    est = ReAct(percentile=90).fit(tr["features"], weight=w, bias=b)
    assert t2.results[1]["near"] == direct(est, sets, "near")


def test_metric_direction_ties_and_the_table(sets):
    tr = sets["train"]
    t = tune(KNN(), {"k": [2, 2, 9]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             metric="fpr95", progress=False)
    fpr = t.means("fpr95")
    assert fpr[0] == fpr[1] and t.best_index in (0, 2)
    assert fpr[t.best_index] == min(fpr) and t.best_index == fpr.index(min(fpr))
    assert t.means("auroc") != fpr
    table = t.table()
    assert "FPR@95 near" in table and "FPR@95 mean" in table
    star_rows = [row for row in table.splitlines() if row.rstrip(" |").endswith("*")]
    assert len(star_rows) == 1 and f"{100 * fpr[t.best_index]:.2f} *" in star_rows[0]
    assert "lowest" in t.summary() and "KNN" in repr(t)
    plain = json.loads(json.dumps(t.as_dict()))
    assert plain["best_params"] == t.best_params and plain["method"] == "KNN"
    assert [p["mean"] for p in plain["points"]] == fpr
    # one OOD set, given alone; logits alone for a logit baseline
    lone = tune(GEN(), {"gamma": [0.1, 1.0]}, train={"logits": tr["logits"]},
                id_val={"logits": sets["id"]["logits"]},
                ood_val=sets["ood"]["far"]["logits"], progress=False)  # an array: logits
    assert lone.sets == ["OOD"]
    gen = GEN(gamma=1.0).fit(tr["logits"])
    want = ood_metrics(gen.score_samples(sets["id"]["logits"]),
                       gen.score_samples(sets["ood"]["far"]["logits"]))
    assert lone.results[1]["OOD"] == want
    assert [c.strip() for c in lone.table().splitlines()[0].split("|")[1:-1]] == ["gamma",
                                                                                 "AUROC"]


def test_odin_points_through_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x_id = torch.randn(20, 3, 2, 2, generator=gen, dtype=torch.float64)
    x_ood = torch.randn(16, 3, 2, 2, generator=gen, dtype=torch.float64) * 3

    def loader(x):
        return DataLoader(TensorDataset(x), batch_size=7)

    t = tune(ODIN(progress=False), {"temperature": [1.0, 1000.0], "noise": [0.0, 0.01]},
             model=net, id_val=loader(x_id), ood_val={"wide": loader(x_ood)}, progress=False)
    assert t.fits == 0 and len(t.points) == 4
    for point, result in zip(t.points, t.results, strict=True):
        odin = ODIN(progress=False, **point)
        want = ood_metrics(odin.score_model(net, loader(x_id))[0],
                           odin.score_model(net, loader(x_ood))[0])
        assert result["wide"] == want
    assert t.best_estimator.get_params()["temperature"] == t.best_params["temperature"]
    with pytest.raises(ValueError, match="ODIN scores the model's inputs: give model"):
        tune(ODIN(), {"noise": [0.0]}, id_val=loader(x_id), ood_val=loader(x_ood))
    with pytest.raises(ValueError, match=r"ODIN learns nothing .*give no train"):
        tune(ODIN(), {"noise": [0.0]}, model=net, train=x_id, id_val=loader(x_id),
             ood_val=loader(x_ood))


def test_bad_calls_refused_before_any_fit(sets, monkeypatch):
    def no_fit(self, *args, **kwargs):
        raise AssertionError("fitted")

    monkeypatch.setattr(KNN, "fit", no_fit)
    monkeypatch.setattr(Mahalanobis, "fit", no_fit)
    tr, idv, ood = sets["train"], sets["id"], sets["ood"]
    with pytest.raises(ValueError, match="'kk'"):  # set_params names the unknown parameter
        tune(KNN(), {"kk": [1]}, train=tr, id_val=idv, ood_val=ood)
    with pytest.raises(ValueError, match="metric must be one of auroc, aupr_in"):
        tune(KNN(), {"k": [1]}, train=tr, id_val=idv, ood_val=ood, metric="AUROC")
    with pytest.raises(ValueError, match="KNN is fitted on a training set: give train"):
        tune(KNN(), {"k": [1]}, id_val=idv, ood_val=ood)
    with pytest.raises(ValueError, match="Mahalanobis baseline is fitted on features and "
                                         "labels: give labels"):
        tune(Mahalanobis(), {}, train=tr["features"], id_val=idv, ood_val=ood)
    with pytest.raises(ValueError, match="give no model"):
        tune(KNN(), {"k": [1]}, train=tr, id_val=idv, ood_val=ood, model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"ood_val takes OOD sets by name .* key 'features'"):
        tune(KNN(), {"k": [1]}, train=tr, id_val=idv, ood_val=ood["far"])
    with pytest.raises(ValueError, match="ood_val holds no set"):
        tune(KNN(), {"k": [1]}, train=tr, id_val=idv, ood_val={})
    with pytest.raises(ValueError, match="fit_params for KNN takes weight and bias"):
        tune(KNN(), {"k": [1]}, train=tr, id_val=idv, ood_val=ood, fit_params={"w": 1})
    with pytest.raises(ValueError, match="GROOD is fitted on the training features and "
                                         "labels: train has no labels"):
        tune(GROOD(), {"k": [1]}, train=tr["features"], id_val=idv, ood_val=ood)
    monkeypatch.setattr(MSP, "fit", no_fit)
    with pytest.raises(ValueError, match=r"^far: MSP scores logits, and this set has none"):
        tune(MSP(), {"temperature": [1.0]}, train=tr, id_val=idv,
             ood_val={"far": {"features": ood["far"]["features"]}})
    with pytest.raises(TypeError, match=r"got the class KNN: pass KNN\(\)"):
        tune(KNN, {"k": [1]}, train=tr, id_val=idv, ood_val=ood)
    with pytest.raises(TypeError, match=r"tune takes a grood\.GROOD detector or a grood "
                                        "baseline"):
        tune(object(), {}, train=tr, id_val=idv, ood_val=ood)


def test_an_error_names_its_point(sets):
    tr = sets["train"]
    with pytest.raises(ValueError, match=r"^at k=500: id_val: k=500 but 160 training features"):
        tune(KNN(), {"k": [1, 500]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             progress=False)


def test_k_points_share_one_search_per_set(sets, monkeypatch):
    """Points that differ in k alone are scored from one search per set at the largest k
    (GROOD's exact index, KNN, NNGuide's bank): the same metrics as each k's own scores, a
    third of the searches for three values of k."""
    import grood.index

    searched = []
    search, knn, guidance = grood.index.ExactIndex.search, grood.ops.knn, NNGuide._guidance
    monkeypatch.setattr(grood.index.ExactIndex, "search",
                        lambda self, q, k=1: searched.append(k) or search(self, q, k))
    monkeypatch.setattr(grood.ops, "knn",
                        lambda q, db, k=1, **kw: searched.append(k) or knn(q, db, k, **kw))
    monkeypatch.setattr(NNGuide, "_guidance",
                        lambda self, x, dt, k: searched.append(k) or guidance(self, x, dt, k))
    tr = sets["train"]
    for est, ks in ((GROOD(), [2, 1, 5]), (KNN(), [3, 1, 12]),
                    (NNGuide(bank_fraction=1.0), [7, 1, 30])):
        searched.clear()
        t = tune(est, {"k": ks}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
                 progress=False)
        # The ID set and the two OOD sets, once each (the fit's own search of GROOD's index
        # for some of its rows, grood._fit.check_search_resolves, runs on blocks of its rows).
        assert searched == [max(ks)] * 3
        for point, result in zip(t.points, t.results, strict=True):
            fitted = _fitted(type(est), {**est.get_params(), **point}, tr)
            assert result == {name: direct(fitted, sets, name) for name in ("near", "far")}
        searched.clear()  # one k (and a fit per point): each point searched on its own
        tune(est, {"k": ks[:1]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             progress=False)
        assert searched == [ks[0]] * 3
    # an error comes from the first point it concerns, as without the shared search
    with pytest.raises(ValueError, match=r"^at k=500: id_val: k=500 but the index holds"):
        tune(GROOD(), {"k": [1, 500]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             progress=False)
    for est in (GROOD(), KNN()):  # a k refused alone is refused beside values it equals
        with pytest.raises(ValueError, match=r"^at k=2.0: .*k must be a positive integer"):
            tune(est, {"k": [2, 3, 2.0]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
                 progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_scores_by_k_equal_each_k_scored_alone(dtype):
    """The shared search's scores at every k, up to 1,000 over many database blocks, are
    those each k's own scoring gives, bit for bit (GROOD, KNN, NNGuide)."""
    from grood.neighbours import scores_by_k

    x, y = clustered_features(3000, 20, 32, seed=7, spread=0.8, dtype=dtype)
    q = clustered_features(700, 20, 32, seed=8, spread=1.0, dtype=dtype)[0]
    means = torch.stack([x[y == c].mean(0) for c in range(20)])
    ks = [1, 10, 300, 1000, 3]
    det = GROOD(batch_size=256).fit(x, y)
    got, preds = scores_by_k(det, q, ks)
    assert torch.equal(preds, det.predict(q))
    knn = KNN(batch_size=256).fit(x)
    knn_got = knn._scores_by_k(q, ks)
    guide = NNGuide(bank_fraction=0.5, batch_size=256).fit(x, weight=means,
                                                           bias=-0.5 * (means**2).sum(1))
    guide_got = guide._scores_by_k(q, ks)
    for k in ks:
        det.k, knn.k, guide.k = k, k, k
        assert torch.equal(got[k], det.score_samples(q)), k
        assert torch.equal(knn_got[k], knn.score_samples(q)), k
        assert torch.equal(guide_got[k], guide.score_samples(q)), k


def test_ivf_k_points_each_search_their_own(sets, monkeypatch):
    """An IVF search at the largest k refuses rows it found fewer than that k for, which a
    smaller k does not need: each point of an IVF detector searches on its own."""
    pytest.importorskip("faiss")
    import grood.index

    searched = []
    search = grood.index.FaissIVFIndex.search
    monkeypatch.setattr(grood.index.FaissIVFIndex, "search",
                        lambda self, q, k=1: searched.append(k) or search(self, q, k))
    tr = sets["train"]
    est = GROOD(index="faiss-ivf", index_options={"nlist": 2, "nprobe": 2})
    t = tune(est, {"k": [1, 3]}, train=tr, id_val=sets["id"], ood_val=sets["ood"],
             progress=False)
    assert searched == [1, 1, 1, 3, 3, 3]
    for point, result in zip(t.points, t.results, strict=True):
        fitted = _fitted(GROOD, {**est.get_params(), **point}, tr)
        assert result == {name: direct(fitted, sets, name) for name in ("near", "far")}


def test_plot(sets, tmp_path):
    pytest.importorskip("matplotlib")
    t = tune(ASH(), {"percentile": [50.0, 90.0], "variant": ["s", "b"]}, train=sets["train"],
             id_val=sets["id"], ood_val=sets["ood"], progress=False)
    path = t.plot(tmp_path / "ash.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert t.plot(tmp_path / "variant.png", param="variant").exists()
    with pytest.raises(ValueError, match=r"param='k' takes more than one value in no point"):
        t.plot(tmp_path / "k.png", param="k")
    one = tune(KNN(), {"k": [3]}, train=sets["train"], id_val=sets["id"], ood_val=sets["ood"],
               progress=False)
    with pytest.raises(ValueError, match=r"KNN: every point .* nothing to draw"):
        one.plot(tmp_path / "one.png")
    knn = tune(KNN(), {"k": [1, 3]}, train=sets["train"], id_val=sets["id"],
               ood_val=sets["ood"], progress=False)
    both = plot_searches([t, knn], tmp_path / "both.png", params=["variant", None])
    assert both.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"params names 1 parameter\(s\) for 2 search"):
        plot_searches([t, knn], tmp_path / "x.png", params=["variant"])
    with pytest.raises(TypeError, match=r"takes a list of grood\.tune results"):
        plot_searches([t, "knn"], tmp_path / "x.png")


def test_exported():
    assert grood.tune is tune and "tune" in grood.__all__ and "Tuning" in grood.__all__
