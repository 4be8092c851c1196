"""Every method of this round trains end to end; micro-batches give the plain step; big batches."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from embedloss.cli import train as train_mod
from embedloss.cli.config import resolve_config
from embedloss.cli.data import load_task_data
from embedloss.cli.main import main
from embedloss.cli.methods import resolve_method
from embedloss.cli.runtime import World, deterministic
from embedloss.cli.tasks import make_plan
from embedloss.cli.use import load_encoder
from embedloss.cli.views import epoch_order, make_batch

TINY = ["train", "-q", "--epochs", "1", "--batch-size", "64"]
RETRIEVAL = {"precision_at_1", "r_precision", "map_at_r"}
#: What the first line of a run says about each method's parts.
HEADERS = {
    "moco": "EMA teacher (momentum 0.99)",
    "negative_cosine": "EMA teacher (momentum 0.996 → 1, cosine)",
    "dino": "EMA teacher (momentum 0.996 → 1, cosine), 4 local crops, 256 prototypes",
    "ibot_patch": "4 local crops, masked patches, 256 prototypes",
    "swav": "; 4 local crops, 256 prototypes;",
    "nnclr": "EMA teacher (momentum 0.99 → 1, cosine)",
}
#: simclr + 0.1·koleo: its parts see different inputs (the pair and their concatenation).
COMBINED = {
    "name": "combined",
    "losses": {"simclr": {"name": "simclr"}, "koleo": {"name": "koleo"}},
    "weights": {"koleo": 0.1},
}
NEW = [
    "moco",
    "negative_cosine",
    "nnclr",
    "dino",
    "ibot_patch",
    "swav",
    "koleo",
    "triplet",
    "contrastive_margin",
    "multi_similarity",
    "circle",
    "arcface",
    "cosface",
    "proxy_anchor",
    "cosent",
    "angle",
    "matryoshka",
]


@pytest.mark.parametrize("name", NEW)
def test_every_method_trains_end_to_end(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--loss", name, "--output", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert HEADERS.get(name, "") in header
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["metrics"]) >= RETRIEVAL and set(doc["baselines"]["raw_features"]) >= RETRIEVAL
    assert all(math.isfinite(v) for v in doc["metrics"].values())
    assert math.isfinite(doc["history"][0]["loss"])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert "auto" not in cfg["method"].values()  # resolved, so the run repeats exactly
    if name == "matryoshka":  # quality at every nested size, for the model and the random encoder
        for d in (8, 16, 32):
            keys = {f"dim_{d}/knn_accuracy", f"dim_{d}/precision_at_1", f"dim_{d}/map_at_r"}
            assert keys <= set(doc["metrics"]) and keys <= set(doc["baselines"]["random_encoder"])
        assert "dim_8/knn_accuracy" not in doc["baselines"]["raw_features"]
    # the run's model is rebuilt from its checkpoint (teacher, heads, patches included)
    encoder = load_encoder(out)
    assert encoder(torch.zeros(3, 8, 8)).shape == (3, 64)


def test_class_weights_and_proxies_are_trained_with_their_learning_rate(tmp_path):
    for name, scale in (("arcface", 1.0), ("proxy_anchor", 100.0)):
        out = tmp_path / name
        assert main([*TINY, "--loss", name, "--output", str(out)]) == 0
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        group = ckpt["optimizer"]["param_groups"][1]
        assert group["lr_scale"] == scale and group["lr"] == pytest.approx(0.002 * scale)
        (index,) = group["params"]
        assert ckpt["optimizer"]["state"][index]["exp_avg"].abs().sum() > 0
        assert ckpt["loss"]["weight"].shape == (10, 64)  # classes × projection width


def _one_step(loss, micro, steps=1):
    cfg = resolve_config(
        {
            "loss": loss,
            "batch_size": 32,
            "model": {"norm": "layer", "hidden_dim": 32},
            "micro_batch_size": micro,
        }
    )
    plan = make_plan(cfg["loss"], cfg["task"])
    with deterministic(0, 1, "cpu"):
        data = load_task_data(cfg["data"], plan.task, 0)
        method = resolve_method(plan, cfg["method"], data.image_shape)
        cfg["method"] = method.as_config()
        world = World(1, 0, torch.device("cpu"))
        sess = train_mod._build(plan, method, data, cfg, world)
        order = epoch_order(len(data.train), batch=32, rank=0, size=1, epoch=0, seed=0)
        grads = []
        for s in range(steps):
            batch = make_batch(
                data, cfg, method, (0, 1, world.device), 0, s, order[s * 32 : (s + 1) * 32], False
            )
            real_step = sess.opt.step

            def record(*args, real_step=real_step, **kwargs):
                grads.append(
                    {
                        n: p.grad.clone()
                        for n, p in sess.model.named_parameters()
                        if p.grad is not None
                    }
                )
                return real_step(*args, **kwargs)

            sess.opt.step = record
            out, _ = train_mod._step(sess, batch)
            sess.opt.step = real_step
    return sess, out, grads


@pytest.mark.parametrize(
    ("loss", "steps"),
    # MoCo's first step has an empty queue (nothing to contrast): its second step is compared.
    [("simclr", 1), ("moco", 2), ("dino", 1), ("swav", 1), ("ibot_patch", 1), (COMBINED, 1)],
    ids=["simclr", "moco", "dino", "swav", "ibot_patch", "simclr+koleo"],
)
def test_micro_batches_give_the_plain_step(loss, steps):
    # LayerNorm: every row is computed on its own, so GradCache's step is exactly the plain one
    # (up to float32 summation order); the loss sees the whole batch once (DINO's centre, SwAV's
    # codes, MoCo's queue).
    plain, out_plain, g_plain = _one_step(loss, None, steps)
    cached, out_cached, g_cached = _one_step(loss, 8, steps)
    torch.testing.assert_close(out_cached.loss, out_plain.loss.detach(), rtol=0, atol=1e-6)
    assert g_plain[-1].keys() == g_cached[-1].keys()
    for name, grad in g_plain[-1].items():
        torch.testing.assert_close(g_cached[-1][name], grad, rtol=1e-4, atol=1e-6)
    # The weights after the step: AdamW's first update is lr·g/(|g| + 1e-8), which turns the
    # float32 summation noise of a gradient near 1e-9 (a prototype no sample is near) into up
    # to a tenth of the learning rate; every weight with a larger gradient agrees to 1e-6.
    for key, value in plain.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(cached.model.state_dict()[key], value, rtol=0, atol=1e-5)
    weights = cached.model.state_dict()
    for name, grad in g_plain[-1].items():
        moved = grad.abs() > 1e-6
        diff = (weights[name] - plain.model.state_dict()[name]).abs()
        assert moved.any() and diff[moved].max() <= 1e-6, name
    for key, value in plain.loss.state_dict().items():  # the centre, the queue
        torch.testing.assert_close(cached.loss.state_dict()[key], value, rtol=0, atol=1e-6)


def test_micro_batch_size_trains_through_gradcache_and_says_so(capsys):
    assert main([*TINY, "--micro-batch-size", "24", "--norm", "layer", "--loss", "dino"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "batch 64 through GradCache, 24 encoder inputs at a time, seed 0" in header
    assert main([*TINY, "--micro-batch-size", "24"]) == 0
    assert "BatchNorm normalises each micro-batch by its own statistics" in capsys.readouterr().out


def test_a_batch_larger_than_the_data_repeats_samples(tmp_path, capsys):
    path = tmp_path / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((40, 8, 8)), y=np.arange(40) % 4)
    args = ["--data", str(path), "--batch-size", "96", "--epochs", "2"]
    assert main(["train", "-q", *args, "--micro-batch-size", "64", "--norm", "layer"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "batch 96 (more than the 30 training samples: each is drawn ~3.2× per step" in header
    assert main(["train", "-q", *args, "--loss", "moco"]) == 0  # the queue holds identities too


def test_eval_dims_measure_prefixes_of_any_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval: {dims: [4, 16, 64]}\n")
    out = tmp_path / "run"
    assert main([*TINY, "--config", str(cfg), "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert {"dim_4/knn_accuracy", "dim_16/map_at_r"} <= set(doc["metrics"])
    assert "dim_64/knn_accuracy" not in doc["metrics"]  # the full size is the plain metric


@pytest.mark.parametrize(
    ("loss", "batch", "micro"),
    [
        ("simclr", 32, 7),  # 64 views, 7 at a time: the last micro-batch holds one
        ("simclr", 8, 1),
        ("dino", 32, 127),  # the 64 global views fit, the 128 local crops leave one
    ],
)
def test_micro_batches_of_one_input_under_batch_norm_are_refused_up_front(
    loss, batch, micro, monkeypatch, capsys
):
    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(train_mod, "_build", built)
    args = ["train", "-q", "--epochs", "1", "--loss", loss, "--batch-size", str(batch)]
    assert main([*args, "--micro-batch-size", str(micro)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"embedloss: error: --micro-batch-size {micro} ") and "\n" not in line
    assert "every micro-batch needs >= 2 inputs" in line and "--norm layer" in line
    fit = re.search(r"use --micro-batch-size (\d+)", line)
    assert fit is not None, line
    monkeypatch.undo()
    assert main([*args, "--micro-batch-size", fit.group(1)]) == 0
