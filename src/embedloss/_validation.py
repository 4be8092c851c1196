"""Boundary checks shared by every loss: one wording for one mistake.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) naming the argument, what was expected and what came, so a user can fix the call
without reading the library's source.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
_EMPTY_BATCH_OK = contextvars.ContextVar("empty_batch_ok", default=False)


@contextmanager
def allow_empty_batch() -> Iterator[None]:
    """Within this block an input may have no rows: a rank of a distributed batch may be empty.

    Such a rank still joins every collective and contributes no anchors; the loss of the whole
    batch is computed by the ranks that have some.
    """
    token = _EMPTY_BATCH_OK.set(True)
    try:
        yield
    finally:
        _EMPTY_BATCH_OK.reset(token)


def describe(value: Any) -> str:
    """Short description of ``value`` for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def check_tensor(x: Any, name: str) -> Tensor:
    """Raise ``TypeError`` unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(x)}")
    return x


def check_embeddings(
    x: Any,
    name: str,
    *,
    ndim: int | tuple[int, ...] = 2,
    shape: str | None = None,
    masked: bool = False,
    finite: bool = True,
) -> Tensor:
    """Validate a floating-point embedding tensor with at least one row.

    Args:
        x: The candidate tensor.
        name: The argument name used in error messages.
        ndim: The allowed number of dimensions (an int or a tuple of ints).
        shape: How to spell the expected shape in errors (default from ``ndim``).
        masked: Allow ``-inf`` entries (masked logits); NaN and ``+inf`` are errors anyway.
        finite: Check the values (:func:`check_finite`); False when the caller checks only
            the entries it uses.

    Returns:
        ``x`` unchanged.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` has the wrong rank, is empty, or has a zero-sized feature dim.
    """
    check_tensor(x, name)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in allowed:
        default = " or ".join(
            {2: "(N, D)", 3: "(N, V, D)", 1: "(N,)"}.get(d, f"{d}-d") for d in allowed
        )
        shapes = shape or default
        raise ValueError(f"{name} must have shape {shapes}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 and not _EMPTY_BATCH_OK.get():
        raise ValueError(
            f"{name} must contain at least one sample, got an empty batch {tuple(x.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty feature dimension, got {tuple(x.shape)}")
    return check_finite(x, name, masked=masked) if finite else x


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_same_dim(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless the last (feature) dimensions agree."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same embedding dimension D, "
            f"got {a.shape[-1]} and {b.shape[-1]}"
        )


def check_labels(labels: Any, n: int, name: str = "labels") -> Tensor:
    """Validate integer or bool labels of shape ``(n,)``."""
    check_tensor(labels, name)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) to match the batch, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor, got dtype {labels.dtype}")
    if labels.dtype in (torch.uint16, torch.uint32, torch.uint64):  # too few kernels in torch
        raise TypeError(
            f"{name} must be an integer or bool tensor of a dtype torch can sort and compare "
            f"(bool, uint8, int8 to int64), got dtype {labels.dtype}; convert it with .long()"
        )
    return labels


#: The largest magnitude of float32, the dtype losses compute in for float32 and half inputs.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _fits_float32(v: float, value: Any, name: str) -> float:
    """``v`` after checking that float32 holds it (an option meets float32 tensors)."""
    if abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"{name} must fit float32, the dtype losses compute in (magnitude at most "
            f"{FLOAT32_MAX:.4g}), got {value!r}"
        )
    return v


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float after checking it is finite, > 0 (or >= 0) and fits float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    v = float(value)
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return _fits_float32(v, value, name)


def check_optional_positive(value: Any, name: str) -> float | None:
    """``None``, or ``value`` checked finite and > 0 (as a float)."""
    return None if value is None else check_positive_float(value, name)


def check_float(
    value: Any, name: str, *, low: float | None = None, high: float | None = None
) -> float:
    """Return ``value`` as a finite float in ``[low, high]`` that fits float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return _fits_float32(v, value, name)


def check_int(value: Any, name: str, *, low: int | None = None) -> int:
    """Return ``value`` after checking it is an int (not a bool) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` after checking it is a ``bool`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_chunk_size(chunk_size: Any) -> Any:
    """Validate a core tiling option: ``None`` (dense), ``"auto"`` or an int >= 1."""
    if chunk_size is None or chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size must be None, 'auto' or an int >= 1 (rows per tile), "
            f"got {describe(chunk_size)}"
        )
    return check_int(chunk_size, "chunk_size", low=1)


class NonFiniteError(ValueError):
    """An input (or a learned scalar) holds NaN or infinite values: usually a diverged step."""


#: Where value checks run: "cpu" (default), "always" or "never" (see :func:`set_value_checks`).
VALUE_CHECKS = ("cpu", "always", "never")
_value_checks = {"mode": "cpu"}  # process-wide, like torch's own global switches


def set_value_checks(mode: str) -> None:
    """Choose where losses check the values of their inputs (finite embeddings, τ, weights).

    ``"cpu"`` (default): on CPU tensors, where reading a value costs no device synchronisation;
    on an accelerator a NaN input then surfaces as a NaN loss whose terms are NaN too.
    ``"always"``: on accelerators as well, at one host synchronisation per check (for
    debugging a diverging run). ``"never"``: no value checks (shapes and types are still
    checked).

    Raises:
        ValueError: For another mode.

    Example:
        >>> set_value_checks("always"); set_value_checks("cpu")
    """
    _value_checks["mode"] = check_choice(mode, "mode", VALUE_CHECKS)


def on_host(x: Tensor) -> bool:
    """Whether a value check may read ``x``: a CPU tensor (by default; see :func:`set_value_checks`).

    On an accelerator (or the ``meta`` device) the step path never reads a value back to the
    host unless ``set_value_checks("always")`` asks for it.
    """
    mode = _value_checks["mode"]
    if mode == "never" or x.device.type == "meta":
        return False
    return mode == "always" or x.device.type == "cpu"


def check_finite(x: Tensor, name: str, *, masked: bool = False) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or infinite values (see :func:`on_host`).

    With ``masked`` a ``-inf`` is allowed (a masked logit); NaN and ``+inf`` are not.
    """
    if on_host(x) and x.is_floating_point():
        values = x.detach()
        if not masked and bool(torch.isfinite(values.sum())):
            return x  # one reduction; a sum that overflows falls through to the exact check
        bad = torch.isnan(values) | (values == float("inf")) if masked else ~torch.isfinite(values)
        if bool(bad.any()):
            raise NonFiniteError(
                f"{name} contains NaN or infinite values ({int(bad.sum())} of {x.numel()} "
                "entries); the loss would be NaN. Check the model's outputs (a diverged step, "
                "an overflow in half precision, a division by zero)"
            )
    return x


def check_finite_scalar(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if the 0-d tensor ``x`` is NaN or infinite (checked on CPU only)."""
    if on_host(x) and not bool(torch.isfinite(x.detach()).all()):
        raise NonFiniteError(
            f"{name} must be finite, got {x.detach().reshape(-1)[0].item()!r}; a learned scalar "
            "that became NaN or infinite means training diverged (lower the learning rate)"
        )


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return str(value)


def check_reduction(reduction: Any) -> str:
    """Validate a ``reduction`` argument (``'mean'``, ``'sum'`` or ``'none'``)."""
    return check_choice(reduction, "reduction", REDUCTIONS)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 if any input is, else float32 (halves upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_pair(a: Any, b: Any, name_a: str, name_b: str, labels: Any = None) -> None:
    """Validate two paired ``(N, D)`` embedding batches and optional ``labels (N,)``."""
    check_embeddings(a, name_a)
    check_embeddings(b, name_b)
    check_same_shape(a, b, name_a, name_b)
    if labels is not None:
        check_labels(labels, a.shape[0])


def check_coefficients(**values: Any) -> list[float]:
    """Each keyword checked as a loss weight, a finite number >= 0; the floats in order."""
    return [check_positive_float(v, name, allow_zero=True) for name, v in values.items()]


def check_flags(**values: Any) -> list[bool]:
    """Each keyword checked as a ``bool`` (not merely truthy); the values in order."""
    return [check_bool(v, name) for name, v in values.items()]


def check_sample_weight(sample_weight: Any, n: int, name: str = "sample_weight") -> Tensor:
    """Validate weights: a tensor of shape ``(n,)``, finite and >= 0 (values checked on CPU).

    A negative weight would turn a loss into a reward and a NaN one would make the loss NaN:
    both are errors, never silently used.
    """
    check_tensor(sample_weight, name)
    if sample_weight.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(sample_weight.shape)}")
    if on_host(sample_weight):
        values = sample_weight.detach()
        bad = ~torch.isfinite(values) | (values < 0)
        if bool(bad.any()):
            first = values[bad][0].item()
            raise ValueError(
                f"{name} must be finite and >= 0, got {first!r} ({int(bad.sum())} of {n} entries)"
            )
    return sample_weight


def checked_input_tensors(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: Any
) -> list[Tensor]:
    """A call's tensor inputs (and tensors in list inputs), refused if on different devices.

    0-d tensors are left out: torch mixes a CPU scalar (a τ, a bias) into any device's
    computation. Only devices are compared (metadata): no value is read.
    """
    tensors = list(_input_tensors((*args, *kwargs.values())))
    if len({t.device for t in tensors}) < 2:
        return tensors
    bound = signature.bind(None, *args, **kwargs).arguments
    placed = [(k, t.device) for k, v in list(bound.items())[1:] for t in _input_tensors((v,))]
    (first, device), other = placed[0], next(p for p in placed if p[1] != placed[0][1])
    raise ValueError(
        f"{other[0]} must be on the device of {first} ({device}), got a tensor on {other[1]}"
    )


def _input_tensors(values: Iterable[Any]) -> Iterator[Tensor]:
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, Tensor) and item.dim() > 0:
                yield item
