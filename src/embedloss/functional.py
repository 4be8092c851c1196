"""Every loss as a pure function, like ``torch.nn.functional``.

Example:
    >>> import torch
    >>> from embedloss import functional as EF
    >>> EF.clip_loss(torch.randn(4, 8), torch.randn(4, 8)).shape
    torch.Size([])
"""

from embedloss.contrastive import info_nce_loss, simclr_loss
from embedloss.contrastive.dcl import dcl_loss, dclw_loss
from embedloss.contrastive.dynamic_temperature import dynamic_temperature_loss
from embedloss.contrastive.hard_negative import hard_negative_loss
from embedloss.contrastive.moco import moco_loss
from embedloss.multimodal import clip_loss

__all__ = ["clip_loss", "info_nce_loss", "simclr_loss"]
__all__ += ["dcl_loss", "dclw_loss", "dynamic_temperature_loss", "hard_negative_loss", "moco_loss"]
