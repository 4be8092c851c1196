"""Every loss as a pure function, like ``torch.nn.functional``.

Example:
    >>> import torch
    >>> from embedloss import functional as EF
    >>> EF.clip_loss(torch.randn(4, 8), torch.randn(4, 8)).shape
    torch.Size([])
"""

from embedloss.composite import hybrid_vicreg_loss, mixed_multimodal_loss
from embedloss.contrastive import (
    dcl_loss,
    dclw_loss,
    dynamic_temperature_loss,
    hard_negative_loss,
    info_nce_loss,
    moco_loss,
    nnclr_loss,
    simclr_loss,
)
from embedloss.metric_learning import (
    arcface_loss,
    circle_loss,
    contrastive_margin_loss,
    cosface_loss,
    multi_similarity_loss,
    proxy_anchor_loss,
    triplet_loss,
)
from embedloss.multimodal import (
    alignment_uniformity_loss,
    clip_loss,
    feature_consistency_loss,
    siglip_loss,
)
from embedloss.self_distillation import dino_loss, ibot_patch_loss, koleo_loss, swav_loss
from embedloss.self_supervised import (
    barlow_twins_loss,
    decorrelation_loss,
    negative_cosine_loss,
    vicreg_loss,
)
from embedloss.supervised import cross_entropy_loss, cross_modal_supcon_loss, mse_loss, supcon_loss
from embedloss.text import angle_loss, cosent_loss

__all__ = [
    "swav_loss",
    "nnclr_loss",
    "koleo_loss",
    "ibot_patch_loss",
    "dino_loss",
    "alignment_uniformity_loss",
    "angle_loss",
    "arcface_loss",
    "barlow_twins_loss",
    "circle_loss",
    "clip_loss",
    "contrastive_margin_loss",
    "cosent_loss",
    "cosface_loss",
    "cross_entropy_loss",
    "cross_modal_supcon_loss",
    "dcl_loss",
    "dclw_loss",
    "decorrelation_loss",
    "dynamic_temperature_loss",
    "feature_consistency_loss",
    "hard_negative_loss",
    "hybrid_vicreg_loss",
    "info_nce_loss",
    "mixed_multimodal_loss",
    "moco_loss",
    "mse_loss",
    "multi_similarity_loss",
    "negative_cosine_loss",
    "proxy_anchor_loss",
    "siglip_loss",
    "simclr_loss",
    "supcon_loss",
    "triplet_loss",
    "vicreg_loss",
]
