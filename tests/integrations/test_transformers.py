"""``EmbedlossCallback`` and ``examples/hf_trainer.py``: an embedloss loss in ``transformers.Trainer``."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import embedloss
from embedloss.integrations.transformers import STATE_FILE, EmbedlossCallback

from .conftest import load_example

hf = load_example("hf_trainer")


def run(tmp_path, *args: str):
    argv = ["--output", str(tmp_path), "--logging-steps", "1", "--batch-size", "32", *args]
    return hf.main(argv)


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# -- the example ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "options"),
    [
        ("simclr", '{"learnable_temperature": true}'),
        ("moco", '{"queue_size": 128}'),
        ("supcon", "{}"),
    ],
)
def test_example_trains_and_logs_every_term(tmp_path, loss, options):
    trainer = run(tmp_path, "--loss", loss, "--loss-options", options, "--max-steps", "24")
    logs = training_logs(trainer)
    assert len(logs) == 24
    # after the first 4 steps (MoCo's queue fills then, raising its loss at first)
    early, late = (sum(e["loss"] for e in part) / 4 for part in (logs[4:8], logs[-4:]))
    assert late < early, (early, late)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    terms = model(**batch).terms
    assert set(terms) <= set(logs[-1]), set(terms) - set(logs[-1])


def test_example_gradients_are_those_of_the_loss_called_directly(tmp_path):
    args = hf.parse_args(
        ["--output", str(tmp_path), "--loss-options", '{"learnable_temperature": true}']
    )
    trainer = hf.make_trainer(args)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    reference = copy.deepcopy(model)

    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before each step
    model.zero_grad()
    trainer.training_step(model, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    direct = embedloss.SimCLRLoss(learnable_temperature=True)
    direct.load_state_dict(reference.loss.state_dict())
    direct(reference.student(batch["x_a"]), reference.student(batch["x_b"])).backward()
    want = {f"student.{n}": p.grad for n, p in reference.student.named_parameters()}
    want["loss.logit_scale"] = direct.logit_scale.grad
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    # the optimiser holds the loss's parameter
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.loss.logit_scale) in held


def test_example_teacher_is_the_moving_average_of_the_student_after_each_step(tmp_path):
    from transformers import TrainerCallback

    argv = ["--output", str(tmp_path), "--loss", "moco", "--loss-options", '{"queue_size": 64}']
    trainer = hf.make_trainer(hf.parse_args([*argv, "--batch-size", "32", "--max-steps", "3"]))
    model = trainer.model
    snapshots = [{n: p.detach().clone() for n, p in model.student.named_parameters()}]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.student.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()
    m = model.teacher.momentum
    expected = snapshots[0]
    for after_step in snapshots[1:]:  # θ_t ← m·θ_t + (1 − m)·θ_s, after each optimiser step
        expected = {n: m * expected[n] + (1 - m) * after_step[n] for n in expected}
    for name, p in model.teacher.encoder.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert len(snapshots) == 4 and not any(p.requires_grad for p in model.teacher.parameters())
    assert int(model.loss.queue_ptr) == 3 * 32 % 64


def test_example_checkpoint_holds_the_queue_and_resume_continues_it(tmp_path):
    options = ("--loss", "moco", "--loss-options", '{"queue_size": 96}', "--save-steps", "3")
    straight = run(tmp_path / "straight", *options, "--max-steps", "6")
    first = run(tmp_path / "resumed", *options, "--max-steps", "3")
    saved = load_file(str(tmp_path / "resumed" / "checkpoint-3" / "model.safetensors"))
    assert torch.equal(saved["loss.queue"], first.model.loss.queue)
    assert "teacher.encoder.0.0.weight" in saved
    resumed = run(
        tmp_path / "resumed",
        *options,
        "--max-steps",
        "6",
        "--resume",
        str(tmp_path / "resumed" / "checkpoint-3"),
    )
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    assert resumed.model.loss._counters == straight.model.loss._counters  # host copies refreshed


# -- the callback on its own ------------------------------------------------------------------


class Recorder(embedloss.SimCLRLoss):
    """A SimCLR loss that remembers the hook calls it gets (not registered)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def update_step(self, step, total_steps=None):
        self.calls.append(("step", step, total_steps))

    def update_epoch(self, epoch):
        self.calls.append(("epoch", epoch))


def test_hooks_follow_the_trainer(tmp_path):
    args = hf.parse_args(["--output", str(tmp_path), "--batch-size", "128", "--max-steps", "6"])
    trainer = hf.make_trainer(args)  # 512 samples: 4 steps per epoch
    recorder = Recorder()
    trainer.model.loss = recorder
    trainer.embedloss.loss = recorder
    trainer.train()
    epochs = [c for c in recorder.calls if c[0] == "epoch"]
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert epochs == [("epoch", 0), ("epoch", 1)]
    assert steps == [("step", k, 6) for k in range(6)]
    assert recorder.calls.index(("epoch", 1)) == recorder.calls.index(("step", 4, 6)) - 1


def terms(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


def test_terms_are_averaged_between_logs_and_only_in_training():
    loss = embedloss.SimCLRLoss()
    callback = EmbedlossCallback(loss)
    callback.record(terms(accuracy=0.5, loss=9.0))
    callback.record(terms(accuracy=1.0, loss=7.0))
    loss.eval()
    callback.record(terms(accuracy=0.0, loss=0.0))  # evaluation: not a training term
    loss.train()
    logs = {"loss": 2.0}
    history = [{"loss": 2.0, "step": 4}]
    callback.on_log(None, SimpleNamespace(log_history=history), None, logs=logs)
    assert logs == {"loss": 2.0, "accuracy": 0.75, "loss_loss": 8.0}
    assert history == [{"loss": 2.0, "step": 4, "accuracy": 0.75, "loss_loss": 8.0}]
    eval_logs = {"eval_loss": 1.0}
    callback.record(terms(accuracy=1.0))
    callback.on_log(None, SimpleNamespace(log_history=[]), None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}  # kept for the next training log
    callback.add_terms(logs := {"loss": 1.0})
    assert logs == {"loss": 1.0, "accuracy": 1.0}
    callback.add_terms(logs := {"loss": 1.0})
    assert logs == {"loss": 1.0}  # nothing recorded since


def test_state_round_trips_through_the_checkpoint_folder(tmp_path):
    loss = embedloss.MoCoLoss(queue_size=8)
    loss(torch.randn(4, 3), torch.randn(4, 3))
    teacher = embedloss.MomentumEncoder(torch.nn.Linear(3, 3))
    callback = EmbedlossCallback(loss, teacher=teacher)
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_save(args, SimpleNamespace(is_world_process_zero=True, global_step=5), None)
    assert (tmp_path / "checkpoint-5" / STATE_FILE).is_file()

    fresh = embedloss.MoCoLoss(queue_size=8)
    fresh_teacher = embedloss.MomentumEncoder(torch.nn.Linear(3, 3))
    other = EmbedlossCallback(fresh, teacher=fresh_teacher)
    other.on_train_begin(args, SimpleNamespace(global_step=5), None)
    assert torch.equal(fresh.queue, loss.queue) and fresh._counter("queue_ptr") == 4
    assert torch.equal(fresh_teacher.encoder.weight, teacher.encoder.weight)

    with pytest.warns(UserWarning, match="checkpoint-7 has no embedloss_state.pt"):
        other.on_train_begin(args, SimpleNamespace(global_step=7), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.on_train_begin(args, SimpleNamespace(global_step=0), None)  # a fresh run: nothing
    silent = EmbedlossCallback(embedloss.MoCoLoss(queue_size=8), save_state=False)
    silent.on_save(args, SimpleNamespace(is_world_process_zero=True, global_step=9), None)
    assert not (tmp_path / "checkpoint-9").exists()


def test_attach_puts_the_callback_first(tmp_path):
    args = hf.parse_args(["--output", str(tmp_path)])
    trainer = hf.make_trainer(args)
    assert trainer.callback_handler.callbacks[0] is trainer.embedloss


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"loss": torch.nn.MSELoss()},
            "loss must be an embedloss loss \\(a BaseLoss\\), got MSELoss",
        ),
        (
            {"loss": embedloss.SimCLRLoss(), "teacher": torch.nn.Linear(2, 2)},
            "teacher must be an embedloss.MomentumEncoder",
        ),
        ({"loss": embedloss.SimCLRLoss(), "save_state": "yes"}, "save_state"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(TypeError, match=match):
        EmbedlossCallback(**kwargs)
