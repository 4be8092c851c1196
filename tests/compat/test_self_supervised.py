"""VICReg, Barlow Twins, the hybrid loss and decorrelation, driven like the legacy trainers."""

import pytest
import torch
import torch.nn.functional as F

import embedloss
from embedloss.compat import (
    BarlowTwinsLoss,
    DecorrelationLoss,
    HybridPretrainVICRegLoss,
    VICRegLoss,
)
from embedloss.ops import labels_from_match_ids

from .helpers import assert_same, features, trainer_batch

VIC_KEYS = {
    "loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "sim_weight",
    "var_weight",
    "cov_weight",
    "warmup_factor",
}


def _views(n=16, d=6, seed=0):
    return features(n, d, seed=seed)


def test_vicreg_is_the_new_vicreg_and_warms_up_to_full_weights_over_epochs():
    loss = VICRegLoss(sim_coeff=10.0, var_coeff=5.0, cov_coeff=1.0, epsilon=1e-3, warmup_epochs=4)
    a, b = _views()
    new = embedloss.VICRegLoss(sim_coeff=10.0, var_coeff=5.0, cov_coeff=1.0, eps=1e-3)
    factors = []
    for epoch in range(6):
        loss.update_epoch(epoch)
        loss.update_step(1000 * epoch, 6000)  # steps do not move an epoch warm-up
        out = loss(z_a=a, z_b=b, attention_weights=None)
        assert set(out) == VIC_KEYS
        factors.append(out["warmup_factor"].item())
        assert out["var_weight"].item() == pytest.approx(5.0 * factors[-1])
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])  # legacy: capped at 0.5
    assert loss.warmup_factor == 1.0
    assert_same(out["loss"], new(a, b), (a, b))
    terms = new.compute(a, b).terms
    assert out["variance_loss"].item() == pytest.approx(terms["variance"].item())


def test_vicreg_without_curriculum_uses_full_weights_and_matches_the_official_formula():
    a, b = _views()
    out = VICRegLoss(curriculum=False)(z_a=a, z_b=b)
    assert out["warmup_factor"].item() == 1.0
    # independent float64 oracle of the official code (variance averaged over the branches)
    za, zb = a - a.mean(0), b - b.mean(0)
    inv = F.mse_loss(a, b)
    std_a, std_b = torch.sqrt(za.var(0) + 1e-3), torch.sqrt(zb.var(0) + 1e-3)
    var = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
    n, d = a.shape
    off = ~torch.eye(d, dtype=torch.bool)
    cov = ((za.T @ za / (n - 1))[off] ** 2).sum() / d + ((zb.T @ zb / (n - 1))[off] ** 2).sum() / d
    assert_same(out["loss"], 10.0 * inv + 5.0 * var + 1.0 * cov, (a, b))


@pytest.mark.parametrize("mode", ["cross_modal", "within_batch"])
def test_barlow_twins_returns_the_legacy_tuple(mode):
    batch = trainer_batch(n=16, d=6)
    v, t = batch["vision_features"], batch["text_features"]
    loss, parts = BarlowTwinsLoss(lambda_coeff=0.01, correlation_mode=mode)(v, t, logits=None)
    assert set(parts) == {"diagonal_loss", "off_diagonal_loss"}
    new = embedloss.BarlowTwinsLoss(lambda_coeff=0.01)
    pairs = [(v, t)] if mode == "cross_modal" else [(v, v), (t, t)]
    ref = sum(new(x, y) for x, y in pairs) / len(pairs)
    assert_same(loss, ref, (v, t))
    on = sum(new.compute(x, y).terms["on_diagonal"] for x, y in pairs) / len(pairs)
    assert parts["diagonal_loss"].item() == pytest.approx(on.item())


def test_barlow_twins_reaches_its_optimum_on_identical_decorrelated_views():
    # Orthogonal, centred columns: standardised C = I, so the loss is ~0 (the legacy one was not).
    a = torch.randn(32, 4, dtype=torch.float64)
    z, _ = torch.linalg.qr(a - a.mean(0))  # centred, orthogonal columns
    loss, parts = BarlowTwinsLoss()(z, z)
    assert parts["off_diagonal_loss"].item() == pytest.approx(0.0, abs=1e-12)
    assert loss.item() == pytest.approx(0.0, abs=1e-3)  # (1 − C_ii)² with BatchNorm's ε = 1e-5


def test_barlow_twins_heads_and_bad_mode():
    loss = BarlowTwinsLoss(add_projection=True, input_dim=6, projection_dim=5)
    assert isinstance(loss.projection["text"][1], torch.nn.BatchNorm1d)
    assert loss.projection["text"][-1].out_features == 5
    out, _ = loss(torch.randn(8, 6), torch.randn(8, 6))
    out.backward()
    with pytest.raises(ValueError, match="correlation_mode must be one of"):
        BarlowTwinsLoss(correlation_mode="auto")


def test_hybrid_phases_follow_update_step_with_legacy_names():
    loss = HybridPretrainVICRegLoss(
        contrastive_pretrain_steps=2, gradual_transition_steps=2, adaptive_transition=False
    )
    a, b = _views(n=8)
    phases = []
    for step in range(5):
        loss.update_step(step, None)
        out = loss(z_a=a, z_b=b, match_ids=list("aabbccdd"))
        phases.append((out["current_phase"], out["transition_progress"].item()))
    assert phases == [
        ("contrastive_pretrain", 0.0),
        ("contrastive_pretrain", 0.0),
        ("transition", 0.0),
        ("transition", 0.5),
        ("vicreg", 1.0),
    ]
    assert loss.current_phase == "vicreg" and loss.warmup_factor == 1.0


def test_hybrid_is_the_new_hybrid_loss():
    a, b = _views(n=8)
    ids = list("aabbccdd")
    legacy = HybridPretrainVICRegLoss(contrastive_pretrain_steps=1, gradual_transition_steps=4)
    new = embedloss.HybridVICRegLoss(
        contrastive_steps=1, transition_steps=4, sim_coeff=5.0, var_coeff=5.0, cov_coeff=1.0
    )
    for module in (legacy, new):
        module.update_step(2)
    out = legacy(z_a=a, z_b=b, match_ids=ids)
    ref = new.compute(a, b, labels_from_match_ids(ids))
    assert_same(out["loss"], ref.loss, (a, b))
    assert out["contrastive_loss"].item() == pytest.approx(ref.terms["contrastive"].item())
    assert out["contrastive_weight"].item() == pytest.approx(0.75)


def test_hybrid_adaptive_transition_starts_early_on_a_large_alignment_gap():
    loss = HybridPretrainVICRegLoss(contrastive_pretrain_steps=100, min_alignment_threshold=0.3)
    x = torch.eye(8, dtype=torch.float64)  # matched cosine 1, others 0: gap 1 > 0.3
    loss.update_step(0)
    loss(z_a=x, z_b=x)
    loss.update_step(1)
    assert loss.current_phase == "transition"


def test_hybrid_state_dict_resumes_the_schedule():
    loss = HybridPretrainVICRegLoss(contrastive_pretrain_steps=2, gradual_transition_steps=4)
    loss.update_step(4)
    fresh = HybridPretrainVICRegLoss(contrastive_pretrain_steps=2, gradual_transition_steps=4)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.current_phase == "transition" and fresh.loss.transition_progress == 0.5


def test_decorrelation_per_modality_with_feature_stats():
    batch = trainer_batch(n=16, d=6)
    v, t = batch["vision_features"], batch["text_features"]
    out = DecorrelationLoss(coef=2.0)(vision_features=v, text_features=t, class_labels=None)
    new = embedloss.DecorrelationLoss(weight=2.0, use_correlation=False, normalize=True)
    assert_same(out["loss"], (new(v) + new(t)) / 2, (v, t))
    # independent oracle: mean squared off-diagonal covariance of row-normalised features
    x = F.normalize(v, dim=1)
    xc = x - x.mean(0)
    cov = xc.T @ xc / (x.shape[0] - 1)
    off = ~torch.eye(6, dtype=torch.bool)
    assert out["vision_decorrelation_loss"].item() == pytest.approx((cov[off] ** 2).mean().item())
    stats = out["feature_stats"]
    assert set(stats) == {
        "vision_min_var",
        "vision_mean_var",
        "vision_low_var_pct",
        "text_min_var",
        "text_mean_var",
        "text_low_var_pct",
    }
    assert stats["vision_min_var"].item() == pytest.approx(x.var(0).min().item(), rel=1e-5)


def test_decorrelation_generic_features_collapse_and_no_stats():
    z = torch.randn(16, 4)
    z[:, 0] = 3.0  # a collapsed dimension
    out = DecorrelationLoss(normalize_embeddings=False)(features=z)
    assert "generic_decorrelation_loss" in out
    assert out["feature_stats"]["feature_low_var_pct"].item() == pytest.approx(0.25)
    assert "feature_stats" not in DecorrelationLoss(track_feature_stats=False)(features=z)
    with pytest.raises(ValueError, match="needs vision_features, text_features or features"):
        DecorrelationLoss()()
