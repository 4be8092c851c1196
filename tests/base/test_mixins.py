import math

import pytest
import torch
from torch import nn

from embedloss import (
    HardNegativeMiningMixin,
    NormalizationMixin,
    ProjectionMixin,
    TemperatureScalingMixin,
)
from embedloss.ops.mining import HardNegativeMining


class Temp(TemperatureScalingMixin, nn.Module):
    def __init__(self, t, learnable=False):
        super().__init__()
        self._init_temperature(t, learnable)


class Norm(NormalizationMixin, nn.Module):
    def __init__(self, normalize=True):
        super().__init__()
        self._init_normalization(normalize)


class Proj(ProjectionMixin, nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self._init_projection(**kw)


class Miner(HardNegativeMiningMixin, nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self._init_hard_negative_mining(HardNegativeMining(**kw))


def test_temperature_fixed_is_exact_buffer_and_learnable_is_clamped_parameter():
    fixed = Temp(0.07)
    assert fixed.temperature == 0.07 and "logit_scale" in dict(fixed.named_buffers())
    assert not list(fixed.parameters())
    learn = Temp(0.07, learnable=True)
    assert isinstance(learn.logit_scale, nn.Parameter)
    assert learn.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        learn.logit_scale.fill_(10.0)
    assert learn.scale().item() == pytest.approx(100.0, rel=1e-5)
    assert Temp(1e-3).scale().item() == pytest.approx(1000.0, rel=1e-5)  # fixed τ is not clamped
    state = learn.state_dict()
    other = Temp(0.5, learnable=True)
    other.load_state_dict(state)
    assert other.temperature == learn.temperature


@pytest.mark.parametrize("bad", [0, -0.1, float("inf"), float("nan")])
def test_temperature_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Temp(bad)
    with pytest.raises(TypeError, match="temperature must be a number, got str"):
        Temp("0.1")


def test_normalization():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = Norm()(x) if False else Norm().normalize_embeddings(x)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert Norm(False).normalize_embeddings(x) is x
    assert Norm().normalize_embeddings(x.bfloat16()).dtype == torch.float32
    with pytest.raises(TypeError, match="normalize must be a bool"):
        Norm("yes")


def test_projection_heads():
    x = torch.randn(5, 8)
    assert Proj(input_dim=None).project(x) is x
    two = Proj(input_dim=8, output_dim=4)
    assert two.project(x).shape == (5, 4) and len(two.projection) == 3
    three = Proj(input_dim=8, output_dim=4, num_layers=3, hidden_dim=16)
    assert three.project(x).shape == (5, 4)
    assert any(isinstance(m, nn.BatchNorm1d) for m in three.projection)
    per = Proj(input_dim=8, output_dim=2, modalities=("vision", "text"))
    assert per.project(x, "text").shape == (5, 2)
    assert per.projection["vision"] is not per.projection["text"]
    with pytest.raises(
        ValueError, match=r"modality must be one of \['vision', 'text'\], got 'audio'"
    ):
        per.project(x, "audio")
    custom = nn.Linear(8, 3)
    assert Proj(input_dim=None, head=custom).projection is custom
    with pytest.raises(TypeError, match="projection head must be an nn.Module"):
        Proj(input_dim=8, head="mlp")
    with pytest.raises(ValueError, match="num_layers must be one of"):
        Proj(input_dim=8, num_layers=4)


def _loop_weights(sim, pos, strategy, factor=2.0, pct=0.5, margin=0.2, beta=1.0):
    n, m = sim.shape
    out = torch.zeros(n, m, dtype=sim.dtype)
    for i in range(n):
        negs = [j for j in range(m) if not pos[i, j]]
        if strategy == "beta":
            z = sum(math.exp(beta * sim[i, j].item()) for j in negs)
            for j in negs:
                out[i, j] = math.log(len(negs) * math.exp(beta * sim[i, j].item()) / z)
        elif strategy == "hard":
            thr = torch.quantile(sim[i, negs], pct).item()
            for j in negs:
                out[i, j] = math.log(factor) if sim[i, j] >= thr else 0.0
        elif strategy == "semi_hard":
            p = max(sim[i, j].item() for j in range(m) if pos[i, j])
            for j in negs:
                out[i, j] = math.log(factor) if p - margin < sim[i, j] < p else 0.0
    return out


@pytest.mark.parametrize("strategy", ["none", "hard", "semi_hard", "beta"])
def test_hard_negative_weights_match_loop(strategy):
    sim = torch.rand(5, 6, dtype=torch.float64) * 2 - 1
    pos = torch.eye(5, 6, dtype=torch.bool)
    miner = Miner(strategy=strategy, factor=2.0, percentile=0.5, margin=0.5, beta=3.0)
    got = miner.negative_log_weights(sim, pos)
    expected = _loop_weights(sim, pos, strategy, 2.0, 0.5, 0.5, 3.0)
    torch.testing.assert_close(got, expected)
    if strategy == "beta":  # mean importance weight over each row's negatives is 1
        torch.testing.assert_close(
            got.exp().masked_fill(pos, 0).sum(1) / 5, torch.ones(5, dtype=torch.float64)
        )


def test_hard_negative_bad_options():
    with pytest.raises(
        ValueError,
        match="strategy must be one of 'none', 'hard', 'semi_hard', 'beta'; got 'semi-hard'",
    ):
        Miner(strategy="semi-hard")
    with pytest.raises(
        ValueError, match=r"hard_negative_factor must be a finite number in \[1.0, inf\]"
    ):
        Miner(factor=0.5)
