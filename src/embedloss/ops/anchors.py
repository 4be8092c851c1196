"""Per-anchor results of the InfoNCE family: pair specs, masks, the dense kernel, reductions.

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
This module holds what the dense and the tiled paths share; :mod:`embedloss.ops.info_nce`
chooses between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import check_reduction
from embedloss.ops.distributed import all_reduce_sum_no_grad, world_info

__all__ = [
    "AnchorLosses",
    "ChunkSize",
    "LogWeightFn",
    "NegativeLogWeights",
    "PairSpec",
    "anchor_losses_from_logits",
    "combine_directions",
    "dense_anchor_losses",
    "direction_terms",
    "mean_accuracy",
    "pair_masks",
    "reduce_anchor_losses",
    "reduce_samples",
]

#: A per-tile negative log-weight function: ``fn(logits_tile, rows, cols) -> (n, m)`` where
#: ``logits_tile`` is detached and ``rows``/``cols`` are the global query/key indices of the tile.
LogWeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]
NegativeLogWeights = Tensor | LogWeightFn | None
#: ``None`` (dense), an int (rows per tile) or ``"auto"`` (dense for tiny problems, else tiles).
ChunkSize = int | Literal["auto"] | None


class AnchorLosses(NamedTuple):
    """Per-anchor results of the core.

    Attributes:
        loss: ``(N,)`` per-anchor losses; 0 where ``valid`` is false.
        valid: ``(N,)`` bool, anchors with at least one positive and a non-empty denominator.
        top1: the ``correct`` flags, or (dense path) a function that computes them: the
            training path (``forward``) never asks, so it never pays for an extra pass over
            the logits.
    """

    loss: Tensor
    valid: Tensor
    top1: Tensor | Callable[[], Tensor]

    @property
    def correct(self) -> Tensor:
        """``(N,)`` bool, whether the highest-scoring key of ``A(i) ∪ P(i)`` is a positive."""
        return self.top1() if callable(self.top1) else self.top1


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

    @property
    def uses_labels(self) -> bool:
        """Whether label equality (not only indices) decides positives or exclusions."""
        return self.query_labels is not None and self.key_labels is not None


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


def anchor_losses_from_logits(
    logits: Tensor,
    positive: Tensor,
    denominator: Tensor,
    log_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> AnchorLosses:
    """Per-anchor InfoNCE from materialised ``logits (N, M)`` and boolean masks ``(N, M)``.

    The general dense kernel, public for losses whose keys differ per query (e.g. per-query
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
    detached = logits.detach()

    def correct() -> Tensor:
        scored = detached.masked_fill(~(denominator | positive), torch.finfo(logits.dtype).min)
        top = scored.argmax(dim=1, keepdim=True)  # the first maximum: ties go to the lower index
        return positive.gather(1, top).squeeze(1) & valid

    return AnchorLosses(loss, valid, correct)


def _single_positive(logits: Tensor, spec: PairSpec) -> AnchorLosses:
    """The common layout (one positive key per query, maybe one excluded key): a cross-entropy.

    Equal to :func:`anchor_losses_from_logits` with the masks of ``spec`` but built from
    indices: the excluded key is set to ``-inf`` and ``F.cross_entropy`` takes the rest. A
    query without a positive (its index out of range, or its own excluded key) is invalid.
    """
    n, m = logits.shape
    rows = torch.arange(n, device=logits.device)
    index = rows if spec.positive_index is None else spec.positive_index
    valid = (index >= 0) & (index < m)
    target = index.clamp(0, m - 1)
    scored = logits
    if spec.self_index is not None:
        own = spec.self_index.clamp(0, m - 1).unsqueeze(1)
        excluded = (spec.self_index >= 0) & (spec.self_index < m)
        valid = valid & ~(excluded & (spec.self_index == index))
        # Exclude the own key only in valid rows: an invalid row stays finite (and is zeroed).
        fill = torch.where(excluded & valid, float("-inf"), logits.gather(1, own).squeeze(1))
        scored = logits.scatter(1, own, fill.unsqueeze(1))
    loss = F.cross_entropy(scored, target, reduction="none")  # (N,)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    detached = scored.detach()

    def correct() -> Tensor:
        return (detached.argmax(dim=1) == target) & valid  # the first maximum, as the masks

    return AnchorLosses(loss, valid, correct)


def dense_anchor_losses(
    logits: Tensor,
    spec: PairSpec,
    log_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> AnchorLosses:
    """Per-anchor InfoNCE of materialised ``logits (N, M)`` under ``spec`` (the dense path).

    A query with a single positive key, no weights, no smoothing and its positive in the
    denominator is a plain cross-entropy; everything else goes through the masks.
    """
    simple = (
        not spec.uses_labels
        and log_weights is None
        and label_smoothing == 0.0
        and spec.positive_in_denominator
    )
    if simple:
        return _single_positive(logits, spec)
    rows = torch.arange(logits.shape[0], device=logits.device)
    cols = torch.arange(logits.shape[1], device=logits.device)
    positive, denominator = pair_masks(spec, rows, cols)
    return anchor_losses_from_logits(logits, positive, denominator, log_weights, label_smoothing)


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


def reduce_samples(per_sample: Tensor, reduction: str, *, distributed: bool = False) -> Tensor:
    """:func:`reduce_anchor_losses` of ``(N,)`` values where every sample counts (is valid).

    Example:
        >>> reduce_samples(torch.tensor([1.0, 3.0]), "mean")
        tensor(2.)
    """
    valid = torch.ones_like(per_sample, dtype=torch.bool)
    return reduce_anchor_losses(
        AnchorLosses(per_sample, valid, valid), reduction, distributed=distributed
    )


def combine_directions(
    first: AnchorLosses, second: AnchorLosses, reduction: str, distributed: bool = False
) -> Tensor:
    """Average of two directions' reduced losses (per pair for ``reduction="none"``)."""
    a = reduce_anchor_losses(first, reduction, distributed=distributed)
    b = reduce_anchor_losses(second, reduction, distributed=distributed)
    return (a + b) / 2


@torch.no_grad()
def mean_accuracy(first: AnchorLosses, second: AnchorLosses) -> Tensor:
    """Mean of both directions' top-1 accuracies (share of anchors whose top-1 is a positive)."""
    return (first.correct.float().mean() + second.correct.float().mean()) / 2


@torch.no_grad()
def direction_terms(
    first: AnchorLosses, second: AnchorLosses, names: tuple[str, str]
) -> dict[str, Tensor]:
    """``loss_<name>`` (the mean) of both directions and their ``accuracy``, for logging."""
    return {
        f"loss_{names[0]}": reduce_anchor_losses(first, "mean"),
        f"loss_{names[1]}": reduce_anchor_losses(second, "mean"),
        "accuracy": mean_accuracy(first, second),
    }
