"""A weighted mix of CLIP, NT-Xent and supervised contrastive losses over two modalities."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_float, check_labels, check_pair
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.composite._parts import weighted_sum
from embedloss.ops.anchors import AnchorLosses, mean_accuracy
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    contrastive_keywords,
    nt_xent,
    paired_symmetric,
)
from embedloss.ops.supcon import supcon_views
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MixedMultimodalLoss", "mixed_multimodal_loss"]

NAMES = ("image_embeddings", "text_embeddings")


def _per_pair(reduced: Tensor, reduction: str) -> Tensor:
    # NT-Xent and SupCon score 2N anchors [images; texts]; a pair's value is the mean of its
    # two anchors, so "none" is (N,) and "sum" adds pairs (as clip adds averaged directions).
    if reduction == "none":
        return reduced.reshape(2, reduced.shape[0] // 2).mean(dim=0)
    return reduced / 2 if reduction == "sum" else reduced


def _mixed(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    labels: Tensor | None,
    pair_labels: Tensor | None,
    options: ContrastiveOptions,
    weights: dict[str, float],
) -> tuple[Tensor, dict[str, Tensor], tuple[AnchorLosses, ...]]:
    """The weighted sum, the reduced parts (``"supcon"`` only with ``labels``), CLIP's anchors."""
    check_pair(image_embeddings, text_embeddings, *NAMES, labels)
    if pair_labels is not None:
        check_labels(pair_labels, image_embeddings.shape[0], "pair_labels")
    img, txt = options.prepare(image_embeddings, text_embeddings)
    prepared = dataclasses.replace(options, normalize=False)
    clip = paired_symmetric(img, txt, pair_labels, prepared, NAMES)
    nt = nt_xent(img, txt, pair_labels, prepared)
    parts = {"clip": clip.loss, "nt_xent": _per_pair(nt.loss, options.reduction)}
    if labels is not None:
        views = torch.stack([img, txt], dim=1)  # (N, 2, D): anchors [images; texts]
        supcon = supcon_views(views, labels, None, options)
        parts["supcon"] = _per_pair(options.reduce(supcon), options.reduction)
    return weighted_sum(parts, weights), parts, clip.anchors


@contrastive_keywords(temperature=0.07)
def mixed_multimodal_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    labels: Tensor | None = None,
    pair_labels: Tensor | None = None,
    clip_weight: float = 0.4,
    nt_xent_weight: float = 0.3,
    supcon_weight: float = 0.3,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""Weighted sum of CLIP, NT-Xent and SupCon over paired image and text embeddings.

        L = w_clip·L_CLIP(x, y) + w_nt·L_NT-Xent([x; y]) + w_sup·L_SupCon([x; y], labels)

    * ``L_CLIP``: the symmetric InfoNCE of :func:`~embedloss.multimodal.clip.clip_loss`
      (Radford et al. 2021);
    * ``L_NT-Xent``: :func:`~embedloss.contrastive.simclr.simclr_loss` with the image and text
      of a pair as its two views (Chen et al. 2020, Eq. 1);
    * ``L_SupCon``: SupCon's L_out (Khosla et al. 2020, Eq. 2) over the same 2N embeddings,
      every image and text of a class positive to each other.

    The SupCon term needs class ``labels``. Without them it is **dropped**: the loss is
    ``w_clip·L_CLIP + w_nt·L_NT-Xent`` with the remaining weights **not** renormalised (so a
    part's scale does not jump between labelled and unlabelled batches; the legacy loss gave
    the same value but reported a zero SupCon loss). ``pair_labels`` are identities (the legacy
    ``match_ids``): pairs with equal ids are extra positives in the CLIP and NT-Xent parts.
    One temperature serves all three parts.

    Args:
        image_embeddings: ``(N, D)``.
        text_embeddings: ``(N, D)``; row ``i`` pairs with image ``i``.
        labels: Optional ``(N,)`` classes; enable the SupCon part.
        pair_labels: Optional ``(N,)`` identities for the CLIP and NT-Xent parts.
        temperature: τ > 0 (float or 0-d tensor). Default 0.07.
        clip_weight: Weight of the CLIP part (default 0.4).
        nt_xent_weight: Weight of the NT-Xent part (default 0.3).
        supcon_weight: Weight of the SupCon part (default 0.3), used only with ``labels``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``: each part's per-pair loss,
            the average of its two anchors for NT-Xent and SupCon).
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling.
        gather_distributed: Contrast with the embeddings of every rank.

    Raises:
        ValueError: For mismatched shapes, bad labels, τ <= 0 or negative weights.

    Example:
        >>> from embedloss.multimodal.clip import clip_loss
        >>> from embedloss.contrastive.simclr import simclr_loss
        >>> x, y = torch.randn(6, 8), torch.randn(6, 8)
        >>> expected = 0.4 * clip_loss(x, y) + 0.3 * simclr_loss(x, y, temperature=0.07)
        >>> torch.allclose(mixed_multimodal_loss(x, y), expected)
        True
    """
    weights = _check_weights(clip_weight, nt_xent_weight, supcon_weight)
    options = ContrastiveOptions.create(**keywords)
    return _mixed(image_embeddings, text_embeddings, labels, pair_labels, options, weights)[0]


def _check_weights(clip: float, nt_xent: float, supcon: float) -> dict[str, float]:
    return {
        "clip": check_float(clip, "clip_weight", low=0.0),
        "nt_xent": check_float(nt_xent, "nt_xent_weight", low=0.0),
        "supcon": check_float(supcon, "supcon_weight", low=0.0),
    }


@register_loss("mixed_multimodal", category="multimodal")
class MixedMultimodalLoss(BaseContrastiveLoss, temperature=0.07):
    """Weighted sum of CLIP, NT-Xent and (with labels) SupCon over two modalities.

    See :func:`mixed_multimodal_loss`: without ``labels`` the SupCon part is dropped and the
    other weights are kept as they are. Terms: ``loss_clip``, ``loss_nt_xent``, ``loss_supcon``
    (only with labels), ``supcon_active`` (1.0 with labels, 0.0 when the part was dropped),
    ``accuracy`` (CLIP's top-1, both directions), ``temperature``.

    Args:
        temperature, clip_weight, nt_xent_weight, supcon_weight: As
            :func:`mixed_multimodal_loss`.
        **options: ``learnable_temperature``, ``reduction`` (``"none"``: ``(N,)`` per pair),
            ``normalize``, ``chunk_size``, ``gather_distributed``: as
            :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = MixedMultimodalLoss()
        >>> x, y = torch.randn(6, 8), torch.randn(6, 8)
        >>> float(loss.compute(x, y).terms["supcon_active"])
        0.0
        >>> sorted(loss.compute(x, y, labels=torch.tensor([0, 1, 2] * 2)).terms)[:4]
        ['accuracy', 'loss_clip', 'loss_nt_xent', 'loss_supcon']
    """

    def __init__(
        self,
        *,
        clip_weight: float = 0.4,
        nt_xent_weight: float = 0.3,
        supcon_weight: float = 0.3,
        **options: Unpack[ContrastiveArgs],
    ) -> None:
        super().__init__(**options)
        self.weights = _check_weights(clip_weight, nt_xent_weight, supcon_weight)

    def compute(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        pair_labels: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings, optional ``labels`` and ``pair_labels``."""
        options = self.options()
        loss, parts, clip = _mixed(
            image_embeddings, text_embeddings, labels, pair_labels, options, self.weights
        )
        return self.output(
            loss,
            lambda: {
                **{f"loss_{name}": value for name, value in parts.items()},
                "supcon_active": float("supcon" in parts),
                "accuracy": mean_accuracy(*clip),
                "temperature": 1.0 / options.scale_as(torch.float64),
            },
        )

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Paired ``(n, d)`` embeddings and ``labels`` of three classes (all three parts on)."""
        args, _ = super().draw_examples(g, n, d, dtype)
        labels = torch.randint(0, 3, (n,), generator=g)
        return args, {"labels": labels}

    shown = "temperature:.4g weights reduction!r"
