"""CoSENT: a ranking loss over scored sentence pairs (Su 2022)."""

from __future__ import annotations

from torch import Tensor

from embedloss._validation import check_bool, check_positive_float, compute_dtype
from embedloss.base.base_loss import LossOutput
from embedloss.ops.ranking import ranking_loss
from embedloss.ops.similarity import prepare_embeddings
from embedloss.registry import register_loss
from embedloss.text._scored import BaseScoredPairLoss, check_scored_pairs

__all__ = ["CoSENTLoss", "cosent_loss"]


def _cosent(
    embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor, scale: float, gather: bool
) -> tuple[Tensor, Tensor]:
    """The loss and the ``(N,)`` cosines of the local pairs."""
    check_scored_pairs(embeddings_a, embeddings_b, scores)
    dtype = compute_dtype(embeddings_a, embeddings_b)
    a = prepare_embeddings(embeddings_a, normalize=True, dtype=dtype)
    b = prepare_embeddings(embeddings_b, normalize=True, dtype=dtype)
    cosine = (a * b).sum(dim=1)  # (N,)
    return ranking_loss(cosine, scores, scale, gather_distributed=gather), cosine


def cosent_loss(
    embeddings_a: Tensor,
    embeddings_b: Tensor,
    scores: Tensor,
    *,
    scale: float = 20.0,
    gather_distributed: bool = False,
) -> Tensor:
    r"""CoSENT loss (Su 2022): the pairs' cosines should be ordered as their scores.

    With ``cos_i = cos(a_i, b_i)`` the cosine of pair ``i``, its score ``s_i`` and the scale λ:

        L = log(1 + Σ_{(i, j): s_i > s_j} exp(λ·(cos_j − cos_i)))

    over every ordered pair of pairs with different scores (sentence-transformers' ``CoSENTLoss``).
    Computed in O(N log N) time and O(N) memory (:func:`~embedloss.ops.ranking.ranking_loss`). A
    value of the whole batch: there is no per-sample ``reduction``.

    Args:
        embeddings_a: ``(N, D)`` first sentences.
        embeddings_b: ``(N, D)`` second sentences.
        scores: ``(N,)`` gold similarity scores (any real scale; only their order matters).
        scale: λ > 0 (default 20).
        gather_distributed: Rank the pairs of every rank together (DDP).

    Shape:
        embeddings ``(N, D)``, scores ``(N,)``; output: scalar.

    Raises:
        ValueError: For mismatched shapes, scores of the wrong length, or λ <= 0.
        TypeError: For non-tensor inputs, or complex or bool scores.

    Example:
        >>> import math
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosines 1 and 0
        >>> loss = cosent_loss(a, b, torch.tensor([0.0, 1.0]), scale=1.0)  # ranked the wrong way
        >>> round(loss.item(), 6) == round(math.log(1 + math.e), 6)
        True
    """
    scale = check_positive_float(scale, "scale")
    gather = check_bool(gather_distributed, "gather_distributed")
    return _cosent(embeddings_a, embeddings_b, scores, scale, gather)[0]


@register_loss("cosent")
class CoSENTLoss(BaseScoredPairLoss):
    """CoSENT: cosines of scored sentence pairs ranked as their scores (Su 2022).

    See :func:`cosent_loss` for the formula. The loss is a value of the whole batch (no
    ``reduction``). Terms: ``cosine`` (mean cosine of the pairs).

    Args:
        scale, gather_distributed: As :func:`cosent_loss`.

    Example:
        >>> loss = CoSENTLoss()
        >>> a, b = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss(a, b, torch.tensor([0.1, 0.9, 0.4, 0.7])).shape
        torch.Size([])
    """

    def __init__(self, *, scale: float = 20.0, gather_distributed: bool = False) -> None:
        super().__init__()
        self.scale = check_positive_float(scale, "scale")
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")

    def compute(self, embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor) -> LossOutput:
        """Loss and terms for pairs ``(embeddings_a[i], embeddings_b[i])`` and ``scores (N,)``."""
        options = (self.scale, self.gather_distributed)
        loss, cosine = _cosent(embeddings_a, embeddings_b, scores, *options)
        return self.output(loss, lambda: {"cosine": cosine.mean()})

    shown = "scale"
