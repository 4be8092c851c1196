import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses

from embedloss import ArcFaceLoss, create_loss
from embedloss.functional import arcface_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.metric_learning.oracles import (
    arcface_target,
    class_cosines_oracle,
    margin_softmax_oracle,
)


def _inputs(n=9, d=5, classes=4, k=1, seed=40):
    x = randn64(n, d, seed=seed)
    w = randn64(classes * k, d, seed=seed + 1)
    y = torch.arange(n) % classes
    return x, y, w


@pytest.mark.parametrize("sub_centers", [1, 3])
@pytest.mark.parametrize("margin", [0.5, 1.4])  # 1.4: some θ + m pass π (the fallback)
def test_matches_the_loop_oracle(sub_centers, margin):
    x, y, w = _inputs(k=sub_centers)
    x.data[0] = -w.data[int(y[0]) * sub_centers]  # θ = π for one sample: past π − m
    got = arcface_loss(x, y, w, scale=8.0, margin=margin, sub_centers=sub_centers)
    cos = class_cosines_oracle(x, w, sub_centers)
    expected = margin_softmax_oracle(cos, y, arcface_target(margin), 8.0)
    assert_close_with_grads(got, expected, (x, w))


@pytest.mark.parametrize("sub_centers", [1, 3])
def test_parity_with_pytorch_metric_learning(sub_centers):
    # PML takes the margin in degrees and holds the centres as W (D, C·k), the transpose of our
    # nn.Linear-style weight; SubCenterArcFaceLoss orders sub-centres as columns c·k + j, our
    # rows c·k + j. Both fall back to cos θ − m·sin m past θ = π − m and average over samples.
    x, y, w = _inputs(n=12, d=6, classes=5, k=sub_centers, seed=41)
    if sub_centers == 1:
        pml = losses.ArcFaceLoss(5, 6, margin=np.degrees(0.4), scale=16.0)
    else:
        pml = losses.SubCenterArcFaceLoss(
            num_classes=5, embedding_size=6, margin=np.degrees(0.4), scale=16.0, sub_centers=3
        )
    pml.W.data = w.detach().T.clone()
    ref = pml(x, y)
    got = arcface_loss(x, y, w, scale=16.0, margin=0.4, sub_centers=sub_centers)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(got, (x, w))
    g_ref = torch.autograd.grad(ref, (x, pml.W))
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_ours[1], g_ref[1].T, rtol=1e-9, atol=1e-10)


def test_zero_margin_is_normalised_softmax_and_gradient_is_finite_at_the_centre():
    x, y, w = _inputs(seed=42)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    plain = torch.nn.functional.cross_entropy(10.0 * cos, y)
    assert_close_with_grads(arcface_loss(x, y, w, scale=10.0, margin=0.0), plain, (x, w))
    on_centre = w.detach()[y].clone().requires_grad_(True)  # cos θ_y = 1: sin θ has no slope
    arcface_loss(on_centre, y, w).backward()
    assert torch.isfinite(on_centre.grad).all()


def test_module_parameter_terms_seed_and_repr():
    loss = ArcFaceLoss(num_classes=5, embedding_dim=6, sub_centers=2, seed=3)
    assert isinstance(loss.weight, torch.nn.Parameter) and loss.weight.shape == (10, 6)
    assert [n for n, _ in loss.named_parameters()] == ["weight"]
    again = create_loss("sub_center_arcface", num_classes=5, embedding_dim=6, sub_centers=2, seed=3)
    torch.testing.assert_close(again.weight, loss.weight)
    assert loss.weight.std().item() == pytest.approx(0.01, rel=0.5)
    x = torch.randn(8, 6)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    out = loss.compute(x, y)
    assert set(out.terms) == {"accuracy", "target_cosine"}
    out.loss.backward()
    assert loss.weight.grad is not None and torch.isfinite(loss.weight.grad).all()
    torch.testing.assert_close(
        out.loss,
        arcface_loss(x, y, loss.weight, scale=64.0, margin=0.5, sub_centers=2),
    )
    assert "num_classes=5" in repr(loss)
    per = ArcFaceLoss(num_classes=5, embedding_dim=6, reduction="none", seed=0)(x, y)
    assert per.shape == (8,)


def test_bad_inputs():
    x, y, w = _inputs()
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\)"):
        arcface_loss(x, y + 1, w)
    with pytest.raises(ValueError, match="embeddings must have embedding_dim=5 features"):
        arcface_loss(x[:, :3], y, w)
    with pytest.raises(ValueError, match=r"weight must be \(C·sub_centers, D\)"):
        arcface_loss(x, y, w, sub_centers=3)
    with pytest.raises(ValueError, match=r"margin must be a finite number in \[0.0, 1.57"):
        ArcFaceLoss(num_classes=3, embedding_dim=4, margin=math.pi)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ArcFaceLoss(num_classes=0, embedding_dim=4)
    with pytest.raises(TypeError, match="seed must be an int"):
        ArcFaceLoss(num_classes=3, embedding_dim=4, seed=1.5)
    with pytest.raises(TypeError, match="missing 2 required keyword-only arguments"):
        ArcFaceLoss()
