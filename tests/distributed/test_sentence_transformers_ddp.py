"""``EmbedlossLoss`` under DDP (real gloo processes) vs. one process on the concatenated batch.

sentence-transformers' trainer wraps only the model in ``DistributedDataParallel``
(``loss.model`` is replaced by the wrapped model); the embedloss loss's own parameters — a
learnable τ, SigLIP's bias — are optimised too but DDP never sees them. ``EmbedlossLoss``
averages their gradients over ranks, so they stay equal on every rank and take the step one
process takes on the whole batch. The model here is a tiny module standing in for a
``SentenceTransformer`` (the trainer itself is not needed to reproduce what it wraps); cases
cover the plain path, the cached path (``micro_batch_size``, uneven micro-batch counts per
rank, the DDP model inside GradCache's embedding head) and gradient accumulation with
``no_sync()`` on the first micro-step, as Accelerate does.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.distributed.harness import _split, process_group, spawn_ranks

pytest.importorskip("sentence_transformers")

from embedloss.integrations.sentence_transformers import EmbedlossLoss

SIZES = [3, 5]  # micro-batches of 2: two on rank 0, three on rank 1
STEPS = 2
CASES: dict[str, dict[str, Any]] = {
    "info_nce": {"loss": "info_nce", "micro_batch_size": None, "accumulate": 1},
    "siglip_cached": {"loss": "siglip", "micro_batch_size": 2, "accumulate": 1},
    "clip_accumulate": {"loss": "clip", "micro_batch_size": None, "accumulate": 2},
    "info_nce_cached_accumulate": {"loss": "info_nce", "micro_batch_size": 2, "accumulate": 2},
}


class Toy(nn.Module):
    """Stands in for a SentenceTransformer: a features dict in, ``sentence_embedding`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6, dtype=torch.float64)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.linear(features["x"])}


def run_case(name: str, rank: int | None) -> list[dict[str, torch.Tensor]]:
    """Model and loss parameters after each optimiser step (``rank=None``: one process)."""
    case = CASES[name]
    distributed = rank is not None
    torch.manual_seed(0)
    toy = Toy()
    model: nn.Module = DistributedDataParallel(toy) if distributed else toy
    options = {"learnable_temperature": True, "gather_distributed": distributed}
    loss = EmbedlossLoss(
        model, case["loss"], loss_options=options, micro_batch_size=case["micro_batch_size"]
    ).double()
    assert any(p.requires_grad for p in loss.loss.parameters())
    params = [*toy.parameters(), *loss.loss.parameters()]  # what ST's optimiser holds
    optimizer = torch.optim.SGD(params, lr=0.5)
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(case["accumulate"]):
            columns = [torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64) for _ in "ap"]
            if distributed:
                columns = [_split(c, SIZES, rank) for c in columns]
            last = micro == case["accumulate"] - 1
            sync = contextlib.nullcontext() if last or not distributed else model.no_sync()
            with sync:
                value = loss([{"x": c} for c in columns], None)
                (value / case["accumulate"]).backward()
        optimizer.step()
        out.append(
            {
                **{f"model.{k}": v.detach().clone() for k, v in toy.named_parameters()},
                **{f"loss.{k}": v.detach().clone() for k, v in loss.loss.named_parameters()},
            }
        )
    return out


def _worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    with process_group(rank, world, port, timeout_s=30):
        results = {name: run_case(name, rank) for name in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, SIZES, str(tmp_path_factory.mktemp("st_ddp")))


@pytest.mark.parametrize("name", CASES)
def test_loss_parameters_stay_equal_and_match_one_process(name, ranks):
    single = run_case(name, rank=None)
    for step, expected in enumerate(single):
        assert {k for k in expected if k.startswith("loss.")}, "the loss has no parameter"
        for key, value in expected.items():
            first = ranks[0][name][step][key]
            for rank, r in enumerate(ranks):
                got = r[name][step][key]
                assert torch.equal(got, first), (step, key, rank)  # the same on every rank
            torch.testing.assert_close(first, value, rtol=1e-10, atol=1e-12, msg=(step, key))


def test_one_process_is_untouched():
    # No process group: the hooks leave the gradient as the loss computed it.
    torch.manual_seed(0)
    loss = EmbedlossLoss(Toy(), "clip", loss_options={"learnable_temperature": True}).double()
    a, p = (torch.randn(4, 4, dtype=torch.float64) for _ in "ap")
    loss([{"x": a}, {"x": p}], None).backward()
    expected = torch.autograd.grad(
        loss.loss(
            loss.model({"x": a})["sentence_embedding"], loss.model({"x": p})["sentence_embedding"]
        ),
        loss.loss.logit_scale,
    )[0]
    torch.testing.assert_close(loss.loss.logit_scale.grad, expected, rtol=1e-12, atol=0)
