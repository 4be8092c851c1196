"""Contrastive losses: one file per loss, each a pure function and a registered module."""

from embedloss.contrastive.dcl import DCLLoss, DCLWLoss, dcl_loss, dclw_loss
from embedloss.contrastive.dynamic_temperature import (
    DynamicTemperatureLoss,
    dynamic_temperature_loss,
)
from embedloss.contrastive.hard_negative import HardNegativeLoss, hard_negative_loss
from embedloss.contrastive.info_nce import InfoNCELoss, info_nce_loss
from embedloss.contrastive.moco import MoCoLoss, moco_loss
from embedloss.contrastive.nnclr import NNCLRLoss, nnclr_loss
from embedloss.contrastive.simclr import SimCLRLoss, simclr_loss
from embedloss.momentum import MomentumEncoder

__all__ = [
    "DCLLoss",
    "DCLWLoss",
    "DynamicTemperatureLoss",
    "HardNegativeLoss",
    "InfoNCELoss",
    "MoCoLoss",
    "MomentumEncoder",
    "NNCLRLoss",
    "SimCLRLoss",
    "dcl_loss",
    "dclw_loss",
    "dynamic_temperature_loss",
    "hard_negative_loss",
    "info_nce_loss",
    "moco_loss",
    "nnclr_loss",
    "simclr_loss",
]
