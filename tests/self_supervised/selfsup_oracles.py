"""Slow float64 oracles of the self-supervised losses, written element by element from the papers.

Every sum is an explicit Python loop over scalar tensor entries, so these share no vectorised
code (no covariance helper, no flatten trick, no matmul) with the library; autograd through the
loops gives the reference gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _mean(x: Tensor, d: int) -> Tensor:
    n = x.shape[0]
    total = x[0, d]
    for i in range(1, n):
        total = total + x[i, d]
    return total / n


def _cov_entry(x: Tensor, y: Tensor, i: int, j: int, mx: list[Tensor], my: list[Tensor]) -> Tensor:
    total = (x[0, i] - mx[i]) * (y[0, j] - my[j])
    for n in range(1, x.shape[0]):
        total = total + (x[n, i] - mx[i]) * (y[n, j] - my[j])
    return total


def vicreg_oracle(
    z_a: Tensor,
    z_b: Tensor,
    sim_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VICReg as in facebookresearch/vicreg ``main_vicreg.py`` (Bardes et al. 2022, Eqs. 1–6).

    repr_loss = mse(x, y); std = sqrt(var_unbiased + eps);
    std_loss = mean(relu(1 - std_x))/2 + mean(relu(1 - std_y))/2;
    cov = x_cᵀ x_c / (N - 1); cov_loss = Σ_{i≠j} cov_x² / D + Σ_{i≠j} cov_y² / D.
    Returns ``(loss, invariance, variance, covariance)``.
    """
    n, d = z_a.shape
    inv = (z_a[0, 0] - z_b[0, 0]) ** 2 * 0
    for i in range(n):
        for k in range(d):
            inv = inv + (z_a[i, k] - z_b[i, k]) ** 2
    inv = inv / (n * d)
    var_terms, cov_terms = [], []
    for z in (z_a, z_b):
        mu = [_mean(z, k) for k in range(d)]
        hinge = inv * 0
        for k in range(d):
            var_k = _cov_entry(z, z, k, k, mu, mu) / (n - 1)
            hinge = hinge + torch.relu(1 - torch.sqrt(var_k + eps))
        var_terms.append(hinge / d)
        off = inv * 0
        for i in range(d):
            for j in range(d):
                if i != j:
                    off = off + (_cov_entry(z, z, i, j, mu, mu) / (n - 1)) ** 2
        cov_terms.append(off / d)
    variance = var_terms[0] / 2 + var_terms[1] / 2
    covariance = cov_terms[0] + cov_terms[1]
    loss = sim_coeff * inv + var_coeff * variance + cov_coeff * covariance
    return loss, inv, variance, covariance


def cross_correlation_oracle(z_a: Tensor, z_b: Tensor, eps: float = 1e-5) -> list[list[Tensor]]:
    """``C_ij = (1/N)·Σ_n ẑ_a,ni·ẑ_b,nj`` with ``ẑ = (z − μ)/sqrt(σ² + ε)``, σ² biased (BatchNorm)."""
    n, d = z_a.shape
    ma = [_mean(z_a, k) for k in range(d)]
    mb = [_mean(z_b, k) for k in range(d)]
    sa = [torch.sqrt(_cov_entry(z_a, z_a, k, k, ma, ma) / n + eps) for k in range(d)]
    sb = [torch.sqrt(_cov_entry(z_b, z_b, k, k, mb, mb) / n + eps) for k in range(d)]
    return [
        [_cov_entry(z_a, z_b, i, j, ma, mb) / (n * sa[i] * sb[j]) for j in range(d)]
        for i in range(d)
    ]


def barlow_twins_oracle(
    z_a: Tensor, z_b: Tensor, lambda_coeff: float = 5e-3, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Zbontar et al. 2021, Eq. 1: ``Σ_i (1 − C_ii)² + λ·Σ_{i≠j} C_ij²``; returns (loss, on, off)."""
    c = cross_correlation_oracle(z_a, z_b, eps)
    d = len(c)
    on = (1 - c[0][0]) ** 2
    for i in range(1, d):
        on = on + (1 - c[i][i]) ** 2
    off = on * 0
    for i in range(d):
        for j in range(d):
            if i != j:
                off = off + c[i][j] ** 2
    return on + lambda_coeff * off, on, off


def decorrelation_oracle(z: Tensor, use_correlation: bool = True, eps: float = 1e-5) -> Tensor:
    """Mean of ``R_ij²`` over i ≠ j, ``R_ij = C_ij / sqrt((C_ii + ε)(C_jj + ε))`` (or ``C_ij``)."""
    n, d = z.shape
    mu = [_mean(z, k) for k in range(d)]
    cov = [[_cov_entry(z, z, i, j, mu, mu) / (n - 1) for j in range(d)] for i in range(d)]
    total = cov[0][0] * 0
    for i in range(d):
        for j in range(d):
            if i != j:
                entry = cov[i][j]
                if use_correlation:
                    entry = entry / torch.sqrt((cov[i][i] + eps) * (cov[j][j] + eps))
                total = total + entry**2
    return total / max(d * (d - 1), 1)


def negative_cosine_oracle(p: Tensor, z: Tensor) -> list[Tensor]:
    """Per-sample ``D(p, z) = −p·z / (‖p‖·‖z‖)`` with ``z`` detached (SimSiam Eq. 1)."""
    z = z.detach()
    out = []
    for i in range(p.shape[0]):
        dot, pp, zz = p[i, 0] * z[i, 0], p[i, 0] ** 2, z[i, 0] ** 2
        for k in range(1, p.shape[1]):
            dot, pp, zz = dot + p[i, k] * z[i, k], pp + p[i, k] ** 2, zz + z[i, k] ** 2
        out.append(-dot / (torch.sqrt(pp) * torch.sqrt(zz)))
    return out


def hadamard(n: int) -> Tensor:
    """Sylvester Hadamard matrix (n a power of 2): ±1 entries, ``HᵀH = n·I``, columns 1.. centred."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def close(a: Tensor | float, b: Tensor | float, tol: float = 1e-9) -> bool:
    """Relative/absolute closeness for float64 comparisons."""
    a, b = float(a), float(b)
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
