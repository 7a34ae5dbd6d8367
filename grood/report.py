"""Tables and pictures of OOD results: a Markdown table, ROC curves, score histograms, paired
differences against baselines, samples beside their nearest training samples."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grood._checks import check_new_folder
from grood.errors import require
from grood.metrics import as_score_array, roc_curve, trapezoid

METRIC_LABELS = {"auroc": "AUROC", "fpr95": "FPR@95", "aupr_in": "AUPR-in",
                 "aupr_out": "AUPR-out"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats are printed as percentages with two decimals. Every row has a
    cell per column; no rows gives the header alone."""

    def cell(v: object) -> str:
        return f"{100 * v:.2f}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    for i, row in enumerate(text):
        if len(row) != len(header):
            raise ValueError(f"row {i} of the table has {len(row)} cells, the header "
                             f"{len(header)} columns ({', '.join(map(str, header))})")
    widths = [max(len(h), *(len(r[i]) for r in text), 0) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"
            for r in text]
    return "\n".join([line, rule, *body])


def _checked(scores: Mapping[str, Mapping[str, np.ndarray]], sets: Sequence[str] | None = None
             ) -> dict[str, dict[str, np.ndarray]]:
    """``scores[method][dataset]`` as 1-D float64 arrays (only ``sets`` when given), or an
    error naming the method and dataset whose scores are missing, empty or not finite (a
    head with ``checks="flag"`` gives NaN for rows it could not score)."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("no methods to plot: scores is empty" if isinstance(scores, Mapping)
                         else "scores must map each method to its scores by dataset "
                         f"({{method: {{dataset: scores}}}}), got a {type(scores).__name__}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for method, by_set in scores.items():
        if not isinstance(by_set, Mapping):
            raise ValueError(f"scores[{method!r}] must map each dataset's name to its scores "
                             f"({{dataset: scores}}), got a {type(by_set).__name__}")
        names = list(by_set) if sets is None else list(sets)
        if not names:
            raise ValueError(f"no datasets to plot for {method!r}")
        out[method] = {}
        for name in names:
            if name not in by_set:
                raise ValueError(f"scores[{method!r}] has no {name!r} scores; it has "
                                 f"{sorted(by_set)}")
            values = as_score_array(by_set[name], f"scores[{method!r}][{name!r}]")
            if values.ndim != 1:  # (a column [N, 1] or logits [N, C] would be drawn flattened)
                raise ValueError(f"scores[{method!r}][{name!r}] must be 1-D, a score per "
                                 f"sample, got shape {values.shape}")
            if values.size == 0 or not np.isfinite(values).all():
                raise ValueError(f"scores[{method!r}][{name!r}] is empty or holds NaN or Inf; "
                                 "plot finite scores only")
            out[method][name] = values
    return out


def _checked_thresholds(thresholds: Mapping[str, tuple[float, float]] | None,
                        scores: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{method: (threshold, tpr)}`` for methods that have scores, finite, tpr in (0, 1]."""
    out = {}
    for method, value in (thresholds or {}).items():
        if method not in scores:
            raise ValueError(f"a threshold for {method!r}, which has no scores")
        try:
            t, tpr = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds[{method!r}] must be a pair of numbers (threshold, tpr)"
                             f", e.g. (det.threshold_, 0.95), got {value!r}") from None
        if not np.isfinite(t) or not 0 < tpr <= 1:
            raise ValueError(f"thresholds[{method!r}] must be (finite threshold, tpr in (0, 1]),"
                             f" got {value!r}")
        out[method] = (t, tpr)
    return out


def figure_class() -> Any:
    """matplotlib's ``Figure``, a missing extra named. Figures are made from it directly, not
    through pyplot: drawing a report neither switches the caller's backend (a notebook's
    inline display keeps working) nor leaves figures open in pyplot's global list."""
    require("matplotlib", extra="plots", purpose="plotting ROC curves, score histograms and "
            "neighbours")
    from matplotlib.figure import Figure

    return Figure


def _image_suffixes() -> tuple[str, ...]:
    """The file suffixes of the image formats matplotlib writes, ``.png`` first (the example
    in the errors)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = [f".{f}" for f in FigureCanvasBase.get_supported_filetypes()]
    return tuple(sorted(formats, key=lambda f: f != ".png"))


def _target(path: str | os.PathLike) -> Path:
    """``path`` checked before anything is drawn: a format matplotlib writes (PNG without a
    suffix) and a folder that exists and can be written to."""
    from grood.persistence import save_target

    save_target(path, suffixes=_image_suffixes() if Path(path).suffix else None,
                what="pictures")
    return Path(path)


def plot_folder(folder: str | os.PathLike, names: tuple[str, ...], what: str,
                inputs: dict[str, Any] | None = None) -> Path:
    """The folder a set of plots (``names``) is drawn into, made if missing, with matplotlib
    imported and each file checked (:func:`grood.persistence.save_target`) before anything is
    drawn or scored; ``what`` names the argument in the errors. A file, or a missing path
    named as an image (``roc.png``), is refused: the plots would not be where it says."""
    from grood.persistence import save_target

    figure_class()  # a missing extra is named first
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} takes a folder (it draws {', '.join(names)} there); "
                         f"{folder} is a file")
    if not out.exists() and out.suffix.lower() in _image_suffixes():
        raise ValueError(f"{what} takes a folder (it draws {', '.join(names)} there); "
                         f"{folder} names an image file: give the folder to draw into, "
                         f"e.g. {out.parent / out.stem}")
    check_new_folder(out, what)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_target(out / name, suffixes=(".png",), what="plots", inputs=inputs)
    return out


def _grid(figure: Any, panels: int, size: tuple[float, float], per_row: int = 3
          ) -> tuple[Any, list[Any]]:
    """A ``figure`` (the class) of ``panels`` panels, ``per_row`` to a row; returns it and the
    used axes (the unused ones are hidden)."""
    cols = min(per_row, panels)
    rows = -(-panels // cols)
    fig = figure(figsize=(size[0] * cols, size[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig, list(axes.flat)[:panels]


def _colors(n: int) -> list[Any]:
    """``n`` distinct line colours: matplotlib's default cycle (10 colours), tab20 for up to 20,
    and beyond it a sampled colour map (the cycle repeats after 10: an 11th dataset would get
    the first one's colour, and the ID set's own where that is first)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n <= 20 else "turbo"]
    return [cmap(i) if n <= 20 else cmap(i / (n - 1)) for i in range(n)]


#: Legend entries (methods and their marked thresholds) :func:`plot_roc` keeps inside a
#: panel, in its lower right corner where ROC curves leave room.
ROC_LEGEND_INSIDE = 8


def plot_roc(scores: Mapping[str, Mapping[str, np.ndarray]], id_name: str,
             ood_names: Sequence[str], path: str | os.PathLike,
             thresholds: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """ROC curves (OOD positive), one panel per OOD set (three to a row) and one curve per
    method.

    Args:
        scores: ``scores[method][dataset]`` arrays (higher = ID).
        id_name: the in-distribution dataset's key.
        ood_names: keys of the OOD datasets, one panel each.
        path: the PNG file to write.
        thresholds: ``{method: (threshold, tpr)}``: that method's operating point (the
            fractions of ID and OOD samples scoring below the threshold) marked on its curve.
    """
    figure = figure_class()  # a missing extra is named before any check
    if isinstance(ood_names, str):  # (its letters would be taken for names)
        raise ValueError(f"ood_names must be a list of dataset names, got the str "
                         f"{ood_names!r}; write [{ood_names!r}]")
    if not ood_names:
        raise ValueError("no OOD datasets to plot: ood_names is empty")
    path = _target(path)
    scores = _checked(scores, [id_name, *ood_names])
    thresholds = _checked_thresholds(thresholds, scores)
    # Beyond ROC_LEGEND_INSIDE entries the legend goes beside each panel (inside, it covered
    # the curves and the title), and the curves' styles alternate so that neighbouring
    # colours of a long list stay apart.
    entries = len(scores) + len(thresholds)
    beside = entries > ROC_LEGEND_INSIDE
    fig, axes = _grid(figure, len(ood_names),
                      (8.0, max(4.6, 1.2 + 0.17 * entries)) if beside else (5.0, 4.6))
    colors = _colors(len(scores))
    styles = ["-", "--", "-.", ":"] if len(scores) > 10 else ["-"]
    for ax, ood in zip(axes, ood_names, strict=True):
        for i, (color, (method, by_set)) in enumerate(zip(colors, scores.items(),
                                                          strict=True)):
            fpr, tpr = roc_curve(by_set[id_name], by_set[ood])
            line, = ax.plot(fpr, tpr, lw=1.6, color=color, ls=styles[i % len(styles)],
                            label=f"{method} ({100 * trapezoid(tpr, fpr):.1f})")
            if method in thresholds:
                t, kept = thresholds[method]
                ax.plot(np.mean(by_set[id_name] < t), np.mean(by_set[ood] < t), "o",
                        color=line.get_color(), ms=6, mec="k", mew=0.8,
                        label=f"{method} at its threshold ({100 * kept:g} % ID kept)")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.axhline(0.95, color="0.8", lw=0.8, ls=":")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (ID flagged as OOD)",
               ylabel="true positive rate (OOD detected)", title=f"{id_name} vs {ood}")
        ax.legend(fontsize=8, title="method (AUROC %)", title_fontsize=8,
                  **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if beside
                     else {"loc": "lower right"}))
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")


def _save(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``fig`` at ``path`` in the format its suffix names (PNG without one),
    atomically (an interrupted write leaves the old picture, not a truncated one), through
    symlinks; returns ``path``."""
    from grood.persistence import written_atomically

    path = Path(path)
    with written_atomically(path) as tmp:  # (tmp has no suffix)
        fig.savefig(tmp, dpi=120, format=path.suffix[1:].lower() or "png", **kwargs)
    return path


#: Decades the nonzero score magnitudes of a method must span (5th to 95th percentile) for
#: ``scale="auto"`` to draw them on a log axis.
LOG_SCALE_DECADES = 3.0


def _log_drawable(values: np.ndarray, threshold: float | None) -> bool:
    """Whether a method's panel (``values``: its sets' scores pooled) can be drawn over -score
    on a log axis: every score <= 0, some below 0, and the threshold (where one is drawn)
    below 0."""
    return bool(values.max() <= 0 < -values.min()) and (threshold is None or threshold < 0)


def _spans_decades(values: np.ndarray) -> bool:
    """Whether the nonzero magnitudes of a method's pooled scores span more than
    :data:`LOG_SCALE_DECADES` decades (5th to 95th percentile). GROOD's do: a confident ID
    sample's gradient is near 0, so its score is near 0 (-1e-20 is common), while OOD samples
    score near -1; on a linear axis every ID score falls in the last bin."""
    lo, hi = np.percentile(-values[values < 0], [5, 95])
    return bool(hi > lo * 10**LOG_SCALE_DECADES)


#: How far, in widths of the range that holds every set's 5th to 95th percentile (its bulk),
#: a linear panel's axis reaches beyond that range on either side at most: a few far scores
#: (Mahalanobis distances of far-OOD samples, say) would otherwise stretch the axis until
#: every set's bulk falls in one or two bins. Normally distributed scores are never cut (the
#: axis reaches 4.9 standard deviations from their mean).
TAIL_REACH = 1.0


def _linear_range(by_set: Mapping[str, np.ndarray], threshold: float | None
                  ) -> tuple[float, float]:
    """A linear panel's axis: from the lowest to the highest score, but on each side at most
    :data:`TAIL_REACH` times the width of the sets' bulk (every set's 5th to 95th percentile,
    and the threshold) beyond it; scores beyond the axis are drawn in its end bins."""
    lo = min(float(np.min(v)) for v in by_set.values())
    hi = max(float(np.max(v)) for v in by_set.values())
    bulks = np.array([np.percentile(v, [5, 95]) for v in by_set.values()])  # one pass a set
    bulk_lo, bulk_hi = float(bulks[:, 0].min()), float(bulks[:, 1].max())
    if threshold is not None:
        bulk_lo, bulk_hi = min(bulk_lo, threshold), max(bulk_hi, threshold)
    reach = TAIL_REACH * (bulk_hi - bulk_lo)
    if reach > 0:  # (all of the bulk at one value: nothing to cut the tails against)
        lo, hi = max(lo, bulk_lo - reach), min(hi, bulk_hi + reach)
    return lo, hi


def plot_histograms(scores: Mapping[str, Mapping[str, np.ndarray]],
                    path: str | os.PathLike,
                    thresholds: Mapping[str, tuple[float, float]] | None = None, *,
                    scale: str = "auto") -> Path:
    """Score histograms, one panel per method, one colour per dataset.

    ``thresholds``: ``{method: (threshold, tpr)}``, a decision threshold (scores below it
    flagged as OOD; :meth:`grood.GROOD.calibrate`) drawn as a dashed line in that method's
    panel. ``scale``: ``"linear"`` (density over the scores), ``"log"`` (the fraction of each
    set over -score on a log axis, running right to left so that in-distribution stays on
    the right; scores of 0 fall in the rightmost bin, and the legend counts them; every score
    and threshold must be <= 0, and < 0 for a threshold) or ``"auto"``: log for a method
    whose scores are all <= 0 and whose nonzero magnitudes span more than 3 decades (GROOD's
    do), linear otherwise. A linear axis stops short of scores far out in a tail
    (:data:`TAIL_REACH`): they are drawn in its end bins, and the legend counts them."""
    if scale not in ("auto", "linear", "log"):
        raise ValueError(f"scale must be 'auto', 'linear' or 'log', got {scale!r}")
    figure = figure_class()  # a missing extra is named before any check
    path = _target(path)
    scores = _checked(scores)
    thresholds = _checked_thresholds(thresholds, scores)
    methods = list(scores)
    logs = {}
    for method in methods:
        pooled = np.concatenate(list(scores[method].values()))
        drawable = _log_drawable(pooled, thresholds.get(method, (None,))[0])
        if scale == "log" and not drawable:
            raise ValueError(f"scale='log' draws -score on a log axis: {method!r} has scores "
                             "above 0, none below 0, or a threshold of 0 or more; use "
                             "scale='linear'")
        logs[method] = drawable and (scale == "log" or (scale == "auto"
                                                        and _spans_decades(pooled)))
    fig, axes = _grid(figure, len(methods), (4.6, 3.4))
    for ax, method in zip(axes, methods, strict=True):
        by_set = scores[method]
        if logs[method]:
            _log_histograms(ax, by_set)
        else:
            lo, hi = _linear_range(by_set, thresholds.get(method, (None,))[0])
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
            for color, (name, values) in zip(_colors(len(by_set)), by_set.items(),
                                             strict=True):
                beyond = int(np.count_nonzero((values < lo) | (values > hi)))
                label = name + (f" ({beyond} beyond the axis, in its end bins)" if beyond
                                else "")
                heights = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins,
                                       density=True)[0]
                _bars(ax, heights, bins, color, label)
            ax.set(xlabel="score (higher = in-distribution)", ylabel="density (log)")
        if method in thresholds:
            t, tpr = thresholds[method]
            ax.axvline(-t if logs[method] else t, color="0.2", lw=1.2, ls="--",
                       label=f"threshold ({100 * tpr:g} % of ID kept)")
        # Log counts: detectors such as MSP and GROOD pile ID scores into one bin near the top.
        ax.set_yscale("log")
        ax.set_title(method)
        if len(by_set) > 6:  # beside the panel: inside, the list would cover the histograms
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")  # with a legend beside the last panel


def plot_differences(differences: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                     path: str | os.PathLike, *, method: str = "GROOD") -> Path:
    """``method``'s metrics minus each baseline's with their paired intervals, as a forest
    plot: a panel per metric side by side, each OOD set a block of rows (top to bottom as
    given) headed by its name, a row per baseline named on the left, on it a marker at the
    difference and a bar over its interval, and a line at 0. The colour says what the
    interval resolves: blue, ``method`` better (clear of 0 on its side); red diamonds, the
    baseline better; grey open circles, not resolved (the interval includes 0).

    Args:
        differences: ``differences[set][baseline][metric] = (difference, low, high)``, as
            fractions (``grood eval --bootstrap --baselines`` gives them with
            :func:`grood.metrics.bootstrap_difference`'s intervals); every set with the same
            baselines and metrics, metrics among ``auroc``, ``fpr95``, ``aupr_in``,
            ``aupr_out``.
        path: the PNG file to write.
        method: the method the baselines are subtracted from, for the axis labels.
    """
    figure = figure_class()  # a missing extra is named before any check
    path = _target(path)
    sets = list(differences)
    if not sets:
        raise ValueError("no differences to plot: differences is empty")
    baselines = list(differences[sets[0]])
    metrics = list(differences[sets[0]][baselines[0]]) if baselines else []
    if not baselines or not metrics:
        raise ValueError(f"differences[{sets[0]!r}] holds no baseline's metrics")
    unknown = [m for m in metrics if m not in METRIC_LABELS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; differences are of "
                         f"{', '.join(METRIC_LABELS)}")
    values = np.full((len(sets), len(baselines), len(metrics), 3), np.nan)
    for i, name in enumerate(sets):
        if list(differences[name]) != baselines:
            raise ValueError(f"differences[{name!r}] has baselines {list(differences[name])}, "
                             f"differences[{sets[0]!r}] {baselines}: every set needs the same")
        for j, base in enumerate(baselines):
            entry = differences[name][base]
            if list(entry) != metrics:
                raise ValueError(f"differences[{name!r}][{base!r}] has metrics {list(entry)}, "
                                 f"expected {metrics}")
            for m, metric in enumerate(metrics):
                v = np.asarray(entry[metric], dtype=np.float64)
                if v.shape != (3,) or not np.isfinite(v).all() or v[1] > v[2]:
                    raise ValueError(f"differences[{name!r}][{base!r}][{metric!r}] must be "
                                     "finite (difference, low, high) with low <= high, got "
                                     f"{entry[metric]!r}")
                values[i, j, m] = v
    fig, axes, rows = _forest_axes(figure, sets, baselines, len(metrics))
    kinds = [(f"{method} better (interval clear of 0)", "tab:blue", "o"),
             ("baseline better (interval clear of 0)", "tab:red", "D"),
             ("not resolved (interval includes 0)", "0.55", "o")]
    present = np.zeros(len(kinds), dtype=bool)
    for m, (ax, metric) in enumerate(zip(axes, metrics, strict=True)):
        d, lo, hi = (100 * values[:, :, m, c] for c in range(3))
        better, worse = (hi < 0, lo > 0) if metric == "fpr95" else (lo > 0, hi < 0)
        for k, (mask, (label, color, marker)) in enumerate(
                zip((better, worse, ~(better | worse)), kinds, strict=True)):
            present[k] |= bool(mask.any())
            ax.hlines(rows[mask], lo[mask], hi[mask], color=color, lw=1.6)
            ax.plot(d[mask], rows[mask], marker, ls="none", color=color, ms=5,
                    mfc=color if k < 2 else "white", label=label)
        ax.axvline(0, color="0.3", lw=0.9, ls="--")
        ax.grid(axis="x", color="0.9", lw=0.6)
        side = "left" if metric == "fpr95" else "right"
        ax.set(title=METRIC_LABELS[metric],
               xlabel=f"{method} minus baseline (points)\n{side} of 0: {method} better")
    fig.tight_layout()
    # One legend for all panels, above them (in a panel it would cover the bars).
    handles, labels = axes[0].get_legend_handles_labels()
    keep = [k for k in range(len(kinds)) if present[k]]
    fig.legend([handles[k] for k in keep], [labels[k] for k in keep], loc="lower center",
               ncol=len(keep), bbox_to_anchor=(0.5, 1.0), fontsize=9)
    return _save(fig, path, bbox_inches="tight")  # the legend and long names included


def _forest_axes(figure: Any, sets: Sequence[str], baselines: Sequence[str], panels: int
                 ) -> tuple[Any, list[Any], np.ndarray]:
    """The figure of :func:`plot_differences`: ``panels`` panels side by side sharing one
    vertical axis, on which each set is a block of rows top to bottom as given, its name (in
    bold) above a row per baseline (named), the blocks apart by a line. Returns the figure,
    the panels and the rows' heights [sets, baselines]."""
    rows = np.empty((len(sets), len(baselines)))
    for i in range(len(sets)):
        rows[i] = -i * (len(baselines) + 1.6) - 1 - np.arange(len(baselines))
    fig = figure(figsize=(3.6 * panels, 1.5 + 0.22 * -rows[-1, -1]))
    axes = list(fig.subplots(1, panels, sharey=True, squeeze=False)[0])
    axes[0].set(yticks=rows.ravel(), ylim=(rows[-1, -1] - 0.8, 0.8))
    axes[0].set_yticklabels(list(baselines) * len(sets))
    for i, name in enumerate(sets):  # where a tick label would be, in bold
        axes[0].annotate(name, xy=(0, rows[i, 0] + 1), xycoords=("axes fraction", "data"),
                         xytext=(-4, 0), textcoords="offset points", ha="right",
                         va="center", fontweight="bold")
    for ax in axes:
        ax.tick_params(axis="y", length=0)
        for i in range(1, len(sets)):  # between one set's block and the next
            ax.axhline(rows[i - 1, -1] - 0.8, color="0.75", lw=0.8)
    return fig, axes, rows


def _bars(ax: Any, heights: np.ndarray, bins: np.ndarray, color: Any, label: str) -> None:
    """One set's histogram in a panel: its bars filled faintly under a solid outline, drawn
    as two artists (not one patch per bin)."""
    ax.stairs(heights, bins, fill=True, color=color, alpha=0.25, lw=0)
    ax.stairs(heights, bins, color=color, lw=1.4, label=label)


def _log_histograms(ax: Any, by_set: Mapping[str, np.ndarray]) -> None:
    """Each set's fraction per bin over -score, log-spaced bins on a log axis drawn right to
    left (in-distribution on the right, as on a linear score axis)."""
    mags = {name: -values for name, values in by_set.items()}
    pooled = np.concatenate(list(mags.values()))
    lo, hi = float(pooled[pooled > 0].min()), float(pooled.max())
    bins = np.geomspace(lo, hi if hi > lo else lo * 10.0, 41)
    for color, (name, m) in zip(_colors(len(mags)), mags.items(), strict=True):
        zeros = int(np.count_nonzero(m == 0))
        label = name + (f" ({zeros} at 0, in the rightmost bin)" if zeros else "")
        # A score of 0 has no place on a log axis: it counts in the nearest bin.
        counts = np.histogram(np.maximum(m, lo), bins=bins)[0]
        _bars(ax, counts / m.size, bins, color, label)
    ax.set_xscale("log")
    ax.set_xlim(bins[-1], bins[0])  # right to left: higher scores (nearer 0) on the right
    ax.set(xlabel="-score, log scale (right = in-distribution)",
           ylabel="fraction of the set (log)")


def plot_neighbours(examples: Sequence[Mapping[str, object]], train_images: np.ndarray,
                    path: str | os.PathLike, train_labels: np.ndarray | None = None) -> Path:
    """Samples beside the training images nearest to them in gradient space, one row each.

    Args:
        examples: per row, a mapping with ``"image"`` (the sample, [H, W] or [H, W, 3]),
            ``"title"`` (str), ``"score"`` (float), ``"rows"`` (training-row numbers, nearest
            first, as :meth:`grood.GROOD.kneighbors` gives them) and ``"distances"`` (their
            squared gradient distances); every row shows as many neighbours as it has.
        train_images: the training images, indexed by those row numbers ([N, H, W] or
            [N, H, W, 3]).
        path: the PNG file to write.
        train_labels: the training labels, written under each neighbour when given.
    """
    figure = figure_class()  # a missing extra is named before any check
    path = _target(path)
    if not examples:
        raise ValueError("no examples to plot: examples is empty")
    train_images = np.asarray(train_images)
    n_cols = 1 + max(len(np.asarray(e["rows"])) for e in examples)
    fig = figure(figsize=(1.7 * n_cols + 0.4, 1.8 * len(examples)))
    axes = fig.subplots(len(examples), n_cols, squeeze=False)
    for r, example in enumerate(examples):
        rows = np.asarray(example["rows"]).reshape(-1)
        dists = np.asarray(example["distances"], dtype=np.float64).reshape(-1)
        if rows.shape != dists.shape or rows.size == 0:
            raise ValueError(f"example {r}: rows and distances must be equal-length lists of "
                             f"neighbours, got {rows.shape} and {dists.shape}")
        outside = rows[(rows < 0) | (rows >= len(train_images))]
        if outside.size:
            raise ValueError(f"example {r}: training row {int(outside[0])} is outside the "
                             f"{len(train_images)} training images")
        panels = [(example["image"], f"{example['title']}\nscore {example['score']:.3g}")]
        for j, (row, dist) in enumerate(zip(rows.tolist(), dists.tolist(), strict=True)):
            label = "" if train_labels is None else f", class {train_labels[row]}"
            panels.append((train_images[row], f"{j + 1}: train #{row}{label}\nd² {dist:.3g}"))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            image, title = panels[c]
            ax.imshow(np.asarray(image), cmap="gray_r", interpolation="nearest")
            ax.set_title(title, fontsize=7.5)
            if c == 0:  # the sample itself, framed apart from its neighbours
                for spine in ax.spines.values():
                    spine.set(color="C3", lw=2)
    fig.suptitle("nearest training samples in gradient space (d²: squared gradient "
                 "distance; score = -d² of the k-th)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
