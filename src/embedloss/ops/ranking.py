"""The ranking loss of CoSENT and AnglE: every pair of pairs ordered by its score, in O(N log N).

For values ``v_i`` (a similarity per scored pair) and scores ``s_i``:

    L = log(1 + Σ_{(i, j): s_i > s_j} exp(λ·(v_j − v_i)))

Sorting by score turns the double sum into prefix sums: with the pairs in ascending score
order, ``Σ_{j: s_j < s_i} exp(λ·v_j)`` is a running log-sum-exp (``torch.logcumsumexp``) read at
the first position of ``s_i``'s tie group (a binary search), so

    L = log(1 + Σ_i exp(−λ·v_i + log Σ_{j: s_j < s_i} exp(λ·v_j)))

exactly, in log space, with O(N) memory instead of the N×N matrix of differences.
:func:`angle_similarity` is AnglE's value of a pair (Li & Li 2023), ranked the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.pair_losses import masked_log1p_sum_exp
from embedloss.ops.similarity import l2_normalize

__all__ = ["angle_similarity", "ranking_loss"]


def ranking_loss(
    values: Tensor, scores: Tensor, scale: float, *, gather_distributed: bool = False
) -> Tensor:
    """``log(1 + Σ_{s_i > s_j} exp(λ(v_j − v_i)))`` of ``values (N,)`` ranked by ``scores (N,)``.

    Ties in ``scores`` give no term. With ``gather_distributed`` the values and scores of every
    rank are gathered (values with gradient) and each rank returns the loss of the whole
    batch: the mean over ranks is the single-process loss and each rank's gradient is world ×
    the single-process one, as DDP's averaging expects.

    Example:
        >>> v = torch.tensor([0.9, 0.1])  # the higher-scored pair is the more similar one
        >>> round(ranking_loss(v, torch.tensor([1.0, 0.0]), 1.0).item(), 6)  # log(1 + e^-0.8)
        0.371101
    """
    v = gather_with_grad(values, gather_distributed).tensor * scale
    s = gather_with_grad(scores.detach(), gather_distributed).tensor
    order = s.argsort(stable=True)
    v, s = v[order], s[order]  # ascending scores
    running = torch.logcumsumexp(v, dim=0)  # (N,) log Σ_{j<=k} exp(λ v_j)
    below = torch.searchsorted(s.contiguous(), s.contiguous())  # # of j with s_j < s_i
    lower = torch.cat([running.new_full((1,), float("-inf")), running]).gather(0, below)
    return masked_log1p_sum_exp((lower - v).unsqueeze(0), (below > 0).unsqueeze(0)).squeeze(0)


def angle_similarity(x: Tensor, y: Tensor) -> Tensor:
    """AnglE's angle similarity ``Δ (N,)`` of rows of ``x``, ``y`` ``(N, 2K)``.

    Each row is read as K complex numbers ``u = a + i·b`` (first half real, second half
    imaginary). The elementwise quotient ``u / w`` of ``x = (a, b)`` and ``y = (c, d)``, scaled
    by ``‖y‖/‖x‖``, is ``((ac + bd) + i·(bc − ad)) / (‖x‖·‖y‖)``, and
    ``Δ = |Σ_k (Re + Im)|`` (the official code's ``sum`` pooling). Δ is 1 for identical rows and
    is ranked like a cosine: larger means more similar (the official code's comment calls it an
    "absolute delta angle", but its ``angle_loss`` ranks it exactly as CoSENT ranks cosines, and
    so does sentence-transformers' ``AnglELoss``).

    Δ does not change when a row is scaled, so it is computed from the L2-normalised rows
    (:func:`~embedloss.ops.similarity.l2_normalize`): no product overflows or underflows at
    any scale, and a zero row has Δ = 0.

    Example:
        >>> x = torch.tensor([[3.0, 4.0]])  # one complex number, 3 + 4i
        >>> angle_similarity(x, x)
        tensor([1.])
    """
    a, b = l2_normalize(x).chunk(2, dim=1)
    c, d = l2_normalize(y).chunk(2, dim=1)
    return (a * c + b * d + b * c - a * d).sum(dim=1).abs()  # (N,)
