"""Mean squared error with per-sample weights."""

from __future__ import annotations

from torch import Tensor

from embedloss._validation import (
    check_embeddings,
    check_reduction,
    check_same_shape,
    check_sample_weight,
    compute_dtype,
)
from embedloss.base.base_loss import LossOutput
from embedloss.base.supervised import BaseSupervisedLoss, weighted_reduction
from embedloss.registry import register_loss

__all__ = ["MSELoss", "mse_loss"]


def _mse(
    input: Tensor, target: Tensor, sample_weight: Tensor | None, reduction: str
) -> tuple[Tensor, Tensor]:
    """The checked, reduced loss and the unweighted per-sample MSEs ``(N,)``."""
    check_reduction(reduction)
    for x, name in ((input, "input"), (target, "target")):
        check_embeddings(x, name, ndim=tuple(range(1, 9)), shape="(N, *) with N >= 1")
    check_same_shape(input, target, "input", "target")
    dtype = compute_dtype(input, target)
    diff = input.to(dtype) - target.to(dtype)
    per_sample = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)  # (N,)
    if sample_weight is None:
        return weighted_reduction(per_sample, None, reduction), per_sample
    weights = check_sample_weight(sample_weight, input.shape[0]).to(per_sample)
    return weighted_reduction(per_sample * weights, weights, reduction), per_sample


def mse_loss(
    input: Tensor, target: Tensor, *, sample_weight: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    r"""Mean squared error with optional per-sample weights.

    For samples ``x_i, y_i`` of K elements each and weights ``s_i`` (default 1):

        ℓ_i = s_i·(1/K)·Σ_k (x_ik − y_ik)²,    mean: Σ_i ℓ_i / Σ_i s_i,    sum: Σ_i ℓ_i

    so the mean is a weighted mean of per-sample MSEs (``s_i = 2`` counts sample ``i`` twice)
    and, without weights, equals ``F.mse_loss(input, target)``. ``"sum"`` adds the per-sample
    values (the library's per-anchor contract), so it is ``F.mse_loss(..., reduction="sum") / K``.
    If ``Σ_i s_i = 0`` the mean is 0. (The legacy ``MeanSquaredError`` divided by N·K instead of
    ``Σ s_i``·K, and clamped the loss, which zeroes its gradient; neither is kept.)

    Args:
        input: ``(N, *)`` predictions.
        target: Same shape as ``input``.
        sample_weight: Optional ``(N,)`` non-negative weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``, i.e. ``ℓ_i``).

    Raises:
        ValueError: For mismatched shapes, an empty batch or a wrong ``sample_weight`` shape.
        TypeError: For non-tensor or non-floating inputs.

    Example:
        >>> x, y = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.zeros(2, 2)
        >>> mse_loss(x, y), mse_loss(x, y, sample_weight=torch.tensor([1.0, 3.0]))
        (tensor(2.5000), tensor(1.2500))
    """
    return _mse(input, target, sample_weight, reduction)[0]


@register_loss("mse")
class MSELoss(BaseSupervisedLoss):
    """Mean squared error with per-sample weights (see :func:`mse_loss` for the mean semantics).

    Terms: ``rmse`` (square root of the unweighted mean squared error).

    Args:
        reduction: ``"mean"`` (weighted mean of per-sample MSEs), ``"sum"`` or ``"none"``.

    Example:
        >>> loss = MSELoss()
        >>> loss(torch.ones(3, 2), torch.zeros(3, 2), sample_weight=torch.tensor([1.0, 0.0, 1.0]))
        tensor(1.)
    """

    def compute(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None
    ) -> LossOutput:
        """Loss and terms for ``input``, ``target`` ``(N, *)`` and optional ``sample_weight (N,)``."""
        loss, per_sample = _mse(input, target, sample_weight, self.reduction)
        return self.output(loss, lambda: {"rmse": per_sample.mean().sqrt()})
