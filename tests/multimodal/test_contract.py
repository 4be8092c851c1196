"""The registry contract for the new multimodal losses (what the registry-wide conformance test checks)."""

import pytest
import torch

from embedloss import create_loss, list_losses, loss_info

NAMES = ["siglip", "feature_consistency", "alignment_uniformity"]


def test_registered_in_the_multimodal_category():
    assert set(NAMES) <= set(list_losses(category="multimodal"))
    for name in NAMES:
        info = loss_info(name)
        assert info.summary and "Example" in info.doc
        assert all(p.kind is p.KEYWORD_ONLY for p in info.signature.parameters.values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reductions_dtypes_and_gradients(name, dtype):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(n=6, d=8, dtype=dtype)
    args = tuple(a.clone().requires_grad_(True) for a in args)
    for reduction in ("mean", "sum", "none"):
        loss = create_loss(name, reduction=reduction, **cls.example_kwargs())
        value = loss(*args, **kwargs)
        assert value.shape == ((6,) if reduction == "none" else ())
        assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(value).all()
        grads = torch.autograd.grad(value.sum(), args[0])
        assert torch.isfinite(grads[0]).all()
        out = loss.compute(*args, **kwargs)
        torch.testing.assert_close(out.loss, value)
        assert all(t.ndim == 0 and not t.requires_grad for t in out.terms.values())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    cls = loss_info(name).cls
    loss = create_loss(name, **cls.example_kwargs())
    fresh = create_loss(name, **cls.example_kwargs())
    fresh.load_state_dict(loss.state_dict())
    args, kwargs = cls.example_inputs()
    torch.testing.assert_close(fresh(*args, **kwargs), loss(*args, **kwargs))
