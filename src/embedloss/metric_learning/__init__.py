"""Metric-learning losses over labelled embeddings: triplet, margin, multi-similarity, proxies.

The pair losses (triplet, contrastive margin, multi-similarity, circle) score every anchor
against every key in row tiles (:mod:`embedloss.ops.pair_losses`), with the distances of
:mod:`embedloss.ops.distances` and the miners of :mod:`embedloss.ops.miners`; the proxy losses
(ArcFace, CosFace, Proxy Anchor) learn class centres in a parameter ``weight``.
"""

from embedloss.metric_learning.arcface import ArcFaceLoss, arcface_loss
from embedloss.metric_learning.circle import CircleLoss, circle_loss
from embedloss.metric_learning.contrastive_margin import (
    ContrastiveMarginLoss,
    contrastive_margin_loss,
)
from embedloss.metric_learning.cosface import CosFaceLoss, cosface_loss
from embedloss.metric_learning.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from embedloss.metric_learning.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss
from embedloss.metric_learning.triplet import TripletLoss, triplet_loss

__all__: list[str] = [
    "ArcFaceLoss",
    "CircleLoss",
    "ContrastiveMarginLoss",
    "CosFaceLoss",
    "MultiSimilarityLoss",
    "ProxyAnchorLoss",
    "TripletLoss",
    "arcface_loss",
    "circle_loss",
    "contrastive_margin_loss",
    "cosface_loss",
    "multi_similarity_loss",
    "proxy_anchor_loss",
    "triplet_loss",
]
