"""supervised losses."""

from embedloss.supervised.cross_entropy import CrossEntropyLoss, cross_entropy_loss
from embedloss.supervised.cross_modal_supcon import CrossModalSupConLoss, cross_modal_supcon_loss
from embedloss.supervised.mse import MSELoss, mse_loss
from embedloss.supervised.supcon import SupConLoss, supcon_loss

__all__: list[str] = [
    "CrossEntropyLoss",
    "CrossModalSupConLoss",
    "MSELoss",
    "SupConLoss",
    "cross_entropy_loss",
    "cross_modal_supcon_loss",
    "mse_loss",
    "supcon_loss",
]
