"""Batch statistics of embeddings: centring, standardising, covariance, cross-correlation.

The one place the statistic losses (VICReg, Barlow Twins, decorrelation) compute their moments.
For a batch ``x (N, D)`` with mean ``μ = (1/N)·Σ_n x_n``:

    cov(x)  = Σ_n (x_n − μ)(x_n − μ)ᵀ / (N − c)              (D, D), correction c (1: unbiased)
    std(x)  = (x − μ) / sqrt(diag(cov(x)) + ε)                 (N, D), per-dimension standardised
    xcorr   = std(a)ᵀ std(b) / N                               (D, D), with c = 0 (BatchNorm's)

**Distributed.** With ``distributed=True`` and an initialised process group, every batch sum
(of rows, of centred products) and the count ``N`` are summed over ranks, so each rank computes
the statistics of the concatenated batch (uneven per-rank batch sizes are fine: sums and counts
are reduced, never means). Sums go through :func:`~embedloss.ops.distributed.all_reduce_with_grad`,
whose backward sums the gradients over ranks: a loss computed from these statistics has the
single-process value on every rank, and the gradient on each rank's local rows is
``world_size ×`` the single-process gradient, which DDP's averaging turns back into the
single-process gradient. Centring is two-pass (global mean first, then centred products), which
is exact and avoids the cancellation of ``E[xxᵀ] − μμᵀ``.

The hypersphere statistics of Wang & Isola (2020), per-anchor alignment and log-uniformity, are
here too, unchecked: :mod:`embedloss.metrics` checks them as metrics and
:class:`~embedloss.multimodal.AlignmentUniformityLoss` as a loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_int, check_pair, check_positive_float, compute_dtype
from embedloss.ops.anchors import AnchorLosses
from embedloss.ops.distributed import (
    all_reduce_max_no_grad,
    all_reduce_sum_no_grad,
    all_reduce_with_grad,
    gather_with_grad,
    world_info,
)
from embedloss.ops.similarity import positive_mask_from_labels, power_of_two_above

__all__ = [
    "Moments",
    "alignment_per_anchor",
    "batch_count",
    "batch_mean",
    "batch_sum",
    "center",
    "check_enough_samples",
    "correlation",
    "covariance",
    "cross_correlation",
    "log_uniformity",
    "moments",
    "off_diagonal",
    "prepare_views",
    "standardize",
    "variance",
]


def _check_batch(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batch of shape (N, D), got {shape}")


def batch_count(x: Tensor, *, distributed: bool = False) -> int:
    """Number of rows of ``x``, summed over ranks when ``distributed`` (a collective)."""
    world, _ = world_info(distributed)
    if world == 1:
        return int(x.shape[0])
    count = torch.tensor(x.shape[0], device=x.device, dtype=torch.long)
    return int(all_reduce_sum_no_grad(count).item())


def batch_sum(x: Tensor, *, distributed: bool = False) -> Tensor:
    """``Σ_n x_n`` over the first dimension, over all ranks when ``distributed`` (with gradient)."""
    return all_reduce_with_grad(x.sum(dim=0), distributed)


def _centered(
    x: Tensor, correction: int, distributed: bool, n: int | None = None
) -> tuple[Tensor, int]:
    """Checked ``x − μ`` ``(N, D)`` and the (global) N, which must exceed ``correction``."""
    _check_batch(x)
    n = batch_count(x, distributed=distributed) if n is None else n
    check_int(correction, "correction", low=0)
    if n - correction <= 0:
        raise ValueError(
            f"a variance with correction={correction} needs at least {correction + 1} samples "
            f"(rows) in the batch, got N={n}"
        )
    return x - batch_sum(x, distributed=distributed) / n, n


def batch_mean(x: Tensor, *, distributed: bool = False) -> Tensor:
    """Per-dimension mean ``(D,)`` of ``x (N, D)`` (over all ranks when ``distributed``).

    Example:
        >>> batch_mean(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 4.])
    """
    _check_batch(x)
    return batch_sum(x, distributed=distributed) / batch_count(x, distributed=distributed)


def center(x: Tensor, *, distributed: bool = False) -> Tensor:
    """``x − μ``: rows minus the (global) batch mean, shape ``(N, D)``.

    Example:
        >>> center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([[-1., -2.],
                [ 1.,  2.]])
    """
    return x - batch_mean(x, distributed=distributed)


def variance(x: Tensor, *, correction: int = 1, distributed: bool = False) -> Tensor:
    """Per-dimension variance ``(D,)``: ``Σ_n (x_n − μ)² / (N − correction)``.

    Raises:
        ValueError: If ``x`` is not ``(N, D)`` or ``N <= correction``.

    Example:
        >>> variance(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 8.])
    """
    xc, n = _centered(x, correction, distributed)
    return batch_sum(xc * xc, distributed=distributed) / (n - correction)


def covariance(x: Tensor, *, correction: int = 1, distributed: bool = False) -> Tensor:
    """Covariance matrix ``(D, D)``: ``Σ_n (x_n − μ)(x_n − μ)ᵀ / (N − correction)``.

    Equals ``torch.cov(x.T, correction=correction)`` on one process.

    Raises:
        ValueError: If ``x`` is not ``(N, D)`` or ``N <= correction``.

    Example:
        >>> covariance(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([[2., 4.],
                [4., 8.]])
    """
    xc, n = _centered(x, correction, distributed)
    return all_reduce_with_grad(xc.T @ xc, distributed) / (n - correction)  # (D, D)


def _scaled_centered(
    x: Tensor, correction: int, distributed: bool, n: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """``(x − μ)/k``, the per-dimension powers of two ``k (D,)`` and N, for scale-free statistics.

    ``k`` bounds each centred column to [0.5, 1) over all ranks, so its products neither
    overflow nor underflow; dividing by a power of two is exact, so ordinary inputs give the
    very same standardised values and correlations.
    """
    xc, n = _centered(x, correction, distributed, n)
    peak = xc.detach().abs().amax(0) if xc.shape[0] else xc.new_zeros(xc.shape[1:])
    if world_info(distributed)[0] > 1:
        peak = all_reduce_max_no_grad(peak)
    k = power_of_two_above(peak)
    return xc / k, k, n


def _standardize(
    x: Tensor, eps: float, correction: int, distributed: bool, n: int | None = None
) -> tuple[Tensor, int]:
    xs, k, n = _scaled_centered(x, correction, distributed, n)  # xs = (x − μ)/k
    var = batch_sum(xs * xs, distributed=distributed) / (n - correction)  # (D,) var/k²
    return xs * (var + eps / k.square()).rsqrt(), n


def standardize(
    x: Tensor, *, eps: float = 1e-5, correction: int = 0, distributed: bool = False
) -> Tensor:
    """Per-dimension batch standardisation ``(x − μ) / sqrt(var + ε)``, shape ``(N, D)``.

    With ``correction=0`` (default) this is ``BatchNorm1d(D, affine=False, eps=ε)`` in training
    mode. ``eps = 0`` is exact but divides by zero on a constant dimension.

    Raises:
        ValueError: If ``x`` is not ``(N, D)``, ``N <= correction`` or ``eps < 0``.

    Example:
        >>> standardize(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), eps=0.0)
        tensor([[-1., -1.],
                [ 1.,  1.]])
    """
    _check_batch(x)
    eps = check_positive_float(eps, "eps", allow_zero=True)
    return _standardize(x, eps, correction, distributed)[0]


def cross_correlation(
    a: Tensor, b: Tensor, *, eps: float = 1e-5, distributed: bool = False
) -> Tensor:
    """Cross-correlation ``C = std(a)ᵀ std(b) / N`` of two batches, shape ``(D, D)``.

    ``std`` is :func:`standardize` with the biased variance (BatchNorm's), so for ``ε → 0`` the
    entries are Pearson correlations in [−1, 1] and ``C_ii = 1`` when ``a = b``: Barlow Twins'
    matrix (Zbontar et al. 2021, Eq. 2).

    Raises:
        ValueError: If ``a`` and ``b`` are not ``(N, D)`` batches of the same shape, ``N < 1``
            or ``eps < 0``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
        >>> torch.allclose(cross_correlation(x, x, eps=0.0).diagonal(), torch.ones(2))
        True
    """
    _check_batch(a, "a")
    _check_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    eps = check_positive_float(eps, "eps", allow_zero=True)
    sa, n = _standardize(a, eps, 0, distributed)  # (N, D)
    sb, _ = _standardize(b, eps, 0, distributed, n)  # (N, D)
    return all_reduce_with_grad(sa.T @ sb, distributed) / n  # (D, D)


def correlation(
    x: Tensor, *, eps: float = 1e-5, correction: int = 1, distributed: bool = False
) -> Tensor:
    """Correlation matrix ``cov_ij / sqrt((cov_ii + ε)(cov_jj + ε))``, shape ``(D, D)``.

    With ``eps = 0`` it equals ``torch.corrcoef(x.T)`` (the correction then cancels).

    Raises:
        ValueError: If ``x`` is not ``(N, D)``, ``N <= correction`` or ``eps < 0``.

    Example:
        >>> correlation(torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 4.0]]), eps=0.0)
        tensor([[1., 1.],
                [1., 1.]])
    """
    return moments(x, eps=eps, correction=correction, distributed=distributed).correlation


class Moments(NamedTuple):
    """The covariance ``(D, D)`` of a batch and its correlation matrix ``(D, D)``."""

    covariance: Tensor
    correlation: Tensor


def moments(
    x: Tensor, *, eps: float = 1e-5, correction: int = 1, distributed: bool = False
) -> Moments:
    """:func:`covariance` and :func:`correlation` of ``x (N, D)`` from one pass over the batch.

    The correlation is computed from columns scaled by powers of two (exactly), so it is
    right at any scale of ``x``, even one whose covariance overflows (``cov_ij/(k_i·k_j)``
    against ``(ε/k_i²)``, the same ratio).

    Raises:
        ValueError: If ``x`` is not ``(N, D)``, ``N <= correction`` or ``eps < 0``.
    """
    eps = check_positive_float(eps, "eps", allow_zero=True)
    xs, k, n = _scaled_centered(x, correction, distributed)  # xs = (x − μ)/k
    scaled = all_reduce_with_grad(xs.T @ xs, distributed) / (n - correction)  # cov/(k kᵀ)
    inv_std = (scaled.diagonal() + eps / k.square()).rsqrt()  # (D,)
    correlation = scaled * inv_std.unsqueeze(1) * inv_std.unsqueeze(0)
    return Moments(scaled * k.unsqueeze(1) * k.unsqueeze(0), correlation)


def off_diagonal(m: Tensor) -> Tensor:
    """The ``D·(D−1)`` off-diagonal entries of a square ``(D, D)`` matrix, flattened (row-major).

    Vectorised by the flatten trick: dropping the last element of the flattened matrix and
    viewing the rest as ``(D−1, D+1)`` puts every diagonal entry in column 0.

    Raises:
        ValueError: If ``m`` is not a square matrix.

    Example:
        >>> off_diagonal(torch.arange(9.0).reshape(3, 3))
        tensor([1., 2., 3., 5., 6., 7.])
    """
    if not isinstance(m, Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"off_diagonal needs a square (D, D) matrix, got {shape}")
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def check_enough_samples(
    x: Tensor, name: str, *, minimum: int = 2, distributed: bool = False
) -> int:
    """Return the (global) batch size of ``x``, raising if it is below ``minimum``.

    Statistic losses estimate a per-dimension variance, which needs at least two samples.

    Raises:
        ValueError: If the batch (summed over ranks when ``distributed``) has < ``minimum`` rows.
    """
    n = batch_count(x, distributed=distributed)
    if n < minimum:
        where = " summed over all ranks" if world_info(distributed)[0] > 1 else ""
        raise ValueError(
            f"{name} must have at least {minimum} samples (rows) to estimate a variance, "
            f"got N={n}{where}"
        )
    return n


def prepare_views(
    z_a: Tensor, z_b: Tensor, labels: Tensor | None = None, *, distributed: bool = False
) -> tuple[Tensor, Tensor]:
    """Checked paired views ``(N, D)`` with N >= 2 (over all ranks), in their common dtype.

    The boundary of the statistic losses of two views (VICReg, Barlow Twins, the hybrid);
    ``labels (N,)``, if given, are checked against the batch.
    """
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    check_enough_samples(z_a, "z_a", distributed=distributed)
    dtype = compute_dtype(z_a, z_b)
    return z_a.to(dtype), z_b.to(dtype)


def _safe_pow(d: Tensor, alpha: float) -> Tensor:
    """``d**alpha`` for distances ``d >= 0`` with gradient 0 (not NaN) where ``d == 0``."""
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).pow(alpha), torch.zeros_like(d))


def _exact_cdist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ``(N, M)`` computed from differences (no ``‖a‖²+‖b‖²−2a·b`` rounding)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def alignment_per_anchor(
    x: Tensor,
    y: Tensor,
    alpha: float,
    labels: Tensor | None = None,
    key_labels: Tensor | None = None,
) -> AnchorLosses:
    """``‖x_i − y_i‖₂^α`` per anchor, or with labels the mean over ``y_j`` of ``x_i``'s label.

    Anchors without such a ``y_j`` are invalid. Unchecked; see :func:`embedloss.metrics.alignment`.
    """
    if labels is None:
        per = _safe_pow(torch.linalg.vector_norm(x - y, dim=1), alpha)  # (N,)
        valid = torch.ones_like(per, dtype=torch.bool)
        return AnchorLosses(per, valid, valid)
    positive = positive_mask_from_labels(labels, key_labels)  # (N, M)
    powered = _safe_pow(_exact_cdist(x, y), alpha)  # (N, M)
    count = positive.sum(dim=1)
    per = torch.where(positive, powered, torch.zeros_like(powered)).sum(1) / count.clamp(min=1)
    return AnchorLosses(per, count > 0, count > 0)


def log_uniformity(x: Tensor, t: float, distributed: bool = False) -> Tensor:
    """``log E_{i<j} exp(−t·‖x_i − x_j‖₂²)`` in log space, over all ranks when ``distributed``.

    Unchecked; see :func:`embedloss.metrics.uniformity`.

    Raises:
        ValueError: For fewer than two embeddings (over all ranks).
    """
    gathered = gather_with_grad(x, distributed)
    n = gathered.tensor.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {n}")
    if gathered.world_size == 1:
        return torch.logsumexp(-t * torch.pdist(x).square(), dim=0) - math.log(n * (n - 1) / 2)
    # Local rows against all rows; over all ranks every unordered pair appears twice.
    neg_sq = -t * _exact_cdist(x, gathered.tensor).square()  # (n_local, N)
    cols = torch.arange(n, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device) + gathered.offset
    neg_sq = neg_sq.masked_fill(rows.unsqueeze(1) == cols.unsqueeze(0), float("-inf"))
    row_lse = gather_with_grad(neg_sq.logsumexp(dim=1), True).tensor  # (N,)
    return row_lse.logsumexp(dim=0) - math.log(n * (n - 1))
