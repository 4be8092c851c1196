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
from embedloss.cli.methods import Method
from embedloss.cli.models import TaskModel
from embedloss.cli.tasks import (
    OVERRIDES,
    LossContext,
    StepTargets,
    build_loss,
    compute_loss,
    make_plan,
)
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


def _model(task, style, classes=3, method=None):
    torch.manual_seed(0)
    return TaskModel(
        task, style, 8, 8, classes, hidden_dim=16, embedding_dim=6, head_dim=5, method=method
    )


def _both(x_a, x_b):
    return (torch.cat([x_a, x_b]),)  # the model's first group: the two views stacked


def test_compute_loss_calls_each_style_with_the_right_tensors(fake_registry):
    x_a, x_b, y = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    targets = StepTargets(labels=y, num_classes=3)
    # predictor (SimSiam, no teacher): both directions concatenated, targets detached
    plan, loss = make_plan({"name": "negative_cosine"}, "auto"), Recorder()
    (rows,) = _model("ssl", "predictor", method=Method("predictor"))(_both(x_a, x_b))
    assert rows.shape == (8, 10)  # projection | prediction
    z, p = rows[:, :5], rows[:, 5:]
    compute_loss(plan, loss, (rows,), None, StepTargets())
    (p_, z_), _ = loss.calls[-1]
    assert torch.equal(p_, torch.cat([p[:4], p[4:]])) and torch.equal(z_, torch.cat([z[4:], z[:4]]))
    assert not z_.requires_grad and p_.requires_grad
    sym = Recorder(symmetric=True)
    compute_loss(plan, sym, (rows,), None, StepTargets())
    assert len(sym.calls[-1][0]) == 4 and not sym.calls[-1][0][1].requires_grad
    # BYOL: the targets are the teacher's projections
    teacher = torch.randn(8, 5)
    compute_loss(plan, loss, (rows,), teacher, StepTargets())
    assert torch.equal(loss.calls[-1][0][1], torch.cat([teacher[4:], teacher[:4]]))
    # classifier: logits of both views against repeated targets (one-hot for mse)
    for name, one_hot in (("cross_entropy", False), ("mse", True)):
        plan, loss = make_plan({"name": name}, "auto"), Recorder()
        (logits,) = _model("supervised", "classifier")(_both(x_a, x_b))
        assert logits.shape == (8, 3)
        compute_loss(plan, loss, (logits,), None, targets)
        (lg, t), _ = loss.calls[-1]
        assert lg.shape == (8, 3)
        if one_hot:
            assert torch.equal(t, torch.nn.functional.one_hot(torch.cat([y, y]), 3).float())
        else:
            assert torch.equal(t, torch.cat([y, y]))
    # labels style: (embeddings, labels)
    plan, loss = make_plan({"name": "supcon"}, "auto"), Recorder()
    (z,) = _model("supervised", "labels")(_both(x_a, x_b))
    compute_loss(plan, loss, (z,), None, targets)
    (emb, lab), _ = loss.calls[-1]
    assert emb.shape == (8, 5) and torch.equal(lab, torch.cat([y, y]))
    # paired: two modalities through separate encoders
    plan, loss = make_plan({"name": "siglip"}, "auto"), Recorder()
    model = _model("paired", "pair")
    a, b = model((x_a,), (x_b,))
    assert torch.equal(a, model.embed(x_a, "a")) and torch.equal(b, model.embed(x_b, "b"))
    out = compute_loss(plan, loss, (a, b), None, StepTargets())
    assert out.terms == {"t": torch.tensor(1.0)} and len(loss.calls[-1][0]) == 2
    # a loss whose compute returns a bare tensor still works
    plan = make_plan({"name": "vicreg"}, "auto")
    assert compute_loss(plan, NoLabels(), (a, b), None, StepTargets()).terms == {}
    # multitask: one entry per sub-task
    plan, loss = (
        make_plan({"name": "multitask", "losses": {"u": "supcon", "v": "supcon"}}, "auto"),
        Recorder(),
    )
    compute_loss(plan, loss, (z,), None, targets)
    (inputs, targets_), _ = loss.calls[-1]
    assert set(inputs) == set(targets_) == {"u", "v"} and torch.equal(
        targets_["u"], torch.cat([y, y])
    )
    plan = make_plan({"name": "multitask", "losses": {"u": "siglip"}}, "auto")
    compute_loss(plan, loss, (a, b), None, StepTargets())
    assert torch.equal(loss.calls[-1][0][0]["u"], a)


def test_supervised_pair_style_passes_labels():
    plan = make_plan({"name": "simclr"}, "supervised")
    loss = build_loss(plan, distributed=False)
    z_a, z_b, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
    out = compute_loss(plan, loss, (torch.cat([z_a, z_b]),), None, StepTargets(labels=y))
    assert torch.allclose(out.loss, loss(z_a, z_b, y))


def test_repeated_samples_are_positives_of_the_ssl_losses_that_take_labels():
    # A batch larger than the data repeats images: their identities become labels.
    plan = make_plan({"name": "simclr"}, "auto")
    loss = build_loss(plan, distributed=False)
    z, ids = torch.randn(8, 5), torch.tensor([0, 1, 0, 2])
    out = compute_loss(plan, loss, (z,), None, StepTargets(identities=ids))
    assert torch.allclose(out.loss, loss(z[:4], z[4:], ids))
    moco = build_loss(make_plan({"name": "moco"}, "auto"), distributed=False)
    compute_loss(make_plan({"name": "moco"}, "auto"), moco, (z,), z, StepTargets(identities=ids))
    assert torch.equal(moco.queue_labels[:8], torch.cat([ids, ids]))  # both directions' keys


def test_moco_nnclr_dino_ibot_swav_koleo_and_scored_calls():
    z, teacher = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6)
    # moco: queries of both views against the other view's teacher key, in one call
    plan, rec = make_plan({"name": "moco"}, "auto"), Recorder()
    compute_loss(plan, rec, (z,), teacher, StepTargets())
    (q, k), _ = rec.calls[-1]
    assert torch.equal(q, z) and torch.equal(k, torch.cat([teacher[4:], teacher[:4]]))
    compute_loss(plan, rec, (z,), None, StepTargets())  # no teacher: detached online keys
    assert not rec.calls[-1][0][1].requires_grad
    # nnclr: (z_a, z_b, p_a, p_b) from the projection | prediction rows
    rows = torch.randn(8, 12)
    compute_loss(make_plan({"name": "nnclr"}, "auto"), rec, (rows,), None, StepTargets())
    args, _ = rec.calls[-1]
    parts = (rows[:4, :6], rows[4:, :6], rows[:4, 6:], rows[4:, 6:])
    assert len(args) == 4 and all(torch.equal(x, r) for x, r in zip(args, parts, strict=True))
    # dino: the student's global views then its local crops; the teacher's global views
    glob, local = torch.randn(8, 5), torch.randn(12, 5)
    compute_loss(make_plan({"name": "dino"}, "auto"), rec, (glob, local), teacher, StepTargets())
    (student, teach), _ = rec.calls[-1]
    assert len(student) == 5 and len(teach) == 2
    assert torch.equal(student[1], glob[4:]) and torch.equal(student[4], local[8:])
    # swav: high- and low-resolution scores
    compute_loss(make_plan({"name": "swav"}, "auto"), rec, (glob, local), None, StepTargets())
    (high, low), _ = rec.calls[-1]
    assert len(high) == 2 and len(low) == 3
    # ibot: [CLS] outputs (K) then P·K patch outputs per global row
    ibot = build_loss(make_plan({"name": "ibot_patch"}, "auto"), distributed=False)
    k, p = ibot.patch.output_dim, 16
    rows, t_rows = torch.randn(8, k + p * k), torch.randn(8, k + p * k)
    mask = torch.rand(8, p) < 0.5
    out = compute_loss(
        make_plan({"name": "ibot_patch"}, "auto"),
        ibot,
        (rows, torch.randn(4, k)),
        t_rows,
        StepTargets(mask=mask),
    )
    assert {"cls_loss", "patch_loss", "patch/kl"} <= set(out.terms)
    # koleo: one batch of both views
    compute_loss(make_plan({"name": "koleo"}, "auto"), rec, (z,), None, StepTargets())
    assert torch.equal(rec.calls[-1][0][0], z)
    # cosent / angle: graded pairs
    y = torch.tensor([0, 0, 1, 1])
    plan = make_plan({"name": "cosent"}, "auto")
    compute_loss(plan, rec, (z,), None, StepTargets(labels=y))
    (a, b, scores), _ = rec.calls[-1]
    assert a.shape == b.shape == (4, 6) and scores.shape == (4,)


def test_run_decided_arguments_and_matryoshka():
    plan = make_plan({"name": "arcface"}, "auto")
    assert (plan.task, plan.style) == ("supervised", "labels")
    loss = build_loss(plan, distributed=False, context=LossContext(10, 32, 7))
    assert loss.weight.shape == (10, 32)
    given = make_plan({"name": "arcface", "num_classes": 4, "embedding_dim": 3}, "auto")
    assert build_loss(given, distributed=False).weight.shape == (4, 3)
    assert make_plan({"name": "proxy_anchor"}, "auto").loss_lr_scale == 100.0
    dino = build_loss(
        make_plan({"name": "dino"}, "auto"), distributed=False, context=LossContext(output_dim=9)
    )
    assert dino.center.shape == (9,)
    plan = make_plan({"name": "matryoshka"}, "auto")
    assert (plan.task, plan.style, plan.head) == ("supervised", "labels", "none")
    assert plan.nested_dims == (8, 16, 32, 64) and plan.loss_kwargs["loss"] == "supcon"
    plan = make_plan({"name": "matryoshka", "loss": "simclr", "dims": [4, 8]}, "auto")
    assert (plan.task, plan.style, plan.nested_dims) == ("ssl", "pair", (4, 8))
    with pytest.raises(CLIError, match="over 'dino' .dino-style. is not supported"):
        make_plan({"name": "matryoshka", "loss": "dino"}, "auto")
    with pytest.raises(CLIError, match="wraps one loss: pass --loss-option loss=NAME"):
        make_plan({"name": "matryoshka", "loss": None}, "auto")
    with pytest.raises(CLIError, match="wraps an unknown loss"):
        make_plan({"name": "matryoshka", "loss": "nope"}, "auto")
    for name, task, style in (
        ("triplet", "supervised", "labels"),
        ("cosent", "supervised", "scored"),
        ("dino", "ssl", "dino"),
        ("koleo", "ssl", "single"),
    ):
        plan = make_plan({"name": name}, "auto")
        assert (plan.task, plan.style) == (task, style), name
    with pytest.raises(CLIError, match="'dino' cannot be trained on the 'supervised' task"):
        make_plan({"name": "dino"}, "supervised")
