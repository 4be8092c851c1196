"""``embedloss info NAME``: what a loss computes, from its docstrings and its signatures.

The text is assembled from the registry (class, category, aliases), the constructor signature
with each argument's description from the ``Args:`` section, the ``forward`` signature (inputs),
the formula paragraph of the pure function the class docstring points to (``See :func:`x```),
the papers cited as "(Author et al. YEAR, Eq. N)", and the terms ``compute`` returns on the
loss's own example inputs.

Example:
    >>> text = format_info("simclr")
    >>> "paper:" in text and "terms:" in text and "accuracy" in text
    True
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from embedloss.registry import LossInfo, loss_info

__all__ = ["docstring_sections", "format_info"]

_SECTION = re.compile(
    r"^(Args|Arguments|Attributes|Shape|Returns|Raises|Example|Examples|Note|Notes|References|Terms):\s*(.*)$"
)
_FUNC_REF = re.compile(r":func:`~?([\w.]+)`")
_PAPER = re.compile(
    r"\([^()]*?((?:(?:[A-Z][\w'-]+|van|von|der|den|de|da|di|du|le|la) )*[A-Z][\w'-]+ "
    r"et al\.? \d{4}[^()]*)\)"
)
_TERMS = re.compile(r"Terms:\s*(.*?)(?:\.\s*$|\n\n)", re.S)


def docstring_sections(doc: str) -> tuple[str, dict[str, list[str]]]:
    """Split a Google-style docstring into its intro text and ``{section: lines}``."""
    intro: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.splitlines():
        match = _SECTION.match(line)
        if match and match.group(1) != "Terms":
            current = sections.setdefault(match.group(1), [])
            if match.group(2):
                current.append(match.group(2))
        elif current is None:
            intro.append(line)
        else:
            current.append(line)
    return "\n".join(intro).strip(), sections


def _arg_descriptions(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    group: list[str] = []
    for line in textwrap.dedent("\n".join(lines)).splitlines():
        if line.startswith("**"):  # "**options: as the base class": described there
            group = []
            continue
        match = re.match(r"^(\w+(?:, \w+)*)(?:\s*\(.*?\))?:\s*(.*)$", line)
        if match:
            group = match.group(1).split(", ")  # "a, b: As :func:`f`" describes both
            out.update(dict.fromkeys(group, match.group(2).strip()))
        elif line.strip():
            for name in group:
                out[name] += " " + line.strip()
    return out


def _annotation(p: inspect.Parameter) -> str:
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return ""
    return ": " + (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))


def _format_params(fn: Callable[..., Any], skip_self: bool) -> str:
    params = list(inspect.signature(fn).parameters.values())
    if skip_self and params and params[0].name == "self":
        params = params[1:]
    parts = []
    for p in params:
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        parts.append(f"{p.name}{_annotation(p)}{default}")
    return ", ".join(parts)


def _formula_function(info: LossInfo, intro: str) -> tuple[str, str] | None:
    module = sys.modules.get(info.cls.__module__)
    for ref in _FUNC_REF.findall(intro):
        fn = getattr(module, ref.rsplit(".", 1)[-1], None)
        if callable(fn) and inspect.getdoc(fn):
            return ref, inspect.getdoc(fn) or ""
    return None


def _live_terms(info: LossInfo) -> list[str] | None:
    """The terms ``compute`` returns on the loss's example inputs (``None`` if that fails)."""
    cls: Any = info.cls
    try:
        loss = cls(**cls.example_kwargs())
        args, kwargs = cls.example_inputs()
        return sorted(loss.compute(*args, **kwargs).terms)
    except Exception:  # a description must not fail because an example does
        return None


def _task_line(name: str) -> str:
    from embedloss.cli.config import CLIError
    from embedloss.cli.tasks import make_plan

    try:
        plan = make_plan({"name": name}, "auto")
    except CLIError:
        return f"needs --config with its sub-losses (embedloss train --loss {name} --config FILE)"
    extra = f"; {plan.note}" if plan.note else ""
    return f"{plan.task} ({plan.style} inputs{extra}): embedloss train --loss {name}"


def format_info(name: str, full: bool = False) -> str:
    """A description of one loss: summary, paper, inputs, terms, options and formula.

    Args:
        name: Registry name or alias.
        full: Append the class docstring verbatim.

    Raises:
        ValueError: For an unknown name (with close matches).
    """
    info = loss_info(name)
    doc = info.doc
    intro, sections = docstring_sections(doc)
    formula = _formula_function(info, intro)
    f_intro, f_sections = docstring_sections(formula[1]) if formula else ("", {})
    cited = list(dict.fromkeys(_PAPER.findall(intro) + _PAPER.findall(f_intro)))
    papers = [p for p in cited if not any(q != p and q.startswith(p) for q in cited)]
    terms = _live_terms(info)
    if terms is None:
        match = _TERMS.search(doc)
        terms = re.findall(r"``(\w+)``", match.group(1)) if match else []
    descriptions: dict[str, str] = {}
    for klass in reversed(info.cls.__mro__):  # a base class documents the options it gives
        own_doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        descriptions.update(_arg_descriptions(docstring_sections(own_doc)[1].get("Args", [])))
    # "alpha, t: As :func:`x_loss`." — the class defers to its function's Args.
    shared = _arg_descriptions(f_sections.get("Args", []))
    for key, text in descriptions.items():
        if text.lower().startswith("as :func:") and key in shared:
            descriptions[key] = shared[key]
    lines = [
        f"{info.name}: {info.summary}",
        "",
        f"class:     {info.cls.__module__}.{info.cls.__name__}",
        f"category:  {info.category}",
        f"aliases:   {', '.join(info.aliases) or '-'}",
        f"paper:     {'; '.join(papers) or '-'}",
        f"inputs:    forward({_format_params(info.cls.forward, skip_self=True)})",
        f"terms:     {', '.join(terms) or '-'}",
        f"train:     {_task_line(info.name)}",
        "",
        "options:",
    ]
    for p in info.signature.parameters.values():
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        desc = descriptions.get(p.name, "")
        lines.append(f"  {p.name}{default}" + (f"  —  {desc}" if desc else ""))
    shape = sections.get("Shape") or f_sections.get("Shape")
    if shape:
        lines += ["", "shapes:", textwrap.indent(textwrap.dedent("\n".join(shape)).strip(), "  ")]
    if formula:
        body = f_intro.split("\n", 1)[1].strip() if "\n" in f_intro else f_intro
        lines += ["", f"formula (from {formula[0]}):", textwrap.indent(body, "  ")]
    else:
        rest = intro.split("\n", 1)[1].strip() if "\n" in intro else ""
        if rest:
            lines += ["", "description:", textwrap.indent(rest, "  ")]
    if full:
        lines += ["", "docstring:", textwrap.indent(doc, "  ")]
    return "\n".join(lines)
