import pytest
import torch
import torch.nn.functional as F

from embedloss import BaseContrastiveLoss, BaseLoss, BaseSupervisedLoss, LossOutput, SimCLRLoss
from embedloss.base.base_loss import detached_terms
from embedloss.base.supervised import weighted_cross_entropy


def test_base_loss_contract_and_hooks():
    loss = BaseLoss(reduction="sum")
    assert loss.reduction == "sum" and "sum" in repr(loss)
    with pytest.raises(NotImplementedError, match="must implement compute"):
        loss(torch.zeros(1))
    assert loss.update_step(3, 10) is None and loss.update_epoch(1) is None
    (a, b), kw = BaseLoss.example_inputs(4, 3, dtype=torch.float64)
    assert a.shape == b.shape == (4, 3) and a.dtype == torch.float64 and kw == {}


def test_detached_terms():
    x = torch.tensor([1.0, 3.0], requires_grad=True)
    terms = detached_terms(mean=x, scalar=2, one=x[0])
    assert terms["mean"].item() == 2.0 and not terms["mean"].requires_grad
    assert terms["scalar"].shape == () and terms["one"].shape == ()


def test_create_positive_mask():
    diag = BaseContrastiveLoss.create_positive_mask(3)
    assert diag.equal(torch.eye(3, dtype=torch.bool))
    by_labels = BaseContrastiveLoss.create_positive_mask(labels=torch.tensor([1, 2, 1]))
    by_ids = BaseContrastiveLoss.create_positive_mask(match_ids=["x", "y", "x"])
    assert by_labels.equal(by_ids)
    with pytest.raises(ValueError, match="either labels or match_ids"):
        BaseContrastiveLoss.create_positive_mask(labels=torch.tensor([1]), match_ids=[1])
    with pytest.raises(ValueError, match="needs n, labels or match_ids"):
        BaseContrastiveLoss.create_positive_mask()


def test_base_contrastive_helpers_match_losses():
    loss = SimCLRLoss(temperature=0.25)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(loss.nt_xent_loss(a, b), loss(a, b))
    sim = loss.compute_similarity(a, b)
    torch.testing.assert_close(sim, F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.25)
    logits = sim
    torch.testing.assert_close(loss.info_nce_loss(a, b), F.cross_entropy(logits, torch.arange(6)))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = (
        -(logits.log_softmax(1) * (labels[:, None] == labels[None]).double().float()).sum(1) / 2
    )
    torch.testing.assert_close(loss.info_nce_loss(a, b, labels=labels), expected.mean())


def test_weighted_cross_entropy_matches_torch_with_weights_and_smoothing():
    logits, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, -100, 2])
    w = torch.rand(4, dtype=torch.float64) + 0.5
    for eps in (0.0, 0.2):
        expected = F.cross_entropy(logits, y, weight=w, label_smoothing=eps, ignore_index=-100)
        torch.testing.assert_close(
            weighted_cross_entropy(logits, y, class_weights=w, label_smoothing=eps), expected
        )
    s = torch.rand(7, dtype=torch.float64)
    per = F.cross_entropy(logits, y, weight=w, reduction="none")
    denom = (w[y.clamp(min=0)] * s * (y != -100)).sum()
    torch.testing.assert_close(
        weighted_cross_entropy(logits, y, class_weights=w, sample_weight=s), (per * s).sum() / denom
    )
    torch.testing.assert_close(
        weighted_cross_entropy(logits, y, reduction="sum"),
        F.cross_entropy(logits, y, reduction="sum"),
    )
    assert weighted_cross_entropy(logits, y, reduction="none").shape == (7,)


def test_weighted_cross_entropy_errors_and_base_supervised():
    logits, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"class_weights must have shape \(2,\), got \(3,\)"):
        weighted_cross_entropy(logits, y, class_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(3,\), got \(2,\)"):
        weighted_cross_entropy(logits, y, sample_weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        weighted_cross_entropy(logits, y[:2])
    soft = BaseSupervisedLoss.apply_label_smoothing(torch.tensor([0, 1]), 4, 0.4)
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    assert soft[0, 0].item() == pytest.approx(0.7)
    sup = BaseSupervisedLoss(reduction="sum")
    torch.testing.assert_close(
        sup.weighted_cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="sum")
    )
    assert LossOutput(torch.zeros(()), {}).terms == {}


def test_label_smoothing_in_float64_and_unweighted_reduction():
    from embedloss.base.supervised import weighted_reduction

    soft = BaseSupervisedLoss.apply_label_smoothing(torch.tensor([2]), 3, 0.1, dtype=torch.float64)
    assert soft.dtype == torch.float64 and soft[0, 2].item() == 1 - 0.1 + 0.1 / 3
    per = torch.tensor([1.0, 2.0, 6.0])
    assert weighted_reduction(per, None, "mean").item() == 3.0
    assert weighted_reduction(0 * per, torch.zeros(3), "mean").item() == 0.0  # weighted 0
