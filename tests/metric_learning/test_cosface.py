import pytest
import torch
from pytorch_metric_learning import losses

from embedloss import CosFaceLoss
from embedloss.functional import cosface_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.metric_learning.oracles import class_cosines_oracle, margin_softmax_oracle


def _inputs(n=9, d=5, classes=4, seed=50):
    return randn64(n, d, seed=seed), torch.arange(n) % classes, randn64(classes, d, seed=seed + 1)


def test_matches_the_loop_oracle():
    x, y, w = _inputs()
    got = cosface_loss(x, y, w, scale=12.0, margin=0.3)
    expected = margin_softmax_oracle(class_cosines_oracle(x, w), y, lambda c: c - 0.3, 12.0)
    assert_close_with_grads(got, expected, (x, w))


def test_parity_with_pytorch_metric_learning():
    # PML's CosFaceLoss: the same margin and scale, W (D, C) the transpose of our weight.
    x, y, w = _inputs(n=12, d=6, classes=5, seed=51)
    pml = losses.CosFaceLoss(num_classes=5, embedding_size=6, margin=0.35, scale=30.0)
    pml.W.data = w.detach().T.clone()
    ref = pml(x, y)
    got = cosface_loss(x, y, w, scale=30.0, margin=0.35)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g_ours, g_ref = torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, pml.W))
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_ours[1], g_ref[1].T, rtol=1e-9, atol=1e-10)


def test_module_reductions_and_bad_inputs():
    loss = CosFaceLoss(num_classes=4, embedding_dim=5, seed=0, reduction="sum")
    x, y, _ = _inputs()
    total = loss(x, y)
    per = CosFaceLoss(num_classes=4, embedding_dim=5, seed=0, reduction="none")(x, y)
    torch.testing.assert_close(per.sum(), total)
    out = CosFaceLoss(num_classes=4, embedding_dim=5, seed=0).compute(x, y)
    torch.testing.assert_close(out.loss, total / 9)
    assert 0.0 <= out.terms["accuracy"].item() <= 1.0
    with pytest.raises(ValueError, match="margin must be a finite number in"):
        CosFaceLoss(num_classes=4, embedding_dim=5, margin=-0.1)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        cosface_loss(x, y, _inputs()[2], scale=0.0)
    with pytest.raises(ValueError, match="weight must have shape"):
        cosface_loss(x, y, torch.randn(4))
