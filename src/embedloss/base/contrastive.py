"""Base class of the InfoNCE family: temperature, normalisation and the shared core."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypedDict

import torch
from torch import Tensor

from embedloss._validation import check_labels
from embedloss.base.base_loss import BaseLoss, LossOutput, detached_terms
from embedloss.base.mixins import NormalizationMixin, TemperatureScalingMixin
from embedloss.ops.info_nce import (
    AnchorLosses,
    ChunkSize,
    NegativeLogWeights,
    PairSpec,
    info_nce,
    reduce_anchor_losses,
)
from embedloss.ops.similarity import (
    labels_from_match_ids,
    mean_pair_similarity,
    positive_mask_from_labels,
    similarity_matrix,
)

__all__ = ["BaseContrastiveLoss", "CoreOptions"]


class CoreOptions(TypedDict):
    """The options a contrastive module hands to its pure ``xxx_anchor_losses`` function."""

    temperature: Tensor
    normalize: bool
    chunk_size: ChunkSize
    gather_distributed: bool


class BaseContrastiveLoss(TemperatureScalingMixin, NormalizationMixin, BaseLoss):
    """Shared machinery of contrastive losses.

    Concrete losses pass their explicit constructor arguments through to this constructor
    (which initialises the temperature and normalisation mixins when ``temperature`` /
    ``normalize`` are given; a loss with its own temperature rule leaves them None) and compute
    through :mod:`embedloss.ops` (via the helpers below), never through a private copy of
    similarity, masking or temperature code.

    Args:
        temperature: Initial τ > 0 (``self._init_temperature``), or None to skip.
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (with ``temperature``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (``self._init_normalization``), or None to skip.
        chunk_size: Passed to the InfoNCE core: ``None`` dense, an int tiles, ``"auto"`` picks.
        gather_distributed: Gather keys from all ranks (see :mod:`embedloss.ops.distributed`).
    """

    def __init__(
        self,
        *,
        temperature: float | None = None,
        learnable_temperature: bool = False,
        reduction: str = "mean",
        normalize: bool | None = None,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        if not isinstance(gather_distributed, bool):
            raise TypeError(
                f"gather_distributed must be a bool, got {type(gather_distributed).__name__}"
            )
        self.chunk_size = chunk_size
        self.gather_distributed = gather_distributed
        if temperature is not None:
            self._init_temperature(temperature, learnable_temperature)
        if normalize is not None:
            self._init_normalization(normalize)

    def core_options(self, dtype: torch.dtype, logit_scale: Tensor | None = None) -> CoreOptions:
        """This module's options for its pure function: τ (as a ``dtype`` tensor) and the rest."""
        return CoreOptions(
            temperature=1.0 / self.scale(logit_scale, dtype=dtype),
            normalize=self._normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
        )

    def anchor_output(
        self, result: AnchorLosses, a: Tensor, b: Tensor, *, distributed: bool | None = None
    ) -> LossOutput:
        """``result`` reduced with this loss's ``reduction`` and the terms of a one-way loss.

        Terms: ``accuracy`` (share of anchors whose top-1 is a positive), ``positive_similarity``
        (mean ``a_i·b_i`` of the prepared views ``a``, ``b``) and ``temperature``. The reduction
        runs over ranks when ``distributed`` (default: ``gather_distributed``).
        """
        distributed = self.gather_distributed if distributed is None else distributed
        loss = reduce_anchor_losses(result, self.reduction, distributed=distributed)
        terms = detached_terms(
            accuracy=result.correct.float().mean(),
            positive_similarity=mean_pair_similarity(a, b),
            temperature=self.temperature,
        )
        return LossOutput(loss, terms)

    def compute_similarity(self, a: Tensor, b: Tensor, logit_scale: Tensor | None = None) -> Tensor:
        """Logits ``(N, M)``: normalised (if enabled) ``a @ b.T`` divided by τ."""
        a, b = self.normalize_embeddings(a), self.normalize_embeddings(b)
        return similarity_matrix(a, b, self.scale(logit_scale, dtype=a.dtype))

    @staticmethod
    def create_positive_mask(
        n: int | None = None,
        *,
        labels: Tensor | None = None,
        match_ids: Sequence[Hashable] | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Boolean ``(N, N)`` positive mask from ``labels``, legacy ``match_ids``, or the diagonal.

        Example:
            >>> BaseContrastiveLoss.create_positive_mask(match_ids=["a", "b", "a"]).int()
            tensor([[1, 0, 1],
                    [0, 1, 0],
                    [1, 0, 1]], dtype=torch.int32)
        """
        if labels is not None and match_ids is not None:
            raise ValueError("pass either labels or match_ids, not both")
        if match_ids is not None:
            labels = labels_from_match_ids(match_ids, device=device)
        if labels is not None:
            check_labels(labels, labels.shape[0] if n is None else n)
            return positive_mask_from_labels(labels)
        if n is None:
            raise ValueError("create_positive_mask needs n, labels or match_ids")
        return torch.eye(n, dtype=torch.bool, device=device)

    def info_nce_loss(
        self,
        query: Tensor,
        keys: Tensor,
        *,
        labels: Tensor | None = None,
        key_labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
        negative_log_weights: NegativeLogWeights = None,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """InfoNCE of ``query (N, D)`` against ``keys (M, D)``, reduced with this loss's ``reduction``.

        Key ``i`` is the positive of query ``i``, or, with labels, every key of the same label.
        """
        q, k = self.normalize_embeddings(query), self.normalize_embeddings(keys)
        if labels is not None:
            key_labels = labels if key_labels is None else key_labels
        spec = PairSpec(query_labels=labels, key_labels=key_labels)
        result = info_nce(
            q,
            k,
            self.scale(logit_scale, dtype=q.dtype),
            spec,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=self.chunk_size,
        )
        return reduce_anchor_losses(result, self.reduction)

    def nt_xent_loss(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> Tensor:
        """NT-Xent (SimCLR) over the 2N views ``[z_a; z_b]``, reduced with this loss's ``reduction``."""
        from embedloss.contrastive.simclr import simclr_loss

        return simclr_loss(
            z_a,
            z_b,
            temperature=self.temperature,
            labels=labels,
            reduction=self.reduction,
            normalize=self._normalize,
            chunk_size=self.chunk_size,
        )
