import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers

from embedloss import ContrastiveMarginLoss
from embedloss.functional import contrastive_margin_loss
from embedloss.metric_learning.contrastive_margin import contrastive_rows
from embedloss.ops.miners import multi_similarity_pairs
from embedloss.ops.pair_losses import PairOptions, labelled_pair_loss, mined
from tests.helpers import assert_close_with_grads
from tests.metric_learning.helpers import batch, pml_grad
from tests.metric_learning.oracles import contrastive_oracle


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
def test_matches_the_loop_oracle(squared, distance):
    x, y = batch(seed=10)
    got = contrastive_margin_loss(
        x, y, margin=0.8, pos_margin=0.1, squared=squared, distance=distance
    )
    expected = contrastive_oracle(x, y, 0.8, 0.1, squared, distance)
    assert_close_with_grads(got, expected, (x,))


def test_tiled_equals_dense():
    x, y = batch(n=21, d=6, classes=5, seed=11)
    dense = contrastive_margin_loss(x, y, chunk_size=None)
    for chunk in (1, 5):
        assert_close_with_grads(contrastive_margin_loss(x, y, chunk_size=chunk), dense, (x,))


@pytest.mark.parametrize(
    ("distance", "pml_distance", "to_pml"),
    [
        # PML's CosineSimilarity is a similarity s = 1 − d: [d − m⁺]₊ = [(1 − m⁺) − s]₊ and
        # [m − d]₊ = [s − (1 − m)]₊, so its margins are 1 − ours.
        ("cosine", distances.CosineSimilarity(), lambda m: 1 - m),
        ("euclidean", distances.LpDistance(), lambda m: m),
    ],
)
def test_parity_with_pytorch_metric_learning(distance, pml_distance, to_pml):
    # PML's ContrastiveLoss is the hinge form (squared=False) over the same ordered pairs;
    # SumReducer makes its reduction a plain sum (its default averages positive and negative
    # pairs with a non-zero loss separately).
    x, y = batch(n=12, seed=12)
    pml = losses.ContrastiveLoss(
        pos_margin=to_pml(0.2),
        neg_margin=to_pml(0.9),
        distance=pml_distance,
        reducer=reducers.SumReducer(),
    )
    ref = pml(x, y)
    got = contrastive_margin_loss(
        x, y, margin=0.9, pos_margin=0.2, squared=False, distance=distance, reduction="sum"
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)


def test_any_pair_loss_takes_any_miner():
    # The contrastive rows restricted to the multi-similarity miner's pairs equal PML's
    # ContrastiveLoss fed the pairs of its MultiSimilarityMiner (both on cosine similarity).
    x, y = batch(n=12, seed=13)
    pml_pairs = miners.MultiSimilarityMiner(epsilon=0.2)(x, y)
    pml = losses.ContrastiveLoss(  # margins 1 − ours, as in the parity test above
        pos_margin=1.0,
        neg_margin=0.5,
        distance=distances.CosineSimilarity(),
        reducer=reducers.SumReducer(),
    )
    ref = pml(x, y, pml_pairs)
    rows = mined(
        lambda d, p, n: contrastive_rows(d, p, n, margin=0.5, pos_margin=0.0, squared=False),
        lambda d, p, n: multi_similarity_pairs(1 - d, p, n, 0.2),  # similarity = 1 − d
    )
    for chunk in (None, 5):
        options = PairOptions.create(reduction="sum", chunk_size=chunk)
        got = labelled_pair_loss(x, y, options, rows).loss
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)


def test_closed_form_terms_and_reductions():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    # Positives coincide (0); negatives at cosine distance 1: ½·(1.5 − 1)² each, 4 of 6 pairs.
    assert contrastive_margin_loss(z, y, margin=1.5).item() == pytest.approx(4 * 0.125 / 6)
    x, labels = batch(seed=14)
    out = ContrastiveMarginLoss().compute(x, labels)
    assert out.terms["pairs"].item() == 10 * 9
    per = ContrastiveMarginLoss(reduction="none")(x, labels)
    torch.testing.assert_close(per.sum() / 90, out.loss)
    assert "pos_margin=0.0" in repr(ContrastiveMarginLoss())


def test_bad_inputs():
    with pytest.raises(ValueError, match="pos_margin must be below margin"):
        ContrastiveMarginLoss(margin=0.2, pos_margin=0.2)
    with pytest.raises(TypeError, match="squared must be a bool"):
        ContrastiveMarginLoss(squared=1)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        contrastive_margin_loss(*batch(), margin=float("inf"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ContrastiveMarginLoss(reduction="avg")
