import math

import pytest
import torch

from embedloss.ops import (
    AnchorLosses,
    PairSpec,
    info_nce,
    pair_masks,
    reduce_anchor_losses,
    symmetric_info_nce,
)
from embedloss.ops.anchors import anchor_losses_from_logits
from embedloss.ops.similarity import labels_from_match_ids, positive_mask_from_labels
from tests.helpers import randn64


def _loop_core(q, k, scale, positive, denominator, log_w=None, eps=0.0):
    """Per-anchor loss from explicit (N, M) masks, one scalar at a time."""
    out = []
    for i in range(q.shape[0]):
        s = [scale * (q[i] @ k[a]) for a in range(k.shape[0])]
        den = [a for a in range(k.shape[0]) if denominator[i, a]]
        pos = [a for a in range(k.shape[0]) if positive[i, a]]
        if not pos or not den:
            out.append(torch.zeros((), dtype=q.dtype))
            continue
        w = [0.0 if (log_w is None or positive[i, a]) else log_w[i, a] for a in range(k.shape[0])]
        lse = torch.log(sum(torch.exp(s[a] + w[a]) for a in den))
        out.append(
            lse
            - (1 - eps) * sum(s[p] for p in pos) / len(pos)
            - eps * sum(s[a] for a in den) / len(den)
        )
    return torch.stack(out)


def test_pair_masks_semantics():
    rows, cols = torch.arange(3), torch.arange(4)
    pos, den = pair_masks(PairSpec(), rows, cols)
    assert pos.tolist() == torch.eye(3, 4, dtype=torch.bool).tolist() and den.all()
    spec = PairSpec(
        positive_index=torch.tensor([1, 0, 3]),
        query_labels=torch.tensor([0, 1, 0]),
        key_labels=torch.tensor([1, 1, 0, 0]),
        labels_mark="false_negatives",
        self_index=torch.tensor([0, 1, 2]),
    )
    pos, den = pair_masks(spec, rows, cols)
    assert pos.int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    # row 0 (label 0): self col 0 gone; cols 2, 3 share its label but are not its positive: gone
    assert den.int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1]]
    pos, den = pair_masks(
        PairSpec(
            query_labels=torch.tensor([0, 1, 0]),
            key_labels=torch.tensor([1, 1, 0, 0]),
            positive_in_denominator=False,
        ),
        rows,
        cols,
    )
    assert pos.int().tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    assert (den == ~pos).all()


@pytest.mark.parametrize("in_den", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_core_matches_loop_with_labels_self_exclusion_and_weights(in_den, eps):
    q, k = randn64(5, 3, seed=1), randn64(7, 3, seed=2)
    spec = PairSpec(
        query_labels=torch.tensor([0, 1, 2, 0, 1]),
        key_labels=torch.tensor([0, 0, 1, 2, 2, 1, 3]),
        self_index=torch.tensor([0, 1, 2, 3, 4]),
        positive_in_denominator=in_den,
    )
    log_w = randn64(5, 7, seed=3, requires_grad=False)
    res = info_nce(q, k, 2.5, spec, negative_log_weights=log_w, label_smoothing=eps)
    positive, denominator = pair_masks(spec, torch.arange(5), torch.arange(7))
    expected = _loop_core(q, k, 2.5, positive, denominator, log_w, eps)
    torch.testing.assert_close(res.loss, expected, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(res.loss.sum(), (q, k))
    g2 = torch.autograd.grad(expected.sum(), (q, k))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_callable_log_weights_equal_tensor_log_weights():
    q, k = randn64(4, 3, seed=4, requires_grad=False), randn64(4, 3, seed=5, requires_grad=False)
    w = randn64(4, 4, seed=6, requires_grad=False)
    by_tensor = info_nce(q, k, 1.0, negative_log_weights=w)
    by_fn = info_nce(q, k, 1.0, negative_log_weights=lambda logits, r, c: w[r][:, c])
    torch.testing.assert_close(by_tensor.loss, by_fn.loss)
    with pytest.raises(ValueError, match=r"negative_log_weights must have shape \(4, 4\)"):
        info_nce(q, k, 1.0, negative_log_weights=torch.zeros(3, 4))


def test_anchors_without_positives_are_excluded_never_nan():
    q = randn64(4, 3, seed=7)
    spec = PairSpec(
        query_labels=torch.tensor([0, 1, 2, 2]),
        key_labels=torch.tensor([0, 1, 2, 2]),
        self_index=torch.arange(4),
    )
    res = info_nce(q, q, 1.0, spec)
    assert res.valid.tolist() == [False, False, True, True]
    assert res.loss[:2].tolist() == [0.0, 0.0]
    mean = reduce_anchor_losses(res, "mean")
    torch.testing.assert_close(mean, res.loss[2:].mean())
    mean.backward()
    assert torch.isfinite(q.grad).all()
    none_valid = info_nce(q[:1], q[:1], 1.0, PairSpec(self_index=torch.tensor([0])))
    assert reduce_anchor_losses(none_valid, "mean").item() == 0.0


def test_extreme_logits_finite():
    q = torch.randn(6, 4) * 1e3
    res = info_nce(q, q.flip(0), 1e3)
    assert torch.isfinite(res.loss).all()


def test_symmetric_equals_two_one_sided_calls():
    x, y = randn64(5, 3, seed=8, requires_grad=False), randn64(5, 3, seed=9, requires_grad=False)
    labels = torch.tensor([0, 0, 1, 2, 1])
    fw, bw = symmetric_info_nce(x, y, 3.0, labels=labels, label_smoothing=0.1)
    spec = PairSpec(query_labels=labels, key_labels=labels)
    torch.testing.assert_close(fw.loss, info_nce(x, y, 3.0, spec, label_smoothing=0.1).loss)
    torch.testing.assert_close(bw.loss, info_nce(y, x, 3.0, spec, label_smoothing=0.1).loss)


def test_correct_flags_top1():
    logits = torch.tensor([[3.0, 1.0], [5.0, 0.0]])
    pos = torch.eye(2, dtype=torch.bool)
    res = anchor_losses_from_logits(logits, pos, torch.ones_like(pos))
    assert res.correct.tolist() == [True, False]


def test_reductions():
    r = AnchorLosses(
        torch.tensor([1.0, 0.0, 2.0]), torch.tensor([True, False, True]), torch.tensor([True] * 3)
    )
    assert reduce_anchor_losses(r, "sum").item() == 3.0
    assert reduce_anchor_losses(r, "mean").item() == 1.5
    assert reduce_anchor_losses(r, "none") is r.loss
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_anchor_losses(r, "max")


def test_core_argument_errors():
    q = torch.randn(3, 4)
    with pytest.raises(
        ValueError, match=r"query and keys must be \(N, D\) and \(M, D\) with the same D"
    ):
        info_nce(q, torch.randn(3, 5), 1.0)
    with pytest.raises(ValueError, match="keys need at least N=3 rows, got 2"):
        info_nce(q, torch.randn(2, 4), 1.0)
    with pytest.raises(
        ValueError, match=r"label_smoothing must be a finite number in \[0.0, 1.0\]"
    ):
        info_nce(q, q, 1.0, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        info_nce(q, q, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="x and y must have the same N"):
        symmetric_info_nce(q, torch.randn(2, 4), 1.0)


def test_labels_from_match_ids_and_masks():
    assert labels_from_match_ids(["b", "a", "b", 3]).tolist() == [0, 1, 0, 2]
    assert labels_from_match_ids(torch.tensor([4, 4])).tolist() == [4, 4]
    with pytest.raises(TypeError, match="match_ids must be a list of hashable ids, got str"):
        labels_from_match_ids("abc")
    with pytest.raises(TypeError, match="match_ids must contain hashable ids"):
        labels_from_match_ids([[1], [2]])
    assert positive_mask_from_labels(
        torch.tensor([1, 2]), torch.tensor([2, 2, 1])
    ).int().tolist() == [[0, 0, 1], [1, 1, 0]]


def test_closed_form_single_positive_uniform():
    q = torch.ones(4, 2, dtype=torch.float64)
    assert info_nce(q, q, 1.0).loss.tolist() == pytest.approx([math.log(4)] * 4)
