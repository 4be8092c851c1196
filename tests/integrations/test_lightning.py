"""``examples/lightning_simclr.py``: any embedloss loss in a LightningModule, on CPU.

Steps, checkpoints and two-process DDP (gloo, ``gather_distributed=True``) against one process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import embedloss

from .conftest import EXAMPLES, ROOT, load_example

lt = load_example("lightning_simclr")


class Record(L.Callback):
    """The loss of every step, the first batch, and the gradients of the first step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batch = None
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {
                n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, tmp_path, *, max_steps, batch_size=64, resume=None):
    argv = ["--output", str(tmp_path), "--max-steps", str(max_steps)]
    record = Record()
    trainer = lt.make_trainer(lt.parse_args(argv), callbacks=[record])
    trainer.fit(module, lt.SyntheticViews(batch_size), ckpt_path=resume)
    return trainer, record


def module(name, **options):
    L.seed_everything(0, verbose=False)
    return lt.EmbeddingModule(name, options)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("simclr", {"learnable_temperature": True}),
        ("moco", {"queue_size": 256}),
        ("negative_cosine", {"symmetric": True}),
        ("supcon", {}),
        ("siglip", {"learnable_temperature": True}),
    ],
)
def test_trains_and_logs_every_term(tmp_path, name, options):
    model = module(name, **options)
    trainer, record = fit(model, tmp_path, max_steps=32)
    early, late = (
        sum(record.losses[4:8]) / 4,
        sum(record.losses[-4:]) / 4,
    )  # MoCo's queue fills first
    assert late < early, (early, late)
    terms = model.compute(record.batch).terms
    logged = set(trainer.callback_metrics)
    assert {"train/loss", *(f"train/{k}" for k in terms)} <= logged


def direct_gradients(reference, name, options, batch):
    """The gradients of the loss called by hand on the first batch, from the initial state."""
    x_a, x_b, _ = batch
    direct = embedloss.create_loss(name, **options)
    direct.load_state_dict(reference.loss.state_dict())
    if name == "moco":
        value = direct(reference.student(x_a), reference.teacher(x_b))
    else:
        value = direct(reference.student(x_a), reference.student(x_b))
    value.backward()
    grads = {f"student.{n}": p.grad for n, p in reference.student.named_parameters()}
    grads.update({f"loss.{n}": p.grad for n, p in direct.named_parameters()})
    return grads


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("simclr", {"learnable_temperature": True}),
        ("moco", {"queue_size": 256, "learnable_temperature": True}),
    ],
)
def test_gradients_are_those_of_the_loss_called_directly(tmp_path, name, options):
    model = module(name, **options)
    reference = copy.deepcopy(model)
    _, record = fit(model, tmp_path, max_steps=1)
    want = direct_gradients(reference, name, options, record.batch)
    assert record.grads is not None and record.grads.keys() == want.keys()
    assert "loss.logit_scale" in want
    for key in want:
        torch.testing.assert_close(record.grads[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert model.loss.logit_scale.item() != reference.loss.logit_scale.item()  # optimised


@pytest.mark.parametrize(
    ("name", "options", "state"),
    [
        (
            "moco",
            {"queue_size": 256},
            ("loss.queue", "loss.queue_ptr", "teacher.encoder.0.0.weight"),
        ),
        (
            "dino",
            {"warmup_teacher_temperature": 0.02, "warmup_epochs": 3},
            ("loss.center", "loss.epoch"),
        ),
    ],
)
def test_checkpoint_carries_the_loss_state_and_resume_continues_it(tmp_path, name, options, state):
    # 8 steps are one epoch; the resumed run's first step (of epoch 1) must equal the 9th
    # step of an uninterrupted run: same weights, optimiser, teacher, queue or centre, epoch.
    straight = module(name, **options)
    _, straight_record = fit(straight, tmp_path / "straight", max_steps=9)
    first = module(name, **options)
    trainer, _ = fit(first, tmp_path / "first", max_steps=8)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    saved = torch.load(tmp_path / "first.ckpt", weights_only=False)["state_dict"]
    for key in state:
        assert torch.equal(saved[key], first.state_dict()[key]), key

    resumed = module(name, **options)  # a fresh loss: empty queue, zero centre
    _, record = fit(resumed, tmp_path / "resumed", max_steps=9, resume=str(tmp_path / "first.ckpt"))
    assert record.losses == pytest.approx(straight_record.losses[8:], abs=1e-6)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert resumed.loss._counters == straight.loss._counters  # host copies of the counters
    if name == "dino":  # update_epoch ran at the start of epoch 1
        assert resumed.loss._counter("epoch") == 1


@pytest.mark.slow
def test_every_registered_loss_trains_or_is_refused(tmp_path):
    for name in embedloss.list_losses():
        if name in lt.UNSUPPORTED:
            with pytest.raises(SystemExit, match=f"{name} needs"):
                lt.call_style(name)
            continue
        options = {
            "combined": {"losses": {"simclr": "simclr", "vicreg": "vicreg"}},
            "matryoshka": {"loss": "simclr", "dims": (16, 8)},
        }.get(name, {})
        model = module(name, **options)
        _, record = fit(model, tmp_path / name, max_steps=2)
        assert len(record.losses) == 2 and all(
            map(torch.isfinite, map(torch.tensor, record.losses))
        ), name


def test_wrappers_are_called_as_their_parts(tmp_path):
    assert lt.call_style("matryoshka", {"loss": "supcon", "dims": [8, 16]}) == "labels"
    assert lt.call_style("matryoshka", {"loss": {"name": "moco"}, "dims": [8]}) == "teacher_key"
    assert lt.call_style("combined", {"losses": {"a": "simclr", "b": "vicreg"}}) == "pair"
    with pytest.raises(SystemExit, match="called differently"):
        lt.call_style("combined", {"losses": {"a": "simclr", "b": "supcon"}})
    for name in ("matryoshka", "combined"):
        with pytest.raises(SystemExit, match=f"{name} needs --loss-options"):
            lt.call_style(name)
    with pytest.raises(SystemExit, match="ibot_patch needs"):
        lt.call_style("matryoshka", {"loss": "ibot_patch", "dims": [8]})
    model = module("matryoshka", loss="supcon", dims=(8, 16))
    _, record = fit(model, tmp_path, max_steps=2)
    assert len(record.losses) == 2 and all(math.isfinite(x) for x in record.losses)


def run_example(tmp_path, devices: int, *extra: str) -> tuple[dict, dict]:
    """Run the example as a script; return its printed metrics and final state."""
    out = tmp_path / f"devices{devices}"
    cmd = [
        sys.executable,
        str(EXAMPLES / "lightning_simclr.py"),
        "--output", str(out),
        "--devices", str(devices),
        "--strategy", "ddp" if devices > 1 else "auto",
        "--batch-size", str(64 // devices),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    state = torch.load(out / "last.ckpt", weights_only=False)["state_dict"]
    return metrics, state


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(tmp_path):
    # MoCo with a learnable τ: the teacher, the queue (filled with the keys of every rank), the
    # loss's parameter and gather_distributed, over 6 steps of two processes of 32 samples
    # against one process of 64 (the same global batches: see SyntheticViews).
    options = json.dumps({"queue_size": 512, "learnable_temperature": True})
    extra = ("--loss", "moco", "--loss-options", options, "--max-steps", "6")
    one_metrics, one = run_example(tmp_path, 1, *extra)
    two_metrics, two = run_example(tmp_path, 2, *extra)
    assert one_metrics["step"] == two_metrics["step"] == 6
    assert one_metrics["train/loss"] == pytest.approx(two_metrics["train/loss"], abs=1e-4)
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key], two[key]
        if key == "loss.queue":  # the same keys, enqueued rank by rank: compare as sets of rows
            a, b = (q[q.abs().sum(1) > 0].tolist() for q in (a, b))
            a, b = torch.tensor(sorted(a)), torch.tensor(sorted(b))
            assert a.shape == (6 * 64, 16)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=key)
