"""Negative cosine similarity with a stop-gradient target: BYOL (Grill et al. 2020), SimSiam."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from embedloss._validation import check_flags, check_pair, check_same_shape, compute_dtype
from embedloss.base.base_loss import BaseLoss, Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.similarity import prepare_embeddings
from embedloss.ops.statistics import variance
from embedloss.registry import register_loss

__all__ = ["NegativeCosineLoss", "negative_cosine_loss"]


def _negative_cosine(
    p_a: Tensor, z_b: Tensor, p_b: Tensor | None, z_a: Tensor | None, symmetric: bool | None
) -> tuple[Tensor, list[Tensor]]:
    """Checked per-sample losses ``(N,)`` and the unit targets ``ẑ`` of each direction.

    The form is the one-way ``(p_a, z_b)`` or the symmetric one (``symmetric=None``: either).
    """
    if symmetric and (p_b is None or z_a is None):
        raise ValueError(
            "NegativeCosineLoss(symmetric=True) takes (p_a, z_b, p_b, z_a); p_b and z_a are missing"
        )
    if symmetric is False and (p_b is not None or z_a is not None):
        raise ValueError(
            "NegativeCosineLoss(symmetric=False) takes (p_a, z_b); pass symmetric=True to "
            "use p_b and z_a as well"
        )
    if (p_b is None) != (z_a is None):
        raise ValueError(
            "the symmetric form needs both p_b and z_a (D(p_a, z_b)/2 + D(p_b, z_a)/2); "
            f"got p_b={'None' if p_b is None else 'a tensor'} and "
            f"z_a={'None' if z_a is None else 'a tensor'}"
        )
    check_pair(p_a, z_b, "p_a", "z_b")
    pairs = [(p_a, z_b)]
    if p_b is not None and z_a is not None:
        check_pair(p_b, z_a, "p_b", "z_a")
        check_same_shape(p_a, p_b, "p_a", "p_b")
        pairs.append((p_b, z_a))
    cosines, targets = [], []
    for p, z in pairs:
        dtype = compute_dtype(p, z)
        targets.append(prepare_embeddings(z.detach(), normalize=True, dtype=dtype))  # stop-grad
        p_hat = prepare_embeddings(p, normalize=True, dtype=dtype)
        cosines.append((p_hat * targets[-1]).sum(dim=-1))  # (N,)
    return -sum(cosines[1:], cosines[0]) / len(cosines), targets


def negative_cosine_loss(
    p_a: Tensor,
    z_b: Tensor,
    p_b: Tensor | None = None,
    z_a: Tensor | None = None,
    *,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Negative cosine similarity between predictions and stop-gradient targets.

    SimSiam (Chen & He 2021), Eq. 1 and, with both pairs, the symmetrised Eq. 2:

        D(p, z) = −(p/‖p‖₂)·(z/‖z‖₂),  z treated as a constant (stop-gradient)
        L = ½·D(p_a, z_b) + ½·D(p_b, z_a)

    BYOL's loss (Grill et al. 2020, Eq. 2) is ``2 + 2·D(q, z')`` for an online prediction ``q``
    and a target projection ``z'``: the same gradient up to a factor of 2.

    Args:
        p_a: ``(N, D)`` predictions from the first view.
        z_b: ``(N, D)`` targets from the second view (no gradient flows into them).
        p_b: ``(N, D)`` predictions from the second view (symmetric form, with ``z_a``).
        z_a: ``(N, D)`` targets from the first view.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``).
        gather_distributed: Divide the mean by the sample count of all ranks (uneven batches);
            the mean over ranks of the returned losses is the single-process loss.

    Shape:
        inputs ``(N, D)``; output: scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, or only one of ``p_b`` and ``z_a``.

    Example:
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> z = torch.tensor([[3.0, 0.0], [1.0, 0.0]], requires_grad=True)
        >>> loss = negative_cosine_loss(p, z)  # cosines 1 and 0
        >>> loss.backward()
        >>> loss.item(), z.grad
        (-0.5, None)
    """
    per_sample, _ = _negative_cosine(p_a, z_b, p_b, z_a, None)
    return reduce_samples(per_sample, reduction, distributed=gather_distributed)


@register_loss("negative_cosine", aliases=("simsiam",))
class NegativeCosineLoss(BaseLoss):
    """BYOL/SimSiam negative cosine similarity to a stop-gradient target (Chen & He 2021, Eq. 2).

    See :func:`negative_cosine_loss`. With ``symmetric=True`` it takes ``(p_a, z_b, p_b, z_a)``
    and averages both directions; otherwise ``(p_a, z_b)``. Terms: ``cosine_similarity`` (mean
    over samples and directions), ``target_std`` (mean over dimensions of the batch std of the
    unit targets: SimSiam's monitor, 0 under collapse, about ``1/sqrt(D)`` otherwise).

    Args:
        symmetric: Require and use both directions (default False).
        reduction, gather_distributed: As :func:`negative_cosine_loss`.

    Raises:
        ValueError: In :meth:`forward`, when the inputs do not match ``symmetric``.

    Example:
        >>> loss = NegativeCosineLoss(symmetric=True)
        >>> p_a, z_b, p_b, z_a = torch.randn(4, 8, 16).unbind(0)
        >>> loss(p_a, z_b, p_b, z_a).shape
        torch.Size([])
    """

    def __init__(
        self, *, symmetric: bool = False, reduction: str = "mean", gather_distributed: bool = False
    ) -> None:
        super().__init__(reduction=reduction)
        self.symmetric, self.gather_distributed = check_flags(
            symmetric=symmetric, gather_distributed=gather_distributed
        )

    #: The symmetric form, so that examples exercise both directions.
    example_options: ClassVar[dict[str, Any]] = {"symmetric": True}

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``(p_a, z_b, p_b, z_a)``, each ``(n, d)``, for the symmetric form."""
        (z_a, z_b), _ = super().draw_examples(g, n, d, dtype)
        p_a = (z_a.float() + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
        p_b = (z_b.float() + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
        return (p_a, z_b, p_b, z_a), {}

    def compute(
        self, p_a: Tensor, z_b: Tensor, p_b: Tensor | None = None, z_a: Tensor | None = None
    ) -> LossOutput:
        """Loss and terms; ``p_b`` and ``z_a`` are required exactly when ``symmetric``."""
        per_sample, targets = _negative_cosine(p_a, z_b, p_b, z_a, self.symmetric)
        loss = reduce_samples(per_sample, self.reduction, distributed=self.gather_distributed)

        def terms() -> dict[str, Tensor | float]:
            stds = [variance(t, correction=0).sqrt().mean() for t in targets]
            return {"cosine_similarity": -per_sample.mean(), "target_std": sum(stds) / len(stds)}

        return self.output(loss, terms)

    shown = "symmetric reduction!r"
