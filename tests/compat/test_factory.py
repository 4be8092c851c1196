"""create_loss_function maps the legacy args.loss_type strings onto the compat classes."""

from argparse import Namespace

import pytest
import torch

import embedloss.compat as compat
from embedloss.compat import create_loss_function

from .conftest import of, recorded
from .helpers import trainer_batch


def args(**kw):
    base = {"temperature": 0.1, "fusion_dim": 8, "batch_size": 64}
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("loss_type", "extra", "cls"),
    [
        ("barlow_twins", {}, compat.BarlowTwinsLoss),
        ("vicreg", {}, compat.VICRegLoss),
        ("vicreg", {"use_contrastive_pretrain": True}, compat.HybridPretrainVICRegLoss),
        ("memory_queue", {}, compat.MemoryQueueContrastiveLoss),
        ("dynamic_temp", {}, compat.DynamicTemperatureContrastiveLoss),
        ("hard_negative", {}, compat.HardNegativeMiningContrastiveLoss),
        ("mixed", {}, compat.MultiModalMixedContrastiveLoss),
        ("decoupled", {}, compat.DecoupledContrastiveLoss),
        ("combined", {}, compat.CombinedLoss),
        ("contrastive", {}, compat.ContrastiveLoss),
        ("anything-else", {}, compat.ContrastiveLoss),
        ("vicreg", {"use_simple_model": True}, compat.SimpleContrastiveLoss),
        ("decoupled", {"use_mixed_loss": True}, compat.MultiModalMixedContrastiveLoss),
    ],
)
def test_loss_type_builds_the_legacy_class(loss_type, extra, cls):
    loss = create_loss_function(args(loss_type=loss_type, **extra))
    assert type(loss) is cls


def test_factory_builds_without_spurious_ignored_argument_warnings():
    with recorded() as caught:
        for loss_type in (
            "barlow_twins",
            "vicreg",
            "memory_queue",
            "dynamic_temp",
            "hard_negative",
            "mixed",
            "decoupled",
            "combined",
            "x",
        ):
            create_loss_function(args(loss_type=loss_type))
        create_loss_function(args(loss_type="vicreg", use_contrastive_pretrain=True))
    assert of(caught, compat.IgnoredArgumentWarning) == []
    assert any("create_loss_function" in str(w.message) for w in of(caught, DeprecationWarning))


def test_default_contrastive_uses_heads_of_the_fusion_dim_and_the_given_temperature():
    loss = create_loss_function(args(loss_type="contrastive", fusion_dim=6))
    assert loss.projection["vision"][0].in_features == 6 and loss.loss.temperature == 0.1
    out = loss.double()(**trainer_batch(d=6, match_ids=[0, 1, 0, 2, 3, 4]))
    assert torch.isfinite(out["loss"])
    # legacy rule: fusion_dim 512 with a ViT-base vision model means 768-d features
    big = create_loss_function(
        args(loss_type="contrastive", fusion_dim=512, vision_model="vit-base")
    )
    assert big.projection["text"][0].in_features == 768


def test_memory_queue_size_from_args_or_dataset_size():
    sizes = {
        None: 8192,
        500: 2048,
        2000: 4096,
        6000: 8192,
        20000: 16384,
    }
    for dataset_size, expected in sizes.items():
        loss = create_loss_function(args(loss_type="memory_queue"), dataset_size=dataset_size)
        assert loss.loss.queue_size == expected
        assert loss.base_temperature == 0.1  # no hidden ×1.1
    assert create_loss_function(args(loss_type="memory_queue", queue_size=64)).loss.queue_size == 64


def test_dynamic_temperature_range_defaults_and_overrides():
    loss = create_loss_function(args(loss_type="dynamic_temp"))
    assert (loss.loss.min_temperature, loss.loss.max_temperature) == pytest.approx((0.06, 0.2))
    loss = create_loss_function(
        args(loss_type="dynamic_temp", dynamic_temp_min=0.02, dynamic_temp_max=0.5)
    )
    assert (loss.loss.min_temperature, loss.loss.max_temperature) == (0.02, 0.5)


@pytest.mark.parametrize(
    ("given", "batch_size", "strategy", "factor"),
    [
        ("auto", 16, "semi_hard", 3.0),
        ("auto", 64, "hard", 2.0),
        ("hard", 16, "hard", 2.0),
        (None, 64, "hard", 2.0),
    ],
)
def test_hard_negative_strategy_is_honoured(given, batch_size, strategy, factor):
    loss = create_loss_function(
        args(loss_type="hard_negative", mining_strategy=given, batch_size=batch_size)
    )
    assert loss.loss.mining.strategy == strategy and loss.hard_negative_factor == factor


def test_vicreg_hybrid_and_barlow_arguments():
    vic = create_loss_function(args(loss_type="vicreg", sim_weight=2.0, vicreg_warmup_epochs=3))
    assert vic.loss.sim_coeff == 2.0 and vic.loss.warmup_steps == 3
    no_curriculum = create_loss_function(args(loss_type="vicreg", use_curriculum=False))
    assert no_curriculum.loss.warmup_steps == 0
    hybrid = create_loss_function(
        args(loss_type="vicreg", use_contrastive_pretrain=True, contrastive_pretrain_steps=7)
    )
    assert hybrid.loss.contrastive_steps == 7 and hybrid.loss.transition_steps == 100
    barlow = create_loss_function(args(loss_type="barlow_twins", lambda_coeff=0.01))
    assert barlow.loss.lambda_coeff == 0.01 and barlow.projection["vision"][-1].out_features == 16


def test_mixed_and_combined_weights():
    mixed = create_loss_function(
        args(
            loss_type="mixed",
            contrastive_weight=0.5,
            classification_weight=0.25,
            multimodal_matching_weight=0.25,
        )
    )
    assert mixed.loss.weights == {"clip": 0.5, "nt_xent": 0.25, "supcon": 0.25}
    assert mixed.projection is None  # use_hard_negatives (the legacy head switch) is off
    combined = create_loss_function(args(loss_type="combined", secondary_loss_weight=0.2))
    assert combined.loss.weights == {"primary": 1.0, "secondary": 0.2, "tertiary": 0.3}
    out = combined(**trainer_batch(d=8, match_ids=[0, 1, 0, 2, 3, 4]))
    assert {"primary_loss", "secondary_loss", "tertiary_loss", "loss"} <= set(out)
