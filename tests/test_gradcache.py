"""GradCache: float64 gradients equal full-batch backprop (single process).

The reference is the literal ``loss(*[enc(x) for enc, x in zip(encoders, inputs)]).backward()``
on deep copies of the same modules. With dropout the masks of a full-batch forward and of the
micro-batches are different draws, so the reference runs each encoder over the same
micro-batches *with* a graph from the same seed: the same masks, one graph for the whole batch,
one backward — the step gradient caching must reproduce.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import embedloss
from embedloss import GradCache, LossOutput

N, M = 10, 3  # batch, micro-batch: four micro-batches, the last one short
TOL = {"rtol": 1e-10, "atol": 1e-10}


def mlp(d_in: int = 7, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, 12), nn.GELU(), nn.Dropout(dropout), nn.Linear(12, 5)
    ).double()


def conv(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(dropout),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.GroupNorm(2, 6),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).double()


def data(kind: str, n: int = N, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 7) if kind == "mlp" else (n, 1, 6, 6)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def params(*modules: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for m in modules for p in m.parameters()]


def reference(encoders, loss, inputs, *, chunked=False, seed=0, **kwargs):
    """Plain backprop on copies of ``encoders`` and ``loss``; returns (copies, loss copy, output)."""
    cache = {}
    encoders = [cache.setdefault(id(e), copy.deepcopy(e)) for e in encoders]
    loss = copy.deepcopy(loss)
    torch.manual_seed(seed)
    if chunked:
        embeddings = [
            torch.cat([enc(c) for c in x.split(M)]) for enc, x in zip(encoders, inputs, strict=True)
        ]
    else:
        embeddings = [enc(x) for enc, x in zip(encoders, inputs, strict=True)]
    out = loss.compute(*embeddings, **kwargs)
    out.loss.backward()
    return encoders, loss, out


def cached_step(encoders, loss, inputs, *, seed=0, **kwargs):
    torch.manual_seed(seed)
    return GradCache(encoders, loss, micro_batch_size=M).step(*inputs, **kwargs)


def setup(config: str, kind: str, dropout: float):
    """(encoders, loss, inputs, loss kwargs) of one configuration."""
    make = mlp if kind == "mlp" else conv
    x = data(kind)
    if config == "shared":  # two views through one encoder
        enc = make(dropout=dropout)
        view = x + 0.1 * data(kind, seed=2)
        return [enc, enc], embedloss.SimCLRLoss(temperature=0.3), (x, view), {}
    if config == "pair":  # two encoders, learnable temperature
        loss = embedloss.CLIPLoss(learnable_temperature=True).double()
        return [make(dropout=dropout), mlp(dropout=dropout)], loss, (x, data("mlp", seed=3)), {}
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])  # one encoder, labels
    return [make(dropout=dropout)], embedloss.SupConLoss(temperature=0.2), (x,), {"labels": labels}


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("config", ["single", "shared", "pair"])
def test_gradients_equal_full_batch_backprop(config, kind, dropout):
    encoders, loss, inputs, kwargs = setup(config, kind, dropout)
    for e in encoders:
        e.train()
    ref_encoders, ref_loss, ref = reference(
        encoders, loss, inputs, chunked=dropout > 0, seed=5, **kwargs
    )
    out = cached_step(encoders, loss, inputs, seed=5, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss.detach(), **TOL)
    assert out.terms.keys() == ref.terms.keys()
    unique = list(dict.fromkeys(encoders))
    got, expected = params(*unique, loss), params(*dict.fromkeys(ref_encoders), ref_loss)
    assert len(got) == len(expected) > 0 and all(g is not None for g in got)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)
    if dropout:  # the masks matter: a different seed gives different gradients
        _, _, other = reference(encoders, loss, inputs, chunked=True, seed=6, **kwargs)
        assert not torch.allclose(other.loss, ref.loss)


def test_learnable_temperature_gets_its_gradient():
    encoders, loss, inputs, _ = setup("pair", "mlp", 0.0)
    _, ref_loss, _ = reference(encoders, loss, inputs)
    cached_step(encoders, loss, inputs)
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    torch.testing.assert_close(loss.logit_scale.grad, ref_loss.logit_scale.grad, **TOL)


def test_gradients_accumulate_like_backward():
    encoders, loss, inputs, _ = setup("pair", "mlp", 0.0)
    for p in encoders[0].parameters():
        p.grad = torch.ones_like(p)
    ref_encoders, _, _ = reference(encoders, loss, inputs)  # the copies start without .grad
    cached_step(encoders, loss, inputs)
    for g, e in zip(params(encoders[0]), params(ref_encoders[0]), strict=True):
        torch.testing.assert_close(g, e + 1, **TOL)


def test_rng_is_left_where_the_first_pass_and_the_loss_left_it():
    encoders, _, inputs, _ = setup("shared", "mlp", 0.5)
    simclr = embedloss.SimCLRLoss()

    def loss(za, zb):  # a loss that draws random numbers too
        return simclr(nn.functional.dropout(za, 0.2), zb)

    torch.manual_seed(3)
    ref = copy.deepcopy(encoders[0])
    loss(*[torch.cat([ref(c) for c in x.split(M)]) for x in inputs]).backward()
    expected = torch.get_rng_state()
    torch.manual_seed(3)
    GradCache(encoders, loss, micro_batch_size=M).step(*inputs)
    assert torch.equal(torch.get_rng_state(), expected)
    for g, e in zip(params(encoders[0]), params(ref), strict=True):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("micro_batch_size", [1, N, 4 * N])
def test_any_micro_batch_size(micro_batch_size):
    encoders, loss, inputs, _ = setup("pair", "conv", 0.2)
    ref = copy.deepcopy(encoders)
    torch.manual_seed(0)
    ref_emb = [
        torch.cat([e(c) for c in x.split(micro_batch_size)])
        for e, x in zip(ref, inputs, strict=True)
    ]
    copy.deepcopy(loss)(*ref_emb).backward()
    torch.manual_seed(0)
    GradCache(encoders, loss, micro_batch_size=micro_batch_size).step(*inputs)
    for g, e in zip(params(*encoders), params(*ref), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_moco_queue_updates_once_per_step():
    enc = mlp()
    loss = embedloss.MoCoLoss(queue_size=32, in_batch_negatives=True).double()
    ref_enc, ref_loss = copy.deepcopy(enc), copy.deepcopy(loss)
    cache = GradCache([enc, enc], loss, micro_batch_size=M)
    for step in range(3):
        x, y = data("mlp", seed=10 + step), data("mlp", seed=20 + step)
        ref_loss(ref_enc(x), ref_enc(y)).backward()
        cache.step(x, y)
        for name, buffer in ref_loss.state_dict().items():
            torch.testing.assert_close(loss.state_dict()[name], buffer, **TOL, msg=name)
        for g, e in zip(params(enc), params(ref_enc), strict=True):
            torch.testing.assert_close(g, e, **TOL)
    assert loss.state_dict()["queue"].shape[0] == 32


class Keyed(nn.Module):
    """An encoder taking several tensors: ``forward(x, scale)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x, scale):
        return self.net(x) * scale


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
def test_dict_and_tuple_inputs_are_split_along_the_batch(as_dict):
    enc, other = Keyed(), mlp()
    x, scale = data("mlp"), torch.rand(N, 1, dtype=torch.float64) + 0.5
    batch = {"x": x, "scale": scale} if as_dict else (x, scale)
    loss = embedloss.CLIPLoss(temperature=0.1)
    ref_enc, ref_other = copy.deepcopy(enc), copy.deepcopy(other)
    loss(ref_enc(x, scale), ref_other(data("mlp", seed=4))).backward()
    GradCache([enc, other], loss, micro_batch_size=M).step(batch, data("mlp", seed=4))
    for g, e in zip(params(enc, other), params(ref_enc, ref_other), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_any_callable_loss_and_inputs_of_different_sizes():
    a, b = mlp(), mlp()
    xa, xb = data("mlp", n=7), data("mlp", n=11, seed=2)

    def loss(za, zb, *, weight):
        return weight * torch.logsumexp(za @ zb.T, dim=1).mean()

    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    expected = loss(ra(xa), rb(xb), weight=0.5)
    expected.backward()
    out = GradCache(nn.ModuleList([a, b]), loss, micro_batch_size=4).step(xa, xb, weight=0.5)
    assert isinstance(out, LossOutput) and out.terms == {}
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    for g, e in zip(params(a, b), params(ra, rb), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_a_frozen_encoder_is_not_replayed():
    calls = []
    frozen, trained = mlp().requires_grad_(False), mlp()
    frozen.register_forward_hook(lambda *_: calls.append(1))
    loss = embedloss.CLIPLoss()
    ref = copy.deepcopy(trained)
    loss(ref(data("mlp")), frozen(data("mlp", seed=2))).backward()
    calls.clear()
    GradCache([trained, frozen], loss, micro_batch_size=M).step(data("mlp"), data("mlp", seed=2))
    assert len(calls) == 4  # the first pass only
    for g, e in zip(params(trained), params(ref), strict=True):
        torch.testing.assert_close(g, e, **TOL)
    assert all(g is None for g in params(frozen))


def bn_encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)).double()


def test_batch_norm_in_training_mode_raises_by_default():
    enc = bn_encoder()
    cache = GradCache([enc, enc], embedloss.SimCLRLoss(), micro_batch_size=M)
    with pytest.raises(
        ValueError,
        match=r"encoders\[0\] has BatchNorm layer\(s\) in training mode \(1: BatchNorm1d\).*allow_batch_norm=True",
    ):
        cache.step(data("mlp"), data("mlp", seed=2))
    assert all(p.grad is None for p in enc.parameters())
    enc.eval()  # running statistics: exact
    ref = copy.deepcopy(enc)
    embedloss.SimCLRLoss()(ref(data("mlp")), ref(data("mlp", seed=2))).backward()
    cache.step(data("mlp"), data("mlp", seed=2))
    for g, e in zip(params(enc), params(ref), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_allowed_batch_norm_warns_and_is_exact_ghost_batch_norm():
    # With per-micro-batch statistics the step equals backprop through the micro-batched
    # forward (with a graph), and each micro-batch updates the running statistics once.
    enc = bn_encoder()
    ref = copy.deepcopy(enc)
    loss = embedloss.SimCLRLoss()
    x, y = data("mlp"), data("mlp", seed=2)
    loss(
        torch.cat([ref(c) for c in x.split(4)]), torch.cat([ref(c) for c in y.split(4)])
    ).backward()
    cache = GradCache([enc, enc], loss, micro_batch_size=4, allow_batch_norm=True)
    with pytest.warns(UserWarning, match="per-micro-batch statistics"):
        cache.step(x, y)
    for g, e in zip(params(enc), params(ref), strict=True):
        torch.testing.assert_close(g, e, **TOL)
    for (name, got), expected in zip(
        enc.state_dict().items(), ref.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, **TOL, msg=name)
    assert enc[1].num_batches_tracked == 6  # 3 micro-batches x 2 views


def test_autocast_bfloat16_is_as_accurate_as_plain_autocast():
    # Under autocast the plain step sums the micro-batches' weight gradients in bfloat16 (one
    # cast weight, one backward), the cached step in float32 (one backward per micro-batch):
    # not bit-equal, so both are measured against the float32 step with the same dropout masks.
    enc_a, enc_b = mlp(dropout=0.2).float(), mlp(dropout=0.2).float()
    x, y = data("mlp").float(), data("mlp", seed=2).float()
    clip = embedloss.CLIPLoss(learnable_temperature=True)
    seen = []

    def run(mode: str) -> torch.Tensor:
        a, b, loss = copy.deepcopy(enc_a), copy.deepcopy(enc_b), copy.deepcopy(clip)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
            if mode == "cached":
                record = lambda za, zb: seen.append(za.dtype) or loss(za, zb)  # noqa: E731
                GradCache([a, b], record, micro_batch_size=M).step(x, y)
            else:
                za = torch.cat([a(c) for c in x.split(M)])
                loss(za, torch.cat([b(c) for c in y.split(M)])).backward()
        return torch.cat([g.flatten() for g in params(a, b, loss)])

    exact, plain, cached = run("float32"), run("plain"), run("cached")
    assert seen == [torch.bfloat16]
    plain_error = (plain - exact).norm() / exact.norm()
    cached_error = (cached - exact).norm() / exact.norm()
    assert 1e-4 < plain_error < 3e-2
    assert cached_error < 1.25 * plain_error


def test_grad_scaler_scales_the_cached_gradients():
    encoders, loss, inputs, _ = setup("pair", "mlp", 0.0)
    ref_encoders, ref_loss, _ = reference(encoders, loss, inputs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out = GradCache(encoders, loss, micro_batch_size=M, scaler=scaler).step(*inputs)
    ref_value = copy.deepcopy(loss)(
        *[copy.deepcopy(e)(x) for e, x in zip(encoders, inputs, strict=True)]
    )
    torch.testing.assert_close(out.loss, ref_value.detach(), **TOL)  # unscaled
    for g, e in zip(params(*encoders, loss), params(*ref_encoders, ref_loss), strict=True):
        torch.testing.assert_close(g, 1024.0 * e, **TOL)
    opt = torch.optim.SGD([p for m in (*encoders, loss) for p in m.parameters()], lr=0.1)
    scaler.unscale_(opt)
    for g, e in zip(params(*encoders, loss), params(*ref_encoders, ref_loss), strict=True):
        torch.testing.assert_close(g, e, **TOL)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_constructor_errors():
    loss = embedloss.SimCLRLoss()
    with pytest.raises(TypeError, match="got a single Linear: wrap it in a list"):
        GradCache(nn.Linear(2, 2), loss, micro_batch_size=2)
    with pytest.raises(TypeError, match="encoders must be a sequence of nn.Module"):
        GradCache([nn.Linear(2, 2), "text"], loss, micro_batch_size=2)
    with pytest.raises(ValueError, match="at least one module"):
        GradCache([], loss, micro_batch_size=2)
    with pytest.raises(TypeError, match="loss must be callable"):
        GradCache([nn.Linear(2, 2)], "clip", micro_batch_size=2)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        GradCache([nn.Linear(2, 2)], loss, micro_batch_size=0)
    with pytest.raises(TypeError, match="micro_batch_size must be an int"):
        GradCache([nn.Linear(2, 2)], loss, micro_batch_size=2.0)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        GradCache([nn.Linear(2, 2)], loss, micro_batch_size=2, scaler=1.0)
    with pytest.raises(TypeError, match="allow_batch_norm must be a bool"):
        GradCache([nn.Linear(2, 2)], loss, micro_batch_size=2, allow_batch_norm=1)


def test_step_errors_name_the_input():
    enc = nn.Linear(3, 2)
    cache = GradCache([enc, enc], embedloss.SimCLRLoss(), micro_batch_size=2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"step\(\) got 1 input\(s\) for 2 encoder\(s\)"):
        cache.step(x)
    with pytest.raises(ValueError, match=r"inputs\[1\] must hold a non-empty batch.*\(0, 3\)"):
        cache.step(x, torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"same number of rows.*\"inputs\[1\]\['a'\]\": \(4, 3\)"):
        cache.step(x, {"a": x, "b": torch.randn(3, 3)})
    with pytest.raises(TypeError, match=r"inputs\[1\]\[1\] must be a tensor with a batch dim"):
        cache.step(x, (x, 2))
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor with a batch dimension"):
        cache.step(torch.tensor(1.0), x)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor, or a dict / tuple"):
        cache.step("text", x)


def test_encoder_and_loss_outputs_are_checked():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"encoders\[0\] must return a floating-point"):
        GradCache([nn.Identity()], lambda z: z.sum(), micro_batch_size=2).step(x.long())
    cache = GradCache([nn.Linear(3, 2)], lambda z: z, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"loss must return a scalar.*got shape \(4, 2\)"):
        cache.step(x)
    cache = GradCache([nn.Linear(3, 2)], lambda z: (z.sum(),), micro_batch_size=2)
    with pytest.raises(TypeError, match="loss must return a tensor or a LossOutput"):
        cache.step(x)
    cache = GradCache([nn.Linear(3, 2)], lambda z: LossOutput(z.sum(), {}), micro_batch_size=2)
    assert cache.step(x).loss.ndim == 0


class Unsteady(nn.Module):
    """Returns one row fewer on its second call: not a function of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.calls = nn.Linear(3, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)[: -1 if self.calls > 1 else None]


def test_a_replay_that_differs_in_shape_raises():
    cache = GradCache([Unsteady()], lambda z: z.sum(), micro_batch_size=4)
    with pytest.raises(RuntimeError, match=r"shape \(3, 2\) on the re-run of micro-batch 0"):
        cache.step(torch.randn(4, 3))


def test_no_warning_without_batch_norm():
    encoders, loss, inputs, _ = setup("pair", "conv", 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_step(encoders, loss, inputs)
