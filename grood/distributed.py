"""Collectives for running GROOD on several processes with ``torch.distributed``.

grood uses an existing process group (NCCL on GPUs, gloo on CPUs; started by ``torchrun`` or
``torch.distributed.init_process_group``) and adds no networking of its own. With
``GROOD(distributed=True)``:

* fitting: every rank passes its own shard of the training data; prototype sums and counts
  (and those of the OOD prototype sources) are all-reduced, so every rank ends with the
  prototypes of a single-process fit on the union;
* the gradient index is sharded by rows: each rank indexes its own correctly classified
  samples, and rank r's rows have global ids starting at the total of ranks 0..r-1;
* scoring: each rank scores its own rows; the query gradients are gathered, every rank
  searches all of them against its shard, and the per-shard k nearest (distance, global id)
  lists are merged, so each rank gets the scores a single-process detector would give.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from grood_kernels.contract import lex_sort


def _dist():
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


def search_sharded(index, grads: Tensor, k: int, sizes: list[int], dtype: torch.dtype) -> Tensor:
    """Distances [Q, k] from this rank's query ``grads`` to their k nearest over every rank's
    index shard (``sizes``: every rank's shard size, in rank order).

    Every rank gathers all ranks' queries, searches them against its own shard (global ids
    offset by the sizes of the shards before it), and the per-shard lists are merged by
    (distance, global id), so the result equals a search of one index holding every shard.
    """
    rank, _ = rank_and_world()
    per_rank = all_gather_rows(grads)
    queries = torch.cat(per_rank)
    if index.ntotal:
        d, i = index.search(queries, k)
        i = torch.where(i >= 0, i + sum(sizes[:rank]), i)
    else:
        d = torch.full((queries.shape[0], k), float("inf"), dtype=dtype, device=queries.device)
        i = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
    merged, _ = merge_topk(all_gather_rows(d.to(dtype)), all_gather_rows(i), k)
    start = sum(t.shape[0] for t in per_rank[:rank])
    return merged[start:start + grads.shape[0]]
