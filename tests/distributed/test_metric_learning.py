"""Metric-learning and text losses under torch.distributed (real gloo processes) vs. one process.

As ``harness.py`` (whose process group, port and split helpers this reuses): every rank holds
an uneven slice of the same batch and runs with ``gather_distributed=True``. The contract: the
mean over ranks of the losses is the single-process loss; each rank's input gradient is
world × the single-process gradient of its slice; a loss's own parameters (ArcFace's centres,
Proxy Anchor's proxies) are ordinary DDP parameters: the mean over ranks of their gradients
(what DDP's all-reduce computes) is the single-process gradient.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch

from embedloss import create_loss, create_loss_from_config
from tests.distributed.harness import (
    _split,
    assert_matches_single,
    pair,
    process_group,
    spawn_ranks,
)

Build = Callable[[int, torch.Generator], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]


def labelled(n: int, g: torch.Generator, d: int = 6, classes: int = 3):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x, torch.randint(0, classes, (n,), generator=g)), {}


def scored(n: int, g: torch.Generator, d: int = 6):
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + torch.randn(n, d, generator=g, dtype=torch.float64)
    return (a, b, torch.randint(0, 4, (n,), generator=g).double()), {}


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    build: Build = labelled
    steps: int = 1
    tag: str = ""

    @property
    def id(self) -> str:
        extra = [f"{k}={v}" for k, v in sorted(self.kwargs.items())] + [self.tag] * bool(self.tag)
        return f"{self.name}[{','.join(extra)}]"

    def make(self, distributed: bool) -> torch.nn.Module:
        if self.name == "matryoshka":  # the wrapped loss gathers
            inner = {**self.kwargs["loss"], "gather_distributed": distributed}
            return create_loss_from_config({**self.kwargs, "name": "matryoshka", "loss": inner})
        return create_loss(self.name, **self.kwargs, gather_distributed=distributed)


PROXIES = partial(labelled, classes=4)
CASES = [
    Case("triplet", {"mining": "batch_hard"}),
    Case("triplet", {"mining": "batch_all", "margin": 0.5}),
    Case("triplet", {"mining": "semi_hard", "distance": "euclidean", "chunk_size": 2}),
    Case("contrastive_margin", {"squared": False}),
    Case("contrastive_margin", {"chunk_size": 3, "distance": "squared_euclidean"}),
    Case("multi_similarity", {"beta": 10.0}),
    Case("multi_similarity", {"mining": False, "chunk_size": 2}),
    Case("circle", {"gamma": 32.0}),
    Case("arcface", {"num_classes": 4, "embedding_dim": 6, "scale": 8.0, "seed": 0}, PROXIES),
    Case(
        "arcface",
        {"num_classes": 4, "embedding_dim": 6, "sub_centers": 2, "seed": 1, "reduction": "sum"},
        PROXIES,
    ),
    Case("cosface", {"num_classes": 4, "embedding_dim": 6, "scale": 8.0, "seed": 2}, PROXIES),
    Case("proxy_anchor", {"num_classes": 4, "embedding_dim": 6, "alpha": 8.0, "seed": 3}, PROXIES),
    Case("cosent", {"scale": 5.0}, scored),
    Case("angle", {"ibn_scale": 4.0, "angle_scale": 5.0}, scored),
    Case("matryoshka", {"loss": {"name": "multi_similarity"}, "dims": (6, 3)}),
    Case(
        "moco",
        {"queue_size": 24, "in_batch_negatives": True, "queue_positives": True},
        partial(pair, labels=True),
        steps=3,
    ),
]


def run_case(case: Case, sizes: list[int], rank: int | None) -> dict[str, Any]:
    """Loss values, input gradients and parameter gradients; ``rank=None``: one process."""
    g = torch.Generator().manual_seed(1234)
    results: dict[str, Any] = {"losses": [], "grads": [], "params": []}
    loss = case.make(rank is not None).double()  # float64 parameters: exact comparisons
    loss.train()
    for _ in range(case.steps):
        tensors, named = case.build(sum(sizes), g)
        if rank is not None:
            tensors = tuple(_split(t, sizes, rank) for t in tensors)
            named = {k: _split(v, sizes, rank) for k, v in named.items()}
        leaves = tuple(t.clone().requires_grad_(t.dim() > 1) for t in tensors)
        loss.zero_grad()
        out = loss(*leaves, **named)
        out.backward()
        results["losses"].append(out.detach())
        results["grads"].append([t.grad for t in leaves if t.dim() > 1])
        results["params"].append([p.grad.clone() for p in loss.parameters() if p.grad is not None])
    return results


def _worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    with process_group(rank, world, port, timeout_s=120):
        results = {case.id: run_case(case, sizes, rank) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_case_ids_are_unique_and_cover_the_new_families():
    assert len({c.id for c in CASES}) == len(CASES)
    from embedloss import list_losses

    assert {c.name for c in CASES} >= set(list_losses(category="metric_learning"))
    assert {c.name for c in CASES} >= set(list_losses(category="text"))


@pytest.fixture(
    scope="module", params=[[3, 5], [2, 4, 1], [4, 0, 3]], ids=["world2", "world3", "empty_rank"]
)
def outcome(request, tmp_path_factory):
    sizes = request.param
    out_dir = str(tmp_path_factory.mktemp("dist_ml"))
    return sizes, spawn_ranks(_worker, sizes, out_dir)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_single_process(case, outcome):
    sizes, ranks = outcome
    single = run_case(case, sizes, rank=None)
    assert_matches_single(case.id, single, ranks, sizes)
    for step in range(case.steps):  # the proxies: ordinary parameters, averaged by DDP
        for i, param_grad in enumerate(single["params"][step]):
            averaged = torch.stack([r[case.id]["params"][step][i] for r in ranks]).mean(0)
            torch.testing.assert_close(averaged, param_grad, rtol=1e-9, atol=1e-10)
