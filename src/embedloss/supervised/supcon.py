"""Supervised contrastive loss, SupCon's L_out (Khosla et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss._validation import (
    check_choice,
    check_embeddings,
    check_labels,
    check_positive_float,
    check_tensor,
    compute_dtype,
)
from embedloss.base.base_loss import LossOutput, detached_terms
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.info_nce import (
    AnchorLosses,
    ChunkSize,
    PairSpec,
    anchor_losses_from_logits,
    info_nce,
    pair_masks,
    reduce_anchor_losses,
)
from embedloss.ops.similarity import inverse_temperature, prepare_embeddings, similarity_matrix
from embedloss.registry import register_loss

__all__ = [
    "SupConLoss",
    "check_base_temperature",
    "check_supervision",
    "contrast",
    "positive_mask_from_multi_hot",
    "supcon_anchor_losses",
    "supcon_loss",
    "temperature_factor",
]

CONTRAST_MODES = ("all", "one")


def check_supervision(labels: Any, mask: Any, n: int) -> Tensor | None:
    """Validate SupCon's supervision: integer ``labels (N,)``, multi-hot ``(N, C)`` or ``mask (N, N)``.

    Returns the labels, with ``(N, 1)`` read as ``(N,)`` classes (as the reference code and the
    legacy loss did), not as a one-column multi-hot matrix.

    Raises:
        ValueError: If both are given, or a shape does not match the batch of ``n`` samples.
        TypeError: If either is not a tensor, or ``(N,)`` labels are not integers.
    """
    if labels is not None and mask is not None:
        raise ValueError("pass either labels or mask, not both")
    if labels is not None:
        check_tensor(labels, "labels")
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if labels.dim() == 2:
            if labels.shape[0] != n:
                raise ValueError(
                    f"multi-hot labels must have shape ({n}, C) to match the batch, got {tuple(labels.shape)}"
                )
        else:
            check_labels(labels, n)
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.shape != (n, n):
            raise ValueError(f"mask must have shape ({n}, {n}), got {tuple(mask.shape)}")
    return labels


def positive_mask_from_multi_hot(query_labels: Tensor, key_labels: Tensor) -> Tensor:
    """``(N, M)`` bool: query ``i`` and key ``a`` share at least one label (non-zero entries).

    Example:
        >>> y = torch.tensor([[1, 0], [1, 1], [0, 1]])
        >>> positive_mask_from_multi_hot(y, y).int()
        tensor([[1, 1, 0],
                [1, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    q = (query_labels != 0).to(torch.float32)
    k = (key_labels != 0).to(torch.float32)
    return (q @ k.T) > 0


def contrast(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    *,
    query_ids: Tensor,
    key_ids: Tensor,
    query_labels: Tensor | None = None,
    key_labels: Tensor | None = None,
    positive: Tensor | None = None,
    self_index: Tensor | None = None,
    chunk_size: ChunkSize = "auto",
) -> AnchorLosses:
    """Multi-positive InfoNCE of ``query (n, D)`` against ``keys (m, D)`` through the core.

    Positives are, in order of precedence: the explicit bool ``positive (n, m)``; keys sharing
    a multi-hot label row (``(n, C)`` / ``(m, C)`` labels) or the same sample id; keys with
    equal ``(n,)`` / ``(m,)`` labels; otherwise keys with the same sample id (``query_ids``,
    ``key_ids``: which sample each row comes from). ``self_index`` removes each query's own
    key from its row. 1-D labels run through :func:`~embedloss.ops.info_nce.info_nce` (and its
    tiling); multi-hot labels and explicit masks materialise the logits (dense).
    """
    dense = positive is not None or (query_labels is not None and query_labels.dim() == 2)
    if not dense:
        use_labels = query_labels is not None and key_labels is not None
        spec = PairSpec(
            query_labels=query_labels if use_labels else query_ids,
            key_labels=key_labels if use_labels else key_ids,
            self_index=self_index,
        )
        return info_nce(query, keys, scale, spec, chunk_size=chunk_size)
    rows = torch.arange(query.shape[0], device=query.device)
    cols = torch.arange(keys.shape[0], device=query.device)
    spec = PairSpec(query_labels=query_ids, key_labels=key_ids, self_index=self_index)
    same_sample, denominator = pair_masks(spec, rows, cols)  # (n, m) each
    if positive is None:
        positive = same_sample
        if query_labels is not None and key_labels is not None:
            positive = positive | positive_mask_from_multi_hot(query_labels, key_labels)
    logits = similarity_matrix(query, keys, scale)  # (n, m)
    return anchor_losses_from_logits(logits, positive & denominator, denominator)


def check_base_temperature(base_temperature: float | None) -> float | None:
    """``base_temperature`` checked > 0 (as a float), or None (no ``τ/τ_base`` factor)."""
    if base_temperature is None:
        return None
    return check_positive_float(base_temperature, "base_temperature")


def temperature_factor(
    temperature: float | Tensor, base_temperature: float | None
) -> Tensor | float:
    """SupCon's ``τ/τ_base`` loss factor (1 when ``base_temperature`` is None)."""
    base = check_base_temperature(base_temperature)
    return 1.0 if base is None else temperature / base


def supcon_anchor_losses(
    embeddings: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.1,
    contrast_mode: str = "all",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> AnchorLosses:
    """Per-anchor L_out without the ``τ/τ_base`` factor (see :func:`supcon_loss`).

    Anchors are ordered view-major: ``(V·N,)`` for ``contrast_mode="all"``, ``(N,)`` for ``"one"``.
    """
    check_embeddings(embeddings, "embeddings", ndim=(2, 3))
    check_choice(contrast_mode, "contrast_mode", CONTRAST_MODES)
    x = embeddings if embeddings.dim() == 3 else embeddings.unsqueeze(1)  # (n, V, D)
    n, views = x.shape[0], x.shape[1]
    labels = check_supervision(labels, mask, n)
    if labels is None and mask is None and views == 1:
        raise ValueError(
            "SupCon with a single view needs labels or mask: otherwise no anchor has a positive"
        )
    if mask is not None and gather_distributed:
        raise ValueError("an explicit mask cannot be combined with gather_distributed; pass labels")
    dtype = compute_dtype(embeddings)
    x = prepare_embeddings(x, normalize=normalize, dtype=dtype)
    scale = inverse_temperature(temperature, dtype)
    gathered = gather_with_grad(x, gather_distributed)
    total = gathered.tensor.shape[0]
    keys = gathered.tensor.transpose(0, 1).reshape(views * total, -1)  # (V·N_all, D)
    anchor_views = views if contrast_mode == "all" else 1
    query = x[:, :anchor_views].transpose(0, 1).reshape(anchor_views * n, -1)  # (A·n, D)
    local = torch.arange(n, device=x.device) + gathered.offset
    offsets = torch.arange(anchor_views, device=x.device).repeat_interleave(n) * total
    key_ids = torch.arange(total, device=x.device).repeat(views)
    query_ids = local.repeat(anchor_views)
    key_labels = query_labels = positive = None
    if labels is not None:
        global_labels = gather_with_grad(labels, gather_distributed).tensor
        query_labels = labels.repeat(anchor_views, *([1] * (labels.dim() - 1)))
        key_labels = global_labels.repeat(views, *([1] * (labels.dim() - 1)))
    if mask is not None:
        positive = (mask != 0).repeat(anchor_views, views)  # (A·n, V·n), as the reference tiles it
    return contrast(
        query,
        keys,
        scale,
        query_ids=query_ids,
        key_ids=key_ids,
        query_labels=query_labels,
        key_labels=key_labels,
        positive=positive,
        self_index=query_ids + offsets,
        chunk_size=chunk_size,
    )


def supcon_loss(
    embeddings: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.1,
    base_temperature: float | None = None,
    contrast_mode: str = "all",
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
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
        temperature: τ > 0 (float or 0-d tensor). Default 0.1.
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
    result = supcon_anchor_losses(
        embeddings,
        labels,
        mask,
        temperature=temperature,
        contrast_mode=contrast_mode,
        normalize=normalize,
        chunk_size=chunk_size,
        gather_distributed=gather_distributed,
    )
    factor = temperature_factor(temperature, base_temperature)
    scaled = AnchorLosses(result.loss * factor, result.valid, result.correct)
    return reduce_anchor_losses(scaled, reduction, distributed=gather_distributed)


@register_loss("supcon", aliases=("supervised_contrastive",))
class SupConLoss(BaseContrastiveLoss):
    """Supervised contrastive loss, SupCon's L_out (Khosla et al. 2020, Eq. 2).

    See :func:`supcon_loss` for the formula and the forms of supervision. Terms: ``accuracy``
    (top-1 of a valid anchor's row is a positive), ``anchors_without_positives`` (how many
    anchors were excluded), ``temperature``.

    Args:
        temperature: τ > 0 (default 0.1, as pytorch-metric-learning).
        base_temperature: τ_base of the official code's ``τ/τ_base`` factor (it uses 0.07 with
            τ = 0.07); None (default) for a factor of 1.
        contrast_mode: ``"all"`` (default) or ``"one"`` (first view as anchors).
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (clamped at 100).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise inputs (default True).
        chunk_size: Core tiling (``None``, an int or ``"auto"``).
        gather_distributed: Use the embeddings of all ranks (DDP).

    Example:
        >>> loss = SupConLoss()
        >>> out = loss.compute(torch.randn(8, 2, 16), torch.tensor([0, 1, 2, 3] * 2))
        >>> out.loss.shape, float(out.terms["anchors_without_positives"])
        (torch.Size([]), 0.0)
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        contrast_mode: str = "all",
        learnable_temperature: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            learnable_temperature=learnable_temperature,
            reduction=reduction,
            normalize=normalize,
            chunk_size=chunk_size,
            gather_distributed=gather_distributed,
        )
        self.contrast_mode = check_choice(contrast_mode, "contrast_mode", CONTRAST_MODES)
        self.base_temperature = check_base_temperature(base_temperature)

    def compute(
        self, embeddings: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> LossOutput:
        """Loss and terms for ``embeddings (N, D) | (N, V, D)`` and ``labels`` or ``mask``."""
        check_embeddings(embeddings, "embeddings", ndim=(2, 3))
        options = self.core_options(compute_dtype(embeddings))
        mode = self.contrast_mode
        result = supcon_anchor_losses(embeddings, labels, mask, contrast_mode=mode, **options)
        factor = temperature_factor(options["temperature"], self.base_temperature)
        scaled = AnchorLosses(result.loss * factor, result.valid, result.correct)
        loss = reduce_anchor_losses(scaled, self.reduction, distributed=self.gather_distributed)
        valid = result.valid.sum()
        terms = detached_terms(
            accuracy=result.correct.sum() / valid.clamp(min=1),
            anchors_without_positives=result.valid.numel() - valid,
            temperature=self.temperature,
        )
        return LossOutput(loss, terms)

    def forward(
        self, embeddings: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The SupCon loss (see :meth:`compute`)."""
        return self.compute(embeddings, labels, mask).loss

    @classmethod
    def example_inputs(
        cls, n: int = 8, d: int = 16, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Two views ``(n, 2, d)`` and ``(n,)`` labels of three classes."""
        g = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(n, 2, d, generator=g).to(dtype)
        labels = torch.randint(0, 3, (n,), generator=g)
        return (embeddings, labels), {}
