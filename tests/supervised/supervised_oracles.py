"""Slow float64 oracles for the supervised losses, written from the papers' equations.

Deliberately naive (Python loops over anchors and keys, explicit log of a sum of exps with a
max shift) so they share no code with the library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tests.oracles import lse

Positive = Callable[[int, int], bool]


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def supcon_eq2(
    features: Tensor,
    is_positive: Positive,
    *,
    temperature: float,
    base_temperature: float | None = None,
    mode: str = "all",
    reduction: str = "mean",
) -> Tensor:
    """Khosla et al. 2020, Eq. 2 (L_out), anchors without positives left out of the mean.

    ``features`` is (N, V, D) (normalised here); ``is_positive(i, j)`` says whether sample ``j``
    is a positive of sample ``i``; the anchor itself is never a key.
    """
    z = unit(features)
    n, views = z.shape[0], z.shape[1]
    factor = 1.0 if base_temperature is None else temperature / base_temperature
    anchors = [(v, i) for v in range(views if mode == "all" else 1) for i in range(n)]
    keys = [(w, j) for w in range(views) for j in range(n)]
    losses, valid = [], []
    for v, i in anchors:
        others = [(w, j) for w, j in keys if (w, j) != (v, i)]
        positives = [(w, j) for w, j in others if is_positive(i, j)]
        if not positives:
            losses.append(torch.zeros((), dtype=z.dtype))
            valid.append(False)
            continue
        logits = {(w, j): (z[i, v] @ z[j, w]) / temperature for w, j in others}
        log_den = lse(list(logits.values()))
        terms = [logits[p] - log_den for p in positives]
        losses.append(-factor * sum(terms) / len(positives))
        valid.append(True)
    stacked = torch.stack(losses)
    if reduction == "none":
        return stacked
    if reduction == "sum":
        return stacked.sum()
    return stacked.sum() / max(sum(valid), 1)


def cross_direction_eq2(
    queries: Tensor, keys: Tensor, is_positive: Positive, *, temperature: float
) -> tuple[Tensor, list[bool]]:
    """Per-anchor L_out of ``queries`` (N, D) against every key of the other modality."""
    q, k = unit(queries), unit(keys)
    losses, valid = [], []
    for i in range(q.shape[0]):
        logits = [(q[i] @ k[a]) / temperature for a in range(k.shape[0])]
        positives = [a for a in range(k.shape[0]) if is_positive(i, a)]
        if not positives:
            losses.append(torch.zeros((), dtype=q.dtype))
            valid.append(False)
            continue
        log_den = lse(logits)
        losses.append(-sum(logits[a] - log_den for a in positives) / len(positives))
        valid.append(True)
    return torch.stack(losses), valid


def mean_valid(losses: Tensor, valid: list[bool]) -> Tensor:
    return losses.sum() / max(sum(valid), 1)


def supcon_reference(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    mode: str = "all",
) -> Tensor:
    """The official SupCon code's semantics, re-derived (features assumed normalised).

    The (N, N) sample mask (eye, equal labels, or the given one) is tiled over anchor and
    contrast views, self-pairs are removed, log-probabilities use a max-shifted denominator
    over all other embeddings, and the loss is ``−(τ/τ_base)·mean_p log p`` averaged over
    *all* anchors (so only valid when every anchor has a positive).
    """
    n, views = features.shape[0], features.shape[1]
    if mask is None:
        mask = (
            torch.eye(n, dtype=torch.float64)
            if labels is None
            else (labels[:, None] == labels[None, :]).double()
        )
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # (V·N, D)
    anchor = features[:, 0] if mode == "one" else contrast
    count = 1 if mode == "one" else views
    dots = anchor @ contrast.T / temperature
    dots = dots - dots.max(dim=1, keepdim=True).values.detach()
    tiled = mask.double().repeat(count, views)
    not_self = torch.ones_like(tiled)
    not_self[torch.arange(count * n), torch.arange(count * n)] = 0.0
    tiled = tiled * not_self
    log_prob = dots - torch.log((torch.exp(dots) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (tiled * log_prob).sum(1) / tiled.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def weighted_ce_loop(
    logits: Tensor,
    targets: Tensor,
    *,
    class_weights: Tensor | None = None,
    sample_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Σ_i s_i·[(1−ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c·(−log p_c)] / Σ_i s_i·w_{y_i}."""
    n, c = logits.shape
    w = torch.ones(c, dtype=logits.dtype) if class_weights is None else class_weights
    s = torch.ones(n, dtype=logits.dtype) if sample_weight is None else sample_weight
    total = torch.zeros((), dtype=logits.dtype)
    norm = 0.0
    for i in range(n):
        y = int(targets[i])
        if y == ignore_index:
            continue
        row = logits[i]
        top = row.max()
        log_z = top + torch.log(sum(torch.exp(row[k] - top) for k in range(c)))
        nll = [log_z - row[k] for k in range(c)]
        smooth = sum(w[k] * nll[k] for k in range(c)) * label_smoothing / c
        total = total + s[i] * ((1 - label_smoothing) * w[y] * nll[y] + smooth)
        norm += float(s[i] * w[y])
    return total / norm if norm > 0 else total * 0.0
