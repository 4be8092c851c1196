"""Symmetric InfoNCE with up-weighted hard negatives (Robinson et al. 2021; legacy hard-negative loss)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_pair, compute_dtype
from embedloss.base.base_loss import LossOutput, detached_terms
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.base.mixins import HardNegativeMiningMixin
from embedloss.multimodal.clip import combine_directions, direction_terms
from embedloss.ops.info_nce import AnchorLosses, ChunkSize, info_nce, pair_masks
from embedloss.ops.layouts import paired_layout
from embedloss.ops.similarity import (
    inverse_temperature,
    l2_normalize,
    pair_similarity_terms,
    prepare_embeddings,
)
from embedloss.registry import register_loss

__all__ = ["HardNegativeLoss", "hard_negative_anchor_losses", "hard_negative_loss"]


class _Miner(HardNegativeMiningMixin):
    """The mixin's weighting as a standalone object, for the pure functions."""

    def __init__(
        self, strategy: str, factor: float, percentile: float, margin: float, beta: float
    ) -> None:
        self._init_hard_negative_mining(strategy, factor, percentile, margin, beta)


class _Mined(NamedTuple):
    a_to_b: AnchorLosses
    b_to_a: AnchorLosses
    hard_fraction: Tensor  # share of negatives that were up-weighted, both directions


def _direction(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    labels: Tensor | None,
    miner: HardNegativeMiningMixin,
    gather_distributed: bool,
    chunk_size: ChunkSize,
) -> tuple[AnchorLosses, Tensor]:
    global_keys, spec = paired_layout(query, keys, labels, gather_distributed)
    rows = torch.arange(query.shape[0], device=query.device)
    cols = torch.arange(global_keys.shape[0], device=query.device)
    with torch.no_grad():
        # Mining looks at cosine similarities, per anchor row, whatever `normalize` says.
        cosine = l2_normalize(query.detach()) @ l2_normalize(global_keys.detach()).T  # (n, N)
        positive, _ = pair_masks(spec, rows, cols)
        log_w = miner.negative_log_weights(cosine, positive)
        hard = ((log_w > 0) & ~positive).sum() / (~positive).sum().clamp(min=1)
    result = info_nce(
        query, global_keys, scale, spec, negative_log_weights=log_w, chunk_size=chunk_size
    )
    return result, hard


def _hard_negative(
    z_a: Tensor,
    z_b: Tensor,
    *,
    scale: Tensor | float,
    miner: HardNegativeMiningMixin,
    labels: Tensor | None,
    normalize: bool,
    chunk_size: ChunkSize,
    gather_distributed: bool,
    dtype: torch.dtype,
) -> _Mined:
    a = prepare_embeddings(z_a, normalize=normalize, dtype=dtype)
    b = prepare_embeddings(z_b, normalize=normalize, dtype=dtype)
    a2b, hard_a = _direction(a, b, scale, labels, miner, gather_distributed, chunk_size)
    b2a, hard_b = _direction(b, a, scale, labels, miner, gather_distributed, chunk_size)
    return _Mined(a2b, b2a, (hard_a + hard_b) / 2)


def hard_negative_anchor_losses(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    strategy: str = "semi_hard",
    hard_negative_factor: float = 2.0,
    percentile: float = 0.9,
    margin: float = 0.2,
    beta: float = 1.0,
    labels: Tensor | None = None,
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> tuple[AnchorLosses, AnchorLosses]:
    """Per-anchor losses ``(a→b, b→a)``, each ``(n,)`` (see :func:`hard_negative_loss`)."""
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    miner = _Miner(strategy, hard_negative_factor, percentile, margin, beta)
    dtype = compute_dtype(z_a, z_b)
    mined = _hard_negative(
        z_a,
        z_b,
        scale=inverse_temperature(temperature, dtype),
        miner=miner,
        labels=labels,
        normalize=normalize,
        chunk_size=chunk_size,
        gather_distributed=gather_distributed,
        dtype=dtype,
    )
    return mined.a_to_b, mined.b_to_a


def hard_negative_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    strategy: str = "semi_hard",
    hard_negative_factor: float = 2.0,
    percentile: float = 0.9,
    margin: float = 0.2,
    beta: float = 1.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""CLIP's symmetric InfoNCE with each anchor's hard negatives up-weighted in the denominator.

    With cosine similarities ``s_ij`` of normalised ``a_i``, ``b_j`` and logits ``s_ij/τ``,
    the a→b term of anchor ``i`` (b→a is the same with the roles swapped) is

        ℓ_i = −log( exp(s_ii/τ) / (exp(s_ii/τ) + Σ_{j≠i} w_ij·exp(s_ij/τ)) ),
        L = ½·(mean_i ℓ_i^{a→b} + mean_j ℓ_j^{b→a})

    The importance weights ``w_ij`` are computed without gradient, per anchor row:

    * ``"none"``: ``w = 1`` — exactly :func:`~embedloss.multimodal.clip_loss`;
    * ``"hard"``: ``w = factor`` for negatives at or above the row's ``percentile`` of negative
      similarity (the legacy default took the top 10%);
    * ``"semi_hard"``: ``w = factor`` for ``s_ii − margin < s_ij < s_ii``;
    * ``"beta"``: ``w_ij ∝ exp(β·s_ij)`` with mean 1 over the row's negatives (Robinson et al.
      2021, "Contrastive Learning with Hard Negative Samples", Eq. 4's importance weights).

    ``"hard"``/``"semi_hard"`` only raise weights (``factor >= 1``), so they never lower the loss.
    Each direction mines its own anchors' rows (the b→a weights are not the transposed a→b ones).

    Args:
        z_a: ``(n, D)`` first views or modality.
        z_b: ``(n, D)`` second views or modality; row ``i`` pairs with ``z_a[i]``.
        temperature: τ > 0 (default 0.07).
        strategy: ``"none"``, ``"hard"``, ``"semi_hard"`` (default) or ``"beta"``.
        hard_negative_factor: Weight >= 1 of mined negatives (default 2.0).
        percentile: Row quantile in [0, 1] above which a negative is hard (default 0.9).
        margin: Semi-hard window below the positive similarity, >= 0 (default 0.2).
        beta: Concentration β >= 0 of the ``"beta"`` weights (default 1.0).
        labels: Optional ``(n,)`` identities; equal labels are positives (never reweighted).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(n,)``: directions averaged per pair).
        normalize: L2-normalise the inputs of the loss (mining always uses cosines).
        chunk_size: Core tiling.
        gather_distributed: Use the keys of every rank (mining included).

    Shape:
        z_a, z_b: ``(n, D)``; output: scalar, or ``(n,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, bad labels, τ <= 0, an unknown strategy or options
            out of range.

    Example:
        >>> from embedloss.multimodal import clip_loss
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> bool(hard_negative_loss(a, b, strategy="hard") >= clip_loss(a, b))
        True
    """
    a2b, b2a = hard_negative_anchor_losses(
        z_a,
        z_b,
        temperature=temperature,
        strategy=strategy,
        hard_negative_factor=hard_negative_factor,
        percentile=percentile,
        margin=margin,
        beta=beta,
        labels=labels,
        normalize=normalize,
        chunk_size=chunk_size,
        gather_distributed=gather_distributed,
    )
    return combine_directions(a2b, b2a, reduction, gather_distributed)


@register_loss("hard_negative")
class HardNegativeLoss(HardNegativeMiningMixin, BaseContrastiveLoss):
    """Symmetric InfoNCE with up-weighted hard negatives (legacy ``HardNegativeMiningContrastiveLoss``).

    See :func:`hard_negative_loss` for the formula and the strategies. Terms: ``loss_a_to_b``,
    ``loss_b_to_a``, ``accuracy``, ``positive_similarity``, ``negative_similarity``,
    ``hard_negative_fraction`` (share of negatives up-weighted), ``temperature``.

    Args:
        temperature: τ > 0 (default 0.07).
        strategy: ``"none"``, ``"hard"``, ``"semi_hard"`` (default) or ``"beta"``.
        hard_negative_factor: Weight >= 1 of mined negatives (default 2.0).
        percentile: Row quantile of the ``"hard"`` strategy (default 0.9).
        margin: Window of the ``"semi_hard"`` strategy (default 0.2).
        beta: Concentration of the ``"beta"`` strategy (default 1.0).
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (clamped at 100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling (``None``, an int or ``"auto"``).
        gather_distributed: Use the embeddings of all ranks (DDP).

    Example:
        >>> loss = HardNegativeLoss(strategy="hard", hard_negative_factor=3.0)
        >>> out = loss.compute(torch.randn(8, 16), torch.randn(8, 16))
        >>> 0.0 < out.terms["hard_negative_fraction"].item() < 1.0
        True
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        strategy: str = "semi_hard",
        hard_negative_factor: float = 2.0,
        percentile: float = 0.9,
        margin: float = 0.2,
        beta: float = 1.0,
        learnable_temperature: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            learnable_temperature=learnable_temperature,
            reduction=reduction,
            normalize=normalize,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
        )
        self._init_hard_negative_mining(strategy, hard_negative_factor, percentile, margin, beta)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for paired ``(n, D)`` embeddings and optional ``labels (n,)``."""
        check_pair(z_a, z_b, "z_a", "z_b", labels)
        dtype = compute_dtype(z_a, z_b)
        mined = _hard_negative(
            z_a,
            z_b,
            scale=self.scale(dtype=dtype),
            miner=self,
            labels=labels,
            normalize=self._normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
            dtype=dtype,
        )
        a2b, b2a = mined.a_to_b, mined.b_to_a
        loss = combine_directions(a2b, b2a, self.reduction, self.gather_distributed)
        a = self.normalize_embeddings(z_a.to(dtype))
        b = self.normalize_embeddings(z_b.to(dtype))
        terms = detached_terms(
            **direction_terms(a2b, b2a, ("a_to_b", "b_to_a")),
            hard_negative_fraction=mined.hard_fraction,
            temperature=self.temperature,
            **pair_similarity_terms(a, b),
        )
        return LossOutput(loss, terms)

    def forward(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> Tensor:
        """The hard-negative loss (see :meth:`compute`)."""
        return self.compute(z_a, z_b, labels).loss

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        return (
            f"temperature={self.temperature:g}, strategy={self._hn_strategy!r}, "
            f"hard_negative_factor={self._hn_factor:g}, reduction={self.reduction!r}"
        )
