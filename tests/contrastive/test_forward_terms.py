"""The contrastive losses' generated ``forward``: the loss of ``compute``, no logging work."""

import pytest
import torch

import embedloss.base.base_loss as base_loss
import embedloss.contrastive.dcl as dcl
import embedloss.contrastive.dynamic_temperature as dynamic_temperature
from embedloss import (
    DCLLoss,
    DCLWLoss,
    DynamicTemperatureLoss,
    HardNegativeLoss,
    InfoNCELoss,
    MoCoLoss,
    NNCLRLoss,
    SimCLRLoss,
)
from tests.helpers import randn64

LOSSES = [
    lambda: SimCLRLoss(),
    lambda: InfoNCELoss(),
    lambda: DCLLoss(),
    lambda: DCLWLoss(),
    lambda: HardNegativeLoss(strategy="hard"),
    lambda: DynamicTemperatureLoss(),
    lambda: DynamicTemperatureLoss(schedule="cosine"),
    lambda: MoCoLoss(queue_size=16, in_batch_negatives=True, symmetric=True),
    lambda: NNCLRLoss(queue_size=16),
]


def _forbid(*_args, **_kwargs):
    raise AssertionError("forward built logging terms")


@pytest.mark.parametrize("make", LOSSES)
def test_forward_is_compute_loss_without_terms(make, monkeypatch):
    a, b = randn64(6, 5, seed=1), randn64(6, 5, seed=2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    by_compute, by_forward = make(), make()
    for step in range(2):  # the second call meets a filled queue (MoCo, NNCLR)
        expected = by_compute.compute(a, b, labels=labels).loss
        with monkeypatch.context() as patch:
            patch.setattr(base_loss, "detached_terms", _forbid)
            loss = by_forward(a, b, labels=labels)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0, msg=f"step {step}")
    for (name, x), (_, y) in zip(
        by_compute.state_dict().items(), by_forward.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)  # forward enqueues too


def test_moco_forward_with_labels_and_queue_positives_matches_compute():
    make = lambda: MoCoLoss(queue_size=16, queue_positives=True)  # noqa: E731
    q, k = randn64(4, 5, seed=3), randn64(4, 5, seed=4)
    labels = torch.tensor([0, 1, 0, 1])
    by_compute, by_forward = make(), make()
    for _ in range(3):
        torch.testing.assert_close(
            by_forward(q, k, labels), by_compute.compute(q, k, labels).loss, rtol=0, atol=0
        )


def test_dcl_forward_skips_the_cosine_of_its_terms(monkeypatch):
    loss = DCLLoss(normalize=False)
    a, b = randn64(4, 3, seed=5), randn64(4, 3, seed=6)
    expected = loss.compute(a, b)
    monkeypatch.setattr(dcl, "l2_normalize", _forbid)
    torch.testing.assert_close(loss(a, b), expected.loss, rtol=0, atol=0)
    cosine = torch.nn.functional.cosine_similarity(a, b).mean()
    assert expected.terms["positive_similarity"].item() == pytest.approx(cosine.item(), rel=1e-6)


def test_cosine_schedule_forward_computes_no_similarity_gap(monkeypatch):
    loss = DynamicTemperatureLoss(schedule="cosine")
    loss.update_step(3, 10)
    a, b = randn64(5, 4, seed=7), randn64(5, 4, seed=8)
    expected = loss.compute(a, b)
    assert set(expected.terms) >= {"similarity_gap", "positive_similarity"}
    monkeypatch.setattr(dynamic_temperature, "similarity_gap", _forbid)
    torch.testing.assert_close(loss(a, b), expected.loss, rtol=0, atol=0)
