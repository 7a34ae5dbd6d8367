"""An OOD prototype far outside the training features: what the fit finds, and the scores.

Four classes of features (D = 16) whose RMS spread is a small fraction of their distance from
an OOD prototype given as features (``ood_prototype="features"``): every gradient then points
nearly the same way. For each distance/spread ratio the table gives what the fit's check saw
(indexed gradients searched for as themselves and missed, of 64, with the index as built and
held less the gradients' mean; how many sampled rows lie nearer their nearest other row than
ten times the full-precision expansion's error bound, ``grood._fit.crowded_probes``), whether
it kept the index so, the gradients' spread about
their mean relative to their norm, the warning it gave, and the float32 scores' largest
error against float64's on the same float32-rounded inputs, as a share of float64's score
spread: as fitted, with the index searched uncentred, and with a float64 search of the same
float32 query and indexed gradients (what float32 gradients allow at best).

A second table emulates the check's self-search with the candidate GEMM of each precision
mode (operands rounded as tensor cores read them: TF32 truncated to 10 mantissa bits, bf16
rounded to nearest; products and sums in float64; 5 candidates re-ranked exactly), as built
and less the gradients' mean, on the same data and on ordinary clustered features.

A third gives the fit with a half-precision copy of the index searched (``index_options``
``storage``), checked on blocks of the rows rounded as the copy holds them; a fourth, a
detector fitted in ``ieee`` and then scored in ``bf16`` (its search checked again at the
first search in it) beside one fitted in ``bf16``; a fifth, the detector as a head converted
to float16 and bfloat16 (the conversion checks the head's search); a sixth, a detector set
to ``bf16`` after an ``ieee`` fit, saved before any score and loaded (the load checks it).

    python bench/far_prototype.py          # the tables (under a minute on a CPU)
    python bench/far_prototype.py --tiny   # a few ratios
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import warnings
from unittest import mock

import numpy as np
import torch

import grood
from grood import GROOD, functional
from grood._bench.common import (
    far_prototype_data,
    far_prototype_float64_scores,
    realistic_features,
)
from grood._fit import crowded_probes, missed_as_themselves, missed_in_blocks, probe_ids
from grood.index import spread_share


def distance_over_spread(x: np.ndarray, ood: np.ndarray) -> float:
    """The features' distance from the OOD prototype over their RMS spread about their mean."""
    x64 = x.astype(np.float64)
    spread = np.sqrt(((x64 - x64.mean(0)) ** 2).sum(1).mean())
    return float(np.linalg.norm(x64.mean(0) - ood.astype(np.float64).mean(0))) / spread


def said(caught: list[warnings.WarningMessage]) -> str:
    """The warnings ``caught`` by kind: the copy's lost rows, the search unresolved, the
    gradients' spread (others by their start), or ``-``."""
    def kind(message: str) -> str:
        if "indexed gradients" in message and "storage=" in message:
            return "lost rows"
        if "as themselves" in message:
            return "search"
        return "spread" if "spread about" in message else message[:40]

    return ", ".join(kind(str(w.message)) for w in caught) or "-"


def row(ratio: float) -> str:
    """One table row."""
    x, y, ood, test = far_prototype_data(ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    want = far_prototype_float64_scores(x, y, ood, test)
    span = np.ptp(want)
    index = det.index_
    ids = probe_ids(index.ntotal)
    centred = index.centre is not None
    fitted = np.abs(det.score_samples(test) - want).max() / span
    # The gradients as queries would be (held plus any centre), in float32 and float64.
    held = index.vectors + (index.centre if centred else 0.0)
    rel = spread_share(held)
    grads = functional.ncp_gradient(torch.as_tensor(test), det.class_prototypes_,
                                    det.ood_prototype_).grad
    best, _ = functional.knn(grads.double(), held.double(), 1)
    at_best = np.abs(-best[:, 0].numpy() - want).max() / span
    index.drop_centre()  # (each row within a rounding of the fit's)
    rows = index.vectors_at(ids)
    missed = missed_as_themselves(index, ids, rows)
    crowded, measured = crowded_probes(index, ids, rows, torch.float32)
    less_mean = missed_in_blocks(index, ids, rows, index.vectors_mean())
    uncentred = np.abs(det.score_samples(test) - want).max() / span
    kept = f"{'yes' if centred else 'no'} ({less_mean})"
    return (f"| {distance_over_spread(x, ood):,.0f} | {missed} | {crowded} of {measured} | "
            f"{kept} | {rel:.2g} | {uncentred:.2g} | {fitted:.2g} | {at_best:.2g} | "
            f"{said(caught)} |")


def storage_row(ratio: float, storage: str) -> str:
    """One row of the third table: the fit with a half-precision ``storage`` copy of the
    index, what its check saw, and its scores' largest error against float64's (share of
    float64's score spread) as fitted and with the copy of the unshifted rows."""
    x, y, ood, test = far_prototype_data(ratio)
    want = far_prototype_float64_scores(x, y, ood, test)
    span = np.ptp(want)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = GROOD(ood_prototype="features", index_options={"storage": storage}).fit(
            x, y, ood_features=ood)
        fitted = np.abs(det.score_samples(test) - want).max() / span
    index = det.index_
    centred = index.centre is not None
    index.drop_centre()
    ids = probe_ids(index.ntotal)
    rows = index.vectors_at(ids)
    missed = missed_in_blocks(index, ids, rows)
    less_mean = missed_in_blocks(index, ids, rows, index.vectors_mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the copy's lost rows: said above)
        uncentred = np.abs(det.score_samples(test) - want).max() / span
    return (f"| {distance_over_spread(x, ood):,.0f} | {storage} | {missed} | "
            f"{'yes' if centred else 'no'} ({less_mean}) | {uncentred:.2g} | {fitted:.2g} | "
            f"{said(caught)} |")


def precision_row(ratio: float) -> str:
    """One row of the fourth table: fitted in ``ieee`` and scored in ``bf16`` after
    ``set_params`` (its search checked again at the first search in it), against a fit in
    ``bf16``: each one's largest score error against float64's, as a share of its spread."""
    x, y, ood, test = far_prototype_data(ratio)
    want = far_prototype_float64_scores(x, y, ood, test)
    span = np.ptp(want)
    det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    fitted = det.index_.centre is not None
    ieee = np.abs(det.score_samples(test) - want).max() / span
    det.set_params(precision="bf16")
    after = np.abs(det.score_samples(test) - want).max() / span
    centred = det.index_.centre is not None
    uncentred = after
    if centred and not fitted:  # what the search in bf16 gave unchecked
        det.index_.drop_centre()
        uncentred = np.abs(det.score_samples(test) - want).max() / span
    wide = GROOD(ood_prototype="features", precision="bf16").fit(x, y, ood_features=ood)
    in_bf16 = np.abs(wide.score_samples(test) - want).max() / span
    return (f"| {distance_over_spread(x, ood):,.0f} | {ieee:.2g} | {'yes' if fitted else 'no'} "
            f"| {uncentred:.2g} | {after:.2g} | {'yes' if centred else 'no'} | "
            f"{in_bf16:.2g} | {'yes' if wide.index_.centre is not None else 'no'} |")


def head_row(ratio: float) -> str:
    """One row of the fifth table: the detector fitted in ``ieee`` as a head converted to
    float16 and to bfloat16 (``head.half()``, ``head.bfloat16()``), each head's largest score
    error against the float32 detector's on the same features rounded to the head's dtype
    (the conversion's own error, as a share of the detector's score spread), and whether the
    conversion warned."""
    x, y, ood, test = far_prototype_data(ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fit's own: the first table has them)
        det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    cells = [f"{distance_over_spread(x, ood):,.0f}", "yes" if det.index_.centre is not None
             else "no"]
    for dt in (torch.float16, torch.bfloat16):
        rounded = torch.as_tensor(test).to(dt)
        want = det.score_samples(rounded.float()).double()
        span = float(want.max() - want.min())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head = det.as_module().to(dt)
        got = head(rounded)[0].double()
        warned = any("head's index no longer" in str(w.message) for w in caught)
        cells += [f"{float((got - want).abs().max()) / span:.2g}", "yes" if warned else "no"]
    return "| " + " | ".join(cells) + " |"


def load_row(ratio: float, folder: str) -> str:
    """One row of the sixth table: fitted in ``ieee``, set to ``bf16`` and saved before any
    score, then loaded (the load checks the bf16 search): the loaded detector's largest score
    error against float64's (share of its spread) loaded without the check (as before) and
    with it, and whether the load centred the index."""
    x, y, ood, test = far_prototype_data(ratio)
    want = far_prototype_float64_scores(x, y, ood, test)
    span = np.ptp(want)
    path = f"{folder}/far-{ratio:g}.safetensors"
    GROOD(ood_prototype="features").fit(x, y, ood_features=ood).set_params(
        precision="bf16").save(path)
    det = GROOD.load(path)
    checked = np.abs(det.score_samples(test) - want).max() / span
    centred = det.index_.centre is not None
    with mock.patch("grood.persistence.check_search_again"):  # (a load as before: unchecked)
        saved = GROOD.load(path)
    unchecked = np.abs(saved.score_samples(test) - want).max() / span
    return (f"| {distance_over_spread(x, ood):,.0f} | {unchecked:.2g} | {checked:.2g} | "
            f"{'yes' if centred else 'no'} |")


def emulated_misses(vectors: torch.Tensor, mode: str) -> int:
    """The check's self-search of 64 evenly spaced ``vectors`` with ``mode``'s candidate GEMM
    emulated: how many come back as another row at a distance above 0."""
    from grood_kernels._prepare import tf32_truncated

    ids = probe_ids(len(vectors))
    q = vectors[ids]
    rounded = {"ieee": lambda t: t, "tf32": tf32_truncated,
               "bf16": lambda t: t.bfloat16()}[mode]
    dots = rounded(q).double() @ rounded(vectors).double().T
    est = ((q * q).sum(1).double()[:, None] + (vectors * vectors).sum(1).double()[None]
           - 2 * dots).float().clamp_min(0)
    cand = torch.topk(est, min(5, len(vectors)), largest=False).indices
    exact = (q[:, None, :] - vectors[cand]).square().sum(2)
    found = cand.gather(1, exact.argmin(1, keepdim=True))[:, 0]
    return int(((found != ids) & (exact.min(1).values > 0)).sum())


def modes_row(name: str, vectors: torch.Tensor) -> str:
    """One row of the second table: misses as built and less the mean, per mode."""
    centre = vectors.double().mean(0).float()
    built = " / ".join(str(emulated_misses(vectors, m)) for m in ("ieee", "tf32", "bf16"))
    less = " / ".join(str(emulated_misses(vectors - centre, m))
                      for m in ("ieee", "tf32", "bf16"))
    return f"| {name} | {built} | {less} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few ratios (a smoke run)")
    args = parser.parse_args()
    ratios = [1e1, 1e2, 1e4] if args.tiny else [1e1, 3e1, 1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6]
    print(f"grood {grood.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}\n")
    print("| distance / spread | missed of 64 as built | crowded as built | held less the "
          "mean (missed so) | gradients' spread / norm | error uncentred | error as fitted | "
          "error, float64 search | fit's warning (spread: the gradients'; search: "
          "unresolved) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ratio in ratios:
        print(row(ratio), flush=True)
    print("\nThe self-search with each mode's candidate GEMM emulated: missed of 64\n")
    print("| features | missed as built: ieee / tf32 / bf16 | missed less the mean: ieee / "
          "tf32 / bf16 |")
    print("|---|---|---|")
    warnings.simplefilter("ignore")  # (the fits' own warnings: the first table has them)
    for ratio in ratios:
        x, y, ood, _ = far_prototype_data(ratio)
        det = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
        held = det.index_.vectors + (0.0 if det.index_.centre is None else det.index_.centre)
        print(modes_row(f"distance / spread {distance_over_spread(x, ood):,.0f}", held),
              flush=True)
    n, c, d = (2000, 20, 64) if args.tiny else (20000, 100, 512)
    x, y = realistic_features(n, c, d, seed=0, device="cpu")
    det = GROOD().fit(x.float(), y)
    print(modes_row(f"clustered post-ReLU features, {n:,} x {d}, {c} classes",
                    det.index_.vectors), flush=True)
    print("\nWith a half-precision copy of the index searched (index_options storage)\n")
    print("| distance / spread | storage | missed of 64 as built | held less the mean (missed "
          "so) | error, the copy of the unshifted rows | error as fitted | warnings (fit, first "
          "score) |")
    print("|---|---|---|---|---|---|---|")
    for ratio in ([1e1, 1e2] if args.tiny else [1e1, 3e1, 1e2, 3e2, 1e3, 1e4]):
        for storage in ("bfloat16", "float16"):
            print(storage_row(ratio, storage), flush=True)
    print("\nFitted in ieee, then set to precision='bf16' (the search checked again), and "
          "fitted in bf16\n")
    print("| distance / spread | error in ieee | centred at the fit | error in bf16, unchecked "
          "| error in bf16 after set_params | centred then | error, fitted in bf16 | centred "
          "at that fit |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in ([1e1, 1.5e1] if args.tiny else [1e1, 1.5e1, 3e1, 1e2, 3e2, 1e3]):
        print(precision_row(ratio), flush=True)
    print("\nThe detector as a head converted to float16 and bfloat16: error against the "
          "float32 detector on the same features, rounded to the head's dtype\n")
    print("| distance / spread | index centred | float16 head | warned | bfloat16 head | "
          "warned |")
    print("|---|---|---|---|---|---|")
    for ratio in ([1e1, 1e3] if args.tiny else [1e1, 3e1, 1e2, 3e2, 1e3, 3e3]):
        print(head_row(ratio), flush=True)
    print("\nFitted in ieee, set to precision='bf16' and saved before any score, then loaded "
          "(the load checks the bf16 search)\n")
    print("| distance / spread | error, loaded unchecked | error, loaded and checked | "
          "centred at the load |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for ratio in ([1.5e1] if args.tiny else [1e1, 1.5e1, 3e1, 1e2]):
            print(load_row(ratio, folder), flush=True)


if __name__ == "__main__":
    main()
