"""What the composite losses share: building named parts, calling them, merging their terms."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from embedloss.base.base_loss import BaseLoss, LossOutput, detached_terms
from embedloss.registry import create_loss, create_loss_from_config

__all__ = [
    "SEP",
    "PartsLoss",
    "build_parts",
    "call_hooks",
    "check_weights",
    "prefixed",
    "prefixed_terms",
    "run_part",
    "weighted_sum",
]

#: Separator between a part's name and its own term names: ``"clip/accuracy"``.
SEP = "/"


def build_parts(losses: Any, argument: str = "losses") -> nn.ModuleDict:
    """An ``nn.ModuleDict`` from ``{name: module | config mapping | registry name}``.

    Raises:
        TypeError: If ``losses`` is not a mapping, or a value is not a module, mapping or str.
        ValueError: If it is empty, or a name is not a valid non-empty identifier-like key.
    """
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of names to losses, got {type(losses).__name__}"
        )
    if not losses:
        raise ValueError(f"{argument} must name at least one loss, got an empty mapping")
    parts = nn.ModuleDict()
    for name, spec in losses.items():
        if not isinstance(name, str) or not name or "." in name or SEP in name:
            raise ValueError(
                f"{argument} keys must be non-empty strings without '.' or '/', got {name!r}"
            )
        if isinstance(spec, nn.Module):
            module = spec
        elif isinstance(spec, Mapping):
            module = create_loss_from_config(spec)
        elif isinstance(spec, str):
            module = create_loss(spec)
        else:
            raise TypeError(
                f"{argument}[{name!r}] must be an nn.Module, a config mapping with a 'name' key "
                f"or a registered loss name, got {type(spec).__name__}"
            )
        try:
            parts[name] = module
        except KeyError as err:  # a name that shadows an nn.ModuleDict attribute ("keys", ...)
            raise ValueError(f"{argument} key {name!r} is reserved; choose another name") from err
    return parts


def check_weights(weights: Any, names: list[str], argument: str = "weights") -> dict[str, float]:
    """Per-part finite float weights; parts without an entry weigh 1.0.

    Raises:
        TypeError: If ``weights`` is not a mapping of numbers.
        ValueError: For a name that is not a part, or a non-finite weight.
    """
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of names to floats, got {type(weights).__name__}"
        )
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{argument} names unknown part(s) {unknown}; parts are {names}")
    out = {}
    for name in names:
        value = weights.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{argument}[{name!r}] must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{argument}[{name!r}] must be finite, got {value!r}")
        out[name] = float(value)
    return out


def run_part(
    name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], terms: bool = True
) -> LossOutput:
    """Call one part: ``compute`` for an embedloss loss when ``terms`` are wanted, else the module.

    A plain module may return a tensor, a :class:`LossOutput`, or a legacy-style mapping with a
    ``"loss"`` key (its scalar entries become terms). With ``terms=False`` (a composite's
    ``forward``) every part is called as a module and only its loss counts.

    Raises:
        TypeError: If the result is none of these.
    """
    if terms and isinstance(module, BaseLoss):
        return module.compute(*args, **kwargs)
    result = module(*args, **kwargs)
    if isinstance(result, LossOutput):
        return result
    if isinstance(result, Tensor):
        return LossOutput(result, {})
    if isinstance(result, Mapping) and isinstance(result.get("loss"), Tensor):
        scalars = {
            k: v
            for k, v in result.items()
            if terms
            and k != "loss"
            and ((isinstance(v, Tensor) and v.numel() == 1) or isinstance(v, (int, float)))
            and not isinstance(v, bool)
        }
        return LossOutput(result["loss"], detached_terms(**scalars))
    raise TypeError(
        f"loss {name!r} returned {type(result).__name__}; expected a Tensor, a LossOutput "
        "or a mapping with a 'loss' tensor"
    )


def weighted_sum(losses: dict[str, Tensor], factors: Mapping[str, Tensor | float]) -> Tensor:
    """``Σ factors[name]·losses[name]`` over the names in ``losses`` (all of one shape).

    Raises:
        ValueError: If the parts' losses have different shapes.
    """
    shapes = {name: tuple(value.shape) for name, value in losses.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"the parts' losses must have one shape to be added, got {shapes}; "
            "use reduction='mean' or 'sum' in every part"
        )
    values = [factors[name] * value for name, value in losses.items()]
    return sum(values[1:], values[0])


def prefixed(name: str, output: LossOutput, **extra: Tensor | float) -> dict[str, Tensor]:
    """The part's loss (mean if not scalar), terms and ``extra`` values as ``"name/<key>"``.

    ``extra`` numbers become terms on the device of the part's loss.
    """
    loss = output.loss.detach().float()
    extras = detached_terms(**{k: torch.as_tensor(v, device=loss.device) for k, v in extra.items()})
    return {
        f"{name}{SEP}{k}": v for k, v in {"loss": loss.mean(), **output.terms, **extras}.items()
    }


def prefixed_terms(
    outputs: Mapping[str, LossOutput],
    extras: Mapping[str, Mapping[str, Tensor | float]] | None = None,
) -> dict[str, Tensor]:
    """Every part's :func:`prefixed` terms (with its ``extras``, if any) in one dict."""
    extra = extras or {}
    return {k: v for n, o in outputs.items() for k, v in prefixed(n, o, **extra.get(n, {})).items()}


def call_hooks(modules: Iterable[nn.Module], method: str, *args: Any) -> None:
    """Call ``module.<method>(*args)`` (a schedule hook) on every module that has it."""
    for module in modules:
        hook = getattr(module, method, None)
        if callable(hook):
            hook(*args)


class PartsLoss(BaseLoss):
    """Base of the losses made of named parts: holds them and forwards the schedule hooks.

    ``losses`` go through :func:`build_parts` (``self.losses``, an ``nn.ModuleDict``) and
    ``weights`` through :func:`check_weights` (``self.weights``).
    """

    def __init__(self, losses: Any, weights: Any) -> None:
        super().__init__()
        self.losses = build_parts(losses)
        self.weights = check_weights(weights, list(self.losses.keys()))

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Forward the step hook to every part that has it."""
        call_hooks(self.losses.values(), "update_step", step, total_steps)

    def update_epoch(self, epoch: int) -> None:
        """Forward the epoch hook to every part that has it."""
        call_hooks(self.losses.values(), "update_epoch", epoch)
