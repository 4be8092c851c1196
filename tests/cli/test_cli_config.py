"""Config resolution, validation and the safe YAML round trip."""

from __future__ import annotations

import pytest
import yaml

from embedloss.cli.config import (
    DEFAULT_CONFIG,
    CLIError,
    config_to_yaml,
    load_config_file,
    resolve_config,
)


def test_precedence_defaults_file_flags():
    cfg = resolve_config(
        {"epochs": 3, "lr": 0.01, "model": {"hidden_dim": 32}}, {"epochs": 5, "seed": None}
    )
    assert cfg["epochs"] == 5 and cfg["lr"] == 0.01 and cfg["seed"] == 0
    assert cfg["model"] == {**DEFAULT_CONFIG["model"], "hidden_dim": 32}
    assert DEFAULT_CONFIG["epochs"] == 20  # defaults are never mutated


def test_loss_flag_replaces_the_loss_section_and_resets_the_task():
    file_cfg = {"loss": {"name": "simclr", "temperature": 0.2}, "task": "supervised"}
    assert resolve_config(file_cfg, {"loss": "simclr"})["loss"] == {
        "name": "simclr",
        "temperature": 0.2,
    }
    cfg = resolve_config(file_cfg, {"loss": "clip"})
    assert cfg["loss"] == {"name": "clip"} and cfg["task"] == "auto"
    assert resolve_config({"loss": "clip"})["loss"] == {"name": "clip"}


def test_data_flags(tmp_path):
    cfg = resolve_config(None, {"data": str(tmp_path / "d.npz")})
    assert cfg["data"]["dataset"] is None and cfg["data"]["path"] == str(tmp_path / "d.npz")
    back = resolve_config({"data": {"path": "rel.npz", "dataset": None}}, {"dataset": "digits"})
    assert back["data"]["path"] is None and back["data"]["dataset"] == "digits"


@pytest.mark.parametrize(
    ("file_cfg", "message"),
    [
        ({"epoch": 3}, "unknown config key 'epoch' (did you mean 'epochs'?)"),
        (
            {"model": {"hiden_dim": 3}},
            "unknown config key model.'hiden_dim' (did you mean 'hidden_dim'?)",
        ),
        ({"model": 3}, "config key 'model' must be a mapping, got int"),
        ({"loss": 3}, "must be a loss name or a mapping"),
        ({"loss": {"temperature": 0.1}}, "must have a 'name'"),
        ({1: 2}, "config keys must be strings, got 1 in the top level"),
        ({"task": "ssll"}, "task must be one of auto, ssl, paired, supervised"),
        ({"epochs": True}, "epochs must be an integer >= 1, got True"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"lr": "fast"}, "lr must be a number > 0, got 'fast'"),
        ({"lr": float("nan")}, "lr must be a number > 0"),
        ({"weight_decay": -1}, "weight_decay must be a number >= 0.0"),
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"model": {"norm": "group"}}, "model.norm must be 'batch', 'layer' or 'none'"),
        ({"augment": {"mask": 1.0}}, "augment.mask must be a number in [0.0, 0.9]"),
        ({"eval": {"k": 0}}, "eval.k must be an integer >= 1"),
        ({"data": {"dataset": "mnist"}}, "unknown dataset 'mnist'"),
        ({"data": {"dataset": None}}, "data needs exactly one of"),
        ({"data": {"dataset": None, "path": 3}}, "data.path must be a file name"),
        ({"data": {"test_fraction": 0.99}}, "data.test_fraction must be a number in [0.05, 0.95]"),
    ],
)
def test_bad_configs(file_cfg, message):
    with pytest.raises(CLIError) as err:
        resolve_config(file_cfg)
    assert message in str(err.value)


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("loss: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CLIError, match=r"is not valid \(safe\) YAML"):
        load_config_file(evil)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(CLIError, match="must hold a mapping, got list"):
        load_config_file(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_file(empty) == {}
    with pytest.raises(CLIError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(CLIError, match="cannot read config file"):
        load_config_file(tmp_path)


def test_yaml_round_trip_is_exact():
    cfg = resolve_config(
        {
            "loss": {"name": "clip", "temperature": 0.07, "learnable_temperature": True},
            "lr": 1e-3 / 3,
        }
    )
    text = config_to_yaml(cfg)
    assert text.startswith("# Resolved configuration") and "embedloss train --config" in text
    assert resolve_config(yaml.safe_load(text)) == cfg
