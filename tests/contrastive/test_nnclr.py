import pytest
import torch

from embedloss import NNCLRLoss, create_loss
from embedloss.base.queue import FeatureQueue
from embedloss.functional import nnclr_loss, simclr_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.oracles import nt_xent_oracle
from tests.self_distillation.lightly_reference import load
from tests.self_distillation.oracles import nearest_row


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _oracle_sequence(batches, *, tau, queue_size, predictions=False):
    """Replay training with a Python FIFO of normalised z_a (newest last), searched by cosine."""
    support = []
    for z_a, z_b, p_a, p_b in batches:
        bank = torch.stack(support) if support else None

        def nn(z, bank=bank):
            if bank is None:
                return z.detach()
            return torch.stack([nearest_row(z[i], bank) for i in range(z.shape[0])])

        pa, pb = (p_a, p_b) if predictions else (z_a, z_b)
        yield (nt_xent_oracle(nn(z_a), pb, tau) + nt_xent_oracle(nn(z_b), pa, tau)) / 2
        support = (support + list(_unit(z_a.detach())))[-queue_size:]


def _batches(steps, n=3, d=4, seed=0):
    return [tuple(randn64(n, d, seed=seed + 4 * s + i) for i in range(4)) for s in range(steps)]


@pytest.mark.parametrize("predictions", [False, True])
def test_training_sequence_matches_the_oracle_with_wrap_around(predictions):
    # queue_size 5 with batches of 3: the second batch wraps around the end.
    batches = _batches(4)
    loss_fn = NNCLRLoss(temperature=0.2, queue_size=5)
    oracle = _oracle_sequence(batches, tau=0.2, queue_size=5, predictions=predictions)
    for (z_a, z_b, p_a, p_b), want in zip(batches, oracle, strict=True):
        got = loss_fn(z_a, z_b, p_a, p_b) if predictions else loss_fn(z_a, z_b)
        inputs = (p_a, p_b) if predictions else (z_a, z_b)
        assert_close_with_grads(got, want, inputs)
    assert loss_fn.queue.n_filled == 5


def test_empty_support_set_is_nt_xent_against_the_view_itself():
    z_a, z_b = randn64(4, 5), randn64(4, 5, seed=1)
    got = NNCLRLoss(temperature=0.3, queue_size=8)(z_a, z_b)
    want = (
        simclr_loss(z_a.detach(), z_b, temperature=0.3)
        + simclr_loss(z_b.detach(), z_a, temperature=0.3)
    ) / 2
    assert_close_with_grads(got, want, (z_a, z_b))


def test_neighbours_carry_no_gradient_and_predictions_take_it():
    loss_fn = NNCLRLoss(queue_size=16)
    loss_fn(randn64(8, 4, seed=3), randn64(8, 4, seed=4))
    z_a, z_b, p_a, p_b = _batches(1, n=4)[0]
    loss_fn(z_a, z_b, p_a, p_b).backward()
    assert z_a.grad is None and z_b.grad is None
    assert p_a.grad is not None and p_b.grad is not None


def test_functional_support_set_equals_the_module_queue():
    loss_fn = NNCLRLoss(queue_size=6)
    first = _batches(1, seed=20)[0]
    loss_fn(first[0], first[1])
    z_a, z_b, _, _ = _batches(1, seed=30)[0]
    support = loss_fn.queue.entries(4)
    torch.testing.assert_close(loss_fn.eval()(z_a, z_b), nnclr_loss(z_a, z_b, support))
    torch.testing.assert_close(support, _unit(first[0].detach()))


def test_terms_queue_fill_similarity_and_nn_accuracy():
    loss_fn = NNCLRLoss(queue_size=8)
    x = randn64(4, 6, seed=7, requires_grad=False)
    labels = torch.tensor([0, 1, 2, 3])
    out = loss_fn.compute(x, x.clone(), labels=labels)
    assert out.terms["queue_fill"] == 0 and out.terms["nn_similarity"] == pytest.approx(1.0)
    assert "nn_accuracy" not in out.terms  # nothing to look up yet
    noisy = x + 1e-3 * randn64(4, 6, seed=8, requires_grad=False)
    out = loss_fn.compute(noisy, noisy.clone(), labels=torch.tensor([0, 1, 2, 5]))
    assert out.terms["queue_fill"] == 0.5
    assert out.terms["nn_accuracy"] == pytest.approx(0.75)  # the last neighbour has label 3
    assert 0.99 < out.terms["nn_similarity"] <= 1.0
    assert set(out.terms) == {
        "accuracy",
        "nn_similarity",
        "queue_fill",
        "temperature",
        "nn_accuracy",
    }
    unlabeled = NNCLRLoss(queue_size=8)
    unlabeled(x, x)
    assert "nn_accuracy" not in unlabeled.compute(x, x, labels=labels).terms


def test_labels_make_same_label_rows_positives():
    z_a, z_b = randn64(4, 3), randn64(4, 3, seed=1)
    labels = torch.tensor([0, 0, 1, 1])
    got = NNCLRLoss(queue_size=8)(z_a, z_b, labels=labels)
    want = (
        simclr_loss(z_a.detach(), z_b, temperature=0.1, labels=labels)
        + simclr_loss(z_b.detach(), z_a, temperature=0.1, labels=labels)
    ) / 2
    torch.testing.assert_close(got, want)


def test_eval_mode_does_not_enqueue_and_state_dict_round_trips_bit_exactly():
    loss_fn = NNCLRLoss(queue_size=7)
    for z_a, z_b, _, _ in _batches(3):
        loss_fn(z_a, z_b)
    resumed = NNCLRLoss(queue_size=7)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.queue.features, loss_fn.queue.features)
    assert resumed.queue.n_filled == 7 and resumed.queue.fill == 1.0
    for z_a, z_b, _, _ in _batches(2, seed=50):
        assert torch.equal(resumed(z_a, z_b), loss_fn(z_a, z_b))
    assert torch.equal(resumed.queue.features, loss_fn.queue.features)
    before = loss_fn.queue.features.clone()
    loss_fn.eval()(*_batches(1, seed=90)[0][:2])
    assert torch.equal(loss_fn.queue.features, before)


def test_lightly_parity():
    # lightly's recipe: z0 = NNMemoryBankModule(z0, update=False), z1 = ...(z1, update=True),
    # loss = ½(NTXentLoss(z0, p1) + NTXentLoss(z1, p0)). Its bank starts with random rows, stores
    # raw embeddings (float32: made float64 here) and enqueues the second view; ours starts
    # empty, stores normalised rows and enqueues z_a. Mapping: our z_a is lightly's z1 (the
    # enqueued one), our z_b its z0; once both banks hold the same rows (after two batches of 4
    # in 8 rows) the losses agree (NT-Xent normalises, so raw and normalised rows score alike).
    torch.manual_seed(0)
    bank = load("models.modules.nn_memory_bank").NNMemoryBankModule(size=(8, 5))
    bank.bank = bank.bank.double()
    criterion = load("loss.ntx_ent_loss").NTXentLoss(temperature=0.2)
    loss_fn = NNCLRLoss(temperature=0.2, queue_size=8)
    for step, (z_a, z_b, p_a, p_b) in enumerate(_batches(5, n=4, d=5)):
        nn_b = bank(z_b.detach(), update=False)
        nn_a = bank(z_a.detach(), update=True)
        want = 0.5 * (criterion(nn_b, p_a) + criterion(nn_a, p_b))
        got = loss_fn(z_a, z_b, p_a, p_b)
        if step >= 2:
            assert_close_with_grads(got, want, (p_a, p_b))


def test_registry():
    z_a, z_b = randn64(4, 3, requires_grad=False), randn64(4, 3, seed=1, requires_grad=False)
    torch.testing.assert_close(
        create_loss("nnclr", temperature=0.5)(z_a, z_b), nnclr_loss(z_a, z_b, temperature=0.5)
    )


def test_bad_inputs_are_clear_errors():
    z_a, z_b, p_a, _ = _batches(1)[0]
    loss_fn = NNCLRLoss(queue_size=4)
    with pytest.raises(ValueError, match="pass both predictions p_a and p_b, or neither"):
        loss_fn(z_a, z_b, p_a)
    with pytest.raises(ValueError, match="p_a and z_a must have the same shape"):
        loss_fn(z_a, z_b, p_a[:, :2], p_a[:, :2])
    with pytest.raises(ValueError, match="larger than the queue"):
        NNCLRLoss(queue_size=2)(z_a, z_b)
    loss_fn(z_a, z_b)
    with pytest.raises(ValueError, match="does not match the queue's D=4"):
        loss_fn(z_a[:, :3], z_b[:, :3])
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        NNCLRLoss(queue_size=0)
    with pytest.raises(ValueError, match="support must have the views' D=4"):
        nnclr_loss(z_a, z_b, torch.zeros(3, 2))


# ------------------------------------------------------------------ the FIFO queue itself


def test_queue_is_fifo_with_wrap_around_and_labels():
    queue = FeatureQueue(5)
    assert queue.entries(2) is None and queue.entry_labels() is None and queue.fill == 0
    queue.enqueue(torch.arange(6.0).reshape(3, 2), labels=torch.tensor([0, 1, 2]))
    queue.enqueue(torch.arange(6.0, 12.0).reshape(3, 2), labels=torch.tensor([3, 4, 5]))
    # slots 0..4 after wrapping: the sixth row overwrote the first
    assert queue.entries(2)[:, 0].tolist() == [10.0, 2.0, 4.0, 6.0, 8.0]
    assert queue.entry_labels().tolist() == [5, 1, 2, 3, 4]
    assert queue.n_filled == 5 and int(queue.ptr) == 1 and int(queue.count) == 5


def test_queue_streams_state_dict_and_reset():
    queue = FeatureQueue(4, streams=2)
    queue.enqueue(torch.ones(3, 2), 2 * torch.ones(3, 2))
    copy = FeatureQueue(4, streams=2)
    copy.load_state_dict(queue.state_dict())
    assert copy.features.shape == (2, 4, 2) and copy.n_filled == 3
    assert torch.equal(copy.entries(2, stream=1), 2 * torch.ones(3, 2))
    assert not copy.fully_labeled
    with pytest.raises(ValueError, match="enqueued without labels"):
        copy.entry_labels()
    copy.reset()
    assert copy.n_filled == 0 and copy.entries(2) is None and copy.fully_labeled
    with pytest.raises(ValueError, match="enqueue needs 2 feature tensor"):
        queue.enqueue(torch.ones(1, 2))


def test_queue_checks_the_batch_and_device():
    queue = FeatureQueue(3)
    with pytest.raises(ValueError, match="larger than the queue"):
        queue.check_batch(torch.ones(4, 2), "keys")
    with pytest.raises(ValueError, match="larger than the queue"):
        queue.enqueue(torch.ones(4, 2))
    with pytest.raises(ValueError, match="is on meta but the queue buffers are on cpu"):
        queue.check_batch(torch.ones(2, 2, device="meta"), "keys")
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        FeatureQueue(0)
