"""Where the OOD prototype comes from.

``GROOD(ood_prototype=...)`` takes either the name of a registered source or a source object
with its own parameters. A source declares what it ``needs`` from the caller (for example
``ood_features``); the detector checks that before building, so a missing input is reported by
name instead of failing inside the source. New sources (for example ones that need the model)
register a name with :func:`register_source` and plug in without any change to ``GROOD``.

Sources available here:

* ``"mean"`` (:class:`MeanOfClassPrototypes`): the mean of the class prototypes. Needs no OOD
  data, and at least two classes.
* ``"features"`` (:class:`OODFeatureMean`): the mean of user-given OOD features
  (``fit(..., ood_features=X)``), the way OpenOOD's shipped configuration uses a validation OOD
  set.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from grood._checks import as_tensor, batches, check_finite_rows, check_matrix, did_you_mean
from grood._params import init_parameters


@dataclass
class PrototypeContext:
    """What a source may use to build the OOD prototype.

    Attributes:
        class_prototypes (Tensor): class prototypes, shape [C, D], in the detector's dtype.
        inputs (dict): caller-supplied inputs by name (e.g. ``ood_features``); a source reads
            only the names in its ``needs``.
        batch_size (int): rows per batch when a source streams data.
        reduce (callable): sums a tensor over all processes (the identity in one process); a
            source that averages data of its own applies it to its sums and counts, so every
            rank of a distributed fit builds the same prototype.
        records (dict): where a source may leave tensors the detector keeps with its
            prototype (``"ood_fingerprints"``: :func:`fingerprint_rows` of the rows averaged).
        gather (callable): every process's rows of a tensor, in rank order (the tensor itself
            in one process), for records built from rank-local data.
        together (callable): ``with ctx.together("what it does"):`` around a source's
            rank-local work before a ``reduce`` (a pass over its inputs or a loader): where it
            raises on one rank of a distributed fit, every rank raises (that rank its own
            error, the others :class:`grood.errors.RankFailedError`) instead of the others
            waiting in the ``reduce`` (see :func:`grood.distributed.together`); nothing in one
            process.
    """

    class_prototypes: Tensor
    inputs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4096
    reduce: Callable[[Tensor], Tensor] = lambda t: t
    together: Callable[[str], AbstractContextManager] = lambda what: nullcontext()
    records: dict[str, Tensor] = field(default_factory=dict)
    gather: Callable[[Tensor], Tensor] = lambda t: t


class OODPrototypeSource(ABC):
    """A way of making the OOD prototype ``p_o``, shape [D]."""

    #: Registry name, used in ``GROOD(ood_prototype=name)`` and in saved files.
    name: ClassVar[str]
    #: Names of the inputs ``build`` requires in ``PrototypeContext.inputs``.
    needs: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, saved with the detector."""
        return {}

    def _arguments(self) -> tuple[dict[str, Any], list[str]]:
        """Constructor arguments found (the attribute of each name, else :meth:`params`),
        and the names of those found in neither."""
        found: dict[str, Any] = {}
        missing = []
        saved = self.params()
        for name in init_parameters(type(self))[0]:
            if hasattr(self, name):
                found[name] = getattr(self, name)
            elif name in saved:
                found[name] = saved[name]
            else:
                missing.append(name)
        return found, missing

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments by name, as scikit-learn reads them: ``GROOD.get_params()``
        lists them as ``ood_prototype__<name>``, ``set_params`` and grid searches set them,
        and ``sklearn.base.clone`` rebuilds the source from them. Each is read from the
        attribute of its name, else from :meth:`params` (arguments kept in neither are not
        listed, and such a source cannot be given new arguments)."""
        return self._arguments()[0]

    def set_params(self, **params: Any) -> OODPrototypeSource:
        """Set constructor arguments by name, checked as the constructor checks them (the
        source is rebuilt from all its arguments); unknown names raise ``ValueError``."""
        current, missing = self._arguments()
        if missing:
            raise TypeError(f"{type(self).__name__} keeps its constructor argument(s) "
                            f"{', '.join(missing)} neither as attributes of the same name nor "
                            "in params(), so it cannot be rebuilt with new arguments")
        unknown = sorted(set(params) - set(current))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter {unknown[0]!r}"
                             f"{did_you_mean(unknown[0], current)}; valid: "
                             f"{', '.join(current) or 'none'}")
        self.__dict__.update(type(self)(**{**current, **params}).__dict__)
        return self

    def __sklearn_clone__(self) -> OODPrototypeSource:
        """A new source from copies of this one's arguments (``sklearn.base.clone``; the
        constructors check and normalise their arguments, which clone's default refuses); a
        deep copy when the arguments cannot all be read back."""
        args, missing = self._arguments()
        return copy.deepcopy(self) if missing else type(self)(**copy.deepcopy(args))

    @abstractmethod
    def build(self, ctx: PrototypeContext) -> Tensor:
        """Return the OOD prototype, shape [D], dtype and device of ``ctx.class_prototypes``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


SOURCES: dict[str, type[OODPrototypeSource]] = {}


def register_source(cls: type[OODPrototypeSource]) -> type[OODPrototypeSource]:
    """Class decorator that makes a source available by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, OODPrototypeSource)):
        raise TypeError(f"register_source takes an OODPrototypeSource subclass, got {cls!r}")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty string 'name'")
    if cls.name in SOURCES and SOURCES[cls.name] is not cls:
        raise ValueError(f"an OOD prototype source named {cls.name!r} is already registered")
    SOURCES[cls.name] = cls
    return cls


def resolve_source(spec: str | OODPrototypeSource) -> OODPrototypeSource:
    """Turn ``GROOD``'s ``ood_prototype`` argument into a source object."""
    if isinstance(spec, OODPrototypeSource):
        return spec
    if isinstance(spec, str):
        if spec not in SOURCES:
            raise ValueError(
                f"unknown ood_prototype {spec!r}; available: {', '.join(sorted(SOURCES))}"
            )
        return SOURCES[spec]()
    raise TypeError(
        "ood_prototype must be a source name or an OODPrototypeSource, "
        f"got {type(spec).__name__}"
    )


def source_from_config(name: str, params: dict[str, Any]) -> OODPrototypeSource:
    """Rebuild a source from the name and parameters stored in a saved detector."""
    if name not in SOURCES:
        raise ValueError(f"saved detector uses unknown OOD prototype source {name!r}")
    return SOURCES[name](**params)


@register_source
class MeanOfClassPrototypes(OODPrototypeSource):
    """The mean of the class prototypes: a point "between" all classes, no OOD data needed."""

    name = "mean"

    def build(self, ctx: PrototypeContext) -> Tensor:
        protos = ctx.class_prototypes
        if protos.shape[0] < 2:
            # The mean of one prototype is that prototype: the softmax would weigh the class
            # and the OOD prototype equally for every sample (q_ood = 1/2), not GROOD.
            raise ValueError(
                "the 'mean' OOD prototype needs at least two classes: with one class it is "
                "that class's prototype itself; give OOD features (ood_prototype='features', "
                "fit(..., ood_features=X)) or another OOD prototype source")
        return protos.to(torch.float64).mean(0).to(protos.dtype)


@register_source
class OODFeatureMean(OODPrototypeSource):
    """The mean of user-given OOD features, streamed in batches with a float64 sum. It also
    leaves each row's fingerprint in ``ctx.records`` (every rank's, in rank order, in a
    distributed fit), so that an evaluation can tell the rows the detector was shaped on
    (:func:`fingerprint_matches`)."""

    name = "features"
    needs = ("ood_features",)

    def build(self, ctx: PrototypeContext) -> Tensor:
        protos = ctx.class_prototypes
        with ctx.together("averaging its ood_features"):
            x, _ = as_tensor(ctx.inputs["ood_features"], "ood_features")
            # One rank's share may be empty; the count over every rank is checked below.
            check_matrix(x, "ood_features", n_cols=protos.shape[1], allow_empty=True,
                         cols_from="the training features have {}")
            total = torch.zeros(protos.shape[1], dtype=torch.float64, device=protos.device)
            prints = []
            for r0, r1 in batches(x.shape[0], ctx.batch_size):
                chunk = x[r0:r1].to(protos.device)
                check_finite_rows(chunk, "ood_features", row_offset=r0)
                total += chunk.to(torch.float64).sum(0)
                prints.append(fingerprint_rows(chunk))
        count = ctx.reduce(torch.tensor([float(x.shape[0])], dtype=torch.float64,
                                        device=protos.device))
        if not int(count):  # (the same on every rank)
            raise ValueError("ood_features is empty: it has no rows"
                             + ("" if int(ctx.reduce(torch.ones(1))) == 1 else " on any rank"))
        ctx.records["ood_fingerprints"] = ctx.gather(
            torch.cat(prints) if prints else fingerprint_rows(x[:0]))
        return (ctx.reduce(total) / count).to(protos.dtype)


#: Columns of a row's fingerprint (:func:`fingerprint_rows`).
FINGERPRINT_DIMS = 16
#: How near (relative to its length) a row's fingerprint must lie to a recorded one to match.
FINGERPRINT_TOLERANCE = 1e-2
_FINGERPRINT_SEED = 20231222


def _fingerprint_directions(d: int) -> Tensor:
    """The fixed random directions [d, FINGERPRINT_DIMS] (float64, CPU) rows are projected on:
    the same in every grood (numpy's ``RandomState`` streams never change), so fingerprints
    saved with a detector compare with ones made later."""
    import numpy as np

    rng = np.random.RandomState(_FINGERPRINT_SEED)
    return torch.from_numpy(rng.standard_normal((d, FINGERPRINT_DIMS)))


def fingerprint_rows(x: Tensor, batch_size: int = 4096) -> Tensor:
    """Each row's fingerprint: the row projected on ``FINGERPRINT_DIMS`` fixed random
    directions, in float64 [N, FINGERPRINT_DIMS] on the CPU (128 bytes a row). Rows that are
    equal, or equal but for rounding, get nearly equal fingerprints; rows far apart, far apart
    ones (:func:`fingerprint_matches` compares them)."""
    directions = _fingerprint_directions(x.shape[1]).to(x.device)
    out = torch.empty((x.shape[0], FINGERPRINT_DIMS), dtype=torch.float64)
    for r0, r1 in batches(x.shape[0], batch_size):
        out[r0:r1] = (x[r0:r1].to(torch.float64) @ directions).cpu()
    return out


def fingerprint_matches(recorded: Tensor, x: Tensor, centre: Tensor,
                        batch_size: int = 4096, prints: Tensor | None = None) -> Tensor:
    """Which rows of ``x`` repeat a row whose fingerprint is in ``recorded``
    (:func:`fingerprint_rows`): bool [N] on the CPU, true where the row's fingerprint lies
    within ``FINGERPRINT_TOLERANCE`` of the length of its offset from ``centre``'s (the OOD
    prototype's) of a recorded one, by an exact float64 search. A rounded copy (float16, a
    re-extraction's last bits) matches; rows as far apart as two different images' features
    are, relative to their distance from ``centre``, do not.

    A match lies within that radius in every coordinate, so with both sides sorted by the
    first one, each block of rows is searched only against the recorded rows whose first
    coordinate comes within its radius of the block's span (a few percent of them for two
    unrelated sets, all of them at worst); the answer is the full search's. ``prints``:
    ``x``'s fingerprints where they are made already (one set checked against several
    records)."""
    from grood.functional import knn

    origin = fingerprint_rows(centre[None])  # (offsets from it: no cancellation below)
    mine = (fingerprint_rows(x, batch_size) if prints is None else prints) - origin
    theirs = recorded.to(torch.float64) - origin
    out = torch.zeros(x.shape[0], dtype=torch.bool)
    finite = mine.isfinite().all(1).nonzero()[:, 0]  # (a NaN row repeats nothing)
    if theirs.shape[0] == 0 or finite.numel() == 0:
        return out
    first, order = theirs[:, 0].sort()
    theirs = theirs[order]
    sq = mine.square().sum(1)
    rows = finite[mine[finite, 0].argsort()]
    reach = FINGERPRINT_TOLERANCE * sq.sqrt()
    for r0, r1 in batches(rows.numel(), 1024):
        block = rows[r0:r1]
        span = float(reach[block].max())
        lo = int(torch.searchsorted(first, float(mine[block[0], 0]) - span, side="left"))
        hi = int(torch.searchsorted(first, float(mine[block[-1], 0]) + span, side="right"))
        if lo < hi:
            dist, _ = knn(mine[block], theirs[lo:hi], 1)
            out[block] = dist[:, 0] <= FINGERPRINT_TOLERANCE ** 2 * sq[block]
    return out
