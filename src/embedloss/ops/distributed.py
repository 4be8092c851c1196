"""Autograd-correct collectives over ``torch.distributed`` (no home-made transport).

``gather_with_grad`` concatenates a tensor from all ranks (uneven first dimensions allowed); its
backward sums the incoming gradient over ranks and returns this rank's slice, so that a loss
computed from gathered keys sends every key its full gradient.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Gathered",
    "all_reduce_max_no_grad",
    "all_reduce_sum_no_grad",
    "describe_structure",
    "gather_with_grad",
    "is_distributed",
    "ranks_agree",
    "world_info",
]


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
    _settle(None)
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max_no_grad(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over ranks, outside autograd (a shared shift)."""
    _settle(None)
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def _all_sizes(n: int, device: torch.device, world: int) -> list[int]:
    _settle(None)
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
    _settle(None)
    if x.requires_grad:
        return _AllReduceSumWithGrad.apply(x)
    return all_reduce_sum_no_grad(x)


__all__ += ["all_reduce_with_grad"]


def describe_structure(value: Any) -> str:
    """What a rank is about to send, without its batch size: kinds, dtypes and trailing shapes.

    Example:
        >>> print(describe_structure({"z": torch.zeros(3, 4), "labels": None, "k": 2}))
        {k: 2, labels: absent, z: float32 (N, 4)}
    """
    if value is None:
        return "absent"
    if isinstance(value, Tensor):
        dims = ", ".join(["N", *map(str, value.shape[1:])]) if value.dim() else ""
        return f"{str(value.dtype).removeprefix('torch.')} ({dims})"
    if isinstance(value, Mapping):
        items = (f"{k}: {describe_structure(v)}" for k, v in sorted(value.items(), key=str))
        return "{" + ", ".join(items) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ", ".join(describe_structure(v) for v in value) + "]"
    return repr(value)


def _first_difference(descriptions: list[dict[str, str]]) -> str:
    keys = sorted({k for d in descriptions for k in d})
    for key in keys:
        values = [d.get(key, "absent") for d in descriptions]
        if len(set(values)) > 1:
            per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            return f"{key} differs ({per_rank})"
    return "the call differs"  # pragma: no cover - equal descriptions hash equally


class _Pending(NamedTuple):
    context: str
    parts: Mapping[str, Any]
    device: torch.device


_PENDING: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "embedloss_pending_agreement", default=None
)


@contextmanager
def ranks_agree(context: str, parts: Mapping[str, Any], device: torch.device) -> Iterator[None]:
    """Run a loss call whose first collective is the ranks' agreement on the call.

    Every rank performs exactly one small all-gather per call, before anything else it sends:
    a 64-bit digest of ``parts`` (the loss's options and the structure of its inputs, see
    :func:`describe_structure`; batch sizes may differ, nothing else may) and whether the rank
    failed before reaching any collective (e.g. its inputs did not validate). It happens at the
    call's first collective (:func:`gather_with_grad`, :func:`all_reduce_with_grad`, ...), or
    on the way out of the block for a call that sent nothing. Ranks that disagree, or a rank
    that failed, would otherwise leave the others waiting in a collective until the
    process-group timeout; instead every rank raises the same ``ValueError``, naming what
    differs on which rank (or the failing rank's error). A no-op without a process group.

    Raises:
        ValueError: On every rank, when the ranks' calls differ or one of them failed.
    """
    world, _ = world_info()
    if world == 1:
        yield
        return
    token = _PENDING.set(_Pending(context, parts, device))
    try:
        yield
    except Exception as err:
        if _PENDING.get() is not None:  # failed before its first collective: tell the others
            _settle(err)
        raise
    else:
        if _PENDING.get() is not None:
            _settle(None)
    finally:
        _PENDING.reset(token)


def _settle(error: BaseException | None) -> None:
    """Perform the pending agreement (see :func:`ranks_agree`); raise if it fails."""
    pending = _PENDING.get()
    if pending is None:
        return
    _PENDING.set(None)
    world, _ = world_info()
    described = {k: describe_structure(v) for k, v in pending.parts.items()}
    text = repr(sorted(described.items())).encode()
    digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
    mine = torch.tensor([digest, int(error is not None)], dtype=torch.long, device=pending.device)
    everyone_digests = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone_digests, mine)
    codes = [tuple(d.tolist()) for d in everyone_digests]
    if len({c[0] for c in codes}) == 1 and not any(c[1] for c in codes):
        return
    report = {
        "parts": described,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, report)
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        rank, message = failed[0]
        reason = f"rank {rank} failed before joining the others: {message}"
    else:
        difference = _first_difference([e["parts"] for e in everyone])
        reason = (
            f"the ranks disagree on what they pass to the loss: {difference}. Every rank must "
            "call it with the same options, input dtypes and embedding sizes (only the batch "
            "size may differ)"
        )
    raise ValueError(f"{pending.context}: {reason}") from error
