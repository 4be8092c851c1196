"""Any embedloss loss as a sentence-transformers loss.

:class:`EmbedlossLoss` is what ``SentenceTransformerTrainer(loss=...)`` takes: it embeds each
text column of ST's batch with the model (``model(features)["sentence_embedding"]``) and calls
the embedloss loss in one of three layouts (``inputs``):

===========  ====================================================  ===========================
``inputs``   columns (+ ``label`` column)                          embedloss call
===========  ====================================================  ===========================
``pair``     anchor, positive [, negative_1, ..., negative_k]      ``loss(a, p)``; with
             [+ labels: identities, optional]                      negatives (``info_nce``):
                                                                   ``loss(a, p, stack(n, 1))``
                                                                   (``(N, k, D)``); with
                                                                   labels: ``labels=labels``
``scores``   sentence_a, sentence_b + a float score per pair       ``loss(a, b, scores)``
``labels``   one or more columns + a label per row (a class, or    ``loss(cat(cols),
             a target embedding)                                   cat([labels] * k))``
===========  ====================================================  ===========================

``inputs="auto"`` reads the loss's ``compute`` signature: a third argument named ``scores``
means ``scores`` (``cosent``, ``angle``), a second named ``labels``/``target``/``targets``
means ``labels`` (``supcon``, ``mse``, the metric-learning losses), anything else ``pair``;
a wrapper (``matryoshka``) takes the layout of the loss it wraps.

The loss's parameters are submodules of the ST loss module, which is what the ST trainer
optimises, so a learnable τ or SigLIP bias trains with the model. ``EmbedlossLoss.callback``
(an :class:`~embedloss.integrations.transformers.EmbedlossCallback`) drives the loss's
schedules, logs its terms and saves its state (queues, centres) in the checkpoints.

With ``micro_batch_size`` the loss runs under :class:`~embedloss.GradCache`: the batch is
embedded in micro-batches without a graph, the loss sees the whole batch, and the cached
gradients are replayed through the model, so a batch of any size costs the activations of one
micro-batch (ST's ``Cached*`` losses do the same for their own losses). The gradient is computed
during the forward and added, times the gradient the trainer's backward brings (gradient
accumulation, loss scaling), to the parameters when the trainer back-propagates the returned loss.

``ST_LOSSES`` maps ST's loss names to their embedloss counterparts, with the conventions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from embedloss import BaseLoss, GradCache, LossOutput, create_loss
from embedloss._validation import check_choice, check_int, describe
from embedloss.integrations.transformers import EmbedlossCallback
from embedloss.ops.distributed import all_reduce_sum_no_grad, world_info

if importlib.util.find_spec("sentence_transformers") is None:  # pragma: no cover - subprocess test
    raise ImportError(
        "embedloss.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'embedloss[integrations]'"
    )

__all__ = ["INPUTS", "ST_LOSSES", "EmbedlossLoss", "Equivalent"]

INPUTS = ("auto", "pair", "scores", "labels")


class Equivalent(NamedTuple):
    """The embedloss counterpart of a sentence-transformers loss."""

    loss: str  # registry name
    options: dict[str, Any]  # constructor options matching ST's defaults
    note: str  # conventions, and where the two differ


_TRIPLET = {"distance": "euclidean", "normalize": False, "margin": 5.0}

ST_LOSSES: dict[str, Equivalent] = {
    "MultipleNegativesRankingLoss": Equivalent(
        "info_nce",
        {"temperature": 0.05},
        "scale = 1/temperature (ST's 20 is 0.05), cosine similarity = normalize=True. "
        "(anchor, positive) pairs: identical. With negative columns embedloss scores each "
        "anchor against its own negatives (N, k, D) only; ST also adds the other rows' "
        "positives and negatives",
    ),
    "CachedMultipleNegativesRankingLoss": Equivalent(
        "info_nce",
        {"temperature": 0.05},
        "as MultipleNegativesRankingLoss, with EmbedlossLoss(..., micro_batch_size=m)",
    ),
    "MultipleNegativesSymmetricRankingLoss": Equivalent(
        "clip",
        {"temperature": 0.05},
        "pairs: identical (anchor→positive and positive→anchor cross-entropies, averaged)",
    ),
    "CachedMultipleNegativesSymmetricRankingLoss": Equivalent(
        "clip",
        {"temperature": 0.05},
        "as MultipleNegativesSymmetricRankingLoss, with micro_batch_size=m",
    ),
    "CoSENTLoss": Equivalent(
        "cosent", {"scale": 20.0}, "(sentence_a, sentence_b, score): identical"
    ),
    "AnglELoss": Equivalent(
        "angle",
        {"cosine_weight": 0.0, "ibn_weight": 0.0, "angle_weight": 1.0, "angle_scale": 20.0},
        "ST's AnglELoss is AnglE's angle term alone, which these weights select (embedloss's "
        "defaults add CoSENT and in-batch negatives, the paper's Eq. 7)",
    ),
    "MatryoshkaLoss": Equivalent(
        "matryoshka",
        {},
        "matryoshka(loss=<the inner loss>, dims=..., weights=...): the weighted sum over the "
        "prefixes, as ST (which can also sample n_dims_per_step of them)",
    ),
    "BatchAllTripletLoss": Equivalent(
        "triplet",
        {**_TRIPLET, "mining": "batch_all"},
        "(sentence, label) rows: identical (mean over the triplets with a positive loss)",
    ),
    "BatchHardTripletLoss": Equivalent(
        "triplet",
        {**_TRIPLET, "mining": "batch_hard"},
        "(sentence, label) rows: identical when every row has a positive (embedloss leaves "
        "anchors without one out of the mean)",
    ),
    "BatchSemiHardTripletLoss": Equivalent(
        "triplet",
        {**_TRIPLET, "mining": "semi_hard"},
        "(sentence, label) rows: identical (FaceNet's semi-hard negatives, TF Addons' rule)",
    ),
    "MSELoss": Equivalent(
        "mse",
        {},
        "(sentence, teacher embedding) rows: identical (F.mse_loss of the embeddings and targets)",
    ),
}


def _infer_inputs(loss: BaseLoss) -> str:
    """The layout the loss's ``compute`` signature asks for (see the module docstring).

    A wrapper whose ``compute`` takes ``*args`` (``matryoshka``) answers for its inner
    ``loss``.
    """
    params = list(inspect.signature(loss.compute).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        inner = getattr(loss, "loss", None)
        if isinstance(inner, BaseLoss):
            return _infer_inputs(inner)
        raise ValueError(
            f"cannot tell which columns {type(loss).__name__} takes from compute(*args): "
            f"pass inputs= one of {INPUTS[1:]}"
        )
    names = [p.name for p in params]
    if len(names) >= 3 and names[2] == "scores":
        return "scores"
    if len(names) >= 2 and names[1] in ("labels", "target", "targets"):
        return "labels"
    return "pair"


def _takes(loss: BaseLoss, argument: str) -> bool:
    """Whether ``loss.compute`` takes ``argument`` (a wrapper's ``**kwargs``: its inner loss)."""
    params = inspect.signature(loss.compute).parameters
    if argument in params:
        return True
    inner = getattr(loss, "loss", None)
    wraps = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return wraps and isinstance(inner, BaseLoss) and _takes(inner, argument)


class _Embedder(nn.Module):
    """``tensors -> model({**tensors, **extras})["sentence_embedding"]``: a GradCache encoder.

    GradCache splits the tensors of a column's features into micro-batches; the other entries
    (ST's ``modality``, a prompt length) are passed unchanged with each.
    """

    def __init__(self, model: nn.Module, extras: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.extras = extras

    def forward(self, **tensors: Tensor) -> Tensor:
        return self.model({**tensors, **self.extras})["sentence_embedding"]


def _add_scaled(
    params: list[nn.Parameter],
    grads: list[Tensor | None],
    averaged: list[nn.Parameter],
    scale: Tensor,
) -> None:
    """Backward hook of a cached loss: ``p.grad += scale · cached gradient``, then averaging.

    The gradients of ``averaged`` (a DDP model's, on a step DDP would synchronise) are then
    averaged over ranks.
    """
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            contribution = g * scale.to(g.dtype)
            p.grad = contribution if p.grad is None else p.grad + contribution
    _average_gradients(averaged)


def _average_gradients(params: Sequence[nn.Parameter]) -> None:
    """All-reduce the gradients of ``params`` (in their order) and divide by the world size.

    One collective per dtype and device; parameters without a gradient are left out.
    """
    world, _ = world_info()
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        total = all_reduce_sum_no_grad(torch.cat([g.reshape(-1) for g in grads])).div_(world)
        for g, part in zip(grads, total.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


class _AverageOverRanks:
    """Post-accumulate-grad hook: average the loss's own gradients over ranks, as DDP would.

    The trainer wraps only the model in ``DistributedDataParallel``, so nothing all-reduces the
    gradient of a learnable τ, a SigLIP bias or class proxies. Each parameter's hook marks it
    ready during the backward and queues, once per backward, a callback that runs when the
    whole backward is done: it all-reduces the marked gradients in the order of ``params`` and
    divides them by the world size. At the end of the backward every collective inside it (DDP's
    buckets, the gather of a ``gather_distributed`` loss) has been issued on every rank, so the
    ranks' order of collectives does not depend on the order autograd happened to run in.
    Under gradient accumulation ``p.grad`` already holds the average of the earlier micro-steps
    (the same on every rank), so averaging ``average + this step's local gradient`` adds the
    average of this step's. Without a process group of several ranks it does nothing.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.ready: set[int] = set()
        self.queued = False

    def reset(self) -> None:
        """Forget a backward that failed before its callback ran."""
        self.ready.clear()
        self.queued = False

    def __call__(self, param: Tensor) -> None:
        if world_info()[0] == 1:
            return
        self.ready.add(id(param))
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        ready = [p for p in self.params if id(p) in self.ready]
        self.reset()
        _average_gradients(ready)


class EmbedlossLoss(nn.Module):
    """An embedloss loss as a sentence-transformers loss: ``forward(features, labels)``.

    See the module docstring for the three batch layouts. The embedloss loss runs in the
    model's train/eval mode (a queue only grows in training). :attr:`callback` is an
    :class:`~embedloss.integrations.transformers.EmbedlossCallback` for this loss: pass it to
    the trainer (``callbacks=[loss.callback]``) for schedules, logged terms and state in
    checkpoints.

    Args:
        model: The ``SentenceTransformer`` (any module mapping a features dict to a dict with
            ``"sentence_embedding"``).
        loss: An embedloss loss, or a registry name (``"info_nce"``).
        loss_options: Constructor options when ``loss`` is a name.
        inputs: ``"auto"`` (default), ``"pair"``, ``"scores"`` or ``"labels"``.
        micro_batch_size: Embed and back-propagate in micro-batches of this many rows through
            :class:`~embedloss.GradCache` (exact; the activations of one micro-batch), or
            ``None`` (default) for one plain forward per column.

    Raises:
        TypeError: If ``model`` is not a module, ``loss`` not an embedloss loss or name, or
            ``loss_options`` given with a loss instance.
        ValueError: For an unknown loss name or option, ``inputs`` or ``micro_batch_size < 1``,
            or when ``inputs="auto"`` cannot tell the layout.

    Example:
        >>> import embedloss, torch
        >>> class Toy(torch.nn.Module):  # stands in for a SentenceTransformer
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = torch.nn.Linear(4, 8)
        ...     def forward(self, features):
        ...         return {"sentence_embedding": self.linear(features["x"])}
        >>> loss = EmbedlossLoss(Toy(), "info_nce", loss_options={"temperature": 0.05})
        >>> loss.inputs, type(loss.loss).__name__
        ('pair', 'InfoNCELoss')
        >>> anchors, positives = {"x": torch.randn(6, 4)}, {"x": torch.randn(6, 4)}
        >>> loss([anchors, positives], None).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | BaseLoss,
        *,
        loss_options: Mapping[str, Any] | None = None,
        inputs: str = "auto",
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a SentenceTransformer (nn.Module), got {describe(model)}"
            )
        if isinstance(loss, str):
            built = create_loss(loss, **dict(loss_options or {}))
        elif isinstance(loss, BaseLoss):
            if loss_options is not None:
                raise TypeError("loss_options apply to a loss given by name, not to an instance")
            built = loss
        else:
            raise TypeError(
                f"loss must be an embedloss loss or a registry name, got {describe(loss)}"
            )
        self.model = model
        self.loss = cast(BaseLoss, built)
        self._described = {
            "loss": loss if isinstance(loss, str) else type(loss).__name__,
            "loss_options": dict(loss_options or {}),
        }
        layout = check_choice(inputs, "inputs", INPUTS)
        self.inputs = _infer_inputs(self.loss) if layout == "auto" else layout
        self.micro_batch_size = (
            None
            if micro_batch_size is None
            else check_int(micro_batch_size, "micro_batch_size", low=1)
        )
        self.callback = EmbedlossCallback(self.loss)
        self._average = _AverageOverRanks([p for p in self.loss.parameters() if p.requires_grad])
        for p in self._average.params:
            p.register_post_accumulate_grad_hook(self._average)

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None
    ) -> Tensor:
        """The loss of one ST batch: a features dict per column, and the ``label`` column.

        Returns:
            The scalar loss (under ``micro_batch_size``, a leaf whose backward adds the cached
            gradients).
        """
        features = list(sentence_features)
        self.loss.train(self.model.training)
        self._average.reset()
        if self.micro_batch_size is not None and torch.is_grad_enabled():
            out = self._cached(features, labels)
        else:
            embeddings = [self.model(f)["sentence_embedding"] for f in features]
            out = self.compute(embeddings, labels)
        self.callback.record(out.terms)
        return out.loss

    def compute(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> LossOutput:
        """The embedloss loss of the column embeddings ``(N, D)`` each, in the layout of ``inputs``.

        Raises:
            ValueError: If the columns or labels do not fit the layout.
        """
        name = type(self.loss).__name__
        if self.inputs == "labels":
            if labels is None:
                raise ValueError(f"{name} with inputs='labels' needs a 'label' column, got none")
            return self.loss.compute(
                torch.cat(list(embeddings)), torch.cat([labels] * len(embeddings))
            )
        if self.inputs == "scores":
            if len(embeddings) != 2 or labels is None:
                raise ValueError(
                    f"{name} with inputs='scores' needs two text columns and a score column, "
                    f"got {len(embeddings)} column(s) and {'no' if labels is None else 'a'} label"
                )
            return self.loss.compute(embeddings[0], embeddings[1], labels)
        return self._pair(embeddings, labels)

    def _pair(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> LossOutput:
        name = type(self.loss).__name__
        if len(embeddings) < 2:
            raise ValueError(f"{name} with inputs='pair' needs two columns, got {len(embeddings)}")
        kwargs: dict[str, Tensor] = {}
        if len(embeddings) > 2:
            if not _takes(self.loss, "negative_keys"):
                raise ValueError(
                    f"{name} takes (anchor, positive) columns, got {len(embeddings)}: "
                    "negative columns need a loss with negative_keys (info_nce)"
                )
            kwargs["negative_keys"] = torch.stack(list(embeddings[2:]), dim=1)  # (N, k, D)
        if labels is not None:
            if not _takes(self.loss, "labels"):
                raise ValueError(
                    f"{name} takes no labels, but the batch has a 'label' column: "
                    "remove it, or choose a loss that takes labels"
                )
            kwargs["labels"] = labels
        return self.loss.compute(embeddings[0], embeddings[1], **kwargs)

    def _cached(self, features: list[dict[str, Tensor]], labels: Tensor | None) -> LossOutput:
        """GradCache step now; its gradients wait, stashed, for the trainer's backward."""
        assert self.micro_batch_size is not None
        tensors = [{k: v for k, v in f.items() if isinstance(v, Tensor)} for f in features]
        extras = [{k: v for k, v in f.items() if not isinstance(v, Tensor)} for f in features]
        cache = GradCache(
            [_Embedder(self.model, e) for e in extras],
            lambda *e: self.compute(e, labels),
            micro_batch_size=self.micro_batch_size,
        )
        params = [p for p in self.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        # Under DDP the replay must not all-reduce: the step's gradients are stashed for the
        # trainer's backward, which scales them; that backward averages the model's gradients
        # when DDP would (the accumulated ones, as DDP does after no_sync() micro-steps).
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        averaged: list[nn.Parameter] = []
        if ddp is not None and ddp.require_backward_grad_sync:
            averaged = [p for p in ddp.parameters() if p.requires_grad]
        try:
            with contextlib.nullcontext() if ddp is None else ddp.no_sync():
                out = cache.step(*tensors)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved, strict=True):
                p.grad = g
        loss = out.loss.detach().requires_grad_()
        loss.register_hook(functools.partial(_add_scaled, params, grads, averaged))
        return LossOutput(loss, out.terms)

    def get_config_dict(self) -> dict[str, Any]:
        """What ST's model card shows for this loss."""
        return {**self._described, "inputs": self.inputs, "micro_batch_size": self.micro_batch_size}
