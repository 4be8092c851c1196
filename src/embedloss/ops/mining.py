"""Hard-negative mining as pure functions: which negatives a loss up-weights, and by how much.

A miner returns log-weights ``(N, M)`` that the InfoNCE core adds to the negative logits of its
denominator (:mod:`embedloss.ops.anchors`); they are computed without gradient, as importance
weights. Positives get 0 (the core ignores them anyway).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_choice, check_float, check_positive_float

__all__ = ["HARD_NEGATIVE_STRATEGIES", "HardNegativeMining", "hard_negative_log_weights"]

HARD_NEGATIVE_STRATEGIES = ("none", "hard", "semi_hard", "beta")


class HardNegativeMining(NamedTuple):
    """A checked hard-negative strategy and its options (see :func:`hard_negative_log_weights`)."""

    strategy: str = "semi_hard"
    factor: float = 2.0
    percentile: float = 0.9
    margin: float = 0.2
    beta: float = 1.0

    def checked(self) -> HardNegativeMining:
        """These options, validated; each error names the argument."""
        return HardNegativeMining(
            check_choice(self.strategy, "strategy", HARD_NEGATIVE_STRATEGIES),
            check_float(self.factor, "hard_negative_factor", low=1.0),
            check_float(self.percentile, "percentile", low=0.0, high=1.0),
            check_positive_float(self.margin, "margin", allow_zero=True),
            check_positive_float(self.beta, "beta", allow_zero=True),
        )


@torch.no_grad()
def hard_negative_log_weights(
    similarity: Tensor, positive: Tensor, mining: HardNegativeMining
) -> Tensor:
    """Log-weights ``(N, M)`` of the negatives of ``similarity (N, M)`` (bool ``positive`` mask).

    Per row (anchor):

    * ``"none"``: all zeros;
    * ``"hard"``: negatives at or above the row's ``percentile`` of negative similarity get
      weight ``factor`` (log-weight ``log(factor)``);
    * ``"semi_hard"``: negatives with ``s_pos − margin < s_neg < s_pos`` (close to, but below,
      the row's best positive) get weight ``factor``;
    * ``"beta"``: Robinson et al. 2021 (Eq. 4): weights ∝ ``exp(β·s_neg)``, normalised so the
      mean weight over a row's negatives is 1.

    Example:
        >>> s = torch.tensor([[0.9, 0.8, 0.1]])
        >>> hard_negative_log_weights(s, s == 0.9, HardNegativeMining("semi_hard"))
        tensor([[0.0000, 0.6931, 0.0000]])
    """
    negative = ~positive
    zeros = torch.zeros_like(similarity)
    if mining.strategy == "none" or similarity.numel() == 0:  # (no rows: an empty rank)
        return zeros
    if mining.strategy == "beta":
        scores = (mining.beta * similarity).masked_fill(positive, float("-inf"))
        count = negative.sum(dim=1, keepdim=True).clamp(min=1).to(similarity.dtype)
        log_w = scores - scores.logsumexp(dim=1, keepdim=True) + count.log()
        return torch.where(negative, log_w, zeros)
    boost = math.log(mining.factor)
    if mining.strategy == "hard":
        masked = similarity.masked_fill(positive, float("nan"))
        threshold = masked.nanquantile(mining.percentile, dim=1, keepdim=True)
        chosen = negative & (similarity >= threshold)
    else:
        pos_sim = similarity.masked_fill(negative, float("-inf")).amax(dim=1, keepdim=True)
        chosen = negative & (similarity < pos_sim) & (similarity > pos_sim - mining.margin)
    return torch.where(chosen, torch.full_like(similarity, boost), zeros)
