"""Pair and triplet miners as pure functions over row tiles: which pairs a loss sees.

A miner takes one tile of an anchor-by-key matrix ``(c, M)`` — distances, or similarities for
the multi-similarity miner — with the boolean ``positive`` and ``negative`` masks of the tile
(same label / different label, the anchor itself in neither) and returns selections: indices
of the chosen keys, or narrowed masks. Miners work without gradient; a loss then reads the
selected values (with gradient) from its own matrix, so any pair loss of
:mod:`embedloss.ops.pair_losses` can use any miner. Every row is independent, so a miner on a
row tile equals the miner on the whole matrix restricted to those rows, and shapes never
depend on values (no host synchronisation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HardestPairs",
    "batch_hard_pairs",
    "hardest_pairs",
    "multi_similarity_pairs",
    "semi_hard_negatives",
]


class HardestPairs(NamedTuple):
    """Per anchor row: the column of its hardest positive and of its hardest negative.

    Attributes:
        positive: ``(c,)`` long, the positive with the largest distance (0 when there is none).
        negative: ``(c,)`` long, the negative with the smallest distance (0 when there is none).
        valid: ``(c,)`` bool, rows with at least one positive and one negative.
    """

    positive: Tensor
    negative: Tensor
    valid: Tensor


@torch.no_grad()
def hardest_pairs(distance: Tensor, positive: Tensor, negative: Tensor) -> HardestPairs:
    """Batch-hard mining (Hermans et al. 2017, Eq. 5): the hardest positive and negative per row.

    Ties go to the first column, as ``argmax`` breaks them.

    Example:
        >>> d = torch.tensor([[0.0, 0.3, 0.9, 0.5, 0.4]])
        >>> pos = torch.tensor([[False, True, True, False, False]])
        >>> hardest_pairs(d, pos, ~pos & (torch.arange(5) > 0))
        HardestPairs(positive=tensor([2]), negative=tensor([4]), valid=tensor([True]))
    """
    far = torch.where(positive, distance, float("-inf")).argmax(dim=1)  # (c,)
    near = torch.where(negative, distance, float("inf")).argmin(dim=1)  # (c,)
    # A row has a positive iff its arg-max is one (argmax of an all -inf row is column 0).
    valid = positive.gather(1, far.unsqueeze(1)) & negative.gather(1, near.unsqueeze(1))
    return HardestPairs(far, near, valid.squeeze(1))


@torch.no_grad()
def batch_hard_pairs(distance: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hardest_pairs` as masks ``(positive, negative)``: one pair of each per valid row.

    The pair-loss form of batch-hard mining: a contrastive or circle loss given these masks
    sees only each anchor's hardest positive and hardest negative.
    """
    hard = hardest_pairs(distance, positive, negative)
    cols = torch.arange(distance.shape[1], device=distance.device)
    keep_pos = (cols == hard.positive.unsqueeze(1)) & hard.valid.unsqueeze(1)
    keep_neg = (cols == hard.negative.unsqueeze(1)) & hard.valid.unsqueeze(1)
    return keep_pos, keep_neg


@torch.no_grad()
def semi_hard_negatives(
    distance: Tensor, positive: Tensor, negative: Tensor
) -> tuple[Tensor, Tensor]:
    """FaceNet semi-hard negatives (Schroff et al. 2015, Eq. 4), one per anchor-positive pair.

    For anchor ``a`` and positive ``p`` the negative is the closest one *farther* than the
    positive, ``argmin {d_an : d_an > d_ap}``; when no negative is farther than ``p``, the
    farthest negative (TensorFlow Addons' ``triplet_semihard_loss``, the FaceNet authors'
    reference). One sort of each row's negative distances and a binary search per positive:
    ``O(M log M)`` per row, never a per-triplet ``(c, M, M)`` tensor.

    Returns:
        ``(index, valid)``: ``(c, M)`` long, the column of the chosen negative for every
        positive column; ``(c, M)`` bool, true on positives of rows that have a negative.

    Example:
        >>> d = torch.tensor([[0.0, 0.3, 0.8, 0.5, 0.7]])
        >>> pos = torch.tensor([[False, True, True, False, False]])
        >>> index, valid = semi_hard_negatives(d, pos, ~pos & (torch.arange(5) > 0))
        >>> index[valid].tolist()  # p=1 (0.3): the negative at 0.5; p=2 (0.8): none farther, 0.7
        [3, 4]
    """
    ordered, order = distance.masked_fill(~negative, float("inf")).sort(dim=1)  # (c, M)
    count = negative.sum(dim=1, keepdim=True)  # (c, 1)
    # Position of the first negative distance strictly above d_ap (inf sorts last).
    first_above = torch.searchsorted(ordered, distance.contiguous(), right=True)  # (c, M)
    chosen = torch.where(first_above < count, first_above, count - 1).clamp(min=0)
    valid = positive & (count > 0)
    return order.gather(1, chosen), valid


@torch.no_grad()
def multi_similarity_pairs(
    similarity: Tensor, positive: Tensor, negative: Tensor, epsilon: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Multi-similarity pair mining (Wang et al. 2019, Eqs. 5–6) on a similarity tile.

    A negative ``k`` of anchor ``i`` is kept when ``S_ik > min_{positives} S_ij − ε`` (Eq. 5), a
    positive when ``S_ik < max_{negatives} S_ij + ε`` (Eq. 6), both compared with the unmined
    sets. A row keeps a positive exactly when it keeps a negative.

    Returns:
        ``(positive, negative)`` masks ``(c, M)``, subsets of the given ones.

    Example:
        >>> s = torch.tensor([[0.9, 0.2, 0.6, 0.1]])
        >>> pos = torch.tensor([[True, True, False, False]])
        >>> keep_pos, keep_neg = multi_similarity_pairs(s, pos, ~pos, epsilon=0.1)
        >>> keep_pos.tolist(), keep_neg.tolist()
        ([[False, True, False, False]], [[False, False, True, False]])
    """
    hardest_pos = similarity.masked_fill(~positive, float("inf")).amin(dim=1, keepdim=True)
    hardest_neg = similarity.masked_fill(~negative, float("-inf")).amax(dim=1, keepdim=True)
    keep_neg = negative & (similarity + epsilon > hardest_pos)
    keep_pos = positive & (similarity - epsilon < hardest_neg)
    return keep_pos, keep_neg
