"""Numerical robustness of every loss: label dtypes, the scale of the inputs, half precision.

A loss gives the same value for inputs that mean the same thing (bool and integer labels,
embeddings scaled by a constant when the loss normalises them), and finite inputs never give a
NaN or a non-finite gradient: a value the loss cannot represent is a clear error instead.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from embedloss import list_losses, loss_info
from embedloss.ops.similarity import l2_normalize
from embedloss.ops.statistics import center, correlation, covariance, moments, standardize
from embedloss.self_supervised import barlow_twins_loss, decorrelation_loss


def _label_argument(name: str) -> str | None:
    """The forward argument holding ``(N,)`` class labels, if the loss takes one."""
    cls = loss_info(name).cls
    params = list(inspect.signature(cls.forward).parameters)[1:]  # after self
    args, kwargs = cls.example_inputs(8, 16)
    for key in ("labels", "targets"):
        if key in params:
            i = params.index(key)
            given = args[i] if i < len(args) else kwargs.get(key)
            return key if given is None or isinstance(given, torch.Tensor) else None
    return None


def _tilings(name: str) -> list[int | None]:
    return [None, 4] if "chunk_size" in loss_info(name).signature.parameters else [None]


@pytest.mark.parametrize(
    ("name", "chunk_size"),
    [(n, c) for n in list_losses() if _label_argument(n) for c in _tilings(n)],
)
def test_bool_labels_mean_the_same_as_integer_labels(name, chunk_size):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16, dtype=torch.float64)
    key = _label_argument(name)
    position = list(inspect.signature(cls.forward).parameters).index(key) - 1  # after self
    options = cls.example_kwargs() | ({} if chunk_size is None else {"chunk_size": chunk_size})
    loss = cls(**options)

    def call(labels):
        call_args, call_kwargs = list(args), dict(kwargs)
        if position < len(call_args):
            call_args[position] = labels
        else:
            call_kwargs[key] = labels
        torch.manual_seed(0)
        return copy.deepcopy(loss)(*call_args, **call_kwargs)

    flags = torch.tensor([True, False, False, True] * 2)
    expected = call(flags.long())
    for dtype in (torch.bool, torch.uint8, torch.int32):
        torch.testing.assert_close(call(flags.to(dtype)), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=f"{key} must be an integer or bool tensor of a dtype"):
        call(flags.to(torch.uint16))  # sorting and comparing it is missing from torch


# --- the scale of the embeddings ---------------------------------------------------------------


def _map_embeddings(x, f):
    """``f`` applied to every floating-point tensor of at least 2 dimensions (the embeddings)."""
    if isinstance(x, dict):
        return {k: _map_embeddings(v, f) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map_embeddings(v, f) for v in x)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
        return f(x)
    return x


def _leaves(x):
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x] if isinstance(x, torch.Tensor) and x.requires_grad else []


def _run(name, f):
    """The loss of the example inputs with ``f`` applied to the embeddings, and their gradients."""
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16, dtype=torch.float64)
    args, kwargs = _map_embeddings((args, kwargs), lambda x: f(x).detach().requires_grad_())
    torch.manual_seed(0)
    loss = cls(**cls.example_kwargs())(*args, **kwargs)
    loss.sum().backward()
    return loss.detach(), [x.grad for x in _leaves((args, kwargs)) if x.grad is not None]


def _scale_invariant(name: str) -> bool:
    """Whether the loss (in float64) ignores the scale of its embeddings at ordinary scales."""
    small, large = _run(name, lambda x: x / 8)[0], _run(name, lambda x: x * 8)[0]
    return bool(torch.allclose(small, large, rtol=1e-12, atol=1e-12))


SCALE_INVARIANT = [n for n in list_losses() if _scale_invariant(n)]


def test_the_normalised_losses_are_recognised_as_scale_invariant():
    assert {"simclr", "clip", "cosent", "angle", "arcface", "koleo"} <= set(SCALE_INVARIANT)


@pytest.mark.parametrize("scale", [1e19, 1e-20], ids=["norms_overflow", "squares_underflow"])
@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_a_scale_invariant_loss_ignores_extreme_scales_in_float32(name, scale):
    expected, _ = _run(name, lambda x: x.float())
    loss, grads = _run(name, lambda x: (x * scale).float())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_losses())
def test_zero_half_precision_embeddings_give_finite_gradients(name):
    loss, grads = _run(name, lambda x: torch.zeros_like(x, dtype=torch.float16))
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_l2_normalize_is_exact_at_ordinary_scales_safe_at_any_other_and_twice_differentiable():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    for dim in (0, 1):
        ours = x.clone().requires_grad_()
        theirs = x.clone().requires_grad_()
        (l2_normalize(ours, dim=dim) * g).sum().backward()
        (F.normalize(theirs, dim=dim) * g).sum().backward()
        assert torch.equal(l2_normalize(x, dim=dim), F.normalize(x, dim=dim))
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-14, atol=1e-15)
        y = x.clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda t, d=dim: l2_normalize(t, dim=d), (y,))
    for scale in (1e-300, 1e-20, 1e20, 1e300):
        y = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, s=scale: l2_normalize(t * s), (y,))
    unit = F.normalize(x, dim=1).float()
    for scale in (1e-37, 1e-20, 1e19, 1e37):  # float32: squares under- or overflow
        torch.testing.assert_close(l2_normalize((x * scale).float()), unit)
    zero = torch.zeros(2, 5, dtype=torch.float16, requires_grad=True)
    out = l2_normalize(zero)
    assert out.dtype == torch.float32 and (out == 0).all()
    out.backward(torch.ones_like(out))
    assert torch.equal(zero.grad, torch.ones_like(zero))  # the upstream gradient, not 1/eps


@pytest.mark.parametrize("scale", [1e19, 1e-20], ids=["variances_overflow", "squares_underflow"])
@pytest.mark.parametrize("loss", [barlow_twins_loss, decorrelation_loss], ids=lambda f: f.__name__)
def test_correlation_losses_at_extreme_scales_are_the_loss_with_a_rescaled_eps(loss, scale):
    # For x·s the standardised values with ε are those of x with ε/s²: exactly, so float32 at
    # an extreme scale must match float64 at scale 1.
    torch.manual_seed(0)
    z_a, z_b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    views = (z_a,) if loss is decorrelation_loss else (z_a, z_b)
    eps = 1e-5
    expected = loss(*views, eps=eps / scale**2)
    scaled = [(v * scale).float().requires_grad_() for v in views]
    got = loss(*scaled, eps=eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(torch.isfinite(v.grad).all() for v in scaled)


def test_correlation_and_standardize_are_exact_at_ordinary_scales():
    # The powers of two cancel exactly: the very values of the unscaled formulas.
    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)
    cov = covariance(x)
    inv_std = (cov.diagonal() + 1e-3).rsqrt()
    expected = cov * inv_std.unsqueeze(1) * inv_std.unsqueeze(0)
    assert torch.equal(correlation(x, eps=1e-3), expected)
    assert torch.equal(moments(x).covariance, cov)
    xc = center(x)
    var = (xc * xc).sum(0) / 9
    assert torch.equal(standardize(x, eps=1e-3), xc * (var + 1e-3).rsqrt())


# --- options -----------------------------------------------------------------------------------


def _float_options(name: str) -> list[str]:
    params = loss_info(name).signature.parameters.values()
    return [p.name for p in params if type(p.default) is float]


@pytest.mark.parametrize(
    ("name", "option"), [(n, o) for n in list_losses() for o in _float_options(n)]
)
def test_a_float_option_float32_cannot_hold_is_refused_at_construction(name, option):
    cls = loss_info(name).cls
    with pytest.raises(ValueError, match=f"^{option} must"):
        cls(**(cls.example_kwargs() | {option: 1e300}))
