"""Proxy Anchor loss (Kim et al. 2020)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import (
    check_embeddings,
    check_float,
    check_labels,
    check_positive_float,
    check_reduction,
)
from embedloss.base.base_loss import LossOutput
from embedloss.metric_learning._proxies import BaseProxyLoss, ProxyArgs, ProxyOptions, class_cosines
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.pair_losses import masked_log1p_sum_exp
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ProxyAnchorLoss", "proxy_anchor_loss"]


def _proxy_anchor(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    alpha: float,
    delta: float,
    options: ProxyOptions,
) -> tuple[Tensor, Tensor]:
    """The loss and which proxies ``(C,)`` have a positive sample in the (global) batch."""
    reduction, gather_distributed = check_reduction(options.reduction), options.gather_distributed
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0])
    # Every proxy sums over the whole batch, so the batch of every rank is gathered and each
    # rank computes the same loss: gradients reach the local rows through the gather (world ×
    # the single-process gradient), and the proxies stay ordinary DDP parameters.
    x = gather_with_grad(embeddings, gather_distributed).tensor
    y = gather_with_grad(labels, gather_distributed).tensor
    cos, y = class_cosines(x, y, weight)  # (N, C)
    classes = torch.arange(weight.shape[0], device=y.device)
    positive = y.unsqueeze(1) == classes.unsqueeze(0)  # (N, C)
    pulled = masked_log1p_sum_exp(-alpha * (cos - delta), positive, dim=0)  # (C,)
    pushed = masked_log1p_sum_exp(alpha * (cos + delta), ~positive, dim=0)  # (C,)
    with_positives = positive.any(dim=0)
    if reduction == "none":
        return pulled + pushed, with_positives
    if reduction == "sum":
        return pulled.sum() + pushed.sum(), with_positives
    count = with_positives.sum().to(pulled.dtype).clamp(min=1)
    return pulled.sum() / count + pushed.sum() / weight.shape[0], with_positives


def _check(alpha: float, delta: float) -> tuple[float, float]:
    return check_positive_float(alpha, "alpha"), check_float(delta, "delta")


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    *,
    alpha: float = 32.0,
    delta: float = 0.1,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Proxy Anchor loss (Kim et al. 2020, Eq. 4): each proxy is an anchor over the batch.

    With proxies ``p ∈ P`` (the rows of ``weight``), ``P⁺`` the proxies with a positive sample in
    the batch, ``X_p⁺`` the samples of class ``p``, ``X_p⁻`` the others, and the cosine ``s(x, p)``:

        L = (1/|P⁺|)·Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(s(x,p) − δ)})
          + (1/|P|)·Σ_{p∈P} log(1 + Σ_{x∈X_p⁻} e^{α(s(x,p) + δ)})

    ``reduction="sum"`` adds both sums without dividing and ``"none"`` returns the ``(C,)``
    per-proxy values ``pos_p + neg_p`` (so ``sum == none.sum()``). With ``gather_distributed``
    the sums run over the samples of every rank.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` class indices in ``[0, C)``.
        weight: ``(C, D)`` proxies.
        alpha: α > 0, the scale (default 32).
        delta: δ, the margin (default 0.1).
        reduction: ``"mean"`` (Eq. 4), ``"sum"`` or ``"none"`` (``(C,)``).
        gather_distributed: Sum over the samples of every rank (DDP).

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``, weight ``(C, D)``; output: scalar or ``(C,)``.

    Raises:
        ValueError: For mismatched shapes, labels outside ``[0, C)`` (checked on CPU) or α <= 0.

    Example:
        >>> import math
        >>> w = torch.eye(2)
        >>> x = torch.eye(2)  # each sample on its own proxy: s⁺ = 1, s⁻ = 0
        >>> loss = proxy_anchor_loss(x, torch.tensor([0, 1]), w, alpha=1.0, delta=0.0)
        >>> round(loss.item(), 6) == round(math.log(1 + math.exp(-1)) + math.log(2), 6)
        True
    """
    alpha, delta = _check(alpha, delta)
    options = ProxyOptions(1, reduction, gather_distributed)
    return _proxy_anchor(embeddings, labels, weight, alpha, delta, options)[0]


@register_loss("proxy_anchor")
class ProxyAnchorLoss(BaseProxyLoss):
    """Proxy Anchor loss: proxies as anchors over the batch (Kim et al. 2020, Eq. 4).

    See :func:`proxy_anchor_loss` for the formula. The proxies are the parameter ``weight``
    ``(num_classes, embedding_dim)`` (as ``nn.Linear``), initialised from N(0, 2/C) (Kaiming-normal,
    ``mode="fan_out"``, as the official code); pass ``loss.parameters()`` to the optimiser (the
    paper's learning rate for them is 100× larger; under DDP, ordinary parameters). Terms:
    ``proxies_with_positives``.

    Args:
        alpha, delta: As :func:`proxy_anchor_loss`.

    Example:
        >>> loss = ProxyAnchorLoss(num_classes=4, embedding_dim=16)
        >>> out = loss.compute(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]))
        >>> out.terms["proxies_with_positives"].item()
        3.0
    """

    def __init__(
        self, *, alpha: float = 32.0, delta: float = 0.1, **options: Unpack[ProxyArgs]
    ) -> None:
        super().__init__(**options)
        self.alpha, self.delta = _check(alpha, delta)

    def _init_std(self) -> float:
        return math.sqrt(2.0 / self.num_classes)  # Kaiming-normal, fan_out = C

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Loss and terms for ``embeddings (N, D)`` and ``labels (N,)``."""
        alpha, delta, options = self.alpha, self.delta, self.options()
        loss, with_positives = _proxy_anchor(embeddings, labels, self.weight, alpha, delta, options)
        return self.output(loss, lambda: {"proxies_with_positives": with_positives.sum()})
