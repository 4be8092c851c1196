"""Multimodal losses: CLIP, SigLIP, feature consistency, alignment/uniformity."""

from embedloss.multimodal.alignment_uniformity import (
    AlignmentUniformityLoss,
    alignment_uniformity_loss,
)
from embedloss.multimodal.clip import CLIPLoss, clip_loss
from embedloss.multimodal.feature_consistency import (
    FeatureConsistencyLoss,
    feature_consistency_loss,
)
from embedloss.multimodal.siglip import SigLIPLoss, siglip_loss

__all__ = [
    "AlignmentUniformityLoss",
    "CLIPLoss",
    "FeatureConsistencyLoss",
    "SigLIPLoss",
    "alignment_uniformity_loss",
    "clip_loss",
    "feature_consistency_loss",
    "siglip_loss",
]
