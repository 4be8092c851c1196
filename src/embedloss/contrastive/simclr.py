"""SimCLR's NT-Xent loss over the 2N views of a batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    contrastive_keywords,
    nt_xent,
)
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SimCLRLoss", "simclr_loss"]


@contrastive_keywords(temperature=0.5)
def simclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    For the 2N views ``z = [z_a; z_b]`` (L2-normalised) and anchor ``i`` with positive ``j(i)``
    (its other view), Chen et al. 2020, Eq. 1:

        ℓ_i = −log( exp(z_i·z_j(i)/τ) / Σ_{k≠i} exp(z_i·z_k/τ) ),   L = (1/2N)·Σ_i ℓ_i

    With ``labels``, every other view of the same label is a positive and ℓ_i averages −log of
    the softmax over them (SupCon's L_out, Khosla et al. 2020, Eq. 2).

    Args:
        z_a: ``(N, D)`` first views.
        z_b: ``(N, D)`` second views.
        temperature: τ > 0 (the function also takes a 0-d tensor: a learnable τ). Default 0.5.
        labels: Optional ``(N,)`` identities; equal labels are positives.
        reduction: ``"mean"`` over the 2N anchors, ``"sum"``, or ``"none"`` (``(2N,)``).
        normalize: L2-normalise the inputs first (default True).
        chunk_size: Core tiling: ``None`` dense, an int, or ``"auto"``.
        gather_distributed: Score local anchors against the keys of every rank.

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar, or ``(2N,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, labels of the wrong length or τ <= 0.

    Example:
        >>> import math, torch
        >>> z = torch.eye(4)
        >>> loss = simclr_loss(z, z, temperature=1.0)  # identical views: closed form below
        >>> round(loss.item(), 6) == round(math.log(math.e + 6) - 1, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    return nt_xent(z_a, z_b, labels, options).loss


@register_loss("simclr", aliases=("nt_xent",))
class SimCLRLoss(BaseContrastiveLoss, temperature=0.5):
    """SimCLR's NT-Xent loss over the 2N views of a batch (Chen et al. 2020, Eq. 1).

    See :func:`simclr_loss` for the formula. Terms: ``accuracy`` (top-1 of each anchor's row is
    its positive), ``positive_similarity`` (mean cosine of the two views), ``temperature``.

    Args:
        temperature, reduction, normalize, chunk_size, gather_distributed: As :func:`simclr_loss`.
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> import torch
        >>> loss = SimCLRLoss(temperature=0.2)
        >>> z_a, z_b = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss(z_a, z_b).shape
        torch.Size([])
    """

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for views ``z_a``, ``z_b`` ``(N, D)`` and optional ``labels (N,)``."""
        options = self.options()
        return self.paired_output(nt_xent(z_a, z_b, labels, options), options)
