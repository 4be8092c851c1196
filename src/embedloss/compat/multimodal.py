"""Legacy multimodal names: ``CLIPStyleLoss`` and the consolidation's ``CLIPLoss``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from torch import Tensor

from embedloss.compat._adapter import LegacyLoss, metric, retrieval_metrics, warn_ignored
from embedloss.multimodal.clip import CLIPLoss as _CLIP

__all__ = ["CLIPLoss", "CLIPStyleLoss"]


class CLIPStyleLoss(LegacyLoss):
    """Legacy CLIP loss with label smoothing and retrieval metrics: :class:`embedloss.CLIPLoss`.

    Samples sharing a ``match_id`` are all positives (uniform target over them) instead of one
    positive drawn at random. ``mean_similarity``, ``matched_similarity`` (the diagonal pairs)
    and ``similarity_gap`` (their difference) keep the legacy scale: cosine / τ.

    Args:
        temperature: τ > 0 (default 0.07).
        use_hard_negatives: Ignored, with a warning (the legacy class never used it; see
            :class:`embedloss.HardNegativeLoss`).
        hard_negative_weight: Ignored, with a warning.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ε in [0, 1] (default 0).
        cache_labels: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "v2t_loss", "t2v_loss", "v2t_accuracy", "t2v_accuracy", "accuracy",
        "mean_similarity", "matched_similarity", "similarity_gap", "recalls"}``.
    """

    replacement = "embedloss.CLIPLoss (registry 'clip')"

    def __init__(
        self,
        temperature: float = 0.07,
        use_hard_negatives: bool | None = None,
        hard_negative_weight: float | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        cache_labels: bool | None = None,
    ) -> None:
        super().__init__()
        warn_ignored(
            type(self).__name__,
            use_hard_negatives=use_hard_negatives or None,
            hard_negative_weight=hard_negative_weight,
            cache_labels=cache_labels,
        )
        self.loss = _CLIP(
            temperature=temperature, label_smoothing=label_smoothing, reduction=reduction
        )

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: Sequence[Hashable] | Tensor | None = None,
        similarity_matrix: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; a given ``similarity_matrix`` is ignored with a warning."""
        warn_ignored(
            f"{type(self).__name__}.forward", once=True, similarity_matrix=_shape(similarity_matrix)
        )
        v, t, ids = self.paired_inputs(vision_features, text_features, match_ids, inputs)
        out = self.loss.compute(v, t, ids)
        terms, n = out.terms, v.shape[0]
        scale = 1.0 / terms["temperature"]
        matched = terms["positive_similarity"] * scale
        mean = (terms["positive_similarity"] + (n - 1) * terms["negative_similarity"]) / n * scale
        return {
            "loss": out.loss,
            "v2t_loss": metric(terms["loss_image_to_text"]),
            "t2v_loss": metric(terms["loss_text_to_image"]),
            **retrieval_metrics(v, t, ids),
            "mean_similarity": metric(mean),
            "matched_similarity": metric(matched),
            "similarity_gap": metric(matched - mean),
        }


def _shape(x: Tensor | None) -> str | None:
    return None if x is None else f"<tensor of shape {tuple(x.shape)}>"


class CLIPLoss(CLIPStyleLoss):
    """The consolidation's ``CLIPLoss``: :class:`CLIPStyleLoss` with its argument order.

    For the new tensor-returning loss use :class:`embedloss.CLIPLoss`.

    Args:
        temperature: τ > 0 (default 0.07).
        label_smoothing: ε in [0, 1] (default 0).
        use_hard_negatives: Ignored, with a warning.
        hard_negative_weight: Ignored, with a warning.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        cache_labels: Ignored, with a warning.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        label_smoothing: float = 0.0,
        use_hard_negatives: bool | None = None,
        hard_negative_weight: float | None = None,
        reduction: str = "mean",
        cache_labels: bool | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature,
            use_hard_negatives=use_hard_negatives,
            hard_negative_weight=hard_negative_weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            cache_labels=cache_labels,
        )
