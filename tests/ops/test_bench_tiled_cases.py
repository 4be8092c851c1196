"""The benchmark's SigLIP case and the huge-batch targets (``embedloss.cli.bench``).

Kept next to the tiled kernels they measure; the suite's own tests are in tests/cli.
"""

from __future__ import annotations

import torch

from embedloss import functional as EF
from embedloss.cli import bench
from embedloss.cli.bench import Case, CaseResult


def test_plain_siglip_is_the_library_loss():
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    for chunk in (None, 4):
        expected = EF.siglip_loss(a, b, temperature=0.1, bias=bench.SIGLIP_BIAS, chunk_size=chunk)
        torch.testing.assert_close(bench.plain_siglip(a, b, 0.1), expected)


def test_siglip_implementations_and_required_case():
    assert ("siglip", 8192, 512) in {(c.loss, c.n, c.d) for c in bench.REQUIRED_CASES}
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    tiled = bench.make_loss("embedloss", "siglip")
    dense = bench.make_loss("embedloss_dense", "siglip")
    assert tiled.chunk_size == "auto" and dense.chunk_size is None
    torch.testing.assert_close(tiled(a, b), dense(a, b))
    out = bench.time_worker(
        Case("siglip", 16, 4, repeats=1), ["embedloss", "plain"], "cpu", torch.float32
    )
    assert set(out["seconds"]) == {"floor", "embedloss", "plain"}


def test_huge_batch_targets():
    results = [
        CaseResult(Case("clip", 8192, 512), {"floor": 1.0, "embedloss": 1.39}, {}),
        CaseResult(Case("clip", 16384, 512), {"floor": 1.0, "embedloss": 1.45}, {}),
        CaseResult(Case("simclr", 4096, 512), {"floor": 1.0, "embedloss": 1.1}, {}),
        CaseResult(
            Case("siglip", 8192, 512),
            {"floor": 2.0, "embedloss": 2.4},
            {"embedloss": 10, "plain": 100},
        ),
    ]
    checks = bench.check_huge_batches(results)
    assert [(c.ok, round(c.value, 3), c.limit) for c in checks] == [
        (True, 1.39, 1.4),
        (False, 1.45, 1.4),
        (True, 1.1, 1.15),
        (False, 1.2, 1.15),
        (True, 0.1, 0.2),
    ]
    assert (
        bench.check_huge_batches(results[:1])[0].text == "clip N=8192 D=512: fwd+bwd / GEMM floor"
    )
    section = bench.format_section(results, [], bench.machine_info(1), "cmd")
    assert "Targets of the huge-batch issue:" in section
    assert "- FAIL: siglip N=8192 D=512: fwd+bwd / GEMM floor = 1.2 (target ≤ 1.15)" in section


def test_cpu_clock_times_this_process_only():
    import time

    def sleeper():
        time.sleep(0.2)  # no CPU used: the CPU clock sees (almost) nothing

    assert bench._timed(sleeper, "cpu", "cpu") < 0.05 <= 0.15 < bench._timed(sleeper, "cpu")
    out = bench.worker_main(
        {"kind": "time", "impls": ["embedloss"], "loss": "siglip", "n": 16, "d": 4,
         "repeats": 1, "threads": 1, "clock": "cpu"}
    )  # fmt: skip
    assert set(out["seconds"]) == {"floor", "embedloss"}
    machine = {**bench.machine_info(1), "clock": "cpu"}
    assert "CPU time" in bench.format_section([], [], machine, "cmd")


def test_report_names_the_measuring_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_suite", lambda cases, **kw: [])
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    flags = ["--case", "siglip:8:4", "--threads", "1", "--clock", "cpu"]
    args = parser.parse_args([*flags, "--write", "--docs", str(tmp_path)])
    bench.run(args)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "Measured with `python bench/bench_losses.py --threads 1 --clock cpu`" in text
    again = tmp_path / "again"
    args = parser.parse_args(
        ["--from-json", str(tmp_path / "benchmarks.json"), "--write", "--docs", str(again)]
    )
    bench.run(args)
    assert (again / "benchmarks.md").read_text() == text
    # a re-rendered --required run still says --required (the flags travel in the JSON)
    required = parser.parse_args(["--required", "--threads", "1", "--write", "--docs", str(again)])
    bench.run(required)
    assert (
        "`python bench/bench_losses.py --required --threads 1`"
        in (again / "benchmarks.md").read_text()
    )
