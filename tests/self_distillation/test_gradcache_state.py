"""Whole-batch state under the real ``GradCache``: DINO's centre and SwAV's codes.

``embedloss.gradcache.GradCache`` calls the loss once, on the full batch of cached embeddings,
so a step through it must leave DINO's centre (updated once, from the whole batch) and SwAV's
Sinkhorn codes (balanced over the whole batch) exactly as one plain full-batch step does, with
the same gradients. Gradient accumulation over the same micro-batches is another objective
(several centre updates, per-micro-batch codes), which the last checks show.
"""

from __future__ import annotations

import pytest
import torch

import embedloss.self_distillation.swav as swav_module
from embedloss import DINOLoss, SwAVLoss
from embedloss.gradcache import GradCache


def _encoder(k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, k)
    ).double()


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


def test_dino_centre_and_gradients_equal_one_full_batch_step():
    x = torch.randn(10, 4, 5, dtype=torch.float64)  # (N, V, input): 2 global + 2 local crops
    teacher_net = _encoder(7)
    with torch.no_grad():
        teacher = teacher_net(x[:, :2])  # (N, 2, K): the global crops only

    net = _encoder(7)
    full = DINOLoss(output_dim=7, center_momentum=0.8)
    out_full = full.compute(net(x), teacher)
    out_full.loss.backward()
    want = _grads(net)

    net = _encoder(7)
    cached = DINOLoss(output_dim=7, center_momentum=0.8)
    out = GradCache([net], cached, micro_batch_size=3).step(x, teacher_outputs=teacher)
    for got, expected in zip(_grads(net), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, out_full.loss.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(cached.center, full.center, rtol=1e-14, atol=1e-14)
    assert cached.center.abs().sum() > 0
    for key, value in out_full.terms.items():
        torch.testing.assert_close(out.terms[key], value, rtol=1e-12, atol=1e-12)
    # Accumulating the same micro-batches instead moves the centre once per micro-batch.
    accumulated = DINOLoss(output_dim=7, center_momentum=0.8)
    for part, t in zip(x.split(3), teacher.split(3), strict=True):
        accumulated(net(part), t).backward()
    assert not torch.allclose(accumulated.center, full.center)


def test_swav_codes_and_gradients_equal_one_full_batch_step(monkeypatch):
    codes: list[torch.Tensor] = []
    real = swav_module.sinkhorn_knopp

    def recorded(*args, **kwargs):
        codes.append(real(*args, **kwargs))
        return codes[-1]

    monkeypatch.setattr(swav_module, "sinkhorn_knopp", recorded)
    x = torch.randn(11, 4, 5, dtype=torch.float64)  # 2 high- and 2 low-resolution crops

    def loss(scores: torch.Tensor) -> torch.Tensor:
        return SwAVLoss().compute(scores[:, :2], scores[:, 2:]).loss

    net = _encoder(6)
    plain = loss(net(x))
    plain.backward()
    want, plain_codes = _grads(net), [c.clone() for c in codes]
    codes.clear()

    net = _encoder(6)
    value = GradCache([net], loss, micro_batch_size=4).step(x).loss
    assert len(codes) == len(plain_codes) == 2  # one Sinkhorn per high-resolution crop, once
    for got, expected in zip(codes, plain_codes, strict=True):
        assert got.shape == (11, 6)  # balanced over the whole batch
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    for got, expected in zip(_grads(net), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value, plain.detach(), rtol=1e-14, atol=1e-14)
    # Accumulation balances each micro-batch on its own: other codes.
    codes.clear()
    loss(net(x[:4]))
    assert codes[0].shape == (4, 6)
    assert not torch.allclose(codes[0], plain_codes[0][:4])


@pytest.mark.parametrize("micro", [1, 5, 10])
def test_any_micro_batch_size_gives_the_same_centre(micro):
    x = torch.randn(10, 3, 5, dtype=torch.float64)
    teacher = torch.randn(10, 2, 7, dtype=torch.float64)
    centres = []
    for size in (None, micro):
        net = _encoder(7)
        loss = DINOLoss(output_dim=7)
        if size is None:
            loss(net(x), teacher).backward()
        else:
            GradCache([net], loss, micro_batch_size=size).step(x, teacher_outputs=teacher)
        centres.append(loss.center)
    torch.testing.assert_close(centres[1], centres[0], rtol=1e-14, atol=1e-14)
