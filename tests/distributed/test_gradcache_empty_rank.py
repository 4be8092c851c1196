"""GradCache under DDP when a rank holds no samples (real gloo processes) vs. one process.

A rank with an empty batch has no micro-batch to cache, yet it must join every collective of
the step: the loss's (the ranks' agreement, the gather of the embeddings and its backward) and
DDP's (one gradient all-reduce per encoder, started by a forward and backward through the DDP
module). It runs each encoder once on its empty input, so the embeddings it passes to the loss
have the right trailing shape, and replays that empty micro-batch with its (0-row) cached
gradient: the backward of a forward through DDP all-reduces a zero gradient, and the mean over
ranks is exactly the gradient of plain backprop on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch

from embedloss import GradCache, SimCLRLoss
from tests.distributed.harness import spawn_ranks
from tests.distributed.test_gradcache_distributed import CASES, _worker, assert_matches_single


@pytest.fixture(scope="module", params=[[5, 0], [0, 3]], ids=["rank1_empty", "rank0_empty"])
def outcome(request, tmp_path_factory):
    sizes = request.param
    return sizes, spawn_ranks(_worker, sizes, str(tmp_path_factory.mktemp("gradcache_empty")))


@pytest.mark.parametrize("name", CASES)
def test_an_empty_rank_joins_the_step(name, outcome):
    sizes, ranks = outcome
    assert_matches_single(name, sizes, ranks)


def test_one_process_still_refuses_an_empty_batch():
    # Without a process group an empty batch is a mistake, not a rank without samples.
    enc = torch.nn.Linear(3, 2)
    cache = GradCache([enc, enc], SimCLRLoss(), micro_batch_size=2)
    with pytest.raises(ValueError, match=r"inputs\[0\] must hold a non-empty batch.*\(0, 3\)"):
        cache.step(torch.randn(0, 3), torch.randn(0, 3))
