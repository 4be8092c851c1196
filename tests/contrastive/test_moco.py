import math

import pytest
import torch
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss, SupConLoss

from embedloss import MoCoLoss, create_loss
from embedloss.functional import moco_loss
from tests.contrastive.oracles import moco_direction_oracle
from tests.helpers import assert_close_with_grads, randn64
from tests.oracles import dot, lse, normalize_rows


def _oracle_sequence(
    batches, *, tau, queue_size, in_batch=False, symmetric=False, with_labels=False
):
    """Replay a training run with a Python FIFO of raw keys/queries (newest last)."""
    keys, queries, labels = [], [], []
    for q, k, lab in batches:
        lab_list = [int(v) for v in lab] if with_labels else None
        bank = torch.stack(keys) if keys else None
        loss = moco_direction_oracle(
            q, k, bank, tau, lab_list, labels if with_labels else None, in_batch
        )
        if symmetric:
            past = torch.stack(queries) if queries else None
            back = moco_direction_oracle(
                k, q, past, tau, lab_list, labels if with_labels else None, in_batch
            )
            loss = (loss + back) / 2
        yield loss
        keys = (keys + list(k.detach()))[-queue_size:]
        queries = (queries + list(q.detach()))[-queue_size:]
        labels = (labels + (lab_list or []))[-queue_size:]


def _batches(steps, n, d, seed, n_labels=None):
    out = []
    for s in range(steps):
        q, k = randn64(n, d, seed=seed + 2 * s), randn64(n, d, seed=seed + 2 * s + 1)
        g = torch.Generator().manual_seed(seed + 100 + s)
        lab = torch.randint(0, n_labels or 10**6, (n,), generator=g)
        out.append((q, k, lab))
    return out


@pytest.mark.parametrize(
    ("in_batch", "symmetric", "with_labels"),
    [
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (True, True, False),
        (False, False, True),
        (True, True, True),
    ],
)
def test_training_sequence_matches_oracle_with_wraparound(in_batch, symmetric, with_labels):
    # queue_size 7 with batches of 3: the third and fourth batches wrap around the end.
    batches = _batches(4, 3, 5, seed=10, n_labels=3 if with_labels else None)
    loss_fn = MoCoLoss(
        temperature=0.3, queue_size=7, in_batch_negatives=in_batch, symmetric=symmetric
    )
    expected = _oracle_sequence(
        batches,
        tau=0.3,
        queue_size=7,
        in_batch=in_batch,
        symmetric=symmetric,
        with_labels=with_labels,
    )
    for (q, k, lab), oracle in zip(batches, expected, strict=True):
        loss = loss_fn(q, k, lab if with_labels else None)
        assert_close_with_grads(loss, oracle, (q, k))


def test_queue_starts_empty_and_fills_fifo_with_wraparound():
    loss_fn = MoCoLoss(queue_size=5)
    keys = [randn64(3, 4, seed=s, requires_grad=False) for s in range(3)]
    first = loss_fn.compute(keys[0], keys[0])
    assert first.loss.item() == 0.0  # nothing to contrast yet: no random queue, no K·e⁰ term
    assert first.terms["queue_fill"].item() == 0.0
    assert int(loss_fn.queue_count) == 3 and int(loss_fn.queue_ptr) == 3
    assert loss_fn.compute(keys[1], keys[1]).terms["queue_fill"].item() == pytest.approx(3 / 5)
    assert int(loss_fn.queue_count) == 5 and int(loss_fn.queue_ptr) == 1  # wrapped
    loss_fn(keys[2], keys[2])
    normalized = [torch.nn.functional.normalize(k, dim=1) for k in keys]
    # slots 0..4 hold, in ring order: k2[1], k2[2], k1[2]... newest five keys are k1[1:], k2
    expected = torch.stack(
        [normalized[1][2], normalized[2][0], normalized[2][1], normalized[2][2], normalized[1][1]]
    )
    ring = torch.stack([loss_fn.queue[(int(loss_fn.queue_ptr) + i) % 5] for i in range(5)])
    torch.testing.assert_close(ring, torch.cat([normalized[1][1:], normalized[2]]), rtol=0, atol=0)
    assert sorted(map(tuple, loss_fn.queue.tolist())) == sorted(map(tuple, expected.tolist()))


def test_keys_enqueued_after_scoring():
    # Were the batch's keys enqueued first, the key would also sit in the denominator as a
    # negative of its own query: the loss of the very first call would be log 2, not 0.
    q = torch.eye(2, 4, dtype=torch.float64)
    assert MoCoLoss(queue_size=4, temperature=1.0)(q, q).item() == 0.0


def test_closed_form_orthogonal_queue():
    tau, n = 0.5, 3
    q = torch.eye(n, 8, dtype=torch.float64)
    queue = torch.eye(8, dtype=torch.float64)[n:]  # 5 past keys orthogonal to every query
    expected = math.log(math.exp(1 / tau) + 5) - 1 / tau
    assert moco_loss(q, q, queue, temperature=tau).item() == pytest.approx(expected, rel=1e-12)


def test_eval_mode_does_not_enqueue():
    loss_fn = MoCoLoss(queue_size=8)
    a, b = randn64(4, 6, seed=1, requires_grad=False), randn64(4, 6, seed=2, requires_grad=False)
    loss_fn(a, b)
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    loss_fn.eval()
    first, second = loss_fn(b, a), loss_fn(b, a)
    assert first.item() == second.item() > 0
    for name, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_dict_round_trip_resumes_identically():
    batches = _batches(5, 4, 6, seed=40, n_labels=3)
    trained = MoCoLoss(queue_size=10, symmetric=True, in_batch_negatives=True)
    for q, k, lab in batches[:3]:
        trained(q, k, lab)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    assert state["queue"].shape == (10, 6) and state["queue"].dtype == torch.float64
    resumed = MoCoLoss(queue_size=10, symmetric=True, in_batch_negatives=True)
    resumed.load_state_dict(state)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, state[name]), name
    for q, k, lab in batches[3:]:
        assert torch.equal(resumed(q, k, lab), trained(q, k, lab))


def test_reset_queue_empties_it():
    loss_fn = MoCoLoss(queue_size=6)
    x = randn64(3, 4, seed=5, requires_grad=False)
    loss_fn(x, x + 0.1)
    loss_fn.reset_queue()
    assert int(loss_fn.queue_count) == 0 and int(loss_fn.queue_ptr) == 0
    assert loss_fn.compute(x, x + 0.1).loss.item() == 0.0


def test_labels_mask_false_negatives_and_distinct_labels_reproduce_label_free():
    batches = _batches(3, 4, 5, seed=60)
    plain = MoCoLoss(queue_size=8, in_batch_negatives=True, symmetric=True)
    labeled = MoCoLoss(queue_size=8, in_batch_negatives=True, symmetric=True)
    for step, (q, k, _) in enumerate(batches):
        distinct = torch.arange(4) + 10 * step  # unique across the whole run
        torch.testing.assert_close(labeled(q, k, distinct), plain(q, k), rtol=1e-12, atol=1e-12)
    # A same-label queue entry is removed: scoring with all-equal labels drops every negative.
    q, k, _ = batches[0]
    same = MoCoLoss(queue_size=8)
    same(q, k, torch.zeros(4, dtype=torch.long))
    assert same(k, q, torch.zeros(4, dtype=torch.long)).item() == pytest.approx(0.0, abs=1e-15)


def test_labels_with_unlabeled_entries_in_queue_raise():
    loss_fn = MoCoLoss(queue_size=8)
    x = torch.randn(4, 5)
    loss_fn(x, x)
    with pytest.raises(ValueError, match="queue holds keys enqueued without labels"):
        loss_fn(x, x, torch.arange(4))
    loss_fn.reset_queue()
    loss_fn(x, x, torch.arange(4))
    loss_fn(x, x)  # no labels: labeled entries are simply not masked
    assert not bool(loss_fn.queue_labeled[4:8].any()) and bool(loss_fn.queue_labeled[:4].all())


def test_parity_with_pytorch_metric_learning_cross_batch_memory():
    # PML's MoCo recipe: enqueue the keys, then NT-Xent of the queries against the memory with
    # unique labels. That is MoCo with in-batch negatives and a queue of the previous keys.
    n, d, tau, size = 4, 6, 0.2, 8
    ours = MoCoLoss(temperature=tau, queue_size=size, in_batch_negatives=True)
    ref = CrossBatchMemory(NTXentLoss(temperature=tau), d, memory_size=size + n)
    for step, (q, k, _) in enumerate(_batches(4, n, d, seed=80)):
        k = k.detach()
        labels = torch.arange(n) + n * step
        mask = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
        expected = ref(torch.cat([q, k]), torch.cat([labels, labels]), enqueue_mask=mask)
        loss = ours(q, k)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
        gq, gr = torch.autograd.grad(loss, q)[0], torch.autograd.grad(expected, q)[0]
        torch.testing.assert_close(gq, gr, rtol=1e-10, atol=1e-10)


def _queue_positives_oracle(q, k, bank, tau, labels, bank_labels, in_batch):
    """SupCon's L_out (Khosla et al. 2020, Eq. 2) of each query over [own key | batch | queue]:
    positives are the own key and every same-label entry, the denominator every entry."""
    a, p = normalize_rows(q), normalize_rows(k)
    b = [] if bank is None else normalize_rows(bank)
    n, total = len(a), 0.0
    for i in range(n):
        keys = [(p[i], True)]
        keys += [(p[j], labels[j] == labels[i]) for j in range(n) if in_batch and j != i]
        keys += [(b[m], bank_labels[m] == labels[i]) for m in range(len(b))]
        logits = [dot(a[i], key) / tau for key, _ in keys]
        positives = [z for z, (_, is_pos) in zip(logits, keys, strict=True) if is_pos]
        total = total + lse(logits) - sum(positives) / len(positives)
    return total / n


@pytest.mark.parametrize("in_batch", [False, True])
def test_queue_positives_match_the_supcon_oracle(in_batch):
    batches = _batches(3, 4, 5, seed=140, n_labels=3)
    loss_fn = MoCoLoss(
        temperature=0.3, queue_size=6, in_batch_negatives=in_batch, queue_positives=True
    )
    keys, labels = [], []
    for q, k, lab in batches:
        bank = torch.stack(keys) if keys else None
        lab_list = [int(v) for v in lab]
        oracle = _queue_positives_oracle(q, k, bank, 0.3, lab_list, labels, in_batch)
        assert_close_with_grads(loss_fn(q, k, lab), oracle, (q, k))
        keys, labels = (keys + list(k.detach()))[-6:], (labels + lab_list)[-6:]


def test_queue_positives_parity_with_pytorch_metric_learning_cross_batch_memory():
    # PML's CrossBatchMemory enqueues the keys first, then scores the queries against the whole
    # memory (past keys + this batch's keys) with the wrapped loss, same-label entries being
    # positives. Around PML's SupConLoss (cosine, AvgNonZeroReducer) that is MoCo with labels,
    # in-batch negatives and queue_positives=True, with memory_size = queue_size + batch.
    n, d, tau, size = 4, 6, 0.2, 8
    ours = MoCoLoss(temperature=tau, queue_size=size, in_batch_negatives=True, queue_positives=True)
    ref = CrossBatchMemory(SupConLoss(temperature=tau), d, memory_size=size + n)
    mask = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    for q, k, labels in _batches(4, n, d, seed=150, n_labels=3):
        k = k.detach()
        expected = ref(torch.cat([q, k]), torch.cat([labels, labels]), enqueue_mask=mask)
        loss = ours(q, k, labels)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
        gq, gr = torch.autograd.grad(loss, q)[0], torch.autograd.grad(expected, q)[0]
        torch.testing.assert_close(gq, gr, rtol=1e-10, atol=1e-10)


def test_queue_positives_pure_function_symmetric_and_errors():
    q, k = randn64(3, 4, seed=160), randn64(3, 4, seed=161)
    queue, past = (randn64(5, 4, seed=s, requires_grad=False) for s in (162, 163))
    labels, queue_labels = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 0, 0, 3])
    kwargs = dict(
        labels=labels, queue_labels=queue_labels, in_batch_negatives=True, queue_positives=True
    )
    lab, qlab = [0, 1, 0], [1, 2, 0, 0, 3]
    expected = (
        _queue_positives_oracle(q, k, queue, 0.4, lab, qlab, True)
        + _queue_positives_oracle(k, q, past, 0.4, lab, qlab, True)
    ) / 2
    got = moco_loss(q, k, queue, temperature=0.4, query_queue=past, symmetric=True, **kwargs)
    assert_close_with_grads(got, expected, (q, k))
    # Labels all distinct: no same-label entry, so queue_positives changes nothing.
    distinct = dict(labels=torch.arange(3), queue_labels=torch.arange(3, 8))
    torch.testing.assert_close(
        moco_loss(q, k, queue, queue_positives=True, **distinct), moco_loss(q, k, queue, **distinct)
    )
    with pytest.raises(ValueError, match="queue_positives=True .* needs labels"):
        moco_loss(q, k, queue, queue_positives=True)
    with pytest.raises(TypeError, match="queue_positives must be a bool"):
        moco_loss(q, k, queue, labels=labels, queue_labels=queue_labels, queue_positives=1)
    with pytest.raises(TypeError, match="queue_positives must be a bool"):
        MoCoLoss(queue_positives="yes")
    with pytest.raises(ValueError, match="queue_positives=True .* needs labels"):
        MoCoLoss(queue_size=8, queue_positives=True)(q, k)
    assert "queue_positives=True" in repr(MoCoLoss(queue_size=8, queue_positives=True))


def test_pure_function_matches_module_and_gradcheck():
    q, k = randn64(3, 4, seed=90), randn64(3, 4, seed=91)
    queue, past = (
        randn64(5, 4, seed=92, requires_grad=False),
        randn64(5, 4, seed=93, requires_grad=False),
    )
    labels, queue_labels = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 0, 0, 3])
    kwargs = dict(
        temperature=0.4,
        labels=labels,
        queue_labels=queue_labels,
        query_queue=past,
        in_batch_negatives=True,
        symmetric=True,
    )
    oracle = (
        moco_direction_oracle(q, k, queue, 0.4, [0, 1, 0], [1, 2, 0, 0, 3], True)
        + moco_direction_oracle(k, q, past, 0.4, [0, 1, 0], [1, 2, 0, 0, 3], True)
    ) / 2
    assert_close_with_grads(moco_loss(q, k, queue, **kwargs), oracle, (q, k))
    assert torch.autograd.gradcheck(lambda a, b: moco_loss(a, b, queue, **kwargs), (q, k))


def test_reductions_terms_and_alias():
    loss_fn = create_loss("memory_queue", queue_size=16, symmetric=True, reduction="none")
    assert isinstance(loss_fn, MoCoLoss)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    loss_fn(a, b)
    out = loss_fn.compute(b, a)
    assert out.loss.shape == (4,)
    assert set(out.terms) == {
        "accuracy",
        "positive_similarity",
        "negative_similarity",
        "queue_fill",
        "temperature",
        "loss_query_to_key",
        "loss_key_to_query",
    }
    torch.testing.assert_close(
        out.loss.mean(), (out.terms["loss_query_to_key"] + out.terms["loss_key_to_query"]) / 2
    )
    assert out.terms["queue_fill"].item() == pytest.approx(0.25)
    assert out.terms["temperature"].item() == pytest.approx(0.2)
    bn = torch.nn.functional.normalize(
        b, dim=1
    )  # the queries, and the keys queued by the first call
    assert out.terms["negative_similarity"].item() == pytest.approx(
        (bn @ bn.T).mean().item(), abs=1e-6
    )
    summed = MoCoLoss(queue_size=16, reduction="sum")
    summed(a, b)
    per = MoCoLoss(queue_size=16, reduction="none")
    per(a, b)
    torch.testing.assert_close(summed(b, a), per(b, a).sum())


def test_accuracy_term_is_one_for_perfect_pairs():
    loss_fn = MoCoLoss(queue_size=8, temperature=0.1)
    z = torch.eye(4, 8)
    loss_fn(z, z)
    assert loss_fn.compute(z[[1, 0, 3, 2]], z[[1, 0, 3, 2]]).terms["accuracy"].item() == 1.0


def test_bfloat16_and_tiny_temperature_are_finite():
    loss_fn = MoCoLoss(queue_size=16, temperature=1e-3, in_batch_negatives=True)
    a, b = 1e4 * torch.randn(6, 8), 1e4 * torch.randn(6, 8)
    loss_fn(a, b)
    out = loss_fn(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert loss_fn.queue.dtype == torch.float32


def test_learnable_temperature_gets_the_gradient_of_the_formula():
    loss_fn = MoCoLoss(queue_size=8, learnable_temperature=True, in_batch_negatives=True).double()
    q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    loss_fn(q, k).backward()
    # logit_scale = log(1/τ): dL/d logit_scale = dL/dτ · dτ/d logit_scale = −τ · dL/dτ
    tau = torch.exp(-loss_fn.logit_scale.detach()).requires_grad_(True)
    moco_loss(q, k, temperature=tau, in_batch_negatives=True).backward()
    assert tau.grad is not None and tau.grad.abs() > 1e-3  # the check can fail
    torch.testing.assert_close(loss_fn.logit_scale.grad, -tau.detach() * tau.grad)


def test_bad_inputs():
    loss_fn = MoCoLoss(queue_size=4)
    with pytest.raises(
        ValueError, match=r"the batch \(5 keys\) is larger than the queue \(queue_size=4\)"
    ):
        loss_fn(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(
        ValueError, match=r"query and key must have the same shape, got \(3, 4\) and \(3, 5\)"
    ):
        loss_fn(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(3,\) to match the batch, got \(2,\)"
    ):
        loss_fn(torch.randn(3, 4), torch.randn(3, 4), torch.arange(2))
    loss_fn(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="key embedding size D=6 does not match the queue's D=4"):
        loss_fn(torch.randn(3, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match="query is on meta but the queue buffers are on cpu"):
        loss_fn(torch.randn(3, 4, device="meta"), torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError, match="queue_size must be >= 1, got 0"):
        MoCoLoss(queue_size=0)
    with pytest.raises(TypeError, match="in_batch_negatives must be a bool"):
        MoCoLoss(in_batch_negatives=1)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        MoCoLoss(temperature=0.0)
    assert "queue_size=4, in_batch_negatives=False" in repr(loss_fn)


def test_pure_function_bad_inputs():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"queue must be a floating-point \(K, D=4\) tensor"):
        moco_loss(q, q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="pass queue_labels"):
        moco_loss(q, q, torch.randn(5, 4), labels=torch.arange(3))
    with pytest.raises(
        ValueError, match="queue_labels mask same-label queue entries and need labels"
    ):
        moco_loss(q, q, torch.randn(5, 4), queue_labels=torch.arange(5))
    with pytest.raises(ValueError, match=r"queue_labels must have shape \(5,\)"):
        moco_loss(q, q, torch.randn(5, 4), labels=torch.arange(3), queue_labels=torch.arange(4))
    with pytest.raises(ValueError, match="pass query_queue"):
        moco_loss(q, q, torch.randn(5, 4), symmetric=True)
    with pytest.raises(ValueError, match="query_queue must have the queue's shape"):
        moco_loss(q, q, torch.randn(5, 4), query_queue=torch.randn(4, 4), symmetric=True)
    with pytest.raises(ValueError, match="queue_labels and query_queue need a queue"):
        moco_loss(q, q, queue_labels=torch.arange(2))
    # no queue, or an empty one, is allowed (and adds nothing)
    assert moco_loss(q, q).item() == 0.0
    assert moco_loss(q, q, torch.zeros(0, 4), labels=torch.arange(3)).item() == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_unnormalized_training_steps_backpropagate_after_enqueue(symmetric):
    # Regression: the scored queue was a view that the enqueue overwrote before backward.
    loss = MoCoLoss(queue_size=16, normalize=False, symmetric=symmetric)
    for _ in range(3):
        q = torch.randn(4, 8, requires_grad=True)
        k = torch.randn(4, 8, requires_grad=True)
        loss(q, k).backward()
        assert torch.isfinite(q.grad).all()
    assert int(loss.queue_count) == 12
