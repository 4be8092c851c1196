"""Slow float64 loop oracles for the multimodal losses, written from the papers' equations.

Every sum is an explicit Python loop over scalars, sharing no code with the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.oracles import dot


def rows(x: Tensor, normalize: bool = True) -> list[list[Tensor]]:
    out = []
    for i in range(x.shape[0]):
        norm = torch.sqrt(sum(x[i, d] * x[i, d] for d in range(x.shape[1]))) if normalize else 1.0
        out.append([x[i, d] / norm for d in range(x.shape[1])])
    return out


def sq_dist(u: list[Tensor], v: list[Tensor]) -> Tensor:
    return sum((a - b) * (a - b) for a, b in zip(u, v, strict=True))


def siglip_oracle(
    x: Tensor, y: Tensor, tau, bias, labels: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """Zhai et al. 2023, Eq. 1: −(1/N) Σ_i Σ_j log 1/(1 + exp(−z_ij (t·x_i·y_j + b))), t = 1/τ."""
    n = x.shape[0]
    xn, yn = rows(x, normalize), rows(y, normalize)
    lab = list(range(n)) if labels is None else [int(v) for v in labels]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if lab[i] == lab[j] else -1.0
            logit = dot(xn[i], yn[j]) / tau + bias
            total = total - torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return total / n


def alignment_oracle(x: Tensor, y: Tensor, alpha: float, labels: Tensor | None = None) -> Tensor:
    """Wang & Isola 2020, Eq. 4 on normalised rows; with labels, mean over same-label y_j."""
    n = x.shape[0]
    xn, yn = rows(x), rows(y)
    lab = list(range(n)) if labels is None else [int(v) for v in labels]
    total = 0.0
    for i in range(n):
        pos = [j for j in range(n) if lab[j] == lab[i]]
        total = total + sum(sq_dist(xn[i], yn[j]) ** (alpha / 2) for j in pos) / len(pos)
    return total / n


def uniformity_oracle(x: Tensor, t: float) -> Tensor:
    """Wang & Isola 2020, Eq. 5: log of the mean over i < j of exp(−t ‖x_i − x_j‖²)."""
    n = x.shape[0]
    xn = rows(x)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return torch.log(sum(torch.exp(-t * sq_dist(xn[i], xn[j])) for i, j in pairs) / len(pairs))


def alignment_uniformity_oracle(x, y, alpha, t, weight, labels=None) -> Tensor:
    return (
        alignment_oracle(x, y, alpha, labels)
        + weight * (uniformity_oracle(x, t) + uniformity_oracle(y, t)) / 2
    )


def feature_consistency_oracle(
    f: Tensor, r: Tensor, distance: str, normalize: bool = True, beta: float = 1.0
) -> Tensor:
    """Mean over samples of the per-sample distance, one scalar at a time."""
    n, d = f.shape
    fn, rn = rows(f, normalize or distance == "cosine"), rows(r, normalize or distance == "cosine")
    total = 0.0
    for i in range(n):
        if distance == "cosine":
            total = total + (1 - dot(fn[i], rn[i]))
            continue
        acc = 0.0
        for k in range(d):
            e = fn[i][k] - rn[i][k]
            if distance == "l2":
                acc = acc + e * e
            elif distance == "l1":
                acc = acc + torch.abs(e)
            else:
                acc = acc + (
                    0.5 * e * e / beta if torch.abs(e) < beta else torch.abs(e) - 0.5 * beta
                )
        total = total + acc / d
    return total / n


def log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u > 0 else u - math.log1p(math.exp(u))
