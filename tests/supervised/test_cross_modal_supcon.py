import pytest
import torch

import embedloss
from embedloss.multimodal.clip import clip_loss
from embedloss.supervised.cross_modal_supcon import CrossModalSupConLoss, cross_modal_supcon_loss
from embedloss.supervised.supcon import supcon_loss
from tests.supervised.supervised_oracles import cross_direction_eq2, mean_valid, supcon_eq2

TOL = {"rtol": 1e-9, "atol": 1e-9}
F64 = torch.float64
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])  # class 3 alone: no intra-modal positive


def _pair(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)


def _oracle(x, y, is_positive, mode, tau, base=None):
    """Legacy combination of the four L_out parts, each from the loop oracle."""
    factor = 1.0 if base is None else tau / base
    intra_x = supcon_eq2(x.unsqueeze(1), is_positive, temperature=tau)
    intra_y = supcon_eq2(y.unsqueeze(1), is_positive, temperature=tau)
    xy, v_xy = cross_direction_eq2(x, y, is_positive, temperature=tau)
    yx, v_yx = cross_direction_eq2(y, x, lambda i, j: is_positive(j, i), temperature=tau)
    cross = (mean_valid(xy, v_xy) + mean_valid(yx, v_yx)) / 2
    value = {
        "all": (intra_x + intra_y + cross) / 3,
        "intra": (intra_x + intra_y) / 2,
        "cross": cross,
    }[mode]
    return factor * value


@pytest.mark.parametrize("mode", ["all", "cross", "intra"])
@pytest.mark.parametrize("supervision", ["labels", "multi_hot", "mask"])
def test_matches_loop_oracle_value_and_gradient(mode, supervision):
    x, y = _pair(seed=1)
    if supervision == "labels":
        kwargs = {"labels": LABELS}
        is_pos = lambda i, j: bool(LABELS[i] == LABELS[j])  # noqa: E731
    elif supervision == "multi_hot":
        hot = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1], [1, 0]])
        kwargs = {"labels": hot}
        is_pos = lambda i, j: i == j or bool(((hot[i] > 0) & (hot[j] > 0)).any())  # noqa: E731
    else:
        mask = torch.tensor(
            [
                [1, 0, 1, 0, 0, 0],
                [0, 1, 0, 0, 0, 1],
                [0, 0, 0, 0, 0, 0],  # sample 2: no positive anywhere
                [1, 0, 0, 1, 0, 0],
                [0, 1, 0, 0, 1, 0],
                [0, 0, 0, 0, 0, 1],
            ]
        )
        kwargs = {"mask": mask}
        is_pos = lambda i, j: bool(mask[i, j])  # noqa: E731
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ours = cross_modal_supcon_loss(
        xs, ys, temperature=0.3, base_temperature=0.2, contrast_mode=mode, **kwargs
    )
    xo, yo = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    expected = _oracle(xo, yo, is_pos, mode, 0.3, 0.2)
    torch.testing.assert_close(ours, expected, **TOL)
    grads = torch.autograd.grad(ours, (xs, ys))
    expected_grads = torch.autograd.grad(expected, (xo, yo))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_gradcheck():
    x, y = _pair(n=4, d=3, seed=2)
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: cross_modal_supcon_loss(a, b, labels, temperature=0.5),
        (x.requires_grad_(True), y.requires_grad_(True)),
    )


def test_cross_with_distinct_labels_is_clip():
    x, y = _pair(seed=3)
    ours = cross_modal_supcon_loss(x, y, torch.arange(6), temperature=0.1, contrast_mode="cross")
    torch.testing.assert_close(ours, clip_loss(x, y, temperature=0.1), **TOL)
    with_labels = cross_modal_supcon_loss(x, y, LABELS, temperature=0.1, contrast_mode="cross")
    torch.testing.assert_close(with_labels, clip_loss(x, y, temperature=0.1, labels=LABELS), **TOL)


def test_intra_parts_are_single_view_supcon():
    x, y = _pair(seed=4)
    terms = CrossModalSupConLoss(temperature=0.2, contrast_mode="intra").compute(x, y, LABELS).terms
    assert "loss_cross_modal" not in terms and "accuracy" not in terms
    intra_x = supcon_loss(x, LABELS, temperature=0.2, reduction="none")
    intra_y = supcon_loss(y, LABELS, temperature=0.2, reduction="none")
    per_pair = cross_modal_supcon_loss(
        x, y, LABELS, temperature=0.2, contrast_mode="intra", reduction="none"
    )
    torch.testing.assert_close(per_pair, (intra_x + intra_y) / 2, **TOL)
    assert (intra_x != 0).tolist() == [True, True, True, False, True, False]
    both = cross_modal_supcon_loss(x, y, LABELS, temperature=0.2, contrast_mode="intra")
    expected = (
        supcon_loss(x, LABELS, temperature=0.2) + supcon_loss(y, LABELS, temperature=0.2)
    ) / 2
    torch.testing.assert_close(both, expected, **TOL)


def test_reduction_none_is_per_pair_weighted_sum():
    x, y = _pair(seed=5)
    per_pair = cross_modal_supcon_loss(x, y, LABELS, reduction="none")
    cross = cross_modal_supcon_loss(x, y, LABELS, contrast_mode="cross", reduction="none")
    expected = (
        supcon_loss(x, LABELS, reduction="none") / 3
        + supcon_loss(y, LABELS, reduction="none") / 3
        + cross / 3  # (image_to_text + text_to_image) / 2 per pair
    )
    assert per_pair.shape == (6,)
    torch.testing.assert_close(per_pair, expected, **TOL)
    torch.testing.assert_close(
        cross_modal_supcon_loss(x, y, LABELS, reduction="sum"), expected.sum(), **TOL
    )


def test_part_without_valid_anchor_contributes_zero():
    x, y = _pair(seed=6)
    distinct = torch.arange(6)
    out = CrossModalSupConLoss(temperature=0.1).compute(x, y, distinct)
    assert out.terms["loss_intra_image"].item() == 0.0
    assert out.terms["anchors_without_positives"].item() == 12.0
    torch.testing.assert_close(out.loss, clip_loss(x, y, temperature=0.1) / 3, **TOL)


def test_module_terms_and_values():
    x, y = _pair(seed=7)
    loss = CrossModalSupConLoss(temperature=0.2, base_temperature=0.1)
    out = loss.compute(x, y, LABELS)
    assert set(out.terms) == {
        "loss_intra_image",
        "loss_intra_text",
        "loss_cross_modal",
        "accuracy",
        "anchors_without_positives",
        "temperature",
    }
    f = 2.0
    intra = supcon_loss(x, LABELS, temperature=0.2).float() * f
    torch.testing.assert_close(out.terms["loss_intra_image"], intra)
    cross = cross_modal_supcon_loss(x, y, LABELS, temperature=0.2, contrast_mode="cross")
    torch.testing.assert_close(out.terms["loss_cross_modal"], cross.float() * f)
    assert out.terms["anchors_without_positives"].item() == 4.0  # samples 3 and 5, two modalities
    torch.testing.assert_close(
        out.loss,
        (out.terms["loss_intra_image"] + out.terms["loss_intra_text"]).double() / 3
        + out.terms["loss_cross_modal"].double() / 3,
        rtol=1e-6,
        atol=1e-6,
    )
    cross_only = CrossModalSupConLoss(contrast_mode="cross").compute(x, y, LABELS)
    assert "loss_intra_image" not in cross_only.terms and "accuracy" in cross_only.terms
    intra_only = CrossModalSupConLoss(contrast_mode="intra").compute(x, y, LABELS)
    assert "loss_cross_modal" not in intra_only.terms
    torch.testing.assert_close(loss(x, y, LABELS), out.loss)


def test_bfloat16_and_registry():
    x, y = _pair(seed=8)
    out = CrossModalSupConLoss()(x.bfloat16(), y.bfloat16(), LABELS)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert embedloss.loss_info("cross_modal_supcon").category == "supervised"
    assert embedloss.functional.cross_modal_supcon_loss is cross_modal_supcon_loss


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((), {}, ValueError, "needs labels or mask"),
        ((LABELS,), {"mask": torch.eye(6)}, ValueError, "either labels or mask"),
        ((torch.arange(4),), {}, ValueError, r"labels must have shape \(6,\)"),
        ((LABELS,), {"contrast_mode": "one"}, ValueError, "contrast_mode must be one of"),
        ((), {"mask": torch.eye(3)}, ValueError, r"mask must have shape \(6, 6\)"),
        (
            (),
            {"mask": torch.eye(6), "gather_distributed": True},
            ValueError,
            "explicit mask cannot be combined",
        ),
    ],
)
def test_bad_input(args, kwargs, error, match):
    x, y = _pair()
    with pytest.raises(error, match=match):
        cross_modal_supcon_loss(x, y, *args, **kwargs)


def test_bad_shapes():
    x, y = _pair()
    with pytest.raises(
        ValueError, match="image_embeddings and text_embeddings must have the same shape"
    ):
        cross_modal_supcon_loss(x, y[:4], LABELS)
    with pytest.raises(ValueError, match="contrast_mode must be one of 'all', 'cross', 'intra'"):
        CrossModalSupConLoss(contrast_mode="one")
    with pytest.raises(ValueError, match="base_temperature must be a finite number > 0"):
        CrossModalSupConLoss(base_temperature=-0.1)
