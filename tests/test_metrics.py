import math

import pytest
import torch
import torch.nn.functional as F

from embedloss.metrics import accuracy, alignment, effective_rank, recall_at_k, uniformity


def _brute_recall(sim, k, pos):
    """Rank keys by score, ties broken against the query (non-matching keys first); hit if a match is in the top k."""
    hits, counted = 0, 0
    for i in range(sim.shape[0]):
        matches = [j for j in range(sim.shape[1]) if pos[i][j]]
        if not matches:
            continue
        counted += 1
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), pos[i][j]))
        hits += any(pos[i][j] for j in order[:k])
    return hits / counted


def _pos(q_labels, k_labels):
    return [[int(a) == int(b) for b in k_labels] for a in q_labels]


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force_without_labels(seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(9, 9, generator=g)
    out = recall_at_k(sim, k=(1, 3, 5))
    pos = _pos(range(9), range(9))
    for k in (1, 3, 5):
        fwd, bwd = (
            _brute_recall(sim, k, pos),
            _brute_recall(sim.T, k, [list(r) for r in zip(*pos, strict=True)]),
        )
        assert out[f"query_to_key_recall@{k}"] == pytest.approx(fwd)
        assert out[f"key_to_query_recall@{k}"] == pytest.approx(bwd)
        assert out[f"recall@{k}"] == pytest.approx((fwd + bwd) / 2)


def test_recall_matches_topk_definition_without_ties():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(12, 12, generator=g)
    top = sim.topk(5, dim=1).indices
    expected = (top == torch.arange(12).unsqueeze(1)).any(1).double().mean().item()
    assert recall_at_k(sim, k=5)["query_to_key_recall@5"] == pytest.approx(expected)


def test_recall_with_labels_and_rectangular_keys_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    sim = torch.randn(7, 10, generator=g).round(decimals=1)  # rounding creates ties
    q_labels = torch.tensor([0, 1, 2, 0, 3, 1, 9])  # label 9 has no key: left out
    k_labels = torch.tensor([0, 0, 1, 2, 3, 3, 1, 4, 2, 0])
    out = recall_at_k(sim, k=(1, 2, 3, 4), labels=q_labels, key_labels=k_labels)
    pos = _pos(q_labels, k_labels)
    pos_t = [list(r) for r in zip(*pos, strict=True)]
    for k in (1, 2, 3, 4):
        assert out[f"query_to_key_recall@{k}"] == pytest.approx(_brute_recall(sim, k, pos))
        assert out[f"key_to_query_recall@{k}"] == pytest.approx(_brute_recall(sim.T, k, pos_t))


def test_recall_from_embeddings_is_cosine_similarity():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    sim = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    assert recall_at_k(q, k) == recall_at_k(sim)
    assert recall_at_k(q, k, normalize=False) == recall_at_k(q @ k.T)


def test_recall_ties_count_against_the_query():
    sim = torch.zeros(4, 4)  # collapsed: every key ties with the match
    out = recall_at_k(sim, k=(1, 3, 4))
    assert out["recall@1"] == 0.0 and out["recall@3"] == 0.0 and out["recall@4"] == 1.0
    assert recall_at_k(torch.eye(4), k=1)["recall@1"] == 1.0


def test_recall_labels_distinct_equal_label_free_and_legacy_targets():
    g = torch.Generator().manual_seed(6)
    sim = torch.randn(6, 6, generator=g)
    assert recall_at_k(sim, labels=torch.arange(6) + 10) == recall_at_k(sim)
    # Legacy target indices: query i matches key targets[i].
    targets = torch.tensor([2, 0, 1, 5, 4, 3])
    out = recall_at_k(sim, k=1, labels=targets, key_labels=torch.arange(6))
    expected = (sim.argmax(1) == targets).double().mean().item()
    assert out["query_to_key_recall@1"] == pytest.approx(expected)


def test_recall_does_not_track_gradients_and_is_deterministic():
    q = torch.randn(5, 3, requires_grad=True)
    assert recall_at_k(q, q.detach().clone()) == recall_at_k(q, q.detach().clone())
    assert recall_at_k(q, q.detach())["recall@1"] == 1.0


def test_recall_bad_inputs():
    with pytest.raises(ValueError, match=r"similarity must be square, got shape \(3, 4\)"):
        recall_at_k(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        recall_at_k(torch.randn(3, 3), k=0)
    with pytest.raises(ValueError, match="k must name at least one cut-off"):
        recall_at_k(torch.randn(3, 3), k=())
    with pytest.raises(ValueError, match="key_labels needs labels"):
        recall_at_k(torch.randn(3, 3), key_labels=torch.arange(3))
    with pytest.raises(ValueError, match="key_labels are needed for 4 keys and 3 queries"):
        recall_at_k(torch.randn(3, 4), labels=torch.arange(3))
    with pytest.raises(ValueError, match="no query has a positive key"):
        recall_at_k(torch.randn(2, 2), labels=torch.tensor([0, 1]), key_labels=torch.tensor([2, 3]))
    with pytest.raises(
        ValueError, match=r"similarity must be a non-empty \(N, M\) matrix, got shape \(3,\)"
    ):
        recall_at_k(torch.randn(3))
    with pytest.raises(
        ValueError, match=r"queries and keys must have the same embedding dimension D, got 4 and 5"
    ):
        recall_at_k(torch.randn(3, 4), torch.randn(3, 5))


def test_accuracy_matches_loop_and_errors():
    g = torch.Generator().manual_seed(7)
    logits, targets = torch.randn(20, 5, generator=g), torch.randint(0, 5, (20,), generator=g)
    expected = (
        sum(int(max(range(5), key=lambda c, i=i: logits[i, c]) == targets[i]) for i in range(20))
        / 20
    )
    assert accuracy(logits, targets) == pytest.approx(expected)
    assert accuracy(torch.zeros(2, 3), torch.tensor([0, 1])) == 0.5  # ties go to class 0
    with pytest.raises(
        ValueError, match=r"targets must be class indices in \[0, 3\), got values from 0 to 3"
    ):
        accuracy(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(
        ValueError, match=r"targets must have shape \(2,\) to match the batch, got \(3,\)"
    ):
        accuracy(torch.randn(2, 3), torch.tensor([0, 1, 2]))


def test_effective_rank_matches_definition():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    s = torch.linalg.svd(x).S.tolist()
    p = [v / sum(s) for v in s]
    assert effective_rank(x) == pytest.approx(math.exp(-sum(v * math.log(v) for v in p)), rel=1e-12)
    # Bounds, scale and rotation invariance, closed forms.
    assert 1.0 <= effective_rank(x) <= 4.0
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert effective_rank(3 * x @ q) == pytest.approx(effective_rank(x), rel=1e-10)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(3, 2)) == 0.0
    assert (
        effective_rank(torch.ones(4, 3) + torch.randn(4, 3, generator=g) * 1e-3, center=True) > 1.5
    )


def test_alignment_and_uniformity_match_official_formulas():
    g = torch.Generator().manual_seed(9)
    x, y = (
        F.normalize(torch.randn(7, 3, generator=g), dim=1),
        F.normalize(torch.randn(7, 3, generator=g), dim=1),
    )
    torch.testing.assert_close(alignment(x, y, alpha=2), (x - y).norm(p=2, dim=1).pow(2).mean())
    torch.testing.assert_close(alignment(x, y, alpha=1), (x - y).norm(p=2, dim=1).mean())
    torch.testing.assert_close(
        uniformity(x, t=2), torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log()
    )
    assert alignment(x, y, reduction="none").shape == (7,)
    # Labelled alignment against keys: mean over same-label keys.
    keys = torch.cat([y, y[:2]])
    labels, key_labels = torch.arange(7), torch.cat([torch.arange(7), torch.tensor([0, 1])])
    per = alignment(x, keys, labels=labels, key_labels=key_labels, reduction="none")
    torch.testing.assert_close(per[2:], (x[2:] - y[2:]).norm(dim=1).pow(2))
    torch.testing.assert_close(
        per[:2], (x[:2] - y[:2]).norm(dim=1).pow(2)
    )  # duplicate keys: same mean


def test_alignment_uniformity_bad_inputs():
    with pytest.raises(
        ValueError, match=r"x and y must have the same shape, got \(3, 2\) and \(4, 2\)"
    ):
        alignment(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="key_labels needs labels"):
        alignment(torch.randn(3, 2), torch.randn(3, 2), key_labels=torch.arange(3))
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'none'; got 'sum'"):
        alignment(torch.randn(3, 2), torch.randn(3, 2), reduction="sum")
    with pytest.raises(
        ValueError, match=r"key_labels must have shape \(4,\) to match the batch, got \(3,\)"
    ):
        alignment(
            torch.randn(3, 2), torch.randn(4, 2), labels=torch.arange(3), key_labels=torch.arange(3)
        )
    with pytest.raises(ValueError, match="t must be a finite number > 0, got 0"):
        uniformity(torch.randn(3, 2), t=0)
