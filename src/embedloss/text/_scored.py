"""What the scored-pair losses share: input checks and example inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import check_pair, check_tensor
from embedloss.base.base_loss import BaseLoss, Examples

__all__ = ["BaseScoredPairLoss", "check_scored_pairs"]


def check_scored_pairs(embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor) -> None:
    """Validate two ``(N, D)`` batches of paired embeddings and their ``(N,)`` scores."""
    check_pair(embeddings_a, embeddings_b, "embeddings_a", "embeddings_b")
    check_tensor(scores, "scores")
    n = embeddings_a.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), one per pair, got {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")


class BaseScoredPairLoss(BaseLoss):
    """Base of the losses over scored sentence pairs: a value of the whole batch (no reduction).

    A loss implements ``compute(embeddings_a, embeddings_b, scores)``: pairs
    ``(embeddings_a[i], embeddings_b[i])`` ``(N, D)`` and their ``scores (N,)``.
    """

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``(embeddings_a, embeddings_b, scores)``: pairs whose score rises with similarity."""
        a = torch.randn(n, d, generator=g)
        noise = torch.linspace(0.2, 2.0, n).unsqueeze(1)
        b = a + noise * torch.randn(n, d, generator=g)
        scores = torch.linspace(5.0, 0.0, n)
        return (a.to(dtype), b.to(dtype), scores), {}
