"""The registry contract, checked for this catalogue's losses through their example inputs."""

import inspect

import pytest
import torch

from embedloss import create_loss, list_losses, loss_info

NAMES = ["moco", "hard_negative", "dynamic_temperature", "dcl", "dclw"]


def _make(name, **kwargs):
    cls = loss_info(name).cls
    return create_loss(name, **{**cls.example_kwargs(), **kwargs}), cls


@pytest.mark.parametrize("name", NAMES)
def test_registered_documented_and_explicit(name):
    info = loss_info(name)
    assert name in list_losses(category="contrastive")
    assert info.category == "contrastive"
    doc = info.doc
    assert "Example:" in doc and "Args:" in doc
    for p in inspect.signature(info.cls).parameters.values():
        assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, p
    assert "gather_distributed" in inspect.signature(info.cls).parameters
    assert loss_info("memory_queue").cls is loss_info("moco").cls


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scalar_finite_gradients_per_dtype(name, dtype):
    loss_fn, cls = _make(name)
    for _ in range(2):  # twice: stateful losses (MoCo's queue) differ on the second call
        args, kwargs = cls.example_inputs(dtype=dtype)
        args = tuple(a.detach().requires_grad_(True) if a.is_floating_point() else a for a in args)
        out = loss_fn.compute(*args, **kwargs)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        grads = torch.autograd.grad(out.loss, [a for a in args if a.requires_grad])
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        for term, value in out.terms.items():
            assert value.ndim == 0 and not value.requires_grad and torch.isfinite(value), term


@pytest.mark.parametrize("name", NAMES)
def test_reductions(name):
    args, kwargs = loss_info(name).cls.example_inputs()
    per_anchor = _make(name, reduction="none")[0](*args, **kwargs)
    assert per_anchor.ndim == 1 and per_anchor.shape[0] in (args[0].shape[0], 2 * args[0].shape[0])
    torch.testing.assert_close(_make(name, reduction="sum")[0](*args, **kwargs), per_anchor.sum())
    torch.testing.assert_close(_make(name)[0](*args, **kwargs), per_anchor.mean())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    trained, cls = _make(name)
    for seed in range(2):
        args, kwargs = cls.example_inputs(seed=seed)
        trained(*args, **kwargs)
    resumed, _ = _make(name)
    resumed.load_state_dict(trained.state_dict())
    args, kwargs = cls.example_inputs(seed=7)
    assert torch.equal(resumed(*args, **kwargs), trained(*args, **kwargs))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_is_rejected(name):
    with pytest.raises(TypeError, match="got unknown argument"):
        create_loss(name, temprature=0.1)
