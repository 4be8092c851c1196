import pytest
import torch
from pytorch_metric_learning import losses

from embedloss import CircleLoss
from embedloss.functional import circle_loss
from tests.helpers import assert_close_with_grads
from tests.metric_learning.helpers import batch, pml_grad
from tests.metric_learning.oracles import circle_oracle


@pytest.mark.parametrize(("margin", "gamma"), [(0.25, 256.0), (0.4, 80.0), (0.0, 1.0)])
def test_matches_the_loop_oracle(margin, gamma):
    x, y = batch(n=11, seed=30)
    got = circle_loss(x, y, margin=margin, gamma=gamma)
    assert_close_with_grads(got, circle_oracle(x, y, margin, gamma), (x,))


def test_tiled_equals_dense():
    x, y = batch(n=22, d=5, classes=4, seed=31)
    dense = circle_loss(x, y, chunk_size=None)
    assert_close_with_grads(circle_loss(x, y, chunk_size=3), dense, (x,))


def test_parity_with_pytorch_metric_learning():
    # PML's CircleLoss(m, gamma): cosine similarity, α detached, softplus of the two
    # log-sum-exps, AvgNonZeroReducer over the anchors with both a positive and a negative.
    x, y = batch(n=13, seed=32)
    y[0] = 7  # an anchor without positives
    ref = losses.CircleLoss(m=0.3, gamma=64)(x, y)
    got = circle_loss(x, y, margin=0.3, gamma=64.0)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)


def test_terms_invalid_anchors_and_large_gamma_are_finite():
    x, y = batch(seed=33)
    y[0] = 9
    out = CircleLoss(reduction="none").compute(x, y)
    assert out.loss[0].item() == 0.0
    assert out.terms["anchors"].item() == 9 and out.terms["anchors_without_terms"].item() == 1
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    loss = circle_loss(z.float(), torch.arange(16) % 2, gamma=1e4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        CircleLoss(gamma=0.0)
    with pytest.raises(ValueError, match=r"margin must be a finite number in \[0.0, inf\]"):
        CircleLoss(margin=-0.1)
    assert "gamma=256.0" in repr(CircleLoss())
