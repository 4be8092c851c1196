"""Base class of supervised losses: label smoothing and weighted cross-entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import (
    check_embeddings,
    check_float,
    check_int,
    check_labels,
    check_reduction,
    check_sample_weight,
    on_host,
)
from embedloss.base.base_loss import BaseLoss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BaseSupervisedLoss", "CrossEntropyArgs", "weighted_cross_entropy", "weighted_reduction"]


class CrossEntropyArgs(TypedDict, total=False):
    """The keyword options of :func:`weighted_cross_entropy` other than ``reduction``."""

    class_weights: Tensor | None
    sample_weight: Tensor | None
    label_smoothing: float
    ignore_index: int


def _check_targets(targets: Tensor, n: int, c: int, ignore_index: int) -> None:
    check_labels(targets, n, "targets")
    if not on_host(targets):  # a range check reads values: on CPU inputs only
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= c))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must be class indices in [0, {c - 1}] or ignore_index={ignore_index}, got {first}"
        )


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
    r"""Cross-entropy of class ``logits`` with label smoothing, class and per-sample weights.

    With ``p = softmax(logits_i)``, class weights ``w`` (default 1), the smoothed targets
    ``q_i = (1 − ε)·one_hot(y_i) + ε/C`` of :meth:`BaseSupervisedLoss.apply_label_smoothing` and
    per-sample weights ``s`` (default 1), the loss of sample ``i`` is

        ℓ_i = s_i·Σ_c q_ic·w_c·(−log p_c)
            = s_i·[ (1 − ε)·w_{y_i}·(−log p_{y_i}) + (ε/C)·Σ_c w_c·(−log p_c) ]

    (Szegedy et al. 2016, §7, with PyTorch's class weighting). ``"mean"`` divides
    ``Σ_i ℓ_i`` by ``Σ_i s_i·w_{y_i}``, so without ``sample_weight`` it *is*
    ``F.cross_entropy(logits, targets, weight=w, label_smoothing=ε, ignore_index=...)``; with
    it, the result is the weighted mean in which sample ``i`` counts ``s_i`` times (``s_i = 2``
    equals repeating the sample). Ignored targets add 0 to both sums; if every target is
    ignored the mean is 0 (``F.cross_entropy`` gives NaN). This is
    :func:`embedloss.functional.cross_entropy_loss`, and what :class:`~embedloss.CrossEntropyLoss`
    computes through :meth:`BaseSupervisedLoss.weighted_cross_entropy`.

    Args:
        logits: ``(N, C)`` unnormalised scores.
        targets: ``(N,)`` class indices in ``[0, C)`` or ``ignore_index`` (range-checked on
            CPU inputs only: no device synchronisation).
        class_weights: Optional ``(C,)`` non-negative class weights.
        sample_weight: Optional ``(N,)`` non-negative weights.
        label_smoothing: ε in [0, 1].
        ignore_index: Target value that contributes nothing (default -100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``, i.e. ``ℓ_i``).

    Raises:
        ValueError: For wrong shapes, out-of-range targets or ε outside [0, 1].
        TypeError: For non-integer targets.

    Example:
        >>> logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
        >>> w = torch.tensor([1.0, 2.0, 0.5])
        >>> loss = weighted_cross_entropy(logits, y, class_weights=w, label_smoothing=0.1)
        >>> torch.allclose(loss, F.cross_entropy(logits, y, weight=w, label_smoothing=0.1))
        True
    """
    check_reduction(reduction)
    check_embeddings(logits, "logits", masked=True)  # a -inf logit masks its class
    n, c = logits.shape
    _check_targets(targets, n, c, check_int(ignore_index, "ignore_index"))
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    keep = targets != ignore_index
    index = torch.where(keep, targets, torch.zeros_like(targets)).long()  # (N,)
    q = BaseSupervisedLoss.apply_label_smoothing(index, c, label_smoothing, dtype=x.dtype)
    denom = keep.to(x.dtype)  # (N,)
    if class_weights is not None:
        w = check_sample_weight(class_weights, c, "class_weights").to(x)
        q, denom = q * w, denom * w[index]  # q: (N, C)
    nll = torch.where(q != 0, -q * x.log_softmax(dim=1), 0.0).sum(dim=1)  # (N,); 0·log 0 = 0
    per_sample = torch.where(keep, nll, torch.zeros_like(nll))
    if sample_weight is not None:
        s = check_sample_weight(sample_weight, n).to(per_sample)
        per_sample, denom = per_sample * s, denom * s
    return weighted_reduction(per_sample, denom, reduction)


def weighted_reduction(per_sample: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """Reduce weighted per-sample losses ``(N,)``: ``"mean"`` divides their sum by ``Σ weights``.

    ``"none"`` returns ``per_sample``, ``"sum"`` its sum; ``weights=None`` counts every sample
    once. When the weights sum to 0 (every sample ignored or weighted 0) the mean is 0, not
    ``0/0 = NaN`` as ``F.cross_entropy`` gives.

    Example:
        >>> weighted_reduction(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), "mean")
        tensor(2.)
    """
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    total = torch.ones_like(per_sample).sum() if weights is None else weights.sum()
    return per_sample.sum() / torch.where(total > 0, total, torch.ones_like(total))


class BaseSupervisedLoss(BaseLoss):
    """Base of classification-style losses (logits and class targets)."""

    @staticmethod
    def apply_label_smoothing(
        targets: Tensor, num_classes: int, smoothing: float, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Soft targets ``(N, C)``: ``(1−ε)·one_hot + ε/C``, in ``dtype``.

        Example:
            >>> BaseSupervisedLoss.apply_label_smoothing(torch.tensor([1]), 2, 0.2)
            tensor([[0.1000, 0.9000]])
        """
        eps = check_float(smoothing, "label_smoothing", low=0.0, high=1.0)
        one_hot = F.one_hot(targets.long(), num_classes).to(dtype)
        return one_hot * (1.0 - eps) + eps / num_classes

    def weighted_cross_entropy(
        self, logits: Tensor, targets: Tensor, **options: Unpack[CrossEntropyArgs]
    ) -> Tensor:
        """:func:`weighted_cross_entropy` reduced with this loss's ``reduction``."""
        return weighted_cross_entropy(logits, targets, reduction=self.reduction, **options)
