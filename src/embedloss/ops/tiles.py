"""Building blocks of the tiled kernels: tile buffers, masks written in place, device-side top-1.

Everything here works on one tile at a time and on the tensors' own device: no helper reads a
value back to the host, so the kernels that use them run unchanged on an accelerator or on the
``meta`` device (where every shape is known and no value is). See :mod:`embedloss.ops.chunked`
for the kernels and their derivation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from embedloss.ops.similarity import group_counts, label_codes

__all__ = [
    "Grads",
    "Weights",
    "as_scale",
    "compute_dtype",
    "first_order_only",
    "max_and_prefix_max",
    "label_counts",
    "like_tile",
    "logits_tile",
    "put",
    "tile_bounds",
    "tile_weights",
    "uniform_factor",
]

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x·LOG2E)
LN2 = 0.6931471805599453
WeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: Negative log-weights of a tiled kernel: an ``(N, M)`` constant, a per-tile function, or None.
Weights = Tensor | WeightFn | None
#: The input gradients of a tiled backward: ``(∂query, ∂keys, ∂scale)``.
Grads = tuple[Tensor | None, Tensor | None, Tensor]


def tile_bounds(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` of the row tiles of ``n`` rows, ``chunk`` rows each (the last may be short)."""
    for r0 in range(0, n, chunk):
        yield r0, min(r0 + chunk, n)


def logits_tile(buf: Tensor, a: Tensor, b: Tensor, transposed: bool) -> Tensor:
    """``a·bᵀ`` (``(c, M)``) written into the flat buffer ``buf``.

    With ``transposed`` the product is computed as ``(b·aᵀ)ᵀ`` into an ``(M, c)`` layout and
    returned as a transposed view: for a short, wide tile (``c ≪ M``) that GEMM runs faster with
    MKL, and the buffers made by :func:`like_tile` then share the layout.
    """
    c, m = a.shape[0], b.shape[0]
    if transposed:
        return torch.mm(b, a.T, out=buf[: c * m].view(m, c)).T
    return torch.mm(a, b.T, out=buf[: c * m].view(c, m))


def like_tile(buf: Tensor, s: Tensor) -> Tensor:
    """A view of the flat ``buf`` with the shape and memory layout of the tile ``s``."""
    c, m = s.shape
    if s.stride(0) == 1 and c > 1:
        return buf[: c * m].view(m, c).T
    return buf[: c * m].view(c, m)


def tile_weights(
    weights: Weights, logits2: Tensor, rows: Tensor, cols: Tensor, r0: int, r1: int
) -> Tensor | None:
    """The ``(rows, cols)`` tile of the negative log-weights in base-2 units (``w·log₂e``).

    ``logits2`` is the tile in base-2 units; a weight function is given the natural logits
    (a new tensor, so it may return or modify it without touching the tile buffer).
    """
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        return weights[r0:r1].to(logits2.dtype) * LOG2E
    natural = logits2 * LN2
    w = weights(natural, rows, cols)
    if not isinstance(w, Tensor) or w.shape != logits2.shape:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(
            f"negative_log_weights function must return a tensor of shape "
            f"{tuple(logits2.shape)} (tile rows, keys), got {got}"
        )
    return w.to(logits2.dtype) * LOG2E


def put(s: Tensor, index: Tensor, where: Tensor, value: Tensor | float) -> None:
    """``s[i, index[i]] = value[i]`` for the rows where ``where`` holds; others unchanged."""
    idx = index.unsqueeze(1)
    current = s.gather(1, idx).squeeze(1)
    s.scatter_(1, idx, torch.where(where, value, current).unsqueeze(1))


def max_and_prefix_max(s: Tensor, index: Tensor, width: int = 128) -> tuple[Tensor, Tensor]:
    """Each row's maximum, and its maximum over the columns before ``index[i]`` (row-major ``s``).

    One pass over the tile: maxima of column blocks of ``width``; the blocks entirely before
    ``index[i]`` are combined with a running maximum over the small ``(c, M/width)`` matrix and
    the block holding ``index[i]`` is gathered (``(c, width)``) and masked. Rows with nothing
    before their index get ``-inf``. Used for the first-maximum rule of ``argmax`` without an
    argmax pass (several times slower than a max on CPUs) and without host reads.
    """
    c, m = s.shape
    width = max(1, min(width, m))
    nb = m // width  # >= 1 full blocks, then maybe a shorter remainder
    body = s[:, : nb * width].reshape(c, nb, width).amax(2)  # (c, nb) block maxima
    row_max = body.amax(1)
    if nb * width < m:
        row_max = torch.maximum(row_max, s[:, nb * width :].amax(1))
    block = torch.div(index, width, rounding_mode="floor")  # the block holding index[i]
    prior = body.cummax(1).values.gather(1, (block - 1).clamp(0, nb - 1).unsqueeze(1))
    before = torch.where(block > 0, prior.squeeze(1), NEG_INF)  # the whole blocks before it
    cols = block.unsqueeze(1) * width + torch.arange(width, device=s.device)  # (c, width)
    part = s.gather(1, cols.clamp(max=m - 1)).masked_fill(cols >= index.unsqueeze(1), NEG_INF)
    return row_max, torch.maximum(before, part.amax(1))


def uniform_factor(grad: Tensor, valid: Tensor) -> Tensor:
    """The upstream gradient shared by the valid anchors, as a 0-d tensor (no host read).

    Callers pass it only when the loss merely sums or averages the per-anchor losses, so every
    valid anchor has the same gradient; this is its mean over the valid anchors (0 if none).
    """
    v = valid.to(grad.dtype)
    return (grad * v).sum() / v.sum().clamp(min=1)


def label_counts(labels: Tensor) -> Tensor:
    """How many entries of ``labels`` (``(N,)``) equal each entry, in O(N log N) on device."""
    codes = label_codes(labels)
    return group_counts(codes)[codes]


def as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    """``scale`` as a 0-d tensor of ``like``'s dtype and device (a tensor keeps its graph)."""
    if isinstance(scale, Tensor):
        return scale.reshape(()).to(like.dtype)
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def first_order_only() -> None:
    """Refuse a backward that builds a graph: the tiles are not differentiable twice."""
    # The backward runs with grad mode on only under ``create_graph=True``; its tiles are not
    # differentiable, so a second-order graph would silently be a constant.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the chunked InfoNCE path computes first-order gradients only (create_graph=True "
            "asks for more); use chunk_size=None for higher-order gradients"
        )
