"""The registry contract, checked for every self-supervised loss (a local conformance run)."""

from __future__ import annotations

import inspect

import pytest
import torch

import embedloss
from embedloss import functional as EF
from embedloss import list_losses, loss_info

NAMES = ["barlow_twins", "decorrelation", "hybrid_vicreg", "negative_cosine", "vicreg"]


def test_registered_in_the_self_supervised_category() -> None:
    assert set(NAMES) <= set(list_losses(category="self_supervised"))
    for name in NAMES:
        info = loss_info(name)
        assert info.category == "self_supervised"
        assert info.cls.__name__ in embedloss.__all__
        assert getattr(EF, f"{name}_loss") is not None and f"{name}_loss" in EF.__all__
        params = inspect.signature(info.cls).parameters.values()
        assert all(p.kind == p.KEYWORD_ONLY for p in params)


def _instance(name: str) -> torch.nn.Module:
    cls = loss_info(name).cls
    return embedloss.create_loss(name, **cls.example_kwargs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_scalar_finite_loss_and_gradients(name: str, dtype: torch.dtype) -> None:
    loss = _instance(name)
    loss.update_step(3)
    args, kwargs = type(loss).example_inputs(dtype=dtype)
    args = tuple(a.clone().requires_grad_() for a in args)
    out = loss.compute(*args, **kwargs)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(
        t.dim() == 0 and not t.requires_grad and torch.isfinite(t) for t in out.terms.values()
    )
    out.loss.backward()
    grads = [a.grad for a in args if a.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    first = _instance(name)
    first.update_step(4)
    args, kwargs = type(first).example_inputs(seed=1)
    expected = first(*args, **kwargs)
    second = _instance(name)
    second.load_state_dict(first.state_dict())
    assert torch.equal(second(*args, **kwargs), expected)
    assert repr(second)
