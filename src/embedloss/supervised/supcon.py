"""Supervised contrastive loss, SupCon's L_out (Khosla et al. 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from embedloss._validation import check_choice, check_embeddings, check_optional_positive
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.ops.anchors import AnchorLosses
from embedloss.ops.info_nce import ContrastiveKeywords, ContrastiveOptions, contrastive_keywords
from embedloss.ops.supcon import supcon_views
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SupConLoss", "supcon_loss"]

CONTRAST_MODES = ("all", "one")


def _supcon(
    embeddings: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    options: ContrastiveOptions,
    contrast_mode: str,
    base_temperature: float | None,
) -> tuple[Tensor, AnchorLosses]:
    """Checked, prepared, scaled by ``τ/τ_base`` and reduced SupCon, and its anchors."""
    check_embeddings(embeddings, "embeddings", ndim=(2, 3))
    check_choice(contrast_mode, "contrast_mode", CONTRAST_MODES)
    (x,) = options.prepare(embeddings)
    result = supcon_views(x, labels, mask, options, contrast_mode)
    if base_temperature is not None:  # the official code's τ/τ_base factor
        result = result._replace(loss=result.loss / (options.scale_as(x.dtype) * base_temperature))
    return options.reduce(result), result


@contrastive_keywords()
def supcon_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    base_temperature: float | None = None,
    contrast_mode: str = "all",
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""Supervised contrastive loss, L_out of Khosla et al. 2020 (Eq. 2).

    The V views of the N samples form the set ``I`` of V·N embeddings ``z`` (L2-normalised).
    For anchor ``i ∈ I`` with positives ``P(i)`` (other embeddings of its class) and
    ``A(i) = I∖{i}``:

        ℓ_i = −(τ/τ_base) · (1/|P(i)|) · Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )

    and the loss is the mean of ℓ_i over anchors with ``|P(i)| > 0``. The ``τ/τ_base`` factor is
    the official code's (``base_temperature=None`` makes it 1, as pytorch-metric-learning).
    Positives come from ``labels (N,)`` (equal class; ``(N, 1)`` is read the same way), multi-hot
    ``labels (N, C)`` (at least one shared class, or the same sample), an explicit ``mask (N, N)`` (``mask[i, j]`` true when
    sample ``j`` is a positive of sample ``i``, tiled over the views as the reference does, so its
    diagonal decides whether a sample's other views are positives), or — with neither — the
    other views of the same sample (SimCLR's NT-Xent). Anchors without positives are excluded
    from the mean (their loss is 0), never NaN.

    Args:
        embeddings: ``(N, D)`` (one view) or ``(N, V, D)``.
        labels: Optional ``(N,)`` integer classes or ``(N, C)`` multi-hot labels.
        mask: Optional ``(N, N)`` positive mask (bool or 0/1); exclusive with ``labels``.
        temperature: τ > 0 (the function also takes a 0-d tensor). Default 0.1.
        base_temperature: τ_base of the ``τ/τ_base`` factor, or None for a factor of 1.
        contrast_mode: ``"all"`` (every view is an anchor) or ``"one"`` (only the first view).
        reduction: ``"mean"`` over anchors with positives, ``"sum"``, or ``"none"``.
        normalize: L2-normalise the embeddings first (default True).
        chunk_size: Core tiling for ``(N,)`` labels: ``None`` dense, an int, or ``"auto"``.
        gather_distributed: Contrast local anchors with the embeddings of every rank.

    Shape:
        output: scalar, or with ``reduction="none"`` ``(V·N,)`` (view-major: view 0 of every
        sample first) for ``"all"`` and ``(N,)`` for ``"one"``.

    Raises:
        ValueError: For both ``labels`` and ``mask``, mismatched shapes, a single view without
            supervision, an unknown ``contrast_mode``, τ <= 0, or a mask with ``gather_distributed``.

    Example:
        >>> import math
        >>> z = torch.eye(4).unsqueeze(1).repeat(1, 2, 1)  # 4 samples, 2 identical views
        >>> loss = supcon_loss(z, torch.tensor([0, 1, 2, 3]), temperature=1.0)
        >>> round(loss.item(), 6) == round(math.log(math.e + 6) - 1, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    base = check_optional_positive(base_temperature, "base_temperature")
    return _supcon(embeddings, labels, mask, options, contrast_mode, base)[0]


class SupConOptionsLoss(BaseContrastiveLoss):
    """Base of the SupCon losses: ``base_temperature`` and a ``contrast_mode`` of ``MODES``."""

    MODES: ClassVar[tuple[str, ...]] = CONTRAST_MODES

    def __init__(
        self,
        *,
        base_temperature: float | None = None,
        contrast_mode: str = "all",
        **options: Unpack[ContrastiveArgs],
    ) -> None:
        super().__init__(**options)
        self.contrast_mode = check_choice(contrast_mode, "contrast_mode", self.MODES)
        self.base_temperature = check_optional_positive(base_temperature, "base_temperature")


@register_loss("supcon", aliases=("supervised_contrastive",))
class SupConLoss(SupConOptionsLoss):
    """Supervised contrastive loss, SupCon's L_out (Khosla et al. 2020, Eq. 2).

    See :func:`supcon_loss` for the formula and the forms of supervision. Terms: ``accuracy``
    (top-1 of a valid anchor's row is a positive), ``anchors_without_positives`` (how many
    anchors were excluded), ``temperature``.

    Args:
        temperature, base_temperature, contrast_mode: As :func:`supcon_loss` (defaults 0.1, as
            pytorch-metric-learning, None and ``"all"``; the official code uses τ = τ_base = 0.07).
        **options: ``learnable_temperature``, ``reduction``, ``normalize``, ``chunk_size``,
            ``gather_distributed``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = SupConLoss()
        >>> out = loss.compute(torch.randn(8, 2, 16), torch.tensor([0, 1, 2, 3] * 2))
        >>> out.loss.shape, float(out.terms["anchors_without_positives"])
        (torch.Size([]), 0.0)
    """

    def compute(
        self, embeddings: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> LossOutput:
        """Loss and terms for ``embeddings (N, D) | (N, V, D)`` and ``labels`` or ``mask``."""
        options = self.options()
        mode, base = self.contrast_mode, self.base_temperature
        loss, result = _supcon(embeddings, labels, mask, options, mode, base)

        def terms() -> dict[str, Tensor | float]:
            valid = result.valid.sum()
            return {
                "accuracy": result.correct.sum() / valid.clamp(min=1),
                "anchors_without_positives": result.valid.numel() - valid,
                "temperature": 1.0 / options.scale_as(torch.float64),
            }

        return self.output(loss, terms)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Two views of ``n`` samples ``(n, 2, d)`` and ``(n,)`` labels of four classes."""
        (a, b), _ = super().draw_examples(g, n, d, dtype)
        labels = torch.arange(n) % 4
        return (torch.stack([a, b], dim=1), labels), {}
