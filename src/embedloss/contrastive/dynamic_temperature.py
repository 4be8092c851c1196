"""Symmetric InfoNCE whose temperature follows the positive/negative similarity gap, or a schedule."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_choice,
    check_chunk_size,
    check_float,
    check_pair,
    check_positive_float,
)
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.base.mixins import NormalizationMixin
from embedloss.ops.anchors import ChunkSize, direction_terms
from embedloss.ops.info_nce import ContrastiveOptions, paired_symmetric
from embedloss.ops.schedules import cosine_schedule
from embedloss.ops.similarity import SimilarityGap, similarity_gap
from embedloss.registry import register_loss

__all__ = ["DynamicTemperatureLoss", "dynamic_temperature_loss", "gap_temperature"]

SCHEDULES = ("gap", "cosine")


def gap_temperature(
    gap: Tensor | float, base_temperature: float, min_temperature: float, max_temperature: float
) -> Tensor | float:
    """The legacy rule ``τ = clamp(τ₀·(0.8 + 0.4·exp(−2·gap)), τ_min, τ_max)``.

    A tensor gap gives a tensor τ (on its device: no host synchronisation), a float a float.

    Example:
        >>> round(gap_temperature(0.0, 0.07, 0.04, 0.2), 6)  # no gap: 1.2·τ₀
        0.084
    """
    g = gap if isinstance(gap, Tensor) else torch.tensor(float(gap), dtype=torch.float64)
    tau = base_temperature * (0.8 + 0.4 * torch.exp(-2.0 * g))
    tau = tau.clamp(min_temperature, max_temperature)
    return tau if isinstance(gap, Tensor) else float(tau)


def _check_range(base: float, low: float, high: float) -> None:
    check_positive_float(base, "base_temperature")
    check_positive_float(low, "min_temperature")
    check_positive_float(high, "max_temperature")
    if low > high:
        raise ValueError(f"min_temperature must be <= max_temperature, got {low!r} > {high!r}")


def dynamic_temperature_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    base_temperature: float = 0.07,
    min_temperature: float = 0.04,
    max_temperature: float = 0.2,
    labels: Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""CLIP's symmetric InfoNCE at a temperature set by the batch's similarity gap (stateless).

    With ``gap = mean cos(positive pairs) − mean cos(negative pairs)`` (:func:`similarity_gap`,
    computed without gradient) the temperature is the rule of the legacy
    ``DynamicTemperatureContrastiveLoss``

        τ = clamp(τ₀·(0.8 + 0.4·exp(−2·gap)), τ_min, τ_max)

    (a well-separated batch gets a lower τ, down to 0.8·τ₀; an unseparated one up to 1.2·τ₀ and
    beyond), and the loss is :func:`~embedloss.multimodal.clip_loss` at that τ. τ is a constant
    of the graph: no gradient flows through it (the legacy loss let one through).

    Args:
        z_a: ``(n, D)`` first views or modality.
        z_b: ``(n, D)`` second; row ``i`` pairs with ``z_a[i]``.
        base_temperature: τ₀ > 0 (default 0.07).
        min_temperature: Lower clamp > 0 (default 0.04).
        max_temperature: Upper clamp >= ``min_temperature`` (default 0.2).
        labels: Optional ``(n,)`` identities: equal labels are positives (in the loss and the gap).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(n,)``).
        normalize: L2-normalise the inputs of the loss (the gap always uses cosines).
        chunk_size: Core tiling.
        gather_distributed: Loss and gap over the batch of every rank (the same τ everywhere).

    Shape:
        z_a, z_b: ``(n, D)``; output: scalar, or ``(n,)`` with ``reduction="none"``.

    Raises:
        ValueError: For mismatched shapes, bad labels, or temperatures <= 0 or min > max.

    Example:
        >>> from embedloss.multimodal import clip_loss
        >>> a, b = torch.randn(6, 8), torch.randn(6, 8)
        >>> tau = gap_temperature(similarity_gap(a, b).gap, 0.07, 0.04, 0.2)
        >>> bool(torch.isclose(dynamic_temperature_loss(a, b), clip_loss(a, b, temperature=tau)))
        True
    """
    _check_range(base_temperature, min_temperature, max_temperature)
    options = ContrastiveOptions.create(
        base_temperature, reduction, normalize, chunk_size, gather_distributed
    )
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    stats = similarity_gap(z_a, z_b, labels, gather_distributed=gather_distributed)
    tau = gap_temperature(stats.gap, base_temperature, min_temperature, max_temperature)
    return paired_symmetric(z_a, z_b, labels, options.at(tau)).loss


@register_loss("dynamic_temperature")
class DynamicTemperatureLoss(NormalizationMixin, BaseLoss):
    """Symmetric InfoNCE with a similarity-gap-driven or scheduled temperature (legacy dynamic_temp).

    ``schedule="gap"`` (default): τ follows the batch's positive/negative similarity gap by the
    rule of :func:`dynamic_temperature_loss`, detached. With ``ema_momentum=m`` it is smoothed,
    ``τ_ema ← m·τ_ema + (1 − m)·τ_batch`` (the first training batch initialises it), and the
    loss uses ``τ_ema``; the EMA is a buffer, updated only in training mode (eval uses it
    frozen). ``schedule="cosine"``: τ anneals from ``max_temperature`` to ``min_temperature``,

        τ(k) = τ_min + ½·(τ_max − τ_min)·(1 + cos(π·k/K)),

    set by :meth:`update_step` ``(k, K)`` (cosine annealing as in Loshchilov & Hutter 2017,
    SGDR, Eq. 5, without restarts); ``base_temperature`` is then unused. In both modes the loss
    equals :func:`~embedloss.multimodal.clip_loss` at the reported ``temperature`` term. Terms:
    ``temperature``, ``similarity_gap``, ``positive_similarity``, ``negative_similarity`` (mean
    cosines), ``loss_a_to_b``, ``loss_b_to_a``, ``accuracy``.

    Args:
        base_temperature: τ₀ > 0 of the gap rule (default 0.07).
        min_temperature: Lower clamp / end of the cosine schedule (default 0.04).
        max_temperature: Upper clamp / start of the cosine schedule (default 0.2).
        schedule: ``"gap"`` (default) or ``"cosine"``.
        ema_momentum: ``m`` in [0, 1) to smooth the gap-driven τ, or None (default, no EMA).
        reduction, normalize, chunk_size, gather_distributed: As :func:`dynamic_temperature_loss`.

    Raises:
        ValueError: For temperatures <= 0, min > max, an unknown schedule, ``ema_momentum``
            outside [0, 1) or combined with ``schedule="cosine"``.

    Example:
        >>> loss = DynamicTemperatureLoss(schedule="cosine")
        >>> loss.update_step(50, 100)
        >>> round(loss.temperature, 6)  # halfway between 0.2 and 0.04
        0.12
        >>> out = loss.compute(torch.randn(8, 16), torch.randn(8, 16))
        >>> round(out.terms["temperature"].item(), 6)
        0.12
    """

    ema_temperature: Tensor
    ema_initialized: Tensor
    scheduled_temperature: Tensor

    def __init__(
        self,
        *,
        base_temperature: float = 0.07,
        min_temperature: float = 0.04,
        max_temperature: float = 0.2,
        schedule: str = "gap",
        ema_momentum: float | None = None,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self.chunk_size = check_chunk_size(chunk_size)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        _check_range(base_temperature, min_temperature, max_temperature)
        self.base_temperature = float(base_temperature)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)
        if ema_momentum is not None:
            ema_momentum = check_float(ema_momentum, "ema_momentum", low=0.0, high=1.0)
            if ema_momentum >= 1.0:
                raise ValueError(f"ema_momentum must be < 1 (1 freezes τ), got {ema_momentum!r}")
            if self.schedule == "cosine":
                raise ValueError("ema_momentum smooths the gap-driven τ; it needs schedule='gap'")
        self.ema_momentum = ema_momentum
        self._init_normalization(normalize)
        self.register_buffer(
            "ema_temperature", torch.tensor(self.base_temperature, dtype=torch.float64)
        )
        self.register_buffer("ema_initialized", torch.tensor(False))
        self.register_buffer(
            "scheduled_temperature", torch.tensor(self.max_temperature, dtype=torch.float64)
        )

    @property
    def temperature(self) -> float:
        """The τ the loss sits at: scheduled (cosine), smoothed (EMA, once initialised), else τ₀.

        Without EMA the gap-driven τ is per batch: see the ``temperature`` term of :meth:`compute`.
        """
        if self.schedule == "cosine":
            return float(self.scheduled_temperature)
        if self.ema_momentum is not None and bool(self.ema_initialized):
            return float(self.ema_temperature)
        return self.base_temperature

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Set the cosine-scheduled τ for step ``k`` of ``K`` (no-op with ``schedule="gap"``).

        Raises:
            ValueError: With ``schedule="cosine"`` and no ``total_steps``, or a negative step.
        """
        if self.schedule != "cosine":
            return
        tau = cosine_schedule(step, total_steps, self.max_temperature, self.min_temperature)
        self.scheduled_temperature.fill_(tau)

    @torch.no_grad()
    def _current_temperature(self, stats: SimilarityGap | None) -> Tensor:
        """τ of this batch (float64, on the buffers' device); updates the EMA in training.

        The scheduled τ without ``stats`` (cosine schedule), else the gap rule's.
        """
        if stats is None:
            return self.scheduled_temperature.clone()
        rule = (self.base_temperature, self.min_temperature, self.max_temperature)
        tau = cast(Tensor, gap_temperature(stats.gap.to(self.ema_temperature), *rule))
        if self.ema_momentum is None:
            return tau
        if self.training:
            m = self.ema_momentum
            smoothed = torch.where(
                self.ema_initialized, m * self.ema_temperature + (1 - m) * tau, tau
            )
            self.ema_temperature.copy_(smoothed)
            self.ema_initialized.fill_(True)
        return torch.where(self.ema_initialized, self.ema_temperature, tau)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for paired ``(n, D)`` embeddings and optional ``labels (n,)``."""
        check_pair(z_a, z_b, "z_a", "z_b", labels)
        gather = self.gather_distributed

        def gap() -> SimilarityGap:
            return similarity_gap(z_a, z_b, labels, gather_distributed=gather)

        stats = None if self.schedule == "cosine" else gap()  # else only the terms need it
        tau = self._current_temperature(stats)
        options = ContrastiveOptions(
            tau,
            reduction=self.reduction,
            normalize=self._normalize,
            chunk_size=self.chunk_size,
            gather_distributed=gather,
        )
        result = paired_symmetric(z_a, z_b, labels, options)

        def terms() -> dict[str, Tensor | float]:
            gaps = gap() if stats is None else stats
            return {
                "temperature": tau,
                "similarity_gap": gaps.gap,
                "positive_similarity": gaps.positive,
                "negative_similarity": gaps.negative,
                **direction_terms(result.anchors[0], result.anchors[-1], ("a_to_b", "b_to_a")),
            }

        return self.output(result.loss, terms)

    shown = (
        "base_temperature:g min_temperature:g max_temperature:g schedule!r ema_momentum reduction!r"
    )
