import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embedloss import FeatureConsistencyLoss, create_loss
from embedloss.functional import feature_consistency_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.multimodal.oracles import feature_consistency_oracle

DISTANCES = ["cosine", "l2", "l1", "smooth_l1"]


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_loop_oracle(distance, normalize):
    f, r = randn64(5, 4, seed=1), randn64(5, 4, seed=2)
    beta = 0.3 if normalize else 0.8  # both branches of the Huber distance are exercised
    assert_close_with_grads(
        feature_consistency_loss(
            f,
            r,
            distance=distance,
            normalize=normalize,
            smooth_l1_beta=beta,
            detach_reference=False,
        ),
        feature_consistency_oracle(f, r, distance, normalize, beta),
        (f, r),
    )


def test_parity_with_torch_functional_losses():
    f, r = randn64(6, 5, seed=3, requires_grad=False), randn64(6, 5, seed=4, requires_grad=False)
    fn, rn = F.normalize(f, dim=1), F.normalize(r, dim=1)
    ones = torch.ones(6, dtype=torch.float64)
    cases = {
        "cosine": F.cosine_embedding_loss(f, r, ones),
        "l2": F.mse_loss(fn, rn),
        "l1": F.l1_loss(fn, rn),
        "smooth_l1": F.smooth_l1_loss(fn, rn, beta=0.05),
    }
    for distance, expected in cases.items():
        got = feature_consistency_loss(f, r, distance=distance, smooth_l1_beta=0.05)
        torch.testing.assert_close(got, expected, msg=distance)
    torch.testing.assert_close(
        feature_consistency_loss(f, r, distance="l2", normalize=False), F.mse_loss(f, r)
    )


def test_closed_forms():
    f = randn64(4, 3, seed=5, requires_grad=False)
    for distance in DISTANCES:  # identical features: zero for every distance
        assert feature_consistency_loss(f, f, distance=distance).item() == pytest.approx(
            0.0, abs=1e-12
        )
    # Opposite features: cosine distance 2; on the unit sphere ‖f − r‖² = 4, so l2 = 4/D.
    assert feature_consistency_loss(f, -f).item() == pytest.approx(2.0, rel=1e-12)
    assert feature_consistency_loss(f, -f, distance="l2").item() == pytest.approx(
        4.0 / 3, rel=1e-12
    )
    # Scale invariance of cosine.
    r = randn64(4, 3, seed=6, requires_grad=False)
    torch.testing.assert_close(
        feature_consistency_loss(3 * f, 0.1 * r), feature_consistency_loss(f, r)
    )


def test_reference_is_detached_by_default():
    f, r = randn64(4, 3, seed=7), randn64(4, 3, seed=8)
    feature_consistency_loss(f, r).backward()
    assert f.grad is not None and r.grad is None
    feature_consistency_loss(f, r, detach_reference=False).backward()
    assert r.grad is not None


def test_reductions():
    f, r = randn64(5, 4, seed=9, requires_grad=False), randn64(5, 4, seed=10, requires_grad=False)
    per = feature_consistency_loss(f, r, reduction="none")
    torch.testing.assert_close(per, 1 - F.cosine_similarity(f, r))
    torch.testing.assert_close(feature_consistency_loss(f, r, reduction="sum"), per.sum())


def test_gradcheck():
    f, r = randn64(3, 4, seed=11), randn64(3, 4, seed=12)
    for distance in DISTANCES:
        assert torch.autograd.gradcheck(
            lambda a, b, d=distance: feature_consistency_loss(
                a, b, distance=d, detach_reference=False
            ),
            (f, r),
        )


class _Encoder(nn.Module):
    def __init__(self, d_in=4, d_out=6, dropout=0.0):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.linear(x))


def test_reference_models_snapshot_frozen_and_eval_after_train():
    torch.manual_seed(0)
    live = _Encoder(dropout=0.5)
    loss = FeatureConsistencyLoss(reference_models={"vision": live})
    ref = loss.reference_models["vision"]
    assert ref is not live and all(
        p.requires_grad for p in live.parameters()
    )  # given module untouched
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert loss.training and not ref.training and not ref.drop.training
    x = torch.randn(8, 4)
    # Eval mode: dropout off, so the reference is deterministic and equals the clean snapshot.
    a = loss({"vision": live.linear(x)}, inputs={"vision": x})
    b = loss({"vision": live.linear(x)}, inputs={"vision": x})
    assert a.item() == pytest.approx(0.0, abs=1e-6) and a.item() == b.item()
    # Training the live model moves it away from the frozen snapshot; the snapshot never gets a gradient.
    opt = torch.optim.SGD([*live.parameters(), *loss.parameters()], lr=1.0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    feats = live.linear(x)
    (loss({"vision": feats}, inputs={"vision": x}) - feats.sum()).backward()
    opt.step()
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert loss({"vision": live.linear(x)}, inputs={"vision": x}).item() > 1e-3


def test_copy_reference_models_false_freezes_in_place():
    enc = _Encoder()
    loss = FeatureConsistencyLoss(reference_models=enc, copy_reference_models=False)
    assert loss.reference_models["default"] is enc
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.randn(3, 4)
    assert loss(enc(x), inputs=x).item() == pytest.approx(0.0, abs=1e-6)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    loss = FeatureConsistencyLoss(
        reference_models={"vision": _Encoder(), "text": _Encoder(3, 6)}, distance="l2"
    )
    assert {k.split(".")[1] for k in loss.state_dict()} == {"vision", "text"}
    fresh = FeatureConsistencyLoss(
        reference_models={"vision": _Encoder(), "text": _Encoder(3, 6)}, distance="l2"
    )
    feats = {"vision": torch.randn(4, 6), "text": torch.randn(4, 6)}
    ins = {"vision": torch.randn(4, 4), "text": torch.randn(4, 3)}
    assert fresh(feats, inputs=ins).item() != loss(feats, inputs=ins).item()
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh(feats, inputs=ins), loss(feats, inputs=ins))
    assert not fresh.reference_models["text"].training


def test_several_modalities_weighted_sum_and_terms():
    torch.manual_seed(2)
    vision, text = _Encoder(), _Encoder(3, 6)
    loss = FeatureConsistencyLoss(
        reference_models={"vision": vision, "text": text}, weights={"vision": 2.0, "text": 0.5}
    )
    feats = {"vision": torch.randn(5, 6), "text": torch.randn(5, 6)}
    ins = {"vision": torch.randn(5, 4), "text": torch.randn(5, 3)}
    out = loss.compute(feats, inputs=ins)
    with torch.no_grad():
        lv = feature_consistency_loss(feats["vision"], vision(ins["vision"]))
        lt = feature_consistency_loss(feats["text"], text(ins["text"]))
    torch.testing.assert_close(out.loss, 2.0 * lv + 0.5 * lt)
    torch.testing.assert_close(out.terms["consistency_vision"], lv)
    torch.testing.assert_close(out.terms["consistency_text"], lt)
    # An explicit reference takes precedence over the model; other modalities still use theirs.
    explicit = torch.randn(5, 6)
    mixed = loss(
        {"vision": feats["vision"], "text": feats["text"]},
        {"vision": explicit},
        inputs={"text": ins["text"]},
    )
    torch.testing.assert_close(
        mixed, 2.0 * feature_consistency_loss(feats["vision"], explicit) + 0.5 * lt
    )
    # Only one modality passed: its own weighted term.
    torch.testing.assert_close(
        loss({"text": feats["text"]}, inputs={"text": ins["text"]}), 0.5 * lt
    )
    # reduction none: per-sample weighted sum.
    none = FeatureConsistencyLoss(
        reference_models={"vision": vision, "text": text},
        weights={"vision": 2.0, "text": 0.5},
        reduction="none",
    )
    per = none(feats, inputs=ins)
    assert per.shape == (5,)
    torch.testing.assert_close(per.mean(), out.loss)


def test_explicit_tensors_module():
    f, r = torch.randn(4, 8), torch.randn(4, 8)
    loss = create_loss("feature_consistency", distance="smooth_l1", normalize=False)
    out = loss.compute(f, r)
    torch.testing.assert_close(out.loss, F.smooth_l1_loss(f, r))
    assert list(out.terms) == ["consistency"]
    assert "smooth_l1" in repr(loss)
    assert loss(f.bfloat16(), r.bfloat16()).dtype == torch.float32


def test_bad_inputs():
    f = torch.randn(3, 4)
    with pytest.raises(
        ValueError, match=r"distance must be one of 'cosine', 'l2', 'l1', 'smooth_l1'; got 'l3'"
    ):
        FeatureConsistencyLoss(distance="l3")
    with pytest.raises(
        ValueError, match=r"weights\['text'\] must be a finite number in \[0.0, inf\], got -1"
    ):
        FeatureConsistencyLoss(weights={"text": -1})
    with pytest.raises(TypeError, match=r"weights must be a mapping modality → float, got list"):
        FeatureConsistencyLoss(weights=[1.0])
    with pytest.raises(
        TypeError, match=r"reference_models\['vision'\] must be an nn.Module, got function"
    ):
        FeatureConsistencyLoss(reference_models={"vision": lambda x: x})
    with pytest.raises(
        TypeError, match=r"reference_models must be keyed by modality names \(str\), got key 0"
    ):
        FeatureConsistencyLoss(reference_models={0: nn.Identity()})
    with pytest.raises(TypeError, match="normalize must be a bool"):
        FeatureConsistencyLoss(normalize="yes")
    with pytest.raises(
        ValueError,
        match=r"no reference for features: pass reference_features or construct the loss with reference_models for 'default'",
    ):
        FeatureConsistencyLoss()(f)
    with pytest.raises(
        ValueError,
        match=r"features and reference_features must have the same shape, got \(3, 4\) and \(3, 5\)",
    ):
        FeatureConsistencyLoss()(f, torch.randn(3, 5))
    with pytest.raises(
        TypeError, match="features and reference_features must both be tensors or both be mappings"
    ):
        FeatureConsistencyLoss()(f, {"vision": f})
    loss = FeatureConsistencyLoss(
        reference_models={"vision": nn.Identity()}, weights={"vision": 1.0}
    )
    with pytest.raises(
        ValueError, match=r"inputs\['vision'\] is needed to run reference_models\['vision'\]"
    ):
        loss({"vision": f})
    with pytest.raises(
        ValueError, match=r"inputs has modality 'text' that is not in features \['vision'\]"
    ):
        loss({"vision": f}, inputs={"vision": f, "text": f})
    with pytest.raises(
        ValueError,
        match=r"reference_features has modality 'txt' that is not in features \['vision'\]",
    ):
        loss({"vision": f}, {"txt": f})
    with pytest.raises(TypeError, match=r"inputs must be a mapping modality → input, got a tensor"):
        loss({"vision": f}, inputs=f)
    with pytest.raises(
        ValueError, match=r"features must name at least one modality, got an empty mapping"
    ):
        loss({})
    with pytest.raises(
        ValueError,
        match=r"weights has modality 'txt' that is neither in features \['vision'\] nor in reference_models \['vision'\]",
    ):
        FeatureConsistencyLoss(reference_models={"vision": nn.Identity()}, weights={"txt": 1.0})(
            {"vision": f}, inputs={"vision": f}
        )
    with pytest.raises(
        ValueError,
        match=r"features\['vision'\] and reference_features\['vision'\] must have the same shape, got \(3, 4\) and \(3, 2\)",
    ):
        FeatureConsistencyLoss(reference_models={"vision": nn.Linear(4, 2)})(
            {"vision": f}, inputs={"vision": f}
        )

    class Dict(nn.Module):
        def forward(self, x):
            return {"features": x}

    with pytest.raises(
        TypeError, match=r"reference_models must return a tensor of features, got dict"
    ):
        FeatureConsistencyLoss(reference_models=Dict())(f, inputs=f)
    with pytest.raises(
        ValueError,
        match=r"reduction='none' needs the same batch size N in every modality, got a: 3, b: 2",
    ):
        FeatureConsistencyLoss(reduction="none")({"a": f, "b": f[:2]}, {"a": f, "b": f[:2]})


def test_forward_is_the_loss_of_compute_for_several_modalities():
    torch.manual_seed(3)
    loss = FeatureConsistencyLoss(
        reference_models={"vision": _Encoder(), "text": _Encoder(3, 6)},
        weights={"text": 0.25},
        distance="l1",
    )
    feats = {"vision": torch.randn(4, 6), "text": torch.randn(4, 6)}
    ins = {"vision": torch.randn(4, 4), "text": torch.randn(4, 3)}
    out = loss.compute(feats, inputs=ins)
    torch.testing.assert_close(loss(feats, inputs=ins), out.loss)
    expected = out.terms["consistency_vision"] + 0.25 * out.terms["consistency_text"]
    torch.testing.assert_close(out.loss, expected)
