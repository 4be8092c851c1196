"""Multimodal losses: paired embeddings of two modalities."""

from embedloss.multimodal.clip import CLIPLoss, clip_loss

__all__ = ["CLIPLoss", "clip_loss"]
