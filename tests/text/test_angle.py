import pytest
import torch

from embedloss import AnglELoss
from embedloss.functional import angle_loss, cosent_loss
from embedloss.ops.ranking import angle_similarity
from tests.helpers import assert_close_with_grads, randn64
from tests.text.oracles import angle_similarities, cosent_oracle, ibn_oracle, pair_cosines

ONLY = {
    "cosine": dict(ibn_weight=0.0, angle_weight=0.0),
    "ibn": dict(cosine_weight=0.0, angle_weight=0.0),
    "angle": dict(cosine_weight=0.0, ibn_weight=0.0),
}


def _pairs(n=6, d=8, seed=0):
    a = randn64(n, d, seed=seed)
    b = (a.detach() + randn64(n, d, seed=seed + 1, requires_grad=False)).requires_grad_(True)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.4, 1.0, 0.7][:n], dtype=torch.float64)
    return a, b, scores


def test_angle_similarity_is_the_official_formula():
    a, b, _ = _pairs()
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)  # a scalar of the six values
    got, expected = angle_similarity(a, b), torch.stack(angle_similarities(a, b))
    assert_close_with_grads((got * w).sum(), (expected * w).sum(), (a, b))
    torch.testing.assert_close(got, expected)


def test_each_part_matches_its_oracle():
    a, b, scores = _pairs()
    cos = cosent_oracle(pair_cosines(a, b), scores, 5.0)
    got = angle_loss(a, b, scores, cosine_scale=5.0, **ONLY["cosine"])
    assert_close_with_grads(got, cos, (a, b))
    # The official angle_loss (and sentence-transformers' AnglELoss): CoSENT of the angle
    # similarity, ranked like a cosine (a higher score wants a higher value).
    angle = cosent_oracle(angle_similarities(a, b), scores, 7.0)
    assert_close_with_grads(
        angle_loss(a, b, scores, angle_scale=7.0, **ONLY["angle"]), angle, (a, b)
    )
    # AnglE's in-batch negatives over the 2N texts: pairs scored >= 1 are the positives (AnglE's
    # label 1); AnglE divides the sum by all 2N texts, we by the texts of positive pairs.
    positive = [bool(s >= 1.0) for s in scores]
    ibn_sum = ibn_oracle(a, b, positive, 3.0)
    got = angle_loss(a, b, scores, ibn_scale=3.0, **ONLY["ibn"])
    assert_close_with_grads(got, ibn_sum / (2 * sum(positive)), (a, b))
    assert_close_with_grads(got * (2 * sum(positive)) / 12, ibn_sum / 12, (a, b))  # AnglE's mean


def test_weighted_sum_terms_and_threshold():
    a, b, scores = _pairs(seed=2)
    loss = AnglELoss(cosine_weight=0.5, ibn_weight=2.0, angle_weight=0.02, ibn_threshold=0.5)
    out = loss.compute(a, b, scores)
    parts = {k: angle_loss(a, b, scores, ibn_threshold=0.5, **ONLY[k]) for k in ONLY}
    expected = 0.5 * parts["cosine"] + 2.0 * parts["ibn"] + 0.02 * parts["angle"]
    torch.testing.assert_close(out.loss, expected)
    assert set(out.terms) == {"cosine", "ibn", "angle"}
    torch.testing.assert_close(out.terms["ibn"], parts["ibn"].float())
    # No positive pair: the in-batch part is 0, not NaN.
    none = angle_loss(a, b, scores * 0.1, **ONLY["ibn"])
    assert none.item() == 0.0
    # The cosine part alone is CoSENT.
    torch.testing.assert_close(
        angle_loss(a, b, scores, **ONLY["cosine"]), cosent_loss(a, b, scores)
    )
    assert "weights=(0.5, 2.0, 0.02)" in repr(loss)


def test_bad_inputs():
    a, b, scores = _pairs()
    with pytest.raises(ValueError, match="angle needs an even embedding dimension"):
        angle_loss(a[:, :7], b[:, :7], scores)
    with pytest.raises(ValueError, match="ibn_weight must be a finite number >= 0"):
        AnglELoss(ibn_weight=-1.0)
    with pytest.raises(ValueError, match="angle_scale must be a finite number > 0"):
        AnglELoss(angle_scale=0.0)
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        AnglELoss(gather_distributed=None)
    with pytest.raises(ValueError, match="scores must have shape"):
        angle_loss(a, b, scores[:2])
