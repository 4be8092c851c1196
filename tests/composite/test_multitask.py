import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import embedloss
from embedloss.composite.multitask import MultitaskLoss
from embedloss.multimodal.clip import clip_loss

TOL = {"rtol": 1e-12, "atol": 1e-12}
F64 = torch.float64


class Fixed(nn.Module):
    """Returns the value it is given: lets a test choose every task loss exactly."""

    def forward(self, value, target=None):
        return value if target is None else value * target


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "cls": torch.randn(n, 3, generator=g, dtype=F64),
        "reg": torch.randn(n, 2, generator=g, dtype=F64),
    }
    targets = {"cls": torch.randint(0, 3, (n,), generator=g), "reg": torch.zeros(n, 2, dtype=F64)}
    return inputs, targets


def _task_losses(inputs, targets):
    return {
        "cls": F.cross_entropy(inputs["cls"], targets["cls"]),
        "reg": F.mse_loss(inputs["reg"], targets["reg"]),
    }


def test_fixed_weighting_and_terms():
    loss = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, weights={"reg": 0.5})
    inputs, targets = _data()
    ref = _task_losses(inputs, targets)
    out = loss.compute(inputs, targets)
    torch.testing.assert_close(out.loss, ref["cls"] + 0.5 * ref["reg"], **TOL)
    assert out.terms["reg/weight"].item() == 0.5 and out.terms["cls/weight"].item() == 1.0
    assert out.terms["cls/loss"].item() == pytest.approx(ref["cls"].item())
    assert "cls/accuracy" in out.terms and "reg/rmse" in out.terms
    torch.testing.assert_close(loss(inputs, targets), out.loss)


def test_call_conventions_tuple_mapping_and_none_target():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    labels = torch.tensor([0, 1, 0, 2, 2])
    loss = MultitaskLoss(losses={"pos": "clip", "kw": "clip", "lab": "clip"})
    inputs = {
        "pos": (a, b),
        "kw": {"image_embeddings": a, "text_embeddings": b},
        "lab": (a, b),
    }
    targets = {"pos": None, "kw": {"labels": labels}, "lab": labels}
    expected = clip_loss(a, b) + 2 * clip_loss(a, b, labels=labels)
    torch.testing.assert_close(loss(inputs, targets), expected, **TOL)


def test_uncertainty_weighting_closed_form_and_gradient():
    loss = MultitaskLoss(
        losses={"a": Fixed(), "b": Fixed()}, weighting="uncertainty", weights={"b": 2.0}
    )
    with torch.no_grad():
        loss.log_variances.copy_(torch.tensor([0.5, -1.0]))
    la, lb = torch.tensor(3.0, dtype=F64), torch.tensor(0.25, dtype=F64)
    out = loss.compute({"a": la, "b": lb}, {"a": None, "b": None})
    s_a, s_b = 0.5, -1.0
    expected = math.exp(-s_a) * 3.0 + s_a + 2.0 * (math.exp(-s_b) * 0.25 + s_b)
    assert out.loss.item() == pytest.approx(expected, rel=1e-7)
    assert out.terms["a/log_variance"].item() == 0.5
    assert out.terms["b/weight"].item() == pytest.approx(2.0 * math.exp(1.0), rel=1e-6)
    out.loss.backward()
    grad = loss.log_variances.grad
    assert grad[0].item() == pytest.approx(1 - math.exp(-s_a) * 3.0, rel=1e-6)
    assert grad[1].item() == pytest.approx(2.0 * (1 - math.exp(-s_b) * 0.25), rel=1e-6)


def test_uncertainty_log_variance_converges_to_log_of_the_loss():
    loss = MultitaskLoss(losses={"a": Fixed()}, weighting="uncertainty")
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss({"a": torch.tensor(4.0)}, {"a": None}).backward()
        opt.step()
    assert loss.log_variances.item() == pytest.approx(math.log(4.0), abs=1e-3)


def _dwa(history, temperature):
    """Liu et al. 2019, Eq. 1, in plain Python from the last two epoch means."""
    ratios = [a / b for a, b in zip(history[-1], history[-2], strict=True)]
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def _run_epoch(loss, per_call):
    values = []
    for la, lb in per_call:
        values.append(loss({"a": torch.tensor(la), "b": torch.tensor(lb)}, {"a": None, "b": None}))
    loss.update_epoch(0)
    return values


def test_dynamic_weight_averaging_matches_the_paper():
    loss = MultitaskLoss(
        losses={"a": Fixed(), "b": Fixed()}, weighting="dynamic", dwa_temperature=2.0
    )
    loss.update_epoch(0)  # nothing accumulated yet: no effect
    assert int(loss.epochs_closed) == 0
    epochs = [[(4.0, 1.0), (2.0, 3.0)], [(1.0, 2.0), (2.0, 2.0)], [(1.0, 1.0), (0.5, 1.5)]]
    means = []
    for e, calls in enumerate(epochs):
        weights_before = loss.dynamic_weights.tolist()
        values = _run_epoch(loss, calls)
        for (la, lb), v in zip(calls, values, strict=True):
            assert v.item() == pytest.approx(weights_before[0] * la + weights_before[1] * lb)
        means.append([sum(c[0] for c in calls) / 2, sum(c[1] for c in calls) / 2])
        expected = [1.0, 1.0] if e == 0 else _dwa(means, 2.0)
        assert loss.dynamic_weights.tolist() == pytest.approx(expected, rel=1e-12)
    assert sum(loss.dynamic_weights.tolist()) == pytest.approx(2.0)


def test_dynamic_statistics_only_in_training_and_missing_tasks_keep_their_mean():
    loss = MultitaskLoss(
        losses={"a": Fixed(), "b": Fixed()}, weighting="dynamic", allow_missing=True
    )
    loss.eval()
    loss({"a": torch.tensor(5.0), "b": torch.tensor(5.0)}, {"a": None, "b": None})
    assert loss.epoch_loss_count.sum().item() == 0
    loss.train()
    _run_epoch(loss, [(2.0, 4.0)])
    loss({"a": torch.tensor(1.0)}, {"a": None})  # b absent all epoch: keeps its mean 4.0
    loss.update_epoch(1)
    assert loss.loss_history.tolist() == [[2.0, 4.0], [1.0, 4.0]]
    assert loss.dynamic_weights.tolist() == pytest.approx(_dwa([[2.0, 4.0], [1.0, 4.0]], 2.0))


def _snapshot_run(loss, calls):
    return [
        loss({"a": torch.tensor(a), "b": torch.tensor(b)}, {"a": None, "b": None}).item()
        for a, b in calls
    ]


def test_dynamic_state_dict_resume_is_exact():
    def fresh():
        return MultitaskLoss(losses={"a": Fixed(), "b": Fixed()}, weighting="dynamic")

    first = fresh()
    _run_epoch(first, [(3.0, 1.0), (2.0, 2.0)])
    _run_epoch(first, [(1.0, 2.0)])
    first({"a": torch.tensor(0.5), "b": torch.tensor(1.0)}, {"a": None, "b": None})  # mid-epoch
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert {"dynamic_weights", "epoch_loss_sum", "loss_history", "epochs_closed"} <= set(state)
    resumed = fresh()
    resumed.load_state_dict(state)
    later = [(1.0, 1.0), (0.2, 0.4)]
    for model in (first, resumed):
        model.update_epoch(2)
    assert _snapshot_run(first, later) == _snapshot_run(resumed, later)
    torch.testing.assert_close(first.dynamic_weights, resumed.dynamic_weights, **TOL)


def test_uncertainty_state_dict_resume_is_exact():
    inputs, targets = _data(seed=2)
    a = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, weighting="uncertainty")
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        a(inputs, targets).backward()
        opt.step()
    b = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, weighting="uncertainty")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(inputs, targets), a(inputs, targets), **TOL)
    assert list(a.state_dict()) == ["log_variances"]


def test_missing_and_unknown_tasks():
    inputs, targets = _data()
    strict = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"})
    with pytest.raises(ValueError, match=r"task\(s\) \['reg'\] missing from inputs or targets"):
        strict({"cls": inputs["cls"]}, targets)
    with pytest.raises(ValueError, match=r"task\(s\) \['reg'\] missing"):
        strict(inputs, {"cls": targets["cls"]})
    with pytest.raises(ValueError, match=r"inputs has unknown task\(s\) \['clss'\]"):
        strict({**inputs, "clss": inputs["cls"]}, targets)
    with pytest.raises(TypeError, match="targets must be a mapping of task names"):
        strict(inputs, [targets["cls"]])
    lenient = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, allow_missing=True)
    out = lenient.compute({"cls": inputs["cls"]}, targets)
    ref = _task_losses(inputs, targets)
    torch.testing.assert_close(out.loss, ref["cls"], **TOL)
    assert not any(k.startswith("reg/") for k in out.terms)
    with pytest.raises(ValueError, match="no task of"):
        lenient({}, {})


def test_hooks_forwarded_and_example():
    calls = []

    class Hooked(Fixed):
        def update_step(self, step, total_steps=None):
            calls.append(("step", step, total_steps))

        def update_epoch(self, epoch):
            calls.append(("epoch", epoch))

    loss = MultitaskLoss(losses={"h": Hooked()})
    loss.update_step(4)
    loss.update_epoch(2)
    assert calls == [("step", 4, None), ("epoch", 2)]
    cls = embedloss.LossRegistry.get("multitask")
    (inputs, targets), _ = cls.example_inputs(dtype=torch.bfloat16)
    value = embedloss.create_loss("multitask", **cls.example_kwargs())(inputs, targets)
    assert value.dim() == 0 and torch.isfinite(value)
    assert "weighting='fixed'" in repr(loss)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            {"weighting": "gradnorm"},
            ValueError,
            "weighting must be one of 'fixed', 'dynamic', 'uncertainty'",
        ),
        ({"weights": {"x": 1.0}}, ValueError, r"weights names unknown part\(s\)"),
        ({"allow_missing": "yes"}, TypeError, "allow_missing must be a bool"),
        ({"dwa_temperature": 0.0}, ValueError, "dwa_temperature must be a finite number > 0"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultitaskLoss(losses={"a": Fixed()}, **kwargs)


@pytest.mark.parametrize("weighting", ["fixed", "dynamic", "uncertainty"])
def test_every_weighting_runs_on_the_meta_device(weighting):
    # The step path reads nothing back to the host: dynamic statistics accumulate on the device.
    loss = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, weighting=weighting)
    loss = loss.to("meta").train()
    inputs, targets = _data()
    inputs = {k: v.to("meta").requires_grad_() for k, v in inputs.items()}
    targets = {k: v.to("meta") for k, v in targets.items()}
    out = loss(inputs, targets)
    out.backward()
    assert out.device.type == "meta" and inputs["cls"].grad is not None
    assert all(t.device.type == "meta" for t in loss.compute(inputs, targets).terms.values())


def test_forward_accumulates_like_compute_and_builds_no_terms():
    loss = MultitaskLoss(losses={"a": Fixed(), "b": Fixed()}, weighting="dynamic")
    values = {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}
    loss(values, {"a": None, "b": None})
    loss.compute(values, {"a": None, "b": None})
    assert loss.epoch_loss_count.tolist() == [2.0, 2.0]
    assert loss.epoch_loss_sum.tolist() == [4.0, 8.0]
