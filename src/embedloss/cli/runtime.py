"""Where a run executes: its process group (one process or ``torchrun``), seeding, progress bar."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from embedloss.cli.config import CLIError

__all__ = ["World", "deterministic", "mean_over_ranks", "progress_bar", "world"]


@dataclass(frozen=True)
class World:
    """The process group of this run (``size == 1``: a plain single process)."""

    size: int
    rank: int
    device: torch.device
    distributed: bool = False  # launched by torchrun (a process group exists)

    @property
    def main(self) -> bool:
        """True on the process that evaluates and writes."""
        return self.rank == 0


@contextlib.contextmanager
def world(device: str) -> Iterator[World]:
    """Join the ``torchrun`` process group when launched by it, else a single process."""
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but CUDA is not available")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield World(1, 0, torch.device(device))
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield World(dist.get_world_size(), dist.get_rank(), dev, distributed=True)
    finally:
        if owns:
            dist.destroy_process_group()


@contextlib.contextmanager
def deterministic(seed: int, threads: int, device: str) -> Iterator[None]:
    """Seeded (torch, Python ``random``, NumPy), deterministic, fixed thread count.

    The previous global state — random generators, thread count, deterministic mode — is
    restored on exit, so a run inside a larger program leaves no trace.
    """
    import numpy as np

    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_py, prev_np = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=device == "cuda")
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            random.setstate(prev_py)
            np.random.set_state(prev_np)


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar on stderr (a silent stand-in when disabled or tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the command checks for tqdm first; library callers may lack it
        enabled = False
    if not enabled:
        from types import SimpleNamespace

        return SimpleNamespace(
            update=lambda n=1: None,
            set_postfix_str=lambda s, refresh=False: None,
            set_description_str=lambda s, refresh=False: None,
            close=lambda: None,
        )
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)


def mean_over_ranks(values: Tensor, w: World) -> Tensor:
    """The mean of ``values`` over the ranks (itself in a single process)."""
    if w.distributed:
        values = values.to(w.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu() / w.size
    return values
