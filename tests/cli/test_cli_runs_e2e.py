"""A run's life as a user lives it, in subprocesses: train → resume → embed → eval, and a pipe."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedloss.cli.data import _split_indices
from embedloss.cli.evaluate import knn_accuracy

from .conftest import cli_env

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = ("-q", "--batch-size", "64")


def _doc(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _tensors_equal(a, b) -> bool:
    """Nested state dicts / lists equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_resume_is_bit_identical_to_an_uninterrupted_run(cli, cli_concurrently, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first, whole = cli_concurrently(
        ["train", *TINY, "--epochs", "1", "--output", str(a)],
        ["train", *TINY, "--epochs", "2", "--output", str(b)],
    )
    assert first.returncode == 0 and whole.returncode == 0, first.stderr + whole.stderr
    resumed = cli("train", "-q", "--resume", str(a), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 epochs, resumed after epoch 1, batch 64" in resumed.stdout
    ra, rb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert ra["epoch"] == rb["epoch"] == 2 and ra["step"] == rb["step"] == 42
    for key in ("model", "loss", "optimizer", "rng", "config", "history", "data"):
        assert _tensors_equal(ra[key], rb[key]), key
    da, db = _doc(a), _doc(b)
    for key in ("metrics", "baselines", "history", "dataset"):
        assert da[key] == db[key], key
    assert (a / "history.jsonl").read_text() == (b / "history.jsonl").read_text()
    assert (a / "config.yaml").read_text() == (b / "config.yaml").read_text()


def _readme_commands() -> list[list[str]]:
    """The four `embedloss` lines of the README's Use section."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(embedloss train .*?)```", text, re.S)
    assert block is not None, "README's Use section lost its train/resume/embed/eval example"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line)[1:] for line in lines if line]


@pytest.mark.slow
def test_readme_train_resume_embed_eval(cli, tmp_path):
    """The README's four lines, run verbatim on digits-like data of the user's own."""
    commands = _readme_commands()
    assert [c[0] for c in commands] == ["train", "train", "embed", "eval"]
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "mine.npz", x=digits.images, y=digits.target)  # raw pixels, 0..16
    results = [cli(*command, "-q", cwd=tmp_path) for command in commands[:2]]
    for res in results:
        assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "demo"
    doc = _doc(run)
    epochs = int(commands[1][commands[1].index("--epochs") + 1])
    assert [h["epoch"] for h in doc["history"]] == list(range(1, epochs + 1))
    assert (
        f"resumed after epoch {commands[0][commands[0].index('--epochs') + 1]}" in results[1].stdout
    )

    embedded = cli(*commands[2], cwd=tmp_path)
    assert embedded.returncode == 0, embedded.stderr
    z = np.load(tmp_path / "mine.npy")
    assert z.shape == (1797, 64) and z.dtype == np.float32
    assert "wrote 1797 embeddings of dimension 64 to mine.npy" in embedded.stdout
    # The written embeddings are the ones training evaluated: their clean k-NN on the run's split
    # is the run's clean_knn_accuracy (the file holds the same digits in the same order).
    train_idx, test_idx = _split_indices(1797, 0.25, 0)
    y = torch.as_tensor(digits.target)
    zt = torch.as_tensor(z)
    knn = knn_accuracy(zt[train_idx], y[train_idx], zt[test_idx], y[test_idx], k=5)
    assert knn == pytest.approx(doc["metrics"]["clean_knn_accuracy"], abs=1.5 / 449)

    evaluated = cli(*commands[3], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "on mine.npz: 449 held-out queries against 1348 reference samples" in evaluated.stdout
    as_json = cli(*commands[3], "--json", cwd=tmp_path)
    result = json.loads(as_json.stdout)
    # mine.npz is the digits dataset itself: the same split, so the run's own numbers
    assert result["metrics"] == doc["metrics"] and result["baselines"] == doc["baselines"]
    assert result["epoch"] == epochs and result["data"] == "mine.npz"


def test_list_into_a_closed_pipe_exits_quietly():
    """`embedloss list | head` — the reader is gone before the listing is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedloss", "list"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` exiting: every write of the child now fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
