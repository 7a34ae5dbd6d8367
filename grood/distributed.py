"""Collectives for running GROOD on several processes with ``torch.distributed``.

grood uses an existing process group (NCCL on GPUs, gloo on CPUs; started by ``torchrun`` or
``torch.distributed.init_process_group``) and adds no networking of its own. With
``GROOD(distributed=True)``:

* fitting: every rank passes its own shard of the training data; prototype sums and counts
  (and those of the OOD prototype sources) are all-reduced, so every rank ends with the
  prototypes of a single-process fit on the union;
* the gradient index is sharded by rows: each rank indexes its own correctly classified
  samples, and rank r's rows have global ids starting at the total of ranks 0..r-1;
* scoring: each rank scores its own rows; the query gradients travel round a ring of the
  ranks, each searching every block against its shard, and the per-shard k nearest
  (distance, global id) lists go back to the rank that owns the queries and are merged there,
  so each rank gets the scores a single-process detector would give;
* failures: rank-local work (reading a shard's rows, a pass over a loader, a search of the
  rank's own shard, writing or reading its shard file) runs inside :func:`together`, so a
  rank that fails there stops every rank (it raises its own error, the others
  :class:`grood.errors.RankFailedError`) instead of leaving them in a collective it never
  joins; ranks whose settings or feature layout differ are refused by :func:`check_agree`
  before the collectives they would break.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from grood._checks import as_tensor, compute_dtype
from grood.errors import RankFailedError
from grood.index import check_search_result
from grood_kernels.contract import lex_sort


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """Whether a default process group exists."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not is_initialized():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def _comm_device(t: Tensor) -> torch.device:
    """NCCL reduces CUDA tensors; gloo reduces CPU tensors."""
    backend = _dist().get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else \
        torch.device("cpu")


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """All-reduce ``t`` (``sum`` or ``max``) and return the result on ``t``'s device."""
    dist = _dist()
    work = t.to(_comm_device(t)).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return work.to(t.device)


def all_gather_rows(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (same trailing shape, any number of rows), in rank order."""
    dist = _dist()
    dev = _comm_device(t)
    _, world = rank_and_world()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s)].to(t.device) for o, s in zip(out, sizes, strict=True)]


def gather_json(value: Any) -> list[Any]:
    """Every rank's ``value`` (JSON-serialisable; others as their repr), in rank order."""
    blob = json.dumps(value, sort_keys=True, default=repr).encode()
    return [json.loads(bytes(t.tolist())) for t in
            all_gather_rows(torch.tensor(list(blob), dtype=torch.uint8))]


def check_agree(views: list[dict[str, Any]], keys: Any, what: str) -> None:
    """Raise (on every rank: each holds the same ``views``, from :func:`gather_json`) unless
    all ranks have equal values under ``keys``, naming the first that differs and each rank's
    value. Call it before collectives whose shapes depend on those values (ranks that
    disagree there abort in gloo or hang in NCCL)."""
    for key in keys:
        values = [view.get(key) for view in views]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"the ranks of a distributed {what} disagree on {key} ({shown}); "
                             "every rank must give the same settings and feature layout")


@contextmanager
def together(active: bool, what: str) -> Iterator[None]:
    """Run a block of rank-local work (reading and checking inputs, a pass over a loader) so
    that it fails on every rank or on none, where ``active`` (a distributed fit or search).

    A rank whose block raised re-raises its own error; every other rank raises
    :class:`grood.errors.RankFailedError` naming that rank and its message (``what``: the step,
    for the message). Without this, a rank that failed alone would skip the collectives the
    others wait in, and its next collective would meet theirs: a baffling error or abort in
    gloo, a hang or mismatched data in NCCL. Costs one all-reduce of a flag when nothing
    failed. Only rank-local work belongs in the block: a rank failing before a collective
    inside it would meet the others' collective with this one's."""
    if not active:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # every rank learns of it below; KeyboardInterrupt is not held
        error = exc
    raise_together(error, what)


def raise_together(error: BaseException | None, what: str) -> None:
    """Every rank's part of :func:`together`: raise on every rank if ``error`` is set on any
    (its own error where it is set, :class:`RankFailedError` elsewhere)."""
    if not int(all_reduce(torch.tensor([0 if error is None else 1]), "max")):
        return
    views = gather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = {r: msg for r, msg in enumerate(views) if msg is not None}
    rank, *rest = failed
    others = f" (and rank(s) {', '.join(str(r) for r in rest)})" if rest else ""
    raise RankFailedError(f"rank {rank}{others} failed while {what}, so this rank stops too; "
                          f"rank {rank}'s error: {failed[rank]}", ranks=list(failed),
                          step=what, errors=failed)


def in_step(batches: Iterable[Any], n_features: int, device: torch.device, active: bool = True
            ) -> Iterator[tuple[Any, bool, int]]:
    """This rank's batches of features to search (each search over a sharded index is
    collective), in step with the other ranks': ``(batch, True, number)`` for each of its
    batches (numbered from 0, for errors to name), then, while another rank still has
    batches, ``(empty [0, n_features] batch, False, number of its batches)`` so that this rank
    joins that rank's searches (in float64 where that rank's batch is float64: the ranks'
    query dtypes must agree). A rank whose batches raise stops every rank (:func:`together`).
    One exchange per step: whether each rank has a batch, and its dtype. Not ``active`` (a
    detector in one process): each batch as it comes."""
    if not active:
        yield from ((batch, True, number) for number, batch in enumerate(batches))
        return
    it = iter(batches)
    number = 0
    while True:
        with together(True, "reading its next batch to score"):
            batch = next(it, None)
            dtype = None if batch is None else compute_dtype(as_tensor(batch, "batch")[0].dtype)
        views = gather_json(None if dtype is None else str(dtype))
        if batch is not None:
            yield batch, True, number
            number += 1
        elif any(views):
            dtype = getattr(torch, next(v for v in views if v).removeprefix("torch."))
            yield torch.empty((0, n_features), dtype=dtype, device=device), False, number
        else:
            return


def merge_topk(dists: list[Tensor], ids: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Merge per-shard ``(D, I)`` lists [Q, k] into the global k nearest.

    Order is (distance, global id), so equal distances go to the lower id, as in one process;
    missing entries (id -1) sort last.
    """
    d, i = lex_sort(torch.cat(dists, dim=1), torch.cat(ids, dim=1))
    return d[:, :k], i[:, :k]


def shard_sizes(ntotal: int) -> list[int]:
    """Every rank's index size, in rank order (``ntotal`` is this rank's)."""
    return [int(t) for t in all_gather_rows(torch.tensor([ntotal]))]


def search_sharded(index: Any, grads: Tensor, k: int, sizes: list[int], dtype: torch.dtype,
                   rows: Tensor | None = None, check: Any = None,
                   what: str = "searching") -> tuple[Tensor, Tensor]:
    """``(distances, ids)`` [Q, k] from this rank's query ``grads`` to their k nearest over
    every rank's index shard (``sizes``: every rank's shard size, in rank order): ids are
    global index ids, or with ``rows`` (this rank's shard's training-row numbers, increasing
    with the global ids) training-row numbers.

    The ranks' query blocks travel round a ring, each with the k nearest (distance, global id)
    found for it so far: at each of ``world`` steps a rank passes the block it holds on while
    searching it against its own shard (global ids offset by the sizes of the shards before
    it), merges what it found into the block's list, and passes the list after it; a last hop
    returns each list to the rank that owns the queries. A rank holds two blocks at a time,
    where gathering every rank's queries to every rank would hold ``world`` of them (2 GB per
    rank for 64 ranks of 4,096 rows at D = 2048). Lists merge by (distance, global id), a total
    order, so the result equals a search of one index holding every shard. Point-to-point
    sends only (gloo in torch 2.11 has no all-to-all).

    A rank whose own search fails (a registered index that raises or returns ids outside
    it) keeps passing the blocks and lists on, and every rank raises at the end
    (:func:`together`; ``what`` names the step), as every rank does where ``check`` (called
    with this rank's distances) raises on one of them.
    """
    dist = _dist()
    rank, world = rank_and_world()
    dev = _comm_device(grads)
    counts = [int(t) for t in all_gather_rows(torch.tensor([grads.shape[0]]))]
    offset = sum(sizes[:rank])
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if world == 1:  # nothing to pass round (and no rank to send to but itself)
        with together(True, what):
            d, i = _search_local(index, grads, k, offset, dtype, rows)
            if check is not None:
                check(d)
        return d, i

    def exchange(send: list[Tensor], send_rows: int, recv: list[Tensor], recv_rows: int
                 ) -> list[Any]:
        """Post sends of ``send`` to the next rank and receives of ``recv`` from the previous
        one (an empty block is neither sent nor received: both ends know its size)."""
        ops = [dist.P2POp(dist.isend, t, nxt) for t in send if send_rows]
        ops += [dist.P2POp(dist.irecv, t, prv) for t in recv if recv_rows]
        return dist.batch_isend_irecv(ops) if ops else []

    block = grads.to(dev).contiguous()
    best_d, best_i = _no_neighbours(block.shape[0], k, dtype, dev)
    error = None  # this rank's own search failed: raised on every rank after the ring
    for step in range(world):
        owner, coming = (rank - step) % world, (rank - step - 1) % world
        last = step == world - 1
        incoming = torch.empty((counts[coming], grads.shape[1]), dtype=grads.dtype, device=dev)
        pending = [] if last else exchange([block], counts[owner], [incoming], counts[coming])
        if block.shape[0] and error is None:
            try:
                d, i = _search_local(index, block.to(grads.device), k, offset, dtype, rows)
            except Exception as exc:  # the list goes on unmerged; every rank raises below
                error = exc
            else:
                best_d, best_i = merge_topk([best_d, d.to(dev)], [best_i, i.to(dev)], k)
                # Contiguous, as sends need, and held here until the sends are done.
                best_d, best_i = best_d.contiguous(), best_i.contiguous()
        # The list goes on after the block (the last hop: back to the queries' owner).
        in_d, in_i = _no_neighbours(counts[coming], k, dtype, dev)
        pending += exchange([best_d, best_i], counts[owner], [in_d, in_i], counts[coming])
        for work in pending:
            work.wait()
        block, best_d, best_i = incoming, in_d, in_i
    with together(True, what):
        if error is not None:
            raise error
        if check is not None:
            check(best_d)
    return best_d.to(grads.device), best_i.to(grads.device)


def _search_local(index: Any, queries: Tensor, k: int, offset: int, dtype: torch.dtype,
                  rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """This rank's shard's k nearest ``(distances in dtype, global ids)`` for ``queries``;
    with ``rows``, training-row numbers instead of ids."""
    if not index.ntotal:
        return _no_neighbours(queries.shape[0], k, dtype, queries.device)
    d, i = index.search(queries, k)
    check_search_result(d, i, queries.shape[0], k, index)  # before it is merged with others
    if rows is not None:
        return d.to(dtype), row_numbers(i, rows, index)
    return d.to(dtype), torch.where(i >= 0, i + offset, i)


def row_numbers(ids: Tensor, rows: Tensor, index: Any) -> Tensor:
    """Index ``ids`` [Q, k] (-1: none) as the training-row numbers ``rows`` of the index's
    vectors (-1 kept); ids outside the index (a registered index's search) are refused."""
    bad = (ids < -1) | (ids >= rows.numel())
    if bool(bad.any()):
        raise ValueError(f"the {index.kind} index returned id {int(ids[bad][0])}, outside its "
                         f"{rows.numel()} vectors")
    rows = rows.to(ids.device)
    return torch.where(ids >= 0, rows[ids.clamp(min=0)], ids)


def _no_neighbours(rows: int, k: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """``rows`` lists of k missing neighbours: distance ``inf``, id -1 (they merge last)."""
    return (torch.full((rows, k), float("inf"), dtype=dtype, device=device),
            torch.full((rows, k), -1, dtype=torch.int64, device=device))
