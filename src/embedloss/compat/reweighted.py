"""Legacy hard-negative and dynamic-temperature names (and their consolidation spellings)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from embedloss.compat._adapter import PairedLoss, metric, renamed, retrieval_metrics
from embedloss.contrastive.dynamic_temperature import DynamicTemperatureLoss as _DynamicTemperature
from embedloss.contrastive.hard_negative import HardNegativeLoss as _HardNegative

__all__ = [
    "DynamicTemperatureContrastiveLoss",
    "DynamicTemperatureLoss",
    "HardNegativeLoss",
    "HardNegativeMiningContrastiveLoss",
]

#: The legacy names of the directional losses of both new losses (for :func:`renamed`).
DIRECTIONS = {"v2t_loss": "loss_a_to_b", "t2v_loss": "loss_b_to_a"}

#: Legacy ``mining_strategy`` spellings → ``HardNegativeLoss(strategy=...)``.
STRATEGIES = {"hard": "hard", "semi-hard": "semi_hard", "semi_hard": "semi_hard", "none": "none"}


class HardNegativeMiningContrastiveLoss(PairedLoss):
    """Legacy InfoNCE with up-weighted hard negatives: :class:`embedloss.HardNegativeLoss`.

    ``"hard"`` up-weights the negatives at or above each row's 90th percentile (the legacy top
    10 %); ``"semi-hard"`` those within 0.2 below the row's positive similarity. Weights enter
    in log space, samples of equal ``match_ids`` are all positives, and the loss is the mean
    over anchors (the legacy loss summed over positive pairs and divided by their count).

    Args:
        temperature: τ > 0 (default 0.07).
        hard_negative_factor: Weight >= 1 of a mined negative (default 2).
        mining_strategy: ``"semi-hard"`` (default) or ``"hard"``.
        dim: Ignored, with a warning.
        hard_negative_percentile: Percentile (0-100) of the ``"hard"`` strategy (default 90).

    Returns (forward):
        ``{"loss", "v2t_loss", "t2v_loss", "hard_negative_factor", "hard_negative_fraction",
        "v2t_accuracy", "t2v_accuracy", "accuracy"}``.
    """

    replacement = "embedloss.HardNegativeLoss (registry 'hard_negative')"

    def __init__(
        self,
        temperature: float = 0.07,
        hard_negative_factor: float = 2.0,
        mining_strategy: str = "semi-hard",
        dim: int | None = None,
        hard_negative_percentile: float = 90.0,
    ) -> None:
        super().__init__(dim=dim)
        if mining_strategy not in STRATEGIES:
            raise ValueError(
                f"mining_strategy must be one of 'hard', 'semi-hard'; got {mining_strategy!r}"
            )
        self.hard_negative_factor = hard_negative_factor
        self.loss = _HardNegative(
            temperature=temperature,
            strategy=STRATEGIES[mining_strategy],
            hard_negative_factor=hard_negative_factor,
            percentile=hard_negative_percentile / 100.0,
        )

    def outputs(self, v: Tensor, t: Tensor, labels: Tensor | None) -> dict[str, Any]:
        """Loss and legacy metrics of one batch."""
        out = self.loss.compute(v, t, labels)
        return {
            "loss": out.loss,
            **renamed(out.terms, **DIRECTIONS),
            "hard_negative_factor": metric(self.hard_negative_factor),
            "hard_negative_fraction": metric(out.terms["hard_negative_fraction"]),
            **retrieval_metrics(v, t, labels, recalls=False),
        }


class HardNegativeLoss(HardNegativeMiningContrastiveLoss):
    """The consolidation's ``HardNegativeLoss``: no ``dim``; ``hard_negative_percentile`` fourth.

    For the new tensor-returning loss use :class:`embedloss.HardNegativeLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        hard_negative_factor: float = 2.0,
        mining_strategy: str = "semi-hard",
        hard_negative_percentile: float = 90.0,
    ) -> None:
        super().__init__(
            temperature, hard_negative_factor, mining_strategy, None, hard_negative_percentile
        )


class DynamicTemperatureContrastiveLoss(PairedLoss):
    """Legacy InfoNCE with a gap-driven temperature: :class:`embedloss.DynamicTemperatureLoss`.

    τ = clamp(τ₀·(0.8 + 0.4·exp(−2·gap)), min, max) with the gap between the mean positive and
    mean negative cosine of the batch, computed without gradient (the legacy τ was not
    detached); the loss is CLIP's symmetric InfoNCE at that τ.

    Args:
        base_temperature: τ₀ > 0 (default 0.07).
        min_temp: Lower clamp (default 0.04).
        max_temp: Upper clamp (default 0.2).
        dim: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "temperature", "pos_similarity", "neg_similarity", "v2t_loss", "t2v_loss"}``.
    """

    replacement = "embedloss.DynamicTemperatureLoss (registry 'dynamic_temperature')"
    legacy_terms: ClassVar[dict[str, str]] = {
        "temperature": "temperature",
        "pos_similarity": "positive_similarity",
        "neg_similarity": "negative_similarity",
        **DIRECTIONS,
    }

    def __init__(
        self,
        base_temperature: float = 0.07,
        min_temp: float = 0.04,
        max_temp: float = 0.2,
        dim: int | None = None,
    ) -> None:
        super().__init__(dim=dim)
        self.loss = _DynamicTemperature(
            base_temperature=base_temperature, min_temperature=min_temp, max_temperature=max_temp
        )


class DynamicTemperatureLoss(DynamicTemperatureContrastiveLoss):
    """The consolidation's ``DynamicTemperatureLoss``: the legacy class, same arguments.

    For the new tensor-returning loss use :class:`embedloss.DynamicTemperatureLoss`.
    """
