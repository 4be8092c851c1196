"""KoLeo: the Kozachenko–Leonenko entropy regulariser (Sablayrolles et al. 2019; DINOv2)."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_embeddings,
    check_positive_float,
    check_reduction,
    compute_dtype,
)
from embedloss.base.base_loss import BaseLoss, Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.neighbours import nearest_neighbour_index
from embedloss.ops.similarity import l2_normalize
from embedloss.registry import register_loss

__all__ = ["KoLeoLoss", "koleo_loss"]


def _koleo(
    embeddings: Tensor, eps: float, reduction: str, distributed: bool
) -> tuple[Tensor, Tensor]:
    """Checked, reduced KoLeo loss and each embedding's distance to its nearest neighbour."""
    check_embeddings(embeddings, "embeddings")
    x = l2_normalize(embeddings.to(compute_dtype(embeddings)), eps=eps)  # (n, D)
    gathered = gather_with_grad(x, distributed)
    everyone = gathered.tensor  # (N, D): the batch of every rank
    if everyone.shape[0] < 2:
        raise ValueError(
            "embeddings must hold at least 2 samples (each needs a nearest neighbour), "
            f"got {everyone.shape[0]}"
        )
    own = torch.arange(x.shape[0], device=x.device) + gathered.offset
    index = nearest_neighbour_index(x.detach(), everyone.detach(), exclude=own)  # (n,)
    distance = torch.linalg.vector_norm(x - everyone[index], dim=1)  # (n,)
    per_sample = -torch.log(distance + eps)
    return reduce_samples(per_sample, reduction, distributed=distributed), distance


def koleo_loss(
    embeddings: Tensor,
    *,
    eps: float = 1e-8,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""KoLeo: minus the mean log distance of each embedding to its nearest neighbour.

    For L2-normalised embeddings ``x_i`` (Sablayrolles et al. 2019, Eq. 3, the differential
    entropy estimator of Kozachenko & Leonenko; DINOv2's ``KoLeoLoss``):

        ρ_i = min_{j≠i} ‖x_i − x_j‖,   L = −(1/N)·Σ_i log(ρ_i + ε)

    Minimising it spreads the embeddings uniformly over the sphere. The neighbour is chosen
    without gradient (the largest cosine); the distance carries the gradient to both points.

    Args:
        embeddings: ``(N, D)`` embeddings, N >= 2 (over all ranks with ``gather_distributed``).
        eps: ε > 0 in the normalisation and the logarithm (default 1e-8, DINOv2).
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (``(N,)``).
        gather_distributed: Search neighbours in the batch of every rank; reduce over ranks.

    Shape:
        embeddings: ``(N, D)``; output: scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        TypeError: If ``embeddings`` is not a floating-point tensor.
        ValueError: For fewer than 2 samples or ``eps <= 0``.

    Example:
        >>> import math
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # neighbours at distance √2
        >>> round(koleo_loss(x).item(), 6) == round(-math.log(math.sqrt(2) + 1e-8), 6)
        True
    """
    eps = check_positive_float(eps, "eps")
    reduction = check_reduction(reduction)
    distributed = check_bool(gather_distributed, "gather_distributed")
    return _koleo(embeddings, eps, reduction, distributed)[0]


@register_loss("koleo")
class KoLeoLoss(BaseLoss):
    """KoLeo entropy regulariser: spread embeddings apart (Sablayrolles et al. 2019; DINOv2).

    See :func:`koleo_loss` for the formula. DINOv2 adds it, weighted by 0.1, to the DINO loss of the
    student's class tokens (each global crop separately). Terms: ``nearest_neighbour_distance``
    (mean ρ_i), ``min_distance`` (the smallest ρ_i: 0 when two embeddings coincide).

    Args:
        eps, reduction, gather_distributed: As :func:`koleo_loss`.

    Raises:
        ValueError: For ``eps <= 0``.

    Example:
        >>> loss_fn = KoLeoLoss()
        >>> out = loss_fn.compute(torch.randn(16, 8))
        >>> out.loss.shape, sorted(out.terms)
        (torch.Size([]), ['min_distance', 'nearest_neighbour_distance'])
    """

    def __init__(
        self, *, eps: float = 1e-8, reduction: str = "mean", gather_distributed: bool = False
    ) -> None:
        super().__init__(reduction=reduction)
        self.eps = check_positive_float(eps, "eps")
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")

    def compute(self, embeddings: Tensor) -> LossOutput:
        """Loss and terms for ``(N, D)`` embeddings."""
        loss, rho = _koleo(embeddings, self.eps, self.reduction, self.gather_distributed)
        return self.output(
            loss, lambda: {"nearest_neighbour_distance": rho.mean(), "min_distance": rho.min()}
        )

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """One batch of ``(n, d)`` embeddings."""
        return (torch.randn(n, d, generator=g).to(dtype),), {}

    shown = "eps reduction!r"
