"""Values derived from prototypes, kept while the tensors they came from live unmodified.

A detector's gradient step needs, per (prototypes, OOD prototype), their magnitude, the
centred and cast GEMM operand and its squared norms; made once and kept here
(:func:`kept_per_prototypes`), they cost nothing at the next score. Keys hold the tensors'
identities through weak references and their version counters, so a freed tensor drops its
entries and one changed in place makes them afresh. Triton-free (torch only); the names are
part of :mod:`grood_kernels.contract`.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor

#: Values derived from a caller's (prototypes, OOD prototype), and any other tensors they
#: depend on, by what they were derived for. An entry lives exactly as long as its tensors: a
#: weak reference's callback drops it when one is freed. No entry of live tensors is ever
#: evicted, since a CUDA graph captured with a value reads its memory on every replay (a freed
#: value's memory would be reused).
_kept: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}
#: Threads scoring at once (one detector shared by a server's workers) read and update
#: ``_kept`` under this lock; the values themselves are made outside it. Re-entrant: a tensor
#: freed while the lock is held (a garbage collection inside it) calls :func:`_drop_kept`.
_kept_lock = threading.RLock()
#: Per thread, the lists that :func:`pinning_kept_values` blocks collect returned values in.
_pins = threading.local()


def _drop_kept(key: tuple, ref: weakref.ref, kept: dict = _kept,
               lock: threading.RLock = _kept_lock) -> None:
    """A kept value's tensor was freed: drop its entry (unless a newer one replaced it). The
    cache and its lock are bound at definition: a tensor freed while the interpreter shuts
    down (module globals already None) still finds them."""
    with lock:
        hit = kept.get(key)
        if hit is not None and any(r is ref for r in hit[0]):
            del kept[key]


class pinning_kept_values:
    """``with pinning_kept_values() as pinned:`` collects in the list ``pinned`` every value
    :func:`kept_per_prototypes` returns in this thread inside the block: the holder of
    ``pinned`` keeps them alive whatever happens to the cache later (a CUDA graph captured in
    the block keeps reading them; the prototypes changed in place would replace them)."""

    def __enter__(self) -> list:
        self.pinned: list = []
        if not hasattr(_pins, "stack"):
            _pins.stack = []
        _pins.stack.append(self.pinned)
        return self.pinned

    def __exit__(self, *exc) -> None:
        _pins.stack.remove(self.pinned)


def kept_per_prototypes(prototypes: Tensor, ood_prototype: Tensor, what: tuple,
                        make: Callable[[], Any], *, also: tuple[Tensor, ...] = ()) -> Any:
    """``make()``, computed once per (prototype tensor, OOD prototype, the tensors ``also``,
    ``what``) and kept while those tensors live unmodified (identity through weak references,
    and version counters). Safe to call from several threads at once; two threads that miss
    together both make the value (``make`` may itself keep values: it runs outside the lock).
    Inference tensors (made under ``torch.inference_mode``) have no version counter, so nothing
    made from them is kept: the value is made afresh on every call."""
    value = _kept_value((prototypes, ood_prototype, *also), what, make)
    for pinned in getattr(_pins, "stack", ()):
        pinned.append(value)
    return value


def _kept_value(tensors: tuple[Tensor, ...], what: tuple, make: Callable[[], Any]) -> Any:
    if any(t.is_inference() for t in tensors):
        return make()
    # The tensors' ids lead, then what, then the ids of tensors past the first two.
    key = (id(tensors[0]), id(tensors[1]), *what, *map(id, tensors[2:]))
    versions = tuple(t._version for t in tensors)
    with _kept_lock:
        hit = _kept.get(key)
    if hit is not None and hit[1] == versions \
            and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        return hit[2]
    value = make()
    with _kept_lock:
        # partial binds the function now: a tensor freed at shutdown still reaches it.
        refs = tuple(weakref.ref(t, functools.partial(_drop_kept, key)) for t in tensors)
        _kept[key] = (refs, versions, value)
    return value
