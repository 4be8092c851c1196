"""How ``embedloss train`` drives a registered loss: its task, its head and its call.

The trainer is generic over the registry. A loss's folder (``loss_info(name).category``) picks
its task and call *style*; a small explicit table handles the losses that need something else:

=============  ==============================================  ===============================
style          model outputs → loss call                        tasks
=============  ==============================================  ===============================
``pair``       two views / modalities → ``loss(a, b)``          ssl, paired; supervised when
               (supervised: ``loss(a, b, labels=y)``)           ``compute`` takes ``labels``
``labels``     ``loss(cat(z_a, z_b), cat(y, y))``               supervised
``classifier`` linear classifier logits → ``loss(logits, t)``   supervised
``predictor``  BYOL/SimSiam: ``loss(h(z_a), sg(z_b))`` both     ssl
               ways (a symmetric loss gets all four at once)
``multitask``  ``loss({task: a}, {task: b})`` per sub-loss      that of its sub-losses
=============  ==============================================  ===============================

Categories: contrastive and self_supervised → ssl, multimodal → paired, supervised → supervised
(``labels`` style); composite losses take their sub-losses' style and need ``--config``.

Example:
    >>> plan = make_plan({"name": "nt_xent"}, "auto")
    >>> plan.name, plan.task, plan.style
    ('simclr', 'ssl', 'pair')
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedloss.base.base_loss import LossOutput
from embedloss.cli.config import CLIError
from embedloss.registry import create_loss, loss_info

__all__ = [
    "OVERRIDES",
    "LossPlan",
    "Override",
    "build_loss",
    "compute_loss",
    "make_plan",
]

CATEGORY_TASK = {
    "contrastive": "ssl",
    "self_supervised": "ssl",
    "multimodal": "paired",
    "supervised": "supervised",
}
CATEGORY_STYLE = {
    "contrastive": "pair",
    "self_supervised": "pair",
    "multimodal": "pair",
    "supervised": "labels",
}
COMPOSITES = ("combined", "multitask")


@dataclass(frozen=True)
class Override:
    """How one loss departs from its category's default (``None``: keep the default)."""

    style: str | None = None
    task: str | None = None
    targets: str = "index"  # classifier style: class indices or one-hot vectors
    defaults: Mapping[str, Any] = field(default_factory=dict)  # demo-sized constructor values
    note: str = ""


OVERRIDES: dict[str, Override] = {
    "negative_cosine": Override(
        style="predictor",
        task="ssl",
        note="BYOL/SimSiam: predictor head on each branch, stop-gradient on the other",
    ),
    "cross_entropy": Override(
        style="classifier", task="supervised", note="linear classifier head on the embedding"
    ),
    "mse": Override(
        style="classifier",
        task="supervised",
        targets="one_hot",
        note="linear head regressing one-hot class targets",
    ),
    "supcon": Override(style="labels", task="supervised"),
    "cross_modal_supcon": Override(
        style="pair", task="supervised", note="the two views as modalities, with labels"
    ),
    "feature_consistency": Override(style="pair", task="paired"),
    "alignment_uniformity": Override(style="pair", task="paired"),
    # The digits training split has ~1350 samples: a 65536-key queue would hold stale copies of
    # every positive (false negatives); 1024 keys span most of an epoch.
    "moco": Override(defaults={"queue_size": 1024}, note="queue_size 1024 (small dataset)"),
    "multitask": Override(style="multitask"),
}


@dataclass(frozen=True)
class LossPlan:
    """Everything the trainer needs to know about the loss of a run."""

    name: str  # canonical registry name
    task: str  # ssl | paired | supervised
    style: str  # pair | labels | classifier | predictor | multitask
    targets: str  # classifier style: index | one_hot
    loss_kwargs: dict[str, Any]  # resolved constructor arguments (written to config.yaml)
    sub_style: str | None = None  # multitask: the style of its sub-losses
    note: str = ""


def _accepts_labels(cls: type) -> bool:
    compute = getattr(cls, "compute", None)
    if compute is None:
        return False
    params = inspect.signature(compute).parameters
    return "labels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _base_style_task(name: str) -> tuple[str, str | None]:
    info = loss_info(name)
    over = OVERRIDES.get(info.name, Override())
    style = over.style or CATEGORY_STYLE.get(info.category, "pair")
    task = over.task or CATEGORY_TASK.get(info.category)
    return style, task


def _sub_configs(kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    losses = kwargs.get("losses")
    if not isinstance(losses, Mapping) or not losses:
        raise CLIError(
            f"{name!r} combines other losses: pass --config FILE.yaml with "
            f"'loss: {{name: {name}, losses: {{a: {{name: simclr}}, b: {{name: info_nce}}}}}}'"
        )
    return dict(losses)


def _sub_name(sub: Any, key: str) -> str | None:
    if isinstance(sub, str):
        return sub
    if isinstance(sub, Mapping) and isinstance(sub.get("name"), str):
        return str(sub["name"])
    return None  # a module or something else the composite loss may accept


def _compatible(style: str, task: str, cls: type, sub_style: str | None) -> bool:
    if style == "pair":
        return task in ("ssl", "paired") or (task == "supervised" and _accepts_labels(cls))
    if style in ("labels", "classifier"):
        return task == "supervised"
    if style == "predictor":
        return task == "ssl"
    # multitask: pair-style sub-losses take (a, b); labels-style ones (embeddings, labels)
    return task in ("ssl", "paired") if sub_style == "pair" else task == "supervised"


def make_plan(loss_cfg: Mapping[str, Any], task: str) -> LossPlan:
    """Resolve the task, style and constructor arguments of the configured loss.

    Args:
        loss_cfg: ``{"name": ..., **constructor_kwargs}``.
        task: ``"auto"`` or a task name forcing the task.

    Raises:
        CLIError: Unknown loss, a composite loss without sub-losses, a task the loss cannot do.
    """
    try:
        info = loss_info(loss_cfg["name"])
    except ValueError as err:
        raise CLIError(str(err)) from None
    kwargs = {k: copy.deepcopy(v) for k, v in loss_cfg.items() if k != "name"}
    over = OVERRIDES.get(info.name, Override())
    params = info.signature.parameters
    for key, value in over.defaults.items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    sub_style = None
    if info.category == "composite" or info.name in COMPOSITES:
        subs = _sub_configs(kwargs, info.name)
        found = {_sub_name(v, k) for k, v in subs.items()} - {None}
        pairs = {_base_style_task(str(n)) for n in found}
        styles = {s for s, _ in pairs}
        if len(styles) > 1:
            raise CLIError(
                f"the sub-losses of {info.name!r} need different inputs ({', '.join(sorted(styles))}); "
                "combine losses of one kind"
            )
        sub_style = styles.pop() if styles else "pair"
        if sub_style not in ("pair", "labels"):
            raise CLIError(
                f"{info.name!r} over {sub_style}-style losses is not supported by the trainer"
            )
        style = "multitask" if over.style == "multitask" else sub_style
        tasks = {t for _, t in pairs if t is not None}
        default_task = tasks.pop() if len(tasks) == 1 else None
    else:
        style = over.style or CATEGORY_STYLE.get(info.category, "pair")
        default_task = over.task or CATEGORY_TASK.get(info.category)
    if task == "auto":
        if default_task is None:
            raise CLIError(
                f"cannot tell which task suits {info.name!r} (category {info.category}); pass --task"
            )
        task = default_task
    if not _compatible(style, task, info.cls, sub_style) or (
        info.category == "composite" and style == "pair" and task == "supervised"
    ):
        raise CLIError(f"loss {info.name!r} cannot be trained on the {task!r} task")
    return LossPlan(info.name, task, style, over.targets, kwargs, sub_style, over.note)


def _with_distributed(cfg: dict[str, Any], cls: type) -> dict[str, Any]:
    if "gather_distributed" in inspect.signature(cls).parameters:
        cfg.setdefault("gather_distributed", True)
    return cfg


def build_loss(plan: LossPlan, *, distributed: bool) -> nn.Module:
    """Instantiate the planned loss; under DDP ``gather_distributed=True`` where accepted."""
    kwargs = copy.deepcopy(plan.loss_kwargs)
    cls = loss_info(plan.name).cls
    if distributed:
        kwargs = _with_distributed(kwargs, cls)
        if isinstance(kwargs.get("losses"), Mapping):
            subs = {}
            for key, sub in kwargs["losses"].items():
                name = _sub_name(sub, key)
                if isinstance(sub, Mapping) and name is not None:
                    sub = _with_distributed(dict(sub), loss_info(name).cls)
                subs[key] = sub
            kwargs["losses"] = subs
    try:
        return create_loss(plan.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise CLIError(f"cannot build loss {plan.name!r}: {err}") from None


def _as_output(out: Any) -> LossOutput:
    if isinstance(out, LossOutput):
        return out
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return LossOutput(out[0], dict(out[1]))
    return LossOutput(out, {})


def compute_loss(
    plan: LossPlan,
    loss: nn.Module,
    outputs: tuple[Tensor, ...],
    labels: Tensor | None,
    num_classes: int,
) -> LossOutput:
    """Call ``loss.compute`` with the model ``outputs`` (and ``labels``) in the plan's style."""
    compute: Any = loss.compute
    style = plan.style
    if style == "predictor":
        p_a, p_b, z_a, z_b = outputs
        if getattr(loss, "symmetric", False):
            return _as_output(compute(p_a, z_b.detach(), p_b, z_a.detach()))
        # Both directions in one call: the mean over the concatenation is their average.
        return _as_output(compute(torch.cat([p_a, p_b]), torch.cat([z_b, z_a]).detach()))
    a, b = outputs
    if style == "classifier":
        assert labels is not None  # the supervised task always has labels
        y = torch.cat([labels, labels])
        targets = F.one_hot(y, num_classes).to(a.dtype) if plan.targets == "one_hot" else y
        return _as_output(compute(torch.cat([a, b]), targets))
    if style == "labels":
        assert labels is not None
        return _as_output(compute(torch.cat([a, b]), torch.cat([labels, labels])))
    if style == "multitask":
        subs = _sub_configs(plan.loss_kwargs, plan.name)
        if plan.sub_style == "labels":
            assert labels is not None
            a, b = torch.cat([a, b]), torch.cat([labels, labels])
        return _as_output(compute(dict.fromkeys(subs, a), dict.fromkeys(subs, b)))
    if plan.task == "supervised":
        return _as_output(compute(a, b, labels=labels))
    return _as_output(compute(a, b))
