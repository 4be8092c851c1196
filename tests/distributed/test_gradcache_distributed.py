"""GradCache under DDP with ``gather_distributed`` losses (real gloo processes) vs. one process.

Every rank holds an uneven slice of the same full batch and runs ``GradCache(...).step`` with
its encoders wrapped in ``DistributedDataParallel`` and the loss gathering embeddings across
ranks; the parent runs plain full-batch backprop on one process. The gather's backward gives
each rank world_size × its share of the gradient with respect to its cached embeddings, the
replay turns that into world_size × its share of the encoder gradient, and DDP's averaging
(one all-reduce per encoder, on its last micro-batch) divides by world_size: every rank ends
with exactly the single-process encoder gradient. The loss's own parameters are not wrapped in
DDP: each rank holds the gradient of its own loss, whose mean over ranks is the single-process
gradient (as for the loss without caching).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import embedloss
from embedloss import GradCache
from tests.distributed.harness import _split, process_group, spawn_ranks
from tests.test_gradcache import conv, mlp

MICRO = 2
CASES = ("pair", "shared", "moco")
STEPS = {"pair": 1, "shared": 1, "moco": 2}


def _build(name: str, distributed: bool) -> tuple[list[nn.Module], nn.Module]:
    """Encoders and loss, initialised identically on every process."""
    torch.manual_seed(0)
    if name == "pair":  # two encoders, learnable temperature
        loss = embedloss.CLIPLoss(learnable_temperature=True, gather_distributed=distributed)
        return [conv(), mlp()], loss.double()
    enc = mlp()
    if name == "shared":  # two views through one encoder, labels
        return [enc, enc], embedloss.SimCLRLoss(temperature=0.3, gather_distributed=distributed)
    loss = embedloss.MoCoLoss(
        queue_size=32, in_batch_negatives=True, gather_distributed=distributed
    )
    return [enc, enc], loss.double()


def _batch(name: str, n: int, g: torch.Generator) -> tuple[list[torch.Tensor], dict[str, Any]]:
    x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    if name == "pair":
        return [torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), x], {}
    view = x + 0.3 * torch.randn(n, 7, generator=g, dtype=torch.float64)
    labels = {"labels": torch.randint(0, 3, (n,), generator=g)} if name == "shared" else {}
    return [x, view], labels


def _counting_hook(calls, bucket):  # unannotated: DDP checks the annotations it finds
    """DDP's default all-reduce (average), counted."""
    calls.append(1)
    return allreduce_hook(None, bucket)


def run_case(name: str, sizes: list[int], rank: int | None) -> dict[str, Any]:
    """Per step: loss, encoder and loss gradients, loss buffers, all-reduces per DDP module."""
    distributed = rank is not None
    encoders, loss = _build(name, distributed)
    unique = list(dict.fromkeys(encoders))
    calls: dict[int, list[int]] = {id(e): [] for e in unique}
    if distributed:
        wrapped = {id(e): DistributedDataParallel(e) for e in unique}
        for key, ddp in wrapped.items():
            ddp.register_comm_hook(calls[key], _counting_hook)
        encoders = [wrapped[id(e)] for e in encoders]
    g = torch.Generator().manual_seed(1234)
    out: dict[str, list[Any]] = {k: [] for k in ("loss", "grads", "loss_grads", "buffers", "syncs")}
    for _ in range(STEPS[name]):
        for m in (*unique, loss):
            m.zero_grad(set_to_none=True)
        inputs, kwargs = _batch(name, sum(sizes), g)
        if distributed:
            inputs = [_split(x, sizes, rank) for x in inputs]
            kwargs = {k: _split(v, sizes, rank) for k, v in kwargs.items()}
            value = GradCache(encoders, loss, micro_batch_size=MICRO).step(*inputs, **kwargs).loss
        else:  # the reference: plain full-batch backprop
            value = loss(*[enc(x) for enc, x in zip(encoders, inputs, strict=True)], **kwargs)
            value.backward()
        out["loss"].append(value.detach())
        out["grads"].append([p.grad for e in unique for p in e.parameters()])
        out["loss_grads"].append([p.grad for p in loss.parameters()])
        out["buffers"].append({k: v.clone() for k, v in loss.state_dict().items()})
        out["syncs"].append([len(c) for c in calls.values()])
        for c in calls.values():
            c.clear()
    return out


def _worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    with process_group(rank, world, port, timeout_s=60):
        results = {name: run_case(name, sizes, rank) for name in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[[3, 5], [2, 4, 1]], ids=["world2", "world3"])
def outcome(request, tmp_path_factory):
    sizes = request.param
    out_dir = str(tmp_path_factory.mktemp("gradcache"))
    return sizes, spawn_ranks(_worker, sizes, out_dir)


@pytest.mark.parametrize("name", CASES)
def test_ddp_gradients_equal_single_process_backprop(name, outcome):
    sizes, ranks = outcome
    assert_matches_single(name, sizes, ranks)


def assert_matches_single(name: str, sizes: list[int], ranks: list[dict[str, Any]]) -> None:
    """Per step: mean loss, every rank's encoder gradients (one DDP all-reduce per encoder),
    the loss's buffers and the mean of the loss's gradients equal plain backprop in one
    process on the concatenated batch."""
    single = run_case(name, sizes, rank=None)
    for step in range(STEPS[name]):
        mean_loss = torch.stack([r[name]["loss"][step] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, single["loss"][step], rtol=1e-10, atol=1e-10)
        for rank, r in enumerate(ranks):
            # micro-batches on this rank: uneven, yet one all-reduce per DDP module per step
            assert r[name]["syncs"][step] == [1] * len(r[name]["syncs"][step]), rank
            got, expected = r[name]["grads"][step], single["grads"][step]
            assert len(got) == len(expected) > 0
            for gr, ex in zip(got, expected, strict=True):
                torch.testing.assert_close(gr, ex, rtol=1e-10, atol=1e-10)
            for key, buffer in single["buffers"][step].items():  # the MoCo queue
                torch.testing.assert_close(
                    r[name]["buffers"][step][key], buffer, rtol=0, atol=1e-12
                )
        for i, expected in enumerate(single["loss_grads"][step]):
            mean_grad = torch.stack([r[name]["loss_grads"][step][i] for r in ranks]).mean(0)
            torch.testing.assert_close(mean_grad, expected, rtol=1e-10, atol=1e-10)


def test_the_cases_cover_caching_on_every_rank():
    # sizes [2, 4, 1] with micro-batches of 2: one, two and one micro-batch(es) per input.
    assert [-(-n // MICRO) for n in (2, 4, 1)] == [1, 2, 1]
    assert "labels" in _batch("shared", 4, torch.Generator())[1]
