"""Shared maths: normalisation, similarity and masks, the exact InfoNCE core, collectives."""

from embedloss.ops.anchors import (
    AnchorLosses,
    ChunkSize,
    LogWeightFn,
    PairSpec,
    pair_masks,
    reduce_anchor_losses,
)
from embedloss.ops.distributed import Gathered, gather_with_grad, is_distributed, world_info
from embedloss.ops.info_nce import ContrastiveOptions, info_nce, symmetric_info_nce
from embedloss.ops.similarity import (
    l2_normalize,
    labels_from_match_ids,
    positive_mask_from_labels,
    similarity_matrix,
)
from embedloss.ops.statistics import (
    batch_mean,
    center,
    correlation,
    covariance,
    cross_correlation,
    off_diagonal,
    standardize,
    variance,
)

__all__ = [
    "AnchorLosses",
    "ChunkSize",
    "ContrastiveOptions",
    "Gathered",
    "LogWeightFn",
    "PairSpec",
    "batch_mean",
    "center",
    "correlation",
    "covariance",
    "cross_correlation",
    "gather_with_grad",
    "info_nce",
    "is_distributed",
    "l2_normalize",
    "labels_from_match_ids",
    "off_diagonal",
    "pair_masks",
    "positive_mask_from_labels",
    "reduce_anchor_losses",
    "similarity_matrix",
    "standardize",
    "symmetric_info_nce",
    "variance",
    "world_info",
]
