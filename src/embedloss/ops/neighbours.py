"""Nearest neighbours by cosine similarity, in tiles of keys (KoLeo, NNCLR's support set)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nearest_neighbour_index"]

#: Largest number of query × key similarities held at once.
_TILE_ELEMENTS = 1 << 22


@torch.no_grad()
def nearest_neighbour_index(
    query: Tensor, keys: Tensor, *, exclude: Tensor | None = None, tile: int | None = None
) -> Tensor:
    """Index ``(n,)`` of the key with the largest ``query_i · key_j`` for every query row.

    Rows should be L2-normalised (then the largest dot product is the smallest Euclidean
    distance). Ties go to the lower index, as ``argmax``. Keys are scored in tiles of ``tile``
    rows (default: about 4M similarities per tile), so memory stays O(n·tile) for a long queue;
    no value is read back on the host.

    Args:
        query: ``(n, D)`` queries.
        keys: ``(M, D)`` keys, M >= 1 (M >= 2 with ``exclude``).
        exclude: Optional ``(n,)`` key index that query ``i`` may not pick (itself).
        tile: Keys per tile (>= 1), or None for the default.

    Example:
        >>> q = torch.eye(3)
        >>> nearest_neighbour_index(q, q, exclude=torch.arange(3))  # itself excluded
        tensor([1, 0, 0])
    """
    n, m = query.shape[0], keys.shape[0]
    step = tile if tile is not None else max(1, _TILE_ELEMENTS // max(n, 1))
    best = query.new_full((n,), float("-inf"))
    index = torch.zeros(n, dtype=torch.long, device=query.device)
    for start in range(0, m, step):
        scores = query @ keys[start : start + step].T  # (n, tile)
        if exclude is not None:
            local = (exclude - start).unsqueeze(1)  # (n, 1)
            cols = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
            scores = scores.masked_fill(cols == local, float("-inf"))
        value, where = scores.max(dim=1)
        better = value > best  # strict: an earlier tile keeps its ties
        best = torch.where(better, value, best)
        index = torch.where(better, where + start, index)
    return index
