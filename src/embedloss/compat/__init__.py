"""Deprecated legacy loss names, mapped onto the embedloss losses.

Switching from the legacy loss package is a one-line change of import::

    from embedloss.compat import CLIPStyleLoss, create_loss_function

Every legacy class keeps its constructor arguments, its keyword inputs (``vision_features``,
``text_features``, ``match_ids``, ``z_a``/``z_b``, ...), the trainer hooks and its dict output,
but computes through the new losses, with the legacy defects fixed. Each name emits one
``DeprecationWarning`` per process naming its replacement; ``docs/LOSS_MIGRATION_GUIDE.md`` maps
names, arguments and outputs and lists every change in behaviour. Arguments that no longer mean
anything are accepted with an :class:`IgnoredArgumentWarning`.

The base classes and mixins of the legacy consolidation (``BaseContrastiveLoss``, ...) resolve
to their embedloss counterparts, with a ``DeprecationWarning`` on first access.
"""

from __future__ import annotations

from typing import Any

import embedloss.base as _base
from embedloss.compat._adapter import IgnoredArgumentWarning, deprecated
from embedloss.compat.composite import CombinedLoss, MultitaskLoss
from embedloss.compat.contrastive import (
    ContrastiveLoss,
    DecoupledContrastiveLoss,
    DecoupledLoss,
    SimCLRLoss,
    nt_xent_loss,
)
from embedloss.compat.factory import create_loss_function
from embedloss.compat.multimodal import (
    CLIPLoss,
    CLIPStyleLoss,
    FeatureConsistencyLoss,
    MixedMultimodalLoss,
    MultiModalMixedContrastiveLoss,
    SimpleContrastiveLoss,
    compute_recall_at_k,
)
from embedloss.compat.queue import EMAMoCoLoss, MemoryQueueContrastiveLoss, MoCoLoss
from embedloss.compat.reweighted import (
    DynamicTemperatureContrastiveLoss,
    DynamicTemperatureLoss,
    HardNegativeLoss,
    HardNegativeMiningContrastiveLoss,
)
from embedloss.compat.self_supervised import (
    BarlowTwinsLoss,
    DecorrelationLoss,
    HybridPretrainVICRegLoss,
    VICRegLoss,
)
from embedloss.compat.supervised import (
    CrossEntropyLoss,
    MeanSquaredError,
    SupervisedContrastiveLoss,
    SupervisedLoss,
    supervised_contrastive_loss,
)

_BASE_NAMES = (
    "BaseContrastiveLoss",
    "BaseSupervisedLoss",
    "HardNegativeMiningMixin",
    "NormalizationMixin",
    "ProjectionMixin",
    "TemperatureScalingMixin",
)

__all__ = [
    "BarlowTwinsLoss",
    "CLIPLoss",
    "CLIPStyleLoss",
    "CombinedLoss",
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "DecoupledContrastiveLoss",
    "DecorrelationLoss",
    "DecoupledLoss",
    "DynamicTemperatureContrastiveLoss",
    "DynamicTemperatureLoss",
    "EMAMoCoLoss",
    "FeatureConsistencyLoss",
    "HardNegativeLoss",
    "HardNegativeMiningContrastiveLoss",
    "HybridPretrainVICRegLoss",
    "IgnoredArgumentWarning",
    "MeanSquaredError",
    "MemoryQueueContrastiveLoss",
    "MixedMultimodalLoss",
    "MultiModalMixedContrastiveLoss",
    "MoCoLoss",
    "MultitaskLoss",
    "SimCLRLoss",
    "SimpleContrastiveLoss",
    "SupervisedContrastiveLoss",
    "SupervisedLoss",
    "VICRegLoss",
    "compute_recall_at_k",
    "create_loss_function",
    "nt_xent_loss",
    "supervised_contrastive_loss",
    *_BASE_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        deprecated(name, f"embedloss.{name}")
        return getattr(_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
