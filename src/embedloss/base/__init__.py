"""Base classes and mixins every loss builds on."""

from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.base.mixins import (
    HardNegativeMiningMixin,
    NormalizationMixin,
    ProjectionMixin,
    TemperatureScalingMixin,
)
from embedloss.base.supervised import BaseSupervisedLoss

__all__ = [
    "BaseContrastiveLoss",
    "BaseLoss",
    "BaseSupervisedLoss",
    "HardNegativeMiningMixin",
    "LossOutput",
    "NormalizationMixin",
    "ProjectionMixin",
    "TemperatureScalingMixin",
]
