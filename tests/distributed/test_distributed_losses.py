"""Loss values and gradients under torch.distributed (real gloo processes) vs. one process."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from embedloss import list_losses
from tests.distributed.harness import (
    Case,
    assert_matches_single,
    pair,
    run_case,
    run_distributed,
    views,
)


def per_query_negatives(n, g, m=3):
    (a, b), _ = pair(n, g)
    return (a, b), {"negative_keys": torch.randn(n, m, a.shape[1], generator=g, dtype=a.dtype)}


CASES = [
    Case("simclr", {"temperature": 0.3}, pair),
    Case("simclr", {"temperature": 0.3}, partial(pair, labels=True), tag="labels"),
    Case("info_nce", {"temperature": 0.2}, pair),
    Case("info_nce", {"temperature": 0.2}, partial(pair, labels=True), tag="labels"),
    Case("info_nce", {"temperature": 0.2}, per_query_negatives, tag="negatives"),
    Case("clip", {"temperature": 0.1}, pair),
    Case(
        "clip",
        {"temperature": 0.1, "label_smoothing": 0.1},
        partial(pair, labels=True),
        tag="labels",
    ),
    Case("clip", {"temperature": 0.1, "learnable_temperature": True}, pair),
    Case("siglip", {"temperature": 0.3, "bias": -1.0}, pair),
    Case("siglip", {"temperature": 0.3, "bias": -1.0}, partial(pair, labels=True), tag="labels"),
    Case("siglip", {"reduction": "sum", "learnable_temperature": False}, pair),
    Case("alignment_uniformity", {"alpha": 1.5, "t": 3.0, "weight": 0.7}, pair),
    Case("alignment_uniformity", {}, partial(pair, labels=True), tag="labels"),
    Case("alignment_uniformity", {"reduction": "sum"}, pair),
]
CASES += [
    Case("supcon", {"temperature": 0.2}, views),
    Case("supcon", {"temperature": 0.2, "contrast_mode": "one"}, views, tag="one"),
    Case("cross_modal_supcon", {"contrast_mode": "all"}, partial(pair, labels=True), tag="labels"),
    Case("cross_modal_supcon", {"contrast_mode": "cross"}, partial(pair, labels=True), tag="cross"),
    Case("dcl", {"temperature": 0.2}, pair),
    Case("dclw", {"temperature": 0.2, "sigma": 0.7}, partial(pair, labels=True), tag="labels"),
    Case("moco", {"queue_size": 24, "in_batch_negatives": True}, pair, steps=3),
    Case(
        "moco",
        {"queue_size": 24, "symmetric": True},
        partial(pair, labels=True),
        steps=3,
        tag="labels",
    ),
    Case("hard_negative", {"strategy": "hard"}, pair),
    Case("dynamic_temperature", {}, pair),
    Case("mixed_multimodal", {}, partial(pair, labels=True), tag="labels"),
    Case("vicreg", {}, pair),
    Case("barlow_twins", {"lambda_coeff": 0.05}, pair),
    Case("decorrelation", {}, pair),
    Case("negative_cosine", {}, pair),
]
REQUIRED = {
    "clip",
    "simclr",
    "info_nce",
    "supcon",
    "dcl",
    "siglip",
    "vicreg",
    "barlow_twins",
    "moco",
}


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def test_every_required_loss_has_a_case():
    assert {c.name for c in CASES} >= REQUIRED
    assert set(list_losses()) >= REQUIRED


@pytest.fixture(
    scope="module", params=[[3, 5], [2, 4, 1], [4, 0, 3]], ids=["world2", "world3", "empty_rank"]
)
def outcome(request, tmp_path_factory):
    sizes = request.param
    ranks = run_distributed(CASES, sizes, str(tmp_path_factory.mktemp("dist")))
    return sizes, ranks


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_single_process(case, outcome):
    # negative_cosine's target is a stop-gradient input: no gradient anywhere
    sizes, ranks = outcome
    assert_matches_single(case.id, run_case(case, sizes, rank=None), ranks, sizes)
