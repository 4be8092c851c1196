"""Multimodal losses: paired embeddings of two modalities."""

from embedloss.multimodal.alignment_uniformity import (
    AlignmentUniformityLoss,
    alignment_uniformity_loss,
)
from embedloss.multimodal.clip import CLIPLoss, clip_loss
from embedloss.multimodal.feature_consistency import (
    FeatureConsistencyLoss,
    feature_consistency_loss,
)
from embedloss.multimodal.mixed_multimodal import MixedMultimodalLoss, mixed_multimodal_loss
from embedloss.multimodal.siglip import SigLIPLoss, siglip_loss

__all__ = ["CLIPLoss", "clip_loss"]
__all__ += ["MixedMultimodalLoss", "mixed_multimodal_loss"]
__all__ += ["SigLIPLoss", "siglip_loss"]
__all__ += ["FeatureConsistencyLoss", "feature_consistency_loss"]
__all__ += ["AlignmentUniformityLoss", "alignment_uniformity_loss"]
