import inspect

import pytest
from torch import nn

import embedloss
from embedloss import (
    LossRegistry,
    create_loss,
    create_loss_from_config,
    list_losses,
    loss_info,
    register_loss,
)
from embedloss.registry import _ALIASES, _LOSSES


@pytest.fixture
def scratch_registry():
    losses, aliases = dict(_LOSSES), dict(_ALIASES)
    yield
    _LOSSES.clear(), _LOSSES.update(losses)
    _ALIASES.clear(), _ALIASES.update(aliases)


def test_names_aliases_and_categories():
    assert {"simclr", "info_nce", "clip"} <= set(list_losses())
    assert loss_info("nt_xent").name == "simclr"
    assert loss_info("clip").category == "multimodal"
    assert "simclr" in list_losses(category="contrastive")
    assert "clip" not in list_losses(category="contrastive")
    assert list_losses(pattern="sim*") == ["simclr"]
    assert list_losses() == sorted(list_losses())


def test_create_by_name_alias_config_and_class_spelling():
    assert isinstance(create_loss("nt_xent", temperature=0.3), embedloss.SimCLRLoss)
    loss = create_loss_from_config({"name": "clip", "temperature": 0.05, "label_smoothing": 0.1})
    assert loss.temperature == pytest.approx(0.05) and loss.label_smoothing == 0.1
    assert isinstance(LossRegistry.create("info_nce"), embedloss.InfoNCELoss)
    assert LossRegistry.get("clip") is embedloss.CLIPLoss
    assert LossRegistry.list(category="multimodal") == list_losses(category="multimodal")
    assert LossRegistry.info("clip").summary.startswith("CLIP")


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="unknown loss 'simclrr'; did you mean 'simclr'"):
        create_loss("simclrr")
    with pytest.raises(TypeError, match="loss name must be a str"):
        create_loss(3)


def test_unknown_keyword_names_valid_ones():
    with pytest.raises(
        TypeError,
        match=r"unknown argument\(s\) 'temperatur' \(did you mean 'temperature'\?\).*valid arguments: .*temperature",
    ):
        create_loss("simclr", temperatur=0.1)


def test_config_errors():
    with pytest.raises(ValueError, match="config must have a 'name' key"):
        create_loss_from_config({"temperature": 0.1})
    with pytest.raises(TypeError, match="config must be a mapping"):
        create_loss_from_config(["clip"])
    with pytest.raises(ValueError, match="category must be one of"):
        list_losses(category="nope")


def test_register_rejects_duplicates_and_kwargs(scratch_registry):
    with pytest.raises(ValueError, match="loss name 'clip' is already registered"):
        register_loss("clip")(type("X", (nn.Module,), {}))
    with pytest.raises(ValueError, match="loss name 'nt_xent' is already registered"):
        register_loss("fresh", aliases=("nt_xent",))(type("Y", (nn.Module,), {}))

    class Sloppy(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()

    with pytest.raises(TypeError, match="explicit, named constructor arguments"):
        register_loss("sloppy")(Sloppy)

    @register_loss("my_loss", aliases=("mine",))
    class MyLoss(nn.Module):
        """My custom loss."""

        def __init__(self, *, margin: float = 1.0) -> None:
            super().__init__()
            self.margin = margin

    assert loss_info("mine").category == "custom"
    assert loss_info("my_loss").summary == "My custom loss."
    assert create_loss("mine", margin=2.0).margin == 2.0
    assert "margin" in inspect.signature(loss_info("my_loss").cls).parameters


@pytest.mark.parametrize(("typed", "meant"), [("SimCLR", "simclr"), ("NT_Xent", "nt_xent")])
def test_an_unknown_name_that_differs_only_in_case_suggests_the_registered_one(typed, meant):
    with pytest.raises(ValueError, match=rf"^unknown loss '{typed}'; did you mean '{meant}'\? Reg"):
        create_loss(typed)


def test_an_unknown_name_without_a_close_match_ends_its_sentence():
    with pytest.raises(ValueError, match=r"^unknown loss 'xyzzy'\. Registered losses: .*simclr"):
        create_loss("xyzzy")


def test_an_alias_may_stand_for_options_a_call_can_override():
    from embedloss import ArcFaceLoss

    alias = create_loss("sub_center_arcface", num_classes=5, embedding_dim=6)
    assert type(alias) is ArcFaceLoss and alias.sub_centers == 3 and alias.weight.shape == (15, 6)
    assert create_loss("arcface", num_classes=5, embedding_dim=6).sub_centers == 1
    given = create_loss("sub_center_arcface", num_classes=5, embedding_dim=6, sub_centers=2)
    assert given.sub_centers == 2
