"""What the scored-pair losses share: input checks and example inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss._validation import check_pair, check_tensor

__all__ = ["check_scored_pairs", "scored_pair_examples"]


def check_scored_pairs(embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor) -> None:
    """Validate two ``(N, D)`` batches of paired embeddings and their ``(N,)`` scores."""
    check_pair(embeddings_a, embeddings_b, "embeddings_a", "embeddings_b")
    check_tensor(scores, "scores")
    n = embeddings_a.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), one per pair, got {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")


def scored_pair_examples(
    n: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``((a, b, scores), {})``: pairs whose score rises with their similarity, plus noise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    noise = torch.linspace(0.2, 2.0, n).unsqueeze(1)
    b = a + noise * torch.randn(n, d, generator=g)
    scores = torch.linspace(5.0, 0.0, n)
    return (a.to(dtype), b.to(dtype), scores), {}
