"""Base class of supervised losses: label smoothing and weighted cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import check_embeddings, check_float, check_labels, check_tensor
from embedloss.base.base_loss import BaseLoss

__all__ = ["BaseSupervisedLoss", "weighted_cross_entropy", "weighted_reduction"]


def weighted_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    class_weights: Tensor | None = None,
    sample_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy with class weights, per-sample weights and label smoothing.

    Per sample, ``ℓ_i = s_i·[(1−ε)·w_{y_i}·(−log p_{i,y_i}) + (ε/C)·Σ_c w_c·(−log p_{ic})]``, the
    definition of ``F.cross_entropy`` times the sample weight ``s_i``. The mean divides by
    ``Σ_i s_i·w_{y_i}`` over non-ignored samples, so with ``s = 1`` it equals ``F.cross_entropy``
    exactly (class weights and smoothing together included); when that sum is 0 (every target
    ignored) the mean is 0 rather than NaN.

    Shape:
        logits ``(N, C)``, targets ``(N,)`` class indices, class_weights ``(C,)``, sample_weight ``(N,)``.

    Example:
        >>> logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> bool(torch.isclose(weighted_cross_entropy(logits, y), F.cross_entropy(logits, y)))
        True
    """
    check_embeddings(logits, "logits")
    check_labels(targets, logits.shape[0], "targets")
    check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if class_weights is not None:
        check_tensor(class_weights, "class_weights")
        if class_weights.shape != (x.shape[1],):
            raise ValueError(
                f"class_weights must have shape ({x.shape[1]},), got {tuple(class_weights.shape)}"
            )
        class_weights = class_weights.to(x)
    per_sample = F.cross_entropy(
        x,
        targets.long(),
        weight=class_weights,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )  # (N,)
    keep = targets != ignore_index
    denom_w = (
        torch.ones_like(per_sample)
        if class_weights is None
        else class_weights[targets.long().clamp(min=0)]
    )
    denom_w = torch.where(keep, denom_w, torch.zeros_like(denom_w))
    if sample_weight is not None:
        check_tensor(sample_weight, "sample_weight")
        if sample_weight.shape != per_sample.shape:
            raise ValueError(
                f"sample_weight must have shape {tuple(per_sample.shape)}, got {tuple(sample_weight.shape)}"
            )
        sample_weight = sample_weight.to(per_sample)
        per_sample = per_sample * sample_weight
        denom_w = denom_w * sample_weight
    return weighted_reduction(per_sample, denom_w, reduction)


def weighted_reduction(per_sample: Tensor, weights: Tensor, reduction: str) -> Tensor:
    """Reduce weighted per-sample losses ``(N,)``: ``"mean"`` divides their sum by ``Σ weights``.

    ``"none"`` returns ``per_sample``, ``"sum"`` its sum. When the weights sum to 0 (every sample
    ignored or weighted 0) the mean is 0, not ``0/0 = NaN`` as ``F.cross_entropy`` gives.

    Example:
        >>> weighted_reduction(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), "mean")
        tensor(2.)
    """
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    total = weights.sum()
    return per_sample.sum() / torch.where(total > 0, total, torch.ones_like(total))


class BaseSupervisedLoss(BaseLoss):
    """Base of classification-style losses (logits and class targets)."""

    @staticmethod
    def apply_label_smoothing(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
        """Soft targets ``(N, C)``: ``(1−ε)·one_hot + ε/C``.

        Example:
            >>> BaseSupervisedLoss.apply_label_smoothing(torch.tensor([1]), 2, 0.2)
            tensor([[0.1000, 0.9000]])
        """
        eps = check_float(smoothing, "label_smoothing", low=0.0, high=1.0)
        one_hot = F.one_hot(targets.long(), num_classes).float()
        return one_hot * (1.0 - eps) + eps / num_classes

    def weighted_cross_entropy(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        class_weights: Tensor | None = None,
        sample_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
    ) -> Tensor:
        """:func:`weighted_cross_entropy` reduced with this loss's ``reduction``."""
        return weighted_cross_entropy(
            logits,
            targets,
            class_weights=class_weights,
            sample_weight=sample_weight,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=self.reduction,
        )
