"""The tiled core under torch.distributed: gathered keys, uneven ranks, the DDP contract.

Every distributed case of the shared harness whose loss takes ``chunk_size`` runs on two gloo
processes with tiles of 2 rows (so each rank's slice spans several tiles, with a remainder) and
is compared with the *dense* single-process loss on the whole batch: the mean over ranks of the
losses equals it, and each rank's gradient is world_size × its slice of the single gradient.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest

from embedloss.registry import loss_info
from tests.distributed.harness import assert_matches_single, run_case, run_distributed
from tests.distributed.test_distributed_losses import CASES

SIZES = [3, 5]
TILED = [
    replace(c, kwargs={**c.kwargs, "chunk_size": 2})
    for c in CASES
    if "chunk_size" in inspect.signature(loss_info(c.name).cls).parameters
]


def test_the_tiled_cases_cover_the_core_users():
    assert {"simclr", "clip", "info_nce"} <= {c.name for c in TILED}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(TILED, SIZES, str(tmp_path_factory.mktemp("tiled")))


@pytest.mark.parametrize("case", TILED, ids=[c.id for c in TILED])
def test_tiled_distributed_matches_dense_single_process(case, ranks):
    dense = replace(case, kwargs={**case.kwargs, "chunk_size": None})
    assert_matches_single(case.id, run_case(dense, SIZES, rank=None), ranks, SIZES)
