import pytest
import torch
import torch.nn.functional as F

import embedloss
from embedloss.supervised.mse import MSELoss, mse_loss

TOL = {"rtol": 1e-12, "atol": 1e-12}
F64 = torch.float64


def _batch(shape=(5, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)


def _loop(x, y, s):
    """Σ_i s_i·mean_k (x_ik − y_ik)² / Σ_i s_i, from the definition."""
    num, den = torch.zeros((), dtype=F64), 0.0
    for i in range(x.shape[0]):
        diffs = (x[i] - y[i]).flatten()
        num = num + s[i] * sum(d * d for d in diffs) / diffs.numel()
        den += float(s[i])
    return num / den


@pytest.mark.parametrize("shape", [(6,), (5, 3), (4, 3, 2)])
def test_unweighted_mean_equals_f_mse_loss(shape):
    x, y = _batch(shape)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, theirs = mse_loss(a, y), F.mse_loss(b, y)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    k = x[0].numel()
    torch.testing.assert_close(
        mse_loss(x, y, reduction="sum"), F.mse_loss(x, y, reduction="sum") / k, **TOL
    )
    per_sample = F.mse_loss(x, y, reduction="none").reshape(x.shape[0], -1).mean(1)
    torch.testing.assert_close(mse_loss(x, y, reduction="none"), per_sample, **TOL)


def test_weighted_mean_matches_loop_and_repetition():
    x, y = _batch()
    s = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0], dtype=F64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, expected = mse_loss(a, y, sample_weight=s), _loop(b, y, s)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    repeat = torch.repeat_interleave(torch.arange(5), s.long())
    torch.testing.assert_close(ours, F.mse_loss(x[repeat], y[repeat]), **TOL)
    none = mse_loss(x, y, sample_weight=s, reduction="none")
    torch.testing.assert_close(mse_loss(x, y, sample_weight=s, reduction="sum"), none.sum(), **TOL)


def test_zero_weights_give_zero_and_gradcheck():
    x, y = _batch((3, 2), seed=1)
    x.requires_grad_(True)
    loss = mse_loss(x, y, sample_weight=torch.zeros(3, dtype=F64))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
    s = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b: mse_loss(a, b, sample_weight=s),
        (x.detach().requires_grad_(True), y.requires_grad_(True)),
    )


def test_identical_inputs_zero_and_module_terms():
    x, _ = _batch((4, 3), seed=2)
    loss = MSELoss()
    out = loss.compute(x, x.clone())
    assert out.loss.item() == 0.0 and out.terms["rmse"].item() == 0.0
    y = x + 2.0
    assert loss.compute(x, y).terms["rmse"].item() == pytest.approx(2.0)
    assert loss(x.bfloat16(), y.bfloat16()).dtype == torch.float32
    assert type(embedloss.create_loss("mse", reduction="sum")) is MSELoss
    assert embedloss.functional.mse_loss is mse_loss


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, y: mse_loss(x, y[:2]), ValueError, "input and target must have the same shape"),
        (lambda x, y: mse_loss(x.long(), y), TypeError, "input must be a floating-point tensor"),
        (lambda x, y: mse_loss(x, y.tolist()), TypeError, "target must be a torch.Tensor"),
        (lambda x, y: mse_loss(x[0, 0, 0], y), ValueError, r"input must have shape \(N, \*\)"),
        (
            lambda x, y: mse_loss(x, y, sample_weight=torch.ones(5, 1)),
            ValueError,
            r"sample_weight must have shape \(5,\)",
        ),
        (lambda x, y: mse_loss(x, y, reduction="max"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_input(call, error, match):
    x, y = _batch()
    with pytest.raises(error, match=match):
        call(x, y)
