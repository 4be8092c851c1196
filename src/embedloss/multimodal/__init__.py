"""Multimodal losses: paired embeddings of two modalities."""

from embedloss.multimodal.clip import CLIPLoss, clip_loss
from embedloss.multimodal.mixed_multimodal import MixedMultimodalLoss, mixed_multimodal_loss

__all__ = ["CLIPLoss", "clip_loss"]
__all__ += ["MixedMultimodalLoss", "mixed_multimodal_loss"]
