import math

import pytest
import torch
import torch.nn.functional as F

from embedloss import AlignmentUniformityLoss, create_loss
from embedloss.functional import alignment_uniformity_loss
from embedloss.metrics import alignment, uniformity
from tests.helpers import assert_close_with_grads, randn64
from tests.multimodal.oracles import alignment_uniformity_oracle


def _official(x, y, alpha=2, t=2, lam=1.0):
    """github.com/SsnL/align_uniform: align_loss + lam * (uniform_loss(x) + uniform_loss(y)) / 2."""

    def align_loss(x, y, alpha=2):
        return (x - y).norm(p=2, dim=1).pow(alpha).mean()

    def uniform_loss(x, t=2):
        return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()

    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return align_loss(x, y, alpha) + lam * (uniform_loss(x, t) + uniform_loss(y, t)) / 2


@pytest.mark.parametrize(
    ("alpha", "t", "weight"), [(2.0, 2.0, 1.0), (1.0, 3.0, 0.5), (3.0, 0.5, 0.0)]
)
def test_matches_paper_equation_oracle(alpha, t, weight):
    x, y = randn64(6, 4, seed=1), randn64(6, 4, seed=2)
    assert_close_with_grads(
        alignment_uniformity_loss(x, y, alpha=alpha, t=t, weight=weight),
        alignment_uniformity_oracle(x, y, alpha, t, weight),
        (x, y),
    )


def test_labels_match_oracle():
    x, y = randn64(6, 3, seed=3), randn64(6, 3, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    assert_close_with_grads(
        alignment_uniformity_loss(x, y, alpha=1.5, labels=labels),
        alignment_uniformity_oracle(x, y, 1.5, 2.0, 1.0, labels),
        (x, y),
    )


def test_matches_official_code():
    x, y = randn64(8, 5, seed=5), randn64(8, 5, seed=6)
    assert_close_with_grads(
        alignment_uniformity_loss(x, y, alpha=2, t=2, weight=0.7),
        _official(x, y, 2, 2, 0.7),
        (x, y),
    )


def test_distinct_labels_reproduce_label_free():
    x, y = randn64(5, 4, seed=7), randn64(5, 4, seed=8)
    assert_close_with_grads(
        alignment_uniformity_loss(x, y, labels=torch.arange(5) + 7),
        alignment_uniformity_loss(x, y),
        (x, y),
    )


def test_closed_form_identical_orthonormal_pairs():
    # Aligned (0) and every pair at squared distance 2: uniformity is exactly −2t.
    x = torch.eye(5, dtype=torch.float64)
    assert alignment_uniformity_loss(x, x, t=3.0, weight=0.5).item() == pytest.approx(
        -3.0, rel=1e-12
    )


def test_closed_form_collapse():
    # All embeddings identical: alignment 0 and uniformity log(mean(e⁰)) = 0.
    x = torch.ones(4, 3, dtype=torch.float64)
    assert alignment_uniformity_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    # Antipodal views: ‖x − y‖ = 2, so alignment = 2^α.
    assert alignment_uniformity_loss(x, -x, alpha=3.0, weight=0.0).item() == pytest.approx(
        8.0, rel=1e-12
    )


def test_log_space_is_finite_where_exp_then_log_underflows():
    x = torch.eye(3, dtype=torch.float64)
    t = 1000.0  # exp(−2000) underflows to 0 even in float64: the official formula gives −inf
    assert _official(x, x, t=t).item() == -math.inf
    assert uniformity(x, t).item() == pytest.approx(-2 * t, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_gradient_finite_at_coinciding_points(alpha):
    x = randn64(4, 3, seed=9)
    y = x.detach().clone().requires_grad_(True)
    z = torch.cat([x[:1], x[:1], x[2:]])  # a duplicated row: a zero pairwise distance
    loss = alignment_uniformity_loss(z, y, alpha=alpha)
    gx, gy = torch.autograd.grad(loss, (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()


def test_gradcheck():
    x, y = randn64(4, 3, seed=10), randn64(4, 3, seed=11)
    labels = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda a, b: alignment_uniformity_loss(a, b, alpha=1.5, t=2.5, weight=0.3, labels=labels),
        (x, y),
    )


def test_reductions():
    x, y = randn64(5, 4, seed=12, requires_grad=False), randn64(5, 4, seed=13, requires_grad=False)
    per = alignment_uniformity_loss(x, y, reduction="none")
    assert per.shape == (5,)
    unif = (uniformity(x) + uniformity(y)) / 2
    torch.testing.assert_close(per, alignment(x, y, reduction="none") + unif)
    torch.testing.assert_close(per.mean(), alignment_uniformity_loss(x, y))
    torch.testing.assert_close(per.sum(), alignment_uniformity_loss(x, y, reduction="sum"))


def test_unnormalised_inputs():
    x, y = randn64(5, 3, seed=14, requires_grad=False), randn64(5, 3, seed=15, requires_grad=False)
    align = (x - y).norm(dim=1).pow(2).mean()
    unif = [torch.pdist(v).pow(2).mul(-2).exp().mean().log() for v in (x, y)]
    expected = align + (unif[0] + unif[1]) / 2
    torch.testing.assert_close(alignment_uniformity_loss(x, y, normalize=False), expected)


def test_module_terms_use_the_metrics():
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    loss = create_loss("alignment_uniformity", alpha=2.0, t=2.0, weight=0.5)
    out = loss.compute(x, y)
    torch.testing.assert_close(out.terms["alignment"], alignment(x, y))
    torch.testing.assert_close(out.terms["uniformity"], (uniformity(x) + uniformity(y)) / 2)
    torch.testing.assert_close(out.loss, out.terms["alignment"] + 0.5 * out.terms["uniformity"])
    torch.testing.assert_close(loss(x, y), alignment_uniformity_loss(x, y, weight=0.5))
    assert "weight=0.5" in repr(loss)


def test_half_precision_and_state_dict():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    loss = AlignmentUniformityLoss()
    out = loss(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    fresh = AlignmentUniformityLoss()
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh(x, y), loss(x, y))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"uniformity needs at least 2 embeddings, got 1"):
        AlignmentUniformityLoss()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(
        ValueError, match=r"z_a and z_b must have the same shape, got \(3, 4\) and \(2, 4\)"
    ):
        AlignmentUniformityLoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got 0"):
        AlignmentUniformityLoss(alpha=0)
    with pytest.raises(ValueError, match=r"t must be a finite number > 0, got -1"):
        AlignmentUniformityLoss(t=-1)
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -0.5"):
        AlignmentUniformityLoss(weight=-0.5)
    with pytest.raises(TypeError, match=r"gather_distributed must be a bool, got int"):
        AlignmentUniformityLoss(gather_distributed=1)
    with pytest.raises(
        ValueError, match=r"labels must have shape \(3,\) to match the batch, got \(4,\)"
    ):
        AlignmentUniformityLoss()(torch.randn(3, 4), torch.randn(3, 4), torch.arange(4))
