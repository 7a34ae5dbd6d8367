"""OOD detection metrics with OpenOOD's definitions.

OOD samples are the positive class and scores are higher for in-distribution samples, so a
sample is flagged as OOD when its score is *at or below* a threshold. Over all distinct
thresholds (ties move together):

* ``auroc``: area under the ROC curve (trapezoidal), OOD as positive.
* ``fpr95``: the fraction of ID samples flagged as OOD at the first threshold (walking from the
  most OOD-like score upward) at which at least 95 % of OOD samples are flagged.
* ``aupr_in``: area under the precision-recall curve with ID as positive, ranked by score.
* ``aupr_out``: area under the precision-recall curve with OOD as positive, ranked by -score.

The PR areas are trapezoidal over the curve that ``sklearn.metrics.precision_recall_curve``
returns, as OpenOOD computes them (not average precision). One note on ``fpr95``: OpenOOD reads
it from ``sklearn.metrics.roc_curve`` with its default ``drop_intermediate=True``, which can
drop the exact crossing point when ties make several thresholds collinear and then reports a
slightly larger FPR; this module uses every threshold, i.e. the definition above.

Beside them: :func:`threshold_at_tpr` (a decision threshold on held-out ID scores) with
:func:`threshold_acceptance` (what such a threshold accepts of new ID samples, by the size of
its calibration set), and the percentile-bootstrap intervals of the metrics for one method
(:func:`bootstrap_metrics`) and of the difference between two on the same samples
(:func:`bootstrap_difference`), and of a metric's mean over several OOD sets
(:func:`bootstrap_mean_metrics`), from the metrics of each resample (:func:`resampled_metrics`,
:func:`resampled_set_metrics`; several methods' at once, in threads, :func:`resampled_methods`)
and their percentiles (:func:`percentile_intervals`, :func:`paired_difference`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from grood_kernels.contract import check_positive_int

from ._checks import check_fraction, check_integer, prefixed_errors

# Integers beyond 2**53 are not all exact in float64: distinct scores would tie.
_EXACT_INT = 2**53


def as_score_array(x: Any, name: str) -> np.ndarray:
    """Scores as a float64 numpy array (any shape), or an error if they are not real numbers
    or are integers that float64 would round (distinct scores tying silently)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    arr = np.asarray(x)
    if arr.dtype.kind == "b":  # flags rank nothing, and is_ood's would rank OOD above ID
        raise TypeError(f"{name} holds booleans (is_ood's flags, or a comparison?): the "
                        "metrics rank scores, higher = more in-distribution; pass the "
                        "scores themselves (score_samples)")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu" and arr.size and (arr.max() > _EXACT_INT
                                                or arr.min() < -_EXACT_INT):
        raise ValueError(f"{name} holds integers beyond 2**53, which float64 cannot tell "
                         "apart (distinct scores would tie); rescale them")
    return arr.astype(np.float64)


def _as_scores(x: Any, name: str) -> np.ndarray:
    arr = as_score_array(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        shown = ", ".join(str(int(i)) for i in bad[:5])
        more = f" (first 5 of {bad.size})" if bad.size > 5 else ""
        raise ValueError(f"{name} contains NaN or Inf at position(s) {shown}{more}: drop or "
                         "rescore those samples (a GROOD head with checks='flag' scores the "
                         "rows it cannot resolve NaN)")
    return arr


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Area under the curve ``y(x)`` by the trapezoidal rule (the areas every metric uses)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def roc_curve(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with OOD as positive: ``(fpr, tpr)`` over every distinct threshold."""
    id_s, ood_s = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    ranked = _Ranked(id_s, ood_s)
    return ranked.roc(*ranked.counts())


def threshold_at_tpr(id_scores: Any, tpr: float = 0.95) -> float:
    """The decision threshold that accepts a fraction ``tpr`` of in-distribution samples.

    A sample is accepted as ID when its score is at or above the threshold and flagged as OOD
    below it. The threshold is the largest that accepts at least ``tpr`` of ``id_scores`` —
    one of those scores, so the comparison is exact in their dtype; tied scores are accepted
    together, so the accepted fraction may exceed ``tpr``. Choose it on held-out ID data: the
    training set's own scores are higher than new samples' (with k = 1 its indexed rows score
    0).

    Args:
        id_scores (array-like): scores of held-out in-distribution samples, shape [N].
        tpr (float): the fraction of them to accept, in (0, 1].

    Returns:
        float: the threshold.
    """
    level = check_fraction(tpr, "tpr")  # 95 (a percentage) would accept nothing
    s = _as_scores(id_scores, "id_scores")
    m = _accepted_count(level, s.size)
    return float(np.partition(s, s.size - m)[s.size - m])


def _accepted_count(tpr: float, n: int) -> int:
    """The fewest of ``n`` samples a threshold at ``tpr`` accepts; rounded first so that
    0.7 * 10 = 7.000000000000001 asks for 7, not 8."""
    return max(1, math.ceil(round(tpr * n, 9)))


def threshold_acceptance(n: int, tpr: float = 0.95) -> tuple[float, float]:
    """What a threshold chosen by :func:`threshold_at_tpr` on ``n`` held-out ID scores accepts
    of *new* ID samples: the mean and standard deviation of that fraction over calibration
    sets of ``n`` rows.

    The threshold is the m-th highest of the n scores (m = ⌈tpr · n⌉), so for scores drawn
    independently from one continuous distribution the fraction of new samples at or above it
    follows Beta(m, n − m + 1): mean m / (n + 1), variance mean · (1 − mean) / (n + 2). The
    mean is below the accepted fraction of the calibration rows themselves (m / n); the spread
    says how far one calibration set's threshold may land from it (at tpr = 0.95: 90.5 ± 6.3 %
    for n = 20, 94.1 ± 2.3 % for 100, 94.9 ± 0.7 % for 1,000). Tied scores (accepted
    together) make the fraction larger.

    Args:
        n (int): the number of held-out ID scores the threshold was chosen on.
        tpr (float): the fraction it was chosen to accept, in (0, 1].

    Returns:
        tuple[float, float]: ``(mean, std)``, fractions in [0, 1].
    """
    level = check_fraction(tpr, "tpr")
    n = check_positive_int(n, "n")
    mean = _accepted_count(level, n) / (n + 1)
    return mean, math.sqrt(mean * (1 - mean) / (n + 2))


def ood_metrics(id_scores: Any, ood_scores: Any, *, recall_level: float = 0.95
                ) -> dict[str, float]:
    """AUROC, FPR at 95 % TPR and AUPR-in/out for one ID set against one OOD set.

    Args:
        id_scores (array-like): scores of in-distribution samples, shape [N_id].
        ood_scores (array-like): scores of OOD samples, shape [N_ood]. Higher = more ID.
        recall_level (float): the TPR (fraction of OOD detected, in (0, 1]) for ``fpr95``.

    Returns:
        dict: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out`` as floats in [0, 1].
    """
    # 95 (a percentage) would find no threshold and report fpr95 = 0
    level = check_fraction(recall_level, "recall_level")
    id_s, ood_s = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
    ranked = _Ranked(id_s, ood_s)
    return ranked.metrics(*ranked.counts(), level)


#: Fewest resamples a percentile-bootstrap interval is placed from.
MIN_RESAMPLES = 100


def bootstrap_metrics(id_scores: Any, ood_scores: Any, *, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, recall_level: float = 0.95,
                      progress: bool | None = False) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of :func:`ood_metrics`: how far each metric could move
    with other samples of the same two distributions.

    The ID and the OOD scores are each resampled with replacement to their own size (the two
    sets are drawn separately, so each resample keeps their sizes), ``n_boot`` times from a
    generator seeded with ``seed`` (the same intervals on every run), and each metric's
    interval is the central ``level`` of its ``n_boot`` values. Whether one method beats
    another on the same samples is :func:`bootstrap_difference`'s question (the two methods'
    errors are correlated, so overlapping intervals do not settle it).

    Args:
        id_scores (array-like): scores of in-distribution samples, shape [N_id].
        ood_scores (array-like): scores of OOD samples, shape [N_ood]. Higher = more ID.
        n_boot (int): resamples, at least 100.
        level (float): the interval's coverage, in (0, 1).
        seed (int): seed of the resampling (``numpy.random.default_rng``).
        recall_level (float): as :func:`ood_metrics`.
        progress (bool or None): a progress bar (None: on a terminal, plain lines in logs).

    Returns:
        dict: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``, each ``(low, high)``.
    """
    _check_coverage(level)  # before the resampling's work
    return percentile_intervals(resampled_metrics(
        id_scores, ood_scores, n_boot=n_boot, seed=seed, recall_level=recall_level,
        progress=progress), level)


def bootstrap_difference(a: tuple[Any, Any], b: tuple[Any, Any], *, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0, recall_level: float = 0.95,
                         progress: bool | None = False) -> dict[str, tuple[float, float]]:
    """Paired percentile-bootstrap intervals of ``metric(a) - metric(b)`` for two methods'
    scores of the same samples: ``a`` and ``b`` are ``(id_scores, ood_scores)`` pairs, row i
    of each the same sample. Each resample draws the samples once and scores both methods on
    them, so what the two share (the hard samples) cancels; an interval that excludes 0 says
    the sets resolve which method is better by that metric (for AUROC, AUPR: ``a`` better
    above 0; for FPR@95, ``a`` better below 0). Arguments otherwise as
    :func:`bootstrap_metrics`.

    Returns:
        dict: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``, each ``(low, high)`` of the
        difference.
    """
    _check_coverage(level)
    for name, pair in (("a", a), ("b", b)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:  # (an array's rows would do)
            what = (f"shape {tuple(pair.shape)}" if hasattr(pair, "shape")
                    else type(pair).__name__)
            raise ValueError(f"{name} must be one method's (id_scores, ood_scores) pair, got "
                             f"{what}")
    sizes = []
    for name, pair in (("a", a), ("b", b)):
        with prefixed_errors(name):  # (which method's scores are bad)
            sizes.append(tuple(_as_scores(s, what).size for s, what in
                               zip(pair, ("id_scores", "ood_scores"), strict=True)))
    if sizes[0] != sizes[1]:
        raise ValueError(f"the two methods scored different samples: {sizes[0][0]} ID and "
                         f"{sizes[0][1]} OOD scores against {sizes[1][0]} and {sizes[1][1]}; "
                         "the paired bootstrap needs each method's scores of the same rows")
    both = resampled_methods({"a": (a[0], [a[1]]), "b": (b[0], [b[1]])}, n_boot=n_boot,
                             seed=seed, recall_level=recall_level, progress=progress)
    ra, rb = both["a"][0], both["b"][0]
    return percentile_intervals({key: ra[key] - rb[key] for key in ra}, level)


def resampled_metrics(id_scores: Any, ood_scores: Any, *, n_boot: int = 1000, seed: int = 0,
                      recall_level: float = 0.95, progress: bool | None = False
                      ) -> dict[str, np.ndarray]:
    """Each metric of :func:`ood_metrics` over ``n_boot`` bootstrap resamples (as
    :func:`bootstrap_metrics` draws them), by metric, [n_boot] each. The draws depend only on
    ``seed`` and the two set sizes, so two methods' scores of the same samples resampled with
    the same seed are paired, resample by resample (their difference is
    :func:`bootstrap_difference`'s); :func:`percentile_intervals` turns them into intervals."""
    return resampled_set_metrics(id_scores, [ood_scores], n_boot=n_boot, seed=seed,
                                 recall_level=recall_level, progress=progress)[0]


def resampled_set_metrics(id_scores: Any, ood_sets: list[Any] | tuple[Any, ...], *,
                          n_boot: int = 1000, seed: int = 0, recall_level: float = 0.95,
                          progress: bool | None = False) -> list[dict[str, np.ndarray]]:
    """:func:`resampled_metrics` of one ID set against each of several OOD sets, with the ID
    set resampled once per resample for all of them (the sets share it, so its sampling error
    moves every set's metrics together, as it does the mean over the sets). Each resample
    draws the ID scores, then each OOD set in the order given, from a generator seeded with
    ``seed``: with one set, the draws of :func:`resampled_metrics`; with several, each set's
    resamples follow the same distribution as alone but are other draws. The draws depend
    only on ``seed`` and the sizes, so two methods' resamples of the same sets pair up.
    Several sets are scored side by side in threads where they are long enough to gain
    (:data:`THREADED_SCORES`), each resample's draws made first, in the same order.

    Returns:
        list: per OOD set, each metric's [n_boot] values by metric.
    """
    from grood._progress import progress as progress_bar

    id_s, oods, n_boot, seed = _checked_sets(id_scores, ood_sets, n_boot, seed, recall_level)
    threads = _threads([id_s.size + o.size for o in oods], None, len(oods))
    with progress_bar(total=n_boot, desc="bootstrap", unit="resamples", enabled=progress) as bar:
        return _resampled(id_s, oods, n_boot, seed, recall_level, bar.update, threads)


#: Scores (ID and OOD together) a set's resample must hold, on average over the sets, for
#: :func:`resampled_methods` to resample methods in threads by default: below it the Python
#: work between numpy's calls, which holds the interpreter's lock, outweighs what the threads
#: share (2 threads on 2 cores: 0.81x at 5,000 scores, 1.16x at 20,000, 1.57x at 50,000).
THREADED_SCORES = 20000
#: Threads :func:`resampled_methods` takes by default at most: each holds its method's
#: sorted sets and their work rows (96 bytes per score: 30 MB for OpenOOD's
#: ImageNet-1k ID set against its five OOD sets), and the Python between numpy's calls runs
#: one thread at a time however many there are.
MAX_THREADS = 8


def resampled_methods(methods: Mapping[str, tuple[Any, list[Any] | tuple[Any, ...]]], *,
                      n_boot: int = 1000, seed: int = 0, recall_level: float = 0.95,
                      progress: bool | None = False, workers: int | None = None
                      ) -> dict[str, list[dict[str, np.ndarray]]]:
    """:func:`resampled_set_metrics` of several methods' scores of the same samples, by name
    ``{method: (id_scores, [ood_scores, ...])}``: each method's resamples drawn alike (so
    they pair, as :func:`paired_difference` needs), the methods side by side in ``workers``
    threads (default: :func:`cpu_threads`, torch's thread count, at most one per method and
    :data:`MAX_THREADS`, where the sets are large enough to gain (:data:`THREADED_SCORES`),
    else one; numpy's element-wise work runs outside Python's lock; a single method's sets
    side by side instead), one progress bar over all. The values equal those of
    :func:`resampled_set_metrics` called for each method; every method's scores are
    checked, and a bad one named by its method, before any resample. A method that fails
    (or an interrupt) stops the others within a resample.

    Returns:
        dict: by method, per OOD set, each metric's [n_boot] values by metric.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from grood._progress import progress as progress_bar

    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("methods maps each method's name to its (id_scores, [ood_scores, "
                         "...]); got " + (f"an empty {type(methods).__name__}" if
                                          isinstance(methods, Mapping) else
                                          type(methods).__name__))
    if workers is not None:
        workers = check_positive_int(workers, "workers")
    checked = {}
    for name, pair in methods.items():
        with prefixed_errors(str(name)):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError("each method's entry is its (id_scores, [ood_scores, ...]), "
                                 f"got {type(pair).__name__}"
                                 + (f" of {len(pair)}" if isinstance(pair, (tuple, list))
                                    else ""))
            checked[name] = _checked_sets(*pair, n_boot, seed, recall_level)
    n_boot, seed = next(iter(checked.values()))[2:]  # (checked alike for every method)
    sizes = [id_s.size + o.size for id_s, oods, _, _ in checked.values() for o in oods]
    workers, set_threads = ((1, _threads(sizes, workers, len(sizes))) if len(checked) == 1
                            else (_threads(sizes, workers, len(checked)), 1))
    lock, stop = threading.Lock(), threading.Event()
    with progress_bar(total=n_boot * len(checked), desc="bootstrap", unit="resamples",
                      enabled=progress) as bar:
        def advance() -> None:
            if stop.is_set():  # another method failed, or the caller was interrupted
                raise _Stopped
            with lock:
                bar.update(1)

        def one(sets: tuple[np.ndarray, list[np.ndarray], int, int]
                ) -> list[dict[str, np.ndarray]]:  # (one method alone: its sets side by side)
            return _resampled(sets[0], sets[1], n_boot, seed, recall_level, advance,
                              set_threads)

        if workers == 1:
            return {name: one(sets) for name, sets in checked.items()}
        pool = ThreadPoolExecutor(workers)
        try:
            futures = [pool.submit(one, sets) for sets in checked.values()]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled()
                      and f.exception() is not None
                      and not isinstance(f.exception(), _Stopped)]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            out = [f.result() for f in futures]
        except BaseException:  # (Ctrl-C too) the other methods stop within a resample
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return dict(zip(checked, out, strict=True))


class _Stopped(Exception):
    """A method's resamples stopped because another's failed (:func:`resampled_methods`)."""


def _threads(sizes: list[int], workers: int | None, tasks: int) -> int:
    """Threads for ``tasks`` side by side over sets of ``sizes`` scores: ``workers`` where
    given, else :func:`cpu_threads` (at most :data:`MAX_THREADS`) where the sets hold
    :data:`THREADED_SCORES` scores on average, else one; never more than the tasks."""
    if workers is None:
        workers = (min(cpu_threads(), MAX_THREADS)
                   if sum(sizes) >= THREADED_SCORES * len(sizes) else 1)
    return max(1, min(tasks, workers))


def cpu_threads() -> int:
    """The threads grood's CPU work may take: torch's (``torch.get_num_threads()``, which
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` set; by default the machine's cores), so
    that one setting bounds the bootstrap's threads as it does the scoring's."""
    return max(1, torch.get_num_threads())


def _checked_sets(id_scores: Any, ood_sets: Any, n_boot: Any, seed: Any, recall_level: Any
                  ) -> tuple[np.ndarray, list[np.ndarray], int, int]:
    """The arguments of :func:`resampled_set_metrics` checked: the ID and OOD scores, the
    number of resamples and the seed."""
    n_boot = check_positive_int(n_boot, "n_boot")
    if n_boot < MIN_RESAMPLES:
        raise ValueError(f"n_boot={n_boot} resamples cannot place a percentile interval's "
                         f"ends; use at least {MIN_RESAMPLES} (1,000 is usual)")
    seed = check_integer(seed, "seed")
    check_fraction(recall_level, "recall_level")
    if not isinstance(ood_sets, (list, tuple)):
        raise TypeError("ood_sets is a list of OOD score arrays, one per set; got "
                        f"{type(ood_sets).__name__} (one set's scores go in a list of one)")
    if not ood_sets:
        raise ValueError("ood_sets is empty: give at least one set of OOD scores")
    id_s = _as_scores(id_scores, "id_scores")
    name = "ood_scores" if len(ood_sets) == 1 else "ood_sets[{}]"
    return id_s, [_as_scores(s, name.format(j)) for j, s in enumerate(ood_sets)], n_boot, seed


def _resampled(id_s: np.ndarray, oods: list[np.ndarray], n_boot: int, seed: int,
               recall_level: float, advance: Callable[[], object], threads: int = 1
               ) -> list[dict[str, np.ndarray]]:
    """The resamples of :func:`resampled_set_metrics` (arguments checked), ``advance`` called
    after each; the sets of a resample scored in ``threads`` threads (its draws made first,
    in the order one thread makes them: the ID set's, then each OOD set's)."""
    from concurrent.futures import ThreadPoolExecutor

    ranked = [_Ranked(id_s, ood_s) for ood_s in oods]
    rng = np.random.default_rng(seed)
    values: list[dict[str, list[float]]] = [{} for _ in oods]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for _ in range(n_boot):
            id_draws = rng.integers(0, id_s.size, id_s.size)
            draws = [rng.integers(0, ood_s.size, ood_s.size) for ood_s in oods]

            def scored(j: int, id_draws: np.ndarray = id_draws,
                       draws: list[np.ndarray] = draws) -> dict[str, float]:
                return ranked[j].metrics(*ranked[j].counts(id_draws, draws[j]), recall_level)

            for out, got in zip(values, (pool.map if pool else map)(scored, range(len(oods))),
                                strict=True):
                for key, value in got.items():
                    out.setdefault(key, []).append(value)
            advance()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [{key: np.array(v) for key, v in out.items()} for out in values]


def bootstrap_mean_metrics(id_scores: Any, ood_sets: list[Any] | tuple[Any, ...], *,
                           n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                           recall_level: float = 0.95, progress: bool | None = False
                           ) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of each metric averaged over several OOD sets scored
    against one ID set, unweighted (OpenOOD's near- and far-OOD summaries): the ID set is
    resampled once per resample for every set (:func:`resampled_set_metrics`), since its
    error is shared by them all, and each OOD set on its own. Arguments otherwise as
    :func:`bootstrap_metrics`; with one set, its intervals.

    Returns:
        dict: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``, each ``(low, high)`` of the
        mean over the sets.
    """
    _check_coverage(level)
    return percentile_intervals(mean_of_sets(resampled_set_metrics(
        id_scores, ood_sets, n_boot=n_boot, seed=seed, recall_level=recall_level,
        progress=progress)), level)


def mean_of_sets(per_set: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric averaged over the sets, unweighted: of :func:`resampled_set_metrics`'
    values resample by resample, or of :func:`ood_metrics`' values (the mean row of
    OpenOOD's summaries)."""
    if not per_set:
        raise ValueError("mean_of_sets needs at least one set's resampled metrics")
    return {key: sum(values[key] for values in per_set) / len(per_set) for key in per_set[0]}


def paired_difference(a: dict[str, float], b: dict[str, float],
                      resampled_a: dict[str, np.ndarray], resampled_b: dict[str, np.ndarray],
                      level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Method a's metrics minus method b's on the same samples (``a``, ``b``: as
    :func:`ood_metrics` gives them, or :func:`mean_of_sets` of them) with the paired
    percentile interval of the difference from their resamples, drawn alike
    (:func:`resampled_metrics` or :func:`resampled_set_metrics` with one seed):
    ``(difference, low, high)`` by metric, as :func:`grood.report.plot_differences` takes
    them."""
    ci = percentile_intervals({key: resampled_a[key] - resampled_b[key] for key in resampled_a},
                              level)
    return {key: (a[key] - b[key], *ci[key]) for key in ci}


def percentile_intervals(values: dict[str, np.ndarray], level: float = 0.95
                         ) -> dict[str, tuple[float, float]]:
    """The central ``level`` of each metric's resampled values (:func:`resampled_metrics`,
    or a difference of two methods' values): ``(low, high)`` by metric."""
    tail = (1 - _check_coverage(level)) / 2
    return {key: (float(np.quantile(v, tail)), float(np.quantile(v, 1 - tail)))
            for key, v in values.items()}


def _check_coverage(level: Any) -> float:
    """An interval's coverage, a fraction in (0, 1)."""
    coverage = check_fraction(level, "level")
    if coverage == 1:
        raise ValueError("level=1 asks for an interval holding every resample; give a "
                         "coverage below 1 (e.g. 0.95)")
    return coverage


class _Ranked:
    """ID and OOD scores sorted once into runs of equal scores; the metrics of the set, or of
    a resample of it, from the ID and OOD samples each run holds (a resample holds the same
    distinct values with other multiplicities, so its curves are the cumulative counts at
    the ends of the runs, the runs it leaves empty dropped), with no sort per resample. A
    resample given by its draws is counted by run directly, with no pass over the samples.
    Counts are whole numbers, so every sum is exact in any order: a resample's metrics equal,
    bit for bit, :func:`ood_metrics` of the resampled arrays (tested).

    The curves are computed in buffers kept from one resample to the next: arrays of this
    size freshly allocated each time were returned to the system and faulted in again, which
    took two thirds of a resample's time at 60,000 scores."""

    def __init__(self, id_s: np.ndarray, ood_s: np.ndarray) -> None:
        conf = np.r_[id_s, ood_s]
        order = np.argsort(conf, kind="mergesort")  # ascending: OOD-like first
        starts = np.r_[True, np.diff(conf[order]) != 0]
        run = np.empty(conf.size, dtype=np.intp)
        run[order] = np.cumsum(starts) - 1
        self.n_runs = int(starts.sum())
        self.id_run, self.ood_run = run[:id_s.size], run[id_s.size:]
        self._work: tuple[np.ndarray, np.ndarray] | None = None

    def counts(self, id_draws: np.ndarray | None = None, ood_draws: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ID and the OOD samples in each run [runs] (int64), of the set itself (no draws)
        or of the resample that drew ``id_draws`` (indices into the ID scores) and
        ``ood_draws``."""
        ids = self.id_run if id_draws is None else self.id_run[id_draws]
        oods = self.ood_run if ood_draws is None else self.ood_run[ood_draws]
        return (np.bincount(ids, minlength=self.n_runs),
                np.bincount(oods, minlength=self.n_runs))

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """An integer row and float [10, runs + 1] work rows, made once: the cumulative counts
        (rows 0 and 1, later the PR curve's), the curves (rows 2 to 7) and the areas' terms
        (rows 8 and 9)."""
        if self._work is None:
            self._work = (np.empty(self.n_runs + 1, dtype=np.int64),
                          np.empty((10, self.n_runs + 1)))
        return self._work

    def roc(self, id_runs: np.ndarray, ood_runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)``: the ROC curve (OOD positive, lowest scores first) of the samples
        :meth:`counts` gives by run (arrays of their own)."""
        fpr, tpr = self._curves(id_runs, ood_runs)[:2]
        return fpr.copy(), tpr.copy()

    def _curves(self, id_runs: np.ndarray, ood_runs: np.ndarray) -> tuple[np.ndarray, ...]:
        """The ROC curve ``(fpr, tpr)``, the OOD and ID samples at or below each threshold
        present, lowest first (``tps``, ``fps``: AUPR-out's curve), then the ID and the OOD
        samples at or above each threshold present, highest first (AUPR-in's curve): views
        of the work rows, valid until the next call. Counts are whole numbers below 2**53, so
        every sum and difference of them is exact in float64."""
        ints, floats = self._buffers()
        n = id_runs.size
        cum_id, cum_ood = floats[0, :n], floats[1, :n]
        for runs, cum in ((id_runs, cum_id), (ood_runs, cum_ood)):
            cum[:] = np.cumsum(runs, out=ints[:n])  # (summed as floats, 8x slower)
        at = np.flatnonzero(np.add(id_runs, ood_runs, out=ints[:n]))  # non-empty runs
        k = at.size
        fpr, tpr, tps, fps, id_down, ood_down = (floats[r, :k + 1] for r in range(2, 8))
        fps, tps, id_down, ood_down = fps[:k], tps[:k], id_down[:k], ood_down[:k]
        np.take(cum_id, at, out=fps)
        np.take(cum_ood, at, out=tps)
        # At or above a run: all but what lies below it.
        for runs, total, up, down in ((id_runs, cum_id[-1], fps, id_down),
                                      (ood_runs, cum_ood[-1], tps, ood_down)):
            highest_first = down[::-1]
            highest_first[:] = np.take(runs, at, out=ints[:k])
            highest_first += total
            highest_first -= up
        fpr[0] = tpr[0] = 0.0
        np.divide(fps, fps[-1], out=fpr[1:])
        np.divide(tps, tps[-1], out=tpr[1:])
        return fpr, tpr, tps, fps, id_down, ood_down

    def _area(self, y: np.ndarray, x: np.ndarray) -> float:
        """:func:`trapezoid` in the work rows (the same operations, so the same value)."""
        floats = self._buffers()[1]
        m = x.size - 1
        step = np.subtract(x[1:], x[:-1], out=floats[8, :m])
        step *= np.add(y[1:], y[:-1], out=floats[9, :m])
        step /= 2.0
        return float(np.sum(step))

    def _pr_area(self, tps: np.ndarray, fps: np.ndarray) -> float:
        """The area under the precision-recall curve of the true and false positives at each
        threshold present, the curve starting at (recall 0, precision 1) as scikit-learn's
        does; in the work rows (the cumulative counts' rows, free by then)."""
        floats = self._buffers()[1]
        k = tps.size
        recall, precision = floats[0, :k + 1], floats[1, :k + 1]
        recall[0], precision[0] = 0.0, 1.0
        np.divide(tps, tps[-1], out=recall[1:])
        np.divide(tps, np.add(tps, fps, out=precision[1:]), out=precision[1:])
        return self._area(precision, recall)

    def metrics(self, id_runs: np.ndarray, ood_runs: np.ndarray, recall_level: float
                ) -> dict[str, float]:
        """:func:`ood_metrics` of the samples :meth:`counts` gives by run."""
        fpr, tpr, tps, fps, id_down, ood_down = self._curves(id_runs, ood_runs)
        return {
            "auroc": self._area(tpr, fpr),
            "fpr95": float(fpr[np.argmax(tpr >= recall_level)]),
            "aupr_in": self._pr_area(id_down, ood_down),
            "aupr_out": self._pr_area(tps, fps),
        }
