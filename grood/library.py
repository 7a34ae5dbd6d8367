"""grood's operations as PyTorch custom ops: ``torch.ops.grood.*``.

Registered with :mod:`torch.library` when this module is imported (``import grood`` does), so
``torch.compile`` (``fullgraph=True``), ``torch.export`` and FX see each one as a single node
with a shape function, instead of tracing into Python that reads tensor values:

* ``grood::ncp_gradient(h, prototypes, ood_prototype, precision="ieee",
  prototype_sq_norms=None, backend="auto") -> (grad, q_ood, pred, min_dist, lse)`` —
  :func:`grood.ops.ncp_gradient` (the Triton kernel on CUDA when it can run, else the torch
  implementation);
* ``grood::resolve_rows(h, prototypes, ood_prototype, grad, q_ood, pred, min_dist, lse)
  -> (grad, q_ood, pred, min_dist, lse)`` — what the detector does after the gradient step:
  refuses NaN/Inf feature rows (naming the row) and recomputes in float64 the rows whose
  distances float32 cannot resolve;
* ``grood::knn(queries, database, k, precision="ieee", database_sq_norms=None,
  rerank_database=None, backend="auto") -> (D, I)`` — :func:`grood.ops.knn`.

Every op has a fake (meta) implementation, so shapes and dtypes propagate without running it,
and none aliases or modifies its inputs. The ops are not differentiable (GROOD scores are not
trained through): each runs forward on tensors autograd tracks (a head in a model run with grad
enabled), and a backward pass that reaches its outputs — or ``torch.compile`` tracing one —
raises a ``ValueError`` naming the op and the fix (detached inputs). The head
(:mod:`grood.head`) scores its features detached, so it runs eager and compiled either way. On
a CUDA device ``ncp_gradient`` and ``knn`` read no tensor value on the host, on either backend,
once the prototypes' power-of-two scale has been read (on the first call with a prototype set,
then kept with it): the Triton kernels take it as an argument, and the torch implementations
pick candidates with device-side minima, keyed ``topk`` or stable sorts instead of reading
which rows tie (on the CPU, where a host read costs nothing, they take whichever is faster). So
both can be captured in CUDA graphs; the GPU tests check it by running them with CUDA sync
debugging set to error. ``knn`` with ``rerank_database`` on another device (host memory) moves
the candidates' indices there, a synchronisation by nature. ``resolve_rows`` reads values by
design (it raises, and redoes rows in float64), which is why the head's ``checks="flag"``
replaces it with device-side flags.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grood import functional, ops
from grood._checks import check_finite_rows, compute_dtype

__all__ = ["knn", "ncp_gradient", "resolve_rows"]

_NCP = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _backend_for(backend: str, *tensors: Tensor) -> str:
    """float64 inputs are computed in float64, by the torch implementation (the kernels take
    no float64), whatever backend was asked for."""
    return "torch" if any(t.dtype == torch.float64 for t in tensors) else backend


def _not_differentiable(op: torch.library.CustomOpDef, name: str) -> None:
    """Register for ``op`` a backward that names the op and the fix (torch's own error names
    neither): the op runs forward on tensors autograd tracks, and only a backward pass that
    reaches its outputs (a score put in a loss) is refused."""
    def backward(ctx: object, *grads: Tensor) -> None:
        raise ValueError(f"torch.ops.grood.{name} is not differentiable (GROOD scores are not "
                         "trained through), but a backward pass (or torch.compile, which traces "
                         "one for outputs that require grad) reached its outputs: pass it "
                         "detached inputs (h.detach()), or call it under torch.no_grad()")

    op.register_autograd(backward)


def _ncp_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return compute_dtype(dtype)


@torch.library.custom_op("grood::ncp_gradient", mutates_args=())
def ncp_gradient(h: Tensor, prototypes: Tensor, ood_prototype: Tensor,
                 precision: str = "ieee", prototype_sq_norms: Tensor | None = None,
                 backend: str = "auto") -> _NCP:
    """The NCP gradient of ``h`` [N, D]; see :func:`grood.functional.ncp_gradient`."""
    kwargs = {} if prototype_sq_norms is None else {"prototype_sq_norms": prototype_sq_norms}
    backend = _backend_for(backend, h, prototypes, ood_prototype)
    grad, q_ood, pred, min_dist, lse = ops.ncp_gradient(h, prototypes, ood_prototype,
                                                        backend=backend, precision=precision,
                                                        **kwargs)
    return grad, q_ood, pred, min_dist, lse


_not_differentiable(ncp_gradient, "ncp_gradient")


@ncp_gradient.register_fake
def _(h: Tensor, prototypes: Tensor, ood_prototype: Tensor, precision: str = "ieee",
      prototype_sq_norms: Tensor | None = None, backend: str = "auto") -> _NCP:
    n, d = h.shape
    dt = _ncp_dtype(h, prototypes, ood_prototype)
    return (h.new_empty((n, d), dtype=dt), h.new_empty((n,), dtype=dt),
            h.new_empty((n,), dtype=torch.int64), h.new_empty((n,), dtype=dt),
            h.new_empty((n,), dtype=dt))


@torch.library.custom_op("grood::resolve_rows", mutates_args=())
def resolve_rows(h: Tensor, prototypes: Tensor, ood_prototype: Tensor, grad: Tensor,
                 q_ood: Tensor, pred: Tensor, min_dist: Tensor, lse: Tensor) -> _NCP:
    """Refuse non-finite feature rows and rows beyond what float64 resolves (float64 results
    included); redo in float64 the rows float32 cannot resolve."""
    from grood._gradients import resolve_far_rows

    check_finite_rows(h, "features")
    res = resolve_far_rows(functional.NCPGradient(grad, q_ood, pred, min_dist, lse), h,
                           prototypes, ood_prototype, 0)
    # Outputs never alias inputs (the op contract): copy what came through unchanged.
    g, q, p, m, s = (out.clone() if out is given else out
                     for out, given in zip(res, (grad, q_ood, pred, min_dist, lse), strict=True))
    return g, q, p, m, s


_not_differentiable(resolve_rows, "resolve_rows")


@resolve_rows.register_fake
def _(h: Tensor, prototypes: Tensor, ood_prototype: Tensor, grad: Tensor, q_ood: Tensor,
      pred: Tensor, min_dist: Tensor, lse: Tensor) -> _NCP:
    return (torch.empty_like(grad), torch.empty_like(q_ood), torch.empty_like(pred),
            torch.empty_like(min_dist), torch.empty_like(lse))


@torch.library.custom_op("grood::knn", mutates_args=())
def knn(queries: Tensor, database: Tensor, k: int, precision: str = "ieee",
        database_sq_norms: Tensor | None = None, rerank_database: Tensor | None = None,
        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact k-NN ``(D, I)`` of ``queries`` in ``database``; see :func:`grood.functional.knn`."""
    kwargs = {}
    if database_sq_norms is not None:
        kwargs["database_sq_norms"] = database_sq_norms
    if rerank_database is not None:
        kwargs["rerank_database"] = rerank_database
    backend = _backend_for(backend, queries, database,
                           *(t for t in (rerank_database,) if t is not None))
    return ops.knn(queries, database, k, backend=backend, precision=precision, **kwargs)


_not_differentiable(knn, "knn")


@knn.register_fake
def _(queries: Tensor, database: Tensor, k: int, precision: str = "ieee",
      database_sq_norms: Tensor | None = None, rerank_database: Tensor | None = None,
      backend: str = "auto") -> tuple[Tensor, Tensor]:
    exact = database if rerank_database is None else rerank_database
    dt = _ncp_dtype(queries, exact)
    n_q = queries.shape[0]
    return (queries.new_empty((n_q, k), dtype=dt),
            queries.new_empty((n_q, k), dtype=torch.int64))
