"""Float64 loop oracles of the metric-learning losses, written from the papers' equations.

They share no code with the library: distances, masks, mining and sums are explicit Python
loops over scalars, so an error in the vectorised, tiled code cannot hide in its reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.oracles import dot, lse, normalize_rows


def val(t: Tensor) -> float:
    """A scalar's value, for comparisons (not differentiated)."""
    return float(t.detach())


def rows(x: Tensor, normalize: bool) -> list[list[Tensor]]:
    return normalize_rows(x) if normalize else [list(r) for r in x]


def distance(u: list[Tensor], v: list[Tensor], kind: str) -> Tensor:
    """The distance table of ``embedloss.ops.distances`` (u, v already normalised if asked)."""
    if kind == "cosine":
        return 1 - dot(u, v) / torch.sqrt(dot(u, u) * dot(v, v))
    if kind == "dot":
        return -dot(u, v)
    squared = sum((a - b) ** 2 for a, b in zip(u, v, strict=True))
    if kind == "squared_euclidean":
        return squared
    return torch.sqrt(squared) if val(squared) > 0 else squared * 0


def similarity(u: list[Tensor], v: list[Tensor], kind: str) -> Tensor:
    return 1 - distance(u, v, kind) if kind == "cosine" else -distance(u, v, kind)


def _pairs(labels: Tensor, i: int) -> tuple[list[int], list[int]]:
    n = labels.shape[0]
    pos = [j for j in range(n) if j != i and int(labels[j]) == int(labels[i])]
    neg = [j for j in range(n) if int(labels[j]) != int(labels[i])]
    return pos, neg


def triplet_oracle(
    x: Tensor, labels: Tensor, margin: float, mining: str, kind: str = "cosine", normalize=True
) -> Tensor:
    """Hermans et al. 2017, Eqs. 5–6; FaceNet semi-hard as TF Addons' triplet_semihard_loss."""
    z = rows(x, normalize)
    total, count = 0.0, 0
    for a in range(len(z)):
        pos, neg = _pairs(labels, a)
        if not pos or not neg:
            continue
        d = {j: distance(z[a], z[j], kind) for j in pos + neg}
        if mining == "batch_hard":
            hp = max(pos, key=lambda j: val(d[j]))  # max() keeps the first maximum
            hn = min(neg, key=lambda j: val(d[j]))
            total = total + torch.clamp(margin + d[hp] - d[hn], min=0)
            count += 1
        elif mining == "batch_all":
            for p in pos:
                for n in neg:
                    value = margin + d[p] - d[n]
                    if val(value) > 0:
                        total, count = total + value, count + 1
        else:  # semi_hard
            for p in pos:
                farther = [n for n in neg if val(d[n]) > val(d[p])]
                if farther:
                    chosen = min(farther, key=lambda j: val(d[j]))
                else:
                    chosen = max(neg, key=lambda j: val(d[j]))
                total = total + torch.clamp(margin + d[p] - d[chosen], min=0)
                count += 1
    return total / max(count, 1) if count else x.sum() * 0


def contrastive_oracle(
    x: Tensor, labels: Tensor, margin: float, pos_margin: float, squared: bool, kind: str
) -> Tensor:
    """Hadsell et al. 2006, Eq. 4, averaged over the ordered pairs (i, j), j ≠ i."""
    z = rows(x, True)
    total, count = 0.0, 0
    for i in range(len(z)):
        for j in range(len(z)):
            if i == j:
                continue
            d = distance(z[i], z[j], kind)
            same = int(labels[i]) == int(labels[j])
            h = torch.clamp(d - pos_margin if same else margin - d, min=0)
            total = total + (h * h / 2 if squared else h)
            count += 1
    return total / count


def multi_similarity_oracle(
    x: Tensor, labels: Tensor, alpha: float, beta: float, base: float, epsilon: float | None
) -> Tensor:
    """Wang et al. 2019 Eq. 9 with the Eq. 5–6 mining, as the official MalongTech code: anchors
    whose mined sets are empty are skipped, and the sum is divided by the batch size."""
    z = rows(x, True)
    total = 0.0
    for i in range(len(z)):
        pos, neg = _pairs(labels, i)
        s = {j: similarity(z[i], z[j], "cosine") for j in pos + neg}
        if epsilon is not None:
            if not pos or not neg:
                continue
            min_pos = min(val(s[j]) for j in pos)
            max_neg = max(val(s[j]) for j in neg)
            neg = [j for j in neg if val(s[j]) + epsilon > min_pos]
            pos = [j for j in pos if val(s[j]) - epsilon < max_neg]
            if not pos or not neg:
                continue
        if pos:
            total = (
                total + torch.log(1 + sum(torch.exp(-alpha * (s[j] - base)) for j in pos)) / alpha
            )
        if neg:
            total = total + torch.log(1 + sum(torch.exp(beta * (s[j] - base)) for j in neg)) / beta
    return total / len(z)


def circle_oracle(x: Tensor, labels: Tensor, margin: float, gamma: float) -> Tensor:
    """Sun et al. 2020, Eq. 6 (α_p, α_n detached, as the official code), mean over anchors with
    a positive and a negative."""
    z = rows(x, True)
    total, count = 0.0, 0
    for i in range(len(z)):
        pos, neg = _pairs(labels, i)
        if not pos or not neg:
            continue
        s = {j: similarity(z[i], z[j], "cosine") for j in pos + neg}
        neg_terms = [gamma * max(val(s[j]) + margin, 0.0) * (s[j] - margin) for j in neg]
        pos_terms = [-gamma * max(1 + margin - val(s[j]), 0.0) * (s[j] - (1 - margin)) for j in pos]
        both = lse(neg_terms) + lse(pos_terms)
        total = total + torch.logaddexp(torch.zeros((), dtype=both.dtype), both)  # log(1 + e^x)
        count += 1
    return total / count


def class_cosines_oracle(x: Tensor, weight: Tensor, sub_centers: int = 1) -> list[list[Tensor]]:
    z, w = normalize_rows(x), normalize_rows(weight)
    classes = weight.shape[0] // sub_centers
    out = []
    for i in range(len(z)):
        row = []
        for c in range(classes):
            centres = [dot(z[i], w[c * sub_centers + k]) for k in range(sub_centers)]
            row.append(max(centres, key=val))
        out.append(row)
    return out


def margin_softmax_oracle(cos: list[list[Tensor]], labels: Tensor, target, scale: float) -> Tensor:
    """Mean over samples of −log softmax with the target class's logit replaced by target(cos)."""
    total = 0.0
    for i, row in enumerate(cos):
        y = int(labels[i])
        logits = [scale * (target(c) if j == y else c) for j, c in enumerate(row)]
        total = total + lse(logits) - logits[y]
    return total / len(cos)


def arcface_target(margin: float):
    """Deng et al. 2019: cos(θ + m), and cos θ − m·sin m past θ + m = π (the official code)."""

    def target(c: Tensor) -> Tensor:
        theta = torch.acos(c)
        if val(theta) + margin <= math.pi:
            return torch.cos(theta + margin)
        return c - margin * math.sin(margin)

    return target


def proxy_anchor_oracle(x: Tensor, labels: Tensor, weight: Tensor, alpha: float, delta: float):
    """Kim et al. 2020, Eq. 4."""
    cos = class_cosines_oracle(x, weight)
    classes = weight.shape[0]
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for p in range(classes):
        pos = [cos[i][p] for i in range(len(cos)) if int(labels[i]) == p]
        neg = [cos[i][p] for i in range(len(cos)) if int(labels[i]) != p]
        if pos:
            with_pos += 1
            pos_total = pos_total + torch.log(1 + sum(torch.exp(-alpha * (s - delta)) for s in pos))
        if neg:
            neg_total = neg_total + torch.log(1 + sum(torch.exp(alpha * (s + delta)) for s in neg))
    return pos_total / with_pos + neg_total / classes
