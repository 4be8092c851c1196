"""Contrastive losses: one file per loss, each a pure function and a registered module."""

from embedloss.contrastive.info_nce import InfoNCELoss, info_nce_loss
from embedloss.contrastive.simclr import SimCLRLoss, simclr_loss

__all__ = ["InfoNCELoss", "SimCLRLoss", "info_nce_loss", "simclr_loss"]
