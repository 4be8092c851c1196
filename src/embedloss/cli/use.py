"""Using a trained run: :func:`load_encoder` in Python, ``embedloss embed`` and ``embedloss eval``.

A run directory (``embedloss train --output DIR``) holds everything needed: ``checkpoint.pt``
has the config, the weights and the input scaling of training. In Python::

    from embedloss.cli import load_encoder
    encoder = load_encoder("runs/demo")  # nn.Module: raw samples (N, *shape) -> embeddings (N, D)

``encoder(x)`` takes samples in the units of the training data (for the embedded digits:
scikit-learn's ``load_digits().images``, pixels 0–16) and returns what the run evaluated: the
encoder's output, before any projection head.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from embedloss.cli.checkpoint import load_checkpoint, load_state
from embedloss.cli.config import CLIError
from embedloss.cli.data import (
    InputSpec,
    describe_perturbation,
    input_array,
    load_task_data,
    read_npz,
)
from embedloss.cli.evaluate import EvalSetup, evaluate_with_baselines
from embedloss.cli.methods import resolve_method
from embedloss.cli.models import Encoder, TaskModel
from embedloss.cli.report import format_summary
from embedloss.cli.runtime import deterministic
from embedloss.cli.tasks import LossPlan, make_plan

__all__ = ["Run", "embed_file", "evaluate_run", "format_evaluation", "load_encoder", "load_run"]


@dataclass(frozen=True)
class Run:
    """A trained run, loaded: its config, loss plan, model (eval mode) and input scaling."""

    directory: Path
    config: dict[str, Any]
    plan: LossPlan
    model: TaskModel
    inputs: dict[str, InputSpec]
    epoch: int  # completed epochs
    num_classes: int
    image_shape: tuple[int, ...] | None = None

    def new_model(self) -> TaskModel:
        """A model of this run's shape, initialised from torch's current seed."""
        return _new_model(self.plan, self.inputs, self.num_classes, self.config, self.image_shape)

    def encoder(self, modality: str = "a") -> Encoder:
        """The encoder of ``modality`` (``"b"``: the second one of a paired run) on raw inputs."""
        if modality not in self.inputs:
            raise CLIError(
                f"the run has no modality {modality!r}: it has {', '.join(sorted(self.inputs))}"
            )
        spec = self.inputs[modality]
        net = self.model.encoder_b if modality == "b" else self.model.encoder
        assert net is not None
        return Encoder(net, shape=spec.shape, lo=spec.lo, scale=spec.scale).eval()


def _new_model(
    plan: LossPlan,
    inputs: dict[str, InputSpec],
    num_classes: int,
    cfg: dict[str, Any],
    image_shape: tuple[int, ...] | None,
) -> TaskModel:
    b = inputs.get("b")
    method = resolve_method(plan, cfg.get("method") or {}, image_shape)
    return TaskModel.from_config(
        plan.task,
        plan.style,
        inputs["a"].features,
        None if b is None else b.features,
        num_classes,
        cfg["model"],
        method,
        image_shape,
    )


def load_run(directory: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Load the run in ``directory`` (its latest checkpoint) for use.

    Raises:
        CLIError: If it is not a run, or its checkpoint does not fit its config.
    """
    path = Path(directory)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    plan = make_plan(cfg["loss"], cfg["task"])
    inputs = {m: InputSpec.from_dict(d) for m, d in ckpt["data"]["inputs"].items()}
    num_classes = int(ckpt["data"]["num_classes"])
    shape = ckpt["data"].get("image_shape")
    image_shape = None if shape is None else tuple(int(d) for d in shape)
    model = _new_model(plan, inputs, num_classes, cfg, image_shape)
    load_state(model, ckpt["model"], "model", f"run {str(path)!r}")
    epoch = int(ckpt["epoch"])
    return Run(path, cfg, plan, model.to(device).eval(), inputs, epoch, num_classes, image_shape)


def load_encoder(
    directory: str | Path, modality: str = "a", *, device: str | torch.device = "cpu"
) -> Encoder:
    """The trained encoder of the run in ``directory``: raw samples ``(N, *shape)`` → ``(N, D)``.

    Args:
        directory: A run directory of ``embedloss train --output DIR``.
        modality: ``"a"``, or ``"b"`` for the second encoder of a paired run.
        device: Where to put the encoder.

    Raises:
        CLIError: A :class:`ValueError`, if ``directory`` holds no usable run.
    """
    return load_run(directory, device=device).encoder(modality)


def _array_for(run: Run, arrays: dict[str, Any], path: str, modality: str, key: str | None) -> str:
    """The name of the array to embed: ``key``, else ``x`` (``x_a`` / ``x_b`` when paired)."""
    if key is None:
        paired = run.plan.task == "paired"
        candidates = [f"x_{modality}", "x"] if paired else ["x"]
        key = next((k for k in candidates if k in arrays), candidates[0])
    if key not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        raise CLIError(f"data file {path!r} has no array {key!r} (found: {found}); pass --key NAME")
    return key


@torch.no_grad()
def embed_file(
    run_dir: str | Path,
    data: str,
    out: str | Path,
    *,
    modality: str = "a",
    key: str | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
    stream: TextIO | None = None,
) -> tuple[int, int]:
    """Embed an array of ``data`` (``.npz``) with a run's encoder; write ``out`` (``.npy``).

    Returns:
        The shape ``(N, D)`` written.

    Raises:
        CLIError: For a missing run or array, samples of the wrong shape, an unwritable ``out``.
    """
    import numpy as np

    run = load_run(run_dir, device=device)
    encoder = run.encoder(modality)
    arrays = read_npz(data)
    name = _array_for(run, arrays, data, modality, key)
    x = input_array(arrays, name, data)
    if x[0].numel() != encoder.features:
        raise CLIError(
            f"array {name!r} in {data!r} has samples of shape {tuple(x.shape[1:])}; the run's "
            f"encoder takes {encoder.shape} ({encoder.features} values)"
        )
    chunks = [
        encoder(x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    z = torch.cat(chunks)  # N >= 1: input_array refuses empty arrays
    target = Path(out)
    try:
        with target.open("wb") as f:  # exactly this name (np.save would append .npy)
            np.save(f, z.numpy())
    except OSError as err:
        raise CLIError(f"cannot write --out {str(target)!r}: {err}") from None
    print(
        f"wrote {z.shape[0]} embeddings of dimension {z.shape[1]} to {target} (encoder "
        f"{modality!r} of run {run_dir}, {run.plan.name}, epoch {run.epoch}; array {name!r})",
        file=sys.stdout if stream is None else stream,
    )
    return int(z.shape[0]), int(z.shape[1])


def evaluate_run(
    run_dir: str | Path, data: str | None = None, *, device: str = "cpu"
) -> dict[str, Any]:
    """The task's metrics of a trained run, against its baselines, on its own or other data.

    ``data`` (an ``.npz`` laid out as for training) is split like training data: a reference
    part (the k-NN neighbours, the probe's training set) and a held-out part (the queries,
    perturbed as the run's ``eval`` section says). Its inputs are scaled as the run's were.

    Raises:
        CLIError: For a missing run, unusable data, or data without the labels the task needs.
    """
    run = load_run(run_dir, device=device)
    cfg, plan = run.config, run.plan
    data_cfg = dict(cfg["data"])
    if data is not None:
        data_cfg.update(dataset=None, path=str(data))
    seed = int(cfg["seed"])
    with deterministic(seed, int(cfg["num_threads"]), device):
        tdata = load_task_data(data_cfg, plan.task, seed, inputs=run.inputs)
        if plan.task != "paired" and tdata.train.y is None:
            raise CLIError(
                f"{tdata.name} has no labels 'y': the {plan.task} task's metrics (k-NN, linear "
                "probe) need them"
            )
        torch.manual_seed(seed)  # the random encoder of the run, as training built it
        initial = run.new_model().to(device).eval()
        setup = EvalSetup.build(plan.task, tdata, cfg, torch.device(device), plan.nested_dims)
        metrics, baselines = evaluate_with_baselines(run.model, initial, setup)
    ev = cfg["eval"]
    return {
        "run": str(run_dir),
        "loss": plan.name,
        "task": plan.task,
        "epoch": run.epoch,
        "data": tdata.name,
        "reference_size": len(tdata.train),
        "held_out_size": len(tdata.test),
        "input_kind": "images" if tdata.image_shape is not None else "features",
        "held_out_perturbation": None
        if plan.task == "paired"
        else describe_perturbation(tdata.image_shape, ev["shift"], ev["noise"]),
        "metrics": metrics,
        "baselines": baselines,
    }


def format_evaluation(doc: dict[str, Any]) -> str:
    """The ``embedloss eval`` report: what was measured, the table, the headline."""
    what = (
        f"{doc['held_out_size']} held-out pairs"
        if doc["task"] == "paired"
        else f"{doc['held_out_size']} held-out queries against {doc['reference_size']} reference "
        f"samples, perturbed by {doc['held_out_perturbation']}"
    )
    head = f"embedloss eval: run {doc['run']} ({doc['loss']}, {doc['task']}, epoch {doc['epoch']}) on {doc['data']}: {what}"
    return head + "\n" + format_summary(doc)
