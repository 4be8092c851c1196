"""The contract every registered loss must meet, checked automatically for each of them.

A new loss joins this test by being registered; it supplies small inputs through the
``example_inputs`` / ``example_kwargs`` classmethods of :class:`embedloss.BaseLoss`.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import embedloss
from embedloss import BaseLoss, LossOutput, list_losses, loss_info

NAMES = list_losses()
# Losses whose value is a statistic of the whole batch (no per-sample value to return with
# reduction="none") or that delegate reduction to their parts.
WITHOUT_REDUCTION = {
    "vicreg",
    "barlow_twins",
    "decorrelation",
    "hybrid_vicreg",
    "combined",
    "multitask",
    "cosent",  # a ranking of every pair of pairs of the batch
    "angle",
    "matryoshka",  # its wrapped loss has the reduction
}


def _build(name: str, **overrides):
    cls = loss_info(name).cls
    kwargs = {**cls.example_kwargs(), **overrides}
    return cls(**kwargs)


def _inputs(name: str, dtype=torch.float32, seed=0, requires_grad=True, cast=None):
    args, kwargs = loss_info(name).cls.example_inputs(8, 16, dtype=dtype, seed=seed)
    leaves = []

    def prep(x):
        if isinstance(x, dict):
            return {k: prep(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(prep(v) for v in x)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and cast is not None:
            x = x.to(cast)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and requires_grad:
            x = x.detach().clone().requires_grad_(True)
            leaves.append(x)
        return x

    args = tuple(prep(a) for a in args)
    kwargs = {k: prep(v) for k, v in kwargs.items()}
    return args, kwargs, leaves


def _has(name: str, param: str) -> bool:
    return param in inspect.signature(loss_info(name).cls).parameters


def test_registry_is_populated():
    assert len(NAMES) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_is_baseloss_with_explicit_documented_constructor(name):
    cls = loss_info(name).cls
    assert issubclass(cls, BaseLoss)
    sig = inspect.signature(cls)
    for p in sig.parameters.values():
        assert p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL), f"{name}: {p} is a pass-through"
        assert p.annotation is not inspect.Parameter.empty, (
            f"{name}: argument {p.name} has no type annotation"
        )
    doc = inspect.getdoc(cls) or ""
    assert "Example" in doc and "Args" in doc, f"{name}: class docstring needs Args and an Example"
    for method in ("forward", "compute"):
        assert getattr(cls, method) is not getattr(BaseLoss, method), (
            f"{name} must define a typed {method}()"
        )
    assert cls.__name__ in embedloss.__all__, f"{cls.__name__} is not exported from embedloss"


@pytest.mark.parametrize("name", NAMES)
def test_scalar_loss_finite_gradients_and_terms(name):
    loss = _build(name)
    twin = copy.deepcopy(loss)  # stateful losses (queues) change on each call
    args, kwargs, leaves = _inputs(name)
    out = loss.compute(*args, **kwargs)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    for key, value in out.terms.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor), key
        assert value.shape == () and not value.requires_grad and torch.isfinite(value), key
    torch.testing.assert_close(twin(*args, **kwargs), out.loss)
    out.loss.backward()
    assert leaves, f"{name}: example inputs have no float tensors"
    assert any(x.grad is not None for x in leaves)
    for x in leaves:
        if x.grad is not None:
            assert torch.isfinite(x.grad).all()
    for p in loss.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_reductions(name):
    if not _has(name, "reduction"):
        assert name in WITHOUT_REDUCTION, f"{name} needs a reduction argument"
        return
    args, kwargs, _ = _inputs(name, torch.float64, requires_grad=False)
    per = _build(name, reduction="none")(*args, **kwargs)
    total = _build(name, reduction="sum")(*args, **kwargs)
    mean = _build(name, reduction="mean")(*args, **kwargs)
    assert per.dim() >= 1 and torch.isfinite(per).all()
    torch.testing.assert_close(per.sum(), total)
    assert mean.shape == () and torch.isfinite(mean)
    with pytest.raises(ValueError, match="reduction must be one of"):
        _build(name, reduction="average")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(name, dtype):
    loss = _build(name)
    args, kwargs, _ = _inputs(name, dtype, requires_grad=False)
    out = loss(*args, **kwargs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all()
    if dtype == torch.bfloat16:  # half inputs computed in float32: same as upcasting first
        up = tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
        kw = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()
        }
        torch.testing.assert_close(out, _build(name)(*up, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    torch.manual_seed(1)
    first = _build(name)
    args, kwargs, _ = _inputs(name, requires_grad=False)
    first.train()
    first(*args, **kwargs)  # let stateful losses (queues, EMAs) change their state
    first.update_step(5, 10)
    second = _build(name)
    second.load_state_dict(first.state_dict())
    for mod in (first, second):
        mod.eval()
    args2, kwargs2, _ = _inputs(name, seed=1, requires_grad=False)
    torch.testing.assert_close(first(*args2, **kwargs2), second(*args2, **kwargs2))


@pytest.mark.parametrize("name", NAMES)
def test_bad_first_argument_is_a_clear_error(name):
    args, kwargs, _ = _inputs(name, requires_grad=False)
    if not args or not isinstance(args[0], torch.Tensor):
        return
    loss = _build(name)
    with pytest.raises(TypeError, match="must be a"):
        loss([[0.0]], *args[1:], **kwargs)
    with pytest.raises(ValueError):
        loss(args[0][:0], *args[1:], **kwargs)


def _to_meta(x):
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, torch.Tensor):
        y = x.detach().to("meta")
        return y.requires_grad_(True) if y.is_floating_point() else y
    return x


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_compute_on_meta_device(name):
    # A CPU-testable proof that the step path reads no value back to the host: on the meta
    # device every tensor has a shape and dtype but no data, so `.item()`, `float(t)`,
    # `bool(t)` or a data-dependent shape raise.
    loss = _build(name).to("meta")
    loss.train()
    args, kwargs, _ = _inputs(name, requires_grad=False)
    args, kwargs = _to_meta(args), _to_meta(kwargs)
    out = loss(*args, **kwargs)
    assert out.device.type == "meta"
    out.sum().backward()
    output = loss.compute(*args, **kwargs)
    assert output.loss.device.type == "meta"
    assert all(t.device.type == "meta" for t in output.terms.values())


@pytest.mark.parametrize("name", [n for n in NAMES if _has(n, "gather_distributed")])
def test_gather_distributed_is_readable(name):
    # The call guard reads it to decide whether the ranks must agree first (and whether a rank
    # may hold an empty batch): a loss that keeps it inside an options object must expose it.
    assert _build(name, gather_distributed=True).gather_distributed is True
    assert _build(name).gather_distributed is False


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_compute_without_building_the_terms(name, monkeypatch):
    """``forward`` shares ``compute``'s signature and never builds terms; ``compute`` builds
    every term it returns through ``BaseLoss.output`` (so that ``forward`` can skip them)."""
    cls = loss_info(name).cls
    forward, compute = inspect.signature(cls.forward), inspect.signature(cls.compute)
    assert list(forward.parameters.values()) == list(compute.parameters.values()), name
    built = []
    output = BaseLoss.output

    def counting(self, loss, terms):
        return output(self, loss, lambda: built.append(type(self).__name__) or terms())

    monkeypatch.setattr(BaseLoss, "output", counting)
    loss = _build(name)
    args, kwargs, _ = _inputs(name)
    value = loss(*args, **kwargs)
    assert built == [], f"{name}: forward built the terms of {built}"
    out = loss.compute(*args, **kwargs)
    assert value.shape == out.loss.shape
    assert built or not out.terms, f"{name}: terms built outside BaseLoss.output"


def _tensor_paths(args, kwargs):
    """Where each non-scalar tensor input sits: ``(position or keyword, index in a list or None)``."""
    slots = [*enumerate(args), *kwargs.items()]
    return [
        (key, i if isinstance(value, (list, tuple)) else None)
        for key, value in slots
        for i, x in enumerate(value if isinstance(value, (list, tuple)) else [value])
        if isinstance(x, torch.Tensor) and x.dim() > 0
    ]


MIXABLE = [n for n in NAMES if len(_tensor_paths(*_inputs(n, requires_grad=False)[:2])) >= 2]


def test_most_losses_take_several_tensors():
    assert len(MIXABLE) >= 30, MIXABLE  # the device check below covers them


@pytest.mark.parametrize("name", MIXABLE)
def test_inputs_on_different_devices_are_a_clear_error(name):
    args, kwargs, _ = _inputs(name, requires_grad=False)
    key, index = _tensor_paths(args, kwargs)[-1]  # the last tensor input goes elsewhere
    holder = list(args) if isinstance(key, int) else kwargs
    if index is None:
        holder[key] = holder[key].to("meta")
    else:
        holder[key] = [x.to("meta") if i == index else x for i, x in enumerate(holder[key])]
    args = tuple(holder) if isinstance(key, int) else args
    loss = _build(name)
    for call in (loss, loss.compute):
        with pytest.raises(ValueError, match=r"must be on the device of \w+ \(cpu\), got .* meta"):
            call(*args, **kwargs)
