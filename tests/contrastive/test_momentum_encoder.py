import math

import pytest
import torch
from torch import nn

from embedloss import MoCoLoss
from embedloss.contrastive import MomentumEncoder


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def test_update_is_the_ema_of_parameters_and_float_buffers():
    online = _net()
    target = MomentumEncoder(online, momentum=0.9)
    before = {k: v.clone() for k, v in target.encoder.state_dict().items()}
    _perturb(online)
    online.train()
    online(torch.randn(8, 4))  # moves BatchNorm running statistics and num_batches_tracked
    target.update()
    for name, value in target.encoder.state_dict().items():
        source = online.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(
                value, 0.9 * before[name] + 0.1 * source, rtol=1e-6, atol=1e-6
            )
        else:
            assert torch.equal(value, source), name
    assert int(target.encoder[1].num_batches_tracked) == 1


def test_explicit_momentum_overrides_the_schedule():
    online = _net()
    target = MomentumEncoder(online, momentum=0.99)
    _perturb(online)
    target.update(momentum=1.0)  # keep
    assert not torch.equal(target.encoder[0].weight, online[0].weight)
    target.update(momentum=0.0)  # copy
    for a, b in zip(target.encoder.parameters(), online.parameters(), strict=True):
        assert torch.equal(a, b)


def test_frozen_and_eval_mode_safe():
    online = _net()
    target = MomentumEncoder(online)
    assert all(not p.requires_grad for p in target.parameters())
    target.train()
    assert all(not p.requires_grad for p in target.parameters())
    x = torch.randn(5, 4, requires_grad=True)
    assert not target(x).requires_grad
    target.eval()
    assert not target.encoder.training and not target.encoder[1].training
    stats = target.encoder[1].running_mean.clone()
    target(torch.randn(5, 4))  # eval: running statistics untouched
    assert torch.equal(target.encoder[1].running_mean, stats)
    _perturb(online)
    target.update()  # updating while in eval mode is fine and keeps the mode
    assert not target.encoder.training
    # the online module is referenced, not registered
    assert len(list(target.parameters())) == len(list(online.parameters()))
    assert all(k.startswith("encoder.") or k.endswith("momentum") for k in target.state_dict())


def test_cosine_schedule_and_state_dict():
    target = MomentumEncoder(_net(), momentum=0.99, schedule="cosine")
    target.update_step(0, 100)
    assert target.momentum == pytest.approx(0.99)
    target.update_step(50, 100)
    assert target.momentum == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    target.update_step(100, 100)
    assert target.momentum == pytest.approx(1.0)
    target.update_step(150, 100)  # past the end: stays at the final momentum
    assert target.momentum == pytest.approx(1.0)
    target.update_step(25, 100)
    resumed = MomentumEncoder(_net(), momentum=0.99, schedule="cosine")
    resumed.load_state_dict(target.state_dict())
    assert resumed.momentum == target.momentum
    constant = MomentumEncoder(_net(), momentum=0.9)
    constant.update_step(10, 20)
    assert constant.momentum == pytest.approx(0.9)


def test_drives_moco_training_step():
    encoder = nn.Linear(8, 4)
    keys = MomentumEncoder(encoder, momentum=0.5)
    loss_fn = MoCoLoss(queue_size=16, in_batch_negatives=True)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    for _ in range(3):
        loss = loss_fn(encoder(x), keys(x + 0.05 * torch.randn_like(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        keys.update()
    assert int(loss_fn.queue_count) == 12
    assert keys.encoder.weight.grad is None


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got function"):
        MomentumEncoder(lambda x: x)
    with pytest.raises(
        ValueError, match=r"momentum must be a finite number in \[0.0, 1.0\], got 1.5"
    ):
        MomentumEncoder(_net(), momentum=1.5)
    with pytest.raises(
        ValueError, match="schedule must be one of 'constant', 'cosine'; got 'linear'"
    ):
        MomentumEncoder(_net(), schedule="linear")
    target = MomentumEncoder(_net(), schedule="cosine")
    with pytest.raises(ValueError, match="cosine schedule needs total_steps"):
        target.update_step(3)
    with pytest.raises(ValueError, match="momentum must be a finite number"):
        target.update(momentum=-0.1)
    online = nn.Linear(3, 2)
    target = MomentumEncoder(online)
    online.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="online module's parameters no longer match"):
        target.update()
    assert "momentum=0.999" in repr(target)
