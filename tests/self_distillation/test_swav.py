import math

import pytest
import torch

from embedloss import SwAVLoss, create_loss
from embedloss.functional import swav_loss
from embedloss.ops.sinkhorn import sinkhorn_knopp
from tests.helpers import assert_close_with_grads, randn64
from tests.self_distillation.gradcache_emulation import cached_step
from tests.self_distillation.lightly_reference import float64_default, load
from tests.self_distillation.oracles import sinkhorn_oracle, swav_oracle


def _scores(v, n=6, k=4, seed=0):
    """Prototype scores in [-1, 1], as cosines of normalised features and prototypes."""
    return [
        randn64(n, k, seed=seed + i, requires_grad=False).tanh().requires_grad_() for i in range(v)
    ]


@pytest.mark.parametrize("iterations", [1, 3, 5])
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_sinkhorn_matches_the_official_iterations(iterations, epsilon):
    scores = randn64(7, 5, seed=iterations, requires_grad=False).tanh()
    codes = sinkhorn_knopp(scores, iterations=iterations, epsilon=epsilon)
    want = torch.tensor(sinkhorn_oracle(scores, iterations, epsilon), dtype=torch.float64)
    torch.testing.assert_close(codes, want, rtol=1e-10, atol=1e-12)


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_batch():
    scores = randn64(12, 4, seed=1, requires_grad=False)
    codes = sinkhorn_knopp(scores, iterations=200, epsilon=0.5)
    torch.testing.assert_close(codes.sum(1), torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(codes.sum(0), torch.full((4,), 3.0, dtype=torch.float64))


def test_sinkhorn_is_finite_where_the_exp_space_algorithm_overflows():
    scores = 100 * torch.randn(8, 5)  # exp(score / 0.05) overflows even float64
    assert not torch.isfinite(torch.exp(scores.double() / 0.05)).all()
    codes = sinkhorn_knopp(scores, epsilon=0.05)
    assert torch.isfinite(codes).all() and codes.dtype == torch.float32
    torch.testing.assert_close(codes.sum(1), torch.ones(8))


def test_sinkhorn_carries_no_gradient():
    scores = randn64(4, 3)
    assert not sinkhorn_knopp(scores).requires_grad


@pytest.mark.parametrize(("n_high", "n_low"), [(2, 0), (2, 3), (3, 1)])
def test_value_and_gradient_match_the_official_loss(n_high, n_low):
    crops = _scores(n_high + n_low)
    fast = swav_loss(crops[:n_high], crops[n_high:], temperature=0.2)
    slow = swav_oracle(crops, n_high, 0.2, 3, 0.05)
    assert_close_with_grads(fast, slow, tuple(crops))


def test_queue_enlarges_the_batch_of_the_codes():
    crops = _scores(4)
    queues = [randn64(5, 4, seed=50 + i, requires_grad=False).tanh() for i in range(2)]
    fast = swav_loss(crops[:2], crops[2:], queues)
    slow = swav_oracle(crops, 2, 0.1, 3, 0.05, queues=queues)
    assert_close_with_grads(fast, slow, tuple(crops))
    assert not torch.allclose(fast, swav_loss(crops[:2], crops[2:]))


def test_tensor_forms_equal_sequences():
    crops = _scores(5)
    queues = [randn64(3, 4, seed=60 + i, requires_grad=False) for i in range(2)]
    seq = swav_loss(crops[:2], crops[2:], queues, reduction="none")
    stacked = swav_loss(
        torch.stack(crops[:2], 1),
        torch.stack(crops[2:], 1),
        torch.stack(queues, 1),
        reduction="none",
    )
    torch.testing.assert_close(stacked, seq, rtol=0, atol=0)
    assert seq.shape == (6,)
    torch.testing.assert_close(seq.mean(), swav_loss(crops[:2], crops[2:], queues))


def test_closed_form_uniform_scores_give_log_k():
    loss = swav_loss([torch.zeros(5, 7)] * 2, [torch.zeros(5, 7)])
    torch.testing.assert_close(loss, torch.tensor(math.log(7)))


def test_codes_carry_no_gradient():
    # Only the predictions are differentiated: the loss equals the cross-entropy against
    # codes computed from detached scores, in value and gradient.
    crops = _scores(2)
    codes = [sinkhorn_knopp(c) for c in crops]
    log_p = [torch.log_softmax(c / 0.1, -1) for c in crops]
    manual = -((codes[0] * log_p[1]).sum(-1).mean() + (codes[1] * log_p[0]).sum(-1).mean()) / 2
    assert_close_with_grads(swav_loss(crops), manual, tuple(crops))


def test_terms():
    crops = _scores(3)
    out = SwAVLoss().compute(crops[:2], crops[2:])
    codes = torch.stack([sinkhorn_knopp(c) for c in crops[:2]])
    code_entropy = -(codes * codes.log()).sum(-1).mean()
    mean_code = codes.mean(1)
    cluster_entropy = -(mean_code * mean_code.log()).sum(-1).mean()
    torch.testing.assert_close(out.terms["code_entropy"], code_entropy.float())
    torch.testing.assert_close(out.terms["cluster_entropy"], cluster_entropy.float())
    assert out.terms["cluster_entropy"] <= math.log(4) + 1e-6
    assert out.terms["temperature"].item() == pytest.approx(0.1)


def test_lightly_parity():
    # lightly's SwaVLoss(temperature, sinkhorn_iterations, sinkhorn_epsilon) takes the same
    # lists (high, low, queue: one (M, K) queue per high-resolution crop), prepends nothing
    # (it appends the queue and keeps the first N codes) and averages as main_swav.py: the
    # same conventions. Its Sinkhorn runs in exp space, equal to ours for moderate scores.
    reference = load("loss.swav_loss").SwaVLoss(
        temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.1
    )
    loss_fn = SwAVLoss(temperature=0.2, sinkhorn_iterations=4, epsilon=0.1)
    crops = _scores(5)
    queues = [randn64(4, 4, seed=70 + i, requires_grad=False).tanh() for i in range(2)]
    with float64_default():
        want = reference(crops[:2], crops[2:], queues).reshape(())
    assert_close_with_grads(loss_fn(crops[:2], crops[2:], queues), want, tuple(crops))
    with float64_default():
        plain = reference(crops[:2], []).reshape(())
    assert_close_with_grads(loss_fn(crops[:2]), plain, tuple(crops[:2]))


def test_gradient_caching_gives_the_full_batch_codes_and_gradient():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4).double()
    x = torch.randn(9, 3, 3, dtype=torch.float64)  # (N, V, input): 2 high + 1 low crop

    def loss(z):
        return swav_loss(z[:, :2], z[:, 2:])

    loss(net(x)).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    cached_step([net], loss, [x], micro_batch_size=4)
    for got, expected in zip((p.grad for p in net.parameters()), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # gradient accumulation instead balances the codes per micro-batch: another objective
    per_part = sum(loss(net(p)) * p.shape[0] / 9 for p in x.split(4))
    assert not torch.allclose(per_part, loss(net(x)))


def test_registry_and_module_agree():
    crops = _scores(3)
    loss_fn = create_loss("swav", temperature=0.3, epsilon=0.2, sinkhorn_iterations=2)
    torch.testing.assert_close(
        loss_fn(crops[:2], crops[2:]),
        swav_loss(crops[:2], crops[2:], temperature=0.3, epsilon=0.2, sinkhorn_iterations=2),
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"epsilon": -1.0}, ValueError, "epsilon must be a finite number > 0"),
        ({"sinkhorn_iterations": 0}, ValueError, "sinkhorn_iterations must be >= 1"),
        ({"sinkhorn_iterations": 2.0}, TypeError, "sinkhorn_iterations must be an int"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SwAVLoss(**kwargs)


def test_bad_inputs_are_clear_errors():
    crops = _scores(3)
    loss_fn = SwAVLoss()
    with pytest.raises(ValueError, match="at least two crops"):
        loss_fn(crops[:1])
    with pytest.raises(ValueError, match="same N samples"):
        loss_fn(crops[:2], [crops[2][:3]])
    with pytest.raises(ValueError, match="K=4 outputs per view"):
        loss_fn(crops[:2], [crops[2][:, :3]])
    with pytest.raises(ValueError, match=r"one \(M, K\) queue per high-resolution crop \(2\)"):
        loss_fn(crops[:2], crops[2:], [crops[0]])
    with pytest.raises(TypeError, match=r"high_resolution_outputs\[0\] must be a torch.Tensor"):
        loss_fn([[0.0]])
