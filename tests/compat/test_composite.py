"""CombinedLoss and MultitaskLoss, driven like the legacy trainers."""

import pytest
import torch

import embedloss
from embedloss.compat import (
    CLIPStyleLoss,
    CombinedLoss,
    ContrastiveLoss,
    CrossEntropyLoss,
    DecoupledContrastiveLoss,
    MeanSquaredError,
    MultitaskLoss,
)

from .helpers import assert_same, trainer_batch


def _parts():
    return (
        ContrastiveLoss(add_projection=False),
        DecoupledContrastiveLoss(),
        CLIPStyleLoss(temperature=0.1),
    )


def test_combined_is_the_weighted_sum_with_prefixed_part_outputs():
    primary, secondary, tertiary = _parts()
    batch = trainer_batch(match_ids=["a", "b", "a", "c", "d", "e"])
    out = CombinedLoss(primary, secondary, 0.25, tertiary, 0.5)(**batch)
    p, s, t = primary(**batch), secondary(**batch), tertiary(**batch)
    v, x = batch["vision_features"], batch["text_features"]
    assert_same(out["loss"], p["loss"] + 0.25 * s["loss"] + 0.5 * t["loss"], (v, x))
    assert out["primary_loss"].item() == pytest.approx(p["loss"].item())
    assert out["secondary_loss"].item() == pytest.approx(s["loss"].item())
    assert out["secondary_weight"] == 0.25 and out["tertiary_weight"] == 0.5
    assert out["recalls"].keys() == p["recalls"].keys()  # the primary dict, nested keys included
    assert out["secondary_instance_loss"].item() == pytest.approx(s["instance_loss"].item())
    assert "tertiary_recalls" in out and "tertiary_mean_similarity" in out


def test_combined_with_only_a_primary_and_tensor_parts():
    loss = CombinedLoss(MeanSquaredError())
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    out = loss(x, y)
    assert set(out) == {"loss", "primary_loss"}
    assert out["loss"].item() == pytest.approx(torch.nn.functional.mse_loss(x, y).item())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        CombinedLoss(lambda a, b: a)


class _Hooked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        return x.sum()

    def update_step(self, step, total_steps=None):
        self.calls.append((step, total_steps))

    def update_epoch(self, epoch):
        self.calls.append(epoch)


def test_combined_forwards_hooks_to_its_parts():
    part = _Hooked()
    loss = CombinedLoss(part, _Hooked(), 0.5)
    loss.update_step(5)
    loss.update_epoch(1)
    assert part.calls == [(5, None), 1]


def test_multitask_normalises_weights_and_skips_missing_tasks():
    loss = MultitaskLoss(
        {"cls": CrossEntropyLoss(smoothing=0.0), "reg": MeanSquaredError()},
        loss_weights={"cls": 3.0, "reg": 1.0},
    )
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    pred, target = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    out = loss({"cls": logits, "reg": pred, "extra": 1}, {"cls": y, "reg": target})
    ce = torch.nn.functional.cross_entropy(logits, y)
    mse = torch.nn.functional.mse_loss(pred, target)
    assert out["loss"].item() == pytest.approx((0.75 * ce + 0.25 * mse).item())
    assert out["cls_loss"].item() == pytest.approx(ce.item())
    assert out["cls_weight"].item() == pytest.approx(0.75) and out[
        "reg_weight"
    ].item() == pytest.approx(0.25)
    only = loss({"cls": logits}, {"cls": y})
    assert only["loss"].item() == pytest.approx(0.75 * ce.item()) and "reg_loss" not in only


def test_multitask_dynamic_weighting_is_dwa_over_epochs():
    loss = MultitaskLoss({"a": MeanSquaredError(), "b": MeanSquaredError()}, dynamic_weighting=True)
    assert loss.loss.weighting == "dynamic"
    assert isinstance(loss.loss, embedloss.MultitaskLoss)
    x = torch.ones(2, 2)
    for epoch, scale in enumerate((1.0, 2.0)):
        loss({"a": x * scale, "b": x}, {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)})
        loss.update_epoch(epoch)
    out = loss({"a": x, "b": x}, {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)})
    # task a's loss rose 4x, b's stayed: DWA gives a the larger weight (weights sum to 2 · ½).
    assert out["a_weight"].item() > out["b_weight"].item()
    assert out["a_weight"].item() + out["b_weight"].item() == pytest.approx(1.0)


def test_multitask_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-empty mapping"):
        MultitaskLoss({})
    with pytest.raises(ValueError, match="positive sum"):
        MultitaskLoss({"a": MeanSquaredError()}, loss_weights={"a": 0.0})
