"""Legacy self-supervised names: VICReg, Barlow Twins, the hybrid loss and decorrelation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss._validation import check_choice
from embedloss.compat._adapter import LegacyLoss, MatchIds, metric, metrics, renamed
from embedloss.composite.hybrid_vicreg import HybridVICRegLoss as _Hybrid
from embedloss.ops.similarity import labels_from_match_ids
from embedloss.self_supervised.barlow_twins import BarlowTwinsLoss as _BarlowTwins
from embedloss.self_supervised.decorrelation import DecorrelationLoss as _Decorrelation
from embedloss.self_supervised.vicreg import VICRegLoss as _VICReg

__all__ = ["BarlowTwinsLoss", "DecorrelationLoss", "HybridPretrainVICRegLoss", "VICRegLoss"]


def _vicreg_metrics(terms: dict[str, Tensor], loss: _VICReg | _Hybrid) -> dict[str, Tensor]:
    """The legacy VICReg parts and the weights in use (``loss`` holds the coefficients)."""
    factor = terms["warmup_factor"]
    return {
        **renamed(
            terms,
            invariance_loss="invariance",
            variance_loss="variance",
            covariance_loss="covariance",
        ),
        **metrics(
            sim_weight=loss.sim_coeff,
            var_weight=loss.var_coeff * factor,
            cov_weight=loss.cov_coeff * factor,
            warmup_factor=factor,
        ),
    }


class VICRegLoss(LegacyLoss):
    """Legacy VICReg with a warm-up of the variance/covariance weights: :class:`embedloss.VICRegLoss`.

    With ``curriculum`` the variance and covariance weights rise linearly over
    ``warmup_epochs`` epochs (counted by ``update_epoch``) to their **full** value — the legacy
    curriculum capped them at half. ``update_step`` does not move an epoch warm-up. The variance
    term averages the two branches, as the official code does (the legacy loss summed them).

    Args:
        sim_coeff: Invariance weight λ (default 10).
        var_coeff: Variance weight μ (default 5).
        cov_coeff: Covariance weight ν (default 1).
        epsilon: ε of the variance hinge (default 1e-3).
        warmup_epochs: Epochs of warm-up (default 5).
        curriculum: Warm up at all (default True).
        num_epochs: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "invariance_loss", "variance_loss", "covariance_loss", "sim_weight",
        "var_weight", "cov_weight", "warmup_factor"}``.

    Example:
        >>> import torch
        >>> loss = VICRegLoss(warmup_epochs=2)
        >>> z_a, z_b = torch.randn(16, 8), torch.randn(16, 8)
        >>> factors = []
        >>> for epoch in range(3):
        ...     loss.update_epoch(epoch)
        ...     factors.append(loss(z_a=z_a, z_b=z_b)["warmup_factor"].item())
        >>> factors
        [0.0, 0.5, 1.0]
    """

    replacement = "embedloss.VICRegLoss (registry 'vicreg'; warm-up in steps via update_step)"

    def __init__(
        self,
        sim_coeff: float = 10.0,
        var_coeff: float = 5.0,
        cov_coeff: float = 1.0,
        epsilon: float = 1e-3,
        warmup_epochs: int = 5,
        curriculum: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        super().__init__(num_epochs=num_epochs)
        self.loss = _VICReg(
            sim_coeff=sim_coeff,
            var_coeff=var_coeff,
            cov_coeff=cov_coeff,
            eps=epsilon,
            warmup_steps=warmup_epochs if curriculum else 0,
        )

    @property
    def warmup_factor(self) -> float:
        """The factor in [0, 1] on the variance and covariance weights now."""
        return self.loss.warmup_factor

    def update_epoch(self, epoch: int) -> None:
        """Advance the epoch warm-up."""
        self.loss.update_step(epoch)

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Accepted for the trainers; the warm-up is counted in epochs."""

    def forward(self, z_a: Tensor, z_b: Tensor, **inputs: Any) -> dict[str, Any]:
        """Loss and legacy metrics of two ``(N, D)`` views."""
        self.ignore_inputs(inputs)
        out = self.loss.compute(z_a, z_b)
        return {"loss": out.loss, **_vicreg_metrics(out.terms, self.loss)}


class BarlowTwinsLoss(LegacyLoss):
    """Legacy Barlow Twins with optional heads and a tuple output: :class:`embedloss.BarlowTwinsLoss`.

    ``correlation_mode="cross_modal"`` is the Barlow Twins loss of the two modalities;
    ``"within_batch"`` the mean of each modality's loss with itself (redundancy reduction within
    a modality). Every dimension is standardised over the batch and the sums of the paper are
    used, so the optimum 0 is reachable (the legacy loss row-normalised and averaged).

    Args:
        lambda_coeff: λ of the off-diagonal term (default 0.005).
        batch_norm_last_layer: Ignored, with a warning.
        correlation_mode: ``"cross_modal"`` (default) or ``"within_batch"``.
        add_projection: Per-modality 3-layer heads with BatchNorm (needs ``input_dim``).
        projection_dim: Output size of the heads (default 8192).
        input_dim: Feature size for the heads.
        normalize_embeddings: Ignored, with a warning.

    Returns (forward):
        ``(loss, {"diagonal_loss", "off_diagonal_loss"})``.

    Example:
        >>> import torch
        >>> loss, parts = BarlowTwinsLoss()(torch.randn(16, 8), torch.randn(16, 8))
        >>> loss.shape, sorted(parts)
        (torch.Size([]), ['diagonal_loss', 'off_diagonal_loss'])
    """

    replacement = "embedloss.BarlowTwinsLoss (registry 'barlow_twins'; returns a tensor)"

    def __init__(
        self,
        lambda_coeff: float = 0.005,
        batch_norm_last_layer: bool | None = None,
        correlation_mode: str = "cross_modal",
        add_projection: bool = False,
        projection_dim: int = 8192,
        input_dim: int | None = None,
        normalize_embeddings: bool | None = None,
    ) -> None:
        super().__init__(
            batch_norm_last_layer=batch_norm_last_layer, normalize_embeddings=normalize_embeddings
        )
        self.correlation_mode = check_choice(
            correlation_mode, "correlation_mode", ("cross_modal", "within_batch")
        )
        self.init_heads(add_projection, input_dim, projection_dim, num_layers=3)
        self.loss = _BarlowTwins(lambda_coeff=lambda_coeff)

    def forward(
        self, vision_features: Tensor, text_features: Tensor, **inputs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {"diagonal_loss", "off_diagonal_loss"})`` of the two modalities."""
        v, t, _ = self.paired_inputs(vision_features, text_features, None, inputs)
        pairs = [(v, t)] if self.correlation_mode == "cross_modal" else [(v, v), (t, t)]
        outs = [self.loss.compute(a, b) for a, b in pairs]
        loss = torch.stack([o.loss for o in outs]).mean()
        return loss, {
            "diagonal_loss": metric(torch.stack([o.terms["on_diagonal"] for o in outs]).mean()),
            "off_diagonal_loss": metric(
                torch.stack([o.terms["off_diagonal"] for o in outs]).mean()
            ),
        }


#: New phase names → the legacy ones.
LEGACY_PHASES = {
    "contrastive": "contrastive_pretrain",
    "transition": "transition",
    "vicreg": "vicreg",
}


class HybridPretrainVICRegLoss(LegacyLoss):
    """Legacy contrastive warm-up then VICReg: :class:`embedloss.HybridVICRegLoss`.

    Phases ``contrastive_pretrain`` → ``transition`` → ``vicreg`` follow ``update_step``; with
    ``adaptive_transition`` the transition starts early when the alignment gap of the last
    batch exceeds ``min_alignment_threshold``. The contrastive part is CLIP's loss between
    ``z_a`` and ``z_b`` (samples of equal ``match_ids`` all positive); VICReg's weights apply in
    full once it is blended in (the epoch curriculum is not carried over).

    Args:
        sim_coeff: VICReg λ (default 5).
        var_coeff: VICReg μ (default 5).
        cov_coeff: VICReg ν (default 1).
        epsilon: VICReg ε (default 1e-4).
        warmup_epochs: Ignored, with a warning.
        curriculum: Ignored, with a warning.
        num_epochs: Ignored, with a warning.
        contrastive_pretrain_steps: Steps of contrastive training (default 300).
        temperature: τ of the contrastive part (default 0.07).
        adaptive_transition: Start the transition early on a large alignment gap (default True).
        min_alignment_threshold: That gap (default 0.3).
        gradual_transition_steps: Length of the blend (default 100).
        fusion_dim: Ignored, with a warning.
        vision_dim: Ignored, with a warning.
        text_dim: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "current_phase", "transition_progress", "contrastive_weight",
        "vicreg_weight", "contrastive_loss", "vicreg_loss", "invariance_loss", "variance_loss",
        "covariance_loss", "sim_weight", "var_weight", "cov_weight", "warmup_factor",
        "alignment_gap", "temperature"}``.
    """

    replacement = "embedloss.HybridVICRegLoss (registry 'hybrid_vicreg')"

    def __init__(
        self,
        sim_coeff: float = 5.0,
        var_coeff: float = 5.0,
        cov_coeff: float = 1.0,
        epsilon: float = 1e-4,
        warmup_epochs: int | None = None,
        curriculum: bool | None = None,
        num_epochs: int | None = None,
        contrastive_pretrain_steps: int = 300,
        temperature: float = 0.07,
        adaptive_transition: bool = True,
        min_alignment_threshold: float = 0.3,
        gradual_transition_steps: int = 100,
        fusion_dim: int | None = None,
        vision_dim: int | None = None,
        text_dim: int | None = None,
    ) -> None:
        super().__init__(
            warmup_epochs=warmup_epochs,
            curriculum=curriculum,
            num_epochs=num_epochs,
            fusion_dim=fusion_dim,
            vision_dim=vision_dim,
            text_dim=text_dim,
        )
        self.loss = _Hybrid(
            contrastive_steps=contrastive_pretrain_steps,
            transition_steps=gradual_transition_steps,
            temperature=temperature,
            adaptive_transition=adaptive_transition,
            min_alignment_gap=min_alignment_threshold,
            sim_coeff=sim_coeff,
            var_coeff=var_coeff,
            cov_coeff=cov_coeff,
            eps=epsilon,
        )

    @property
    def current_phase(self) -> str:
        """``"contrastive_pretrain"``, ``"transition"`` or ``"vicreg"``."""
        return LEGACY_PHASES[self.loss.current_phase]

    @property
    def warmup_factor(self) -> float:
        """The factor on VICReg's variance and covariance weights."""
        return self.loss.warmup_factor

    def forward(
        self, z_a: Tensor, z_b: Tensor, match_ids: MatchIds = None, **inputs: Any
    ) -> dict[str, Any]:
        """Loss and legacy metrics of two ``(N, D)`` views."""
        self.ignore_inputs(inputs)
        labels = None if match_ids is None else labels_from_match_ids(match_ids, device=z_a.device)
        out = self.loss.compute(z_a, z_b, labels)
        terms, alpha = out.terms, out.terms["transition_progress"]
        return {
            "loss": out.loss,
            "current_phase": self.current_phase,
            **metrics(
                transition_progress=alpha, contrastive_weight=1.0 - alpha, vicreg_weight=alpha
            ),
            **renamed(terms, contrastive_loss="contrastive", vicreg_loss="vicreg"),
            **_vicreg_metrics(terms, self.loss),
            **renamed(terms, alignment_gap="alignment_gap", temperature="temperature"),
        }


class DecorrelationLoss(LegacyLoss):
    """Legacy covariance decorrelation with collapse statistics: :class:`embedloss.DecorrelationLoss`.

    For each modality given, the mean squared off-diagonal entry of the feature covariance
    (``use_correlation=False``, as the legacy loss), of L2-normalised rows when
    ``normalize_embeddings``; the loss is ``coef`` × their mean.

    Args:
        coef: Weight of the penalty (default 1).
        epsilon: ε of the new loss's statistics (default 1e-5).
        normalize_embeddings: L2-normalise rows first (default True, as before).
        track_feature_stats: Report ``feature_stats`` (default True).
        reduction: Ignored, with a warning (the loss is a batch statistic).

    Returns (forward):
        ``{"loss", "decorrelation_loss", "<modality>_decorrelation_loss", "feature_stats"}`` with
        modality ``vision``, ``text`` or ``generic`` (for ``features``) and stats
        ``<prefix>_min_var``, ``<prefix>_mean_var``, ``<prefix>_low_var_pct``.
    """

    replacement = "embedloss.DecorrelationLoss (registry 'decorrelation')"

    def __init__(
        self,
        coef: float = 1.0,
        epsilon: float = 1e-5,
        normalize_embeddings: bool = True,
        track_feature_stats: bool = True,
        reduction: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.track_feature_stats = track_feature_stats
        self.loss = _Decorrelation(
            weight=coef, use_correlation=False, eps=epsilon, normalize=normalize_embeddings
        )

    def forward(
        self,
        vision_features: Tensor | None = None,
        text_features: Tensor | None = None,
        features: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics of the modalities given."""
        self.ignore_inputs(inputs)
        given = {"vision": vision_features, "text": text_features, "generic": features}
        outs = {name: self.loss.compute(x) for name, x in given.items() if x is not None}
        if not outs:
            raise ValueError(
                "DecorrelationLoss needs vision_features, text_features or features; got none"
            )
        loss = sum(out.loss for out in outs.values()) / len(outs)
        result: dict[str, Any] = {"loss": loss, "decorrelation_loss": metric(loss)}
        stats: dict[str, Tensor] = {}
        for name, out in outs.items():
            prefix = "feature" if name == "generic" else name
            result[f"{name}_decorrelation_loss"] = metric(out.terms["decorrelation"])
            stats[f"{prefix}_min_var"] = metric(out.terms["min_variance"])
            stats[f"{prefix}_mean_var"] = metric(out.terms["mean_variance"])
            stats[f"{prefix}_low_var_pct"] = metric(out.terms["low_variance_fraction"])
        if self.track_feature_stats:
            result["feature_stats"] = stats
        return result
