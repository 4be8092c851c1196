"""CLIP's symmetric image–text contrastive loss (Radford et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import check_float, check_pair, compute_dtype
from embedloss.base.base_loss import LossOutput, detached_terms
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.info_nce import (
    AnchorLosses,
    ChunkSize,
    NegativeLogWeights,
    info_nce,
    reduce_anchor_losses,
    symmetric_info_nce,
)
from embedloss.ops.layouts import paired_layout
from embedloss.ops.similarity import (
    inverse_temperature,
    pair_similarity_terms,
    prepare_embeddings,
)
from embedloss.registry import register_loss

__all__ = [
    "CLIPLoss",
    "clip_anchor_losses",
    "clip_loss",
    "combine_directions",
    "direction_terms",
    "mean_accuracy",
    "pair_similarity_terms",
]


def clip_anchor_losses(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
    normalize: bool = True,
    negative_log_weights: NegativeLogWeights = None,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> tuple[AnchorLosses, AnchorLosses]:
    """Per-anchor CLIP losses ``(image→text, text→image)``, each ``(N,)`` (see :func:`clip_loss`).

    ``negative_log_weights`` (``(N, N)`` image→text, transposed for text→image) is for losses
    that reweight negatives; it is not available with ``gather_distributed``.
    """
    check_pair(image_embeddings, text_embeddings, "image_embeddings", "text_embeddings", labels)
    dtype = compute_dtype(image_embeddings, text_embeddings)
    img = prepare_embeddings(image_embeddings, normalize=normalize, dtype=dtype)
    txt = prepare_embeddings(text_embeddings, normalize=normalize, dtype=dtype)
    scale = inverse_temperature(temperature, dtype)
    if not gather_distributed:
        return symmetric_info_nce(
            img,
            txt,
            scale,
            labels=labels,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
        )
    if negative_log_weights is not None:
        raise ValueError("negative_log_weights cannot be combined with gather_distributed")
    # Across ranks the logits are local×global, so each direction is its own core call.
    i2t, t2i = (
        info_nce(q, keys, scale, spec, label_smoothing=label_smoothing, chunk_size=chunk_size)
        for q, (keys, spec) in (
            (img, paired_layout(img, txt, labels, gather_distributed=True)),
            (txt, paired_layout(txt, img, labels, gather_distributed=True)),
        )
    )
    return i2t, t2i


def clip_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
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
        temperature: τ > 0 (float or 0-d tensor). Default 0.07.
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
    i2t, t2i = clip_anchor_losses(
        image_embeddings,
        text_embeddings,
        temperature=temperature,
        labels=labels,
        label_smoothing=label_smoothing,
        normalize=normalize,
        chunk_size=chunk_size,
        gather_distributed=gather_distributed,
    )
    return combine_directions(i2t, t2i, reduction, gather_distributed)


def combine_directions(
    i2t: AnchorLosses, t2i: AnchorLosses, reduction: str, distributed: bool
) -> Tensor:
    """Average of the two directions' reduced losses (per pair for ``reduction="none"``)."""
    first = reduce_anchor_losses(i2t, reduction, distributed=distributed)
    second = reduce_anchor_losses(t2i, reduction, distributed=distributed)
    return (first + second) / 2


def direction_terms(
    first: AnchorLosses, second: AnchorLosses, names: tuple[str, str]
) -> dict[str, Tensor]:
    """``loss_<name>`` (the mean) of both directions and their ``accuracy``."""
    return {
        f"loss_{names[0]}": reduce_anchor_losses(first, "mean"),
        f"loss_{names[1]}": reduce_anchor_losses(second, "mean"),
        "accuracy": mean_accuracy(first, second),
    }


def mean_accuracy(first: AnchorLosses, second: AnchorLosses) -> Tensor:
    """Mean of both directions' top-1 accuracies (share of anchors whose top-1 is a positive)."""
    return (first.correct.float().mean() + second.correct.float().mean()) / 2


@register_loss("clip")
class CLIPLoss(BaseContrastiveLoss):
    """CLIP's symmetric image–text contrastive loss (Radford et al. 2021).

    See :func:`clip_loss` for the formula. Terms: ``loss_image_to_text``, ``loss_text_to_image``,
    ``accuracy`` (mean top-1 retrieval of both directions), ``positive_similarity``,
    ``negative_similarity``, ``temperature``.

    Args:
        temperature: τ > 0 (default 0.07); the initial value when learnable.
        learnable_temperature: Learn ``logit_scale = log(1/τ)``, clamped at 100 as in CLIP.
        label_smoothing: ε in [0, 1] (default 0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling (``None``, an int or ``"auto"``).
        gather_distributed: Use the embeddings of all ranks (DDP).

    Example:
        >>> loss = CLIPLoss(learnable_temperature=True)
        >>> out = loss.compute(torch.randn(6, 16), torch.randn(6, 16))
        >>> sorted(out.terms)[:2]
        ['accuracy', 'loss_image_to_text']
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            learnable_temperature=learnable_temperature,
            reduction=reduction,
            normalize=normalize,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
        )
        self.label_smoothing = check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)

    def compute(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings; ``logit_scale`` overrides the module's."""
        check_pair(image_embeddings, text_embeddings, "image_embeddings", "text_embeddings", labels)
        dtype = compute_dtype(image_embeddings, text_embeddings)
        options = self.core_options(dtype, logit_scale)
        i2t, t2i = clip_anchor_losses(
            image_embeddings,
            text_embeddings,
            labels=labels,
            label_smoothing=self.label_smoothing,
            **options,
        )
        loss = combine_directions(i2t, t2i, self.reduction, self.gather_distributed)
        img = self.normalize_embeddings(image_embeddings.to(dtype))
        txt = self.normalize_embeddings(text_embeddings.to(dtype))
        terms = detached_terms(
            **direction_terms(i2t, t2i, ("image_to_text", "text_to_image")),
            temperature=1.0 / self.scale(logit_scale, dtype=torch.float64),
            **pair_similarity_terms(img, txt),
        )
        return LossOutput(loss, terms)

    def forward(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
    ) -> Tensor:
        """The CLIP loss (see :meth:`compute`)."""
        return self.compute(image_embeddings, text_embeddings, labels, logit_scale).loss
