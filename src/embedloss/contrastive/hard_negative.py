"""Symmetric InfoNCE with up-weighted hard negatives (Robinson et al. 2021; legacy hard-negative loss)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_pair
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.base.mixins import HardNegativeMiningMixin
from embedloss.ops.anchors import AnchorLosses, pair_masks
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    PairedResult,
    contrastive_keywords,
    info_nce,
)
from embedloss.ops.layouts import paired_layout
from embedloss.ops.mining import HardNegativeMining, hard_negative_log_weights
from embedloss.ops.similarity import l2_normalize
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["HardNegativeLoss", "hard_negative_loss"]


def _direction(
    query: Tensor,
    keys: Tensor,
    labels: Tensor | None,
    mining: HardNegativeMining,
    options: ContrastiveOptions,
) -> tuple[AnchorLosses, Tensor]:
    """One direction: mine each anchor row's negatives, then score with their weights.

    Returns the per-anchor results and the share of negatives that were up-weighted.
    """
    global_keys, spec = paired_layout(query, keys, labels, options.gather_distributed)
    rows = torch.arange(query.shape[0], device=query.device)
    cols = torch.arange(global_keys.shape[0], device=query.device)
    with torch.no_grad():
        # Mining looks at cosine similarities, per anchor row, whatever `normalize` says.
        cosine = l2_normalize(query.detach()) @ l2_normalize(global_keys.detach()).T  # (n, N)
        positive, _ = pair_masks(spec, rows, cols)
        log_w = hard_negative_log_weights(cosine, positive, mining)
        hard = ((log_w > 0) & ~positive).sum() / (~positive).sum().clamp(min=1)
    scale = options.scale_as(query.dtype)
    result = info_nce(
        query,
        global_keys,
        scale,
        spec,
        negative_log_weights=log_w,
        chunk_size=options.chunk_size,
        reduced=options.reduced,
    )
    return result, hard


def _hard_negative(
    z_a: Tensor,
    z_b: Tensor,
    labels: Tensor | None,
    mining: HardNegativeMining,
    options: ContrastiveOptions,
) -> tuple[PairedResult, Tensor]:
    """Both directions, reduced and averaged, and the mean share of up-weighted negatives."""
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    a, b = options.prepare(z_a, z_b)
    a2b, hard_a = _direction(a, b, labels, mining, options)
    b2a, hard_b = _direction(b, a, labels, mining, options)
    loss = (options.reduce(a2b) + options.reduce(b2a)) / 2
    return PairedResult(loss, (a2b, b2a), a, b), (hard_a + hard_b) / 2


@contrastive_keywords(temperature=0.07)
def hard_negative_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    strategy: str = "semi_hard",
    hard_negative_factor: float = 2.0,
    percentile: float = 0.9,
    margin: float = 0.2,
    beta: float = 1.0,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
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
    mining = HardNegativeMining(strategy, hard_negative_factor, percentile, margin, beta).checked()
    options = ContrastiveOptions.create(**keywords)
    return _hard_negative(z_a, z_b, labels, mining, options)[0].loss


@register_loss("hard_negative")
class HardNegativeLoss(HardNegativeMiningMixin, BaseContrastiveLoss, temperature=0.07):
    """Symmetric InfoNCE with up-weighted hard negatives (legacy ``HardNegativeMiningContrastiveLoss``).

    See :func:`hard_negative_loss` for the formula and the strategies. Terms: ``loss_a_to_b``,
    ``loss_b_to_a``, ``accuracy``, ``positive_similarity``, ``negative_similarity``,
    ``hard_negative_fraction`` (share of negatives up-weighted), ``temperature``.

    Args:
        temperature, strategy, hard_negative_factor, percentile, margin, beta: As
            :func:`hard_negative_loss`.
        reduction, normalize, chunk_size, gather_distributed: As :func:`hard_negative_loss`.
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = HardNegativeLoss(strategy="hard", hard_negative_factor=3.0)
        >>> out = loss.compute(torch.randn(8, 16), torch.randn(8, 16))
        >>> 0.0 < out.terms["hard_negative_fraction"].item() < 1.0
        True
    """

    def __init__(
        self,
        *,
        strategy: str = "semi_hard",
        hard_negative_factor: float = 2.0,
        percentile: float = 0.9,
        margin: float = 0.2,
        beta: float = 1.0,
        **options: Unpack[ContrastiveArgs],
    ) -> None:
        super().__init__(**options)
        mining = HardNegativeMining(strategy, hard_negative_factor, percentile, margin, beta)
        self._init_hard_negative_mining(mining)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for paired ``(n, D)`` embeddings and optional ``labels (n,)``."""
        options = self.options()
        result, hard = _hard_negative(z_a, z_b, labels, self.mining, options)
        return self.paired_output(
            result, options, ("a_to_b", "b_to_a"), hard_negative_fraction=hard
        )

    shown = "temperature:g mining.strategy!r hard_negative_factor=mining.factor:g reduction!r"
