"""k-NN, linear probe and cross-modal recall of `embedloss train`, against slow oracles."""

from __future__ import annotations

import numpy as np
import torch

from embedloss.cli.evaluate import knn_accuracy, linear_probe_accuracy, recall_at_k


def _knn_oracle(train, ty, test, k):
    preds = []
    for q in test:
        sims = [float(q @ t / (q.norm() * t.norm())) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes: dict[int, int] = {}
        for i in order:
            votes[int(ty[i])] = votes.get(int(ty[i]), 0) + 1
        best = max(votes.values())
        preds.append(min(c for c, v in votes.items() if v == best))
    return preds


def test_knn_matches_a_loop_oracle():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 5, generator=g), torch.randn(15, 5, generator=g)
    ty, sy = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (15,), generator=g)
    for k in (1, 4, 5):
        expected = np.mean(np.array(_knn_oracle(train, ty, test, k)) == sy.numpy())
        assert knn_accuracy(train, ty, test, sy, k) == expected


def _recall_oracle(a, b, k):
    def one(q, keys):
        hits = 0
        for i in range(len(q)):
            sims = [
                float(q[i] @ keys[j] / (q[i].norm() * keys[j].norm())) for j in range(len(keys))
            ]
            hits += sum(s > sims[i] for s in sims) < k
        return hits / len(q)

    return (one(a, b) + one(b, a)) / 2


def test_recall_matches_a_loop_oracle_in_both_directions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 4, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    got = recall_at_k(a, b, ks=(1, 3))
    assert got["recall@1"] == _recall_oracle(a, b, 1)
    assert got["recall@3"] == _recall_oracle(a, b, 3)
    assert recall_at_k(a, a) == {"recall@1": 1.0, "recall@5": 1.0}


def test_linear_probe_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(2)
    centers = 2 * torch.randn(4, 6, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    x = centers[y] + 1.5 * torch.randn(300, 6, generator=g)
    x[:, 5] = 3.0  # a constant feature must not break the standardisation
    train, test = slice(0, 200), slice(200, 300)
    ours = linear_probe_accuracy(x[train], y[train], x[test], y[test])
    scaler = StandardScaler().fit(x[train].numpy())
    ref = LogisticRegression(max_iter=5000).fit(
        scaler.transform(x[train].numpy()), y[train].numpy()
    )
    theirs = float((ref.predict(scaler.transform(x[test].numpy())) == y[test].numpy()).mean())
    assert abs(ours - theirs) <= 0.02
    assert 0.5 < ours < 1.0
    separable = torch.cat([torch.zeros(10, 2), torch.ones(10, 2)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    assert linear_probe_accuracy(separable, labels, separable, labels) == 1.0
