"""embedloss: exact, fast, distributed-correct PyTorch losses for training embeddings.

Example:
    >>> import torch, embedloss
    >>> loss = embedloss.create_loss("clip", temperature=0.07)
    >>> loss(torch.randn(8, 32), torch.randn(8, 32)).ndim
    0
"""

from embedloss import (
    composite,
    contrastive,
    functional,
    metric_learning,
    metrics,
    multimodal,
    ops,
    self_distillation,
    self_supervised,
    supervised,
    text,
)
from embedloss._validation import set_value_checks
from embedloss.base import (
    BaseContrastiveLoss,
    BaseLoss,
    BaseSupervisedLoss,
    HardNegativeMiningMixin,
    LossOutput,
    NormalizationMixin,
    ProjectionMixin,
    TemperatureScalingMixin,
)
from embedloss.composite import *
from embedloss.contrastive import *
from embedloss.gradcache import GradCache
from embedloss.metric_learning import *
from embedloss.multimodal import *
from embedloss.registry import (
    LossInfo,
    LossRegistry,
    create_loss,
    create_loss_from_config,
    list_losses,
    loss_info,
    register_loss,
)
from embedloss.self_distillation import *
from embedloss.self_supervised import *
from embedloss.supervised import *
from embedloss.text import *

__version__ = "0.1.0"
__all__ = [
    "BaseContrastiveLoss",
    "BaseLoss",
    "BaseSupervisedLoss",
    "GradCache",
    "HardNegativeMiningMixin",
    "LossInfo",
    "LossOutput",
    "LossRegistry",
    "NormalizationMixin",
    "ProjectionMixin",
    "TemperatureScalingMixin",
    "create_loss",
    "create_loss_from_config",
    "functional",
    "list_losses",
    "loss_info",
    "metrics",
    "ops",
    "register_loss",
    "set_value_checks",
    *contrastive.__all__,
    *multimodal.__all__,
    *self_supervised.__all__,
    *self_distillation.__all__,
    *supervised.__all__,
    *metric_learning.__all__,
    *text.__all__,
    *composite.__all__,
]
