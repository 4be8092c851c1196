"""bench/quality.py: the re-runnable quality table and its section of docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_section_replaced_in_place_keeping_the_others(quality, tmp_path):
    doc = tmp_path / "benchmarks.md"
    quality.write_section(doc, "## Quality\n\nfirst\n")
    assert doc.read_text() == "# Benchmarks\n\n## Quality\n\nfirst\n"
    doc.write_text("# Benchmarks\n\n## Speed\n\nfast\n\n## Quality\n\nold\n\n## Memory\n\nsmall\n")
    quality.write_section(doc, "## Quality\n\nnew\n")
    assert (
        doc.read_text()
        == "# Benchmarks\n\n## Speed\n\nfast\n\n## Quality\n\nnew\n\n## Memory\n\nsmall\n"
    )
    doc.write_text("# Benchmarks\n\n## Speed\n\nfast\n")
    quality.write_section(doc, "## Quality\n\nadded\n")
    assert doc.read_text() == "# Benchmarks\n\n## Speed\n\nfast\n\n## Quality\n\nadded\n"


def test_tasks_of_the_registry(quality):
    by_task, skipped = quality.plan_losses(["simclr", "clip", "info_nce"])
    assert by_task == {"ssl": ["simclr", "info_nce"], "paired": ["clip"], "supervised": []}
    assert skipped == {}


def test_table_and_findings(quality, tmp_path, capsys):
    out = tmp_path / "b.md"
    assert quality.main(["--losses", "clip", "--epochs", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "### Paired" in text and "| `clip` |" in text and "| *random encoder* |" in text
    assert "1 epochs" in text and "Every loss beats the random-encoder baseline" in text
    fake = {
        "metrics": {"recall@1": 0.0, "recall@5": 0.0},
        "seconds": {"train": 1.0},
        "baselines": {"random_encoder": {"recall@1": 0.1, "recall@5": 0.2}, "raw_features": None},
    }
    section = quality.render(
        {"ssl": {}, "paired": {"bad": fake}, "supervised": {}},
        {"ssl": {"boom": "exploded"}, "paired": {}, "supervised": {}},
        {"combined": "needs a config"},
        {"epochs": 1},
        1.0,
    )
    assert "**(does not beat random)**" in section
    assert (
        "- `bad` (paired) does not beat the random encoder on recall@1 (0.000 vs 0.100)." in section
    )
    assert "- `boom` (ssl) failed to train: exploded" in section
    assert "- `combined`: needs a config" in section
