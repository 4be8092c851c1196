"""The gradient-caching protocol (Gao et al. 2021), written out for the whole-batch-state tests.

``embedloss.gradcache.GradCache`` (the gradient-caching issue) embeds micro-batches without a
graph, calls the loss once on the full batch of detached, grad-requiring embeddings,
back-propagates it, then re-runs each micro-batch with a graph and back-propagates its rows of
the cached gradient. This is that protocol in a few lines, so that the losses whose state
depends on the whole batch (DINO's and iBOT's centres, SwAV's codes) can be checked against it
on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def cached_step(
    encoders: Sequence[Callable[[Tensor], Tensor]],
    loss: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    micro_batch_size: int,
) -> Tensor:
    """One step: the loss is called once, on the full batch; returns its (detached) value."""
    parts = [x.split(micro_batch_size) for x in inputs]
    with torch.no_grad():
        embeddings = [
            torch.cat([enc(p) for p in ps]).requires_grad_()
            for enc, ps in zip(encoders, parts, strict=True)
        ]
    value = loss(*embeddings)
    value.backward()
    for enc, ps, emb in zip(encoders, parts, embeddings, strict=True):
        if emb.grad is None:  # a teacher: the loss sends it no gradient
            continue
        for j, p in enumerate(ps):
            start = j * micro_batch_size
            out = enc(p)
            if out.requires_grad:
                out.backward(emb.grad[start : start + out.shape[0]])
    return value.detach()
