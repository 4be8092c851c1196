"""SupCon (class, consolidation name, function), cross-entropy and MSE, driven like the legacy trainers."""

import pytest
import torch
import torch.nn.functional as F

import embedloss
from embedloss import functional as EF
from embedloss.compat import (
    CrossEntropyLoss,
    MeanSquaredError,
    SupervisedContrastiveLoss,
    SupervisedLoss,
    supervised_contrastive_loss,
)
from embedloss.metrics import recall_at_k

from .helpers import assert_same, trainer_batch

LABELS = torch.tensor([0, 1, 0, 2, 1, 2])
KEYS = {"loss", "intra_vision_loss", "intra_text_loss", "cross_modal_loss", "contrastive_accuracy"}


@pytest.mark.parametrize("mode", ["all", "cross", "intra"])
def test_supervised_contrastive_is_cross_modal_supcon(mode):
    batch = trainer_batch(labels=LABELS)
    out = SupervisedContrastiveLoss(temperature=0.1, contrast_mode=mode, base_temperature=0.07)(
        **batch
    )
    assert set(out) == KEYS
    v, t = batch["vision_features"], batch["text_features"]
    new = embedloss.CrossModalSupConLoss(temperature=0.1, base_temperature=0.07, contrast_mode=mode)
    ref = new.compute(v, t, LABELS)
    assert_same(out["loss"], ref.loss, (v, t))
    for legacy, term in [
        ("intra_vision_loss", "loss_intra_image"),
        ("intra_text_loss", "loss_intra_text"),
        ("cross_modal_loss", "loss_cross_modal"),
    ]:
        assert out[legacy].item() == pytest.approx(ref.terms.get(term, torch.tensor(0.0)).item())


def test_contrastive_accuracy_is_the_cross_modal_top1_in_every_mode():
    batch = trainer_batch(labels=LABELS)
    v, t = batch["vision_features"], batch["text_features"]
    cross = SupervisedContrastiveLoss(contrast_mode="cross")(**batch)["contrastive_accuracy"]
    ref = embedloss.CrossModalSupConLoss(contrast_mode="cross").compute(v, t, LABELS)
    assert cross.item() == pytest.approx(ref.terms["accuracy"].item())
    intra = SupervisedContrastiveLoss(contrast_mode="intra")(**batch)["contrastive_accuracy"]
    assert intra.item() == pytest.approx(
        recall_at_k(v.detach(), t.detach(), k=1, labels=LABELS)["recall@1"]
    )


def test_similarity_scores_threshold_is_an_explicit_mask():
    batch = trainer_batch()
    v, t = batch["vision_features"], batch["text_features"]
    scores = torch.rand(6, 6, generator=torch.Generator().manual_seed(3))
    scores.fill_diagonal_(1.0)
    out = SupervisedContrastiveLoss(similarity_threshold=0.6)(**batch, similarity_scores=scores)
    ref = embedloss.CrossModalSupConLoss(temperature=0.07, base_temperature=0.07)(
        v, t, mask=scores >= 0.6
    )
    assert_same(out["loss"], ref, (v, t))


def test_without_supervision_each_pair_is_its_own_class():
    batch = trainer_batch()
    v, t = batch["vision_features"], batch["text_features"]
    out = SupervisedContrastiveLoss(contrast_mode="cross", temperature=0.2, base_temperature=0.2)(
        **batch
    )
    # Cross-modal SupCon with one positive per anchor is CLIP.
    assert_same(out["loss"], embedloss.CLIPLoss(temperature=0.2)(v, t), (v, t))


def test_multi_hot_and_column_labels():
    batch = trainer_batch()
    v, t = batch["vision_features"], batch["text_features"]
    hot = F.one_hot(LABELS, 3)
    out = SupervisedLoss()(**batch, labels=hot)
    ref = embedloss.CrossModalSupConLoss(temperature=0.07, base_temperature=0.07)(v, t, hot)
    assert_same(out["loss"], ref, (v, t))
    column = SupervisedContrastiveLoss()(**batch, labels=LABELS[:, None])["loss"]
    assert column.item() == pytest.approx(
        SupervisedContrastiveLoss()(**batch, labels=LABELS)["loss"].item()
    )


def test_class_weights_are_ignored_with_a_warning():
    from embedloss.compat import IgnoredArgumentWarning

    from .conftest import of, recorded

    with recorded() as caught:
        loss = SupervisedContrastiveLoss(use_class_weights=True)
        loss(**trainer_batch(labels=LABELS), class_weights=torch.ones(3))
        loss(**trainer_batch(labels=LABELS), class_weights=torch.ones(3))
    msgs = [str(w.message) for w in of(caught, IgnoredArgumentWarning)]
    assert len(msgs) == 2 and "use_class_weights=True" in msgs[0] and "class_weights=" in msgs[1]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_supervised_contrastive_loss_function_is_supcon_over_both_modalities(reduction):
    batch = trainer_batch()
    v, t = batch["vision_features"], batch["text_features"]
    got = supervised_contrastive_loss(v, t, LABELS, temperature=0.1, reduction=reduction)
    ref = EF.supcon_loss(torch.stack([v, t], 1), LABELS, temperature=0.1, reduction=reduction)
    assert_same(got.sum(), ref.sum(), (v, t))
    # and it is NT-Xent with labels over the 2N embeddings
    torch.testing.assert_close(
        got.sum(), EF.simclr_loss(v, t, temperature=0.1, labels=LABELS, reduction=reduction).sum()
    )


def test_supervised_contrastive_loss_stays_finite_for_large_norms_and_small_tau():
    v, t = 1e4 * torch.randn(6, 8), 1e4 * torch.randn(6, 8)
    assert torch.isfinite(supervised_contrastive_loss(v, t, LABELS, temperature=1e-3))


def test_cross_entropy_defaults_to_smoothing_and_applies_class_weights_with_it():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (8,), generator=g)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    assert_same(
        CrossEntropyLoss()(logits, y, logits=None),
        F.cross_entropy(logits, y, label_smoothing=0.1),
        (logits,),
    )
    got = CrossEntropyLoss(smoothing=0.2, weight=w)(logits, y)
    assert_same(got, F.cross_entropy(logits, y, weight=w, label_smoothing=0.2), (logits,))
    s = torch.rand(8, generator=g, dtype=torch.float64)
    got = CrossEntropyLoss(reduction="none")(logits, y, sample_weight=s)
    ref = s * F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    assert_same(got.sum(), ref.sum(), (logits,))
    torch.testing.assert_close(got, ref)


def test_cross_entropy_sample_weight_keeps_the_legacy_plain_mean():
    # legacy: loss = (per-sample CE · sample_weight).mean() — divided by N, not by Σ weights
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,), generator=g)
    s = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    per = F.cross_entropy(logits, y, weight=w, label_smoothing=0.1, reduction="none")
    assert_same(
        CrossEntropyLoss(weight=w)(logits, y, sample_weight=s), (s * per).sum() / 6, (logits,)
    )
    assert_same(
        CrossEntropyLoss(weight=w, reduction="sum")(logits, y, sample_weight=s),
        (s * per).sum(),
        (logits,),
    )


def _legacy_mse(x, y, s=None, clip=None, reduction="mean"):
    per = (x - y) ** 2  # element-wise, (N, *)
    if s is not None:
        per = per * s.view(-1, *([1] * (per.dim() - 1)))
    if clip is not None:
        per = torch.clamp(per, max=clip)
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mean_squared_error_keeps_the_legacy_semantics(reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    for weights, clip in ((None, None), (s, None), (s, 1.0), (None, 0.5)):
        got = MeanSquaredError(reduction=reduction, clip_grad=clip)(x, y, weights)
        expected = _legacy_mse(x, y, weights, clip, reduction)
        assert got.shape == expected.shape
        assert_same(got.sum(), expected.sum(), (x,))
    assert_same(MeanSquaredError()(x, y), F.mse_loss(x, y), (x,))
    # the clamp zeroes the gradient of the clamped elements, as the legacy loss did
    (grad,) = torch.autograd.grad(MeanSquaredError(clip_grad=0.1)(x, y), (x,))
    assert (grad[(x - y) ** 2 > 0.1] == 0).all()
