"""CosFace: large margin cosine loss (Wang et al. 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from embedloss._validation import check_float, check_positive_float
from embedloss.metric_learning._proxies import MarginLoss, ProxyArgs, ProxyOptions, margin_softmax
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CosFaceLoss", "cosface_loss"]


def _check(scale: float, margin: float) -> tuple[float, float]:
    return check_positive_float(scale, "scale"), check_float(margin, "margin", low=0.0)


def cosface_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""CosFace / large margin cosine loss (Wang et al. 2018, Eq. 4).

    With ``cos θ_j`` the cosine of the normalised embedding ``x_i`` and class centre ``W_j``,
    the scale ``s`` and the cosine margin ``m``:

        ℓ_i = −log( e^{s·(cos θ_{y_i} − m)} / (e^{s·(cos θ_{y_i} − m)} + Σ_{j≠y_i} e^{s·cos θ_j}) )

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` class indices in ``[0, C)``.
        weight: ``(C, D)`` class centres.
        scale: s > 0 (default 64).
        margin: m >= 0 (default 0.35).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``).
        gather_distributed: Average over the samples of every rank (DDP).

    Shape:
        embeddings ``(N, D)``, labels ``(N,)``, weight ``(C, D)``; output: scalar or ``(N,)``.

    Raises:
        ValueError: For mismatched shapes, labels outside ``[0, C)`` (checked on CPU), s <= 0
            or m < 0.

    Example:
        >>> w = torch.eye(2)
        >>> cosface_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), w, scale=1.0, margin=1.0)
        tensor(0.6931)
    """
    scale, margin = _check(scale, margin)
    options = ProxyOptions(1, reduction, gather_distributed)
    return margin_softmax(embeddings, labels, weight, scale, lambda c: c - margin, options)[0]


@register_loss("cosface", aliases=("large_margin_cosine",))
class CosFaceLoss(MarginLoss):
    """CosFace: large margin cosine softmax over learnable class centres (Wang et al. 2018).

    See :func:`cosface_loss` for the formula. The centres are the parameter ``weight`` of shape
    ``(num_classes, embedding_dim)`` (as ``nn.Linear``), initialised from N(0, 0.01²): pass
    ``loss.parameters()`` to the optimiser. Terms: ``accuracy`` and ``target_cosine``.

    Args:
        scale, margin: As :func:`cosface_loss`.

    Example:
        >>> loss = CosFaceLoss(num_classes=10, embedding_dim=16)
        >>> loss(torch.randn(8, 16), torch.randint(0, 10, (8,))).shape
        torch.Size([])
    """

    def __init__(
        self, *, scale: float = 64.0, margin: float = 0.35, **options: Unpack[ProxyArgs]
    ) -> None:
        super().__init__(**options)
        self.scale, self.margin = _check(scale, margin)

    def _target(self, cos: Tensor) -> Tensor:
        return cos - self.margin
