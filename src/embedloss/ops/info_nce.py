"""The exact InfoNCE core: the one place every InfoNCE-family loss computes through.

For queries ``q_i`` (N, D), keys ``k_a`` (M, D) and a scale ``s = 1/τ`` the logits are
``ℓ_ia = s · q_i·k_a``. Each anchor ``i`` has a set of positives ``P(i)`` and a denominator set
``A(i)`` (every key except the anchor itself, except keys excluded as false negatives, and — for
decoupled losses — except the positives). The per-anchor loss is

    L_i = log Σ_{a∈A(i)} exp(ℓ_ia + w_ia) − (1 − ε)·mean_{p∈P(i)} ℓ_ip − ε·mean_{a∈A(i)} ℓ_ia

with optional negative log-weights ``w_ia`` (zero on positives) and label smoothing ``ε``. With a
single positive, no weights and ε = 0 it is the cross-entropy of the softmax over ``A(i)``; with
several positives it is the cross-entropy against a uniform target over them (SupCon's L_out,
Khosla et al. 2020, Eq. 2). Anchors with no positive (or an empty denominator) are invalid: they
get loss 0 and are left out of the mean, never NaN.

The positives and exclusions are described by a :class:`PairSpec` rather than by an (N, M) mask,
so that a tiled path can build the mask of any tile from indices alone (:func:`pair_masks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_float, check_int, check_reduction
from embedloss.ops.distributed import all_reduce_sum_no_grad, world_info

__all__ = [
    "AnchorLosses",
    "LogWeightFn",
    "PairSpec",
    "anchor_losses_from_logits",
    "info_nce",
    "pair_masks",
    "reduce_anchor_losses",
    "symmetric_info_nce",
]

#: A per-tile negative log-weight function: ``fn(logits_tile, rows, cols) -> (n, m)`` where
#: ``logits_tile`` is detached and ``rows``/``cols`` are the global query/key indices of the tile.
LogWeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]
NegativeLogWeights = Tensor | LogWeightFn | None
ChunkSize = int | Literal["auto"] | None


class AnchorLosses(NamedTuple):
    """Per-anchor results of the core.

    Attributes:
        loss: ``(N,)`` per-anchor losses; 0 where ``valid`` is false.
        valid: ``(N,)`` bool, anchors with at least one positive and a non-empty denominator.
        correct: ``(N,)`` bool, whether the highest-scoring key of ``A(i) ∪ P(i)`` is a positive.
    """

    loss: Tensor
    valid: Tensor
    correct: Tensor


@dataclass(frozen=True)
class PairSpec:
    """Which keys are positives of which query, and which keys are left out.

    Attributes:
        positive_index: ``(N,)`` long, the key index of each query's positive; used when no
            labels are given, or with ``labels_mark="false_negatives"``.
        query_labels: ``(N,)`` labels of the queries (optional).
        key_labels: ``(M,)`` labels of the keys (required with ``query_labels``).
        labels_mark: ``"positives"``: keys sharing a query's label are its positives (and
            ``positive_index`` is ignored); ``"false_negatives"``: positives come from
            ``positive_index`` and other same-label keys are removed from the denominator.
        self_index: ``(N,)`` long, a key to remove entirely from each query's row (its own
            embedding, as in NT-Xent), or None.
        positive_in_denominator: False removes the positives from ``A(i)`` (decoupled losses).
    """

    positive_index: Tensor | None = None
    query_labels: Tensor | None = None
    key_labels: Tensor | None = None
    labels_mark: Literal["positives", "false_negatives"] = "positives"
    self_index: Tensor | None = None
    positive_in_denominator: bool = True


def pair_masks(spec: PairSpec, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Masks of one tile: ``(positive, denominator)``, each ``(len(rows), len(cols))`` bool.

    ``rows`` and ``cols`` are the global query and key indices of the tile, so a chunked path can
    build any tile without an (N, M) buffer.
    """
    same_label = None
    if spec.query_labels is not None and spec.key_labels is not None:
        same_label = spec.query_labels[rows].unsqueeze(1) == spec.key_labels[cols].unsqueeze(0)
    if same_label is not None and spec.labels_mark == "positives":
        positive = same_label
    elif spec.positive_index is not None:
        positive = spec.positive_index[rows].unsqueeze(1) == cols.unsqueeze(0)
    else:
        positive = rows.unsqueeze(1) == cols.unsqueeze(0)
    denominator = torch.ones_like(positive)
    if spec.self_index is not None:
        is_self = spec.self_index[rows].unsqueeze(1) == cols.unsqueeze(0)
        positive = positive & ~is_self
        denominator = denominator & ~is_self
    if same_label is not None and spec.labels_mark == "false_negatives":
        denominator = denominator & (positive | ~same_label)
    if not spec.positive_in_denominator:
        denominator = denominator & ~positive
    return positive, denominator


def _resolve_log_weights(
    weights: NegativeLogWeights, logits: Tensor, rows: Tensor, cols: Tensor
) -> Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.shape != logits.shape:
            raise ValueError(
                f"negative_log_weights must have shape {tuple(logits.shape)} (queries, keys), "
                f"got {tuple(weights.shape)}"
            )
        return weights[rows][:, cols] if weights.shape[0] != rows.numel() else weights
    return weights(logits.detach(), rows, cols)


def anchor_losses_from_logits(
    logits: Tensor,
    positive: Tensor,
    denominator: Tensor,
    log_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> AnchorLosses:
    """Per-anchor InfoNCE from materialised ``logits (N, M)`` and boolean masks ``(N, M)``.

    The dense kernel of the core, public for losses whose keys differ per query (e.g. per-query
    negatives of shape ``(N, M, D)``), where there is no shared key matrix to tile.
    """
    weighted = logits if log_weights is None else logits + log_weights.masked_fill(positive, 0.0)
    lse = weighted.masked_fill(~denominator, float("-inf")).logsumexp(dim=1)  # (N,)
    n_pos = positive.sum(dim=1)
    n_den = denominator.sum(dim=1)
    valid = (n_pos > 0) & (n_den > 0)
    zeros = torch.zeros_like(logits)
    pos_mean = torch.where(positive, logits, zeros).sum(dim=1) / n_pos.clamp(min=1)
    loss = lse - (1.0 - label_smoothing) * pos_mean
    if label_smoothing > 0.0:
        den_mean = torch.where(denominator, logits, zeros).sum(dim=1) / n_den.clamp(min=1)
        loss = loss - label_smoothing * den_mean
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    with torch.no_grad():
        scored = logits.masked_fill(~(denominator | positive), torch.finfo(logits.dtype).min)
        top = scored.argmax(dim=1, keepdim=True)  # the first maximum: ties go to the lower index
        correct = positive.gather(1, top).squeeze(1) & valid
    return AnchorLosses(loss, valid, correct)


def _check_core_args(
    query: Tensor, keys: Tensor, label_smoothing: float, chunk_size: ChunkSize
) -> None:
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            "query and keys must be (N, D) and (M, D) with the same D, "
            f"got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    if chunk_size is not None and chunk_size != "auto":
        check_int(chunk_size, "chunk_size", low=1)


def _tile_rows(
    chunk_size: ChunkSize, n: int, m: int, dtype: torch.dtype, weights: NegativeLogWeights
) -> int | None:
    """Rows per tile for the chunked path, or None for the dense path.

    A weight tensor that requires grad needs the dense path (its gradient is an N×M tensor).
    """
    from embedloss.ops.chunked import resolve_chunk_size

    if isinstance(weights, Tensor) and weights.requires_grad and torch.is_grad_enabled():
        return None
    return resolve_chunk_size(chunk_size, n, m, dtype)


def info_nce(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    spec: PairSpec | None = None,
    *,
    negative_log_weights: NegativeLogWeights = None,
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = None,
) -> AnchorLosses:
    """Per-anchor InfoNCE of ``query`` against ``keys`` (see the module docstring for the formula).

    Args:
        query: ``(N, D)`` anchors (normalised by the caller if wanted).
        keys: ``(M, D)`` keys.
        scale: ``1/τ``, a float or a 0-d tensor (may require grad: learnable temperature).
        spec: Positives and exclusions; default: key ``i`` is the positive of query ``i``.
        negative_log_weights: ``(N, M)`` tensor or a :data:`LogWeightFn`; added to non-positive
            logits in the denominator (hard-negative reweighting).
        label_smoothing: ε in [0, 1], spread uniformly over ``A(i)``.
        chunk_size: ``None`` (dense), an int (tiles of that many query rows, see
            :mod:`embedloss.ops.chunked`) or ``"auto"`` (dense for tiny problems, whose
            working set is below 512 KiB, tiles above). Tiled and dense agree in value and
            gradient; the tiled path gives first-order gradients only.

    Returns:
        :class:`AnchorLosses` with ``(N,)`` tensors.

    Example:
        >>> import math
        >>> q = torch.eye(3)
        >>> out = info_nce(q, q, scale=1.0)
        >>> torch.allclose(out.loss, torch.tensor(math.log(2 + math.e) - 1))
        True
    """
    spec = PairSpec() if spec is None else spec
    _check_core_args(query, keys, label_smoothing, chunk_size)
    n, m = query.shape[0], keys.shape[0]
    if spec.positive_index is None and spec.query_labels is None and m < n:
        raise ValueError(
            f"without positive_index or labels, keys need at least N={n} rows, got {m}"
        )
    chunk = _tile_rows(chunk_size, n, m, query.dtype, negative_log_weights)
    if chunk is not None:
        from embedloss.ops.chunked import chunked_info_nce

        return chunked_info_nce(
            query,
            keys,
            scale,
            spec,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=chunk,
        )
    rows = torch.arange(n, device=query.device)
    cols = torch.arange(m, device=query.device)
    logits = (query @ keys.T) * scale  # (N, M)
    positive, denominator = pair_masks(spec, rows, cols)
    log_w = _resolve_log_weights(negative_log_weights, logits, rows, cols)
    return anchor_losses_from_logits(logits, positive, denominator, log_w, label_smoothing)


def symmetric_info_nce(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    negative_log_weights: NegativeLogWeights = None,
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = None,
) -> tuple[AnchorLosses, AnchorLosses]:
    """InfoNCE in both directions of a paired batch (x→y rows, y→x columns), as in CLIP.

    Shares one logit matrix between the directions. Pair ``i`` of ``x`` and ``y`` is positive;
    with ``labels`` every pair of equal labels is. ``negative_log_weights`` given as a tensor is
    the ``(N, N)`` x→y matrix; its transpose serves y→x.

    Returns:
        ``(x_to_y, y_to_x)`` per-anchor results.

    Example:
        >>> a, b = symmetric_info_nce(torch.eye(2), torch.eye(2), scale=1.0)
        >>> torch.allclose(a.loss, b.loss)
        True
    """
    _check_core_args(x, y, label_smoothing, chunk_size)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same N, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    chunk = _tile_rows(chunk_size, n, n, x.dtype, negative_log_weights)
    if chunk is not None:
        from embedloss.ops.chunked import chunked_symmetric_info_nce

        return chunked_symmetric_info_nce(
            x,
            y,
            scale,
            labels=labels,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=chunk,
        )
    spec = PairSpec(query_labels=labels, key_labels=labels)
    idx = torch.arange(n, device=x.device)
    logits = (x @ y.T) * scale  # (N, N)
    positive, denominator = pair_masks(spec, idx, idx)
    log_w = _resolve_log_weights(negative_log_weights, logits, idx, idx)
    forward = anchor_losses_from_logits(logits, positive, denominator, log_w, label_smoothing)
    log_w_t = None if log_w is None else log_w.T
    backward = anchor_losses_from_logits(
        logits.T, positive.T, denominator.T, log_w_t, label_smoothing
    )
    return forward, backward


def reduce_anchor_losses(
    result: AnchorLosses, reduction: str, *, distributed: bool = False
) -> Tensor:
    """Reduce per-anchor losses: mean over *valid* anchors, sum, or ``(N,)`` for ``"none"``.

    With ``distributed=True`` (and an initialised process group) the mean divides by the number
    of valid anchors on all ranks and the result is multiplied by the world size, so that the
    mean over ranks of the returned losses equals the single-process loss on the whole batch and
    each rank's gradient is world_size × the single-process gradient (what DDP averages back).

    Example:
        >>> r = AnchorLosses(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([True, False, True]),
        ...                  torch.tensor([True, False, True]))
        >>> reduce_anchor_losses(r, "mean")
        tensor(2.)
    """
    check_reduction(reduction)
    if reduction == "none":
        return result.loss
    world, _ = world_info(distributed)
    total = result.loss.sum()
    if reduction == "sum":
        return total * world
    count = result.valid.sum().to(result.loss.dtype)
    if world > 1:
        count = all_reduce_sum_no_grad(count)
    return total * world / count.clamp(min=1)
