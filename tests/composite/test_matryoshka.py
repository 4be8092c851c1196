import pytest
import torch

from embedloss import MatryoshkaLoss, SimCLRLoss, create_loss, loss_info
from embedloss.functional import cosent_loss, simclr_loss, supcon_loss
from tests.helpers import assert_close_with_grads, randn64


def test_weighted_sum_over_prefixes_of_two_views():
    a, b = randn64(6, 12, seed=1), randn64(6, 12, seed=2)
    loss = MatryoshkaLoss(
        loss={"name": "simclr", "temperature": 0.3}, dims=(12, 8, 3), weights=(1.0, 0.5, 2.0)
    )
    expected = sum(
        w * simclr_loss(a[:, :d], b[:, :d], temperature=0.3)
        for d, w in ((12, 1.0), (8, 0.5), (3, 2.0))
    )
    out = loss.compute(a, b)
    assert_close_with_grads(out.loss, expected, (a, b))
    assert {"dim_12/loss", "dim_8/accuracy", "dim_3/temperature"} <= set(out.terms)
    torch.testing.assert_close(
        out.terms["dim_3/loss"], simclr_loss(a[:, :3], b[:, :3], temperature=0.3).float()
    )


def test_labels_views_and_scores_pass_through_unchanged():
    views, labels = randn64(5, 2, 10, seed=3), torch.tensor([0, 1, 0, 1, 2])
    got = MatryoshkaLoss(loss="supcon", dims=(10, 4))(views, labels)
    expected = supcon_loss(views, labels) + supcon_loss(views[..., :4], labels)
    assert_close_with_grads(got, expected, (views,))
    a, b = randn64(6, 8, seed=4), randn64(6, 8, seed=5)
    scores = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.7, 0.2], dtype=torch.float64)
    got = MatryoshkaLoss(loss=create_loss("cosent"), dims=(8, 2))(a, b, scores=scores)
    expected = cosent_loss(a, b, scores) + cosent_loss(a[:, :2], b[:, :2], scores)
    assert_close_with_grads(got, expected, (a, b))


def test_reductions_of_the_wrapped_loss_and_hooks():
    a, b = randn64(4, 6, seed=6), randn64(4, 6, seed=7)
    per = MatryoshkaLoss(loss={"name": "clip", "reduction": "none"}, dims=(6, 3))(a, b)
    assert per.shape == (4,)
    wrapped = create_loss("vicreg", warmup_steps=10)
    loss = MatryoshkaLoss(loss=wrapped, dims=(6,))
    loss.update_step(4, 10)
    assert wrapped.warmup_factor == pytest.approx(0.4)
    loss.update_epoch(1)  # forwarded (a no-op for VICReg)
    assert isinstance(loss.loss, type(wrapped)) and "dims=(6,)" in repr(loss)
    assert loss_info("matryoshka").category == "composite"
    assert list(MatryoshkaLoss(loss=SimCLRLoss(), dims=(2,)).state_dict()) == ["loss.logit_scale"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="loss must be an nn.Module, a config mapping"):
        MatryoshkaLoss(loss=3, dims=(4,))
    with pytest.raises(ValueError, match="unknown loss 'simclrr'"):
        MatryoshkaLoss(loss="simclrr", dims=(4,))
    with pytest.raises(TypeError, match="dims must be a non-empty sequence of ints"):
        MatryoshkaLoss(loss="simclr", dims=())
    with pytest.raises(TypeError, match="dims must be a non-empty sequence of ints"):
        MatryoshkaLoss(loss="simclr", dims=8)
    with pytest.raises(ValueError, match="dims must be >= 1"):
        MatryoshkaLoss(loss="simclr", dims=(8, 0))
    with pytest.raises(ValueError, match="dims must be distinct"):
        MatryoshkaLoss(loss="simclr", dims=(8, 8))
    with pytest.raises(ValueError, match=r"weights must have one entry per dim \(2\)"):
        MatryoshkaLoss(loss="simclr", dims=(8, 4), weights=(1.0,))
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        MatryoshkaLoss(loss="simclr", dims=(8, 4), weights=(1.0, float("nan")))
    with pytest.raises(TypeError, match="weights must be a sequence of 2 numbers"):
        MatryoshkaLoss(loss="simclr", dims=(8, 4), weights=1.0)
    loss = MatryoshkaLoss(loss="simclr", dims=(16, 4))
    with pytest.raises(ValueError, match="dims asks for the first 16 features, but an embedding"):
        loss(torch.randn(4, 8), torch.randn(4, 8))
