"""Float64 loop oracles of the self-distillation losses, from the official code's equations.

Every sum is a Python loop over scalars (torch scalars, so autograd gives the gradients), and
none of it shares code with the library. Sources: facebookresearch/dino ``DINOLoss`` (Caron et
al. 2021, Algorithm 1), facebookresearch/dinov2 ``iBOTPatchLoss.forward_masked`` and
``KoLeoLoss``, facebookresearch/swav ``distributed_sinkhorn`` and the loss in ``main_swav.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.oracles import dot, lse, normalize_rows


def softmax_row(values: list[Tensor]) -> list[Tensor]:
    z = lse(values)
    return [torch.exp(v - z) for v in values]


def log_softmax_row(values: list[Tensor]) -> list[Tensor]:
    z = lse(values)
    return [v - z for v in values]


def cross_entropy_row(target: list[Tensor], logits: list[Tensor], tau: float) -> Tensor:
    """−Σ_k target_k · log softmax(logits/τ)_k."""
    log_q = log_softmax_row([x / tau for x in logits])
    return -sum(p * lq for p, lq in zip(target, log_q, strict=True))


def teacher_row(t: Tensor, center: list[float], tau: float) -> list[Tensor]:
    """softmax((t − c)/τ_t) of one row, without gradient (the teacher is detached)."""
    t = t.detach()
    return softmax_row([(t[k] - center[k]) / tau for k in range(t.shape[0])])


def dino_oracle(
    student: list[Tensor], teacher: list[Tensor], center: list[float], tau_t: float, tau_s: float
) -> Tensor:
    """Official DINOLoss.forward: mean over (teacher view iq, student view v ≠ iq) of the batch
    mean of −Σ q · log_softmax(s/τ_s)."""
    n = student[0].shape[0]
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            per_view = 0.0
            for b in range(n):
                q = teacher_row(t[b], center, tau_t)
                per_view = per_view + cross_entropy_row(q, list(s[b]), tau_s)
            total = total + per_view / n
            terms += 1
    return total / terms


def center_oracle(center: list[float], rows: list[Tensor], momentum: float) -> list[float]:
    """Official update_center: c·m + (1 − m)·(Σ rows)/len(rows)."""
    k = len(center)
    mean = [sum(float(r[j]) for r in rows) / len(rows) for j in range(k)]
    return [center[j] * momentum + mean[j] * (1 - momentum) for j in range(k)]


def teacher_temperature_oracle(epoch: int, warmup: float, final: float, epochs: int) -> float:
    """Official schedule: np.linspace(warmup, final, epochs) for the first epochs, then final."""
    if epoch >= epochs:
        return final
    if epochs == 1:
        return warmup
    return warmup + (final - warmup) * epoch / (epochs - 1)


def ibot_oracle(
    student: Tensor, teacher: Tensor, mask: Tensor, center: list[float], tau_t: float, tau_s: float
) -> Tensor:
    """DINOv2 forward_masked: −Σ_{masked} (1/|M_b|)·Σ_k q log p, divided by the N images."""
    n, p = mask.shape
    total = 0.0
    for b in range(n):
        masked = [i for i in range(p) if bool(mask[b, i])]
        for i in masked:
            q = teacher_row(teacher[b, i], center, tau_t)
            total = total + cross_entropy_row(q, list(student[b, i]), tau_s) / len(masked)
    return total / n


def sinkhorn_oracle(scores: Tensor, iterations: int, epsilon: float) -> list[list[float]]:
    """Official distributed_sinkhorn on one process, in exp space, with loops: codes[b][k]."""
    b_count, k_count = scores.shape
    q = [[math.exp(float(scores[b, k]) / epsilon) for b in range(b_count)] for k in range(k_count)]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for k in range(k_count):
            s = sum(q[k])
            q[k] = [x / s / k_count for x in q[k]]
        for b in range(b_count):
            s = sum(q[k][b] for k in range(k_count))
            for k in range(k_count):
                q[k][b] = q[k][b] / s / b_count
    return [[q[k][b] * b_count for k in range(k_count)] for b in range(b_count)]


def swav_oracle(
    crops: list[Tensor],
    n_high: int,
    tau: float,
    iterations: int,
    epsilon: float,
    queues: list[Tensor] | None = None,
) -> Tensor:
    """main_swav.py: for each crop with codes, Σ_{v≠i} −mean_b Σ_k q log softmax(x_v/τ),
    divided by (V − 1), then averaged over the crops with codes."""
    n = crops[0].shape[0]
    loss = 0.0
    for i in range(n_high):
        scores = crops[i].detach()
        if queues is not None:
            scores = torch.cat([scores, queues[i]])
        codes = sinkhorn_oracle(scores, iterations, epsilon)[:n]
        subloss = 0.0
        for v in range(len(crops)):
            if v == i:
                continue
            per_view = sum(cross_entropy_row(codes[b], list(crops[v][b]), tau) for b in range(n))
            subloss = subloss + per_view / n
        loss = loss + subloss / (len(crops) - 1)
    return loss / n_high


def koleo_oracle(x: Tensor, eps: float) -> Tensor:
    """DINOv2 KoLeoLoss: −mean_i log(min_{j≠i} ‖x̂_i − x̂_j‖ + ε) of normalised rows."""
    rows = normalize_rows(x)
    n = len(rows)
    total = 0.0
    for i in range(n):
        dists = [
            torch.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)))
            for j in range(n)
            if j != i
        ]
        nearest = min(dists, key=lambda d: float(d.detach()))
        total = total - torch.log(nearest + eps)
    return total / n


def nearest_row(query: Tensor, support: Tensor) -> Tensor:
    """The support row of largest cosine with ``query`` (first on ties), detached."""
    q = normalize_rows(query.detach().unsqueeze(0))[0]
    bank = normalize_rows(support.detach())
    best = max(range(len(bank)), key=lambda j: (float(dot(q, bank[j])), -j))
    return support[best].detach()
