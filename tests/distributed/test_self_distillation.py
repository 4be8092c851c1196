"""Self-distillation, clustering and NNCLR losses on real gloo processes vs one process.

Besides the harness's contract (mean over ranks of the losses = the single-process loss, each
rank's gradient = world_size × the single-process gradient of its slice), the state that
depends on the whole batch must agree: after every step each rank holds the single-process
DINO / iBOT centre and NNCLR support set, and the Sinkhorn–Knopp codes of each rank's samples
are the single-process codes of the concatenated batch. Batches are uneven across ranks.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

from embedloss.ops.sinkhorn import sinkhorn_knopp
from tests.distributed.harness import (
    Case,
    _split,
    assert_matches_single,
    pair,
    process_group,
    run_case,
    spawn_ranks,
)


def _multi_crop(n: int, g: torch.Generator, k: int = 5):
    teacher = torch.randn(n, 2, k, generator=g, dtype=torch.float64)
    student = torch.cat(
        [
            teacher + torch.randn(n, 2, k, generator=g, dtype=torch.float64),
            torch.randn(n, 2, k, generator=g, dtype=torch.float64),
        ],
        dim=1,
    )
    return (student, teacher), {}


def _patches(n: int, g: torch.Generator, p: int = 4, k: int = 5):
    teacher = torch.randn(n, p, k, generator=g, dtype=torch.float64)
    student = teacher + torch.randn(n, p, k, generator=g, dtype=torch.float64)
    mask = torch.rand(n, p, generator=g) < 0.5
    mask[0] = False  # an image with nothing masked
    return (student, teacher, mask), {}


def _crops(n: int, g: torch.Generator, k: int = 4, queue: bool = False):
    scores = torch.randn(n, 4, k, generator=g, dtype=torch.float64).tanh()
    tensors = (scores[:, :2], scores[:, 2:])
    if queue:  # each rank holds its part of the queue; together they are the full queue
        tensors += (torch.randn(n, 2, k, generator=g, dtype=torch.float64).tanh(),)
    return tensors, {}


def _embeddings(n: int, g: torch.Generator, d: int = 4):
    return (torch.randn(n, d, generator=g, dtype=torch.float64),), {}


CASES = [
    Case(
        "dino",
        {"output_dim": 5, "center_momentum": 0.6, "teacher_temperature": 0.1},
        _multi_crop,
        steps=3,
    ),
    Case("dino", {"output_dim": 5, "reduction": "sum"}, _multi_crop, steps=2, tag="sum"),
    Case("ibot_patch", {"output_dim": 5, "center_momentum": 0.6}, _patches, steps=3),
    Case("swav", {"epsilon": 0.1}, _crops),
    Case("swav", {"epsilon": 0.1}, partial(_crops, queue=True), tag="queue"),
    Case("koleo", {}, _embeddings),
    Case("nnclr", {"queue_size": 24, "temperature": 0.2}, pair, steps=3),
    Case("nnclr", {"queue_size": 24}, partial(pair, labels=True), steps=3, tag="labels"),
]


def _codes(sizes: list[int], rank: int | None) -> torch.Tensor:
    scores = (
        torch.randn(sum(sizes), 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        * 3
    )
    if rank is not None:
        scores = _split(scores, sizes, rank)
    return sinkhorn_knopp(scores, iterations=4, epsilon=0.05, distributed=rank is not None)


def _worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    with process_group(rank, world, port, timeout_s=60):
        results = {case.id: run_case(case, sizes, rank) for case in CASES}
        results["sinkhorn"] = _codes(sizes, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(
    scope="module", params=[[3, 5], [2, 4, 1], [4, 0, 3]], ids=["world2", "world3", "empty_rank"]
)
def outcome(request, tmp_path_factory):
    sizes = request.param
    out_dir = str(tmp_path_factory.mktemp("distill"))
    return sizes, spawn_ranks(_worker, sizes, out_dir)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_losses_gradients_and_state_match_single_process(case, outcome):
    sizes, ranks = outcome
    single = run_case(case, sizes, rank=None)
    assert_matches_single(case.id, single, ranks, sizes)  # the teacher's inputs: no gradient
    for step in range(case.steps):
        for r in ranks:  # the centre / support set of every rank is the single-process one
            state = r[case.id]["states"][step]
            assert state.keys() == single["states"][step].keys()
            for key, value in single["states"][step].items():
                torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12)


def test_stateful_cases_have_state():
    stateful = {"dino": "center", "ibot_patch": "center", "nnclr": "queue.features"}
    for case in CASES:
        if case.name in stateful:
            state = run_case(case, [4], rank=None)["states"][-1]
            assert state[stateful[case.name]].abs().sum() > 0, case.id


def test_sinkhorn_codes_match_single_process(outcome):
    sizes, ranks = outcome
    single = _codes(sizes, rank=None)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(
            r["sinkhorn"], _split(single, sizes, rank), rtol=1e-12, atol=1e-14
        )
