import math

import pytest
import torch
from pytorch_metric_learning.losses import SupConLoss as PMLSupConLoss

import embedloss
from embedloss.contrastive.simclr import simclr_loss
from embedloss.supervised.supcon import SupConLoss, supcon_loss
from tests.supervised.supervised_oracles import supcon_eq2, supcon_reference, unit

TOL = {"rtol": 1e-9, "atol": 1e-9}
F64 = torch.float64


def _features(n=6, v=2, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, d, generator=g, dtype=F64)


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _check_against(fn, oracle, x):
    value, grad = _value_and_grad(fn, x)
    expected, expected_grad = _value_and_grad(oracle, x)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


# --- the float64 loop oracle of Eq. 2 -------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("base_temperature", [None, 0.07])
def test_labels_match_eq2_oracle(mode, views, base_temperature):
    x = _features(n=7, v=views, seed=views)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 3 has one sample: excluded if V == 1
    tau = 0.2

    def ours(z):
        return supcon_loss(
            z,
            labels,
            temperature=tau,
            base_temperature=base_temperature,
            contrast_mode=mode,
            chunk_size=None,
        )

    def oracle(z):
        same = lambda i, j: bool(labels[i] == labels[j])  # noqa: E731
        return supcon_eq2(z, same, temperature=tau, base_temperature=base_temperature, mode=mode)

    _check_against(ours, oracle, x)


def test_multi_hot_labels_match_oracle():
    x = _features(n=6, v=2, seed=3)
    y = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]])

    def shares(i, j):
        return i == j or bool(((y[i] != 0) & (y[j] != 0)).any())

    _check_against(
        lambda z: supcon_loss(z, y, temperature=0.3),
        lambda z: supcon_eq2(z, shares, temperature=0.3),
        x,
    )


@pytest.mark.parametrize("mode", ["all", "one"])
def test_explicit_asymmetric_mask_matches_oracle(mode):
    x = _features(n=5, v=2, seed=4)
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [0, 1, 0, 0, 1],
            [0, 0, 0, 1, 0],  # diagonal off: sample 2's other view is not a positive
            [1, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    _check_against(
        lambda z: supcon_loss(z, mask=mask, temperature=0.5, contrast_mode=mode),
        lambda z: supcon_eq2(z, lambda i, j: bool(mask[i, j]), temperature=0.5, mode=mode),
        x,
    )


def test_bool_mask_equals_integer_mask_and_labels():
    x = _features(n=6, v=2, seed=5)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    mask = labels[:, None] == labels[None, :]
    by_labels = supcon_loss(x, labels)
    torch.testing.assert_close(supcon_loss(x, mask=mask), by_labels, **TOL)
    torch.testing.assert_close(supcon_loss(x, mask=mask.long()), by_labels, **TOL)
    one_hot = torch.nn.functional.one_hot(labels).bool()
    torch.testing.assert_close(supcon_loss(x, one_hot), by_labels, **TOL)
    # (N, 1) is read as classes (like the reference), not as a one-column multi-hot matrix
    torch.testing.assert_close(supcon_loss(x, labels[:, None]), by_labels, **TOL)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_match_oracle(reduction):
    x = _features(n=5, v=2, seed=6)
    labels = torch.tensor([0, 0, 1, 2, 2])
    same = lambda i, j: bool(labels[i] == labels[j])  # noqa: E731
    ours = supcon_loss(x, labels, temperature=0.1, base_temperature=0.2, reduction=reduction)
    expected = supcon_eq2(x, same, temperature=0.1, base_temperature=0.2, reduction=reduction)
    torch.testing.assert_close(ours, expected, **TOL)
    if reduction == "none":
        assert ours.shape == (10,)  # view-major: view 0 of every sample, then view 1


def test_gradcheck():
    x = _features(n=4, v=2, d=3, seed=7).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda z: supcon_loss(z, labels, temperature=0.5), (x,))
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    assert torch.autograd.gradcheck(lambda z: supcon_loss(z, mask=mask), (x,))


# --- the official code's formula and pytorch-metric-learning --------------------------------


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("supervision", ["labels", "mask", "none"])
def test_matches_reference_formula(mode, supervision):
    x = unit(_features(n=6, v=2, seed=8))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    kwargs = {}
    if supervision == "labels":
        kwargs["labels"] = labels
    if supervision == "mask":
        kwargs["mask"] = (labels[:, None] == labels[None, :]).double()
    ours = supcon_loss(
        x, temperature=0.07, base_temperature=0.07, contrast_mode=mode, normalize=False, **kwargs
    )
    expected = supcon_reference(x, temperature=0.07, base_temperature=0.07, mode=mode, **kwargs)
    torch.testing.assert_close(ours, expected, **TOL)
    scaled = supcon_loss(x, temperature=0.1, base_temperature=0.07, contrast_mode=mode, **kwargs)
    expected = supcon_reference(x, temperature=0.1, base_temperature=0.07, mode=mode, **kwargs)
    torch.testing.assert_close(scaled, expected, **TOL)


# (PML returns 0 when a batch has no negative pair at all, e.g. a single class; L_out does not
# vanish there, see the closed form below, so that batch is left out of the parity test.)
@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 3], [0, 0, 0, 0, 0, 1], [0, 1, 2, 3, 4, 5]])
def test_parity_with_pytorch_metric_learning(labels):
    labels = torch.tensor(labels)
    x = _features(n=6, v=2, seed=9)
    flat = x.transpose(0, 1).reshape(12, -1)  # PML takes the views as extra samples

    def ours(z):
        return supcon_loss(z, labels, temperature=0.1)

    def pml(z):
        return PMLSupConLoss(temperature=0.1)(z.transpose(0, 1).reshape(12, -1), labels.repeat(2))

    _check_against(ours, pml, x)
    # single view: samples alone in their class have no positive and are excluded by both
    value = supcon_loss(flat[:6], labels, temperature=0.1)
    expected = PMLSupConLoss(temperature=0.1)(flat[:6], labels)
    torch.testing.assert_close(value, expected, **TOL)


# --- closed forms and equivalences ------------------------------------------------------------


@pytest.mark.parametrize("n,views", [(3, 2), (5, 3)])
def test_single_class_identical_embeddings_closed_form(n, views):
    # Every other embedding is a positive with the same logit: −log(1/(VN−1)), at any τ.
    x = torch.ones(n, views, 4, dtype=F64)
    for tau in (0.05, 1.0):
        loss = supcon_loss(x, torch.zeros(n, dtype=torch.long), temperature=tau)
        assert loss.item() == pytest.approx(math.log(views * n - 1), abs=1e-12)


def test_single_class_equals_logsumexp_minus_mean():
    x = unit(_features(n=4, v=2, seed=10)).reshape(8, -1)
    logits = x @ x.T / 0.5
    off = ~torch.eye(8, dtype=torch.bool)
    per_anchor = torch.stack(
        [logits[i][off[i]].logsumexp(0) - logits[i][off[i]].mean() for i in range(8)]
    )
    loss = supcon_loss(x.reshape(2, 4, -1).transpose(0, 1), torch.zeros(4).long(), temperature=0.5)
    torch.testing.assert_close(loss, per_anchor.mean(), **TOL)


def test_without_labels_is_nt_xent():
    x = _features(n=5, v=2, seed=11)
    expected = simclr_loss(x[:, 0], x[:, 1], temperature=0.3)
    torch.testing.assert_close(supcon_loss(x, temperature=0.3), expected, **TOL)
    distinct = supcon_loss(x, torch.arange(5) * 7, temperature=0.3)
    torch.testing.assert_close(distinct, expected, **TOL)
    labels = torch.tensor([0, 1, 0, 1, 2])
    torch.testing.assert_close(
        supcon_loss(x, labels, temperature=0.3),
        simclr_loss(x[:, 0], x[:, 1], temperature=0.3, labels=labels),
        **TOL,
    )


def test_identical_views_distinct_labels_closed_form():
    z = torch.eye(4, dtype=F64)
    x = torch.stack([z, z], dim=1)
    expected = math.log(math.e + 6) - 1  # one positive at cos 1, six negatives at cos 0, τ = 1
    assert supcon_loss(x, torch.arange(4), temperature=1.0).item() == pytest.approx(expected)


def test_invariant_to_sample_order_and_scale():
    x = _features(n=6, v=2, seed=12)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    per_anchor = supcon_loss(x, labels, reduction="none").reshape(2, 6)
    permuted = supcon_loss(3.0 * x[perm], labels[perm], reduction="none").reshape(2, 6)
    torch.testing.assert_close(permuted, per_anchor[:, perm], **TOL)


# --- anchors without positives, numerics ---------------------------------------------------


def test_anchors_without_positives_excluded_and_counted():
    x = _features(n=5, v=1, seed=13)[:, 0]
    labels = torch.tensor([0, 0, 1, 2, 2])  # sample 2 is alone
    out = SupConLoss(temperature=0.2).compute(x.float(), labels)
    assert out.terms["anchors_without_positives"].item() == 1.0
    per_anchor = supcon_loss(x, labels, temperature=0.2, reduction="none")
    assert per_anchor[2].item() == 0.0
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(
        supcon_loss(x, labels, temperature=0.2),
        supcon_loss(x, labels, temperature=0.2, reduction="none")[keep].mean(),
        **TOL,
    )


def test_no_anchor_with_a_positive_gives_zero_not_nan():
    x = _features(n=4, v=1, seed=14)[:, 0].requires_grad_(True)
    loss = supcon_loss(x, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_tiny_temperature_large_norms_and_bfloat16_are_finite():
    x = 1e4 * _features(n=6, v=2, seed=15).float()
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    assert torch.isfinite(supcon_loss(x, labels, temperature=1e-3, normalize=False))
    out = supcon_loss(x.bfloat16(), labels, temperature=1e-3)
    assert out.dtype == torch.float32 and torch.isfinite(out)


# --- the module ------------------------------------------------------------------------------


def test_module_matches_function_and_terms():
    x = _features(n=6, v=2, seed=16)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    loss = SupConLoss(temperature=0.2, base_temperature=0.1, contrast_mode="one")
    out = loss.compute(x, labels)
    expected = supcon_loss(x, labels, temperature=0.2, base_temperature=0.1, contrast_mode="one")
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert set(out.terms) == {"accuracy", "anchors_without_positives", "temperature"}
    assert out.terms["temperature"].item() == pytest.approx(0.2)
    assert 0.0 <= out.terms["accuracy"].item() <= 1.0
    torch.testing.assert_close(loss(x, labels), out.loss)


def test_accuracy_term_is_one_for_separated_classes():
    centres = torch.eye(3, dtype=F64)
    x = centres[[0, 1, 2, 0, 1, 2]].unsqueeze(1).repeat(1, 2, 1)
    out = SupConLoss().compute(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.terms["accuracy"].item() == 1.0


def test_learnable_temperature_gets_gradient():
    loss = SupConLoss(temperature=0.2, learnable_temperature=True, base_temperature=0.1)
    loss(_features(seed=17).float(), torch.tensor([0, 1, 0, 1, 2, 2])).backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)


def test_registry_names_and_alias():
    assert type(embedloss.create_loss("supervised_contrastive")) is SupConLoss
    assert embedloss.loss_info("supcon").category == "supervised"
    assert embedloss.functional.supcon_loss is supcon_loss


def test_state_dict_round_trip():
    a = SupConLoss(temperature=0.3, learnable_temperature=True)
    b = SupConLoss(temperature=0.9, learnable_temperature=True)
    b.load_state_dict(a.state_dict())
    x, labels = SupConLoss.example_inputs()[0]
    torch.testing.assert_close(a(x, labels), b(x, labels))


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"labels": torch.arange(6), "mask": torch.eye(6)}, ValueError, "either labels or mask"),
        ({"labels": torch.arange(5)}, ValueError, r"labels must have shape \(6,\)"),
        ({"labels": torch.ones(5, 3)}, ValueError, r"multi-hot labels must have shape \(6, C\)"),
        ({"labels": torch.ones(6, 2, 2)}, ValueError, r"labels must have shape \(6,\)"),
        ({"labels": torch.rand(6)}, TypeError, "labels must be an integer"),
        ({"mask": torch.eye(5)}, ValueError, r"mask must have shape \(6, 6\)"),
        ({"mask": [[1]]}, TypeError, "mask must be a torch.Tensor"),
        ({"contrast_mode": "cross"}, ValueError, "contrast_mode must be one of 'all', 'one'"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"base_temperature": -1.0}, ValueError, "base_temperature must be a finite number > 0"),
        (
            {"mask": torch.eye(6), "gather_distributed": True},
            ValueError,
            "explicit mask cannot be combined with gather_distributed",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        supcon_loss(_features(n=6, v=2), **kwargs)


def test_bad_embeddings():
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, D\) or \(N, V, D\)"):
        supcon_loss(torch.randn(2, 2, 2, 2), torch.arange(2))
    with pytest.raises(ValueError, match="single view needs labels or mask"):
        supcon_loss(torch.randn(4, 3))
    with pytest.raises(TypeError, match="embeddings must be a floating-point tensor"):
        SupConLoss()(torch.ones(4, 3, dtype=torch.long), torch.arange(4))
    with pytest.raises(ValueError, match="contrast_mode must be one of"):
        SupConLoss(contrast_mode="intra")
    with pytest.raises(ValueError, match="base_temperature must be a finite number > 0"):
        SupConLoss(base_temperature=0.0)
