"""Cross-entropy with label smoothing, class weights and per-sample weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from embedloss._validation import check_float, check_int, describe
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.base.supervised import BaseSupervisedLoss, weighted_cross_entropy
from embedloss.registry import register_loss

__all__ = ["CrossEntropyLoss", "cross_entropy_loss"]


def _check_class_weights(class_weights: Any) -> Tensor | None:
    if class_weights is None:
        return None
    if not isinstance(class_weights, (Tensor, Sequence)) or isinstance(class_weights, str):
        raise TypeError(
            f"class_weights must be a 1-d tensor or a sequence of numbers, got {describe(class_weights)}"
        )
    w = torch.as_tensor(class_weights, dtype=torch.float64).detach().clone()
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"class_weights must have shape (C,), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("class_weights must be finite and >= 0")
    return w


#: The functional form is the base's single implementation: see
#: :func:`~embedloss.base.supervised.weighted_cross_entropy` for the formula and arguments.
cross_entropy_loss = weighted_cross_entropy


@register_loss("cross_entropy")
class CrossEntropyLoss(BaseSupervisedLoss):
    """Cross-entropy with label smoothing, class weights and per-sample weights.

    See :func:`cross_entropy_loss`: equal to ``F.cross_entropy`` wherever they overlap (class
    weights and smoothing together included, which the legacy loss got wrong); per-sample
    weights give a weighted mean. Class weights are a buffer (they follow ``.to()`` and
    ``state_dict``). Terms: ``accuracy`` (top-1 over non-ignored targets).

    Args:
        label_smoothing: ε in [0, 1] (default 0; the legacy default was 0.1).
        class_weights: Optional ``(C,)`` non-negative weights (tensor or sequence).
        ignore_index: Target value to ignore (default -100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> loss = CrossEntropyLoss(label_smoothing=0.1, class_weights=[1.0, 2.0, 1.0])
        >>> logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
        >>> loss(logits, y, sample_weight=torch.tensor([1.0, 0.5, 1.0, 2.0])).shape
        torch.Size([])
    """

    class_weights: Tensor | None

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        class_weights: Tensor | Sequence[float] | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.label_smoothing = check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.register_buffer("class_weights", _check_class_weights(class_weights))

    def compute(
        self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None = None
    ) -> LossOutput:
        """Loss and terms for ``logits (N, C)``, ``targets (N,)`` and optional ``sample_weight (N,)``."""
        loss = self.weighted_cross_entropy(
            logits,
            targets,
            class_weights=self.class_weights,
            sample_weight=sample_weight,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )

        def terms() -> dict[str, Tensor | float]:
            keep = targets != self.ignore_index
            hits = (logits.argmax(dim=1) == targets) & keep
            return {"accuracy": hits.sum() / keep.sum().clamp(min=1)}

        return self.output(loss, terms)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``(n, d)`` logits over d classes and ``(n,)`` targets."""
        logits = torch.randn(n, d, generator=g).to(dtype)
        return (logits, torch.randint(0, d, (n,), generator=g)), {}

    shown = "label_smoothing ignore_index reduction!r"
