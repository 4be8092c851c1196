"""The metric-learning memory benchmark's pieces, on tiny inputs (the real run is in bench/)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_metric_learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_metric_learning", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("impl", ["embedloss", "pml"])
def test_worker_runs_every_case(bench, impl):
    for case in bench.CASES:
        result = bench.worker(case, impl, 32, 8)
        assert result["peak_bytes"] >= 0 and result["seconds"] > 0 and result["loss"] >= 0


def test_section_checks_the_limit_and_replaces_itself(bench, tmp_path):
    args = argparse.Namespace(n=16384, d=512, pml_cap_gib=4.0)
    mib = 2**20
    results = {
        "triplet batch_all": {
            "embedloss": {"peak_bytes": 400 * mib, "seconds": 10.0},
            "pml": {"n": 1024, "peak_bytes": 1200 * mib, "seconds": 3.0},
            "embedloss_at_pml_n": {"peak_bytes": 30 * mib, "seconds": 0.5},
            "pml_stopped": "N=2048 not run",
        },
        "circle": {"embedloss": {"peak_bytes": 2 * 2**30, "seconds": 1.0}, "pml": None},
    }
    section = bench.format_section(results, args)
    assert "| triplet batch_all | 400 | 10.0 |" in section and "0.025×" in section
    assert "- PASS: triplet batch_all" in section and "- FAIL: circle" in section
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Other\n\ntext\n", encoding="utf-8")
    bench.write_docs(section, results, tmp_path)
    bench.write_docs(section, results, tmp_path)  # replaced, not appended twice
    text = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert text.count(bench.SECTION) == 1 and text.startswith("# Benchmarks\n\n## Other")
    assert (tmp_path / "benchmarks_metric_learning.json").exists()
