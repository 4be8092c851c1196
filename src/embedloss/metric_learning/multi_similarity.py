"""Multi-similarity loss with its pair mining (Wang et al. 2019)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_float, check_positive_float
from embedloss.metric_learning._pairs import BasePairLoss
from embedloss.ops.keywords import keyword_options
from embedloss.ops.miners import multi_similarity_pairs
from embedloss.ops.pair_losses import (
    PairKeywords,
    PairOptions,
    RowLoss,
    labelled_pair_loss,
    masked_log1p_sum_exp,
)
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MultiSimilarityLoss", "multi_similarity_loss"]


class _Params(NamedTuple):
    alpha: float
    beta: float
    base: float
    mining: bool
    epsilon: float

    @classmethod
    def create(
        cls, alpha: float, beta: float, base: float, mining: bool, epsilon: float
    ) -> _Params:
        return cls(
            check_positive_float(alpha, "alpha"),
            check_positive_float(beta, "beta"),
            check_float(base, "base"),
            check_bool(mining, "mining"),
            check_positive_float(epsilon, "epsilon", allow_zero=True),
        )


def _rows(s: Tensor, positive: Tensor, negative: Tensor, p: _Params) -> tuple[Tensor, Tensor]:
    """Eq. 9 per anchor on a similarity tile (mined first when ``p.mining``); count 1 each."""
    if p.mining:
        positive, negative = multi_similarity_pairs(s, positive, negative, p.epsilon)
    pulled = masked_log1p_sum_exp(-p.alpha * (s - p.base), positive) / p.alpha
    pushed = masked_log1p_sum_exp(p.beta * (s - p.base), negative) / p.beta
    loss = pulled + pushed
    return loss, torch.ones_like(loss, dtype=torch.long)


@keyword_options(PairOptions.create, PairKeywords)
def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining: bool = True,
    epsilon: float = 0.1,
    **keywords: Unpack[PairKeywords],
) -> Tensor:
    r"""Multi-similarity loss (Wang et al. 2019, Eq. 9) with its pair mining (Eqs. 5–6).

    With similarities ``S_ik`` (cosine by default), the positives ``P_i`` (same label, not
    ``i``) and negatives ``N_i`` of anchor ``i``:

        ℓ_i = (1/α)·log[1 + Σ_{k∈P_i} e^{−α(S_ik − λ)}] + (1/β)·log[1 + Σ_{k∈N_i} e^{β(S_ik − λ)}]

    and the loss is the mean of ``ℓ_i`` over all N anchors (an empty set adds 0, as in the
    official code, which divides by the batch size). With ``mining`` the sets are first narrowed
    (:func:`~embedloss.ops.miners.multi_similarity_pairs`): a negative is kept if
    ``S_ik > min_{P_i} S − ε``, a positive if ``S_ik < max_{N_i} S + ε``. ``mining=False`` is
    pytorch-metric-learning's ``MultiSimilarityLoss`` without a miner.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels.
        alpha: α > 0, the positive scale (default 2).
        beta: β > 0, the negative scale (default 50).
        base: λ, the similarity threshold (default 0.5).
        mining: Apply the pair mining of Eqs. 5–6 (default True).
        epsilon: ε >= 0 of the mining (default 0.1).
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``;
            the similarity is ``cos``, ``q·k``, ``−‖q − k‖`` or ``−‖q − k‖²``.
        normalize: L2-normalise the embeddings first (default True; always for cosine).
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (``(N,)``).
        chunk_size: Row tiles: ``None`` dense, an int, or ``"auto"`` (default).
        gather_distributed: Score local anchors against the embeddings of every rank.

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For α or β <= 0, ε < 0, an unknown distance or mismatched shapes.

    Example:
        >>> import math
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # one positive pair at S = 1, no negative
        >>> loss = multi_similarity_loss(z, torch.tensor([0, 0]), mining=False)
        >>> round(loss.item(), 6) == round(math.log(1 + math.exp(-1.0)) / 2, 6)
        True
    """
    rows = partial(_rows, p=_Params.create(alpha, beta, base, mining, epsilon))
    options = PairOptions.create(**keywords)
    return labelled_pair_loss(embeddings, labels, options, rows, similarity=True).loss


@register_loss("multi_similarity")
class MultiSimilarityLoss(BasePairLoss):
    """Multi-similarity loss with pair mining (Wang et al. 2019, Eqs. 5–6 and 9).

    See :func:`multi_similarity_loss` for the formula. No terms: every anchor counts.

    Args:
        alpha, beta, base, mining, epsilon: As :func:`multi_similarity_loss`.
        **options: As :class:`~embedloss.metric_learning._pairs.BasePairLoss`.

    Example:
        >>> loss = MultiSimilarityLoss()
        >>> loss(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).shape
        torch.Size([])
    """

    SIMILARITY = True
    shown = "".join(f"{name}!r " for name in _Params._fields) + BasePairLoss.shown

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        mining: bool = True,
        epsilon: float = 0.1,
        **options: Unpack[PairKeywords],
    ) -> None:
        super().__init__(**options)
        self._params = _Params.create(alpha, beta, base, mining, epsilon)
        self.alpha, self.beta, self.base, self.mining, self.epsilon = self._params

    def _row_loss(self) -> RowLoss:
        return partial(_rows, p=self._params)
