"""`torchrun --nproc_per_node 2 -m embedloss train`: DDP on gloo follows the single-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def _torchrun(cfg, out, port, env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "embedloss",
            "train",
            "-q",
            "--config",
            str(cfg),
            "--output",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _single(cfg, out, env):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "embedloss",
            "train",
            "-q",
            "--config",
            str(cfg),
            "--output",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _ddp_and_single(cfg_text, tmp_path, port, env):
    """Run ``cfg_text`` under torchrun (2 ranks) and in one process, side by side.

    Returns rank 0's stdout and both runs' output folders (``ddp``, ``single``).
    """
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(cfg_text)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = _torchrun(cfg, ddp_out, port, env)
    single = _single(cfg, single_out, env)
    out, err = ddp.communicate(timeout=240)
    assert ddp.returncode == 0, err
    assert single.returncode == 0, single.stderr
    return out, ddp_out, single_out


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


# LayerNorm instead of BatchNorm: per-rank batch statistics are then the only thing DDP could
# change, and it does not, so the two runs must agree to float rounding.
SIMCLR = (
    "loss: {name: simclr, learnable_temperature: true}\n"
    "epochs: 1\nbatch_size: 64\nmodel: {norm: layer}\n"
)
DINO_MICRO = (
    "loss: {name: dino}\nepochs: 1\nbatch_size: 64\nmicro_batch_size: 24\n"
    "model: {norm: layer, hidden_dim: 64}\n"
)


def test_torchrun_two_processes_match_one_process(tmp_path, free_port_fixture, env):
    out, ddp_out, single_out = _ddp_and_single(SIMCLR, tmp_path, free_port_fixture, env)
    # rank 0 alone evaluates, prints and writes
    assert out.count("embedloss train:") == 1 and "on 2 processes (DDP)" in out
    d, s = _metrics(ddp_out), _metrics(single_out)
    assert d["world_size"] == 2 and s["world_size"] == 1
    assert d["baselines"] == s["baselines"]
    dh, sh = d["history"][0], s["history"][0]
    assert dh["loss"] == pytest.approx(sh["loss"], rel=1e-4)
    # the learnable temperature got the averaged (= single-process) gradient on every rank
    for key in ("temperature", "accuracy", "positive_similarity"):
        assert dh["terms"][key] == pytest.approx(sh["terms"][key], rel=1e-3, abs=1e-3), key
    for key, value in s["metrics"].items():
        assert d["metrics"][key] == pytest.approx(value, abs=0.01), key


def test_torchrun_micro_batches_with_a_teacher_match_one_process(tmp_path, free_port_fixture, env):
    # GradCache under DDP (gradients averaged by hand), an EMA teacher, DINO's centre
    # all-reduced over the ranks, local crops drawn per global position: one process's run.
    out, ddp_out, single_out = _ddp_and_single(DINO_MICRO, tmp_path, free_port_fixture, env)
    assert "through GradCache, 24 encoder inputs at a time" in out
    d, s = _metrics(ddp_out), _metrics(single_out)
    dh, sh = d["history"][0], s["history"][0]
    assert dh["loss"] == pytest.approx(sh["loss"], rel=1e-4)
    for key in ("kl", "teacher_entropy", "center_norm"):
        assert dh["terms"][key] == pytest.approx(sh["terms"][key], rel=1e-3, abs=1e-4), key
    ckpt_d = torch.load(ddp_out / "checkpoint.pt", weights_only=True)
    ckpt_s = torch.load(single_out / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(
        ckpt_d["loss"]["center"], ckpt_s["loss"]["center"], atol=1e-5, rtol=1e-4
    )
    for key, value in ckpt_s["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ckpt_d["model"][key], value, atol=1e-4, rtol=1e-3)
