"""Feature decorrelation: penalise the off-diagonal entries of the feature correlation matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss._validation import (
    check_coefficients,
    check_embeddings,
    check_flags,
    check_positive_float,
    compute_dtype,
)
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.similarity import prepare_embeddings
from embedloss.ops.statistics import check_enough_samples, moments, off_diagonal
from embedloss.registry import register_loss

__all__ = ["DecorrelationLoss", "decorrelation_loss"]


def _decorrelation(
    branches: dict[str, Tensor | None],
    use_correlation: bool,
    eps: float,
    normalize: bool,
    distributed: bool,
) -> tuple[Tensor, list[Tensor]]:
    """The penalty averaged over the given branches, and each one's variances ``(D,)``."""
    penalties, variances = [], []
    for name, z in branches.items():
        if z is None:
            continue
        check_embeddings(z, name)
        check_enough_samples(z, name, distributed=distributed)
        x = prepare_embeddings(z, normalize=normalize, dtype=compute_dtype(z))
        cov, corr = moments(x, eps=eps, distributed=distributed)  # (D, D)
        variances.append(cov.diagonal())  # (D,)
        m = corr if use_correlation else cov
        d = x.shape[1]
        penalties.append(off_diagonal(m).pow(2).sum() / max(d * (d - 1), 1))
    return sum(penalties[1:], penalties[0]) / len(penalties), variances


def decorrelation_loss(
    z: Tensor,
    *,
    use_correlation: bool = True,
    eps: float = 1e-5,
    normalize: bool = False,
    gather_distributed: bool = False,
) -> Tensor:
    r"""Mean squared off-diagonal entry of the feature correlation (or covariance) matrix.

    With the unbiased covariance ``C = Σ_n (z_n − μ)(z_n − μ)ᵀ/(N − 1)`` and, by default, the
    correlation ``R_ij = C_ij / sqrt((C_ii + ε)(C_jj + ε))``:

        L = (1/(D·(D − 1)))·Σ_{i≠j} R_ij²        (C_ij² with ``use_correlation=False``)

    The covariance form is VICReg's covariance term up to its normalisation (Bardes et al.
    2022, Eq. 4, which divides the sum by D); the correlation form is scale-invariant and
    lies in [0, 1]. A single feature (D = 1) has no pairs and gives 0.

    Args:
        z: ``(N, D)`` features, N >= 2.
        use_correlation: Penalise correlations (default) rather than covariances.
        eps: ε > 0 added to the variances before dividing (default 1e-5).
        normalize: L2-normalise each row first (default False).
        gather_distributed: Use the statistics of the batch of all ranks (exact).

    Shape:
        z: ``(N, D)``; output: scalar.

    Raises:
        ValueError: For a non-2-D or empty input, N < 2 or ``eps <= 0``.

    Example:
        >>> z = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # perfectly correlated
        >>> round(decorrelation_loss(z, eps=1e-12).item(), 6)
        1.0
    """
    check_flags(use_correlation=use_correlation, normalize=normalize)
    eps = check_positive_float(eps, "eps")
    return _decorrelation({"z": z}, use_correlation, eps, normalize, gather_distributed)[0]


@register_loss("decorrelation")
class DecorrelationLoss(BaseLoss):
    """Feature decorrelation penalty with collapse statistics.

    ``weight ×`` :func:`decorrelation_loss`, averaged over the given branches (``z_a`` and, if
    passed, ``z_b``, e.g. two modalities). Terms (nothing is printed or logged):

    * ``decorrelation``: the unweighted penalty;
    * ``low_variance_fraction``: fraction of feature dimensions (of all branches) whose batch
      variance is below ``low_variance_threshold`` — dimensional collapse;
    * ``min_variance``, ``mean_variance``: of the per-dimension (unbiased) batch variances.

    Args:
        weight: Multiplier >= 0 of the penalty (default 1).
        low_variance_threshold: Variance below which a dimension counts as collapsed (default 1e-4).
        use_correlation, eps, normalize, gather_distributed: As :func:`decorrelation_loss`.

    Raises:
        ValueError: For a negative ``weight`` or threshold, or ``eps <= 0``.

    Example:
        >>> loss = DecorrelationLoss()
        >>> z = torch.randn(32, 8)
        >>> z[:, 0] = 1.0  # a collapsed dimension
        >>> loss.compute(z).terms["low_variance_fraction"].item()
        0.125
    """

    def __init__(
        self,
        *,
        weight: float = 1.0,
        use_correlation: bool = True,
        eps: float = 1e-5,
        normalize: bool = False,
        low_variance_threshold: float = 1e-4,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.weight, self.low_variance_threshold = check_coefficients(
            weight=weight, low_variance_threshold=low_variance_threshold
        )
        self.use_correlation, self.normalize, self.gather_distributed = check_flags(
            use_correlation=use_correlation,
            normalize=normalize,
            gather_distributed=gather_distributed,
        )
        self.eps = check_positive_float(eps, "eps")

    def compute(self, z_a: Tensor, z_b: Tensor | None = None) -> LossOutput:
        """Loss and terms for features ``z_a`` ``(N, D)`` and optionally ``z_b`` ``(M, D')``."""
        options = (self.use_correlation, self.eps, self.normalize, self.gather_distributed)
        penalty, variances = _decorrelation({"z_a": z_a, "z_b": z_b}, *options)

        def terms() -> dict[str, Tensor | float]:
            var = torch.cat([v.float() for v in variances])  # (ΣD,)
            return {
                "decorrelation": penalty,
                "low_variance_fraction": (var < self.low_variance_threshold).float().mean(),
                "min_variance": var.min(),
                "mean_variance": var.mean(),
            }

        return self.output(self.weight * penalty, terms)

    shown = "weight use_correlation eps normalize"
