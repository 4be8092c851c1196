"""ContrastiveLoss, the consolidation's SimCLRLoss and nt_xent_loss, driven like the legacy trainers."""

import math

import pytest
import torch

import embedloss
from embedloss import functional as EF
from embedloss.compat import (
    ContrastiveLoss,
    DecoupledContrastiveLoss,
    DecoupledLoss,
    SimCLRLoss,
    nt_xent_loss,
)
from embedloss.metrics import recall_at_k
from embedloss.ops import labels_from_match_ids

from .helpers import assert_same, trainer_batch

IDS = ["a", "b", "a", "c", "b", "d"]
KEYS = {"loss", "loss_v2t", "loss_t2v", "v2t_accuracy", "t2v_accuracy", "accuracy", "recalls"}


def test_infonce_is_clip_with_match_ids_as_labels():
    batch = trainer_batch(match_ids=IDS, indices=torch.arange(6))
    out = ContrastiveLoss(temperature=0.1, add_projection=False)(**batch)
    assert set(out) == KEYS
    v, t = batch["vision_features"], batch["text_features"]
    new = embedloss.CLIPLoss(temperature=0.1).compute(v, t, labels_from_match_ids(IDS))
    assert_same(out["loss"], new.loss, (v, t))
    assert out["loss_v2t"] == pytest.approx(new.terms["loss_image_to_text"].item())
    assert out["loss_t2v"] == pytest.approx(new.terms["loss_text_to_image"].item())


def test_multi_positive_targets_are_deterministic():
    loss = ContrastiveLoss(add_projection=False)
    batch = trainer_batch(match_ids=["x", "x", "x", "y", "y", "z"])
    values = {loss(**batch)["loss"].item() for _ in range(5)}
    assert len(values) == 1  # the legacy class drew one positive at random


def test_accuracy_and_recalls_are_retrieval_metrics():
    batch = trainer_batch(n=12, match_ids=[i % 5 for i in range(12)])
    out = ContrastiveLoss(add_projection=False)(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    ref = recall_at_k(
        v.detach(), t.detach(), k=(1, 5, 10), labels=labels_from_match_ids(batch["match_ids"])
    )
    assert out["v2t_accuracy"].item() == pytest.approx(ref["query_to_key_recall@1"])
    assert out["t2v_accuracy"].item() == pytest.approx(ref["key_to_query_recall@1"])
    assert out["accuracy"].item() == pytest.approx(ref["recall@1"])
    for k in (1, 5, 10):
        assert out["recalls"][f"v2t_recall@{k}"].item() == pytest.approx(
            ref[f"query_to_key_recall@{k}"]
        )
        assert out["recalls"][f"t2i_recall@{k}"] == out["recalls"][f"t2v_recall@{k}"]
        assert out["recalls"][f"avg_recall@{k}"].item() == pytest.approx(ref[f"recall@{k}"])


def test_accuracy_counts_a_positive_ranked_first():
    # Independent check: orthogonal matched pairs are retrieved perfectly, shuffled ones never.
    v = torch.eye(4, dtype=torch.float64)
    out = ContrastiveLoss(add_projection=False)(vision_features=v, text_features=v)
    assert out["accuracy"].item() == 1.0
    out = ContrastiveLoss(add_projection=False)(vision_features=v, text_features=v.roll(1, 0))
    assert out["v2t_accuracy"].item() == 0.0 and out["recalls"]["v2t_recall@10"].item() == 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nt_xent_is_simclr_and_reports_each_modality(reduction):
    batch = trainer_batch(match_ids=IDS)
    out = ContrastiveLoss(
        temperature=0.2, loss_type="nt_xent", reduction=reduction, add_projection=False
    )(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    labels = labels_from_match_ids(IDS)
    ref = EF.simclr_loss(v, t, temperature=0.2, labels=labels, reduction=reduction)
    assert_same(out["loss"].sum(), ref.sum(), (v, t))
    per = EF.simclr_loss(v, t, temperature=0.2, labels=labels, reduction="none")
    assert out["loss_v2t"].item() == pytest.approx(per[:6].mean().item())
    assert out["loss_t2v"].item() == pytest.approx(per[6:].mean().item())


def test_supervised_uses_class_labels_and_equals_supcon_over_both_modalities():
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    batch = trainer_batch(match_ids=IDS, labels=labels)
    out = ContrastiveLoss(temperature=0.1, loss_type="supervised", add_projection=False)(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    assert_same(out["loss"], EF.simclr_loss(v, t, temperature=0.1, labels=labels), (v, t))
    # Without class labels the match_ids decide the positives.
    batch.pop("labels")
    out = ContrastiveLoss(temperature=0.1, loss_type="supervised", add_projection=False)(**batch)
    ids = labels_from_match_ids(IDS)
    assert_same(out["loss"], EF.simclr_loss(v, t, temperature=0.1, labels=ids), (v, t))


def test_infonce_reduction_none_gives_one_value_per_pair():
    out = ContrastiveLoss(reduction="none", add_projection=False)(**trainer_batch())
    assert out["loss"].shape == (6,)


def test_projection_heads_feed_the_loss():
    torch.manual_seed(0)
    loss = ContrastiveLoss(input_dim=8, projection_dim=4).double()
    batch = trainer_batch(match_ids=IDS)
    v, t = batch["vision_features"], batch["text_features"]
    pv, pt = loss.projection["vision"](v), loss.projection["text"](t)
    ref = embedloss.CLIPLoss().compute(pv, pt, labels_from_match_ids(IDS)).loss
    assert_same(loss(**batch)["loss"], ref, (v, t))


def test_consolidation_simclr_loss_takes_use_projection():
    loss = SimCLRLoss(input_dim=8, projection_dim=3, loss_type="nt_xent")
    assert isinstance(loss, ContrastiveLoss) and loss.projection["text"][-1].out_features == 3
    assert SimCLRLoss(use_projection=False).projection is None
    with pytest.raises(
        ValueError, match="loss_type must be one of 'infonce', 'nt_xent', 'supervised'"
    ):
        SimCLRLoss(loss_type="triplet", use_projection=False)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent_loss_function_is_simclr_loss(reduction):
    v, t = trainer_batch()["vision_features"], trainer_batch()["text_features"]
    ref = EF.simclr_loss(v, t, temperature=0.07, reduction=reduction)
    assert_same(nt_xent_loss(v, t, reduction=reduction).sum(), ref.sum(), (v, t))
    assert nt_xent_loss(v, t, temperature=0.5, reduction=reduction).shape == ref.shape


DEC_KEYS = {
    "loss",
    "cross_modal_loss",
    "instance_loss",
    "v2t_loss",
    "t2v_loss",
    "vision_inst_loss",
    "text_inst_loss",
    "v2t_accuracy",
    "t2v_accuracy",
    "accuracy",
}


@pytest.mark.parametrize("cls", [DecoupledContrastiveLoss, DecoupledLoss])
def test_decoupled_is_clip_plus_weighted_instance_discrimination(cls):
    batch = trainer_batch(match_ids=IDS)
    out = cls(temperature=0.1, lambda_v=0.3, lambda_t=0.7)(**batch)
    assert set(out) == DEC_KEYS
    v, t = batch["vision_features"], batch["text_features"]
    cross = embedloss.CLIPLoss(temperature=0.1)(v, t, labels_from_match_ids(IDS))
    inst_v = EF.info_nce_loss(v, v, temperature=0.1)
    inst_t = EF.info_nce_loss(t, t, temperature=0.1)
    assert_same(out["loss"], cross + 0.3 * inst_v + 0.7 * inst_t, (v, t))
    assert out["cross_modal_loss"].item() == pytest.approx(cross.item())
    assert out["instance_loss"].item() == pytest.approx((inst_v + inst_t).item() / 2)
    assert out["vision_inst_loss"].item() == pytest.approx(inst_v.item())


def test_decoupled_instance_term_closed_form():
    # Orthonormal embeddings: self-similarity 1/τ, every other 0, for each modality.
    n, tau = 5, 0.5
    x = torch.eye(n, dtype=torch.float64)
    out = DecoupledContrastiveLoss(temperature=tau)(vision_features=x, text_features=x)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + n - 1))
    assert out["vision_inst_loss"].item() == pytest.approx(expected)
    assert out["cross_modal_loss"].item() == pytest.approx(expected)
    assert out["loss"].item() == pytest.approx(2 * expected)


def test_decoupled_reduction_none_is_per_sample_and_checks_weights():
    out = DecoupledContrastiveLoss(reduction="none")(**trainer_batch())
    assert out["loss"].shape == (6,)
    with pytest.raises(ValueError, match="lambda_v must be a finite number in"):
        DecoupledContrastiveLoss(lambda_v=-1.0)
