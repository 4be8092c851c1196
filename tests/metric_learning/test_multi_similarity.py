import math

import pytest
import torch
from pytorch_metric_learning import losses, miners

from embedloss import MultiSimilarityLoss
from embedloss.functional import multi_similarity_loss
from tests.helpers import assert_close_with_grads
from tests.metric_learning.helpers import batch, pml_grad
from tests.metric_learning.oracles import multi_similarity_oracle


@pytest.mark.parametrize("mining", [True, False])
def test_matches_the_official_code(mining):
    x, y = batch(n=12, seed=20)
    got = multi_similarity_loss(x, y, alpha=2.0, beta=10.0, base=0.3, mining=mining, epsilon=0.3)
    expected = multi_similarity_oracle(x, y, 2.0, 10.0, 0.3, 0.3 if mining else None)
    assert_close_with_grads(got, expected, (x,))


@pytest.mark.parametrize("mining", [True, False])
def test_tiled_equals_dense(mining):
    x, y = batch(n=25, d=6, classes=6, seed=21)
    dense = multi_similarity_loss(x, y, mining=mining, chunk_size=None)
    assert_close_with_grads(multi_similarity_loss(x, y, mining=mining, chunk_size=4), dense, (x,))


def test_parity_with_pytorch_metric_learning():
    # mining=False is PML's MultiSimilarityLoss without a miner (same α, β, base; cosine; mean
    # over all anchors). mining=True is that loss fed the pairs of PML's MultiSimilarityMiner.
    x, y = batch(n=14, seed=22)
    pml = losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4)
    ref = pml(x, y)
    got = multi_similarity_loss(x, y, alpha=2.0, beta=40.0, base=0.4, mining=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)
    mined_ref = pml(x, y, miners.MultiSimilarityMiner(epsilon=0.2)(x, y))
    mined = multi_similarity_loss(x, y, alpha=2.0, beta=40.0, base=0.4, epsilon=0.2)
    torch.testing.assert_close(mined, mined_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(mined, x), pml_grad(mined_ref, x), rtol=1e-9, atol=1e-10)


def test_closed_forms():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    # Without mining: anchors 0 and 1 have a positive at S=1 and a negative at S=0; anchor 2
    # only negatives at S=0.
    pos = math.log(1 + math.exp(-2.0 * 0.5)) / 2
    neg = lambda k: math.log(1 + k * math.exp(50.0 * -0.5)) / 50  # noqa: E731
    expected = (2 * (pos + neg(1)) + neg(2)) / 3
    got = multi_similarity_loss(z, y, mining=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # With mining (ε = 0.1): the negative at S=0 is not within ε of the positive at S=1.
    assert multi_similarity_loss(z, y).item() == 0.0


def test_module_and_bad_inputs():
    loss = MultiSimilarityLoss(alpha=1.0, mining=False)
    x, y = batch(seed=23)
    out = loss.compute(x, y)
    assert out.terms == {} and out.loss.shape == ()
    assert "mining=False" in repr(loss)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        MultiSimilarityLoss(alpha=0.0)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        MultiSimilarityLoss(epsilon=-1.0)
    with pytest.raises(TypeError, match="mining must be a bool"):
        MultiSimilarityLoss(mining="yes")
