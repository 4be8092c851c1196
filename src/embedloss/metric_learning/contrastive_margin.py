"""Contrastive margin loss over all labelled pairs (Hadsell, Chopra & LeCun 2006)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_float
from embedloss.metric_learning._pairs import BasePairLoss
from embedloss.ops.keywords import keyword_options
from embedloss.ops.pair_losses import PairKeywords, PairOptions, RowLoss, labelled_pair_loss
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ContrastiveMarginLoss", "contrastive_margin_loss"]


def contrastive_rows(
    d: Tensor, positive: Tensor, negative: Tensor, margin: float, pos_margin: float, squared: bool
) -> tuple[Tensor, Tensor]:
    """Per anchor ``Σ_p h(d_ap − m⁺) + Σ_n h(m − d_an)`` and its number of pairs."""
    pulled = (d - pos_margin).clamp(min=0)
    pushed = (margin - d).clamp(min=0)
    if squared:
        pulled, pushed = pulled.square() / 2, pushed.square() / 2
    loss = torch.where(positive, pulled, 0.0).sum(1) + torch.where(negative, pushed, 0.0).sum(1)
    return loss, (positive | negative).sum(dim=1)


def _check(margin: float, pos_margin: float, squared: bool) -> tuple[float, float, bool]:
    m, m_pos = check_float(margin, "margin"), check_float(pos_margin, "pos_margin")
    if m_pos >= m:
        raise ValueError(
            f"pos_margin must be below margin (positives are pulled inside pos_margin, "
            f"negatives pushed beyond margin), got pos_margin={pos_margin}, margin={margin}"
        )
    return m, m_pos, check_bool(squared, "squared")


@keyword_options(PairOptions.create, PairKeywords)
def contrastive_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.5,
    pos_margin: float = 0.0,
    squared: bool = True,
    **keywords: Unpack[PairKeywords],
) -> Tensor:
    r"""Contrastive margin loss (Hadsell et al. 2006, Eq. 4) over every pair of the batch.

    Positives (same label) are pulled together, negatives pushed past the margin ``m``; with a
    distance ``d`` (:mod:`embedloss.ops.distances`) and ``squared=True`` (the paper's form):

        ℓ⁺_ij = ½·[d_ij − m⁺]₊²    (same label)        ℓ⁻_ij = ½·[m − d_ij]₊²    (different label)

    ``m⁺ = 0`` is the paper's loss; ``squared=False`` uses the hinges ``[d − m⁺]₊`` and
    ``[m − d]₊`` (pytorch-metric-learning's ``ContrastiveLoss``). Every ordered pair ``(i, j)``,
    ``j ≠ i``, counts; the mean divides the sum by the number of pairs.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels.
        margin: m, the distance negatives are pushed beyond (default 0.5: cosine < 0.5).
        pos_margin: m⁺ < m, the distance positives are pulled within (default 0).
        squared: ½·hinge² as the paper (default True) or the plain hinge.
        distance: ``"cosine"`` (default, ``1 − cos``), ``"dot"``, ``"euclidean"`` or
            ``"squared_euclidean"``.
        normalize: L2-normalise the embeddings first (default True; always for cosine).
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (per-anchor sums, ``(N,)``).
        chunk_size: Row tiles: ``None`` dense, an int, or ``"auto"`` (default).
        gather_distributed: Score local anchors against the embeddings of every rank.

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For ``pos_margin >= margin``, non-finite margins, an unknown distance or
            mismatched shapes.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> contrastive_margin_loss(z, torch.tensor([0, 0, 1]), margin=0.5)  # all satisfied
        tensor(0.)
    """
    margin, pos_margin, squared = _check(margin, pos_margin, squared)
    rows = partial(contrastive_rows, margin=margin, pos_margin=pos_margin, squared=squared)
    return labelled_pair_loss(embeddings, labels, PairOptions.create(**keywords), rows).loss


@register_loss("contrastive_margin")
class ContrastiveMarginLoss(BasePairLoss):
    """Contrastive margin loss: positives pulled, negatives pushed past a margin (Hadsell 2006).

    See :func:`contrastive_margin_loss` for the formula. Terms: ``pairs`` (what the mean
    divides by) and ``anchors_without_terms``.

    Args:
        margin, pos_margin, squared: As :func:`contrastive_margin_loss`.
        **options: As :class:`~embedloss.metric_learning._pairs.BasePairLoss`.

    Example:
        >>> loss = ContrastiveMarginLoss(distance="euclidean", margin=1.0)
        >>> out = loss.compute(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> out.terms["pairs"].item()
        30.0
    """

    TERM = "pairs"
    shown = f"margin!r pos_margin!r {BasePairLoss.shown}"

    def __init__(
        self,
        *,
        margin: float = 0.5,
        pos_margin: float = 0.0,
        squared: bool = True,
        **options: Unpack[PairKeywords],
    ) -> None:
        super().__init__(**options)
        self.margin, self.pos_margin, self.squared = _check(margin, pos_margin, squared)

    def _row_loss(self) -> RowLoss:
        return partial(
            contrastive_rows, margin=self.margin, pos_margin=self.pos_margin, squared=self.squared
        )
