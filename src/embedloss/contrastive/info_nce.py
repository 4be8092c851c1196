"""InfoNCE with in-batch, shared or per-query negatives (van den Oord et al. 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_embeddings, check_pair, check_same_dim
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.anchors import AnchorLosses, PairSpec, anchor_losses_from_logits
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    PairedResult,
    contrastive_keywords,
    info_nce,
)
from embedloss.ops.layouts import paired_layout
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["InfoNCELoss", "info_nce_loss"]


def _check_inputs(
    query: Tensor, positive_key: Tensor, negative_keys: Tensor | None, labels: Tensor | None
) -> None:
    check_pair(query, positive_key, "query", "positive_key", labels)
    if negative_keys is None:
        return
    check_embeddings(negative_keys, "negative_keys", ndim=(2, 3), shape="(M, D) or (N, M, D)")
    check_same_dim(query, negative_keys, "query", "negative_keys")
    if negative_keys.dim() == 3 and negative_keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"per-query negative_keys must have shape (N={query.shape[0]}, M, D), got {tuple(negative_keys.shape)}"
        )
    if labels is not None:
        raise ValueError(
            "labels mark in-batch positives and cannot be combined with explicit negative_keys"
        )


def _shared_negatives_spec(n: int, m: int, device: torch.device) -> PairSpec:
    """Keys ``[positives (n); negatives (m)]``: query ``i``'s positive is key ``i``.

    Other queries' positives are not negatives here: every query and positive key gets one
    label and the negatives another, and same-label non-positives leave the denominator.
    """
    group = (torch.arange(n + m, device=device) >= n).long()  # 0: query and positive, 1: negative
    return PairSpec(
        positive_index=torch.arange(n, device=device),
        query_labels=group[:n],
        key_labels=group,
        labels_mark="false_negatives",
    )


def _per_query(q: Tensor, p: Tensor, neg: Tensor, scale: Tensor | float) -> AnchorLosses:
    """Each query against its own positive and its own ``(M, D)`` negatives (dense)."""
    pos_logit = (q * p).sum(-1, keepdim=True)  # (N, 1)
    neg_logits = torch.einsum("nd,nmd->nm", q, neg)  # (N, M)
    logits = torch.cat([pos_logit, neg_logits], dim=1) * scale  # (N, 1 + M)
    positive = (torch.arange(logits.shape[1], device=logits.device) == 0).expand_as(logits)
    return anchor_losses_from_logits(logits, positive, torch.ones_like(positive))


def _info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None,
    labels: Tensor | None,
    options: ContrastiveOptions,
) -> PairedResult:
    """Checked, prepared and reduced InfoNCE in one of the three negative modes."""
    _check_inputs(query, positive_key, negative_keys, labels)
    extra = () if negative_keys is None else (negative_keys,)
    q, p, *neg = options.prepare(query, positive_key, *extra)
    scale = options.scale_as(q.dtype)

    def score(keys: Tensor, spec: PairSpec) -> AnchorLosses:
        return info_nce(
            q, keys, scale, spec, chunk_size=options.chunk_size, reduced=options.reduced
        )

    if not neg:
        keys, spec = paired_layout(q, p, labels, options.gather_distributed)
        result = score(keys, spec)
    elif neg[0].dim() == 2:
        spec = _shared_negatives_spec(q.shape[0], neg[0].shape[0], q.device)
        result = score(torch.cat([p, neg[0]]), spec)
    else:
        result = _per_query(q, p, neg[0], scale)
    return PairedResult(options.reduce(result), (result,), q, p)  # over ranks when gathering


@contrastive_keywords()
def info_nce_loss(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""InfoNCE: classify each query's positive key among negatives (van den Oord et al. 2018, Eq. 4).

        ℓ_i = −log( exp(q_i·k_i⁺/τ) / (exp(q_i·k_i⁺/τ) + Σ_{k⁻} exp(q_i·k⁻/τ)) )

    The negatives ``k⁻`` of query ``i`` are:

    * ``negative_keys=None``: the other queries' positive keys (in-batch negatives); with
      ``labels``, keys of the same label are positives instead (uniform target over them);
    * ``negative_keys (M, D)``: the same M negatives for every query (other positives unused);
    * ``negative_keys (N, M, D)``: M negatives of its own for each query.

    Args:
        query: ``(N, D)``.
        positive_key: ``(N, D)``, row ``i`` is the positive of query ``i``.
        negative_keys: ``None``, ``(M, D)`` or ``(N, M, D)``.
        temperature: τ > 0 (default 0.1).
        labels: Optional ``(N,)`` identities (only without ``negative_keys``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``).
        normalize: L2-normalise every input (default True).
        chunk_size: Core tiling for the in-batch case.
        gather_distributed: Reduce over every rank's queries; in-batch, every rank's keys are negatives.

    Raises:
        ValueError: For mismatched shapes or dims, empty inputs, bad labels or τ <= 0.

    Example:
        >>> import math
        >>> q = torch.eye(3)
        >>> loss = info_nce_loss(q, q, temperature=1.0)
        >>> round(loss.item(), 6) == round(math.log(math.e + 2) - 1, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    return _info_nce(query, positive_key, negative_keys, labels, options).loss


@register_loss("info_nce")
class InfoNCELoss(BaseContrastiveLoss):
    """InfoNCE with in-batch, shared or per-query negatives (van den Oord et al. 2018, Eq. 4).

    See :func:`info_nce_loss` for the formula and the three negative modes. Terms: ``accuracy``
    (the positive scores highest), ``positive_similarity``, ``temperature``.

    Args:
        temperature, reduction, normalize, chunk_size, gather_distributed: As :func:`info_nce_loss`.
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = InfoNCELoss()
        >>> q, k, negatives = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 5, 8)
        >>> loss(q, k, negatives).shape
        torch.Size([])
    """

    def compute(
        self,
        query: Tensor,
        positive_key: Tensor,
        negative_keys: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms; arguments as in :func:`info_nce_loss`."""
        options = self.options()
        result = _info_nce(query, positive_key, negative_keys, labels, options)
        return self.paired_output(result, options)
