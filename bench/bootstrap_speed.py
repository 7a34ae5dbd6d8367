"""How long a bootstrap resample of the four OOD metrics takes: grood's
(:func:`grood.metrics.resampled_set_metrics`, the scores sorted once and each resample counted
by run of equal scores) against the same resamples scored as arrays, by
:func:`grood.ood_metrics` (one sort per resample) and, where it is installed, by
scikit-learn (``roc_auc_score``, ``roc_curve`` and two ``precision_recall_curve`` areas per
resample: what a bootstrap is otherwise written with). Then six methods' resamples
(:func:`grood.metrics.resampled_methods`, as ``grood eval --bootstrap`` runs GROOD and its
baselines) in one thread against torch's thread count (`grood.metrics.cpu_threads`).

Every resample draws the same indices in the three (the generator of
``resampled_set_metrics``, seeded alike), and their metrics are checked first: grood's equal
``ood_metrics`` of the resampled arrays bit for bit, scikit-learn's within 1e-12. Scores:
Gaussians one standard deviation apart (distinct values), and the same rounded to 2 decimals
(ties, as half-precision or softmax scores give). Per resample, median of the rounds.

    python bench/bootstrap_speed.py            # 50,000 ID x 10,000 OOD, and OpenOOD's sizes
    python bench/bootstrap_speed.py --small    # a quick check
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from functools import partial

import numpy as np

import grood
from grood._bench.common import interleaved_median_times
from grood._checks import positive_int_arg
from grood.metrics import (
    MIN_RESAMPLES,
    THREADED_SCORES,
    cpu_threads,
    ood_metrics,
    resampled_methods,
    resampled_set_metrics,
)

#: (label, ID scores, OOD scores): the README's figure, then OpenOOD v1.5's ImageNet-1k ID
#: test set against SSB-hard (near-OOD, its largest) and CIFAR-10's test set against CIFAR-100.
SHAPES = [("README's figure", 50000, 10000),
          ("ImageNet-1k vs SSB-hard (OpenOOD v1.5)", 45000, 49000),
          ("CIFAR-10 vs CIFAR-100", 10000, 10000)]


def draws(n_id: int, n_ood: int, n_boot: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The index draws of ``resampled_set_metrics`` (one OOD set), resample by resample."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, n_id, n_id), rng.integers(0, n_ood, n_ood))
            for _ in range(n_boot)]


def grood_counts(ids: np.ndarray, oods: np.ndarray, n_boot: int) -> list[dict[str, float]]:
    out = resampled_set_metrics(ids, [oods], n_boot=n_boot)[0]
    return [{k: float(v[b]) for k, v in out.items()} for b in range(n_boot)]


def as_arrays(ids: np.ndarray, oods: np.ndarray, picks: list[tuple[np.ndarray, ...]]
              ) -> list[dict[str, float]]:
    return [ood_metrics(ids[i], oods[o]) for i, o in picks]


def sklearn_metrics(ids: np.ndarray, oods: np.ndarray, picks: list[tuple[np.ndarray, ...]]
                    ) -> list[dict[str, float]]:
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

    out = []
    for i, o in picks:
        conf = np.r_[ids[i], oods[o]]
        is_ood = np.r_[np.zeros(i.size), np.ones(o.size)]
        fpr, tpr, _ = roc_curve(is_ood, -conf, drop_intermediate=False)
        p_in, r_in, _ = precision_recall_curve(1 - is_ood, conf)
        p_out, r_out, _ = precision_recall_curve(is_ood, -conf)
        out.append({"auroc": float(roc_auc_score(is_ood, -conf)),
                    "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
                    "aupr_in": float(auc(r_in, p_in)), "aupr_out": float(auc(r_out, p_out))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes, quick")
    parser.add_argument("--resamples", type=positive_int_arg, default=MIN_RESAMPLES,
                        help=f"resamples per timed run (default and least {MIN_RESAMPLES})")
    parser.add_argument("--repeat", type=positive_int_arg, default=3,
                        help="timed runs of each (median)")
    args = parser.parse_args()
    if args.resamples < MIN_RESAMPLES:
        parser.error(f"--resamples: at least {MIN_RESAMPLES} (resampled_set_metrics's least)")
    shapes = [("small", 2000, 500)] if args.small else SHAPES
    try:
        import sklearn
        sk = f", scikit-learn {sklearn.__version__}"
    except ImportError:
        sklearn = None
        sk = " (scikit-learn not installed: its column is left out)"
    print(f"grood {grood.__version__}, numpy {np.__version__}{sk}, "
          f"{platform.processor() or platform.machine()}, {date.today()}\n")
    print(f"per resample, median of {args.repeat} runs of {args.resamples} resamples\n")
    print("| ID x OOD scores | scores | grood (by run) | `ood_metrics` of the arrays | ratio "
          "| scikit-learn | ratio |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for label, n_id, n_ood in shapes:
        for ties in (False, True):
            ids, oods = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
            if ties:
                ids, oods = np.round(ids, 2), np.round(oods, 2)
            picks = draws(n_id, n_ood, args.resamples)
            ours = grood_counts(ids, oods, args.resamples)
            if ours != as_arrays(ids, oods, picks):
                raise SystemExit(f"{label}: a resample's metrics differ from ood_metrics of "
                                 "its arrays")
            fns = [partial(resampled_set_metrics, ids, [oods], n_boot=args.resamples),
                   partial(as_arrays, ids, oods, picks)]
            if sklearn is not None:
                theirs = sklearn_metrics(ids, oods, picks)
                worst = max(abs(a[k] - b[k]) for a, b in zip(ours, theirs, strict=True)
                            for k in a)
                if worst > 1e-12:
                    raise SystemExit(f"{label}: scikit-learn's metrics differ by {worst:.2e}")
                fns.append(partial(sklearn_metrics, ids, oods, picks))
            times = [t / args.resamples * 1e3
                     for t in interleaved_median_times(fns, "cpu", args.repeat)]
            skl = (f"{times[2]:.2f} ms | {times[2] / times[0]:.1f}x" if len(times) > 2
                   else "– | –")
            print(f"| {label}: {n_id:,} x {n_ood:,} | {'rounded to 0.01' if ties else 'distinct'}"
                  f" | {times[0]:.2f} ms | {times[1]:.2f} ms | {times[1] / times[0]:.1f}x "
                  f"| {skl} |")

    threads_table(shapes, args.resamples, args.repeat)


def threads_table(shapes: list[tuple[str, int, int]], n_boot: int, repeat: int) -> None:
    """Six methods' resamples (``resampled_methods``, as ``grood eval --bootstrap`` runs
    them for GROOD and five baselines) one after another against side by side in threads,
    and what the default chooses; the values checked equal first."""
    workers = cpu_threads()
    print(f"\nsix methods on the same samples (`resampled_methods`), {n_boot} resamples each, "
          f"one thread against {workers} (torch's threads); the default takes threads "
          f"where a set holds {THREADED_SCORES:,} scores or more\n")
    print("| ID x OOD scores | one thread | threads | ratio | default |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(2)
    for label, n_id, n_ood in shapes:
        methods = {f"m{i}": (rng.normal(1.0, 1.0, n_id), [rng.normal(0.0, 1.0, n_ood)])
                   for i in range(6)}
        one, many = (resampled_methods(methods, n_boot=n_boot, workers=w) for w in (1, workers))
        if any(not np.array_equal(a[k], b[k]) for m in methods
               for a, b in zip(one[m], many[m], strict=True) for k in a):
            raise SystemExit(f"{label}: the threads' resamples differ from one thread's")
        t_one, t_many = interleaved_median_times(
            [partial(resampled_methods, methods, n_boot=n_boot, workers=w)
             for w in (1, workers)], "cpu", repeat)
        default = "threads" if n_id + n_ood >= THREADED_SCORES else "one thread"
        print(f"| {label}: {n_id:,} x {n_ood:,} | {t_one:.2f} s | {t_many:.2f} s "
              f"| {t_one / t_many:.2f}x | {default} |")
    sets_table(shapes, n_boot, repeat, workers)


#: One method against several OOD sets, of about the sizes of OpenOOD v1.5's ImageNet-1k
#: benchmark (its ID test set against SSB-hard, NINCO, iNaturalist, Textures and
#: OpenImage-O) and its CIFAR-10 one (against CIFAR-100, TinyImageNet, MNIST, SVHN, Textures
#: and Places365); the metrics' cost depends on the sizes alone.
SET_SHAPES = [("ImageNet-1k, five OOD sets", 45000, [49000, 5879, 10000, 5160, 17632]),
              ("CIFAR-10, six OOD sets", 9000, [9000, 7793, 70000, 26032, 5640, 35195])]


def sets_table(shapes: list[tuple[str, int, int]], n_boot: int, repeat: int,
               workers: int) -> None:
    """One method's OOD sets (``resampled_methods`` of one method, as ``grood eval
    --bootstrap`` runs GROOD alone) scored one after another against side by side."""
    print(f"\none method, several OOD sets, {n_boot} resamples, one thread against {workers}\n")
    print("| ID x OOD sets | one thread | threads | ratio | default |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(3)
    cases = ([("small", shapes[0][1], [shapes[0][2]] * 3)] if shapes[0][0] == "small"
             else SET_SHAPES)
    for label, n_id, sizes in cases:
        one = {"m": (rng.normal(1.0, 1.0, n_id), [rng.normal(0.0, 1.0, n) for n in sizes])}
        a, b = (resampled_methods(one, n_boot=n_boot, workers=w)["m"] for w in (1, workers))
        if any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x):
            raise SystemExit(f"{label}: the threads' resamples differ from one thread's")
        t_one, t_many = interleaved_median_times(
            [partial(resampled_methods, one, n_boot=n_boot, workers=w) for w in (1, workers)],
            "cpu", repeat)
        mean = sum(n_id + n for n in sizes) / len(sizes)
        default = "threads" if mean >= THREADED_SCORES else "one thread"
        print(f"| {label}: {n_id:,} x {', '.join(f'{n:,}' for n in sizes)} | {t_one:.2f} s "
              f"| {t_many:.2f} s | {t_one / t_many:.2f}x | {default} |")


if __name__ == "__main__":
    main()
