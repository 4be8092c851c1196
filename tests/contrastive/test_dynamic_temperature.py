import math

import pytest
import torch

from embedloss import DynamicTemperatureLoss, create_loss
from embedloss.contrastive.dynamic_temperature import gap_temperature
from embedloss.functional import clip_loss, dynamic_temperature_loss
from embedloss.ops.similarity import similarity_gap
from tests.contrastive.oracles import hard_negative_oracle, legacy_gap_rule, similarity_gap_oracle
from tests.helpers import assert_close_with_grads, randn64


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 0, 2, 1, 3])])
def test_matches_float64_oracle_value_and_gradient(labels):
    a, b = randn64(6, 5, seed=1), randn64(6, 5, seed=2)
    pos, neg = similarity_gap_oracle(a, b, labels)
    tau = legacy_gap_rule(pos - neg, 0.07, 0.04, 0.2)
    fast = dynamic_temperature_loss(a, b, labels=labels)
    slow = hard_negative_oracle(a, b, tau, "none", labels=labels)  # CLIP's loss at that τ
    # τ is a constant of the graph, so the gradient is CLIP's gradient at that τ
    assert_close_with_grads(fast, slow, (a, b))
    stats = similarity_gap(a, b, labels)
    assert stats.positive.item() == pytest.approx(pos, abs=1e-12)
    assert stats.negative.item() == pytest.approx(neg, abs=1e-12)


def test_loss_equals_clip_at_the_reported_temperature():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    for kwargs in ({}, {"ema_momentum": 0.9}, {"schedule": "cosine"}):
        loss_fn = DynamicTemperatureLoss(**kwargs)
        loss_fn.update_step(30, 100)
        for _ in range(2):
            out = loss_fn.compute(a, b)
            tau = out.terms["temperature"].item()
            torch.testing.assert_close(
                out.loss, clip_loss(a, b, temperature=tau), rtol=1e-5, atol=1e-6
            )
            a = a + 0.5 * b


def test_distinct_labels_reproduce_label_free():
    a, b = randn64(7, 4, seed=3, requires_grad=False), randn64(7, 4, seed=4, requires_grad=False)
    torch.testing.assert_close(
        dynamic_temperature_loss(a, b, labels=torch.arange(7) * 5),
        dynamic_temperature_loss(a, b),
        rtol=1e-12,
        atol=1e-12,
    )


def test_closed_form_identical_orthonormal_pairs():
    n, tau0 = 4, 0.07
    z = torch.eye(n, 8, dtype=torch.float64)
    tau = tau0 * (0.8 + 0.4 * math.exp(-2.0))  # gap = 1 − 0
    expected = math.log(math.exp(1 / tau) + n - 1) - 1 / tau
    out = DynamicTemperatureLoss().compute(z, z)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.terms["similarity_gap"].item() == pytest.approx(1.0)
    assert out.terms["temperature"].item() == pytest.approx(tau, rel=1e-6)


def test_rule_clamps_and_is_detached():
    assert gap_temperature(-2.0, 0.07, 0.04, 0.2) == 0.2  # 0.07·(0.8 + 0.4e⁴) is far above
    assert gap_temperature(2.0, 0.03, 0.04, 0.2) == 0.04
    a, b = randn64(5, 4, seed=5), randn64(5, 4, seed=6)
    tau = gap_temperature(similarity_gap(a, b).gap, 0.07, 0.04, 0.2)
    ga = torch.autograd.grad(dynamic_temperature_loss(a, b), a)[0]
    torch.testing.assert_close(
        ga, torch.autograd.grad(clip_loss(a, b, temperature=tau), a)[0], rtol=1e-12, atol=1e-12
    )


def test_ema_smooths_updates_only_in_training_and_resumes():
    batches = [
        (
            randn64(6, 4, seed=s, requires_grad=False),
            randn64(6, 4, seed=s + 50, requires_grad=False),
        )
        for s in range(4)
    ]
    raw = [float(gap_temperature(similarity_gap(a, b).gap, 0.07, 0.04, 0.2)) for a, b in batches]
    loss_fn = DynamicTemperatureLoss(ema_momentum=0.8)
    assert loss_fn.temperature == 0.07  # not initialised yet: the base
    expected = raw[0]
    assert loss_fn.compute(*batches[0]).terms["temperature"].item() == pytest.approx(
        expected, rel=1e-6
    )
    expected = 0.8 * expected + 0.2 * raw[1]
    assert loss_fn.compute(*batches[1]).terms["temperature"].item() == pytest.approx(
        expected, rel=1e-6
    )
    assert loss_fn.temperature == pytest.approx(expected, rel=1e-12)
    loss_fn.eval()
    assert loss_fn.compute(*batches[2]).terms["temperature"].item() == pytest.approx(
        expected, rel=1e-6
    )
    assert loss_fn.temperature == pytest.approx(expected, rel=1e-12)  # eval: frozen
    loss_fn.train()
    resumed = DynamicTemperatureLoss(ema_momentum=0.8)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed(*batches[3]), loss_fn(*batches[3]))
    # in eval mode before any training call, the batch's own τ is used
    fresh = DynamicTemperatureLoss(ema_momentum=0.5).eval()
    assert fresh.compute(*batches[0]).terms["temperature"].item() == pytest.approx(raw[0], rel=1e-6)


def test_cosine_schedule():
    loss_fn = create_loss(
        "dynamic_temperature", schedule="cosine", min_temperature=0.05, max_temperature=0.15
    )
    assert loss_fn.temperature == pytest.approx(0.15)
    loss_fn.update_step(25, 100)
    assert loss_fn.temperature == pytest.approx(0.05 + 0.05 * (1 + math.cos(math.pi / 4)))
    loss_fn.update_step(100, 100)
    assert loss_fn.temperature == pytest.approx(0.05)
    loss_fn.update_step(7, 10)
    state = loss_fn.state_dict()
    resumed = DynamicTemperatureLoss(schedule="cosine", min_temperature=0.05, max_temperature=0.15)
    resumed.load_state_dict(state)
    assert resumed.temperature == loss_fn.temperature
    gap_mode = DynamicTemperatureLoss()
    gap_mode.update_step(5, 10)  # no-op
    assert gap_mode.temperature == 0.07


def test_terms_and_reductions():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    out = DynamicTemperatureLoss().compute(a, b)
    assert set(out.terms) == {
        "temperature",
        "similarity_gap",
        "positive_similarity",
        "negative_similarity",
        "loss_a_to_b",
        "loss_b_to_a",
        "accuracy",
    }
    assert out.terms["similarity_gap"].item() == pytest.approx(
        out.terms["positive_similarity"].item() - out.terms["negative_similarity"].item(), abs=1e-6
    )
    per_pair = DynamicTemperatureLoss(reduction="none")(a, b)
    assert per_pair.shape == (6,)
    torch.testing.assert_close(DynamicTemperatureLoss(reduction="sum")(a, b), per_pair.sum())
    assert "schedule='gap'" in repr(DynamicTemperatureLoss())


def test_all_same_label_has_no_negative_pairs():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    stats = similarity_gap(a, b, torch.zeros(4, dtype=torch.long))
    assert stats.negative.item() == 0.0


def test_bfloat16_and_large_norms():
    a, b = 1e4 * torch.randn(6, 8), 1e4 * torch.randn(6, 8)
    out = DynamicTemperatureLoss()(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_bad_inputs():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape"):
        DynamicTemperatureLoss()(a, torch.randn(4, 5))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(4,\) to match the batch, got \(5,\)"
    ):
        DynamicTemperatureLoss()(a, a, torch.arange(5))
    with pytest.raises(
        ValueError, match=r"min_temperature must be <= max_temperature, got 0\.3 > 0\.2"
    ):
        DynamicTemperatureLoss(min_temperature=0.3)
    with pytest.raises(ValueError, match="base_temperature must be a finite number > 0"):
        dynamic_temperature_loss(a, a, base_temperature=0.0)
    with pytest.raises(ValueError, match="schedule must be one of 'gap', 'cosine'; got 'linear'"):
        DynamicTemperatureLoss(schedule="linear")
    with pytest.raises(ValueError, match="ema_momentum must be < 1"):
        DynamicTemperatureLoss(ema_momentum=1.0)
    with pytest.raises(ValueError, match="it needs schedule='gap'"):
        DynamicTemperatureLoss(schedule="cosine", ema_momentum=0.9)
    with pytest.raises(ValueError, match="cosine schedule needs total_steps"):
        DynamicTemperatureLoss(schedule="cosine").update_step(3)
