"""The conformance checks, for the losses of this branch, through their example_* classmethods:
every reduction, float32/float64/bfloat16, finite gradients, state_dict round trip."""

import inspect

import pytest
import torch

import embedloss

NAMES = [
    "supcon",
    "cross_modal_supcon",
    "cross_entropy",
    "mse",
    "combined",
    "multitask",
    "mixed_multimodal",
]


def _float_tensors(value):
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _float_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _float_tensors(v)]
    return []


def _has_reduction(name):
    return "reduction" in inspect.signature(embedloss.LossRegistry.get(name)).parameters


# Composites have no reduction of their own (their parts' decides), so only their default runs.
CASES = [
    (name, reduction)
    for name in NAMES
    for reduction in ("mean", "sum", "none")
    if reduction == "mean" or _has_reduction(name)
]


@pytest.mark.parametrize("name,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_example_conforms(name, reduction, dtype):
    cls = embedloss.LossRegistry.get(name)
    kwargs = cls.example_kwargs()
    if _has_reduction(name):
        kwargs["reduction"] = reduction
    loss = embedloss.create_loss(name, **kwargs)
    args, call_kwargs = cls.example_inputs(n=6, d=5, dtype=dtype)
    inputs = _float_tensors((args, call_kwargs))
    for t in inputs:
        t.requires_grad_(True)
    out = loss.compute(*args, **call_kwargs)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.loss.dim() == (1 if reduction == "none" else 0)
    assert torch.isfinite(out.loss).all()
    assert all(t.dim() == 0 and not t.requires_grad for t in out.terms.values())
    out.loss.sum().backward()
    assert any(t.grad is not None for t in inputs)
    assert all(torch.isfinite(t.grad).all() for t in inputs if t.grad is not None)
    clone = embedloss.create_loss(name, **kwargs)
    clone.load_state_dict(loss.state_dict())
    torch.testing.assert_close(clone(*args, **call_kwargs), loss(*args, **call_kwargs))
