"""Evaluate a fitted detector: OpenOOD's metrics for an ID set against OOD sets, per set and
per group, with bootstrap intervals and baselines scored on the same samples.

:func:`evaluate` is what ``grood eval`` runs, for Python::

    from grood import evaluate
    ev = evaluate(det, {"features": x_test, "labels": y_test},
                  near={"cifar100": x_c100, "tin": x_tin}, far={"svhn": x_svhn})
    print(ev.table())                      # a row per set, then each group's mean
    ev.results["near-OOD mean of 2 sets"]  # its metrics; ev.openood_csv(): OpenOOD's table

Beside the metrics it checks that the evaluation measures the detector, warning (as
``UserWarning``, naming the set) where it measures something else: ID or OOD rows that are
indexed training rows, an OOD set that is the one the detector's OOD prototype was averaged
from, an OOD set that repeats rows of the ID set, and ID labels the nearest class prototype
gets right no more often than chance (features of another model, labels in another order).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from grood._checks import check_device, check_positive_int, prefixed_errors, user_stacklevel
from grood._columns import names_checked
from grood.io import KEYS, FeatureFile, load_features
from grood.metrics import MIN_RESAMPLES
from grood.model_baselines import scores_inputs

#: The files :meth:`Evaluation.plot` draws: ROC curves, score histograms and (with bootstrap
#: and baselines) the paired differences.
PLOT_FILES = ("roc.png", "histograms.png", "differences.png")
#: Groups of OOD sets, in the table's order: the keyword of :func:`evaluate` and the label
#: of its mean row (OpenOOD's near- and far-OOD summaries; other sets beside them form a
#: third).
GROUPS = (("near", "near-OOD"), ("far", "far-OOD"), ("ood", "OOD"))
#: The name of each group's mean row in OpenOOD's table; the mean of the sets given without
#: a group (``ood``) is ``"ood"``.
OPENOOD_MEAN_NAMES = {"near": "nearood", "far": "farood"}
#: OpenOOD's column for each metric, in its order.
OPENOOD_COLUMNS = {"fpr95": "FPR@95", "auroc": "AUROC", "aupr_in": "AUPR_IN",
                   "aupr_out": "AUPR_OUT"}


#: What the differences table shows, as the lines above it say.
DIFFERENCES_NOTE = ("GROOD minus each baseline on the same samples, with its paired 95 % "
                    "bootstrap interval (above 0: GROOD higher, better but for FPR@95; an "
                    "interval holding 0 does not resolve the two):")


@dataclass(repr=False)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        results (dict): by OOD set name and by mean label, in the table's order, each set's
            metrics (``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``) with ``n_id``, ``n_ood``,
            what the ID set gives (``id_accuracy``, ``id_logits_accuracy``, ``id_accepted``
            where they apply), ``group``, ``flagged`` (at the detector's threshold),
            ``warnings`` (the set's, where it got any; ``id_warnings`` the ID set's), ``ci95``
            (with ``bootstrap``), and each baseline's under ``baselines``; a mean row also
            ``mean_of``, its sets. ``grood eval --json`` writes this.
        scores (dict): each method's scores (GROOD first) by set, the ID set's under
            ``id_key``: numpy arrays.
        id_key (str): the ID set's key in ``scores``.
        id_info (dict): what the ID set alone gives (``n_id``, accuracies, ``id_accepted``).
        layout (list): the rows, ``(name, [])`` for a set, ``(label, names)`` for a mean.
        differences (dict): with ``bootstrap`` and baselines, GROOD minus each baseline,
            ``(difference, low, high)`` by metric, by row and baseline.
        threshold (float): the detector's threshold the ``flagged`` and ``id_accepted``
            fractions are at; None without one. threshold_tpr (float): the fraction of
            calibration rows it was chosen to accept.
    """

    results: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, Any]]
    id_key: str
    id_info: dict[str, Any]
    layout: list[tuple[str, list[str]]]
    differences: dict[str, dict[str, dict[str, tuple[float, float, float]]]]
    threshold: float | None
    threshold_tpr: float | None
    _rows: list[list[Any]] = field(repr=False)
    _diff_rows: list[list[str]] = field(repr=False)

    @property
    def baselines(self) -> list[str]:
        """The baselines' display names, in the table's order."""
        return list(self.scores)[1:]

    def table(self) -> str:
        """The metrics as a Markdown table, in percent: a row per set and per mean (with
        baselines a row per method under each), intervals where ``bootstrap`` gave them,
        ``flagged`` where the detector has a threshold."""
        from grood.report import METRIC_LABELS, markdown_table

        header = ["OOD set", "n", *(["method"] if self.baselines else []),
                  *METRIC_LABELS.values(), *(["flagged"] if self.threshold is not None
                                             else [])]
        return markdown_table(header, self._rows)

    def difference_table(self) -> str | None:
        """With ``bootstrap`` and baselines: GROOD minus each baseline with its paired 95 %
        interval, in percentage points, as a Markdown table (None otherwise)."""
        from grood.report import METRIC_LABELS, markdown_table

        if not self._diff_rows:
            return None
        return markdown_table(["OOD set", "baseline", *METRIC_LABELS.values()],
                              self._diff_rows)

    def summary(self, threshold_words: str | None = None) -> str:
        """The ID set in a line, the metrics table and, with ``bootstrap`` and baselines,
        the differences table: what ``grood eval`` prints, and what ``repr`` (a notebook's
        display of the result) shows. ``threshold_words`` name the threshold in the ID line
        (default: ``threshold`` and its value)."""
        info = self.id_info
        line = f"ID: {self.id_key.removesuffix(' (ID)')} ({info['n_id']:,} samples)"
        if "id_accuracy" in info:
            line += f"; nearest-prototype accuracy {100 * info['id_accuracy']:.2f} %"
        if "id_logits_accuracy" in info:
            line += f", the logits' {100 * info['id_logits_accuracy']:.2f} %"
        if "id_accepted" in info and self.threshold is not None:
            line += (f"; {100 * info['id_accepted']:.2f} % accepted at the detector's "
                     f"{threshold_words or f'threshold {self.threshold:.6g}'}")
        parts = [line, self.table()]
        differences = self.difference_table()
        if differences is not None:
            parts += [DIFFERENCES_NOTE, differences]
        return "\n\n".join(parts)

    def __repr__(self) -> str:
        return f"<grood Evaluation>\n{self.summary()}"

    def _repr_markdown_(self) -> str:  # (Jupyter renders the tables)
        return self.summary()

    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """Draw the ROC curves (``roc.png``, a panel per OOD set, a curve per method), the
        score histograms of every set (``histograms.png``) and, with ``bootstrap`` and
        baselines, GROOD minus each baseline with its paired interval (``differences.png``)
        into ``folder`` (made if missing), the detector's threshold marked where it has one;
        needs matplotlib (``grood[plots]``). Returns the files written."""
        from grood.report import plot_differences, plot_folder, plot_histograms, plot_roc

        out = plot_folder(folder, PLOT_FILES[:3 if self.differences else 2], "plot()")
        marks = (None if self.threshold is None or self.threshold_tpr is None
                 else {"GROOD": (self.threshold, self.threshold_tpr)})
        names = [label for label, members in self.layout if not members]
        roc, histograms, differences = (out / name for name in PLOT_FILES)
        written = [plot_roc(self.scores, self.id_key, names, roc, marks),
                   plot_histograms(self.scores, histograms, marks)]
        if self.differences:
            written.append(plot_differences(self.differences, differences))
        return written

    def openood_csv(self) -> str:
        """The metrics as OpenOOD's evaluator tabulates them (its ``ood.csv``): a row per set
        and per mean (``nearood``, ``farood``, ``ood``), ``FPR@95``, ``AUROC``, ``AUPR_IN``,
        ``AUPR_OUT`` and ``ACC`` (the ID set's nearest-prototype accuracy, empty without
        labels) in percent; with baselines a ``method`` column and a row per method, each
        with the accuracy of the predictions OpenOOD's postprocessor makes (see
        :func:`baseline_accuracy`; empty where the ID set lacks what they need)."""
        out = io.StringIO()
        table = csv.writer(out, lineterminator="\n")
        baselines = self.baselines
        table.writerow(["dataset", *(["method"] if baselines else []),
                        *OPENOOD_COLUMNS.values(), "ACC"])
        for label, members in self.layout:
            m = self.results[label]
            name = OPENOOD_MEAN_NAMES.get(m.get("group", "ood"), "ood") if members else label
            for method, metrics in (("GROOD", m), *((b, m["baselines"][b]) for b in baselines)):
                acc = metrics.get("id_accuracy")
                table.writerow([name, *([method] if baselines else []),
                                *(f"{100 * metrics[k]:.4f}" for k in OPENOOD_COLUMNS),
                                "" if acc is None else f"{100 * acc:.4f}"])
        return out.getvalue()


def evaluate(det: Any, id_set: Any, ood: Mapping[str, Any] | None = None, *,
             near: Mapping[str, Any] | None = None, far: Mapping[str, Any] | None = None,
             baselines: Sequence[Any] = (), bootstrap: int | None = None,
             id_name: str = "the ID set", device: Any = None) -> Evaluation:
    """Score an ID set and OOD sets with a fitted detector and measure each OOD set against
    the ID set, as OpenOOD does (OOD is the positive class).

    Args:
        det (GROOD): a fitted detector (its threshold, if calibrated, gives ``flagged`` and
            ``id_accepted``).
        id_set: the in-distribution test set: a features array [N, D], a mapping with
            ``features`` and optionally ``labels`` (the nearest-prototype accuracy, checked
            against chance) and ``logits`` (their accuracy; the logit baselines), a
            :class:`grood.io.FeatureFile`, or the path of a feature file.
        ood: OOD sets by name, each as ``id_set``; with several, a row averages them.
        near, far: OpenOOD's near- and far-OOD groups, by name: each group's sets, then its
            mean row (where it has two or more); ``ood``'s sets after them.
        baselines: fitted :mod:`grood.baselines` estimators, scored on the same sets (their
            ``inputs``: each set's ``features`` or ``logits``).
        bootstrap (int): resamples for each metric's 95 % percentile interval (at least 100;
            seeded), a mean's too, and with baselines GROOD minus each with its paired
            interval.
        id_name (str): how messages and warnings name the ID set.
        device: where the baselines' inputs are moved before scoring (default: as given).

    Returns:
        Evaluation: the metrics (``results``), scores, tables and OpenOOD's CSV.

    Sets are read one at a time (a path is loaded when its turn comes, and let go before the
    next is read: memory holds one set's rows, and every set's scores). Warns where more
    than 1 % of a set's rows equal indexed training rows, where an OOD set's mean is the
    detector's OOD prototype (``ood_prototype="features"``: the set it was fitted with),
    where more than 1 % of an OOD set's rows repeat rows of the ID set, and where the ID
    labels are hardly better predicted than chance; each warning is kept in ``results`` too
    (the set's ``warnings``; the ID set's ``id_warnings``, on every row).
    """
    from grood._checks import as_tensor
    from grood.calibration import current_threshold
    from grood.metrics import ood_metrics
    from grood.prototypes import fingerprint_rows

    det._check_fitted()
    if det._sharded:
        raise ValueError("evaluate scores in one process, and this detector is sharded across "
                         "ranks: load its manifest without distributed=True for the whole "
                         "index in one process")
    if bootstrap is not None and check_positive_int(bootstrap, "bootstrap") < MIN_RESAMPLES:
        raise ValueError(f"bootstrap={bootstrap}: a percentile interval needs at least "
                         f"{MIN_RESAMPLES} resamples (1000 is usual)")
    device = check_device(device)  # (a name torch does not know, before any scoring)
    sets, layout = eval_layout(ood, near, far)
    methods = baseline_names(baselines)
    by_model = [name for name, est in methods.items() if scores_inputs(est)]
    if by_model and not isinstance(id_set, LazySet):
        raise ValueError(f"the {by_model[0]} baseline scores the model's inputs, which a set "
                         "of features does not hold: give it to grood.evaluate_model, which "
                         "runs each loader through the model")
    threshold = current_threshold(det, required=False)
    with prefixed_errors(id_name):  # before any scoring
        id_data = as_eval_set(id_set, id_name)
        labels, logits = id_labels_and_logits(id_data, det.n_classes_)
        with det._counting_training_rows() as found:
            id_scores, id_pred = (np.asarray(v) for v in det.score_and_predict(id_data.features))
        id_notes = [warn_training_rows(det, id_name, found, len(id_scores), ood=False)]
        id_prints = fingerprint_rows(as_tensor(id_data.features, "features")[0],
                                     det.batch_size)  # 128 bytes a row, for warn_id_rows
        id_preds: dict[str, Any] = {}
        id_base = baseline_scores(methods, id_data, device, predictions=id_preds,
                                  set_name=id_name, progress=det.progress)
        del id_data  # one set's rows in memory at a time (evaluate_model's are on the CPU)
    # What the ID set alone gives, beside every row's metrics (as OpenOOD's ACC column
    # repeats on every row): its size, accuracies and fraction accepted.
    id_info: dict[str, Any] = {"n_id": len(id_scores)}
    if labels is not None:
        id_info["id_accuracy"] = float(np.mean(id_pred == labels))
        if logits is not None:  # the classifier's own, as OpenOOD reports beside its metrics
            id_info["id_logits_accuracy"] = float(np.mean(logits.argmax(1) == labels))
        id_notes.append(warn_id_accuracy(det, id_name, labels, id_info))
    base_info = baseline_accuracy(methods, id_preds, labels,
                                  id_info.get("id_logits_accuracy"))
    if any(id_notes):  # the warnings, kept with the metrics (a --json file outlives stderr)
        id_info["id_warnings"] = [note for note in id_notes if note]
    if threshold is not None:
        id_info["id_accepted"] = float(np.mean(id_scores >= threshold))
    id_key = f"{id_name} (ID)"  # the ID set may also be given as an OOD set
    scores: dict[str, dict[str, Any]] = {"GROOD": {id_key: id_scores},
                                         **{name: {id_key: v} for name, v in id_base.items()}}
    results: dict[str, dict[str, Any]] = {}
    for name, (group, value) in sets.items():
        with prefixed_errors(name):
            data = as_eval_set(value, name)
            with det._counting_training_rows() as found:
                ood_scores = np.asarray(det.score_samples(data.features))
            # (its fingerprints once, for both checks against recorded rows)
            prints = fingerprint_rows(as_tensor(data.features, "features")[0], det.batch_size)
            notes = [note for note in (
                warn_training_rows(det, name, found, len(ood_scores), ood=True),
                warn_ood_fit_set(det, name, data.features, prints),
                warn_id_rows(det, name, data.features, id_prints, id_name, prints)) if note]
            ood_base = baseline_scores(methods, data, device, set_name=name,
                                       progress=det.progress)
            del data  # before the next set is read
        scores["GROOD"][name] = ood_scores
        # the sample counts the metrics came from, as the table's n column
        m = results[name] = {**id_info, "n_ood": len(ood_scores),
                             **ood_metrics(id_scores, ood_scores)}
        if group != "ood":  # OpenOOD's near- or far-OOD
            m["group"] = group
        if notes:
            m["warnings"] = notes
        if threshold is not None:  # the fraction the detector's threshold flags
            m["flagged"] = float(np.mean(ood_scores < threshold))
        if methods:
            m["baselines"] = {}
        for method, s in ood_base.items():
            m["baselines"][method] = {**base_info[method], **ood_metrics(id_base[method], s)}
            scores[method][name] = s
    rows, diff_rows, differences = _eval_rows(results, scores, id_key, bootstrap, layout,
                                              id_info, base_info,
                                              flagged=threshold is not None)
    tpr = None if threshold is None else float(det.calibration_["tpr"])
    return Evaluation(results, scores, id_key, id_info, layout, differences, threshold, tpr,
                      rows, diff_rows)


class LazySet(NamedTuple):
    """A set that :func:`evaluate` reads when its turn comes, by calling ``read`` (how
    :func:`grood.model.evaluate_model` runs each loader through the model)."""

    read: Callable[[], FeatureFile]


def as_eval_set(value: Any, name: str) -> FeatureFile:
    """A set given to :func:`evaluate` as a :class:`FeatureFile`: a path is loaded, a mapping
    read by its keys (``features``, ``labels``, ``logits``; others refused), a
    :class:`LazySet` read, anything else taken as the features."""
    if isinstance(value, LazySet):
        return value.read()
    if isinstance(value, (str, os.PathLike)):
        return load_features(value)
    if isinstance(value, FeatureFile):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(KEYS))
        if unknown or "features" not in value:
            raise ValueError(f"{name}: a set given as a mapping holds 'features' and "
                             f"optionally 'labels' and 'logits'; got keys {sorted(value)}")
        return FeatureFile(value["features"], value.get("labels"), value.get("logits"))
    return FeatureFile(value, None, None)


def check_groups(ood: Any, near: Any, far: Any) -> None:
    """Refuse ``ood``, ``near`` or ``far`` given as anything but sets by name (one set given
    bare, or a list of sets)."""
    for group, value in (("ood", ood), ("near", near), ("far", far)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{group} takes OOD sets by name, a mapping ({group}={{'name': "
                            f"set, ...}}; one set: {group}={{'ood': x}}), got "
                            f"{type(value).__name__}")


def eval_layout(ood: Mapping[str, Any] | None, near: Mapping[str, Any] | None,
                far: Mapping[str, Any] | None
                ) -> tuple[dict[str, tuple[str, Any]], list[tuple[str, list[str]]]]:
    """The OOD sets in the table's order (near's, far's, ood's), each with its group, and the
    rows: ``(name, [])`` for a set's, ``(label, names)`` for the mean over a group of two or
    more."""
    check_groups(ood, near, far)
    given = {"near": near or {}, "far": far or {}, "ood": ood or {}}
    if not any(given.values()):
        raise ValueError("give the OOD sets: ood={name: set, ...}, or OpenOOD's groups near= "
                         "and far=")
    grouped = bool(given["near"] or given["far"])
    sets: dict[str, tuple[str, Any]] = {}
    layout: list[tuple[str, list[str]]] = []
    for group, label in GROUPS:
        names = [str(n) for n in given[group]]
        twice = [n for i, n in enumerate(names) if n in sets or n in names[:i]]
        if twice:  # one row and one metrics entry per set
            raise ValueError("an OOD set is named more than once (names compare as text, "
                             f"across groups): {', '.join(twice)}")
        sets.update({str(n): (group, v) for n, v in given[group].items()})
        layout += [(n, []) for n in names]
        if len(names) > 1:
            layout.append((f"{label + ' ' if grouped else ''}mean of {len(names)} sets", names))
    clash = [label for label, members in layout if members and label in sets]
    if clash:  # a row of its own and a mean row would share the label
        raise ValueError(f"an OOD set is named like a mean row ({clash[0]!r}); name it "
                         "another way (a path, e.g. with ./ in front)")
    return sets, layout


def baseline_names(baselines: Sequence[Any]) -> dict[str, Any]:
    """The fitted baselines by display name (``KNN (k=50)`` with its neighbour, ``ViM
    (dim=1000)``, ``ReAct (p90)``), and those that score the model's inputs (ODIN,
    RankFeat)."""
    from grood.baselines import check_fitted

    if hasattr(baselines, "score_samples") or isinstance(baselines, (str, Mapping)) \
            or not isinstance(baselines, Iterable):
        raise TypeError(f"baselines takes a list of fitted grood.baselines estimators, got "
                        f"{type(baselines).__name__} (one estimator: baselines=[est])")
    out: dict[str, Any] = {}
    for est in baselines:
        if isinstance(est, type):  # the class itself, not a fitted instance
            raise TypeError(f"baselines takes fitted grood.baselines estimators; got the "
                            f"class {est.__name__}: pass {est.__name__}()"
                            + ("" if scores_inputs(est) else ".fit(...)"))
        if not scores_inputs(est):  # (ODIN, RankFeat: nothing to fit; evaluate_model runs them)
            if not (hasattr(est, "inputs") and hasattr(est, "score_samples")):
                raise TypeError(f"baselines takes fitted grood.baselines estimators; got "
                                f"{type(est).__name__}")
            check_fitted(est, f"the {type(est).__name__} baseline")  # (before any scoring)
        name = getattr(est, "display_name", None) or type(est).name
        if name in out:
            raise ValueError(f"two baselines are named {name!r}: give each once")
        out[name] = est
    return out


def baseline_scores(methods: dict[str, Any], data: FeatureFile, device: Any, *,
                     predictions: dict[str, Any] | None = None, set_name: str = "",
                     progress: bool | None = False) -> dict[str, Any]:
    """Each fitted baseline's scores of one set (its logits or its features), numpy arrays by
    display name; each array moved to ``device`` once however many baselines read it. With
    ``predictions``, a baseline that predicts classes (``score_and_predict``: Mahalanobis,
    ViM, ReAct) puts its predictions there too, from the same pass. ``progress`` (as the
    detector's): the baselines counted as they finish, naming the set and the baseline (at
    ImageNet scale each takes seconds to minutes)."""
    from grood._progress import progress as progress_bar

    moved: dict[str, Any] = {}
    out = {}
    bar = progress_bar(total=len(methods), desc=f"baselines on {set_name}".strip(),
                       unit="baselines", enabled=progress if methods else False)
    with bar:
        for name, est in methods.items():
            bar.set_postfix(baseline=name)
            out[name] = _baseline_scores(name, est, data, device, moved, predictions)
            bar.update(1)
    return out


def _baseline_scores(name: str, est: Any, data: FeatureFile, device: Any,
                     moved: dict[str, Any], predictions: dict[str, Any] | None) -> Any:
    """One baseline's scores of one set, for :func:`baseline_scores` (``moved``: the set's
    arrays already on ``device``, by name)."""
    if scores_inputs(est):  # scored as the loader ran through the model
        got = (data.scores or {}).get(name)
        if got is None:  # (a set not read by evaluate_model)
            raise ValueError(f"the {name} baseline scores the model's inputs, and this set "
                             "was not read through the model")
        scores, preds = got
        if predictions is not None:
            predictions[name] = np.asarray(preds)
        return np.asarray(scores)
    x = baseline_input(name, est, data, device, moved)
    with names_checked():  # (checked by baseline_input)
        if predictions is not None and callable(getattr(est, "score_and_predict", None)):
            scores, preds = est.score_and_predict(x)
            predictions[name] = np.asarray(preds.cpu())
        else:
            scores = est.score_samples(x)
    return np.asarray(scores.cpu())


def baseline_input(name: str, est: Any, data: FeatureFile, device: Any,
                   moved: dict[str, Any]) -> Any:
    """What the baseline ``est`` (named ``name``) scores of one set, its features or logits,
    as a tensor on ``device``, moved once per set (``moved``: the set's arrays already there,
    by name); a table's column names checked against the fitted ones. Score it inside
    :func:`grood._columns.names_checked`."""
    from grood._checks import as_tensor

    if est.inputs not in moved:
        value = getattr(data, est.inputs)
        if value is None:
            raise ValueError(f"the {name} baseline scores {est.inputs}: this set has no "
                             f"'{est.inputs}'")
        t = as_tensor(value, est.inputs)[0]
        moved[est.inputs] = t if device is None else t.to(device)
    est.check_columns(getattr(data, est.inputs))  # a table's names: the tensor has none
    return moved[est.inputs]


def baseline_accuracy(methods: dict[str, Any], predictions: dict[str, Any], labels: Any,
                      logits_accuracy: float | None) -> dict[str, dict[str, float]]:
    """Each baseline's ``id_accuracy`` on the labelled ID set (an empty dict without labels),
    from the predictions OpenOOD's postprocessor for it makes: the baseline's own where it
    predicts (``predictions``, by :func:`baseline_scores`: Mahalanobis, the nearest class
    mean; ViM and ReAct, the logits of their last layer, ReAct's of the clipped features),
    else the logits' (``logits_accuracy``, the ID set's ``id_logits_accuracy``: MSP,
    MaxLogit, Energy, GEN and KNN predict from the classifier's logits), where the set has
    them."""
    out: dict[str, dict[str, float]] = {name: {} for name in methods}
    if labels is None:
        return out
    for name in methods:
        if name in predictions:
            out[name]["id_accuracy"] = float(np.mean(predictions[name] == labels))
        elif logits_accuracy is not None:
            out[name]["id_accuracy"] = logits_accuracy
    return out


def id_labels_and_logits(data: FeatureFile, n_classes: int) -> tuple[Any, Any]:
    """The ID set's labels and logits as numpy arrays (``None`` where it has none), checked
    against its rows and the detector's ``n_classes`` before any scoring: class ids out of
    range (OpenOOD's -1 for OOD rows among them), float labels or logits with fewer columns
    than classes would give an accuracy without meaning, without a word (more columns may be
    a classifier over a superset of the detector's classes)."""
    from grood._checks import as_labels, check_labels

    labels = logits = None
    if getattr(data.features, "ndim", None) != 2:  # (the scoring names what is wrong)
        return labels, logits
    n = data.features.shape[0]
    if data.labels is not None:
        y = as_labels(data.labels, "labels")
        check_labels(y, "labels", n, n_classes=n_classes, n_classes_from="the detector's")
        labels = y.cpu().numpy()
    if data.logits is not None:
        logits = np.asarray(data.logits.cpu() if hasattr(data.logits, "cpu") else data.logits)
        if logits.ndim != 2 or len(logits) != n:
            raise ValueError(f"'logits' has shape {logits.shape}, expected ({n}, C) (one row "
                             "per feature row)")
        if logits.shape[1] < n_classes:  # (more may be a classifier over a superset)
            raise ValueError(f"'logits' has {logits.shape[1]} columns but the detector has "
                             f"{n_classes} classes: these are not the logits of the classifier "
                             "it was fitted for")
    return labels, logits


def warn_id_accuracy(det: Any, name: str, labels: Any, id_info: dict[str, Any]
                     ) -> str | None:
    """A warning where the detector's nearest class prototype gets hardly more of the ID
    set's rows right than labels unrelated to the features would
    (:func:`grood._fit.chance_share`): features from another model or preprocessing than the
    detector's training features, or labels in another class order or row order, give
    metrics without meaning, and nothing else in the table shows it. Returns the warning's
    text (None: no warning), as the other checks do."""
    from grood._fit import chance_share

    accuracy, counts = id_info["id_accuracy"], np.bincount(labels, minlength=det.n_classes_)
    largest = chance_share(accuracy, counts, len(labels))
    if largest is None:
        return None
    said = (f"{name}: the detector's nearest class prototype classifies {100 * accuracy:.1f} % "
            f"of its rows correctly (the training set: {100 * det.train_accuracy_:.1f} %), "
            f"about what labels unrelated to the features give (the largest class holds "
            f"{100 * largest:.1f} % of the rows)")
    by_logits = id_info.get("id_logits_accuracy")
    if by_logits is not None and chance_share(by_logits, counts, len(labels)) is None:
        said += (f", while its logits get {100 * by_logits:.1f} % right: are its features "
                 "from the model and preprocessing the detector was fitted with?")
    else:
        said += (": are its features from the model the detector was fitted with, and its "
                 "labels in the detector's class order and in the order of the rows?")
    said += " Its metrics would measure that mismatch."
    warnings.warn(said, UserWarning, stacklevel=user_stacklevel())
    return said


def warn_training_rows(det: Any, name: str, found: list, n: int, *, ood: bool | None
                       ) -> str | None:
    """A warning where more than 1 % of a set's ``n`` rows equal indexed training rows
    (``found``: the scoring's counts of rows with an indexed gradient at distance 0), as
    calibrating on them warns: such rows score as the training set does, higher than new
    samples of their distribution, which inflates the metrics (an ID set) or deflates them
    (an OOD set); ``ood=None``: scores alone (``grood score``), no metrics. Also one where
    more than 1 % score 0 because their own gradients are too small for the dtype's squared
    distances (``found``'s second count): they tie."""
    from grood.calibration import (
        UNRESOLVED_FIX,
        UNRESOLVED_ZEROS,
        training_rows_clause,
        unresolved_share,
        zero_counts,
    )

    zero, unresolved = zero_counts(found).tolist()
    said_unresolved = None
    if unresolved_share(unresolved, n):
        lost = "" if ood is None else ", and the metrics lose their order"
        said_unresolved = (f"{name}: {unresolved} of its {n} rows score 0 ({UNRESOLVED_ZEROS}): "
                           f"they tie{lost}; {UNRESOLVED_FIX}")
        warnings.warn(said_unresolved, UserWarning, stacklevel=user_stacklevel())
    held = training_rows_clause(zero, n, det.k)
    if held is None:
        return said_unresolved
    if det.k == 1:
        held += ", the highest score"
    what = ("they score as the training set does, higher than new samples of their "
            "distribution would; is it (part of) the training set?" if ood is None else
            "is it (part of) the training set? They score higher than new in-distribution "
            "samples would, so the metrics overstate the detector: evaluate on held-out data"
            if not ood else
            "they score as training samples do, so the metrics understate the detector on "
            "this set: does it hold training images?")
    said = (f"{name}: {zero} of its {n} rows equal indexed training rows (an indexed "
            f"gradient at distance 0 up to rounding, {held}): {what}")
    warnings.warn(said, UserWarning, stacklevel=user_stacklevel())
    return said if said_unresolved is None else f"{said_unresolved} {said}"


def _repeated_rows(det: Any, recorded: Any, x: Any, prints: Any) -> int | None:
    """How many rows of ``x`` repeat rows fingerprinted in ``recorded``
    (:func:`grood.prototypes.fingerprint_matches`; ``prints``: ``x``'s fingerprints, or None),
    where more than 1 % do; else None."""
    from grood.prototypes import fingerprint_matches

    hits = int(fingerprint_matches(recorded, x, det.ood_prototype_, det.batch_size,
                                   prints).sum())
    return hits if hits * 100 > x.shape[0] else None


def warn_id_rows(det: Any, name: str, features: Any, id_prints: Any, id_name: str,
                 prints: Any = None) -> str | None:
    """A warning where more than 1 % of an OOD set's rows repeat rows of the ID set, matched
    by fingerprint as :func:`warn_ood_fit_set` matches (``id_prints``: the ID rows'
    :func:`grood.prototypes.fingerprint_rows`): the ID set given again as an OOD set, or
    datasets that share images. Those rows score as the ID rows they repeat, so the set's
    metrics understate the detector by the overlap, not by anything the detector does.
    ``prints``: the set's own fingerprints, where made already."""
    from grood._checks import as_tensor

    x, _ = as_tensor(features, "features")
    hits = _repeated_rows(det, id_prints, x, prints)
    if hits is None:
        return None
    said = (f"{name}: {hits} of its {x.shape[0]} rows repeat rows of {id_name} "
            f"({hits / x.shape[0]:.1%}): they score as those in-distribution rows do, so the "
            "metrics on this set measure that overlap, not the detector: is it the ID set "
            "given again, or do the two datasets share samples?")
    warnings.warn(said, UserWarning, stacklevel=user_stacklevel())
    return said


def warn_ood_fit_set(det: Any, name: str, features: Any, prints: Any = None) -> str | None:
    """A warning where an OOD set repeats the rows the detector's OOD prototype was averaged
    from (``ood_prototype="features"``, ``fit(..., ood_features=X)``). The detector was shaped
    on those samples, so its metrics there are optimistic; OpenOOD keeps such a set (its
    validation OOD) apart from the test sets.

    Where the fit kept their fingerprints (``ood_fingerprints_``), rows are matched one by one
    (:func:`grood.prototypes.fingerprint_matches`), and more than 1 % of the set's rows
    matching warns, with the count. Otherwise (a file saved before fingerprints) the set is
    that set when its mean equals the prototype to a few units in the last place, which no
    other set's does; an overlap goes unseen then. ``prints``: the set's fingerprints, where
    made already."""
    import torch

    from grood._checks import as_tensor, batches
    from grood.prototypes import OODFeatureMean

    recorded = getattr(det, "ood_fingerprints_", None)
    # (the fitted source: ood_prototype set since applies from the next fit)
    if recorded is None and not isinstance(det.ood_source_, OODFeatureMean):
        return None
    x, _ = as_tensor(features, "features")
    advice = ("the detector was shaped on them (grood fit --ood-features, fit(..., "
              "ood_features=...)), so the metrics on this set are optimistic; fit on a "
              "validation OOD set kept apart from the test sets, as OpenOOD does")
    if recorded is not None:
        hits = _repeated_rows(det, recorded, x, prints)
        if hits is None:
            return None
        said = (f"{name}: {hits} of its {x.shape[0]} rows repeat rows the detector's OOD "
                f"prototype was averaged from ({hits / x.shape[0]:.1%}; of those "
                f"{recorded.shape[0]} rows): {advice}")
        warnings.warn(said, UserWarning, stacklevel=user_stacklevel())
        return said
    proto = det.ood_prototype_.detach().cpu().to(torch.float64)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for r0, r1 in batches(x.shape[0], 65536):  # a memory map is read a block at a time
        total += x[r0:r1].to(device="cpu", dtype=torch.float64).sum(0)
    mean = (total / x.shape[0]).to(det.ood_prototype_.dtype).to(torch.float64)
    ulp = torch.finfo(det.ood_prototype_.dtype).eps * float(proto.abs().max())
    if float((mean - proto).abs().max()) > 4 * ulp:
        return None
    said = (f"{name}: its mean is the detector's OOD prototype: it is the OOD set its rows "
            f"were averaged from, and {advice}")
    warnings.warn(said, UserWarning, stacklevel=user_stacklevel())
    return said


def _eval_rows(results: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]],
               id_key: str, n_boot: int | None, layout: list[tuple[str, list[str]]],
               id_info: dict[str, Any], base_info: dict[str, dict[str, Any]], *,
               flagged: bool
               ) -> tuple[list[list[Any]], list[list[str]], dict[str, Any]]:
    """The table's rows and, with ``n_boot`` resamples and baselines, the rows of
    GROOD minus each baseline with its paired interval and those differences by row label
    and baseline (``(difference, low, high)`` by metric, for
    :func:`grood.report.plot_differences`); the intervals go into ``results`` too (``ci95``,
    a baseline's ``grood_minus_ci95``), and ``results`` gains the mean rows (keyed by their
    labels, each with ``mean_of``, its files), all in the table's order.

    ``results`` holds each OOD file's metrics (GROOD's, each baseline's under ``baselines``);
    ``scores`` each method's scores by file (GROOD first), the ID file's under ``id_key``;
    ``layout`` the rows (:func:`_eval_layout`, whose labels no file's path equals);
    ``id_info`` what each row carries of the ID file alone (a mean row too), ``base_info``
    what each baseline's entry on each row carries of it (:func:`baseline_accuracy`). A row per
    method under each file and under each mean over a group of files, the metrics averaged
    unweighted, as OpenOOD summarises them. Each method is resampled once for every file together
    (:func:`grood.metrics.resampled_methods`, the ID scores drawn once per resample for
    all; the methods side by side in threads), so a mean's interval holds the ID set's shared
    error, and two methods' resamples, drawn alike, pair."""
    from grood.metrics import mean_of_sets, percentile_intervals, resampled_methods
    from grood.report import METRIC_LABELS

    paths, methods = list(results), list(scores)
    baselines = methods[1:]

    def metrics_of(name: str, key: str) -> dict[str, Any]:
        return results[key] if name == "GROOD" else results[key]["baselines"][name]

    point = {name: {key: metrics_of(name, key) for key in paths} for name in methods}
    for per_set in point.values():
        averaged = [k for k in (*METRIC_LABELS, "flagged") if k in per_set[paths[0]]]
        for label, members in layout:
            if members:
                per_set[label] = mean_of_sets(
                    [{k: per_set[p][k] for k in averaged} for p in members])
    resampled: dict[str, dict[str, Any]] = {}
    if n_boot is not None:
        every = resampled_methods(
            {name: (scores[name][id_key], [scores[name][k] for k in paths]) for name in methods},
            n_boot=n_boot, progress=None)
        for name in methods:
            resampled[name] = dict(zip(paths, every[name], strict=True))
            for label, members in layout:
                if members:
                    resampled[name][label] = mean_of_sets(
                        [resampled[name][p] for p in members])
            for key, values in resampled[name].items():
                point[name][key]["ci95"] = {k: list(v) for k, v in
                                            percentile_intervals(values).items()}
    rows: list[list[Any]] = []
    diff_rows: list[list[str]] = []
    differences: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {}
    for label, _ in layout:
        for i, name in enumerate(methods):
            m = point[name][label]
            row = [label, m.get("n_ood", "")] if i == 0 else ["", ""]
            row += [*([name] if baselines else []), *_metric_cells(m)]
            if flagged:
                row.append(m["flagged"] if i == 0 else "")
            rows.append(row)
        for j, name in enumerate(baselines if resampled else []):  # is GROOD better here?
            d = differences.setdefault(label, {})[name] = _difference(
                point["GROOD"][label], point[name][label], resampled["GROOD"][label],
                resampled[name][label])
            diff_rows.append([label if j == 0 else "", name,
                              *(f"{100 * v:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f})"
                                for v, lo, hi in d.values())])
    for label, members in layout:  # the JSON in the table's order, the means beside the files
        if not members:
            results[label] = results.pop(label)
            continue
        first = results[members[0]]
        results[label] = {"mean_of": members, **({"group": first["group"]} if "group" in first
                                                 else {}),
                          **id_info, **point["GROOD"][label]}
        if baselines:
            results[label]["baselines"] = {name: {**base_info[name], **point[name][label]}
                                           for name in baselines}
    return rows, diff_rows, differences


def _metric_cells(m: dict[str, Any]) -> list[Any]:
    """A table row's metric cells: fractions (printed as percentages), or with an interval
    ``"94.72 (93.10–96.05)"``."""
    from grood.report import METRIC_LABELS

    if "ci95" not in m:
        return [m[k] for k in METRIC_LABELS]
    return [f"{100 * m[k]:.2f} ({100 * m['ci95'][k][0]:.2f}–{100 * m['ci95'][k][1]:.2f})"
            for k in METRIC_LABELS]


def _difference(grood_m: dict[str, Any], base_m: dict[str, Any],
                grood_resampled: dict[str, Any], base_resampled: dict[str, Any]
                ) -> dict[str, tuple[float, float, float]]:
    """``grood eval --bootstrap --baselines``: GROOD's metrics minus one baseline's on one OOD
    set (or their mean over the sets), each with its paired bootstrap interval (the two
    methods' resamples, drawn alike), ``(difference, low, high)`` by metric; the interval
    kept in the baseline's entry (``grood_minus_ci95``)."""
    from grood.metrics import paired_difference

    d = paired_difference(grood_m, base_m, grood_resampled, base_resampled)
    base_m["grood_minus_ci95"] = {k: [lo, hi] for k, (_, lo, hi) in d.items()}
    return d
