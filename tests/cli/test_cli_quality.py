"""bench/quality.py: the re-runnable quality table and its section of docs/benchmarks.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    # Imported by name from bench/ (on sys.path, which worker processes inherit), so that its
    # functions pickle for --jobs.
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("quality")


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
    by_task, skipped = quality.plan_losses(["simclr", "clip", "info_nce", "dino", "triplet"])
    assert by_task == {
        "ssl": ["simclr", "info_nce", "dino"],
        "paired": ["clip"],
        "supervised": ["triplet"],
    }
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


def _doc(metric: float, extra: dict | None = None) -> dict:
    metrics = {"knn_accuracy": metric, **(extra or {})}
    return {
        "metrics": metrics,
        "seconds": {"train": 1.0},
        "baselines": {
            "random_encoder": {k: 0.1 for k in metrics},
            "raw_features": {"knn_accuracy": 0.2},
        },
    }


def test_worker_processes_give_the_same_numbers(quality, capsys):
    args = ["--losses", "clip,supcon", "--epochs", "1", "--no-write"]
    assert quality.main(args) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert quality.main([*args, "--jobs", "2"]) == 0
    pooled = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]

    def metrics(lines):  # every column but the training time
        return [line.rsplit("|", 2)[0] for line in lines]

    assert len(alone) == 2 and metrics(pooled) == metrics(alone)


def test_targets_settings_and_nested_sizes(quality):
    nested = {f"dim_{d}/{m}": 0.5 for d in (8, 16, 32) for m in quality.NESTED_METRICS}
    nested.update(precision_at_1=0.6, map_at_r=0.4)
    results = {
        "ssl": {"simclr": _doc(0.90), "moco": _doc(0.88), "dino": _doc(0.80)},
        "paired": {},
        "supervised": {"matryoshka": _doc(0.95, nested)},
    }
    empty = {"ssl": {}, "paired": {}, "supervised": {}}
    section = quality.render(results, empty, {}, {}, 1.0)
    assert (
        "- PASS: `moco` 0.880 vs `simclr` 0.900 on k-NN acc. (perturbed): trails by 0.020"
        in section
    )
    assert (
        "- MISS: `dino` 0.800 vs `simclr` 0.900" in section and "negative_cosine` 0" not in section
    )
    assert (
        "- `dino`: lr 0.005, EMA teacher 0.996 (cosine), local_crops 4, prototypes 256" in section
    )
    assert "- `moco`: queue_size=1024, EMA teacher 0.99 (constant)" in section
    assert "**`matryoshka` at its nested sizes**" in section
    assert "trained with supcon summed over d = 8, 16, 32, 64" in section
    assert "| 8 | 0.500 | 0.500 | 0.500 | 0.100 | 0.100 | 0.100 |" in section
    assert "| 64 | 0.950 | 0.600 | 0.400 | 0.100 | 0.100 | 0.100 |" in section
    unnested = _doc(0.97, {**{k: 0.3 for k in nested}, "precision_at_1": 0.9, "map_at_r": 0.8})
    section = quality.render(results, empty, {}, {}, 1.0, unnested)
    assert "| `matryoshka`: k-NN acc. (perturbed) |" in section
    assert "| supcon, full size only: k-NN acc. (perturbed) |" in section
    assert (
        "| 8 | 0.500 | 0.500 | 0.500 | 0.300 | 0.300 | 0.300 | 0.100 | 0.100 | 0.100 |" in section
    )
    assert (
        "| 64 | 0.950 | 0.600 | 0.400 | 0.970 | 0.900 | 0.800 | 0.100 | 0.100 | 0.100 |" in section
    )
    assert "ssl: 40 epochs, batch 64; paired: 20 epochs, batch 128" in section
    # the task's budget and a loss's settings reach its run; flags win
    assert quality.run_overrides("dino", "ssl", {"seed": 1}) == {
        "epochs": 40,
        "batch_size": 64,
        "lr": 0.005,
        "seed": 1,
    }
    assert quality.run_overrides("clip", "paired", {"epochs": 2}) == {"epochs": 2}


def test_combinations_run_beside_their_parts_and_koleo_is_explained(quality):
    label = "combined: simclr + 0.1 koleo"
    assert quality.combinations(["simclr", "koleo", "clip"]) == [("ssl", label)]
    assert quality.combinations(["simclr", "clip"]) == []
    cfg = quality.COMBINATIONS[label][1]
    assert cfg["weights"] == {"koleo": 0.1}
    assert {sub["name"] for sub in cfg["losses"].values()} == {"simclr", "koleo"}
    results = {
        "ssl": {"koleo": _doc(0.05), label: _doc(0.9)},
        "paired": {},
        "supervised": {},
    }
    empty = {"ssl": {}, "paired": {}, "supervised": {}}
    section = quality.render(results, empty, {}, {}, 1.0)
    assert f"| `{label}` | 0.900 |" in section
    assert (
        f"- `{label}`: `combined` loss 1·simclr + 0.1·koleo, each part with its defaults" in section
    )
    assert (
        "- `koleo` (ssl) does not beat the random encoder on k-NN acc. (perturbed) (0.050 vs "
        "0.100). KoLeo only spreads the embeddings" in section
    )
    assert f"see the `{label}` row." in section
