"""Roofline picture of the compile report's model: one panel per target, one point per launch.

Each point is one kernel launch at one shape and precision mode, at the launcher's
configuration: x is its arithmetic intensity against HBM (MMA FLOPs per byte the model counts
from or to HBM), y the throughput its modelled lower-bound time allows (FLOPs / the slowest of
its compute, HBM and L2 bounds). Points on the diagonal are HBM-bound, points on a ceiling
compute-bound; points below both are held by L2 traffic (hollow markers) or by a partly empty
last wave. Nothing here is measured: it draws :mod:`traffic_model`'s bounds.

    python bench/compile_report.py --plot docs/roofline.png                  # compile, draw
    python bench/roofline.py bench/compile_report.json docs/roofline.png     # from a report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic_model

#: Colour per precision mode (search adds bf16-storage).
MODE_COLOURS = {"ieee": "#4c72b0", "tf32": "#dd8452", "tf32x3": "#55a868", "bf16": "#c44e52",
                "bf16-storage": "#8172b3"}
#: Marker per kernel function.
KERNEL_MARKERS = {"_ncp_gradient_kernel": ("o", "gradient step"),
                  "_knn_candidates_kernel": ("s", "search"),
                  "_merge_rerank_kernel": ("^", "search merge + re-rank")}
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
        bound_s = max(r["bound_ms"].values()) / 1e3
        out.append({**r, "mode": mode, "intensity": r["flops"] / r["hbm_bytes"],
                    "tflops": r["flops"] / bound_s / 1e12})
    return out


def plot(records: list[dict], path: Path, archs: list[str] | None = None) -> Path:
    """Draw the roofline panels of ``records`` (compile-report records) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    archs = archs or [a for a in traffic_model.ROOFS if any(r["arch"] == a for r in records)]
    fig, axes = plt.subplots(1, len(archs), figsize=(7.5 * len(archs), 6), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        roof = traffic_model.ROOFS[arch]
        pts = points(records, arch)
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
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(min(p["tflops"] for p in pts) / 3, top * 2)
        ax.set_xlabel("MMA FLOPs per HBM byte (model)")
        ax.set_ylabel("TFLOP/s allowed by the modelled bound")
        ax.set_title(f"{arch} ({roof['device']}, roofs {roof['source']}; L2 "
                     f"{roof['l2_tbs']} TB/s assumed)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    kernels = sorted({p["function"] for a in archs for p in points(records, a)})
    modes = sorted({p["mode"] for a in archs for p in points(records, a)} - {None},
                   key=list(MODE_COLOURS).index)
    handles = [Line2D([], [], ls="", marker=KERNEL_MARKERS.get(k, ("x", k))[0], color="0.3",
                      label=KERNEL_MARKERS.get(k, ("x", k))[1]) for k in kernels]
    handles += [Line2D([], [], ls="", marker="o", color=MODE_COLOURS[m], label=m) for m in modes]
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3",
                          label="L2-bound (hollow)"))
    axes[0][-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("grood kernels at the launcher's configurations: the compile report's traffic "
                 "model (lower bounds, not measurements)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[0])
        print("usage: python bench/roofline.py REPORT.json OUT.png", file=sys.stderr)
        return 2
    records = json.loads(Path(args[0]).read_text())
    print(plot(records, Path(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
