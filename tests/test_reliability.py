"""Misuse ends in a clear error or in correct behaviour: never a silent change, never a NaN with
healthy-looking terms (the reliability issue; distributed cases are in tests/distributed/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import embedloss
from embedloss import (
    CLIPLoss,
    DynamicTemperatureLoss,
    SigLIPLoss,
    SimCLRLoss,
    SupConLoss,
    create_loss,
    list_losses,
    loss_info,
    register_loss,
)
from embedloss.functional import supcon_loss
from embedloss.registry import _ALIASES, _LOSSES


@pytest.fixture
def no_value_checks():
    embedloss.set_value_checks("never")
    yield
    embedloss.set_value_checks("cpu")


# --- temperatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_a_learnable_temperature_below_the_clamp_is_refused(name):
    with pytest.raises(ValueError, match=r"temperature=0\.001 is below 0\.01"):
        create_loss(name, temperature=1e-3, learnable_temperature=True)
    fixed = create_loss(name, temperature=1e-3, learnable_temperature=False)
    assert fixed.temperature == pytest.approx(1e-3, rel=1e-12)  # honoured, not clamped


def test_siglip_default_learnable_temperature_refuses_a_tiny_tau():
    with pytest.raises(ValueError, match="learnable_temperature=False"):
        create_loss("siglip", temperature=1e-3)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "double"])
def test_module_dtype_casts_keep_a_fixed_temperature_exact(cast):
    loss = getattr(SimCLRLoss(temperature=0.5), cast)()
    assert loss.temperature == 0.5 and loss.logit_scale.dtype == torch.float64
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(loss(a, b), SimCLRLoss(temperature=0.5)(a, b))
    bias = getattr(SigLIPLoss(bias=-3.3, learnable_bias=False), cast)()
    assert bias.bias == -3.3


# --- values ------------------------------------------------------------------------------------


def _first_float(args):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return i
    return None


@pytest.mark.parametrize("name", list_losses())
def test_nan_input_is_a_clear_error_on_cpu(name):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16)
    i = _first_float(args)
    if i is None:  # inputs are mappings (multitask): covered through its parts
        return
    bad = args[i].clone()
    bad[0, 0] = float("nan")
    args = (*args[:i], bad, *args[i + 1 :])
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        cls(**cls.example_kwargs())(*args, **kwargs)


@pytest.mark.parametrize("name", list_losses())
def test_a_nan_loss_comes_with_nan_terms(name, no_value_checks):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16)
    i = _first_float(args)
    if i is None:
        return
    bad = args[i].clone()
    bad[:, 0] = float("nan")
    out = cls(**cls.example_kwargs()).compute(*(*args[:i], bad, *args[i + 1 :]), **kwargs)
    if torch.isfinite(out.loss).all():  # a loss may ignore an input entirely (a stop-gradient)
        return
    assert all(torch.isnan(v) for v in out.terms.values()), out.terms


def test_finite_inputs_whose_sum_overflows_are_accepted():
    # The check sums first (one reduction) and only inspects entries when the sum is not
    # finite: a large finite batch must not be mistaken for a diverged one, +inf and -inf
    # that cancel to NaN in the sum must still be caught.
    big = torch.full((4, 3), 3e38)
    assert torch.isinf(big.sum())
    assert torch.isfinite(CLIPLoss()(big, big))
    both = torch.randn(4, 3)
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    with pytest.raises(
        ValueError, match=r"^image_embeddings contains NaN or infinite values \(2 of 12"
    ):
        CLIPLoss()(both, torch.randn(4, 3))


def test_dynamic_temperature_blames_the_input_not_the_temperature():
    a = torch.randn(4, 3)
    a[2, 1] = float("inf")
    with pytest.raises(ValueError, match="^z_a contains NaN or infinite values"):
        DynamicTemperatureLoss()(a, torch.randn(4, 3))


@pytest.mark.parametrize("loss", [CLIPLoss(), SigLIPLoss()], ids=["clip", "siglip"])
def test_a_nan_logit_scale_is_named(loss):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="^logit_scale must be finite"):
        loss(x, x, logit_scale=torch.tensor(float("nan")))
    with torch.no_grad():
        loss.logit_scale.fill_(float("nan"))  # a diverged learnable temperature
    with pytest.raises(ValueError, match="loss's own logit_scale"):
        loss(x, x)


def test_value_checks_modes():
    with pytest.raises(ValueError, match="mode must be one of 'cpu', 'always', 'never'"):
        embedloss.set_value_checks("sometimes")


# --- supervision -------------------------------------------------------------------------------


def test_supcon_refuses_a_second_view_as_multi_hot_labels():
    z = torch.randn(6, 8)
    with pytest.raises(TypeError, match="multi-hot labels must be an integer or bool"):
        supcon_loss(z, torch.randn(6, 8))
    with pytest.raises(ValueError, match="mask must be a bool tensor or hold only 0 and 1"):
        supcon_loss(z, mask=torch.rand(6, 6))
    torch.testing.assert_close(  # a 0/1 mask of any dtype is a relation
        supcon_loss(z, mask=torch.eye(6) + torch.eye(6).roll(1, 0)),
        supcon_loss(z, mask=(torch.eye(6) + torch.eye(6).roll(1, 0)).bool()),
    )


def test_no_anchor_with_a_positive_is_a_zero_loss_that_backpropagates():
    z = torch.randn(5, 8, requires_grad=True)
    out = SupConLoss().compute(z, torch.arange(5))  # every class alone: no positive anywhere
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert z.grad is not None and (z.grad == 0).all()
    assert out.terms["anchors_without_positives"].item() == 5


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in list_losses() if "chunk_size" in str(loss_info(n).signature)]
)
def test_every_constructor_argument_is_checked_at_construction(name):
    with pytest.raises(TypeError, match="chunk_size must be None, 'auto' or an int"):
        create_loss(name, chunk_size="big")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        create_loss(name, chunk_size=0)


# --- registry ----------------------------------------------------------------------------------


@pytest.fixture
def scratch_registry():
    saved = dict(_LOSSES), dict(_ALIASES)
    yield
    _LOSSES.clear(), _ALIASES.clear()
    _LOSSES.update(saved[0]), _ALIASES.update(saved[1])


def _define(scale: float):
    class NotebookLoss(embedloss.BaseLoss):
        """A loss defined in a notebook cell.

        Args:
            reduction: As every loss.

        Example:
            >>> NotebookLoss()
        """

        def compute(self, x: torch.Tensor) -> embedloss.LossOutput:
            return embedloss.LossOutput(x.sum() * scale, {})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.compute(x).loss

    return NotebookLoss


def test_running_a_registering_cell_twice_replaces_the_loss(scratch_registry):
    register_loss("cell_loss", aliases=("cell",))(_define(1.0))
    second = register_loss("cell_loss", aliases=("cell",))(_define(2.0))  # the cell, run again
    assert create_loss("cell").__class__ is second
    assert create_loss("cell_loss")(torch.ones(2)).item() == 4.0
    with pytest.raises(ValueError, match="loss name 'clip' is already registered"):
        register_loss("clip")(_define(3.0))
    other = type("Other", (nn.Module,), {})
    with pytest.raises(ValueError, match="'cell_loss' is already registered"):
        register_loss("cell_loss")(other)


# --- weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_sample_and_class_weights_must_be_finite_and_non_negative(bad):
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    weights = torch.tensor([1.0, bad, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"sample_weight must be finite and >= 0"):
        create_loss("cross_entropy")(logits, y, sample_weight=weights)
    with pytest.raises(ValueError, match=r"sample_weight must be finite and >= 0"):
        create_loss("mse")(torch.randn(4, 2), torch.randn(4, 2), sample_weight=weights)
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        create_loss("cross_entropy", class_weights=[1.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        embedloss.functional.cross_entropy_loss(logits, y, class_weights=weights[:3])
