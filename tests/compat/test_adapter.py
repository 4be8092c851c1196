"""The shared adapter: one DeprecationWarning per name, ignored arguments and inputs, heads, hooks."""

from argparse import Namespace
from typing import ClassVar

import pytest
import torch
from torch import nn

import embedloss
import embedloss.compat as compat
from embedloss.compat import IgnoredArgumentWarning
from embedloss.compat._adapter import (
    GUIDE,
    LegacyLoss,
    PairedLoss,
    legacy_reduce,
    metric,
    reset_warning_registry,
    retrieval_metrics,
)
from embedloss.ops import labels_from_match_ids

from .conftest import of, recorded
from .helpers import assert_same, trainer_batch


def test_one_deprecation_warning_per_class_naming_replacement_and_guide():
    with recorded() as caught:
        compat.CLIPStyleLoss()
        compat.CLIPStyleLoss(temperature=0.1)
        compat.ContrastiveLoss(add_projection=False)
    dep = of(caught, DeprecationWarning)
    assert [str(w.message).split()[0] for w in dep] == [
        "embedloss.compat.CLIPStyleLoss",
        "embedloss.compat.ContrastiveLoss",
    ]
    assert "embedloss.CLIPLoss" in str(dep[0].message) and GUIDE in str(dep[0].message)
    # attributed to the caller's line, not to embedloss internals
    assert all(w.filename == __file__ for w in dep)


def test_registry_reset_warns_again_and_subclasses_warn_under_their_own_name():
    with recorded() as caught:
        compat.CLIPStyleLoss()
        reset_warning_registry()
        compat.CLIPStyleLoss()
        compat.CLIPLoss()  # the consolidation subclass has its own entry
    names = [str(w.message).split()[0] for w in of(caught, DeprecationWarning)]
    assert names == ["embedloss.compat.CLIPStyleLoss"] * 2 + ["embedloss.compat.CLIPLoss"]


def test_functions_warn_once():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with recorded() as caught:
        compat.nt_xent_loss(a, b)
        compat.nt_xent_loss(a, b)
    (w,) = of(caught, DeprecationWarning)
    assert "simclr_loss" in str(w.message) and w.filename == __file__


def test_ignored_constructor_arguments_warn_and_say_why():
    with recorded() as caught:
        compat.ContrastiveLoss(add_projection=False)
    assert of(caught, IgnoredArgumentWarning) == []
    with recorded() as caught:
        compat.ContrastiveLoss(
            add_projection=False, sampling_strategy="memory-bank", dataset_size=10
        )
    msgs = [str(w.message) for w in of(caught, IgnoredArgumentWarning)]
    assert len(msgs) == 2
    assert msgs[0].startswith("ContrastiveLoss(sampling_strategy='memory-bank') is ignored: ")
    assert "never activated" in msgs[0] and "dataset_size=10" in msgs[1]


def test_trainer_keys_are_silent_and_unknown_inputs_warn_once_with_a_hint():
    loss = compat.CLIPStyleLoss()
    with recorded() as caught:
        loss(**trainer_batch(labels=torch.arange(6)))
    assert of(caught, IgnoredArgumentWarning) == []
    with recorded() as caught:
        loss(**trainer_batch(), match_id=["a"] * 6)
        loss(**trainer_batch(), match_id=["a"] * 6)
        loss(**trainer_batch(), attention_weight=None)
    msgs = [str(w.message) for w in of(caught, IgnoredArgumentWarning)]
    assert len(msgs) == 2
    assert "unknown input 'match_id' (did you mean 'match_ids'?)" in msgs[0]
    assert "(did you mean 'attention_weights'?)" in msgs[1]


def test_bad_inputs_raise_with_legacy_names():
    loss = compat.CLIPStyleLoss()
    with pytest.raises(
        ValueError, match="vision_features and text_features must have the same shape"
    ):
        loss(vision_features=torch.randn(4, 8), text_features=torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"match_ids must have shape \(4,\)"):
        loss(vision_features=torch.randn(4, 8), text_features=torch.randn(4, 8), match_ids=[1, 2])
    with pytest.raises(TypeError, match="add_projection must be a bool"):
        compat.ContrastiveLoss(add_projection="yes")


def test_projection_heads_are_per_modality_parameters_of_the_loss():
    loss = compat.ContrastiveLoss(input_dim=8, projection_dim=4)
    names = {n.split(".")[1] for n, _ in loss.named_parameters()}
    assert names == {"vision", "text"}
    assert loss.projection["vision"][0].in_features == 8
    assert loss.projection["vision"][-1].out_features == 4
    assert loss.projection["vision"] is not loss.projection["text"]
    out = loss.double()(**trainer_batch(d=8))
    out["loss"].backward()
    assert all(p.grad is not None for p in loss.parameters())


def test_projection_without_input_dim_builds_nothing_and_says_so():
    with recorded() as caught:
        loss = compat.SimCLRLoss()  # use_projection=True by default, no input_dim
    (w,) = of(caught, IgnoredArgumentWarning)
    assert "SimCLRLoss(use_projection=True) needs input_dim" in str(w.message)
    assert loss.projection is None and list(loss.parameters()) == []


class _Recorder(embedloss.BaseLoss):
    def __init__(self):
        super().__init__()
        self.calls = []

    def update_step(self, step, total_steps=None):
        self.calls.append(("step", step, total_steps))

    def update_epoch(self, epoch):
        self.calls.append(("epoch", epoch))


class _Legacy(LegacyLoss):
    replacement = "nothing"

    def __init__(self):
        super().__init__()
        self.inner = _Recorder()
        self.head = nn.Linear(2, 2)  # not a loss: hooks skip it


def test_hooks_reach_the_losses_held():
    loss = _Legacy()
    loss.update_step(3)
    loss.update_step(4, 10)
    loss.update_epoch(2)
    assert loss.inner.calls == [("step", 3, None), ("step", 4, 10), ("epoch", 2)]


def test_base_names_resolve_to_embedloss_with_a_warning():
    with recorded() as caught:
        cls = compat.BaseContrastiveLoss
        mixin = compat.TemperatureScalingMixin
        compat.BaseContrastiveLoss  # noqa: B018
    assert cls is embedloss.BaseContrastiveLoss and mixin is embedloss.TemperatureScalingMixin
    assert len(of(caught, DeprecationWarning)) == 2
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLoss'"):
        compat.NoSuchLoss  # noqa: B018


class _Paired(PairedLoss):
    replacement = "embedloss.CLIPLoss"
    legacy_terms: ClassVar[dict[str, str]] = {
        "t2v_loss": "loss_text_to_image",
        "temperature": "temperature",
    }

    def __init__(self, dim=None):
        super().__init__(dim=dim)
        self.loss = embedloss.CLIPLoss(temperature=0.1)


def test_paired_loss_reports_the_held_loss_terms_under_their_legacy_names():
    with recorded() as caught:
        loss = _Paired(dim=768)
    (w,) = of(caught, IgnoredArgumentWarning)
    assert str(w.message) == (
        "_Paired(dim=768) is ignored: the embedding dimension is taken from the inputs."
    )
    ids = ["a", "b", "a", "c", "d", "e"]
    batch = trainer_batch(match_ids=ids)
    with recorded() as caught:
        out = loss(**batch)
    assert of(caught, IgnoredArgumentWarning) == []  # trainer keys are accepted silently
    assert list(out) == ["loss", "t2v_loss", "temperature"]  # the legacy order
    v, t = batch["vision_features"], batch["text_features"]
    ref = embedloss.CLIPLoss(temperature=0.1).compute(v, t, labels_from_match_ids(ids))
    assert_same(out["loss"], ref.loss, (v, t))
    assert out["t2v_loss"].item() == ref.terms["loss_text_to_image"].item()
    assert not out["t2v_loss"].requires_grad and out["temperature"].shape == ()


def test_retrieval_metrics_without_recalls_are_the_same_accuracies():
    batch = trainer_batch(n=12)
    v, t = batch["vision_features"], batch["text_features"]
    labels = torch.tensor([i % 5 for i in range(12)])
    full = retrieval_metrics(v, t, labels)
    short = retrieval_metrics(v, t, labels, recalls=False)
    assert list(short) == ["v2t_accuracy", "t2v_accuracy", "accuracy"]
    assert all(short[k].item() == full[k].item() for k in short) and "recalls" in full


def test_legacy_reduce_weights_each_sample_then_reduces():
    per = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    s = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(legacy_reduce(per, "none", s), per * s[:, None])
    assert legacy_reduce(per, "mean", s).item() == (0 + 1 + 0 + 0 + 8 + 10) / 6
    assert legacy_reduce(per, "sum").item() == 15.0
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(3,\), got \(2,\)"):
        legacy_reduce(per, "mean", torch.ones(2))
    with pytest.raises(TypeError, match="sample_weight must be a torch.Tensor"):
        legacy_reduce(per, "mean", [1.0, 1.0, 1.0])


def test_metric_is_a_detached_scalar_tensor():
    x = torch.tensor([2.0], requires_grad=True)
    m = metric(x * 3)
    assert m.shape == () and not m.requires_grad and m.item() == 6.0
    assert metric(0.25).item() == 0.25 and f"{metric(0.25):.2f}" == "0.25"


def _make(name):
    """Use each legacy name the cheapest way that triggers its warning."""
    cls = getattr(compat, name)
    special = {
        "EMAMoCoLoss": lambda: cls(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), K=4),
        "CombinedLoss": lambda: cls(torch.nn.MSELoss()),
        "MultitaskLoss": lambda: cls({"a": torch.nn.MSELoss()}),
        "ContrastiveLoss": lambda: cls(add_projection=False),
        "SimCLRLoss": lambda: cls(use_projection=False),
        "nt_xent_loss": lambda: cls(torch.randn(2, 2), torch.randn(2, 2)),
        "supervised_contrastive_loss": lambda: cls(
            torch.randn(2, 2), torch.randn(2, 2), torch.arange(2)
        ),
        "compute_recall_at_k": lambda: cls(torch.eye(2)),
        "create_loss_function": lambda: cls(Namespace(loss_type="decoupled")),
    }
    return special.get(name, cls)()


LEGACY_NAMES = [
    n for n in compat.__all__ if n not in compat._BASE_NAMES and n != "IgnoredArgumentWarning"
]


def test_every_legacy_name_is_exported():
    assert len(LEGACY_NAMES) == 31  # 23 legacy classes and functions + 8 consolidation names


@pytest.mark.parametrize("name", LEGACY_NAMES)
def test_every_legacy_name_warns_once_with_replacement_and_guide(name):
    with recorded() as caught:
        _make(name)
        _make(name)
    mine = [
        w
        for w in of(caught, DeprecationWarning)
        if str(w.message).startswith(f"embedloss.compat.{name} ")
    ]
    assert len(mine) == 1
    assert "Replacement: embedloss." in str(mine[0].message) and GUIDE in str(mine[0].message)
    assert mine[0].filename == __file__
