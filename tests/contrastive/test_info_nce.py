import pytest
import torch

from embedloss import InfoNCELoss
from embedloss.functional import info_nce_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.oracles import info_nce_oracle


def test_in_batch_negatives_match_oracle():
    q, k = randn64(6, 5, seed=1), randn64(6, 5, seed=2)
    assert_close_with_grads(
        info_nce_loss(q, k, temperature=0.2), info_nce_oracle(q, k, 0.2), (q, k)
    )


def test_shared_negatives_match_oracle_and_ignore_other_positives():
    q, k, neg = randn64(5, 4, seed=3), randn64(5, 4, seed=4), randn64(7, 4, seed=5)
    assert_close_with_grads(
        info_nce_loss(q, k, neg, temperature=0.3), info_nce_oracle(q, k, 0.3, neg), (q, k, neg)
    )


def test_per_query_negatives_match_oracle():
    q, k, neg = randn64(4, 3, seed=6), randn64(4, 3, seed=7), randn64(4, 6, 3, seed=8)
    assert_close_with_grads(
        info_nce_loss(q, k, neg, temperature=0.5), info_nce_oracle(q, k, 0.5, neg), (q, k, neg)
    )


def test_shared_and_per_query_negatives_agree_when_identical():
    q, k, neg = randn64(4, 3, seed=9), randn64(4, 3, seed=10), randn64(6, 3, seed=11)
    per_query = neg.unsqueeze(0).expand(4, 6, 3)
    torch.testing.assert_close(info_nce_loss(q, k, neg), info_nce_loss(q, k, per_query))


def test_labels_make_same_identity_keys_positive():
    q, k = randn64(4, 3, seed=12, requires_grad=False), randn64(4, 3, seed=13, requires_grad=False)
    distinct = info_nce_loss(q, k, labels=torch.arange(4))
    torch.testing.assert_close(distinct, info_nce_loss(q, k))
    merged = info_nce_loss(q, k, labels=torch.tensor([0, 0, 1, 1]), reduction="none")
    logits = (
        torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T / 0.1
    )
    logp = logits.log_softmax(dim=1)
    expected0 = -(logp[0, 0] + logp[0, 1]) / 2
    torch.testing.assert_close(merged[0], expected0)


def test_gradcheck_all_modes():
    q, k = randn64(3, 3, seed=14), randn64(3, 3, seed=15)
    neg2, neg3 = randn64(4, 3, seed=16), randn64(3, 2, 3, seed=17)
    assert torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b), (q, k))
    assert torch.autograd.gradcheck(lambda a, b, n: info_nce_loss(a, b, n), (q, k, neg2))
    assert torch.autograd.gradcheck(lambda a, b, n: info_nce_loss(a, b, n), (q, k, neg3))


def test_module_terms_and_reductions():
    q, k = torch.eye(5, 8), torch.eye(5, 8)
    out = InfoNCELoss(temperature=0.1).compute(q, k)
    assert out.terms["accuracy"].item() == 1.0
    assert out.terms["positive_similarity"].item() == pytest.approx(1.0)
    none = InfoNCELoss(reduction="none")(q, k)
    assert none.shape == (5,)
    torch.testing.assert_close(InfoNCELoss(reduction="sum")(q, k), none.sum())


@pytest.mark.parametrize(
    ("neg", "labels", "match"),
    [
        (
            torch.randn(3, 5, 4),
            None,
            r"per-query negative_keys must have shape \(N=4, M, D\), got \(3, 5, 4\)",
        ),
        (
            torch.randn(5, 3),
            None,
            "query and negative_keys must have the same embedding dimension D, got 4 and 3",
        ),
        (
            torch.randn(5),
            None,
            r"negative_keys must have shape \(M, D\) or \(N, M, D\), got shape \(5,\)",
        ),
        (torch.randn(5, 4), torch.arange(4), "labels mark in-batch positives"),
    ],
)
def test_bad_negatives(neg, labels, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss()(torch.randn(4, 4), torch.randn(4, 4), neg, labels)
