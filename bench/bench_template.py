"""Overhead of the loss template at the batch sizes most users train at.

The CLIP and SimCLR modules against hand-written dense losses (a few lines of
``F.normalize``/``F.cross_entropy``), forward + backward, same process, interleaved rounds,
median per-step time; the ratio module / hand-written is what the template costs. Run::

    python bench/bench_template.py            # N = 256 and 1024, D = 512
    python bench/bench_template.py --n 256 --rounds 31
    python bench/bench_template.py --threads 1 --clock cpu   # on a busy machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import embedloss


def hand_clip(a: torch.Tensor, b: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def hand_simclr(a: torch.Tensor, b: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def step_time(fn: Callable, a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    start = clock()
    for _ in range(reps):
        fn(a, b).backward()
    return (clock() - start) / reps


def measure(n: int, d: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    pairs = {
        "clip": (embedloss.CLIPLoss(), hand_clip),
        "simclr": (embedloss.SimCLRLoss(), hand_simclr),
    }
    reps = max(2, 2048 // n)
    ratios = {}
    for name, (module, hand) in pairs.items():
        torch.testing.assert_close(module(a, b), hand(a, b), rtol=1e-5, atol=1e-5)
        for fn in (module, hand):
            step_time(fn, a, b, reps)  # warm-up
        times: dict[str, list[float]] = {"module": [], "hand": []}
        for _ in range(rounds):  # interleaved: load changes hit both alike
            times["module"].append(step_time(module, a, b, reps))
            times["hand"].append(step_time(hand, a, b, reps))
        mod, ref = statistics.median(times["module"]), statistics.median(times["hand"])
        ratios[name] = mod / ref
        print(
            f"N={n:5d} D={d} {name:7s} module {mod * 1e3:8.3f} ms  hand-written "
            f"{ref * 1e3:8.3f} ms  ratio {mod / ref:.3f}"
        )
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time (with --threads 1, other jobs on the machine do not count)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    for n in args.n:
        measure(n, args.d, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
