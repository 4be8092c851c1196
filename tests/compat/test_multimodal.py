"""CLIPStyleLoss and the consolidation's CLIPLoss, driven like the legacy trainers."""

import pytest
import torch.nn.functional as F

import embedloss
from embedloss.compat import CLIPLoss, CLIPStyleLoss
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
