"""Keyword options that several functional losses share, written once (:func:`keyword_options`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["keyword_options"]

F = TypeVar("F", bound=Callable[..., Any])


def keyword_options(
    create: Callable[..., Any], keywords: type, **defaults: Any
) -> Callable[[F], F]:
    """Decorator: a functional loss takes the ``keywords`` options of ``create``, with ``defaults``.

    The function is written ``fn(inputs..., *, its_own=..., **options: Unpack[keywords])``, where
    ``keywords`` is a ``TypedDict`` naming parameters of ``create`` (the factory of the loss's
    options object), and passes ``options`` to ``create``. The decorator gives it the full,
    explicit signature (its own parameters, then the options with ``create``'s defaults or those
    given here, as ``inspect.signature`` and ``help`` show), fills in the defaults and refuses
    an unknown keyword with ``TypeError``, as Python does for an explicit signature. It serves
    constructors too: ``__init__(self, **options: Unpack[keywords])`` gets the explicit
    signature that ``BaseLoss`` merges into its subclasses' constructors.

    Raises:
        TypeError: If a default names no option of ``keywords``.

    Example:
        >>> from typing import TypedDict
        >>> def create(scale=1.0, shift=0.0):
        ...     return scale, shift
        >>> class Scale(TypedDict, total=False):
        ...     scale: float
        >>> @keyword_options(create, Scale, scale=2.0)
        ... def times(x, **options):
        ...     return x * create(**options)[0]
        >>> str(inspect.signature(times)), times(3.0), times(3.0, scale=1.0)
        ('(x, *, scale=2.0)', 6.0, 3.0)
    """
    names = list(keywords.__annotations__)
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise TypeError(f"keyword_options: no option(s) {unknown} in {keywords.__name__}")
    params = inspect.signature(create).parameters
    extra = [
        params[n].replace(
            kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(n, params[n].default)
        )
        for n in names
    ]

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        full = signature.replace(parameters=[*own, *extra])

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = full.bind(*args, **kwargs)
            except TypeError as error:  # named as Python names a call's errors
                raise TypeError(f"{fn.__qualname__}() {error}") from None
            bound.apply_defaults()
            return fn(*bound.args, **bound.kwargs)

        wrapper.__signature__ = full  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
