"""``embedloss`` / ``python -m embedloss``: list and describe the registered losses."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import embedloss
from embedloss.registry import CATEGORIES, list_losses, loss_info


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


def format_info(name: str) -> str:
    """A human-readable description of one loss: class, category, aliases, signature, docstring."""
    info = loss_info(name)
    lines = [
        f"{info.name}  ({info.cls.__module__}.{info.cls.__name__})",
        f"category: {info.category}",
        f"aliases:  {', '.join(info.aliases) or '-'}",
        f"signature: {info.cls.__name__}{info.signature}",
        "",
        info.doc,
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``embedloss`` command."""
    parser = argparse.ArgumentParser(
        prog="embedloss", description=embedloss.__doc__.splitlines()[0]
    )
    parser.add_argument("--version", action="version", version=f"embedloss {embedloss.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered losses")
    p_list.add_argument("--category", choices=CATEGORIES)
    p_list.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p_info = sub.add_parser("info", help="describe one loss")
    p_info.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            print(format_losses(args.format, args.category))
        elif args.command == "info":
            print(format_info(args.name))
    except (ValueError, TypeError) as err:
        print(f"embedloss: error: {err}", file=sys.stderr)
        return 2
    return 0
