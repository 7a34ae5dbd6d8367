"""The fit itself: class prototypes, the OOD prototype and the gradient index from two passes.

:class:`grood.detector.GROOD` turns its inputs (arrays, batches, a model) into passes over the
training set and sets the :class:`FittedState` this returns; detector files
(:mod:`grood.persistence`) build the same state from what they hold.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grood import distributed as dist
from grood import ops
from grood._batches import check_batch
from grood._checks import (
    as_labels,
    as_tensor,
    check_class_count,
    check_labels,
    check_matrix,
    compute_dtype,
    ordinary,
    user_stacklevel,
)
from grood._gradients import GradientStep, tiny_gradient_norm
from grood.functional import PrototypeState, class_prototypes
from grood.index import (
    STORAGE_CHUNK_ROWS,
    ExactIndex,
    GradientIndex,
    make_index,
    spread_share,
)
from grood.prototypes import OODPrototypeSource, PrototypeContext


@dataclass
class FittedState:
    """Everything a fit learns (or a detector file holds), set on a detector in one step."""

    class_prototypes: Tensor  # [C, D]
    class_counts: Tensor  # [C]
    ood_prototype: Tensor  # [D]
    source: OODPrototypeSource
    index: GradientIndex
    backend: dict[str, str]
    device: torch.device
    n_train: int
    train_accuracy: float
    shard_sizes: list[int] | None = None  # every rank's index size; None: [index.ntotal]
    extractor: dict[str, Any] | None = None  # fit_model's feature settings
    # The training-row number of each indexed gradient (int64 [index.ntotal], in index order;
    # None: not known, see :func:`indexed_rows`).
    indexed_rows: Tensor | None = None
    # Fingerprints of the rows the OOD prototype was averaged from (float64 [M, 16], on the
    # CPU; :func:`grood.prototypes.fingerprint_rows`); None where the source keeps none.
    ood_fingerprints: Tensor | None = None
    # The column names of the table fitted on (see :mod:`grood._columns`); None: none.
    feature_names: tuple[str, ...] | None = None


def training_arrays(features: Any, labels: Any, logits: Any, allow_empty: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``fit``'s arrays as checked tensor views: features [N, D], labels [N] (in range of the
    logits' width when given), logits [N, C] or None. ``allow_empty``: N may be 0 (one rank's
    shard of a distributed fit; the union is checked to have rows)."""
    x, _ = as_tensor(features, "features")
    check_matrix(x, "features", allow_empty=allow_empty)
    y = as_labels(labels)
    lg = None
    if logits is not None:
        lg, _ = as_tensor(logits, "logits")
        check_matrix(lg, "logits", allow_empty=allow_empty)
        if lg.shape[0] != x.shape[0]:
            raise ValueError(f"logits has {lg.shape[0]} rows but features have {x.shape[0]}")
    check_labels(y, "labels", x.shape[0], n_classes=None if lg is None else lg.shape[1],
                 n_classes_from="the logits' columns", allow_empty=allow_empty)
    return x, y, lg


def distributing(det: Any) -> bool:
    """Whether ``det`` fits with other ranks (asked to, and a process group exists; without
    one, its parameter check says so)."""
    return bool(det.distributed) and dist.is_initialized()


def check_ranks_agree(det: Any, source: OODPrototypeSource, features: Tensor,
                      logits: Tensor | None, n_classes: int | None = None) -> None:
    """In a distributed fit, refuse ranks whose settings or feature layout differ (the
    collectives that follow would abort or hang on mismatched shapes), on every rank."""
    if det.distributed:
        fields = {
            "feature dimension": features.shape[1],
            "feature dtype": str(compute_dtype(features.dtype)).removeprefix("torch."),
            "logit columns": None if logits is None else logits.shape[1],
            "n_classes": n_classes,
            "ood_prototype": {"name": source.name, "params": source.params()},
            **{name: getattr(det, name) for name in ("k", "index", "index_options",
                                                     "precision", "backend")}}
        dist.check_agree(dist.gather_json(fields), fields, "fit")


def _class_sums(xb: Tensor, yb: Tensor, n_classes: int, state: PrototypeState | None
                ) -> PrototypeState:
    """The class sums and counts with one more batch; the first batch allocates them, and a
    class count too large for the device (an ``n_classes`` given with a stray digit, logits
    of another model) is named there instead of by the allocator."""
    try:
        return class_prototypes(xb, yb, n_classes, state=state, in_place=True)
    except RuntimeError as exc:  # (torch.OutOfMemoryError too)
        if state is not None or "allocate" not in str(exc):
            raise
        size = n_classes * xb.shape[1] * 8
        raise ValueError(f"{n_classes:,} classes (n_classes, else the logits' width or the "
                         f"largest label + 1): their float64 class sums ({n_classes:,} x "
                         f"{xb.shape[1]}, {size / 2**30:,.1f} GiB) cannot be allocated on "
                         f"{xb.device}; check the class count") from None


def class_count(n_classes: int, n_rows: int, distributed: bool) -> int:
    """The class count from the labels (every rank's largest, when distributed), checked to
    leave no class without samples."""
    if distributed:  # every rank needs the same class count
        n_classes = int(dist.all_reduce(torch.tensor([n_classes]), "max"))
        n_rows = int(dist.all_reduce(torch.tensor([n_rows])))
    if n_rows == 0:
        raise ValueError("the training data is empty: every batch has 0 rows")
    check_class_count(n_classes - 1, n_rows)
    return n_classes


def check_inputs(source: OODPrototypeSource, inputs: dict[str, Any], where: str) -> None:
    """Every input the source ``needs`` is given, and nothing it does not use."""
    missing = [name for name in source.needs if name not in inputs]
    if missing:
        hint = ("; it runs the model (synthetic inputs through it): fit with "
                "fit_model(model, train_loader, ...), or give fit_batches "
                "source_inputs={'model': model}" if "model" in missing else "")
        raise ValueError(f"ood_prototype={source.name!r} needs {', '.join(missing)} in "
                         f"{where}{hint}")
    unused = [name for name in inputs if name not in source.needs]
    if unused:
        raise ValueError(f"{', '.join(unused)} given to {where} but ood_prototype="
                         f"{source.name!r} does not use it")


def check_same_passes(n_first: int, counts_first: Tensor, n_second: int,
                      seen_second: Tensor) -> None:
    """Fitting reads the training batches twice (class prototypes, then gradients): both
    passes must give the same rows. Row counts and per-class label counts are compared (one
    host read at the end); a loader that shuffles with ``drop_last``, resamples or yields
    another split fails here, instead of prototypes and index coming from different data."""
    counts_second = seen_second[1:].cpu()
    if n_first == n_second and int(seen_second[0]) == 0 and torch.equal(
            counts_first.cpu(), counts_second):
        return
    differ = (counts_first.cpu() != counts_second).nonzero().flatten()[:5].tolist()
    detail = (f"; labels outside 0..{counts_first.numel() - 1}: {int(seen_second[0])}"
              if int(seen_second[0]) else "")
    raise ValueError(
        f"the training batches changed between fitting's two passes: {n_first} rows in the "
        f"class-prototype pass, {n_second} in the gradient pass (per-class counts differ for "
        f"classes {differ}{detail}). Fitting reads the batches twice and needs the same rows "
        "both times: use a loader without drop_last-with-shuffle, resampling or augmentation")


#: What logits that get few training rows right (against the nearest prototype) suggest.
CLASS_ORDER_HINT = ("are the logits' columns in the labels' class order, and the model trained "
                    "on these classes?")


def check_logits_agree(by_logits: float, by_prototype: float) -> None:
    """Warn when the logits get far fewer training rows right than the nearest class
    prototype does: logits whose columns follow another class order than the labels (another
    label map, a subset of the classes renumbered) would otherwise index an arbitrary sample
    of the training set, and every score would silently follow it."""
    if by_logits < 0.5 * by_prototype:
        warnings.warn(
            f"the logits classify {100 * by_logits:.1f} % of the training rows correctly, "
            f"their nearest class prototype {100 * by_prototype:.1f} %: {CLASS_ORDER_HINT} "
            "GROOD indexes only the rows the logits get right", UserWarning,
            stacklevel=user_stacklevel())


def chance_share(accuracy: float, counts: Any, n: int) -> float | None:
    """The largest class's share of ``n`` labelled rows (``counts`` per class) where
    ``accuracy`` is hardly above it (at most 1.5 times): what labels unrelated to the features
    give, however the predictions fall. None otherwise, and where it cannot tell: under three
    classes (a chance level of a half leaves no room) or under 20 rows per class (chance alone
    moves the count that far)."""
    largest = float(counts.max()) / n
    if len(counts) >= 3 and n >= 20 * len(counts) and accuracy <= 1.5 * largest:
        return largest
    return None


def check_labels_informative(by_prototype: float, counts: Tensor, n: int) -> None:
    """Warn when the nearest class prototype gets hardly more training rows right than labels
    unrelated to the features would (:func:`chance_share`): features and labels read in
    different orders (a shuffled loader for one of them, another split) give class prototypes
    near the overall mean and an index of a chance sample of the rows, and every score would
    follow that noise without a sign."""
    largest = chance_share(by_prototype, counts, n)
    if largest is not None:
        warnings.warn(
            f"the nearest class prototype classifies {100 * by_prototype:.1f} % of the "
            f"training rows correctly, about what labels unrelated to the features give (the "
            f"largest class holds {100 * largest:.1f} % of the rows): are the labels in the "
            "order of the feature rows (not from a shuffled loader or another split)?",
            UserWarning, stacklevel=user_stacklevel())


#: How many classes without an indexed row :func:`check_classes_indexed` names by number.
NAMED_CLASSES = 10


def check_classes_indexed(indexed: Tensor, counts: Tensor, protos: Tensor,
                          with_logits: bool) -> None:
    """Warn where a class has training rows but no indexed gradient (``indexed`` [C], each
    class's indexed rows; ``counts`` [C], its training rows): none of its rows was classified
    as it (by the logits, or by the nearest class prototype without them), so its samples
    are scored as OOD samples are, by their distance to other classes' gradients only (a
    class the logits never predict fell from an AUROC of 0.98 to 0.59 against Gaussian OOD
    rows, the other classes' staying at 0.96), without a sign. Without logits, each named class's
    nearest other prototype is named too (a class whose prototype coincides with another's,
    rows of one class under two labels, is never nearest: ties go to the first)."""
    empty = ((indexed == 0) & (counts > 0)).nonzero()[:, 0].tolist()
    if not empty:
        return
    named, one = empty[:NAMED_CLASSES], len(empty) == 1
    more = f" and {len(empty) - len(named):,} more" if len(empty) > len(named) else ""
    which = (f"class {named[0]} holds" if one else f"classes {', '.join(map(str, named))}"
             f"{more} ({len(empty):,} of {counts.numel():,} classes) hold")
    their = "its" if one else "their"
    if with_logits:
        why = f"the logits classify none of {their} rows as {their} class"
        fix = ("are the logits' columns in the labels' class order, and does the model "
               f"predict {'this class' if one else 'these classes'}?")
    else:
        p64 = protos.double()
        nearest = []
        for c in named:
            apart = (p64 - p64[c]).norm(dim=1)
            apart[c] = float("inf")
            other = int(apart.argmin())
            nearest.append(f"class {c}: class {other}'s, {float(apart[other]):.3g} away")
        why = (f"none of {their} rows lies nearest {their} own class prototype (the nearest "
               f"other prototype of {'; '.join(nearest)})")
        fix = (f"are {'this class' if one else 'these classes'}'s rows another class's under a "
               "second label, or the labels in another order than the features?")
    warnings.warn(
        f"{which} {int(counts[empty].sum()):,} training rows but no indexed gradient: {why}, "
        f"so {their} samples are scored as OOD samples are, by their distance to other "
        f"classes' gradients only; {fix}", UserWarning, stacklevel=user_stacklevel())


def warn_narrowed(row: int) -> None:
    """Warn that a float64 batch (its first row ``row``) of a fit whose first batch is
    float32 (or narrower) is computed in float32: the detector takes the first batch's compute
    dtype, so a stream of mixed dtypes would otherwise lose the later batches' digits without a
    word."""
    warnings.warn(
        f"the training batch at row {row:,} is float64 and the first batch is not: the "
        "detector computes in float32, the first batch's precision, and rounds the float64 "
        "batches to it; give every batch in float64 (e.g. x.double()) for a float64 detector, "
        "or in float32 to silence this", UserWarning, stacklevel=user_stacklevel())


#: How near a class prototype (relative to the distance between the nearest two class
#: prototypes) the OOD prototype may lie before the fit warns that it coincides with it.
COINCIDENT_PROTOTYPES = 1e-3


def check_ood_prototype_apart(protos: Tensor, p_ood: Tensor, source: str) -> None:
    """Warn where the OOD prototype coincides with a class prototype (OOD features that are
    that class's rows, say): GROOD then cannot tell that class from OOD, and its samples
    score as OOD as the OOD samples, without a sign. Coinciding: nearer than
    :data:`COINCIDENT_PROTOTYPES` times the distance between the nearest two class prototypes
    (one class: its prototype's norm).

    The distance from the OOD prototype's nearest class to the class nearest that one bounds
    the nearest two's distance from above: where the OOD prototype lies farther than the
    threshold on that bound, it lies farther than on the nearest two's too, and the C x C
    distances are not computed (``torch.pdist`` over 21,841 prototypes of 512 features took
    19 s on 2 CPU cores, half of the fit). They are where the bound does not settle it."""
    p64, o64 = protos.double(), p_ood.double()
    to_ood = (p64 - o64).norm(dim=1)
    nearest = int(to_ood.argmin())
    if protos.shape[0] > 1:
        beside_nearest = (p64 - p64[nearest]).norm(dim=1)
        beside_nearest[nearest] = float("inf")
        if float(to_ood[nearest]) > COINCIDENT_PROTOTYPES * float(beside_nearest.min()):
            return
        scale = float(torch.pdist(p64).min())
        beside = f"the nearest two class prototypes lie {scale:.3g} apart"
    else:
        scale = float(p64.norm())
        beside = f"the class prototype's norm is {scale:.3g}"
    if float(to_ood[nearest]) <= COINCIDENT_PROTOTYPES * scale:
        warnings.warn(
            f"the OOD prototype (ood_prototype={source!r}) coincides with class {nearest}'s "
            f"prototype (distance {float(to_ood[nearest]):.3g}; {beside}): GROOD cannot tell "
            f"class {nearest} from OOD, and its samples score as OOD ones do; are the OOD "
            "features that class's rows?", UserWarning, stacklevel=user_stacklevel())


#: What the fit's resolution warnings advise for float32 (or half-precision) features.
FLOAT64_ADVICE = ("fit and score float64 features (tensor.double(), "
                  "array.astype(np.float64))")
#: What they advise where the index holds float32 gradients whatever the features' dtype.
FAISS_ADVICE = ("a faiss index holds and searches float32 gradients whatever the features' "
                "dtype; grood's exact index (index='exact') holds them in the features' dtype")

#: The share of the indexed gradients whose norm may lie below the square root of the compute
#: dtype's smallest normal number before the fit warns (:func:`check_gradients_resolved`).
TINY_GRADIENT_SHARE = 0.01


def check_gradients_resolved(n_tiny: int, total: int, dtype: torch.dtype,
                             held: torch.dtype | None = None) -> None:
    """Warn where many indexed gradients are too small for the compute dtype's squared
    distances: g = q_ood * (h - p_o) / ||h - p_o||, and q_ood, the OOD prototype's softmax
    share, falls like exp(-distance) as classes lie farther apart than they are wide. Scores
    of samples near such gradients (squared distances below ``dtype``'s smallest normal
    number) lose precision and then tie at 0, whatever their true order: tight, well
    separated float32 features fall from a float64 AUROC of 0.99 to 0.5 without a sign.
    ``held``: the dtype the index holds the gradients in whatever ``dtype`` (a faiss
    index's float32; ``n_tiny`` counted against it), or None."""
    if total and n_tiny >= TINY_GRADIENT_SHARE * total:
        name = str(held or dtype).removeprefix("torch.")
        limit = tiny_gradient_norm(held or dtype)
        fix = (f"{FLOAT64_ADVICE} with index='exact', which resolve them down to q_ood of about "
               f"1e-154 ({FAISS_ADVICE})" if held is not None
               else f"{FLOAT64_ADVICE}, which resolve them down to q_ood of about 1e-154"
               if dtype != torch.float64
               else "float64 resolves no smaller ones: GROOD's scores depend on the "
               "features' scale, and at this one they lie below float64's range")
        warnings.warn(
            f"{n_tiny} of the {total} indexed training gradients ({100 * n_tiny / total:.1f} "
            f"%) have norm q_ood below {limit:.2g} (the OOD prototype's softmax share, tiny "
            f"where classes lie far apart for their width): squared distances between them "
            f"fall below {name}'s range, so the scores of samples like them lose precision "
            f"or tie at 0; {fix}", UserWarning, stacklevel=user_stacklevel())


#: Indexed gradients the fit searches for as themselves, evenly spaced over the index, and
#: the share of them the search may fail to find before the fit warns
#: (:func:`check_search_resolves`).
RESOLUTION_PROBES = 64
UNRESOLVED_SHARE = 0.1
#: The full-precision expansion's error bound (:func:`expansion_error_bound`) as a share of a
#: sampled row's distance to its nearest other row, from which, for half the sampled rows or
#: more, the fit takes an exact index's search for crowded (its candidates picked from rows
#: that the expansion's rounding may misorder) and holds it less the gradients' mean where
#: that clears it (:func:`check_search_resolves`). On a trained network's gradients the median
#: share is 7.6e-4; the far-prototype features reach 0.1 at a distance/spread of 56.
CROWDED_SHARE = 0.1
#: The spread of the indexed gradients about their mean, relative to their norm, in units of
#: the compute dtype's machine epsilon, below which the fit warns that the gradient step's
#: own rounding blurs them (:func:`check_gradients_spread`): in float32 about 4.8e-4, where
#: scores stray by some 1 % of their spread from float64's on the same inputs.
SPREAD_LIMIT_EPS = 4000


def probe_ids(n: int) -> Tensor:
    """The ``RESOLUTION_PROBES`` (at most ``n``) indexed rows the check searches for as
    themselves, evenly spaced over an index of ``n`` rows (int64)."""
    return torch.linspace(0, n - 1, min(RESOLUTION_PROBES, n)).round().long().unique()


def spread_limit(dtype: torch.dtype) -> float:
    """The gradients' spread about their mean, relative to their norm, below which
    ``dtype``'s rounding of each is a sizeable part of the distances between them
    (``SPREAD_LIMIT_EPS`` epsilons: :func:`check_gradients_spread`)."""
    return SPREAD_LIMIT_EPS * torch.finfo(dtype).eps


def check_search_resolves(index: GradientIndex, dtype: torch.dtype, precision: str,
                          device: torch.device, distributed: bool = False,
                          spread: bool = True, in_place: bool = True) -> None:
    """Centre the index, or warn, where the search cannot tell the indexed gradients apart.
    It picks candidates by ``||q||^2 + ||x||^2 - 2 q.x``, whose rounding grows with the
    gradients' norms; where they all point nearly the same way (an OOD prototype far outside
    the training features for their width) they lie closer together than that rounding, the
    search returns other rows than the nearest, and the scores follow them without a sign
    (README, Numerics). Searching for indexed gradients as themselves shows it: a search that
    resolves them finds each (or an exact copy of it); an exact index that searches a
    half-precision ``storage`` copy is searched on blocks of its rows rounded so, without
    making the copy (:func:`missed_in_blocks`). On a trained network's features none is
    missed. Where 10 % or more are, the same search of them less the gradients' mean,
    which such gradients lie close to, is tried on the rows shifted a block at a time (the
    index unchanged), and where it misses fewer than 10 % an exact index is held so
    (``ExactIndex.centre_on``); otherwise it warns. A search that finds them can still give
    a query between rows its candidates by rounding, where the rows lie within ten times the
    expansion's error bound of each other (:func:`crowded_probes`): where half the sampled
    rows or more do, an exact index is held less the mean too if that leaves fewer than half
    so (no warning where it does not). Where the search resolves them,
    :func:`check_gradients_spread` checks the gradients' own rounding. ``distributed``: each
    rank checks its own shard and the counts, the mean and the sampled rows are reduced over
    the ranks, so that every rank decides alike and every shard is held less the same centre
    (the shards join into one index). ``spread``: check the gradients' spread too (the fit:
    a later check of another precision does not repeat it); ``in_place``: centre the index's
    rows where they are (the fit) or in new memory (``ExactIndex.centre_on``)."""
    if index.centre is not None:  # (a centred index was checked when centred)
        return
    step = "searching its index for some of its rows"
    with dist.together(distributed, step):
        n = index.ntotal
        ids = probe_ids(n)
        held = index.vectors_at(ids)
        if held is None:  # (a kind that cannot give its rows back cheaply)
            return
        exact = index if isinstance(index, ExactIndex) else None
        # (a half-precision copy is not made here: its first search makes it, and warns of it;
        # warn_unresolved does, where the copy loses rows to its range)
        missed, crowding = (0, [0, 0]) if n == 0 else (
            (missed_as_themselves(index, ids, held), [0, 0]) if exact is None
            else probed(exact, ids, held))
    counts = torch.tensor([missed, ids.numel(), *crowding], dtype=torch.float64)
    missed, probes, crowded, measured = (
        int(v) for v in (dist.all_reduce(counts) if distributed else counts))
    if probes == 0:
        return
    unresolved = missed >= UNRESOLVED_SHARE * probes
    if exact is not None and (unresolved or 2 * crowded >= measured > 0):
        mean = exact.vectors_mean(dist.all_reduce if distributed else None)
        if distributed:  # (the same bits on every rank, whatever each summed in: their max)
            mean = dist.all_reduce(mean, "max")
        with dist.together(distributed, step):
            # (where only crowded, held less the mean if that clears it: counted again so)
            centred_missed, centred_crowding = probed(exact, ids, held, mean) if n \
                else (0, [0, 0])
            centred = [centred_missed, *([] if unresolved else centred_crowding)]
        if distributed:
            centred = [int(v) for v in dist.all_reduce(torch.tensor(centred))]
        if centred[0] < UNRESOLVED_SHARE * probes and (unresolved
                                                       or 2 * centred[1] < centred[2]):
            with dist.together(distributed, step):
                exact.centre_on(mean, in_place)
            missed = centred[0]
    if distributed:  # (read before any centring: as queries are)
        held = torch.cat(dist.all_gather_rows(held.to(device)))
    if missed < UNRESOLVED_SHARE * probes:
        if spread:
            check_gradients_spread(held, dtype)
        return
    if exact is not None and exact.storage is not None:
        with dist.together(distributed, "making its index's half-precision copy"):
            exact.copy_lost_rows()  # (warn_unresolved reads it: made here, every rank at once)
    warn_unresolved(index, missed, probes, dtype, precision, device)


def check_search_again(index: GradientIndex, dtype: torch.dtype, precision: str,
                       device: torch.device, sharded: bool, in_place: bool = False) -> None:
    """The fit's check of the search (:func:`check_search_resolves`) for an exact index whose
    search precision changed after the fit or load (``set_params(precision=...)``), or that a
    load or move brings to a device whose search rounds more than the fit's did
    (``grood.index.rounds_past_fp32``: fitted on a CPU in ``tf32``, then searched on a GPU): a
    search the fit found resolved in ``ieee`` can miss in ``bf16`` (from a distance/spread of
    56 on the far-prototype data, scores 130 % of their spread off at 186). An index not yet
    held less a centre is checked as at the fit, and centred where that resolves it (not the
    shard of a multi-rank detector: that would take the other ranks, which need not be
    scoring); otherwise its search is checked as it is held, and warned of. ``in_place``:
    centre the index's rows where they are (an index just loaded or moved, which nothing else
    holds) or in new memory (a head made with ``copy=False`` may hold them)."""
    if not isinstance(index, ExactIndex) or index.ntotal < 2:
        return
    if index.centre is None and not sharded:
        check_search_resolves(index, dtype, precision, device, spread=False,
                              in_place=in_place)
        return
    ids = probe_ids(index.ntotal)
    held = index.vectors_at(ids)
    assert held is not None  # (an exact index gives its rows back)
    missed = missed_in_blocks(index, ids, held)  # (rows and queries as held: one frame)
    if missed >= UNRESOLVED_SHARE * ids.numel():
        warn_unresolved(index, missed, ids.numel(), dtype, precision, device)


def warn_unresolved(index: GradientIndex, missed: int, probes: int, dtype: torch.dtype,
                    precision: str, device: torch.device) -> None:
    """Warn that ``missed`` of ``probes`` indexed gradients searched for as themselves were
    not found (:func:`check_search_resolves`), with the way out for ``index``. Not where the
    half-precision copy the search reads loses as large a share of the rows to its range
    (tight classes' tiny gradients in float16): that copy has warned of them, naming the
    cause and the way out, when it was made (here, if no search had made it yet)."""
    if isinstance(index, ExactIndex) and \
            index.copy_lost_rows() >= UNRESOLVED_SHARE * index.ntotal:
        return
    name = str(index.holds_dtype or dtype).removeprefix("torch.")
    rounding = f"the {name} search's rounding"
    if isinstance(index, ExactIndex) and index.storage is not None:
        # (a copy rounds each row by its precision of the row's norm)
        rounding = f"the search's rounding on the index's {index._storage_name} copy"
        bits = round(math.log2(torch.finfo(index.storage).eps / 2))
        fix = ("fit with index_options storage='bfloat16', whose range holds gradients this "
               "small, or without storage" if index.storage == torch.float16 else
               f"fit without index_options storage (the {index._storage_name} copy rounds "
               f"each gradient by up to 2**{bits} of its norm)") + (
            "; that fit checks its search again")
    elif index.holds_dtype is not None:
        fix = (f"fit with index='exact', which the fit holds less the gradients' mean where "
               f"that resolves them ({FAISS_ADVICE})")
    elif dtype == torch.float64:
        fix = ("float64 resolves them no better here: is the OOD prototype meant to lie that "
               "far from the training features?")
    else:
        fix = f"{FLOAT64_ADVICE}, whose search resolves them"
        # (bf16 operands are rounded on every device; tf32 applies on CUDA only)
        if precision == "bf16" or (precision != "ieee" and device.type == "cuda"):
            fix += f", or precision='ieee' (the {precision} GEMM rounds more)"
    warnings.warn(
        f"searched for as themselves, {missed} of {probes} sampled indexed training "
        f"gradients were not found (another, farther row came back): the gradients lie closer "
        f"together than {rounding} resolves next to their norms, so scores "
        "come from other neighbours than the nearest. They all point nearly the same way, as "
        "where the OOD prototype lies far outside the training features for their width; "
        f"{fix}", UserWarning, stacklevel=user_stacklevel())


def check_gradients_spread(rows: Tensor, dtype: torch.dtype) -> None:
    """Warn where sampled indexed gradients (``rows`` [m, D], unshifted, as queries are) spread
    about their mean by less than ``SPREAD_LIMIT_EPS`` times ``dtype``'s epsilon of their
    norm: a search may resolve them (held less their mean), but the gradient step rounds each
    by about 1e-6 of its norm in float32, a sizeable part of the distances between them, and
    the scores carry it (max 1 % of their spread from float64's at a spread of 4e-4, 6 % at
    4e-5, 80 % at 4e-6). (An index holding them rounded once more, a faiss index's float32
    copy of float64 gradients, adds far less: 8e-6 of the score spread at a spread of 1.2e-4,
    D = 256.)"""
    if rows.shape[0] < 2:
        return
    share = spread_share(rows)
    if share >= spread_limit(dtype):
        return
    if dtype == torch.float64:
        fix = ("float64 resolves them no better: is the OOD prototype meant to lie that far "
               "from the training features?")
    else:
        fix = f"{FLOAT64_ADVICE}, which resolve them"
    name = str(dtype).removeprefix("torch.")
    warnings.warn(
        f"the indexed training gradients spread about their mean by {share:.2g} of "
        f"their norm ({rows.shape[0]} sampled): {name}'s rounding of each gradient is a "
        "sizeable part of the distances between them, so their scores carry it. They all "
        "point nearly the same way, as where the OOD prototype lies far outside the training "
        f"features for their width; {fix}", UserWarning, stacklevel=user_stacklevel())


def missed_as_themselves(index: GradientIndex, ids: Tensor, held: Tensor) -> int:
    """How many of the indexed vectors ``ids`` [m] (rows ``held``: ``index.vectors_at(ids)``)
    a search for them as themselves misses (another row comes back, at a distance above 0),
    for an index not held less a centre."""
    return missed_of(ids, *index.search(held, 1))


def probed(index: ExactIndex, ids: Tensor, held: Tensor, centre: Tensor | None = None
           ) -> tuple[int, list[int]]:
    """:func:`missed_in_blocks` and :func:`crowded_probes` (``[0, 0]`` in an index of one
    row) from one search of the index's rows for their two nearest: one read of the index
    where each would take its own."""
    found = searched_in_blocks(index, held, min(2, index.ntotal), centre)
    return (missed_of(ids, *found),
            [0, 0] if index.ntotal < 2 else crowded_probes(index, ids, held, index.dtype,
                                                           centre, found))


def missed_of(ids: Tensor, dists: Tensor, found: Tensor) -> int:
    """How many of the searches for the indexed rows ``ids`` as themselves found another
    row first (``found[:, 0]``), at a distance above 0 (an exact copy of a row is found)."""
    return int(((found[:, 0].cpu() != ids) & (dists[:, 0].cpu() > 0)).sum())


def missed_in_blocks(index: ExactIndex, ids: Tensor, held: Tensor,
                     centre: Tensor | None = None) -> int:
    """:func:`missed_as_themselves` by the index's own search run on its rows a block at a
    time, the index itself unchanged: with the rows and the queries less ``centre`` where one
    is given (shifted alike, each query is its row exactly, at distance 0), and where the
    index searches a half-precision ``storage`` copy, on each block rounded so, its
    candidates re-ranked on the exact rows, as the index's search does (without making its
    copy)."""
    return missed_of(ids, *searched_in_blocks(index, held, 1, centre))


def searched_in_blocks(index: ExactIndex, held: Tensor, k: int,
                       centre: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest rows of the queries ``held`` [m, D] by the index's own search run on
    its rows a block at a time, as :func:`missed_in_blocks` runs it: ``(distances, rows)``
    [m, k], exact distances (those the search's re-rank computes), ties to the lower row."""
    search = ops.get_op("knn", index.backend)
    queries = held.to(index.device)
    if centre is not None:
        centre = centre.to(index.device)
        queries = queries - centre
    best_d = torch.full((queries.shape[0], k), float("inf"), dtype=queries.dtype,
                        device=index.device)
    best_i = torch.full_like(best_d, -1, dtype=torch.int64)
    for m0 in range(0, index.ntotal, STORAGE_CHUNK_ROWS):
        rows = index.vectors[m0:m0 + STORAGE_CHUNK_ROWS].to(index.device)
        if centre is not None:
            rows = rows - centre
        if index.storage is None:
            d, i = search(queries, rows, k, precision=index.precision)
        else:  # (the copy's rounding picks the candidates, the exact rows rank them)
            d, i = search(queries, rows.to(index.storage), k, precision=index.precision,
                          rerank_database=rows)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.where(i >= 0, i + m0, -1)], 1)
        i = i.where(i >= 0, torch.iinfo(torch.int64).max)  # (none: after every row)
        by_row = torch.sort(i, dim=1, stable=True).indices  # (ties: the lower row)
        order = by_row.gather(1, torch.sort(d.gather(1, by_row), dim=1, stable=True).indices)
        best_d, best_i = d.gather(1, order)[:, :k], i.gather(1, order)[:, :k]
        best_i = best_i.where(best_i != torch.iinfo(torch.int64).max, -1)
    return best_d, best_i


def expansion_error_bound(a_norm: Tensor, b_norm: Tensor, terms: int, r: float = 0.0,
                          unit: float = 2.0 ** -23) -> Tensor:
    """A bound on the error of the search's expansion ``||a||^2 + ||b||^2 - 2 a.b`` for rows
    of norms ``a_norm`` and ``b_norm`` (float64, broadcast together), the host twin of the
    kernels' gate (``grood_kernels._ncp_rerank.gemm_error_sq``): operand rounding ``r`` (2r +
    r^2 of ``sum |a_k b_k| <= |a| |b|``, twice in the distance; 0 in ``ieee``), accumulation
    over the ``terms`` products of the dot and of both squared norms (``gamma = terms unit /
    (1 - terms unit)``, ``unit`` one bit more than rounding: 2**-23 for float32, as tensor
    cores truncate their partial sums), and the three roundings of the sum."""
    gamma = terms * unit / (1 - terms * unit)
    cross = a_norm * b_norm
    total = a_norm ** 2 + b_norm ** 2
    return (2 * ((2 * r + r * r) + gamma * (1 + r) ** 2) * cross + gamma * total
            + 1.5 * unit * (total + 2 * cross))


def crowded_probes(index: ExactIndex, ids: Tensor, held: Tensor, dtype: torch.dtype,
                   centre: Tensor | None = None,
                   found: tuple[Tensor, Tensor] | None = None) -> list[int]:
    """Of the sampled indexed rows ``ids`` (``held``: their rows), how many have their nearest
    other row (found by the index's own search, :func:`searched_in_blocks`, less ``centre``
    where given, with its exact distance) closer than ``1 / CROWDED_SHARE`` times the ieee
    expansion's error bound for the two (:func:`expansion_error_bound`, of the rows less
    ``centre``), and how many rows were measured (those with another row at a distance
    above 0): ``[crowded, measured]``. ``found``: that search's ``(distances, rows)`` [m, 2],
    where already made."""
    d, i = found if found is not None else searched_in_blocks(index, held, 2, centre)
    first_is_self = i[:, 0].cpu() == ids
    other = torch.where(first_is_self, i[:, 1].cpu(), i[:, 0].cpu())
    gap = torch.where(first_is_self, d[:, 1].cpu(), d[:, 0].cpu()).double()
    measured = (other >= 0) & (gap > 0) & torch.isfinite(gap)
    if not bool(measured.any()):
        return [0, 0]
    b = index.vectors_at(other[measured])
    assert b is not None  # (an exact index gives its rows back)
    shift = 0.0 if centre is None else centre.cpu().double()
    a, b = held.cpu().double()[measured] - shift, b.cpu().double() - shift
    bound = expansion_error_bound(a.norm(dim=1), b.norm(dim=1), index.dim,
                                  unit=torch.finfo(dtype).eps)
    return [int((bound >= CROWDED_SHARE * gap[measured]).sum()), int(measured.sum())]


def fit_passes(det: Any, source: OODPrototypeSource, inputs: dict[str, Any],
               passes: Callable[[str], Iterable[tuple[Tensor, Tensor | None, Tensor | None]]], *,
               n_classes: int | None, d: int, device: torch.device, dtype: torch.dtype,
               feature_names: tuple[str, ...] | None = None
               ) -> tuple[FittedState, GradientStep]:
    """What ``det`` learns from two streamed passes over the training set.

    ``det`` gives the parameters (backend, precision, index, k, batch size, distributed).

    ``passes(desc)`` yields ``(features [B, D], labels [B], logits [B, C] or None)``
    batches on ``device``; it is called twice: class prototypes, then the gradient index.
    Without ``n_classes`` it is the width of the first batch's logits. ``feature_names``:
    the column names of the table the features came from (None: none).
    """
    backend = ops.resolve_backends(det.backend, device, dtype, det.precision)
    state, n, with_logits = None, 0, None
    narrowed: int | None = None  # the first row of a float64 batch in a float32 fit
    right = torch.zeros((), dtype=torch.int64, device=device)  # rows the logits get right
    # Each pass is rank-local work: a rank that fails in it stops every rank.
    with dist.together(det.distributed, "reading its training batches (class prototypes)"):
        for xb, yb, lb in passes("grood fit: class prototypes"):
            if n_classes is None:
                if lb is None:
                    raise ValueError("the number of classes is unknown: the model gave no "
                                     "logits")
                n_classes = lb.shape[1]
            with_logits = lb is not None if with_logits is None else with_logits
            yb = check_batch(xb, yb, lb, d, n_classes, n, with_logits)
            if narrowed is None and compute_dtype(xb.dtype) != dtype and dtype != torch.float64:
                narrowed = n
            state = _class_sums(xb, yb, n_classes, state)
            if lb is not None:
                right += (lb.argmax(dim=1) == yb).sum()
            n += xb.shape[0]
        if state is None:
            raise ValueError("the training data is empty")
    if narrowed is not None:
        warn_narrowed(narrowed)
    assert n_classes is not None and with_logits is not None  # (set by the first batch)
    n_local, counts_local = n, state.counts.clone()  # to compare the second pass with
    reduce = dist.all_reduce if det.distributed else (lambda t: t)
    if det.distributed:
        state = PrototypeState(reduce(state.sums), reduce(state.counts))
        n = int(reduce(torch.tensor([n])))
    if n == 0:
        raise ValueError("the training data is empty: every batch has 0 rows")
    try:
        protos = state.prototypes(dtype)
    except ValueError as exc:  # classes without samples: say where the class count came from
        hint = (f"the class count, {n_classes}, is the logits' width: give the logits of the "
                "classes trained on (e.g. logits[:, kept]), with labels numbered in that order"
                if with_logits else "class ids must run from 0 without gaps: renumber the "
                "labels (e.g. np.unique(labels, return_inverse=True)[1])")
        raise ValueError(f"{exc}; {hint}") from None
    records: dict[str, Tensor] = {}
    p_ood = source.build(PrototypeContext(
        protos, inputs, det.batch_size, reduce,
        together=lambda what: dist.together(det.distributed, what), records=records,
        gather=(lambda t: torch.cat(dist.all_gather_rows(t))) if det.distributed else
        (lambda t: t)))
    if p_ood.shape != (d,) or not bool(torch.isfinite(p_ood).all()):
        raise ValueError(f"OOD prototype source {source!r} did not give a finite vector of "
                         f"shape [{d}]")
    check_ood_prototype_apart(protos, p_ood, source.name)
    # Fitted under torch.inference_mode, the prototypes would have no version counter.
    protos, p_ood = ordinary(protos), ordinary(p_ood.to(device=device, dtype=dtype))
    grads = GradientStep(protos, p_ood, backend["ncp_gradient"], det.precision)

    index = make_index(det.index, d, dtype=dtype, device=device, backend=backend["knn"],
                       precision=det.precision, options=det.index_options)
    # Room for this process's rows to be indexed: with logits, exactly the rows they get
    # right (so finishing the index copies nothing); without, every local row (trimmed at
    # the end). Not the all-reduced count: a rank indexes only its own rows.
    index.reserve(int(right) if with_logits else n_local)
    index.expect_training_rows(n)
    offset, kept = 0, []  # kept: each add_where call's mask
    seen = torch.zeros(n_classes + 1, dtype=torch.int64, device=device)  # [0]: out of range
    proto_right = torch.zeros((), dtype=torch.int64, device=device)  # by nearest prototype
    per_class = torch.zeros(n_classes, dtype=torch.int64, device=device)  # indexed, by class
    n_tiny = torch.zeros((), dtype=torch.int64, device=device)  # indexed, norm < the limit
    tiny = tiny_gradient_norm(index.holds_dtype or dtype)  # (dtype: the compute dtype)
    with dist.together(det.distributed, "reading its training batches (gradient index)"):
        for xb, yb, lb in passes("grood fit: gradient index"):
            if yb is None or (lb is not None) != with_logits:  # the first pass checked the rest
                yb = check_batch(xb, yb, lb, d, n_classes, offset, with_logits)
            res = grads.resolved(xb, offset)
            offset += xb.shape[0]
            guess = res.pred if lb is None else lb.argmax(dim=1)
            kept.append(yb == guess)
            index.add_where(res.grad, kept[-1])
            per_class += torch.bincount(yb[kept[-1]].long(), minlength=n_classes)
            n_tiny += (kept[-1] & (res.q_ood < tiny)).sum()
            if lb is not None:
                proto_right += (yb == res.pred).sum()
            known = (yb >= 0) & (yb < n_classes)
            seen += torch.bincount(torch.where(known, yb.long() + 1, 0),
                                   minlength=n_classes + 1)
        check_same_passes(n_local, counts_local, offset, seen)
    shard_sizes = dist.shard_sizes(index.ntotal) if det.distributed else [index.ntotal]
    total = sum(shard_sizes)
    # With logits: how many rows their nearest prototype gets right, to compare.
    by_prototype = int(reduce(proto_right)) / n if with_logits else None
    if total == 0:
        raise ValueError("no training sample is classified correctly, so the gradient index "
                         "would be empty; check that labels match the features/logits"
                         + ("" if not by_prototype else
                            f" (their nearest class prototype gets {100 * by_prototype:.1f} % "
                            f"right: {CLASS_ORDER_HINT})"))
    if det.k > total:
        raise ValueError(f"k={det.k} but only {total} training samples are "
                         "classified correctly and indexed")
    if by_prototype is not None:  # (with logits)
        check_logits_agree(total / n, by_prototype)
    check_labels_informative(total / n if by_prototype is None else by_prototype, state.counts,
                             n)
    check_classes_indexed(reduce(per_class), state.counts, protos, with_logits)
    check_gradients_resolved(int(reduce(n_tiny)), total, dtype, index.holds_dtype)
    rows = indexed_rows(kept, index, n_local, det.distributed, device)
    if index.ntotal:
        index.trim()
    check_search_resolves(index, dtype, det.precision, device, distributed=det.distributed)
    return FittedState(protos, state.counts, p_ood, source, index, backend, device,
                       n_train=n, train_accuracy=total / n, shard_sizes=shard_sizes,
                       indexed_rows=rows, ood_fingerprints=records.get("ood_fingerprints"),
                       feature_names=feature_names), grads


def indexed_rows(kept: list[Tensor], index: GradientIndex, n_local: int, distributed: bool,
                 device: torch.device) -> Tensor | None:
    """The training-row number of every gradient in ``index``, in index order (int64, on
    ``device``), from the masks ``kept`` of its ``add_where`` calls. Rows are
    numbered in the order fit read them; in a distributed fit, every rank's rows follow the
    rows of the ranks before it (the order a manifest's shards are joined in). None where
    the index holds other rows than the calls kept (a registered index that drops rows
    without saying so in ``omitted_calls``)."""
    offset = 0
    if distributed:  # every rank joins, whatever it finds below
        rank, _ = dist.rank_and_world()
        offset = sum(dist.shard_sizes(n_local)[:rank])
    keep = torch.cat(kept).to(device) if kept else torch.zeros(0, dtype=torch.bool,
                                                               device=device)
    if index.omitted_calls:
        keep, ends = keep.clone(), [0, *torch.tensor([m.shape[0] for m in kept]).cumsum(0)]
        for call in index.omitted_calls:
            keep[ends[call]:ends[call + 1]] = False
    rows = keep.nonzero().squeeze(1) + offset
    return rows if rows.numel() == index.ntotal else None
