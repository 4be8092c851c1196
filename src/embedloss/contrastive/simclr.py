"""SimCLR's NT-Xent loss over the 2N views of a batch."""

from __future__ import annotations

from torch import Tensor

from embedloss._validation import check_pair, compute_dtype
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.info_nce import AnchorLosses, ChunkSize, info_nce, reduce_anchor_losses
from embedloss.ops.layouts import two_view_layout
from embedloss.ops.similarity import inverse_temperature, prepare_embeddings
from embedloss.registry import register_loss

__all__ = ["SimCLRLoss", "simclr_anchor_losses", "simclr_loss", "two_view_layout"]


def simclr_anchor_losses(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    labels: Tensor | None = None,
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> AnchorLosses:
    """Per-anchor NT-Xent for the 2N anchors ``[z_a; z_b]`` (see :func:`simclr_loss`)."""
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    dtype = compute_dtype(z_a, z_b)
    a = prepare_embeddings(z_a, normalize=normalize, dtype=dtype)
    b = prepare_embeddings(z_b, normalize=normalize, dtype=dtype)
    scale = inverse_temperature(temperature, dtype)
    query, keys, spec = two_view_layout(a, b, labels, gather_distributed)
    return info_nce(query, keys, scale, spec, chunk_size=chunk_size)


def simclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    labels: Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
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
        temperature: τ > 0 (float, or a 0-d tensor for a learnable τ). Default 0.5.
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
    result = simclr_anchor_losses(
        z_a,
        z_b,
        temperature=temperature,
        labels=labels,
        normalize=normalize,
        chunk_size=chunk_size,
        gather_distributed=gather_distributed,
    )
    return reduce_anchor_losses(result, reduction, distributed=gather_distributed)


@register_loss("simclr", aliases=("nt_xent",))
class SimCLRLoss(BaseContrastiveLoss):
    """SimCLR's NT-Xent loss over the 2N views of a batch (Chen et al. 2020, Eq. 1).

    See :func:`simclr_loss` for the formula. Terms: ``accuracy`` (top-1 of each anchor's row is
    its positive), ``positive_similarity`` (mean cosine of the two views), ``temperature``.

    Args:
        temperature: τ > 0 (default 0.5, SimCLR's CIFAR setting).
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (clamped at 100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling (``None``, an int or ``"auto"``).
        gather_distributed: Use the keys of all ranks (DDP).

    Example:
        >>> import torch
        >>> loss = SimCLRLoss(temperature=0.2)
        >>> z_a, z_b = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss(z_a, z_b).shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        temperature: float = 0.5,
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

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for views ``z_a``, ``z_b`` ``(N, D)`` and optional ``labels (N,)``."""
        check_pair(z_a, z_b, "z_a", "z_b", labels)
        dtype = compute_dtype(z_a, z_b)
        result = simclr_anchor_losses(z_a, z_b, labels=labels, **self.core_options(dtype))
        a, b = self.normalize_embeddings(z_a.to(dtype)), self.normalize_embeddings(z_b.to(dtype))
        return self.anchor_output(result, a, b)

    def forward(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> Tensor:
        """The NT-Xent loss of views ``z_a``, ``z_b`` (see :meth:`compute`)."""
        return self.compute(z_a, z_b, labels).loss
