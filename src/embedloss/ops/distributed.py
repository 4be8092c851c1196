"""Autograd-correct collectives over ``torch.distributed`` (no home-made transport).

``gather_with_grad`` concatenates a tensor from all ranks (uneven first dimensions allowed); its
backward sums the incoming gradient over ranks and returns this rank's slice, so that a loss
computed from gathered keys sends every key its full gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Gathered", "all_reduce_sum_no_grad", "gather_with_grad", "is_distributed", "world_info"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_info(enabled: bool = True) -> tuple[int, int]:
    """``(world_size, rank)`` of the default group, or ``(1, 0)`` when disabled or not initialised."""
    if enabled and is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_sum_no_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks outside autograd (counts, statistics used as constants)."""
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _all_sizes(n: int, device: torch.device, world: int) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    # all_gather needs equal shapes: pad to the largest rank's rows, then strip the padding.
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


class Gathered(NamedTuple):
    """A gathered tensor and where this rank's rows sit in it."""

    tensor: Tensor
    offset: int
    world_size: int


def gather_with_grad(x: Tensor, enabled: bool = True) -> Gathered:
    """Concatenate ``x`` (first dim may differ per rank) from all ranks, keeping gradients.

    Returns ``Gathered(x, 0, 1)`` unchanged when ``enabled`` is false or no process group exists.
    Integer tensors (labels) are gathered without autograd.
    """
    world, rank = world_info(enabled)
    if world == 1:
        return Gathered(x, 0, 1)
    sizes = _all_sizes(x.shape[0], x.device, world)
    offset = sum(sizes[:rank])
    if x.is_floating_point() and x.requires_grad:
        return Gathered(_GatherWithGrad.apply(x, sizes, rank), offset, world)
    with torch.no_grad():
        return Gathered(_gather_padded(x.detach(), sizes), offset, world)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        # y = Σ_s x_s on every rank, so ∂(Σ_r L_r)/∂x_s = Σ_r ∂L_r/∂y: the adjoint is a sum too.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: Tensor, enabled: bool = True) -> Tensor:
    """Sum ``x`` over ranks, keeping gradients (the backward sums the gradients over ranks).

    When every rank computes the same loss ``L`` from the summed statistics, the gradient that
    reaches this rank's ``x`` is ``world_size · ∂L/∂x``: what DDP's gradient averaging expects.
    Returns ``x`` unchanged when ``enabled`` is false or no process group exists; a tensor that
    does not require grad is summed without autograd.
    """
    world, _ = world_info(enabled)
    if world == 1:
        return x
    if x.requires_grad:
        return _AllReduceSumWithGrad.apply(x)
    return all_reduce_sum_no_grad(x)


__all__ += ["all_reduce_with_grad"]
