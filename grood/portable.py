"""GROOD in plain PyTorch operations, for runtimes outside PyTorch: ONNX.

:class:`GROODHead` is made of grood's custom ops (:mod:`grood.library`), which ``torch.compile``
and ``torch.export`` keep as single nodes — and which ONNX Runtime, TensorRT or a phone's runtime
do not have. :class:`PortableHead` computes the same scores and classes from the standard ops
every exporter translates (matmul, top-k, gather, exp and log in float64), with the head's
``checks="flag"`` rule: a row with NaN or Inf features, or one float32 cannot resolve (far out
of distribution), comes out with score NaN and pred -1 — score such rows with the detector,
which redoes them in float64. :func:`export_onnx` writes a head, or a model with the head
attached (:meth:`GROOD.attach`), to an ``.onnx`` file and checks it in ONNX Runtime against
the detector's own scores before it returns.

The rule is the detector's: squared distances from the matmul expansion pick the
``NCP_CANDIDATES`` nearest prototypes and the ``k + RERANK_EXTRA`` nearest indexed gradients,
which are then measured again from differences, so the distances that decide a score carry no
cancellation error, whatever order a runtime sums a matmul in. The index is searched in blocks
of ``search_block`` rows, each its own weight in the graph, so a batch of N rows needs memory
for N x ``search_block`` distances at a time, not N x the index's size. Scores agree with the
detector's to float32 rounding (tested in PyTorch against the custom-op head and the float64
detector, and in ONNX Runtime); not bit for bit, since a runtime's matmul and reductions sum
in their own order.

Needs ``pip install grood[onnx]`` (onnx, onnxscript; onnxruntime for the check) for
:func:`export_onnx`; :class:`PortableHead` itself is plain PyTorch.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grood._checks import check_flag, check_positive_int, user_stacklevel
from grood._fit import TINY_GRADIENT_SHARE, expansion_error_bound, spread_limit
from grood._gradients import (
    FLOAT32_DISTANCE_LIMIT,
    ROUNDING_UNITS,
    rounding_distance,
    tiny_gradient_norm,
)
from grood.errors import require
from grood.functional import _centred_prototypes, database_sq_norms_of, ncp_gradient
from grood.head import (
    GROODAttached,
    GROODHead,
    _check_state,
    _check_threshold,
    as_module,
    check_feature_batch,
    own_shared_buffers,
)
from grood.index import spread_share
from grood_kernels.contract import NCP_CANDIDATES, RERANK_EXTRA, ncp_scale

__all__ = ["PortableHead", "export_onnx"]

# Indexed gradients per search block: a batch of 256 rows makes 16 MiB of float32 distances
# at a time (ImageNet-1k's 1.28 M gradients: 79 blocks). In ONNX Runtime on the CPU, blocks
# of 16,384 and 65,536 rows scored 200,000 indexed gradients as fast as one block did (within
# the run-to-run spread), and left its memory 177 and 578 MiB above the loaded file after
# batches of 512 rows instead of 1,650 MiB (bench/RESULTS.md).
SEARCH_BLOCK_ROWS = 1 << 14


class PortableHead(nn.Module):
    """A GROOD head in standard PyTorch operations only: ``forward(features [N, D])`` returns
    ``(score [N], pred [N])``, with a threshold also ``is_ood [N]`` — the outputs of
    ``GROODHead(checks="flag")`` to float32 rounding. Made from a head (:meth:`from_head`);
    computes in float32 (the softmax's exp and log in float64, or with ``float64=False`` in
    float32 too), whatever the head's precision mode. Reads no value on the host, so it
    traces, exports and compiles to a graph of ordinary ops. Unlike :class:`GROODHead` it
    keeps no device-side count of the rows it cannot score: they are the NaN scores.

    The index is held and searched in blocks of ``search_block`` rows (buffers
    ``index_block_<i>`` and ``index_sq_norms_<i>``): each block's ``k + RERANK_EXTRA`` nearest
    by the expansion are measured again from differences, and the candidates nearest by the
    expansion over all blocks decide, as one search over the whole index would. A batch of N
    rows makes N x ``search_block`` distances at a time. The blocks are copies of
    ``index_vectors``, or with ``copy=False`` views of it where it is float32 and contiguous
    (the head then shares its memory, and a state loaded into it goes into blocks of its own:
    :func:`export_onnx` makes its heads so, holding the index once fewer)."""

    centred_prototypes: Tensor
    centred_sq_norms: Tensor
    ood_prototype_units: Tensor
    index_centre: Tensor | None
    threshold: Tensor | None

    def __init__(self, class_prototypes: Tensor, ood_prototype: Tensor, index_vectors: Tensor,
                 *, k: int = 1, threshold: float | None = None, float64: bool = True,
                 search_block: int = SEARCH_BLOCK_ROWS, copy: bool = True,
                 index_centre: Tensor | None = None) -> None:
        super().__init__()
        _check_state(class_prototypes, ood_prototype, index_vectors, None, index_centre)
        k = check_positive_int(k, "k")
        float64 = check_flag(float64, "float64")
        search_block = check_positive_int(search_block, "search_block")
        copy = check_flag(copy, "copy")
        if index_vectors.shape[0] < k:
            raise ValueError(f"k={k} but the index holds {index_vectors.shape[0]} vectors")
        protos, p_ood = class_prototypes.detach(), ood_prototype.detach()
        # The gradient step's unit and its float32 operands in that unit, by the torch twin's
        # own rules (a power of two near the prototypes' magnitude: exact rescaling).
        self.unit = ncp_scale(protos, p_ood)
        p_o, centred, centred_sq, _ = _centred_prototypes(protos, p_ood, self.unit,
                                                          torch.float32, False)
        self.register_buffer("ood_prototype_units", p_o)
        self.register_buffer("centred_prototypes", centred)
        self.register_buffer("centred_sq_norms", centred_sq)
        check_float32_resolves(index_vectors.detach(), index_centre)
        vectors = index_vectors.detach().float()
        if not copy:
            vectors = vectors.contiguous()  # (its row blocks are then contiguous views)
        norms = database_sq_norms_of(vectors)
        self.n_index_blocks = 0
        for m0 in range(0, vectors.shape[0], search_block):
            rows = slice(m0, m0 + search_block)
            block = (vectors[rows].clone(memory_format=torch.contiguous_format) if copy
                     else vectors[rows])
            self.register_buffer(f"index_block_{self.n_index_blocks}", block)
            self.register_buffer(f"index_sq_norms_{self.n_index_blocks}", norms[rows].clone())
            self.n_index_blocks += 1
        self.search_block = search_block
        # The vector an index centred on its mean holds its rows less (GROODHead's; no
        # buffer without one, as there).
        if index_centre is not None:
            self.register_buffer("index_centre", index_centre.detach().float().clone())
        else:
            self.index_centre = None
        # Blocks that are views of the tensor given (copy=False), until a state is loaded.
        self._shared_buffers = () if copy else tuple(
            f"index_block_{i}" for i in range(self.n_index_blocks))
        if threshold is not None:
            self.register_buffer("threshold", _threshold_tensor(_check_threshold(threshold),
                                                                float64))
        else:
            self.threshold = None
        self.k = k
        # The softmax's exp and log: float64 as the detector computes them, or float32 for a
        # graph without float64 (TensorRT has none), which adds about one float32 rounding of
        # the distances to q_ood.
        self.softmax_dtype = torch.float64 if float64 else torch.float32

    @classmethod
    def from_head(cls, head: GROODHead, *, float64: bool = True,
                  search_block: int = SEARCH_BLOCK_ROWS, copy: bool = True) -> PortableHead:
        """The portable twin of ``head`` (its prototypes, index, ``k`` and threshold; the
        exact index rows, not a rounded stored copy), on the head's device; with
        ``copy=False`` its index blocks are views of the head's."""
        head.check_k()
        threshold = None if head.threshold is None else float(head.threshold)
        return cls(head.class_prototypes, head.ood_prototype, head.index_vectors, k=head.k,
                   threshold=threshold, float64=float64, search_block=search_block,
                   copy=copy, index_centre=head.index_centre
                   ).to(head.class_prototypes.device).eval()

    def index_blocks(self) -> list[tuple[Tensor, Tensor]]:
        """The index's blocks in order: ``(vectors [B, D], squared norms [B])``."""
        return [(getattr(self, f"index_block_{i}"), getattr(self, f"index_sq_norms_{i}"))
                for i in range(self.n_index_blocks)]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        """A state loaded into a head holding views of an index (``copy=False``) goes into
        blocks of its own, not into that index."""
        own_shared_buffers(self)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def index_vectors(self) -> Tensor:
        """The indexed gradients [M, D] (a copy joined from the blocks)."""
        return torch.cat([vectors for vectors, _ in self.index_blocks()])

    def extra_repr(self) -> str:
        c, d = self.centred_prototypes.shape
        threshold = "" if self.threshold is None else f", threshold={float(self.threshold):.6g}"
        wide = "" if self.softmax_dtype == torch.float64 else ", float64=False"
        indexed = sum(vectors.shape[0] for vectors, _ in self.index_blocks())
        blocks = f", search_block={self.search_block}" if self.n_index_blocks > 1 else ""
        return (f"classes={c}, dim={d}, indexed={indexed}, k={self.k}" + threshold + wide
                + blocks)

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        """``(score [N], pred [N])`` for features [N, D] (float32; pred int64, -1 for a row
        it cannot score, whose score is NaN); with a threshold also ``is_ood [N]`` (bool)."""
        check_feature_batch(features, self.centred_prototypes.shape[1])
        h = features.detach().float()
        finite = torch.isfinite(h).all(1)
        h = torch.where(finite[:, None], h, 0.0)
        grad, q, pred, min_dist, lse = self._gradient(h)
        # The head's checks="flag" rule (grood._gradients.resolved_rows).
        bad = ~(finite & torch.isfinite(q) & torch.isfinite(lse) & torch.isfinite(grad.sum(1))
                & (min_dist <= FLOAT32_DISTANCE_LIMIT) & (-lse <= FLOAT32_DISTANCE_LIMIT))
        grad = torch.where(bad[:, None], 0.0, grad)
        if self.index_centre is not None:
            grad = grad - self.index_centre
        score = torch.where(bad, float("nan"), -self._kth_sq_distance(grad))
        pred = torch.where(bad, -1, pred)
        if self.threshold is None:
            return score, pred
        # NaN rows: flagged. A float32 threshold is the one float32 scores compare to as they
        # would to the float64 one (_threshold_tensor).
        return score, pred, ~(score.to(self.threshold.dtype) >= self.threshold)

    def _gradient(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(grad [N, D], q_ood [N], pred [N], min_dist [N], lse [N]) of features ``h`` [N, D]:
        :func:`grood.functional.ncp_gradient`'s rule in whole-batch operations."""
        unit, protos = self.unit, self.centred_prototypes
        u = h / unit - self.ood_prototype_units  # [N, D], in units `unit`
        u_sq = (u * u).sum(1)
        u_norm = u_sq.sqrt()
        sq = (u_sq[:, None] - 2.0 * F.linear(u, protos) + self.centred_sq_norms[None]).clamp_min(0)
        dist = sq.sqrt() * unit  # [N, C], estimates from the expansion
        n_cand = min(NCP_CANDIDATES, protos.shape[0])
        cand_d, cand_i = torch.topk(dist, n_cand, dim=1, largest=False)
        # The candidates' distances measured again from differences replace the estimates.
        exact = (u[:, None, :] - protos[cand_i]).square().sum(2).sqrt() * unit  # [N, n_cand]
        sm = self.softmax_dtype
        neg_ood = -(u_norm.to(sm) * unit)
        neg = -dist.to(sm)
        m = torch.maximum(neg_ood, neg.max(1).values)
        rest = ((neg - m[:, None]).exp().sum(1)
                - (-cand_d.to(sm) - m[:, None]).exp().sum(1)).clamp_min(0)
        total = rest + (neg_ood - m).exp() + (-exact.to(sm) - m[:, None]).exp().sum(1)
        log_total = total.log()
        lse = m + log_total
        # exp(neg_ood - lse) with the difference of the two large terms taken first: lse,
        # rounded at the size of the distances, would carry its rounding into q (float32)
        q = ((neg_ood - m) - log_total).exp()
        # The nearest prototype by exact distance; among equal ones the lower class.
        min_dist = exact.min(1).values
        pred = torch.where(exact == min_dist[:, None], cand_i,
                           protos.shape[0]).min(1).values
        norm = u_norm.to(sm)
        scale = torch.where(norm > 0, q / torch.where(norm > 0, norm, 1.0), 0.0).float()
        return u * scale[:, None], q.float(), pred, min_dist, lse.float()

    def _kth_sq_distance(self, grad: Tensor) -> Tensor:
        """The squared distance [N] from each gradient to its k-th nearest indexed one
        (:func:`grood.functional.knn`'s rule: candidates from the expansion, measured again
        from differences), block by block."""
        g_sq = (grad * grad).sum(1)
        n_cand = self.k + RERANK_EXTRA
        estimates, exact = [], []
        for vectors, norms in self.index_blocks():
            # [N, B]; F.linear (grad @ vectors.T) exports as Gemm(transB=1) on the stored rows:
            # no runtime folds a transposed copy of the index into a second weight.
            sq = (g_sq[:, None] - 2.0 * F.linear(grad, vectors) + norms[None]).clamp_min(0)
            est, cand = torch.topk(sq, min(n_cand, vectors.shape[0]), dim=1, largest=False)
            estimates.append(est)
            exact.append((grad[:, None, :] - vectors[cand]).square().sum(2))  # [N, <=n_cand]
        if len(exact) == 1:
            measured = exact[0]
        else:  # the whole index's candidates: the blocks' nearest by the expansion
            everywhere = torch.cat(estimates, 1)
            _, chosen = torch.topk(everywhere, min(n_cand, everywhere.shape[1]), dim=1,
                                   largest=False)
            measured = torch.cat(exact, 1).gather(1, chosen)
        return torch.topk(measured, self.k, dim=1, largest=False).values[:, self.k - 1]


def check_float32_resolves(index_vectors: Tensor, centre: Tensor | None) -> None:
    """Warn where a float64 index's gradients (``index_vectors`` [M, D], held less
    ``centre`` where given) lie beyond what a :class:`PortableHead`'s float32 resolves, by the
    fit's own limits for float32 features: norms (q_ood) below float32's 2**-63, where squared
    distances between them underflow and scores tie at 0, or a spread about their mean below
    ``spread_limit(float32)`` of their norm, where float32's rounding of each is a sizeable
    part of the distances between them. Reads at most ``SPREAD_SAMPLE_ROWS`` evenly spaced
    rows. (A float32 detector's fit has warned of both already.)"""
    if index_vectors.dtype != torch.float64 or index_vectors.shape[0] == 0:
        return
    rows = sampled_rows([index_vectors])
    rows = rows + (0.0 if centre is None else centre.to(rows))
    tiny = float((torch.linalg.vector_norm(rows, dim=1)
                  < tiny_gradient_norm(torch.float32)).double().mean())
    share = spread_share(rows)
    if tiny >= TINY_GRADIENT_SHARE:
        why = (f"{100 * tiny:.3g} % of the detector's float64 indexed gradients (sampled) "
               f"have norm q_ood below {tiny_gradient_norm(torch.float32):.2g}, where squared "
               "distances between them fall below float32's range: their scores lose "
               "precision or tie at 0")
    elif share < spread_limit(torch.float32):
        why = (f"the detector's float64 indexed gradients spread about their mean by "
               f"{share:.2g} of their norm: float32's rounding of each is a sizeable part of "
               "the distances between them, and its scores carry it (some 1 % of their "
               "spread at 4e-4)")
    else:
        return
    warnings.warn(f"this portable head computes in float32, and {why}; the detector and its "
                  "GROODHead (as_module()) score them in float64", UserWarning,
                  stacklevel=user_stacklevel())


def _flag_head(head: GROODHead) -> GROODHead:
    """A shallow copy of ``head`` that scores by ``checks="flag"`` (the rule the portable head
    follows) with a counter of its own: the head given is not changed."""
    flagged = copy.copy(head)
    flagged._buffers = dict(head._buffers)
    flagged.unresolved_rows = head.unresolved_rows.clone()
    flagged.checks = "flag"
    return flagged


def _with_head(attached: GROODAttached, head: nn.Module) -> GROODAttached:
    """A shallow copy of ``attached`` scoring with ``head``: the model and everything else
    shared, ``attached`` itself unchanged."""
    copied = copy.copy(attached)
    copied._modules = dict(attached._modules)  # (a shallow copy shares the dict)
    copied._modules["head"] = head
    return copied


def reference_copy(module: nn.Module) -> nn.Module:
    """``module`` with its GROOD head scoring by ``checks="flag"`` (:func:`_flag_head`)."""
    if isinstance(module, GROODHead):
        return _flag_head(module)
    if isinstance(module, GROODAttached):
        return _with_head(module, _flag_head(module.head))
    return module


def _threshold_tensor(threshold: float, float64: bool) -> Tensor:
    """The threshold as the head compares scores to it: float64 as chosen, or the smallest
    float32 at or above it — float32 scores fall below that exactly when they fall below the
    float64 threshold, so the flags are the same."""
    if float64:
        return torch.tensor(threshold, dtype=torch.float64)
    t32 = np.float32(threshold)
    if float(t32) < threshold:
        t32 = np.nextafter(t32, np.float32(np.inf))
    return torch.tensor(float(t32), dtype=torch.float32)


def portable_copy(module: nn.Module, *, float64: bool | None = None,
                  search_block: int | None = None, copy: bool = True
                  ) -> tuple[nn.Module, PortableHead]:
    """``module`` with its GROOD head made portable, and that head: a :class:`PortableHead`
    for a :class:`GROODHead` (``float64`` and ``search_block`` as given, by default True and
    :data:`SEARCH_BLOCK_ROWS`; ``copy`` as :class:`PortableHead`'s), and for a model the head
    is attached to, a copy holding the portable head in its place (the model itself is shared,
    not changed). A :class:`PortableHead` is its own: settings given that differ from its own
    are refused."""
    if isinstance(module, PortableHead):
        _check_portable_settings(module, float64=float64, search_block=search_block)
        return module, module
    wide = True if float64 is None else float64
    block = SEARCH_BLOCK_ROWS if search_block is None else search_block
    if isinstance(module, GROODHead):
        head = PortableHead.from_head(module, float64=wide, search_block=block, copy=copy)
        return head, head
    if isinstance(module, GROODAttached):
        head = PortableHead.from_head(module.head, float64=wide, search_block=block,
                                      copy=copy)
        attached = _with_head(module, head)
        # The exporter warns of a module in training mode: the model's layers' modes count.
        attached.training = any(m.training for m in module.model.modules())
        return attached, head
    raise TypeError(f"export_onnx takes a fitted GROOD detector, its head (det.as_module()) or "
                    f"a model with the head attached (det.attach(model)), got "
                    f"{type(module).__name__}")


def _check_portable_settings(head: PortableHead, **asked: Any) -> None:
    """Refuse settings for ``head`` that differ from those it was made with (it is exported
    as it is)."""
    own = {"float64": head.softmax_dtype == torch.float64, "search_block": head.search_block}
    for name, value in asked.items():
        if value is not None and value != own[name]:
            raise ValueError(f"this PortableHead was made with {name}={own[name]!r} and is "
                             f"exported as it is, not with {name}={value!r}: make it with "
                             f"PortableHead.from_head(head, {name}={value!r}), or export "
                             "the head or the detector")


def export_onnx(module: Any, example: Tensor | np.ndarray, path: str | os.PathLike, *,
                dynamic_batch: bool = True, float64: bool | None = None, check: bool = True,
                opset: int | None = None, external_data: bool | None = None,
                search_block: int | None = None) -> Path:
    """Write ``module`` to the ONNX file ``path`` and return the path.

    ``module``: a fitted :class:`grood.GROOD` (its head, with its threshold when calibrated),
    a head (``det.as_module()``, ``flags=True`` for ``is_ood``) or a model with the head
    attached (``det.attach(model, ...)``). Its GROOD scoring is exported as
    :class:`PortableHead` computes it. ``example``: an input batch, a tensor or numpy array
    (features for a head, given to the graph as float32; the model's input for an attached
    model); with ``dynamic_batch`` the file takes any batch size. The input is named
    ``input``; the outputs ``score``, ``pred`` (and ``is_ood``), after ``logits`` for an
    attached model. ``float64=False`` leaves float64 out of the graph (the softmax in
    float32, the threshold as its float32 equivalent) for runtimes without it, TensorRT among
    them (default True). ``opset``: the ONNX opset (torch's default when None).
    ``search_block``: indexed gradients per search block (:class:`PortableHead`; default
    :data:`SEARCH_BLOCK_ROWS`, 16,384); a batch of N rows needs memory for about N x
    ``search_block`` float32 distances at a time (16 MiB for N = 256 by default). A
    :class:`PortableHead` given as ``module`` is exported with its own ``float64`` and
    ``search_block`` (others given are refused).

    With ``check`` (the default) the file is run in ONNX Runtime on ``example`` and its
    outputs compared with the module's own in PyTorch: classes and flags equal, scores within
    float32 rounding (relative 1e-4 of the largest score, NaN where the module's is NaN; more
    where the indexed gradients spread about their mean by a small share of their norm, as
    where the OOD prototype lies far outside the training features, since their own float32
    rounding then shows in the scores: :func:`score_tolerance`; and each row the rounding
    float32 gives it at its distance, NaN where float32 does not resolve it, a class as near
    the row as the module's within rounding: :func:`float32_margins`); a file that disagrees
    is removed and the difference named (ValueError).

    ``external_data``: write the weights (prototypes, index) to ``<path>.data`` beside the
    graph; by default only where they pass :data:`ONE_FILE_LIMIT` (1.5 GiB; ONNX files end at
    2 GiB). Either way the export needs about the same memory (the file in one piece is
    joined from the pair, streamed), and the file (or the pair, the data first) appears
    complete or not at all.
    """
    from grood.detector import GROOD
    from grood.persistence import save_target

    path = save_target(path, suffixes=(".onnx",), what="ONNX files")
    if isinstance(example, np.ndarray):
        example = torch.from_numpy(example)
    if not isinstance(example, Tensor):
        raise TypeError(f"example must be a torch.Tensor or a numpy array (an input batch), "
                        f"got {type(example).__name__}")
    if example.ndim == 0 or example.shape[0] == 0:
        raise ValueError(f"example must be a batch of at least one row, got shape "
                         f"{tuple(example.shape)}")
    if isinstance(module, GROOD):
        from grood.index import ExactIndex

        module._check_fitted()
        if not isinstance(module.index_, ExactIndex):
            raise ValueError(f"export_onnx writes grood's exact index into the graph; this "
                             f"detector's index is {module.index_.kind!r} (fit with "
                             "index='exact' to export, or score with the detector)")
        # A head for the export alone, holding the detector's index itself (not a copy).
        module = as_module(module, flags=hasattr(module, "calibration_"), copy=False)
    # The portable head made here lives for the export alone: its index blocks are views of
    # the head's (not changed by exporting), not a second copy of the index.
    portable, head = portable_copy(module, float64=float64, search_block=search_block,
                                   copy=False)
    reference = reference_copy(module)
    if portable is head:  # features: the graph's input is float32, as the head computes
        d = head.centred_prototypes.shape[1]
        if example.ndim != 2 or example.shape[1] != d:
            raise ValueError(f"example must be features of shape [N, {d}] (the detector's "
                             f"dimension), got {tuple(example.shape)}")
        # (on the head's device: the graph itself holds no device)
        example = example.to(head.centred_prototypes.device, torch.float32)
    require("onnxscript", extra="onnx", purpose="export_onnx (torch.onnx's exporter)")
    if check:
        require("onnxruntime", extra="onnx", purpose="export_onnx's check (check=False "
                "writes the file unchecked)")
    names = ["score", "pred"] + (["is_ood"] if head.threshold is not None else [])
    if portable is not head:
        names.insert(0, "logits")
    traced = example
    if dynamic_batch and example.shape[0] == 1:  # torch.export fixes a batch of one
        traced = example.expand(2, *example.shape[1:])
    dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with torch.no_grad(), _exporter_quiet():
        program = torch.onnx.export(portable, (traced,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=names,
                                    dynamic_shapes=dims, verbose=False)
    assert program is not None  # (dynamo=True returns the program)
    _save(program, path, external_data)
    if check:
        try:
            check_onnx_file(path, reference, example, names,
                            None if head.threshold is None else float(head.threshold),
                            score_tolerance(head))
        except Exception:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
            raise
    return path


#: What torch's exporter says on every export that asks nothing of the caller: one log line
#: per torchvision operator it would register where torchvision is not installed (grood's
#: graphs use none), by that logger and the message's start, and a deprecation inside torch
#: itself (torch 2.13's ``torch.export`` copies its own tree specs), by its FutureWarning's
#: message.
_EXPORTER_NOISE_LOGGER = "torch.onnx._internal.exporter._registration"
_EXPORTER_NOISE_LOG = "torchvision is not installed"
_EXPORTER_NOISE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence the exporter's messages that ask nothing of the caller (above); every other
    warning and log record of the export passes as it is."""
    logger = logging.getLogger(_EXPORTER_NOISE_LOGGER)

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPORTER_NOISE_LOG)

    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _EXPORTER_NOISE_WARNING, FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


#: Weights up to this size (1.5 GiB, the threshold of torch's exporter; ONNX's protobuf files
#: end at 2 GiB) go into the ``.onnx`` file unless ``external_data=True``; larger ones beside it.
ONE_FILE_LIMIT = 3 << 29


def _save(program: Any, path: Path, external_data: bool | None) -> None:
    """``program.save`` to ``path`` atomically: into a temporary folder beside it, then
    renamed into place (with external data, ``<path>.data`` first, the graph naming it
    last). The exporter always writes the weights beside the graph (serialised into one
    message it held them about three times more); a file in one piece is then joined from the
    two (:func:`_join_external_data`; the weights take their size twice on disk meanwhile)."""
    from grood.persistence import written_atomically

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        program.save(str(staged), external_data=True)
        data = staged.with_name(staged.name + ".data")
        if data.exists() and not external_data and data.stat().st_size <= ONE_FILE_LIMIT:
            joined = Path(tmp) / f"joined-{path.name}"
            _join_external_data(staged, data, joined)
            staged = joined
            data.unlink()
        if data.exists():
            with written_atomically(path.with_name(path.name + ".data")) as out:
                os.replace(data, out)
        with written_atomically(path) as out:
            os.replace(staged, out)


def _join_external_data(graph: Path, data: Path, out: Path) -> None:
    """Write to ``out`` the ONNX model of ``graph`` with each weight it keeps in ``data``
    (external data) inside it as ``raw_data``: the file a single serialisation would give,
    streamed, so that no weight is held in memory. The graph's other fields are serialised
    as they are, then each ``initializer`` entry in order, an external weight's bytes copied
    from ``data`` (protobuf fields may come in any order, and each message's length is known
    before its bytes are written). A model that keeps a weight externally anywhere else (a
    Constant node's, a subgraph's) is joined by onnx itself, in memory."""
    onnx = require("onnx", extra="onnx", purpose="export_onnx")
    tensor_proto = onnx.TensorProto
    model = onnx.load(str(graph), load_external_data=False)
    if any(t.data_location == tensor_proto.EXTERNAL for t in _tensors_beyond_initializers(
            model.graph)):
        # (streamed, such a weight would still point at ``data``, deleted after the join)
        onnx.save(onnx.load(str(graph)), str(out))
        return

    def tag(message: Any, field: str) -> bytes:  # a length-delimited field's key
        return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)

    graph_tag, init_tag = tag(onnx.ModelProto, "graph"), tag(onnx.GraphProto, "initializer")
    raw_tag = tag(tensor_proto, "raw_data")
    # Each initializer in order: its bytes up to its weight's (the whole entry when inline),
    # and where the weight's n bytes lie in ``data`` (none when inline).
    weights = []
    for t in model.graph.initializer:
        if t.data_location != tensor_proto.EXTERNAL:
            weights.append((t.SerializeToString(), 0, 0))
            continue
        where = {e.key: e.value for e in t.external_data}
        if where.get("location") != data.name or "length" not in where:
            raise ValueError(f"{graph}: weight {t.name!r} is kept in {where.get('location')!r} "
                             f"({where.get('length', 'no')} bytes), not in {data.name!r} with "
                             "its length")
        header = tensor_proto()
        header.CopyFrom(t)
        header.ClearField("external_data")
        header.ClearField("data_location")
        n = int(where["length"])
        weights.append((header.SerializeToString() + raw_tag + _varint(n),
                        int(where.get("offset", 0)), n))
    model.graph.ClearField("initializer")
    graph_bytes = model.graph.SerializeToString()
    model.ClearField("graph")
    sizes = [len(head) + n for head, _, n in weights]
    graph_size = len(graph_bytes) + sum(len(init_tag) + len(_varint(m)) + m for m in sizes)
    with open(out, "wb") as f, open(data, "rb") as src:
        f.write(model.SerializeToString() + graph_tag + _varint(graph_size) + graph_bytes)
        for (head, offset, n), m in zip(weights, sizes, strict=True):
            f.write(init_tag + _varint(m) + head)
            src.seek(offset)
            left = n
            while left:
                chunk = src.read(min(left, 1 << 24))
                if not chunk:
                    raise ValueError(f"{data} ends before weight bytes {offset}..{offset + n}")
                f.write(chunk)
                left -= len(chunk)


def _tensors_beyond_initializers(graph: Any, top: bool = True) -> Iterator[Any]:
    """Every tensor of an ONNX ``graph`` but its own (top-level) initializers: sparse
    initializers, node attributes' tensors (sparse ones too), and everything in subgraphs,
    at any depth."""
    if not top:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                           ) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors_beyond_initializers(sub, top=False)


def _varint(n: int) -> bytes:
    """``n`` as a protobuf varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


#: The export check's score tolerance, relative to the largest score: float32 rounding on
#: ordinary gradients, and per float32 epsilon over their spread about their mean relative to
#: their norm (:func:`score_tolerance`): two float32 computations of the same scores were
#: measured 32-37 epsilons over that share apart (features 190 to 5,600 times farther from
#: the OOD prototype than wide, 2026-12-06).
SCORE_TOLERANCE = 1e-4
SCORE_TOLERANCE_PER_SPREAD = 200
#: Relative distance from ``FLOAT32_DISTANCE_LIMIT`` within which a row may or may not be
#: resolved in float32 (its distances there are rounded by about 1e-7 of them; the softmax's
#: log-sum-exp from them by a few times that), beside the row's own float32 rounding
#: (:func:`float32_margins`).
LIMIT_ROUNDING = 1e-5
#: Indexed gradients :func:`score_tolerance` reads at most (evenly spaced).
SPREAD_SAMPLE_ROWS = 65536


def sampled_rows(blocks: list[Tensor]) -> Tensor:
    """At most about ``SPREAD_SAMPLE_ROWS`` evenly spaced rows of the index held in
    ``blocks`` (in order), without a copy of the whole index."""
    step = max(1, sum(b.shape[0] for b in blocks) // SPREAD_SAMPLE_ROWS)
    return torch.cat([b[::step] for b in blocks])


def score_tolerance(head: PortableHead) -> float:
    """How far, relative to the largest score, two float32 computations of ``head``'s scores
    may differ: ``SCORE_TOLERANCE``, or ``SCORE_TOLERANCE_PER_SPREAD`` float32 epsilons over
    the indexed gradients' spread about their mean relative to their norm where that is
    more (gradients that all point nearly the same way lie close together next to their
    norms, and float32's rounding of each is a larger part of the distances between them)."""
    rows = sampled_rows([vectors for vectors, _ in head.index_blocks()])
    share = spread_share(rows, head.index_centre)
    if not share:
        return SCORE_TOLERANCE
    per_spread = SCORE_TOLERANCE_PER_SPREAD * torch.finfo(torch.float32).eps / share
    return max(SCORE_TOLERANCE, per_spread)


def check_onnx_file(path: Path, module: nn.Module, example: Tensor, names: list[str],
                    threshold: float | None, tolerance: float = SCORE_TOLERANCE) -> None:
    """Run ``path`` in ONNX Runtime on ``example`` and compare its outputs with ``module``'s
    (see :func:`export_onnx`): scores within ``tolerance`` of the largest plus each row's
    float32 rounding at its distance (:func:`float32_margins`), NaN where the module's are
    and where float32 cannot resolve the row, classes and flags equal but where rounding
    decides them."""
    onnxruntime = require("onnxruntime", extra="onnx", purpose="export_onnx's check")
    # Without prepacking the session holds the weights once (its default adds a copy packed
    # for the matmuls, which a check of a few rows does not need).
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})
    head = module.head if isinstance(module, GROODAttached) else module
    seen: list[Tensor] = []  # the features the head scores (a model's, for an attached one)
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            want = [t.detach().cpu().numpy() for t in module(example)]
    finally:
        hook.remove()
    margins = float32_margins(head, seen[0], torch.from_numpy(want[names.index("score")]))
    for name, g, w in zip(names, got, want, strict=True):
        if name == "score":
            _check_scores(path, g, w, margins, tolerance)
        elif name == "logits":
            scale = float(np.abs(w).max(initial=0.0)) or 1.0
            err = float(np.abs(g - w).max(initial=0.0)) / scale
            if err > 1e-3:
                raise ValueError(f"{path}: ONNX Runtime's logits differ from the model's "
                                 f"(relative {err:.3g})")
        elif not np.array_equal(g, w):
            score = want[names.index("score")]
            # Rows where float32 may or may not resolve the row, NaN in either: decided so.
            differ = (g != w) & ~(margins.either | np.isnan(got[names.index("score")])
                                  | np.isnan(score))
            if name == "is_ood":  # a score within rounding of the threshold may go either way
                assert threshold is not None  # (is_ood comes with one)
                scale = float(np.nanmax(np.abs(score), initial=0.0)) or 1.0
                differ &= np.abs(score - threshold) > tolerance * scale + margins.score
            else:  # a class as near as the module's, within float32 rounding of the distance
                differ &= ~margins.as_near(g, w)
            if differ.any():
                rows = np.flatnonzero(differ)[:5].tolist()
                raise ValueError(f"{path}: ONNX Runtime's {name} differs from the module's "
                                 f"in rows {rows}")


class Float32Margins(NamedTuple):
    """What float32 rounding may change in a float32 graph's outputs, row by row
    (:func:`float32_margins`): ``score`` the scores' difference [N] (float64), ``beyond``
    the rows float32 does not resolve (its distances past ``FLOAT32_DISTANCE_LIMIT``: NaN in
    the graph) and ``either`` those within rounding of that limit (NaN or not), and
    ``as_near(a, b)`` whether classes ``a`` and ``b`` [N] lie as near each row within the
    rounding of a float32 distance."""

    score: np.ndarray
    beyond: np.ndarray
    either: np.ndarray
    as_near: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _prototypes_of(head: nn.Module) -> tuple[Tensor, Tensor]:
    """The class prototypes [C, D] and the OOD prototype [D] ``head`` scores with, float64:
    a :class:`GROODHead`'s own, a :class:`PortableHead`'s from its float32 operands."""
    if isinstance(head, PortableHead):
        p_o = head.ood_prototype_units.double()
        return (head.centred_prototypes.double() + p_o) * head.unit, p_o * head.unit
    assert isinstance(head, GROODHead)  # (export_onnx checks these and attached models)
    return head.class_prototypes.double(), head.ood_prototype.double()


def _index_reach(head: nn.Module) -> tuple[float, Tensor | None]:
    """The largest norm of ``head``'s indexed gradients as its index holds them, from the
    squared norms the head keeps, and the centre it holds them less (None without one)."""
    if isinstance(head, PortableHead):
        top = max(float(norms.max()) for _, norms in head.index_blocks()) ** 0.5
        return top, head.index_centre
    assert isinstance(head, GROODHead)  # (export_onnx checks these and attached models)
    return float(head.index_sq_norms.max()) ** 0.5, head.index_centre


def float32_margins(head: nn.Module, features: Tensor, score: Tensor) -> Float32Margins:
    """The float32 rounding of a portable graph's outputs on ``features`` [N, D] (scored
    ``score`` [N] by ``head``), from the gradient step in float64.

    A row's gradient (norm ``q_ood``) moves by up to ``r``, ``ROUNDING_UNITS`` (the units
    within which grood counts two computations of a row's gradient the same,
    :func:`grood._gradients.rounding_distance`) of each of two float32 roundings: ``q_ood``'s
    of about one epsilon of ``1 + d_ood + |lse|`` (the softmax of distances thousands of units
    long turns their rounding into ``q_ood``'s: about 1e-7 of the distance, relative), and
    the row less the OOD prototype's, ``e = eps (|h| + |p_o|)`` (large where features share an
    offset large next to their spread), which moves every distance by up to ``e``, ``q_ood``
    by ``2 e`` relative and the direction by ``e / d_ood`` (at most ``2 q_ood``). A score,
    minus a squared distance ``s`` between gradients, then moves by up to
    ``2 sqrt(s) r + r^2``; and by twice the float32 search's expansion error bound
    (:func:`grood._fit.expansion_error_bound`), among whose rows it keeps any one. A class
    counts as near as another where their distances from the row differ by
    ``ROUNDING_UNITS`` epsilons of the larger plus ``e``.

    Measured, in units of one epsilon each (``bench/export_margins.py``): ONNX Runtime's
    and PyTorch's scores of rows 1 to 63,000 units from the training features at most 0.90
    apart (C = 3 to 1,000, D = 2 to 256, float32 and float64 detectors, the softmax in
    float64 and in float32); a float32 :class:`PortableHead` against the custom-op head on
    9,000 hostile sets (values 1e-30 to 1e30, offsets 100 times their spread, half-precision
    fits, D = 1 to 9): every score within these margins."""
    h = features.double()
    finite = torch.isfinite(h).all(1)
    h = torch.where(finite[:, None], h, 0.0)
    protos, p_ood = _prototypes_of(head)
    res = ncp_gradient(h, protos, p_ood)
    eps = torch.finfo(torch.float32).eps
    # The row less the OOD prototype, rounded in float32 (absolute), and that over d_ood.
    rounded = eps * (torch.linalg.vector_norm(h, dim=1) + torch.linalg.vector_norm(p_ood))
    d_ood = torch.linalg.vector_norm(h - p_ood, dim=1)
    q = res.q_ood.nan_to_num(0.0)
    turn = torch.where(d_ood > 0, ROUNDING_UNITS * rounded / d_ood.clamp_min(1e-300), 2.0)
    r = (rounding_distance(res, torch.float32).sqrt().nan_to_num(0.0, 0.0, 0.0)
         + q * (turn.clamp_max(2.0) + 2 * ROUNDING_UNITS * rounded))
    allow = 2 * score.double().to(r.device).abs().nan_to_num(0.0).sqrt() * r + r * r
    # A float32 search takes its candidates by the expansion, which cannot tell apart rows
    # within its error bound of each other: the one it keeps may lie that much farther.
    top, centre = _index_reach(head)
    held = res.grad if centre is None else res.grad - centre.double()
    allow += 2 * expansion_error_bound(torch.linalg.vector_norm(held, dim=1).nan_to_num(0.0),
                                       torch.tensor(top, dtype=torch.float64), h.shape[1])
    far = torch.maximum(res.min_dist, -res.lse).nan_to_num(float("inf"))
    near_limit = ((far - FLOAT32_DISTANCE_LIMIT).abs()
                  <= LIMIT_ROUNDING * FLOAT32_DISTANCE_LIMIT + ROUNDING_UNITS * rounded)

    def as_near(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.stack([a, b], 1)).to(protos.device).clamp(0, len(protos) - 1)
        dist = torch.linalg.vector_norm(protos[ids] - h[:, None], dim=2)  # [N, 2]
        gap = (dist[:, 0] - dist[:, 1]).abs()
        return (gap <= ROUNDING_UNITS * (eps * dist.max(1).values + rounded)).cpu().numpy()

    return Float32Margins(allow.cpu().numpy(), (far > FLOAT32_DISTANCE_LIMIT).cpu().numpy(),
                          near_limit.cpu().numpy(), as_near)


def _check_scores(path: Path, got: np.ndarray, want: np.ndarray, margins: Float32Margins,
                  tolerance: float) -> None:
    """Refuse a graph's scores ``got`` [N] that are not the module's ``want`` [N]: NaN exactly
    where the module's are or float32 does not resolve the row (either way at its limit),
    others within ``tolerance`` of the largest plus the row's float32 rounding."""
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    unflagged = ~nan_got & (nan_want | margins.beyond) & ~margins.either
    if unflagged.any():
        rows = np.flatnonzero(unflagged)[:5].tolist()
        raise ValueError(f"{path}: ONNX Runtime scores rows {rows}, which the module leaves "
                         "NaN or float32 does not resolve (its distances beyond "
                         f"{FLOAT32_DISTANCE_LIMIT:.6g})")
    flagged = nan_got & ~nan_want & ~margins.beyond & ~margins.either
    if flagged.any():
        rows = np.flatnonzero(flagged)[:5].tolist()
        raise ValueError(f"{path}: ONNX Runtime's scores are NaN in rows {rows}, which the "
                         "module scores and float32 resolves")
    both = ~nan_got & ~nan_want
    scale = float(np.nanmax(np.abs(want[both]), initial=0.0)) or 1.0
    over = np.abs(got - want) - margins.score - tolerance * scale  # [N], > 0: beyond
    over[~both] = -np.inf
    if len(over) and over.max() > 0:
        row = int(over.argmax())
        err = abs(float(got[row]) - float(want[row])) / scale
        raise ValueError(f"{path}: ONNX Runtime's scores differ from the module's (relative "
                         f"{err:.3g} in row {row}, beyond {tolerance:.3g} and its float32 "
                         f"rounding {float(margins.score[row]) / scale:.3g})")
