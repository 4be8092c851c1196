"""The configuration of ``embedloss train``: defaults, YAML files, command-line overrides.

A run is fully described by one nested mapping of plain values (the *resolved config*). It is
built from the defaults below, then a ``--config`` YAML file, then command-line flags (later
wins), validated here, and written back as ``config.yaml`` so that
``embedloss train --config config.yaml`` repeats the run exactly. Flags override single keys:
``--loss NAME`` replaces the loss's name and keeps the file's loss options that the new loss
takes (the others are dropped with a note), and ``--loss-option NAME=VALUE`` sets one option.

Nothing in a config is executed or imported: YAML is parsed with a ``yaml.SafeLoader`` (that
reads YAML 1.2 floats such as ``1e-3`` as numbers), ``.json`` files with :mod:`json`, and a loss
is only ever looked up by name in the registry.

Example:
    >>> cfg = resolve_config(None, {"epochs": 2})
    >>> cfg["epochs"], cfg["loss"]["name"], cfg["data"]["dataset"]
    (2, 'simclr', 'digits')
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_LOSS",
    "TASKS",
    "CLIError",
    "config_to_yaml",
    "load_config_file",
    "parse_loss_options",
    "resolve_config",
]

TASKS = ("ssl", "paired", "supervised")
DEFAULT_LOSS = "simclr"
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
#: The flags that override a single top-level key of the config (``--batch-size`` → batch_size).
FLAG_KEYS = (
    "task",
    "epochs",
    "batch_size",
    "lr",
    "lr_schedule",
    "warmup_epochs",
    "weight_decay",
    "grad_clip",
    "precision",
    "seed",
    "device",
    "micro_batch_size",
)
#: The largest seed: torch's generators take 64-bit seeds, and a run seeds ``seed + epoch``.
MAX_SEED = 2**63 - 1
#: The keys of the ``method`` section: a method's EMA teacher, multi-crop views and prototypes.
#: ``auto`` takes the method's own value (:mod:`embedloss.cli.methods`).
METHOD_KEYS = ("teacher_momentum", "teacher_schedule", "local_crops", "prototypes")

DEFAULT_CONFIG: dict[str, Any] = {
    "loss": {"name": DEFAULT_LOSS},  # the registry name plus constructor keyword arguments
    "task": "auto",  # auto | ssl | paired | supervised
    "data": {"dataset": "digits", "path": None, "test_fraction": 0.25},
    "epochs": 20,
    "batch_size": 128,
    # Encoder inputs per GradCache micro-batch (None: plain backprop of the whole batch).
    "micro_batch_size": None,
    "lr": 0.002,  # AdamW's peak learning rate
    # Learning rate over the run: a linear warm-up over `warmup_epochs` (fractions allowed), then
    # `constant`, or `cosine` decay to 0 at the last step of `epochs`.
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "weight_decay": 0.0001,
    "grad_clip": None,  # clip the global gradient norm to this value (None: no clipping)
    "precision": "fp32",  # fp32 | bf16 (autocast of the model and loss; the loss stays float32)
    "seed": 0,
    "device": "cpu",
    "num_threads": 1,  # fixed so that the numbers do not depend on the machine's core count
    "model": {"hidden_dim": 256, "embedding_dim": 64, "head_dim": 64, "norm": "batch"},
    # Per-method parts (auto: the method's own values, written resolved into config.yaml):
    # the EMA teacher's base momentum (null: no teacher, where the method allows it) and its
    # schedule (constant | cosine to 1), local crops per sample (multi-crop), prototypes (K).
    "method": dict.fromkeys(METHOD_KEYS, "auto"),
    # Training views: random shifts of up to `shift` pixels (images only), pixel masking with
    # probability `mask`, Gaussian noise of standard deviation `noise`.
    "augment": {"shift": 1, "mask": 0.1, "noise": 0.1},
    # Held-out nuisance perturbation for the ssl/supervised metrics, and the k of k-NN; `dims`:
    # also measure the first d features of the embedding for each d listed (null: a matryoshka
    # run's own dims, none otherwise).
    "eval": {"shift": 1, "noise": 0.1, "k": 5, "dims": None},
}


class CLIError(ValueError):
    """A user mistake (bad option, config, data file or run): reported in one line, exit code 2.

    A :class:`ValueError`, so that Python callers (:func:`embedloss.cli.load_encoder`) catch it
    as one.
    """


def _close(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    """Merge ``update`` into ``base`` in place; unknown keys are errors (the loss section is free)."""
    for key, value in update.items():
        if not isinstance(key, str):
            raise CLIError(
                f"config keys must be strings, got {key!r} in {where or 'the top level'}"
            )
        if key not in base:
            valid = sorted(base)
            raise CLIError(
                f"unknown config key {where}{key!r}{_close(key, valid)}; valid keys: {', '.join(valid)}"
            )
        if isinstance(base[key], dict) and key != "loss":
            if not isinstance(value, Mapping):
                raise CLIError(
                    f"config key {where}{key!r} must be a mapping, got {type(value).__name__}"
                )
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _loss_section(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, Mapping):
        raise CLIError(
            f"config key 'loss' must be a loss name or a mapping with a 'name' key, got {type(value).__name__}"
        )
    if "name" not in value or not isinstance(value["name"], str):
        raise CLIError("config key 'loss' must have a 'name' naming a registered loss")
    return dict(value)


@functools.cache
def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats: ``1e-3``, ``5E-2``, ``-1.5e+3``.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent (``1.0e-3``), so
    it reads ``1e-3`` as a string; JSON and YAML 1.2 read it as a number, and so does this.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
    return Loader


def _parse_config(text: str, where: str, json_file: bool) -> Any:
    """A config file's text as JSON or as (safe, YAML 1.2 float) YAML."""
    import json

    import yaml

    if json_file:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"config file {where} is not valid JSON: {err}") from None
    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: builds no Python objects
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise CLIError(f"config file {where} is not valid (safe) YAML: {detail}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (safe loader) or ``.json`` config; any problem becomes a :class:`CLIError`.

    Numbers with exponents (``lr: 1e-3``) are numbers in both, as YAML 1.2 and JSON say.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read config file {str(p)!r}: {err}") from None
    data = _parse_config(text, repr(str(p)), p.suffix.lower() == ".json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def _check_int(
    cfg: Mapping[str, Any], key: str, low: int, where: str = "", high: int | None = None
) -> None:
    value = cfg[key]
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low
    if not ok or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise CLIError(f"{where}{key} must be an integer {rng}, got {value!r}")


def _check_float(
    cfg: Mapping[str, Any], key: str, low: float, high: float | None, where: str = ""
) -> None:
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= low and (high is None or value <= high) and value == value
    if not ok:
        rng = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise CLIError(f"{where}{key} must be a number {rng}, got {value!r}")


def _validate(cfg: dict[str, Any]) -> None:
    if cfg["task"] not in ("auto", *TASKS):
        raise CLIError(f"task must be one of auto, {', '.join(TASKS)}, got {cfg['task']!r}")
    data = cfg["data"]
    has_path = data.get("path") is not None
    has_dataset = data.get("dataset") is not None
    if has_path == has_dataset:
        raise CLIError("data needs exactly one of 'dataset: digits' or 'path: FILE.npz'")
    if has_dataset and data["dataset"] != "digits":
        raise CLIError(
            f"unknown dataset {data['dataset']!r}; the embedded dataset is 'digits' (use --data FILE.npz for your own)"
        )
    if has_path and not isinstance(data["path"], str):
        raise CLIError(f"data.path must be a file name, got {data['path']!r}")
    _check_float(data, "test_fraction", 0.05, 0.95, "data.")
    _check_int(cfg, "epochs", 1)
    _check_int(cfg, "batch_size", 2)
    _check_int(cfg, "seed", 0, high=MAX_SEED)
    _check_int(cfg, "num_threads", 1)
    lr = cfg["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise CLIError(f"lr must be a number > 0, got {lr!r}")
    _check_float(cfg, "weight_decay", 0.0, None)
    if cfg["lr_schedule"] not in LR_SCHEDULES:
        raise CLIError(
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg['lr_schedule']!r}"
        )
    _check_float(cfg, "warmup_epochs", 0.0, None)
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise CLIError(
            f"warmup_epochs ({cfg['warmup_epochs']}) must not exceed epochs ({cfg['epochs']})"
        )
    clip = cfg["grad_clip"]
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < float("inf")
    ):
        raise CLIError(f"grad_clip must be a number > 0 or null (no clipping), got {clip!r}")
    if cfg["precision"] not in PRECISIONS:
        raise CLIError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}"
        )
    if cfg["device"] not in ("cpu", "cuda"):
        raise CLIError(f"device must be 'cpu' or 'cuda', got {cfg['device']!r}")
    for key in ("hidden_dim", "embedding_dim", "head_dim"):
        _check_int(cfg["model"], key, 1, "model.")
    if cfg["model"]["norm"] not in ("batch", "layer", "none"):
        raise CLIError(
            f"model.norm must be 'batch', 'layer' or 'none', got {cfg['model']['norm']!r}"
        )
    for section in ("augment", "eval"):
        _check_int(cfg[section], "shift", 0, f"{section}.")
        _check_float(cfg[section], "noise", 0.0, None, f"{section}.")
    _check_float(cfg["augment"], "mask", 0.0, 0.9, "augment.")
    _check_int(cfg["eval"], "k", 1, "eval.")
    dims = cfg["eval"]["dims"]
    if dims is not None and (
        not isinstance(dims, list)
        or not dims
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)
    ):
        raise CLIError(f"eval.dims must be null or a list of integers >= 1, got {dims!r}")
    micro = cfg["micro_batch_size"]
    if micro is not None:
        _check_int(cfg, "micro_batch_size", 1)
    _validate_method(cfg["method"])


def _validate_method(method: Mapping[str, Any]) -> None:
    """Types and ranges of the ``method`` section (whether a key applies is the method's call)."""
    where = "method."
    m = method["teacher_momentum"]
    if m not in ("auto", None):
        _check_float(method, "teacher_momentum", 0.0, 1.0, where)
    if method["teacher_schedule"] not in ("auto", None, "constant", "cosine"):
        raise CLIError(
            "method.teacher_schedule must be auto, constant or cosine, got "
            f"{method['teacher_schedule']!r}"
        )
    for key, low in (("local_crops", 0), ("prototypes", 1)):
        if method[key] not in ("auto", None):
            _check_int(method, key, low, where)


def _yaml_value(text: str) -> Any:
    """A flag value as a config file's YAML reads it (``1e-3`` is a number)."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: builds no Python objects
    except yaml.YAMLError as err:
        raise CLIError(
            f"cannot read {text!r} as a YAML value: {' '.join(str(err).split())}"
        ) from None


def parse_loss_options(items: Sequence[str], flag: str = "--loss-option") -> dict[str, Any]:
    """``--loss-option NAME=VALUE`` strings as ``{NAME: value}``, values read as YAML.

    ``flag="--method-option"`` reads the method options, whose names are those of
    :data:`METHOD_KEYS`.

    Example:
        >>> parse_loss_options(["temperature=1e-1", "learnable_temperature=true"])
        {'temperature': 0.1, 'learnable_temperature': True}

    Raises:
        CLIError: For an item without ``=``, a name that is not an identifier, ``name``, or
            (method options) an unknown name.
    """
    options: dict[str, Any] = {}
    example = "temperature=0.1" if flag == "--loss-option" else "teacher_momentum=0.99"
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise CLIError(f"{flag} expects NAME=VALUE (e.g. {example}), got {item!r}")
        if flag == "--loss-option" and name == "name":
            raise CLIError("--loss-option cannot set the loss's name; use --loss NAME")
        if flag != "--loss-option" and name not in METHOD_KEYS:
            raise CLIError(
                f"unknown {flag} {name!r}{_close(name, list(METHOD_KEYS))}; valid names: "
                f"{', '.join(METHOD_KEYS)}"
            )
        options[name] = _yaml_value(text)
    return options


def _replace_loss(cfg: dict[str, Any], name: str, notes: list[str]) -> None:
    """``--loss NAME`` over a config's loss: keep the options the new loss takes."""
    from embedloss.registry import loss_info

    old = cfg["loss"]
    options = {k: v for k, v in old.items() if k != "name"}
    try:
        params = set(loss_info(name).signature.parameters)
    except (TypeError, ValueError):  # an unknown name is reported when the loss is planned
        params = set(options)
    kept = {k: v for k, v in options.items() if k in params}
    dropped = sorted(set(options) - set(kept))
    cfg["loss"] = {"name": name, **kept}
    if dropped:
        notes.append(
            f"--loss {name} replaces the config's loss {old['name']!r}; dropped its options that "
            f"{name!r} does not take: {', '.join(dropped)}"
            + (f" (kept {', '.join(sorted(kept))})" if kept else "")
        )


def resolve_config(
    file_config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Defaults ← ``file_config`` ← ``overrides`` (flat CLI values), validated.

    ``overrides`` uses the flag names: ``loss``, ``loss_options`` and ``method_options``
    (mappings), ``dataset``, ``data``, ``norm`` and those of :data:`FLAG_KEYS`; ``None`` values
    are ignored. A ``loss`` flag that
    names another loss keeps the file's loss options the new loss accepts (the others are
    dropped, with a note) and resets the task to ``auto`` unless a task is given too;
    ``loss_options`` then override single options.

    Args:
        file_config: A parsed config file (or a run's config), or ``None``.
        overrides: Values of the command-line flags.
        notes: Collects one-line notes about values the flags dropped or changed.

    Raises:
        CLIError: For unknown keys, wrong types or out-of-range values.
    """
    notes = [] if notes is None else notes
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if file_config:
        file_config = dict(file_config)
        if "loss" in file_config:
            cfg["loss"] = _loss_section(file_config.pop("loss"))
        _merge(cfg, file_config, "")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "loss" in given and given["loss"] != cfg["loss"]["name"]:
        _replace_loss(cfg, given["loss"], notes)
        if cfg["task"] != "auto" and "task" not in given:
            notes.append(
                f"--loss {given['loss']}: the task is chosen anew (the config's was {cfg['task']!r}; "
                "pass --task to keep it)"
            )
        cfg["task"] = "auto"
        resolved = {k: v for k, v in cfg["method"].items() if v != "auto"}
        if resolved:  # the previous method's teacher, crops and prototypes
            cfg["method"] = dict.fromkeys(METHOD_KEYS, "auto")
            notes.append(
                f"--loss {given['loss']}: the method options are chosen anew (the config's were "
                f"{', '.join(f'{k}={v}' for k, v in resolved.items())}; pass --method-option to set them)"
            )
    cfg["loss"].update(given.get("loss_options") or {})
    cfg["method"].update(given.get("method_options") or {})
    if "norm" in given:
        cfg["model"]["norm"] = given["norm"]
    if "dataset" in given:
        cfg["data"].update(dataset=given["dataset"], path=None)
    if "data" in given:
        cfg["data"].update(dataset=None, path=str(given["data"]))
    for key in FLAG_KEYS:
        if key in given:
            cfg[key] = given[key]
    _validate(cfg)
    if cfg["data"]["path"] is not None:  # written back absolute so the config works anywhere
        cfg["data"]["path"] = str(Path(cfg["data"]["path"]).expanduser().resolve())
    return cfg


def config_to_yaml(cfg: Mapping[str, Any]) -> str:
    """The resolved config as YAML (``yaml.safe_dump``), with a header saying how to reuse it."""
    import yaml

    header = (
        "# Resolved configuration of an `embedloss train` run.\n"
        "# Repeat it exactly with: embedloss train --config config.yaml\n"
    )
    return header + yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
