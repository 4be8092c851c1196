"""Retrieval metrics of Musgrave et al. 2020: loop oracles and pytorch-metric-learning parity."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from embedloss.metrics import map_at_r, precision_at_1, r_precision, retrieval_metrics


def _oracle(queries, labels, reference=None, reference_labels=None):
    """The definitions (Musgrave et al. 2020, §3.2), one query at a time, cosine similarity."""
    own = reference is None
    ref = queries if own else reference
    ref_labels = labels if own else reference_labels
    totals, counted = [0.0, 0.0, 0.0], 0
    for i in range(queries.shape[0]):
        cands = [j for j in range(ref.shape[0]) if not (own and j == i)]
        sim = {
            j: float(torch.nn.functional.cosine_similarity(queries[i], ref[j], dim=0))
            for j in cands
        }
        ranked = sorted(cands, key=lambda j: -sim[j])
        rel = [int(ref_labels[j]) == int(labels[i]) for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        counted += 1
        totals[0] += rel[0]
        totals[1] += sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for k, is_rel in enumerate(rel[:r], start=1):
            if is_rel:
                hits += 1
                ap += hits / k
        totals[2] += ap / r
    return [t / counted for t in totals]


def _data(n=60, d=8, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    x = centres[labels] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64).float()
    return x.double(), labels


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_matches_the_definitions(chunk_size):
    x, y = _data()
    y[0] = 99  # a lone label: left out of every mean
    got = retrieval_metrics(x, y, chunk_size=chunk_size)
    expected = _oracle(x, y)
    assert list(got) == ["precision_at_1", "r_precision", "map_at_r"]
    for value, oracle in zip(got.values(), expected, strict=True):
        assert value == pytest.approx(oracle, abs=1e-12)
    assert precision_at_1(x, y) == pytest.approx(got["precision_at_1"], abs=1e-12)
    assert r_precision(x, y) == pytest.approx(got["r_precision"], abs=1e-12)
    assert map_at_r(x, y) == pytest.approx(got["map_at_r"], abs=1e-12)


def test_separate_reference_set():
    x, y = _data(seed=1)
    ref, ref_y = _data(n=40, seed=2)
    got = retrieval_metrics(x, y, reference=ref, reference_labels=ref_y)
    expected = _oracle(x, y, ref, ref_y)
    assert list(got.values()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("distance", "pml_distance"),
    [("cosine", CosineSimilarity()), ("euclidean", LpDistance(normalize_embeddings=False))],
)
def test_parity_with_pytorch_metric_learning_accuracy_calculator(distance, pml_distance):
    # AccuracyCalculator with a torch k-NN (CustomKNN: no faiss) over the queries themselves
    # (ref_includes_query: each query is removed from its own neighbours, lone labels dropped);
    # its keys are "precision_at_1", "r_precision" and "mean_average_precision_at_r".
    x, y = _data(n=80, seed=3)
    y[:2] = torch.tensor([50, 51])  # lone labels
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        knn_func=CustomKNN(pml_distance),
        device=torch.device("cpu"),
    )
    expected = calc.get_accuracy(x, y)
    got = retrieval_metrics(x, y, distance=distance)
    assert got["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-12)
    assert got["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-12)
    assert got["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-12)


def test_perfect_and_ties_are_deterministic():
    x = torch.eye(3).repeat_interleave(3, dim=0)  # three identical copies of each label
    y = torch.arange(3).repeat_interleave(3)
    assert retrieval_metrics(x, y) == {"precision_at_1": 1.0, "r_precision": 1.0, "map_at_r": 1.0}
    collapsed = torch.ones(6, 4)  # all tied: closest first in reference order
    got = retrieval_metrics(collapsed, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert got == retrieval_metrics(collapsed, torch.tensor([0, 1, 0, 1, 0, 1]), chunk_size=1)


def test_bad_inputs():
    x, y = _data(n=6)
    with pytest.raises(ValueError, match="no query has a reference with its label"):
        retrieval_metrics(x, torch.arange(6))
    with pytest.raises(ValueError, match="reference and reference_labels must be given together"):
        retrieval_metrics(x, y, reference=x)
    with pytest.raises(ValueError, match="labels must have shape"):
        retrieval_metrics(x, y[:3])
    with pytest.raises(ValueError, match="distance must be one of"):
        retrieval_metrics(x, y, distance="manhattan")
    with pytest.raises(ValueError, match="same embedding dimension"):
        retrieval_metrics(x, y, reference=x[:, :3], reference_labels=y)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retrieval_metrics(x, y, chunk_size=0)
