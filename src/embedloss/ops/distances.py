"""Pair distances and similarities of the metric-learning losses: one implementation for all.

For prepared queries ``q (n, D)`` and keys ``k (M, D)`` (:func:`prepare_for_distance`):

========================  ==========================  ==========================
``distance``              distance ``d(q, k)``        similarity ``s(q, k)``
========================  ==========================  ==========================
``"cosine"`` (default)    ``1 − cos(q, k)``           ``cos(q, k)``
``"dot"``                 ``−q·k``                    ``q·k``
``"euclidean"``           ``‖q − k‖₂``                ``−‖q − k‖₂``
``"squared_euclidean"``   ``‖q − k‖₂²``               ``−‖q − k‖₂²``
========================  ==========================  ==========================

A distance grows as points move apart and a similarity shrinks, and ``d − d' = s' − s`` for
every pair of pairs, so a margin between distances is the same margin between similarities.
Each matrix costs one GEMM; the Euclidean ones expand ``‖q‖² + ‖k‖² − 2q·k`` (clamped at 0)
and take a square root whose gradient is 0, not NaN, where two points coincide.
"""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import check_choice, compute_dtype
from embedloss.ops.similarity import prepare_embeddings

__all__ = [
    "DISTANCES",
    "check_distance",
    "pair_distance",
    "pair_similarity",
    "prepare_for_distance",
    "prepared_pair",
]

DISTANCES = ("cosine", "dot", "euclidean", "squared_euclidean")


def check_distance(distance: object) -> str:
    """Validate a ``distance`` argument (one of :data:`DISTANCES`)."""
    return check_choice(distance, "distance", DISTANCES)


def prepare_for_distance(
    x: Tensor, distance: str, *, normalize: bool, dtype: torch.dtype
) -> Tensor:
    """``x`` in the compute ``dtype``, L2-normalised when ``normalize`` or for ``"cosine"``.

    Example:
        >>> prepare_for_distance(torch.tensor([[3.0, 4.0]]), "cosine", normalize=False,
        ...                      dtype=torch.float32)
        tensor([[0.6000, 0.8000]])
    """
    return prepare_embeddings(x, normalize=normalize or distance == "cosine", dtype=dtype)


def _squared_euclidean(q: Tensor, k: Tensor) -> Tensor:
    gram = q @ k.T  # (n, M)
    sq = q.square().sum(1, keepdim=True) + k.square().sum(1).unsqueeze(0) - 2 * gram
    return sq.clamp(min=0)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``√x`` for ``x >= 0`` with gradient 0 (not ∞ or NaN) at ``x = 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


def pair_distance(q: Tensor, k: Tensor, distance: str = "cosine") -> Tensor:
    """Distances ``(n, M)`` between prepared ``q (n, D)`` and ``k (M, D)`` (see the table above).

    Example:
        >>> q = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> pair_distance(q, q, "euclidean")
        tensor([[0., 5.],
                [5., 0.]])
    """
    if distance == "cosine":
        return 1.0 - q @ k.T
    if distance == "dot":
        return -(q @ k.T)
    squared = _squared_euclidean(q, k)
    return squared if distance == "squared_euclidean" else _safe_sqrt(squared)


def pair_similarity(q: Tensor, k: Tensor, distance: str = "cosine") -> Tensor:
    """Similarities ``(n, M)`` of prepared ``q (n, D)`` and ``k (M, D)`` (see the table above).

    Example:
        >>> pair_similarity(torch.eye(2), torch.eye(2), "squared_euclidean")
        tensor([[-0., -2.],
                [-2., -0.]])
    """
    if distance in ("cosine", "dot"):
        return q @ k.T
    return -pair_distance(q, k, distance)


def prepared_pair(a: Tensor, b: Tensor, distance: str, *, normalize: bool) -> tuple[Tensor, Tensor]:
    """Both inputs in their common compute dtype, prepared for ``distance``."""
    dtype = compute_dtype(a, b)
    return (
        prepare_for_distance(a, distance, normalize=normalize, dtype=dtype),
        prepare_for_distance(b, distance, normalize=normalize, dtype=dtype),
    )
