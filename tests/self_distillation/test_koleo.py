import math

import pytest
import torch

from embedloss import KoLeoLoss, create_loss
from embedloss.functional import koleo_loss
from embedloss.ops.neighbours import nearest_neighbour_index
from tests.helpers import assert_close_with_grads, randn64
from tests.self_distillation.lightly_reference import load
from tests.self_distillation.oracles import koleo_oracle


@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_value_and_gradient_match_dinov2(eps):
    x = randn64(9, 4)
    assert_close_with_grads(koleo_loss(x, eps=eps), koleo_oracle(x, eps), (x,))


def test_closed_form_orthonormal_rows():
    loss = koleo_loss(torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(
        loss, torch.tensor(-math.log(math.sqrt(2) + 1e-8), dtype=torch.float64)
    )


def test_invariant_to_scale_and_rotation():
    x = randn64(7, 3, requires_grad=False)
    q, _ = torch.linalg.qr(randn64(3, 3, seed=5, requires_grad=False))
    torch.testing.assert_close(koleo_loss(3.0 * x @ q), koleo_loss(x))


def test_coincident_embeddings_are_finite_with_finite_gradients():
    x = randn64(4, 3, requires_grad=False)
    x = torch.cat([x, x[:1]]).requires_grad_()  # rows 0 and 4 coincide: ρ = 0
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    out = KoLeoLoss().compute(x.detach())
    assert out.terms["min_distance"] == 0


def test_spreading_lowers_the_loss():
    clustered = torch.randn(16, 8) * 0.01 + torch.ones(8)
    assert koleo_loss(torch.randn(16, 8)) < koleo_loss(clustered)


def test_reductions_and_terms():
    x = randn64(6, 4, requires_grad=False)
    per = koleo_loss(x, reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), koleo_loss(x))
    torch.testing.assert_close(per.sum(), koleo_loss(x, reduction="sum"))
    out = KoLeoLoss().compute(x)
    rho = torch.exp(-per) - 1e-8
    torch.testing.assert_close(out.terms["nearest_neighbour_distance"], rho.mean().float())
    torch.testing.assert_close(out.terms["min_distance"], rho.min().float())


def test_gradcheck():
    x = randn64(5, 3)
    assert torch.autograd.gradcheck(lambda t: koleo_loss(t, eps=1e-3), (x,))


def test_lightly_parity():
    # lightly's KoLeoLoss(p=2, eps) normalises with eps, picks the neighbour by cosine (the
    # diagonal filled with -2) and uses PairwiseDistance(eps), which adds eps to the difference
    # before the norm (DINOv2 does the same): a shift of order eps·sqrt(D) in ρ, hence 1e-7.
    x = randn64(10, 6)
    want = load("loss.koleo_loss").KoLeoLoss(p=2, eps=1e-8)(x)
    torch.testing.assert_close(koleo_loss(x), want, rtol=1e-7, atol=1e-7)
    exact = load("loss.koleo_loss").KoLeoLoss(p=2, eps=0.0)(x)  # no shift at eps = 0
    torch.testing.assert_close(koleo_loss(x, eps=1e-300), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", [1, 2, 3, 100])
def test_tiled_nearest_neighbours_equal_argmax_with_ties(tile):
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    want = (q @ keys.T).argmax(1)  # ties: the first maximum
    assert torch.equal(nearest_neighbour_index(q, keys, tile=tile), want)
    scores = (q @ keys.T).scatter(1, torch.tensor([[1], [0], [3]]), float("-inf"))
    got = nearest_neighbour_index(q, keys, exclude=torch.tensor([1, 0, 3]), tile=tile)
    assert torch.equal(got, scores.argmax(1))


def test_registry():
    x = randn64(5, 3, requires_grad=False)
    torch.testing.assert_close(create_loss("koleo", eps=1e-3)(x), koleo_loss(x, eps=1e-3))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        KoLeoLoss(eps=0.0)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, D\)"):
        KoLeoLoss()(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="embeddings must be a floating-point tensor"):
        KoLeoLoss()(torch.ones(3, 4, dtype=torch.long))


def test_reprs_show_the_options():
    from embedloss import DINOLoss, IBOTPatchLoss, NNCLRLoss, SwAVLoss

    assert "eps=0.001" in repr(KoLeoLoss(eps=1e-3))
    assert "epsilon=0.2" in repr(SwAVLoss(epsilon=0.2))
    assert "output_dim=7" in repr(DINOLoss(output_dim=7))
    assert "center_momentum=0.5" in repr(IBOTPatchLoss(output_dim=3, center_momentum=0.5))
    assert "queue_size=9" in repr(NNCLRLoss(queue_size=9))
    assert "size=9, streams=1, filled=0" in repr(NNCLRLoss(queue_size=9).queue)
