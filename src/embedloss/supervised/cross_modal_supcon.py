"""Supervised contrastive loss across two paired modalities (intra-modal and cross-modal)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_choice, check_optional_positive, check_pair
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.ops.anchors import AnchorLosses, mean_accuracy, reduce_anchor_losses
from embedloss.ops.info_nce import ContrastiveKeywords, ContrastiveOptions, contrastive_keywords
from embedloss.ops.supcon import check_supervision, cross_contrast, supcon_views
from embedloss.registry import register_loss
from embedloss.supervised.supcon import SupConOptionsLoss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CrossModalSupConLoss", "cross_modal_supcon_loss"]

CROSS_MODAL_MODES = ("all", "cross", "intra")
#: The parts, and their weights per contrast mode (a part weighted 0 is not computed).
PARTS = ("intra_image", "intra_text", "image_to_text", "text_to_image")
PART_WEIGHTS = {
    "all": (1 / 3, 1 / 3, 1 / 6, 1 / 6),
    "intra": (0.5, 0.5, 0.0, 0.0),
    "cross": (0.0, 0.0, 0.5, 0.5),
}


def _cross_modal_supcon(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    options: ContrastiveOptions,
    contrast_mode: str,
    base_temperature: float | None,
) -> tuple[Tensor, dict[str, AnchorLosses], Tensor | float]:
    """The weighted, reduced sum, the parts' per-anchor results by name and ``τ/τ_base``.

    The parts of ``contrast_mode`` are computed: images among images, texts among texts,
    images against texts and the reverse.
    """
    check_pair(image_embeddings, text_embeddings, "image_embeddings", "text_embeddings")
    check_choice(contrast_mode, "contrast_mode", CROSS_MODAL_MODES)
    labels = check_supervision(labels, mask, image_embeddings.shape[0])
    if labels is None and mask is None:
        raise ValueError("cross-modal SupCon needs labels or mask to define the positives")
    if mask is not None and options.gather_distributed:
        raise ValueError("an explicit mask cannot be combined with gather_distributed; pass labels")
    img, txt = options.prepare(image_embeddings, text_embeddings)
    scale = options.scale_as(img.dtype)
    parts: dict[str, AnchorLosses] = {}
    if contrast_mode != "cross":
        parts["intra_image"] = supcon_views(img, labels, mask, options)
        parts["intra_text"] = supcon_views(txt, labels, mask, options)
    if contrast_mode != "intra":
        core = (options.gather_distributed, options.chunk_size, options.reduced)
        mask_t = None if mask is None else mask.T
        parts["image_to_text"] = cross_contrast(img, txt, scale, labels, mask, *core)
        parts["text_to_image"] = cross_contrast(txt, img, scale, labels, mask_t, *core)
    weights = dict(zip(PARTS, PART_WEIGHTS[contrast_mode], strict=True))
    weighted = [weights[name] * options.reduce(part) for name, part in parts.items()]
    factor = 1.0 if base_temperature is None else 1.0 / (scale * base_temperature)
    return sum(weighted[1:], weighted[0]) * factor, parts, factor


@contrastive_keywords()
def cross_modal_supcon_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    base_temperature: float | None = None,
    contrast_mode: str = "all",
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""Supervised contrastive loss within and across two paired modalities.

    Pair ``i`` is image ``x_i`` and text ``y_i`` (L2-normalised), with a class label. Four parts,
    each SupCon's L_out (Khosla et al. 2020, Eq. 2) averaged over its anchors with positives:

    * ``intra_image``: anchors ``x_i`` against the other images, positives the same-class images;
    * ``intra_text``: the same among the texts;
    * ``image_to_text``: anchors ``x_i`` against all texts ``y_a``, positives the same-class texts
      (``y_i`` included), ``ℓ_i = −mean_{p∈P(i)} log softmax_a(x_i·y_a/τ)_p``;
    * ``text_to_image``: the reverse.

    ``contrast_mode`` combines them as the legacy loss did: ``"all"`` =
    ⅓·intra_image + ⅓·intra_text + ⅓·cross, ``"intra"`` = ½·(intra_image + intra_text),
    ``"cross"`` = cross, where cross = ½·(image_to_text + text_to_image); everything times
    ``τ/τ_base``. (SupCon over ``[x; y]`` as two views of each sample is
    ``supcon_loss(torch.stack([x, y], 1), labels)``.) A part with no valid anchor contributes 0.

    Args:
        image_embeddings: ``(N, D)``.
        text_embeddings: ``(N, D)``; row ``i`` pairs with image ``i``.
        labels: ``(N,)`` classes or ``(N, C)`` multi-hot labels (positives share any class).
        mask: Or an ``(N, N)`` positive mask: ``mask[i, j]`` makes sample ``j`` a positive of
            sample ``i`` (image→text uses ``mask``, text→image ``mask.T``).
        temperature: τ > 0 (the function also takes a 0-d tensor). Default 0.1.
        base_temperature: τ_base of the ``τ/τ_base`` factor, or None for 1.
        contrast_mode: ``"all"``, ``"cross"`` or ``"intra"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``: the parts' per-pair losses, weighted).
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling for ``(N,)`` labels.
        gather_distributed: Contrast local anchors with the embeddings of every rank.

    Raises:
        ValueError: For mismatched shapes, neither or both of ``labels`` and ``mask``, an unknown
            ``contrast_mode``, τ <= 0, or a mask with ``gather_distributed``.

    Example:
        >>> x = torch.randn(6, 8)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> cross_modal_supcon_loss(x, x + 0.1, labels, contrast_mode="cross").shape
        torch.Size([])
    """
    options = ContrastiveOptions.create(**keywords)
    base = check_optional_positive(base_temperature, "base_temperature")
    return _cross_modal_supcon(
        image_embeddings, text_embeddings, labels, mask, options, contrast_mode, base
    )[0]


@register_loss("cross_modal_supcon")
class CrossModalSupConLoss(SupConOptionsLoss):
    """Supervised contrastive loss within and across two paired modalities (Khosla et al. 2020).

    See :func:`cross_modal_supcon_loss`. Terms: ``loss_intra_image``, ``loss_intra_text`` (with
    ``contrast_mode`` ``"all"``/``"intra"``), ``loss_cross_modal`` and ``accuracy`` (its top-1,
    with ``"all"``/``"cross"``), ``anchors_without_positives``, ``temperature``.

    Args:
        temperature, base_temperature, contrast_mode: As :func:`cross_modal_supcon_loss`.
        **options: ``learnable_temperature``, ``reduction``, ``normalize``, ``chunk_size``,
            ``gather_distributed``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Example:
        >>> loss = CrossModalSupConLoss(contrast_mode="all")
        >>> out = loss.compute(torch.randn(6, 8), torch.randn(6, 8), torch.tensor([0, 1, 2] * 2))
        >>> sorted(out.terms)[:3]
        ['accuracy', 'anchors_without_positives', 'loss_cross_modal']
    """

    MODES = CROSS_MODAL_MODES

    def compute(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings and ``labels`` or ``mask``."""
        mode, base = self.contrast_mode, self.base_temperature
        loss, parts, factor = _cross_modal_supcon(
            image_embeddings, text_embeddings, labels, mask, self.options(), mode, base
        )

        def terms() -> dict[str, Tensor | float]:
            valid = [p.valid for p in parts.values()]
            values: dict[str, Tensor | float] = {
                "anchors_without_positives": sum(int(v.numel()) for v in valid)
                - sum(v.sum() for v in valid),
                "temperature": 1.0 / self.scale(dtype=torch.float64),
            }
            for name in ("intra_image", "intra_text"):
                if name in parts:
                    values[f"loss_{name}"] = reduce_anchor_losses(parts[name], "mean") * factor
            if "image_to_text" in parts:
                i2t, t2i = parts["image_to_text"], parts["text_to_image"]
                cross = reduce_anchor_losses(i2t, "mean") + reduce_anchor_losses(t2i, "mean")
                values["loss_cross_modal"] = cross * factor / 2
                values["accuracy"] = mean_accuracy(i2t, t2i)
            return values

        return self.output(loss, terms)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Paired ``(n, d)`` embeddings and ``(n,)`` labels of three classes."""
        (image, text), _ = super().draw_examples(g, n, d, dtype)
        labels = torch.randint(0, 3, (n,), generator=g)
        return (image, text, labels), {}
