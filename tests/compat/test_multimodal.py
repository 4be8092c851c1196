"""CLIPStyleLoss and the consolidation's CLIPLoss, driven like the legacy trainers."""

import pytest
import torch
import torch.nn.functional as F

import embedloss
from embedloss import functional as EF
from embedloss.compat import (
    CLIPLoss,
    CLIPStyleLoss,
    FeatureConsistencyLoss,
    MixedMultimodalLoss,
    MultiModalMixedContrastiveLoss,
    SimpleContrastiveLoss,
    compute_recall_at_k,
)
from embedloss.ops import labels_from_match_ids

from .helpers import assert_same, trainer_batch

IDS = [7, 3, 7, 1, 3, 2]
KEYS = {
    "loss",
    "v2t_loss",
    "t2v_loss",
    "v2t_accuracy",
    "t2v_accuracy",
    "accuracy",
    "mean_similarity",
    "matched_similarity",
    "similarity_gap",
    "recalls",
}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_clip_style_loss_is_clip(smoothing):
    batch = trainer_batch(match_ids=IDS)
    out = CLIPStyleLoss(temperature=0.05, label_smoothing=smoothing)(**batch)
    assert set(out) == KEYS
    v, t = batch["vision_features"], batch["text_features"]
    new = embedloss.CLIPLoss(temperature=0.05, label_smoothing=smoothing)
    ref = new.compute(v, t, labels_from_match_ids(IDS))
    assert_same(out["loss"], ref.loss, (v, t))
    assert out["v2t_loss"].item() == pytest.approx(ref.terms["loss_image_to_text"].item())
    assert out["t2v_loss"].item() == pytest.approx(ref.terms["loss_text_to_image"].item())


def test_label_smoothing_does_not_depend_on_earlier_batches():
    # The legacy cache keyed smoothed targets by batch size: a second batch reused the first's.
    loss = CLIPStyleLoss(label_smoothing=0.2)
    first, second = trainer_batch(seed=1, match_ids=IDS), trainer_batch(seed=2)
    loss(**first)
    fresh = CLIPStyleLoss(label_smoothing=0.2)(**second)["loss"]
    assert loss(**second)["loss"].item() == fresh.item()


def test_similarity_metrics_keep_the_legacy_logit_scale():
    batch = trainer_batch(match_ids=IDS)
    out = CLIPStyleLoss(temperature=0.1)(**batch)
    v = F.normalize(batch["vision_features"].detach(), dim=1)
    t = F.normalize(batch["text_features"].detach(), dim=1)
    logits = v @ t.T / 0.1
    assert out["mean_similarity"].item() == pytest.approx(logits.mean().item(), rel=1e-5)
    assert out["matched_similarity"].item() == pytest.approx(logits.diag().mean().item(), rel=1e-5)
    gap = logits.diag().mean() - logits.mean()
    assert out["similarity_gap"].item() == pytest.approx(gap.item(), rel=1e-5)


def test_reduction_none_and_sum():
    batch = trainer_batch()
    none = CLIPStyleLoss(reduction="none")(**batch)["loss"]
    total = CLIPStyleLoss(reduction="sum")(**batch)["loss"]
    assert none.shape == (6,) and total.item() == pytest.approx(none.sum().item())


def test_consolidation_clip_loss_argument_order():
    loss = CLIPLoss(0.2, 0.1)
    assert isinstance(loss, CLIPStyleLoss)
    assert loss.loss.temperature == 0.2 and loss.loss.label_smoothing == 0.1
    batch = trainer_batch(match_ids=IDS)
    assert set(loss(**batch)) == KEYS


MIXED_KEYS = {
    "loss",
    "loss_infonce",
    "loss_nt_xent",
    "loss_supervised",
    "v2t_accuracy",
    "t2v_accuracy",
    "accuracy",
    "recalls",
}


@pytest.mark.parametrize("cls", [MultiModalMixedContrastiveLoss, MixedMultimodalLoss])
def test_mixed_is_mixed_multimodal_with_match_ids_and_class_labels(cls):
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    batch = trainer_batch(match_ids=IDS, labels=labels)
    out = cls(temperature=0.1, loss_weights={"infonce": 0.5, "supervised": 0.2})(**batch)
    assert set(out) == MIXED_KEYS
    v, t = batch["vision_features"], batch["text_features"]
    new = embedloss.MixedMultimodalLoss(
        temperature=0.1, clip_weight=0.5, nt_xent_weight=0.3, supcon_weight=0.2
    )
    ref = new.compute(v, t, labels, labels_from_match_ids(IDS))
    assert_same(out["loss"], ref.loss, (v, t))
    assert out["loss_supervised"].item() == pytest.approx(ref.terms["loss_supcon"].item())
    ids = labels_from_match_ids(IDS)
    clip = EF.clip_loss(v, t, temperature=0.1, labels=ids)
    simclr = EF.simclr_loss(v, t, temperature=0.1, labels=ids)
    supcon = EF.supcon_loss(torch.stack([v, t], 1), labels, temperature=0.1)
    assert_same(out["loss"], 0.5 * clip + 0.3 * simclr + 0.2 * supcon, (v, t))


def test_mixed_without_labels_drops_the_supcon_part():
    batch = trainer_batch()
    out = MultiModalMixedContrastiveLoss()(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    ref = 0.4 * EF.clip_loss(v, t) + 0.3 * EF.simclr_loss(v, t, temperature=0.07)
    assert_same(out["loss"], ref, (v, t))
    assert out["loss_supervised"].item() == 0.0
    with pytest.raises(ValueError, match="loss_weights keys must be among"):
        MultiModalMixedContrastiveLoss(loss_weights={"contrastive": 1.0})


def test_consolidation_mixed_argument_order_and_heads():
    loss = MixedMultimodalLoss(0.07, None, "mean", 8, 4, True)
    assert loss.projection["vision"][-1].out_features == 4


SIMPLE_KEYS = {
    "loss",
    "infonce_loss",
    "mse_loss",
    "v2t_loss",
    "t2v_loss",
    "accuracy",
    "pos_sim",
    "neg_sim",
    "separation",
    "temperature",
    "decor_loss",
}


def test_simple_contrastive_is_clip_plus_alignment_mse_plus_decor():
    batch = trainer_batch()
    decor = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out = SimpleContrastiveLoss(temperature=0.2)(**batch, decor_loss=decor)
    assert set(out) == SIMPLE_KEYS
    v, t = batch["vision_features"], batch["text_features"]
    mse = F.mse_loss(F.normalize(v, dim=1), F.normalize(t, dim=1))
    ref = EF.clip_loss(v, t, temperature=0.2) + 0.5 * mse + 0.2 * decor
    assert_same(out["loss"], ref, (v, t, decor))
    assert out["mse_loss"].item() == pytest.approx(mse.item())
    assert out["decor_loss"].item() == pytest.approx(0.7)


def test_simple_contrastive_aligns_every_positive_once_per_anchor():
    ids = ["a", "a", "b", "c", "c", "c"]
    batch = trainer_batch(match_ids=ids)
    out = SimpleContrastiveLoss()(**batch)
    v = F.normalize(batch["vision_features"].detach(), dim=1)
    t = F.normalize(batch["text_features"].detach(), dim=1)
    per_anchor = [
        torch.stack([F.mse_loss(v[i], t[j]) for j in range(6) if ids[j] == ids[i]]).mean()
        for i in range(6)
    ]  # slow loop: each anchor's mean over its positives, then the mean over anchors
    assert out["mse_loss"].item() == pytest.approx(torch.stack(per_anchor).mean().item())
    assert out["decor_loss"].item() == 0.0
    with pytest.raises(ValueError, match="decor_loss must be a scalar"):
        SimpleContrastiveLoss()(**batch, decor_loss=torch.ones(2))


def test_compute_recall_at_k_with_and_without_targets():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]])
    r = compute_recall_at_k(sim, K=[1, 2])
    assert r == {
        "v2t_recall@1": pytest.approx(2 / 3),
        "t2i_recall@1": pytest.approx(2 / 3),
        "avg_recall@1": pytest.approx(2 / 3),
        "v2t_recall@2": 1.0,
        "t2i_recall@2": 1.0,
        "avg_recall@2": 1.0,
    }
    # row 1 matches column 0 (a hit); column 0 matches row 1 (row 0 beats it: a miss)
    r = compute_recall_at_k(
        sim, K=[1], v2t_targets=torch.tensor([0, 0, 2]), t2i_targets=torch.tensor([1, 2, 2])
    )
    assert r["v2t_recall@1"] == 1.0 and r["t2i_recall@1"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in r.values())


FC_KEYS = {
    "loss",
    "feature_consistency_loss",
    "vision_consistency_loss",
    "text_consistency_loss",
    "vision_weight",
    "text_weight",
}


@pytest.mark.parametrize("distance", ["cosine", "l2", "l1", "smooth_l1"])
def test_feature_consistency_against_frozen_reference_encoders(distance):
    torch.manual_seed(0)
    enc_v, enc_t = torch.nn.Linear(5, 4).double(), torch.nn.Linear(3, 4).double()
    loss = FeatureConsistencyLoss(
        enc_v, enc_t, vision_weight=2.0, text_weight=0.5, distance_fn=distance
    )
    xv, xt = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():  # the online encoders drift away from the snapshot
        enc_v.weight.add_(0.3)
    v, t = enc_v(xv), enc_t(xt)
    out = loss(vision_features=v, text_features=t, vision_inputs=xv, text_inputs=xt, logits=None)
    assert set(out) == FC_KEYS
    new = embedloss.FeatureConsistencyLoss(distance=distance)
    with torch.no_grad():
        ref_v, ref_t = (
            loss.loss.reference_models["vision"](xv),
            loss.loss.reference_models["text"](xt),
        )
    expected = 2.0 * new(v, ref_v) + 0.5 * new(t, ref_t)
    assert_same(out["loss"], expected, (v, t))
    assert out["text_consistency_loss"].item() == pytest.approx(new(t, ref_t).item())
    assert out["text_consistency_loss"].item() == pytest.approx(
        0.0, abs=1e-12
    )  # text did not drift
    assert out["vision_weight"].item() == 2.0
    assert all(not p.requires_grad for p in loss.loss.reference_models.parameters())
    assert enc_v.weight.requires_grad  # the module passed in is left trainable


def test_feature_consistency_with_one_or_no_reference_model():
    enc = torch.nn.Linear(4, 4)
    x = torch.randn(5, 4)
    out = FeatureConsistencyLoss(reference_text_model=enc)(torch.randn(5, 4), enc(x), text_inputs=x)
    assert (
        out["loss"].item() == pytest.approx(0.0, abs=1e-6)
        and out["vision_consistency_loss"].item() == 0.0
    )
    out = FeatureConsistencyLoss()(torch.randn(5, 4), torch.randn(5, 4))
    assert out["loss"].item() == 0.0
