"""Run directories in-process: checkpoints and resume, output safety, dependencies, knobs, logs."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

import embedloss.cli.train as train_mod
from embedloss.cli.main import main
from embedloss.cli.train import lr_factor

TINY = ["train", "-q", "--epochs", "1", "--batch-size", "64"]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedloss: error: "), lines
    return lines[0]


def _doc(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _forbid_training(monkeypatch) -> None:
    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "run_training", trained)


# ----------------------------------------------------------------------- optional dependencies


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("numpy", "numpy"),
        ("yaml", "pyyaml"),
        ("sklearn", "scikit-learn"),
        ("matplotlib", "matplotlib"),
        ("tqdm", "tqdm"),
    ],
)
def test_a_missing_dependency_is_one_line_before_any_work(
    module, package, monkeypatch, tmp_path, capsys
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    _forbid_training(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output", str(out)]) == 2
    line = _error(capsys)
    assert f"embedloss train needs {package} (" in line
    assert line.endswith("which is not installed: pip install 'embedloss[cli]'")
    assert not out.exists()


def test_only_what_a_command_uses_is_required(monkeypatch, tmp_path, capsys):
    for module in ("matplotlib", "tqdm", "sklearn"):
        monkeypatch.setitem(sys.modules, module, None)
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).random((80, 5)), y=np.arange(80) % 2)
    assert main([*TINY[:-1], "32", "--data", str(path)]) == 0  # -q, no --output, own data
    assert "held-out split: 20 samples" in capsys.readouterr().out


def test_a_failing_plot_never_costs_the_model(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no display backend")

    monkeypatch.setattr(train_mod, "plot_curves", broken)
    out = tmp_path / "run"
    assert main([*TINY, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: could not draw curves.png (RuntimeError: no display backend)" in err
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.json", "history.jsonl"}
    assert not (out / "curves.png").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------- the output directory


def test_output_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert main([*TINY, "--output", str(target)]) == 2
    assert f"--output '{target}' is a file, not a directory" in _error(capsys)
    assert capsys.readouterr().out == "" and target.read_text() == "mine"


def test_an_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--output", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*TINY, "--seed", "1", "--output", str(out)]) == 2
    message = _error(capsys)
    assert f"--output '{out}' already holds a run (checkpoint.pt, config.yaml" in message
    assert f"pass --overwrite to replace it, or --resume {out} to continue it" in message
    assert (out / "checkpoint.pt").read_bytes() == before
    (out / "notes.txt").write_text("kept")  # not a run file: left alone
    assert main([*TINY, "--seed", "1", "--output", str(out), "--overwrite"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert (out / "notes.txt").read_text() == "kept"
    assert main([*TINY, "--output", str(tmp_path / "empty")]) == 0  # a new directory is fine


# ----------------------------------------------------------------------- resuming


@pytest.mark.parametrize("loss", ["simclr", "dino"])
def test_an_interrupted_run_resumes_exactly_even_with_a_cosine_schedule(
    loss, monkeypatch, tmp_path, capsys
):
    # dino: an EMA teacher on a cosine momentum schedule, a centre, local crops.
    knobs = ["--epochs", "3", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--loss", loss]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*TINY[:2], *knobs, "--batch-size", "256", "--output", str(whole)]) == 0
    real, calls = train_mod._train_epoch, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", interrupt_second)
    capsys.readouterr()
    assert main([*TINY[:2], *knobs, "--batch-size", "256", "--output", str(cut)]) == 130
    assert (
        f"embedloss: interrupted; the checkpoint of the last finished epoch is in {cut}: "
        f"continue with 'embedloss train --resume {cut}'" in capsys.readouterr().err
    )
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_mod, "_train_epoch", real)
    assert main(["train", "-q", "--resume", str(cut)]) == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])
    if loss == "dino":  # the teacher, its momentum and the centre are in the checkpoint
        assert {"teacher.current_momentum", "teacher.encoder.head.prototypes"} <= set(a["model"])
        assert a["loss"]["center"].abs().sum() > 0
    assert _doc(whole)["history"] == _doc(cut)["history"]
    assert _doc(whole)["metrics"] == _doc(cut)["metrics"]
    lrs = [h["lr"] for h in _doc(whole)["history"]]
    assert lrs[0] == pytest.approx(0.002) and lrs[0] > lrs[1] > lrs[2] > 0  # warm-up, decay
    # Extending a cosine run re-plans the schedule, and says so.
    assert main(["train", "-q", "--resume", str(cut), "--epochs", "4"]) == 0
    assert "the run now spans 4 epochs (planned: 3)" in capsys.readouterr().err


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "done"
    assert main([*TINY, "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "has completed 1 epoch(s) of 1; pass --epochs E with E > 1 to train it further"),
        (["--epochs", "2", "--loss", "clip"], "was trained with loss 'simclr', not 'clip'"),
        (
            ["--epochs", "2", "--task", "supervised"],
            "was trained with task 'ssl', not 'supervised'",
        ),
        (["--config", "x.yaml"], "--config cannot be combined with it"),
        (["--epochs", "2", "--loss-option", "temperatur=1"], "(did you mean 'temperature'?)"),
    ],
)
def test_resume_refuses_what_does_not_continue_the_run(finished, args, message, capsys):
    capsys.readouterr()
    assert main(["train", "-q", "--resume", str(finished), *args]) == 2
    assert message in _error(capsys)


def _refused_change(line: str, run, option: str) -> None:
    """``line`` refuses to resume ``run`` with ``option`` (``key=value``), naming old → new."""
    from embedloss.registry import loss_info

    key, _, value = option.partition("=")
    section = "loss" if key in {"queue_size", "temperature"} else "method"
    cfg = torch.load(run / "checkpoint.pt", weights_only=True)["config"]
    default = loss_info(cfg["loss"]["name"]).signature.parameters.get(key)
    old = cfg[section].get(key, None if default is None else default.default)
    assert f"{section}.{key} {old!r} → {yaml.safe_load(value)!r}" in line, line
    assert "train a new run with them (drop --resume)" in line


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--loss-option", "temperature=0.1"], "loss.temperature"),  # a buffer of the loss
        (["--weight-decay", "0.5"], "weight_decay"),  # AdamW's state keeps its own
        (["--seed", "3"], "seed"),  # the data split and the initialisation
        (["--norm", "layer"], "model.norm"),  # the model's layers
    ],
)
def test_resume_refuses_settings_its_checkpoint_fixes(finished, flags, key, capsys):
    saved = (finished / "config.yaml").read_bytes(), (finished / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "-q", "--resume", str(finished), "--epochs", "2", *flags]) == 2
    line = _error(capsys)
    if key.startswith("loss."):
        _refused_change(line, finished, flags[1])
    else:
        section, _, name = key.rpartition(".")
        cfg = yaml.safe_load(saved[0])
        old = (cfg[section] if section else cfg)[name]
        assert f"{key} {old!r} → {yaml.safe_load(flags[1])!r}" in line, line
    assert (
        (finished / "config.yaml").read_bytes(),
        (finished / "checkpoint.pt").read_bytes(),
    ) == saved


def test_resume_takes_the_settings_of_the_step(finished, capsys):
    flags = ["--epochs", "2", "--lr", "0.001", "--batch-size", "32", "--grad-clip", "1"]
    assert main(["train", "-q", "--resume", str(finished), *flags]) == 0
    cfg = yaml.safe_load((finished / "config.yaml").read_text())
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["grad_clip"]) == (2, 0.001, 32, 1.0)
    assert _doc(finished)["history"][-1]["lr"] == cfg["lr"]  # constant schedule: the peak


def test_resume_refuses_other_shapes_and_unsafe_files(tmp_path, capsys):
    out = tmp_path / "moco"
    assert (
        main([*TINY, "--loss", "moco", "--loss-option", "queue_size=128", "--output", str(out)])
        == 0
    )
    capsys.readouterr()
    saved = (out / "config.yaml").read_bytes(), (out / "checkpoint.pt").read_bytes()
    # The queue's size is the loss's tensor shape; MoCo's τ a buffer of its state; the
    # teacher's momentum one of the model's: the checkpoint would override each of them.
    for flags in (
        ["--loss-option", "queue_size=64"],
        ["--loss-option", "temperature=0.05"],
        ["--method-option", "teacher_momentum=0.5"],
    ):
        assert main(["train", "-q", "--resume", str(out), "--epochs", "2", *flags]) == 2
        _refused_change(_error(capsys), out, flags[1])
    assert ((out / "config.yaml").read_bytes(), (out / "checkpoint.pt").read_bytes()) == saved
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "run directory" in _error(capsys)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "holds no checkpoint.pt: it is not a run" in _error(capsys)
    assert main(["train", "--resume", str(out / "checkpoint.pt")]) == 2
    assert f"is a file, not a run directory: give the directory that holds it ({str(out)!r})" in (
        _error(capsys)
    )
    evil = tmp_path / "evil"
    evil.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "embedloss-run", "version": 1, "x": Payload()}, evil / "checkpoint.pt")
    assert main(["train", "--resume", str(evil)]) == 2
    assert "cannot load" in _error(capsys) and "pwned" not in capsys.readouterr().out
    (evil / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["eval", "--run", str(evil)]) == 2
    assert "safely (weights_only)" in _error(capsys)
    (evil / "checkpoint.pt").write_bytes(b"")
    assert main(["eval", "--run", str(evil)]) == 2
    assert _error(capsys).endswith("safely (weights_only): the file is empty")
    torch.save({"format": "embedloss-run", "version": 99}, evil / "checkpoint.pt")
    assert main(["embed", "--run", str(evil), "--data", "x", "--out", "y"]) == 2
    assert "has checkpoint version 99; this embedloss reads version 1" in _error(capsys)


# ----------------------------------------------------------------------- knobs and flags


def test_lr_factor_warms_up_then_follows_the_schedule():
    for step in range(12):
        got = lr_factor(step, warmup_steps=4, total_steps=12, schedule="cosine")
        expected = (step + 1) / 4 if step < 4 else 0.5 * (1 + math.cos(math.pi * (step - 4) / 8))
        assert got == pytest.approx(expected, abs=1e-15)
        assert lr_factor(step, warmup_steps=4, total_steps=12, schedule="constant") == min(
            (step + 1) / 4, 1.0
        )
    assert lr_factor(0, warmup_steps=0, total_steps=5, schedule="constant") == 1.0


def test_loss_options_and_knobs_reach_the_run(monkeypatch, tmp_path, capsys):
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append((len(params), max_norm))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "run"
    args = [
        *TINY,
        "--loss", "clip",
        "--loss-option", "learnable_temperature=true",
        "--loss-option", "temperature=1e-1",
        "--grad-clip", "0.5",
        "--weight-decay", "0",
        "--output", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["loss"] == {"name": "clip", "learnable_temperature": True, "temperature": 0.1}
    assert (cfg["grad_clip"], cfg["weight_decay"]) == (0.5, 0.0)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    n_model = sum(
        1
        for k in ckpt["model"]
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    # every step clipped the model's and the loss's parameters (the learnable temperature)
    assert seen == [(n_model + 1, 0.5)] * ckpt["step"]
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    assert ckpt["optimizer"]["param_groups"][1]["weight_decay"] == 0.0
    assert _doc(out)["history"][0]["terms"]["temperature"] != pytest.approx(0.1, abs=1e-6)
    capsys.readouterr()
    assert main([*TINY, "--loss-option", "temperatur=0.2"]) == 2
    assert "got unknown argument(s) 'temperatur' (did you mean 'temperature'?)" in _error(capsys)
    assert capsys.readouterr().out == ""  # refused before any work


def test_config_loss_options_survive_a_loss_flag(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss: {name: clip, temperature: 0.2}\nepochs: 1\nbatch_size: 64\n")
    out = tmp_path / "run"
    assert (
        main(["train", "-q", "--config", str(cfg), "--loss", "siglip", "--output", str(out)]) == 0
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == {
        "name": "siglip",
        "temperature": 0.2,
    }
    assert "note:" not in capsys.readouterr().err  # siglip takes temperature: nothing dropped


def test_bf16_autocast_trains_and_changes_the_numbers(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main([*TINY, "--precision", precision, "--output", str(out)]) == 0
        runs[precision] = _doc(out)["history"][0]["loss"]
    assert math.isfinite(runs["bf16"]) and runs["bf16"] != runs["fp32"]
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.05)


# ----------------------------------------------------------------------- what a run reports


def test_history_curves_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*TINY[:2], "--epochs", "2", "--batch-size", "128", "--output", str(out)]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "loss", "terms", "lr", "eval"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/knn_accuracy", "terms/accuracy"} <= set(tags)
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(h["epoch"], pytest.approx(h["loss"], rel=1e-6)) for h in history]
    knn = [e.value for e in events.Scalars("eval/knn_accuracy")]
    assert knn == [pytest.approx(h["eval"]["knn_accuracy"]) for h in history]


def test_feature_vectors_are_described_truthfully(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(160) % 4
    x = (rng.normal(size=(160, 12)) + 2 * np.eye(4)[y] @ rng.normal(size=(4, 12))).astype(
        np.float32
    )
    path = tmp_path / "vectors.npz"
    np.savez(path, x=x, y=y)
    assert main([*TINY[:-1], "32", "--data", str(path)]) == 0
    text = capsys.readouterr().out
    assert "two views of each feature vector (masking p=0.1 and Gaussian noise σ=0.1)" in text
    assert "perturbed by Gaussian noise σ=0.1 (feature vectors: no shifts)" in text
    assert "raw features" in text and "pixel" not in text


def test_paired_file_with_a_non_paired_loss_suggests_the_paired_task(tmp_path, capsys):
    path = tmp_path / "pairs.npz"
    np.savez(path, x_a=np.zeros((40, 3)), x_b=np.zeros((40, 3)))
    assert main([*TINY, "--data", str(path)]) == 2
    assert "a paired file: train with --task paired or a paired loss (e.g. --loss clip)" in _error(
        capsys
    )


def test_retrieval_metrics_slot_into_train_and_eval(monkeypatch, tmp_path, capsys):
    """A metric of labelled embeddings (as precision@1, MAP@R will be) shows up everywhere."""
    from embedloss.cli import evaluate

    def first_neighbour_agrees(ref, ref_y, query, query_y):
        sim = (
            torch.nn.functional.normalize(query, dim=1)
            @ torch.nn.functional.normalize(ref, dim=1).T
        )
        return float((ref_y[sim.argmax(1)] == query_y).double().mean())

    monkeypatch.setitem(evaluate.LABELLED_METRICS, "precision@1", first_neighbour_agrees)
    out = tmp_path / "run"
    assert main([*TINY, "--output", str(out)]) == 0
    doc = _doc(out)
    assert 0 < doc["metrics"]["precision@1"] <= 1
    assert "precision@1" in doc["baselines"]["random_encoder"]
    assert "precision@1" in doc["baselines"]["raw_features"]
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == doc["metrics"]


def test_eval_and_embed_errors(finished, tmp_path, capsys):
    def embed(data, out, *extra):
        return main(
            ["embed", "--run", str(finished), "--data", str(data), "--out", str(out), *extra]
        )

    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, x=np.zeros((40, 8, 8)))
    assert main(["eval", "--run", str(finished), "--data", str(unlabelled)]) == 2
    assert (
        "u.npz has no labels 'y': the ssl task's metrics (k-NN, linear probe) need them"
        in _error(capsys)
    )
    wrong = tmp_path / "w.npz"
    np.savez(wrong, x=np.zeros((40, 7)), y=np.arange(40) % 2)
    assert embed(wrong, tmp_path / "z.npy") == 2
    assert "has samples of shape (7,); the run's encoder takes (8, 8) (64 values)" in _error(capsys)
    assert main(["eval", "--run", str(finished), "--data", str(wrong)]) == 2
    assert "has 7 values per sample" in _error(capsys)
    good = tmp_path / "g.npz"
    np.savez(good, x=np.zeros((5, 64)))
    assert embed(good, tmp_path / "no" / "z.npy") == 2
    assert "cannot write --out" in _error(capsys)
    assert embed(good, "z.npy", "--modality", "b") == 2
    assert "the run has no modality 'b': it has a" in _error(capsys)
    assert embed(good, "z", "--key", "q") == 2
    assert "has no array 'q' (found: x); pass --key NAME" in _error(capsys)


@pytest.mark.filterwarnings("error")  # no numpy overflow or ComplexWarning on the way
@pytest.mark.parametrize(
    "x",
    [
        np.full((4, 64), np.nan),
        np.full((4, 8, 8), -np.inf),
        np.ones((4, 64)) * (1 + 1j),
        np.zeros((0, 64)),
        np.full((4, 64), float(np.finfo(np.float32).max) * 2),
    ],
    ids=["nan", "inf", "complex", "empty", "beyond-float32"],
)
def test_embed_checks_its_data_as_train_and_eval_do(finished, tmp_path, x, capsys):
    path, out = tmp_path / "bad.npz", tmp_path / "z.npy"
    np.savez(path, x=x)
    capsys.readouterr()
    assert main(["embed", "--run", str(finished), "--data", str(path), "--out", str(out)]) == 2
    line = _error(capsys)
    assert not out.exists()
    for command in (
        ["train", "-q", "--epochs", "1", "--data"],
        ["eval", "--run", str(finished), "--data"],
    ):
        assert main([*command, str(path)]) == 2
        assert _error(capsys) == line
    if np.isrealobj(x) and np.isfinite(x).all() and x.size:
        assert "exceed float32's range" in line and "NaN" not in line


def test_load_encoder_is_the_runs_encoder(finished):
    from embedloss.cli import load_encoder, load_run

    run = load_run(finished)
    encoder = load_encoder(finished)
    x = torch.rand(6, 8, 8) * 16
    with torch.no_grad():
        expected = run.model.embed(x.reshape(6, 64) / 16)
        assert torch.equal(encoder(x), expected)
        assert torch.equal(encoder(x.reshape(6, 64)), expected)
    with pytest.raises(
        ValueError,
        match=r"x must hold samples of shape \(8, 8\) \(64 values each\), got shape \(6, 63\)",
    ):
        encoder(torch.zeros(6, 63))


def test_load_encoder_raises_value_errors_and_embeds_empty_batches(finished, tmp_path):
    from embedloss.cli import load_encoder

    with pytest.raises(ValueError, match="does not exist"):  # a user mistake is a ValueError
        load_encoder(tmp_path / "nowhere")
    encoder = load_encoder(finished)
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 8, 8)).shape[1]
        assert encoder(torch.zeros(0, 8, 8)).shape == (0, dim)
        assert encoder(torch.zeros(0, 64)).shape == (0, dim)
        for wrong in (torch.zeros(0, 7), torch.tensor(1.0), torch.zeros(64)):
            with pytest.raises(ValueError, match=r"x must hold samples of shape \(8, 8\)"):
                encoder(wrong)


def test_eval_and_embed_on_a_paired_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x_a = rng.normal(size=(160, 6)).astype(np.float32)
    x_b = np.concatenate([x_a[:, :3] * 2, rng.normal(size=(160, 2))], 1).astype(np.float32)
    path = tmp_path / "pairs.npz"
    np.savez(path, x_a=x_a, x_b=x_b)
    run = tmp_path / "clip"
    args = ["--loss", "clip", "--data", str(path), "--epochs", "3", "--output", str(run)]
    assert main([*TINY[:2], "--batch-size", "32", *args]) == 0
    assert "paired: x_a ↔ x_b, one encoder each" in capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--data", str(path), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert set(evaluated["metrics"]) == {"recall@1", "recall@5"}
    assert evaluated["metrics"] == _doc(run)["metrics"]  # same file, same split, same numbers
    assert evaluated["baselines"]["raw_features"] is None
    assert main(["eval", "--run", str(run)]) == 0
    assert "(clip, paired, epoch 3) on pairs.npz: 40 held-out pairs" in capsys.readouterr().out
    for modality in ("a", "b"):
        out = tmp_path / f"z_{modality}.npy"
        embed = ["embed", "--run", str(run), "--data", str(path), "--out", str(out)]
        assert main([*embed, "--modality", modality]) == 0
        assert f"array 'x_{modality}'" in capsys.readouterr().out
        assert np.load(out).shape == (160, 64)
    from embedloss.cli import load_encoder

    with torch.no_grad():
        z_b = load_encoder(run, "b")(torch.as_tensor(x_b))
    assert torch.equal(z_b, torch.as_tensor(np.load(tmp_path / "z_b.npy")))
