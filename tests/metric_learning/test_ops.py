"""The shared pieces in ops/: distances, miners and the row-tiled pair-loss engine."""

import pytest
import torch
from pytorch_metric_learning import miners

from embedloss.ops.distances import (
    DISTANCES,
    pair_distance,
    pair_similarity,
    prepare_for_distance,
    prepared_pair,
)
from embedloss.ops.miners import (
    batch_hard_pairs,
    hardest_pairs,
    multi_similarity_pairs,
    semi_hard_negatives,
)
from embedloss.ops.pair_losses import (
    PairLayout,
    masked_log1p_sum_exp,
    masked_logsumexp,
    pair_rows,
    reduce_counted,
    resolve_pair_rows,
    row_masks,
)
from tests.helpers import randn64
from tests.metric_learning.helpers import batch


@pytest.mark.parametrize("distance", DISTANCES)
def test_distances_match_their_definitions(distance):
    q, k = randn64(5, 3, seed=1), randn64(7, 3, seed=2)
    qp, kp = prepared_pair(q, k, distance, normalize=False)
    got = pair_distance(qp, kp, distance)
    cos = torch.nn.functional.cosine_similarity(q.unsqueeze(1), k.unsqueeze(0), dim=2)
    diff = q.unsqueeze(1) - k.unsqueeze(0)  # (5, 7, 3)
    expected = {
        "cosine": 1 - cos,
        "dot": -(q @ k.T),
        "euclidean": diff.norm(dim=2),
        "squared_euclidean": diff.square().sum(2),
    }[distance]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    sim = pair_similarity(qp, kp, distance)
    torch.testing.assert_close(sim, (1 - got) if distance == "cosine" else -got)


def test_euclidean_has_zero_gradient_at_coinciding_points_and_prepare_casts():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    d = pair_distance(x, x, "euclidean")
    assert d[0, 1].item() == 0.0
    d.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    half = prepare_for_distance(
        torch.ones(2, 2, dtype=torch.bfloat16), "dot", normalize=False, dtype=torch.float32
    )
    assert half.dtype == torch.float32 and half.max().item() == 1.0


def _loop_masks(labels):
    n = labels.shape[0]
    pos = torch.tensor([[i != j and labels[i] == labels[j] for j in range(n)] for i in range(n)])
    return pos, labels.unsqueeze(1) != labels.unsqueeze(0)


def test_miners_match_loops():
    x, y = batch(n=12, seed=3)
    d = pair_distance(*prepared_pair(x, x, "cosine", normalize=True), "cosine").detach()
    pos, neg = _loop_masks(y)
    hard = hardest_pairs(d, pos, neg)
    keep_pos, keep_neg = batch_hard_pairs(d, pos, neg)
    index, valid = semi_hard_negatives(d, pos, neg)
    for i in range(12):
        p = [j for j in range(12) if pos[i, j]]
        n = [j for j in range(12) if neg[i, j]]
        assert int(hard.positive[i]) == max(p, key=lambda j: d[i, j])
        assert int(hard.negative[i]) == min(n, key=lambda j: d[i, j])
        assert keep_pos[i].nonzero().flatten().tolist() == [int(hard.positive[i])]
        assert keep_neg[i].nonzero().flatten().tolist() == [int(hard.negative[i])]
        for j in p:
            farther = [m for m in n if d[i, m] > d[i, j]]
            best = min(farther, key=lambda m: d[i, m]) if farther else max(n, key=lambda m: d[i, m])
            assert valid[i, j] and int(index[i, j]) == best
    assert not valid[~pos].any()


def test_multi_similarity_miner_matches_pytorch_metric_learning():
    x, y = batch(n=14, seed=4)
    s = pair_similarity(*prepared_pair(x, x, "cosine", normalize=True), "cosine").detach()
    pos, neg = _loop_masks(y)
    keep_pos, keep_neg = multi_similarity_pairs(s, pos, neg, 0.15)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.15)(x, y)
    assert sorted(torch.stack([a1, p], 1).tolist()) == keep_pos.nonzero().tolist()
    assert sorted(torch.stack([a2, n], 1).tolist()) == keep_neg.nonzero().tolist()
    # A row keeps a positive exactly when it keeps a negative.
    torch.testing.assert_close(keep_pos.any(1), keep_neg.any(1))


def test_rows_without_candidates_are_invalid():
    d = torch.rand(3, 4)
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert not hardest_pairs(d, none, ~none).valid.any()
    index, valid = semi_hard_negatives(d, ~none, none)
    assert not valid.any() and index.min() >= 0


def test_row_masks_and_resolve():
    layout = PairLayout(torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([2, 3]))
    pos, neg = row_masks(layout, 0, 2)
    assert pos.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert neg.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert resolve_pair_rows(None, 10, 10) is None
    assert resolve_pair_rows(4, 10, 10) == 4 and resolve_pair_rows(10, 10, 10) is None
    assert resolve_pair_rows("auto", 100, 100) is None
    assert resolve_pair_rows("auto", 16384, 16384, torch.float64) == 32
    with pytest.raises(TypeError, match="chunk_size must be None, 'auto' or an int"):
        resolve_pair_rows(1.5, 10, 10)


def test_tiled_rows_push_an_arbitrary_upstream_gradient():
    x, y = batch(n=9, seed=5)
    keys = (x * 2).detach().requires_grad_(True)
    layout = PairLayout(y, y, torch.arange(9))

    def rows(v, p, n):  # a row loss with a non-linear dependence on the whole row
        return (v.exp() * p).sum(1) - (v * n).sum(1).square(), (p | n).sum(1)

    values = lambda q, k: q @ k.T  # noqa: E731
    dense, count = pair_rows(x, keys, layout, values, rows, None)
    tiled, tiled_count = pair_rows(x, keys, layout, values, rows, 2)
    assert torch.equal(count, tiled_count) and not tiled_count.requires_grad
    w = torch.linspace(-1, 2, 9, dtype=torch.float64)
    gd = torch.autograd.grad((dense * w).sum(), (x, keys))
    gt = torch.autograd.grad((tiled * w).sum(), (x, keys))
    torch.testing.assert_close(tiled, dense, rtol=1e-13, atol=1e-13)
    for a, b in zip(gt, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reduce_counted_and_masked_helpers_never_nan():
    loss, count = torch.tensor([2.0, 0.0]), torch.tensor([0, 0])
    assert reduce_counted(loss, count, "mean").item() == 2.0  # no terms: divide by 1
    assert reduce_counted(loss, count, "sum").item() == 2.0
    assert reduce_counted(loss, count, "none") is loss
    x = torch.tensor([[1.0, 800.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[False, False], [True, True]])
    lse, present = masked_logsumexp(x, mask)
    (lse.sum() + masked_log1p_sum_exp(x, mask).sum()).backward()
    assert present.tolist() == [False, True] and lse[0].item() == 0.0
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() == 0
    big = masked_log1p_sum_exp(torch.tensor([[1000.0, 0.0]]), torch.tensor([[True, True]]))
    assert big.item() == pytest.approx(1000.0)
    along = masked_log1p_sum_exp(torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool), dim=0)
    torch.testing.assert_close(along, torch.full((2,), 4.0).log())
