"""Sinkhorn–Knopp soft codes of SwAV (Caron et al. 2020, Sec. 3.1 and Appendix A.1).

For prototype scores ``s`` ``(B, K)`` of B samples and K prototypes, SwAV's codes solve the
entropic optimal transport ``max_Q Tr(Qᵀ s) + ε·H(Q)`` over assignments whose prototypes share
the batch equally; the official ``distributed_sinkhorn`` approximates it by alternately scaling
the rows and the columns of ``exp(s/ε)`` (Q is K×B there):

    Q ← exp(s/ε)ᵀ / Σ exp(s/ε)
    repeat n times:  Q_k· ← Q_k· / (K · Σ_b Q_kb)        every prototype gets mass 1/K
                     Q_·b ← Q_·b / (B · Σ_k Q_kb)        every sample gets mass 1/B
    codes = B · Qᵀ                                       each sample's code sums to 1

This module does the same scalings in log space: a global factor cancels in the scaling that
follows it, so only the two normalisations remain, ``log Q −= logsumexp`` over the batch (every
rank's samples) and over the prototypes, and ``exp(s/ε)`` is never formed (no overflow at small
ε or large scores). Across ranks the batch sums are all-reduced: each prototype's log-sum-exp is
shifted by its maximum over all ranks, so the codes equal the single-process codes of the
concatenated batch, uneven batches included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import compute_dtype
from embedloss.ops.distributed import all_reduce_max_no_grad, all_reduce_sum_no_grad, world_info

__all__ = ["sinkhorn_knopp"]


def _batch_logsumexp(log_q: Tensor, distributed: bool) -> Tensor:
    """``log Σ_b exp(log_q[b, k])`` ``(1, K)`` over the samples of every rank."""
    if world_info(distributed)[0] == 1:
        return log_q.logsumexp(dim=0, keepdim=True)
    if log_q.shape[0] == 0:  # a rank without samples shifts by the others' maximum
        top = log_q.new_full((1, log_q.shape[1]), float("-inf"))
    else:
        top = log_q.max(dim=0, keepdim=True).values  # (1, K)
    top = all_reduce_max_no_grad(top)  # the same shift on every rank
    total = all_reduce_sum_no_grad((log_q - top).exp().sum(dim=0, keepdim=True))
    return top + total.log()


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, *, iterations: int = 3, epsilon: float = 0.05, distributed: bool = False
) -> Tensor:
    """SwAV's soft codes ``(B, K)`` of prototype scores ``(B, K)`` (no gradient).

    Args:
        scores: ``(B, K)`` scores of the samples against the prototypes.
        iterations: Number of (row, column) scaling rounds, >= 1 (SwAV: 3).
        epsilon: ε > 0, the entropic regularisation (SwAV: 0.05).
        distributed: Normalise over the samples of every rank (all-reduced sums).

    Returns:
        ``(B, K)`` codes: every row sums to 1, and after the last round the prototypes share
        the batch nearly equally. float64 for float64 scores, else float32.

    Example:
        >>> codes = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), epsilon=0.5)
        >>> torch.allclose(codes.sum(1), torch.ones(2)), codes.argmax(1).tolist()
        (True, [0, 1])
    """
    log_q = scores.detach().to(compute_dtype(scores)) / epsilon  # (B, K)
    for _ in range(iterations):
        log_q = log_q - _batch_logsumexp(log_q, distributed)  # prototypes: equal mass
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True)  # samples: mass 1
    return log_q.exp()
