"""grood.metrics against scikit-learn, on data with many ties."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from grood import ood_metrics, threshold_acceptance, threshold_at_tpr
from grood.metrics import (
    bootstrap_difference,
    bootstrap_mean_metrics,
    bootstrap_metrics,
    mean_of_sets,
    percentile_intervals,
    resampled_metrics,
    resampled_set_metrics,
    roc_curve,
)


def _sklearn_reference(skm, id_s, ood_s, recall=0.95):
    """OpenOOD's metrics as its code computes them, with ``skm``, scikit-learn's metrics."""
    conf = np.r_[id_s, ood_s]
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = skm.roc_curve(is_ood, -conf, drop_intermediate=False)
    p_in, r_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(is_ood, -conf)
    return {
        "auroc": skm.auc(fpr, tpr),
        "fpr95": fpr[np.argmax(tpr >= recall)],
        "aupr_in": skm.auc(r_in, p_in),
        "aupr_out": skm.auc(r_out, p_out),
    }


@pytest.mark.parametrize("levels", [3, 10, 1000], ids=["3-levels", "10-levels", "1000-levels"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_with_ties(levels, seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    id_s = rng.integers(0, levels, 301) / levels + 0.3
    ood_s = rng.integers(0, levels, 157) / levels
    ours = ood_metrics(id_s, ood_s)
    ref = _sklearn_reference(skm, id_s, ood_s)
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["auroc"] == pytest.approx(skm.roc_auc_score(
        np.r_[np.zeros(301), np.ones(157)], -np.r_[id_s, ood_s]), abs=1e-12)


def test_perfect_and_inverted_separation():
    perfect = ood_metrics([2.0, 3.0, 4.0], [0.0, 1.0])
    assert perfect == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    inverted = ood_metrics([0.0, 1.0], [2.0, 3.0, 4.0])
    assert inverted["auroc"] == 0.0 and inverted["fpr95"] == 1.0


def test_all_tied_scores_give_chance():
    m = ood_metrics(np.zeros(10), np.zeros(30))
    assert m["auroc"] == pytest.approx(0.5)
    assert m["fpr95"] == 1.0


def test_fpr95_definition_on_a_small_case():
    # OOD (positive) flagged when score <= t. 20 OOD scores 0..19; ID scores 18.5, 30..38.
    ood = np.arange(20.0)
    ids = np.r_[18.5, np.arange(30.0, 39.0)]
    # 95 % of 20 OOD = 19 detected at t = 18, where no ID sample is flagged yet.
    assert ood_metrics(ids, ood)["fpr95"] == 0.0
    ids = np.r_[17.5, np.arange(30.0, 39.0)]  # now one ID sample (of 10) lies below 18
    assert ood_metrics(ids, ood)["fpr95"] == pytest.approx(0.1)


def test_accepts_tensors_and_lists():
    a = ood_metrics(torch.tensor([1.0, 2.0, 3.0]), [0.5, 2.5])
    b = ood_metrics(np.array([1.0, 2.0, 3.0]), np.array([0.5, 2.5]))
    assert a == b
    fpr, tpr = roc_curve([1.0, 2.0], [0.0])
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and fpr[-1] == 1.0


@pytest.mark.parametrize(("id_s", "ood_s", "match"), [
    ([], [1.0], "id_scores is empty"),
    ([1.0], [], "ood_scores is empty"),
    ([1.0, np.nan], [0.0], r"id_scores contains NaN or Inf at position\(s\) 1: drop or "),
    ([1.0], [0.0] + [np.inf] * 7, r"ood_scores contains NaN or Inf at position\(s\) 1, 2, 3, "
                                  r"4, 5 \(first 5 of 7\)"),
    ([[1.0]], [0.0], "id_scores must be 1-D"),
])
def test_bad_scores_are_named(id_s, ood_s, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(id_s, ood_s)


def test_integer_scores_beyond_float64_exactness_are_refused():
    """Integer scores above 2**53 rounded to the same float64: 2**60 and 2**60 + 1 tied and
    a perfect separation reported AUROC 0.5. Exact integers still work; non-numbers are named."""
    big = np.array([2**60 + 1, 2**60 + 2], dtype=np.int64)
    for ids in (big, torch.from_numpy(big)):
        with pytest.raises(ValueError, match="id_scores holds integers beyond 2"):
            ood_metrics(ids, np.array([2**60]))
    assert ood_metrics(np.array([2**53, 3]), np.array([2]))["auroc"] == 1.0
    assert ood_metrics(torch.tensor([3, 4], dtype=torch.uint8), [1])["auroc"] == 1.0
    assert ood_metrics(torch.tensor([0.5, 1.0]).bfloat16(), [0.25])["auroc"] == 1.0
    for bad in (np.array(["1.0", "2.0"]), np.array([1 + 1j, 2 + 0j])):
        with pytest.raises(TypeError, match="id_scores must hold real numbers"):
            ood_metrics(bad, [0.5])


def test_boolean_scores_are_refused():
    """is_ood's flags (True = OOD) given as scores ranked the flagged samples as the most
    in-distribution: an AUROC below 0.5 reported as a result."""
    id_s, ood_s = np.linspace(0.0, 1.0, 20), np.linspace(-1.0, 0.2, 20)
    threshold = 0.3
    for flags in ((id_s < threshold, ood_s < threshold),
                  (torch.from_numpy(id_s) < threshold, torch.from_numpy(ood_s) < threshold)):
        with pytest.raises(TypeError, match=r"id_scores holds booleans \(is_ood's flags, or a "
                                            r"comparison\?\): .* pass the scores themselves"):
            ood_metrics(*flags)
        with pytest.raises(TypeError, match="holds booleans"):
            threshold_at_tpr(flags[0])
    assert ood_metrics(id_s, ood_s)["auroc"] > 0.9


@pytest.mark.parametrize("level", [95, 0, -0.5, 1.01, float("nan"), "0.95", True])
def test_recall_level_outside_a_fraction_is_refused(level):
    """A percentage (95) found no threshold and reported fpr95 = 0, a perfect-looking score."""
    with pytest.raises(ValueError, match="recall_level"):
        ood_metrics([1.0, 2.0, 3.0], [0.5, 2.5], recall_level=level)


def test_recall_level_accepts_numpy_numbers_and_one():
    ids, ood = [1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 3.5]
    assert ood_metrics(ids, ood, recall_level=np.float32(0.5)) == ood_metrics(
        ids, ood, recall_level=0.5)
    assert ood_metrics(ids, ood, recall_level=1)["fpr95"] == pytest.approx(0.75)


def test_plots_write_pngs_and_name_scores_they_cannot_draw(tmp_path):
    """ROC curves and histograms draw finite scores; NaN (a flagged head's unscored rows),
    an empty set or a missing dataset is named by method and set, not failed on inside
    matplotlib."""
    pytest.importorskip("matplotlib")
    from grood.report import plot_histograms, plot_roc

    rng = np.random.default_rng(0)
    scores = {"GROOD": {"id": rng.normal(1, 1, 50), "far": rng.normal(-1, 1, 40)},
              "MSP": {"id": torch.rand(50), "far": torch.rand(40)}}
    for path in (plot_roc(scores, "id", ["far"], tmp_path / "roc.png"),
                 plot_histograms(scores, tmp_path / "hist.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores["MSP"]["far"] = torch.tensor([0.5, float("nan")])
    with pytest.raises(ValueError, match=r"scores\['MSP'\]\['far'\] is empty or holds NaN"):
        plot_histograms(scores, tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"scores\['GROOD'\] has no 'near' scores"):
        plot_roc(scores, "id", ["near"], tmp_path / "r.png")
    with pytest.raises(ValueError, match="ood_names is empty"):
        plot_roc(scores, "id", [], tmp_path / "r.png")
    with pytest.raises(ValueError, match="scores is empty"):
        plot_histograms({}, tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"scores\['big'\]\['id'\] holds integers beyond"):
        plot_histograms({"big": {"id": np.array([2**60, 2**60 + 1])}}, tmp_path / "h.png")


def test_plots_name_malformed_arguments_before_drawing(tmp_path):
    """A threshold given as a bare number, ood_names as one str (its letters were taken for
    names), scores not nested by method and set, a 2-D score array (drawn flattened), an
    image format matplotlib does not write or a missing folder (named by its temporary
    file): each is refused by name, before anything is drawn."""
    pytest.importorskip("matplotlib")
    from grood.report import plot_differences, plot_histograms, plot_neighbours, plot_roc

    rng = np.random.default_rng(0)
    scores = {"GROOD": {"id": rng.normal(1, 1, 30), "far": rng.normal(-1, 1, 20)}}
    for bad in (0.5, (0.5, 0.9, 1.0), ("high", 0.9)):
        with pytest.raises(ValueError, match=r"thresholds\['GROOD'\] must be a pair of "
                                             r"numbers \(threshold, tpr\)"):
            plot_histograms(scores, tmp_path / "h.png", {"GROOD": bad})
    with pytest.raises(ValueError, match=r"ood_names must be a list .* write \['far'\]"):
        plot_roc(scores, "id", "far", tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"scores\['GROOD'\] must map each dataset"):
        plot_histograms({"GROOD": scores["GROOD"]["id"]}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="scores must map each method"):
        plot_histograms([scores["GROOD"]["id"]], tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"scores\['GROOD'\]\['id'\] must be 1-D.*\(30, 1\)"):
        plot_roc({"GROOD": {**scores["GROOD"], "id": scores["GROOD"]["id"][:, None]}}, "id",
                 ["far"], tmp_path / "r.png")
    differences = {"far": {"MSP": {"auroc": (0.1, 0.0, 0.2)}}}
    examples = [{"image": np.zeros((4, 4)), "title": "x", "score": -1.0, "rows": [0],
                 "distances": [1.0]}]
    draws = [lambda p: plot_roc(scores, "id", ["far"], p),
             lambda p: plot_histograms(scores, p),
             lambda p: plot_differences(differences, p),
             lambda p: plot_neighbours(examples, np.zeros((2, 4, 4)), p)]
    for draw in draws:
        with pytest.raises(ValueError, match=r"pictures are written as \.png or .*r\.xyz'"):
            draw(tmp_path / "r.xyz")
        with pytest.raises(FileNotFoundError, match=r"the folder .*missing does not exist"):
            draw(tmp_path / "missing" / "r.png")
        assert draw(tmp_path / "r.svg").read_bytes().lstrip()[:5] == b"<?xml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.svg"]


def test_markdown_table_refuses_a_row_of_the_wrong_width():
    from grood.report import markdown_table

    assert markdown_table(["set", "auroc"], []) == "| set | auroc |\n|-----|-------|"
    assert markdown_table(["set", "auroc"], [["far", 0.5]]).endswith("| far | 50.00 |")
    with pytest.raises(ValueError, match=r"row 1 of the table has 1 cells, the header 2"):
        markdown_table(["set", "auroc"], [["far", 0.5], ["near"]])


def test_neighbour_picture_draws_each_sample_beside_its_training_rows(tmp_path):
    """One row per sample, as many neighbours as it has; rows outside the training images or
    lists of unequal length are named, not drawn."""
    pytest.importorskip("matplotlib")
    from grood.report import plot_neighbours

    rng = np.random.default_rng(1)
    train = rng.random((20, 8, 8))
    examples = [{"image": rng.random((8, 8)), "title": "near-OOD", "score": -0.5,
                 "rows": np.array([3, 7, 1]), "distances": np.array([0.5, 0.6, 0.9])},
                {"image": rng.random((8, 8)), "title": "ID", "score": -1e-20,
                 "rows": [4], "distances": [1e-20]}]
    path = plot_neighbours(examples, train, tmp_path / "n.png", train_labels=np.arange(20) % 3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="training row 20 is outside the 20 training images"):
        plot_neighbours([{**examples[0], "rows": [20, 1, 2]}], train, tmp_path / "x.png")
    with pytest.raises(ValueError, match="training row -1 is outside the 20"):
        plot_neighbours([{**examples[0], "rows": [19, -1, 2]}], train, tmp_path / "x.png")
    with pytest.raises(ValueError, match="equal-length lists"):
        plot_neighbours([{**examples[0], "distances": [0.5]}], train, tmp_path / "x.png")
    with pytest.raises(ValueError, match="examples is empty"):
        plot_neighbours([], train, tmp_path / "x.png")


def test_plots_leave_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
    """Drawing a report does not switch the caller's backend (a notebook's inline display)
    nor open figures in pyplot's list."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from grood.report import plot_histograms, plot_roc

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        open_figures = plt.get_fignums()
        scores = {"GROOD": {"id": np.arange(5.0), "far": np.arange(4.0) - 2}}
        plot_roc(scores, "id", ["far"], tmp_path / "roc.png")
        plot_histograms(scores, tmp_path / "hist.png")
        assert matplotlib.get_backend() == "pdf"
        assert plt.get_fignums() == open_figures
        assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tpr", [0.1, 0.7, 0.95, 1.0])
def test_threshold_is_the_largest_that_accepts_tpr_of_the_scores(seed, tpr):
    """Against its definition, by brute force over every candidate, on tied and untied scores
    (levels: how many distinct values), sizes where tpr * n is whole and where it is not."""
    rng = np.random.default_rng(seed)
    n = [10, 20, 37, 101][seed]
    s = rng.integers(0, 6, n).astype(np.float64) if seed % 2 else rng.normal(size=n)
    t = threshold_at_tpr(s, tpr)
    assert t in s
    accepted = np.mean(s >= t)
    assert accepted >= tpr - 1e-12
    above = s[s > t]
    # Any larger candidate accepts too few (fractions like 0.7 * 10 count as exactly 7 of 10).
    assert all(np.sum(s >= c) < round(tpr * n, 9) for c in above)


def test_threshold_on_a_small_case_and_its_input_checks():
    s = np.arange(1.0, 11.0)
    assert threshold_at_tpr(s, 0.7) == 4.0  # 4..10: seven of ten
    assert threshold_at_tpr(s, 0.1) == 10.0
    assert threshold_at_tpr(torch.tensor(s, dtype=torch.float32), 1) == 1.0
    assert threshold_at_tpr([2.0, 2.0, 2.0, 1.0], 0.5) == 2.0  # ties accepted together (75 %)
    with pytest.raises(ValueError, match=r"tpr is a fraction in \(0, 1\]"):
        threshold_at_tpr(s, 95)
    with pytest.raises(ValueError, match="id_scores contains NaN"):
        threshold_at_tpr([1.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="id_scores is empty"):
        threshold_at_tpr([], 0.5)


@pytest.mark.parametrize(("n", "tpr"), [(20, 0.95), (50, 0.95), (37, 0.7), (10, 1.0)])
def test_threshold_acceptance_matches_simulated_calibration_sets(n, tpr):
    """The fraction of new ID samples a threshold chosen on n held-out scores accepts, over
    20,000 simulated calibration sets of uniform scores (a new sample at or above t has
    probability 1 - t): its mean and spread match the closed form to sampling error."""
    rng = np.random.default_rng(n)
    got = np.array([1 - threshold_at_tpr(rng.random(n), tpr) for _ in range(20000)])
    mean, std = threshold_acceptance(n, tpr)
    assert abs(got.mean() - mean) < 4 * std / np.sqrt(got.size)
    assert abs(got.std() - std) < 0.03 * std


def test_threshold_acceptance_checks_its_arguments():
    # n = 9 at tpr = 0.9: the threshold is the lowest of the 9 scores (m = 9), Beta(9, 1)
    expected = pytest.approx((0.9, (0.9 * 0.1 / 11) ** 0.5))
    assert threshold_acceptance(np.int64(9), 0.9) == threshold_acceptance(9, 0.9) == expected
    for bad in (0, -3, 2.5, True, "9"):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            threshold_acceptance(bad, 0.95)
    with pytest.raises(ValueError, match=r"tpr is a fraction in \(0, 1\]"):
        threshold_acceptance(100, 95)


def test_bootstrap_intervals_cover_the_true_auroc():
    """ID ~ N(1, 1) against OOD ~ N(0, 1): the true AUROC is Phi(1 / sqrt 2) = 0.7602. Over 40
    independent pairs of sets (150 ID, 100 OOD rows), the 95 % intervals from 200 resamples
    hold it in close to 95 % of them (at least 34 of 40; binomial: fewer than 34 has
    probability 0.3 % at 95 % coverage, 10 % at 90 %), and each holds its own point
    estimate."""
    true_auroc = 0.5 * (1 + math.erf(0.5))  # Phi(1 / sqrt 2)
    rng = np.random.default_rng(11)
    covered = 0
    for i in range(40):
        id_s, ood_s = rng.normal(1, 1, 150), rng.normal(0, 1, 100)
        lo, hi = bootstrap_metrics(id_s, ood_s, n_boot=200, seed=i)["auroc"]
        assert lo <= ood_metrics(id_s, ood_s)["auroc"] <= hi
        covered += lo <= true_auroc <= hi
    assert covered >= 34, covered


def test_bootstrap_intervals_cover_the_true_fpr95_on_small_sets():
    """FPR@95 is read at a quantile of the OOD scores, where a bootstrap of a small set is
    coarsest. ID ~ N(1, 1) against OOD ~ N(0, 1), 50 rows each: the threshold that detects 95 %
    of OOD is Phi^-1(0.95), and the true FPR@95 Phi(Phi^-1(0.95) - 1) = 0.7405. Over 40 pairs
    of sets the 95 % intervals from 200 resamples hold it in at least 34."""
    from statistics import NormalDist

    unit = NormalDist()
    true_fpr = unit.cdf(unit.inv_cdf(0.95) - 1)
    rng = np.random.default_rng(12)
    covered = 0
    for i in range(40):
        id_s, ood_s = rng.normal(1, 1, 50), rng.normal(0, 1, 50)
        lo, hi = bootstrap_metrics(id_s, ood_s, n_boot=200, seed=i)["fpr95"]
        covered += lo <= true_fpr <= hi
    assert covered >= 34, covered


def test_resamples_as_counts_equal_the_resampled_arrays_bit_for_bit():
    """The bootstrap scores each resample from the scores sorted once, counting each run of
    equal scores the draws fill: on tied and untied scores, sets of 1 to 40 rows, the metrics
    equal ood_metrics of the resampled arrays exactly, resample after resample of one sorted
    set (whose work rows each resample reuses), and the set's own ROC curve, taken first,
    stays as it was."""
    from grood.metrics import _Ranked

    rng = np.random.default_rng(5)
    for trial in range(60):
        n_id, n_ood = (int(v) for v in rng.integers(1, 40, 2))
        a = rng.integers(0, 5, n_id).astype(float) if trial % 2 else rng.normal(size=n_id)
        b = rng.integers(0, 5, n_ood).astype(float) if trial % 3 else rng.normal(size=n_ood)
        ranked = _Ranked(a, b)
        fpr, tpr = ranked.roc(*ranked.counts())[:2]
        kept = fpr.copy(), tpr.copy()
        for _ in range(4):
            i, o = rng.integers(0, n_id, n_id), rng.integers(0, n_ood, n_ood)
            for level in (0.95, 0.5):
                assert (ranked.metrics(*ranked.counts(i, o), level)
                        == ood_metrics(a[i], b[o], recall_level=level)), trial
        np.testing.assert_array_equal(fpr, kept[0])
        np.testing.assert_array_equal(tpr, kept[1])
        np.testing.assert_array_equal(np.c_[fpr, tpr], np.c_[roc_curve(a, b)])


def test_resampled_sets_equal_the_resampled_arrays_bit_for_bit():
    """resampled_set_metrics of one ID set against several OOD sets: each resample's metrics
    equal ood_metrics of the arrays its draws pick (the ID draws shared by every set, then
    each set's, from one generator), bit for bit."""
    rng = np.random.default_rng(8)
    ids = np.round(rng.normal(1, 1, 300), 1)
    sets = [rng.normal(0, 1, 120), np.round(rng.normal(0.5, 1, 80), 1)]
    out = resampled_set_metrics(ids, sets, n_boot=100, seed=3)
    draw = np.random.default_rng(3)
    for b in range(100):
        i = draw.integers(0, ids.size, ids.size)
        for j, ood in enumerate(sets):
            o = draw.integers(0, ood.size, ood.size)
            assert {k: v[b] for k, v in out[j].items()} == ood_metrics(ids[i], ood[o]), (b, j)


class CountingBar:
    """Stands in for grood's progress bar: the totals it was made with, its updates."""

    def __init__(self):
        self.totals, self.updates = [], []

    @classmethod
    def installed(cls, monkeypatch):
        bar = cls()

        def make(**kw):
            bar.totals.append(kw.get("total"))
            return bar

        monkeypatch.setattr("grood._progress.progress", make)
        return bar

    def update(self, n=1):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_several_methods_resample_in_threads_as_each_alone(monkeypatch):
    """resampled_methods: each method's resamples equal resampled_set_metrics' of its scores,
    bit for bit, whatever the number of threads (one, two, one per method; the default one
    per CPU this process may use, where the sets are long enough to gain, else one; one
    method's sets side by side, in resampled_set_metrics too); one progress bar counts every
    method's resamples; a bad method is named before any resample, and an empty mapping is
    refused."""
    import concurrent.futures

    import grood.metrics as metrics

    rng = np.random.default_rng(4)
    methods = {f"m{i}": (np.round(rng.normal(1, 1, 200), i), [rng.normal(0, 1, 90),
                                                              rng.normal(0.5, 1, 60)])
               for i in range(4)}
    alone = {name: resampled_set_metrics(ids, oods, n_boot=150, seed=7)
             for name, (ids, oods) in methods.items()}
    for workers in (1, 2, 4, None):
        got = metrics.resampled_methods(methods, n_boot=150, seed=7, workers=workers)
        assert list(got) == list(methods)
        for name in methods:
            for a, b in zip(got[name], alone[name], strict=True):
                assert a.keys() == b.keys()
                assert all(np.array_equal(a[k], b[k]) for k in a), (workers, name)
    pools = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(metrics, "cpu_threads", lambda: 3)
    metrics.resampled_methods(methods, n_boot=100)  # 290 and 260 scores a set: one thread
    monkeypatch.setattr(metrics, "THREADED_SCORES", 275)
    metrics.resampled_methods(methods, n_boot=100)  # (on average 275 a set: threads)
    assert pools == [3]
    # One method: its two sets side by side, each resample's draws made first, in order.
    ids, oods = methods["m1"]
    for one in (metrics.resampled_set_metrics(ids, oods, n_boot=150, seed=7),
                metrics.resampled_methods({"m1": (ids, oods)}, n_boot=150, seed=7)["m1"]):
        for a, b in zip(one, alone["m1"], strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    assert pools == [3, 2, 2]
    bar = CountingBar.installed(monkeypatch)
    metrics.resampled_methods(methods, n_boot=100, workers=3, progress=True)
    assert bar.totals == [400] and sum(bar.updates) == 400
    bad = {**methods, "m9": (methods["m0"][0], [np.r_[1.0, np.nan]])}
    with pytest.raises(ValueError, match=r"^m9: ood_scores contains NaN or Inf at position\(s\) 1"):
        metrics.resampled_methods(bad, n_boot=100)
    with pytest.raises(ValueError, match="got an empty dict"):
        metrics.resampled_methods({}, n_boot=100)
    with pytest.raises(ValueError, match=r"^m0: each method's entry is its \(id_scores, "
                                         r"\[ood_scores, \.\.\.\]\), got tuple of 3"):
        metrics.resampled_methods({"m0": (*methods["m0"], None)}, n_boot=100)
    with pytest.raises(ValueError, match="n_boot=50 resamples"):
        metrics.resampled_methods(methods, n_boot=50)


def test_a_method_that_fails_stops_the_others(monkeypatch):
    """resampled_methods in threads: a method whose resamples fail raises its error, and the
    methods running beside it stop within a resample rather than run to the end (an
    interrupted grood eval --bootstrap would otherwise wait for every method)."""
    import grood.metrics as metrics

    rng = np.random.default_rng(6)
    methods = {f"m{i}": (rng.normal(1, 1, 200 + i), [rng.normal(0, 1, 50)]) for i in range(4)}
    counts = metrics._Ranked.counts
    calls = {"m1": 0}

    def failing(self, *draws):
        if self.id_run.size == 201:  # m1's
            calls["m1"] += 1
            if calls["m1"] == 5:
                raise ValueError("m1 broke")
        return counts(self, *draws)

    monkeypatch.setattr(metrics._Ranked, "counts", failing)
    bar = CountingBar.installed(monkeypatch)
    with pytest.raises(ValueError, match="m1 broke"):
        metrics.resampled_methods(methods, n_boot=20000, workers=2)
    assert sum(bar.updates) < 20000  # m0 (beside m1) stopped early; m2 and m3 never ran


def test_paired_bootstrap_resolves_a_better_method_and_not_an_equal_one():
    """Method a scores 300 ID and 200 OOD samples (Gaussians one sd apart); b is a plus noise
    of one sd (AUROC 0.69 against 0.76 in expectation), m a plus noise of 0.5 sd (0.74), c a
    plus noise of 0.01 sd (nearly the same ranking). The paired intervals of a - b exclude 0
    in every metric's direction; a - m's AUROC interval excludes 0 where the two unpaired
    intervals overlap; a - c holds 0; a - a is 0 exactly; swapping the methods negates them."""
    rng = np.random.default_rng(2)
    a = (rng.normal(1, 1, 300), rng.normal(0, 1, 200))
    b, m, c = (tuple(s + rng.normal(0, sd, s.size) for s in a) for sd in (1.0, 0.5, 0.01))
    better = bootstrap_difference(a, b, n_boot=300)
    assert better["auroc"][0] > 0 and better["aupr_in"][0] > 0 and better["fpr95"][1] < 0
    assert bootstrap_difference(a, m, n_boot=300)["auroc"][0] > 0
    (a_lo, _), (_, m_hi) = (bootstrap_metrics(*x, n_boot=300)["auroc"] for x in (a, m))
    assert m_hi > a_lo  # unpaired, they overlap
    same = bootstrap_difference(a, c, n_boot=300)
    assert all(lo <= 0 <= hi for lo, hi in same.values()), same
    assert all(v == (0.0, 0.0) for v in bootstrap_difference(a, a, n_boot=100).values())
    swapped = bootstrap_difference(b, a, n_boot=300)
    for key, (lo, hi) in better.items():
        assert swapped[key] == pytest.approx((-hi, -lo), abs=1e-12)
    with pytest.raises(ValueError, match="the two methods scored different samples: 300 ID "
                                         "and 200 OOD scores against 300 and 199"):
        bootstrap_difference(a, (b[0], b[1][:-1]), n_boot=100)
    # One method's ID scores where its pair belongs: its first score was read as the ID
    # scores ("id_scores must be 1-D, got shape ()").
    for bad, said in ((a[0], r"shape \(300,\)"), ((a[0],), "tuple")):
        with pytest.raises(ValueError, match=r"^a must be one method's \(id_scores, "
                                             r"ood_scores\) pair, got " + said):
            bootstrap_difference(bad, b, n_boot=100)
    with pytest.raises(ValueError, match=r"^b: ood_scores contains NaN or Inf at position"):
        bootstrap_difference(a, (b[0], np.r_[b[1][:-1], np.inf]), n_boot=100)


def test_bootstrap_is_seeded_and_checks_its_arguments():
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(1, 1, 60), rng.normal(0, 1, 40)
    a = bootstrap_metrics(id_s, ood_s, n_boot=100, seed=3)
    assert a == bootstrap_metrics(torch.tensor(id_s), list(ood_s), n_boot=100, seed=3)
    assert a != bootstrap_metrics(id_s, ood_s, n_boot=100, seed=4)
    assert set(a) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    assert all(0 <= lo <= hi <= 1 for lo, hi in a.values())
    narrow = bootstrap_metrics(id_s, ood_s, n_boot=100, seed=3, level=0.5)
    assert all(a[k][0] <= narrow[k][0] <= narrow[k][1] <= a[k][1] for k in a)
    for kwargs, message in (({"n_boot": 99}, "use at least 100"),
                            ({"n_boot": 0}, "n_boot must be a positive integer"),
                            ({"level": 1}, "level=1 asks for an interval holding every"),
                            ({"level": 95}, r"level is a fraction in \(0, 1\]"),
                            ({"seed": 1.5}, "seed must be an integer")):
        with pytest.raises(ValueError, match=message):
            bootstrap_metrics(id_s, ood_s, **kwargs)
    with pytest.raises(ValueError, match="ood_scores contains NaN"):
        bootstrap_metrics(id_s, [0.0, float("nan")])


def test_mean_over_sets_interval_shares_the_id_resample_and_covers_the_true_mean():
    """One small ID set (60 rows of N(0, 1)) against three large OOD sets (400 rows each of
    N(-d, 1), d = 0.6, 1.0, 1.4): the mean AUROC over the sets is that of Phi(d / sqrt 2),
    averaged. Most of the error is the ID set's, shared by every set. Over 40 independent
    draws, the 95 % intervals of the mean (200 resamples, the ID set drawn once per resample
    for all three sets) hold the true mean in at least 33 (over 200 such draws they held it
    in 93.5 %, the percentile bootstrap's usual shortfall at 60 rows; fewer than 33 of 40 has
    probability 0.4 % at that rate). Averaging three separate bootstraps, each drawing the ID
    set on its own, treats the shared error as three independent ones: its intervals are
    about 40 % narrower (0.62 of the width here), and they miss more often."""
    shifts = (0.6, 1.0, 1.4)
    true_mean = sum(0.5 * (1 + math.erf(d / 2)) for d in shifts) / len(shifts)
    rng = np.random.default_rng(11)
    covered, missed_apart, widths = 0, 0, []
    for i in range(40):
        id_s, sets = rng.normal(0, 1, 60), [rng.normal(-d, 1, 400) for d in shifts]
        lo, hi = bootstrap_mean_metrics(id_s, sets, n_boot=200, seed=i)["auroc"]
        point = sum(ood_metrics(id_s, s)["auroc"] for s in sets) / len(sets)
        assert lo <= point <= hi
        covered += lo <= true_mean <= hi
        apart = sum(resampled_metrics(id_s, s, n_boot=200, seed=100 * i + j)["auroc"]
                    for j, s in enumerate(sets)) / len(sets)
        a_lo, a_hi = percentile_intervals({"auroc": apart})["auroc"]
        missed_apart += not a_lo <= true_mean <= a_hi
        widths.append((a_hi - a_lo) / (hi - lo))
    assert covered >= 33, covered
    assert np.mean(widths) < 0.8 and missed_apart > 40 - covered, (widths, missed_apart)


def test_set_resamples_pair_across_methods_and_reduce_to_one_set():
    """resampled_set_metrics: with one set, resampled_metrics' draws (so bootstrap_mean_metrics
    of one set is bootstrap_metrics); its draws depend only on the seed and the sizes, so a
    method's scores shifted by a constant (the same ranking) resample to the same metrics;
    each set's resamples are its own ood_metrics on average; arguments checked."""
    rng = np.random.default_rng(4)
    id_s, a, b = rng.normal(1, 1, 80), rng.normal(0, 1, 50), rng.normal(0.5, 1, 30)
    one = resampled_set_metrics(id_s, [a], n_boot=100, seed=2)
    assert len(one) == 1 and all(np.array_equal(one[0][k], v) for k, v in
                                 resampled_metrics(id_s, a, n_boot=100, seed=2).items())
    assert (bootstrap_mean_metrics(id_s, (a,), n_boot=100)
            == bootstrap_metrics(id_s, a, n_boot=100))
    two = resampled_set_metrics(id_s, [a, b], n_boot=400, seed=2)
    shifted = resampled_set_metrics(id_s + 3, [a + 3, b + 3], n_boot=400, seed=2)
    for got, again, ood in zip(two, shifted, (a, b), strict=True):
        assert all(np.array_equal(got[k], again[k]) for k in got)
        assert np.mean(got["auroc"]) == pytest.approx(ood_metrics(id_s, ood)["auroc"],
                                                      abs=0.02)
    mean = bootstrap_mean_metrics(id_s, [a, b], n_boot=400, seed=2)
    assert mean == percentile_intervals({k: (two[0][k] + two[1][k]) / 2 for k in two[0]})
    for sets, error, message in (
            (a, TypeError, "ood_sets is a list of OOD score arrays, one per set; got ndarray"),
            ([], ValueError, "ood_sets is empty"),
            ([a, [0.0, float("inf")]], ValueError, r"ood_sets\[1\] contains NaN or Inf")):
        with pytest.raises(error, match=message):
            bootstrap_mean_metrics(id_s, sets, n_boot=100)
    with pytest.raises(ValueError, match="needs at least one set's resampled metrics"):
        mean_of_sets([])


def recorded_figures(monkeypatch) -> list:
    """The figures grood.report draws from here on, in order (kept for the test to read)."""
    from matplotlib.figure import Figure

    from grood import report

    drawn = []

    class Recording(Figure):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            drawn.append(self)

    monkeypatch.setattr(report, "figure_class", lambda: Recording)
    return drawn


def test_plots_mark_a_decision_threshold(tmp_path, monkeypatch):
    """With thresholds, the ROC curve gets its operating point (the fractions of ID and OOD
    scores below the threshold) and the histogram a line at the threshold; a threshold of a
    method without scores, or a tpr outside (0, 1], is refused."""
    pytest.importorskip("matplotlib")
    from grood import report

    drawn = recorded_figures(monkeypatch)
    rng = np.random.default_rng(0)
    scores = {"GROOD": {"id": rng.normal(1, 1, 200), "far": rng.normal(-1, 1, 150)}}
    t = threshold_at_tpr(scores["GROOD"]["id"], 0.9)
    report.plot_roc(scores, "id", ["far"], tmp_path / "r.png", {"GROOD": (t, 0.9)})
    report.plot_histograms(scores, tmp_path / "h.png", {"GROOD": (t, 0.9)})
    points = [ln.get_xydata()[0] for ln in drawn[0].axes[0].lines if ln.get_marker() == "o"]
    np.testing.assert_allclose(points, [[np.mean(scores["GROOD"]["id"] < t),
                                         np.mean(scores["GROOD"]["far"] < t)]])
    assert points[0][0] == pytest.approx(0.1, abs=0.006)
    vertical = [ln for ln in drawn[1].axes[0].lines if ln.get_linestyle() == "--"]
    assert len(vertical) == 1 and vertical[0].get_xdata()[0] == t
    assert "threshold (90 % of ID kept)" in vertical[0].get_label()
    with pytest.raises(ValueError, match="a threshold for 'MSP', which has no scores"):
        report.plot_histograms(scores, tmp_path / "h.png", {"MSP": (t, 0.9)})
    with pytest.raises(ValueError, match=r"tpr in \(0, 1\]"):
        report.plot_roc(scores, "id", ["far"], tmp_path / "r.png", {"GROOD": (t, 95)})


def test_differences_are_drawn_as_a_forest_plot(tmp_path, monkeypatch):
    """plot_differences: a panel per metric side by side, each set a block of rows (top to
    bottom as given) headed by its name in bold, every baseline named on its own row (not a
    colour to look up: past ten baselines the colours repeated), a marker at the difference
    and a bar over its interval, in points, coloured by what the interval resolves (FPR@95's
    better side the left); ragged or malformed input is refused by name."""
    pytest.importorskip("matplotlib")
    from grood import report

    drawn = recorded_figures(monkeypatch)
    differences = {
        "near": {"KNN": {"auroc": (0.02, -0.01, 0.05), "fpr95": (-0.1, -0.2, 0.0)},
                 "MSP": {"auroc": (0.10, 0.06, 0.13), "fpr95": (-0.3, -0.4, -0.2)}},
        "far": {"KNN": {"auroc": (-0.01, -0.03, -0.005), "fpr95": (0.1, 0.05, 0.15)},
                "MSP": {"auroc": (0.20, 0.15, 0.25), "fpr95": (-0.5, -0.6, -0.4)}},
    }
    path = report.plot_differences(differences, tmp_path / "d.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    fig = drawn[0]
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["AUROC", "FPR@95"]
    assert axes[1].get_xlabel() == "GROOD minus baseline (points)\nleft of 0: GROOD better"
    assert axes[0].get_xlabel().endswith("right of 0: GROOD better")
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["KNN", "MSP", "KNN", "MSP"]
    rows = axes[0].get_yticks()
    heads = [(t.get_text(), t.xy[1], t.get_fontweight()) for t in axes[0].texts]
    assert [h[0] for h in heads] == ["near", "far"] and {h[2] for h in heads} == {"bold"}
    assert heads[0][1] > rows[0] > rows[1] > heads[1][1] > rows[2] > rows[3]
    assert axes[1].get_shared_y_axes().joined(axes[0], axes[1])

    def drawn_as(ax, kind):
        line = next(ln for ln in ax.lines if ln.get_label().startswith(kind))
        return list(zip(line.get_xdata(), line.get_ydata(), strict=True))

    auroc_better = drawn_as(axes[0], "GROOD better")
    np.testing.assert_allclose(auroc_better, [(10.0, rows[1]), (20.0, rows[3])])
    np.testing.assert_allclose(drawn_as(axes[0], "baseline better"), [(-1.0, rows[2])])
    np.testing.assert_allclose(drawn_as(axes[0], "not resolved"), [(2.0, rows[0])])
    np.testing.assert_allclose(drawn_as(axes[1], "GROOD better"),
                               [(-30.0, rows[1]), (-50.0, rows[3])])
    np.testing.assert_allclose(drawn_as(axes[1], "baseline better"), [(10.0, rows[2])])
    np.testing.assert_allclose(drawn_as(axes[1], "not resolved"), [(-10.0, rows[0])])
    bars = axes[0].collections[0].get_segments()  # the intervals GROOD wins
    np.testing.assert_allclose([seg[:, 0] for seg in bars], [[6.0, 13.0], [15.0, 25.0]])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "GROOD better (interval clear of 0)", "baseline better (interval clear of 0)",
        "not resolved (interval includes 0)"]
    report.plot_differences({"near": differences["near"]}, tmp_path / "one.png")
    assert [t.get_text() for t in drawn[1].legends[0].get_texts()] == [
        "GROOD better (interval clear of 0)", "not resolved (interval includes 0)"]
    for bad, message in (
            ({}, "differences is empty"),
            ({"near": differences["near"], "far": {"KNN": differences["far"]["KNN"]}},
             r"differences\['far'\] has baselines \['KNN'\]"),
            ({"near": {"KNN": {"auroc": (0.1, 0.2, 0.0)}}}, "with low <= high"),
            ({"near": {"KNN": {"auroc": (0.1, float("nan"), 0.2)}}}, "must be finite"),
            ({"near": {"KNN": {"acc": (0.1, 0.0, 0.2)}}}, r"unknown metric\(s\) \['acc'\]")):
        with pytest.raises(ValueError, match=message):
            report.plot_differences(bad, tmp_path / "d.png")


def test_every_dataset_and_method_gets_its_own_colour(tmp_path, monkeypatch):
    """Past matplotlib's 10-colour cycle an 11th dataset took the ID set's colour; a long
    legend goes beside the panel rather than over the histograms or the ROC curves."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from grood import report

    drawn = recorded_figures(monkeypatch)
    rng = np.random.default_rng(1)
    sets = {f"set{i}": rng.normal(-0.2 * i, 1, 50) for i in range(23)}
    methods = {f"method{i}": sets for i in range(12)}
    report.plot_histograms({"GROOD": sets}, tmp_path / "h.png")
    report.plot_roc(methods, "set0", ["set1"], tmp_path / "r.png")
    steps = [p for p in drawn[0].axes[0].patches if not p.get_fill()]  # one outline per set
    assert len({to_rgba(p.get_edgecolor()) for p in steps}) == len(sets)
    curves = [ln for ln in drawn[1].axes[0].lines if ln.get_label().startswith("method")]
    assert len({to_rgba(ln.get_color()) for ln in curves}) == len(methods)
    legend = drawn[0].axes[0].get_legend()
    assert legend.get_bbox_to_anchor().x0 > drawn[0].axes[0].get_window_extent().x1
    # ROC curves of many methods: the legend beside the panel (inside, 22 entries covered
    # the curves and the panel's title), neighbouring curves apart by their style too.
    roc = drawn[1].axes[0]
    assert roc.get_legend().get_bbox_to_anchor().x0 > roc.get_window_extent().x1
    assert all(a.get_linestyle() != b.get_linestyle() for a, b in pairwise(curves))
    report.plot_roc({f"method{i}": sets for i in range(3)}, "set0", ["set1"],
                    tmp_path / "r3.png")
    few = drawn[2].axes[0]
    assert few.get_legend().get_window_extent().x1 <= few.get_window_extent().x1 + 1
    assert {ln.get_linestyle() for ln in few.lines if ln.get_label().startswith("method")} \
        == {"-"}
    assert all(len(set(map(to_rgba, report._colors(n)))) == n for n in (1, 10, 11, 20, 21, 40))
    assert report._colors(3) == ["C0", "C1", "C2"]  # the default cycle where it suffices


def test_histograms_of_scores_spanning_decades_use_a_log_axis_of_minus_score(tmp_path,
                                                                          monkeypatch):
    """GROOD's ID scores lie between about -1e-25 and -1e-6 and its OOD scores near -1: on a
    linear axis every ID score fell in the last bin. ``scale="auto"`` draws such a method's
    panel as each set's fraction over -score on a log axis running right to left (ID stays on
    the right); other methods keep their linear density panels."""
    pytest.importorskip("matplotlib")
    from grood import report

    drawn = recorded_figures(monkeypatch)
    rng = np.random.default_rng(0)
    ident = -(10.0 ** rng.uniform(-25, -6, 300))
    ident[:4] = 0.0  # training rows score exactly 0
    grood_sets = {"id": ident, "ood": -rng.uniform(0.05, 1.0, 200)}
    scores = {"GROOD": grood_sets, "Energy": {"id": rng.normal(12, 3, 300),
                                              "ood": rng.normal(4, 2, 200)}}
    report.plot_histograms(scores, tmp_path / "h.png", {"GROOD": (-1e-3, 0.95)})
    log_ax, linear_ax = drawn[0].axes[:2]
    assert log_ax.get_xscale() == "log" and linear_ax.get_xscale() == "linear"
    left, right = log_ax.get_xlim()
    assert left > right and left == pytest.approx(1.0, rel=0.05)  # -score falls to the right
    assert right == pytest.approx(-ident[ident < 0].max())
    # Each set drawn as two artists, its filled bars and their outline, not a patch per bin
    # (a figure of 22 panels took twice as long to draw).
    assert len(log_ax.patches) == 4
    filled = [p.get_data() for p in log_ax.patches if p.get_fill()]
    assert [bars.values.size for bars in filled] == [40, 40]
    np.testing.assert_allclose([bars.values.sum() for bars in filled], [1.0, 1.0])  # zeros in
    labels = [t.get_text() for t in log_ax.get_legend().get_texts()]
    assert labels[0] == "id (4 at 0, in the rightmost bin)" and labels[1] == "ood"
    line = next(ln for ln in log_ax.lines if ln.get_linestyle() == "--")
    assert line.get_xdata()[0] == 1e-3  # the threshold, at -threshold
    assert "-score, log scale" in log_ax.get_xlabel()
    assert linear_ax.get_xlabel() == "score (higher = in-distribution)"

    # Scores within a few decades, any positive score, or a threshold of 0 stay linear.
    for sets, marks in (({"id": -rng.uniform(0.01, 1, 50)}, None),
                        ({"id": np.append(ident, 1e-9)}, None),
                        (grood_sets, {"GROOD": (0.0, 0.95)})):
        report.plot_histograms({"GROOD": sets}, tmp_path / "h.png", marks)
        assert drawn[-1].axes[0].get_xscale() == "linear"
    report.plot_histograms({"GROOD": {"id": -rng.uniform(0.01, 1, 50)}}, tmp_path / "h.png",
                           scale="log")
    assert drawn[-1].axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="'Energy' has scores above 0"):
        report.plot_histograms(scores, tmp_path / "h.png", scale="log")
    with pytest.raises(ValueError, match="'GROOD' has scores above 0, none below 0"):
        report.plot_histograms({"GROOD": {"id": np.zeros(5)}}, tmp_path / "h.png", scale="log")
    with pytest.raises(ValueError, match="scale must be 'auto', 'linear' or 'log'"):
        report.plot_histograms(scores, tmp_path / "h.png", scale="symlog")
    assert report.plot_histograms(scores, tmp_path / "h.png", scale="linear").exists()
    assert drawn[-1].axes[0].get_xscale() == "linear"


def test_a_linear_histogram_axis_stops_short_of_far_tails_and_counts_what_lies_beyond(
        tmp_path, monkeypatch):
    """A few Mahalanobis scores of -14,000 beside a bulk between -500 and -20 stretched the
    axis until the bulk fell in one or two of 40 bins. The axis now reaches at most one bulk
    width (every set's 5th to 95th percentile, and the threshold) beyond the bulk; the scores
    beyond it are drawn in its end bins and counted in the legend. Normal scores are drawn
    whole, and a threshold out in a tail stays on the axis."""
    pytest.importorskip("matplotlib")
    from grood import report

    drawn = recorded_figures(monkeypatch)
    rng = np.random.default_rng(0)
    ident = -rng.uniform(20, 120, 300)
    ood = np.concatenate([-rng.uniform(60, 500, 690), -rng.uniform(2_000, 14_000, 10)])

    def edges(ax):  # the drawn bins' left and right ends, and the legend's texts
        bars = [p.get_data().edges for p in ax.patches if p.get_fill()]
        return (min(b[0] for b in bars), max(b[-1] for b in bars),
                [t.get_text() for t in ax.get_legend().get_texts()])

    report.plot_histograms({"Mahalanobis": {"id": ident, "ood": ood}}, tmp_path / "h.png")
    left, right, labels = edges(drawn[-1].axes[0])
    bulk_lo = min(np.percentile(ident, 5), np.percentile(ood, 5))
    bulk_hi = max(np.percentile(ident, 95), np.percentile(ood, 95))
    assert left == pytest.approx(bulk_lo - (bulk_hi - bulk_lo))
    assert right == pytest.approx(ident.max())  # no far tail on that side
    assert labels == ["id", "ood (10 beyond the axis, in its end bins)"]
    heights = [p.get_data().values for p in drawn[-1].axes[0].patches if p.get_fill()][1]
    assert heights[0] > 0  # the ten far scores, in the first bin

    # A threshold far out in the tail widens the bulk, so the axis still shows it.
    report.plot_histograms({"M": {"id": ident, "ood": ood}}, tmp_path / "h.png",
                           {"M": (-3_000.0, 0.95)})
    left, _, labels = edges(drawn[-1].axes[0])
    assert left == pytest.approx(-3_000 - (bulk_hi + 3_000))
    assert labels[1] == f"ood ({np.sum(ood < left)} beyond the axis, in its end bins)"

    # Normally distributed scores, and scores all at one value, are drawn whole.
    normal = {"id": rng.normal(12, 3, 20_000), "ood": rng.normal(4, 2, 20_000)}
    report.plot_histograms({"Energy": normal}, tmp_path / "h.png")
    left, right, labels = edges(drawn[-1].axes[0])
    assert left == pytest.approx(min(v.min() for v in normal.values()))
    for bars in (p.get_data() for p in drawn[-1].axes[0].patches if p.get_fill()):
        assert np.sum(bars.values * np.diff(bars.edges)) == pytest.approx(1.0)  # densities
    assert right == pytest.approx(max(v.max() for v in normal.values()))
    assert labels == ["id", "ood"]
    report.plot_histograms({"MSP": {"id": np.ones(50), "ood": np.append(np.ones(40), 0.2)}},
                           tmp_path / "h.png")
    assert edges(drawn[-1].axes[0])[2] == ["id", "ood"]


def test_pictures_are_written_atomically_in_the_format_their_suffix_names(tmp_path,
                                                                           monkeypatch):
    """A drawing that failed halfway left a truncated picture; now the old one stays."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from grood import report

    scores = {"GROOD": {"id": np.linspace(0, 1, 30), "ood": np.linspace(-1, 0.5, 20)}}
    assert report.plot_roc(scores, "id", ["ood"], tmp_path / "roc.pdf").read_bytes()[:5] \
        == b"%PDF-"
    old = report.plot_histograms(scores, tmp_path / "h.png").read_bytes()
    real = Figure.savefig

    def halfway(self, fname, **kwargs):
        real(self, fname, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", halfway)
    with pytest.raises(OSError, match="No space left"):
        report.plot_histograms(scores, tmp_path / "h.png", scale="linear")
    assert (tmp_path / "h.png").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "roc.pdf"]
