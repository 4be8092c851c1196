"""How the trainer plans and calls each kind of loss (generic over the registry)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import Tensor, nn

import embedloss.cli.tasks as tasks
from embedloss.base.base_loss import LossOutput
from embedloss.cli.config import CLIError
from embedloss.cli.models import TaskModel
from embedloss.cli.tasks import OVERRIDES, build_loss, compute_loss, make_plan
from embedloss.registry import LossInfo, loss_info


class Recorder(nn.Module):
    """A fake loss that records how it was called."""

    def __init__(self, *, symmetric: bool = False, gather_distributed: bool = False) -> None:
        super().__init__()
        self.symmetric, self.gather_distributed = symmetric, gather_distributed
        self.calls: list[tuple] = []

    def compute(self, *args, **kwargs) -> LossOutput:
        self.calls.append((args, kwargs))
        return LossOutput(torch.tensor(0.0), {"t": torch.tensor(1.0)})


class NoLabels(nn.Module):
    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()

    def compute(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).square().mean()


FAKES = {
    "negative_cosine": ("self_supervised", Recorder),
    "cross_entropy": ("supervised", Recorder),
    "mse": ("supervised", Recorder),
    "supcon": ("supervised", Recorder),
    "vicreg": ("self_supervised", NoLabels),
    "siglip": ("multimodal", Recorder),
    "feature_consistency": ("multimodal", Recorder),
    "moco": (
        "contrastive",
        type(
            "MoCo",
            (Recorder,),
            {"__init__": lambda self, *, queue_size=65536: Recorder.__init__(self)},
        ),
    ),
    "combined": ("composite", Recorder),
    "multitask": ("composite", Recorder),
    "custom_thing": ("custom", Recorder),
}


@pytest.fixture
def fake_registry(monkeypatch):
    """Pretend the losses other helpers are writing are registered (without touching the registry)."""
    real = loss_info

    def fake(name):
        if name in FAKES:
            category, cls = FAKES[name]
            return LossInfo(name, cls, category, (), name)
        return real(name)

    monkeypatch.setattr(tasks, "loss_info", fake)
    created = {}

    def create(name, **kwargs):
        created[name] = kwargs
        return fake(name).cls(
            **{k: v for k, v in kwargs.items() if k in inspect.signature(fake(name).cls).parameters}
        )

    monkeypatch.setattr(tasks, "create_loss", create)
    return created


def test_registered_losses_get_their_family_task():
    assert make_plan({"name": "simclr"}, "auto").task == "ssl"
    assert make_plan({"name": "info_nce"}, "auto").task == "ssl"
    plan = make_plan({"name": "clip", "temperature": 0.1}, "auto")
    assert (plan.task, plan.style, plan.loss_kwargs) == ("paired", "pair", {"temperature": 0.1})
    # simclr and clip take labels, so they can be trained supervised (SupCon-like positives)
    assert make_plan({"name": "simclr"}, "supervised").task == "supervised"
    with pytest.raises(CLIError, match="unknown loss 'simclrr'; did you mean 'simclr'"):
        make_plan({"name": "simclrr"}, "auto")


def test_override_table_for_the_foreseeable_exceptions(fake_registry):
    expect = {
        "negative_cosine": ("ssl", "predictor"),
        "cross_entropy": ("supervised", "classifier"),
        "mse": ("supervised", "classifier"),
        "supcon": ("supervised", "labels"),
        "vicreg": ("ssl", "pair"),
        "siglip": ("paired", "pair"),
        "feature_consistency": ("paired", "pair"),
    }
    for name, (task, style) in expect.items():
        plan = make_plan({"name": name}, "auto")
        assert (plan.task, plan.style) == (task, style), name
    assert make_plan({"name": "mse"}, "auto").targets == "one_hot"
    assert make_plan({"name": "moco"}, "auto").loss_kwargs == {"queue_size": 1024}
    assert make_plan({"name": "moco", "queue_size": 64}, "auto").loss_kwargs == {"queue_size": 64}
    assert set(OVERRIDES) >= {"negative_cosine", "cross_entropy", "supcon", "feature_consistency"}


def test_incompatible_tasks_and_composites_are_clear(fake_registry):
    with pytest.raises(CLIError, match="loss 'cross_entropy' cannot be trained on the 'ssl' task"):
        make_plan({"name": "cross_entropy"}, "ssl")
    with pytest.raises(CLIError, match="cannot be trained on the 'paired' task"):
        make_plan({"name": "negative_cosine"}, "paired")
    with pytest.raises(CLIError, match="'vicreg' cannot be trained on the 'supervised'"):
        make_plan({"name": "vicreg"}, "supervised")  # compute takes no labels
    with pytest.raises(
        CLIError, match=re.escape("pass --config FILE.yaml with 'loss: {name: combined, losses:")
    ):
        make_plan({"name": "combined"}, "auto")
    with pytest.raises(CLIError, match="cannot tell which task suits 'custom_thing'"):
        make_plan({"name": "custom_thing"}, "auto")
    assert make_plan({"name": "custom_thing"}, "paired").task == "paired"
    mixed = {"name": "combined", "losses": {"a": {"name": "simclr"}, "b": "supcon"}}
    with pytest.raises(CLIError, match="need different inputs"):
        make_plan(mixed, "auto")
    cls_only = {"name": "combined", "losses": {"a": "cross_entropy"}}
    with pytest.raises(CLIError, match="over classifier-style losses is not supported"):
        make_plan(cls_only, "auto")
    ssl_combo = {"name": "combined", "losses": {"a": {"name": "simclr"}, "b": {"name": "vicreg"}}}
    assert make_plan(ssl_combo, "auto").task == "ssl"
    with pytest.raises(CLIError, match="cannot be trained on the 'supervised' task"):
        make_plan(ssl_combo, "supervised")
    cross = {"name": "combined", "losses": {"a": {"name": "simclr"}, "b": {"name": "clip"}}}
    with pytest.raises(CLIError, match="cannot tell which task"):
        make_plan(cross, "auto")
    multi = make_plan({"name": "multitask", "losses": {"x": "supcon", "y": "supcon"}}, "auto")
    assert (multi.task, multi.style, multi.sub_style) == ("supervised", "multitask", "labels")


def test_build_loss_passes_gather_distributed_where_accepted(fake_registry):
    plan = make_plan({"name": "siglip"}, "auto")
    assert build_loss(plan, distributed=True).gather_distributed is True
    assert build_loss(plan, distributed=False).gather_distributed is False
    combo = make_plan(
        {"name": "combined", "losses": {"a": {"name": "simclr"}, "b": {"name": "vicreg"}}}, "auto"
    )
    build_loss(combo, distributed=True)
    subs = fake_registry["combined"]["losses"]
    assert subs["a"]["gather_distributed"] is True and "gather_distributed" not in subs["b"]
    real = make_plan({"name": "simclr", "temperature": -1.0}, "auto")
    with pytest.raises(CLIError, match="cannot build loss 'simclr'"):
        build_loss(real, distributed=False)


def _model(task, style, classes=3):
    torch.manual_seed(0)
    return TaskModel(task, style, 8, 8, classes, hidden_dim=16, embedding_dim=6, head_dim=5)


def test_compute_loss_calls_each_style_with_the_right_tensors(fake_registry):
    x_a, x_b, y = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    # predictor, non-symmetric: both directions concatenated, targets detached
    plan, loss = make_plan({"name": "negative_cosine"}, "auto"), Recorder()
    outs = _model("ssl", "predictor")(x_a, x_b)
    assert len(outs) == 4
    compute_loss(plan, loss, outs, None, 0)
    (p, z), _ = loss.calls[-1]
    assert torch.equal(p, torch.cat([outs[0], outs[1]])) and torch.equal(
        z, torch.cat([outs[3], outs[2]])
    )
    assert not z.requires_grad and p.requires_grad
    sym = Recorder(symmetric=True)
    compute_loss(plan, sym, outs, None, 0)
    assert len(sym.calls[-1][0]) == 4 and not sym.calls[-1][0][1].requires_grad
    # classifier: logits of both views against repeated targets (one-hot for mse)
    for name, one_hot in (("cross_entropy", False), ("mse", True)):
        plan, loss = make_plan({"name": name}, "auto"), Recorder()
        logits = _model("supervised", "classifier")(x_a, x_b)
        assert logits[0].shape == (4, 3)
        compute_loss(plan, loss, logits, y, 3)
        (lg, t), _ = loss.calls[-1]
        assert lg.shape == (8, 3)
        if one_hot:
            assert torch.equal(t, torch.nn.functional.one_hot(torch.cat([y, y]), 3).float())
        else:
            assert torch.equal(t, torch.cat([y, y]))
    # labels style: (embeddings, labels)
    plan, loss = make_plan({"name": "supcon"}, "auto"), Recorder()
    z = _model("supervised", "labels")(x_a, x_b)
    compute_loss(plan, loss, z, y, 3)
    (emb, lab), _ = loss.calls[-1]
    assert emb.shape == (8, 5) and torch.equal(lab, torch.cat([y, y]))
    # paired: two modalities through separate encoders
    plan, loss = make_plan({"name": "siglip"}, "auto"), Recorder()
    model = _model("paired", "pair")
    a, b = model(x_a, x_b)
    assert torch.equal(a, model.embed(x_a, "a")) and torch.equal(b, model.embed(x_b, "b"))
    out = compute_loss(plan, loss, (a, b), None, 0)
    assert out.terms == {"t": torch.tensor(1.0)} and len(loss.calls[-1][0]) == 2
    # a loss whose compute returns a bare tensor still works
    plan = make_plan({"name": "vicreg"}, "auto")
    assert compute_loss(plan, NoLabels(), (a, b), None, 0).terms == {}
    # multitask: one entry per sub-task
    plan, loss = (
        make_plan({"name": "multitask", "losses": {"u": "supcon", "v": "supcon"}}, "auto"),
        Recorder(),
    )
    compute_loss(plan, loss, z, y, 3)
    (inputs, targets), _ = loss.calls[-1]
    assert set(inputs) == set(targets) == {"u", "v"} and torch.equal(
        targets["u"], torch.cat([y, y])
    )
    plan = make_plan({"name": "multitask", "losses": {"u": "siglip"}}, "auto")
    compute_loss(plan, loss, (a, b), None, 3)
    assert torch.equal(loss.calls[-1][0][0]["u"], a)


def test_supervised_pair_style_passes_labels():
    plan = make_plan({"name": "simclr"}, "supervised")
    loss = build_loss(plan, distributed=False)
    z_a, z_b, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
    out = compute_loss(plan, loss, (z_a, z_b), y, 2)
    assert torch.allclose(out.loss, loss(z_a, z_b, y))
