"""Run losses on real processes (gloo on CPU) and on one process, and compare.

For every case the full batch is built identically on every rank and split into uneven
per-rank slices. Each rank computes the loss of its slice with ``gather_distributed=True`` and
back-propagates; the parent computes the loss of the whole batch on one process. The contract
(DESIGN §5): the mean over ranks of the returned losses equals the single-process loss, and the
gradient on each rank's slice equals world_size × the single-process gradient of that slice.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedloss import create_loss


@dataclass(frozen=True)
class Case:
    """A loss, its constructor arguments and how to build (and split) its inputs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: build(total_n, generator) -> (positional tensors, keyword tensors), all split along dim 0
    build: (
        Callable[[int, torch.Generator], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]
        | None
    ) = None
    #: number of forward/backward steps (stateful losses such as queues need more than one)
    steps: int = 1
    #: distinguishes cases of one loss with the same kwargs (e.g. "labels")
    tag: str = ""

    @property
    def id(self) -> str:
        extra = ",".join(
            [f"{k}={v}" for k, v in sorted(self.kwargs.items())] + ([self.tag] if self.tag else [])
        )
        return f"{self.name}[{extra}]" if extra else self.name


def pair(n: int, g: torch.Generator, d: int = 6, labels: bool = False):
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (a, b), ({"labels": torch.randint(0, 3, (n,), generator=g)} if labels else {})


def views(n: int, g: torch.Generator, d: int = 5, v: int = 2):
    emb = torch.randn(n, v, d, generator=g, dtype=torch.float64)
    return (emb,), {"labels": torch.randint(0, 3, (n,), generator=g)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def run_case(case: Case, sizes: list[int], rank: int | None) -> dict[str, Any]:
    """Loss value(s), input gradients and the loss's state after each step; ``rank=None`` is
    the single-process reference."""
    g = torch.Generator().manual_seed(1234)
    total = sum(sizes)
    results: dict[str, Any] = {"losses": [], "grads": [], "states": []}
    torch.manual_seed(0)
    distributed = rank is not None
    loss = create_loss(case.name, **case.kwargs, gather_distributed=distributed)
    loss.train()
    for _ in range(case.steps):
        assert case.build is not None
        tensors, named = case.build(total, g)
        if distributed:
            tensors = tuple(_split(t, sizes, rank) for t in tensors)
            named = {k: _split(v, sizes, rank) for k, v in named.items()}
        leaves = tuple(t.clone().requires_grad_(t.is_floating_point()) for t in tensors)
        out = loss(*leaves, **named)
        out.backward()
        results["losses"].append(out.detach())
        results["grads"].append([t.grad for t in leaves if t.is_floating_point()])
        results["states"].append({k: v.clone() for k, v in loss.state_dict().items()})
    return results


@contextmanager
def process_group(
    rank: int, world: int, port: int, timeout_s: float | None = None
) -> Iterator[None]:
    """Join a gloo group of ``world`` single-threaded processes on 127.0.0.1; leave it on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **timeout)
    try:
        yield
        # Every rank done (and its DDP reducers freed) before any tears gloo down: a rank that
        # leaves while a peer's collective is still in flight can abort the peer in C++.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(
    rank: int, world: int, port: int, sizes: list[int], out_dir: str, cases: list[Case]
) -> None:
    with process_group(rank, world, port):
        results = {case.id: run_case(case, sizes, rank) for case in cases}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn_ranks(
    worker: Callable[..., None], sizes: list[int], out_dir: str, *extra: Any
) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, port, sizes, out_dir, *extra)`` on ``len(sizes)`` gloo
    processes; return what each rank saved as ``out_dir/rank{r}.pt``."""
    world = len(sizes)
    mp.spawn(worker, args=(world, free_port(), sizes, out_dir, *extra), nprocs=world, join=True)
    return [
        torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)
    ]


def run_distributed(cases: list[Case], sizes: list[int], out_dir: str) -> list[dict[str, Any]]:
    """Spawn ``len(sizes)`` gloo processes running every case; return each rank's results."""
    return spawn_ranks(_worker, sizes, out_dir, cases)


def assert_matches_single(
    key: str, single: dict[str, Any], ranks: list[dict[str, Any]], sizes: list[int]
) -> None:
    """The contract, per step: the mean over ranks of the losses is the single-process loss
    and each rank's input gradient is world × its slice of the single-process gradient (an
    input without a gradient in one process — a stop-gradient, a teacher — has none on any
    rank)."""
    world = len(sizes)
    for step, expected in enumerate(single["losses"]):
        got = torch.stack([r[key]["losses"][step] for r in ranks]).mean()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        for i, full_grad in enumerate(single["grads"][step]):
            for rank, r in enumerate(ranks):
                local = r[key]["grads"][step][i]
                if full_grad is None:
                    assert local is None, (key, step, i, rank)
                    continue
                torch.testing.assert_close(
                    local, world * _split(full_grad, sizes, rank), rtol=1e-9, atol=1e-10
                )
