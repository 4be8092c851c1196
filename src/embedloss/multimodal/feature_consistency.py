"""Feature consistency with frozen reference models: a penalty against representation drift."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedloss._validation import (
    check_choice,
    check_flags,
    check_float,
    check_pair,
    check_positive_float,
    compute_dtype,
    describe,
)
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.similarity import prepare_embeddings
from embedloss.registry import register_loss

__all__ = ["FeatureConsistencyLoss", "feature_consistency_loss"]

DISTANCES = ("cosine", "l2", "l1", "smooth_l1")
#: The modality name of a bare tensor / a single reference module.
DEFAULT_MODALITY = "default"


@dataclass(frozen=True)
class _Options:
    """How features are compared with their reference (see :func:`feature_consistency_loss`)."""

    distance: str = "cosine"
    normalize: bool = True
    smooth_l1_beta: float = 1.0
    detach_reference: bool = True

    def __post_init__(self) -> None:
        check_choice(self.distance, "distance", DISTANCES)
        check_positive_float(self.smooth_l1_beta, "smooth_l1_beta")
        check_flags(normalize=self.normalize, detach_reference=self.detach_reference)


def _distances(
    features: Tensor,
    reference: Tensor,
    options: _Options,
    names: tuple[str, str] = ("features", "reference_features"),
) -> Tensor:
    """Checked per-sample distances ``(N,)``; ``names`` name the inputs in errors."""
    check_pair(features, reference, *names)
    if options.detach_reference:
        reference = reference.detach()
    dtype = compute_dtype(features, reference)
    # Cosine is scale-free, so it always compares unit vectors.
    unit = options.normalize or options.distance == "cosine"
    f = prepare_embeddings(features, normalize=unit, dtype=dtype)
    r = prepare_embeddings(reference, normalize=unit, dtype=dtype)
    if options.distance == "cosine":
        return 1.0 - (f * r).sum(dim=-1)
    if options.distance == "l2":
        return (f - r).square().mean(dim=-1)
    if options.distance == "l1":
        return (f - r).abs().mean(dim=-1)
    return F.smooth_l1_loss(f, r, reduction="none", beta=options.smooth_l1_beta).mean(dim=-1)


def feature_consistency_loss(
    features: Tensor,
    reference_features: Tensor,
    *,
    distance: str = "cosine",
    normalize: bool = True,
    smooth_l1_beta: float = 1.0,
    detach_reference: bool = True,
    reduction: str = "mean",
) -> Tensor:
    r"""Distance of current features to reference features, per sample, then reduced.

    For features ``f_i`` and reference features ``r_i`` (both L2-normalised when ``normalize``):

        cosine:     d_i = 1 − cos(f_i, r_i)
        l2:         d_i = (1/D)·‖f_i − r_i‖₂²          (``F.mse_loss`` per sample)
        l1:         d_i = (1/D)·‖f_i − r_i‖₁           (``F.l1_loss`` per sample)
        smooth_l1:  d_i = (1/D)·Σ_d huber_β(f_id − r_id)  (``F.smooth_l1_loss`` per sample)

    and ``L = (1/N)·Σ_i d_i``, so the mean equals the matching ``torch.nn.functional`` loss on
    the whole batch. A feature-distillation penalty that keeps a fine-tuned encoder close to a
    frozen copy of itself (anti-forgetting; cf. Hou et al. 2019, "less-forget" constraint, and
    Li & Hoiem 2017, LwF). The reference is a target: it is detached unless
    ``detach_reference=False``.

    Args:
        features: ``(N, D)`` current features.
        reference_features: ``(N, D)`` reference (target) features.
        distance: ``"cosine"`` (default), ``"l2"``, ``"l1"`` or ``"smooth_l1"``.
        normalize: L2-normalise both first (default True; cosine always does).
        smooth_l1_beta: β > 0 of the smooth-L1 (Huber) distance (default 1).
        detach_reference: Stop the gradient through ``reference_features`` (default True).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``).

    Shape:
        features, reference_features: ``(N, D)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, an unknown distance or reduction.

    Example:
        >>> f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> feature_consistency_loss(f, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item()
        0.5
    """
    options = _Options(distance, normalize, smooth_l1_beta, detach_reference)
    return reduce_samples(_distances(features, reference_features, options), reduction)


def _by_modality(value: Any, name: str, bare: bool = False) -> dict[str, Any]:
    """Modality name → value: ``{}`` for None, ``{"default": value}`` for a bare value."""
    if value is None:
        return {}
    if bare or not isinstance(value, Mapping):
        return {DEFAULT_MODALITY: value}
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name} must be keyed by modality names (str), got key {bad[0]!r}")
    return dict(value)


def _label(name: str, modality: str) -> str:
    return name if modality == DEFAULT_MODALITY else f"{name}[{modality!r}]"


@register_loss("feature_consistency")
class FeatureConsistencyLoss(BaseLoss):
    """Feature consistency with frozen reference models, for one or several modalities.

    See :func:`feature_consistency_loss` for the distances. The reference is given as tensors,
    ``loss(features, reference_features)`` (or mappings modality → tensor), or as models,
    ``FeatureConsistencyLoss(reference_models=...)`` then ``loss(features, inputs=...)``: the
    reference features are then ``reference_models[m](inputs[m])`` under ``torch.no_grad()``.
    A bare module/tensor is the modality ``"default"``. Several modalities give
    ``Σ_m weights[m]·L_m`` (weight 1 where not given); an explicit ``reference_features[m]``
    takes precedence over ``reference_models[m]``.

    Reference models are frozen: ``requires_grad=False``, never given a gradient, kept in eval
    mode by ``loss.train()``. As submodules they follow ``loss.to()``, ``state_dict()`` saves
    them (``reference_models.<m>.*``) and they **do** appear in ``loss.parameters()``
    (optimisers skip them, their gradient being ``None``; or filter on ``p.requires_grad``).
    ``copy_reference_models=True`` (default) freezes a deep copy made at construction, leaving
    the given modules trainable; ``False`` freezes them in place (already a separate copy).

    Terms: ``consistency`` (single tensor), or ``consistency_<m>`` per modality (unweighted).

    Args:
        distance, normalize, smooth_l1_beta: As :func:`feature_consistency_loss`.
        reference_models: A module, or a mapping modality → module, or None.
        weights: Mapping modality → weight >= 0 (default 1 for every modality).
        copy_reference_models: Freeze deep copies (default) instead of the given modules.
        detach_reference: Stop gradients through explicit ``reference_features`` (default True).
        reduction: As :func:`feature_consistency_loss`; ``"none"`` needs one N in every modality.

    Raises:
        ValueError: For an unknown distance or reduction, a negative weight.
        TypeError: If a reference model is not an ``nn.Module``.

    Example:
        >>> encoder = torch.nn.Linear(4, 8)
        >>> loss = FeatureConsistencyLoss(reference_models={"vision": encoder})
        >>> x = torch.randn(3, 4)
        >>> loss({"vision": encoder(x)}, inputs={"vision": x}).abs().item() < 1e-6  # no drift yet
        True
        >>> _ = loss.train(); loss.reference_models["vision"].training
        False
    """

    def __init__(
        self,
        *,
        distance: str = "cosine",
        normalize: bool = True,
        reference_models: nn.Module | Mapping[str, nn.Module] | None = None,
        weights: Mapping[str, float] | None = None,
        copy_reference_models: bool = True,
        detach_reference: bool = True,
        smooth_l1_beta: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.options = _Options(distance, normalize, smooth_l1_beta, detach_reference)
        (copy_models,) = check_flags(copy_reference_models=copy_reference_models)
        models = _by_modality(reference_models, "reference_models")
        for modality, model in models.items():
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"{_label('reference_models', modality)} must be an nn.Module, got {describe(model)}"
                )
        self.reference_models = nn.ModuleDict(
            {m: copy.deepcopy(v) if copy_models else v for m, v in models.items()}
        )
        self.reference_models.requires_grad_(False)
        self.reference_models.eval()
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping modality → float, got {describe(weights)}")
        self.weights = {
            str(m): check_float(w, f"weights[{m!r}]", low=0.0) for m, w in (weights or {}).items()
        }

    def train(self, mode: bool = True) -> FeatureConsistencyLoss:
        """Set training mode on the loss; the reference models always stay in eval mode."""
        super().train(mode)
        self.reference_models.eval()
        return self

    def _distances(self, features: Any, reference_features: Any, inputs: Any) -> dict[str, Tensor]:
        """Per-sample distances ``(N,)`` of every modality given, its inputs checked."""
        single = not isinstance(features, Mapping)
        if reference_features is not None and single == isinstance(reference_features, Mapping):
            raise TypeError(
                "features and reference_features must both be tensors or both be mappings of "
                f"modality → tensor, got {type(features).__name__} and "
                f"{type(reference_features).__name__}"
            )
        if not single and inputs is not None and not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a mapping modality → input, got {describe(inputs)}")
        feats = _by_modality(features, "features")
        refs = _by_modality(reference_features, "reference_features")
        ins = _by_modality(inputs, "inputs", bare=single)
        if not feats:
            raise ValueError("features must name at least one modality, got an empty mapping")
        known = sorted(feats)
        for name, given in (("reference_features", refs), ("inputs", ins)):
            extra = sorted(set(given) - set(feats))
            if extra:
                raise ValueError(
                    f"{name} has modality {extra[0]!r} that is not in features {known}"
                )
        extra = sorted(set(self.weights) - set(feats) - set(self.reference_models))
        if extra:
            raise ValueError(
                f"weights has modality {extra[0]!r} that is neither in features {known} nor in "
                f"reference_models {sorted(self.reference_models)}"
            )
        for modality in [m for m in feats if m not in refs]:
            if modality not in self.reference_models:
                raise ValueError(
                    f"no reference for {_label('features', modality)}: pass "
                    f"{_label('reference_features', modality)} or construct the loss with "
                    f"reference_models for {modality!r}"
                )
            if modality not in ins:
                raise ValueError(
                    f"{_label('inputs', modality)} is needed to run "
                    f"{_label('reference_models', modality)}"
                )
        out = {}
        for modality, f in feats.items():
            ref = refs.get(modality)
            if ref is None:
                with torch.no_grad():
                    ref = self.reference_models[modality](ins[modality])
                if not isinstance(ref, Tensor):
                    raise TypeError(
                        f"{_label('reference_models', modality)} must return a tensor of "
                        f"features, got {describe(ref)}"
                    )
            names = (_label("features", modality), _label("reference_features", modality))
            out[modality] = _distances(f, ref, self.options, names)
        return out

    def compute(
        self,
        features: Tensor | Mapping[str, Tensor],
        reference_features: Tensor | Mapping[str, Tensor] | None = None,
        *,
        inputs: Any = None,
    ) -> LossOutput:
        """``Σ_m weights[m]·reduce(d_m)`` and terms; ``features``' form sets the others' form.

        With a tensor, ``reference_features`` is a tensor and ``inputs`` goes as-is to the single
        reference model; with a mapping, both are mappings keyed by modality.
        """
        distances = self._distances(features, reference_features, inputs)
        losses = [
            self.weights.get(m, 1.0) * reduce_samples(d, self.reduction)
            for m, d in distances.items()
        ]
        if self.reduction == "none" and len({t.shape for t in losses}) > 1:
            raise ValueError(
                "reduction='none' needs the same batch size N in every modality, got "
                + ", ".join(f"{m}: {d.shape[0]}" for m, d in distances.items())
            )
        key = "consistency_{}" if isinstance(features, Mapping) else "consistency"
        return self.output(
            torch.stack(losses).sum(dim=0),
            lambda: {key.format(m): d.mean() for m, d in distances.items()},
        )

    shown = "options.distance!r options.normalize weights reduction!r"
