"""Decorrelation loss: loop oracle, torch.corrcoef/torch.cov parity, collapse statistics."""

from __future__ import annotations

import math

import pytest
import torch

from embedloss import create_loss
from embedloss.ops.similarity import l2_normalize
from embedloss.self_supervised import DecorrelationLoss, decorrelation_loss
from tests.self_supervised.selfsup_oracles import decorrelation_oracle, hadamard


def _z(n: int = 9, d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    mix = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    return base @ mix + 2.0  # correlated features with a non-zero mean


@pytest.mark.parametrize("use_correlation", [True, False])
@pytest.mark.parametrize(("n", "d", "eps"), [(9, 4, 1e-5), (5, 3, 0.2)])
def test_value_and_gradient_match_the_loop_oracle(use_correlation, n, d, eps) -> None:
    z = _z(n, d)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = decorrelation_loss(z1, use_correlation=use_correlation, eps=eps)
    ref = decorrelation_oracle(z2, use_correlation, eps)
    assert abs(float((got - ref).detach())) < 1e-9
    got.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-9)


def test_parity_with_torch_corrcoef_and_cov() -> None:
    z = _z(12, 5)
    off = ~torch.eye(5, dtype=torch.bool)
    corr = torch.corrcoef(z.T)[off].pow(2).mean()
    cov = torch.cov(z.T)[off].pow(2).mean()
    assert torch.allclose(decorrelation_loss(z, eps=1e-14), corr, rtol=1e-10)
    assert torch.allclose(decorrelation_loss(z, use_correlation=False), cov, rtol=1e-12)


def test_closed_forms() -> None:
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    # perfectly (anti-)correlated pair: R_01² = 1 on both off-diagonal entries
    assert math.isclose(
        float(decorrelation_loss(torch.cat([x, -3 * x], 1), eps=1e-14)), 1.0, rel_tol=1e-9
    )
    # orthogonal centred columns: no correlation at all
    assert float(decorrelation_loss(hadamard(8)[:, 1:6])) == 0.0
    # one feature has no pairs: 0, not NaN
    assert float(decorrelation_loss(x)) == 0.0
    # correlation is scale-invariant, covariance scales with the fourth power
    z = _z()
    assert torch.allclose(decorrelation_loss(10 * z, eps=1e-14), decorrelation_loss(z, eps=1e-14))
    assert torch.allclose(
        decorrelation_loss(10 * z, use_correlation=False),
        1e4 * decorrelation_loss(z, use_correlation=False),
        rtol=1e-12,
    )


def test_collapse_statistics() -> None:
    z = _z(10, 4)
    z[:, 1] = 5.0  # collapsed dimension
    z[:, 3] = 1e-3 * z[:, 3]  # nearly collapsed: variance ~1e-6
    out = DecorrelationLoss().compute(z)
    var = z.var(0)
    assert float(out.terms["low_variance_fraction"]) == 0.5
    assert math.isclose(float(out.terms["min_variance"]), 0.0, abs_tol=1e-12)
    assert math.isclose(float(out.terms["mean_variance"]), float(var.mean()), rel_tol=1e-6)
    assert set(out.terms) == {
        "decorrelation",
        "low_variance_fraction",
        "min_variance",
        "mean_variance",
    }
    assert torch.isfinite(out.loss)
    loose = DecorrelationLoss(low_variance_threshold=0.0).compute(z)
    assert float(loose.terms["low_variance_fraction"]) == 0.0


def test_two_branches_average_and_weight() -> None:
    a, b = _z(seed=1), _z(n=6, d=3, seed=2)  # e.g. two modalities of different sizes
    loss = DecorrelationLoss(weight=3.0)
    expected = 3.0 * (decorrelation_loss(a) + decorrelation_loss(b)) / 2
    assert torch.allclose(loss(a, b), expected, rtol=1e-14)
    assert torch.allclose(loss(a), 3.0 * decorrelation_loss(a), rtol=1e-14)
    var = torch.cat([a.var(0), b.var(0)])
    assert math.isclose(
        float(loss.compute(a, b).terms["mean_variance"]), float(var.mean()), rel_tol=1e-6
    )
    assert isinstance(create_loss("decorrelation", weight=0.5), DecorrelationLoss)


def test_normalize_option_l2_normalises_rows_first() -> None:
    z = _z()
    assert torch.allclose(
        decorrelation_loss(z, normalize=True), decorrelation_loss(l2_normalize(z)), rtol=1e-14
    )
    assert torch.allclose(DecorrelationLoss(normalize=True)(z), decorrelation_loss(l2_normalize(z)))


def test_gradcheck_and_half_precision() -> None:
    z = _z(6, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: decorrelation_loss(t, eps=0.01), (z,))
    assert torch.autograd.gradcheck(lambda t: decorrelation_loss(t, use_correlation=False), (z,))
    out = DecorrelationLoss()(z.detach().bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_bad_inputs_raise_clear_errors() -> None:
    z = _z()
    with pytest.raises(
        ValueError, match=r"z must have at least 2 samples \(rows\) to estimate a variance, got N=1"
    ):
        decorrelation_loss(z[:1])
    with pytest.raises(ValueError, match=r"z_b must have at least 2 samples"):
        DecorrelationLoss()(z, z[:1])
    with pytest.raises(ValueError, match=r"z_a must have shape \(N, D\), got shape \(9,\)"):
        DecorrelationLoss()(z[:, 0])
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -1"):
        DecorrelationLoss(weight=-1)
    with pytest.raises(TypeError, match=r"use_correlation must be a bool, got int 1"):
        DecorrelationLoss(use_correlation=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"normalize must be a bool"):
        decorrelation_loss(z, normalize="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0"):
        decorrelation_loss(z, eps=0)
