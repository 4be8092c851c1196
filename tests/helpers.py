"""Small shared test utilities."""

from __future__ import annotations

import torch
from torch import Tensor


def randn64(*shape: int, seed: int = 0, requires_grad: bool = True) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    # The graph is kept so that a test may differentiate the same loss again.
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def assert_close_with_grads(
    fast: Tensor, slow: Tensor, inputs: tuple[Tensor, ...], tol: float = 1e-9
) -> None:
    """Value and gradient of ``fast`` equal those of ``slow`` (both functions of ``inputs``)."""
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    for gf, gs in zip(grads(fast, *inputs), grads(slow, *inputs), strict=True):
        torch.testing.assert_close(gf, gs, rtol=tol, atol=tol)
