"""Peak memory of the row-tiled metric-learning losses, beside pytorch-metric-learning's.

``python bench/bench_metric_learning.py`` runs each pair loss (triplet batch-hard and batch-all,
contrastive margin, multi-similarity, circle) forward+backward at N=16384, D=512 (float32,
four samples per label) and pytorch-metric-learning's version of the same loss at doubling N
until the next size would pass ``--pml-cap-gib`` (its memory grows as N² or, for all
triplets, N³), then embedloss again at that largest N. Every run is a fresh subprocess; the
peak extra memory is the growth of its peak RSS over the value after the inputs were
allocated and a small warm-up call (as ``bench/bench_losses.py``). ``--write`` puts the table
into ``docs/benchmarks.md`` (section "Metric-learning losses: memory", the last) and the raw
numbers into ``docs/benchmarks_metric_learning.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's embedloss, not an installed one

import torch  # noqa: E402

from embedloss.cli.bench import machine_info  # noqa: E402

SECTION = "## Metric-learning losses: memory"
LIMIT_GIB = 1.0
#: name -> (embedloss registry config, a description of pytorch-metric-learning's equivalent)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "triplet batch_hard": (
        {"name": "triplet", "mining": "batch_hard"},
        "TripletMarginLoss + BatchHardMiner (cosine, MeanReducer)",
    ),
    "triplet batch_all": (
        {"name": "triplet", "mining": "batch_all"},
        "TripletMarginLoss, all triplets (cosine)",
    ),
    "contrastive_margin": (
        {"name": "contrastive_margin", "squared": False},
        "ContrastiveLoss (cosine, margins 1 − ours)",
    ),
    "multi_similarity": (
        {"name": "multi_similarity"},
        "MultiSimilarityLoss + MultiSimilarityMiner",
    ),
    "circle": ({"name": "circle"}, "CircleLoss(m=0.25, gamma=256)"),
}


# ----------------------------------------------------------------------------- worker side


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _pml_step(case: str) -> Any:
    from pytorch_metric_learning import distances, losses, miners, reducers

    cos = distances.CosineSimilarity()
    if case == "triplet batch_hard":
        loss = losses.TripletMarginLoss(margin=0.2, distance=cos, reducer=reducers.MeanReducer())
        miner = miners.BatchHardMiner(distance=cos)
        return lambda x, y: loss(x, y, miner(x, y))
    if case == "triplet batch_all":
        return losses.TripletMarginLoss(margin=0.2, distance=cos)
    if case == "contrastive_margin":
        return losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=cos)
    if case == "multi_similarity":
        ms, ms_miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
        return lambda x, y: ms(x, y, ms_miner(x, y))
    return losses.CircleLoss(m=0.25, gamma=256)


def _step(case: str, impl: str) -> Any:
    if impl == "pml":
        return _pml_step(case)
    from embedloss import create_loss_from_config

    return create_loss_from_config(CASES[case][0])


def worker(case: str, impl: str, n: int, d: int) -> dict[str, Any]:
    """One forward+backward: peak extra memory over the inputs, seconds, the loss."""
    torch.manual_seed(0)
    step = _step(case, impl)
    warm = torch.randn(64, d, requires_grad=True)
    step(warm, torch.arange(64) // 4).backward()  # lazy initialisation out of the measurement
    x = torch.randn(n, d, requires_grad=True)
    y = torch.arange(n) // 4
    base = _peak_rss()
    start = time.perf_counter()
    loss = step(x, y)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "peak_bytes": max(_peak_rss() - base, 0),
        "seconds": seconds,
        "loss": float(loss.detach()),
    }


# ----------------------------------------------------------------------------- parent side


def _spawn(case: str, impl: str, n: int, d: int, timeout: float) -> dict[str, Any]:
    spec = json.dumps({"case": case, "impl": impl, "n": n, "d": d})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """embedloss at N, pytorch-metric-learning at doubling N under the cap, embedloss there."""
    _log(f"[bench] {case}: embedloss N={args.n}")
    out: dict[str, Any] = {"embedloss": _spawn(case, "embedloss", args.n, args.d, args.timeout)}
    cap, n, prev, pml = args.pml_cap_gib * 2**30, args.pml_start, None, None
    while n <= args.n:
        _log(f"[bench] {case}: pytorch-metric-learning N={n}")
        result = _spawn(case, "pml", n, args.d, args.timeout)
        if "error" in result:
            out["pml_stopped"] = f"N={n}: {result['error']}"
            break
        pml = {"n": n, **result}
        growth = max(result["peak_bytes"] / prev, 4.0) if prev else 8.0
        prev = max(result["peak_bytes"], 1)
        if result["peak_bytes"] * growth > cap:
            out["pml_stopped"] = (
                f"N={2 * n} not run: about {result['peak_bytes'] * growth / 2**30:.1f} GiB "
                f"expected (cap {args.pml_cap_gib:g} GiB)"
            )
            break
        n *= 2
    out["pml"] = pml
    if pml is not None and pml["n"] != args.n:
        _log(f"[bench] {case}: embedloss N={pml['n']}")
        out["embedloss_at_pml_n"] = _spawn(case, "embedloss", pml["n"], args.d, args.timeout)
    return out


def _mib(result: dict[str, Any] | None) -> str:
    if not result or "peak_bytes" not in result:
        return "–"
    return f"{result['peak_bytes'] / 2**20:,.0f}"


def _secs(result: dict[str, Any] | None) -> str:
    return "–" if not result or "seconds" not in result else f"{result['seconds']:.1f}"


def format_section(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown section: the table, the 1 GiB check and how it was measured."""
    m = machine_info()
    lines = [
        SECTION,
        "",
        f"Measured with `python bench/bench_metric_learning.py` on {m['cpu']} "
        f"({m['logical_cores']} logical cores, {m['threads']} threads, {m['memory_gib']} GiB RAM), "
        f"torch {m['torch']}, float32, D={args.d}, four samples per label. Each run is one forward+backward in a fresh process; peak "
        "extra memory is the growth of the peak RSS over the allocated inputs. "
        "pytorch-metric-learning runs at doubling N until the next size would pass "
        f"{args.pml_cap_gib:g} GiB; embedloss is then measured again at that N. Each row comes "
        "from one run of its case. Times are single runs on a machine shared with other jobs: "
        "indicative only (memory is not affected).",
        "",
        "How: `embedloss/ops/pair_losses.py` scores anchors in row tiles of about 4 MiB against "
        "the full key width and, for mean and sum reductions, finishes the gradients while it "
        "has each tile (three GEMMs); batch-all and semi-hard mining sort each row once "
        "(O(M log M)) instead of building per-triplet tensors, so memory is O(N·chunk), never "
        "O(N²) or O(N³).",
        "",
        f"| loss | embedloss N={args.n} peak MiB | s | pytorch-metric-learning | largest N "
        "| peak MiB | s | embedloss at that N: MiB | s | memory × PML |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    checks = []
    for case, r in results.items():
        ours, pml = r["embedloss"], r.get("pml")
        same_n = r.get("embedloss_at_pml_n", ours if pml and pml["n"] == args.n else None)
        ratio = "–"
        if pml and same_n and "peak_bytes" in same_n and pml["peak_bytes"]:
            ratio = f"{same_n['peak_bytes'] / pml['peak_bytes']:.3f}×"
        lines.append(
            f"| {case} | {_mib(ours)} | {_secs(ours)} | {CASES[case][1]} | "
            f"{pml['n'] if pml else '–'} | {_mib(pml)} | {_secs(pml)} | {_mib(same_n)} | "
            f"{_secs(same_n)} | {ratio} |"
        )
        peak = ours.get("peak_bytes")
        status = "FAIL" if peak is None or peak > LIMIT_GIB * 2**30 else "PASS"
        shown = ours.get("error") if peak is None else f"{peak / 2**30:.3f} GiB"
        checks.append(f"- {status}: {case} at N={args.n}, D={args.d}: {shown} (limit 1 GiB)")
    lines += ["", "Target of the metric-learning issue (extra memory at N=16384, D=512):", ""]
    lines += checks
    notes = [f"- {case}: {r['pml_stopped']}" for case, r in results.items() if "pml_stopped" in r]
    if notes:
        lines += ["", "Where pytorch-metric-learning stopped:", "", *notes]
    return "\n".join(lines) + "\n"


def write_docs(section: str, results: dict[str, Any], docs: Path) -> None:
    """Replace (or append) the section at the end of ``benchmarks.md``; dump the JSON."""
    path = docs / "benchmarks.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        following = rest.find("\n## ")
        tail = "" if following < 0 else rest[following + 1 :]
        text = head.rstrip("\n") + "\n\n" + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")
    (docs / "benchmarks_metric_learning.json").write_text(
        json.dumps(results, indent=2) + "\n", encoding="utf-8"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="embedloss's batch (default 16384)")
    parser.add_argument("--d", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="only these")
    parser.add_argument("--pml-start", type=int, default=512, help="first PML batch size")
    parser.add_argument("--pml-cap-gib", type=float, default=4.0, help="PML memory cap")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="re-render the docs section from docs/benchmarks_metric_learning.json (no runs); "
        "with --case, run those cases and keep the others from the JSON",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["case"], spec["impl"], spec["n"], spec["d"])))
        return 0
    stored = args.docs / "benchmarks_metric_learning.json"
    results = json.loads(stored.read_text(encoding="utf-8")) if args.from_json else {}
    if not args.from_json or args.case:
        results.update({case: run_case(case, args) for case in (args.case or list(CASES))})
    section = format_section(results, args)
    print(section)
    if args.write:
        write_docs(section, results, args.docs)
    failed = any(
        r["embedloss"].get("peak_bytes", float("inf")) > LIMIT_GIB * 2**30 for r in results.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
