"""Legacy supervised names: SupCon (class, consolidation class, function), cross-entropy, MSE."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss._validation import check_embeddings, check_float, check_reduction, check_same_shape
from embedloss.compat._adapter import (
    LegacyLoss,
    deprecated,
    legacy_reduce,
    renamed,
    retrieval_metrics,
)
from embedloss.supervised.cross_entropy import CrossEntropyLoss as _CrossEntropy
from embedloss.supervised.cross_modal_supcon import CrossModalSupConLoss as _CrossModalSupCon
from embedloss.supervised.supcon import supcon_loss

__all__ = [
    "CrossEntropyLoss",
    "MeanSquaredError",
    "SupervisedContrastiveLoss",
    "SupervisedLoss",
    "supervised_contrastive_loss",
]


class SupervisedContrastiveLoss(LegacyLoss):
    """Legacy intra- and cross-modal SupCon: :class:`embedloss.CrossModalSupConLoss`.

    Positives come from ``labels`` (``(N,)`` classes or ``(N, C)`` multi-hot: sharing any class),
    else from ``similarity_scores >= similarity_threshold`` (an explicit ``(N, N)`` mask), else
    each image–text pair is its own class. In the cross-modal part a sample's own pair is a
    positive (the legacy class removed it from the positives but kept it in the denominator).

    Args:
        temperature: τ > 0 (default 0.07).
        contrast_mode: ``"all"`` (default), ``"cross"`` or ``"intra"``.
        base_temperature: τ_base of SupCon's ``τ/τ_base`` factor (default 0.07).
        similarity_threshold: Threshold on ``similarity_scores`` (default 0.5).
        use_class_weights: Ignored, with a warning (as is a forward ``class_weights``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns (forward):
        ``{"loss", "intra_vision_loss", "intra_text_loss", "cross_modal_loss",
        "contrastive_accuracy"}`` (a part the mode leaves out is 0).

    Example:
        >>> import torch
        >>> loss = SupervisedContrastiveLoss(contrast_mode="cross")
        >>> out = loss(torch.randn(6, 8), torch.randn(6, 8), labels=torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> out["intra_vision_loss"].item(), out["loss"].item() == out["cross_modal_loss"].item()
        (0.0, True)
    """

    replacement = "embedloss.CrossModalSupConLoss (registry 'cross_modal_supcon')"

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        similarity_threshold: float = 0.5,
        use_class_weights: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(use_class_weights=use_class_weights or None)
        self.similarity_threshold = check_float(similarity_threshold, "similarity_threshold")
        self.loss = _CrossModalSupCon(
            temperature=temperature,
            base_temperature=base_temperature,
            contrast_mode=contrast_mode,
            reduction=reduction,
        )

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        labels: Tensor | None = None,
        similarity_scores: Tensor | None = None,
        class_weights: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics for paired features and ``labels`` or ``similarity_scores``."""
        v, t, _ = self.paired_inputs(vision_features, text_features, None, inputs)
        self.ignore_forward(class_weights=class_weights)
        mask = None
        if labels is None and similarity_scores is not None:
            mask = similarity_scores >= self.similarity_threshold
        elif labels is None:
            labels = torch.arange(v.shape[0], device=v.device)
        elif labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        out = self.loss.compute(v, t, labels, mask)
        zero = torch.zeros(())  # for a part the mode leaves out
        terms = {"loss_intra_image": zero, "loss_intra_text": zero, "loss_cross_modal": zero}
        terms.update(out.terms)
        if "accuracy" not in terms:  # "intra" mode: the loss has no cross-modal ranking
            flat = labels if labels is not None and labels.dim() == 1 else None
            terms["accuracy"] = retrieval_metrics(v, t, flat, recalls=False)["accuracy"]
        return {
            "loss": out.loss,
            **renamed(
                terms,
                intra_vision_loss="loss_intra_image",
                intra_text_loss="loss_intra_text",
                cross_modal_loss="loss_cross_modal",
                contrastive_accuracy="accuracy",
            ),
        }


class SupervisedLoss(SupervisedContrastiveLoss):
    """The consolidation's ``SupervisedLoss``: :class:`SupervisedContrastiveLoss`, same arguments."""


def supervised_contrastive_loss(
    vision_features: Tensor,
    text_features: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> Tensor:
    """Legacy SupCon over ``[v; t]`` with duplicated labels: :func:`embedloss.functional.supcon_loss`.

    The two modalities are the two views of each sample: ``supcon_loss(torch.stack([v, t], 1),
    labels)``, with inputs L2-normalised and log-space maths (the legacy function overflowed,
    and gave NaN for unnormalised inputs).

    Shape:
        ``(N, D)`` each and ``labels (N,)``; a scalar, or ``(2N,)`` with ``reduction="none"``.
    """
    deprecated(
        "supervised_contrastive_loss", "embedloss.functional.supcon_loss (registry 'supcon')"
    )
    views = torch.stack([vision_features, text_features], dim=1)  # (N, 2, D)
    return supcon_loss(views, labels, temperature=temperature, reduction=reduction)


class CrossEntropyLoss(LegacyLoss):
    """Legacy cross-entropy with label smoothing (default 0.1): :class:`embedloss.CrossEntropyLoss`.

    Class ``weight`` and smoothing now apply together, exactly as ``F.cross_entropy`` (the legacy
    loss dropped the weights when smoothing > 0). ``sample_weight`` keeps the legacy semantics:
    each sample's loss is multiplied by its weight and ``"mean"`` is the plain mean over the N
    samples, ``Σ_i s_i·ℓ_i / N`` (``embedloss.CrossEntropyLoss`` divides by the weights instead).

    Args:
        smoothing: Label smoothing ε in [0, 1] (default 0.1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weight: Optional ``(C,)`` class weights.

    Shape:
        ``input (N, C)``, ``target (N,)``, ``sample_weight (N,)``; returns a tensor.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
        >>> torch.allclose(CrossEntropyLoss()(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
        True
    """

    replacement = (
        "embedloss.CrossEntropyLoss (registry 'cross_entropy'; label_smoothing defaults to 0)"
    )

    def __init__(
        self, smoothing: float = 0.1, reduction: str = "mean", weight: Tensor | None = None
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.loss = _CrossEntropy(label_smoothing=smoothing, class_weights=weight, reduction="none")
        self.mean = _CrossEntropy(label_smoothing=smoothing, class_weights=weight)

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, **inputs: Any
    ) -> Tensor:
        """The loss of ``input`` logits against class ``target``."""
        self.ignore_inputs(inputs)
        if sample_weight is None and self.reduction == "mean":
            return self.mean(input, target)  # F.cross_entropy's weighted mean
        return legacy_reduce(self.loss(input, target), self.reduction, sample_weight)


class MeanSquaredError(LegacyLoss):
    """Legacy MSE with per-sample weights and a clamp, computed as the legacy loss did.

    Element-wise squared errors ``(x − y)²`` ``(N, *)``, times ``sample_weight[i]`` per sample,
    clamped at ``clip_grad`` when given (values above it lose their gradient, as before), then
    ``"mean"`` over all elements, ``"sum"`` over all elements, or ``"none"``: the ``(N, *)``
    element-wise values. ``embedloss.MSELoss`` differs: weighted mean of per-sample MSEs, ``(N,)``
    for ``"none"``, no clamp.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        clip_grad: Upper clamp of the element-wise loss, or None.

    Shape:
        ``input``, ``target`` ``(N, *)``, ``sample_weight (N,)``; returns a tensor.

    Example:
        >>> import torch
        >>> MeanSquaredError(reduction="none")(torch.ones(2, 3), torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    replacement = "embedloss.MSELoss (registry 'mse')"

    def __init__(self, reduction: str = "mean", clip_grad: float | None = None) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.clip_grad = None if clip_grad is None else check_float(clip_grad, "clip_grad")

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, **inputs: Any
    ) -> Tensor:
        """The loss of ``input`` against ``target``."""
        self.ignore_inputs(inputs)
        for x, name in ((input, "input"), (target, "target")):
            check_embeddings(x, name, ndim=tuple(range(1, 9)), shape="(N, *)")
        check_same_shape(input, target, "input", "target")
        per = legacy_reduce((input - target).square(), "none", sample_weight)
        if self.clip_grad is not None:
            per = per.clamp(max=self.clip_grad)
        return legacy_reduce(per, self.reduction)
