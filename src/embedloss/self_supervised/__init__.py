"""self-supervised losses: VICReg, Barlow Twins, decorrelation, hybrid contrastive→VICReg, BYOL/SimSiam."""

from embedloss.self_supervised.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from embedloss.self_supervised.decorrelation import DecorrelationLoss, decorrelation_loss
from embedloss.self_supervised.hybrid_vicreg import HybridVICRegLoss, hybrid_vicreg_loss
from embedloss.self_supervised.negative_cosine import NegativeCosineLoss, negative_cosine_loss
from embedloss.self_supervised.vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "BarlowTwinsLoss",
    "DecorrelationLoss",
    "HybridVICRegLoss",
    "NegativeCosineLoss",
    "VICRegLoss",
    "barlow_twins_loss",
    "decorrelation_loss",
    "hybrid_vicreg_loss",
    "negative_cosine_loss",
    "vicreg_loss",
]
