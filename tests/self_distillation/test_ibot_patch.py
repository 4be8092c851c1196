import math

import pytest
import torch

from embedloss import IBOTPatchLoss, create_loss
from embedloss.functional import ibot_patch_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.self_distillation.lightly_reference import float64_default, load
from tests.self_distillation.oracles import center_oracle, ibot_oracle


def _patches(n=4, p=6, k=5, seed=0):
    student = randn64(n, p, k, seed=seed)
    teacher = 2 * randn64(n, p, k, seed=seed + 1, requires_grad=False)
    mask = torch.rand(n, p, generator=torch.Generator().manual_seed(seed + 2)) < 0.5
    mask[0] = False  # an image with nothing masked
    mask[1, 0] = True
    return student, teacher, mask


def _masked_rows(teacher, mask):
    return [teacher[b, i] for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]


def test_value_and_gradient_match_dinov2():
    student, teacher, mask = _patches()
    center = randn64(5, seed=7, requires_grad=False)
    fast = ibot_patch_loss(student, teacher, mask, center=center, teacher_temperature=0.07)
    slow = ibot_oracle(student, teacher, mask, center.tolist(), 0.07, 0.1)
    assert_close_with_grads(fast, slow, (student,))


def test_closed_form_uniform_outputs():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    loss = ibot_patch_loss(torch.zeros(3, 3, 4), torch.zeros(3, 3, 4), mask)
    # two images score log K, the unmasked one counts 0 in the mean over 3 images
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(4) / 3))


def test_unmasked_patches_get_no_gradient_and_do_not_matter():
    student, teacher, mask = _patches()
    loss = ibot_patch_loss(student, teacher, mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert not grad[~mask].any() and grad[mask].abs().sum() > 0
    noisy = teacher.clone()
    noisy[~mask] = float("nan")  # garbage outside the mask changes nothing, not even to NaN
    other = student.detach().clone()
    other[~mask] = 1e6
    torch.testing.assert_close(ibot_patch_loss(other, noisy, mask), loss.detach())
    out = IBOTPatchLoss(output_dim=5).compute(other, noisy, mask)
    assert all(torch.isfinite(t) for t in out.terms.values())


def test_teacher_carries_no_gradient():
    student, teacher, mask = _patches()
    teacher.requires_grad_(True)
    ibot_patch_loss(student, teacher, mask).backward()
    assert teacher.grad is None


def test_reduction_none_is_per_image():
    student, teacher, mask = _patches()
    per = ibot_patch_loss(student, teacher, mask, reduction="none")
    assert per.shape == (4,) and per[0] == 0
    torch.testing.assert_close(per.mean(), ibot_patch_loss(student, teacher, mask))
    torch.testing.assert_close(per.sum(), ibot_patch_loss(student, teacher, mask, reduction="sum"))


def test_training_sequence_matches_dinov2_with_its_own_centre():
    loss_fn = IBOTPatchLoss(output_dim=5, center_momentum=0.7)
    center = [0.0] * 5
    for step in range(3):
        student, teacher, mask = _patches(seed=10 * step)
        got = loss_fn(student, teacher, mask)
        torch.testing.assert_close(got, ibot_oracle(student, teacher, mask, center, 0.04, 0.1))
        center = center_oracle(center, _masked_rows(teacher, mask), 0.7)
        torch.testing.assert_close(loss_fn.center, torch.tensor(center, dtype=torch.float64))


def test_nothing_masked_leaves_the_centre_unchanged():
    loss_fn = IBOTPatchLoss(output_dim=5)
    loss_fn.center.fill_(0.5)
    student, teacher, _ = _patches()
    loss = loss_fn(student, teacher, torch.zeros(4, 6, dtype=torch.bool))
    assert loss == 0 and torch.equal(loss_fn.center, torch.full((5,), 0.5, dtype=torch.float64))


def test_eval_mode_keeps_the_centre_and_state_dict_round_trips():
    loss_fn = IBOTPatchLoss(output_dim=5)
    loss_fn(*_patches())
    resumed = IBOTPatchLoss(output_dim=5)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.center, loss_fn.center)
    batch = _patches(seed=3)
    assert torch.equal(resumed(*batch), loss_fn(*batch))
    before = loss_fn.center.clone()
    loss_fn.eval()(*batch)
    assert torch.equal(loss_fn.center, before)


def test_terms():
    student, teacher, mask = _patches()
    out = (
        IBOTPatchLoss(output_dim=5, teacher_temperature=0.5).eval().compute(student, teacher, mask)
    )
    p = torch.softmax(teacher / 0.5, -1)
    h = -(p * p.log()).sum(-1)  # (N, P)
    torch.testing.assert_close(out.terms["teacher_entropy"], h[mask].mean().float())
    per_image = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
    kl = ibot_patch_loss(student, teacher, mask, teacher_temperature=0.5) - per_image.mean()
    torch.testing.assert_close(out.terms["kl"], kl.float())
    assert out.terms["kl"] >= 0 and out.terms["center_norm"] == 0


def test_gradcheck():
    student, teacher, mask = _patches(n=3, p=3, k=3)
    assert torch.autograd.gradcheck(
        lambda s: ibot_patch_loss(s, teacher, mask, teacher_temperature=0.3), (student,)
    )


def test_lightly_parity():
    # lightly's IBOTPatchLoss(output_dim, teacher_temp, student_temp, center_momentum) takes
    # (teacher_out, student_out, mask) — teacher first — with the outputs of the masked patches
    # only, flattened to (number masked, K) in the order of mask[mask], and a (B, H, W) mask;
    # it divides by B and updates its centre with the mean of those rows after the loss, as here.
    with float64_default():
        reference = load("loss.ibot_loss").IBOTPatchLoss(
            output_dim=5, teacher_temp=0.05, student_temp=0.2, center_momentum=0.8
        )
    loss_fn = IBOTPatchLoss(
        output_dim=5, teacher_temperature=0.05, student_temperature=0.2, center_momentum=0.8
    )
    for step in range(3):
        student, teacher, mask = _patches(seed=step)
        with float64_default():
            want = reference(teacher[mask], student[mask], mask.reshape(4, 2, 3))
        assert_close_with_grads(loss_fn(student, teacher, mask), want, (student,))
        torch.testing.assert_close(loss_fn.center, reference.center.value.reshape(-1))


def test_registry():
    student, teacher, mask = _patches()
    loss_fn = create_loss("ibot_patch", output_dim=5).eval()
    torch.testing.assert_close(
        loss_fn(student, teacher, mask), ibot_patch_loss(student, teacher, mask)
    )


def test_bad_inputs_are_clear_errors():
    student, teacher, mask = _patches()
    loss_fn = IBOTPatchLoss(output_dim=5)
    with pytest.raises(ValueError, match=r"K=4 outputs per patch \(output_dim\), got 5"):
        IBOTPatchLoss(output_dim=4)(student, teacher, mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        loss_fn(student, teacher, mask.long())
    with pytest.raises(ValueError, match=r"mask must be a bool \(N, P\) = \(4, 6\)"):
        loss_fn(student, teacher, mask[:, :3])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        loss_fn(student, teacher, [[True]])
    with pytest.raises(ValueError, match="must have the same shape"):
        loss_fn(student, teacher[:, :3], mask)
    with pytest.raises(ValueError, match=r"student_patches must have shape \(N, P, K\)"):
        loss_fn(student[0], teacher, mask)
    with pytest.raises(ValueError, match="center_momentum"):
        IBOTPatchLoss(output_dim=5, center_momentum=-0.1)
    with pytest.raises(ValueError, match="center must have shape"):
        ibot_patch_loss(student, teacher, mask, center=torch.zeros(1, 5))
