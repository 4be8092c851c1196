"""Slow float64 loop oracles for the contrastive catalogue, written from the papers' equations.

They share no code with the library: every sum is an explicit Python loop over scalars, so an
error in the vectorised code (or in the core) cannot hide in its own reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.oracles import dot, lse, normalize_rows

# ----------------------------------------------------------------------------- MoCo


def moco_direction_oracle(
    anchors: Tensor,
    positives: Tensor,
    bank: Tensor | None,
    tau: float,
    labels: list[int] | None = None,
    bank_labels: list[int] | None = None,
    in_batch: bool = False,
) -> Tensor:
    """He et al. 2020, Eq. 1: −log(exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_negatives exp(q·k/τ))).

    Negatives of anchor i: bank entries whose label differs (all of them without labels), and,
    with ``in_batch``, the other positives of the batch whose label differs.
    """
    a, p = normalize_rows(anchors), normalize_rows(positives)
    b = [] if bank is None or bank.shape[0] == 0 else normalize_rows(bank)
    n = len(a)
    total = 0.0
    for i in range(n):
        pos = dot(a[i], p[i]) / tau
        negatives = [
            dot(a[i], b[m]) / tau
            for m in range(len(b))
            if labels is None or bank_labels is None or bank_labels[m] != labels[i]
        ]
        if in_batch:
            negatives += [
                dot(a[i], p[j]) / tau
                for j in range(n)
                if j != i and (labels is None or labels[j] != labels[i])
            ]
        total = total + (lse([pos, *negatives]) - pos)
    return total / n


# ----------------------------------------------------------------------------- hard negatives


def _quantile(values: list[float], q: float) -> float:
    """numpy/torch 'linear' quantile."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _row_weights(
    sims: list[float],
    positive: list[bool],
    strategy: str,
    factor: float,
    percentile: float,
    margin: float,
    beta: float,
) -> list[float]:
    negatives = [s for s, p in zip(sims, positive, strict=True) if not p]
    weights = [1.0] * len(sims)
    if strategy == "none" or not negatives:
        return weights
    if strategy == "beta":
        z = sum(math.exp(beta * s) for s in negatives)
        return [
            1.0 if p else len(negatives) * math.exp(beta * s) / z
            for s, p in zip(sims, positive, strict=True)
        ]
    if strategy == "hard":
        threshold = _quantile(negatives, percentile)
        return [
            factor if (not p and s >= threshold) else 1.0
            for s, p in zip(sims, positive, strict=True)
        ]
    s_pos = max(s for s, p in zip(sims, positive, strict=True) if p)
    return [
        factor if (not p and s_pos - margin < s < s_pos) else 1.0
        for s, p in zip(sims, positive, strict=True)
    ]


def hard_negative_oracle(
    x: Tensor,
    y: Tensor,
    tau: float,
    strategy: str = "none",
    factor: float = 2.0,
    percentile: float = 0.9,
    margin: float = 0.2,
    beta: float = 1.0,
    labels: Tensor | None = None,
) -> Tensor:
    """½(x→y + y→x) of ℓ_i = log(Σ_{p∈P} e^{s_ip/τ} + Σ_{j∉P} w_ij e^{s_ij/τ}) − mean_{p∈P} s_ip/τ.

    Weights per anchor row from the detached cosines (Robinson et al. 2021 for ``beta``); with
    ``strategy="none"`` this is CLIP's loss (Radford et al. 2021).
    """
    n = x.shape[0]
    xn, yn = normalize_rows(x), normalize_rows(y)
    lab = list(range(n)) if labels is None else [int(v) for v in labels]

    def direction(a: list[list[Tensor]], b: list[list[Tensor]]) -> Tensor:
        total = 0.0
        for i in range(n):
            s = [dot(a[i], b[j]) for j in range(n)]
            positive = [lab[j] == lab[i] for j in range(n)]
            w = _row_weights(
                [float(v.detach()) for v in s], positive, strategy, factor, percentile, margin, beta
            )
            terms = [s[j] / tau + math.log(w[j]) for j in range(n)]
            mean_pos = sum(s[j] / tau for j in range(n) if positive[j]) / sum(positive)
            total = total + lse(terms) - mean_pos
        return total / n

    return (direction(xn, yn) + direction(yn, xn)) / 2


# ----------------------------------------------------------------------------- dynamic temperature


def similarity_gap_oracle(
    x: Tensor, y: Tensor, labels: Tensor | None = None
) -> tuple[float, float]:
    """Mean cosine over positive pairs (i = j or equal labels) and over the other pairs."""
    n = x.shape[0]
    xn, yn = normalize_rows(x.detach()), normalize_rows(y.detach())
    lab = list(range(n)) if labels is None else [int(v) for v in labels]
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            (pos if lab[i] == lab[j] else neg).append(float(dot(xn[i], yn[j])))
    return sum(pos) / len(pos), (sum(neg) / len(neg) if neg else 0.0)


def legacy_gap_rule(gap: float, base: float, low: float, high: float) -> float:
    """τ = clamp(τ₀·(0.8 + 0.4·exp(−2·gap)), min, max)."""
    return min(max(base * (0.8 + 0.4 * math.exp(-2 * gap)), low), high)


# ----------------------------------------------------------------------------- DCL / DCLW


def dcl_oracle(
    z_a: Tensor, z_b: Tensor, tau: float, sigma: float | None = None, labels: Tensor | None = None
) -> Tensor:
    """Yeh et al. 2022, Eq. 6 (DCL), with the DCLW weight w_i = 2 − e^{c_i/σ}/((1/N)Σ_j e^{c_j/σ}).

    L_i^(k) = −w_i·mean_{p∈P(i)} ⟨z_i^(k), z_p⟩/τ + log Σ_{j ∉ P(i) ∪ {i}} exp(⟨z_i^(k), z_j⟩/τ)
    over the 2N views; P(i) is the other view (or every other view of the same label).
    """
    n = z_a.shape[0]
    z = normalize_rows(torch.cat([z_a, z_b]))
    lab = list(range(n)) * 2 if labels is None else [int(v) for v in torch.cat([labels, labels])]
    weights = [1.0] * n
    if sigma is not None:
        za, zb = normalize_rows(z_a.detach()), normalize_rows(z_b.detach())
        e = [math.exp(float(dot(za[i], zb[i])) / sigma) for i in range(n)]
        mean_e = sum(e) / n
        weights = [2 - e[i] / mean_e for i in range(n)]
    total = 0.0
    for i in range(2 * n):
        positives = [k for k in range(2 * n) if k != i and lab[k] == lab[i]]
        negatives = [k for k in range(2 * n) if k != i and lab[k] != lab[i]]
        mean_pos = sum(dot(z[i], z[p]) / tau for p in positives) / len(positives)
        total = total - weights[i % n] * mean_pos + lse([dot(z[i], z[j]) / tau for j in negatives])
    return total / (2 * n)
