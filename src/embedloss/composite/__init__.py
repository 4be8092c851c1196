"""Losses composed of other losses: weighted sums, multitask, mixed multimodal, hybrid VICReg.

A composite may import the loss families (it sits above them); each keeps the registry category
of what it computes (``mixed_multimodal`` is multimodal, ``hybrid_vicreg`` self-supervised).
"""

from embedloss.composite.combined import CombinedLoss
from embedloss.composite.hybrid_vicreg import HybridVICRegLoss, hybrid_vicreg_loss
from embedloss.composite.matryoshka import MatryoshkaLoss
from embedloss.composite.mixed_multimodal import MixedMultimodalLoss, mixed_multimodal_loss
from embedloss.composite.multitask import MultitaskLoss

__all__: list[str] = [
    "CombinedLoss",
    "HybridVICRegLoss",
    "MatryoshkaLoss",
    "MixedMultimodalLoss",
    "MultitaskLoss",
    "hybrid_vicreg_loss",
    "mixed_multimodal_loss",
]
