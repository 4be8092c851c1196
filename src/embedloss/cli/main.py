"""``embedloss`` / ``python -m embedloss``: list, describe, train and benchmark losses.

Every user mistake — a bad option, config or data file — ends the command with exit code 2 and
one line ``embedloss: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

import embedloss
from embedloss.cli.config import DEFAULT_CONFIG, TASKS, CLIError
from embedloss.cli.info import format_info
from embedloss.registry import CATEGORIES, list_losses, loss_info

__all__ = ["build_parser", "format_info", "format_losses", "main"]

BENCH_MODULE = "embedloss.cli.bench"


def _rows(category: str | None) -> list[dict[str, str]]:
    rows = []
    for name in list_losses(category=category):
        info = loss_info(name)
        rows.append(
            {
                "name": name,
                "category": info.category,
                "class": info.cls.__name__,
                "aliases": ", ".join(info.aliases),
                "summary": info.summary,
            }
        )
    return rows


def format_losses(fmt: str, category: str | None = None) -> str:
    """The registered losses as a ``table``, ``markdown`` or ``json`` string."""
    rows = _rows(category)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cols = ["name", "category", "class", "aliases", "summary"]
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += [
            "| " + " | ".join(f"`{r[c]}`" if c == "name" and r[c] else r[c] for c in cols) + " |"
            for r in rows
        ]
        return "\n".join(lines)
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols[:-1]}
    head = "  ".join(c.ljust(widths[c]) for c in cols[:-1]) + "  summary"
    body = ["  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["summary"] for r in rows]
    return "\n".join([head, *body])


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"embedloss: error: {message} (see '{self.prog} --help')\n")


def _add_train(sub: Any) -> None:
    d = DEFAULT_CONFIG
    p = sub.add_parser(
        "train",
        help="train an embedding model with a loss and evaluate it",
        description=(
            "Train a small MLP embedding model with any registered loss on the embedded digits\n"
            "dataset (or your .npz), then evaluate it against a random encoder and raw pixels.\n"
            "Flags override --config, which overrides the defaults."
        ),
        epilog=(
            "examples:\n"
            "  embedloss train                                  # simclr on digits, ~10 s\n"
            "  embedloss train --loss clip --output runs/clip   # paired task, writes outputs\n"
            "  embedloss train --config runs/clip/config.yaml   # repeat that run exactly\n"
            "  torchrun --nproc_per_node 2 -m embedloss train   # DDP (gloo on CPU)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--loss", metavar="NAME", help="registered loss name or alias (default simclr)")
    p.add_argument("--config", metavar="FILE.yaml", help="a config file, e.g. a run's config.yaml")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=("digits",), help="embedded dataset (default digits)")
    src.add_argument("--data", metavar="FILE.npz", help="your data: x [and y], or x_a and x_b")
    p.add_argument("--task", choices=("auto", *TASKS), help="default: from the loss's family")
    p.add_argument("--epochs", type=int, metavar="N", help=f"default {d['epochs']}")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        dest="batch_size",
        help=f"global batch, split over processes (default {d['batch_size']})",
    )
    p.add_argument(
        "--lr", type=float, metavar="LR", help=f"AdamW learning rate (default {d['lr']})"
    )
    p.add_argument(
        "--seed", type=int, metavar="S", help=f"default {d['seed']}; same seed, same numbers"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write metrics.json, loss_curve.png, config.yaml and model.pt there",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser(bench: ModuleType | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``bench`` (the bench module) adds the bench command's options."""
    parser = _Parser(prog="embedloss", description=(embedloss.__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embedloss {embedloss.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the registered losses")
    p_list.add_argument("--category", choices=CATEGORIES)
    p_list.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p_info = sub.add_parser("info", help="describe one loss")
    p_info.add_argument("name")
    p_info.add_argument("--full", action="store_true", help="also print the whole docstring")
    _add_train(sub)
    p_bench = sub.add_parser("bench", help="speed and memory benchmark", add_help=bench is not None)
    if bench is not None:
        bench.add_arguments(p_bench)
    else:  # its options are only known once the module is imported (``embedloss bench ...``)
        p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _load_bench() -> ModuleType:
    try:
        return importlib.import_module(BENCH_MODULE)
    except ModuleNotFoundError as err:
        if err.name in (BENCH_MODULE, None):
            raise CLIError(
                f"the bench command is not available in this installation ({BENCH_MODULE} is missing)"
            ) from None
        raise CLIError(f"the bench command needs the missing module {err.name!r}") from None


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _train(args: argparse.Namespace) -> int:
    from embedloss.cli.config import load_config_file, resolve_config
    from embedloss.cli.train import run_training

    file_cfg = load_config_file(args.config) if args.config is not None else None
    overrides = {
        k: getattr(args, k)
        for k in ("loss", "task", "dataset", "data", "epochs", "batch_size", "lr", "seed", "device")
    }
    cfg = resolve_config(file_cfg, overrides)
    run_training(cfg, output=args.output, progress=not args.quiet)
    return 0


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bench = _load_bench() if _command(argv) == "bench" else None
        args = build_parser(bench).parse_args(argv)
        if args.command == "list":
            print(format_losses(args.format, args.category))
        elif args.command == "info":
            print(format_info(args.name, full=args.full))
        elif args.command == "train":
            return _train(args)
        else:
            assert bench is not None
            return int(bench.run(args))
    except (CLIError, ValueError, TypeError) as err:
        if _is_main_rank():
            message = " ".join(str(err).split())
            print(f"embedloss: error: {message}", file=sys.stderr)
        return 2
    return 0
