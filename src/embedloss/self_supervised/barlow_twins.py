"""Barlow Twins: redundancy reduction through the cross-correlation matrix (Zbontar et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from embedloss._validation import check_bool, check_coefficients, check_positive_float
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.statistics import cross_correlation, off_diagonal, prepare_views
from embedloss.registry import register_loss

__all__ = ["BarlowTwinsLoss", "BarlowTwinsTerms", "barlow_twins_loss", "barlow_twins_terms"]


class BarlowTwinsTerms(NamedTuple):
    """``on_diagonal = Σ_i (1 − C_ii)²`` and the unweighted ``off_diagonal = Σ_{i≠j} C_ij²``."""

    on_diagonal: Tensor
    off_diagonal: Tensor


def _barlow_twins(
    z_a: Tensor, z_b: Tensor, lambda_coeff: float, eps: float, distributed: bool
) -> tuple[Tensor, BarlowTwinsTerms]:
    """The checked loss of two views and its two unweighted sums (options checked by the caller)."""
    a, b = prepare_views(z_a, z_b, distributed=distributed)
    c = cross_correlation(a, b, eps=eps, distributed=distributed)  # (D, D)
    terms = BarlowTwinsTerms((1.0 - c.diagonal()).pow(2).sum(), off_diagonal(c).pow(2).sum())
    return terms.on_diagonal + lambda_coeff * terms.off_diagonal, terms


def barlow_twins_terms(
    z_a: Tensor, z_b: Tensor, *, eps: float = 1e-5, gather_distributed: bool = False
) -> BarlowTwinsTerms:
    """The two unweighted sums of the Barlow Twins objective (see :func:`barlow_twins_loss`).

    Raises:
        ValueError: For mismatched or non-2-D shapes, fewer than 2 samples, or ``eps <= 0``.
    """
    return _barlow_twins(z_a, z_b, 0.0, check_positive_float(eps, "eps"), gather_distributed)[1]


def barlow_twins_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    lambda_coeff: float = 5e-3,
    eps: float = 1e-5,
    gather_distributed: bool = False,
) -> Tensor:
    r"""The Barlow Twins loss (Zbontar et al. 2021, Eq. 1 and Algorithm 1).

    Each dimension is standardised over the batch, ``ẑ = (z − μ)/sqrt(σ² + ε)``, and the
    cross-correlation of the two views ``C = ẑ_aᵀ ẑ_b / N`` (Eq. 2) is pushed to the identity:

        L = Σ_i (1 − C_ii)² + λ·Σ_i Σ_{j≠i} C_ij²

    The batch standardisation is the official code's (``BatchNorm1d(affine=False)``: biased
    variance σ² = (1/N)·Σ_n (z_n − μ)², ε = 1e-5), so C is a correlation matrix and the optimum
    C = I is reachable. Algorithm 1's ``z.std(0)`` (unbiased) would scale C by (N − 1)/N.

    Args:
        z_a: ``(N, D)`` embeddings of the first view, N >= 2.
        z_b: ``(N, D)`` embeddings of the second view.
        lambda_coeff: λ >= 0, weight of the redundancy-reduction term (default 5e-3, the paper's).
        eps: ε > 0 added to the variance (default 1e-5, BatchNorm's).
        gather_distributed: Standardise and correlate over all ranks' batch (exact on every rank).

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar.

    Raises:
        ValueError: For mismatched shapes, N < 2, ``lambda_coeff < 0`` or ``eps <= 0``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        >>> round(barlow_twins_loss(z, -z, eps=1e-12).item(), 6)  # C = −I: Σ_i (1 − (−1))² = 4·D
        8.0
    """
    (lam,) = check_coefficients(lambda_coeff=lambda_coeff)
    return _barlow_twins(z_a, z_b, lam, check_positive_float(eps, "eps"), gather_distributed)[0]


@register_loss("barlow_twins")
class BarlowTwinsLoss(BaseLoss):
    """Barlow Twins: drive the views' cross-correlation matrix to the identity (Zbontar et al. 2021).

    See :func:`barlow_twins_loss` for the formula. Returns a tensor like every loss (the legacy
    class returned a tuple). Terms: ``on_diagonal`` and ``off_diagonal`` (unweighted sums).

    Args:
        lambda_coeff, eps, gather_distributed: As :func:`barlow_twins_loss`.

    Raises:
        ValueError: If ``lambda_coeff < 0`` or ``eps <= 0``.

    Example:
        >>> import torch
        >>> loss = BarlowTwinsLoss(lambda_coeff=0.01)
        >>> out = loss.compute(torch.randn(16, 8), torch.randn(16, 8))
        >>> sorted(out.terms), out.loss.shape
        (['off_diagonal', 'on_diagonal'], torch.Size([]))
    """

    def __init__(
        self, *, lambda_coeff: float = 5e-3, eps: float = 1e-5, gather_distributed: bool = False
    ) -> None:
        super().__init__()
        (self.lambda_coeff,) = check_coefficients(lambda_coeff=lambda_coeff)
        self.eps = check_positive_float(eps, "eps")
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")

    def compute(self, z_a: Tensor, z_b: Tensor) -> LossOutput:
        """Loss and terms for two ``(N, D)`` views."""
        loss, terms = _barlow_twins(z_a, z_b, self.lambda_coeff, self.eps, self.gather_distributed)
        return self.output(loss, terms._asdict)

    shown = "lambda_coeff eps"
