import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers

from embedloss import TripletLoss, create_loss
from embedloss.functional import triplet_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.metric_learning.helpers import batch, pml_grad
from tests.metric_learning.oracles import triplet_oracle

MININGS = ["batch_all", "batch_hard", "semi_hard"]
DISTANCES = ["cosine", "dot", "euclidean", "squared_euclidean"]


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_the_loop_oracle(mining, distance):
    x, y = batch(seed=1)
    normalize = distance != "dot"  # also covers raw dot products
    got = triplet_loss(x, y, margin=0.3, mining=mining, distance=distance, normalize=normalize)
    expected = triplet_oracle(x, y, 0.3, mining, distance, normalize)
    assert_close_with_grads(got, expected, (x,))


@pytest.mark.parametrize("mining", MININGS)
def test_tiled_equals_dense(mining):
    x, y = batch(n=23, d=5, classes=4, seed=2)
    dense = triplet_loss(x, y, mining=mining, chunk_size=None)
    for chunk in (1, 4, 22):
        tiled = triplet_loss(x, y, mining=mining, chunk_size=chunk)
        assert_close_with_grads(tiled, dense, (x,), tol=1e-12)
    none_dense = triplet_loss(x, y, mining=mining, chunk_size=None, reduction="none")
    none_tiled = triplet_loss(x, y, mining=mining, chunk_size=5, reduction="none")
    weights = torch.linspace(0.1, 2.0, 23, dtype=torch.float64)  # an arbitrary upstream gradient
    assert_close_with_grads((none_tiled * weights).sum(), (none_dense * weights).sum(), (x,))


@pytest.mark.parametrize(
    ("distance", "pml_distance"),
    [
        ("cosine", distances.CosineSimilarity()),
        ("euclidean", distances.LpDistance()),
        ("squared_euclidean", distances.LpDistance(power=2)),
    ],
)
def test_batch_all_parity_with_pytorch_metric_learning(distance, pml_distance):
    # PML's TripletMarginLoss without a miner scores every triplet and averages those with a
    # positive loss (AvgNonZeroReducer). Its CosineSimilarity is a similarity: the violation
    # s_an − s_ap + m equals ours with d = 1 − cos. LpDistance normalises by default.
    x, y = batch(n=12, seed=3)
    ref = losses.TripletMarginLoss(margin=0.25, distance=pml_distance)(x, y)
    got = triplet_loss(x, y, margin=0.25, mining="batch_all", distance=distance)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("distance", "pml_distance"),
    [("cosine", distances.CosineSimilarity()), ("euclidean", distances.LpDistance())],
)
def test_batch_hard_parity_with_pytorch_metric_learning(distance, pml_distance):
    # PML's BatchHardMiner gives one (anchor, hardest positive, hardest negative) per anchor
    # that has both; MeanReducer averages over them (its default AvgNonZeroReducer would skip
    # the anchors whose hardest triplet is already satisfied; Hermans et al. average all).
    x, y = batch(n=12, seed=4)
    triplets = miners.BatchHardMiner(distance=pml_distance)(x, y)
    pml = losses.TripletMarginLoss(
        margin=0.2, distance=pml_distance, reducer=reducers.MeanReducer()
    )
    ref = pml(x, y, triplets)
    got = triplet_loss(x, y, margin=0.2, mining="batch_hard", distance=distance)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pml_grad(got, x), pml_grad(ref, x), rtol=1e-9, atol=1e-10)


def test_closed_forms_and_reductions():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    for mining in MININGS:  # separated classes, d_ap = 0 and d_an = 1 > m: no loss
        assert triplet_loss(z, y, mining=mining, margin=0.5).item() == 0.0
    same = torch.ones(4, 3, dtype=torch.float64)  # collapsed: every triplet costs the margin
    for mining in MININGS:
        assert triplet_loss(same, y, mining=mining, margin=0.3).item() == pytest.approx(0.3)
    x, labels = batch(seed=5)
    loss = TripletLoss(mining="batch_all")
    out = loss.compute(x, labels)
    total = TripletLoss(mining="batch_all", reduction="sum")(x, labels)
    per_anchor = TripletLoss(mining="batch_all", reduction="none")(x, labels)
    torch.testing.assert_close(per_anchor.sum(), total)
    torch.testing.assert_close(out.loss, total / out.terms["triplets"].double())
    assert set(out.terms) == {"triplets", "anchors_without_terms"}


def test_anchors_without_positive_or_negative_are_left_out():
    x = randn64(5, 3, seed=6)
    y = torch.tensor([0, 0, 1, 2, 2])  # anchor 2 has no positive
    out = TripletLoss(reduction="none").compute(x, y)
    assert out.loss[2].item() == 0.0 and out.terms["anchors_without_terms"].item() == 1.0
    single = triplet_loss(x, torch.zeros(5, dtype=torch.long))  # no negatives at all
    assert single.item() == 0.0
    single.backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck_and_registry():
    x, y = batch(n=6, d=3, seed=7)
    for mining in MININGS:
        assert torch.autograd.gradcheck(lambda t, m=mining: triplet_loss(t, y, mining=m), (x,))
    loss = create_loss("triplet_margin", margin=0.1, mining="semi_hard", distance="euclidean")
    assert isinstance(loss, TripletLoss) and loss.margin == 0.1
    assert "mining='semi_hard'" in repr(loss)


def test_tiled_path_runs_on_the_meta_device():
    x = torch.randn(40, 8, device="meta", requires_grad=True)
    y = torch.zeros(40, dtype=torch.long, device="meta")
    for mining in MININGS:
        loss = triplet_loss(x, y, mining=mining, chunk_size=16)
        loss.backward()
        assert loss.device.type == "meta"


def test_bad_inputs():
    x, y = batch()
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        TripletLoss(margin=-0.1)
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="distance must be one of"):
        triplet_loss(x, y, distance="manhattan")
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        triplet_loss(x, y[:5])
    with pytest.raises(TypeError, match="labels must be an integer or bool tensor"):
        triplet_loss(x, y.double())
    with pytest.raises(ValueError, match="embeddings must have shape"):
        triplet_loss(x[0], y)
    with pytest.raises(TypeError, match="chunk_size must be None, 'auto' or an int"):
        TripletLoss(chunk_size="big")
