"""The ``grood`` command: ``demo``, ``fit``, ``calibrate``, ``score``, ``eval`` and ``info``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grood import __version__
from grood._checks import fraction_arg, path_hint, positive_int_arg, prefixed_errors
from grood.baselines import (
    ASH,
    BY_NAME,
    DICE,
    KNN,
    LAST_LAYER_NAMES,
    NOT_BY_NAME,
    SCALE,
    NNGuide,
    ReAct,
    TempScale,
    learned_from,
    not_by_name,
)
from grood.errors import DetectorFileError, MissingExtraError
from grood.metrics import MIN_RESAMPLES
from grood.portable import SEARCH_BLOCK_ROWS
from grood.tuning import HIGHER_IS_BETTER

EPILOG_FILES = (
    "Feature files: .npy (a 2-D features array), .npz / .pt / .safetensors holding "
    "'features' [N, D] and optionally 'labels' [N] and 'logits' [N, C]."
)


def _cmd_demo(args: argparse.Namespace) -> int:
    from grood.demo import DemoConfig, run_demo, run_seeds

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder; the demo writes its "
                         "plots and results into a folder")
    cfg = DemoConfig(out=out, seed=args.seed, epochs=args.epochs,
                     n_noise=args.n_noise, knn_k=args.knn_k,
                     progress=False if args.quiet else None)
    if args.seeds > 1:
        table = run_seeds(cfg, args.seeds)
        print(f"grood demo — seeds {args.seed}..{args.seed + args.seeds - 1}, mean ± std in "
              f"percent; per-seed tables and plots in {args.out}/seed*/\n")
        print(table)
        return 0
    summary = run_demo(cfg)
    print(f"grood demo — in-distribution: digits 0-5 ({summary['sizes']['train']} training "
          "images); OOD: digits 6-9 (near), uniform noise (far). Percentages; FPR@95 lower is "
          "better, all others higher.\n")
    print(summary["table"])
    print(f"\nclassifier accuracy on ID test: {100 * summary['classifier_accuracy']:.2f} %; "
          f"GROOD indexed {100 * summary['grood_train_accuracy']:.1f} % of training images; "
          f"{summary['seconds']:.1f} s")
    print("wrote " + ", ".join(summary["plots"]) + f", {Path(args.out) / 'results.json'}")
    return 0


DEVICE_HELP = "e.g. cpu, cuda, cuda:1 (default: auto, cuda when torch sees a GPU, else cpu)"
PRECISION_HELP = ("GEMM precision to score in instead of the saved one (e.g. tf32 or bf16 for "
                  "tensor-core speed on a GPU; the errors each mode adds are in the README)")


def resolved_device(device: str | None) -> str | None:
    """``--device`` as GROOD takes it: ``"auto"`` is ``"cuda"`` where torch sees a usable CUDA
    device (under torchrun, each rank's LOCAL_RANK device), else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _init_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Join the process group that torchrun describes (NCCL on GPUs, gloo otherwise)."""
    if not getattr(args, "distributed", False):
        return 0, 1
    import torch
    import torch.distributed as tdist

    if "RANK" not in os.environ:
        raise RuntimeError("--distributed runs under torchrun (e.g. torchrun --nproc-per-node "
                           f"4 -m grood {args.command} --distributed ...)")
    if not tdist.is_initialized():
        use_nccl = torch.cuda.is_available() and args.device not in (None, "cpu")
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        tdist.init_process_group("nccl" if use_nccl else "gloo")
    return tdist.get_rank(), tdist.get_world_size()


def _shard(x: Any, rank: int, world: int) -> Any:
    """This rank's contiguous block of rows (a view; memory maps stay on disk)."""
    if x is None or world == 1:
        return x
    n = x.shape[0]
    start, stop = n * rank // world, n * (rank + 1) // world
    return x[start:stop]


def _named_twice(paths: list[str]) -> list[str]:
    """The paths that name a file named earlier in ``paths`` (as given, or by another path to
    it)."""
    real = [os.path.realpath(p) for p in paths]
    return [p for i, p in enumerate(paths) if real[i] in real[:i]]


def _require_files(files: dict[str, str | None]) -> None:
    """Every input file named on the command line exists, checked before any work: a
    misspelt last OOD set fails in a second, not after the detector is loaded and the ID set
    scored."""
    for what, path in files.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"no {what} at {path}{path_hint(path)}")


def _cmd_fit(args: argparse.Namespace) -> int:
    from grood import GROOD
    from grood.io import FeatureFile, TrainingFiles, load_features, training_file
    from grood.persistence import save_target

    # The inputs and the output are checked before any work, so a bad path fails in a second,
    # not after a fit.
    _require_files({**{f"feature file {p}": p for p in args.train},
                    "OOD feature file": args.ood_features,
                    "calibration feature file": args.calibrate})
    repeated = _named_twice(args.train)
    if repeated:  # its rows would count twice
        raise ValueError(f"a training file is named more than once: {', '.join(repeated)}")
    save_target(args.out, suffixes=(".json", ".safetensors") if args.distributed
                else (".safetensors",),
                inputs={**{f"training file {p}": p for p in args.train},
                        "OOD feature file": args.ood_features,
                        "calibration feature file": args.calibrate})
    if args.tpr is not None and args.calibrate is None:
        raise ValueError("--tpr applies with --calibrate FILE (held-out ID features)")
    if args.ood_prototype == "features" and not args.ood_features:
        raise ValueError("--ood-prototype features needs --ood-features FILE")
    if args.ood_features and args.ood_prototype not in (None, "features"):
        raise ValueError(f"--ood-features is read only with --ood-prototype features, not "
                         f"{args.ood_prototype}")
    rank, world = _init_distributed(args)
    train: TrainingFiles | FeatureFile
    if len(args.train) > 1:  # read batch by batch, checked file by file before any work
        train = TrainingFiles(args.train, batch_size=args.batch_size,
                              ignore_logits=args.ignore_logits, rank=rank, world=world)
    else:
        train = training_file(args.train[0])
    ood = load_features(args.ood_features).features if args.ood_features else None
    # Read (memory-mapped) before the fit: an unreadable file fails now, not after it.
    calibration = load_features(args.calibrate).features if args.calibrate else None
    prototype = args.ood_prototype or ("features" if ood is not None else "mean")
    index_options = None
    if args.index_storage != "float32":
        index_options = {"storage": args.index_storage,
                         "exact_copy": args.exact_copy or "device"}
    elif args.exact_copy is not None:  # the index is searched in fp32: it has no exact copy
        raise ValueError("--exact-copy applies with a half-precision --index-storage "
                         "(bfloat16 or float16)")
    if args.index != "exact" and index_options is not None:
        raise ValueError("--index-storage applies to --index exact only")
    det = GROOD(ood_prototype=prototype, k=args.k, backend=args.backend, device=args.device,
                batch_size=args.batch_size, distributed=world > 1 or args.distributed,
                precision=args.precision, index=args.index, index_options=index_options)
    # An error about one of the arrays names its file.
    if isinstance(train, TrainingFiles):
        with_logits = train.with_logits
        with prefixed_errors(args.ood_features or "", only=("ood_features",)):
            det.fit_batches(train, ood_features=_shard(ood, rank, world),
                            n_classes=train.n_classes)
    else:
        logits = None if args.ignore_logits else train.logits
        with_logits = logits is not None
        with prefixed_errors(args.train[0], only=("features", "labels", "logits")), \
                prefixed_errors(args.ood_features or "", only=("ood_features",)):
            det.fit(_shard(train.features, rank, world), _shard(train.labels, rank, world),
                    logits=_shard(logits, rank, world), ood_features=_shard(ood, rank, world))
    if calibration is not None:
        with prefixed_errors(args.calibrate):
            det.calibrate(_shard(calibration, rank, world),
                          tpr=0.95 if args.tpr is None else args.tpr)
    det.save(args.out)
    if rank:
        return 0
    files = f" from {len(args.train)} files" if len(args.train) > 1 else ""
    print(f"fitted on {det.n_train_} samples{files}, {det.n_classes_} classes, dimension "
          f"{det.n_features_in_}; indexed {sum(det.shard_sizes_)} gradients "
          f"({100 * det.train_accuracy_:.1f} % classified correctly by "
          f"{'the logits' if with_logits else 'the nearest prototype'}); "
          f"backend {det.backend_}" + (f"; {world} shards" if world > 1 else "")
          + (f"; {_threshold_line(det)}" if args.calibrate else "") + f"; saved {args.out}")
    return 0


def _threshold_line(det: Any) -> str:
    """The saved threshold, in words."""
    cal = det.calibration_
    return f"threshold {cal['threshold']:.6g} ({_accepts(cal)})"


def _accepts(cal: dict[str, Any]) -> str:
    """What a calibration record's threshold accepts, in words: of its calibration rows, and
    of new ID samples (:func:`grood.metrics.threshold_acceptance`)."""
    from grood.metrics import threshold_acceptance

    mean, std = threshold_acceptance(cal["n"], cal["tpr"])
    return (f"accepts {100 * cal['tpr']:g} % of the {cal['n']:,} held-out ID rows it was "
            f"chosen on, {100 * mean:.1f} ± {100 * std:.1f} % of new ones; lower scores are "
            "flagged as OOD")


def _override(det: Any, args: argparse.Namespace) -> None:
    """The scoring settings given on the command line in place of the saved ones."""
    if args.batch_size is not None:
        det.batch_size = args.batch_size
    if args.precision is not None:
        det.precision = args.precision


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from grood import GROOD
    from grood.io import load_features
    from grood.persistence import save_target

    _require_files({"detector file": args.detector, "feature file": args.features})
    # The detector file may be replaced by its calibrated self (saving is atomic and the
    # loaded detector holds its own copy); the features must not be overwritten.
    save_target(args.out, inputs={"feature file": args.features})
    det = GROOD.load(args.detector, device=args.device, backend=args.backend)
    _override(det, args)
    with prefixed_errors(args.features):
        det.calibrate(load_features(args.features).features, tpr=args.tpr)
    det.save(args.out)
    print(f"{_threshold_line(det)}; saved {args.out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from grood import GROOD
    from grood.calibration import current_threshold, zero_counts
    from grood.evaluation import warn_training_rows
    from grood.io import load_features, save_scores
    from grood.neighbours import neighbours_and_predict, warn_row_order
    from grood.persistence import save_target

    _require_files({"detector file": args.detector, "feature file": args.features})
    save_target(args.out, suffixes=(".npy", ".npz", ".csv"), what="scores",
                inputs={"detector file": args.detector, "feature file": args.features})
    if args.neighbours and args.out.lower().endswith(".npy"):
        raise ValueError(f"{args.out}: .npy output holds the scores alone; write .npz or .csv "
                         "to keep the neighbours (--neighbours)")
    rank, world = _init_distributed(args)
    det = GROOD.load(args.detector, device=args.device, distributed=args.distributed,
                     backend=args.backend)
    _override(det, args)
    # A saved threshold, checked to hold for the detector's search (k, nprobe) as saved.
    threshold = current_threshold(det, required=False)
    data = load_features(args.features)
    features = _shard(data.features, rank, world)
    neighbours: tuple[Any, Any] | None = None
    scores: Any  # tensors, or arrays as the features were; numpy arrays below
    preds: Any
    with prefixed_errors(args.features, only=("features",)), \
            det._counting_training_rows() as found:
        if args.neighbours:  # the scores come from the same search: -distance to the k-th
            warn_row_order(det)
            dists, rows, preds, _ = neighbours_and_predict(det, features,
                                                           max(args.neighbours, det.k))
            scores = 0.0 - dists[:, det.k - 1]
            neighbours = (dists[:, :args.neighbours], rows[:, :args.neighbours])
        else:
            scores, preds = det.score_and_predict(features)
    # As numpy arrays (the neighbours come as tensors on the detector's device).
    results = [np.asarray(r.cpu() if hasattr(r, "cpu") else r)
               for r in (scores, preds, *(neighbours or ()))]
    zeros = zero_counts(found)  # [training rows, unresolved rows] at distance 0
    if world > 1:
        import torch

        from grood.distributed import all_gather_rows, all_reduce

        results = [torch.cat(all_gather_rows(torch.from_numpy(r))).numpy() for r in results]
        zeros = all_reduce(zeros)
        if rank:
            return 0
    scores, preds, *rest = results
    warn_training_rows(det, args.features, [zeros], scores.size, ood=None)
    flags = None if threshold is None else scores < threshold
    save_scores(args.out, scores, preds, flags, threshold,
                neighbours=(rest[0], rest[1]) if rest else None)
    flagged = "" if flags is None else (
        f"; {int(flags.sum())} ({100 * flags.mean():.2f} %) flagged as OOD, scoring below "
        f"the detector's threshold {threshold:.6g}")
    print(f"scored {scores.size:,} sample{'s' if scores.size != 1 else ''} (higher = "
          f"in-distribution; min {scores.min():.6g}, median {np.median(scores):.6g}, max "
          f"{scores.max():.6g}){flagged}; wrote {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from grood.persistence import describe

    info = describe(Path(args.detector), check=args.check)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(info_lines(info)))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from grood.environment import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from grood import GROOD
    from grood.io import load_features
    from grood.persistence import save_target
    from grood.portable import export_onnx

    _require_files({"detector file": args.detector, "feature file": args.features})
    save_target(args.out, suffixes=(".onnx",), what="ONNX files",
                inputs={"detector file": args.detector, "feature file": args.features})
    det = GROOD.load(args.detector, device="cpu")
    if args.features is not None:
        with prefixed_errors(args.features):
            rows = load_features(args.features).features[:EXPORT_EXAMPLE_ROWS]
        example = torch.as_tensor(rows, dtype=torch.float32)
    else:  # rows like the data's: the class prototypes, and the OOD prototype
        example = torch.cat([det.class_prototypes_[:EXPORT_EXAMPLE_ROWS - 1],
                             det.ood_prototype_[None]]).float()
    # torch's exporter's own notices, not the command's: a deprecation inside torch, and
    # torchvision's ops it skips registering where torchvision is not installed.
    # (main's catch_warnings restores the filters; the logger's level is restored here.)
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            FutureWarning)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        path = export_onnx(det, example, args.out, dynamic_batch=not args.static_batch,
                           float64=not args.no_float64, check=not args.no_check,
                           search_block=args.search_block,
                           external_data=True if args.external_data else None)
    finally:
        registration.setLevel(level)
    outputs = "score, pred" + (", is_ood" if hasattr(det, "calibration_") else "")
    checked = (f"checked in ONNX Runtime on {example.shape[0]} rows" if not args.no_check
               else "not checked")
    print(f"wrote {path}: input 'input' [{'N' if not args.static_batch else example.shape[0]}, "
          f"{det.n_features_in_}] float32 features; outputs {outputs}; {checked}")
    return 0


#: The rows of ``grood export``'s example batch (the check's rows, too): enough to cover a
#: batch's shapes, few enough that the check's search over a large index stays small.
EXPORT_EXAMPLE_ROWS = 16


def info_lines(info: dict) -> list[str]:
    """``grood info``'s text: one labelled line per part of a detector file's description
    (:func:`grood.persistence.describe`)."""
    kind = "sharded GROOD detector (manifest)" if info["sharded"] else "GROOD detector"
    writer = f", written by {info['written_by']}" if info["written_by"] else ""
    from grood.neighbours import rows_shuffled

    shuffled = rows_shuffled(info["extractor"])
    rows = ("training rows not recorded (a format version 1 file, or an index that drops "
            "rows): kneighbors needs a refit" if not info["rows_recorded"] else
            "training rows in the order of a shuffling loader's pass (kneighbors' rows name no "
            "sample of the dataset)" if shuffled else
            "training rows recorded (kneighbors names them)")
    opts = {k: v for k, v in (info["index_options"] or {}).items() if v is not None}
    if "storage" not in opts:  # where the exact copy of half-precision storage is kept
        opts.pop("exact_copy", None)
    options = ", ".join(f"{k} {v}" for k, v in sorted(opts.items()))
    source = info["ood_prototype"] or {}
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted((source.get("params") or {}).items()))
    lines = [
        f"{info['file']}: {kind}, format version {info['format_version']}{writer} "
        f"({_size(info['bytes'])})",
        f"  training     {info['n_train']:,} rows, {info['n_classes']:,} classes, "
        f"{info['n_features_in']:,}-d {info['dtype']} features; "
        f"{100 * info['train_accuracy']:.2f} % classified correctly",
        f"  index        {info['index']}{f' ({options})' if options else ''}, "
        f"{'?' if info['indexed'] is None else format(info['indexed'], ',')} gradients"
        f"{', held less their mean' if info.get('index_centred') else ''}; {rows}",
        f"  scoring      k = {info['k']}, precision {info['precision']}, backend "
        f"{info['backend']}, batch size {info['batch_size']}",
        f"  OOD          prototype {source.get('name')!r}{f' ({settings})' if settings else ''}"
        + ("" if info.get("ood_fingerprints") is None else
           f", averaged from {info['ood_fingerprints']:,} rows (fingerprinted: grood eval "
           "warns on an OOD set that repeats them)"),
    ]
    if info.get("feature_names_in"):  # fitted on a table: the columns scored tables must hold
        from grood._columns import listed

        lines.append(f"  columns      {listed(info['feature_names_in'])} (a table's, checked "
                     "in every table scored)")
    if "features" in (info["extractor"] or {}):  # fit_model's layer, which score_model reuses
        layer = info["extractor"]["features"]
        lines.append("  model        fit_model read " + (
            f"features {layer!r}" if layer is not None else
            "the features the model returns with return_feature_list=True"))
    cal = info["calibration"]
    lines.append(f"  threshold    {cal['threshold']:.6g}: {_accepts(cal)}" if cal
                 else "  threshold    none (grood calibrate sets one)")
    if info["shards"]:
        lines.append(f"  shards       {len(info['shards'])}: " + ", ".join(
            f"{s['file']} ({s['gradients']:,})" for s in info["shards"]))
    if info.get("digest"):  # (a shard's: --json lists each)
        lines.append(f"  digest       {info['digest']} (SHA-256 of its tensors and settings)")
    lines.append("  checked      every tensor and digest, as loading checks them" if info["checked"]
                 else "  checked      header only (--check reads every tensor and verifies "
                      "the digests)")
    return lines


def _size(n: int) -> str:
    """Bytes in words: 812 B, 2.5 KB, 10.3 GB."""
    units, value, i = ("B", "KB", "MB", "GB", "TB"), float(n), 0
    while value >= 1000 and i < len(units) - 1:
        value, i = value / 1000, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from grood import GROOD
    from grood.evaluation import eval_layout, evaluate, id_labels_and_logits
    from grood.io import array_names, load_features
    from grood.persistence import save_target, written_atomically

    _require_files({"detector file": args.detector, "feature file": args.id})
    arrays_in = functools.cache(array_names)  # (read once: --baselines all asks first)
    every = _all_baselines(args, arrays_in) if "all" in args.baselines else None
    # Those named, or given an option: any refusal of theirs ends the command (one that
    # `all` alone brought in is left out, with why, as those the files lack arrays for).
    asked = {b for b in args.baselines if b != "all"} | {
        key for option, (key, _) in BASELINE_OPTIONS.items()
        if getattr(args, option) is not None}
    args.baselines = list(dict.fromkeys(
        name for b in args.baselines for name in ((every or []) if b == "all" else (b,))))
    readers = _train_readers(head_given=args.head is not None)
    trained = [b for b in args.baselines if b in readers]
    if trained and args.train is None:
        verb = "fits" if len(trained) == 1 else "fit"
        raise ValueError(f"--baselines {' and '.join(trained)} {verb} on a training set: give "
                         "the training feature file with --train")
    if args.train is not None:
        if not trained:
            raise ValueError(f"--train is read only by --baselines {', '.join(readers[:-1])} "
                             f"and {readers[-1]}"
                             + (" (given --head)" if args.head is not None else ""))
        _require_files({"training feature file": args.train})
    held = [b for b in args.baselines if b in HELD_OUT]
    if held and args.held_out is None:
        raise ValueError(f"--baselines {held[0]} fits its temperature on held-out logits and "
                         "labels (a validation set, not the rows the model was trained on): "
                         "give their file with --held-out")
    if args.held_out is not None:
        if not held:
            raise ValueError(f"--held-out is read only by --baselines {', '.join(HELD_OUT)}")
        _require_files({"held-out file": args.held_out})
    for option, (key, _) in BASELINE_OPTIONS.items():
        if getattr(args, option) is not None and key not in args.baselines:
            raise ValueError(f"--{option.replace('_', '-')} is read only by --baselines {key}"
                             + ("" if every is None else ", which --baselines all leaves out "
                                "here (the warning above says why)"))
    if args.head is not None:
        if not set(args.baselines) & set(HEAD_BASELINES):
            raise ValueError("--head is read only by --baselines "
                             f"{', '.join(HEAD_BASELINES[:-1])} and {HEAD_BASELINES[-1]}")
        _require_files({"last-layer file": args.head})
    for option, (key, param) in BASELINE_OPTIONS.items():
        value, upper = getattr(args, option), getattr(BY_NAME[key][0], "upper_closed", False)
        if param == "percentile" and value is not None and not (
                0 < value <= 100 if upper else 0 <= value < 100):
            raise ValueError(f"--{option.replace('_', '-')} must be a number in "
                             f"{'(0, 100]' if upper else '[0, 100)'}, got {value:g}")
    if args.bootstrap is not None and args.bootstrap < MIN_RESAMPLES:
        raise ValueError(f"--bootstrap {args.bootstrap}: a percentile interval needs at least "
                         f"{MIN_RESAMPLES} resamples (1000 is usual)")
    if not (args.ood or args.near or args.far):
        raise ValueError("give the OOD feature files: --ood FILE ..., or OpenOOD's groups "
                         "--near FILE ... and --far FILE ...")
    ood_files = [*args.near, *args.far, *args.ood]  # the table's order
    repeated = _named_twice(ood_files)
    if repeated:  # one row and one metrics entry per set
        raise ValueError("an OOD file is named more than once (by --ood, --near and --far "
                         f"together): {', '.join(repeated)}")
    groups = {g: dict.fromkeys(getattr(args, g), "") for g in ("ood", "near", "far")}
    eval_layout(groups["ood"], groups["near"], groups["far"])  # a path named like a mean row
    for path in ood_files:
        _require_files({"feature file": path})
    if args.held_out is not None:  # a temperature fitted on the rows it is judged on
        for what, path in (("the ID test file (--id)", args.id),
                           *(("an OOD file", p) for p in ood_files),
                           ("the training file (--train)", args.train)):
            if path is not None and _named_twice([path, args.held_out]):
                raise ValueError(f"--held-out {args.held_out} is {what}: TempScale's "
                                 "temperature is fitted on held-out ID rows (a validation "
                                 "set), apart from the test sets and the training rows")
    inputs = {"detector file": args.detector, "ID feature file": args.id,
              **{f"OOD feature file {p}": p for p in ood_files},
              **({"training feature file": args.train} if args.train is not None else {}),
              **({"last-layer file": args.head} if args.head is not None else {}),
              **({"held-out file": args.held_out} if args.held_out is not None else {})}
    if args.json:
        save_target(args.json, suffixes=None, what="metrics", inputs=inputs)
    if args.csv:
        save_target(args.csv, suffixes=(".csv",), what="OpenOOD metric tables", inputs=inputs)
        if args.json and os.path.realpath(args.json) == os.path.realpath(args.csv):
            raise ValueError(f"--json and --csv name the same file ({args.csv}); give each "
                             "its own")
    plots = _plot_targets(args.plots, inputs) if args.plots else None
    det = GROOD.load(args.detector, device=args.device, backend=args.backend)
    _override(det, args)
    id_data = load_features(args.id)
    with prefixed_errors(args.id):  # several feature files: an error says which one
        id_labels_and_logits(id_data, det.n_classes_)  # before any work
    logit_baselines = [b for b in args.baselines if EVAL_BY_NAME[b][1] == "logits"]
    for path in ood_files if logit_baselines else ():  # before any scoring, as the ID file
        if "logits" not in arrays_in(path):
            raise ValueError(f"{path}: --baselines {' and '.join(logit_baselines)} "
                             f"{'scores' if len(logit_baselines) == 1 else 'score'} logits: "
                             "the file has no 'logits' array")
    fitted = _fit_baselines(args, id_data, det.n_features_in_, det.n_classes_,
                            optional=set(every or ()) - asked)
    args.baselines, baselines = list(fitted), list(fitted.values())
    ev = evaluate(det, id_data, {p: p for p in args.ood}, near={p: p for p in args.near},
                  far={p: p for p in args.far}, baselines=baselines, bootstrap=args.bootstrap,
                  id_name=args.id, device=args.device)
    print(ev.summary(None if ev.threshold is None else _threshold_line(det)))
    taken_with = _provenance(det, args, baselines)
    print(f"\n{_provenance_line(taken_with)}")
    if args.json:  # (no feature file is named so: each has a suffix)
        with written_atomically(args.json) as tmp:
            tmp.write_text(json.dumps({**ev.results, "taken_with": taken_with}, indent=2))
    if args.csv:
        with written_atomically(args.csv) as tmp:
            tmp.write_text(ev.openood_csv())
    if plots is not None:
        written = ev.plot(plots)
        print(f"\nwrote {written[0]} (ROC curves) and {written[1]} (score histograms)"
              + (f", and {written[2]} (GROOD minus each baseline)" if len(written) > 2 else ""))
    return 0


def _provenance(det: Any, args: argparse.Namespace, baselines: Sequence[Any]
                ) -> dict[str, Any]:
    """What ``grood eval``'s tables were taken with, for whoever reads them pasted elsewhere
    (its last line) or reads its ``--json`` (under ``taken_with``): the detector file and its
    digest, the ID file, the detector's scoring settings, its backends and device, the
    bootstrap and baselines (of the fitted ``baselines``, TempScale's temperature), grood (and
    its kernels), torch, and the day."""
    from datetime import date

    import torch

    from grood.baselines import default_vim_dim
    from grood.environment import kernel_sources
    from grood.index import ExactIndex
    from grood.persistence import describe

    info = describe(args.detector)
    estimators = dict(zip(args.baselines, baselines, strict=True))
    return {
        "detector": args.detector,
        # the SHA-256 the file records over its tensors and settings (a sharded one's: each
        # shard's)
        "digest": info["digest"] or [s["digest"] for s in info["shards"] or ()],
        "id": args.id, "ood_prototype": det.ood_source_.name, "k": det.k,
        "index": det.index_.kind, "nprobe": getattr(det.index_, "nprobe", None),
        "precision": det.precision,
        "backends": {op: backend for op, backend in det.backend_.items()  # (faiss searches
                     if op != "knn" or isinstance(det.index_, ExactIndex)},  # itself)
        "device": str(det.device_), "bootstrap": args.bootstrap,
        "baselines": list(args.baselines),
        # the parameters the options set, as the baselines take them (their defaults else;
        # ViM's dim, None, is the width's default)
        **{option: default_vim_dim(det.n_features_in_) if value is None else value
           for option, (key, param) in BASELINE_OPTIONS.items() if key in estimators
           for value in [getattr(estimators[key], param)]},
        **({"train": args.train} if args.train is not None else {}),
        **({"head": args.head} if args.head is not None else {}),
        **({"held_out": args.held_out} if args.held_out is not None else {}),
        **{f"{key}_temperature": b.temperature_ for key, b in estimators.items()
           if isinstance(b, TempScale)},
        "grood": __version__, "kernels": kernel_sources(), "torch": torch.__version__,
        "date": date.today().isoformat(),
    }


def _provenance_line(p: dict[str, Any]) -> str:
    """:func:`_provenance` in the line under ``grood eval``'s tables."""
    from grood.environment import backend_words

    nprobe = f" (nprobe {p['nprobe']})" if p["nprobe"] is not None else ""
    return (f"GROOD: OOD prototype {p['ood_prototype']!r}, k={p['k']}, {p['index']} index"
            f"{nprobe}, precision {p['precision']}; {backend_words(p['backends'])}, "
            f"{p['device']} · grood {p['grood']} (kernels {p['kernels']}), torch {p['torch']} "
            f"· {p['date']}")


def _all_baselines(args: argparse.Namespace, arrays_in: Callable[[str], set[str]]
                   ) -> list[str]:
    """``--baselines all``: every baseline the given files let be fitted and scored, in
    EVAL_BY_NAME's order. Those left out (TempScale without --held-out, those that learn from
    a training set without --train or from arrays it lacks, those of logits where a test file
    has none) are named in one warning, with what each needs. ``arrays_in``: the names of
    the arrays a file holds (:func:`grood.io.array_names`)."""
    def arrays(path: str | None) -> set[str] | None:  # (a missing file is refused later)
        return arrays_in(path) if path is not None and os.path.isfile(path) else None

    tests = [args.id, *args.near, *args.far, *args.ood]
    no_logits = [p for p in tests if "logits" not in (arrays(p) or {"logits"})]
    train = arrays(args.train)
    kept: list[str] = []
    left_out: dict[str, list[str]] = {}  # why -> the names
    for key, (cls, scores) in EVAL_BY_NAME.items():
        reads = () if key in HELD_OUT else learned_from(cls, head_given=args.head is not None)
        lacks = [r for r in reads if train is not None and r not in train]
        why = ("no held-out logits and labels to fit on: give --held-out FILE"
               if key in HELD_OUT and args.held_out is None else
               f"no logits in {no_logits[0]}" if scores == "logits" and no_logits
               else "no training set to fit on: give --train FILE"
               if reads and args.train is None
               else f"no {' and '.join(lacks)} in the training file" if lacks else None)
        if why is None:
            kept.append(key)
        else:
            left_out.setdefault(why, []).append(key)
    if left_out:
        warnings.warn("--baselines all leaves out " + "; ".join(
            f"{', '.join(names)} ({why})" for why, names in left_out.items()),
            UserWarning, stacklevel=2)
    return kept


def _train_readers(*, head_given: bool) -> list[str]:
    """``grood eval --baselines`` takes grood.baselines.BY_NAME's names: those that learn
    from a training set (:func:`grood.baselines.learned_from`; GradNorm, ASH and SCALE
    only where they recover the layer, without --head) are fitted on --train, the others
    on the ID file's logits or features (whose width they record)."""
    return [k for k, (cls, _) in BY_NAME.items() if learned_from(cls, head_given=head_given)]


#: Those that read --train's logits (to recover the classifier's last layer from), or --head.
HEAD_BASELINES = list(LAST_LAYER_NAMES)
#: ``grood eval --baselines``' baselines beyond grood.baselines.BY_NAME, fitted on a file of
#: their own: TempScale on --held-out's logits and labels (a validation set).
HELD_OUT: dict[str, tuple[type[Any], str]] = {"tempscale": (TempScale, "logits")}
#: Every name ``grood eval --baselines`` takes, in its tables' order.
EVAL_BY_NAME = {**BY_NAME, **HELD_OUT}
#: ``grood eval``'s options for one baseline's parameter: option -> (baseline, parameter).
BASELINE_OPTIONS = {"knn_k": ("knn", "k"), "vim_dim": ("vim", "dim"),
                    "react_percentile": ("react", "percentile"),
                    "ash_percentile": ("ash", "percentile"),
                    "dice_percentile": ("dice", "percentile"),
                    "scale_percentile": ("scale", "percentile"),
                    "nnguide_k": ("nnguide", "k"),
                    "nnguide_bank": ("nnguide", "bank_fraction")}


def _unfitted_baselines(args: argparse.Namespace) -> dict[str, Any]:
    """``--baselines``' estimators by name, unfitted, with the parameters the options set
    (the baselines' own defaults otherwise)."""
    given: dict[str, dict[str, Any]] = {}
    for option, (key, param) in BASELINE_OPTIONS.items():
        if getattr(args, option) is not None:
            given.setdefault(key, {})[param] = getattr(args, option)
    return {key: EVAL_BY_NAME[key][0](**given.get(key, {})) for key in args.baselines}


def _fit_error(key: str, exc: Exception) -> Exception:
    """``exc`` from fitting ``--baselines key``, the baseline named (``--baselines all``
    fits many) and, where the message names one of its parameters, the options that set
    them (the message speaks of ``k``, the command line of ``--knn-k``)."""
    text = str(exc)
    if type(exc) not in (ValueError, TypeError):
        return exc
    if f"--baselines {key}" not in text:
        text = f"--baselines {key}: {text}"
    options = [(f"--{option.replace('_', '-')}", param)
               for option, (k, param) in BASELINE_OPTIONS.items() if k == key]
    if any(re.search(rf"(?<![-\w]){param}\b", text) for _, param in options) and \
            not any(option in text for option, _ in options):
        text += " (options: " + ", ".join(f"{o} sets {param}" for o, param in options) + ")"
    return type(exc)(text)


def _fit_baselines(args: argparse.Namespace, id_data: Any, n_features: int,
                   n_classes: int, *, optional: set[str]) -> dict[str, Any]:
    """``grood eval --baselines``: each one fitted before any scoring (those of logits on the
    ID file's, TempScale on --held-out's logits and labels, of the detector's ``n_classes``
    columns), on the command's device; the training features of the width the detector's
    (``n_features``) were. Each array is read and moved to the device once, however many
    baselines fit on it. Those that learn nothing or fit on --held-out first, those that
    learn from --train (seconds to minutes each at ImageNet scale) after them: a refusal
    comes before the long fits. A baseline in ``optional`` (brought in by ``--baselines
    all``) whose fit refuses the files is left out, with its error as a warning; any other's
    error ends the command. Returns the fitted ones by name, in the tables' order."""
    import torch

    from grood._linear import checked_head
    from grood._progress import progress
    from grood.io import FeatureFile, load_features, load_head, load_held_out

    train = load_features(args.train) if args.train is not None else None
    head = None
    if args.head is not None:  # checked against the detector's width before any fit
        with prefixed_errors(args.head):
            weight, bias = checked_head(*load_head(args.head), n_features, torch.float64,
                                        torch.device(args.device or "cpu"))
        head = {"weight": weight, "bias": bias}
    moved: dict[tuple[str, str], Any] = {}

    def array(file: str, data: Any, name: str, key: str) -> Any:
        if (file, name) not in moved:
            moved[file, name] = _file_array(data, name, key, args.device)
        return moved[file, name]

    def fit_one(key: str, est: Any) -> None:
        if key in HELD_OUT:
            with prefixed_errors(args.held_out):
                logits, labels = load_held_out(args.held_out)
                held = FeatureFile(None, labels, logits)
                z, y = (array("held-out", held, name, key) for name in ("logits", "labels"))
                if z.ndim == 2 and z.shape[1] != n_classes:
                    raise ValueError(f"the held-out logits have {z.shape[1]} columns, the "
                                     f"detector's classes are {n_classes}: --held-out is "
                                     "not a validation set of the same classifier")
                est.fit(z, y)
            return
        reads = learned_from(type(est), head_given=head is not None)
        if not reads:  # (nothing learned: the width of the ID file's logits or features)
            with prefixed_errors(args.id):
                est.fit(array("id", id_data, est.inputs, key),
                        **((head or {}) if "head" in est.fit_reads else {}))
            return
        assert train is not None  # (checked by _cmd_eval)
        with prefixed_errors(args.train):
            arrays = [array("train", train, name, key) for name in reads]
            x = arrays[0]
            if "features" in reads and x.ndim == 2 and x.shape[1] != n_features:
                raise ValueError(f"the training features have {x.shape[1]} columns, the "
                                 f"detector's {n_features}: --train is not the features the "
                                 "detector was fitted on")  # (else the fit names the shape)
            if key == "vim" and args.vim_dim is not None and args.vim_dim >= n_features:
                raise ValueError(f"--vim-dim {args.vim_dim}: ViM's principal space must leave "
                                 f"part of the {n_features} feature dimensions outside it")
            given = dict(zip(reads, arrays, strict=True))
            est.fit(x, *([given["labels"]] if "labels" in reads else []),
                    **({} if "head" not in est.fit_reads else head
                       or {"logits": given["logits"]}))

    estimators = _unfitted_baselines(args)
    order = sorted(estimators, key=lambda key: key not in HELD_OUT and bool(
        learned_from(type(estimators[key]), head_given=head is not None)))  # (stable)
    left_out: list[str] = []
    # At ImageNet scale each fit takes seconds to minutes: counted as they finish.
    with progress(total=len(estimators), desc="grood eval: fitting baselines",
                  unit="baselines", enabled=None if estimators else False) as bar:
        for key in order:  # (a left-out one is counted as done, and named as left out)
            bar.set_postfix(baseline=type(estimators[key]).__name__,
                            **({"left_out": "+".join(left_out)} if left_out else {}))
            try:
                fit_one(key, estimators[key])
            except (ValueError, TypeError) as exc:
                named = _fit_error(key, exc)
                if named is exc:
                    raise
                if key not in optional:
                    raise named from exc
                left_out.append(key)
                warnings.warn(f"--baselines all leaves out {key}, which refuses the files: "
                              f"{str(named).removeprefix(f'--baselines {key}: ')}",
                              UserWarning, stacklevel=2)
            bar.update(1)
        if left_out:  # (the last line: how many were fitted, and which were left out)
            bar.set_postfix(fitted=len(estimators) - len(left_out), left_out="+".join(left_out))
    return {key: est for key, est in estimators.items() if key not in left_out}


#: What a baseline that lacks a feature file's array does with it, by array.
_MISSING = {"logits": "scores logits: the file has no 'logits' array",
            "labels": "fits one mean per class: the file needs 'labels'"}


def _file_array(data: Any, name: str, key: str, device: str | None) -> Any:
    """A feature file's array as a tensor on ``device``; a missing one named with the
    baseline (``--baselines key``) that needs it."""
    from grood._checks import as_tensor

    value = getattr(data, name)
    if value is None:
        if key in HEAD_BASELINES and name == "logits":
            raise ValueError(f"--baselines {key} reads the features through the classifier's "
                             "last layer, which it recovers from the training file's logits: "
                             "the file has no 'logits' array (or give the layer: --head FILE)")
        raise ValueError(f"--baselines {key} {_MISSING[name]}")
    return as_tensor(value, name)[0].to(device)


def _plot_targets(folder: str, inputs: dict[str, str]) -> Path:
    """``grood eval --plots``: the folder (made if missing), its PNG files (what
    :meth:`grood.evaluation.Evaluation.plot` writes) checked, and matplotlib imported, before
    any scoring."""
    from grood.evaluation import PLOT_FILES
    from grood.report import plot_folder

    return plot_folder(folder, PLOT_FILES, "--plots", inputs)


def named_arg(setting: str) -> Callable[[str], str]:
    """An argparse type for ``precision``, ``index`` or ``backend``: the name, or a usage
    error naming the one meant where another name for it is given (``fp32`` → ``ieee``,
    ``ivf`` → ``faiss-ivf``, a device as the backend), as the Python API's checks do."""

    def check(text: str) -> str:
        from grood.functional import check_precision
        from grood.index import index_class
        from grood.ops import check_backend_name

        checks = {"precision": check_precision, "index": index_class,
                  "backend": check_backend_name}
        try:
            checks[setting](text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{setting} ").replace(
                "device=...", "--device")) from None
        return text

    check.__name__ = setting  # (argparse names the type in some errors)
    return check


def _cmd_tune(args: argparse.Namespace) -> int:
    from grood import GROOD
    from grood.io import load_features, load_head
    from grood.persistence import save_target, written_atomically
    from grood.tuning import tune

    grid: dict[str, list[Any]] = {}
    for name, values in args.grid:
        if name in grid:
            raise ValueError(f"--grid names {name} twice: give all its values in one, "
                             f"--grid {name}=A,B,C")
        grid[name] = values
    cls = GROOD if args.method == "grood" else BY_NAME[args.method][0]
    if args.out is not None and cls is not GROOD:
        raise ValueError(f"--out saves the chosen GROOD detector; {args.method} has no "
                         "detector file (its chosen parameters are printed and in --json)")
    if args.head is not None and "head" not in getattr(cls, "fit_reads", ()):
        raise ValueError("--head is read only by the last-layer baselines, "
                         f"{', '.join(LAST_LAYER_NAMES)}")
    if args.ood_features is not None and cls is not GROOD:
        raise ValueError("--ood-features is read only by grood (--grid "
                         "ood_prototype=features)")
    repeated = _named_twice(args.ood_val)
    if repeated:
        raise ValueError(f"an OOD validation file is named more than once: "
                         f"{', '.join(repeated)}")
    inputs = {"training feature file": args.train, "ID validation file": args.id_val,
              **{f"OOD validation file {p}": p for p in args.ood_val},
              "last-layer file": args.head, "OOD feature file": args.ood_features}
    _require_files(inputs)
    given = {k: v for k, v in inputs.items() if v is not None}
    if args.plot is not None:
        from grood.report import figure_class

        if not any(len(values) > 1 for values in grid.values()):
            raise ValueError("--plot draws the metric against a parameter that takes several "
                             "values, and every --grid here gives one")
        figure_class()  # (a missing matplotlib is named before any work)
    outputs = ((args.json, None, "results"), (args.plot, (".png",), "plots"),
               (args.out, (".safetensors",), "detector files"))
    for path, suffixes, what in outputs:
        if path is not None:
            save_target(path, suffixes=suffixes, what=what, inputs=given)
    if len({os.path.realpath(p) for p, _, _ in outputs if p is not None}) < sum(
            p is not None for p, _, _ in outputs):
        raise ValueError("two of --json, --plot and --out name the same file: give each its "
                         "own")
    fit_params = {}
    if args.head is not None:
        with prefixed_errors(args.head):
            weight, bias = load_head(args.head)
        fit_params = {"weight": weight, "bias": bias}
    if args.ood_features is not None:
        with prefixed_errors(args.ood_features):
            fit_params = {"ood_features": load_features(args.ood_features).features}
    with prefixed_errors(args.train):
        train = load_features(args.train)
    found = tune(cls(), grid, train=train, id_val=args.id_val,
                 ood_val={p: p for p in args.ood_val}, metric=args.metric,
                 fit_params=fit_params)
    print(f"{found.summary()}\n\n{found.table()}")
    if args.json:
        with written_atomically(args.json) as tmp:
            tmp.write_text(json.dumps({**found.as_dict(), "train": args.train,
                                       "id_val": args.id_val}, indent=2))
    if args.plot is not None:
        from grood.report import METRIC_LABELS

        print(f"\nwrote {found.plot(args.plot)} (the {METRIC_LABELS[found.metric]} of each "
              f"point against {found.varied[0]})")
    if args.out is not None:
        found.best_estimator.save(args.out)
        print(f"\nsaved the detector fitted with {found.best_params} to {args.out}")
    return 0


def grid_arg(text: str) -> tuple[str, list[Any]]:
    """An argparse type for ``--grid NAME=V1,V2,...``: the name and its values, each an int,
    a float, ``none``, ``true`` / ``false`` or else a string."""
    name, sep, rest = text.partition("=")
    values = rest.split(",")
    if not sep or not name.strip() or not all(v.strip() for v in values):
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE,VALUE,... (k=1,5,10), got {text!r}")

    def value(v: str) -> Any:
        v = v.strip()
        words = {"none": None, "true": True, "false": False}
        if v.lower() in words:
            return words[v.lower()]
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    return name.strip(), [value(v) for v in values]


def baseline_arg(text: str) -> str:
    """An argparse type for ``--baselines``: the name (argparse checks it against the names),
    or a usage error for those feature files cannot feed (ODIN, RankFeat), saying why."""
    if text.lower() in NOT_BY_NAME and text.lower() not in HELD_OUT:
        raise argparse.ArgumentTypeError(not_by_name(text, "feature files"))
    return text


def tune_method_arg(text: str) -> str:
    """An argparse type for ``grood tune METHOD``: as :func:`baseline_arg`, TempScale refused
    too (no grid sets anything of it: its temperature is fitted)."""
    if text.lower() in HELD_OUT:
        raise argparse.ArgumentTypeError(
            "TempScale has nothing to tune: its temperature is fitted on held-out logits and "
            "labels; score it beside GROOD with grood eval --baselines tempscale --held-out "
            "FILE")
    return baseline_arg(text)


def feature_sources() -> list[str]:
    """Registered OOD-prototype sources that a command line of feature files can feed (they
    need nothing, or only ``ood_features``); sources that need the model are for Python."""
    from grood.prototypes import SOURCES

    return [name for name, cls in SOURCES.items() if set(cls.needs) <= {"ood_features"}]


def _scoring_options(parser: argparse.ArgumentParser, *, backend_help: str = "",
                     precision_help: str = PRECISION_HELP) -> None:
    """--device, and the saved detector's settings a scoring command may replace for the run
    (``_override`` applies them)."""
    from grood.functional import PRECISIONS
    from grood.ops import BACKENDS

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--backend", type=named_arg("backend"), choices=BACKENDS,
                        default=None,
                        help="run on this backend instead of the saved one" + backend_help)
    parser.add_argument("--precision", type=named_arg("precision"), choices=PRECISIONS,
                        default=None,
                        help=precision_help)
    parser.add_argument("--batch-size", type=positive_int_arg, default=None,
                        help="rows per batch (default: the detector's)")


class _StoreOnce(argparse._StoreAction):
    """A single-valued option given twice is refused: argparse keeps the last value without a
    word (``--id a.npz ... --id b.npz`` would evaluate b alone)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_given_once", set())
        if option_string is not None and self.dest in given:
            parser.error(f"argument {option_string}: given more than once "
                         f"({getattr(namespace, self.dest)!r}, then {values!r}); give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """The ``grood`` command's parsers (its subcommands' too): single-valued options are
    stored once (:class:`_StoreOnce`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``grood`` command (choices read from the registries)."""
    from grood.functional import PRECISIONS
    from grood.index import index_kinds
    from grood.ops import BACKENDS

    parser = _Parser(
        prog="grood",
        description="GROOD: gradient-aware out-of-distribution detection. Scores are higher "
                    "for in-distribution samples.",
        epilog="Run 'grood COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"grood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train a small CNN on real digits and compare GROOD with baselines",
        description="Train a small CNN on scikit-learn's bundled handwritten digits 0-5 (no "
                    "download), then compare GROOD with MSP, MaxLogit, Energy, GEN, KLM, "
                    "KNN, Mahalanobis, RMD, ViM, ReAct, GradNorm, ASH, SHE, DICE, fDBD, "
                    "SCALE, NNGuide, ODIN and RankFeat on near-OOD (digits 6-9) and far-OOD "
                    "(noise images). "
                    "Prints a table and "
                    "writes ROC curves, score histograms, GROOD (mean) minus each baseline "
                    "with paired bootstrap intervals, and each set's extreme-scoring images "
                    "beside their nearest training images in gradient space as PNG files.")
    demo.add_argument("--out", default="grood-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--epochs", type=positive_int_arg, default=30,
                      help="training epochs of the CNN (default: %(default)s)")
    demo.add_argument("--n-noise", type=positive_int_arg, default=500,
                      help="number of far-OOD noise images (default: %(default)s)")
    demo.add_argument("--knn-k", type=positive_int_arg, default=10,
                      help="neighbour used by the KNN baseline, and how many NNGuide "
                           "averages (default: %(default)s)")
    demo.add_argument("--seeds", type=positive_int_arg, default=1,
                      help="run this many seeds from --seed on and print mean ± std "
                           "(default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_cmd_demo)

    fit = sub.add_parser("fit", help="fit a detector on training feature files and save it",
                         description="Fit GROOD on training features (and labels, and logits if "
                                     "the file has them) and save it as .safetensors.",
                         epilog=EPILOG_FILES)
    fit.add_argument("train", nargs="+",
                     help="training feature file with 'features' and 'labels'; several "
                          "(e.g. shards of one extraction) are read in turn as one training "
                          "set, their rows numbered through them in the order given")
    fit.add_argument("-o", "--out", required=True,
                     help="detector file to write (.safetensors); with --distributed, the "
                          "JSON manifest (e.g. detector.json), beside which every rank "
                          "writes its shard (detector.rank<r>.safetensors)")
    fit.add_argument("--ood-prototype", choices=feature_sources(), default=None,
                     help="OOD prototype source (default: 'features' when --ood-features is "
                          "given, else 'mean')")
    fit.add_argument("--ood-features", help="feature file of OOD samples for the prototype")
    fit.add_argument("-k", type=positive_int_arg, default=1,
                     help="score by the k-th neighbour (default: 1)")
    fit.add_argument("--ignore-logits", action="store_true",
                     help="decide which samples are correct by the nearest prototype even if "
                          "the file has logits")
    fit.add_argument("--backend", type=named_arg("backend"), choices=BACKENDS,
                     default="auto",
                     help="implementation of the hot paths (default: auto)")
    fit.add_argument("--device", default="auto", help=DEVICE_HELP)
    fit.add_argument("--index", type=named_arg("index"), choices=index_kinds(),
                     default="exact",
                     help="gradient index: exact search by grood (default), by faiss, or the "
                          "reference implementation's approximate IVF search (needs faiss)")
    fit.add_argument("--precision", type=named_arg("precision"), choices=PRECISIONS,
                     default="ieee",
                     help="GEMM precision of the gradient step and the search; results are "
                          "re-ranked exactly in fp32 (default: ieee)")
    fit.add_argument("--index-storage", choices=["float32", "bfloat16", "float16"],
                     default="float32",
                     help="dtype the gradient index is searched in; half precision streams "
                          "half the bytes, and candidates are re-ranked from the exact copy; "
                          "prefer bfloat16: float16 loses gradients below 6.1e-5, which are "
                          "common (a warning counts them) (default: float32)")
    fit.add_argument("--exact-copy", choices=["device", "host"], default=None,
                     help="with a half-precision --index-storage: keep the exact copy on the "
                          "device or in host memory (default: device)")
    fit.add_argument("--batch-size", type=positive_int_arg, default=4096,
                     help="rows per batch (default: %(default)s)")
    fit.add_argument("--distributed", action="store_true",
                     help="under torchrun: every rank fits on its block of rows; saves one "
                          "shard per rank and a manifest at --out")
    fit.add_argument("--calibrate", metavar="FILE",
                     help="held-out in-distribution feature file: save with the detector the "
                          "score threshold that accepts --tpr of its rows ('grood score' then "
                          "flags lower scores as OOD)")
    fit.add_argument("--tpr", type=fraction_arg, default=None,
                     help="with --calibrate: the fraction of ID rows to accept (default: 0.95)")
    fit.set_defaults(func=_cmd_fit)

    cal = sub.add_parser(
        "calibrate", help="choose a saved detector's OOD threshold on held-out ID features",
        description="Score held-out in-distribution features and save the detector with the "
                    "threshold that accepts --tpr of them: 'grood score' then writes an 'ood' "
                    "column (.csv) and 'grood eval' the fraction of each OOD set flagged.",
        epilog=EPILOG_FILES)
    cal.add_argument("detector", help="detector file written by 'grood fit'")
    cal.add_argument("features", help="held-out in-distribution feature file (not the "
                                      "training file)")
    cal.add_argument("-o", "--out", required=True,
                     help="detector file to write (.safetensors; may be the detector itself)")
    cal.add_argument("--tpr", type=fraction_arg, default=0.95,
                     help="fraction of the ID rows to accept (default: %(default)s)")
    _scoring_options(cal, precision_help="GEMM precision to score in instead of the saved one "
                                         "(saved with the threshold chosen in it)")
    cal.set_defaults(func=_cmd_calibrate)

    score = sub.add_parser("score", help="score a feature file with a saved detector",
                           description="Score every row of a feature file. Writes .npy "
                                       "(scores), .npz (arrays score, pred, and ood and "
                                       "threshold when the detector holds a threshold: 'grood "
                                       "calibrate') or .csv (index,score,pred, and ood).",
                           epilog=EPILOG_FILES)
    score.add_argument("detector", help="detector file written by 'grood fit'")
    score.add_argument("features", help="feature file to score")
    score.add_argument("-o", "--out", required=True, help="output file, .npy, .npz or .csv")
    _scoring_options(score, backend_help=" (e.g. auto, to score on a CPU a detector fitted "
                                         "with --backend triton)")
    score.add_argument("--neighbours", type=positive_int_arg, default=0, metavar="N",
                       help="also write each sample's N nearest training rows in gradient "
                            "space and their squared distances (.npz arrays neighbour_row, "
                            "neighbour_distance; .csv columns neighbour_row_1.. and "
                            "neighbour_distance_1..); rows number the training rows in the "
                            "order 'grood fit' read them")
    score.add_argument("--distributed", action="store_true",
                       help="under torchrun, with a sharded detector: every rank scores its "
                            "block of rows against all shards; rank 0 writes --out")
    score.set_defaults(func=_cmd_score)

    ev = sub.add_parser("eval", help="AUROC / FPR@95 / AUPR of ID vs OOD feature files",
                        description="Score an ID file and one or more OOD files and print "
                                    "OpenOOD's metrics (OOD is the positive class).",
                        epilog=EPILOG_FILES)
    ev.add_argument("detector", help="detector file written by 'grood fit'")
    ev.add_argument("--id", required=True, help="in-distribution test feature file")
    # extend: a repeated --ood adds its files (the default action would keep the last only)
    ev.add_argument("--ood", nargs="+", action="extend", default=[], metavar="FILE",
                    help="OOD feature file(s); may be repeated; with several, a last row "
                         "averages them")
    ev.add_argument("--near", nargs="+", action="extend", default=[], metavar="FILE",
                    help="near-OOD feature file(s), as OpenOOD groups them: with several, a "
                         "row averages them (OpenOOD's near-OOD summary)")
    ev.add_argument("--far", nargs="+", action="extend", default=[], metavar="FILE",
                    help="far-OOD feature file(s): as --near, for OpenOOD's far-OOD summary")
    ev.add_argument("--plots", metavar="DIR",
                    help="also draw ROC curves (DIR/roc.png) and score histograms "
                         "(DIR/histograms.png), and with --bootstrap and --baselines GROOD "
                         "minus each baseline (DIR/differences.png); needs matplotlib "
                         "(grood[plots])")
    ev.add_argument("--json", help="also write the metrics to this JSON file, by OOD file, "
                                   "with the row counts n_id and n_ood, the ID file's "
                                   "id_accuracy, id_logits_accuracy and id_accepted where it "
                                   "has them, 'group' (near or far) for --near and --far "
                                   "files, and with --baselines theirs under each file's "
                                   "'baselines'; each mean row too, by its label, its files "
                                   "under 'mean_of'; last, under 'taken_with', the detector "
                                   "file and its digest, the ID file, the settings, versions "
                                   "and day the tables were taken with")
    ev.add_argument("--csv", metavar="FILE",
                    help="also write the metrics as OpenOOD's evaluator tabulates them (its "
                         "ood.csv: a row per OOD file and per mean, named nearood, farood or "
                         "ood; FPR@95, AUROC, AUPR_IN, AUPR_OUT and ACC in percent; ACC the "
                         "ID file's nearest-prototype accuracy), with --baselines a method "
                         "column and a row per method")
    ev.add_argument("--baselines", nargs="+", action="extend", default=[],
                    type=baseline_arg, choices=[*EVAL_BY_NAME, "all"], metavar="NAME",
                    help="also score these baselines on the same files: msp, maxlogit, "
                         "energy, gen and klm (from each file's logits; klm fitted on "
                         "--train's), knn, mahalanobis and rmd (fitted on --train; mahalanobis "
                         "and rmd on its labels too), vim, react, gradnorm, ash (ASH-S), she, "
                         "dice, fdbd, scale and nnguide (fitted on --train's features and "
                         "logits, from which they recover the classifier's last layer; she on "
                         "its labels too), tempscale (its temperature fitted on --held-out's "
                         "logits and labels), or all of them: all (those the files allow: "
                         "tempscale with --held-out, those fitted on --train with it, those "
                         "of logits where every test file has them; a warning names the rest)")
    readers = _train_readers(head_given=False)
    layer_only = [k for k in readers if k not in _train_readers(head_given=True)]
    ev.add_argument("--train", metavar="FILE",
                    help="training feature file for --baselines "
                         f"{', '.join(readers[:-1])} and {readers[-1]} (of them "
                         f"{', '.join(layer_only[:-1])} and {layer_only[-1]} only to recover "
                         "the last layer from: not with --head)")
    ev.add_argument("--head", metavar="FILE",
                    help="the classifier's last linear layer for --baselines "
                         f"{', '.join(HEAD_BASELINES[:-1])} and {HEAD_BASELINES[-1]}, instead "
                         "of recovering it from --train's logits: a .pt, .safetensors or .npz "
                         "file holding 'weight' [C, D] and 'bias' [C] (torch.save({'weight': "
                         "fc.weight, 'bias': fc.bias}, FILE))")
    ev.add_argument("--held-out", metavar="FILE",
                    help="held-out logits and labels (an ID validation set's, never the test "
                         "set's nor the training rows') for --baselines tempscale: a feature "
                         "file holding 'logits' [N, C] and 'labels' [N], or a file of those two "
                         "alone (np.savez(FILE, logits=Z, labels=y))")
    ev.add_argument("--knn-k", type=positive_int_arg, default=None,
                    help=f"the neighbour --baselines knn scores by (default {KNN().k}, as Sun "
                         "et al.)")
    ev.add_argument("--vim-dim", type=positive_int_arg, default=None, metavar="N",
                    help="the principal space's dimension of --baselines vim (default 1000 "
                         "for features of 2048 dimensions or more, 512 from 768, half the "
                         "width below)")
    ev.add_argument("--react-percentile", type=float, default=None, metavar="P",
                    help="the percentile of the training features' entries --baselines react "
                         f"clips at (default {ReAct().percentile:g}, as Sun et al.)")
    ev.add_argument("--ash-percentile", type=float, default=None, metavar="P",
                    help="the percentile of each feature row --baselines ash prunes below "
                         f"(ASH-S; default {ASH().percentile:g}, as Djurisic et al. on ImageNet)")
    ev.add_argument("--dice-percentile", type=float, default=None, metavar="P",
                    help="the percentile of the last layer's weight contributions below which "
                         f"--baselines dice drops weights (default {DICE().percentile:g}, as "
                         "OpenOOD)")
    ev.add_argument("--scale-percentile", type=float, default=None, metavar="P",
                    help="the percentile of each feature row above which --baselines scale "
                         "sums the entries its scale divides by (default "
                         f"{SCALE().percentile:g}, as OpenOOD)")
    ev.add_argument("--nnguide-k", type=positive_int_arg, default=None, metavar="K",
                    help="how many of the largest inner products with its bank --baselines "
                         f"nnguide averages (default {NNGuide().k}, as OpenOOD)")
    ev.add_argument("--nnguide-bank", type=fraction_arg, default=None, metavar="F",
                    help="the share of --train's rows in --baselines nnguide's bank, drawn "
                         f"seeded (default {NNGuide().bank_fraction:g}, as OpenOOD)")
    ev.add_argument("--bootstrap", type=positive_int_arg, default=None, metavar="N",
                    help="also give each metric's 95 %% percentile-bootstrap interval over N "
                         "resamples of the ID and OOD scores (at least 100; 1000 is usual; "
                         "seeded, so every run gives the same), in the table and the JSON "
                         "('ci95'), the mean over several OOD files too (the ID scores drawn "
                         "once per resample for all); with --baselines also GROOD minus each "
                         "baseline with its paired interval")
    _scoring_options(ev)
    ev.set_defaults(func=_cmd_eval)
    tn = sub.add_parser(
        "tune", help="choose GROOD's or a baseline's parameters on validation feature files",
        description="Fit GROOD or a baseline at every point of a grid on the training file, "
                    "score the ID and OOD validation files with each, and print each point's "
                    "metric, the best (its mean over the OOD files) starred: OpenOOD's "
                    "parameter search. Points that differ only in what the method applies "
                    "when scoring (GROOD's and knn's k, a temperature, a percentile of ash "
                    "or scale) share one fit. Keep the validation files apart from the test "
                    "files the results are reported on.",
        epilog=EPILOG_FILES)
    tn.add_argument("method", type=tune_method_arg, choices=["grood", *BY_NAME],
                    metavar="METHOD",
                    help=f"grood, or a baseline: {', '.join(BY_NAME)}")
    tn.add_argument("--grid", type=grid_arg, action="append", required=True,
                    metavar="NAME=V1,V2,...",
                    help="a parameter and the values to try, as the Python class names it "
                         "(k=1,2,5,10; percentile=85,90,95; variant=s,b); may be repeated: "
                         "every combination is a point")
    tn.add_argument("--train", required=True, metavar="FILE",
                    help="training feature file (grood: features and labels, with logits "
                         "where the classifier decides what is indexed; a baseline: what it "
                         "fits on)")
    tn.add_argument("--id-val", required=True, metavar="FILE", help="ID validation file")
    tn.add_argument("--ood-val", nargs="+", action="extend", required=True, metavar="FILE",
                    help="OOD validation file(s); with several, the metric's mean over them "
                         "chooses")
    tn.add_argument("--metric", choices=list(HIGHER_IS_BETTER), default="auroc",
                    help="what chooses (fpr95: the lowest; default auroc)")
    tn.add_argument("--head", metavar="FILE",
                    help="the last layer for the last-layer baselines ('weight' and 'bias'), "
                         "as 'grood eval --head' takes it, instead of recovering it from "
                         "--train's logits")
    tn.add_argument("--ood-features", metavar="FILE",
                    help="grood: OOD features for the points of --grid "
                         "ood_prototype=mean,features that read them (as 'grood fit "
                         "--ood-features')")
    tn.add_argument("--json", metavar="FILE",
                    help="also write every point's parameters and metrics per OOD file")
    tn.add_argument("--plot", metavar="FILE",
                    help="also draw the metric against the first parameter that varies "
                         "(PNG; needs matplotlib, grood[plots])")
    tn.add_argument("-o", "--out", metavar="FILE",
                    help="grood: save the detector fitted with the chosen parameters "
                         "(.safetensors)")
    tn.set_defaults(func=_cmd_tune)
    info = sub.add_parser("info", help="what a saved detector file holds",
                          description="Describe a detector file (or a sharded detector's "
                                      "manifest): format version and writer, training set, "
                                      "index, scoring settings, OOD prototype, threshold, "
                                      "shards. Reads the header alone unless --check is given.")
    info.add_argument("detector", help="detector file (.safetensors) or shard manifest (.json)")
    info.add_argument("--check", action="store_true",
                      help="also read every tensor and verify the digests, as loading does "
                           "(slow for a large index; builds nothing)")
    info.add_argument("--json", action="store_true",
                      help="print the description as JSON instead of text")
    info.set_defaults(func=_cmd_info)
    env = sub.add_parser("env", help="versions, packages and devices grood runs with here (for "
                                     "a bug report)",
                         description="Print grood's version and its kernels' digest, Python, "
                                     "every package grood uses (or the extra that installs "
                                     "it), and every device with the backend each operation "
                                     "takes there by default, and why not Triton where it "
                                     "does not. Imports no optional package.")
    env.add_argument("--json", action="store_true", help="print it as JSON instead of text")
    env.set_defaults(func=_cmd_env)
    export = sub.add_parser(
        "export", help="write a saved detector as an ONNX graph (for ONNX Runtime and other "
                       "runtimes)",
        description="Write a saved detector as an ONNX file that scores features outside "
                    "PyTorch: input 'input' [N, D] float32; outputs 'score', 'pred', and "
                    "'is_ood' for a calibrated detector. Rows it cannot score in float32 (NaN "
                    "or Inf features, features far out of distribution) come out as score NaN "
                    "and pred -1. The file is checked in ONNX Runtime against the detector "
                    "before the command ends. Needs grood[onnx].",
        epilog=EPILOG_FILES)
    export.add_argument("detector", help="detector file written by 'grood fit' (the exact "
                                         "index; a faiss index cannot be exported)")
    export.add_argument("-o", "--out", required=True, help="ONNX file to write (.onnx)")
    export.add_argument("--features", metavar="FILE",
                        help=f"feature file whose first {EXPORT_EXAMPLE_ROWS} rows are the "
                             "export's example and the check's input (default: the class "
                             "prototypes and the OOD prototype)")
    export.add_argument("--static-batch", action="store_true",
                        help="fix the batch size to the example's instead of any batch size")
    export.add_argument("--no-float64", action="store_true",
                        help="leave float64 out of the graph (the softmax in float32), for "
                             "runtimes without it, TensorRT among them")
    export.add_argument("--no-check", action="store_true",
                        help="write the file without running it in ONNX Runtime")
    export.add_argument("--external-data", action="store_true",
                        help="write the weights to OUT.data beside the file at any size (by "
                             "default only past 1.5 GiB; ONNX files end at 2 GiB)")
    export.add_argument("--search-block", type=positive_int_arg, default=SEARCH_BLOCK_ROWS,
                        metavar="ROWS",
                        help="indexed gradients per search block: a batch of N rows needs "
                             "memory for about N x ROWS distances at a time (default "
                             f"{SEARCH_BLOCK_ROWS})")
    export.set_defaults(func=_cmd_export)
    # 'grood bench ...' is handed whole to the benchmark code (see main), which is imported
    # only then; this entry lists the command in 'grood --help'.
    sub.add_parser(
        "bench", add_help=False,
        help="check the kernels on the device, then time them (Markdown report); "
             "'grood bench --help' for its options",
        description="Check the Triton kernels against float64, then time them.")
    return parser


#: ``grood bench --compile`` / ``--pipeline`` run these scripts from the source checkout.
BENCH_SCRIPTS = {"--compile": "compile_report", "--pipeline": "pipeline"}


def _run_bench(argv: list[str]) -> int:
    """``grood bench``: the device report, or with ``--compile`` / ``--pipeline`` a script."""
    for flag in BENCH_SCRIPTS:
        if flag in argv:
            return _run_bench_script(flag, [a for a in argv if a != flag])
    from grood._bench.report import main as report_main

    return report_main(argv, prog="grood bench")


def _run_bench_script(flag: str, argv: list[str]) -> int:
    """Run ``bench/<script>.py`` of the source checkout with ``argv``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{BENCH_SCRIPTS[flag]}.py"
    if not path.exists():
        print(f"grood bench {flag}: error: {path} not found; this command runs the benchmark "
              "scripts of a source checkout (git clone, then pip install -e .)", file=sys.stderr)
        return 2
    if flag == "--compile":  # compiles for a GPU target: never through the interpreter
        os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"grood_bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _warning_printer(prog: str) -> Any:
    """``warnings.showwarning`` for a command: one line per warning on stderr, named by the
    command as its errors are, instead of Python's source path and line of grood's code."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        print(f"{prog}: warning{kind}: {message}", file=sys.stderr if file is None else file)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grood`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if hasattr(args, "device"):
        args.device = resolved_device(args.device)
    try:
        with warnings.catch_warnings():  # (restores the caller's warning display after)
            warnings.showwarning = _warning_printer(f"grood {args.command}")
            return args.func(args)
    except DetectorFileError as exc:  # a file to replace, not an option to change
        print(f"grood {args.command}: error: unusable detector file: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, RuntimeError, MissingExtraError) as exc:
        print(f"grood {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (detectors, scores and
        # metrics are written atomically: none is left half-written)
        print(f"\ngrood {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "distributed", False):
            import torch.distributed as tdist

            if tdist.is_initialized():  # leave the group cleanly before the process exits
                tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
