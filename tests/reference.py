"""Independent float64 implementations of GROOD's math (arXiv 2312.14427; the README's
"What it computes"), written as plain loops.

Nothing here shares code with grood: these are the definitions the library is held to.
"""

from __future__ import annotations

import torch


def prototypes_naive(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.stack([x[y == c].double().mean(0) for c in range(n_classes)])


def ncp_naive(h: torch.Tensor, protos: torch.Tensor, p_ood: torch.Tensor):
    """Per-sample loop: (grad, q_ood, pred, min_dist, lse) in float64."""
    h, protos, p_ood = h.double(), protos.double(), p_ood.double()
    grads, qs, preds, mins, lses = [], [], [], [], []
    for row in h:
        d_cls = [float(torch.linalg.norm(row - p)) for p in protos]
        d_ood = float(torch.linalg.norm(row - p_ood))
        s = torch.tensor([-d for d in d_cls] + [-d_ood], dtype=torch.float64)
        lse = torch.logsumexp(s, 0)
        q_o = torch.exp(s[-1] - lse)
        grads.append(q_o * (row - p_ood) / d_ood if d_ood > 0 else torch.zeros_like(row))
        qs.append(q_o)
        preds.append(min(range(len(d_cls)), key=lambda j: (d_cls[j], j)))
        mins.append(min(d_cls))
        lses.append(lse)
    return (torch.stack(grads), torch.stack(qs), torch.tensor(preds),
            torch.tensor(mins, dtype=torch.float64), torch.stack(lses))


def knn_naive(q: torch.Tensor, db: torch.Tensor, k: int):
    """Brute force in float64: (D, I) sorted by (distance, index)."""
    q, db = q.double(), db.double()
    out_d, out_i = [], []
    for row in q:
        d = ((db - row) ** 2).sum(1)
        order = sorted(range(len(d)), key=lambda j: (float(d[j]), j))[:k]
        out_d.append([float(d[j]) for j in order] + [float("inf")] * (k - len(order)))
        out_i.append(order + [-1] * (k - len(order)))
    return torch.tensor(out_d, dtype=torch.float64), torch.tensor(out_i)


def grood_scores_naive(train_x, train_y, test_x, *, logits=None, k=1, p_ood=None):
    """GROOD scores and predictions straight from the definitions, in float64."""
    n_classes = logits.shape[1] if logits is not None else int(train_y.max()) + 1
    protos = prototypes_naive(train_x, train_y, n_classes)
    p_ood = protos.mean(0) if p_ood is None else p_ood.double()
    g_train, _, pred_train, _, _ = ncp_naive(train_x, protos, p_ood)
    guess = pred_train if logits is None else logits.argmax(1)
    index = g_train[train_y == guess]
    g_test, _, pred_test, _, _ = ncp_naive(test_x, protos, p_ood)
    scores = []
    for g in g_test:
        d = sorted(float(((g - gi) ** 2).sum()) for gi in index)
        scores.append(-d[k - 1])
    return torch.tensor(scores, dtype=torch.float64), pred_test


def duplicated_prototypes_problem(c: int, dtype: torch.dtype = torch.float32, *, copies: int = 7,
                                  n: int = 9, d: int = 6, seed: int = 0):
    """Features nearest to ``copies`` identical prototypes (class ids 3, 4, ...), more than the
    gradient step re-ranks. Integer coordinates keep every distance exact in any summation
    order, so the copies tie bit for bit in a GEMM as well. Returns (h, protos, p_ood); every
    row's prediction must be class 3."""
    gen = torch.Generator().manual_seed(c)
    protos = torch.randint(-3, 4, (c, d), generator=gen).to(dtype) + 40
    protos[3:3 + copies] = torch.randint(-3, 4, (d,), generator=gen).to(dtype)
    h = protos[3] + torch.randint(-1, 2, (n, d), generator=gen).to(dtype)
    return h, protos, torch.full((d,), 64.0, dtype=dtype)

