import math

import pytest
import torch

import embedloss
from embedloss.composite.mixed_multimodal import MixedMultimodalLoss, mixed_multimodal_loss
from embedloss.contrastive.simclr import simclr_loss
from embedloss.multimodal.clip import clip_loss
from embedloss.supervised.supcon import supcon_loss

TOL = {"rtol": 1e-9, "atol": 1e-9}
F64 = torch.float64
LABELS = torch.tensor([0, 1, 0, 2, 1, 2])


def _pair(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)


def _l_out(anchor, keys, positives):
    """−mean_{p} log( exp(a·k_p) / Σ_k exp(a·k) ) for one anchor, by explicit sums."""
    logits = [anchor @ k for k in keys]
    top = max(float(v.detach()) for v in logits)
    log_den = top + torch.log(sum(torch.exp(v - top) for v in logits))
    return -sum(logits[p] - log_den for p in positives) / len(positives)


def _oracle(x, y, labels, tau, w_clip, w_nt, w_sup, pair_ids=None):
    """The three parts from their papers' equations, looped over anchors."""
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    n = x.shape[0]
    ids = list(range(n)) if pair_ids is None else pair_ids.tolist()
    # CLIP (Radford et al. 2021): the two directions of the N×N logits, averaged
    i2t = [_l_out(x[i] / tau, y, [j for j in range(n) if ids[j] == ids[i]]) for i in range(n)]
    t2i = [_l_out(y[i] / tau, x, [j for j in range(n) if ids[j] == ids[i]]) for i in range(n)]
    clip = (sum(i2t) / n + sum(t2i) / n) / 2
    # NT-Xent (Chen et al. 2020, Eq. 1) over z = [x; y]; anchor k's other view is its positive
    z = torch.cat([x, y])
    nt, sup = [], []
    for k in range(2 * n):
        others = [m for m in range(2 * n) if m != k]
        keys = z[others]
        pos = [o for o, m in enumerate(others) if ids[m % n] == ids[k % n]]
        nt.append(_l_out(z[k] / tau, keys, pos))
        if labels is not None:
            same = [o for o, m in enumerate(others) if labels[m % n] == labels[k % n]]
            sup.append(_l_out(z[k] / tau, keys, same))
    total = w_clip * clip + w_nt * sum(nt) / (2 * n)
    if labels is not None:
        total = total + w_sup * sum(sup) / (2 * n)
    return total


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("with_pair_labels", [True, False])
def test_matches_loop_oracle_value_and_gradient(with_labels, with_pair_labels):
    x, y = _pair(seed=1)
    labels = LABELS if with_labels else None
    pair_ids = torch.tensor([0, 1, 2, 2, 3, 4]) if with_pair_labels else None
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ours = mixed_multimodal_loss(
        xs,
        ys,
        labels=labels,
        pair_labels=pair_ids,
        temperature=0.2,
        clip_weight=0.5,
        nt_xent_weight=0.2,
        supcon_weight=0.3,
    )
    xo, yo = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    expected = _oracle(xo, yo, labels, 0.2, 0.5, 0.2, 0.3, pair_ids)
    torch.testing.assert_close(ours, expected, **TOL)
    for got, want in zip(
        torch.autograd.grad(ours, (xs, ys)), torch.autograd.grad(expected, (xo, yo)), strict=True
    ):
        torch.testing.assert_close(got, want, **TOL)


def test_equals_the_three_library_losses():
    x, y = _pair(seed=2)
    ours = mixed_multimodal_loss(x, y, labels=LABELS)
    expected = (
        0.4 * clip_loss(x, y, temperature=0.07)
        + 0.3 * simclr_loss(x, y, temperature=0.07)
        + 0.3 * supcon_loss(torch.stack([x, y], 1), LABELS, temperature=0.07)
    )
    torch.testing.assert_close(ours, expected, **TOL)


def test_without_labels_supcon_is_dropped_not_renormalised():
    x, y = _pair(seed=3)
    loss = MixedMultimodalLoss(temperature=0.1)
    out = loss.compute(x, y)
    expected = 0.4 * clip_loss(x, y, temperature=0.1) + 0.3 * simclr_loss(x, y, temperature=0.1)
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert "loss_supcon" not in out.terms and out.terms["supcon_active"].item() == 0.0
    labelled = loss.compute(x, y, LABELS)
    assert labelled.terms["supcon_active"].item() == 1.0
    torch.testing.assert_close(
        labelled.loss - out.loss, 0.3 * labelled.terms["loss_supcon"].double(), rtol=1e-6, atol=1e-6
    )


def test_distinct_labels_make_supcon_equal_nt_xent():
    x, y = _pair(seed=4)
    out = MixedMultimodalLoss().compute(x, y, labels=torch.arange(6))
    torch.testing.assert_close(out.terms["loss_supcon"], out.terms["loss_nt_xent"], **TOL)


def test_identical_orthonormal_embeddings_closed_form():
    z = torch.eye(4, dtype=F64)
    out = MixedMultimodalLoss(temperature=1.0).compute(z, z, torch.arange(4))
    clip = math.log(math.e + 3) - 1  # one positive at cos 1, three negatives at cos 0
    nt = math.log(math.e + 6) - 1  # 2N − 1 = 7 keys: the other view and six at cos 0
    assert out.terms["loss_clip"].item() == pytest.approx(clip, rel=1e-6)
    assert out.terms["loss_nt_xent"].item() == pytest.approx(nt, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.4 * clip + 0.6 * nt, rel=1e-9)
    assert out.terms["accuracy"].item() == 1.0


def test_pair_labels_reach_clip_and_nt_xent():
    x, y = _pair(seed=5)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    out = MixedMultimodalLoss(temperature=0.1).compute(x, y, pair_labels=ids)
    torch.testing.assert_close(
        out.terms["loss_clip"], clip_loss(x, y, temperature=0.1, labels=ids).float()
    )
    torch.testing.assert_close(
        out.terms["loss_nt_xent"], simclr_loss(x, y, temperature=0.1, labels=ids).float()
    )


def test_reduction_none_and_sum():
    x, y = _pair(seed=6)
    per_pair = mixed_multimodal_loss(x, y, labels=LABELS, reduction="none")
    assert per_pair.shape == (6,)
    torch.testing.assert_close(per_pair.mean(), mixed_multimodal_loss(x, y, labels=LABELS), **TOL)
    nt = simclr_loss(x, y, temperature=0.07, reduction="none")
    clip = clip_loss(x, y, temperature=0.07, reduction="none")
    sup = supcon_loss(torch.stack([x, y], 1), LABELS, temperature=0.07, reduction="none")
    expected = 0.4 * clip + 0.3 * (nt[:6] + nt[6:]) / 2 + 0.3 * (sup[:6] + sup[6:]) / 2
    torch.testing.assert_close(per_pair, expected, **TOL)
    total = mixed_multimodal_loss(x, y, labels=LABELS, reduction="sum")
    # "sum" adds the per-pair values: each 2N-anchor part counts a pair's two anchors half each.
    expected_sum = (
        0.4 * clip_loss(x, y, temperature=0.07, reduction="sum") + 0.3 * (nt.sum() + sup.sum()) / 2
    )
    torch.testing.assert_close(total, expected_sum, **TOL)
    torch.testing.assert_close(total, per_pair.sum(), **TOL)


def test_module_terms_gradients_and_half_precision():
    x, y = _pair(seed=7)
    loss = MixedMultimodalLoss(learnable_temperature=True)
    out = loss.compute(x.float(), y.float(), LABELS)
    assert set(out.terms) == {
        "loss_clip",
        "loss_nt_xent",
        "loss_supcon",
        "supcon_active",
        "accuracy",
        "temperature",
    }
    out.loss.backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)
    half = loss(x.bfloat16(), y.bfloat16(), LABELS)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert torch.autograd.gradcheck(
        lambda a, b: mixed_multimodal_loss(a, b, labels=LABELS[:4], temperature=0.5),
        (x[:4, :3].clone().requires_grad_(True), y[:4, :3].clone().requires_grad_(True)),
    )


def test_registry_state_dict_and_example():
    assert embedloss.loss_info("mixed_multimodal").category == "multimodal"
    assert embedloss.functional.mixed_multimodal_loss is mixed_multimodal_loss
    a = MixedMultimodalLoss(temperature=0.05, learnable_temperature=True)
    b = MixedMultimodalLoss(temperature=0.5, learnable_temperature=True)
    b.load_state_dict(a.state_dict())
    args, kwargs = MixedMultimodalLoss.example_inputs()
    torch.testing.assert_close(a(*args, **kwargs), b(*args, **kwargs))
    assert "labels" in kwargs and "weights=" in repr(a)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"clip_weight": -0.1}, ValueError, r"clip_weight must be a finite number in \[0.0, inf\]"),
        ({"supcon_weight": float("inf")}, ValueError, "supcon_weight must be a finite number"),
        ({"nt_xent_weight": "0.3"}, TypeError, "nt_xent_weight must be a number"),
        ({"labels": torch.arange(4)}, ValueError, r"labels must have shape \(6,\)"),
        ({"pair_labels": torch.arange(5)}, ValueError, r"pair_labels must have shape \(6,\)"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ],
)
def test_bad_input(kwargs, error, match):
    x, y = _pair()
    with pytest.raises(error, match=match):
        mixed_multimodal_loss(x, y, **kwargs)


def test_bad_shapes():
    x, y = _pair()
    with pytest.raises(
        ValueError, match="image_embeddings and text_embeddings must have the same shape"
    ):
        MixedMultimodalLoss()(x, y[:, :3])
    with pytest.raises(ValueError, match="clip_weight must be a finite number"):
        MixedMultimodalLoss(clip_weight=-1.0)
