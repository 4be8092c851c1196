"""``create_loss_function(args)``: the legacy argparse-driven factory, mapped onto compat classes."""

from __future__ import annotations

from typing import Any

from torch import nn

from embedloss.compat import _adapter
from embedloss.compat.composite import CombinedLoss
from embedloss.compat.contrastive import ContrastiveLoss, DecoupledContrastiveLoss
from embedloss.compat.multimodal import MultiModalMixedContrastiveLoss, SimpleContrastiveLoss
from embedloss.compat.queue import MemoryQueueContrastiveLoss
from embedloss.compat.reweighted import (
    DynamicTemperatureContrastiveLoss,
    HardNegativeMiningContrastiveLoss,
)
from embedloss.compat.self_supervised import BarlowTwinsLoss, HybridPretrainVICRegLoss, VICRegLoss

__all__ = ["LOSS_TYPES", "create_loss_function"]

#: ``args.loss_type`` → the legacy class it builds (anything else builds ``ContrastiveLoss``).
LOSS_TYPES = {
    "barlow_twins": "BarlowTwinsLoss",
    "vicreg": "VICRegLoss",  # HybridPretrainVICRegLoss with args.use_contrastive_pretrain
    "memory_queue": "MemoryQueueContrastiveLoss",
    "dynamic_temp": "DynamicTemperatureContrastiveLoss",
    "hard_negative": "HardNegativeMiningContrastiveLoss",
    "mixed": "MultiModalMixedContrastiveLoss",
    "decoupled": "DecoupledContrastiveLoss",
    "combined": "CombinedLoss",
}


def _get(args: Any, name: str, default: Any) -> Any:
    """``args.name``, or ``default`` when it is missing or None (legacy argparse defaults)."""
    value = getattr(args, name, None)
    return default if value is None else value


def _model_dim(args: Any) -> int:
    dim = _get(args, "fusion_dim", 768)
    # Kept from the legacy factory: a ViT-base vision model produces 768-d features even when
    # args.fusion_dim still says 512.
    if dim == 512 and _get(args, "vision_model", "") == "vit-base":
        dim = 768
    return int(dim) if dim > 0 else 768


def _queue_size(args: Any, dataset_size: int | None) -> int:
    if _get(args, "queue_size", 0):
        return int(args.queue_size)
    if dataset_size is None:
        return 8192
    for bound, size in ((10000, 16384), (5000, 8192), (1000, 4096)):
        if dataset_size > bound:
            return size
    return 2048


def _mixed(
    args: Any, temperature: float, heads: bool, projection_dim: int, input_dim: int | None
) -> MultiModalMixedContrastiveLoss:
    weights = {
        "infonce": _get(args, "contrastive_weight", 0.4),
        "nt_xent": _get(args, "classification_weight", 0.3),
        "supervised": _get(args, "multimodal_matching_weight", 0.3),
    }
    return MultiModalMixedContrastiveLoss(
        temperature,
        weights,
        add_projection=heads,
        projection_dim=projection_dim,
        input_dim=input_dim,
    )


def create_loss_function(
    args: Any, dataset_size: int | None = None, train_loader: Any = None
) -> nn.Module:
    """Build the legacy loss named by ``args.loss_type`` (an ``argparse.Namespace`` or any object).

    ``args.use_simple_model`` selects ``SimpleContrastiveLoss``; ``args.use_mixed_loss`` forces
    ``"mixed"``; ``"vicreg"`` with ``args.use_contrastive_pretrain`` builds the hybrid loss; an
    unknown or missing ``loss_type`` builds ``ContrastiveLoss``. The attributes read, and their
    defaults when missing, are listed in ``docs/LOSS_MIGRATION_GUIDE.md``. ``args.temperature``
    is used as given (the legacy factory silently rescaled it by 0.85-1.1).

    Args:
        args: Parsed command-line arguments.
        dataset_size: Sizes the memory queue when ``args.queue_size`` is not set.
        train_loader: Accepted and unused (as in the legacy factory).

    Returns:
        The loss module (a deprecated ``embedloss.compat`` class).

    Example:
        >>> from argparse import Namespace
        >>> args = Namespace(loss_type="decoupled", temperature=0.07, lambda_v=0.3)
        >>> type(create_loss_function(args)).__name__
        'DecoupledContrastiveLoss'
    """
    _adapter.deprecated("create_loss_function", "embedloss.create_loss / create_loss_from_config")
    temperature = _get(args, "temperature", 0.07)
    dim = _model_dim(args)
    if _get(args, "use_simple_model", False):
        return SimpleContrastiveLoss(temperature=temperature)
    loss_type = "mixed" if _get(args, "use_mixed_loss", False) else _get(args, "loss_type", "")
    heads = bool(_get(args, "use_hard_negatives", False))  # the legacy flag for loss-owned heads
    if loss_type == "barlow_twins":
        return BarlowTwinsLoss(
            lambda_coeff=_get(args, "lambda_coeff", 0.005),
            correlation_mode=_get(args, "correlation_mode", "cross_modal"),
            add_projection=True,
            projection_dim=2 * dim,
            input_dim=dim,
        )
    if loss_type == "vicreg":
        coeffs = {
            "sim_coeff": _get(args, "sim_weight", 5.0),
            "var_coeff": _get(args, "var_weight", 5.0),
            "cov_coeff": _get(args, "cov_weight", 1.0),
            "epsilon": 1e-4,
        }
        if not _get(args, "use_contrastive_pretrain", False):
            return VICRegLoss(
                **coeffs,
                warmup_epochs=_get(args, "vicreg_warmup_epochs", 5),
                curriculum=_get(args, "use_curriculum", True),
            )
        return HybridPretrainVICRegLoss(
            **coeffs,
            contrastive_pretrain_steps=_get(args, "contrastive_pretrain_steps", 200),
            temperature=temperature,
            adaptive_transition=_get(args, "adaptive_transition", True),
            min_alignment_threshold=_get(args, "min_alignment_threshold", 0.3),
            gradual_transition_steps=_get(args, "gradual_transition_steps", 100),
        )
    if loss_type == "memory_queue":
        return MemoryQueueContrastiveLoss(
            queue_size=_queue_size(args, dataset_size), temperature=temperature
        )
    if loss_type == "dynamic_temp":
        return DynamicTemperatureContrastiveLoss(
            base_temperature=temperature,
            min_temp=_get(args, "dynamic_temp_min", max(0.01, temperature * 0.6)),
            max_temp=_get(args, "dynamic_temp_max", min(0.3, temperature * 2.0)),
        )
    if loss_type == "hard_negative":
        strategy = _get(args, "mining_strategy", "") or "auto"
        if strategy == "auto":
            strategy = "semi-hard" if _get(args, "batch_size", 32) < 32 else "hard"
        factor = _get(args, "hard_negative_factor", 3.0 if strategy == "semi-hard" else 2.0)
        return HardNegativeMiningContrastiveLoss(
            temperature=temperature, hard_negative_factor=factor, mining_strategy=strategy
        )
    decoupled = {
        "temperature": temperature,
        "lambda_v": _get(args, "lambda_v", 0.5),
        "lambda_t": _get(args, "lambda_t", 0.5),
    }
    if loss_type == "decoupled":
        return DecoupledContrastiveLoss(**decoupled)
    if loss_type == "mixed":
        legacy_dim = _get(args, "dim", None)
        return _mixed(args, temperature, heads, legacy_dim or 256, legacy_dim)
    contrastive = ContrastiveLoss(
        temperature=temperature,
        add_projection=True if loss_type != "combined" else heads,
        projection_dim=dim,
        input_dim=dim,
    )
    if loss_type != "combined":
        return contrastive
    return CombinedLoss(
        primary_loss=contrastive,
        secondary_loss=DecoupledContrastiveLoss(**decoupled),
        secondary_loss_weight=_get(args, "secondary_loss_weight", 0.5),
        tertiary_loss=_mixed(args, temperature, heads, dim, dim),
        tertiary_loss_weight=_get(args, "tertiary_loss_weight", 0.3),
    )
