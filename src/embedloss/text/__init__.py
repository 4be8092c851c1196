"""Text-embedding losses over scored sentence pairs (CoSENT, AnglE)."""

from embedloss.text.angle import AnglELoss, angle_loss
from embedloss.text.cosent import CoSENTLoss, cosent_loss

__all__: list[str] = ["AnglELoss", "CoSENTLoss", "angle_loss", "cosent_loss"]
