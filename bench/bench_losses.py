"""Speed and memory of embedloss's tiled losses (CLIP, SimCLR, SigLIP) against baselines.

The baselines are the GEMM floor, a plain implementation and peers. ``python bench/bench_losses.py --required`` runs the scale and
huge-batch issues' cases and checks their targets; it prints the table and leaves the tracked docs
alone unless ``--write`` is given (then ``docs/benchmarks.md`` section "Speed and memory",
``docs/benchmarks.json`` and ``docs/benchmarks.png`` are rewritten). Without ``--required`` it runs
quick cases (or ``--case LOSS:N:D``).
All options: ``--help`` (the same as ``embedloss bench``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's embedloss, not an installed one

from embedloss.cli import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_losses.py", description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args()
    if args.peers_dir is None:
        args.peers_dir = str(HERE)
    if args.docs == Path("docs"):
        args.docs = ROOT / "docs"
    return bench.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
