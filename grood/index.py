"""The gradient index: the training gradients GROOD scores against.

:class:`ExactIndex` holds the vectors in one tensor and searches them exactly (squared L2, the
``(D, I)`` contract of faiss) through the backend chosen in :mod:`grood.ops`. Vectors are added
in batches into a buffer that grows geometrically (or is reserved up front when the final size
is known), so building never holds two copies of the index. Squared norms of the vectors are
computed once, at the first search, and reused by every later search.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grood import ops
from grood.functional import database_sq_norms_of


class ExactIndex:
    """Exact nearest-neighbour index over vectors of dimension ``dim``.

    Args:
        dim (int): vector dimension D.
        dtype (torch.dtype): storage and compute dtype.
        device (torch.device | str): where the vectors live and are searched.
        backend (str): ``"torch"`` or ``"triton"``, already resolved by :mod:`grood.ops`.
    """

    kind = "exact"

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", backend: str = "torch") -> None:
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self._buf = torch.empty((0, dim), dtype=dtype, device=self.device)
        self._n = 0
        self._sq_norms: Tensor | None = None  # ||x||^2 per vector, cached for searches

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return self._n

    @property
    def vectors(self) -> Tensor:
        """The indexed vectors, shape [ntotal, D] (a view; do not modify)."""
        return self._buf[: self._n]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` vectors in total, so later ``add`` calls do not copy."""
        if capacity > self._buf.shape[0]:
            grown = torch.empty((capacity, self.dim), dtype=self.dtype, device=self.device)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown

    def add(self, x: Tensor) -> None:
        """Append vectors ``x`` of shape [n, D] (copied into the index)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"index vectors must have shape [n, {self.dim}], got {tuple(x.shape)}")
        n = x.shape[0]
        if self._n + n > self._buf.shape[0]:
            self.reserve(max(self._n + n, 2 * self._buf.shape[0]))
        self._buf[self._n : self._n + n] = x.to(device=self.device, dtype=self.dtype)
        self._n += n
        self._sq_norms = None

    def trim(self) -> None:
        """Release unused reserved capacity."""
        if self._buf.shape[0] != self._n:
            self._buf = self._buf[: self._n].clone()

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Exact k-NN: ``(D, I)``, squared L2 distances [Q, k] and int64 indices [Q, k]."""
        if self._n == 0:
            raise ValueError("the index is empty")
        if self._sq_norms is None:
            self._sq_norms = database_sq_norms_of(self.vectors)
        impl = ops.get_op("knn", self.backend)
        return impl(queries.to(device=self.device, dtype=self.dtype), self.vectors, k,
                    database_sq_norms=self._sq_norms)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the index (for saving)."""
        return {"vectors": self.vectors.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, device: torch.device | str = "cpu",
                        backend: str = "torch") -> ExactIndex:
        """Rebuild an index saved by :meth:`state_dict`."""
        vectors = state["vectors"]
        index = cls(vectors.shape[1], dtype=vectors.dtype, device=device, backend=backend)
        index._buf = vectors.to(device)
        index._n = vectors.shape[0]
        return index
