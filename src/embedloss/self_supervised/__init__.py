"""Self-supervised losses: VICReg, Barlow Twins, decorrelation, BYOL/SimSiam."""

from embedloss.self_supervised.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from embedloss.self_supervised.decorrelation import DecorrelationLoss, decorrelation_loss
from embedloss.self_supervised.negative_cosine import NegativeCosineLoss, negative_cosine_loss
from embedloss.self_supervised.vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "BarlowTwinsLoss",
    "DecorrelationLoss",
    "NegativeCosineLoss",
    "VICRegLoss",
    "barlow_twins_loss",
    "decorrelation_loss",
    "negative_cosine_loss",
    "vicreg_loss",
]
