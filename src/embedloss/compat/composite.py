"""Legacy composite names: ``CombinedLoss`` and ``MultitaskLoss``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from embedloss._validation import check_float
from embedloss.compat._adapter import LegacyLoss, call_hook, metric
from embedloss.composite.combined import CombinedLoss as _Combined
from embedloss.composite.multitask import MultitaskLoss as _Multitask

__all__ = ["CombinedLoss", "MultitaskLoss"]

PARTS = ("primary", "secondary", "tertiary")


class _Part(nn.Module):
    """Calls a legacy part and keeps its last full output (nested ``recalls`` included)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"a CombinedLoss part must be an nn.Module, got {type(module).__name__}"
            )
        self.module = module
        self.last: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self.module(*args, **kwargs)
        return self.last

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        call_hook(self.module, "update_step", step, total_steps)

    def update_epoch(self, epoch: int) -> None:
        call_hook(self.module, "update_epoch", epoch)


def _as_dict(output: Any) -> dict[str, Any]:
    return dict(output) if isinstance(output, Mapping) else {"loss": output}


class CombinedLoss(LegacyLoss):
    """Legacy primary + w₂·secondary + w₃·tertiary loss: :class:`embedloss.CombinedLoss`.

    Every part gets the same inputs. The output is the primary part's dict, plus
    ``primary_loss``, and for each further part ``<part>_loss``, ``<part>_weight`` and its other
    keys prefixed ``<part>_``; ``"loss"`` is the weighted sum.

    Args:
        primary_loss: The main loss module.
        secondary_loss: Optional second loss.
        secondary_loss_weight: Its weight (default 0.5).
        tertiary_loss: Optional third loss.
        tertiary_loss_weight: Its weight (default 0.3).

    Example:
        >>> import torch
        >>> from embedloss.compat import CLIPStyleLoss, DecoupledContrastiveLoss
        >>> loss = CombinedLoss(CLIPStyleLoss(), DecoupledContrastiveLoss(), 0.5)
        >>> out = loss(vision_features=torch.randn(4, 8), text_features=torch.randn(4, 8))
        >>> sorted(k for k in out if k.startswith("secondary_"))[:3]
        ['secondary_accuracy', 'secondary_cross_modal_loss', 'secondary_instance_loss']
    """

    replacement = "embedloss.CombinedLoss (registry 'combined') with named parts and weights"

    def __init__(
        self,
        primary_loss: nn.Module,
        secondary_loss: nn.Module | None = None,
        secondary_loss_weight: float = 0.5,
        tertiary_loss: nn.Module | None = None,
        tertiary_loss_weight: float = 0.3,
    ) -> None:
        super().__init__()
        given = dict(zip(PARTS, (primary_loss, secondary_loss, tertiary_loss), strict=True))
        weights = {
            "primary": 1.0,
            "secondary": check_float(secondary_loss_weight, "secondary_loss_weight"),
            "tertiary": check_float(tertiary_loss_weight, "tertiary_loss_weight"),
        }
        parts = {name: _Part(module) for name, module in given.items() if module is not None}
        self.loss = _Combined(losses=parts, weights={n: weights[n] for n in parts})

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call every part with the same inputs; the legacy merged dict."""
        out = self.loss.compute(*args, **kwargs)
        parts: dict[str, Any] = dict(self.loss.losses.items())
        merged = _as_dict(parts["primary"].last)
        merged["primary_loss"] = metric(out.terms["primary/loss"])
        for name in PARTS[1:]:
            if name not in parts:
                continue
            merged[f"{name}_loss"] = metric(out.terms[f"{name}/loss"])
            merged[f"{name}_weight"] = self.loss.weights[name]
            for key, value in _as_dict(parts[name].last).items():
                if key != "loss":
                    merged[f"{name}_{key}"] = value
        merged["loss"] = out.loss
        return merged


class MultitaskLoss(LegacyLoss):
    """Legacy per-task weighted loss: :class:`embedloss.MultitaskLoss`.

    Task ``t`` is called as ``loss_functions[t](inputs[t], targets[t])``; tasks missing from
    ``inputs`` or ``targets`` are skipped, as before. Weights are normalised to sum to 1 (equal
    by default), as the legacy class did. ``dynamic_weighting=True`` is dynamic weight averaging
    over epochs (``weighting="dynamic"``, driven by ``update_epoch``) — the legacy
    per-call inverse-loss weights are gone.

    Args:
        loss_functions: Mapping of task names to loss modules.
        loss_weights: Optional mapping of task names to weights (normalised).
        dynamic_weighting: Dynamic weight averaging (default False).
        reduction: Ignored, with a warning (each task loss has its own).

    Returns (forward):
        ``{"loss", "<task>_loss", "<task>_weight"}``.
    """

    replacement = "embedloss.MultitaskLoss (registry 'multitask')"

    def __init__(
        self,
        loss_functions: Mapping[str, nn.Module],
        loss_weights: Mapping[str, float] | None = None,
        dynamic_weighting: bool = False,
        reduction: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        if not isinstance(loss_functions, Mapping) or not loss_functions:
            raise ValueError("loss_functions must be a non-empty mapping of task names to losses")
        raw = dict.fromkeys(loss_functions, 1.0) if loss_weights is None else dict(loss_weights)
        total = sum(check_float(w, f"loss_weights[{t!r}]", low=0.0) for t, w in raw.items())
        if total <= 0:
            raise ValueError(f"loss_weights must have a positive sum, got {raw}")
        self.loss = _Multitask(
            losses=dict(loss_functions),
            weighting="dynamic" if dynamic_weighting else "fixed",
            weights={task: w / total for task, w in raw.items()},
            allow_missing=True,
        )

    def forward(self, inputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
        """The weighted task losses of ``inputs[t]`` against ``targets[t]``."""
        tasks = self.loss.tasks
        out = self.loss.compute(
            {t: (v,) for t, v in inputs.items() if t in tasks},
            {t: (v,) for t, v in targets.items() if t in tasks},
        )
        result: dict[str, Any] = {"loss": out.loss}
        for task in tasks:
            if f"{task}/loss" in out.terms:
                result[f"{task}_loss"] = metric(out.terms[f"{task}/loss"])
            weight: Tensor | float = out.terms.get(f"{task}/weight", self.loss.weights[task])
            result[f"{task}_weight"] = metric(weight)
        return result
