"""VICReg: loop oracle of the official code, parity with pytorch-metric-learning, warm-up schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import VICRegLoss as PMLVICRegLoss

from embedloss import create_loss
from embedloss.self_supervised import VICRegLoss, vicreg_loss
from embedloss.self_supervised.vicreg import vicreg_terms
from tests.self_supervised.selfsup_oracles import hadamard, vicreg_oracle


def _views(n: int = 6, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # small scale: several dimensions have std < 1, so the variance hinge is active
    a = 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    b = a + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, b


def _official(x: torch.Tensor, y: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """facebookresearch/vicreg main_vicreg.py VICReg.forward, single process, verbatim maths."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    off = ~torch.eye(num_features, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum().div(num_features) + cov_y[off].pow(2).sum().div(num_features)
    return sim * repr_loss + std * std_loss + cov * cov_loss


@pytest.mark.parametrize(
    ("n", "d", "coeffs", "eps"),
    [(6, 4, (25.0, 25.0, 1.0), 1e-4), (5, 3, (1.5, 0.7, 2.5), 0.01), (9, 1, (2.0, 3.0, 4.0), 1e-4)],
)
def test_value_and_gradient_match_the_loop_oracle(n, d, coeffs, eps) -> None:
    a, b = _views(n, d)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    sim, var, cov = coeffs
    got = vicreg_loss(a1, b1, sim_coeff=sim, var_coeff=var, cov_coeff=cov, eps=eps)
    ref, inv, v, c = vicreg_oracle(a2, b2, sim, var, cov, eps)
    assert abs(float((got - ref).detach())) < 1e-9
    assert float(v.detach()) > 0  # the hinge is active, so its gradient is tested too
    got.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=0, atol=1e-9)
    terms = vicreg_terms(a, b, eps=eps)
    for mine, theirs in zip(terms, (inv, v, c), strict=True):
        assert abs(float((mine - theirs).detach())) < 1e-9


def test_parity_with_the_official_code_and_pytorch_metric_learning() -> None:
    a, b = _views(16, 8, seed=3)
    ours = vicreg_loss(a, b)
    assert torch.allclose(ours, _official(a, b, 25.0, 25.0, 1.0), rtol=1e-12)
    pml = PMLVICRegLoss(invariance_lambda=25, variance_mu=25, covariance_v=1, eps=1e-4)
    assert torch.allclose(ours, pml(a, ref_emb=b), rtol=1e-12)


def test_identical_views_have_zero_invariance() -> None:
    a, _ = _views()
    terms = vicreg_terms(a, a.clone())
    assert float(terms.invariance) == 0.0
    assert float(terms.variance) > 0


def test_invariance_of_a_constant_shift_is_its_square() -> None:
    a, _ = _views()
    terms = vicreg_terms(a, a + 0.5)
    assert math.isclose(float(terms.invariance), 0.25, rel_tol=1e-12)
    # shifting a view changes neither its variance nor its covariance
    base = vicreg_terms(a, a)
    assert math.isclose(float(terms.variance), float(base.variance), rel_tol=1e-12)
    assert math.isclose(float(terms.covariance), float(base.covariance), rel_tol=1e-12)


def test_decorrelated_spread_out_identical_views_give_zero_loss() -> None:
    # Columns 1..4 of a Hadamard matrix are centred and orthogonal: covariance is diagonal with
    # variance 8·4/7 > 1 after scaling by 2, so every term is exactly 0.
    z = 2 * hadamard(8)[:, 1:5]
    assert float(vicreg_loss(z, z)) == 0.0


def test_collapsed_views_give_the_closed_form_variance() -> None:
    # Constant embeddings: var = 0, so each branch's hinge is 1 − sqrt(ε); no covariance.
    z = torch.full((5, 3), 0.7, dtype=torch.float64)
    terms = vicreg_terms(z, z.clone(), eps=1e-4)
    assert math.isclose(float(terms.variance), 1 - math.sqrt(1e-4), rel_tol=1e-12)
    assert float(terms.covariance) == 0.0
    assert math.isclose(float(vicreg_loss(z, z)), 25 * (1 - 0.01), rel_tol=1e-12)


def test_covariance_term_closed_form() -> None:
    # Two perfectly correlated dims with unbiased variances s², t²: C_01 = C_10 = s·t, so each
    # branch contributes 2·(s·t)²/D.
    x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)  # unbiased variance 1
    z = torch.cat([2 * x, 3 * x], dim=1)  # s = 2, t = 3
    terms = vicreg_terms(z, z)
    assert math.isclose(float(terms.covariance), 2 * (2 * 6.0**2 / 2), rel_tol=1e-12)


def test_module_matches_function_and_reports_terms() -> None:
    a, b = _views()
    loss = VICRegLoss(sim_coeff=3.0, var_coeff=2.0, cov_coeff=0.5, eps=1e-3)
    out = loss.compute(a, b)
    ref = vicreg_loss(a, b, sim_coeff=3.0, var_coeff=2.0, cov_coeff=0.5, eps=1e-3)
    assert torch.allclose(out.loss, ref, rtol=1e-14)
    assert torch.equal(loss(a, b), out.loss)
    assert set(out.terms) == {"invariance", "variance", "covariance", "warmup_factor"}
    assert all(t.dim() == 0 and not t.requires_grad for t in out.terms.values())
    assert float(out.terms["warmup_factor"]) == 1.0
    assert isinstance(create_loss("vicreg"), VICRegLoss)


def test_warmup_is_linear_and_reaches_the_full_weights() -> None:
    a, b = _views()
    inv, var, cov = (float(t) for t in vicreg_terms(a, b))
    loss = VICRegLoss(warmup_steps=4).double()
    factors = []
    for step in range(7):
        loss.update_step(step, total_steps=100)
        factors.append(loss.warmup_factor)
        expected = 25 * inv + min(step / 4, 1.0) * (25 * var + 1 * cov)
        assert math.isclose(float(loss(a, b)), expected, rel_tol=1e-12)
    assert factors == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # not capped at 0.5 (legacy defect)
    assert math.isclose(float(loss(a, b)), float(vicreg_loss(a, b)), rel_tol=1e-12)


def test_warmup_state_resumes_exactly_from_a_state_dict() -> None:
    a, b = _views()
    first = VICRegLoss(warmup_steps=10)
    first.update_step(3)
    saved = first.state_dict()
    assert int(saved["step"]) == 3
    resumed = VICRegLoss(warmup_steps=10)
    resumed.load_state_dict(saved)
    assert resumed.warmup_factor == first.warmup_factor == 0.3
    for step in (4, 5):
        first.update_step(step)
        resumed.update_step(step)
        assert torch.equal(first(a, b), resumed(a, b))
    fresh = VICRegLoss(warmup_steps=10)  # without the state the factor would be 0
    assert not torch.equal(fresh(a, b), resumed(a, b))


def test_gradcheck() -> None:
    a, b = _views(5, 3)
    args = (a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: vicreg_loss(x, y, eps=0.01), args)


def test_half_precision_is_computed_in_float32() -> None:
    a, b = _views(8, 4)
    out = vicreg_loss(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32
    ref = vicreg_loss(a.bfloat16().float(), b.bfloat16().float())
    assert torch.allclose(out, ref)


def test_gather_distributed_without_a_process_group_is_local() -> None:
    a, b = _views()
    assert torch.equal(vicreg_loss(a, b, gather_distributed=True), vicreg_loss(a, b))
    assert torch.equal(VICRegLoss(gather_distributed=True)(a, b), VICRegLoss()(a, b))


def test_bad_inputs_raise_clear_errors() -> None:
    a, b = _views()
    with pytest.raises(
        ValueError,
        match=r"z_a must have at least 2 samples \(rows\) to estimate a variance, got N=1",
    ):
        vicreg_loss(a[:1], b[:1])
    with pytest.raises(
        ValueError, match=r"z_a and z_b must have the same shape, got \(6, 4\) and \(6, 3\)"
    ):
        vicreg_loss(a, b[:, :3])
    with pytest.raises(ValueError, match=r"z_a must have shape \(N, D\), got shape \(6,\)"):
        vicreg_loss(a[:, 0], b[:, 0])
    with pytest.raises(TypeError, match=r"z_a must be a floating-point tensor"):
        vicreg_loss(a.long(), b.long())
    with pytest.raises(ValueError, match=r"sim_coeff must be a finite number >= 0, got -1"):
        vicreg_loss(a, b, sim_coeff=-1)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0"):
        VICRegLoss(eps=0)
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 0, got -1"):
        VICRegLoss(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"step must be >= 0, got -2"):
        VICRegLoss().update_step(-2)
    with pytest.raises(TypeError, match=r"gather_distributed must be a bool, got str 'yes'"):
        VICRegLoss(gather_distributed="yes")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"unknown argument\(s\) 'sim_coef' \(did you mean 'sim_coeff'\?\)"
    ):
        create_loss("vicreg", sim_coef=1.0)


def test_warmup_runs_on_the_meta_device() -> None:
    # The warm-up factor comes from the host copy of the step: no value is read on the step path.
    loss = VICRegLoss(warmup_steps=4).to("meta")
    loss.update_step(2)
    a, b = (t.to("meta").requires_grad_() for t in _views())
    out = loss(a, b)
    out.backward()
    assert out.device.type == "meta" and a.grad is not None
    terms = loss.compute(a, b).terms
    assert all(t.device.type == "meta" for t in terms.values())
    assert loss.warmup_factor == 0.5


def test_options_are_checked_once_when_built() -> None:
    from embedloss.self_supervised.vicreg import VICRegOptions, vicreg

    with pytest.raises(ValueError, match=r"cov_coeff must be a finite number >= 0, got -2"):
        VICRegOptions(cov_coeff=-2)
    options = VICRegOptions(sim_coeff=3.0, var_coeff=2.0, cov_coeff=0.5, eps=1e-3)
    a, b = _views()
    loss = VICRegLoss(sim_coeff=3.0, var_coeff=2.0, cov_coeff=0.5, eps=1e-3)
    assert loss.options == options and loss.sim_coeff == 3.0
    value, terms = vicreg(a, b, options, warmup=0.25)
    expected = 3.0 * terms.invariance + 0.25 * (2.0 * terms.variance + 0.5 * terms.covariance)
    assert torch.allclose(value, expected, rtol=1e-14)
