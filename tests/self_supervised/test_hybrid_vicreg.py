"""Hybrid contrastive→VICReg loss: phases, blend, adaptive trigger, checkpoint/resume."""

from __future__ import annotations

import math

import pytest
import torch

from embedloss import create_loss
from embedloss.composite import HybridVICRegLoss, hybrid_vicreg_loss
from embedloss.composite import hybrid_vicreg as hybrid_module
from embedloss.composite.hybrid_vicreg import PHASES
from embedloss.multimodal.clip import clip_loss
from embedloss.self_supervised import vicreg_loss
from embedloss.self_supervised.vicreg import vicreg_terms


def _views(n: int = 8, d: int = 6, seed: int = 0, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, b


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = an @ bn.T
    n = sim.shape[0]
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return float(sim.diagonal().mean() - off.mean())


def _fixed(**kw) -> HybridVICRegLoss:
    return HybridVICRegLoss(
        contrastive_steps=3, transition_steps=4, adaptive_transition=False, **kw
    )


def test_schedule_across_update_step() -> None:
    loss = _fixed(warmup_steps=2)
    table = []
    for step in range(9):
        loss.update_step(step, total_steps=None)
        table.append((loss.current_phase, loss.transition_progress, loss.warmup_factor))
    assert table == [
        ("contrastive", 0.0, 0.0),
        ("contrastive", 0.0, 0.0),
        ("contrastive", 0.0, 0.0),
        ("transition", 0.0, 0.0),
        ("transition", 0.25, 0.5),
        ("transition", 0.5, 1.0),
        ("transition", 0.75, 1.0),
        ("vicreg", 1.0, 1.0),
        ("vicreg", 1.0, 1.0),
    ]
    instant = HybridVICRegLoss(contrastive_steps=2, transition_steps=0, adaptive_transition=False)
    instant.update_step(1)
    assert instant.current_phase == "contrastive"
    instant.update_step(2)
    assert instant.current_phase == "vicreg"


def test_each_phase_computes_the_right_loss() -> None:
    a, b = _views()
    loss = _fixed(temperature=0.2, sim_coeff=2.0, var_coeff=3.0, cov_coeff=0.5).double()
    clip = clip_loss(a, b, temperature=0.2)
    vic = vicreg_loss(a, b, sim_coeff=2.0, var_coeff=3.0, cov_coeff=0.5)
    loss.update_step(0)
    assert torch.allclose(loss(a, b), clip, rtol=1e-12)
    loss.update_step(5)  # α = 0.5
    assert torch.allclose(loss(a, b), 0.5 * clip + 0.5 * vic, rtol=1e-12)
    loss.update_step(6)  # α = 0.75
    out = loss.compute(a, b)
    assert torch.allclose(out.loss, 0.25 * clip + 0.75 * vic, rtol=1e-12)
    assert float(out.terms["transition_progress"]) == 0.75
    assert float(out.terms["phase"]) == PHASES.index("transition")
    loss.update_step(100)
    assert torch.allclose(loss(a, b), vic, rtol=1e-12)
    assert torch.allclose(
        hybrid_vicreg_loss(
            a, b, progress=0.75, temperature=0.2, sim_coeff=2.0, var_coeff=3.0, cov_coeff=0.5
        ),
        0.25 * clip + 0.75 * vic,
        rtol=1e-12,
    )


def test_gradient_of_a_pure_phase_is_that_part_only() -> None:
    a, b = _views()
    loss = _fixed().double()
    x = a.clone().requires_grad_()
    loss(x, b).backward()
    y = a.clone().requires_grad_()
    clip_loss(y, b, temperature=0.07).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-12)
    loss.update_step(50)
    x.grad = None
    loss(x, b).backward()
    y.grad = None
    vicreg_loss(y, b).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-12)


def test_vicreg_warmup_counts_from_the_transition_start() -> None:
    a, b = _views()
    loss = _fixed(warmup_steps=4).double()
    loss.update_step(5)  # 2 steps after the start: f = 0.5, α = 0.5
    inv, var, cov = vicreg_terms(a, b)
    clip = clip_loss(a, b, temperature=0.07)
    expected = 0.5 * clip + 0.5 * (25 * inv + 0.5 * (25 * var + cov))
    assert torch.allclose(loss(a, b), expected, rtol=1e-12)


def test_terms_are_numeric_and_complete() -> None:
    a, b = _views()
    out = _fixed().compute(a, b)
    assert set(out.terms) == {
        "contrastive",
        "vicreg",
        "invariance",
        "variance",
        "covariance",
        "transition_progress",
        "warmup_factor",
        "alignment_gap",
        "phase",
        "temperature",
    }
    assert all(
        isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad
        for t in out.terms.values()
    )
    assert math.isclose(float(out.terms["alignment_gap"]), _gap(a, b), rel_tol=1e-6)
    assert math.isclose(float(out.terms["temperature"]), 0.07, rel_tol=1e-6)


def test_adaptive_transition_acts_on_the_recorded_gap_at_the_next_update_step() -> None:
    a, b = _views(noise=0.1)  # well-aligned pairs: large gap
    assert _gap(a, b) > 0.3
    loss = HybridVICRegLoss(contrastive_steps=100, transition_steps=10, min_alignment_gap=0.3)
    loss.update_step(4)
    loss(a, b)  # training mode: records the gap
    assert bool(loss.gap_recorded)
    assert math.isclose(float(loss.alignment_gap), _gap(a, b), rel_tol=1e-9)
    assert loss.current_phase == "contrastive"  # nothing changes until the next update_step
    loss.update_step(5)
    assert int(loss.transition_start) == 5
    assert loss.current_phase == "transition" and loss.transition_progress == 0.0
    loss.update_step(7)
    assert loss.transition_progress == pytest.approx(0.2)
    assert not bool(loss.gap_recorded)


def test_no_trigger_on_a_small_gap_in_eval_mode_or_when_not_adaptive() -> None:
    aligned = _views(noise=0.1)
    unaligned = _views(seed=1, noise=100.0)
    assert _gap(*unaligned) < 0.3
    loss = HybridVICRegLoss(contrastive_steps=100, transition_steps=10)
    loss(*unaligned)
    loss.update_step(1)
    assert loss.current_phase == "contrastive"
    loss.eval()
    loss(*aligned)  # eval mode: nothing recorded
    assert not bool(loss.gap_recorded)
    loss.update_step(2)
    assert loss.current_phase == "contrastive"
    fixed = HybridVICRegLoss(contrastive_steps=100, transition_steps=10, adaptive_transition=False)
    fixed(*aligned)
    fixed.update_step(1)
    assert fixed.current_phase == "contrastive" and int(fixed.transition_start) == 100


def test_state_dict_resume_reproduces_the_next_losses_exactly() -> None:
    batches = [_views(seed=s, noise=0.1 if s == 3 else 50.0) for s in range(8)]
    assert [_gap(*batch) > 0.3 for batch in batches[:4]] == [False, False, False, True]

    def make() -> HybridVICRegLoss:
        return HybridVICRegLoss(contrastive_steps=6, transition_steps=3, warmup_steps=2)

    original = make()
    for step in range(4):
        original.update_step(step)
        original(*batches[step])  # batch 3 is aligned: its gap is recorded, not yet acted on
    saved = {k: v.clone() for k, v in original.state_dict().items()}
    assert set(saved) == {
        "logit_scale",
        "step",
        "transition_start",
        "alignment_gap",
        "gap_recorded",
    }
    resumed = make()
    resumed.load_state_dict(saved)
    for step in range(4, 8):
        original.update_step(step)
        resumed.update_step(step)
        assert original.current_phase == resumed.current_phase
        assert torch.equal(original(*batches[step]), resumed(*batches[step]))
    assert int(resumed.transition_start) == 4  # the adaptive trigger survived the checkpoint
    assert resumed.current_phase == "vicreg"


def test_no_unbounded_history() -> None:
    a, b = _views()
    loss = HybridVICRegLoss(contrastive_steps=5, transition_steps=5)
    before = {k: v.shape for k, v in loss.state_dict().items()}
    attrs = set(vars(loss))
    for step in range(30):
        loss.update_step(step)
        loss(a, b)
    assert {k: v.shape for k, v in loss.state_dict().items()} == before
    assert set(vars(loss)) == attrs
    assert not any(
        isinstance(v, (list, dict)) and v for k, v in vars(loss).items() if not k.startswith("_")
    )


def test_gradcheck_in_the_transition() -> None:
    a, b = _views(5, 3)
    loss = _fixed(temperature=0.5, eps=0.01).double()
    loss.update_step(4)
    args = (a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y), args)


def test_labels_reach_the_contrastive_part_and_half_precision() -> None:
    a, b = _views()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = _fixed().double()
    assert torch.allclose(loss(a, b, labels), clip_loss(a, b, labels=labels), rtol=1e-12)
    out = _fixed()(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_registry_and_repr() -> None:
    loss = create_loss("hybrid_vicreg", contrastive_steps=10)
    assert isinstance(loss, HybridVICRegLoss)
    assert "phase='contrastive'" in repr(loss)


def test_bad_inputs_raise_clear_errors() -> None:
    a, b = _views()
    with pytest.raises(
        ValueError,
        match=r"z_a must have at least 2 samples \(rows\) to estimate a variance, got N=1",
    ):
        HybridVICRegLoss()(a[:1], b[:1])
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape"):
        HybridVICRegLoss()(a, b[:, :2])
    with pytest.raises(ValueError, match=r"contrastive_steps must be >= 0, got -1"):
        HybridVICRegLoss(contrastive_steps=-1)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        HybridVICRegLoss(temperature=0)
    with pytest.raises(ValueError, match=r"min_alignment_gap must be a finite number"):
        HybridVICRegLoss(min_alignment_gap=float("nan"))
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        HybridVICRegLoss().update_step(-1)
    with pytest.raises(
        ValueError, match=r"progress must be a finite number in \[0.0, 1.0\], got 1.5"
    ):
        hybrid_vicreg_loss(a, b, progress=1.5)


@pytest.mark.parametrize("step", [0, 4, 20])
def test_forward_is_the_loss_of_compute_and_runs_on_the_meta_device(step: int) -> None:
    a, b = _views()
    loss = _fixed(warmup_steps=2).double()
    loss.update_step(step)
    assert torch.equal(loss(a, b), loss.compute(a, b).loss)
    meta = _fixed(warmup_steps=2).to("meta")
    meta.update_step(step)
    x, y = a.to("meta").requires_grad_(), b.to("meta").requires_grad_()
    out = meta(x, y)
    out.backward()
    assert out.device.type == "meta" and x.grad is not None
    assert all(t.device.type == "meta" for t in meta.compute(x, y).terms.values())


def test_every_phase_needs_two_samples_and_forward_skips_the_part_weighted_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = _views()
    with pytest.raises(ValueError, match=r"z_a must have at least 2 samples"):
        hybrid_vicreg_loss(a[:1], b[:1], progress=0.0)
    calls = []
    original = hybrid_module.vicreg
    monkeypatch.setattr(hybrid_module, "vicreg", lambda *args: calls.append(1) or original(*args))
    loss = _fixed().double()  # α = 0
    loss(a, b)
    assert calls == []  # forward does not compute VICReg at weight 0
    loss.compute(a, b)
    assert calls == [1]  # compute reports its terms
