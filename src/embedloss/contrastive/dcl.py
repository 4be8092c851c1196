"""Decoupled contrastive learning, DCL and its vMF-weighted DCLW (Yeh et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_positive_float
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.ops.anchors import AnchorLosses, PairSpec
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    PairedResult,
    contrastive_keywords,
    nt_xent,
)
from embedloss.ops.layouts import two_view_layout
from embedloss.ops.similarity import l2_normalize, label_codes
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DCLLoss", "DCLWLoss", "dcl_loss", "dclw_loss", "von_mises_fisher_weights"]


@torch.no_grad()
def von_mises_fisher_weights(
    z_a: Tensor, z_b: Tensor, sigma: float = 0.5, *, gather_distributed: bool = False
) -> Tensor:
    """DCLW's positive weights ``w_i = 2 − N·softmax_i(cos(z_a_i, z_b_i)/σ)``, ``(n,)``, detached.

    The softmax runs over the N pairs of the batch (of every rank with ``gather_distributed``,
    so that the weights equal the single-process ones); the mean weight is 1.

    Example:
        >>> von_mises_fisher_weights(torch.eye(3), torch.eye(3))  # equal similarities: all 1
        tensor([1., 1., 1.])
    """
    check_positive_float(sigma, "sigma")
    cosine = (l2_normalize(z_a) * l2_normalize(z_b)).sum(-1)  # (n,)
    gathered = gather_with_grad(cosine, gather_distributed)
    weights = 2 - gathered.tensor.shape[0] * torch.softmax(gathered.tensor / sigma, dim=0)
    return weights[gathered.offset : gathered.offset + cosine.shape[0]]


def _mean_positive_logit(
    query: Tensor, keys: Tensor, scale: Tensor | float, spec: PairSpec
) -> Tensor:
    """``mean_{p∈P(i)} q_i·k_p·scale`` per anchor ``[a; b]``, in O(N·D) (no (2n, 2N) matrix)."""
    m = query.shape[0]
    if spec.query_labels is None or spec.key_labels is None:
        partner = torch.cat([query[m // 2 :], query[: m // 2]])  # each anchor's other view
        return (query * partner).sum(-1) * scale
    # Positives of anchor i: every key of its label except itself (it is a key too).
    codes = label_codes(torch.cat([spec.query_labels, spec.key_labels]))
    q_codes, k_codes = codes[:m], codes[m:]
    sums = keys.new_zeros(codes.shape[0], keys.shape[1]).index_add(0, k_codes, keys)  # by code
    counts = torch.zeros_like(codes).index_add_(0, k_codes, torch.ones_like(k_codes))[q_codes] - 1
    positive_sum = (query * (sums[q_codes] - query)).sum(-1)
    return positive_sum / counts.clamp(min=1) * scale


def _dcl(
    z_a: Tensor,
    z_b: Tensor,
    labels: Tensor | None,
    options: ContrastiveOptions,
    sigma: float | None,
) -> PairedResult:
    """DCL (``sigma=None``) or DCLW of the 2n anchors ``[z_a; z_b]``, reduced.

    The core, with the positives left out of the denominator, returns ``lse_neg − s_pos``;
    DCLW adds ``(1 − w)·s_pos`` to make it ``lse_neg − w·s_pos``, where ``s_pos`` is the (mean)
    positive logit.
    """
    plain = nt_xent(z_a, z_b, labels, options, decoupled=True)
    if sigma is None:
        return plain
    a, b, result = plain.a, plain.b, plain.anchors[0]
    weights = von_mises_fisher_weights(a, b, sigma, gather_distributed=options.gather_distributed)
    w = torch.cat([weights, weights]).to(a.dtype)  # (2n,): both views of pair i share w_i
    query, keys, spec = two_view_layout(a, b, labels, options.gather_distributed)
    scale = options.scale_as(a.dtype)
    s_pos = _mean_positive_logit(query, keys, scale, spec)
    loss = torch.where(result.valid, result.loss + (1 - w) * s_pos, torch.zeros_like(result.loss))
    weighted = AnchorLosses(loss, result.valid, result.top1)
    return PairedResult(options.reduce(weighted), (weighted,), a, b)


@contrastive_keywords()
def dcl_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""Decoupled contrastive loss: NT-Xent without the positive in the denominator.

    For the 2N normalised views and anchor ``z_i^(k)`` (Yeh et al. 2022, "Decoupled
    Contrastive Learning", Eq. 6):

        L_i^(k) = −⟨z_i^(1), z_i^(2)⟩/τ + log Σ_{l∈{1,2}, j≠i} exp(⟨z_i^(k), z_j^(l)⟩/τ),

    averaged over the 2N anchors (both directions). The negatives are the other samples' views
    from **both** sides, in **one** log-sum-exp (lightly's ``DCLLoss`` sums two separate
    log-sum-exps, one per side, which is not Eq. 6). With ``labels``, every other view of the
    same label is a positive (mean of their logits) and leaves the denominator.

    Args:
        z_a: ``(N, D)`` first views.
        z_b: ``(N, D)`` second views.
        temperature: τ > 0 (default 0.1).
        labels: Optional ``(N,)`` identities.
        reduction: ``"mean"`` over the 2N anchors, ``"sum"``, or ``"none"`` (``(2N,)``).
        normalize: L2-normalise the inputs (default True).
        chunk_size: Core tiling.
        gather_distributed: Negatives from every rank.

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar, or ``(2N,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, bad labels or τ <= 0.

    Example:
        >>> import math
        >>> z = torch.eye(3)
        >>> loss = dcl_loss(z, z, temperature=1.0)  # orthonormal pairs: log(4·e⁰) − 1
        >>> round(loss.item(), 6) == round(math.log(4) - 1, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    return _dcl(z_a, z_b, labels, options, None).loss


@contrastive_keywords()
def dclw_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    sigma: float = 0.5,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""Weighted decoupled contrastive loss: DCL with a von Mises–Fisher weight on the positive.

    Yeh et al. 2022 (Eq. 6 with the DCLW weighting function):

        L_i^(k) = −w_i·⟨z_i^(1), z_i^(2)⟩/τ + log Σ_{l∈{1,2}, j≠i} exp(⟨z_i^(k), z_j^(l)⟩/τ),
        w_i = 2 − exp(cos(z_i^(1), z_i^(2))/σ) / E_j[exp(cos(z_j^(1), z_j^(2))/σ)]
            = 2 − N·softmax_i(cos(z_i^(1), z_i^(2))/σ),

    with ``w`` detached (:func:`von_mises_fisher_weights`): pairs that are already close get a
    smaller pull. With ``labels`` the weight multiplies the mean positive logit.

    Args:
        z_a: ``(N, D)`` first views.
        z_b: ``(N, D)`` second views.
        temperature: τ > 0 (default 0.1).
        sigma: σ > 0 of the weighting (default 0.5).
        labels: Optional ``(N,)`` identities.
        reduction: ``"mean"`` over the 2N anchors, ``"sum"``, or ``"none"`` (``(2N,)``).
        normalize: L2-normalise the inputs (default True).
        chunk_size: Core tiling.
        gather_distributed: Negatives (and the softmax of the weights) over every rank.

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar, or ``(2N,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, bad labels, τ <= 0 or σ <= 0.

    Example:
        >>> z = torch.eye(3)  # equal pair similarities: every w_i = 1, so DCLW = DCL
        >>> bool(torch.isclose(dclw_loss(z, z), dcl_loss(z, z)))
        True
    """
    options = ContrastiveOptions.create(**keywords)
    return _dcl(z_a, z_b, labels, options, check_positive_float(sigma, "sigma")).loss


@register_loss("dcl")
class DCLLoss(BaseContrastiveLoss):
    """Decoupled contrastive loss over the 2N views of a batch (Yeh et al. 2022, Eq. 6).

    See :func:`dcl_loss` for the formula. Terms: ``accuracy`` (the positive outscores every
    negative), ``positive_similarity`` (mean cosine of the two views), ``temperature``.

    Args:
        temperature, reduction, normalize, chunk_size, gather_distributed: As :func:`dcl_loss`.
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = DCLLoss(temperature=0.2)
        >>> loss(torch.randn(8, 32), torch.randn(8, 32)).shape
        torch.Size([])
    """

    sigma: float | None = None

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for views ``z_a``, ``z_b`` ``(N, D)`` and optional ``labels (N,)``."""
        options = self.options()
        result = _dcl(z_a, z_b, labels, options, self.sigma)
        if not self.loss_only:  # positive_similarity is the cosine whatever `normalize` says
            result = result._replace(a=l2_normalize(result.a), b=l2_normalize(result.b))
        return self.paired_output(result, options)


@register_loss("dclw")
class DCLWLoss(DCLLoss):
    """Weighted decoupled contrastive loss, DCL with a vMF positive weight (Yeh et al. 2022).

    See :func:`dclw_loss` for the formula; terms as :class:`DCLLoss`.

    Args:
        temperature, sigma, reduction, normalize, chunk_size, gather_distributed: As
            :func:`dclw_loss`.
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = DCLWLoss(sigma=0.5)
        >>> loss(torch.randn(8, 32), torch.randn(8, 32)).shape
        torch.Size([])
    """

    def __init__(self, *, sigma: float = 0.5, **options: Unpack[ContrastiveArgs]) -> None:
        super().__init__(**options)
        self.sigma = check_positive_float(sigma, "sigma")

    shown = "temperature:g sigma:g reduction!r"
