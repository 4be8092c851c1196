"""The contract every loss follows: ``forward -> Tensor``, ``compute -> LossOutput``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from embedloss._validation import check_reduction

__all__ = ["BaseLoss", "LossOutput"]


class LossOutput(NamedTuple):
    """A loss and its named, detached scalar terms for logging.

    Attributes:
        loss: The differentiable loss (a scalar, or one value per anchor for ``reduction="none"``).
        terms: Components and diagnostics, e.g. ``{"accuracy": tensor(0.9)}``; detached 0-d tensors.
    """

    loss: Tensor
    terms: dict[str, Tensor]


def detached_terms(**values: Tensor | float) -> dict[str, Tensor]:
    """Build a terms dict: every value detached and turned into a 0-d float tensor."""
    out: dict[str, Tensor] = {}
    for key, value in values.items():
        t = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
        out[key] = t.float().mean() if t.numel() != 1 else t.float().reshape(())
    return out


class BaseLoss(nn.Module):
    """Root of every embedloss loss.

    Subclasses implement :meth:`compute` (loss plus terms) and a typed :meth:`forward` that
    returns ``self.compute(...).loss``. Schedules are driven by the explicit hooks
    :meth:`update_step` and :meth:`update_epoch`, which do nothing here.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per anchor).

    Raises:
        ValueError: If ``reduction`` is not one of the three.
    """

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

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

    @classmethod
    def example_kwargs(cls) -> dict[str, Any]:
        """Constructor arguments that make a small working instance (conformance tests, docs)."""
        return {}

    @classmethod
    def example_inputs(
        cls, n: int = 8, d: int = 16, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Small random ``(args, kwargs)`` that :meth:`forward` accepts: two ``(n, d)`` views."""
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(n, d, generator=g).to(dtype)
        b = (a.float() + 0.3 * torch.randn(n, d, generator=g)).to(dtype)
        return (a, b), {}

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        return f"reduction={self.reduction!r}"
