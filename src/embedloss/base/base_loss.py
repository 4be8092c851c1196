"""The contract every loss follows: ``forward -> Tensor``, ``compute -> LossOutput``."""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections.abc import Callable, Mapping
from dataclasses import is_dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from embedloss._validation import allow_empty_batch, check_reduction, checked_input_tensors
from embedloss.ops.distributed import is_distributed, ranks_agree

__all__ = ["BaseLoss", "Examples", "LossOutput"]

#: Example inputs of a loss: ``(args, kwargs)`` for its ``forward``.
Examples = tuple[tuple[Any, ...], dict[str, Any]]


class LossOutput(NamedTuple):
    """A loss and its named, detached scalar terms for logging.

    Attributes:
        loss: The differentiable loss (a scalar, or one value per anchor for ``reduction="none"``).
        terms: Components and diagnostics, e.g. ``{"accuracy": tensor(0.9)}``; detached 0-d tensors.
    """

    loss: Tensor
    terms: dict[str, Tensor]


def detached_terms(**values: Tensor | float) -> dict[str, Tensor]:
    """Build a terms dict: every value detached and turned into a 0-d float tensor.

    Python numbers become tensors on the device of the tensor values (all terms of a loss live
    on one device).
    """
    device = next((v.device for v in values.values() if isinstance(v, Tensor)), None)
    out: dict[str, Tensor] = {}
    for key, value in values.items():
        t = value.detach() if isinstance(value, Tensor) else torch.tensor(value, device=device)
        out[key] = t.float().mean() if t.numel() != 1 else t.float().reshape(())
    return out


#: ``nn.Module``'s own attributes (registries, hooks): not settings of a loss.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``/``compute`` with the contract's cross-cutting rules applied once, here.

    Tensor inputs on different devices are refused, naming the argument. Under
    ``gather_distributed`` with a process group, the call runs inside
    :func:`~embedloss.ops.distributed.ranks_agree` (and a rank may hold an empty batch). The
    terms of ``compute`` become NaN when its loss is NaN or infinite, so that a diverged step is
    never logged with healthy-looking terms (device-side: no synchronisation).
    """
    signature = inspect.signature(method)
    is_compute = method.__name__ == "compute"

    @functools.wraps(method)
    def guarded(self: BaseLoss, *args: Any, **kwargs: Any) -> Any:
        tensors = checked_input_tensors(signature, args, kwargs)
        if getattr(self, "gather_distributed", False) and is_distributed():
            inputs = dict(list(signature.bind(self, *args, **kwargs).arguments.items())[1:])
            device = tensors[0].device if tensors else torch.device("cpu")
            options = {f"option {k}": v for k, v in self.options_fingerprint().items()}
            context = f"{type(self).__name__}.{method.__name__}"
            grads = (*tensors, *self.parameters())  # a rank without a graph skips the backward's
            graph = torch.is_grad_enabled() and any(t.requires_grad for t in grads)  # collectives
            call = {"method": method.__name__, "graph": graph, **options, **inputs}
            with ranks_agree(context, call, device), allow_empty_batch():
                result = method(self, *args, **kwargs)
        else:
            result = method(self, *args, **kwargs)
        return _poisoned_terms(result) if is_compute else result

    guarded.__guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _loss_only(compute: Callable[..., LossOutput]) -> Callable[..., Tensor]:
    """A ``forward`` for a class that defines only ``compute``: its loss, without the terms.

    The terms are skipped, not built and dropped: while this runs, :meth:`BaseLoss.output`
    returns no terms (``compute`` is called unguarded; the guard wraps this ``forward``).
    """

    def forward(self: BaseLoss, *args: Any, **kwargs: Any) -> Tensor:
        object.__setattr__(self, "loss_only", True)
        try:
            return compute(self, *args, **kwargs).loss
        finally:
            self.__dict__.pop("loss_only", None)  # back to the class default: no instance state

    signature = inspect.signature(compute)
    forward.__signature__ = signature.replace(return_annotation="Tensor")  # type: ignore[attr-defined]
    forward.__doc__ = "The loss of :meth:`compute` alone (its logging terms are not built)."
    return forward


def _merge_base_options(cls: type, init: Callable[..., None]) -> None:
    """Give ``init`` (which passes ``**options`` to its base) the full keyword-only signature."""
    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return
    own = [p for p in params if p.kind is p.KEYWORD_ONLY]
    names = {p.name for p in own}
    base = inspect.signature(super(cls, cls).__init__).parameters.values()  # type: ignore[misc,arg-type]
    inherited = [p for p in base if p.kind is p.KEYWORD_ONLY and p.name not in names]
    init.__signature__ = signature.replace(parameters=[params[0], *inherited, *own])  # type: ignore[attr-defined]


def _refresh_counters(module: nn.Module, incompatible: Any) -> None:
    """Re-read the host copies of a loaded module's counters (loading is off the step path)."""
    counters: dict[str, int] = module.__dict__["_counters"]
    for name in counters:
        counters[name] = int(getattr(module, name))


def _poisoned_terms(output: LossOutput) -> LossOutput:
    """``output`` with every term NaN where the loss is not finite (``0·x`` is NaN then)."""
    if not output.terms:
        return output
    zero_or_nan = output.loss.detach().sum() * 0
    terms = {k: v + zero_or_nan.to(v) for k, v in output.terms.items()}
    return LossOutput(output.loss, terms)


class BaseLoss(nn.Module):
    """Root of every embedloss loss.

    Subclasses implement :meth:`compute` (loss plus terms, built by :meth:`output`); their
    :meth:`forward` is generated from it: the same signature, the loss alone, no terms built. Schedules are driven by the explicit hooks
    :meth:`update_step` and :meth:`update_epoch`, which do nothing here.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per anchor).

    Raises:
        ValueError: If ``reduction`` is not one of the three.
    """

    _counters: dict[str, int]
    #: True while :meth:`forward` runs :meth:`compute` for its loss alone: terms are skipped.
    loss_only: bool = False

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self._counters = {}
        self.register_load_state_dict_post_hook(_refresh_counters)

    def __init_subclass__(cls, **defaults: Any) -> None:
        """Set up a subclass: its call guard, its constructor's signature and defaults.

        A subclass that defines ``compute`` and no ``forward`` gets one from it (same signature,
        the loss alone, the terms not built). Both are then wrapped (:func:`_guarded`): with
        ``gather_distributed`` and a process group, every rank first agrees on the loss's
        options and its inputs' structure (one small collective; a disagreement, or an error on
        one rank, is the same ``ValueError`` on every rank, never a hang); ``compute``'s terms
        are NaN whenever its loss is.

        A subclass's constructor names only its own options and hands its base's on with
        ``**options: Unpack[BaseArgs]`` (a ``TypedDict``, so type checkers see every keyword):
        its signature becomes the base's keyword-only options followed by its own, which is what
        ``inspect.signature(Loss)`` and the registry show. Defaults given in the class statement
        — ``class SimCLRLoss(BaseContrastiveLoss, temperature=0.5)`` — replace inherited ones.

        Raises:
            TypeError: If a default names no constructor argument.
        """
        super().__init_subclass__()
        if "compute" in cls.__dict__ and "forward" not in cls.__dict__:
            compute = cls.__dict__["compute"]
            raw = compute.__wrapped__ if hasattr(compute, "__guarded__") else compute
            cls.forward = _loss_only(raw)  # type: ignore[method-assign]
        for name in ("compute", "forward"):
            method = cls.__dict__.get(name)
            if method is not None and not hasattr(method, "__guarded__"):
                setattr(cls, name, _guarded(method))
        own = cls.__dict__.get("__init__")
        if own is not None:
            _merge_base_options(cls, own)
        if not defaults:
            return
        known = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(defaults) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__}: no constructor argument(s) {unknown} to default")
        cls.__init__ = functools.partialmethod(cls.__init__, **defaults)  # type: ignore[assignment]

    def options_fingerprint(self) -> dict[str, Any]:
        """What ranks must share: the loss's plain settings and its fixed scalar buffers.

        Plain attributes (numbers, strings, flags, tuples and mappings of them, options
        dataclasses, the training mode) and the values of 0-d float64 buffers (a fixed τ or
        bias). Read only under ``gather_distributed``, where the ranks synchronise anyway.
        """
        plain = (bool, int, float, str, type(None), tuple, Mapping)
        settings: dict[str, Any] = {
            k: v
            for k, v in vars(self).items()
            if k not in _MODULE_INTERNALS
            and (isinstance(v, plain) or (is_dataclass(v) and not isinstance(v, type)))
        }
        for name, buffer in self.named_buffers(recurse=False):
            if buffer.dim() == 0 and buffer.dtype == torch.float64:
                settings[name] = float(buffer)
        return settings

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BaseLoss:
        # Fixed scalars (register_scalar) keep their exact float64 value through dtype casts
        # such as .half(); device moves apply as usual.
        exact = {n: self._buffers[n] for n in self.__dict__.get("_exact_scalars", ())}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != torch.float64:
                self._buffers[name] = before.to(device=after.device)
        return self

    def _init_counter(self, name: str, value: int = 0) -> None:
        """A 0-d integer buffer ``name`` (saved in ``state_dict``) with an exact host copy.

        Counters (steps, queue pointers) decide shapes and branches; reading them from the
        host copy keeps the step path free of device synchronisation. :meth:`_set_counter`
        writes both; loading a ``state_dict`` refreshes the copy.
        """
        self.register_buffer(name, torch.tensor(value, dtype=torch.long))
        self._counters[name] = value

    def _set_counter(self, name: str, value: int) -> None:
        getattr(self, name).fill_(value)
        self._counters[name] = value

    def _counter(self, name: str) -> int:
        return self._counters[name]

    def output(self, loss: Tensor, terms: Callable[[], Mapping[str, Tensor | float]]) -> LossOutput:
        """``compute``'s result: ``loss`` and the terms ``terms()`` returns, detached.

        ``terms`` is called without grad, and not at all when :meth:`forward` wants the loss
        alone (:attr:`loss_only`): a loss's logging work never runs on the training path.
        """
        if self.loss_only:
            return LossOutput(loss, {})
        with torch.no_grad():
            return LossOutput(loss, detached_terms(**terms()))

    def compute(self, *args: Any, **kwargs: Any) -> LossOutput:
        """Return the loss and its named terms; implemented by every concrete loss."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Return the loss only (see :meth:`compute`)."""
        return self.compute(*args, **kwargs).loss

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Hook called by trainers once per optimisation step; no-op unless a loss has a schedule."""

    def update_epoch(self, epoch: int) -> None:
        """Hook called by trainers once per epoch; no-op unless a loss has a schedule."""

    #: Constructor arguments of a small working instance (a loss with required options sets it).
    example_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """A fresh copy of :attr:`example_options` (conformance tests, docs)."""
        return copy.deepcopy(cls.example_options)

    @classmethod
    def example_inputs(
        cls, n: int = 8, d: int = 16, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> Examples:
        """Small random ``(args, kwargs)`` for :meth:`forward`: :meth:`draw_examples`, seeded."""
        return cls.draw_examples(torch.Generator().manual_seed(seed), n, d, dtype)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """What :meth:`example_inputs` returns, drawn from ``g``: here two ``(n, d)`` views."""
        a = torch.randn(n, d, generator=g).to(dtype)
        return (a, (a.float() + 0.3 * torch.randn(n, d, generator=g)).to(dtype)), {}

    #: What ``print(loss)`` shows, in order: space-separated attribute paths, each with an
    #: optional ``!r`` or ``:<format spec>`` and an optional ``label=`` (by default the path's
    #: last name), as ``"temperature:g phase=current_phase!r reduction!r"``.
    shown: ClassVar[str] = "reduction!r"

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``: ``label=value`` for every entry of :attr:`shown`."""
        parts = []
        for entry in self.shown.split():
            label, _, path = entry.rpartition("=")
            path, _, spec = path.partition(":")
            name = path.removesuffix("!r")
            value = operator.attrgetter(name)(self)
            text = format(value, spec) if name == path else repr(value)
            parts.append(f"{label or name.rsplit('.')[-1]}={text}")
        return ", ".join(parts)
