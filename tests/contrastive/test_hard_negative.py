import math

import pytest
import torch

from embedloss import HardNegativeLoss, create_loss
from embedloss.functional import clip_loss, hard_negative_loss
from embedloss.ops.info_nce import symmetric_info_nce
from tests.contrastive.oracles import hard_negative_oracle
from tests.helpers import assert_close_with_grads, randn64

STRATEGIES = ["none", "hard", "semi_hard", "beta"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_float64_oracle_value_and_gradient(strategy):
    a, b = randn64(6, 5, seed=1), randn64(6, 5, seed=2)
    # margin 0.5 so that the semi-hard window holds some negatives of these random pairs
    opts = dict(hard_negative_factor=3.0, percentile=0.7, margin=0.5, beta=2.0)
    fast = hard_negative_loss(a, b, temperature=0.3, strategy=strategy, **opts)
    slow = hard_negative_oracle(a, b, 0.3, strategy, 3.0, 0.7, 0.5, 2.0)
    assert_close_with_grads(fast, slow, (a, b))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_labels_match_oracle_and_distinct_labels_reproduce_label_free(strategy):
    a, b = randn64(6, 4, seed=3), randn64(6, 4, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    fast = hard_negative_loss(a, b, temperature=0.5, strategy=strategy, margin=0.5, labels=labels)
    assert_close_with_grads(
        fast, hard_negative_oracle(a, b, 0.5, strategy, margin=0.5, labels=labels), (a, b)
    )
    distinct = torch.arange(6) * 3
    torch.testing.assert_close(
        hard_negative_loss(a, b, strategy=strategy, labels=distinct),
        hard_negative_loss(a, b, strategy=strategy),
        rtol=1e-12,
        atol=1e-12,
    )


def test_strategy_none_equals_clip():
    a, b = randn64(7, 5, seed=5), randn64(7, 5, seed=6)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 4])
    for kw in ({}, {"labels": labels}):
        fast = HardNegativeLoss(temperature=0.1, strategy="none")(a, b, **kw)
        assert_close_with_grads(fast, clip_loss(a, b, temperature=0.1, **kw), (a, b), tol=1e-12)
    per_pair = HardNegativeLoss(strategy="none", reduction="none")(a, b)
    torch.testing.assert_close(per_pair, clip_loss(a, b, reduction="none"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["hard", "semi_hard"])
@pytest.mark.parametrize("seed", range(4))
def test_up_weighting_never_lowers_the_loss(strategy, seed):
    a, b = (
        randn64(8, 4, seed=10 + seed, requires_grad=False),
        randn64(8, 4, seed=20 + seed, requires_grad=False),
    )
    base = hard_negative_loss(a, b, strategy="none", reduction="none")
    previous = base
    for factor in (1.0, 1.5, 3.0, 10.0):
        loss = hard_negative_loss(
            a, b, strategy=strategy, hard_negative_factor=factor, margin=0.5, reduction="none"
        )
        assert torch.all(loss >= previous - 1e-12)
        previous = loss
    assert torch.equal(
        hard_negative_loss(a, b, strategy=strategy, hard_negative_factor=1.0, reduction="none"),
        base,
    )


def test_closed_form_identical_embeddings():
    # Every similarity is 1: semi-hard finds nothing (s_ij < s_ii fails) and "hard" picks every
    # negative (all at the threshold): log(1 + f·(N−1)) per anchor.
    n, f = 5, 3.0
    z = torch.ones(n, 4, dtype=torch.float64)
    assert hard_negative_loss(z, z, strategy="semi_hard").item() == pytest.approx(
        math.log(n), rel=1e-12
    )
    hard = hard_negative_loss(z, z, strategy="hard", hard_negative_factor=f)
    assert hard.item() == pytest.approx(math.log(1 + f * (n - 1)), rel=1e-12)


@pytest.mark.parametrize("strategy", ["hard", "semi_hard", "beta"])
def test_each_direction_mines_its_own_anchor_rows(strategy):
    # b→a anchors are rows of b: their weights come from their own rows of cos(b, a), not from
    # the transposed a→b weights (which rank a text's negatives by the images' rows).
    a, b = randn64(6, 5, seed=30, requires_grad=False), randn64(6, 5, seed=31, requires_grad=False)
    ours = hard_negative_loss(a, b, strategy=strategy, margin=0.6, temperature=0.2)
    torch.testing.assert_close(
        ours, hard_negative_oracle(a, b, 0.2, strategy, margin=0.6), rtol=1e-12, atol=1e-12
    )
    na, nb = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    miner = HardNegativeLoss(strategy=strategy, margin=0.6)
    eye = torch.eye(6, dtype=torch.bool)
    weights = miner.negative_log_weights(na @ nb.T, eye)
    a2b, b2a = symmetric_info_nce(na, nb, 1 / 0.2, negative_log_weights=weights)
    transposed = (a2b.loss.mean() + b2a.loss.mean()) / 2
    own_rows = miner.negative_log_weights(nb @ na.T, eye)  # b's anchors mine their own rows
    b2a_own, _ = symmetric_info_nce(nb, na, 1 / 0.2, negative_log_weights=own_rows)
    torch.testing.assert_close(ours, (a2b.loss.mean() + b2a_own.loss.mean()) / 2)
    assert abs(ours.item() - transposed.item()) > 1e-3


def test_gradcheck():
    # The weights are constants of the graph; semi-hard ones are locally constant too, so the
    # finite differences see the same weights (beta's vary continuously: covered by the oracle).
    a, b = randn64(4, 3, seed=40), randn64(4, 3, seed=41)

    def loss(x, y):
        return hard_negative_loss(x, y, strategy="semi_hard", margin=0.5, hard_negative_factor=3.0)

    assert loss(a, b) > hard_negative_loss(a, b, strategy="none")  # some negatives are up-weighted
    assert torch.autograd.gradcheck(loss, (a, b))


def test_terms_reductions_and_registry():
    loss_fn = create_loss("hard_negative", strategy="hard", hard_negative_factor=2.0)
    a, b = torch.randn(10, 6), torch.randn(10, 6)
    out = loss_fn.compute(a, b)
    assert set(out.terms) == {
        "loss_a_to_b",
        "loss_b_to_a",
        "accuracy",
        "hard_negative_fraction",
        "temperature",
        "positive_similarity",
        "negative_similarity",
    }
    torch.testing.assert_close(out.loss, (out.terms["loss_a_to_b"] + out.terms["loss_b_to_a"]) / 2)
    # top 10% of 9 negatives per row, linear quantile: exactly one negative per row
    assert out.terms["hard_negative_fraction"].item() == pytest.approx(1 / 9)
    assert HardNegativeLoss(reduction="none")(a, b).shape == (10,)
    torch.testing.assert_close(
        HardNegativeLoss(reduction="sum")(a, b), HardNegativeLoss(reduction="none")(a, b).sum()
    )
    assert "strategy='semi_hard'" in repr(HardNegativeLoss())


def test_bfloat16_large_norms_tiny_temperature():
    a, b = 1e4 * torch.randn(6, 8), 1e4 * torch.randn(6, 8)
    out = HardNegativeLoss(temperature=1e-3, strategy="beta")(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(HardNegativeLoss(temperature=1e-3, normalize=False)(a, b))


def test_bad_inputs():
    a = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"z_a and z_b must have the same shape, got \(4, 3\) and \(5, 3\)"
    ):
        HardNegativeLoss()(a, torch.randn(5, 3))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(4,\) to match the batch, got \(3,\)"
    ):
        HardNegativeLoss()(a, a, torch.arange(3))
    with pytest.raises(
        ValueError,
        match="strategy must be one of 'none', 'hard', 'semi_hard', 'beta'; got 'semi-hard'",
    ):
        HardNegativeLoss(strategy="semi-hard")
    with pytest.raises(
        ValueError, match=r"hard_negative_factor must be a finite number in \[1.0, inf\], got 0.5"
    ):
        HardNegativeLoss(hard_negative_factor=0.5)
    with pytest.raises(ValueError, match=r"percentile must be a finite number in \[0.0, 1.0\]"):
        hard_negative_loss(a, a, percentile=1.5)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        HardNegativeLoss(margin=-0.1)
