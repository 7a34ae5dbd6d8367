"""Roofline picture of the compile report's model: one panel per target, one point per launch.

Each point is one kernel launch at one shape and precision mode, at the launcher's
configuration: x is its arithmetic intensity against HBM (MMA FLOPs per byte the model counts
from or to HBM), y the throughput its modelled lower-bound time allows (FLOPs / the slowest of
its compute, HBM and L2 bounds, and its K-loop's instruction issue where the report has it).
Points on the diagonal are HBM-bound, points on a ceiling compute-bound; points below both are
held by L2 traffic (hollow markers), by instruction issue or by a partly empty last wave.
Nothing here is measured: it draws :mod:`traffic_model`'s bounds.

With ``--measured`` (the JSON of ``bench/gpu_report.py --json``), the Triton kernels' timings
from a GPU run are drawn beside their model points as stars, at the same intensity: the
vertical gap between a star and its point is the modelled bound over the measured time.

    python bench/compile_report.py --plot docs/roofline.png                  # compile, draw
    python bench/roofline.py bench/compile_report.json docs/roofline.png     # from a report
    python bench/roofline.py bench/compile_report.json out.png --measured gpu_report.json
    python bench/roofline.py bench/compile_report.json docs/roofline.png \
        --before bench/compile_report_before.json        # arrows from grood 0.1.0's kernels
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic_model

#: Colour per precision mode (search adds bf16-storage).
MODE_COLOURS = {"ieee": "#4c72b0", "tf32": "#dd8452", "tf32x3": "#55a868", "bf16": "#c44e52",
                "bf16-storage": "#8172b3"}
#: Marker per kernel function.
KERNEL_MARKERS = {"_ncp_gradient_kernel": ("o", "gradient step"),
                  "_ncp_single_read_kernel": ("D", "gradient step, single read"),
                  "_knn_candidates_kernel": ("s", "search"),
                  "_merge_rerank_kernel": ("^", "search merge + re-rank"),
                  "_centre_rows_kernel": ("v", "gradient step, staged pre-pass"),
                  "_ncp_epilogue_kernel": ("P", "gradient step, split epilogue"),
                  "_ncp_exact_kernel": ("X", "gradient step, no GEMM (C <= 16)")}
#: Kernel functions whose launch does not depend on the precision mode.
MODE_FREE = {"_merge_rerank_kernel"}
#: Short shape labels drawn beside the points.
SHAPE_LABELS = {"ImageNet-1k": "IN-1k", "C=21841": "21k", "CIFAR-10": "C10",
                "CIFAR-100": "C100", "CIFAR": "CIFAR", "small": "small"}


def points(records: list[dict], arch: str) -> list[dict]:
    """One record per (kernel function, mode, shape) of ``arch`` — the launcher's
    configuration, the first compiled — with its intensity and modelled TFLOP/s. The search's
    merge is the same launch in every mode: it is drawn once per shape, in grey."""
    chosen: dict[tuple, dict] = {}
    for r in records:
        if r["arch"] != arch or not r.get("hbm_bytes"):
            continue
        mode = None if r["function"] in MODE_FREE else r["precision"]
        key = (r["function"], mode, r["shape"])
        if key not in chosen or r["config"] < chosen[key]["config"]:
            chosen[key] = r
    out = []
    for (_, mode, _), r in chosen.items():
        out.append({**r, "mode": mode, "intensity": r["flops"] / r["hbm_bytes"],
                    "tflops": r["flops"] / _bound_seconds(r, mode) / 1e12})
    return out


def _bound_seconds(r: dict, mode: str | None) -> float:
    """The record's binding bound in seconds: its reported bound, or the bound recomputed from
    its FLOPs and bytes (no wave quantisation) where that is larger — the report rounds bounds
    to 0.1 us, so at tiny shapes they read zero."""
    roof = traffic_model.ROOFS[r["arch"]]
    raw = max(r["flops"] / (roof["tflops"][traffic_model._mode_roof(mode or "ieee")] * 1e12),
              r["hbm_bytes"] / (roof["hbm_tbs"] * 1e12), r["l2_bytes"] / (roof["l2_tbs"] * 1e12))
    return max(max(r["bound_ms"].values()) / 1e3, raw)


#: Compute capability of a measured device -> the compile target whose panel it joins.
CAPABILITY_ARCH = {(9, 0): "sm_90a", (10, 0): "sm_100a"}


def measured_points(pts: list[dict], measured: dict) -> list[tuple[dict, float]]:
    """``(model point, measured TFLOP/s)`` for each model point with a Triton timing of the same
    kernel, dimensions and mode in ``measured`` (``gpu_report.py --json``). The measured rate
    counts the model's executed FLOPs, so both points use one numerator."""
    times = {(t["kernel"], tuple(t["dims"]), t["precision"]): t["seconds"]
             for t in measured["timings"] if t["backend"] == "triton"}
    out = []
    for p in pts:
        t = times.get((p["kernel"], tuple(p["dims"]), p["mode"]))
        if t is not None and p["mode"] is not None:
            out.append((p, p["flops"] / t / 1e12))
    return out


def measured_arch(measured: dict) -> str:
    """The panel a GPU run's timings belong to, from its device's compute capability."""
    run = measured["run"]
    cap = tuple(run.get("capability") or ())
    if cap not in CAPABILITY_ARCH or run.get("interpreted"):
        raise ValueError(f"timings from {run.get('device')} (capability {cap or 'none'}"
                         f"{', Triton interpreter' if run.get('interpreted') else ''}) have no "
                         f"model panel: the model covers {sorted(CAPABILITY_ARCH.values())}")
    return CAPABILITY_ARCH[cap]


def plot(records: list[dict], path: Path, archs: list[str] | None = None,
         measured: dict | None = None, before: list[dict] | None = None) -> Path:
    """Draw the roofline panels of ``records`` (compile-report records) into ``path``, with a
    GPU run's timings (``gpu_report.py --json``) on their target's panel when given, and an
    arrow from each launch's point in an earlier report (``before``) to its point now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    archs = archs or [a for a in traffic_model.ROOFS if any(r["arch"] == a for r in records)]
    on = measured_arch(measured) if measured is not None else None
    n_measured = 0
    drawn: list[dict] = []
    fig, axes = plt.subplots(1, len(archs), figsize=(7.5 * len(archs), 6), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        roof = traffic_model.ROOFS[arch]
        pts = points(records, arch)
        drawn += pts
        if not pts:
            raise ValueError(f"no records for {arch}")
        lo = min(p["intensity"] for p in pts) / 3
        hi = max(p["intensity"] for p in pts) * 3
        # HBM diagonal up to the highest ceiling, then one ceiling per precision mode.
        top = max(roof["tflops"].values())
        knee = top * 1e12 / (roof["hbm_tbs"] * 1e12)
        ax.plot([lo, knee], [roof["hbm_tbs"] * lo, top], color="0.3", lw=1.2)
        at = knee / 60
        ax.text(at, roof["hbm_tbs"] * at * 1.8, f"HBM {roof['hbm_tbs']} TB/s", rotation=33,
                color="0.3", fontsize=8)
        for mode, tflops in roof["tflops"].items():
            start = tflops / roof["hbm_tbs"]
            ax.plot([start, hi], [tflops, tflops], color=MODE_COLOURS[mode], lw=1, ls="--")
            ax.text(hi / 1.05, tflops * 1.06, f"{mode} {tflops:.0f} TFLOP/s", ha="right",
                    fontsize=8, color=MODE_COLOURS[mode])
        for p in pts:
            marker, _ = KERNEL_MARKERS.get(p["function"], ("x", p["function"]))
            colour = MODE_COLOURS.get(p["mode"], "0.45")
            compute = p["binding_roof"] == "compute"
            ax.scatter(p["intensity"], p["tflops"], marker=marker, s=46, zorder=3,
                       facecolors=colour if p["binding_roof"] != "l2" else "none",
                       edgecolors=colour, linewidths=1.4)
            ax.annotate(SHAPE_LABELS.get(p["shape"], p["shape"]),
                        (p["intensity"], p["tflops"]), xytext=(4, -3 if compute else 3),
                        textcoords="offset points", fontsize=7, color=colour)
        low = min(p["tflops"] for p in pts)
        if before is not None:
            then = {(p["function"], p["mode"], p["shape"]): p for p in points(before, arch)}
            for p in pts:
                old = then.get((p["function"], p["mode"], p["shape"]))
                if old is None:
                    continue
                low = min(low, old["tflops"])
                ax.scatter(old["intensity"], old["tflops"], marker=KERNEL_MARKERS.get(
                    p["function"], ("x",))[0], s=22, facecolors="none", edgecolors="0.6",
                    linewidths=0.8, zorder=2)
                ax.annotate("", (p["intensity"], p["tflops"]), (old["intensity"], old["tflops"]),
                            arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 0.7},
                            zorder=2)
        if arch == on:
            for p, tflops in measured_points(pts, measured):
                low = min(low, tflops)
                colour = MODE_COLOURS[p["mode"]]
                ax.plot([p["intensity"]] * 2, [p["tflops"], tflops], color=colour, lw=0.8,
                        ls=":", zorder=2)
                ax.scatter(p["intensity"], tflops, marker="*", s=120, zorder=4,
                           facecolors=colour, edgecolors="black", linewidths=0.6)
                n_measured += 1
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(low / 3, top * 2)
        ax.set_xlabel("MMA FLOPs per HBM byte (model)")
        ax.set_ylabel("TFLOP/s allowed by the modelled bound")
        ax.set_title(f"{arch} ({roof['device']}, roofs {roof['source']}; L2 "
                     f"{roof['l2_tbs']} TB/s {roof['l2_source']})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    kernels = sorted({p["function"] for p in drawn})
    modes = sorted({p["mode"] for p in drawn} - {None},
                   key=list(MODE_COLOURS).index)
    handles = [Line2D([], [], ls="", marker=KERNEL_MARKERS.get(k, ("x", k))[0], color="0.3",
                      label=KERNEL_MARKERS.get(k, ("x", k))[1]) for k in kernels]
    handles += [Line2D([], [], ls="", marker="o", color=MODE_COLOURS[m], label=m) for m in modes]
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3",
                          label="L2-bound (hollow)"))
    if before is not None:
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.6",
                              markersize=5, label="before (arrow: to now)"))
    title = ("grood kernels at the launcher's configurations: the compile report's traffic "
             "model (lower bounds, not measurements)")
    if measured is not None:
        if not n_measured:
            raise ValueError("no Triton timing in the measured run matches a model point "
                             "(kernel, dimensions and mode must be the compile report's)")
        run = measured["run"]
        handles.append(Line2D([], [], ls="", marker="*", markersize=11, color="0.3",
                              markeredgecolor="black", label="measured"))
        title = (f"grood kernels: the compile report's model (points, lower bounds) and "
                 f"measured ({run['device']}, torch {run['torch']}, triton {run['triton']}, "
                 f"{run['date']}; stars)")
    axes[0][-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(textwrap.fill(title, 90 * len(archs)), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a compile report's JSON (--json)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--measured", type=Path,
                        help="a GPU run's timings (bench/gpu_report.py --json)")
    parser.add_argument("--before", type=Path,
                        help="an earlier compile report's JSON: arrows from its points to now")
    args = parser.parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured else None
    before = json.loads(args.before.read_text()) if args.before else None
    try:
        print(plot(json.loads(args.report.read_text()), args.out, measured=measured,
                   before=before))
    except ValueError as err:
        print(f"roofline.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
