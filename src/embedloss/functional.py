"""Every loss as a pure function, like ``torch.nn.functional``.

Example:
    >>> import torch
    >>> from embedloss import functional as EF
    >>> EF.clip_loss(torch.randn(4, 8), torch.randn(4, 8)).shape
    torch.Size([])
"""

from embedloss.contrastive import info_nce_loss, simclr_loss
from embedloss.multimodal import clip_loss
from embedloss.multimodal.alignment_uniformity import alignment_uniformity_loss
from embedloss.multimodal.feature_consistency import feature_consistency_loss
from embedloss.multimodal.mixed_multimodal import mixed_multimodal_loss
from embedloss.multimodal.siglip import siglip_loss
from embedloss.supervised import cross_entropy_loss, cross_modal_supcon_loss, mse_loss, supcon_loss

__all__ = ["clip_loss", "info_nce_loss", "simclr_loss"]
__all__ += ["mixed_multimodal_loss"]
__all__ += ["cross_entropy_loss", "cross_modal_supcon_loss", "mse_loss", "supcon_loss"]
__all__ += ["siglip_loss"]
__all__ += ["feature_consistency_loss"]
__all__ += ["alignment_uniformity_loss"]
