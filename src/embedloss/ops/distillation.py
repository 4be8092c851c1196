"""What the teacher–student losses share: multi-view inputs, the centred teacher, the centre's EMA.

DINO (Caron et al. 2021), iBOT's patch loss (Zhou et al. 2022; DINOv2) and SwAV (Caron et al.
2020) score a student's log-softmax against a target distribution that carries no gradient:

    CE(p, s) = −Σ_k p_k · log softmax(s/τ_s)_k

DINO and iBOT take ``p = softmax((t − c)/τ_t)`` from the teacher's outputs ``t`` and a centre
``c``, an exponential moving average of the teacher outputs' batch mean, updated after the loss
(:func:`update_center_`). With several views, :func:`cross_view_entropy` sums the cross-entropy
over every (target view, student view) pair of different views without a loop over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import check_embeddings, compute_dtype, describe
from embedloss.ops.distributed import all_reduce_sum_no_grad, world_info

__all__ = [
    "cross_view_entropy",
    "entropy",
    "stack_views",
    "teacher_log_probs",
    "update_center_",
]

Views = Tensor | Sequence[Tensor]


def stack_views(
    views: Views, name: str, *, dim: int | None = None, allow_empty: bool = False
) -> Tensor:
    """``(V, N, K)`` views from a sequence of V ``(N, K)`` tensors or one ``(N, V, K)`` tensor.

    The sequence is the form of the official DINO / SwAV code (one tensor per crop); the
    ``(N, V, K)`` tensor keeps a sample's views together, as a trainer that splits batches along
    dim 0 (gradient caching, per-rank slices) needs. Views are cast to their compute dtype.

    Args:
        views: The views.
        name: The argument's name, for errors.
        dim: The required size K of the last dimension, or None.
        allow_empty: Accept no views (an empty sequence or ``V = 0``); returns ``(0, 0, 0)``.

    Raises:
        TypeError: If ``views`` is neither, or a view is not a floating-point tensor.
        ValueError: For an empty batch, views of different shapes, no views (unless allowed)
            or a last dimension other than ``dim``.
    """
    if isinstance(views, Tensor):
        check_embeddings(views, name, ndim=3, shape="(N, V, K) or a sequence of (N, K) views")
        stacked = views.transpose(0, 1)  # (V, N, K)
    elif isinstance(views, Sequence) and not isinstance(views, str):
        for i, v in enumerate(views):
            check_embeddings(v, f"{name}[{i}]", shape="(N, K)")
            if v.shape != views[0].shape:
                raise ValueError(
                    f"every view in {name} must have the shape of {name}[0] "
                    f"{tuple(views[0].shape)}, got {tuple(v.shape)} at {name}[{i}]"
                )
        if len(views) == 0:
            stacked = torch.zeros(0, 0, 0)
        else:
            dtype = compute_dtype(*views)
            stacked = torch.stack([v.to(dtype) for v in views])
    else:
        raise TypeError(
            f"{name} must be a sequence of (N, K) tensors or an (N, V, K) tensor, "
            f"got {describe(views)}"
        )
    if stacked.shape[0] == 0:
        if allow_empty:
            return stacked
        raise ValueError(f"{name} must hold at least one view, got none")
    if dim is not None and stacked.shape[-1] != dim:
        raise ValueError(
            f"{name} must have K={dim} outputs per view (output_dim), got {stacked.shape[-1]}"
        )
    return stacked.to(compute_dtype(stacked))


def teacher_log_probs(
    teacher: Tensor, center: Tensor | None, temperature: float, dtype: torch.dtype
) -> Tensor:
    """``log softmax((t − c)/τ_t)`` over the last dimension, in ``dtype``, without gradient."""
    t = teacher.detach().to(dtype)
    if center is not None:
        t = t - center.to(dtype)
    return F.log_softmax(t / temperature, dim=-1)


def cross_view_entropy(targets: Tensor, log_predictions: Tensor) -> Tensor:
    """``Σ_{v ≠ t} CE(p_t, q_v)`` per sample ``(N,)``, for targets of the first views.

    ``targets`` ``(T, N, K)`` are the target distributions of views ``0..T−1`` (DINO's centred
    teacher, SwAV's codes) and ``log_predictions`` ``(V, N, K)`` the student's log-probabilities
    of V >= T views, the first T being the same views as the targets. Each target is scored
    against every other view: ``Σ_t −Σ_k p_tk (Σ_v log q_vk − log q_tk)``, one pass over the
    views instead of a loop over the ``T·(V − 1)`` pairs.
    """
    t = targets.shape[0]
    others = log_predictions.sum(0) - log_predictions[:t]  # (T, N, K): Σ_{v≠t} log q_v
    return -(targets * others).sum(-1).sum(0)  # (N,)


def entropy(log_p: Tensor) -> Tensor:
    """Entropy ``−Σ_k p_k log p_k`` over the last dimension, from finite log-probabilities."""
    return -(log_p.exp() * log_p).sum(-1)


@torch.no_grad()
def update_center_(
    center: Tensor, total: Tensor, count: Tensor, momentum: float, distributed: bool = False
) -> None:
    """In place: ``c ← m·c + (1 − m)·total/count`` (DINO's centre EMA).

    ``total`` ``(K,)`` is the sum of the rows the centre follows and ``count`` their number (a
    0-d tensor); with ``distributed`` both are summed over ranks first (one collective), so every
    rank holds the centre of the global batch, uneven batches included. A batch with no rows
    (iBOT with nothing masked) leaves the centre unchanged; no value is read on the host.
    """
    stats = torch.cat([total.reshape(-1), count.reshape(1).to(total.dtype)])
    if world_info(distributed)[0] > 1:
        stats = all_reduce_sum_no_grad(stats)
    total, count = stats[:-1], stats[-1]
    mean = (total / count.clamp(min=1)).to(center.dtype)
    updated = center * momentum + mean * (1.0 - momentum)
    center.copy_(torch.where(count > 0, updated, center))
