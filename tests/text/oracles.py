"""Float64 oracles of the text losses, written from sentence-transformers' and AnglE's code."""

from __future__ import annotations

import torch
from torch import Tensor

from tests.oracles import dot, lse, normalize_rows


def cosent_oracle(values: list[Tensor], scores: Tensor, scale: float) -> Tensor:
    """sentence-transformers' CoSENTLoss: logsumexp over [0] + {λ(v_i − v_j) : y_i < y_j}."""
    n = len(values)
    terms = [
        scale * (values[i] - values[j])
        for i in range(n)
        for j in range(n)
        if float(scores[i]) < float(scores[j])
    ]
    return lse([values[0] * 0, *terms])


def pair_cosines(a: Tensor, b: Tensor) -> list[Tensor]:
    an, bn = normalize_rows(a), normalize_rows(b)
    return [dot(an[i], bn[i]) for i in range(len(an))]


def angle_similarities(a: Tensor, b: Tensor) -> list[Tensor]:
    """AnglE's angle_loss / sentence-transformers' pairwise_angle_sim, one pair at a time:
    (x_re + i·x_im)·conj(y_re + i·y_im) / ‖y‖², rescaled by ‖y‖/‖x‖, pooled by summing
    real and imaginary parts, absolute value."""
    half = a.shape[1] // 2
    out = []
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        z = sum(y[k] ** 2 for k in range(y.shape[0]))
        nx = torch.sqrt(sum(x[k] ** 2 for k in range(x.shape[0])))
        total = 0.0
        for k in range(half):
            re = (x[k] * y[k] + x[half + k] * y[half + k]) / z
            im = (x[half + k] * y[k] - x[k] * y[half + k]) / z
            total = total + (re + im) / (nx / torch.sqrt(z))
        out.append(torch.abs(total))
    return out


def ibn_oracle(a: Tensor, b: Tensor, positive: list[bool], scale: float) -> Tensor:
    """AnglE's in_batch_negative_loss on its zigzag layout [a_0, b_0, a_1, b_1, ...]: a text of a
    positive pair scores its partner against every other text (itself excluded); returned as
    the sum over the texts of positive pairs (AnglE then divides by all 2N texts)."""
    texts = []
    for i in range(a.shape[0]):
        texts += [a[i], b[i]]
    z = normalize_rows(torch.stack(texts))
    total = 0.0
    for r in range(len(z)):
        if not positive[r // 2]:
            continue
        partner = r + 1 if r % 2 == 0 else r - 1
        logits = {c: scale * dot(z[r], z[c]) for c in range(len(z)) if c != r}
        total = total + lse(list(logits.values())) - logits[partner]
    return total
