import math

import pytest
import torch
from pytorch_metric_learning.losses import NTXentLoss

from embedloss import SimCLRLoss, create_loss
from embedloss.functional import simclr_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.oracles import closed_form_identical_views_nt_xent, nt_xent_oracle


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_matches_float64_oracle_value_and_gradient(tau):
    a, b = randn64(5, 7, seed=1), randn64(5, 7, seed=2)
    assert_close_with_grads(simclr_loss(a, b, temperature=tau), nt_xent_oracle(a, b, tau), (a, b))


def test_labels_match_oracle_and_distinct_labels_reproduce_label_free():
    a, b = randn64(6, 4, seed=3), randn64(6, 4, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    assert_close_with_grads(
        simclr_loss(a, b, temperature=0.3, labels=labels), nt_xent_oracle(a, b, 0.3, labels), (a, b)
    )
    distinct = torch.arange(6) * 7
    torch.testing.assert_close(
        simclr_loss(a, b, temperature=0.3, labels=distinct),
        simclr_loss(a, b, temperature=0.3),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("n", [2, 4, 9])
def test_closed_form_identical_orthonormal_views(n):
    z = torch.eye(n, 16, dtype=torch.float64)
    expected = closed_form_identical_views_nt_xent(n, 0.5)
    assert simclr_loss(z, z, temperature=0.5).item() == pytest.approx(expected, rel=1e-12)


def test_parity_with_pytorch_metric_learning_ntxent():
    a, b = randn64(8, 6, seed=5), randn64(8, 6, seed=6)
    ref = NTXentLoss(temperature=0.2)(torch.cat([a, b]), torch.arange(8).repeat(2))
    torch.testing.assert_close(simclr_loss(a, b, temperature=0.2), ref, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    a, b = randn64(4, 3, seed=7), randn64(4, 3, seed=8)
    assert torch.autograd.gradcheck(lambda x, y: simclr_loss(x, y, temperature=0.4), (a, b))


def test_invariant_to_input_scale_and_batch_permutation():
    a, b = randn64(6, 5, seed=9, requires_grad=False), randn64(6, 5, seed=10, requires_grad=False)
    perm = torch.randperm(6)
    base = simclr_loss(a, b)
    torch.testing.assert_close(simclr_loss(3.0 * a, 0.5 * b), base)
    torch.testing.assert_close(simclr_loss(a[perm], b[perm]), base)


def test_reductions_and_alias():
    a, b = randn64(5, 4, seed=11, requires_grad=False), randn64(5, 4, seed=12, requires_grad=False)
    per_anchor = SimCLRLoss(reduction="none")(a, b)
    assert per_anchor.shape == (10,)
    torch.testing.assert_close(SimCLRLoss(reduction="sum")(a, b), per_anchor.sum())
    torch.testing.assert_close(create_loss("nt_xent")(a, b), per_anchor.mean())


def test_learnable_temperature_gets_gradient_and_terms():
    loss = SimCLRLoss(temperature=0.2, learnable_temperature=True)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    out = loss.compute(a, b)
    out.loss.backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)
    assert out.terms["temperature"].item() == pytest.approx(0.2, rel=1e-6)
    assert 0.0 <= out.terms["accuracy"].item() <= 1.0


def test_accuracy_term_is_one_for_perfect_pairs():
    z = torch.eye(6, 10)
    assert SimCLRLoss(temperature=0.1).compute(z, z).terms["accuracy"].item() == 1.0


def test_tiny_temperature_large_norms_is_finite():
    a, b = 1e4 * torch.randn(8, 16), 1e4 * torch.randn(8, 16)
    assert torch.isfinite(SimCLRLoss(temperature=1e-3)(a, b))
    assert torch.isfinite(SimCLRLoss(temperature=1e-3, normalize=False)(a, b))


def test_bfloat16_computed_in_float32():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    out = SimCLRLoss()(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(
        SimCLRLoss()(a.bfloat16().float(), b.bfloat16().float()).item(), rel=1e-6
    )


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (
            (torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            r"z_a and z_b must have the same shape, got \(4, 3\) and \(5, 3\)",
        ),
        (
            (torch.randn(4), torch.randn(4)),
            ValueError,
            r"z_a must have shape \(N, D\), got shape \(4,\)",
        ),
        (
            (torch.randn(0, 3), torch.randn(0, 3)),
            ValueError,
            "z_a must contain at least one sample",
        ),
        (([[1.0]], torch.randn(1, 1)), TypeError, "z_a must be a torch.Tensor, got list"),
        (
            (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
            TypeError,
            "floating-point",
        ),
    ],
)
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        SimCLRLoss()(*args)


def test_bad_labels_and_options():
    a = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"labels must have shape \(4,\) to match the batch, got \(3,\)"
    ):
        SimCLRLoss()(a, a, torch.arange(3))
    with pytest.raises(TypeError, match="labels must be an integer or bool tensor"):
        SimCLRLoss()(a, a, torch.rand(4))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            SimCLRLoss(temperature=bad)
    with pytest.raises(
        ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        SimCLRLoss(reduction="avg")
