"""Small helpers shared by the self-supervised losses."""

from __future__ import annotations

from typing import Any

from embedloss._validation import describe

__all__ = ["check_bool"]


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` after checking it is a ``bool`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value
