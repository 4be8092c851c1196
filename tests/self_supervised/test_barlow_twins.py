"""Barlow Twins: loop oracle of Eq. 1, parity with the official BatchNorm code, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from embedloss import create_loss
from embedloss.ops.statistics import cross_correlation
from embedloss.self_supervised import BarlowTwinsLoss, barlow_twins_loss
from embedloss.self_supervised.barlow_twins import barlow_twins_terms
from tests.self_supervised.selfsup_oracles import barlow_twins_oracle, hadamard

TINY = 1e-12  # ε small enough that standardised ±1 columns have C entries exact to 1e-12


def _views(n: int = 7, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + 1.0
    b = a + torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize(
    ("n", "d", "lam", "eps"), [(7, 4, 5e-3, 1e-5), (5, 3, 0.7, 0.1), (4, 1, 1.0, 1e-5)]
)
def test_value_and_gradient_match_the_loop_oracle(n, d, lam, eps) -> None:
    a, b = _views(n, d)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = barlow_twins_loss(a1, b1, lambda_coeff=lam, eps=eps)
    ref, on, off = barlow_twins_oracle(a2, b2, lam, eps)
    assert abs(float((got - ref).detach())) < 1e-9
    got.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=0, atol=1e-9)
    terms = barlow_twins_terms(a, b, eps=eps)
    assert abs(float(terms.on_diagonal - on.detach())) < 1e-9
    assert abs(float(terms.off_diagonal - off.detach())) < 1e-9


def test_parity_with_the_official_batchnorm_implementation() -> None:
    # facebookresearch/barlowtwins main.py: c = bn(z1).T @ bn(z2) / batch_size with
    # bn = BatchNorm1d(affine=False); on_diag = Σ(diag(c) − 1)²; off_diag = Σ off(c)²
    a, b = _views(16, 6, seed=5)
    bn = nn.BatchNorm1d(6, affine=False).double().train()
    c = bn(a).T @ bn(b) / 16
    on = (c.diagonal() - 1).pow(2).sum()
    off = c[~torch.eye(6, dtype=torch.bool)].pow(2).sum()
    expected = on + 0.0051 * off
    assert torch.allclose(barlow_twins_loss(a, b, lambda_coeff=0.0051), expected, rtol=1e-12)


def test_algorithm_1_unbiased_std_differs_by_the_factor_n_over_n_minus_1() -> None:
    # Algorithm 1 of the paper normalises with z.std(0) (unbiased); the official code and this
    # library use BatchNorm's biased std, which makes C a correlation matrix (C = I reachable).
    a, b = _views(9, 3, seed=2)
    n = a.shape[0]
    za = (a - a.mean(0)) / a.std(0)
    zb = (b - b.mean(0)) / b.std(0)
    c_alg1 = za.T @ zb / n
    assert torch.allclose(cross_correlation(a, b, eps=0.0), c_alg1 * n / (n - 1), rtol=1e-12)
    assert torch.allclose(cross_correlation(a, a, eps=0.0).diagonal(), torch.ones(3, dtype=a.dtype))


# Closed forms. Columns 1.. of the Sylvester Hadamard matrix H (N = 8) are ±1, centred and
# mutually orthogonal: each has biased variance 1, so it is already standardised, and for two
# sets of such columns C = z_aᵀ z_b / N is exactly the matrix of their inner products / N.
H = hadamard(8)


def test_standardised_uncorrelated_features_give_d() -> None:
    # z_a, z_b standardised with zero sample cross-covariance (independent at the sample
    # level): C = 0, so L = Σ_i (1 − 0)² + λ·0 = D, whatever λ.
    z_a, z_b = H[:, 1:4], H[:, 4:7]
    for lam in (0.0, 5e-3, 3.0):
        assert math.isclose(
            float(barlow_twins_loss(z_a, z_b, lambda_coeff=lam, eps=TINY)), 3.0, rel_tol=1e-9
        )


def test_identical_and_negated_views() -> None:
    z = H[:, 1:5]
    assert float(barlow_twins_loss(z, z, eps=TINY)) < 1e-9  # C = I: the optimum is reached
    assert math.isclose(float(barlow_twins_loss(z, -z, eps=TINY)), 4 * 4, rel_tol=1e-9)  # C = −I


def test_permuted_features_give_d_plus_lambda_d() -> None:
    # z_b = z_a with columns cyclically permuted: C is the permutation matrix, with D ones off
    # the diagonal and zeros on it, so L = D + λ·D.
    z_a = H[:, 1:5]
    z_b = z_a[:, [1, 2, 3, 0]]
    got = barlow_twins_loss(z_a, z_b, lambda_coeff=0.25, eps=TINY)
    assert math.isclose(float(got), 4 + 0.25 * 4, rel_tol=1e-9)


@pytest.mark.parametrize("theta", [0.3, 1.0, 2.5])
def test_rotated_features_give_the_rotation_closed_form(theta: float) -> None:
    # z_b = z_a R for a block rotation R by θ on dims (0, 1) and (2, 3): z_b stays standardised
    # (R orthogonal) and C = R, so L = 4·(1 − cos θ)² + λ·4·sin² θ.
    c, s = math.cos(theta), math.sin(theta)
    block = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    rot = torch.block_diag(block, block)
    z_a = H[:, 1:5]
    lam = 0.1
    got = barlow_twins_loss(z_a, z_a @ rot, lambda_coeff=lam, eps=TINY)
    assert math.isclose(float(got), 4 * (1 - c) ** 2 + lam * 4 * s**2, rel_tol=1e-9)


def test_invariant_to_per_dimension_affine_maps() -> None:
    a, b = _views()
    scale = torch.tensor([0.5, 3.0, 10.0, 0.1], dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    base = barlow_twins_loss(a, b, eps=TINY)
    assert torch.allclose(barlow_twins_loss(a * scale + shift, b, eps=TINY), base, rtol=1e-9)
    assert torch.allclose(barlow_twins_loss(a, b * scale - shift, eps=TINY), base, rtol=1e-9)


def test_module_returns_a_tensor_and_terms() -> None:
    a, b = _views()
    loss = BarlowTwinsLoss(lambda_coeff=0.02)
    out = loss.compute(a, b)
    assert isinstance(loss(a, b), torch.Tensor) and loss(a, b).dim() == 0
    assert torch.equal(out.loss, barlow_twins_loss(a, b, lambda_coeff=0.02))
    assert set(out.terms) == {"on_diagonal", "off_diagonal"}
    assert torch.allclose(
        out.loss.float(), out.terms["on_diagonal"] + 0.02 * out.terms["off_diagonal"]
    )
    assert isinstance(create_loss("barlow_twins", lambda_coeff=0.1), BarlowTwinsLoss)


def test_gradcheck() -> None:
    a, b = _views(5, 3)
    args = (a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: barlow_twins_loss(x, y, lambda_coeff=0.3), args)


def test_half_precision_and_constant_dimensions_stay_finite() -> None:
    a, b = _views(8, 4)
    out = barlow_twins_loss(a.half(), b.half())
    assert out.dtype == torch.float32
    assert torch.allclose(out, barlow_twins_loss(a.half().float(), b.half().float()))
    flat = a.clone()
    flat[:, 0] = 3.0  # a collapsed dimension: var = 0, ε keeps it finite
    x = flat.requires_grad_()
    loss = barlow_twins_loss(x, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bad_inputs_raise_clear_errors() -> None:
    a, b = _views()
    with pytest.raises(
        ValueError,
        match=r"z_a must have at least 2 samples \(rows\) to estimate a variance, got N=1",
    ):
        barlow_twins_loss(a[:1], b[:1])
    with pytest.raises(
        ValueError, match=r"z_a and z_b must have the same shape, got \(7, 4\) and \(6, 4\)"
    ):
        barlow_twins_loss(a, b[:6])
    with pytest.raises(ValueError, match=r"z_b must have shape \(N, D\), got shape \(7, 4, 1\)"):
        BarlowTwinsLoss()(a, b[..., None])
    with pytest.raises(ValueError, match=r"lambda_coeff must be a finite number >= 0, got -0.1"):
        BarlowTwinsLoss(lambda_coeff=-0.1)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0.0"):
        barlow_twins_loss(a, b, eps=0.0)
