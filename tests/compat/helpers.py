"""Inputs the way the legacy trainers passed them: keywords plus extra trainer keys."""

from __future__ import annotations

import torch

TRAINER_EXTRAS = {
    "class_logits": None,
    "class_labels": None,
    "matching_logits": None,
    "matching_labels": None,
    "logits": None,
    "attention_weights": None,
}


def features(n: int = 6, d: int = 8, *, seed: int = 0, dtype=torch.float64, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=dtype)
    t = (v + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)).requires_grad_(grad)
    return v.requires_grad_(grad), t


def trainer_batch(n: int = 6, d: int = 8, *, seed: int = 0, match_ids=None, **more):
    v, t = features(n, d, seed=seed)
    batch = {"vision_features": v, "text_features": t, **TRAINER_EXTRAS, **more}
    if match_ids is not None:
        batch["match_ids"] = match_ids
    return batch


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def assert_same(a, b, inputs, tol=1e-10):
    """Same value and same gradient with respect to ``inputs``."""
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for ga, gb in zip(grads(a, *inputs), grads(b, *inputs), strict=True):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)
