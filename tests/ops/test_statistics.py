"""Batch statistics (embedloss.ops.statistics) against torch's own estimators and loop oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedloss.ops.distributed import all_reduce_with_grad
from embedloss.ops.statistics import (
    batch_count,
    batch_mean,
    batch_sum,
    center,
    check_enough_samples,
    correlation,
    covariance,
    cross_correlation,
    off_diagonal,
    standardize,
    variance,
)


def _x(n: int = 7, d: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # non-zero means and unequal scales, so centring and standardising both matter
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64)
        * torch.arange(1, d + 1, dtype=torch.float64)
        + 3.0
    )


def _loop_cov(x: torch.Tensor, correction: int) -> torch.Tensor:
    n, d = x.shape
    out = torch.zeros(d, d, dtype=x.dtype)
    for i in range(d):
        for j in range(d):
            mi, mj = sum(x[k, i] for k in range(n)) / n, sum(x[k, j] for k in range(n)) / n
            out[i, j] = sum((x[k, i] - mi) * (x[k, j] - mj) for k in range(n)) / (n - correction)
    return out


@pytest.mark.parametrize("correction", [0, 1])
def test_covariance_matches_torch_cov_and_a_loop(correction: int) -> None:
    x = _x()
    got = covariance(x, correction=correction)
    assert torch.allclose(got, torch.cov(x.T, correction=correction), atol=1e-12)
    assert torch.allclose(got, _loop_cov(x, correction), atol=1e-12)


@pytest.mark.parametrize("correction", [0, 1])
def test_variance_and_mean_match_torch(correction: int) -> None:
    x = _x()
    assert torch.allclose(variance(x, correction=correction), x.var(0, correction=correction))
    assert torch.allclose(batch_mean(x), x.mean(0))
    assert torch.allclose(batch_sum(x), x.sum(0))
    assert batch_count(x) == 7


def test_center_has_zero_column_means() -> None:
    x = _x()
    c = center(x)
    assert torch.allclose(c, x - x.mean(0))
    assert c.mean(0).abs().max() < 1e-12


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.3])
def test_standardize_is_batchnorm_in_training_mode(eps: float) -> None:
    x = _x()
    expected = F.batch_norm(x, None, None, training=True, eps=eps)
    assert torch.allclose(standardize(x, eps=eps), expected, atol=1e-12)


def test_standardize_unbiased_correction_and_unit_variance() -> None:
    x = _x()
    s = standardize(x, eps=0.0, correction=1)
    assert torch.allclose(s, (x - x.mean(0)) / x.std(0))
    assert torch.allclose(s.var(0), torch.ones(5, dtype=torch.float64))


def test_cross_correlation_against_a_loop_and_corrcoef() -> None:
    a, b = _x(seed=1), _x(seed=2)
    n, d = a.shape
    got = cross_correlation(a, b, eps=0.0)
    ma, mb, sa, sb = a.mean(0), b.mean(0), a.std(0, correction=0), b.std(0, correction=0)
    loop = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            loop[i, j] = (
                sum((a[k, i] - ma[i]) / sa[i] * (b[k, j] - mb[j]) / sb[j] for k in range(n)) / n
            )
    assert torch.allclose(got, loop, atol=1e-12)
    # Pearson correlations: the off-diagonal block of corrcoef of the stacked features
    assert torch.allclose(got, torch.corrcoef(torch.cat([a, b], 1).T)[:d, d:], atol=1e-12)
    assert torch.allclose(cross_correlation(a, a, eps=0.0).diagonal(), torch.ones(d, dtype=a.dtype))


def test_cross_correlation_eps_shrinks_towards_zero() -> None:
    a, b = _x(seed=1), _x(seed=2)
    eps = 0.5
    expected = F.batch_norm(a, None, None, training=True, eps=eps).T @ F.batch_norm(
        b, None, None, training=True, eps=eps
    )
    assert torch.allclose(cross_correlation(a, b, eps=eps), expected / a.shape[0], atol=1e-12)


@pytest.mark.parametrize("correction", [0, 1])
def test_correlation_is_corrcoef_at_zero_eps(correction: int) -> None:
    x = _x()
    got = correlation(x, eps=0.0, correction=correction)
    assert torch.allclose(got, torch.corrcoef(x.T), atol=1e-12)
    cov = torch.cov(x.T)
    d = (cov.diagonal() + 0.1).sqrt()
    assert torch.allclose(correlation(x, eps=0.1), cov / d.outer(d), atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_off_diagonal_is_the_masked_matrix_in_row_major_order(d: int) -> None:
    m = torch.randn(d, d, dtype=torch.float64)
    assert torch.equal(off_diagonal(m), m[~torch.eye(d, dtype=torch.bool)])
    assert off_diagonal(m).shape == (d * (d - 1),)


def test_off_diagonal_of_a_non_contiguous_matrix() -> None:
    m = torch.randn(4, 4, dtype=torch.float64).T
    assert not m.is_contiguous()
    assert torch.equal(off_diagonal(m), m[~torch.eye(4, dtype=torch.bool)])


def test_gradcheck_of_every_statistic() -> None:
    x = _x(n=5, d=3).requires_grad_()
    y = _x(n=5, d=3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: covariance(t), (x,))
    assert torch.autograd.gradcheck(lambda t: variance(t), (x,))
    assert torch.autograd.gradcheck(lambda t: standardize(t, eps=1e-3), (x,))
    assert torch.autograd.gradcheck(lambda t: correlation(t, eps=1e-3), (x,))
    assert torch.autograd.gradcheck(lambda s, t: cross_correlation(s, t), (x, y))
    assert torch.autograd.gradcheck(lambda t: off_diagonal(t @ t.T), (x,))


def test_distributed_flag_without_a_process_group_is_the_local_computation() -> None:
    x = _x()
    assert torch.equal(covariance(x, distributed=True), covariance(x))
    assert torch.equal(cross_correlation(x, x, distributed=True), cross_correlation(x, x))
    assert batch_count(x, distributed=True) == 7
    t = x.clone().requires_grad_()
    assert all_reduce_with_grad(t) is t
    assert all_reduce_with_grad(t, enabled=False) is t


def test_too_few_samples_for_a_variance() -> None:
    one = torch.randn(1, 4)
    with pytest.raises(ValueError, match=r"correction=1 needs at least 2 samples .* got N=1"):
        covariance(one)
    with pytest.raises(ValueError, match=r"correction=1 needs at least 2 samples"):
        variance(one)
    with pytest.raises(ValueError, match=r"correction=1 needs at least 2 samples"):
        correlation(one)
    with pytest.raises(
        ValueError, match=r"z must have at least 2 samples \(rows\) to estimate a variance, got N=1"
    ):
        check_enough_samples(one, "z")
    assert check_enough_samples(torch.randn(3, 2), "z") == 3
    # a biased variance of one sample is defined (zero): standardising gives zeros, not NaN
    assert torch.equal(standardize(one), torch.zeros(1, 4))


def test_bad_shapes_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(N, D\), got \(4,\)"):
        covariance(torch.randn(4))
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(N, D\), got list"):
        center([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"a and b must have the same shape \(N, D\)"):
        cross_correlation(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"b must be a batch of shape \(N, D\)"):
        cross_correlation(torch.randn(4, 3), torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1"):
        standardize(torch.randn(4, 3), eps=-1)
    with pytest.raises(ValueError, match=r"correction must be >= 0, got -1"):
        variance(torch.randn(4, 3), correction=-1)
    with pytest.raises(
        ValueError, match=r"off_diagonal needs a square \(D, D\) matrix, got \(2, 3\)"
    ):
        off_diagonal(torch.randn(2, 3))
    with pytest.raises(
        ValueError, match=r"off_diagonal needs a square \(D, D\) matrix, got \(3,\)"
    ):
        off_diagonal(torch.randn(3))


def test_boundary_helpers_check_and_cast() -> None:
    from embedloss.ops.statistics import prepare_views

    a, b = prepare_views(torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(4, 3))
    assert a.dtype == b.dtype == torch.float32
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape"):
        prepare_views(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        prepare_views(torch.randn(4, 3), torch.randn(4, 3), torch.arange(3))
    with pytest.raises(ValueError, match=r"z_a must have at least 2 samples"):
        prepare_views(torch.randn(1, 3), torch.randn(1, 3))


def test_hypersphere_kernels_match_the_official_formulas() -> None:
    from embedloss.ops.statistics import alignment_per_anchor, log_uniformity

    x, y = _x(6, 3, seed=5), _x(6, 3, seed=6)
    per = alignment_per_anchor(x, y, 1.5)
    assert torch.allclose(per.loss, (x - y).norm(dim=1).pow(1.5)) and bool(per.valid.all())
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grouped = alignment_per_anchor(x, y, 2.0, labels, labels)
    expected = torch.stack(
        [torch.cdist(x[i : i + 1], y[labels == labels[i]]).pow(2).mean() for i in range(6)]
    )
    assert torch.allclose(grouped.loss, expected)
    unif = torch.pdist(x).pow(2).mul(-2.0).exp().mean().log()
    assert torch.allclose(log_uniformity(x, 2.0), unif)
    with pytest.raises(ValueError, match=r"uniformity needs at least 2 embeddings, got 1"):
        log_uniformity(x[:1], 2.0)
