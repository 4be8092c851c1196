"""CLIP's symmetric image–text contrastive loss (Radford et al. 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from embedloss._validation import check_float
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.ops.info_nce import (
    ContrastiveOptions,
    SmoothedKeywords,
    contrastive_keywords,
    paired_symmetric,
)
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CLIPLoss", "clip_loss"]

NAMES = ("image_embeddings", "text_embeddings")


@contrastive_keywords(SmoothedKeywords, temperature=0.07)
def clip_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    labels: Tensor | None = None,
    **keywords: Unpack[SmoothedKeywords],
) -> Tensor:
    r"""The symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3 pseudo-code).

    With normalised image and text embeddings ``x_i``, ``y_j`` and logits ``ℓ_ij = x_i·y_j/τ``:

        L = ½·[ (1/N)·Σ_i CE(ℓ_i·, i) + (1/N)·Σ_j CE(ℓ_·j, j) ]

    With ``labels``, every pair sharing a label is positive and CE is taken against a uniform
    target over the positives; ``label_smoothing`` ε mixes that target with a uniform one
    (as ``F.cross_entropy(label_smoothing=ε)``).

    Args:
        image_embeddings: ``(N, D)``.
        text_embeddings: ``(N, D)``; row ``i`` pairs with image ``i``.
        temperature: τ > 0 (the function also takes a 0-d tensor). Default 0.07.
        labels: Optional ``(N,)`` identities.
        label_smoothing: ε in [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``: the two directions averaged per pair).
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling.
        gather_distributed: Score local embeddings against those of every rank.

    Raises:
        ValueError: For mismatched shapes, an empty batch, bad labels, τ <= 0 or ε outside [0, 1].

    Example:
        >>> import math
        >>> x = torch.eye(3)
        >>> round(clip_loss(x, x, temperature=1.0).item(), 6) == round(math.log(math.e + 2) - 1, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    return paired_symmetric(image_embeddings, text_embeddings, labels, options, NAMES).loss


@register_loss("clip")
class CLIPLoss(BaseContrastiveLoss, temperature=0.07):
    """CLIP's symmetric image–text contrastive loss (Radford et al. 2021).

    See :func:`clip_loss` for the formula. Terms: ``loss_image_to_text``, ``loss_text_to_image``,
    ``accuracy`` (mean top-1 retrieval of both directions), ``positive_similarity``,
    ``negative_similarity``, ``temperature``.

    Args:
        temperature, label_smoothing: As :func:`clip_loss` (τ: the initial value if learnable).
        **options: ``learnable_temperature``, ``reduction``, ``normalize``, ``chunk_size``,
            ``gather_distributed``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = CLIPLoss(learnable_temperature=True)
        >>> out = loss.compute(torch.randn(6, 16), torch.randn(6, 16))
        >>> sorted(out.terms)[:2]
        ['accuracy', 'loss_image_to_text']
    """

    def __init__(self, *, label_smoothing: float = 0.0, **options: Unpack[ContrastiveArgs]) -> None:
        super().__init__(**options)
        self.label_smoothing = check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)

    def compute(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings; ``logit_scale`` overrides the module's."""
        options = self.options(logit_scale)
        result = paired_symmetric(image_embeddings, text_embeddings, labels, options, NAMES)
        return self.paired_output(result, options, ("image_to_text", "text_to_image"))
