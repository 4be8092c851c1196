"""ArcFace: additive angular margin loss, with sub-centres (Deng et al. 2019; 2020)."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_float, check_int, check_positive_float
from embedloss.metric_learning._proxies import MarginLoss, ProxyArgs, ProxyOptions, margin_softmax
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ArcFaceLoss", "arcface_loss"]


def _angular_margin(cos: Tensor, margin: float) -> Tensor:
    """``cos(θ + m)`` while ``θ + m <= π``, else ``cos θ − m·sin m`` (monotonic in θ).

    ``cos(θ + m) = cos θ·cos m − sin θ·sin m`` with ``sin θ = √(1 − cos²θ)`` (gradient 0 rather
    than ∞ at ``cos θ = ±1``); the fallback past ``π − m`` is the official code's.
    """
    sin_sq = 1 - cos.square()
    inside = sin_sq > 0
    sin = torch.where(inside, torch.where(inside, sin_sq, torch.ones_like(sin_sq)).sqrt(), 0.0)
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    return torch.where(cos >= math.cos(math.pi - margin), shifted, cos - margin * math.sin(margin))


def _check(scale: float, margin: float) -> tuple[float, float]:
    return (
        check_positive_float(scale, "scale"),
        check_float(margin, "margin", low=0.0, high=math.pi / 2),
    )


def arcface_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    sub_centers: int = 1,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""ArcFace loss (Deng et al. 2019, Eq. 3); sub-center ArcFace for ``sub_centers > 1``.

    With ``θ_j`` the angle between the normalised embedding ``x_i`` and the normalised centre
    ``W_j`` of class ``j``, ``s`` the scale and ``m`` the additive angular margin (radians):

        ℓ_i = −log( e^{s·cos(θ_{y_i} + m)} / (e^{s·cos(θ_{y_i} + m)} + Σ_{j≠y_i} e^{s·cos θ_j}) )

    Past ``θ + m = π`` the target logit continues as ``cos θ − m·sin m`` (the official code's
    monotonic fallback). With ``k`` sub-centres per class (Deng et al. 2020) ``cos θ_j`` is the
    largest cosine of the class's ``k`` centres.

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` class indices in ``[0, C)``.
        weight: ``(C·k, D)`` class centres (rows ``c·k … c·k + k − 1`` are class ``c``'s).
        scale: s > 0 (default 64).
        margin: m in ``[0, π/2]`` radians (default 0.5; pytorch-metric-learning takes degrees).
        sub_centers: k >= 1 (default 1: plain ArcFace; 3 via the alias ``sub_center_arcface``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``).
        gather_distributed: Average over the samples of every rank (DDP).

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``, weight ``(C·k, D)``; output: scalar or ``(N,)``.

    Raises:
        ValueError: For mismatched shapes, labels outside ``[0, C)`` (checked on CPU), s <= 0,
            a margin outside ``[0, π/2]`` or a weight whose rows are not a multiple of k.

    Example:
        >>> w = torch.eye(2)  # class centres along the axes
        >>> x = torch.tensor([[1.0, 0.0]])  # on its centre: θ = 0
        >>> arcface_loss(x, torch.tensor([0]), w, scale=1.0, margin=0.0)  # plain softmax
        tensor(0.3133)
    """
    scale, margin = _check(scale, margin)
    k = check_int(sub_centers, "sub_centers", low=1)
    if weight.dim() != 2 or weight.shape[0] % k:
        raise ValueError(
            f"weight must be (C·sub_centers, D) with sub_centers={k}, got {tuple(weight.shape)}"
        )
    options = ProxyOptions(k, reduction, gather_distributed)
    target = partial(_angular_margin, margin=margin)
    return margin_softmax(embeddings, labels, weight, scale, target, options)[0]


@register_loss("arcface", aliases={"sub_center_arcface": {"sub_centers": 3}})
class ArcFaceLoss(MarginLoss):
    """ArcFace: additive angular margin softmax over learnable class centres (Deng et al. 2019).

    See :func:`arcface_loss` for the formula. The centres are the parameter ``weight`` of shape
    ``(num_classes·sub_centers, embedding_dim)`` (as ``nn.Linear``), initialised from N(0, 0.01²)
    as the official code: pass ``loss.parameters()`` to the optimiser (under DDP, ordinary
    parameters). Terms: ``accuracy`` (the nearest centre is the label's, without margin) and
    ``target_cosine`` (mean ``cos θ_y``).

    Args:
        scale, margin, sub_centers: As :func:`arcface_loss`.

    Example:
        >>> loss = ArcFaceLoss(num_classes=10, embedding_dim=16, sub_centers=3)
        >>> loss.weight.shape
        torch.Size([30, 16])
        >>> out = loss.compute(torch.randn(8, 16), torch.randint(0, 10, (8,)))
        >>> sorted(out.terms)
        ['accuracy', 'target_cosine']
    """

    def __init__(
        self,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        sub_centers: int = 1,
        **options: Unpack[ProxyArgs],
    ) -> None:
        super().__init__(sub_centers, **options)
        self.scale, self.margin = _check(scale, margin)

    def _target(self, cos: Tensor) -> Tensor:
        return _angular_margin(cos, self.margin)
