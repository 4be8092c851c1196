"""Contrastive warm-up, then a linear switch to VICReg, driven by explicit steps."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_float, check_int
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.anchors import ChunkSize
from embedloss.ops.info_nce import ContrastiveOptions, paired_symmetric
from embedloss.ops.similarity import similarity_gap
from embedloss.ops.statistics import prepare_views
from embedloss.registry import register_loss
from embedloss.self_supervised.vicreg import VICRegOptions, vicreg

__all__ = ["PHASES", "HybridVICRegLoss", "hybrid_vicreg_loss"]

#: The phases of :class:`HybridVICRegLoss`, in order (``terms["phase"]`` is the index).
PHASES = ("contrastive", "transition", "vicreg")


def _hybrid(
    z_a: Tensor,
    z_b: Tensor,
    labels: Tensor | None,
    alpha: float,
    options: tuple[ContrastiveOptions, VICRegOptions],
    warmup: float = 1.0,
    every_part: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The checked blend at α and the parts computed, by name (VICReg's terms included).

    ``every_part`` also computes the part weighted 0, without gradient (for the terms).
    """
    contrastive, vicreg_options = options
    prepare_views(z_a, z_b, labels, distributed=vicreg_options.gather_distributed)  # the checks
    grad = torch.is_grad_enabled()
    parts: dict[str, Tensor] = {}
    if every_part or alpha < 1.0:
        with torch.set_grad_enabled(grad and alpha < 1.0):
            parts["contrastive"] = paired_symmetric(z_a, z_b, labels, contrastive).loss
    if every_part or alpha > 0.0:
        with torch.set_grad_enabled(grad and alpha > 0.0):
            parts["vicreg"], terms = vicreg(z_a, z_b, vicreg_options, warmup)
            parts.update(terms._asdict())
    if alpha == 0.0 or alpha == 1.0:
        return parts["vicreg" if alpha else "contrastive"], parts
    return (1.0 - alpha) * parts["contrastive"] + alpha * parts["vicreg"], parts


def hybrid_vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    progress: float,
    temperature: float | Tensor = 0.07,
    sim_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    labels: Tensor | None = None,
    chunk_size: ChunkSize = "auto",
    gather_distributed: bool = False,
) -> Tensor:
    r"""Blend of CLIP's symmetric InfoNCE and VICReg at transition progress α.

        L = (1 − α)·L_CLIP(z_a, z_b; τ) + α·L_VICReg(z_a, z_b; λ, μ, ν)

    ``L_CLIP`` is :func:`~embedloss.multimodal.clip.clip_loss` (L2-normalised inputs, Radford et
    al. 2021) and ``L_VICReg`` is :func:`~embedloss.self_supervised.vicreg.vicreg_loss` on the raw
    embeddings (Bardes et al. 2022). At α = 0 or 1 only one of them is computed; the batch needs
    N >= 2 in every phase (VICReg's variance needs it).

    Args:
        z_a: ``(N, D)`` first view (or modality), N >= 2.
        z_b: ``(N, D)`` second view; row ``i`` pairs with row ``i`` of ``z_a``.
        progress: α in [0, 1].
        temperature: τ > 0 of the contrastive part (default 0.07).
        sim_coeff: λ >= 0 of VICReg (default 25).
        var_coeff: μ >= 0 of VICReg (default 25).
        cov_coeff: ν >= 0 of VICReg (default 1).
        eps: ε > 0 of VICReg's variance term (default 1e-4).
        labels: Optional ``(N,)`` identities: extra positives of the contrastive part.
        chunk_size: Tiling of the contrastive core.
        gather_distributed: Use the batch of all ranks in both parts.

    Shape:
        z_a, z_b: ``(N, D)``; output: scalar.

    Raises:
        ValueError: For mismatched shapes, N < 2, α outside [0, 1] or invalid coefficients.

    Example:
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> mixed = hybrid_vicreg_loss(z_a, z_b, progress=0.25)
        >>> ends = [hybrid_vicreg_loss(z_a, z_b, progress=p) for p in (0.0, 1.0)]
        >>> torch.allclose(mixed, 0.75 * ends[0] + 0.25 * ends[1])
        True
    """
    alpha = check_float(progress, "progress", low=0.0, high=1.0)
    contrastive = ContrastiveOptions.create(
        temperature, chunk_size=chunk_size, gather_distributed=gather_distributed
    )
    vicreg_options = VICRegOptions(sim_coeff, var_coeff, cov_coeff, eps, gather_distributed)
    return _hybrid(z_a, z_b, labels, alpha, (contrastive, vicreg_options))[0]


@register_loss("hybrid_vicreg", category="self_supervised")
class HybridVICRegLoss(BaseContrastiveLoss):
    """Contrastive (CLIP-style) warm-up, then a linear transition to VICReg.

    The schedule is driven by :meth:`update_step` only (no per-call counters). With ``s`` the
    last step given and ``s₀`` the transition start (``contrastive_steps`` unless moved earlier):

    * ``s < s₀``: phase ``"contrastive"``, α = 0;
    * ``s₀ <= s < s₀ + transition_steps``: phase ``"transition"``, α = (s − s₀)/transition_steps;
    * afterwards: phase ``"vicreg"``, α = 1;

    and the loss is :func:`hybrid_vicreg_loss` at α. VICReg's variance and covariance weights
    warm up over ``warmup_steps`` counted from ``s₀`` (VICReg starts mattering there).

    **Adaptive transition.** In training mode each call records its batch's alignment gap (mean
    cosine of matched pairs minus that of all other pairs, O(N·D), over every rank's rows with
    ``gather_distributed``) in a buffer; the next :meth:`update_step` moves ``s₀`` to that step
    if the gap exceeds ``min_alignment_gap``. All state (step, transition start, recorded gap)
    lives in buffers (``current_phase`` is derived): a ``state_dict`` round-trip resumes the
    schedule exactly.

    Terms: ``contrastive`` and ``vicreg`` (the two losses), ``invariance``, ``variance``,
    ``covariance`` (VICReg's unweighted terms), ``transition_progress`` (α), ``warmup_factor``,
    ``alignment_gap``, ``phase`` (index into :data:`PHASES`), ``temperature``. In
    :meth:`compute` the part whose weight is 0 is computed without gradient, for the terms;
    :meth:`forward` skips it.

    Args:
        contrastive_steps: Steps of pure contrastive training (default 300).
        transition_steps: Length of the linear blend (default 100; 0 switches at once).
        adaptive_transition: Start the transition early on a large alignment gap (default True).
        min_alignment_gap: Gap threshold of the adaptive transition (default 0.3).
        warmup_steps: VICReg warm-up of μ and ν, from the transition start (default 0).
        temperature, sim_coeff, var_coeff, cov_coeff, eps, chunk_size, gather_distributed: As
            :func:`hybrid_vicreg_loss`.

    Raises:
        ValueError: For negative step counts or coefficients, τ <= 0 or ``eps <= 0``.

    Example:
        >>> loss = HybridVICRegLoss(contrastive_steps=2, transition_steps=2,
        ...                         adaptive_transition=False)
        >>> phases = []
        >>> for step in range(5):
        ...     loss.update_step(step)
        ...     phases.append((loss.current_phase, loss.transition_progress))
        >>> phases[1:4]
        [('contrastive', 0.0), ('transition', 0.0), ('transition', 0.5)]
        >>> loss.current_phase
        'vicreg'
    """

    step: Tensor
    transition_start: Tensor
    alignment_gap: Tensor
    gap_recorded: Tensor

    def __init__(
        self,
        *,
        contrastive_steps: int = 300,
        transition_steps: int = 100,
        temperature: float = 0.07,
        adaptive_transition: bool = True,
        min_alignment_gap: float = 0.3,
        sim_coeff: float = 25.0,
        var_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        warmup_steps: int = 0,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        self.contrastive_steps = check_int(contrastive_steps, "contrastive_steps", low=0)
        self.transition_steps = check_int(transition_steps, "transition_steps", low=0)
        super().__init__(
            temperature=temperature, chunk_size=chunk_size, gather_distributed=gather_distributed
        )
        self.min_alignment_gap = check_float(min_alignment_gap, "min_alignment_gap")
        self.vicreg_options = VICRegOptions(
            sim_coeff, var_coeff, cov_coeff, eps, gather_distributed
        )
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)
        self.adaptive_transition = check_bool(adaptive_transition, "adaptive_transition")
        self._init_counter("step")
        self._init_counter("transition_start", self.contrastive_steps)
        self.register_buffer("alignment_gap", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gap_recorded", torch.zeros((), dtype=torch.bool))

    sim_coeff = property(lambda self: self.vicreg_options.sim_coeff, doc="VICReg's λ.")
    var_coeff = property(lambda self: self.vicreg_options.var_coeff, doc="VICReg's μ.")
    cov_coeff = property(lambda self: self.vicreg_options.cov_coeff, doc="VICReg's ν.")

    def _schedule(self) -> tuple[int, float, float]:
        """``(phase index, α, VICReg warm-up factor)`` at the current step."""
        since = self._counter("step") - self._counter("transition_start")
        if since < 0:
            phase, alpha = 0, 0.0
        elif since < self.transition_steps:
            phase, alpha = 1, since / self.transition_steps
        else:
            phase, alpha = 2, 1.0
        warm = 1.0 if self.warmup_steps == 0 else min(max(since, 0) / self.warmup_steps, 1.0)
        return phase, alpha, warm

    @property
    def current_phase(self) -> str:
        """``"contrastive"``, ``"transition"`` or ``"vicreg"`` at the current step."""
        return PHASES[self._schedule()[0]]

    @property
    def transition_progress(self) -> float:
        """α in [0, 1], the weight of VICReg in the loss."""
        return self._schedule()[1]

    @property
    def warmup_factor(self) -> float:
        """The factor in [0, 1] on VICReg's variance and covariance weights."""
        return self._schedule()[2]

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Advance the schedule to ``step``; act on the gap recorded since the last call."""
        check_int(step, "step", low=0)
        triggered = (
            self.adaptive_transition
            and bool(self.gap_recorded)
            and step < self._counter("transition_start")
            and float(self.alignment_gap) > self.min_alignment_gap
        )
        if triggered:
            self._set_counter("transition_start", step)
        self.gap_recorded.fill_(False)
        self._set_counter("step", step)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings (``labels``: contrastive positives).

        Records the batch's alignment gap (in training mode) whether or not terms are wanted.
        """
        phase, alpha, warm = self._schedule()
        options = (self.options(), self.vicreg_options)
        loss, parts = _hybrid(z_a, z_b, labels, alpha, options, warm, not self.loss_only)
        # The whole batch's gap (all ranks' rows, an empty rank allowed): one decision everywhere.
        gap = similarity_gap(z_a, z_b, gather_distributed=self.gather_distributed).gap
        if self.training:
            self.alignment_gap.copy_(gap)
            self.gap_recorded.fill_(True)
        return self.output(
            loss,
            lambda: {
                **parts,
                "alignment_gap": gap,
                "transition_progress": alpha,
                "warmup_factor": warm,
                "phase": phase,
                "temperature": 1.0 / self.scale(dtype=torch.float64),
            },
        )

    #: A short schedule that is in its transition phase after ``update_step(3)``.
    example_options: ClassVar[dict[str, Any]] = {"contrastive_steps": 2, "transition_steps": 4}

    shown = (
        "contrastive_steps transition_steps temperature:.4g adaptive_transition "
        "phase=current_phase!r"
    )
