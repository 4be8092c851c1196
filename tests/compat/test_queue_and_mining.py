"""Memory queue, MoCo, EMA MoCo, hard negatives and dynamic temperature, driven like the trainers."""

import math

import pytest
import torch

import embedloss
from embedloss import functional as EF
from embedloss.compat import (
    DynamicTemperatureContrastiveLoss,
    DynamicTemperatureLoss,
    EMAMoCoLoss,
    HardNegativeLoss,
    HardNegativeMiningContrastiveLoss,
    MemoryQueueContrastiveLoss,
    MoCoLoss,
)
from embedloss.ops import labels_from_match_ids

from .helpers import assert_same, trainer_batch

IDS = [1, 1, 2, 3]


@pytest.mark.parametrize("cls", [MemoryQueueContrastiveLoss, MoCoLoss])
def test_memory_queue_is_moco_with_both_queues_and_the_eased_temperature(cls):
    loss = cls(queue_size=12, temperature=0.1)
    for step in range(4):
        batch = trainer_batch(n=4, seed=step, match_ids=IDS)
        v, t = batch["vision_features"], batch["text_features"]
        count = int(loss.loss.queue_count)
        queue = loss.loss.queue[:count].clone() if count else None
        past = loss.loss.query_queue[:count].clone() if count else None
        offset = int(loss.label_offset)
        out = loss(**batch)
        assert set(out) == {"loss", "loss_v2t", "loss_t2v", "temperature", "queue_fill", "accuracy"}
        fill = count / 12
        tau = 0.13 - 0.03 * fill if fill < 0.95 else 0.1  # legacy easing from 1.3·τ
        assert out["queue_fill"].item() == pytest.approx(fill)
        assert out["temperature"].item() == pytest.approx(tau)
        ref = EF.moco_loss(
            v.float(),
            t.float(),
            queue,
            temperature=tau,
            labels=labels_from_match_ids(IDS),
            query_queue=past,
            in_batch_negatives=True,
            symmetric=True,
            queue_labels=None if queue is None else torch.arange(-count, 0),  # never equal
        )
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
        assert int(loss.label_offset) == offset + 4  # later batches never share a queued label
    assert int(loss.loss.queue_count) == 12  # full after 4 batches of 4 (FIFO keeps 12)


def test_memory_queue_with_and_without_match_ids_across_calls():
    loss = MemoryQueueContrastiveLoss(queue_size=16)
    loss(**trainer_batch(n=4, seed=0, match_ids=IDS))
    out = loss(**trainer_batch(n=4, seed=1))  # no match_ids now: still works
    loss(**trainer_batch(n=4, seed=2, match_ids=IDS))
    assert torch.isfinite(out["loss"]) and int(loss.loss.queue_count) == 12


def test_memory_queue_starts_empty_and_eval_does_not_enqueue():
    loss = MemoryQueueContrastiveLoss(queue_size=8, adaptive_temperature=False)
    batch = trainer_batch(n=4)
    first = loss(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    # empty queue: no phantom negatives, the in-batch symmetric InfoNCE (CLIP) at τ
    assert first["loss"].item() == pytest.approx(
        EF.clip_loss(v, t, temperature=0.07).item(), rel=1e-5
    )
    loss.eval()
    loss(**batch)
    assert int(loss.loss.queue_count) == 4
    with pytest.raises(ValueError, match="max_temperature_factor must be a finite number in"):
        MemoryQueueContrastiveLoss(max_temperature_factor=0.5)


def test_memory_queue_state_dict_resumes_identically():
    a = MemoryQueueContrastiveLoss(queue_size=8)
    a(**trainer_batch(n=4, seed=1))
    b = MemoryQueueContrastiveLoss(queue_size=8)
    b.load_state_dict(a.state_dict())
    nxt = trainer_batch(n=4, seed=2)
    assert a(**nxt)["loss"].item() == b(**nxt)["loss"].item()


def _encoders():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 8), torch.nn.Linear(3, 8)


def test_ema_moco_stores_frozen_ema_encoders_and_scores_against_queues():
    enc_v, enc_t = _encoders()
    loss = EMAMoCoLoss(enc_v, enc_t, K=16, m=0.9, T=0.1)
    xv, xt = torch.randn(4, 5), torch.randn(4, 3)
    with torch.no_grad():
        kv0, kt0 = enc_v(xv), enc_t(xt)  # the EMA copies equal the encoders at first
    out = loss(vision_queries=xv, text_queries=xt, class_logits=None)
    v, t = enc_v(xv), enc_t(xt)
    ref = (
        EF.moco_loss(v, kt0, temperature=0.1, in_batch_negatives=True)
        + EF.moco_loss(t, kv0, temperature=0.1, in_batch_negatives=True)
    ) / 2
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    out["loss"].backward()
    assert enc_v.weight.grad is not None  # queries come from the online encoders
    assert all(not p.requires_grad for p in loss.vision_key_encoder.encoder.parameters())
    assert out["queue_size"] == 16 and out["momentum"] == 0.9 and out["queue_fill"].item() == 0.0
    # the EMA copies moved: θ_k ← 0.9·θ_k + 0.1·θ_q (θ_q unchanged here, so they stay equal)
    with torch.no_grad():
        enc_v.weight.add_(1.0)
    loss(vision_queries=xv, text_queries=xt)
    torch.testing.assert_close(
        loss.vision_key_encoder.encoder.weight, enc_v.weight - 0.9, rtol=1e-6, atol=1e-6
    )


def test_ema_moco_precomputed_features_asymmetric_and_frozen_encoders():
    enc_v, enc_t = _encoders()
    loss = EMAMoCoLoss(enc_v, enc_t, K=8, symmetric=False, update_key_encoder=False)
    xv, xt = torch.randn(4, 5), torch.randn(4, 3)
    feats = torch.randn(4, 8, requires_grad=True)
    out = loss(xv, xt, vision_features=feats)
    with torch.no_grad():
        ref = EF.moco_loss(feats, enc_t(xt), temperature=0.07, in_batch_negatives=True)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["t2v_loss"].item() == 0.0 and out["accuracy"] == out["v2t_accuracy"]
    before = loss.text_key_encoder.encoder.weight.clone()
    with torch.no_grad():
        enc_t.weight.add_(1.0)
    loss(xv, xt)
    torch.testing.assert_close(loss.text_key_encoder.encoder.weight, before)


@pytest.mark.parametrize(("legacy", "new"), [("hard", "hard"), ("semi-hard", "semi_hard")])
def test_hard_negative_mining_is_hard_negative_loss(legacy, new):
    batch = trainer_batch(match_ids=["a", "b", "a", "c", "d", "e"])
    out = HardNegativeMiningContrastiveLoss(0.1, 3.0, legacy)(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    labels = labels_from_match_ids(batch["match_ids"])
    ref = embedloss.HardNegativeLoss(temperature=0.1, strategy=new, hard_negative_factor=3.0)
    res = ref.compute(v, t, labels)
    assert_same(out["loss"], res.loss, (v, t))
    assert out["hard_negative_factor"].item() == 3.0
    assert out["v2t_loss"].item() == pytest.approx(res.terms["loss_a_to_b"].item())
    assert out["hard_negative_fraction"].item() == pytest.approx(
        res.terms["hard_negative_fraction"].item()
    )
    # up-weighting negatives never lowers the loss
    plain = EF.clip_loss(v, t, temperature=0.1, labels=labels)
    assert out["loss"].item() >= plain.item() - 1e-12


def test_consolidation_hard_negative_loss_percentile_and_bad_strategy():
    loss = HardNegativeLoss(mining_strategy="hard", hard_negative_percentile=50.0)
    assert loss.loss.mining.percentile == 0.5
    with pytest.raises(ValueError, match="mining_strategy must be one of 'hard', 'semi-hard'"):
        HardNegativeMiningContrastiveLoss(mining_strategy="hardest")


@pytest.mark.parametrize("cls", [DynamicTemperatureContrastiveLoss, DynamicTemperatureLoss])
def test_dynamic_temperature_follows_the_gap_rule_and_equals_clip_at_that_tau(cls):
    batch = trainer_batch(match_ids=["a", "b", "a", "c", "d", "e"])
    out = cls(base_temperature=0.07, min_temp=0.05, max_temp=0.1)(**batch)
    v, t = batch["vision_features"], batch["text_features"]
    gap = out["pos_similarity"].item() - out["neg_similarity"].item()
    tau = min(max(0.07 * (0.8 + 0.4 * math.exp(-2 * gap)), 0.05), 0.1)
    assert out["temperature"].item() == pytest.approx(tau, rel=1e-6)
    labels = labels_from_match_ids(batch["match_ids"])
    assert_same(
        out["loss"],
        EF.clip_loss(v, t, temperature=out["temperature"].item(), labels=labels),
        (v, t),
        tol=1e-6,
    )
