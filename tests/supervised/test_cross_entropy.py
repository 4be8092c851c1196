import pytest
import torch
import torch.nn.functional as F

import embedloss
from embedloss.supervised.cross_entropy import CrossEntropyLoss, cross_entropy_loss
from tests.supervised.supervised_oracles import weighted_ce_loop

TOL = {"rtol": 1e-12, "atol": 1e-12}
F64 = torch.float64


def _batch(n=7, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=F64)
    return logits, torch.randint(0, c, (n,), generator=g)


WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_exact_parity_with_f_cross_entropy(reduction, smoothing, weighted):
    logits, targets = _batch()
    targets[2] = -1  # ignored
    weight = WEIGHTS if weighted else None
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = cross_entropy_loss(
        a,
        targets,
        class_weights=weight,
        label_smoothing=smoothing,
        ignore_index=-1,
        reduction=reduction,
    )
    theirs = F.cross_entropy(
        b, targets, weight=weight, label_smoothing=smoothing, ignore_index=-1, reduction=reduction
    )
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_module_parity_and_buffer():
    logits, targets = _batch(seed=1)
    loss = CrossEntropyLoss(label_smoothing=0.1, class_weights=WEIGHTS.tolist())
    expected = F.cross_entropy(logits, targets, weight=WEIGHTS, label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, targets), expected, **TOL)
    assert "class_weights" in dict(loss.named_buffers())
    torch.testing.assert_close(loss.state_dict()["class_weights"], WEIGHTS)
    float32 = loss(logits.float(), targets)
    torch.testing.assert_close(
        float32,
        F.cross_entropy(logits.float(), targets, weight=WEIGHTS.float(), label_smoothing=0.1),
    )


def test_sample_weights_match_loop_oracle():
    logits, targets = _batch(seed=2)
    targets[0] = -100
    s = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5, 1.0, 3.0], dtype=F64)
    a = logits.clone().requires_grad_(True)
    ours = cross_entropy_loss(
        a, targets, sample_weight=s, class_weights=WEIGHTS, label_smoothing=0.3
    )
    b = logits.clone().requires_grad_(True)
    expected = weighted_ce_loop(
        b, targets, class_weights=WEIGHTS, sample_weight=s, label_smoothing=0.3
    )
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    (ga,) = torch.autograd.grad(ours, a)
    (gb,) = torch.autograd.grad(expected, b)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-9)


def test_integer_sample_weight_equals_repeating_the_sample():
    logits, targets = _batch(seed=3)
    s = torch.tensor([1, 2, 1, 3, 1, 1, 2], dtype=F64)
    repeat = torch.repeat_interleave(torch.arange(7), s.long())
    ours = cross_entropy_loss(
        logits, targets, sample_weight=s, class_weights=WEIGHTS, label_smoothing=0.1
    )
    expected = F.cross_entropy(logits[repeat], targets[repeat], weight=WEIGHTS, label_smoothing=0.1)
    torch.testing.assert_close(ours, expected, **TOL)
    none = cross_entropy_loss(logits, targets, sample_weight=s, reduction="none")
    torch.testing.assert_close(none, s * F.cross_entropy(logits, targets, reduction="none"), **TOL)


def test_all_targets_ignored_gives_zero_not_nan():
    logits, _ = _batch(seed=4)
    logits.requires_grad_(True)
    loss = cross_entropy_loss(logits, torch.full((7,), -100), label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_gradcheck_and_half_precision():
    logits, targets = _batch(n=4, c=3, seed=5)
    s = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy_loss(x, targets, sample_weight=s, label_smoothing=0.2),
        (logits.requires_grad_(True),),
    )
    out = CrossEntropyLoss()(logits.detach().bfloat16(), targets)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_accuracy_term_skips_ignored():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, -100, 1])
    out = CrossEntropyLoss().compute(logits, targets)
    assert out.terms["accuracy"].item() == pytest.approx(2 / 3)


def test_registry_and_functional():
    assert type(embedloss.create_loss("cross_entropy", label_smoothing=0.1)) is CrossEntropyLoss
    assert embedloss.functional.cross_entropy_loss is cross_entropy_loss
    (logits, targets), _ = CrossEntropyLoss.example_inputs(n=5, d=3)
    assert logits.shape == (5, 3) and targets.max() < 3
    assert "label_smoothing=0.0" in repr(CrossEntropyLoss())


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, t: cross_entropy_loss(x, t[:3]), ValueError, r"targets must have shape \(7,\)"),
        (lambda x, t: cross_entropy_loss(x, t.double()), TypeError, "targets must be an integer"),
        (
            lambda x, t: cross_entropy_loss(x, torch.full_like(t, 4)),
            ValueError,
            r"targets must be class indices in \[0, 3\] or ignore_index=-100, got 4",
        ),
        (
            lambda x, t: cross_entropy_loss(x, torch.full_like(t, -2)),
            ValueError,
            "got -2",
        ),
        (lambda x, t: cross_entropy_loss(x[0], t), ValueError, r"logits must have shape \(N, D\)"),
        (
            lambda x, t: cross_entropy_loss(x, t, class_weights=torch.ones(3)),
            ValueError,
            r"class_weights must have shape \(4,\)",
        ),
        (
            lambda x, t: cross_entropy_loss(x, t, sample_weight=torch.ones(3)),
            ValueError,
            r"sample_weight must have shape \(7,\)",
        ),
        (
            lambda x, t: cross_entropy_loss(x, t, label_smoothing=1.5),
            ValueError,
            r"label_smoothing must be a finite number in \[0.0, 1.0\]",
        ),
        (
            lambda x, t: cross_entropy_loss(x, t, reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
    ],
)
def test_bad_input(call, error, match):
    logits, targets = _batch()
    with pytest.raises(error, match=match):
        call(logits, targets)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"class_weights": [1.0, -1.0]}, ValueError, "class_weights must be finite and >= 0"),
        ({"class_weights": [[1.0]]}, ValueError, r"class_weights must have shape \(C,\)"),
        (
            {"class_weights": "balanced"},
            TypeError,
            "class_weights must be a 1-d tensor or a sequence",
        ),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing must be a finite number"),
    ],
)
def test_bad_constructor(kwargs, error, match):
    with pytest.raises(error, match=match):
        CrossEntropyLoss(**kwargs)


def test_masked_logits_stay_finite_without_smoothing():
    # Smoothed targets are zero off the target: 0·log 0 counts as 0, as in F.cross_entropy.
    logits, targets = _batch(seed=6)
    logits[:, 3] = float("-inf")
    targets = targets.clamp(max=2)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, theirs = cross_entropy_loss(a, targets), F.cross_entropy(b, targets)
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_module_computes_through_the_base_implementation_and_runs_on_meta():
    from embedloss.base.supervised import weighted_cross_entropy

    assert cross_entropy_loss is weighted_cross_entropy
    logits, targets = _batch(seed=7)
    targets[1] = -100
    loss = CrossEntropyLoss(label_smoothing=0.2, class_weights=WEIGHTS).to("meta")
    x = logits.to("meta").requires_grad_(True)
    out = loss(x, targets.to("meta"), sample_weight=torch.ones(7, device="meta"))
    out.backward()
    assert out.device.type == "meta" and x.grad is not None
