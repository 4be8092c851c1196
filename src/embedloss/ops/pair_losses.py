"""Row-tiled pair losses over labelled embeddings: exact, with O(N·chunk) memory, never O(N²).

Every loss here is, per anchor ``i``, a function of one row: the pair values ``v_ij`` of
anchor ``i`` against all ``M`` keys (distances or similarities,
:mod:`embedloss.ops.distances`) and the row's masks ``positive_ij`` (same label, not ``i``
itself) and ``negative_ij`` (another label). A :data:`RowLoss` maps a tile of rows
``(values (c, M), positive, negative)`` to ``(loss (c,), count (c,))``: the anchor's summed loss
terms and how many terms the mean divides by (anchors for batch-hard, triplets with a positive
loss for batch-all, pairs for the contrastive loss). The reduced loss is
``Σ_i loss_i / Σ_i count_i`` (:func:`reduce_counted`).

Tiling (:func:`pair_rows`). Rows are independent, so the anchors are cut into tiles of ``c``
rows, each scored against the full key width. ``chunk_size=None`` (or ``"auto"`` for small
problems) computes the one ``(N, M)`` tile with plain autograd (double backward works).
Otherwise :class:`_TiledRows`:

* forward — per tile: compute the values, the masks from indices, the row loss; keep only
  the ``(c,)`` results. Peak memory: one tile's working set, O(c·M).
* backward — per tile: recompute the tile with autograd and push ``grad[rows]`` through it
  (``dq_tile`` and an accumulated ``dK``): one GEMM to recompute, two for the gradients.
* eager (reductions mean and sum, when a gradient is wanted): every anchor's upstream gradient
  is the same scalar, so the forward already pushes a gradient of 1 through each tile while
  it has the tile's graph, keeps ``dq (n, D)`` and ``dK (M, D)``, and the backward only scales
  them: one pass over the tiles and three GEMMs, the floor.

Invariant: a tile's result depends only on its rows, so the tiled and dense paths run the
same expressions on the same rows — equal losses and gradients up to the summation order of
``dK`` (~1e-15 in float64). Nothing reads a value back to the host: counts are device
tensors, masks come from label comparisons and index scatters, and shapes depend only on N
and M. Beside one tile's working set the tiled path keeps O((N + M)·D): the inputs and, when
eager, their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_chunk_size,
    check_embeddings,
    check_labels,
    check_reduction,
    compute_dtype,
)
from embedloss.ops.anchors import ChunkSize
from embedloss.ops.chunked import DENSE_BUFFERS, DENSE_LIMIT_BYTES
from embedloss.ops.distances import (
    check_distance,
    pair_distance,
    pair_similarity,
    prepare_for_distance,
)
from embedloss.ops.distributed import all_reduce_sum_no_grad, gather_with_grad, world_info

__all__ = [
    "PAIR_TILE_BYTES",
    "PairLayout",
    "PairMiner",
    "PairKeywords",
    "PairOptions",
    "PairResult",
    "RowLoss",
    "labelled_pair_loss",
    "masked_log1p_sum_exp",
    "masked_logsumexp",
    "mined",
    "pair_rows",
    "reduce_counted",
    "resolve_pair_rows",
    "row_masks",
]

#: ``(values (c, M), positive (c, M), negative (c, M)) -> (loss (c,), count (c,) long)``.
RowLoss = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
#: ``(query tile (c, D), keys (M, D)) -> values (c, M)``.
PairValues = Callable[[Tensor, Tensor], Tensor]
#: Target size of one ``(c, M)`` value tile for ``chunk_size="auto"``: a row loss keeps about
#: a dozen buffers of this size alive (sorts, masks, the recomputed graph in the backward).
PAIR_TILE_BYTES = 4 * 2**20
MIN_PAIR_ROWS = 16


class PairLayout(NamedTuple):
    """Which keys are positives and negatives of which anchor.

    Attributes:
        query_labels: ``(n,)`` labels of the anchors.
        key_labels: ``(M,)`` labels of the keys.
        self_index: ``(n,)`` long, the key index of each anchor itself (neither positive nor
            negative), or None when the keys do not contain the anchors.
    """

    query_labels: Tensor
    key_labels: Tensor
    self_index: Tensor | None = None


def row_masks(layout: PairLayout, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` masks ``(stop − start, M)`` of anchor rows ``start:stop``."""
    same = layout.query_labels[start:stop].unsqueeze(1) == layout.key_labels.unsqueeze(0)
    negative = ~same
    if layout.self_index is not None:  # the anchor's own key: one scattered False per row
        own = layout.self_index[start:stop].unsqueeze(1)
        same = same.scatter_(1, own, torch.zeros_like(own, dtype=torch.bool))
    return same, negative


def resolve_pair_rows(
    chunk_size: ChunkSize, n: int, m: int, dtype: torch.dtype = torch.float32
) -> int | None:
    """Rows per tile for ``chunk_size``, or None for the dense path.

    ``"auto"`` is dense while ``n·m·itemsize·DENSE_BUFFERS <= DENSE_LIMIT_BYTES`` and otherwise
    takes tiles of ``PAIR_TILE_BYTES / (m·itemsize)`` rows (at least ``MIN_PAIR_ROWS``).

    Example:
        >>> resolve_pair_rows("auto", 64, 64) is None
        True
        >>> resolve_pair_rows("auto", 16384, 16384)
        64
    """
    chunk_size = check_chunk_size(chunk_size)
    itemsize = torch.finfo(dtype).bits // 8
    if chunk_size is None:
        return None
    if chunk_size != "auto":
        return None if chunk_size >= n else int(chunk_size)
    if n * m * itemsize * DENSE_BUFFERS <= DENSE_LIMIT_BYTES:
        return None
    rows = max(MIN_PAIR_ROWS, PAIR_TILE_BYTES // max(m * itemsize, 1))
    return None if rows >= n else int(rows)


class _Tiles(NamedTuple):
    """What the tiled function needs to rebuild any tile of rows."""

    layout: PairLayout
    values: PairValues
    row_loss: RowLoss

    def loss(self, q: Tensor, keys: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """``(loss, count)`` of the anchor rows ``q``, which start at row ``start``."""
        masks = row_masks(self.layout, start, start + q.shape[0])
        return self.row_loss(self.values(q, keys), *masks)

    def grad(
        self, query: Tensor, keys: Tensor, start: int, stop: int, grad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(loss, count, dq, dK)`` of rows ``start:stop`` for their upstream ``grad``."""
        with torch.enable_grad():
            q = query[start:stop].detach().requires_grad_(True)
            k = keys.detach().requires_grad_(True)
            loss, count = self.loss(q, k, start)
            d_q, d_k = torch.autograd.grad(loss, (q, k), grad)
        return loss.detach(), count, d_q, d_k


class _TiledRows(torch.autograd.Function):
    """Row tiles with recomputation, or with gradients finished in the forward (``eager``).

    ``eager`` is for callers that only sum the per-anchor losses with one common factor
    (reductions mean and sum): the forward pushes an upstream gradient of 1 per anchor through
    each tile as it goes and keeps ``dq (n, D)``, ``dK (M, D)``; the backward scales them by
    that common factor (``grad[0]``, read as a tensor, not on the host). One pass over the
    tiles and three GEMMs instead of two passes and four.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, query: Tensor, keys: Tensor, tiles: _Tiles, chunk: int, eager: bool
    ) -> tuple[Tensor, Tensor]:
        n = query.shape[0]
        loss = query.new_empty(n)
        count = torch.empty(n, dtype=torch.long, device=query.device)
        d_query, d_keys = torch.zeros_like(query), torch.zeros_like(keys)
        ones = query.new_ones(chunk)
        for start in range(0, n, chunk):  # losses of each tile (and their gradients if eager)
            stop = min(start + chunk, n)
            if eager:
                tile_loss, tile_count, d_q, d_k = tiles.grad(
                    query, keys, start, stop, ones[: stop - start]
                )
                d_query[start:stop] = d_q
                d_keys += d_k
            else:
                tile_loss, tile_count = tiles.loss(query[start:stop], keys, start)
            loss[start:stop], count[start:stop] = tile_loss, tile_count
        if eager:
            ctx.save_for_backward(d_query, d_keys)
        else:
            ctx.save_for_backward(query, keys)
        ctx.tiles, ctx.chunk, ctx.eager = tiles, chunk, eager
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.eager:  # every anchor's upstream gradient is grad[0]
            d_query, d_keys = ctx.saved_tensors
            return d_query * grad[0], d_keys * grad[0], None, None, None
        query, keys = ctx.saved_tensors
        n, chunk = query.shape[0], ctx.chunk
        d_query, d_keys = torch.zeros_like(query), torch.zeros_like(keys)
        for start in range(0, n, chunk):  # recompute each tile and push its gradient back
            stop = min(start + chunk, n)
            _, _, d_q, d_k = ctx.tiles.grad(query, keys, start, stop, grad[start:stop])
            d_query[start:stop] = d_q
            d_keys += d_k
        return d_query, d_keys, None, None, None


def pair_rows(
    query: Tensor,
    keys: Tensor,
    layout: PairLayout,
    values: PairValues,
    row_loss: RowLoss,
    chunk_size: ChunkSize = "auto",
    *,
    reduced: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-anchor ``(loss (n,), count (n,))`` of ``row_loss`` over all rows, dense or tiled.

    Args:
        query: ``(n, D)`` prepared anchors.
        keys: ``(M, D)`` prepared keys (the anchors themselves, or those of every rank).
        layout: Labels and the anchors' own key indices.
        values: The pair-value function (a distance or a similarity of ``ops.distances``).
        row_loss: The per-row loss.
        chunk_size: ``None`` (dense), an int (rows per tile) or ``"auto"``.
        reduced: The caller only sums the losses with one common factor (reductions mean and
            sum), so the tiled path may finish the gradients during the forward.
    """
    chunk = resolve_pair_rows(chunk_size, query.shape[0], keys.shape[0], query.dtype)
    if chunk is None:
        return row_loss(values(query, keys), *row_masks(layout, 0, query.shape[0]))
    wanted = torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad)
    tiles = _Tiles(layout, values, row_loss)
    loss, count = _TiledRows.apply(query, keys, tiles, chunk, reduced and wanted)
    return loss, count


def reduce_counted(
    loss: Tensor, count: Tensor, reduction: str, *, distributed: bool = False
) -> Tensor:
    """``Σ loss / Σ count`` (mean), ``Σ loss`` (sum) or the ``(n,)`` values (none).

    With ``distributed`` the counts of every rank are summed and the result is multiplied by
    the world size, as :func:`~embedloss.ops.anchors.reduce_anchor_losses` does: the mean over
    ranks of the returned losses is the single-process loss, and DDP's gradient averaging
    gives the single-process gradient. A mean over no terms is 0.

    Example:
        >>> reduce_counted(torch.tensor([3.0, 0.0, 3.0]), torch.tensor([2, 0, 1]), "mean")
        tensor(2.)
    """
    check_reduction(reduction)
    if reduction == "none":
        return loss
    world, _ = world_info(distributed)
    total = loss.sum()
    if reduction == "sum":
        return total * world
    terms = count.sum().to(loss.dtype)
    if world > 1:
        terms = all_reduce_sum_no_grad(terms)
    return total * world / terms.clamp(min=1)


def masked_logsumexp(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``log Σ_{mask} exp(x)`` and whether the row has any entry (``(c,)`` each).

    Empty rows give 0 (finite, with zero gradient) rather than ``−inf``, so no NaN reaches
    the gradient of any entry; the caller decides what an empty row means.
    """
    top = x.detach().masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.where(mask, x - top, float("-inf")).exp().sum(dim=1)  # (c,)
    present = mask.any(dim=1)
    lse = torch.where(present, total, torch.ones_like(total)).log() + top.squeeze(1)
    return torch.where(present, lse, torch.zeros_like(lse)), present


def masked_log1p_sum_exp(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + Σ_{mask} exp(x))`` along ``dim``: 0 for an empty set, stable for large ``x``."""
    top = x.detach().masked_fill(~mask, float("-inf")).amax(dim=dim, keepdim=True).clamp(min=0)
    total = torch.where(mask, x - top, float("-inf")).exp().sum(dim=dim) + (-top).exp().squeeze(dim)
    return total.log() + top.squeeze(dim)


@dataclass(frozen=True)
class PairOptions:
    """How a labelled pair loss scores a batch (checked by :meth:`create`).

    Attributes:
        distance: One of :data:`~embedloss.ops.distances.DISTANCES`.
        normalize: L2-normalise the embeddings first (always for ``"cosine"``).
        reduction: ``"mean"`` (``Σ loss / Σ count``), ``"sum"`` or ``"none"`` (per anchor).
        chunk_size: Row tiles: ``None`` dense, an int, or ``"auto"``.
        gather_distributed: Score local anchors against the embeddings of every rank.
    """

    distance: str = "cosine"
    normalize: bool = True
    reduction: str = "mean"
    chunk_size: ChunkSize = "auto"
    gather_distributed: bool = False

    @classmethod
    def create(
        cls,
        distance: str = "cosine",
        normalize: bool = True,
        reduction: str = "mean",
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> PairOptions:
        """Validated options; each error names the argument."""
        return cls(
            check_distance(distance),
            check_bool(normalize, "normalize"),
            check_reduction(reduction),
            check_chunk_size(chunk_size),
            check_bool(gather_distributed, "gather_distributed"),
        )


class PairKeywords(TypedDict, total=False):
    """The options of :meth:`PairOptions.create`, as a pair loss's keywords (function or module)."""

    distance: str
    normalize: bool
    reduction: str
    chunk_size: ChunkSize
    gather_distributed: bool


class PairResult(NamedTuple):
    """A reduced pair loss and its per-anchor parts: ``loss`` and ``(n,)`` ``anchor_loss``, ``counts``."""

    loss: Tensor
    anchor_loss: Tensor
    counts: Tensor


def labelled_pair_loss(
    embeddings: Tensor,
    labels: Tensor,
    options: PairOptions,
    row_loss: RowLoss,
    *,
    similarity: bool = False,
) -> PairResult:
    """Check, prepare, lay out (across ranks), tile and reduce a pair loss of ``(N, D)`` inputs.

    Local anchors are scored against the keys of every rank (the anchors themselves without
    ``gather_distributed``); an anchor's own key is neither a positive nor a negative.
    ``similarity`` hands the row loss similarities instead of distances.
    """
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0])
    x = prepare_for_distance(
        embeddings, options.distance, normalize=options.normalize, dtype=compute_dtype(embeddings)
    )
    gathered = gather_with_grad(x, options.gather_distributed)
    key_labels = gather_with_grad(labels, options.gather_distributed).tensor
    own = torch.arange(x.shape[0], device=x.device) + gathered.offset
    layout = PairLayout(labels, key_labels, own)
    kind = options.distance

    def values(q: Tensor, k: Tensor) -> Tensor:
        return pair_similarity(q, k, kind) if similarity else pair_distance(q, k, kind)

    reduced = options.reduction != "none"
    loss, count = pair_rows(
        x, gathered.tensor, layout, values, row_loss, options.chunk_size, reduced=reduced
    )
    total = reduce_counted(loss, count, options.reduction, distributed=options.gather_distributed)
    return PairResult(total, loss, count)


#: ``(values, positive, negative) -> (positive, negative)``: a pair miner of :mod:`ops.miners`.
PairMiner = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def mined(row_loss: RowLoss, miner: PairMiner) -> RowLoss:
    """``row_loss`` seeing only the pairs ``miner`` keeps (any pair loss with any pair miner).

    Example:
        >>> from embedloss.ops.miners import batch_hard_pairs
        >>> def pairs(v, pos, neg):
        ...     return (v * pos).sum(1) + (v * neg).sum(1), (pos | neg).sum(1)
        >>> d = torch.tensor([[0.0, 0.2, 0.7, 0.4, 0.9]])
        >>> pos = torch.tensor([[False, True, True, False, False]])
        >>> neg = torch.tensor([[False, False, False, True, True]])
        >>> mined(pairs, batch_hard_pairs)(d, pos, neg)  # only d_a2 = 0.7 and d_a3 = 0.4
        (tensor([1.1000]), tensor([2]))
    """

    def row(values: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor]:
        return row_loss(values, *miner(values, positive, negative))

    return row
