"""Config resolution, validation and the safe YAML round trip."""

from __future__ import annotations

import pytest
import yaml

from embedloss.cli.config import (
    DEFAULT_CONFIG,
    CLIError,
    config_to_yaml,
    load_config_file,
    parse_loss_options,
    resolve_config,
)


def test_every_seed_torch_and_numpy_take_is_accepted():
    assert resolve_config({"seed": 2**63 - 1})["seed"] == 2**63 - 1


def test_precedence_defaults_file_flags():
    cfg = resolve_config(
        {"epochs": 3, "lr": 0.01, "model": {"hidden_dim": 32}}, {"epochs": 5, "seed": None}
    )
    assert cfg["epochs"] == 5 and cfg["lr"] == 0.01 and cfg["seed"] == 0
    assert cfg["model"] == {**DEFAULT_CONFIG["model"], "hidden_dim": 32}
    assert DEFAULT_CONFIG["epochs"] == 20  # defaults are never mutated


def test_loss_flag_keeps_the_options_the_new_loss_takes_and_says_what_it_drops():
    file_cfg = {"loss": {"name": "simclr", "temperature": 0.2}, "task": "supervised"}
    assert resolve_config(file_cfg, {"loss": "simclr"})["loss"] == {
        "name": "simclr",
        "temperature": 0.2,
    }
    notes: list[str] = []
    cfg = resolve_config(file_cfg, {"loss": "clip"}, notes)
    assert cfg["loss"] == {"name": "clip", "temperature": 0.2} and cfg["task"] == "auto"
    assert notes == [
        "--loss clip: the task is chosen anew (the config's was 'supervised'; pass --task to keep it)"
    ]
    notes.clear()
    moco = {"loss": {"name": "moco", "temperature": 0.1, "queue_size": 256}}
    cfg = resolve_config(moco, {"loss": "siglip"}, notes)
    assert cfg["loss"] == {"name": "siglip", "temperature": 0.1}
    assert notes == [
        "--loss siglip replaces the config's loss 'moco'; dropped its options that 'siglip' does "
        "not take: queue_size (kept temperature)"
    ]
    assert resolve_config({"loss": "clip"})["loss"] == {"name": "clip"}
    # an unknown name keeps the options: the planner reports the name with did-you-mean
    assert resolve_config(moco, {"loss": "sigliip"})["loss"]["queue_size"] == 256


def test_loss_options_parse_as_yaml_and_override_the_file():
    opts = parse_loss_options(
        ["temperature=1e-3", "learnable_temperature=true", "queue_size=64", "mode= ab ", "x=null"]
    )
    assert opts == {
        "temperature": 0.001,
        "learnable_temperature": True,
        "queue_size": 64,
        "mode": "ab",
        "x": None,
    }
    cfg = resolve_config(
        {"loss": {"name": "clip", "temperature": 0.2}}, {"loss_options": {"temperature": 0.05}}
    )
    assert cfg["loss"] == {"name": "clip", "temperature": 0.05}
    for bad, message in (
        (["temperature"], "--loss-option expects NAME=VALUE"),
        (["1x=2"], "--loss-option expects NAME=VALUE"),
        (["name=clip"], "cannot set the loss's name; use --loss NAME"),
        (["t=[1"], "cannot read '[1' as a YAML value"),
    ):
        with pytest.raises(CLIError) as err:
            parse_loss_options(bad)
        assert message in str(err.value)


def test_training_knobs():
    cfg = resolve_config(
        None,
        {
            "lr_schedule": "cosine",
            "warmup_epochs": 0.5,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "precision": "bf16",
        },
    )
    assert (cfg["lr_schedule"], cfg["warmup_epochs"], cfg["grad_clip"]) == ("cosine", 0.5, 1.0)
    assert (cfg["weight_decay"], cfg["precision"]) == (0.0, "bf16")
    defaults = resolve_config(None)
    assert (defaults["lr_schedule"], defaults["warmup_epochs"]) == ("constant", 0)
    assert defaults["grad_clip"] is None and defaults["precision"] == "fp32"


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
        ({"seed": -1}, f"seed must be an integer in [0, {2**63 - 1}], got -1"),
        ({"seed": 2**63}, f"seed must be an integer in [0, {2**63 - 1}], got {2**63}"),
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
        ({"lr_schedule": "step"}, "lr_schedule must be one of constant, cosine, got 'step'"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a number >= 0.0"),
        ({"warmup_epochs": 30}, "warmup_epochs (30) must not exceed epochs (20)"),
        ({"grad_clip": 0}, "grad_clip must be a number > 0 or null (no clipping), got 0"),
        ({"grad_clip": True}, "grad_clip must be a number > 0 or null"),
        ({"precision": "fp16"}, "precision must be one of fp32, bf16, got 'fp16'"),
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
        ({"eval": {"dims": [8, 0]}}, "eval.dims must be null or a list of integers >= 1"),
        ({"eval": {"dims": 8}}, "eval.dims must be null or a list of integers >= 1, got 8"),
        ({"method": {"teacher_momentum": 1.5}}, "method.teacher_momentum must be a number in"),
        ({"method": {"teacher_schedule": "step"}}, "method.teacher_schedule must be auto,"),
        ({"method": {"local_crops": -1}}, "method.local_crops must be an integer >= 0"),
        ({"method": {"prototypes": 0}}, "method.prototypes must be an integer >= 1"),
        ({"method": {"crops": 2}}, "unknown config key method.'crops'"),
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


def test_method_options_norm_and_micro_batches():
    opts = parse_loss_options(["teacher_momentum=0.9", "local_crops=2"], "--method-option")
    assert opts == {"teacher_momentum": 0.9, "local_crops": 2}
    with pytest.raises(CLIError, match="unknown --method-option 'prototype' .did you mean"):
        parse_loss_options(["prototype=3"], "--method-option")
    with pytest.raises(CLIError, match="--method-option expects NAME=VALUE"):
        parse_loss_options(["teacher_momentum"], "--method-option")
    cfg = resolve_config(
        {"method": {"prototypes": 64}},
        {"method_options": {"teacher_momentum": None}, "norm": "layer", "micro_batch_size": 32},
    )
    assert cfg["method"] == {
        "teacher_momentum": None,
        "teacher_schedule": "auto",
        "local_crops": "auto",
        "prototypes": 64,
    }
    assert cfg["model"]["norm"] == "layer" and cfg["micro_batch_size"] == 32
    # another loss chooses its method anew (a DINO run's crops do not fit SimCLR)
    notes: list[str] = []
    dino = {"loss": "dino", "method": {"teacher_momentum": 0.996, "local_crops": 4}}
    cfg = resolve_config(dino, {"loss": "simclr"}, notes)
    assert set(cfg["method"].values()) == {"auto"}
    assert (
        "the method options are chosen anew (the config's were teacher_momentum=0.996, "
        in (notes[-1])
    )


#: YAML 1.2 / JSON float literals with exponents, with and without a dot or a sign.
EXPONENTS = {"lr": "1e-3", "weight_decay": "5E-2", "grad_clip": "1.5e+3", "warmup_epochs": "2.5E-1"}


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("flat.yaml", lambda v: "".join(f"{k}: {x}\n" for k, x in v.items())),
        ("flow.yaml", lambda v: "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"),
        ("flat.json", lambda v: "{" + ", ".join(f'"{k}": {x}' for k, x in v.items()) + "}"),
    ],
)
def test_config_files_read_exponents_as_numbers(tmp_path, name, layout):
    path = tmp_path / name
    path.write_text(layout(EXPONENTS))
    cfg = resolve_config(load_config_file(path))
    assert {k: cfg[k] for k in EXPONENTS} == {k: float(x) for k, x in EXPONENTS.items()}


def test_exponents_reach_nested_options_and_flags(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text(
        "loss: {name: simclr, temperature: 5e-2}\nmethod: {teacher_momentum: -1.5e+3}\n"
    )
    data = load_config_file(path)
    assert data["loss"]["temperature"] == 0.05 and data["method"]["teacher_momentum"] == -1500.0
    assert parse_loss_options(["temperature=.5E-1", "queue_size=64", "tag=1e3x"]) == {
        "temperature": 0.05,
        "queue_size": 64,
        "tag": "1e3x",
    }


def test_a_json_config_is_read_as_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"lr": 1e-3,}')
    with pytest.raises(CLIError, match=r"config file '.*bad\.json' is not valid JSON: "):
        load_config_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(CLIError, match="must hold a mapping, got list"):
        load_config_file(path)
