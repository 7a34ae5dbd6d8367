"""The gradient index: the training gradients GROOD scores against.

Every index implements :class:`GradientIndex` (faiss' ``(D, I)`` contract: squared L2
distances and int64 indices) and is registered by its ``kind`` with :func:`register_index`;
``GROOD(index=kind)``, saved files and the command line find it in the registry. Three kinds
ship with grood:

* ``"exact"`` (:class:`ExactIndex`, the default): exact search by grood's own kernel or its
  torch twin.
* ``"faiss-flat"`` (:class:`FaissFlatIndex`): exact search by ``faiss.IndexFlatL2``.
* ``"faiss-ivf"`` (:class:`FaissIVFIndex`): the reference implementation's approximate
  IVF-Flat search, to reproduce published numbers.

faiss is imported only when a faiss index is built or loaded; it moves to the GPU when the
installed faiss has GPU support and the detector's device is a CUDA device.

:class:`ExactIndex` holds the vectors in one tensor and searches them exactly (squared L2, the
``(D, I)`` contract of faiss) through the backend chosen in :mod:`grood.ops`. Vectors are added
in batches into a buffer that grows geometrically (or is reserved up front when the final size
is known), so building never holds two copies of the index. Squared norms of the vectors are
computed once, at the first search, and reused by every later search.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from grood import ops
from grood._checks import check_finite_rows, check_positive_int, did_you_mean, user_stacklevel
from grood.functional import database_sq_norms_of


class GradientIndex(ABC):
    """What GROOD needs from an index of training gradients.

    A new kind subclasses this, sets ``kind`` (its registry name) and ``option_names`` (the
    ``index_options`` it accepts), implements the abstract methods, and registers itself with
    :func:`register_index`. Then ``GROOD(index=kind)`` fits, scores, saves and loads with it.

    Attributes:
        kind (str): registry name, used in ``GROOD(index=...)`` and in saved files.
        option_names (tuple[str, ...]): names ``index_options`` may hold for this kind.
        joinable (bool): the shards of a multi-rank detector holding this kind can be joined
            into one index in one process: its :meth:`state_dict` is ``{"vectors": [n, D]}``
            and :meth:`from_state_dict` rebuilds it from the rows of every shard in order.
        dim (int): vector dimension D.
    """

    kind: ClassVar[str]
    option_names: ClassVar[tuple[str, ...]] = ()
    #: Whether a search may miss neighbours (visit only part of the index): a detector then
    #: checks that the k-th neighbour was found.
    approximate: ClassVar[bool] = False
    joinable: ClassVar[bool] = False
    #: ``add`` / ``add_where`` calls (numbered from 0) whose rows the index left out on
    #: purpose; a detector names its indexed training rows by the calls it made and this.
    omitted_calls: tuple[int, ...] = ()
    #: A vector [D] the index holds its vectors shifted by and shifts each search's queries
    #: by (distances unchanged); None: none (:meth:`ExactIndex.centre_on`).
    centre: Tensor | None = None
    #: The dtype this kind holds and searches its vectors in whatever the detector's (faiss:
    #: float32); None: the detector's own.
    holds_dtype: ClassVar[torch.dtype | None] = None
    dim: int

    #: Whether :meth:`check_options` makes an empty one-dimensional index on the CPU to check
    #: the options' values (grood's kinds: their constructors check every value, and a faiss
    #: kind imports faiss); a registered kind gets the check of names only, unless it sets it.
    check_by_creating: ClassVar[bool] = False

    @classmethod
    def check_option_names(cls, options: dict[str, Any]) -> None:
        """Refuse ``options`` this kind does not take, by name."""
        unknown = set(options) - set(cls.option_names)
        if unknown:
            names = cls.option_names
            takes = ("no index_options" if not names else f"index_options {names[0]}"
                     if len(names) == 1 else
                     f"index_options {', '.join(names[:-1])} and {names[-1]}")
            raise ValueError(f"index={cls.kind!r} takes {takes}, not {sorted(unknown)}"
                             f"{did_you_mean(sorted(unknown), names)}")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse ``options`` this kind does not take, by name, and with
        :attr:`check_by_creating` values it refuses. A fit calls it before its first pass
        over the data, where :meth:`create` runs after one."""
        cls.check_option_names(options)
        if cls.check_by_creating:  # float64: refuses only what every feature dtype would
            cls.create(1, dtype=torch.float64, device=torch.device("cpu"), backend="torch",
                       precision="ieee", options=options)

    @classmethod
    @abstractmethod
    def create(cls, dim: int, *, dtype: torch.dtype, device: torch.device, backend: str,
               precision: str, options: dict[str, Any]) -> GradientIndex:
        """A new, empty index (``options`` holds only names in ``option_names``)."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: torch.device | str = "cpu",
                        backend: str = "torch", precision: str = "ieee",
                        options: dict[str, Any] | None = None) -> GradientIndex:
        """Rebuild an index from the tensors :meth:`state_dict` gave."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    def reserve(self, capacity: int) -> None:  # noqa: B027 (optional hook)
        """The expected total number of vectors, before the first ``add`` (a hint for
        memory: room for them is made at once)."""

    def expect_training_rows(self, n: int) -> None:  # noqa: B027 (optional hook)
        """The number of training rows the index is built from, correctly classified or not
        (all ranks together), before the first ``add`` (a hint; IVF's reference rule counts
        the training set's batches)."""

    @abstractmethod
    def add(self, x: Tensor) -> None:
        """Append vectors ``x`` [n, D] (copied); their ids continue from ``ntotal``."""

    def add_where(self, x: Tensor, keep: Tensor) -> None:
        """Append the rows of ``x`` [n, D] where ``keep`` (bool [n]) is true, in order."""
        _check_keep(x, keep)
        self.add(x[keep])

    def trim(self) -> None:  # noqa: B027 (optional hook)
        """Finish building: release spare capacity, train what waits for all the data."""

    @abstractmethod
    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """``(D, I)``: squared L2 distances [Q, k] and int64 ids [Q, k] (-1 / inf where
        fewer than k vectors exist), nearest first."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the index, for saving (no pickled objects)."""

    def vectors_at(self, ids: Tensor) -> Tensor | None:
        """The indexed vectors ``ids`` [m] (int64) as the index holds them (less
        :attr:`centre` where one is set), as [m, D] copies, for the fit's check that a search
        finds indexed vectors as themselves (``grood._fit``'s ``check_search_resolves``);
        None where this kind cannot give them back cheaply (the check is then skipped)."""
        return None

    def options(self) -> dict[str, Any]:
        """The ``index_options`` this index was built with (JSON values), saved with a
        detector so that loading rebuilds this index whatever ``index_options`` says by then."""
        return {}

    def set_search_options(self, options: Mapping[str, Any]) -> None:  # noqa: B027 (optional)
        """Apply the entries of ``options`` that only steer searches (IVF's ``nprobe``; a
        missing one goes back to its default): a fitted detector calls this at every score
        with its current ``index_options``; the other options take effect at the next fit."""

    def _check_rows(self, x: Tensor) -> None:
        """Vectors to add, rows numbered from the index's current size in errors. A NaN row
        would never be found (its distances are NaN) and an Inf row found wrongly."""
        self._check_vectors(x, "index vectors", self.ntotal)

    def _check_queries(self, queries: Tensor) -> None:
        """Queries to search: a NaN query would find no neighbour (distance inf, index -1)."""
        self._check_vectors(queries, "queries", 0)

    def _check_vectors(self, x: Tensor, name: str, row_offset: int) -> None:
        self._check_shape(x, name)
        check_finite_rows(x, name, row_offset=row_offset)

    def _check_shape(self, x: Tensor, name: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check_keep(x: Tensor, keep: Tensor) -> None:
    if keep.dtype != torch.bool or tuple(keep.shape) != (x.shape[0],):
        raise ValueError(f"keep must be a bool mask of shape [{x.shape[0]}], got "
                         f"{keep.dtype} {tuple(keep.shape)}")


#: Rows converted at a time when the exact index makes its half-precision copy (bounds the
#: temporary a device-to-device conversion needs).
STORAGE_CHUNK_ROWS = 65536

#: How far (relative to its norm) a row's half-precision copy may lie from the row before it
#: counts as lost: 16 times bfloat16's rounding, 128 times float16's within its normal range.
STORED_ROW_TOLERANCE = 2.0**-5


def spread_share(rows: Tensor, centre: Tensor | None = None) -> float:
    """The RMS distance of ``rows`` [m, D] (plus ``centre``, where given: an index's rows as
    its queries would be) from their mean, over their RMS norm, in float64: near 1 for the
    gradients of a trained network, small where they all point nearly the same way; 1 for
    rows that are all 0."""
    x = rows.double() + (0.0 if centre is None else centre.double())
    size = float(x.square().sum(1).mean().sqrt())
    return float((x - x.mean(0)).square().sum(1).mean().sqrt()) / size if size else 1.0


def stored_rows_lost(stored: Tensor, exact: Tensor) -> Tensor:
    """Rows [M] (bool) whose half-precision copy lies farther than
    :data:`STORED_ROW_TOLERANCE` of their norm from them: float16 keeps its relative precision
    only above 6.1e-5 and flushes below 6e-8, and a GROOD gradient's entries are of order
    q_ood / sqrt(D), which tight classes take far below that."""
    err = torch.linalg.vector_norm(stored.to(exact.dtype) - exact, dim=1)
    return err > STORED_ROW_TOLERANCE * torch.linalg.vector_norm(exact, dim=1)


def warn_lost_rows(lost: int, n: int, storage: str | None,
                   exact: torch.dtype = torch.float32) -> None:
    """Warn where the lower-precision copy the candidate search reads has lost rows: their
    neighbours can be missed (the exact re-rank only orders the candidates found), and the
    scores of the queries near them are wrong. ``exact``: the dtype of the exact rows."""
    if lost:
        held = STORAGE_DTYPES[storage] if storage is not None else torch.float16
        fix = ("storage='bfloat16' (float32's range at the same size) or no storage"
               if exact != torch.float64 else "no storage (a float64 index's gradients this "
               "small lie below the range of every narrower dtype)")
        warnings.warn(
            f"index_options storage={storage!r}: {lost} of the {n} indexed gradients "
            f"({100 * lost / n:.3g} %) lose more than {100 * STORED_ROW_TOLERANCE:.3g} % of "
            f"their norm in that copy ({str(held).removeprefix('torch.')} holds its precision "
            f"only above {torch.finfo(held).tiny:.2g}, and these gradients' entries are "
            "smaller), and the candidate search reads it: their neighbours can be missed and "
            f"the scores near them come out wrong; use {fix}",
            UserWarning, stacklevel=user_stacklevel())

#: More neighbours asked of a candidate search that rounds rows held less their mean (whose
#: re-ranked first ``k`` are kept): see :func:`searched_count`.
CENTRED_EXTRA = 20


def rounds_past_fp32(precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a search in ``precision`` on ``device`` rounds its operands past the features'
    own arithmetic: ``bf16`` on every device (its operands are rounded to bfloat16 values
    everywhere, the CPU's emulation included), ``tf32`` on a CUDA device for features below
    float64 (elsewhere, and for float64 everywhere, it computes in the features' dtype). Where
    it does, a fit's check of the search in another place (a CPU for a GPU) or in another
    precision tells nothing of it (``grood._fit.check_search_again``), and a search of rows
    held less their mean asks for more candidates (:func:`searched_count`)."""
    return precision == "bf16" or (precision == "tf32" and device.type == "cuda"
                                   and dtype != torch.float64)


def searched_count(k: int, n: int, *, stored: bool, centred: bool, precision: str,
                   device: torch.device, dtype: torch.dtype) -> int:
    """How many neighbours a search for ``k`` asks of ``n`` indexed rows (of ``dtype``, on
    ``device``, searched in ``precision``; ``stored``: through a half-precision copy). Rows
    held less their mean are gradients that point nearly the same way (an OOD prototype far
    outside the features), and a candidate search that rounds them (a half-precision copy, or
    a GEMM that :func:`rounds_past_fp32`) rounds each by its precision of its distance from
    the mean, about their spacing: the ``k + RERANK_EXTRA`` candidates it gives the exact
    re-rank then leave out nearer rows (far data at distance/spread 186, k = 3, bfloat16 copy:
    scores 0.08 % of their spread off float64's, where a search of the exact rows is 0.004 %
    off; 0.7 % against 0.1 % at 1,857; the bf16 GEMM alike). ``CENTRED_EXTRA`` more
    candidates, the nearest ``k`` of them kept after the re-rank, find them: the exact rows'
    accuracy at distance/spread 186, 557 and 1,857 for k = 1, 3, 5 and 10 (12 more left
    k = 3 at 557 3.7 times the exact rows' error, and k = 5 at 1,857 1.25 times)."""
    rounded = stored or rounds_past_fp32(precision, device, dtype)
    return min(k + CENTRED_EXTRA, n) if rounded and centred else k


#: Index classes by ``kind``; filled by :func:`register_index`.
INDEXES: dict[str, type[GradientIndex]] = {}


def register_index(cls: type[GradientIndex]) -> type[GradientIndex]:
    """Class decorator: make ``cls`` available as ``GROOD(index=cls.kind)``."""
    if not (isinstance(cls, type) and issubclass(cls, GradientIndex)):
        raise TypeError(f"register_index takes a GradientIndex subclass, got {cls!r}")
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a non-empty string 'kind'")
    if kind in INDEXES and INDEXES[kind] is not cls:
        raise ValueError(f"an index kind {kind!r} is already registered "
                         f"({INDEXES[kind].__name__})")
    INDEXES[kind] = cls
    return cls


def index_kinds() -> tuple[str, ...]:
    """The registered index kinds, in registration order."""
    return tuple(INDEXES)


def index_class(kind: str) -> type[GradientIndex]:
    """The class registered as ``kind``; a clear error naming the known kinds otherwise."""
    if kind not in INDEXES:
        # 'ivf' or 'flat' for the faiss kinds named by their suffix
        meant = [k for k in INDEXES if isinstance(kind, str) and kind
                 and k.endswith(f"-{kind.lower()}")]
        raise ValueError(f"index must be one of {index_kinds()}, got {kind!r}" + (
            f" (for {kind!r} pass {meant[0]!r})" if len(meant) == 1 else ""))
    return INDEXES[kind]


#: ``index_options={"storage": ...}`` of the exact index -> the dtype searched.
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}
EXACT_COPY_PLACES = ("device", "host")


@register_index
class ExactIndex(GradientIndex):
    """Exact nearest-neighbour index over vectors of dimension ``dim``.

    Args:
        dim (int): vector dimension D.
        dtype (torch.dtype): dtype of the exact vectors (and of the search when ``storage``
            is not given).
        device (torch.device | str): where the vectors are searched.
        backend (str): ``"torch"`` or ``"triton"``, already resolved by :mod:`grood.ops`.
        precision (str): precision of the candidate GEMM (distances are exact in every mode;
            see :func:`grood.functional.knn`).
        storage (str, optional): ``"bfloat16"`` / ``"float16"``: search a half-precision copy
            of the vectors (half the bytes streamed per search; in ``precision="bf16"`` it
            goes to the tensor cores as stored). The candidates' distances are still recomputed
            from the exact vectors, so results equal exact search at the index's dtype.
        exact_copy (str): where the exact vectors live when ``storage`` is set: ``"device"``
            (beside the half-precision copy: 1.5x the memory of one copy) or ``"host"`` (pinned
            host memory on a GPU machine: the device holds only the half-precision copy, and
            each search gathers ``k + 4`` rows per query from the host).
    """

    kind = "exact"
    option_names = ("storage", "exact_copy")
    joinable = True
    check_by_creating = True

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", backend: str = "torch",
                 precision: str = "ieee", storage: str | None = None,
                 exact_copy: str = "device") -> None:
        if storage is not None and storage not in STORAGE_DTYPES:
            raise ValueError(f"index_options storage must be one of {sorted(STORAGE_DTYPES)}, "
                             f"got {storage!r}")
        if exact_copy not in EXACT_COPY_PLACES:
            raise ValueError(f"index_options exact_copy must be one of {EXACT_COPY_PLACES}, "
                             f"got {exact_copy!r}")
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self.precision = precision
        self._storage_name = storage
        self.storage = None if storage is None else STORAGE_DTYPES[storage]
        if self.storage == dtype:
            self.storage = None
        self.exact_copy = exact_copy
        # The exact vectors: on the search device, or in host memory when asked.
        self.exact_device = (torch.device("cpu") if self.storage is not None
                             and exact_copy == "host" else self.device)
        self._buf = torch.empty((0, dim), dtype=dtype, device=self.exact_device)
        self._n = 0
        self._sq_norms: Tensor | None = None  # ||x||^2 per vector, cached for searches
        self._stored: Tensor | None = None  # the half-precision copy searched, when asked
        self._stored_lost = 0  # rows that copy lost (stored_rows_lost), counted as it was made

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return self._n

    @property
    def vectors(self) -> Tensor:
        """The indexed (exact) vectors, shape [ntotal, D] (a view; do not modify)."""
        return self._buf[: self._n]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` vectors in total, so later ``add`` calls do not copy."""
        if capacity > self._buf.shape[0]:
            # Outside inference mode: an index filled under torch.inference_mode (a fit there)
            # must take later adds outside it, into the capacity reserved here.
            with torch.inference_mode(False):
                grown = torch.empty((capacity, self.dim), dtype=self.dtype,
                                    device=self.exact_device)
                grown[: self._n] = self._buf[: self._n]
            self._buf = grown

    @classmethod
    def create(cls, dim: int, *, dtype: torch.dtype, device: torch.device, backend: str,
               precision: str, options: dict[str, Any]) -> ExactIndex:
        index = cls(dim, dtype=dtype, device=device, backend=backend, precision=precision,
                    **options)
        if index.exact_copy == "host" and index.storage is None:  # a new fit's options only
            # (a file saved with them still loads): the one copy would stay on the device
            why = ("no storage is given" if index._storage_name is None else
                   f"storage {index._storage_name!r} is the vectors' own dtype")
            raise ValueError(
                "index_options exact_copy='host' keeps the exact vectors in host memory beside "
                f"a lower-precision copy searched on the device, but {why}: give storage="
                "'bfloat16' or 'float16' too, or leave exact_copy out")
        return index

    def add(self, x: Tensor) -> None:
        """Append vectors ``x`` of shape [n, D] (copied into the index)."""
        self._check_rows(x)
        room = self._room(x.shape[0])
        room[...] = x.to(device=self.exact_device, dtype=self.dtype)
        if self.centre is not None:
            room.sub_(self._held_centre())
        self._appended(x.shape[0])

    def add_where(self, x: Tensor, keep: Tensor) -> None:
        """Append the rows of ``x`` where ``keep`` is true, selected straight into the index
        (``x[keep]`` would first make a copy of them: a fresh allocation whose page faults
        cost as much as the copy itself)."""
        self._check_shape(x, "index vectors")
        _check_keep(x, keep)
        if x.dtype != self.dtype or x.device != self.exact_device:
            self.add(x[keep])  # converted on the way in anyway
            return
        rows = keep.nonzero().squeeze(1)
        added = torch.index_select(x, 0, rows, out=self._room(rows.numel()))
        check_finite_rows(added, "index vectors", row_offset=self._n)  # before they count
        if self.centre is not None:
            added.sub_(self._held_centre())
        self._appended(rows.numel())

    def vectors_at(self, ids: Tensor) -> Tensor | None:
        """The exact vectors ``ids`` [m] as held (less :attr:`centre` where one is set), as
        [m, D] copies (where a half-precision copy is searched, of the exact rows)."""
        return self.vectors[ids.to(self.exact_device)]

    def vectors_mean(self, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The mean of the vectors as held [D], summed in float64 over blocks (no float64 copy
        of them all), rounded to the index's dtype. ``reduce``: sums a float64 tensor over the
        shards of a sharded index (an all-reduce), for the mean of them all."""
        total = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.exact_device)
        for m0 in range(0, self._n, STORAGE_CHUNK_ROWS):
            total[:-1] += self.vectors[m0:m0 + STORAGE_CHUNK_ROWS].sum(0, dtype=torch.float64)
        total[-1] = self._n
        if reduce is not None:
            total = reduce(total)
        return (total[:-1] / total[-1].clamp_min(1)).to(self.dtype)

    def centre_on(self, centre: Tensor, in_place: bool = True) -> None:
        """Hold the vectors less ``centre`` [D] (e.g. :meth:`vectors_mean`), and take it from
        each search's queries too.

        Distances do not change, but the rounding of the candidate GEMM's expansion
        ``||q||^2 + ||x||^2 - 2 q.x``, which grows with the squared norms, then grows with
        the vectors' distance from ``centre`` instead: where they all point nearly the same
        way (README, Numerics) the search, held less their mean, tells apart rows that lie
        closer together than the rounding at their norms. Where most vectors are tiny and a
        few large, as the gradients of a trained network, it would do the opposite: a fit
        centres an index only where its check finds the search unresolved and centring
        resolves it (``grood._fit.check_search_resolves``). Each vector is rounded once
        more, to within a rounding of its distance from ``centre``. Rows added later are
        shifted as they come; the shift is saved with the index. A half-precision ``storage``
        copy is made anew from the shifted rows, so it rounds each by its precision of the
        row's distance from ``centre``, not of its norm. Not twice (ValueError). ``in_place``:
        shift the vectors where they are (no second copy), or into new memory, leaving any
        tensor that shares them (a head made with ``copy=False``) as it was."""
        if self.centre is not None:
            raise ValueError("this index is already held less a centre (drop_centre() first)")
        if tuple(centre.shape) != (self.dim,) or not bool(torch.isfinite(centre).all()):
            raise ValueError(f"centre must be a finite vector [{self.dim}], got "
                             f"{tuple(centre.shape)}")
        with torch.inference_mode(False):  # (as the buffer: see reserve)
            self.centre = centre.to(self.device, self.dtype).clone()
            if in_place:
                self.vectors.sub_(self._held_centre())
            else:
                self._buf = self.vectors - self._held_centre()
        self._sq_norms = self._stored = None

    def drop_centre(self) -> None:
        """Hold the vectors unshifted again (each within a rounding of what was added)."""
        if self.centre is None:
            return
        with torch.inference_mode(False):
            self.vectors.add_(self._held_centre())
        self.centre = None
        self._sq_norms = self._stored = None

    def _held_centre(self) -> Tensor:
        """:attr:`centre` where the exact vectors live (host memory for ``exact_copy="host"``;
        queries take it on the search device)."""
        assert self.centre is not None
        return self.centre.to(self.exact_device)

    def _room(self, n: int) -> Tensor:
        """The buffer rows the next ``n`` vectors go to (growing it when they do not fit)."""
        if self._n + n > self._buf.shape[0]:
            self.reserve(max(self._n + n, 2 * self._buf.shape[0]))
        return self._buf[self._n : self._n + n]

    def _appended(self, n: int) -> None:
        """Count ``n`` vectors written to :meth:`_room`; the cached norms and copy are stale."""
        self._n += n
        self._sq_norms = None
        self._stored = None

    def trim(self) -> None:
        """Release unused reserved capacity."""
        if self._buf.shape[0] != self._n:
            with torch.inference_mode(False):  # see reserve
                self._buf = self._buf[: self._n].clone()

    def _searched(self) -> Tensor:
        """The vectors the candidate GEMM reads: the exact ones, or their stored copy."""
        if self.storage is None:
            return self.vectors
        stored = self._stored
        if stored is None:
            # Filled in full before it is published: a thread scoring at the same time must
            # not find a half-written copy (two threads that miss together both make one).
            stored = torch.empty((self._n, self.dim), dtype=self.storage, device=self.device)
            step = STORAGE_CHUNK_ROWS
            lost = torch.zeros((), dtype=torch.int64, device=self.device)
            # Only a copy of a narrower range than the rows' can lose them (bfloat16 has
            # float32's range; float16 has less, and every copy less than float64's).
            narrower = torch.finfo(self.storage).tiny > torch.finfo(self.dtype).tiny
            for m0 in range(0, self._n, step):
                rows = self._buf[m0:min(m0 + step, self._n)]
                if not narrower:
                    stored[m0:m0 + step] = rows.to(self.device, self.storage)
                    continue
                exact = rows.to(self.device)  # (moved once, for the copy and its check)
                stored[m0:m0 + step] = exact.to(self.storage)
                lost += stored_rows_lost(stored[m0:m0 + step], exact).sum()
            warn_lost_rows(int(lost), self._n, self._storage_name, self.dtype)
            self._stored_lost = int(lost)
            if self.exact_device.type == "cpu" and self.device.type == "cuda":
                self._buf = self.vectors.pin_memory()  # fast row gathers for the re-rank
            self._stored = stored
        return stored

    def copy_lost_rows(self) -> int:
        """How many rows the half-precision copy that the search reads has lost to its range
        (:func:`stored_rows_lost`): the copy is made, and warns of them, where no search has
        made it yet. 0 without ``storage``."""
        if self.storage is None:
            return 0
        self._searched()
        return self._stored_lost

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Exact k-NN: ``(D, I)``, squared L2 distances [Q, k] and int64 indices [Q, k]."""
        if self._n == 0:
            raise ValueError("the index is empty")
        self._check_queries(queries)
        searched = self._searched()
        if self._sq_norms is None:
            self._sq_norms = database_sq_norms_of(self.vectors).to(self.device)
        extra = {} if self.storage is None else {"rerank_database": self.vectors}
        # float64 queries are searched in float64 (by the torch implementation).
        wide = queries.dtype == torch.float64 and self.dtype != torch.float64
        queries = queries.to(device=self.device, dtype=torch.float64 if wide else self.dtype)
        if self.centre is not None:
            queries = queries - self.centre
        # (float64 queries of a narrower index are searched in float64, in ieee)
        n = searched_count(k, self._n, stored=self.storage is not None,
                           centred=self.centre is not None,
                           precision="ieee" if wide else self.precision, device=self.device,
                           dtype=self.dtype)
        if wide:
            d, i = ops.get_op("knn", "torch")(queries, searched, n,
                                              database_sq_norms=self._sq_norms.double(), **extra)
        else:
            d, i = ops.get_op("knn", self.backend)(queries, searched, n,
                                                   precision=self.precision,
                                                   database_sq_norms=self._sq_norms, **extra)
        # (contiguous: a shard's results travel between ranks)
        return (d, i) if n == k else (d[:, :k].contiguous(), i[:, :k].contiguous())

    def __repr__(self) -> str:
        storage = "" if self.storage is None else (
            f", storage={str(self.storage).removeprefix('torch.')}, exact copy on "
            f"{self.exact_device}")
        return (f"ExactIndex({self.ntotal} vectors of dimension {self.dim}, "
                f"{str(self.dtype).removeprefix('torch.')}, on {self.device}, backend "
                f"{self.backend}, precision {self.precision}{storage}"
                f"{'' if self.centre is None else ', held less their mean'})")

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the index (for saving): the vectors as held, and the
        :attr:`centre` where one is set."""
        state = {"vectors": self.vectors.contiguous()}
        if self.centre is not None:
            state["centre"] = self.centre
        return state

    def options(self) -> dict[str, Any]:
        return {"storage": self._storage_name, "exact_copy": self.exact_copy}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: torch.device | str = "cpu",
                        backend: str = "torch", precision: str = "ieee",
                        options: dict[str, Any] | None = None, **_: Any) -> ExactIndex:
        """Rebuild an index saved by :meth:`state_dict`."""
        vectors, centre = state["vectors"], state.get("centre")
        index = cls(vectors.shape[1], dtype=vectors.dtype, device=device, backend=backend,
                    precision=precision, **(options or {}))
        if centre is not None:
            if (tuple(centre.shape) != (vectors.shape[1],) or centre.dtype != vectors.dtype
                    or not bool(torch.isfinite(centre).all())):
                name = str(vectors.dtype).removeprefix("torch.")
                raise ValueError(f"the index's centre must be a finite {name} vector "
                                 f"[{vectors.shape[1]}]; got "
                                 f"{str(centre.dtype).removeprefix('torch.')} "
                                 f"{list(centre.shape)}")
            index.centre = centre.to(index.device)
        index._buf = vectors.to(index.exact_device)
        index._n = vectors.shape[0]
        return index


def import_faiss() -> Any:
    """Import faiss, or explain which extra to install."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "this index needs faiss: pip install 'grood[faiss-cpu]', or 'grood[faiss-gpu]' on a "
            "CUDA machine (never both: they install the same module)"
        ) from exc
    return faiss


def faiss_gpu_refusal(faiss: Any) -> str | None:
    """Why the imported ``faiss`` module cannot search on a GPU, and what to do, or None where
    it can: a CPU build (faiss-cpu), or a GPU build that sees no GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return ("the installed faiss is a CPU build (faiss-cpu): for GPU search install "
                "grood[faiss-gpu] in its place (pip uninstall faiss-cpu first: both install "
                "the module faiss)")
    if faiss.get_num_gpus() < 1:
        return ("the installed faiss, a GPU build, sees no GPU (faiss.get_num_gpus() is 0: "
                "its CUDA runtime does not work with this driver, or CUDA_VISIBLE_DEVICES "
                "hides the GPUs from it)")
    return None


def _to_gpu_if_possible(faiss: Any, index: Any, device: torch.device) -> tuple[Any, Any]:
    """Move a faiss index to ``device`` when it is CUDA and faiss can search there; where it
    cannot (:func:`faiss_gpu_refusal`) the index stays in host memory and a warning says so:
    each search then takes the CPU's time, where grood's exact index would run on the GPU.

    Returns ``(index, gpu_resources)``; the caller keeps the resources alive with the index.
    """
    if device.type != "cuda":
        return index, None
    refusal = faiss_gpu_refusal(faiss)
    if refusal is not None:
        warnings.warn(f"this faiss index of a detector on {device} searches on the CPU, in "
                      f"host memory, each query's gradient copied there: {refusal}; or use "
                      "index='exact', grood's own exact search, which runs on the GPU",
                      stacklevel=2)
        return index, None
    resources = faiss.StandardGpuResources()
    # "cuda" is the current device, where torch puts the detector's tensors (each rank's own
    # GPU after torch.cuda.set_device(local_rank)), not GPU 0.
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    return faiss.index_cpu_to_gpu(resources, gpu, index), resources


def _on_gpu(index: Any) -> bool:
    """Whether a faiss index lives on a GPU (faiss' GPU classes are named ``Gpu...``)."""
    return type(index).__name__.startswith("Gpu")


def _to_cpu(faiss: Any, index: Any) -> Any:
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and \
        _on_gpu(index) else index


def _as_float32_rows(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())


class _FaissIndex(GradientIndex):
    """Shared parts of the faiss-backed indexes (float32 vectors, like faiss)."""

    check_by_creating = True
    holds_dtype = torch.float32

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.faiss = import_faiss()
        self.dim = dim
        self.device = torch.device(device)
        self.index: Any = None
        self._keep: list[Any] = []  # objects the faiss index points to (quantizer, GPU resources)

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return 0 if self.index is None else int(self.index.ntotal)

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` keep (a fitted detector with a faiss index
        goes through joblib and multiprocessing): the faiss index in faiss' own serialised
        form, without the module and GPU resources, which unpickling makes again."""
        state = self.__dict__.copy()
        del state["faiss"]
        state["_keep"] = []
        if self.index is not None:
            state["index"] = self.faiss.serialize_index(_to_cpu(self.faiss, self.index))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.faiss = import_faiss()
        if self.index is not None:
            cpu = self.faiss.deserialize_index(self.index)
            self.index, res = _to_gpu_if_possible(self.faiss, cpu, self.device)
            self._keep = [cpu, res]

    def __repr__(self) -> str:
        where = type(self.index).__name__ if self.index is not None else "empty"
        return (f"{type(self).__name__}({self.ntotal} vectors of dimension {self.dim}, "
                f"float32, faiss {where}, on {self.device})")

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """``(D, I)`` for ``queries`` [Q, D]: float32 squared L2 [Q, k] and int64 [Q, k]."""
        if self.ntotal == 0:
            raise ValueError("the index is empty")
        self._check_queries(queries)
        dist, idx = self.index.search(_as_float32_rows(queries), k)
        return (torch.from_numpy(dist).to(queries.device),
                torch.from_numpy(idx).to(queries.device))


@register_index
class FaissFlatIndex(_FaissIndex):
    """Exact search with ``faiss.IndexFlatL2`` (fp32; on the GPU with faiss-gpu).

    Args:
        dim (int): vector dimension D.
        device (torch.device | str): a CUDA device moves the index to the GPU when faiss has
            GPU support.
    """

    kind = "faiss-flat"
    joinable = True

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__(dim, device)
        self.index, res = _to_gpu_if_possible(self.faiss, self.faiss.IndexFlatL2(dim),
                                              self.device)
        self._keep.append(res)

    @classmethod
    def create(cls, dim: int, *, device: torch.device, **_: Any) -> FaissFlatIndex:
        return cls(dim, device=device)

    def add(self, x: Tensor) -> None:
        """Append vectors ``x`` of shape [n, D]."""
        self._check_rows(x)
        if x.shape[0]:
            self.index.add(_as_float32_rows(x))

    @property
    def vectors(self) -> Tensor:
        """The indexed vectors, shape [ntotal, D] (a copy)."""
        cpu = _to_cpu(self.faiss, self.index)
        return torch.from_numpy(cpu.reconstruct_n(0, cpu.ntotal)).reshape(-1, self.dim)

    def vectors_at(self, ids: Tensor) -> Tensor | None:
        """The vectors ``ids`` [m], as [m, D] copies, from an index in host memory (None from
        one on a GPU: faiss would copy the whole index back first)."""
        if _on_gpu(self.index):
            return None
        return torch.from_numpy(np.stack([self.index.reconstruct(int(i)) for i in ids.tolist()])
                                ).reshape(-1, self.dim)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the index (for saving)."""
        return {"vectors": self.vectors.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: torch.device | str = "cpu",
                        **_: Any) -> FaissFlatIndex:
        """Rebuild an index saved by :meth:`state_dict`."""
        vectors = state["vectors"]
        index = cls(vectors.shape[1], device=device)
        index.add(vectors)
        return index


#: Inverted lists an IVF search visits per query by default, as the reference implementation.
REFERENCE_NPROBE = 4


@register_index
class FaissIVFIndex(_FaissIndex):
    """Approximate search with ``faiss.IndexIVFFlat`` (L2), as the reference implementation.

    **Approximate**: a query is compared only with the vectors in the ``nprobe`` inverted lists
    whose centroids are nearest to it, so the reported neighbour can be farther than the true
    one. Use it to reproduce published numbers; use ``"exact"`` otherwise.

    The reference trains the coarse quantizer on the gradients of the first
    ``T = min(600, int(0.8 * B))`` training batches (B batches in all), with
    ``nlist = int(4 * sqrt(T))`` lists, and searches with ``nprobe = 4``. By default B is
    counted in batches of ``reference_batch_size`` rows from the training set's size
    (``expect_training_rows``); when the size is not known in advance the quantizer is trained
    when building ends. With ``loader_batches=B`` it is counted as the reference does: every
    ``add`` call is one loader batch (the gradients of its correctly classified rows,
    possibly none), the quantizer is trained on the first T calls' rows, and
    ``omit_batch_t=True`` leaves out the rows of call T, as the reference's code does (off
    unless asked for).

    Args:
        dim (int): vector dimension D.
        nlist (int, optional): number of inverted lists; by default the reference's rule.
        nprobe (int): lists visited per query (reference: 4).
        reference_batch_size (int): rows per training batch in the reference's rule.
        loader_batches (int, optional): B, the number of loader batches the index is built
            from, one ``add`` call each (see above).
        omit_batch_t (bool): with ``loader_batches``, do not index the rows of batch T.
        device (torch.device | str): a CUDA device moves the index to the GPU when faiss has
            GPU support.
    """

    kind = "faiss-ivf"
    option_names = ("nlist", "nprobe", "reference_batch_size", "loader_batches",
                    "omit_batch_t")
    approximate = True

    def __init__(self, dim: int, *, nlist: int | None = None, nprobe: int = REFERENCE_NPROBE,
                 reference_batch_size: int = 128, loader_batches: int | None = None,
                 omit_batch_t: bool = False, device: torch.device | str = "cpu") -> None:
        super().__init__(dim, device)
        if not isinstance(omit_batch_t, bool) or (omit_batch_t and loader_batches is None):
            raise ValueError("omit_batch_t must be a bool, and True only with loader_batches")
        nlist, loader_batches = (None if value is None else check_positive_int(value, name)
                                 for name, value in (("nlist", nlist),
                                                     ("loader_batches", loader_batches)))
        nprobe = check_positive_int(nprobe, "nprobe")
        reference_batch_size = check_positive_int(reference_batch_size, "reference_batch_size")
        self.loader_batches, self.omit_batch_t, self._calls = loader_batches, omit_batch_t, 0
        self.nlist = nlist
        self.nprobe = nprobe
        self.reference_batch_size = reference_batch_size
        self.training_rows: int | None = None
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    @classmethod
    def create(cls, dim: int, *, device: torch.device, options: dict[str, Any],
               **_: Any) -> FaissIVFIndex:
        return cls(dim, device=device, **options)

    def set_search_options(self, options: Mapping[str, Any]) -> None:
        nprobe = check_positive_int(options.get("nprobe", REFERENCE_NPROBE), "nprobe")
        if nprobe != self.nprobe:
            self.nprobe = nprobe
            if self.index is not None:
                self.index.nprobe = nprobe

    def options(self) -> dict[str, Any]:
        """Constructor options (saved with the detector)."""
        return {"nlist": self.nlist, "nprobe": self.nprobe,
                "reference_batch_size": self.reference_batch_size,
                "loader_batches": self.loader_batches, "omit_batch_t": self.omit_batch_t}

    @property
    def ntotal(self) -> int:
        return self._n_pending + super().ntotal

    def expect_training_rows(self, n: int) -> None:
        self.training_rows = n

    def _train_batches(self, n_rows: int) -> int:
        """The reference's T = min(600, int(0.8 * B)) for B batches: the loader's, or those of
        ``reference_batch_size`` rows covering ``n_rows``."""
        batches = self.loader_batches or math.ceil(n_rows / self.reference_batch_size)
        return max(1, min(600, int(0.8 * batches)))

    def _build(self) -> None:
        """Train the quantizer on the pending vectors, then add them."""
        if not self._pending:
            raise ValueError("no indexed vector among the batches the IVF quantizer trains on")
        train = np.concatenate(self._pending)
        if self.nlist is not None:
            nlist = self.nlist
        else:
            size = self.training_rows if self.training_rows is not None else train.shape[0]
            nlist = int(4 * math.sqrt(self._train_batches(size)))
        if self.nlist is not None and nlist > train.shape[0]:
            warnings.warn(f"nlist={nlist} is more than the {train.shape[0]} gradients the IVF "
                          f"quantizer is trained on; it gets {train.shape[0]} lists",
                          UserWarning, stacklevel=user_stacklevel())
        nlist = min(nlist, train.shape[0])  # faiss needs at least nlist training points
        quantizer = self.faiss.IndexFlatL2(self.dim)
        index = self.faiss.IndexIVFFlat(quantizer, self.dim, nlist, self.faiss.METRIC_L2)
        index.train(train)
        index.add(train)
        index.nprobe = self.nprobe
        self.index, res = _to_gpu_if_possible(self.faiss, index, self.device)
        self._keep += [quantizer, res]
        self._pending, self._n_pending = [], 0

    def add(self, x: Tensor) -> None:
        """Append vectors; the first ones are kept until the quantizer can be trained."""
        self._check_rows(x)
        if self.loader_batches is not None:
            self._add_loader_batch(x)
            return
        if not x.shape[0]:
            return
        rows = _as_float32_rows(x)
        if self.index is not None:
            self.index.add(rows)
            return
        self._pending.append(rows)
        self._n_pending += rows.shape[0]
        if self.training_rows is not None and self._n_pending >= (
                self._train_batches(self.training_rows) * self.reference_batch_size):
            self._build()

    def _add_loader_batch(self, x: Tensor) -> None:
        """One loader batch's rows, counted as the reference counts them (see the class)."""
        call, self._calls = self._calls, self._calls + 1
        t = self._train_batches(0)
        rows = _as_float32_rows(x)
        if call < t:
            if rows.shape[0]:
                self._pending.append(rows)
                self._n_pending += rows.shape[0]
            return
        if self.index is None:
            self._build()
        if call == t and self.omit_batch_t:
            self.omitted_calls = (call,)
        elif rows.shape[0]:
            self.index.add(rows)

    def trim(self) -> None:
        """Finish building: train on what is pending if that has not happened yet."""
        if self.index is None and self._n_pending:
            self._build()

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        self.trim()
        return super().search(queries, k)

    def state_dict(self) -> dict[str, Tensor]:
        """The serialised faiss index as a uint8 tensor (faiss' own format, no pickle)."""
        self.trim()
        data = self.faiss.serialize_index(_to_cpu(self.faiss, self.index))
        return {"faiss": torch.from_numpy(np.asarray(data, dtype=np.uint8).copy())}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: torch.device | str = "cpu",
                        options: dict[str, Any] | None = None, **_: Any) -> FaissIVFIndex:
        """Rebuild an index saved by :meth:`state_dict`."""
        faiss = import_faiss()
        cpu_index = faiss.deserialize_index(state["faiss"].numpy())
        index = cls(cpu_index.d, device=device, **(options or {}))
        cpu_index.nprobe = index.nprobe
        index.index, res = _to_gpu_if_possible(faiss, cpu_index, index.device)
        index._keep += [cpu_index, res]
        return index


def check_index_options(options: Any) -> dict[str, Any]:
    """``index_options`` as a new dict (None: empty), or a clear error if it is not a mapping."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"index_options must be a dict of option names to values, got "
                        f"{type(options).__name__}")
    return dict(options or {})


def make_index(kind: str, dim: int, *, dtype: torch.dtype, device: torch.device,
               backend: str, precision: str = "ieee",
               options: dict[str, Any] | None = None) -> GradientIndex:
    """A new, empty index of a registered ``kind``, its ``options`` checked by name."""
    cls = index_class(kind)
    options = check_index_options(options)
    cls.check_option_names(options)  # the values: by create (a fit checked both before)
    return cls.create(dim, dtype=dtype, device=device, backend=backend, precision=precision,
                      options=options)


def index_from_state(kind: str, state: dict[str, Tensor], *, device: torch.device,
                     backend: str, precision: str = "ieee",
                     options: dict[str, Any] | None = None) -> GradientIndex:
    """Rebuild a saved index of a registered ``kind``."""
    if kind not in INDEXES:
        raise ValueError(f"unknown index kind {kind!r} (registered: {index_kinds()})")
    return INDEXES[kind].from_state_dict(state, device=device, backend=backend,
                                         precision=precision, options=options)


def check_search_result(dists: Tensor, ids: Tensor, n_queries: int, k: int,
                        index: GradientIndex) -> None:
    """Refuse a search result other than floating distances and integer ids, both
    [n_queries, k] (an index registered by a user is called here): a narrower one would be
    broadcast into place, or merged with other shards' lists, without a word."""
    want = (n_queries, k)
    if (tuple(dists.shape) != want or not dists.is_floating_point()
            or tuple(ids.shape) != want or ids.is_floating_point() or ids.is_complex()):
        raise ValueError(f"the {index.kind} index returned distances of shape "
                         f"{tuple(dists.shape)} ({dists.dtype}) and ids of shape "
                         f"{tuple(ids.shape)} ({ids.dtype}) for {n_queries} queries and k={k}; "
                         "GradientIndex.search must return [Q, k] floating distances and "
                         "[Q, k] integer ids")
