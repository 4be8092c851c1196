"""Query/key layouts of the paired losses: which gathered key is each local query's positive."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss.ops.anchors import PairSpec
from embedloss.ops.distributed import gather_with_grad

__all__ = ["paired_layout", "two_view_layout"]


def paired_layout(
    query: Tensor, keys: Tensor, labels: Tensor | None = None, gather_distributed: bool = False
) -> tuple[Tensor, PairSpec]:
    """The keys ``(N, D)`` of every rank and the :class:`PairSpec` of paired ``(n, D)`` inputs.

    Local query ``i`` is paired with key ``offset + i`` (its own rank's row ``i``), or, with
    ``labels (n,)``, with every key of the same label (labels gathered like the keys). Shared by
    the losses that score one modality against the other (CLIP, InfoNCE, SigLIP, hard negatives).
    """
    gathered = gather_with_grad(keys, gather_distributed)
    if labels is None:
        index = torch.arange(query.shape[0], device=query.device) + gathered.offset
        return gathered.tensor, PairSpec(positive_index=index)
    key_labels = gather_with_grad(labels, gather_distributed).tensor
    return gathered.tensor, PairSpec(query_labels=labels, key_labels=key_labels)


def two_view_layout(
    a: Tensor, b: Tensor, labels: Tensor | None = None, gather_distributed: bool = False
) -> tuple[Tensor, Tensor, PairSpec]:
    """SimCLR's 2N-anchor layout of two prepared views ``a``, ``b`` ``(n, D)``.

    Returns ``(query, keys, spec)``: the local anchors ``[a; b]`` ``(2n, D)``, the keys
    ``[a_all; b_all]`` ``(2N, D)`` of every rank (``N = n`` without ``gather_distributed``), and
    a :class:`PairSpec` whose positive is the anchor's other view (with ``labels``: every other
    view of the same label) and which removes the anchor itself. Shared by the losses that
    contrast 2N views (SimCLR, DCL).
    """
    ga, gb = gather_with_grad(a, gather_distributed), gather_with_grad(b, gather_distributed)
    total = ga.tensor.shape[0]
    query = torch.cat([a, b])  # (2n, D) local anchors
    keys = torch.cat([ga.tensor, gb.tensor])  # (2N, D) global keys
    local = torch.arange(a.shape[0], device=a.device) + ga.offset
    self_index = torch.cat([local, local + total])
    if labels is None:
        spec = PairSpec(positive_index=torch.cat([local + total, local]), self_index=self_index)
    else:
        global_labels = gather_with_grad(labels, gather_distributed).tensor
        spec = PairSpec(
            query_labels=torch.cat([labels, labels]),
            key_labels=torch.cat([global_labels, global_labels]),
            self_index=self_index,
        )
    return query, keys, spec
