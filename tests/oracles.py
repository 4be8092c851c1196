"""Slow float64 loop oracles written directly from the papers' equations.

They share no code with the library: every sum is an explicit Python loop over scalars, so an
error in the vectorised core cannot hide in its own reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalize_rows(x: Tensor) -> list[list[Tensor]]:
    rows = []
    for i in range(x.shape[0]):
        norm = torch.sqrt(sum(x[i, d] * x[i, d] for d in range(x.shape[1])))
        rows.append([x[i, d] / norm for d in range(x.shape[1])])
    return rows


def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
    return sum(a * b for a, b in zip(u, v, strict=True))


def lse(values: list[Tensor]) -> Tensor:
    """log Σ exp(values), shifted by the (detached) maximum."""
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def nt_xent_oracle(z_a: Tensor, z_b: Tensor, tau: float, labels: Tensor | None = None) -> Tensor:
    """Chen et al. 2020, Eq. 1 (with labels: mean of −log softmax over all same-label views)."""
    n = z_a.shape[0]
    z = normalize_rows(torch.cat([z_a, z_b]))
    lab = None if labels is None else [int(v) for v in torch.cat([labels, labels])]
    total = 0.0
    for i in range(2 * n):
        denom = sum(torch.exp(dot(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        if lab is None:
            positives = [(i + n) % (2 * n)]
        else:
            positives = [k for k in range(2 * n) if k != i and lab[k] == lab[i]]
        total = total + sum(
            -torch.log(torch.exp(dot(z[i], z[p]) / tau) / denom) for p in positives
        ) / len(positives)
    return total / (2 * n)


def info_nce_oracle(q: Tensor, k: Tensor, tau: float, negatives: Tensor | None = None) -> Tensor:
    """van den Oord et al. 2018, Eq. 4, with in-batch, shared (M, D) or per-query (N, M, D) negatives."""
    n = q.shape[0]
    qn, kn = normalize_rows(q), normalize_rows(k)
    total = 0.0
    for i in range(n):
        pos = torch.exp(dot(qn[i], kn[i]) / tau)
        if negatives is None:
            negs = [kn[j] for j in range(n) if j != i]
        elif negatives.dim() == 2:
            negs = normalize_rows(negatives)
        else:
            negs = normalize_rows(negatives[i])
        denom = pos + sum(torch.exp(dot(qn[i], v) / tau) for v in negs)
        total = total - torch.log(pos / denom)
    return total / n


def clip_oracle(
    x: Tensor, y: Tensor, tau: float, labels: Tensor | None = None, smoothing: float = 0.0
) -> Tensor:
    """Radford et al. 2021: ½(CE over rows + CE over columns); soft targets uniform over positives,
    mixed with a uniform target by ``smoothing`` as in ``F.cross_entropy(label_smoothing=...)``."""
    n = x.shape[0]
    xn, yn = normalize_rows(x), normalize_rows(y)
    lab = list(range(n)) if labels is None else [int(v) for v in labels]
    s = [[dot(xn[i], yn[j]) / tau for j in range(n)] for i in range(n)]

    def direction(get) -> Tensor:
        total = 0.0
        for i in range(n):
            logz = torch.log(sum(torch.exp(get(i, j)) for j in range(n)))
            positives = [j for j in range(n) if lab[j] == lab[i]]
            for j in range(n):
                target = (1 - smoothing) * (
                    1.0 / len(positives) if j in positives else 0.0
                ) + smoothing / n
                total = total - target * (get(i, j) - logz)
        return total / n

    return (direction(lambda i, j: s[i][j]) + direction(lambda i, j: s[j][i])) / 2


def closed_form_identical_views_nt_xent(n: int, tau: float) -> float:
    """NT-Xent when z_a == z_b and the N rows are orthonormal: −log(e^{1/τ} / (e^{1/τ} + 2N − 2))."""
    return -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
