"""Inputs shared by the metric-learning tests."""

from __future__ import annotations

import torch

from tests.helpers import randn64


def batch(n: int = 10, d: int = 4, classes: int = 3, seed: int = 0):
    """``(x (n, d) float64 requiring grad, labels (n,))`` with every class present twice or more."""
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return randn64(n, d, seed=seed), labels


def pml_grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]
