"""The `embedloss` commands in-process: list, info, bench wiring, train options and errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml

import embedloss.cli.main as cli_main
from embedloss.cli.main import BENCH_MODULE, main
from embedloss.registry import list_losses

TINY = ["train", "-q", "--epochs", "1", "--batch-size", "64"]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedloss: error: ")
    return lines[0]


def test_list_formats(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("name") and "nt_xent" in out
    assert main(["list", "--format", "json", "--category", "multimodal"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_losses(category="multimodal")
    assert main(["list", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| name | category |")


def test_info_describes_formula_paper_inputs_terms(capsys):
    assert main(["info", "nt_xent"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("simclr: SimCLR's NT-Xent loss")
    assert "paper:     Chen et al. 2020, Eq. 1; Khosla et al. 2020, Eq. 2" in out
    assert "inputs:    forward(z_a: Tensor, z_b: Tensor, labels: Tensor | None = None)" in out
    assert "terms:     accuracy, positive_similarity, temperature" in out
    assert "train:     ssl (pair inputs): embedloss train --loss simclr" in out
    assert "temperature = 0.5  —  τ > 0" in out
    assert "formula (from simclr_loss):" in out and "ℓ_i = −log" in out
    assert main(["info", "info_nce", "--full"]) == 0
    out = capsys.readouterr().out
    assert "van den Oord et al. 2018, Eq. 4" in out and "docstring:" in out
    assert main(["info", "clipp"]) == 2
    assert "did you mean 'clip'" in _error(capsys)


def test_info_falls_back_to_the_docstring(monkeypatch, capsys):
    import embedloss.cli.info as info

    monkeypatch.setattr(info, "_live_terms", lambda i: None)
    assert main(["info", "clip"]) == 0
    assert "terms:     loss_image_to_text, loss_text_to_image, accuracy" in capsys.readouterr().out
    assert info._live_terms(types.SimpleNamespace(cls=object)) is None  # broken example: no crash
    intro, sections = info.docstring_sections(
        "Summary.\n\nMore.\n\nArgs:\n    a: x\n        y\nReturns: z"
    )
    assert intro == "Summary.\n\nMore." and sections["Returns"] == ["z"]
    assert info._arg_descriptions(sections["Args"]) == {"a": "x y"}


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--task", "nope"])
    assert exc.value.code == 2
    assert "argument --task: invalid choice: 'nope'" in _error(capsys)
    with pytest.raises(SystemExit):
        main([])
    assert "the following arguments are required: COMMAND" in _error(capsys)


def test_bench_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, BENCH_MODULE, None)  # import fails as if the file were absent
    assert main(["bench", "--anything"]) == 2
    assert "the bench command is not available in this installation" in _error(capsys)


def test_bench_missing_dependency_is_named(monkeypatch, capsys):
    def fail(name):
        raise ModuleNotFoundError("No module named 'psutil'", name="psutil")

    monkeypatch.setattr(cli_main.importlib, "import_module", fail)
    assert main(["bench"]) == 2
    assert "needs the missing module 'psutil'" in _error(capsys)


def test_bench_is_wired_to_the_module(monkeypatch):
    fake = types.ModuleType(BENCH_MODULE)
    seen = {}
    fake.add_arguments = lambda p: p.add_argument("--sizes", default="1")
    fake.run = lambda args: seen.setdefault("sizes", args.sizes) and 7
    monkeypatch.setitem(sys.modules, BENCH_MODULE, fake)
    assert main(["bench", "--sizes", "64"]) == 7
    assert seen == {"sizes": "64"}


def test_train_in_process_writes_outputs_and_restores_global_state(tmp_path, capsys):
    import random

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    state, py_state = torch.random.get_rng_state(), random.getstate()
    np_state = np.random.get_state()[1].copy()
    out = tmp_path / "o"
    assert main([*TINY, "--loss", "info_nce", "--output", str(out)]) == 0
    assert (
        torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert random.getstate() == py_state and (np.random.get_state()[1] == np_state).all()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["loss"] == "info_nce" and doc["world_size"] == 1 and len(doc["history"]) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == {"name": "info_nce"}
    text = capsys.readouterr().out
    assert "info_nce on digits" in text and "1 epoch," in text and "wrote" in text


def test_learnable_temperature_is_trained(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: {name: clip, learnable_temperature: true}\nepochs: 1\nbatch_size: 64\n")
    out = tmp_path / "o"
    assert main(["train", "-q", "--config", str(cfg), "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["history"][0]["terms"]["temperature"] != pytest.approx(0.07, abs=1e-6)


def test_npz_without_labels_trains_but_reports_no_accuracy(tmp_path, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).random((80, 10)).astype(np.float32))
    assert main([*TINY[:-1], "32", "--data", str(path)]) == 0
    assert "no labels: the accuracy metrics need an array 'y'" in capsys.readouterr().out


def test_paired_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "p.npz"
    np.savez(path, x_a=rng.random((80, 6)), x_b=rng.random((80, 3)))
    assert main([*TINY[:-1], "32", "--data", str(path), "--loss", "clip"]) == 0
    assert "recall@1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--micro-batch-size", "0"], "micro_batch_size must be an integer >= 1, got 0"),
        (
            ["--method-option", "teacher_momentun=0.9"],
            "unknown --method-option 'teacher_momentun' (did you mean 'teacher_momentum'?)",
        ),
        (
            ["--method-option", "teacher_momentum=0.9"],
            "method.teacher_momentum does not apply to 'simclr' (pair style); it applies to the "
            "moco, predictor, nnclr, dino, ibot styles",
        ),
        (
            ["--loss", "dino", "--method-option", "teacher_momentum=null"],
            "'dino' distils from its EMA teacher: method.teacher_momentum must be a number",
        ),
        (["--lr", "1e30"], "the loss became nan at epoch 1"),
        (
            ["--seed", str(2**64 + 1)],
            f"seed must be an integer in [0, {2**63 - 1}], got {2**64 + 1}",
        ),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--data", "missing.npz"], "missing.npz' does not exist"),
    ],
)
def test_train_errors(args, message, capsys):
    assert main([*TINY, *args]) == 2
    assert message in _error(capsys)


def test_train_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: {name: simclr, reduction: none}\n")
    assert main([*TINY, "--config", str(cfg)]) == 2
    assert "training needs a scalar (use reduction 'mean' or 'sum')" in _error(capsys)
    cfg.write_text("loss: {name: simclr, temperatur: 0.1}\n")
    assert main([*TINY, "--config", str(cfg)]) == 2
    assert "(did you mean 'temperature'?)" in _error(capsys)
    cfg.write_text("epochs: [1\n")
    assert main([*TINY, "--config", str(cfg)]) == 2
    assert "is not valid (safe) YAML" in _error(capsys)


def test_cuda_request(capsys):
    if torch.cuda.is_available():
        assert main([*TINY, "--device", "cuda"]) == 0
    else:
        assert main([*TINY, "--device", "cuda"]) == 2
        assert "CUDA is not available" in _error(capsys)


def test_ddp_code_path_in_one_process(monkeypatch, capsys):
    """The DDP code path in one process (world size 1): DDP wrapper, collectives, barrier."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    single = main([*TINY, "--loss", "clip"])
    out_single = capsys.readouterr().out
    assert single == 0 and "on 1 process (DDP)" in out_single
    assert not torch.distributed.is_initialized()  # the group is torn down after the run
