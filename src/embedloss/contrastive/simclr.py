"""SimCLR's NT-Xent loss over the 2N views of a batch."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import check_pair, compute_dtype
from embedloss.base.base_loss import LossOutput, detached_terms
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.info_nce import AnchorLosses, ChunkSize, PairSpec, info_nce, reduce_anchor_losses
from embedloss.ops.similarity import inverse_temperature, prepare_embeddings
from embedloss.registry import register_loss

__all__ = ["SimCLRLoss", "simclr_anchor_losses", "simclr_loss", "two_view_layout"]


def two_view_layout(
    a: Tensor, b: Tensor, labels: Tensor | None = None, gather_distributed: bool = False
) -> tuple[Tensor, Tensor, PairSpec]:
    """SimCLR's 2N-anchor layout of two prepared views ``a``, ``b`` ``(n, D)``.

    Returns ``(query, keys, spec)``: the local anchors ``[a; b]`` ``(2n, D)``, the keys
    ``[a_all; b_all]`` ``(2N, D)`` of every rank (``N = n`` without ``gather_distributed``), and
    a :class:`PairSpec` whose positive is the anchor's other view (with ``labels``: every other
    view of the same label) and which removes the anchor itself. Shared by the losses that
    contrast 2N views (SimCLR, DCL).
    """
    ga, gb = gather_with_grad(a, gather_distributed), gather_with_grad(b, gather_distributed)
    total = ga.tensor.shape[0]
    query = torch.cat([a, b])  # (2n, D) local anchors
    keys = torch.cat([ga.tensor, gb.tensor])  # (2N, D) global keys
    local = torch.arange(a.shape[0], device=a.device) + ga.offset
    self_index = torch.cat([local, local + total])
    if labels is None:
        spec = PairSpec(positive_index=torch.cat([local + total, local]), self_index=self_index)
    else:
        global_labels = gather_with_grad(labels, gather_distributed).tensor
        spec = PairSpec(
            query_labels=torch.cat([labels, labels]),
            key_labels=torch.cat([global_labels, global_labels]),
            self_index=self_index,
        )
    return query, keys, spec


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
        >>> import math
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
            reduction=reduction, chunk_size=chunk_size, gather_distributed=gather_distributed
        )
        self._init_temperature(temperature, learnable_temperature)
        self._init_normalization(normalize)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for views ``z_a``, ``z_b`` ``(N, D)`` and optional ``labels (N,)``."""
        check_pair(z_a, z_b, "z_a", "z_b", labels)
        dtype = compute_dtype(z_a, z_b)
        result = simclr_anchor_losses(
            z_a,
            z_b,
            temperature=1.0 / self.scale(dtype=dtype),
            labels=labels,
            normalize=self._normalize,
            chunk_size=self.chunk_size,
            gather_distributed=self.gather_distributed,
        )
        loss = reduce_anchor_losses(result, self.reduction, distributed=self.gather_distributed)
        with torch.no_grad():
            cos = (
                self.normalize_embeddings(z_a.to(dtype)) * self.normalize_embeddings(z_b.to(dtype))
            ).sum(-1)
        terms = detached_terms(
            accuracy=result.correct.float().mean(),
            positive_similarity=cos.mean(),
            temperature=self.temperature,
        )
        return LossOutput(loss, terms)

    def forward(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> Tensor:
        """The NT-Xent loss of views ``z_a``, ``z_b`` (see :meth:`compute`)."""
        return self.compute(z_a, z_b, labels).loss
