import pytest
import torch
from torch import nn

import embedloss
from embedloss.base.base_loss import LossOutput
from embedloss.composite.combined import CombinedLoss
from embedloss.contrastive.simclr import SimCLRLoss, simclr_loss
from embedloss.multimodal.clip import CLIPLoss, clip_loss

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _views(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n, d, generator=g, dtype=torch.float64
    )


class Recorder(nn.Module):
    """A plain module with hooks that records what it is called with."""

    def __init__(self, result="tensor"):
        super().__init__()
        self.result = result
        self.calls = []
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, a, b, labels=None):
        loss = self.scale * (a - b).pow(2).mean()
        if self.result == "tensor":
            return loss
        if self.result == "dict":
            return {
                "loss": loss,
                "gap": 1.5,
                "flag": True,
                "nested": {"x": 1},
                "vec": torch.ones(3),
            }
        if self.result == "output":
            return LossOutput(loss, {"gap": torch.tensor(0.5)})
        return "not a loss"

    def update_step(self, step, total_steps=None):
        self.calls.append(("step", step, total_steps))

    def update_epoch(self, epoch):
        self.calls.append(("epoch", epoch))


def test_weighted_sum_of_parts_with_prefixed_terms():
    a, b = _views()
    loss = CombinedLoss(
        losses={
            "clip": {"name": "clip", "temperature": 0.1},
            "simclr": SimCLRLoss(temperature=0.2),
        },
        weights={"clip": 0.7, "simclr": 0.25},
    )
    out = loss.compute(a, b)
    expected = 0.7 * clip_loss(a, b, temperature=0.1) + 0.25 * simclr_loss(a, b, temperature=0.2)
    torch.testing.assert_close(out.loss, expected, **TOL)
    torch.testing.assert_close(loss(a, b), expected, **TOL)
    assert out.terms["clip/loss"].item() == pytest.approx(clip_loss(a, b, temperature=0.1).item())
    assert {"clip/accuracy", "clip/temperature", "simclr/accuracy", "simclr/loss"} <= set(out.terms)
    assert all(t.dim() == 0 and not t.requires_grad for t in out.terms.values())


def test_missing_weight_is_one_and_same_inputs_reach_every_part():
    a, b = _views(seed=1)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    loss = CombinedLoss(losses={"clip": "clip", "nt_xent": "nt_xent"}, weights={"clip": 2.0})
    expected = 2.0 * clip_loss(a, b, labels=labels) + simclr_loss(a, b, labels=labels)
    torch.testing.assert_close(loss(a, b, labels=labels), expected, **TOL)
    assert loss.weights == {"clip": 2.0, "nt_xent": 1.0}


def test_nested_configs_state_dict_to_and_parameters():
    loss = CombinedLoss(
        losses={
            "clip": {"name": "clip", "temperature": 0.05, "learnable_temperature": True},
            "inner": {"name": "combined", "losses": {"simclr": {"name": "simclr"}}},
        }
    )
    assert isinstance(loss.losses["clip"], CLIPLoss)
    assert isinstance(loss.losses["inner"], CombinedLoss)
    assert loss.losses["clip"].temperature == pytest.approx(0.05)
    keys = set(loss.state_dict())
    assert {"losses.clip.logit_scale", "losses.inner.losses.simclr.logit_scale"} <= keys
    assert [n for n, _ in loss.named_parameters()] == ["losses.clip.logit_scale"]
    other = CombinedLoss(
        losses={
            "clip": {"name": "clip", "temperature": 0.5, "learnable_temperature": True},
            "inner": {"name": "combined", "losses": {"simclr": {"name": "simclr"}}},
        }
    )
    other.load_state_dict(loss.state_dict())
    a, b = _views(seed=2)
    torch.testing.assert_close(other(a, b), loss(a, b))
    assert loss.double().losses["clip"].logit_scale.dtype == torch.float64
    out = loss.compute(a, b)
    assert "inner/simclr/loss" in out.terms


def test_gradients_reach_inputs_and_learnable_parts():
    a, b = _views(seed=3)
    a.requires_grad_(True)
    loss = CombinedLoss(
        losses={"clip": {"name": "clip", "learnable_temperature": True}, "rec": Recorder()}
    )
    loss(a, b).backward()
    # the same gradients as the parts called on their own and summed
    clip, a_alone = loss.losses["clip"], a.detach().clone().requires_grad_(True)
    scale_grad = clip.logit_scale.grad.clone()
    clip.zero_grad()
    (clip(a_alone, b) + Recorder()(a_alone, b)).backward()
    assert a.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad, a_alone.grad)
    torch.testing.assert_close(scale_grad, clip.logit_scale.grad)


def test_plain_module_results_and_hooks_are_forwarded():
    a, b = _views(seed=4)
    parts = {
        "t": Recorder("tensor"),
        "d": Recorder("dict"),
        "o": Recorder("output"),
        "clip": "clip",
    }
    loss = CombinedLoss(losses=parts)
    out = loss.compute(a, b)
    assert (
        out.terms["d/gap"].item() == 1.5
        and "d/flag" not in out.terms
        and "d/nested" not in out.terms
    )
    assert "d/vec" not in out.terms and out.terms["o/gap"].item() == 0.5
    assert set(k for k in out.terms if k.startswith("t/")) == {"t/loss"}
    loss.update_step(3, 10)
    loss.update_epoch(1)
    assert parts["t"].calls == [("step", 3, 10), ("epoch", 1)]
    assert parts["d"].calls == parts["t"].calls


def test_reduction_none_parts_must_agree():
    a, b = _views(seed=5)
    same = CombinedLoss(
        losses={
            "x": {"name": "clip", "reduction": "none"},
            "y": {"name": "clip", "reduction": "none", "temperature": 0.2},
        }
    )
    assert same(a, b).shape == (6,)
    mixed = CombinedLoss(losses={"x": {"name": "clip", "reduction": "none"}, "y": "simclr"})
    with pytest.raises(ValueError, match="the parts' losses must have one shape"):
        mixed(a, b)


def test_registry_example_and_repr():
    cls = embedloss.LossRegistry.get("combined")
    loss = embedloss.create_loss("combined", **cls.example_kwargs())
    args, kwargs = cls.example_inputs()
    assert loss(*args, **kwargs).dim() == 0
    assert embedloss.loss_info("combined").category == "composite"
    assert "weights={'clip': 1.0, 'simclr': 0.5}" in repr(loss)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"losses": {}}, ValueError, "losses must name at least one loss"),
        ({"losses": [CLIPLoss()]}, TypeError, "losses must be a mapping of names to losses"),
        ({"losses": {"a.b": "clip"}}, ValueError, "keys must be non-empty strings without"),
        ({"losses": {"a/b": "clip"}}, ValueError, "keys must be non-empty strings without"),
        ({"losses": {"": "clip"}}, ValueError, "keys must be non-empty strings without"),
        ({"losses": {"keys": "clip"}}, ValueError, "losses key 'keys' is reserved"),
        ({"losses": {"a": 3}}, TypeError, r"losses\['a'\] must be an nn.Module"),
        ({"losses": {"a": {"temperature": 0.1}}}, ValueError, "config must have a 'name' key"),
        ({"losses": {"a": "clipp"}}, ValueError, "did you mean 'clip'"),
        (
            {"losses": {"a": "clip"}, "weights": {"b": 1.0}},
            ValueError,
            r"weights names unknown part\(s\) \['b'\]",
        ),
        (
            {"losses": {"a": "clip"}, "weights": {"a": "x"}},
            TypeError,
            r"weights\['a'\] must be a number",
        ),
        ({"losses": {"a": "clip"}, "weights": {"a": float("nan")}}, ValueError, "must be finite"),
        ({"losses": {"a": "clip"}, "weights": [1.0]}, TypeError, "weights must be a mapping"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CombinedLoss(**kwargs)


def test_part_returning_something_else_raises():
    loss = CombinedLoss(losses={"bad": Recorder("string")})
    a, b = _views()
    with pytest.raises(TypeError, match="loss 'bad' returned str; expected a Tensor"):
        loss(a, b)


def test_forward_calls_each_part_as_a_module_and_compute_through_compute():
    a, b = _views(seed=6)
    clip = CLIPLoss()
    calls = []
    clip.register_forward_hook(lambda *args: calls.append("forward"))
    loss = CombinedLoss(losses={"clip": clip, "rec": Recorder("dict")})
    value = loss(a, b)
    assert calls == ["forward"]  # forward: the part's own forward, no terms
    out = loss.compute(a, b)
    assert calls == ["forward"]  # compute: the part's compute (module hooks do not fire)
    torch.testing.assert_close(value, out.loss, **TOL)
    assert {"clip/accuracy", "rec/gap"} <= set(out.terms)
