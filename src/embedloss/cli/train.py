"""``embedloss train``: train a small embedding model with any registered loss, then evaluate it.

One process, or several under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA). Under DDP every
rank draws the same global permutation through a :class:`~torch.utils.data.DistributedSampler`
and the same augmentation parameters for the global batch (it keeps the rows of its own
samples), the loss gathers the keys of all ranks (``gather_distributed=True`` where the loss
takes it), gradients of the loss's own parameters (a learnable temperature, class weights) are
averaged like DDP averages the model's, and rank 0 evaluates and writes the outputs. So a run on
W processes with global batch B follows the single-process run with batch B, up to per-rank
BatchNorm statistics and floating-point summation order.

**Resuming.** With ``--output DIR`` a checkpoint (:mod:`embedloss.cli.checkpoint`) is written
after every epoch. Everything a step depends on is either in it (weights, optimiser, loss state,
random generators, the step count) or a function of the seed, the epoch and the step (the data
order, every augmentation, the learning rate), so ``--resume DIR`` continues exactly where the
run stopped: on CPU the result is bit-identical to a run that was never interrupted. Raising
``--epochs`` on resume extends the run; schedules that span the run (a cosine learning rate, a
loss's ``update_step`` schedule) then span the new length from the current step on (a note says
so), so only runs without such schedules — the default constant rate — equal a fresh longer run.
Settings the checkpoint's state holds — the loss's options, the model, the method, the weight
decay, the seed and split — cannot change on resume (:func:`check_resume` names each change).

**Methods.** The model holds the method's heads and, for MoCo, BYOL, DINO and iBOT, an EMA
teacher (:mod:`embedloss.cli.methods`), which follows the student after every optimiser step
and is saved in the checkpoint with the model; multi-crop methods get local crops, iBOT masked
views (:mod:`embedloss.cli.views`).

**Large batches.** ``micro_batch_size`` runs each step through
:class:`embedloss.gradcache.GradCache`: the encoder sees that many inputs at a time, the loss the
whole batch once (so a DINO centre, SwAV's codes and a MoCo queue see the full batch), and the
gradients equal those of the plain step. A batch larger than the training split repeats samples,
each copy augmented differently (:func:`embedloss.cli.views.epoch_order`); ssl losses that take
``labels`` then get the samples' identities, so that two copies of one image are positives.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embedloss._validation import NonFiniteError
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.cli.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_state,
    prepare_output,
    restore_rng,
    save_checkpoint,
)
from embedloss.cli.config import CLIError, config_to_yaml, resolve_config
from embedloss.cli.data import InputSpec, TaskData, describe_perturbation, load_task_data
from embedloss.cli.evaluate import PRIMARY_METRIC, EvalSetup, epoch_metrics, evaluate_with_baselines
from embedloss.cli.methods import Method, resolve_method
from embedloss.cli.models import TaskModel
from embedloss.cli.report import (
    METRIC_LABELS,
    TensorBoardLog,
    format_summary,
    plot_curves,
    write_history,
)
from embedloss.cli.runtime import World, deterministic, mean_over_ranks, progress_bar, world
from embedloss.cli.tasks import LossContext, LossPlan, build_loss, compute_loss, make_plan
from embedloss.cli.views import StepBatch, epoch_order, make_batch, steps_per_epoch
from embedloss.gradcache import GradCache
from embedloss.registry import loss_info

__all__ = [
    "METRIC_LABELS",
    "PRIMARY_METRIC",
    "build_model",
    "check_resume",
    "format_summary",
    "lr_factor",
    "run_training",
    "task_text",
]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate of ``step`` (0-based) as a fraction of the peak.

    A linear warm-up reaches the peak at step ``warmup_steps − 1``; then ``constant`` stays
    there and ``cosine`` decays as ``(1 + cos(π·t))/2``, ``t`` going from 0 to 1 over the rest of
    the run. A function of the step alone, so that a resumed run needs no scheduler object.

    Example:
        >>> [round(lr_factor(s, warmup_steps=2, total_steps=6, schedule="cosine"), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def task_text(task: str, data: TaskData, aug: Mapping[str, Any]) -> str:
    """The task in words, as this data makes it."""
    if task == "paired":
        pairs = "top half ↔ bottom half of each digit" if data.name == "digits" else "x_a ↔ x_b"
        return f"paired: {pairs}, one encoder each"
    kind = "image" if data.image_shape is not None else "feature vector"
    shift = aug["shift"] if data.image_shape is not None else 0  # the kind says "no shifts"
    views = describe_perturbation(data.image_shape, shift, aug["noise"], aug["mask"])
    labels = "supervised: with class labels, " if task == "supervised" else "self-supervised: "
    return f"{labels}two views of each {kind} ({views})"


def build_model(
    plan: LossPlan, data: TaskData, cfg: Mapping[str, Any], method: Method
) -> TaskModel:
    """The run's model, initialised from torch's current seed."""
    b = data.inputs.get("b")
    return TaskModel.from_config(
        plan.task,
        plan.style,
        data.inputs["a"].features,
        None if b is None else b.features,
        data.num_classes,
        dict(cfg["model"]),
        method,
        data.image_shape,
    )


class _Group(nn.Module):
    """One input group of the model (:meth:`TaskModel.group`), as an encoder of GradCache."""

    def __init__(self, model: TaskModel, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model.group(self.index, *tensors)


@dataclass
class Session:
    """Everything a training run holds; the checkpoint is its state."""

    plan: LossPlan
    method: Method
    data: TaskData
    cfg: dict[str, Any]
    world: World
    model: TaskModel
    initial: TaskModel  # the random encoder: the model before the first step
    net: nn.Module  # the model, wrapped by DDP when distributed (and not micro-batched)
    loss: nn.Module
    opt: torch.optim.Optimizer
    steps: int  # optimiser steps per epoch
    setup: EvalSetup
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimiser steps
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run as now configured."""
        return self.steps * int(self.cfg["epochs"])

    @property
    def warmup_steps(self) -> int:
        """Warm-up steps (``warmup_epochs`` may be fractional)."""
        return round(float(self.cfg["warmup_epochs"]) * self.steps)

    @property
    def micro_batch(self) -> int | None:
        """Encoder inputs per GradCache micro-batch, or None for plain backprop."""
        m = self.cfg.get("micro_batch_size")
        return None if m is None else int(m)

    @property
    def repeats(self) -> bool:
        """Whether a step's batch repeats samples (larger than the training split)."""
        return int(self.cfg["batch_size"]) > len(self.data.train)

    def params(self) -> list[nn.Parameter]:
        """Every trained parameter: the model's and the loss's (a learnable τ, class weights)."""
        return [
            *(p for p in self.model.parameters() if p.requires_grad),
            *(p for p in self.loss.parameters() if p.requires_grad),
        ]


def _loss_context(data: TaskData, cfg: Mapping[str, Any], method: Method) -> LossContext:
    """What the run decides of the loss's constructor: classes, widths, prototypes."""
    model = cfg["model"]
    width = model["embedding_dim"] if method.head == "none" else model["head_dim"]
    return LossContext(
        num_classes=max(data.num_classes, 1),
        embedding_dim=int(width),
        output_dim=int(method.prototypes or model["head_dim"]),
    )


def _build(
    plan: LossPlan, method: Method, data: TaskData, cfg: dict[str, Any], w: World
) -> Session:
    batch = int(cfg["batch_size"])
    if batch % w.size:
        raise CLIError(f"batch_size {batch} must be divisible by the {w.size} processes")
    steps = steps_per_epoch(len(data.train), batch)
    torch.manual_seed(int(cfg["seed"]))  # the encoder comes first: one random encoder per seed
    model = build_model(plan, data, cfg, method).to(w.device)
    initial = copy.deepcopy(model).eval()
    context = _loss_context(data, cfg, method)
    loss = build_loss(plan, distributed=w.distributed, context=context).to(w.device)
    loss.train()
    net: nn.Module = model
    if w.distributed and cfg.get("micro_batch_size") is None:
        ids = [w.device.index] if w.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # Every parameter of the loss is trained (a learnable temperature, class weights, proxies),
    # without weight decay, at the plan's multiple of the learning rate.
    trained = [p for p in model.parameters() if p.requires_grad]  # not the EMA teacher's
    groups: list[dict[str, Any]] = [{"params": trained, "weight_decay": cfg["weight_decay"]}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr_scale": plan.loss_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg["lr"])
    setup = EvalSetup.build(plan.task, data, cfg, w.device, plan.nested_dims)
    return Session(plan, method, data, cfg, w, model, initial, net, loss, opt, steps, setup)


def _check_micro_batches(
    cfg: Mapping[str, Any], plan: LossPlan, method: Method, data: TaskData, w: World
) -> None:
    """Refuse micro-batches of one input under BatchNorm, which cannot normalise one in training.

    GradCache cuts each input group of a step (the stacked views, the local crops; one group
    per modality when paired) into micro-batches of ``micro_batch_size``, the last one shorter.
    """
    micro = cfg["micro_batch_size"]
    if micro is None or cfg["model"]["norm"] != "batch":
        return
    local = int(cfg["batch_size"]) // w.size
    sizes = [local, local] if plan.task == "paired" else [2 * local]
    if plan.task != "paired" and method.local_crops and data.image_shape is not None:
        sizes.append(method.local_crops * local)

    def lone(m: int) -> bool:
        return m == 1 or any(n % m == 1 for n in sizes)

    if lone(micro):
        fit = next((m for m in range(micro + 1, max(sizes) + 1) if not lone(m)), None)
        inputs = ("groups of " if len(sizes) > 1 else "") + " and ".join(map(str, sizes))
        raise CLIError(
            f"--micro-batch-size {micro} leaves a micro-batch of 1 input (the step's {inputs} "
            f"encoder inputs, {micro} at a time), and BatchNorm (--norm batch) cannot normalise "
            "a single input in training: every micro-batch needs >= 2 inputs; use "
            + (f"--micro-batch-size {fit}, or " if fit is not None else "")
            + "--norm layer (exact under micro-batches)"
        )


def _fixed_settings(cfg: Mapping[str, Any], loss: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resume must keep, by config path: those the checkpoint's state holds.

    The loss's options (its buffers: τ, queues, centres; the constructor's defaults filled
    in), the model's and the method's (layers, the teacher's base momentum, prototypes),
    AdamW's weight decay (its state dict keeps its own) and the seed and test fraction (the
    initialisation and the data split).
    """
    params = loss_info(loss["name"]).signature.parameters.values()
    options = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    options.update((k, v) for k, v in loss.items() if k != "name")
    return {
        **{f"loss.{k}": v for k, v in options.items()},
        **{f"{part}.{k}": v for part in ("model", "method") for k, v in cfg[part].items()},
        "seed": cfg["seed"],
        "weight_decay": cfg["weight_decay"],
        "data.test_fraction": cfg["data"]["test_fraction"],
    }


def check_resume(
    ckpt: Mapping[str, Any], plan: LossPlan, cfg: Mapping[str, Any], source: str
) -> None:
    """Refuse, before any work, a resume that would not continue the checkpointed run.

    Another loss or task, or a setting the checkpoint's state fixes (:func:`_fixed_settings`),
    is refused naming each change; so is a finished run without more ``epochs`` in ``cfg``.
    """
    old = ckpt["config"]
    for key, now in (("loss", plan.name), ("task", plan.task)):
        was = old["loss"]["name"] if key == "loss" else old["task"]
        if was != now:
            raise CLIError(
                f"{source} was trained with {key} {was!r}, not {now!r}; another {key} needs a "
                "new run (drop --resume)"
            )
    kept = _fixed_settings(resolve_config(old), old["loss"])  # defaults for older runs' gaps
    given = _fixed_settings(cfg, {"name": plan.name, **plan.loss_kwargs})
    changes = [f"{k} {kept.get(k)!r} → {v!r}" for k, v in given.items() if kept.get(k) != v]
    if changes:
        raise CLIError(
            f"{source} cannot continue with other settings than it was trained with "
            f"({', '.join(changes)}): its checkpoint's state and data split keep the old ones; "
            "resume without changing them, or train a new run with them (drop --resume)"
        )
    done = int(ckpt["epoch"])
    if done >= int(cfg["epochs"]):
        raise CLIError(
            f"{source} has completed {done} epoch(s) of {old['epochs']}; pass --epochs E with "
            f"E > {done} to train it further"
        )


def _resume(sess: Session, ckpt: Mapping[str, Any], source: str) -> None:
    """Load a checkpoint into a freshly built session (which must fit it)."""
    old = ckpt["config"]
    load_state(sess.model, ckpt["model"], "model", source)
    load_state(sess.loss, ckpt["loss"], "loss", source)
    try:
        sess.opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as err:
        raise CLIError(f"{source}: the optimiser state does not fit: {err}") from None
    sess.epoch, sess.step = int(ckpt["epoch"]), int(ckpt["step"])
    sess.history = list(ckpt["history"])
    step_schedule = getattr(type(sess.loss), "update_step", None) is not BaseLoss.update_step
    step_schedule = step_schedule or sess.model.scheduled_teacher
    changed = sess.cfg["lr_schedule"] != "constant" or step_schedule
    if sess.cfg["epochs"] != old["epochs"] and changed and sess.world.main:
        print(
            f"embedloss: note: the run now spans {sess.cfg['epochs']} epochs (planned: {old['epochs']}); "
            "its schedules (the learning rate, the loss's update_step, the teacher's momentum) "
            "follow the new length from "
            f"step {sess.step} on",
            file=sys.stderr,
        )
    restore_rng(ckpt["rng"], sess.world.device)


def _average_grads(params: list[nn.Parameter], w: World) -> None:
    """The mean of the ranks' gradients, as DDP averages a model's."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= w.size


def _forward_backward(sess: Session, batch: StepBatch) -> LossOutput:
    """Loss and gradients of a step: plain backprop, or through GradCache in micro-batches."""
    micro = sess.micro_batch
    teacher = sess.model.teacher_rows(batch.teacher, micro) if batch.teacher is not None else None

    def loss_of(*rows: Tensor) -> LossOutput:
        return compute_loss(sess.plan, sess.loss, rows, teacher, batch.targets)

    if micro is None:
        out = loss_of(*sess.net(*batch.groups))
        if out.loss.dim() != 0:
            raise CLIError(
                f"the loss returned shape {tuple(out.loss.shape)}; training needs a scalar "
                "(use reduction 'mean' or 'sum')"
            )
        out.loss.backward()
        return out
    streams = [_Group(sess.model, i) for i in range(len(batch.groups))]
    with warnings.catch_warnings():  # run_training says it once: ghost BatchNorm
        warnings.filterwarnings("ignore", message=".*BatchNorm.*", category=UserWarning)
        cache = GradCache(streams, loss_of, micro_batch_size=micro, allow_batch_norm=True)
        return cache.step(*batch.groups)


def _step(sess: Session, batch: StepBatch) -> tuple[LossOutput, float]:
    """One optimiser step; returns the loss output and the learning rate used.

    Forward and backward run plain or through GradCache (:func:`_forward_backward`); then the
    ranks' gradients are averaged, clipped, applied, and :meth:`TaskModel.after_optimizer_step`
    moves the EMA teacher.
    """
    cfg, total = sess.cfg, sess.total_steps
    lr = float(cfg["lr"]) * lr_factor(
        sess.step, warmup_steps=sess.warmup_steps, total_steps=total, schedule=cfg["lr_schedule"]
    )
    for group in sess.opt.param_groups:
        group["lr"] = lr * float(group.get("lr_scale", 1.0))
    sess.loss.update_step(sess.step, total)  # type: ignore[operator]
    bf16 = cfg["precision"] == "bf16"
    sess.opt.zero_grad(set_to_none=True)
    with torch.autocast(sess.world.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = _forward_backward(sess, batch)
    if sess.world.distributed:  # DDP averages the model's gradients, not the loss's
        wrapped = sess.net is not sess.model
        _average_grads(list(sess.loss.parameters()) if wrapped else sess.params(), sess.world)
    if cfg["grad_clip"] is not None:
        torch.nn.utils.clip_grad_norm_(sess.params(), float(cfg["grad_clip"]))
    sess.opt.step()
    sess.model.after_optimizer_step(sess.step, total)
    sess.step += 1
    return out, lr


def _scalar_terms(terms: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in sorted(terms):
        value = terms[key]
        if isinstance(value, Tensor) and value.numel() == 1:
            out[key] = float(value.detach().float())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _train_epoch(sess: Session, bar: Any) -> dict[str, Any]:
    """Train one epoch; returns its history record (without the held-out metric)."""
    epoch, w = sess.epoch, sess.world
    batch, local = int(sess.cfg["batch_size"]), int(sess.cfg["batch_size"]) // w.size
    order = epoch_order(
        len(sess.data.train),
        batch=batch,
        rank=w.rank,
        size=w.size,
        epoch=epoch,
        seed=int(sess.cfg["seed"]),
    )
    sess.loss.update_epoch(epoch)  # type: ignore[operator]
    bar.set_description_str(
        f"{sess.plan.name} epoch {epoch + 1}/{sess.cfg['epochs']}", refresh=False
    )
    sums: dict[str, float] = {}
    lr = 0.0
    where = (w.rank, w.size, w.device)
    for s in range(sess.steps):
        idx = order[s * local : (s + 1) * local]
        inputs = make_batch(sess.data, sess.cfg, sess.method, where, epoch, s, idx, sess.repeats)
        try:
            out, lr = _step(sess, inputs)
        except NonFiniteError as err:  # the model's outputs (or τ) diverged
            raise CLIError(
                f"the loss became nan at epoch {epoch + 1}, step {s + 1} ({err}); "
                "try a smaller --lr"
            ) from err
        terms = _scalar_terms(out.terms)
        logged = mean_over_ranks(
            torch.tensor([float(out.loss.detach()), *terms.values()], dtype=torch.float64),
            sess.world,
        ).tolist()
        value, terms = logged[0], dict(zip(terms, logged[1:], strict=True))
        if not math.isfinite(value):
            raise CLIError(
                f"the loss became {value} at epoch {epoch + 1}, step {s + 1}; try a smaller --lr"
            )
        for key, v in {"loss": value, **terms}.items():
            sums[key] = sums.get(key, 0.0) + v
        shown = ", ".join(f"{k}={v:.3g}" for k, v in list(terms.items())[:4])
        bar.set_postfix_str(f"loss={value:.4f}" + (f", {shown}" if shown else ""), refresh=False)
        bar.update(1)
    means = {k: v / sess.steps for k, v in sums.items()}
    return {"epoch": epoch + 1, "loss": means.pop("loss"), "terms": means, "lr": lr}


def _checkpoint(sess: Session) -> dict[str, Any]:
    return {
        "config": sess.cfg,
        "epoch": sess.epoch,
        "step": sess.step,
        "model": sess.model.state_dict(),
        "loss": sess.loss.state_dict(),
        "optimizer": sess.opt.state_dict(),
        "scheduler": {
            "lr_schedule": sess.cfg["lr_schedule"],
            "warmup_steps": sess.warmup_steps,
            "total_steps": sess.total_steps,
            "step": sess.step,
        },
        "rng": capture_rng(sess.world.device),
        "sampler": {"seed": int(sess.cfg["seed"]), "epoch": sess.epoch},
        "data": {
            "name": sess.data.name,
            "inputs": {m: spec.as_dict() for m, spec in sess.data.inputs.items()},
            "image_shape": None if sess.data.image_shape is None else list(sess.data.image_shape),
            "num_classes": sess.data.num_classes,
        },
        "history": sess.history,
        "world_size": sess.world.size,
    }


def _train(sess: Session, out_dir: Path | None, progress: bool) -> None:
    """The epochs left: train, measure the held-out metric, checkpoint, log."""
    w = sess.world
    left = (int(sess.cfg["epochs"]) - sess.epoch) * sess.steps
    bar = progress_bar(left, progress and w.main, sess.plan.name)
    board = TensorBoardLog(out_dir) if out_dir is not None and w.main else None
    try:
        while sess.epoch < int(sess.cfg["epochs"]):
            sess.model.train()
            record = _train_epoch(sess, bar)
            if w.main:
                sess.model.eval()
                record["eval"] = epoch_metrics(sess.model, sess.setup)
            sess.history.append(record)
            sess.epoch += 1
            if out_dir is not None and w.main:
                save_checkpoint(out_dir, _checkpoint(sess))
                write_history(out_dir / "history.jsonl", sess.history)
                assert board is not None
                board.epoch(record)
    finally:
        bar.close()
        if board is not None:
            board.close()
    sess.model.eval()


def _finish(sess: Session, seconds: float, stream: TextIO) -> dict[str, Any]:
    """Evaluate against the baselines and print the summary; returns the metrics document."""
    start = time.perf_counter()
    metrics, baselines = evaluate_with_baselines(sess.model, sess.initial, sess.setup)
    ev, data = sess.cfg["eval"], sess.data
    held_out = describe_perturbation(data.image_shape, ev["shift"], ev["noise"])
    doc: dict[str, Any] = {
        "loss": sess.plan.name,
        "task": sess.plan.task,
        "input_kind": "images" if data.image_shape is not None else "features",
        "held_out_perturbation": None if sess.plan.task == "paired" else held_out,
        "metrics": metrics,
        "baselines": baselines,
        "history": sess.history,
        "dataset": {
            "name": data.name,
            "train_size": len(data.train),
            "test_size": len(data.test),
            "num_classes": data.num_classes,
        },
        "world_size": sess.world.size,
        "seconds": {"train": round(seconds, 3)},
    }
    if sess.plan.task == "paired":
        print(f"held-out split: {len(data.test)} pairs", file=stream)
    else:
        print(f"held-out split: {len(data.test)} samples, perturbed by {held_out}", file=stream)
    print(format_summary(doc), file=stream)
    doc["seconds"]["evaluate"] = round(time.perf_counter() - start, 3)
    return doc


def _write_results(out_dir: Path, doc: dict[str, Any]) -> list[str]:
    """``metrics.json``, then the curves (a plotting problem never costs the rest)."""
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    written = ["checkpoint.pt", "config.yaml", "history.jsonl", "metrics.json"]
    try:
        plot_curves(out_dir / "curves.png", doc["history"], doc, f"{doc['loss']} ({doc['task']})")
        written.append("curves.png")
    except Exception as err:
        print(
            f"embedloss: warning: could not draw curves.png ({type(err).__name__}: {err}); "
            "the checkpoint, metrics and history are written",
            file=sys.stderr,
        )
    if (out_dir / "tensorboard").is_dir():
        written.append("tensorboard/")
    return written


def _method_text(method: Method) -> str:
    parts = []
    if method.teacher_momentum is not None:
        cosine = method.teacher_schedule == "cosine"
        parts.append(
            f"EMA teacher (momentum {method.teacher_momentum:g}{' → 1, cosine' if cosine else ''})"
        )
    if method.local_crops:
        parts.append(f"{method.local_crops} local crops")
    if method.patches:
        parts.append("masked patches")
    if method.prototypes:
        parts.append(f"{method.prototypes} prototypes")
    return f"; {', '.join(parts)}" if parts else ""


def _batch_text(sess: Session) -> str:
    cfg, n = sess.cfg, len(sess.data.train)
    batch = int(cfg["batch_size"])
    text = f"batch {batch}"
    if sess.repeats:
        text += (
            f" (more than the {n} training samples: each is drawn ~{batch / n:.1f}× per step, "
            "each copy augmented differently; one step per epoch)"
        )
    micro = sess.micro_batch
    if micro is not None:
        text += f" through GradCache, {micro} encoder inputs at a time"
        if cfg["model"]["norm"] == "batch":
            text += (
                " (BatchNorm normalises each micro-batch by its own statistics, so the step is "
                "not exactly the full-batch one; --norm layer makes it exact)"
            )
    return text


def _header(sess: Session, resumed: bool) -> str:
    """The first line of a run: what is trained, on what, how."""
    w, data, cfg, plan = sess.world, sess.data, sess.cfg, sess.plan
    where = f" on {w.size} process{'es' if w.size > 1 else ''} (DDP)" if w.distributed else ""
    again = f", resumed after epoch {sess.epoch}" if resumed else ""
    epochs = int(cfg["epochs"])
    return (
        f"embedloss train: {plan.name} on {data.name} — {task_text(plan.task, data, cfg['augment'])}"
        f"{_method_text(sess.method)}; {epochs} epoch{'s' if epochs != 1 else ''}{again}, "
        f"{_batch_text(sess)}, seed {cfg['seed']}{where}"
    )


def run_training(
    cfg: dict[str, Any],
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate the run described by the resolved ``cfg``.

    Args:
        cfg: A config from :func:`embedloss.cli.config.resolve_config`.
        output: Run directory: ``checkpoint.pt`` and ``history.jsonl`` after every epoch,
            ``config.yaml`` first, ``metrics.json`` and ``curves.png`` at the end (and
            TensorBoard event files in ``tensorboard/`` when ``tensorboard`` is installed).
        overwrite: Replace the run already in ``output`` (else that is an error).
        resume: A run directory whose checkpoint this run continues (``cfg`` is then normally
            its config, with ``epochs`` raised or unchanged).
        progress: Show a progress bar (stderr) with the live loss and terms.
        stream: Where the summary goes (default stdout).

    Returns:
        The ``metrics.json`` document on the main process, ``None`` on the other ranks.

    Raises:
        CLIError: For configurations, data, output directories or checkpoints the trainer
            cannot use.
    """
    stream = sys.stdout if stream is None else stream
    plan = make_plan(cfg["loss"], cfg["task"])
    cfg = copy.deepcopy(cfg)
    cfg["task"] = plan.task
    cfg["loss"] = {"name": plan.name, **plan.loss_kwargs}
    start = time.perf_counter()
    resume_dir = None if resume is None else Path(resume)
    ckpt = None if resume_dir is None else load_checkpoint(resume_dir)
    source = f"run {str(resume_dir)!r}"
    if ckpt is not None:
        check_resume(ckpt, plan, cfg, source)
    seed = int(cfg["seed"])
    with world(cfg["device"]) as w, deterministic(seed, int(cfg["num_threads"]), cfg["device"]):
        out_dir = None
        if output is not None and w.main:
            out_dir = prepare_output(output, overwrite=overwrite, resuming=resume_dir)
        specs = None
        if ckpt is not None:
            specs = {m: InputSpec.from_dict(d) for m, d in ckpt["data"]["inputs"].items()}
        data = load_task_data(cfg["data"], plan.task, seed, inputs=specs)
        method = resolve_method(plan, cfg["method"], data.image_shape)
        cfg["method"] = method.as_config()
        _check_micro_batches(cfg, plan, method, data, w)
        sess = _build(plan, method, data, cfg, w)
        if ckpt is not None:
            _resume(sess, ckpt, source)
        if out_dir is not None:  # only what the run uses: after the checkpoint has loaded
            (out_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        if w.main:
            print(_header(sess, ckpt is not None), file=stream, flush=True)
        _train(sess, out_dir, progress)
        doc = None
        if w.main:
            doc = _finish(sess, time.perf_counter() - start, stream)
            doc["seconds"]["total"] = round(time.perf_counter() - start, 3)
            tail = " (--output DIR saves a checkpoint, the metrics, history and curves)"
            if out_dir is not None:
                tail = f"; wrote {out_dir}/ ({', '.join(_write_results(out_dir, doc))})"
            print(
                f"final loss {sess.history[-1]['loss']:.4f}; {doc['seconds']['total']:.1f} s{tail}",
                file=stream,
                flush=True,
            )
        if w.distributed:
            # DDP's reducer holds the process group and its threads: free it (and let every
            # rank finish) before the group is destroyed, not at interpreter exit.
            del sess
            gc.collect()
            dist.barrier()
    return doc
