"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun, ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import check_bool, check_coefficients, check_int, check_positive_float
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.statistics import batch_count, batch_sum, covariance, off_diagonal, prepare_views
from embedloss.registry import register_loss

__all__ = ["VICRegLoss", "VICRegOptions", "VICRegTerms", "vicreg", "vicreg_loss", "vicreg_terms"]


class VICRegTerms(NamedTuple):
    """The three unweighted VICReg terms (0-d tensors, differentiable)."""

    invariance: Tensor
    variance: Tensor
    covariance: Tensor


@dataclass(frozen=True)
class VICRegOptions:
    """VICReg's weights λ, μ, ν, its ε and the distributed switch, checked when built."""

    sim_coeff: float = 25.0
    var_coeff: float = 25.0
    cov_coeff: float = 1.0
    eps: float = 1e-4
    gather_distributed: bool = False

    def __post_init__(self) -> None:
        check_coefficients(
            sim_coeff=self.sim_coeff, var_coeff=self.var_coeff, cov_coeff=self.cov_coeff
        )
        check_positive_float(self.eps, "eps")
        check_bool(self.gather_distributed, "gather_distributed")


def _variance_and_covariance(z: Tensor, eps: float, distributed: bool) -> tuple[Tensor, Tensor]:
    cov = covariance(z, correction=1, distributed=distributed)  # (D, D), unbiased
    std = (cov.diagonal() + eps).sqrt()  # (D,)
    return F.relu(1.0 - std).mean(), off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg(
    z_a: Tensor, z_b: Tensor, options: VICRegOptions, warmup: float = 1.0
) -> tuple[Tensor, VICRegTerms]:
    """The checked VICReg loss of two views and its unweighted terms (see :func:`vicreg_loss`).

    ``warmup`` in [0, 1] scales the variance and covariance weights (a schedule's factor).
    """
    dist = options.gather_distributed
    a, b = prepare_views(z_a, z_b, distributed=dist)
    squared = batch_sum(((a - b) ** 2).sum(dim=1), distributed=dist)
    invariance = squared / (batch_count(a, distributed=dist) * a.shape[1])  # F.mse_loss, global
    var_a, cov_a = _variance_and_covariance(a, options.eps, dist)
    var_b, cov_b = _variance_and_covariance(b, options.eps, dist)
    terms = VICRegTerms(invariance, (var_a + var_b) / 2, cov_a + cov_b)
    regularisers = options.var_coeff * terms.variance + options.cov_coeff * terms.covariance
    return options.sim_coeff * terms.invariance + warmup * regularisers, terms


def vicreg_terms(
    z_a: Tensor, z_b: Tensor, *, eps: float = 1e-4, gather_distributed: bool = False
) -> VICRegTerms:
    """Unweighted invariance, variance and covariance terms of VICReg (see :func:`vicreg_loss`).

    Raises:
        ValueError: For mismatched or non-2-D shapes, fewer than 2 samples, or ``eps <= 0``.
    """
    return vicreg(z_a, z_b, VICRegOptions(eps=eps, gather_distributed=gather_distributed))[1]


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    sim_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    gather_distributed: bool = False,
) -> Tensor:
    r"""VICReg loss of two batches of embeddings (the official facebookresearch/vicreg code).

    With ``N`` samples of dimension ``D``, the unbiased covariance ``C(z)`` of each branch and
    ``S(z)_j = sqrt(C(z)_jj + ε)`` (Bardes et al. 2022, Eqs. 1–6):

        s(z_a, z_b) = (1/(N·D))·Σ_n ‖z_a,n − z_b,n‖²                              invariance
        v = ½·[ (1/D)·Σ_j max(0, 1 − S(z_a)_j) + (1/D)·Σ_j max(0, 1 − S(z_b)_j) ]     variance
        c = (1/D)·Σ_{i≠j} C(z_a)_ij² + (1/D)·Σ_{i≠j} C(z_b)_ij²                   covariance
        L = λ·s + μ·v + ν·c

    The variance term averages the two branches (``/ 2``) as the official code does; the
    paper's Algorithm 1 sums them (the difference is a factor of 2 on μ).

    Args:
        z_a: ``(N, D)`` embeddings of the first view (expander outputs), N >= 2.
        z_b: ``(N, D)`` embeddings of the second view.
        sim_coeff: λ >= 0, invariance weight (default 25).
        var_coeff: μ >= 0, variance weight (default 25).
        cov_coeff: ν >= 0, covariance weight (default 1).
        eps: ε > 0 inside the square root (default 1e-4).
        gather_distributed: Compute the statistics of the batch of all ranks (exact; see
            :mod:`embedloss.ops.statistics`): every rank returns the single-process loss.

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar.

    Raises:
        ValueError: For mismatched shapes, N < 2, negative coefficients or ``eps <= 0``.

    Example:
        >>> z = 2 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        >>> vicreg_loss(z, z)  # identical, decorrelated views with std > 1: every term is 0
        tensor(0.)
    """
    options = VICRegOptions(sim_coeff, var_coeff, cov_coeff, eps, gather_distributed)
    return vicreg(z_a, z_b, options)[0]


@register_loss("vicreg")
class VICRegLoss(BaseLoss):
    """VICReg: invariance, variance and covariance regularisation (Bardes et al. 2022).

    See :func:`vicreg_loss` for the formula. With ``warmup_steps > 0`` the variance and
    covariance weights are scaled by ``f = min(step / warmup_steps, 1)``, where ``step`` is the
    last value given to :meth:`update_step` (kept in a buffer, so checkpoints resume exactly):
    the weights grow linearly and reach their full values at ``step = warmup_steps``. Terms:
    ``invariance``, ``variance``, ``covariance`` (unweighted), ``warmup_factor``.

    Args:
        warmup_steps: Steps of linear warm-up of μ and ν (default 0: none).
        sim_coeff, var_coeff, cov_coeff, eps, gather_distributed: As :func:`vicreg_loss`.

    Raises:
        ValueError: For negative coefficients, ``eps <= 0`` or ``warmup_steps < 0``.

    Example:
        >>> loss = VICRegLoss(warmup_steps=10)
        >>> loss.update_step(5)
        >>> out = loss.compute(torch.randn(8, 4), torch.randn(8, 4))
        >>> sorted(out.terms), out.terms["warmup_factor"].item()
        (['covariance', 'invariance', 'variance', 'warmup_factor'], 0.5)
    """

    def __init__(
        self,
        *,
        sim_coeff: float = 25.0,
        var_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        warmup_steps: int = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.options = VICRegOptions(sim_coeff, var_coeff, cov_coeff, eps, gather_distributed)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)
        self._init_counter("step")

    sim_coeff = property(lambda self: self.options.sim_coeff, doc="λ, the invariance weight.")
    var_coeff = property(lambda self: self.options.var_coeff, doc="μ, the variance weight.")
    cov_coeff = property(lambda self: self.options.cov_coeff, doc="ν, the covariance weight.")

    @property
    def warmup_factor(self) -> float:
        """The current factor ``f`` in [0, 1] applied to the variance and covariance weights."""
        step, steps = self._counter("step"), self.warmup_steps
        return 1.0 if steps == 0 else min(step / steps, 1.0)

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Set the optimisation step that drives the warm-up (``total_steps`` is not needed)."""
        self._set_counter("step", check_int(step, "step", low=0))

    def compute(self, z_a: Tensor, z_b: Tensor) -> LossOutput:
        """Loss and terms for two ``(N, D)`` views."""
        factor = self.warmup_factor
        loss, terms = vicreg(z_a, z_b, self.options, factor)
        return self.output(loss, lambda: {**terms._asdict(), "warmup_factor": factor})

    @property
    def gather_distributed(self) -> bool:
        """Whether the loss uses the batch of every rank (see ``gather_distributed``)."""
        return self.options.gather_distributed

    shown = "options.sim_coeff options.var_coeff options.cov_coeff options.eps warmup_steps"
