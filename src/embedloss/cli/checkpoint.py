"""A run directory of ``embedloss train --output DIR``: its files, its checkpoint, its safety rules.

``checkpoint.pt`` is rewritten after every epoch (atomically: a temporary file, then a rename).
It holds plain values only — state dicts of tensors, numbers, strings, lists and dicts — so it
loads with ``torch.load(path, weights_only=True)``, which never runs code from the file:

=============  ===========================================================================
key            content
=============  ===========================================================================
``format``     ``"embedloss-run"`` and ``version`` (refused if newer than this code)
``config``     the resolved config of the run (as ``config.yaml``)
``epoch``      completed epochs; the next epoch's data order follows from the seed and it
``step``       optimiser steps taken
``model``      the model's ``state_dict`` (encoders, heads, BatchNorm statistics)
``loss``       the loss's ``state_dict`` (queues, centres, learnable τ, step counters)
``optimizer``  AdamW's ``state_dict``; ``scheduler``: the learning-rate schedule's position
``rng``        torch (CPU, and CUDA when used), Python ``random`` and NumPy generator states
``data``       the input scaling and sizes the encoder needs (:class:`~embedloss.cli.data.InputSpec`)
``history``    one record per completed epoch (loss, terms, learning rate, held-out metric)
=============  ===========================================================================
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedloss.cli.config import CLIError

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "RUN_FILES",
    "VERSION",
    "capture_rng",
    "load_checkpoint",
    "load_state",
    "prepare_output",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.pt"
FORMAT = "embedloss-run"
VERSION = 1
#: What ``--output`` writes; a directory holding any of them is a run.
RUN_FILES = (
    CHECKPOINT,
    "config.yaml",
    "metrics.json",
    "history.jsonl",
    "curves.png",
    "tensorboard",
)


def prepare_output(path: str | Path, *, overwrite: bool, resuming: Path | None = None) -> Path:
    """Check ``--output`` before any work: a directory, and not another run unless ``overwrite``.

    Args:
        path: The ``--output`` directory (created if missing).
        overwrite: Replace the run files already there.
        resuming: The run directory being resumed (writing into it is the point).

    Raises:
        CLIError: If ``path`` is a file, cannot be created, or holds a run and ``overwrite`` is
            false.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {str(out)!r} is a file, not a directory; choose another path")
    same = resuming is not None and out.exists() and out.resolve() == resuming.resolve()
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not same:
        if not overwrite:
            raise CLIError(
                f"--output {str(out)!r} already holds a run ({', '.join(found)}); pass "
                f"--overwrite to replace it, or --resume {out} to continue it"
            )
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --output directory {str(out)!r}: {err}") from None
    return out


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The global random states a training step may draw from, as plain values."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    keys = np.asarray(keys)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    """Set the global random states saved by :func:`capture_rng`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically (never a half-written file)."""
    path = directory / CHECKPOINT
    tmp = directory / f".{CHECKPOINT}.tmp"
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run: str | Path) -> dict[str, Any]:
    """Read the checkpoint of the run directory ``run`` safely (``weights_only=True``).

    Raises:
        CLIError: If there is no run there, or the file is not an embedloss checkpoint.
    """
    directory = Path(run)
    path = directory / CHECKPOINT
    if directory.is_file():
        raise CLIError(
            f"{str(directory)!r} is a file, not a run directory: give the directory that holds "
            f"it ({str(directory.parent)!r})"
        )
    if not directory.is_dir():
        raise CLIError(f"run directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise CLIError(
            f"{str(directory)!r} holds no {CHECKPOINT}: it is not a run of "
            "'embedloss train --output DIR' (or its first epoch never finished)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: truncated, foreign, code-bearing
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        if path.stat().st_size == 0:
            detail = "the file is empty"
        raise CLIError(f"cannot load {str(path)!r} safely (weights_only): {detail}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CLIError(f"{str(path)!r} is not an embedloss run checkpoint")
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise CLIError(
            f"{str(path)!r} has checkpoint version {state.get('version')!r}; this embedloss "
            f"reads version {VERSION} and older: upgrade embedloss"
        )
    return state


_SIZE = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def load_state(module: nn.Module, state: Mapping[str, Any], what: str, source: str) -> None:
    """``module.load_state_dict(state)`` (strict), with a mismatch said in one line.

    Raises:
        CLIError: Naming the first differently shaped, missing or unexpected tensor.
    """
    try:
        module.load_state_dict(dict(state))
    except RuntimeError as err:
        text = str(err)
        size = _SIZE.search(text)
        if size is not None:
            name, saved, here = size.group(1), _shape(size.group(2)), _shape(size.group(3))
            problem = f"{what} tensor {name!r} has shape {saved} in the checkpoint but {here} here"
        else:  # missing or unexpected keys: torch's first line after its header
            lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            problem = f"{what}: {lines[0] if lines else text}"
        raise CLIError(
            f"{source} does not fit this configuration: {problem} (other loss options, model "
            "sizes or data than the run was trained with?)"
        ) from None
