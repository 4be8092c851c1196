"""How ``embedloss train`` drives a registered loss: its task, its head and its call.

The trainer is generic over the registry. A loss's folder (``loss_info(name).category``) picks
its task and call *style*; a small explicit table (:data:`OVERRIDES`) handles the losses that
need something else. The model returns one row tensor per input group (the two augmented views
stacked, then the local crops of multi-crop methods); :func:`compute_loss` cuts them into the
loss's inputs:

=============  ===============================================  =================================
style          model rows → loss call                            tasks
=============  ===============================================  =================================
``pair``       projections of two views → ``loss(z_a, z_b)``     ssl, paired; supervised when
               (supervised: ``loss(z_a, z_b, labels=y)``)        ``compute`` takes ``labels``
``labels``     ``loss(cat(z_a, z_b), cat(y, y))``                supervised (metric learning too)
``classifier`` linear classifier logits → ``loss(logits, t)``    supervised
``scored``     graded pairs → ``loss(e_a, e_b, scores)``         supervised (CoSENT, AnglE)
``single``     ``loss(cat(z_a, z_b))``                           ssl (KoLeo)
``parts``      ``combined`` of pair and single losses: each      ssl (simclr + 0.1·koleo)
               part its inputs above, then Σ w_k·L_k
``predictor``  BYOL: ``loss(h(z_a), sg(t_b))`` both ways, ``t``  ssl
               the EMA teacher's projection (SimSiam without)
``moco``       queries vs the EMA teacher's keys, both ways      ssl
``nnclr``      ``loss(t_a, t_b, h(z_a), h(z_b))``, ``t`` the       ssl
               teacher's projections (``z`` without one)
``dino``       student crops (2 global + local) vs teacher's     ssl
               global crops → ``loss(student, teacher)``
``ibot``       DINO on the [CLS] outputs + masked-patch loss     ssl
``swav``       prototype scores of global and local crops        ssl
``multitask``  ``loss({task: a}, {task: b})`` per sub-loss       that of its sub-losses
=============  ===============================================  =================================

Categories: contrastive and self_supervised → ssl (``pair``), multimodal → paired,
supervised and metric_learning → supervised (``labels``), text → supervised (``scored``);
composite losses take their sub-losses' style: ``combined``/``multitask`` need ``--config``,
``matryoshka`` wraps one loss (``--loss-option loss=supcon``) on the encoder's own output.
``combined`` may add single-style regularisers to pair-style losses (the ``parts`` style); other
mixes of styles are refused.

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
from embedloss.cli.objectives import IBOTObjective, combined_parts, scored_pairs
from embedloss.composite import CombinedLoss
from embedloss.registry import create_loss, loss_info
from embedloss.self_distillation import IBOTPatchLoss

__all__ = [
    "OVERRIDES",
    "LossContext",
    "LossPlan",
    "Override",
    "StepTargets",
    "build_loss",
    "compute_loss",
    "make_plan",
]

CATEGORY_TASK = {
    "contrastive": "ssl",
    "self_supervised": "ssl",
    "multimodal": "paired",
    "supervised": "supervised",
    "metric_learning": "supervised",
    "text": "supervised",
}
CATEGORY_STYLE = {
    "contrastive": "pair",
    "self_supervised": "pair",
    "multimodal": "pair",
    "supervised": "labels",
    "metric_learning": "labels",
    "text": "scored",
}
COMPOSITES = ("combined", "multitask")
#: Styles whose loss sees views of one modality (the ssl task) and nothing else.
SSL_ONLY = ("predictor", "moco", "nnclr", "dino", "ibot", "swav", "single", "parts")
#: The sub-loss styles ``combined`` may mix (the ``parts`` style): each part gets its own inputs.
PARTS = ("pair", "single")
#: Styles a ``matryoshka`` loss can wrap: its prefixes cut plain embeddings.
NESTABLE = ("pair", "labels", "single", "scored")


@dataclass(frozen=True)
class Override:
    """How one loss departs from its category's default (``None``: keep the default)."""

    style: str | None = None
    task: str | None = None
    targets: str = "index"  # classifier style: class indices or one-hot vectors
    defaults: Mapping[str, Any] = field(default_factory=dict)  # demo-sized constructor values
    loss_lr_scale: float = 1.0  # the loss's parameters learn at this multiple of the lr
    note: str = ""


OVERRIDES: dict[str, Override] = {
    "negative_cosine": Override(
        style="predictor",
        task="ssl",
        note="BYOL: predictor on the online branch, the EMA teacher's projection as target "
        "(SimSiam with method.teacher_momentum null)",
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
    "moco": Override(
        style="moco",
        task="ssl",
        defaults={"queue_size": 1024},
        note="keys from the EMA teacher; queue_size 1024 (small dataset)",
    ),
    "nnclr": Override(
        style="nnclr",
        task="ssl",
        defaults={"queue_size": 1024},
        note="prediction head, EMA teacher; support set of 1024 (small dataset)",
    ),
    "dino": Override(style="dino", task="ssl", note="multi-crop, EMA teacher, prototype head"),
    "ibot_patch": Override(
        style="ibot",
        task="ssl",
        note="iBOT: DINO's [CLS] loss plus this masked-patch loss, patch tokens of a 4×4 grid",
    ),
    "swav": Override(style="swav", task="ssl", note="multi-crop, normalised prototypes"),
    "koleo": Override(style="single", task="ssl", note="alone: a spreading regulariser"),
    # Batch-hard mining collapses on random batches of the digits (every embedding at one
    # point, the loss stuck at the margin: perturbed k-NN 0.29, below the random encoder);
    # semi-hard mining (FaceNet's) trains (0.94).
    "triplet": Override(defaults={"mining": "semi_hard"}, note="semi-hard mining"),
    # Scales for training from scratch: the papers' (circle 256, CoSENT / AnglE 20) are set for
    # face recognition and for fine-tuning pretrained text encoders; here they learn far less
    # (perturbed k-NN: circle 0.74 at 256, 0.81 at 32; CoSENT 0.60 at 20, 0.77 at 2).
    "circle": Override(defaults={"gamma": 32.0}, note="gamma 32"),
    "cosent": Override(defaults={"scale": 2.0}, note="graded pairs; scale 2"),
    "angle": Override(
        defaults={"cosine_scale": 2.0, "angle_scale": 2.0},
        note="graded pairs; cosine and angle scales 2",
    ),
    # Kim et al. 2020 train the proxies at 100× the learning rate of the network.
    "proxy_anchor": Override(loss_lr_scale=100.0, note="proxies at 100× the learning rate"),
    "matryoshka": Override(
        defaults={"loss": "supcon", "dims": [8, 16, 32, 64]},
        note="the wrapped loss on the encoder's output (no projector), evaluated at every dim",
    ),
    "multitask": Override(style="multitask"),
}


@dataclass(frozen=True)
class LossPlan:
    """Everything the trainer needs to know about the loss of a run."""

    name: str  # canonical registry name
    task: str  # ssl | paired | supervised
    style: str  # see the module docstring
    targets: str  # classifier style: index | one_hot
    loss_kwargs: dict[str, Any]  # resolved constructor arguments (written to config.yaml)
    sub_style: str | None = None  # multitask: the style of its sub-losses
    note: str = ""
    takes_labels: bool = False  # compute() accepts labels= (identities / classes of pairs)
    head: str | None = None  # "none": the loss sees the encoder's output (matryoshka)
    nested_dims: tuple[int, ...] = ()  # matryoshka: prefix sizes evaluated besides the full one
    loss_lr_scale: float = 1.0
    part_styles: Mapping[str, str] = field(default_factory=dict)  # parts: each sub-loss's style


@dataclass(frozen=True)
class LossContext:
    """Constructor values the run decides: filled in where the loss takes them and none is given."""

    num_classes: int = 2
    embedding_dim: int = 64  # the width of what the loss sees
    output_dim: int = 64  # the prototypes of a DINO / iBOT head

    def values(self) -> dict[str, int]:
        """The values by constructor argument name."""
        return {
            "num_classes": self.num_classes,
            "embedding_dim": self.embedding_dim,
            "output_dim": self.output_dim,
        }


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
    if style in ("labels", "classifier", "scored"):
        return task == "supervised"
    if style in SSL_ONLY:
        return task == "ssl"
    # multitask: pair-style sub-losses take (a, b); labels-style ones (embeddings, labels)
    return task in ("ssl", "paired") if sub_style == "pair" else task == "supervised"


def _matryoshka(name: str, kwargs: dict[str, Any]) -> tuple[str, str | None, bool, tuple]:
    """Style, task, whether the wrapped loss takes labels, and the dims of ``matryoshka``."""
    sub = _sub_name(kwargs.get("loss"), "loss")
    if sub is None:
        raise CLIError(
            f"{name!r} wraps one loss: pass --loss-option loss=NAME (e.g. loss=supcon) or a "
            "mapping {name: ..., options...}"
        )
    try:
        info = loss_info(sub)
    except ValueError as err:
        raise CLIError(f"{name!r} wraps an unknown loss: {err}") from None
    style, task = _base_style_task(info.name)
    if style not in NESTABLE:
        raise CLIError(
            f"{name!r} over {info.name!r} ({style}-style) is not supported by the trainer: it "
            f"wraps losses of plain embeddings ({', '.join(NESTABLE)} styles)"
        )
    dims = kwargs.get("dims")
    nested = tuple(int(d) for d in dims) if isinstance(dims, (list, tuple)) else ()
    return style, task, _accepts_labels(info.cls), nested


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
            kwargs[key] = copy.deepcopy(value)
    sub_style, head, nested, takes_labels = None, None, (), _accepts_labels(info.cls)
    part_styles: dict[str, str] = {}
    if info.name == "matryoshka":
        style, default_task, takes_labels, nested = _matryoshka(info.name, kwargs)
        head = "none"
    elif info.category == "composite" or info.name in COMPOSITES:
        subs = _sub_configs(kwargs, info.name)
        found = {k: n for k, v in subs.items() if (n := _sub_name(v, k)) is not None}
        by_part = {k: _base_style_task(n) for k, n in found.items()}
        pairs = set(by_part.values())
        styles = {s for s, _ in pairs}
        if info.name == "combined" and styles == set(PARTS):
            # pair-style losses plus single-style regularisers (simclr + koleo)
            style, part_styles = "parts", {k: s for k, (s, _) in by_part.items()}
        else:
            if len(styles) > 1:
                raise CLIError(
                    f"the sub-losses of {info.name!r} need different inputs "
                    f"({', '.join(sorted(styles))}); the trainer combines losses of one style, "
                    "or in 'combined' pair-style losses with single-style regularisers "
                    "(e.g. simclr + koleo)"
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
    composite_pair = info.category == "composite" and info.name != "matryoshka"
    if not _compatible(style, task, info.cls, sub_style) or (
        composite_pair and style == "pair" and task == "supervised"
    ):
        raise CLIError(f"loss {info.name!r} cannot be trained on the {task!r} task")
    return LossPlan(
        info.name,
        task,
        style,
        over.targets,
        kwargs,
        sub_style,
        over.note,
        takes_labels,
        head,
        nested,
        over.loss_lr_scale,
        part_styles,
    )


def _with_distributed(cfg: dict[str, Any], cls: type) -> dict[str, Any]:
    if "gather_distributed" in inspect.signature(cls).parameters:
        cfg.setdefault("gather_distributed", True)
    return cfg


def build_loss(
    plan: LossPlan, *, distributed: bool, context: LossContext | None = None
) -> nn.Module:
    """Instantiate the planned loss; under DDP ``gather_distributed=True`` where accepted.

    Constructor arguments the run decides (``num_classes``, ``embedding_dim``, ``output_dim``)
    come from ``context`` where the loss takes them and the config does not set them (a
    placeholder context checks the options before the data is loaded). ``ibot_patch`` is
    trained with DINO's [CLS] loss beside it (:class:`~embedloss.cli.objectives.IBOTObjective`).
    """
    kwargs = copy.deepcopy(plan.loss_kwargs)
    cls = loss_info(plan.name).cls
    params = inspect.signature(cls).parameters
    for key, value in (context or LossContext()).values().items():
        if key in params and key not in kwargs:
            kwargs[key] = value
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
        loss = create_loss(plan.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise CLIError(f"cannot build loss {plan.name!r}: {err}") from None
    if plan.style == "ibot":
        assert isinstance(loss, IBOTPatchLoss)
        return IBOTObjective(loss)
    return loss


def _as_output(out: Any) -> LossOutput:
    if isinstance(out, LossOutput):
        return out
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return LossOutput(out[0], dict(out[1]))
    return LossOutput(out, {})


@dataclass(frozen=True)
class StepTargets:
    """What a loss call needs besides the model's rows: labels, identities, masks."""

    labels: Tensor | None = None  # (b,) class labels of the local samples (supervised)
    identities: Tensor | None = None  # (b,) sample indices, when a batch repeats samples (ssl)
    mask: Tensor | None = None  # (2b, P) the masked patches of the global views (iBOT)
    num_classes: int = 0


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _views(x: Tensor | None, n: int) -> list[Tensor]:
    """Rows stacked view after view ``(V·n, ...)`` → V tensors of ``n`` rows."""
    return [] if x is None or x.shape[0] == 0 else list(x.split(n))


def _ssl_labels(plan: LossPlan, t: StepTargets, views: int) -> dict[str, Tensor]:
    """``labels=`` for an ssl loss: the identities of repeated samples, once per view."""
    if t.identities is None or not plan.takes_labels:
        return {}
    return {"labels": t.identities.repeat(views)}


def _multicrop(
    plan: LossPlan,
    loss: nn.Module,
    outputs: tuple[Tensor, ...],
    teacher: Tensor | None,
    t: StepTargets,
) -> LossOutput:
    compute: Any = loss.compute
    b = outputs[0].shape[0] // 2
    local = _views(outputs[1] if len(outputs) > 1 else None, b)
    if plan.style == "swav":
        return _as_output(compute(_views(outputs[0], b), local))
    assert teacher is not None  # dino and ibot always have their EMA teacher
    if plan.style == "dino":
        return _as_output(compute(_views(outputs[0], b) + local, _views(teacher, b)))
    k = int(loss.patch.output_dim)  # type: ignore[union-attr, arg-type]
    s_cls, t_cls = outputs[0][:, :k], teacher[:, :k]
    s_patches = outputs[0][:, k:].reshape(2 * b, -1, k)  # (2b, P, K)
    t_patches = teacher[:, k:].reshape(2 * b, -1, k)
    assert t.mask is not None
    return _as_output(
        compute(_views(s_cls, b) + local, _views(t_cls, b), s_patches, t_patches, t.mask)
    )


def _two_view(
    plan: LossPlan, loss: nn.Module, rows: Tensor, teacher: Tensor | None, t: StepTargets
) -> LossOutput:
    """The ssl styles of two views with a second head or a teacher (predictor, moco, nnclr)."""
    compute: Any = loss.compute
    if plan.style == "moco":
        q_a, q_b = _halves(rows)
        k_a, k_b = _halves(rows.detach() if teacher is None else teacher)
        labels = _ssl_labels(plan, t, 2)
        # Both directions in one call: each query against its key; the queue gets all keys.
        return _as_output(compute(torch.cat([q_a, q_b]), torch.cat([k_b, k_a]), **labels))
    z, p = rows.chunk(2, dim=1)  # projector outputs | predictor outputs
    if teacher is not None:
        z = teacher
    (z_a, z_b), (p_a, p_b) = _halves(z), _halves(p)
    if plan.style == "nnclr":
        return _as_output(compute(z_a, z_b, p_a, p_b, **_ssl_labels(plan, t, 1)))
    if getattr(loss, "symmetric", False):
        return _as_output(compute(p_a, z_b.detach(), p_b, z_a.detach()))
    # Both directions in one call: the mean over the concatenation is their average.
    return _as_output(compute(torch.cat([p_a, p_b]), torch.cat([z_b, z_a]).detach()))


def _parts(plan: LossPlan, loss: nn.Module, a: Tensor, b: Tensor, t: StepTargets) -> LossOutput:
    """``combined`` over both styles: pair parts get ``(z_a, z_b)``, single parts ``cat``."""
    assert isinstance(loss, CombinedLoss)  # the parts style is planned for combined only
    both = torch.cat([a, b])
    inputs: dict[str, tuple[tuple[Tensor, ...], dict[str, Tensor]]] = {}
    for name, part in loss.losses.items():
        if plan.part_styles.get(name) == "single":
            inputs[name] = ((both,), {})
        else:
            labels = _ssl_labels(plan, t, 1) if _accepts_labels(type(part)) else {}
            inputs[name] = ((a, b), labels)
    return combined_parts(loss, inputs)


def compute_loss(
    plan: LossPlan,
    loss: nn.Module,
    outputs: tuple[Tensor, ...],
    teacher: Tensor | None,
    targets: StepTargets,
) -> LossOutput:
    """Call ``loss.compute`` with the model's rows in the plan's style.

    Args:
        plan: The run's loss plan.
        loss: The loss module.
        outputs: The model's rows per input group: ``(rows of the two views stacked,
            [rows of the local crops])``, or the two modalities' embeddings (paired task).
        teacher: The EMA teacher's rows of the two views, or None.
        targets: Labels, identities of repeated samples, masks.
    """
    compute: Any = loss.compute
    style, t = plan.style, targets
    if style in ("dino", "ibot", "swav"):
        return _multicrop(plan, loss, outputs, teacher, t)
    if plan.task == "paired":
        a, b = outputs
    else:
        if style in ("predictor", "moco", "nnclr"):
            return _two_view(plan, loss, outputs[0], teacher, t)
        a, b = _halves(outputs[0])
    y = t.labels
    if style == "classifier":
        assert y is not None  # the supervised task always has labels
        yy = torch.cat([y, y])
        targets_ = F.one_hot(yy, t.num_classes).to(a.dtype) if plan.targets == "one_hot" else yy
        return _as_output(compute(torch.cat([a, b]), targets_))
    if style == "labels":
        assert y is not None
        return _as_output(compute(torch.cat([a, b]), torch.cat([y, y])))
    if style == "scored":
        assert y is not None
        return _as_output(compute(*scored_pairs(a, b, y)))
    if style == "single":
        return _as_output(compute(torch.cat([a, b])))
    if style == "parts":
        return _parts(plan, loss, a, b, t)
    if style == "multitask":
        subs = _sub_configs(plan.loss_kwargs, plan.name)
        if plan.sub_style == "labels":
            assert y is not None
            a, b = torch.cat([a, b]), torch.cat([y, y])
        return _as_output(compute(dict.fromkeys(subs, a), dict.fromkeys(subs, b)))
    if plan.task == "supervised":
        return _as_output(compute(a, b, labels=y))
    return _as_output(compute(a, b, **_ssl_labels(plan, t, 1)))
