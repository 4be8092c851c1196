import math
import warnings

import numpy as np
import pytest
import torch

from embedloss import DINOLoss, create_loss
from embedloss.functional import dino_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.self_distillation.gradcache_emulation import cached_step
from tests.self_distillation.lightly_reference import float64_default, load
from tests.self_distillation.oracles import (
    center_oracle,
    dino_oracle,
    teacher_temperature_oracle,
)


def _views(v_s=4, v_t=2, n=5, k=6, seed=0, scale=2.0):
    teacher = [scale * randn64(n, k, seed=seed + i, requires_grad=False) for i in range(v_t)]
    student = [randn64(n, k, seed=seed + 10 + i) for i in range(v_s)]
    return student, teacher


@pytest.mark.parametrize(("v_s", "v_t"), [(2, 2), (4, 2), (3, 1), (6, 2)])
def test_value_and_gradient_match_the_official_loss(v_s, v_t):
    student, teacher = _views(v_s, v_t)
    center = randn64(6, seed=99, requires_grad=False)
    fast = dino_loss(student, teacher, center=center, teacher_temperature=0.07)
    slow = dino_oracle(student, teacher, center.tolist(), 0.07, 0.1)
    # With one teacher view, student view 0 (the same crop) is never scored.
    assert_close_with_grads(fast, slow, tuple(student[1:] if v_t == 1 else student))


def test_views_as_one_tensor_equal_views_as_a_sequence():
    student, teacher = _views()
    seq = dino_loss(student, teacher, reduction="none")
    stacked = dino_loss(torch.stack(student, 1), torch.stack(teacher, 1), reduction="none")
    assert_close_with_grads(stacked.sum(), seq.sum(), tuple(student))
    torch.testing.assert_close(stacked, seq, rtol=0, atol=0)


def test_closed_form_uniform_teacher_and_student_is_log_k():
    k = 7
    loss = dino_loss([torch.zeros(3, k)] * 4, [torch.randn(3, 1).expand(3, k)] * 2)
    torch.testing.assert_close(loss, torch.tensor(math.log(k)))


def test_teacher_carries_no_gradient():
    student, teacher = _views()
    teacher = [t.clone().requires_grad_(True) for t in teacher]
    dino_loss(student, teacher).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)


def test_reductions_are_per_sample_means_over_the_pairs():
    student, teacher = _views()
    per = dino_loss(student, teacher, reduction="none")
    assert per.shape == (5,)
    torch.testing.assert_close(dino_loss(student, teacher), per.mean())
    torch.testing.assert_close(dino_loss(student, teacher, reduction="sum"), per.sum())
    one = dino_oracle([s[2:3] for s in student], [t[2:3] for t in teacher], [0.0] * 6, 0.04, 0.1)
    torch.testing.assert_close(per[2], one)


def test_training_sequence_matches_the_official_loss_and_centre_update():
    loss_fn = DINOLoss(output_dim=6, center_momentum=0.8, teacher_temperature=0.05)
    center = [0.0] * 6
    for step in range(4):
        student, teacher = _views(seed=10 * step)
        got = loss_fn(student, teacher)
        want = dino_oracle(student, teacher, center, 0.05, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        center = center_oracle(center, [r for t in teacher for r in t], 0.8)
        torch.testing.assert_close(loss_fn.center, torch.tensor(center, dtype=torch.float64))


def test_centre_updates_only_in_training_mode_and_after_the_loss():
    student, teacher = _views()
    loss_fn = DINOLoss(output_dim=6).eval()
    loss_fn(student, teacher)
    assert not loss_fn.center.any()
    loss_fn.train()
    first = loss_fn(student, teacher)  # scored with the zero centre, then updated
    torch.testing.assert_close(first, dino_loss(student, teacher))
    assert loss_fn.center.any()


def test_teacher_temperature_warm_up_follows_the_official_linspace():
    loss_fn = DINOLoss(
        output_dim=4, warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_epochs=5
    )
    schedule = np.linspace(0.04, 0.07, 5)
    for epoch in range(8):
        loss_fn.update_epoch(epoch)
        want = float(schedule[epoch]) if epoch < 5 else 0.07
        assert loss_fn.current_teacher_temperature == pytest.approx(want, abs=1e-15)
        assert want == pytest.approx(teacher_temperature_oracle(epoch, 0.04, 0.07, 5))
    one = DINOLoss(output_dim=4, warmup_teacher_temperature=0.02, warmup_epochs=1)
    assert one.current_teacher_temperature == 0.02
    one.update_epoch(1)
    assert one.current_teacher_temperature == 0.04
    assert DINOLoss(output_dim=4, warmup_epochs=3).current_teacher_temperature == 0.04


def test_warm_up_temperature_is_used_in_the_loss_and_reported():
    student, teacher = _views()
    loss_fn = DINOLoss(output_dim=6, warmup_teacher_temperature=0.02, warmup_epochs=3).eval()
    loss_fn.update_epoch(1)
    out = loss_fn.compute(student, teacher)
    torch.testing.assert_close(out.loss, dino_loss(student, teacher, teacher_temperature=0.03))
    assert out.terms["teacher_temperature"].item() == pytest.approx(0.03)


def test_state_dict_round_trip_is_bit_exact_and_resumes():
    loss_fn = DINOLoss(output_dim=6, warmup_teacher_temperature=0.02, warmup_epochs=4)
    loss_fn.update_epoch(2)
    for step in range(2):
        loss_fn(*_views(seed=step))
    resumed = DINOLoss(output_dim=6, warmup_teacher_temperature=0.02, warmup_epochs=4)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.center, loss_fn.center) and resumed.center.dtype == torch.float64
    assert resumed.current_teacher_temperature == loss_fn.current_teacher_temperature
    for step in range(2, 4):
        views = _views(seed=step)
        assert torch.equal(resumed(*views), loss_fn(*views))
    assert torch.equal(resumed.center, loss_fn.center)


def test_terms_are_collapse_monitors():
    student, teacher = _views()
    center = torch.randn(6, dtype=torch.float64)
    loss_fn = DINOLoss(output_dim=6).eval()
    loss_fn.center.copy_(center)
    out = loss_fn.compute(student, teacher)
    p = torch.softmax((torch.stack(teacher) - center) / 0.04, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(out.terms["teacher_entropy"], entropy.float())
    torch.testing.assert_close(out.terms["kl"], (out.loss - entropy).float())
    torch.testing.assert_close(out.terms["center_norm"], center.norm().float())
    assert out.terms["kl"] >= 0


def test_collapsed_uniform_teacher_has_entropy_log_k():
    loss_fn = DINOLoss(output_dim=8).eval()
    out = loss_fn.compute([torch.randn(4, 8)] * 3, [torch.ones(4, 8)] * 2)
    torch.testing.assert_close(out.terms["teacher_entropy"], torch.tensor(math.log(8)))


def test_finite_at_small_temperatures_and_large_outputs():
    student = [(1e4 * torch.randn(6, 32)).requires_grad_() for _ in range(3)]
    teacher = [1e4 * torch.randn(6, 32) for _ in range(2)]
    loss = dino_loss(student, teacher, teacher_temperature=1e-3, student_temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s.grad).all() for s in student)


def test_half_precision_is_computed_in_float32():
    student, teacher = _views()
    half = DINOLoss(output_dim=6)(
        [s.detach().bfloat16() for s in student], [t.bfloat16() for t in teacher]
    )
    assert half.dtype == torch.float32


def test_gradcheck():
    student, teacher = _views(3, 2, n=3, k=4)
    center = torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *s: dino_loss(list(s), teacher, center=center, teacher_temperature=0.3), student
    )


def test_lightly_parity_over_a_training_run_with_warm_up():
    # lightly's DINOLoss(output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
    # student_temp, center_momentum) takes (teacher_out, student_out, epoch=...) — teacher
    # first — sums the same (t, s≠t) pairs (its einsum's diagonal is zeroed) over n_terms·batch,
    # and updates its (1, 1, K) centre with the mean over views and batch after the loss: the same
    # conventions, so losses and centres agree step by step.
    # lightly builds τ_t as float32 tensors (torch.linspace, torch.tensor): under a float64
    # default dtype they are float64, and the comparison is exact.
    with float64_default():
        reference = load("loss.dino_loss").DINOLoss(
            output_dim=6,
            warmup_teacher_temp=0.02,
            teacher_temp=0.06,
            warmup_teacher_temp_epochs=3,
            student_temp=0.1,
            center_momentum=0.85,
        )
    loss_fn = DINOLoss(
        output_dim=6,
        teacher_temperature=0.06,
        warmup_teacher_temperature=0.02,
        warmup_epochs=3,
        center_momentum=0.85,
    )
    for epoch in range(5):
        loss_fn.update_epoch(epoch)
        student, teacher = _views(v_s=5, seed=epoch)
        with warnings.catch_warnings(), float64_default():
            warnings.simplefilter("ignore", DeprecationWarning)  # the epoch argument
            want = reference(teacher, student, epoch=epoch)
        got = loss_fn(student, teacher)
        assert_close_with_grads(got, want, tuple(student))
        torch.testing.assert_close(loss_fn.center, reference.center.reshape(-1))


def test_gradient_caching_sees_the_full_batch_and_updates_the_centre_once():
    # Under gradient caching the loss is called once on the full batch: the student's
    # gradients and the centre equal those of one full-batch step.
    torch.manual_seed(0)
    student_net, teacher_net = torch.nn.Linear(3, 6).double(), torch.nn.Linear(3, 6).double()
    x = torch.randn(8, 4, 3, dtype=torch.float64)  # (N, V, input): 4 crops per sample

    def teacher(inp):
        with torch.no_grad():
            return teacher_net(inp[:, :2])  # (n, 2, K): the global crops only

    full = DINOLoss(output_dim=6)
    full(student_net(x), teacher(x)).backward()
    want = [p.grad.clone() for p in student_net.parameters()]
    student_net.zero_grad()
    cached = DINOLoss(output_dim=6)
    value = cached_step([student_net, teacher], cached, [x, x], micro_batch_size=3)
    got = [p.grad for p in student_net.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached.center, full.center, rtol=1e-14, atol=1e-14)
    assert torch.isfinite(value)


def test_gradient_accumulation_updates_the_centre_per_micro_batch():
    # Documented behaviour: k calls move the centre k times, from the micro-batch means.
    student, teacher = _views(n=6)
    loss_fn = DINOLoss(output_dim=6, center_momentum=0.5)
    center = [0.0] * 6
    for part in range(2):
        rows = slice(3 * part, 3 * part + 3)
        loss_fn([s[rows] for s in student], [t[rows] for t in teacher])
        center = center_oracle(center, [r for t in teacher for r in t[rows]], 0.5)
    torch.testing.assert_close(loss_fn.center, torch.tensor(center, dtype=torch.float64))


def test_registry_and_functional_agree():
    student, teacher = _views()
    loss_fn = create_loss("dino", output_dim=6, teacher_temperature=0.05).eval()
    torch.testing.assert_close(
        loss_fn(student, teacher), dino_loss(student, teacher, teacher_temperature=0.05)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_dim": 0}, ValueError, "output_dim must be >= 1"),
        ({"output_dim": 4.0}, TypeError, "output_dim must be an int"),
        ({"output_dim": 4, "teacher_temperature": 0.0}, ValueError, "teacher_temperature"),
        ({"output_dim": 4, "student_temperature": -1.0}, ValueError, "student_temperature"),
        ({"output_dim": 4, "center_momentum": 1.5}, ValueError, r"center_momentum .*\[0.0, 1.0\]"),
        ({"output_dim": 4, "warmup_epochs": -1}, ValueError, "warmup_epochs must be >= 0"),
        ({"output_dim": 4, "warmup_teacher_temperature": 0.0}, ValueError, "warmup_teacher"),
        ({"output_dim": 4, "reduction": "avg"}, ValueError, "reduction must be one of"),
        (
            {"output_dim": 4, "gather_distributed": 1},
            TypeError,
            "gather_distributed must be a bool",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DINOLoss(**kwargs)


def test_bad_inputs_are_clear_errors():
    loss_fn = DINOLoss(output_dim=6)
    student, teacher = _views()
    with pytest.raises(ValueError, match=r"K=5 outputs per view \(output_dim\), got 6"):
        DINOLoss(output_dim=5)(student, teacher)
    with pytest.raises(ValueError, match="V_s >= V_t and V_s >= 2"):
        loss_fn(student[:1], teacher)
    with pytest.raises(ValueError, match="V_s >= V_t and V_s >= 2"):
        loss_fn(student[:1], teacher[:1])
    with pytest.raises(ValueError, match="same N samples"):
        loss_fn(student, [t[:3] for t in teacher])
    with pytest.raises(ValueError, match=r"must have the shape of student_outputs\[0\]"):
        loss_fn([student[0], student[1][:, :3]], teacher)
    with pytest.raises(ValueError, match="at least one view"):
        loss_fn([], teacher)
    with pytest.raises(TypeError, match=r"student_outputs\[1\] must be a torch.Tensor"):
        loss_fn([student[0], "x"], teacher)
    with pytest.raises(TypeError, match="sequence of \\(N, K\\) tensors or an \\(N, V, K\\)"):
        loss_fn(3.0, teacher)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loss_fn.update_epoch(-1)
    with pytest.raises(ValueError, match="center must have shape"):
        dino_loss(student, teacher, center=torch.zeros(2, 6))
