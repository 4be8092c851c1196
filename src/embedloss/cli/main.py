"""``embedloss`` / ``python -m embedloss``: list, describe, train, use and benchmark losses.

Every user mistake — a bad option, config, data file or run directory, a missing optional
dependency — ends the command with exit code 2 and one line ``embedloss: error: ...`` on stderr,
before any work starts where it can be known then. Output cut short by its reader
(``embedloss list | head``) ends quietly with the status of a broken pipe (141).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from embedloss.cli.config import CLIError
from embedloss.cli.info import format_info
from embedloss.cli.parser import build_parser
from embedloss.registry import list_losses, loss_info

__all__ = ["build_parser", "format_info", "format_losses", "main", "require"]

BENCH_MODULE = "embedloss.cli.bench"
INSTALL = "pip install 'embedloss[cli]'"
#: Import name → distribution name of the optional dependencies of the commands.
PACKAGES = {
    "numpy": "numpy",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a Unix tool reports when its reader goes away


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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or spec-less module: importing it will tell
        return module in sys.modules and sys.modules[module] is not None


def require(command: str, needs: Mapping[str, str]) -> None:
    """Fail early, in one line, when optional modules a command needs are missing.

    Args:
        command: The command, for the message (``"train"``).
        needs: Import name → what it is needed for (``{"matplotlib": "curves.png"}``).

    Raises:
        CLIError: Naming every missing package and ``pip install 'embedloss[cli]'``.
    """
    missing = [f"{PACKAGES.get(m, m)} ({why})" for m, why in needs.items() if not _installed(m)]
    if missing:
        raise CLIError(
            f"embedloss {command} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}"
        )


def _note(text: str) -> None:
    if _is_main_rank():
        print(f"embedloss: note: {text}", file=sys.stderr)


def _train(args: Any) -> int:
    from embedloss.cli.checkpoint import load_checkpoint
    from embedloss.cli.config import load_config_file, parse_loss_options, resolve_config
    from embedloss.cli.tasks import build_loss, make_plan
    from embedloss.cli.train import check_resume, run_training

    require("train", {"numpy": "data and checkpoints", "yaml": "configs"})
    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "loss", "task", "dataset", "data", "epochs", "batch_size", "lr", "lr_schedule",
            "warmup_epochs", "weight_decay", "grad_clip", "precision", "seed", "device",
            "micro_batch_size", "norm",
        )
    }  # fmt: skip
    overrides["loss_options"] = parse_loss_options(args.loss_options or [])
    overrides["method_options"] = parse_loss_options(args.method_options or [], "--method-option")
    notes: list[str] = []
    output, ckpt = args.output, None
    if args.resume is not None:
        if args.config is not None:
            raise CLIError(
                "--resume continues a run with its own config; --config cannot be combined with "
                "it (give the flags to change instead)"
            )
        ckpt = load_checkpoint(args.resume)
        cfg = resolve_config(ckpt["config"], overrides, notes)
        output = args.resume if output is None else output
    else:
        file_cfg = load_config_file(args.config) if args.config is not None else None
        cfg = resolve_config(file_cfg, overrides, notes)
    # The loss and its options (did-you-mean included), and a resume, are checked before any work.
    plan = make_plan(cfg["loss"], cfg["task"])
    build_loss(plan, distributed=False)
    if ckpt is not None:
        check_resume(ckpt, plan, cfg, f"run {str(args.resume)!r}")
    for text in notes:
        _note(text)
    needs = {}
    if cfg["data"]["dataset"] == "digits":
        needs["sklearn"] = "the digits dataset"
    if output is not None:
        needs["matplotlib"] = "curves.png in --output"
    if not args.quiet:
        needs["tqdm"] = "the progress bar; -q runs without"
    require("train", needs)
    try:
        run_training(
            cfg,
            output=output,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        if _is_main_rank():
            where = (
                f"the checkpoint of the last finished epoch is in {output}: continue with "
                f"'embedloss train --resume {output}'"
                if output is not None
                else "nothing was saved (no --output)"
            )
            print(f"embedloss: interrupted; {where}", file=sys.stderr)
        return 130
    return 0


def _embed(args: Any) -> int:
    from embedloss.cli.use import embed_file

    require("embed", {"numpy": "data files"})
    embed_file(
        args.run, args.data, args.out, modality=args.modality, key=args.key, device=args.device
    )
    return 0


def _eval(args: Any) -> int:
    from embedloss.cli.use import evaluate_run, format_evaluation

    require("eval", {"numpy": "data files"})
    if args.data is None:
        from embedloss.cli.checkpoint import load_checkpoint

        if load_checkpoint(args.run)["config"]["data"]["dataset"] == "digits":
            require("eval", {"sklearn": "the digits dataset"})
    doc = evaluate_run(args.run, args.data, device=args.device)
    print(json.dumps(doc, indent=2) if args.json else format_evaluation(doc))
    return 0


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _dispatch(argv: list[str]) -> int:
    bench = _load_bench() if _command(argv) == "bench" else None
    args = build_parser(bench).parse_args(argv)
    if args.command == "list":
        print(format_losses(args.format, args.category))
    elif args.command == "info":
        print(format_info(args.name, full=args.full))
    elif args.command in ("train", "embed", "eval"):
        return {"train": _train, "embed": _embed, "eval": _eval}[args.command](args)
    else:
        assert bench is not None
        return int(bench.run(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader stopped (``| head``): silence the interpreter's final flush too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
    except (ValueError, TypeError) as err:  # CLIError is a ValueError
        if _is_main_rank():
            message = " ".join(str(err).split())
            print(f"embedloss: error: {message}", file=sys.stderr)
        return 2
    return code
