"""``embedloss bench``: the workers, the report, the docs section and one real subprocess run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from embedloss.cli import bench
from embedloss.cli.bench import Case, CaseResult
from tests.cli.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
PEERS = str(ROOT / "bench")


def test_plain_references_match_the_library():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    from embedloss import functional as EF

    clip = EF.clip_loss(a, b, temperature=0.07, chunk_size=None)
    torch.testing.assert_close(bench.plain_clip(a, b, 0.07), clip)
    simclr = EF.simclr_loss(a, b, temperature=0.5, chunk_size=None)
    torch.testing.assert_close(bench.plain_simclr(a, b, 0.5), simclr)


def test_peers_compute_the_same_losses(monkeypatch):
    monkeypatch.syspath_prepend(PEERS)
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    openclip = bench.make_loss("openclip_style", "clip")
    torch.testing.assert_close(openclip(a, b), bench.plain_clip(a, b, 0.07))
    pml = bench.make_loss("pml_ntxent", "simclr")
    torch.testing.assert_close(pml(a, b), bench.plain_simclr(a, b, 0.5))
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        bench.make_loss("nope", "clip")


def test_floor_step_full_and_tiled_do_the_same_gemms():
    case = Case("clip", 8, 3)
    bench.floor_step(case, "cpu", torch.float32)()
    bench.floor_step(Case("clip", 5000, 2), "cpu", torch.float32, tiles=1)()


def test_time_worker_interleaves_and_reports(monkeypatch):
    out = bench.time_worker(
        Case("simclr", 8, 4, repeats=2),
        ["embedloss", "embedloss_dense", "plain"],
        "cpu",
        torch.float32,
    )
    assert set(out["seconds"]) == {"floor", "embedloss", "embedloss_dense", "plain"}
    assert all(len(v) == 2 for v in out["all_seconds"].values())
    assert out["floor_mode"] == "full" and out["errors"] == {}


def test_time_worker_on_a_huge_case_samples_the_floor(monkeypatch):
    monkeypatch.setattr(bench, "MATERIALISE_LIMIT", 0)
    out = bench.time_worker(
        Case("clip", 4100, 2, repeats=1), ["embedloss", "plain"], "cpu", torch.float32
    )
    assert set(out["seconds"]) == {"floor"} and "extrapolated" in out["floor_mode"]
    assert "plain" in out["errors"]


def test_time_worker_guards_cubic_peers_and_missing_ones(monkeypatch):
    monkeypatch.syspath_prepend(PEERS)
    out = bench.time_worker(Case("simclr", 300, 4, repeats=1), ["pml_ntxent"], "cpu", torch.float32)
    assert "not run above 512 rows" in out["errors"]["pml_ntxent"]
    monkeypatch.setattr(
        bench, "_peer", lambda name, loss: (_ for _ in ()).throw(ImportError("x", name="peers"))
    )
    out = bench.time_worker(Case("clip", 8, 4, repeats=1), ["openclip_style"], "cpu", torch.float32)
    assert out["errors"]["openclip_style"] == "not installed (peers)"


def test_time_worker_reports_a_failing_implementation(monkeypatch):
    def boom(impl, case, a, b):
        def step():
            raise RuntimeError("out of memory\nmore")

        return step

    monkeypatch.setattr(bench, "loss_step", boom)
    out = bench.time_worker(Case("clip", 8, 4, repeats=1), ["plain"], "cpu", torch.float32)
    assert out["errors"]["plain"] == "failed: out of memory"


def test_memory_worker_and_worker_main():
    spec = {"kind": "memory", "impl": "embedloss", "loss": "clip", "n": 32, "d": 4, "threads": 1}
    out = bench.worker_main(spec)
    assert out["peak_bytes"] >= 0 and out["seconds"] > 0
    out = bench.worker_main({**spec, "kind": "time", "impls": ["plain"], "repeats": 1})
    assert set(out["seconds"]) == {"floor", "plain"}


def _result(loss, n, d, seconds, peaks, notes=None):
    return CaseResult(Case(loss, n, d), seconds, peaks, notes or {})


REQUIRED = [
    _result(
        "clip",
        8192,
        512,
        {"floor": 2.0, "embedloss": 3.0, "plain": 4.0, "openclip_style": 5.0},
        {"embedloss": 100, "plain": 1000, "openclip_style": 1200},
    ),
    _result("simclr", 4096, 512, {"floor": 2.0, "embedloss": 2.8, "plain": 3.0}, {"embedloss": 1}),
    _result(
        "clip",
        16384,
        512,
        {"floor": 8.0, "embedloss": 12.0, "plain": 16.0},
        {"embedloss": 9, "plain": 100},
    ),
    _result("clip", 131072, 128, {"floor": 100.0, "embedloss": 150.0}, {"embedloss": 3 * 2**30}),
]


def test_checks_compare_with_the_issue_targets():
    checks = bench.check_requirements(REQUIRED)
    assert [(c.ok, round(c.value, 3)) for c in checks] == [
        (True, 1.5),
        (True, 0.1),
        (False, 1.4),
        (True, 0.09),
        (True, 3.0),
    ]
    text = bench.format_checks(checks)
    assert "FAIL: simclr N=4096 D=512: fwd+bwd / GEMM floor = 1.4 (target ≤ 1.3)" in text
    missing = bench.check_requirements([_result("clip", 8192, 512, {"floor": 1.0}, {})])
    assert not missing[0].ok and "not measured" in bench.format_checks(missing)


def test_markdown_table_and_docs_section(tmp_path):
    results = [
        *REQUIRED,
        _result("simclr", 256, 512, {"floor": 0.1, "embedloss": 0.2}, {}, {"pml_ntxent": "boom"}),
    ]
    results[3].floor_mode = "tiled, 8x extrapolated from a sample"
    table = bench.format_markdown(results)
    assert "| clip N=8192 D=512 | embedloss | 3.000 | 1.50× | 0.75× | 0 | 0.10× |" in table
    assert "| clip N=131072 D=128 | GEMM floor (tiled sample) | 100.0 |" in table
    assert "| simclr N=256 D=512 | pml_ntxent | boom |" in table
    machine = bench.machine_info(2)
    assert machine["threads"] == 2 and machine["torch"] == torch.__version__
    section = bench.format_section(results, bench.check_requirements(results), machine, "cmd")
    assert section.startswith(bench.SECTION) and "Measured with `cmd`" in section
    assert "- simclr N=256 D=512: pml_ntxent: boom" in section

    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n## Quality\n\nq\n\n## Speed and memory\n\nold\n\n## Later\n\nz\n"
    )
    bench.write_section(doc, section)
    text = doc.read_text()
    assert "old" not in text and "## Quality\n\nq" in text and text.endswith("## Later\n\nz\n")
    bench.write_section(doc, section)  # idempotent
    assert doc.read_text() == text
    other = tmp_path / "new.md"
    bench.write_section(other, section)
    assert other.read_text().startswith("# Benchmarks\n\n## Speed and memory")
    last = tmp_path / "last.md"
    last.write_text("# B\n\n## Speed and memory\n\nold\n")
    bench.write_section(last, section)
    assert "old" not in last.read_text()


def test_plot_writes_a_png(tmp_path):
    bench.plot(REQUIRED, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_case():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--case", "clip:64:8", "--case", "simclr:32:4", "--repeats", "2"])
    assert [c.label for c in args.case] == ["clip N=64 D=8", "simclr N=32 D=4"]
    for bad in ("clip:64", "foo:8:8", "clip:x:8", "clip:1:8"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--case", bad])


def test_run_in_subprocesses_writes_json_docs_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # bench/peers.py is found from the repository root
    code = bench.main(
        [
            "--case",
            "clip:48:8",
            "--case",
            "simclr:16:8",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--peers",
            "--write",
            "--docs",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| clip N=48 D=8 | openclip_style |" in out and "| simclr N=16 D=8 | pml_ntxent |" in out
    payload = json.loads((tmp_path / "benchmarks.json").read_text())
    first = payload["results"][0]
    assert set(first["seconds"]) == {"floor", "embedloss", "plain", "openclip_style"}
    assert set(first["peak_bytes"]) == {"embedloss", "plain", "openclip_style"}
    assert math.isfinite(first["ratio_floor"])
    assert (tmp_path / "benchmarks.png").exists()
    assert "## Speed and memory" in (tmp_path / "benchmarks.md").read_text()


def test_spawn_reports_failures(tmp_path):
    bad = bench._spawn(
        {"kind": "memory", "impl": "nope", "loss": "clip", "n": 8, "d": 2}, None, 120
    )
    assert "unknown implementation" in bad["error"]
    slow = bench._spawn({"kind": "time", "impls": [], "loss": "clip", "n": 8, "d": 2}, None, 0.01)
    assert "timed out" in slow["error"]


def test_required_run_without_memory_reports_missing_targets(monkeypatch, capsys):
    calls = []

    def fake_spawn(spec, peers_dir, timeout):
        calls.append(spec["kind"])
        return {"error": "skipped in this test"}

    monkeypatch.setattr(bench, "_spawn", fake_spawn)
    args = argparse.Namespace(
        worker=None, case=None, required=True, repeats=None, peers_dir=None, peers=False,
        device="cpu", dtype="float32", threads=1, no_memory=False, timeout=1.0, json=None,
        write=False, docs=Path("docs"),
    )  # fmt: skip
    assert bench.run(args) == 1  # targets not met: nothing was measured
    assert calls == ["time"] * len(bench.REQUIRED_CASES)
    assert "FAIL" in capsys.readouterr().out


def test_embedloss_bench_command_help():
    proc = run_cli("bench", "--help")
    assert proc.returncode == 0 and "--required" in proc.stdout
