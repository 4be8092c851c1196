"""Distributed statistics with real processes (gloo on CPU, torch.multiprocessing.spawn).

Each rank holds an uneven slice of one float64 batch, computes a loss with
``distributed=True``/``gather_distributed=True`` and back-propagates; the parent compares with
the single-process computation on the concatenated batch:

* statistic losses (every rank computes the same global statistics): the loss on every rank
  equals the single-process loss, and each rank's gradient on its rows is ``world_size ×`` the
  single-process gradient (what DDP's averaging turns back into the single-process gradient);
* per-row outputs (standardised rows): the losses summed over ranks equal the single-process
  loss and the gradients equal the single-process ones (the adjoint of the all-reduce is right);
* InfoNCE-convention losses (hybrid, negative cosine): the mean over ranks of the losses equals
  the single-process loss, gradients ``world_size ×``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from embedloss.composite import HybridVICRegLoss
from embedloss.ops.statistics import (
    batch_mean,
    correlation,
    covariance,
    cross_correlation,
    standardize,
    variance,
)
from embedloss.self_supervised import (
    DecorrelationLoss,
    barlow_twins_loss,
    decorrelation_loss,
    negative_cosine_loss,
    vicreg_loss,
)
from tests.distributed.harness import _split, free_port, process_group

D = 4


def _weights(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(
        n, D, generator=g, dtype=torch.float64
    )


def _hybrid(a: Tensor, b: Tensor, distributed: bool) -> Tensor:
    loss = HybridVICRegLoss(
        contrastive_steps=0, transition_steps=4, temperature=0.5, gather_distributed=distributed
    ).double()
    loss.update_step(1)  # transition, α = 1/4: both parts carry gradient
    return loss(a, b)


def _decorrelation_module(a: Tensor, b: Tensor, distributed: bool) -> Tensor:
    return DecorrelationLoss(weight=2.0, gather_distributed=distributed)(a, b)


# name -> (fn(a, b, rows_weight, distributed), convention)
Case = Callable[[Tensor, Tensor, Tensor, bool], Tensor]
W_DD, _ = _weights(1)
CASES: dict[str, tuple[Case, str]] = {
    "mean": (lambda a, b, w, dist_: (batch_mean(a, distributed=dist_) * W_DD[0]).sum(), "same"),
    "variance": (lambda a, b, w, dist_: (variance(a, distributed=dist_) * W_DD[1]).sum(), "same"),
    "covariance": (lambda a, b, w, dist_: (covariance(a, distributed=dist_) * W_DD).sum(), "same"),
    "correlation": (
        lambda a, b, w, dist_: (correlation(a, distributed=dist_) * W_DD).sum(),
        "same",
    ),
    "cross_correlation": (
        lambda a, b, w, dist_: (cross_correlation(a, b, distributed=dist_) * W_DD).sum(),
        "same",
    ),
    "standardize": (lambda a, b, w, dist_: (standardize(a, distributed=dist_) * w).sum(), "sum"),
    "vicreg": (
        lambda a, b, w, dist_: vicreg_loss(a, b, eps=0.05, gather_distributed=dist_),
        "same",
    ),
    "barlow_twins": (
        lambda a, b, w, dist_: barlow_twins_loss(a, b, lambda_coeff=0.1, gather_distributed=dist_),
        "same",
    ),
    "decorrelation": (
        lambda a, b, w, dist_: decorrelation_loss(a, gather_distributed=dist_),
        "same",
    ),
    "decorrelation_module": (lambda a, b, w, dist_: _decorrelation_module(a, b, dist_), "same"),
    "hybrid_vicreg": (lambda a, b, w, dist_: _hybrid(a, b, dist_), "mean"),
    "negative_cosine": (
        lambda a, b, w, dist_: negative_cosine_loss(a, b, gather_distributed=dist_),
        "mean",
    ),
}


def _batch(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(n, D, generator=g, dtype=torch.float64) * 0.7 + 0.2
    b = a + 0.4 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return a, b


def _run(a: Tensor, b: Tensor, w: Tensor, distributed: bool) -> dict[str, tuple[Tensor, ...]]:
    out = {}
    for name, (fn, _) in CASES.items():
        ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = fn(ra, rb, w, distributed)
        loss.backward()
        grad_b = torch.zeros_like(rb) if rb.grad is None else rb.grad
        out[name] = (loss.detach(), ra.grad, grad_b)
    return out


def _worker(rank: int, world: int, port: int, sizes: list[int], outdir: str) -> None:
    with process_group(rank, world, port, timeout_s=60):
        a, b = _batch(sum(sizes))
        _, w = _weights(sum(sizes))
        local = (_split(t, sizes, rank) for t in (a, b, w))
        torch.save(_run(*local, True), Path(outdir) / f"rank{rank}.pt")


CONFIGS = {"world2_uneven": [3, 5], "world3_uneven": [2, 1, 4]}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def spawned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    sizes = CONFIGS[request.param]
    outdir = tmp_path_factory.mktemp(request.param)
    mp.spawn(_worker, args=(len(sizes), free_port(), sizes, str(outdir)), nprocs=len(sizes))
    ranks = [torch.load(outdir / f"rank{r}.pt") for r in range(len(sizes))]
    a, b = _batch(sum(sizes))
    _, w = _weights(sum(sizes))
    return sizes, ranks, _run(a, b, w, False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_distributed_equals_single_process_on_the_concatenated_batch(spawned, name: str) -> None:
    sizes, ranks, single = spawned
    world = len(sizes)
    convention = CASES[name][1]
    ref_loss, ref_ga, ref_gb = single[name]
    losses = torch.stack([r[name][0] for r in ranks])
    if convention == "same":
        for loss in losses:
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    elif convention == "sum":
        torch.testing.assert_close(losses.sum(), ref_loss, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(losses.mean(), ref_loss, rtol=1e-10, atol=1e-12)
    scale = 1.0 if convention == "sum" else float(world)
    grad_a = torch.cat([r[name][1] for r in ranks])
    grad_b = torch.cat([r[name][2] for r in ranks])
    torch.testing.assert_close(grad_a, scale * ref_ga, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_b, scale * ref_gb, rtol=1e-9, atol=1e-11)
    assert grad_a.abs().sum() > 0  # the comparison is not vacuous
