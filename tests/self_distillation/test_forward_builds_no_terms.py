"""The losses of the self-supervised, self-distillation, metric-learning and text packages define
only ``compute``: their generated ``forward`` returns the same loss and never builds the terms."""

from __future__ import annotations

import inspect

import pytest
import torch

from embedloss import BaseLoss, list_losses, loss_info

PACKAGES = ("self_supervised", "self_distillation", "metric_learning", "text")
NAMES = [n for n in list_losses() if loss_info(n).cls.__module__.split(".")[1] in PACKAGES]


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_the_loss_of_compute_without_terms(name, monkeypatch):
    cls = loss_info(name).cls
    assert inspect.unwrap(cls.forward).__qualname__.startswith("_loss_only"), "generated"
    args, kwargs = cls.example_inputs(8, 16)
    built = []
    output = BaseLoss.output

    def spy(self, loss, terms):
        return output(self, loss, lambda: built.append(name) or terms())

    monkeypatch.setattr(BaseLoss, "output", spy)
    torch.manual_seed(0)
    by_forward = cls(**cls.example_kwargs()).eval()(*args, **kwargs)
    assert built == []
    torch.manual_seed(0)
    out = cls(**cls.example_kwargs()).eval().compute(*args, **kwargs)
    assert built == [name]
    torch.testing.assert_close(by_forward, out.loss, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dino", "ibot_patch"])
def test_forward_and_compute_move_the_centre_alike(name):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16)
    by_forward, by_compute = cls(**cls.example_kwargs()), cls(**cls.example_kwargs())
    for _ in range(2):
        loss = by_forward(*args, **kwargs)
        out = by_compute.compute(*args, **kwargs)
        torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    torch.testing.assert_close(by_forward.center, by_compute.center, rtol=0, atol=0)
    assert by_forward.center.any()
