"""Triplet margin loss with batch-all, batch-hard or semi-hard mining (Hermans et al. 2017)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_choice, check_positive_float
from embedloss.metric_learning._pairs import BasePairLoss
from embedloss.ops.keywords import keyword_options
from embedloss.ops.miners import hardest_pairs, semi_hard_negatives
from embedloss.ops.pair_losses import PairKeywords, PairOptions, RowLoss, labelled_pair_loss
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["TripletLoss", "triplet_loss"]

MINING = ("batch_all", "batch_hard", "semi_hard")


def _batch_hard(
    d: Tensor, positive: Tensor, negative: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """``[m + max_p d_ap − min_n d_an]₊`` per anchor that has both; count 1 for each."""
    hard = hardest_pairs(d, positive, negative)
    d_ap = d.gather(1, hard.positive.unsqueeze(1)).squeeze(1)
    d_an = d.gather(1, hard.negative.unsqueeze(1)).squeeze(1)
    loss = torch.where(hard.valid, (margin + d_ap - d_an).clamp(min=0), 0.0)
    return loss, hard.valid.long()


def _batch_all(
    d: Tensor, positive: Tensor, negative: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """``Σ_{p,n} [m + d_ap − d_an]₊`` per anchor and the number of its positive terms.

    For a positive with threshold ``t = m + d_ap`` the negatives below ``t`` contribute
    ``Σ (t − d_an) = k·t − (sum of the k smallest d_an)``: one sort of the row's negatives,
    a binary search and a prefix sum, O(M log M) per row instead of O(M²). The prefix sums are
    accumulated in float64 so that ``k·t − prefix`` keeps its precision for wide rows.
    """
    c, m = d.shape
    ordered = d.masked_fill(~negative, float("inf")).sort(dim=1).values  # (c, M) ascending
    n_neg = negative.sum(dim=1, keepdim=True)  # (c, 1)
    cols = torch.arange(m, device=d.device)
    finite = torch.where(cols < n_neg, ordered, 0.0).double()
    prefix = torch.cat([finite.new_zeros(c, 1), finite.cumsum(dim=1)], dim=1)  # (c, M + 1)
    threshold = margin + d  # (c, M): t for every column; only positives are used
    below = torch.searchsorted(ordered, threshold.contiguous())  # # of d_an < t (strict)
    below = torch.where(positive, below, 0)
    total = below * threshold.double() - prefix.gather(1, below)  # (c, M)
    loss = torch.where(positive, total, 0.0).sum(dim=1).to(d.dtype)
    return loss, below.sum(dim=1)


def _semi_hard(
    d: Tensor, positive: Tensor, negative: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """``Σ_p [m + d_ap − d_an*]₊`` with FaceNet's semi-hard ``n*`` per pair; count of pairs."""
    index, valid = semi_hard_negatives(d, positive, negative)
    d_an = d.gather(1, index)  # (c, M)
    loss = torch.where(valid, (margin + d - d_an).clamp(min=0), 0.0).sum(dim=1)
    return loss, valid.sum(dim=1)


_ROWS = {"batch_all": _batch_all, "batch_hard": _batch_hard, "semi_hard": _semi_hard}


def _check(margin: float, mining: str) -> tuple[float, str]:
    return (
        check_positive_float(margin, "margin", allow_zero=True),
        check_choice(mining, "mining", MINING),
    )


@keyword_options(PairOptions.create, PairKeywords)
def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,
    mining: str = "batch_hard",
    **keywords: Unpack[PairKeywords],
) -> Tensor:
    r"""Triplet margin loss over the triplets of a labelled batch.

    For an anchor ``a``, a positive ``p`` (same label, not ``a``) and a negative ``n`` (another
    label), with a distance ``d`` (:mod:`embedloss.ops.distances`), a triplet costs
    ``[m + d_ap − d_an]₊``. Mining decides which triplets count and what the mean divides by:

    * ``"batch_hard"`` (Hermans et al. 2017, Eq. 5): per anchor its hardest positive and
      hardest negative, ``[m + max_p d_ap − min_n d_an]₊``, averaged over the anchors that
      have both;
    * ``"batch_all"`` (Hermans et al. 2017, Eq. 6 with their "non-zero" average): every
      triplet, the sum averaged over the triplets with a positive loss;
    * ``"semi_hard"`` (Schroff et al. 2015, FaceNet, as TensorFlow Addons implements it): per
      anchor-positive pair the closest negative farther than the positive (the farthest
      negative when none is), averaged over the anchor-positive pairs.

    No mode builds a per-triplet tensor: memory is O(N·chunk) (:mod:`embedloss.ops.pair_losses`).

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels.
        margin: m >= 0 (default 0.2).
        mining: ``"batch_hard"`` (default), ``"batch_all"`` or ``"semi_hard"``.
        distance: ``"cosine"`` (default, ``1 − cos``), ``"dot"``, ``"euclidean"`` or
            ``"squared_euclidean"``.
        normalize: L2-normalise the embeddings first (default True; always for cosine).
        reduction: ``"mean"`` (over the counted terms above), ``"sum"``, or ``"none"`` (each
            anchor's summed terms, ``(N,)``).
        chunk_size: Row tiles: ``None`` dense, an int, or ``"auto"`` (default).
        gather_distributed: Score local anchors against the embeddings of every rank.

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For a negative margin, an unknown mining or distance, or mismatched shapes.
        TypeError: For non-tensor inputs or float labels.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> round(triplet_loss(z, torch.tensor([0, 0, 1, 1]), margin=0.2).item(), 6)
        0.0
    """
    margin, mining = _check(margin, mining)
    rows = partial(_ROWS[mining], margin=margin)
    return labelled_pair_loss(embeddings, labels, PairOptions.create(**keywords), rows).loss


@register_loss("triplet", aliases=("triplet_margin",))
class TripletLoss(BasePairLoss):
    """Triplet margin loss with batch-hard, batch-all or semi-hard mining (Hermans et al. 2017).

    See :func:`triplet_loss` for the formula and the mining modes. Terms: ``triplets`` (what
    the mean divides by: valid anchors, positive triplets or anchor-positive pairs) and
    ``anchors_without_terms``.

    Args:
        margin, mining: As :func:`triplet_loss`.
        **options: As :class:`~embedloss.metric_learning._pairs.BasePairLoss`.

    Example:
        >>> loss = TripletLoss(mining="batch_all")
        >>> out = loss.compute(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> out.loss.shape, sorted(out.terms)
        (torch.Size([]), ['anchors_without_terms', 'triplets'])
    """

    TERM = "triplets"
    shown = f"margin!r mining!r {BasePairLoss.shown}"

    def __init__(
        self, *, margin: float = 0.2, mining: str = "batch_hard", **options: Unpack[PairKeywords]
    ) -> None:
        super().__init__(**options)
        self.margin, self.mining = _check(margin, mining)

    def _row_loss(self) -> RowLoss:
        return partial(_ROWS[self.mining], margin=self.margin)
