import math

import pytest
import torch

from embedloss import DCLLoss, DCLWLoss, create_loss
from embedloss.contrastive.dcl import von_mises_fisher_weights
from embedloss.functional import dcl_loss, dclw_loss, simclr_loss
from tests.contrastive.oracles import dcl_oracle
from tests.helpers import assert_close_with_grads, randn64


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_dcl_matches_float64_oracle_value_and_gradient(tau):
    a, b = randn64(5, 7, seed=1), randn64(5, 7, seed=2)
    assert_close_with_grads(dcl_loss(a, b, temperature=tau), dcl_oracle(a, b, tau), (a, b))


@pytest.mark.parametrize("sigma", [0.2, 0.5, 3.0])
def test_dclw_matches_float64_oracle_value_and_gradient(sigma):
    a, b = randn64(5, 7, seed=3), randn64(5, 7, seed=4)
    assert_close_with_grads(
        dclw_loss(a, b, temperature=0.3, sigma=sigma), dcl_oracle(a, b, 0.3, sigma), (a, b)
    )


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_labels_match_oracle_and_distinct_labels_reproduce_label_free(sigma):
    a, b = randn64(6, 4, seed=5), randn64(6, 4, seed=6)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    fn = dcl_loss if sigma is None else lambda x, y, **kw: dclw_loss(x, y, sigma=sigma, **kw)
    assert_close_with_grads(
        fn(a, b, temperature=0.4, labels=labels), dcl_oracle(a, b, 0.4, sigma, labels), (a, b)
    )
    torch.testing.assert_close(
        fn(a, b, temperature=0.4, labels=torch.arange(6) * 2),
        fn(a, b, temperature=0.4),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("n", [2, 3, 8])
def test_closed_form_identical_orthonormal_views(n):
    # Positive logit 1/τ, 2N − 2 negatives at logit 0: L = log(2N − 2) − 1/τ (for DCL and DCLW,
    # whose weights are all 1 when every pair is equally similar).
    z = torch.eye(n, 16, dtype=torch.float64)
    expected = math.log(2 * n - 2) - 1 / 0.5
    assert dcl_loss(z, z, temperature=0.5).item() == pytest.approx(expected, rel=1e-12)
    assert dclw_loss(z, z, temperature=0.5).item() == pytest.approx(expected, rel=1e-12)


def test_positive_is_decoupled_from_the_denominator():
    # NT-Xent = −s_pos + log(e^{s_pos} + Σ_neg), DCL = −s_pos + log Σ_neg, anchor by anchor.
    a, b = randn64(6, 5, seed=7, requires_grad=False), randn64(6, 5, seed=8, requires_grad=False)
    tau = 0.3
    nt = simclr_loss(a, b, temperature=tau, reduction="none")
    dcl = dcl_loss(a, b, temperature=tau, reduction="none")
    s_pos = torch.cat([torch.nn.functional.cosine_similarity(a, b)] * 2) / tau
    lse_neg_nt = nt + s_pos
    torch.testing.assert_close(
        torch.logaddexp(dcl + s_pos, s_pos), lse_neg_nt, rtol=1e-12, atol=1e-12
    )
    assert torch.all(dcl < nt)


def test_von_mises_fisher_weights():
    a, b = randn64(6, 4, seed=9, requires_grad=False), randn64(6, 4, seed=10, requires_grad=False)
    w = von_mises_fisher_weights(a, b, 0.5)
    cos = torch.nn.functional.cosine_similarity(a, b)
    expected = 2 - torch.exp(cos / 0.5) / torch.exp(cos / 0.5).mean()
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    # closer pairs get a smaller weight
    order = torch.argsort(cos)
    assert torch.all(w[order][1:] <= w[order][:-1])
    # detached: no gradient flows through the weights
    a.requires_grad_(True)
    assert not von_mises_fisher_weights(a, b).requires_grad


def test_gradcheck():
    a, b = randn64(4, 3, seed=11), randn64(4, 3, seed=12)
    assert torch.autograd.gradcheck(lambda x, y: dcl_loss(x, y, temperature=0.4), (a, b))
    # DCLW's weights are constants of the graph: check its gradient with them frozen
    w = torch.cat([von_mises_fisher_weights(a, b, 0.5)] * 2)

    def frozen(x, y):
        s_pos = torch.cat([torch.nn.functional.cosine_similarity(x, y)] * 2) / 0.4
        return (dcl_loss(x, y, temperature=0.4, reduction="none") + (1 - w) * s_pos).mean()

    torch.testing.assert_close(
        frozen(a, b), dclw_loss(a, b, temperature=0.4), rtol=1e-12, atol=1e-12
    )
    assert torch.autograd.gradcheck(frozen, (a, b))


def test_modules_terms_and_registry():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert isinstance(create_loss("dcl"), DCLLoss) and isinstance(create_loss("dclw"), DCLWLoss)
    out = DCLWLoss(temperature=0.2, sigma=0.3).compute(a, b)
    assert set(out.terms) == {"accuracy", "positive_similarity", "temperature"}
    torch.testing.assert_close(out.loss, dclw_loss(a, b, temperature=0.2, sigma=0.3))
    torch.testing.assert_close(DCLLoss(temperature=0.2)(a, b), dcl_loss(a, b, temperature=0.2))
    assert DCLLoss(reduction="none")(a, b).shape == (12,)
    torch.testing.assert_close(
        DCLWLoss(reduction="sum")(a, b), DCLWLoss(reduction="none")(a, b).sum()
    )
    assert "sigma=0.5" in repr(DCLWLoss())
    z = torch.eye(4, 8)
    assert DCLLoss(temperature=0.1).compute(z, z).terms["accuracy"].item() == 1.0


def test_single_pair_has_no_negatives_and_is_excluded_not_nan():
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    assert dcl_loss(a, b).item() == 0.0
    assert DCLWLoss(reduction="none")(a, b).tolist() == [0.0, 0.0]


def test_bfloat16_large_norms_tiny_temperature():
    a, b = 1e4 * torch.randn(6, 8), 1e4 * torch.randn(6, 8)
    out = DCLWLoss(temperature=1e-3)(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(DCLLoss(temperature=1e-3, normalize=False)(a, b))


def test_learnable_temperature_gets_gradient():
    loss_fn = DCLWLoss(learnable_temperature=True)
    loss_fn(torch.randn(5, 4), torch.randn(5, 4)).backward()
    assert loss_fn.logit_scale.grad is not None and torch.isfinite(loss_fn.logit_scale.grad)


def test_bad_inputs():
    a = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"z_a and z_b must have the same shape, got \(4, 3\) and \(4, 2\)"
    ):
        DCLLoss()(a, torch.randn(4, 2))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(4,\) to match the batch, got \(3,\)"
    ):
        DCLWLoss()(a, a, torch.arange(3))
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0"):
        DCLWLoss(sigma=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        dclw_loss(a, a, sigma=-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DCLLoss(temperature=-0.1)
    with pytest.raises(TypeError, match="z_a must be a floating-point tensor"):
        dcl_loss(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
