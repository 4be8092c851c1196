"""`embedloss train` end to end, as a user runs it: a subprocess, its output files, its exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TINY = ("--epochs", "1", "--batch-size", "64", "-q")
SSL_KEYS = {
    "knn_accuracy",
    "linear_probe_accuracy",
    "clean_knn_accuracy",
    "precision_at_1",
    "r_precision",
    "map_at_r",
}


def _doc(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_default_run_beats_baselines_and_writes_everything(cli, tmp_path):
    out = tmp_path / "run"
    res = cli("train", "--output", str(out))
    assert res.returncode == 0, res.stderr
    doc = _doc(out)
    assert doc["loss"] == "simclr" and doc["task"] == "ssl"
    assert set(doc["metrics"]) == SSL_KEYS
    assert set(doc["baselines"]) == {"random_encoder", "raw_features"}
    assert (
        set(doc["baselines"]["random_encoder"]) == SSL_KEYS == set(doc["baselines"]["raw_features"])
    )
    m, rand, raw = (
        doc["metrics"],
        doc["baselines"]["random_encoder"],
        doc["baselines"]["raw_features"],
    )
    # What the loss bought: invariance to the held-out nuisance shifts.
    assert m["knn_accuracy"] > rand["knn_accuracy"] + 0.2
    assert m["knn_accuracy"] > raw["knn_accuracy"] + 0.2
    assert m["linear_probe_accuracy"] > rand["linear_probe_accuracy"] + 0.2
    # The premise: raw pixels are near perfect on clean digits, about 50% under shifts.
    assert raw["clean_knn_accuracy"] > 0.95 and 0.35 < raw["knn_accuracy"] < 0.65
    assert [h["epoch"] for h in doc["history"]] == list(range(1, 21))
    assert doc["history"][-1]["loss"] < doc["history"][0]["loss"]
    # the learning curve: the held-out k-NN of every epoch, the last one the final metric
    assert doc["history"][-1]["eval"] == {"knn_accuracy": m["knn_accuracy"]}
    assert doc["history"][-1]["eval"]["knn_accuracy"] > doc["history"][0]["eval"]["knn_accuracy"]
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == doc["history"]
    assert set(doc["history"][0]["terms"]) == {"accuracy", "positive_similarity", "temperature"}
    assert doc["dataset"] == {
        "name": "digits",
        "train_size": 1348,
        "test_size": 449,
        "num_classes": 10,
    }
    assert doc["seconds"]["total"] < 120  # "well under a minute" unloaded; generous under CI load
    # The summary a user reads, one header, a table with the baselines, a verdict.
    assert "random encoder" in res.stdout and "raw pixels" in res.stdout
    # the headline: the model against both baselines on the task's metric, and why
    headline = (
        f"simclr: k-NN accuracy (perturbed held-out) {m['knn_accuracy']:.3f} — beats the random "
        f"encoder ({rand['knn_accuracy']:.3f}, {m['knn_accuracy'] - rand['knn_accuracy']:+.3f}) "
        f"and raw pixels ({raw['knn_accuracy']:.3f}"
    )
    assert headline in res.stdout
    assert (
        f"why: raw pixels already reach {raw['clean_knn_accuracy']:.3f} on the clean held-out "
        "split, near the ceiling" in res.stdout
    )
    assert (
        "held-out split: 449 samples, perturbed by random shifts of up to 1 pixel and Gaussian "
        "noise σ=0.1" in res.stdout
    )
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["loss"] == {"name": "simclr"} and cfg["task"] == "ssl" and cfg["epochs"] == 20
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "encoder.0.weight" in state["model"] and "logit_scale" in state["loss"]
    assert state["epoch"] == 20 and state["step"] == 20 * 10 and state["config"] == cfg


def test_same_seed_same_numbers_and_config_round_trip(cli, cli_concurrently, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    runs = cli_concurrently(
        ["train", *TINY, "--seed", "3", "--output", str(a)],
        ["train", *TINY, "--seed", "3", "--output", str(b)],
    )
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    res = cli("train", "-q", "--config", str(a / "config.yaml"), "--output", str(c))
    assert res.returncode == 0, res.stderr
    docs = [_doc(d) for d in (a, b, c)]
    for key in ("metrics", "baselines", "history"):
        assert docs[0][key] == docs[1][key] == docs[2][key]
    assert (a / "config.yaml").read_text() == (c / "config.yaml").read_text()


def test_paired_task_reports_recall_both_directions(cli, tmp_path):
    out = tmp_path / "clip"
    res = cli("train", "--loss", "clip", "--epochs", "2", "-q", "--output", str(out))
    assert res.returncode == 0, res.stderr
    doc = _doc(out)
    assert doc["task"] == "paired" and set(doc["metrics"]) == {"recall@1", "recall@5"}
    assert doc["baselines"]["raw_features"] is None
    assert "there is no raw baseline" in res.stdout
    rand = doc["baselines"]["random_encoder"]
    assert doc["metrics"]["recall@1"] > rand["recall@1"] + 0.03
    assert doc["metrics"]["recall@5"] >= doc["metrics"]["recall@1"]
    assert "loss_image_to_text" in doc["history"][0]["terms"]


def test_supervised_task_and_user_npz(cli, tmp_path, npz):
    rng = np.random.default_rng(0)
    x = rng.random((120, 6, 6)).astype(np.float32)
    y = np.repeat(np.array([3, 7, 9]), 40)
    x[y == 7, :3] += 1.0  # learnable classes
    path = npz("mine.npz", x=x, y=y)
    out = tmp_path / "sup"
    res = cli(
        "train",
        "--data",
        path,
        "--task",
        "supervised",
        *TINY[:-1],
        "--batch-size",
        "32",
        "--output",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    doc = _doc(out)
    assert doc["task"] == "supervised" and set(doc["metrics"]) == SSL_KEYS
    assert doc["dataset"] == {
        "name": "mine.npz",
        "train_size": 90,
        "test_size": 30,
        "num_classes": 3,
    }
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(Path(path).resolve()) and cfg["data"]["dataset"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--epochs", "two"), "argument --epochs: invalid int value: 'two'"),
        (("--loss", "simclrr"), "did you mean 'simclr'"),
        (("--data", "{objects}"), "is an object array (loading it would need pickle"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, npz, args, message):
    objects = npz("objects.npz", x=np.array([{"a": 1}] * 20, dtype=object))
    res = cli("train", *(a.format(objects=objects) for a in args), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedloss: error: ")
    assert message in lines[0]
