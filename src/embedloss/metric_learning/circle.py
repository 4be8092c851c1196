"""Circle loss for pairwise labels (Sun et al. 2020)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_float, check_positive_float
from embedloss.metric_learning._pairs import BasePairLoss
from embedloss.ops.keywords import keyword_options
from embedloss.ops.pair_losses import (
    PairKeywords,
    PairOptions,
    RowLoss,
    labelled_pair_loss,
    masked_logsumexp,
)
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CircleLoss", "circle_loss"]


def _rows(
    s: Tensor, positive: Tensor, negative: Tensor, margin: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """Eq. 6 per anchor with both a positive and a negative (count 1); 0 otherwise."""
    fixed = s.detach()  # α_p, α_n are weights, not differentiated (the official code)
    alpha_p = (1 + margin - fixed).clamp(min=0)
    alpha_n = (fixed + margin).clamp(min=0)
    lse_p, has_p = masked_logsumexp(-gamma * alpha_p * (s - (1 - margin)), positive)
    lse_n, has_n = masked_logsumexp(gamma * alpha_n * (s - margin), negative)
    valid = has_p & has_n
    loss = torch.logaddexp(torch.zeros_like(lse_p), lse_p + lse_n)  # softplus, exact
    return torch.where(valid, loss, 0.0), valid.long()


def _check(margin: float, gamma: float) -> tuple[float, float]:
    return check_float(margin, "margin", low=0.0), check_positive_float(gamma, "gamma")


@keyword_options(PairOptions.create, PairKeywords)
def circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.25,
    gamma: float = 256.0,
    **keywords: Unpack[PairKeywords],
) -> Tensor:
    r"""Circle loss for pairwise labels (Sun et al. 2020, Eq. 6).

    For anchor ``i`` with similarities ``s_p`` to its positives and ``s_n`` to its negatives,
    the optima ``O_p = 1 + m``, ``O_n = −m``, the margins ``Δ_p = 1 − m``, ``Δ_n = m`` and the
    self-paced weights ``α_p = [O_p − s_p]₊``, ``α_n = [s_n − O_n]₊`` (Eq. 5; treated as
    constants in the gradient, as in the official code):

        ℓ_i = log[1 + Σ_n exp(γ·α_n·(s_n − Δ_n)) · Σ_p exp(−γ·α_p·(s_p − Δ_p))]

    computed as ``softplus(lse_n + lse_p)``. The loss is the mean over the anchors that have a
    positive and a negative (the others get 0). The margins assume cosine similarities.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels.
        margin: m >= 0, the relaxation (default 0.25, the paper's face-recognition setting).
        gamma: γ > 0, the scale (default 256).
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``
            (similarities ``cos``, ``q·k``, ``−‖q − k‖``, ``−‖q − k‖²``).
        normalize: L2-normalise the embeddings first (default True; always for cosine).
        reduction: ``"mean"`` (over valid anchors), ``"sum"``, or ``"none"`` (``(N,)``).
        chunk_size: Row tiles: ``None`` dense, an int, or ``"auto"`` (default).
        gather_distributed: Score local anchors against the embeddings of every rank.

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For m < 0, γ <= 0, an unknown distance or mismatched shapes.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> circle_loss(z, torch.tensor([0, 0, 1, 1])).item() < 1e-6  # s_p = 1, s_n = 0
        True
    """
    margin, gamma = _check(margin, gamma)
    rows = partial(_rows, margin=margin, gamma=gamma)
    options = PairOptions.create(**keywords)
    return labelled_pair_loss(embeddings, labels, options, rows, similarity=True).loss


@register_loss("circle")
class CircleLoss(BasePairLoss):
    """Circle loss: self-paced weighting of pair similarities (Sun et al. 2020, Eq. 6).

    See :func:`circle_loss` for the formula. Terms: ``anchors`` (those with a positive and a
    negative: what the mean divides by) and ``anchors_without_terms``.

    Args:
        margin, gamma: As :func:`circle_loss`.
        **options: As :class:`~embedloss.metric_learning._pairs.BasePairLoss`.

    Example:
        >>> loss = CircleLoss(margin=0.4, gamma=80.0)
        >>> out = loss.compute(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> out.terms["anchors"].item()
        8.0
    """

    TERM = "anchors"
    SIMILARITY = True
    shown = f"margin!r gamma!r {BasePairLoss.shown}"

    def __init__(
        self, *, margin: float = 0.25, gamma: float = 256.0, **options: Unpack[PairKeywords]
    ) -> None:
        super().__init__(**options)
        self.margin, self.gamma = _check(margin, gamma)

    def _row_loss(self) -> RowLoss:
        return partial(_rows, margin=self.margin, gamma=self.gamma)
