"""Supervised contrastive layouts: V views per sample, class labels, multi-hot labels or masks.

What SupCon (Khosla et al. 2020) and its cross-modal variant share: checking the supervision,
laying out the anchors and keys of V views across ranks, and scoring them through the InfoNCE
core (:func:`contrast`), tiled for ``(N,)`` labels and dense for multi-hot labels or a mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss._validation import check_labels, check_tensor, on_host
from embedloss.ops.anchors import (
    AnchorLosses,
    ChunkSize,
    PairSpec,
    anchor_losses_from_logits,
    pair_masks,
)
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.info_nce import ContrastiveOptions, info_nce
from embedloss.ops.similarity import similarity_matrix

__all__ = [
    "check_supervision",
    "contrast",
    "cross_contrast",
    "multi_view_contrast",
    "positive_mask_from_multi_hot",
    "supcon_views",
]


def check_supervision(labels: Any, mask: Any, n: int) -> Tensor | None:
    """Validate SupCon's supervision: integer ``labels (N,)``, multi-hot ``(N, C)`` or ``mask (N, N)``.

    Returns the labels, with ``(N, 1)`` read as ``(N,)`` classes (as the reference code and the
    legacy loss did), not as a one-column multi-hot matrix.

    Raises:
        ValueError: If both are given, a shape does not match the batch of ``n`` samples, or a
            mask holds values other than 0 and 1 (checked on CPU): scores are not a relation.
        TypeError: If either is not a tensor, or labels (class indices or multi-hot rows) are
            floating point: a float ``(N, D)`` tensor is more likely a second view than labels.
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
            if labels.is_floating_point() or labels.is_complex():
                raise TypeError(
                    "multi-hot labels must be an integer or bool (N, C) tensor, got dtype "
                    f"{labels.dtype} (a second view of the embeddings goes in `embeddings` as "
                    "(N, V, D))"
                )
        else:
            check_labels(labels, n)
    if mask is not None:
        _check_mask(mask, n)
    return labels


def _check_mask(mask: Tensor, n: int) -> None:
    check_tensor(mask, "mask")
    if mask.shape != (n, n):
        raise ValueError(f"mask must have shape ({n}, {n}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and on_host(mask) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "mask must be a bool tensor or hold only 0 and 1 (mask[i, j] = 1: sample j is a "
            "positive of sample i), got other values"
        )


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
    reduced: bool = False,
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
        return info_nce(query, keys, scale, spec, chunk_size=chunk_size, reduced=reduced)
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


def multi_view_contrast(
    embeddings: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    scale: Tensor | float,
    *,
    contrast_mode: str = "all",
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
    reduced: bool = False,
) -> AnchorLosses:
    """SupCon's per-anchor L_out of prepared ``embeddings (n, D) | (n, V, D)``, unscaled.

    Anchors are ordered view-major: ``(V·n,)`` for ``contrast_mode="all"``, ``(n,)`` for
    ``"one"`` (the first view only). Keys are every view of every rank's samples; positives
    come from ``labels`` (checked by :func:`check_supervision`), ``mask``, or else the other
    views of the same sample.
    """
    x = embeddings if embeddings.dim() == 3 else embeddings.unsqueeze(1)  # (n, V, D)
    n, views = x.shape[0], x.shape[1]
    labels = check_supervision(labels, mask, n)
    if labels is None and mask is None and views == 1:
        raise ValueError(
            "SupCon with a single view needs labels or mask: otherwise no anchor has a positive"
        )
    if mask is not None and gather_distributed:
        raise ValueError("an explicit mask cannot be combined with gather_distributed; pass labels")
    gathered = gather_with_grad(x, gather_distributed)
    total = gathered.tensor.shape[0]
    d = x.shape[-1]  # explicit: a rank of a distributed batch may hold no rows
    keys = gathered.tensor.transpose(0, 1).reshape(views * total, d)  # (V·N_all, D)
    anchor_views = views if contrast_mode == "all" else 1
    query = x[:, :anchor_views].transpose(0, 1).reshape(anchor_views * n, d)  # (A·n, D)
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
        reduced=reduced,
    )


def supcon_views(
    embeddings: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    options: ContrastiveOptions,
    contrast_mode: str = "all",
) -> AnchorLosses:
    """:func:`multi_view_contrast` at the scale, tiling, gathering and reduction of ``options``."""
    return multi_view_contrast(
        embeddings,
        labels,
        mask,
        options.scale_as(embeddings.dtype),
        contrast_mode=contrast_mode,
        chunk_size=options.chunk_size,
        gather_distributed=options.gather_distributed,
        reduced=options.reduced,
    )


def cross_contrast(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    labels: Tensor | None,
    mask: Tensor | None,
    gather_distributed: bool,
    chunk_size: ChunkSize,
    reduced: bool = False,
) -> AnchorLosses:
    """Anchors ``query (n, D)`` against the keys of every rank, positives by label or ``mask``.

    The cross-modal part of SupCon: the positives of query ``i`` are the keys of its label (its
    own pair among them), or the keys ``j`` with ``mask[i, j]``.
    """
    gathered = gather_with_grad(keys, gather_distributed)
    n, total = query.shape[0], gathered.tensor.shape[0]
    query_ids = torch.arange(n, device=query.device) + gathered.offset
    key_labels = None if labels is None else gather_with_grad(labels, gather_distributed).tensor
    return contrast(
        query,
        gathered.tensor,
        scale,
        query_ids=query_ids,
        key_ids=torch.arange(total, device=query.device),
        query_labels=labels,
        key_labels=key_labels,
        positive=None if mask is None else mask != 0,
        chunk_size=chunk_size,
        reduced=reduced,
    )
