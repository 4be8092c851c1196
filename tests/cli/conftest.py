"""Helpers for the command-line tests: run ``python -m embedloss`` on this checkout's sources."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def run_cli(
    *args: str, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedloss", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def run_cli_concurrently(
    *arg_lists: list[str], timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """Run several CLI invocations at once (the machine has more than one core)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "embedloss", *args],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arg_lists
    ]
    results = []
    for args, proc in zip(arg_lists, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


@pytest.fixture
def cli_concurrently() -> Callable[..., list[subprocess.CompletedProcess]]:
    return run_cli_concurrently


@pytest.fixture
def npz(tmp_path: Path) -> Callable[..., str]:
    """Write an .npz into tmp_path and return its path."""

    def write(name: str = "data.npz", **arrays: np.ndarray) -> str:
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)

    return write


@pytest.fixture
def free_port_fixture() -> int:
    return free_port()


@pytest.fixture
def env() -> dict[str, str]:
    return cli_env()
