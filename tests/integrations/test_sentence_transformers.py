"""embedloss losses as sentence-transformers losses: parity with ST's own losses, layouts,
gradient caching, and training in ``SentenceTransformerTrainer`` (tiny offline BERT).

Conventions mapped (see ``ST_LOSSES``): ST multiplies cosine similarities by ``scale``;
embedloss divides normalised dot products by τ, so ``scale=20`` is ``temperature=0.05``.
"""

from __future__ import annotations

import copy

import pytest
import sentence_transformers.sentence_transformer.losses as st
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from torch import Tensor

import embedloss
from embedloss.base.base_loss import BaseLoss, LossOutput, detached_terms
from embedloss.integrations.sentence_transformers import ST_LOSSES, EmbedlossLoss
from embedloss.integrations.transformers import STATE_FILE

from .conftest import sentences


def features(model, texts: list[str]) -> dict[str, Tensor]:
    return dict(model.preprocess(texts))


def batch(model, n: int = 8, columns: int = 2, seed: int = 0) -> list[dict[str, Tensor]]:
    return [features(model, sentences(n, seed + 100 * c)) for c in range(columns)]


def grads(model) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def value_and_grads(loss_module, model, cols, labels=None):
    model.zero_grad()
    value = loss_module(cols, labels)
    value.backward()
    return value.detach(), grads(model)


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Equal to float64 rounding (the parity tests run the model in float64)."""
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == torch.float64
        torch.testing.assert_close(a[name], b[name], atol=1e-10, rtol=1e-8, msg=name)


@pytest.fixture
def model64(st_model):
    return st_model.double()


# -- parity with ST's own losses -------------------------------------------------------------


def test_pairs_match_multiple_negatives_ranking_loss(model64):
    cols = batch(model64)
    ours = EmbedlossLoss(model64, "info_nce", loss_options={"temperature": 0.05})
    theirs = st.MultipleNegativesRankingLoss(model64, scale=20.0)
    v_ours, g_ours = value_and_grads(ours, model64, cols)
    v_theirs, g_theirs = value_and_grads(theirs, model64, cols)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


def test_symmetric_pairs_match_clip(model64):
    cols = batch(model64, seed=1)
    ours = EmbedlossLoss(model64, "clip", loss_options={"temperature": 0.05})
    theirs = st.MultipleNegativesRankingLoss(  # = MultipleNegativesSymmetricRankingLoss
        model64,
        scale=20.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
    )
    v_ours, g_ours = value_and_grads(ours, model64, cols)
    v_theirs, g_theirs = value_and_grads(theirs, model64, cols)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


@pytest.mark.parametrize("columns", [1, 2])
def test_labels_layout_matches_mse_distillation(model64, columns):
    cols = batch(model64, columns=columns, seed=2)
    teacher = torch.randn(
        8, 16, dtype=torch.float64
    )  # one target embedding per row, shared by the columns (ST)
    ours = EmbedlossLoss(model64, "mse")
    assert ours.inputs == "labels"
    v_ours, g_ours = value_and_grads(ours, model64, cols, teacher)
    v_theirs, g_theirs = value_and_grads(st.MSELoss(model64), model64, cols, teacher)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


@pytest.mark.parametrize("st_name", ["CoSENTLoss", "AnglELoss"])
def test_scored_pairs_match_st(model64, st_name):
    cols = batch(model64, seed=11)
    scores = torch.rand(8).double()  # exact in float32, which ST casts the scores to
    equivalent = ST_LOSSES[st_name]
    ours = EmbedlossLoss(model64, equivalent.loss, loss_options=equivalent.options)
    assert ours.inputs == "scores"
    v_ours, g_ours = value_and_grads(ours, model64, cols, scores)
    v_theirs, g_theirs = value_and_grads(getattr(st, st_name)(model64), model64, cols, scores)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


@pytest.mark.parametrize(
    "st_name", ["BatchAllTripletLoss", "BatchHardTripletLoss", "BatchSemiHardTripletLoss"]
)
def test_labelled_sentences_match_st_triplet_losses(model64, st_name):
    cols = batch(model64, n=12, columns=1, seed=12)
    labels = torch.arange(12) % 4  # every row has positives and negatives
    equivalent = ST_LOSSES[st_name]
    ours = EmbedlossLoss(model64, equivalent.loss, loss_options=equivalent.options)
    v_ours, g_ours = value_and_grads(ours, model64, cols, labels)
    v_theirs, g_theirs = value_and_grads(getattr(st, st_name)(model64), model64, cols, labels)
    assert v_theirs > 0
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


def test_matryoshka_of_info_nce_matches_st_matryoshka_of_mnrl(model64):
    cols = batch(model64, seed=13)
    dims, weights = (16, 8, 4), (1.0, 0.5, 0.25)
    inner = {"name": "info_nce", "temperature": 0.05}
    options = {"loss": inner, "dims": dims, "weights": weights}
    ours = EmbedlossLoss(model64, "matryoshka", loss_options=options)
    assert ours.inputs == "pair"  # the wrapped loss's layout
    theirs = st.MatryoshkaLoss(
        model64, st.MultipleNegativesRankingLoss(model64), list(dims), list(weights)
    )
    v_ours, g_ours = value_and_grads(ours, model64, cols)
    v_theirs, g_theirs = value_and_grads(theirs, model64, cols)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


class CosineScoreLoss(BaseLoss):
    """A scores-layout loss for the test: mean squared error of cos(a, b) and the score."""

    def compute(self, embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor) -> LossOutput:
        cos = torch.nn.functional.cosine_similarity(embeddings_a, embeddings_b)
        loss = (cos - scores).pow(2).mean()
        return LossOutput(loss, detached_terms(mean_cosine=cos.mean()))


def test_a_loss_of_ones_own_with_scores_works_too(model64):
    # any BaseLoss whose compute takes (embeddings_a, embeddings_b, scores): this one is ST's
    # CosineSimilarityLoss (which has no registered counterpart)
    cols = batch(model64, seed=3)
    scores = torch.rand(8).double()  # exact in float32, which ST casts the scores to
    ours = EmbedlossLoss(model64, CosineScoreLoss())
    assert ours.inputs == "scores"
    v_ours, g_ours = value_and_grads(ours, model64, cols, scores)
    v_theirs, g_theirs = value_and_grads(st.CosineSimilarityLoss(model64), model64, cols, scores)
    torch.testing.assert_close(v_ours, v_theirs, atol=1e-12, rtol=1e-10)
    assert_same(g_ours, g_theirs)


# -- layouts against the loss called directly ------------------------------------------------


def embed(model, cols):
    return [model(f)["sentence_embedding"] for f in cols]


def test_negative_columns_are_each_anchors_own_negatives(model64):
    cols = batch(model64, columns=4, seed=4)
    ours = EmbedlossLoss(model64, "info_nce")
    v_ours, g_ours = value_and_grads(ours, model64, cols)
    model64.zero_grad()
    a, p, n1, n2 = embed(model64, cols)
    direct = embedloss.InfoNCELoss()(a, p, torch.stack([n1, n2], dim=1))
    direct.backward()
    torch.testing.assert_close(v_ours, direct.detach())
    assert_same(g_ours, grads(model64))


def test_a_wrapper_passes_negatives_and_labels_to_the_loss_it_wraps(model64):
    options = {"loss": "info_nce", "dims": (16, 8)}
    loss = EmbedlossLoss(model64, "matryoshka", loss_options=options)
    cols = batch(model64, columns=3, seed=14)
    v_ours, g_ours = value_and_grads(loss, model64, cols)
    model64.zero_grad()
    a, p, n = embed(model64, cols)
    direct = embedloss.MatryoshkaLoss(**options)(a, p, n.unsqueeze(1))
    direct.backward()
    torch.testing.assert_close(v_ours, direct.detach())
    assert_same(g_ours, grads(model64))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss(batch(model64, seed=15), labels)  # the wrapped info_nce takes labels
    no_labels = EmbedlossLoss(model64, "matryoshka", loss_options={"loss": "vicreg", "dims": (8,)})
    with pytest.raises(ValueError, match="MatryoshkaLoss takes no labels"):
        no_labels(batch(model64, seed=15), labels)


def test_labels_column_marks_identities_of_a_pair_loss(model64):
    cols = batch(model64, seed=5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = EmbedlossLoss(model64, "simclr", loss_options={"temperature": 0.2})
    v_ours, g_ours = value_and_grads(loss, model64, cols, labels)
    model64.zero_grad()
    direct = embedloss.SimCLRLoss(temperature=0.2)(*embed(model64, cols), labels=labels)
    direct.backward()
    torch.testing.assert_close(v_ours, direct.detach())
    assert_same(g_ours, grads(model64))


def test_supervised_loss_takes_the_columns_as_rows_of_one_labelled_batch(model64):
    cols = batch(model64, seed=6)
    labels = torch.arange(8) % 3
    loss = EmbedlossLoss(model64, "supcon")
    assert loss.inputs == "labels"
    v_ours, g_ours = value_and_grads(loss, model64, cols, labels)
    model64.zero_grad()
    direct = embedloss.SupConLoss()(torch.cat(embed(model64, cols)), torch.cat([labels, labels]))
    direct.backward()
    torch.testing.assert_close(v_ours, direct.detach())
    assert_same(g_ours, grads(model64))


def test_loss_parameters_get_gradients_and_terms_are_recorded(st_model):
    loss = EmbedlossLoss(st_model, "siglip", loss_options={"learnable_temperature": True})
    assert {"loss.logit_scale", "loss.logit_bias"} <= {n for n, _ in loss.named_parameters()}
    loss(batch(st_model, seed=7), None).backward()
    assert loss.loss.logit_scale.grad is not None and loss.loss.logit_bias.grad is not None
    logs = {"loss": 1.0}
    loss.callback.add_terms(logs)
    assert {"accuracy", "temperature", "bias"} <= set(logs)


def test_the_loss_follows_the_models_mode(st_model):
    loss = EmbedlossLoss(st_model, "moco", loss_options={"queue_size": 32})
    st_model.eval()
    with torch.no_grad():
        loss(batch(st_model, seed=8), None)
    assert not loss.loss.training and int(loss.loss.queue_ptr) == 0  # eval: no enqueue
    st_model.train()
    loss(batch(st_model, seed=8), None)
    assert loss.loss.training and int(loss.loss.queue_ptr) == 8


# -- gradient caching ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["info_nce", "clip"])
def test_micro_batches_give_the_gradients_of_the_full_batch(model64, name):
    cols = batch(model64, n=10, seed=9)
    options = {"learnable_temperature": True}
    plain = EmbedlossLoss(model64, name, loss_options=options).double()
    cached = EmbedlossLoss(model64, name, loss_options=options, micro_batch_size=3).double()
    model64.zero_grad()
    (0.5 * plain(cols, None)).backward()
    used = [n for n, p in plain.named_parameters() if p.grad is not None]  # BERT's pooler is not
    assert "loss.logit_scale" in used and len(used) > 10
    expected = {n: p.grad.clone() for n, p in plain.named_parameters() if n in used}

    params = dict(cached.named_parameters())
    for p in params.values():
        p.grad = torch.ones_like(p)  # gradients accumulate, as with backward()
    value = cached(cols, None)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params.values())  # not yet
    (0.5 * value).backward()  # the trainer's scale (gradient accumulation) reaches the cache
    for name in used:
        torch.testing.assert_close(params[name].grad - 1, expected[name], atol=1e-10, rtol=1e-8)
    with torch.no_grad():  # evaluation: no graph, no caching
        torch.testing.assert_close(cached(cols, None), plain(cols, None))


# -- the trainer -----------------------------------------------------------------------------


def pair_dataset(n: int = 32) -> Dataset:
    anchors = sentences(n, seed=10)
    positives = [" ".join([*s.split()[:-1], "sun"]) for s in anchors]  # one word changed
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def train(model, loss, tmp_path, *, max_steps, resume=None, **extra):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=extra.pop("learning_rate", 1e-3),
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=extra.pop("save_steps", 1000),
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=pair_dataset(), loss=loss, callbacks=[loss.callback]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
def test_trainer_trains_the_model_and_the_temperature_and_logs_the_terms(st_model, tmp_path):
    loss = EmbedlossLoss(st_model, "info_nce", loss_options={"learnable_temperature": True})
    start = loss.loss.logit_scale.detach().clone()
    trainer = train(st_model, loss, tmp_path, max_steps=16, learning_rate=3e-3)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 16
    assert sum(e["loss"] for e in logs[-4:]) < sum(e["loss"] for e in logs[:4])
    assert {"accuracy", "positive_similarity", "temperature"} <= set(logs[-1])
    assert not torch.equal(loss.loss.logit_scale.detach(), start)  # τ is optimised too
    assert logs[-1]["temperature"] != logs[0]["temperature"]


@pytest.mark.slow
def test_trainer_with_micro_batches_matches_plain_training(tiny_bert_dir, st_model, tmp_path):
    twin = copy.deepcopy(st_model)
    before = {n: p.detach().clone() for n, p in st_model.named_parameters()}
    options = {"learnable_temperature": True}
    plain = EmbedlossLoss(st_model, "clip", loss_options=options)
    cached = EmbedlossLoss(twin, "clip", loss_options=options, micro_batch_size=3)
    kwargs = {"optim": "sgd", "gradient_accumulation_steps": 2, "learning_rate": 0.05}
    train(st_model, plain, tmp_path / "plain", max_steps=3, **kwargs)
    train(twin, cached, tmp_path / "cached", max_steps=3, **kwargs)
    a, b = dict(st_model.named_parameters()), dict(twin.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(plain.loss.logit_scale, cached.loss.logit_scale)
    assert sum(not torch.equal(a[n], before[n]) for n in a) > 10  # it did train


@pytest.mark.slow
def test_checkpoints_carry_the_queue_and_resume_restores_it(tiny_bert_dir, st_model, tmp_path):
    options = {"queue_size": 32}  # four batches: entries from before the resume stay
    twin = copy.deepcopy(st_model)
    straight = EmbedlossLoss(st_model, "moco", loss_options=options)
    train(st_model, straight, tmp_path / "straight", max_steps=6)

    first = EmbedlossLoss(twin, "moco", loss_options=options)
    train(twin, first, tmp_path / "resumed", max_steps=3, save_steps=3)
    saved = torch.load(tmp_path / "resumed" / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert torch.equal(saved["loss"]["queue"], first.loss.queue)
    assert int(saved["loss"]["queue_ptr"]) == 3 * 8

    resumed_model = copy.deepcopy(twin)
    resumed = EmbedlossLoss(resumed_model, "moco", loss_options=options)  # an empty queue
    train(
        resumed_model,
        resumed,
        tmp_path / "resumed",
        max_steps=6,
        resume=str(tmp_path / "resumed" / "checkpoint-3"),
    )
    torch.testing.assert_close(resumed.loss.queue, straight.loss.queue, atol=1e-6, rtol=1e-5)
    assert int(resumed.loss.queue_ptr) == int(straight.loss.queue_ptr) == 6 * 8 % 32
    for (name, a), b in zip(st_model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# -- the mapping, the config and the errors ---------------------------------------------------


def test_every_mapped_name_is_a_sentence_transformers_loss_and_a_known_embedloss_loss():
    registered = set(embedloss.list_losses())
    for st_name, equivalent in ST_LOSSES.items():
        assert hasattr(st, st_name), st_name
        assert equivalent.loss in registered, (st_name, equivalent.loss)
        if equivalent.loss != "matryoshka":  # which needs the loss it wraps
            embedloss.create_loss(equivalent.loss, **equivalent.options)  # the options are valid


def test_config_dict_names_the_loss_and_layout(st_model):
    loss = EmbedlossLoss(st_model, "clip", loss_options={"temperature": 0.05}, micro_batch_size=4)
    assert loss.get_config_dict() == {
        "loss": "clip",
        "loss_options": {"temperature": 0.05},
        "inputs": "pair",
        "micro_batch_size": 4,
    }
    assert EmbedlossLoss(st_model, embedloss.SupConLoss()).get_config_dict()["loss"] == "SupConLoss"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": 3}, TypeError, "loss must be an embedloss loss or a registry name, got int 3"),
        ({"loss": "clpi"}, ValueError, "did you mean"),
        (
            {"loss": embedloss.CLIPLoss(), "loss_options": {"temperature": 0.1}},
            TypeError,
            "loss_options apply to a loss given by name",
        ),
        ({"loss": "clip", "inputs": "triples"}, ValueError, "inputs"),
        ({"loss": "clip", "micro_batch_size": 0}, ValueError, "micro_batch_size"),
        (
            {"loss": "combined", "loss_options": {"losses": {"a": "clip"}}},
            ValueError,
            "pass inputs=",
        ),
    ],
)
def test_bad_arguments(st_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbedlossLoss(st_model, **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a SentenceTransformer"):
        EmbedlossLoss("all-MiniLM-L6-v2", "clip")


@pytest.mark.parametrize(
    ("loss", "inputs", "columns", "labels", "match"),
    [
        ("clip", "auto", 3, None, "CLIPLoss takes \\(anchor, positive\\) columns, got 3"),
        ("clip", "auto", 1, None, "needs two columns, got 1"),
        ("vicreg", "auto", 2, torch.arange(8), "VICRegLoss takes no labels"),
        ("supcon", "auto", 2, None, "needs a 'label' column, got none"),
        (
            CosineScoreLoss(),
            "auto",
            3,
            torch.rand(8),
            "needs two text columns and a score column, got 3",
        ),
    ],
)
def test_batches_that_do_not_fit_the_layout(st_model, loss, inputs, columns, labels, match):
    module = EmbedlossLoss(st_model, loss, inputs=inputs)
    with pytest.raises(ValueError, match=match):
        module(batch(st_model, columns=columns), labels)
