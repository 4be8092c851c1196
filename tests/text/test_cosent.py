import math

import pytest
import torch

from embedloss import CoSENTLoss, create_loss
from embedloss.functional import cosent_loss
from embedloss.ops.ranking import ranking_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.text.oracles import cosent_oracle, pair_cosines


def _pairs(n=9, d=6, seed=0):
    a, b = randn64(n, d, seed=seed), randn64(n, d, seed=seed + 1)
    scores = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.3, 0.5, 0.0, 1.0, 0.3][:n], dtype=torch.float64)
    return a, b, scores


@pytest.mark.parametrize("scale", [20.0, 1.0, 300.0])
def test_matches_sentence_transformers_formula(scale):
    a, b, scores = _pairs()  # ties in the scores give no term
    expected = cosent_oracle(pair_cosines(a, b), scores, scale)
    assert_close_with_grads(cosent_loss(a, b, scores, scale=scale), expected, (a, b))


def test_large_batch_in_linear_memory_matches_the_dense_formula():
    n = 2000
    g = torch.Generator().manual_seed(1)
    values = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_(True)
    scores = torch.randint(0, 6, (n,), generator=g).double()
    diff = 20.0 * (values[:, None] - values[None, :])
    masked = diff.masked_fill(~(scores[:, None] < scores[None, :]), float("-inf"))
    dense = torch.logsumexp(torch.cat([values.new_zeros(1), masked.flatten()]), dim=0)
    assert_close_with_grads(ranking_loss(values, scores, 20.0), dense, (values,), tol=1e-10)


def test_closed_forms_and_invariances():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cosines 1 and 0
    right = cosent_loss(a, b, torch.tensor([1.0, 0.0]), scale=1.0)
    wrong = cosent_loss(a, b, torch.tensor([0.0, 1.0]), scale=1.0)
    assert right.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert wrong.item() == pytest.approx(math.log(1 + math.e))
    assert cosent_loss(a, b, torch.tensor([2.0, 2.0])).item() == 0.0  # no ordered pair
    x, y, scores = _pairs(seed=3)
    base = cosent_loss(x, y, scores)
    torch.testing.assert_close(cosent_loss(3 * x, y, 7 * scores - 2), base)  # scale-free
    torch.testing.assert_close(cosent_loss(x, y, scores.exp()), base)  # only the order counts


def test_module_terms_and_errors():
    a, b, scores = _pairs()
    loss = create_loss("cosent", scale=10.0)
    assert isinstance(loss, CoSENTLoss) and "scale=10.0" in repr(loss)
    out = loss.compute(a, b, scores)
    torch.testing.assert_close(out.terms["cosine"], torch.stack(pair_cosines(a, b)).mean().float())
    torch.testing.assert_close(out.loss, cosent_loss(a, b, scores, scale=10.0))
    with pytest.raises(ValueError, match=r"scores must have shape \(9,\), one per pair"):
        loss(a, b, scores[:3])
    with pytest.raises(TypeError, match="scores must be real numbers"):
        loss(a, b, scores > 0.5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        loss(a, b, [0.1] * 9)
    with pytest.raises(ValueError, match="must have the same shape"):
        loss(a, b[:4], scores)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        CoSENTLoss(scale=0.0)
