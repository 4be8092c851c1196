"""The one adapter every legacy name goes through.

It owns what all legacy classes share and nothing else: the once-per-name
``DeprecationWarning``, warnings for arguments and inputs that no longer mean anything, the
legacy keyword inputs (``vision_features``/``text_features``/``match_ids`` → labels), the
optional per-modality projection heads, the legacy output conventions (detached metrics, the
accuracies and ``recalls``, the legacy reduction) and the schedule hooks. The maths is always
done by the new losses the adapters hold.
"""

from __future__ import annotations

import difflib
import inspect
import sys
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor, nn

from embedloss._validation import check_labels, check_pair, check_tensor
from embedloss.base.base_loss import BaseLoss
from embedloss.base.mixins import ProjectionMixin
from embedloss.metrics import recall_at_k
from embedloss.ops.similarity import labels_from_match_ids

__all__ = [
    "CLIP_DIRECTIONS",
    "GUIDE",
    "TRAINER_KEYS",
    "IgnoredArgumentWarning",
    "LegacyLoss",
    "MatchIds",
    "PairedLoss",
    "call_hook",
    "deprecated",
    "legacy_reduce",
    "metric",
    "metrics",
    "renamed",
    "reset_warning_registry",
    "retrieval_metrics",
    "warn_ignored",
]

#: Legacy ``match_ids``: a list of hashables (equal ids are positives), an id tensor, or None.
MatchIds: TypeAlias = "Sequence[Hashable] | Tensor | None"

#: Where users are sent for the mapping of names, arguments and outputs.
GUIDE = "docs/LOSS_MIGRATION_GUIDE.md"

#: Inputs the legacy trainers pass to every loss; legacy classes accept and ignore them silently.
TRAINER_KEYS = frozenset(
    {
        "class_logits",
        "class_labels",
        "matching_logits",
        "matching_labels",
        "logits",
        "labels",
        "attention_weights",
    }
)

#: Why an accepted legacy argument no longer does anything (one sentence each).
IGNORED_REASONS = {
    "dim": "the embedding dimension is taken from the inputs",
    "sampling_strategy": (
        "the legacy memory-bank and global sampling modes never activated; negatives are "
        "in-batch (use embedloss.MoCoLoss for a queue of past negatives)"
    ),
    "memory_bank_size": "the legacy memory bank never activated (use embedloss.MoCoLoss)",
    "dataset_size": "it only chose the legacy sampling mode, which never activated",
    "cache_labels": "targets are built for every batch (the legacy cache was keyed by batch size only)",
    "use_hard_negatives": "the legacy class never used it (use embedloss.HardNegativeLoss)",
    "hard_negative_weight": "the legacy class never used it (use embedloss.HardNegativeLoss)",
    "similarity_matrix": "the similarity is computed from the features by the new loss",
    "clip_grad": (
        "clamping the loss zeroed its gradient; clip gradients with "
        "torch.nn.utils.clip_grad_norm_ instead"
    ),
    "use_class_weights": (
        "per-sample class weights are not part of the supervised contrastive loss; weight the "
        "per-pair losses of reduction='none' yourself"
    ),
    "class_weights": "see use_class_weights",
    "batch_norm_last_layer": "the loss standardises every dimension over the batch itself",
    "normalize_embeddings": (
        "the loss standardises every dimension over the batch; row normalisation kept it from "
        "its optimum"
    ),
    "num_epochs": "the warm-up is counted in epochs from warmup_epochs alone",
    "warmup_epochs": "the VICReg part is blended in over gradual_transition_steps",
    "curriculum": "the VICReg part is blended in over gradual_transition_steps",
    "fusion_dim": "dimensions come from the inputs",
    "vision_dim": "dimensions come from the inputs",
    "text_dim": "dimensions come from the inputs",
    "reduction": "the loss is a batch statistic (one value per batch)",
}


class IgnoredArgumentWarning(UserWarning):
    """A legacy argument or input that no longer means anything was given and is ignored."""


_WARNED: set[tuple[str, ...]] = set()


def reset_warning_registry() -> None:
    """Forget which warnings were given, so the next use warns again (for tests)."""
    _WARNED.clear()


def _is_internal(frame: FrameType) -> bool:
    name = str(frame.f_globals.get("__name__", ""))
    return name.startswith(("embedloss.compat", "torch.nn.modules"))


def _warn(message: str, category: type[Warning], key: tuple[str, ...] | None = None) -> None:
    """Warn once per ``key`` (every time without one), attributed to the user's line of code."""
    if key is not None:
        if key in _WARNED:
            return
        _WARNED.add(key)
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and _is_internal(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def deprecated(name: str, replacement: str) -> None:
    """The ``DeprecationWarning`` of a legacy name, given once per name and process."""
    _warn(
        f"embedloss.compat.{name} is deprecated. Replacement: {replacement}. "
        f"See {GUIDE} for the argument and output mapping and what changed.",
        DeprecationWarning,
        ("deprecated", name),
    )


def warn_ignored(owner: str, *, once: bool = False, **values: Any) -> None:
    """Warn for each legacy argument that was given (not ``None``) but means nothing now.

    A tensor is shown by its shape. ``once`` (for forward inputs) warns once per owner and
    argument instead of at every call.
    """
    for arg, value in values.items():
        if value is not None:
            if isinstance(value, Tensor):
                value = f"<tensor of shape {tuple(value.shape)}>"
            reason = IGNORED_REASONS.get(arg, "it has no counterpart in embedloss")
            key = ("ignored", owner, arg) if once else None
            _warn(f"{owner}({arg}={value!r}) is ignored: {reason}.", IgnoredArgumentWarning, key)


def metric(value: Tensor | float) -> Tensor:
    """A legacy metric: a detached 0-d float tensor (works with ``.item()``, ``float()`` and f-strings)."""
    if isinstance(value, Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value))


def metrics(**values: Tensor | float) -> dict[str, Tensor]:
    """``{key: metric(value)}``, in the order given."""
    return {key: metric(value) for key, value in values.items()}


def renamed(terms: Mapping[str, Any], **names: str) -> dict[str, Tensor]:
    """Legacy metrics from a new loss's terms: ``{legacy_key: metric(terms[new_name])}``."""
    return {key: metric(terms[name]) for key, name in names.items()}


#: The legacy names of CLIP's two directional losses (for :func:`renamed`).
CLIP_DIRECTIONS = {"v2t_loss": "loss_image_to_text", "t2v_loss": "loss_text_to_image"}

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_metrics(
    vision: Tensor, text: Tensor, labels: Tensor | None = None, recalls: bool = True
) -> dict[str, Any]:
    """The legacy accuracies and ``recalls`` dict, from :func:`embedloss.metrics.recall_at_k`.

    ``v2t_accuracy``/``t2v_accuracy`` are recall@1 of each direction (a positive ranks first;
    ties count against it), ``accuracy`` their mean; ``recalls`` (left out with
    ``recalls=False``) holds ``v2t_recall@k``, ``t2i_recall@k`` (also spelt ``t2v_recall@k``, as
    ``CLIPStyleLoss`` did) and ``avg_recall@k`` for k in (1, 5, 10); a k at or above the batch
    size gives 1.
    """
    r = recall_at_k(vision.detach(), text.detach(), k=RECALL_KS, labels=labels)
    out: dict[str, Any] = {
        "v2t_accuracy": metric(r["query_to_key_recall@1"]),
        "t2v_accuracy": metric(r["key_to_query_recall@1"]),
        "accuracy": metric(r["recall@1"]),
    }
    if recalls:
        table: dict[str, float] = {}
        for k in RECALL_KS:
            table[f"v2t_recall@{k}"] = r[f"query_to_key_recall@{k}"]
            table[f"t2i_recall@{k}"] = table[f"t2v_recall@{k}"] = r[f"key_to_query_recall@{k}"]
            table[f"avg_recall@{k}"] = r[f"recall@{k}"]
        out["recalls"] = {key: metric(value) for key, value in table.items()}
    return out


def legacy_reduce(per: Tensor, reduction: str, sample_weight: Tensor | None = None) -> Tensor:
    """The legacy reduction: ``per·s`` (weights broadcast over trailing dims), then mean/sum."""
    if sample_weight is not None:
        check_tensor(sample_weight, "sample_weight")
        if sample_weight.shape != per.shape[:1]:
            raise ValueError(
                f"sample_weight must have shape ({per.shape[0]},), got {tuple(sample_weight.shape)}"
            )
        per = per * sample_weight.to(per).reshape(-1, *([1] * (per.dim() - 1)))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def call_hook(module: nn.Module, hook: str, *args: Any) -> None:
    """Call ``module.<hook>(*args)`` when the module has that schedule hook."""
    method = getattr(module, hook, None)
    if callable(method):
        method(*args)


class LegacyLoss(ProjectionMixin, nn.Module):
    """Base of every legacy class: deprecation, ignored arguments, inputs, heads and hooks.

    Subclasses set ``replacement`` (named in the deprecation warning), pass the legacy
    constructor arguments that mean nothing now to ``super().__init__`` (each given one warns),
    build the new loss(es) they delegate to as child modules, and take the trainer's extra
    inputs as ``**inputs`` in ``forward``, passing them to :meth:`ignore_inputs`.
    """

    replacement: ClassVar[str] = "the embedloss losses"

    def __init__(self, **ignored: Any) -> None:
        super().__init__()
        deprecated(type(self).__name__, self.replacement)
        self.projection = None
        warn_ignored(type(self).__name__, **ignored)

    def init_heads(
        self,
        enabled: bool,
        input_dim: int | None,
        projection_dim: int,
        flag: str = "add_projection",
        num_layers: int = 2,
    ) -> None:
        """Per-modality projection heads (``vision``, ``text``), as the legacy classes had.

        Two layers ``Linear → ReLU → Linear`` (hidden size ``input_dim``), or three with
        BatchNorm (Barlow Twins).
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"{flag} must be a bool, got {type(enabled).__name__}")
        if enabled and input_dim is None:
            _warn(
                f"{type(self).__name__}({flag}=True) needs input_dim to build its projection "
                f"heads; none are built. Pass input_dim=<feature dim>, or {flag}=False.",
                IgnoredArgumentWarning,
            )
        self._init_projection(
            input_dim if enabled else None,
            projection_dim,
            num_layers=num_layers,
            modalities=("vision", "text"),
        )

    def ignore_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Accept the trainer's extra inputs; warn once for a name no trainer passes (a likely typo)."""
        params = [p for p in inspect.signature(self.forward).parameters if p != "inputs"]
        for key in inputs:
            if key in TRAINER_KEYS:
                continue
            close = difflib.get_close_matches(
                key, [*params, *sorted(TRAINER_KEYS)], n=1, cutoff=0.6
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _warn(
                f"{type(self).__name__}.forward ignores the unknown input {key!r}{hint}; "
                f"it takes {', '.join(params)}.",
                IgnoredArgumentWarning,
                ("input", type(self).__name__, key),
            )

    def ignore_forward(self, **values: Any) -> None:
        """Warn once per class and name for legacy forward inputs given that mean nothing now."""
        warn_ignored(f"{type(self).__name__}.forward", once=True, **values)

    def paired_inputs(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds,
        inputs: Mapping[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate, project (if heads exist) and turn ``match_ids`` into ``labels``."""
        self.ignore_inputs(inputs)
        check_pair(vision_features, text_features, "vision_features", "text_features")
        labels = None
        if match_ids is not None:
            labels = labels_from_match_ids(match_ids, device=vision_features.device)
            check_labels(labels, vision_features.shape[0], "match_ids")
        return self.project(vision_features, "vision"), self.project(text_features, "text"), labels

    def _scheduled(self) -> Iterable[Any]:
        return [m for m in self.children() if isinstance(m, (BaseLoss, LegacyLoss))]

    def update_epoch(self, epoch: int) -> None:
        """Forward the trainer's epoch hook to the losses this adapter holds."""
        for module in self._scheduled():
            module.update_epoch(epoch)

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Forward the trainer's step hook (``total_steps`` may be ``None``) to the losses held."""
        for module in self._scheduled():
            module.update_step(step, total_steps)


class PairedLoss(LegacyLoss):
    """A legacy class whose forward takes ``vision_features, text_features, match_ids=None``.

    :meth:`outputs` gets the validated, projected features and the labels made from
    ``match_ids`` (``None``: diagonal pairing). By default it is the held loss's ``loss`` and its
    terms under their legacy names (``legacy_terms``); subclasses override it for more.
    """

    loss: BaseLoss
    #: Legacy output key → the name of the term of ``self.loss`` it reports, in output order.
    legacy_terms: ClassVar[dict[str, str]] = {}

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics (``match_ids`` default: diagonal pairing)."""
        return self.outputs(*self.paired_inputs(vision_features, text_features, match_ids, inputs))

    def outputs(self, v: Tensor, t: Tensor, labels: Tensor | None) -> dict[str, Any]:
        """The legacy output dict of one batch."""
        out = self.loss.compute(v, t, labels)
        return {"loss": out.loss, **renamed(out.terms, **self.legacy_terms)}
