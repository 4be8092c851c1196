import math

import pytest
import torch
import torch.nn.functional as F

from embedloss import CLIPLoss, create_loss
from embedloss.functional import clip_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.oracles import clip_oracle


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_oracle(smoothing):
    x, y = randn64(5, 4, seed=1), randn64(5, 4, seed=2)
    assert_close_with_grads(
        clip_loss(x, y, temperature=0.07, label_smoothing=smoothing),
        clip_oracle(x, y, 0.07, smoothing=smoothing),
        (x, y),
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_labels_uniform_target_over_positives_matches_oracle(smoothing):
    x, y = randn64(6, 3, seed=3), randn64(6, 3, seed=4)
    labels = torch.tensor([0, 1, 0, 0, 2, 1])
    assert_close_with_grads(
        clip_loss(x, y, temperature=0.2, labels=labels, label_smoothing=smoothing),
        clip_oracle(x, y, 0.2, labels, smoothing),
        (x, y),
    )


def test_matches_open_clip_formulation_with_f_cross_entropy():
    x, y = randn64(8, 6, seed=5, requires_grad=False), randn64(8, 6, seed=6, requires_grad=False)
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / 0.05
    target = torch.arange(8)
    expected = (
        F.cross_entropy(logits, target, label_smoothing=0.1)
        + F.cross_entropy(logits.T, target, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(clip_loss(x, y, temperature=0.05, label_smoothing=0.1), expected)


def test_distinct_labels_reproduce_label_free():
    x, y = randn64(5, 4, seed=7, requires_grad=False), randn64(5, 4, seed=8, requires_grad=False)
    torch.testing.assert_close(clip_loss(x, y, labels=torch.arange(5) + 10), clip_loss(x, y))


def test_symmetric_in_modalities():
    x, y = randn64(5, 4, seed=9, requires_grad=False), randn64(5, 4, seed=10, requires_grad=False)
    torch.testing.assert_close(clip_loss(x, y), clip_loss(y, x))


def test_closed_form_uniform_similarities():
    # All embeddings identical: every logit equal, so each CE is log(N).
    x = torch.ones(7, 3, dtype=torch.float64)
    assert clip_loss(x, x).item() == pytest.approx(math.log(7), rel=1e-12)


def test_gradcheck_with_learnable_temperature():
    x, y = randn64(4, 3, seed=11), randn64(4, 3, seed=12)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, t: clip_loss(a, b, temperature=t), (x, y, tau))


def test_learnable_temperature_clamped_and_external_logit_scale():
    # a learnable τ below the clamp's floor would silently train at 0.01: refused up front
    with pytest.raises(ValueError, match=r"temperature=0\.001 is below 0\.01, the smallest"):
        CLIPLoss(temperature=0.001, learnable_temperature=True)
    assert CLIPLoss(temperature=0.001).temperature == pytest.approx(0.001)  # a fixed τ is exact
    loss = CLIPLoss(temperature=0.01, learnable_temperature=True)
    with torch.no_grad():
        loss.logit_scale.add_(1.0)  # training pushed it past log(100): the scale is clamped
    assert loss.temperature == pytest.approx(0.01, rel=1e-6)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    external = torch.tensor(math.log(1 / 0.5), requires_grad=True)
    out = loss.compute(x, y, logit_scale=external)
    torch.testing.assert_close(out.loss, clip_loss(x, y, temperature=0.5))
    assert out.terms["temperature"].item() == pytest.approx(0.5, rel=1e-6)
    out.loss.backward()
    assert external.grad is not None and loss.logit_scale.grad is None


def test_terms():
    x = torch.eye(4, 6)
    out = create_loss("clip").compute(x, x)
    assert out.terms["accuracy"].item() == 1.0
    assert out.terms["positive_similarity"].item() == pytest.approx(1.0)
    assert out.terms["negative_similarity"].item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(
        out.loss, (out.terms["loss_image_to_text"] + out.terms["loss_text_to_image"]) / 2
    )


def test_reduction_none_is_per_pair_mean_of_directions():
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    per_pair = CLIPLoss(reduction="none")(x, y)
    assert per_pair.shape == (5,)
    torch.testing.assert_close(per_pair.mean(), CLIPLoss()(x, y))


def test_bad_inputs():
    with pytest.raises(
        ValueError, match=r"image_embeddings and text_embeddings must have the same shape"
    ):
        CLIPLoss()(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=r"label_smoothing must be a finite number in \[0.0, 1.0\], got 1.5"
    ):
        CLIPLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar tensor, got shape \(2,\)"):
        CLIPLoss()(torch.randn(3, 4), torch.randn(3, 4), logit_scale=torch.ones(2))
    with pytest.raises(TypeError, match="learnable_temperature must be a bool"):
        CLIPLoss(learnable_temperature="yes")
