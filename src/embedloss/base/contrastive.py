"""Base class of the InfoNCE family: temperature, normalisation and the shared core."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypedDict

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_chunk_size, check_labels
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.base.mixins import NormalizationMixin, TemperatureScalingMixin
from embedloss.ops.anchors import ChunkSize, NegativeLogWeights, PairSpec, direction_terms
from embedloss.ops.info_nce import ContrastiveOptions, PairedResult, info_nce, nt_xent
from embedloss.ops.similarity import (
    labels_from_match_ids,
    mean_pair_similarity,
    pair_similarity_terms,
    positive_mask_from_labels,
    similarity_matrix,
)

__all__ = ["BaseContrastiveLoss", "ContrastiveArgs"]


class ContrastiveArgs(TypedDict, total=False):
    """The options of :class:`BaseContrastiveLoss`, for a subclass's ``**options: Unpack[...]``."""

    temperature: float
    learnable_temperature: bool
    reduction: str
    normalize: bool
    chunk_size: ChunkSize
    gather_distributed: bool


class BaseContrastiveLoss(TemperatureScalingMixin, NormalizationMixin, BaseLoss):
    """Shared machinery of contrastive losses.

    The constructor takes the options every InfoNCE-family loss has; a loss that only changes
    their defaults says so in its class statement (``class SimCLRLoss(BaseContrastiveLoss,
    temperature=0.5)``); one with options of its own names only those and passes the rest on
    as ``**options: Unpack[ContrastiveArgs]`` (its signature shows them all).
    :meth:`options` hands them, with the current temperature, to the loss's pure function as
    one :class:`~embedloss.ops.info_nce.ContrastiveOptions`; :meth:`paired_output` turns the
    function's :class:`~embedloss.ops.info_nce.PairedResult` into the loss and its terms.

    Args:
        temperature: Initial τ > 0 (default 0.1).
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (clamped at 100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling: ``None`` dense, an int tiles, ``"auto"`` picks.
        gather_distributed: Gather keys from all ranks (see :mod:`embedloss.ops.distributed`).
    """

    #: ε of the losses that offer label smoothing (set by their constructor).
    label_smoothing: float = 0.0

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        learnable_temperature: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self._init_temperature(temperature, learnable_temperature)
        self._init_normalization(normalize)

    def options(self, logit_scale: Tensor | None = None) -> ContrastiveOptions:
        """This module's options and temperature (or an external ``logit_scale``) as one object."""
        ls, clamp = self._logit_scale_and_clamp(logit_scale)
        return ContrastiveOptions(
            logit_scale=ls,
            max_logit_scale=clamp,
            reduction=self.reduction,
            normalize=self._normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
            label_smoothing=self.label_smoothing,
        )

    def paired_output(
        self,
        result: PairedResult,
        options: ContrastiveOptions,
        names: tuple[str, str] | None = None,
        **extra: Tensor | float,
    ) -> LossOutput:
        """The loss and terms of a one-way (``names=None``) or two-way result.

        Terms: ``accuracy`` (share of anchors whose top-1 key is a positive, averaged over the
        directions), ``temperature``, and ``positive_similarity`` (mean ``a_i·b_i`` of the
        inputs as scored); two-way results add ``loss_<name>`` per direction and
        ``negative_similarity``; ``extra`` terms are added (replacing a term of the same name).
        """

        def terms() -> dict[str, Tensor | float]:
            if names is None:
                values = {
                    "accuracy": result.anchors[0].correct.float().mean(),
                    "positive_similarity": mean_pair_similarity(result.a, result.b),
                }
            else:
                values = {
                    **direction_terms(result.anchors[0], result.anchors[-1], names),
                    **pair_similarity_terms(result.a, result.b),
                }
            return {**values, "temperature": 1.0 / options.scale_as(torch.float64), **extra}

        return self.output(result.loss, terms)

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
        options = self.options(logit_scale)
        q, k = options.prepare(query, keys)
        if labels is not None:
            key_labels = labels if key_labels is None else key_labels
        result = info_nce(
            q,
            k,
            options.scale_as(q.dtype),
            PairSpec(query_labels=labels, key_labels=key_labels),
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=self.chunk_size,
            reduced=options.reduced,
        )
        return options.reduce(result, distributed=False)

    def nt_xent_loss(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> Tensor:
        """NT-Xent (SimCLR) over the 2N views ``[z_a; z_b]``, reduced with this loss's ``reduction``."""
        return nt_xent(z_a, z_b, labels, self.options()).loss
