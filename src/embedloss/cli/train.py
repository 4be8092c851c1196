"""``embedloss train``: train a small embedding model with any registered loss, then evaluate it.

One process, or several under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA). Under DDP every
rank draws the same global permutation through a :class:`~torch.utils.data.DistributedSampler`
and the same augmentation parameters for the global batch (it keeps the rows of its own
samples), the loss gathers the keys of all ranks (``gather_distributed=True`` where the loss
takes it), gradients of the loss's own parameters (a learnable temperature) are averaged like
DDP averages the model's, and rank 0 evaluates and writes the outputs. So a run on W processes
with global batch B follows the single-process run with batch B, up to per-rank BatchNorm
statistics and floating-point summation order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from embedloss.cli.config import CLIError, config_to_yaml
from embedloss.cli.data import (
    TaskData,
    apply_view,
    draw_view_params,
    load_task_data,
    seeded_generator,
)
from embedloss.cli.evaluate import classification_metrics, perturbed_split, retrieval_metrics
from embedloss.cli.models import TaskModel
from embedloss.cli.tasks import LossPlan, build_loss, compute_loss, make_plan

__all__ = ["METRIC_LABELS", "format_summary", "run_training"]

METRIC_LABELS = {
    "knn_accuracy": "k-NN accuracy (perturbed held-out)",
    "linear_probe_accuracy": "linear-probe accuracy (perturbed)",
    "clean_knn_accuracy": "k-NN accuracy (clean held-out)",
    "recall@1": "recall@1 (held-out, both directions)",
    "recall@5": "recall@5 (held-out, both directions)",
}
TASK_TEXT = {
    "ssl": "self-supervised: two augmented views of each image",
    "paired": "paired: top half ↔ bottom half of each digit, one encoder each",
    "supervised": "supervised: two augmented views with class labels",
}


@dataclass(frozen=True)
class World:
    """The process group of this run (``size == 1``: a plain single process)."""

    size: int
    rank: int
    device: torch.device
    distributed: bool = False  # launched by torchrun (a process group exists)

    @property
    def main(self) -> bool:
        """True on the process that evaluates and writes."""
        return self.rank == 0


@contextlib.contextmanager
def _world(device: str) -> Iterator[World]:
    """Join the ``torchrun`` process group when launched by it, else a single process."""
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but CUDA is not available")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield World(1, 0, torch.device(device))
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield World(dist.get_world_size(), dist.get_rank(), dev, distributed=True)
    finally:
        if owns:
            dist.destroy_process_group()


@contextlib.contextmanager
def _deterministic(seed: int, threads: int, device: str) -> Iterator[None]:
    """Seeded, deterministic, fixed thread count; the previous global state is restored after."""
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=device == "cuda")
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - the [cli] extra installs it
        enabled = False
        from types import SimpleNamespace

        return SimpleNamespace(
            update=lambda n=1: None,
            set_postfix_str=lambda s, refresh=False: None,
            set_description_str=lambda s, refresh=False: None,
            close=lambda: None,
        )
    return tqdm(
        total=total, disable=not enabled, desc=desc, unit="step", leave=False, file=sys.stderr
    )


def _mean_over_ranks(values: Tensor, world: World) -> Tensor:
    if world.distributed:
        values = values.to(world.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu() / world.size
    return values


def _scalar_terms(terms: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in sorted(terms):
        value = terms[key]
        if isinstance(value, Tensor) and value.numel() == 1:
            out[key] = float(value.detach().float())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _format_terms(terms: dict[str, float], limit: int = 4) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in list(terms.items())[:limit])


def _train(
    plan: LossPlan,
    data: TaskData,
    cfg: dict[str, Any],
    world: World,
    progress: bool,
) -> tuple[nn.Module, nn.Module, nn.Module, list[dict[str, Any]], list[float]]:
    """The training loop; returns (trained model, initial model, loss, history, step losses)."""
    seed, batch = int(cfg["seed"]), int(cfg["batch_size"])
    if batch % world.size:
        raise CLIError(f"batch_size {batch} must be divisible by the {world.size} processes")
    local_batch = batch // world.size
    n_train = len(data.train)
    steps = n_train // batch
    if steps == 0:
        raise CLIError(f"batch_size {batch} is larger than the training split ({n_train} samples)")
    total = steps * int(cfg["epochs"])
    m = cfg["model"]
    torch.manual_seed(seed)  # the encoder comes first: one random encoder per task and seed
    model = TaskModel(
        plan.task,
        plan.style,
        data.train.a.shape[1],
        None if data.train.b is None else data.train.b.shape[1],
        data.num_classes,
        hidden_dim=m["hidden_dim"],
        embedding_dim=m["embedding_dim"],
        head_dim=m["head_dim"],
        norm=m["norm"],
    ).to(world.device)
    initial = copy.deepcopy(model).eval()
    loss = build_loss(plan, distributed=world.distributed).to(world.device)
    loss.train()
    net: nn.Module = model
    if world.distributed:
        ids = [world.device.index] if world.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    groups = [{"params": list(model.parameters()), "weight_decay": cfg["weight_decay"]}]
    if loss_params:  # e.g. a learnable temperature: trained, not decayed
        groups.append({"params": loss_params, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg["lr"])
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n_train),  # type: ignore[arg-type]  # only its length is used
        num_replicas=world.size,
        rank=world.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    # Local sample j of a step sits at position rank + size·j of the global batch (the sampler
    # deals the permutation round-robin), so it gets that position's augmentation.
    positions = torch.arange(local_batch) * world.size + world.rank
    aug, shape = cfg["augment"], data.image_shape
    train_b = data.train.b if data.train.b is not None else data.train.a
    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    bar = _progress(total, progress and world.main, f"{plan.name} epoch 1/{cfg['epochs']}")
    step = 0
    try:
        for epoch in range(int(cfg["epochs"])):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
            loss.update_epoch(epoch)  # type: ignore[operator]
            bar.set_description_str(f"{plan.name} epoch {epoch + 1}/{cfg['epochs']}", refresh=False)
            sums: dict[str, float] = {}
            for s in range(steps):
                idx = order[s * local_batch : (s + 1) * local_batch]
                gen = seeded_generator(seed, "augment", epoch, s)
                views = []
                for x in (data.train.a[idx], train_b[idx]):
                    params = draw_view_params(
                        batch,
                        x.shape[1],
                        gen,
                        shift=aug["shift"],
                        mask=aug["mask"],
                        noise=aug["noise"],
                        image_shape=shape,
                    ).rows(positions)
                    views.append(apply_view(x, params, shape, aug["shift"]).to(world.device))
                y = None if data.train.y is None else data.train.y[idx].to(world.device)
                loss.update_step(step, total)  # type: ignore[operator]
                out = compute_loss(plan, loss, net(*views), y, data.num_classes)
                if out.loss.dim() != 0:
                    raise CLIError(
                        f"the loss returned shape {tuple(out.loss.shape)}; training needs a scalar "
                        "(use reduction 'mean' or 'sum')"
                    )
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if world.distributed:
                    for p in loss_params:
                        if p.grad is not None:
                            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                            p.grad /= world.size
                opt.step()
                terms = _scalar_terms(out.terms)
                logged = _mean_over_ranks(
                    torch.tensor([float(out.loss.detach()), *terms.values()], dtype=torch.float64),
                    world,
                ).tolist()
                value, terms = logged[0], dict(zip(terms, logged[1:], strict=True))
                if not math.isfinite(value):
                    raise CLIError(
                        f"the loss became {value} at epoch {epoch + 1}, step {s + 1}; try a smaller --lr"
                    )
                step_losses.append(value)
                for key, v in {"loss": value, **terms}.items():
                    sums[key] = sums.get(key, 0.0) + v
                bar.set_postfix_str(
                    f"loss={value:.4f}" + (f", {_format_terms(terms)}" if terms else ""),
                    refresh=False,
                )
                bar.update(1)
                step += 1
            means = {k: v / steps for k, v in sums.items()}
            history.append({"epoch": epoch + 1, "loss": means.pop("loss"), "terms": means})
    finally:
        bar.close()
    return model.eval(), initial, loss, history, step_losses


def _evaluate(
    plan: LossPlan,
    data: TaskData,
    model: TaskModel,
    initial: TaskModel,
    cfg: dict[str, Any],
    device: torch.device,
) -> tuple[dict[str, float], dict[str, dict[str, float] | None]]:
    if plan.task == "paired":
        metrics = retrieval_metrics(
            lambda x: model.embed(x, "a"), lambda x: model.embed(x, "b"), data.test, device=device
        )
        random = retrieval_metrics(
            lambda x: initial.embed(x, "a"),
            lambda x: initial.embed(x, "b"),
            data.test,
            device=device,
        )
        return metrics, {"random_encoder": random, "raw_pixels": None}
    if data.train.y is None or data.test.y is None:
        return {}, {"random_encoder": {}, "raw_pixels": {}}
    pert = perturbed_split(data.test, data.image_shape, cfg["eval"], int(cfg["seed"]))
    k = int(cfg["eval"]["k"])

    def metrics_of(embed: Any) -> dict[str, float]:
        return classification_metrics(embed, data.train, data.test, pert, k=k, device=device)

    return metrics_of(model.embed), {
        "random_encoder": metrics_of(initial.embed),
        "raw_pixels": metrics_of(lambda x: x),
    }


PRIMARY_METRIC = {"ssl": "knn_accuracy", "supervised": "knn_accuracy", "paired": "recall@1"}


def format_summary(doc: dict[str, Any]) -> str:
    """A short table of the run's metrics against its baselines, and the verdict."""
    metrics, base = doc["metrics"], doc["baselines"]
    if not metrics:
        return "  (no labels: the accuracy metrics need an array 'y' in the data file)"
    cols = [(doc["loss"], metrics), ("random encoder", base.get("random_encoder") or {})]
    if base.get("raw_pixels") is not None:
        cols.append(("raw pixels", base["raw_pixels"]))
    width = max(len(METRIC_LABELS.get(k, k)) for k in metrics)
    lines = [" " * (width + 2) + "".join(f"{name:>16}" for name, _ in cols)]
    for key in metrics:
        cells = "".join(f"{vals.get(key, float('nan')):>16.3f}" for _, vals in cols)
        lines.append(f"  {METRIC_LABELS.get(key, key):<{width}}{cells}")
    key = PRIMARY_METRIC[doc["task"]]
    gain = metrics[key] - cols[1][1].get(key, float("nan"))
    verdict = "beats" if gain > 0 else "does NOT beat"
    lines.append(f"{doc['loss']} {verdict} the random encoder on {METRIC_LABELS[key]}: {gain:+.3f}")
    return "\n".join(lines)


def _plot(path: Path, step_losses: list[float], history: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_per_epoch = len(step_losses) // max(len(history), 1)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.5, label="step")
    ax.plot(
        [h["epoch"] * steps_per_epoch for h in history],
        [h["loss"] for h in history],
        "o-",
        lw=1.5,
        label="epoch mean",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_outputs(
    out_dir: Path,
    doc: dict[str, Any],
    cfg: dict[str, Any],
    model: nn.Module,
    loss: nn.Module,
    step_losses: list[float],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    _plot(out_dir / "loss_curve.png", step_losses, doc["history"], f"{doc['loss']} ({doc['task']})")
    # Plain tensors only: reload with torch.load(path, weights_only=True).
    state = {"model": model.state_dict(), "loss": loss.state_dict()}
    torch.save(state, out_dir / "model.pt")


def run_training(
    cfg: dict[str, Any],
    *,
    output: str | Path | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any] | None:
    """Train and evaluate the run described by the resolved ``cfg``.

    Args:
        cfg: A config from :func:`embedloss.cli.config.resolve_config`.
        output: Directory for ``metrics.json``, ``loss_curve.png``, ``config.yaml``, ``model.pt``.
        progress: Show a progress bar (stderr) with the live loss and terms.
        stream: Where the summary goes (default stdout).

    Returns:
        The ``metrics.json`` document on the main process, ``None`` on the other ranks.

    Raises:
        CLIError: For configurations or data the trainer cannot use.
    """
    stream = sys.stdout if stream is None else stream
    plan = make_plan(cfg["loss"], cfg["task"])
    cfg = copy.deepcopy(cfg)
    cfg["task"] = plan.task
    cfg["loss"] = {"name": plan.name, **plan.loss_kwargs}
    start = time.perf_counter()
    with (
        _world(cfg["device"]) as world,
        _deterministic(int(cfg["seed"]), int(cfg["num_threads"]), cfg["device"]),
    ):
        data = load_task_data(cfg["data"], plan.task, int(cfg["seed"]))
        if world.main:
            plural = "es" if world.size > 1 else ""
            where = f" on {world.size} process{plural} (DDP)" if world.distributed else ""
            print(
                f"embedloss train: {plan.name} on {data.name} ({TASK_TEXT[plan.task]}); "
                f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}, batch {cfg['batch_size']}, seed {cfg['seed']}{where}",
                file=stream,
                flush=True,
            )
        model, initial, loss, history, step_losses = _train(plan, data, cfg, world, progress)
        train_seconds = time.perf_counter() - start
        doc: dict[str, Any] | None = None
        if world.main:
            metrics, baselines = _evaluate(plan, data, model, initial, cfg, world.device)  # type: ignore[arg-type]
            doc = {
                "loss": plan.name,
                "task": plan.task,
                "metrics": metrics,
                "baselines": baselines,
                "history": history,
                "dataset": {
                    "name": data.name,
                    "train_size": len(data.train),
                    "test_size": len(data.test),
                    "num_classes": data.num_classes,
                },
                "world_size": world.size,
                "seconds": {
                    "train": round(train_seconds, 3),
                    "total": round(time.perf_counter() - start, 3),
                },
            }
            if plan.task != "paired":
                shift, noise = cfg["eval"]["shift"], cfg["eval"]["noise"]
                print(
                    f"held-out split: {len(data.test)} samples, perturbed by random shifts of up to "
                    f"{shift} pixel(s) and noise σ={noise}",
                    file=stream,
                )
            else:
                print(f"held-out split: {len(data.test)} pairs", file=stream)
            print(format_summary(doc), file=stream)
            if output is not None:
                _write_outputs(Path(output), doc, cfg, model, loss, step_losses)
            print(
                f"final loss {history[-1]['loss']:.4f}; {doc['seconds']['total']:.1f} s"
                + (
                    f"; wrote {output}/(metrics.json, loss_curve.png, config.yaml, model.pt)"
                    if output
                    else " (--output DIR saves metrics.json, a loss curve and the config)"
                ),
                file=stream,
                flush=True,
            )
        if world.distributed:
            dist.barrier()
    return doc
