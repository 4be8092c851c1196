"""One registry for every loss: register at the definition site, create by name or config.

Example:
    >>> import embedloss
    >>> loss = embedloss.create_loss("nt_xent", temperature=0.2)
    >>> type(loss).__name__, embedloss.loss_info("simclr").category
    ('SimCLRLoss', 'contrastive')
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "LossInfo",
    "LossRegistry",
    "create_loss",
    "create_loss_from_config",
    "list_losses",
    "loss_info",
    "register_loss",
]

CATEGORIES = (
    "contrastive",
    "multimodal",
    "self_supervised",
    "self_distillation",
    "supervised",
    "metric_learning",
    "text",
    "composite",
)
T = TypeVar("T", bound=type[nn.Module])


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows about a loss."""

    name: str
    cls: type[nn.Module]
    category: str
    aliases: tuple[str, ...]
    summary: str

    @property
    def signature(self) -> inspect.Signature:
        """The constructor's signature (every option a user can set)."""
        return inspect.signature(self.cls)

    @property
    def doc(self) -> str:
        """The class docstring, dedented."""
        return inspect.getdoc(self.cls) or ""


_LOSSES: dict[str, LossInfo] = {}
_ALIASES: dict[str, str] = {}
#: The options an alias stands for (defaults a call may override).
_ALIAS_OPTIONS: dict[str, dict[str, Any]] = {}


def _category_of(cls: type) -> str:
    parts = cls.__module__.split(".")
    if len(parts) >= 2 and parts[0] == "embedloss" and parts[1] in CATEGORIES:
        return parts[1]
    return "custom"


def _check_explicit_constructor(cls: type) -> None:
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise TypeError(
                f"{cls.__name__}.__init__ takes {p}; registered losses must have explicit, named "
                "constructor arguments (no *args/**kwargs pass-through)"
            )


def register_loss(
    name: str,
    *,
    aliases: Iterable[str] | Mapping[str, Mapping[str, Any]] = (),
    category: str | None = None,
) -> Callable[[T], T]:
    """Class decorator registering a loss under ``name`` and ``aliases``.

    ``aliases`` may map an alias to the options it stands for: with
    ``{"sub_center_arcface": {"sub_centers": 3}}``, ``create_loss("sub_center_arcface")`` builds
    the loss with ``sub_centers=3`` unless the call gives another value.

    The category is the package folder the class lives in (``embedloss.contrastive`` →
    ``"contrastive"``), ``category`` for a loss defined elsewhere, or ``"custom"``.

    Registering a class again under its own names — the same module and qualified name, as when
    a notebook cell is run twice — replaces the earlier definition.

    Raises:
        ValueError: If ``name`` or an alias is already taken by a different class.
        TypeError: If the constructor takes ``*args`` or ``**kwargs``.
    """
    alias_tuple = tuple(aliases)
    alias_options = dict(aliases) if isinstance(aliases, Mapping) else {}

    def decorator(cls: T) -> T:
        taken = [n for n in (name, *alias_tuple) if n in _LOSSES or n in _ALIASES]
        if taken and not _is_redefinition(cls, name, alias_tuple):
            owner = _LOSSES[_resolve(taken[0])].cls
            raise ValueError(
                f"loss name {taken[0]!r} is already registered (to {_resolve(taken[0])!r}, "
                f"class {owner.__module__}.{owner.__qualname__}); choose another name"
            )
        _check_explicit_constructor(cls)
        doc = inspect.getdoc(cls) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else cls.__name__
        cat = category if category is not None else _category_of(cls)
        _LOSSES[name] = LossInfo(name, cls, cat, alias_tuple, summary)
        for alias in alias_tuple:
            _ALIASES[alias] = name
            _ALIAS_OPTIONS[alias] = dict(alias_options.get(alias, {}))
        return cls

    return decorator


def _is_redefinition(cls: type, name: str, aliases: tuple[str, ...]) -> bool:
    """Whether ``name`` (and its aliases) belong to an earlier definition of the same class."""
    old = _LOSSES.get(name)
    same = old is not None and (old.cls.__module__, old.cls.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    return same and all(_ALIASES.get(a, name) == name for a in aliases)


def _resolve(name: str) -> str:
    return _ALIASES.get(name, name)


def _lookup(name: Any) -> LossInfo:
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a str, got {type(name).__name__} {name!r}")
    key = _resolve(name)
    if key not in _LOSSES:
        raise ValueError(
            f"unknown loss {name!r}{_suggestion(name)} Registered losses: {', '.join(sorted(_LOSSES))}"
        )
    return _LOSSES[key]


def _suggestion(name: str) -> str:
    """``"; did you mean 'x'?"`` naming the registered names closest to ``name``, or ``"."``.

    Case is ignored: a name that differs from a registered one only in case suggests it alone.
    """
    by_folded = {k.casefold(): k for k in sorted([*_LOSSES, *_ALIASES])}
    folded = name.casefold()
    close = [folded] if folded in by_folded else []
    close = close or difflib.get_close_matches(folded, list(by_folded), n=3, cutoff=0.5)
    hint = " or ".join(repr(by_folded[c]) for c in close)
    return f"; did you mean {hint}?" if close else "."


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered as ``name`` (or an alias) with keyword arguments.

    An alias registered with options (:func:`register_loss`) adds them where ``kwargs`` does
    not set them.

    Raises:
        ValueError: For an unknown name (with close matches).
        TypeError: For an unknown keyword (naming the valid ones and close matches).
    """
    info = _lookup(name)
    params = info.signature.parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        valid = sorted(params)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1, cutoff=0.6)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{info.cls.__name__} ({info.name!r}) got unknown argument(s) {', '.join(hints)}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return info.cls(**{**_ALIAS_OPTIONS.get(name, {}), **kwargs})


def create_loss_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Build a loss from ``{"name": ..., **kwargs}`` (e.g. a parsed YAML mapping).

    Example:
        >>> create_loss_from_config({"name": "clip", "temperature": 0.05}).temperature
        0.05...
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping with a 'name' key, got {type(config).__name__}")
    if "name" not in config:
        raise ValueError(
            f"config must have a 'name' key naming the loss, got keys {sorted(config)}"
        )
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return create_loss(config["name"], **kwargs)


def list_losses(pattern: str | None = None, category: str | None = None) -> list[str]:
    """Sorted registry names, optionally filtered by a glob ``pattern`` and a ``category``.

    Raises:
        ValueError: For an unknown category.
    """
    if category is not None and category not in {*CATEGORIES, "custom"}:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    names = sorted(_LOSSES)
    if category is not None:
        names = [n for n in names if _LOSSES[n].category == category]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def loss_info(name: str) -> LossInfo:
    """:class:`LossInfo` (class, category, aliases, signature, summary) of a registered loss."""
    return _lookup(name)


class LossRegistry:
    """Class-level spellings of the registry functions (the names of the original plan).

    Example:
        >>> LossRegistry.create("simclr").temperature
        0.5...
    """

    register = staticmethod(register_loss)
    create = staticmethod(create_loss)
    create_from_config = staticmethod(create_loss_from_config)
    list = staticmethod(list_losses)
    info = staticmethod(loss_info)

    @staticmethod
    def get(name: str) -> type[nn.Module]:
        """The class registered as ``name``."""
        return _lookup(name).cls
