"""Hyper-parameters chosen on validation sets: :func:`tune` fits a detector or a baseline at
every point of a grid on the training set, scores an ID validation set and OOD validation
sets with it, and keeps the point whose metric, averaged over the OOD sets, is best. This is
the automatic parameter search OpenOOD v1.5 runs for its postprocessors (each method's
sweep, chosen by AUROC on held-out ID and OOD validation splits), for grood's estimators:
GROOD itself, the feature and logit baselines of :mod:`grood.baselines`, and ODIN and
RankFeat through the model (:mod:`grood.model_baselines`).

Points that differ only in parameters the estimator applies when scoring (its
``score_params``: GROOD's and KNN's ``k``, a temperature, ASH's percentile, every
parameter of ODIN and RankFeat, which learn nothing) share one fit: a grid over GROOD's
``k`` fits once. Choose on validation sets, never on the test sets the results are
reported on: a choice made there makes every metric of the chosen point optimistic.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grood._checks import check_device, check_positive_int, prefixed_errors
from grood._columns import names_checked
from grood._progress import progress as progress_bar
from grood.io import KEYS, FeatureFile

#: The metrics a grid may be chosen by, each with whether higher is better.
HIGHER_IS_BETTER = {"auroc": True, "aupr_in": True, "aupr_out": True, "fpr95": False}


@dataclass
class Tuning:
    """What :func:`tune` measured: every point of the grid, in the grid's order, with each
    OOD validation set's metrics, and the best point's estimator, fitted.

    Attributes:
        metric (str): the metric the best point was chosen by (``auroc``, ``fpr95``,
            ``aupr_in`` or ``aupr_out``).
        points (list[dict]): the parameters of each point.
        results (list[dict]): for each point, its metrics by OOD set (``auroc``, ``fpr95``,
            ``aupr_in``, ``aupr_out``: fractions in [0, 1], as :func:`grood.ood_metrics`).
        best_index (int): the best point's place in ``points`` (the first of any tied).
        best_estimator: a copy of the estimator with the best point's parameters, fitted on
            the training set (ODIN and RankFeat: with them; nothing is fitted).
        fits (int): how many fits the search ran (points that differ only in
            ``score_params`` share one).
        name (str): the estimator's class name, as the table's title names it.
    """

    metric: str
    points: list[dict[str, Any]]
    results: list[dict[str, dict[str, float]]]
    best_index: int
    best_estimator: Any
    fits: int
    name: str

    @property
    def best_params(self) -> dict[str, Any]:
        """The best point's parameters."""
        return dict(self.points[self.best_index])

    @property
    def best_score(self) -> float:
        """The best point's metric, averaged over the OOD validation sets."""
        return self.means()[self.best_index]

    @property
    def sets(self) -> list[str]:
        """The OOD validation sets, by name, in the order given."""
        return list(self.results[0])

    def means(self, metric: str | None = None) -> list[float]:
        """Each point's ``metric`` (by default the one chosen by) averaged over the OOD
        validation sets, in the grid's order."""
        metric = check_metric(self.metric if metric is None else metric)
        return [_mean(r, metric) for r in self.results]

    def table(self) -> str:
        """A Markdown table: a row per point (its parameters, each OOD set's metric and
        their mean, in %), the best marked with ``*``."""
        from grood.report import METRIC_LABELS, markdown_table

        names = list(dict.fromkeys(k for p in self.points for k in p))
        label = METRIC_LABELS[self.metric]
        sets = self.sets
        header = [*names, *(f"{label} {s}" for s in sets)] if len(sets) > 1 else list(names)
        header.append(f"{label} mean" if len(sets) > 1 else label)
        rows = []
        for i, (point, result, mean) in enumerate(zip(self.points, self.results, self.means(),
                                                       strict=True)):
            row: list[Any] = [_shown(point[k]) if k in point else "" for k in names]
            row += [result[s][self.metric] for s in sets] if len(sets) > 1 else []
            cell = f"{100 * mean:.2f}"
            row.append(f"{cell} *" if i == self.best_index else cell)
            rows.append(row)
        if not names:  # (a grid of one point, the estimator's own parameters)
            header.insert(0, "point")
            rows = [["as given", *r] for r in rows]
        return markdown_table(header, rows)

    @property
    def varied(self) -> list[str]:
        """The parameters that take more than one value over the grid's points."""
        return [k for k in dict.fromkeys(k for p in self.points for k in p)
                if len({repr(p.get(k)) for p in self.points}) > 1]

    def summary(self) -> str:
        """One line: the best point, its metric and how it was chosen."""
        from grood.report import METRIC_LABELS

        words = "highest" if HIGHER_IS_BETTER[self.metric] else "lowest"
        params = ", ".join(f"{k}={_shown(v)}" for k, v in self.best_params.items())
        n = len(self.sets)
        where = ("on the OOD validation set" if n == 1 else
                 f"averaged over the {n} OOD validation sets")
        points = len(self.points)
        return (f"{self.name}: {params or 'its parameters as given'} has the {words} "
                f"{METRIC_LABELS[self.metric]} {where}, {100 * self.best_score:.2f} % "
                f"({points} point{'s' * (points != 1)}, {self.fits} "
                f"fit{'s' * (self.fits != 1)})")

    def as_dict(self) -> dict[str, Any]:
        """The search as plain data (for JSON): the metric, the best point, the fits, and
        each point's parameters, metrics by OOD set and mean."""
        return {"method": self.name, "metric": self.metric, "best_index": self.best_index,
                "best_params": self.best_params, "best_score": self.best_score,
                "fits": self.fits,
                "points": [{"params": dict(p), "metrics": r, "mean": m} for p, r, m in
                           zip(self.points, self.results, self.means(), strict=True)]}

    def __repr__(self) -> str:
        return f"{self.summary()}\n\n{self.table()}"

    _repr_markdown_ = __repr__  # (Jupyter renders the table)

    def plot(self, path: str | os.PathLike, *, param: str | None = None) -> Path:
        """Draw the mean metric against one parameter (``param``; by default the first that
        takes more than one value), a line for each setting of the others, the best point
        starred; numeric values on a log axis where they are positive and span two decades
        or more, others (strings, None) evenly spaced. Returns ``path`` (PNG without a
        suffix)."""
        return plot_searches([self], path, params=[param])

    def _param(self, param: str | None) -> str:
        """``param``, checked, or the first parameter that varies."""
        varied = self.varied
        if param is None:
            if not varied:
                raise ValueError(f"{self.name}: every point of the grid has the same "
                                 "parameters: there is nothing to draw a metric against")
            return varied[0]
        if param not in varied:
            raise ValueError(f"param={param!r} takes more than one value in no point of the "
                             f"grid; those that do: {', '.join(varied) or 'none'}")
        return param

    def _draw(self, ax: Any, param: str) -> None:
        """The search on the axes ``ax``, against ``param`` (see :meth:`plot`)."""
        from grood.report import METRIC_LABELS, _colors

        values = list(dict.fromkeys(repr(p.get(param)) for p in self.points))
        raw: dict[str, Any] = {repr(p.get(param)): p.get(param) for p in self.points}
        numeric = all(isinstance(raw[v], (int, float)) and not isinstance(raw[v], bool)
                      and math.isfinite(raw[v]) for v in values)
        log = numeric and all(raw[v] > 0 for v in values) and \
            max(raw[v] for v in values) >= 100 * min(raw[v] for v in values)
        where = {v: (raw[v] if numeric else i) for i, v in enumerate(values)}
        lines: dict[str, list[tuple[Any, float, int]]] = {}
        means = self.means()
        for i, p in enumerate(self.points):
            rest = ", ".join(f"{k}={_shown(v)}" for k, v in p.items() if k != param)
            lines.setdefault(rest, []).append((where[repr(p.get(param))], means[i], i))
        best = None
        for (rest, pts), color in zip(lines.items(), _colors(len(lines)), strict=True):
            pts.sort(key=lambda t: t[0])
            ax.plot([t[0] for t in pts], [100 * t[1] for t in pts], "o-", color=color,
                    label=rest or None)
            best = next(((x, y, color) for x, y, i in pts if i == self.best_index), best)
        if best is not None:  # (last: the legend lists the lines first)
            ax.plot([best[0]], [100 * best[1]], "*", color=best[2], markersize=16,
                    markeredgecolor="black", label="best", zorder=3)
        if log:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [_shown(raw[v]) for v in values])
        ax.set_xlabel(param)
        sets = self.sets
        ax.set_ylabel(f"{METRIC_LABELS[self.metric]} (%)"
                      + (f", mean of {len(sets)} OOD sets" if len(sets) > 1 else ""))
        ax.set_title(f"{self.name}: {METRIC_LABELS[self.metric]} on the validation sets",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_searches(searches: Sequence[Tuning], path: str | os.PathLike, *,
                  params: Sequence[str | None] | None = None) -> Path:
    """Draw several searches (:func:`tune`'s results), a panel each, three to a row, each
    as :meth:`Tuning.plot` draws one (``params``: the parameter of each panel, None for its
    first that varies). Returns ``path`` (PNG without a suffix)."""
    from grood.report import _grid, _save, _target, figure_class

    searches = list(searches)
    if not searches or not all(isinstance(t, Tuning) for t in searches):
        raise TypeError("plot_searches takes a list of grood.tune results (Tuning)")
    params = list(params) if params is not None else [None] * len(searches)
    if len(params) != len(searches):
        raise ValueError(f"params names {len(params)} parameter(s) for {len(searches)} "
                         "search(es): give one for each (None: its first that varies)")
    figure = figure_class()
    chosen = [t._param(p) for t, p in zip(searches, params, strict=True)]
    target = _target(path)
    fig, axes = _grid(figure, len(searches), (6.4, 4.2))
    for t, ax, param in zip(searches, axes, chosen, strict=True):
        t._draw(ax, param)
    fig.tight_layout()
    return _save(fig, target)


def _mean(result: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """One point's ``metric`` averaged over its OOD validation sets."""
    return float(np.mean([m[metric] for m in result.values()]))


def _shown(value: Any) -> str:
    """A parameter's value as a table cell or a label: floats in their shortest form."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_metric(metric: Any) -> str:
    """``metric``, one of :data:`HIGHER_IS_BETTER`'s names."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric must be one of {', '.join(HIGHER_IS_BETTER)}, got {metric!r}")
    return str(metric)


def grid_points(grid: Any) -> list[dict[str, Any]]:
    """The points of ``grid``: a mapping of parameter names to the values to try (every
    combination, the last name varying fastest), or a list of such mappings (their points
    one after another). ``{}`` is one point: the estimator's own parameters. numpy scalars
    (``np.arange(1, 6)``'s) become Python numbers."""
    grids = [grid] if isinstance(grid, Mapping) else grid
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Iterable):
        raise TypeError(f"grid takes a mapping of parameter names to lists of values (or a "
                        f"list of such mappings), got {type(grid).__name__}")
    grids = list(grids)
    if not grids:
        raise ValueError("grid is an empty list: give at least one mapping of parameter "
                         "names to values")
    points: list[dict[str, Any]] = []
    for g in grids:
        if not isinstance(g, Mapping):
            raise TypeError(f"grid takes a mapping of parameter names to lists of values (or "
                            f"a list of such mappings); got a list holding "
                            f"{type(g).__name__}")
        values = []
        for name, v in g.items():
            if not isinstance(name, str):
                raise TypeError(f"grid's parameter names are strings, got {name!r}")
            if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
                raise TypeError(f"grid[{name!r}] takes a list of the values to try, got "
                                f"{v!r} (one value: [{v!r}])")
            v = [x.item() if isinstance(x, np.generic) else x for x in v]  # (np.arange)
            if not v:
                raise ValueError(f"grid[{name!r}] is empty: give at least one value to try")
            values.append(v)
        points += [dict(zip(g, combo, strict=True)) for combo in itertools.product(*values)]
    return points


def _copy(est: Any, params: Mapping[str, Any]) -> Any:
    """A new, unfitted estimator of ``est``'s class with its parameters and then ``params``
    (nested estimators, such as an OOD prototype source, copied the same way; other
    values, a model among them, shared)."""
    own = {k: _copy(v, {}) if hasattr(v, "get_params") and not isinstance(v, type) else v
           for k, v in est.get_params(deep=False).items()}
    return type(est)(**own).set_params(**params)


def _kind(est: Any) -> str:
    """``grood``, ``baseline`` (fitted on a training set, scoring its features or logits)
    or ``inputs`` (ODIN, RankFeat: scoring the model's inputs)."""
    from grood.detector import GROOD
    from grood.model_baselines import scores_inputs

    if isinstance(est, type):
        raise TypeError(f"tune takes an estimator, got the class {est.__name__}: pass "
                        f"{est.__name__}()")
    if isinstance(est, GROOD):
        return "grood"
    if scores_inputs(est):
        return "inputs"
    if hasattr(est, "inputs") and hasattr(est, "score_samples") and hasattr(est, "fit") \
            and hasattr(est, "get_params"):
        return "baseline"
    raise TypeError(f"tune takes a grood.GROOD detector or a grood baseline (grood.KNN(), "
                    f"grood.ODIN(), ...), got {type(est).__name__}")


def _as_set(value: Any, name: str, inputs: str) -> FeatureFile:
    """A validation or training set as :func:`grood.evaluate` takes one (a mapping, a
    :class:`FeatureFile`, a path; an array is what the estimator scores, its ``inputs``:
    features, or a logit baseline's logits), or a mapping of ``logits`` (and ``labels``)
    alone, for the logit baselines."""
    from grood.evaluation import LazySet, as_eval_set

    if inputs == "logits" and not isinstance(
            value, (Mapping, FeatureFile, LazySet, str, os.PathLike)):
        return FeatureFile(None, None, value)
    if isinstance(value, Mapping) and "features" not in value and "logits" in value:
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            raise ValueError(f"{name}: a set given as a mapping holds 'features', 'logits' "
                             f"and 'labels'; got keys {sorted(value)}")
        return FeatureFile(None, value.get("labels"), value["logits"])
    return as_eval_set(value, name)


def _ood_sets(ood_val: Any) -> dict[str, Any]:
    """The OOD validation sets by name: a mapping of sets by name, or one set (named
    ``OOD``)."""
    if isinstance(ood_val, Mapping):
        if not ood_val:
            raise ValueError("ood_val holds no set: give at least one OOD validation set")
        looks_like_one = [k for k in ood_val if k in KEYS]
        if looks_like_one:
            raise ValueError(f"ood_val takes OOD sets by name ({{'name': set}}), and this "
                             f"mapping has the key {looks_like_one[0]!r}, as one set of "
                             f"arrays would: give it by name, ood_val={{'val': {{...}}}}")
        return dict(ood_val)
    return {"OOD": ood_val}


def _fit(kind: str, est: Any, train: FeatureFile | None, fit_params: dict[str, Any]) -> None:
    """Fit ``est`` on ``train`` as its kind is fitted."""
    from grood.baselines import fit_baseline

    if kind == "grood":
        from grood.prototypes import resolve_source

        needs = resolve_source(est.ood_prototype).needs  # (ood_features: where it reads them)
        est.fit(train.features, train.labels, logits=train.logits,  # type: ignore[union-attr]
                **{k: v for k, v in fit_params.items() if k in needs})
    elif kind == "baseline":
        fit_baseline(est, features=train.features, labels=train.labels,  # type: ignore[union-attr]
                     logits=train.logits, **fit_params)  # type: ignore[union-attr]


def _check_train(kind: str, est: Any, train: Any, fit_params: dict[str, Any]) -> None:
    """Refuse a training set (a :class:`FeatureFile`; for ODIN and RankFeat, anything but
    None) and ``fit_params`` that ``est``'s kind cannot be fitted on, before any fit."""
    from grood.baselines import check_fitting_inputs

    who = type(est).__name__
    if kind == "inputs":
        if train is not None or fit_params:
            raise ValueError(f"{who} learns nothing (it scores the model's inputs): give no "
                             "train and no fit_params")
        return
    if train is None:
        raise ValueError(f"{who} is fitted on a training set: give train (its features, "
                         "labels and logits, as grood.evaluate takes a set)")
    if kind == "grood":
        if train.features is None or train.labels is None:
            raise ValueError(f"GROOD is fitted on the training features and labels: train "
                             f"has no {'features' if train.features is None else 'labels'}")
        unknown = sorted(set(fit_params) - {"ood_features"})
    else:
        unknown = sorted(set(fit_params) - {"weight", "bias"})
        check_fitting_inputs(type(est), f"the {who} baseline", features=train.features,
                             labels=train.labels, logits=train.logits,
                             weight=fit_params.get("weight"), bias=fit_params.get("bias"))
    if unknown:
        allowed = "ood_features" if kind == "grood" else "weight and bias (the last layer)"
        raise ValueError(f"fit_params for {who} takes {allowed}; got {unknown[0]!r} (the "
                         "training arrays are given as train)")


def _fit_groups(points: list[dict[str, Any]], score_params: Sequence[str]
                ) -> list[list[int]]:
    """The points' indices grouped by the parameters a fit depends on (all but
    ``score_params``), each group in the grid's order, groups in the order of their first
    point."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        key = repr(sorted((k, repr(v)) for k, v in p.items() if k not in score_params))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def tune(estimator: Any, grid: Any, *, id_val: Any, ood_val: Any, train: Any = None,
         metric: str = "auroc", fit_params: Mapping[str, Any] | None = None,
         model: Any = None, device: Any = None, progress: bool | None = None) -> Tuning:
    """Choose ``estimator``'s parameters from ``grid`` on validation sets: each point fitted
    on ``train`` and scored on ``id_val`` and each of ``ood_val``; the point whose
    ``metric``, averaged over the OOD sets, is best (the first of any tied) is kept, fitted.

    Args:
        estimator: a :class:`grood.GROOD` detector or a :mod:`grood.baselines` estimator
            (fitted or not: it is not changed; each point is a fresh copy), or ODIN or
            RankFeat with ``model``.
        grid: parameter names to lists of values, ``{"k": [1, 5, 10, 50]}`` (every
            combination), or a list of such mappings.
        id_val: the ID validation set, as :func:`grood.evaluate` takes a set (a mapping with
            ``features``, ``logits``, ``labels``; a feature file's path; an array of what
            the estimator scores: features, or a logit baseline's logits), or a mapping of
            ``logits`` alone for a logit baseline; with ``model``, a loader of its inputs.
        ood_val: OOD validation sets by name (a mapping), or one set; as ``id_val``.
        train: the training set the points are fitted on, as ``id_val`` (GROOD: features
            and labels, and logits where the classifier's decide what is indexed; each
            baseline: what its ``fit`` reads). Not for ODIN and RankFeat.
        metric (str): ``auroc`` (default, as OpenOOD chooses), ``fpr95`` (lowest is best),
            ``aupr_in`` or ``aupr_out``.
        fit_params (dict, optional): more arguments of the fits: GROOD's ``ood_features``
            (given to the points whose ``ood_prototype`` reads them: a grid may compare
            ``"features"`` with ``"mean"``), a last-layer baseline's ``weight`` and
            ``bias``.
        model (nn.Module, optional): the classifier, for ODIN and RankFeat.
        device: where a baseline's validation arrays are moved before scoring, as
            :func:`grood.evaluate` moves them, or ODIN's and RankFeat's inputs (default: as
            given; the model's). GROOD computes where its own ``device`` says.
        progress (bool, optional): a progress bar over the points (None: on a terminal).

    Returns:
        Tuning: every point's metrics, the best point, its estimator fitted, a table and
        :meth:`Tuning.plot`.

    The validation sets are read once, before the first fit. At most two fitted copies are
    held at a time: the best so far and the one being scored.
    """
    kind = _kind(estimator)
    metric = check_metric(metric)
    points = grid_points(grid)
    probe = _copy(estimator, {})
    for p in points:  # unknown names, before any work (values are checked where they apply)
        probe.set_params(**p)
    fit_params = dict(fit_params or {})
    device = check_device(device, model=kind == "inputs")
    who = type(estimator).__name__
    if kind == "inputs":
        if model is None:
            raise ValueError(f"{who} scores the model's inputs: give model, and loaders of "
                             "its inputs as id_val and ood_val")
    elif model is not None:
        raise ValueError(f"model is read by ODIN and RankFeat; {who} scores "
                         f"{'features' if kind == 'grood' else estimator.inputs}: give no "
                         "model")
    ood = _ood_sets(ood_val)
    if kind == "inputs":
        _check_train(kind, estimator, train, fit_params)
        train_set, id_set, ood_sets = None, id_val, ood
    else:
        inputs = "features" if kind == "grood" else estimator.inputs
        with prefixed_errors("train"):
            train_set = None if train is None else _as_set(train, "train", inputs)
        with prefixed_errors("id_val"):
            id_set = _as_set(id_val, "id_val", inputs)
        ood_sets = {}
        for name, value in ood.items():
            with prefixed_errors(name):
                ood_sets[name] = _as_set(value, name, inputs)
        for name, data in (("id_val", id_set), *ood_sets.items()):
            if getattr(data, inputs) is None:
                raise ValueError(f"{name}: {who} scores {inputs}, and this set has none")
        _check_train(kind, estimator, train_set, fit_params)
    score_params = tuple(getattr(estimator, "score_params", ()))
    groups = [[i] for i in range(len(points))] if kind == "inputs" else \
        _fit_groups(points, score_params)
    # A point that leaves a score parameter out scores at the estimator's value, not at the
    # one the point before it in its fit group set.
    given = {name: value for name, value in estimator.get_params(deep=False).items()
             if name in score_params}
    results: list[dict[str, dict[str, float]] | None] = [None] * len(points)
    best: tuple[int, float, Any] | None = None  # (index, mean metric, fitted estimator)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    fits = 0
    with progress_bar(total=len(points), desc=f"grood tune: {who}", unit="point",
                      enabled=progress) as bar:
        for group in groups:
            est = _copy(estimator, points[group[0]])
            with prefixed_errors(f"at {_point_words(points[group[0]])}"):
                if kind != "inputs":
                    _fit(kind, est, train_set, fit_params)
                    fits += 1
            shared = _scores_by_k(kind, est, [{**given, **points[i]} for i in group],
                                  id_set, ood_sets, device) if score_params == ("k",) else None
            for i in group:
                with prefixed_errors(f"at {_point_words(points[i])}"):
                    est.set_params(**{**given, **points[i]})
                    results[i] = _measure(kind, est, id_set, ood_sets, model, device) \
                        if shared is None else _metrics(shared[est.k], ood_sets)
                mean = _mean(results[i], metric)  # type: ignore[arg-type]
                if best is None or sign * mean > sign * best[1]:
                    best = (i, mean, est)
                bar.update(1)
    assert best is not None  # (a grid has at least one point)
    index, _, fitted = best
    fitted.set_params(**{**given, **points[index]})  # (its group went on to other points)
    return Tuning(metric, points, results, index, fitted, fits,  # type: ignore[arg-type]
                  who)


def _point_words(point: Mapping[str, Any]) -> str:
    """``k=5, temperature=1000``: a point, as errors name it."""
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "the parameters as given"


def _scores_by_k(kind: str, est: Any, points: list[dict[str, Any]], id_set: Any,
                 ood_sets: Mapping[str, Any], device: Any
                 ) -> dict[int, list[np.ndarray]] | None:
    """The scores of each set (``id_val``, then each OOD set) at each ``k`` of a fit group's
    ``points`` (they differ in ``k`` alone), from one search per set at the largest: GROOD's
    exact and faiss-flat indexes and KNN find the k nearest as a prefix of the largest k's
    (the scores are ``-distances[:, k - 1]``; ``kneighbors`` relates them so), and NNGuide
    the k largest inner products with its bank. None where that is not so (an IVF index, an
    estimator without such a search), where the group has one ``k``, or where the search
    fails (a ``k`` it refuses among them): each point is then scored on its own, and an
    error names the first point it belongs to."""
    from grood.detector import GROOD
    from grood.evaluation import baseline_input
    from grood.neighbours import scores_by_k

    if not (isinstance(est, GROOD) or hasattr(est, "_scores_by_k")):
        return None
    try:
        # (every point's k checked: a refused one, 2.0 among 2 and 3, is refused by its point)
        ks = list(dict.fromkeys(check_positive_int(p["k"], "k") for p in points))
        if len(ks) < 2:
            return None
        out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
        for data in (id_set, *ood_sets.values()):
            if kind == "grood":
                by_k = scores_by_k(est, data.features, ks)
                if by_k is None:
                    return None
                got = by_k[0]
            else:
                x = baseline_input(est.display_name, est, data, device, {})
                with names_checked():
                    got = est._scores_by_k(x, ks)
            for k in ks:
                out[k].append(np.asarray(got[k].cpu() if hasattr(got[k], "cpu") else got[k]))
    except Exception:  # (the same error comes again, from the first point it concerns)
        return None
    return out


def _metrics(scores: list[np.ndarray], ood_sets: Mapping[str, Any]
             ) -> dict[str, dict[str, float]]:
    """Each OOD set's metrics against the ID set, from each set's scores (the ID set's first,
    then the OOD sets' in order)."""
    from grood.metrics import ood_metrics

    return {name: ood_metrics(scores[0], s) for name, s in zip(ood_sets, scores[1:], strict=True)}


def _measure(kind: str, est: Any, id_set: Any, ood_sets: Mapping[str, Any], model: Any,
             device: Any) -> dict[str, dict[str, float]]:
    """Score the validation sets with ``est`` (fitted, at a point): each OOD set's metrics
    against the ID set."""

    def scores(data: Any, name: str) -> np.ndarray:
        with prefixed_errors(name):
            if kind == "inputs":
                return est.score_model(model, data, device=device)[0].numpy()
            if kind == "grood":  # (tune refused sets without features before any fit)
                return np.asarray(est.score_samples(data.features))
            from grood.evaluation import baseline_scores

            return baseline_scores({est.display_name: est}, data, device)[est.display_name]

    return _metrics([scores(id_set, "id_val"),
                     *(scores(data, name) for name, data in ood_sets.items())], ood_sets)
