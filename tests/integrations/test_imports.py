"""The core stays torch-only: the trainer libraries load only with their integration module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

HEAVY = (
    "lightning",
    "pytorch_lightning",
    "transformers",
    "sentence_transformers",
    "accelerate",
    "datasets",
)


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_import_embedloss_loads_no_trainer_library():
    done = python(
        "import sys, embedloss, embedloss.integrations, embedloss.cli\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "missing", "name"),
    [
        ("embedloss.integrations.transformers", "transformers", "transformers"),
        (
            "embedloss.integrations.sentence_transformers",
            "sentence_transformers",
            "sentence-transformers",
        ),
    ],
)
def test_a_missing_trainer_library_is_named_in_one_line(module, missing, name):
    # sys.modules[name] = None makes "import name" fail as if it were not installed
    done = python(f"import sys; sys.modules[{missing!r}] = None\nimport {module}")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"ImportError: {module} needs {name}: pip install 'embedloss[integrations]'"
