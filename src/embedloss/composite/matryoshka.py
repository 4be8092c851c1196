"""Matryoshka representation learning: one loss over nested prefixes of the embedding."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from embedloss._validation import check_int
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.composite._parts import (
    build_parts,
    call_hooks,
    prefixed_terms,
    run_part,
    weighted_sum,
)
from embedloss.registry import register_loss

__all__ = ["MatryoshkaLoss"]


def _check_dims(dims: Any) -> tuple[int, ...]:
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    out = tuple(check_int(d, "dims", low=1) for d in dims)
    if len(set(out)) != len(out):
        raise ValueError(f"dims must be distinct, got {list(out)}")
    return out


def _check_weights(weights: Any, n: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of {n} numbers (one per dim), got {weights!r}")
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per dim ({n}), got {len(weights)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    return tuple(float(w) for w in weights)


def _prefix(x: Any, d: int) -> Any:
    """``x[..., :d]`` for an embedding tensor (floating point, at least 2-D), else ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        return x
    if x.shape[-1] < d:
        raise ValueError(
            f"dims asks for the first {d} features, but an embedding has only {x.shape[-1]} "
            f"(shape {tuple(x.shape)})"
        )
    return x[..., :d]


@register_loss("matryoshka", category="composite")
class MatryoshkaLoss(BaseLoss):
    """Matryoshka loss: a loss summed over nested prefixes of the embedding (Kusupati et al. 2022).

        L = Σ_k w_k · L(x[..., :d_k], …)

    Every floating-point input of two or more dimensions (the embeddings: ``(N, D)``,
    ``(N, V, D)``, ``(N, M, D)``) is cut to its first ``d_k`` features; other inputs (labels,
    scores) pass unchanged. One wrapped loss (a module, a config mapping ``{"name": ...,
    **kwargs}`` or a registered name, as ``combined`` takes its parts) serves every ``d_k`` and
    normalises each prefix itself if it normalises; its state and parameters are shared (a loss
    with dimension-sized parameters, such as ``arcface``'s centres, fits one size only) and the
    step and epoch hooks are forwarded to it. Terms: the wrapped loss's as
    ``"dim_<d_k>/<term>"``, plus ``"dim_<d_k>/loss"``.

    Args:
        loss: The wrapped loss: an ``nn.Module``, a config mapping or a registered name.
        dims: The prefix sizes ``d_k`` (distinct ints >= 1), e.g. ``(768, 512, 256, 128, 64)``.
        weights: Optional ``w_k`` per dim (finite numbers; default 1 each).

    Raises:
        TypeError: For a loss that is not a module, mapping or str, or non-sequence dims.
        ValueError: For repeated or non-positive dims, weights of the wrong length, or (when
            called) a dim larger than an embedding.

    Example:
        >>> import torch
        >>> loss = MatryoshkaLoss(loss="simclr", dims=(16, 8, 4), weights=(1.0, 0.5, 0.25))
        >>> out = loss.compute(torch.randn(6, 16), torch.randn(6, 16))
        >>> sorted(k for k in out.terms if k.endswith("/loss"))
        ['dim_16/loss', 'dim_4/loss', 'dim_8/loss']
    """

    def __init__(
        self,
        *,
        loss: nn.Module | Mapping[str, Any] | str,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, (nn.Module, Mapping, str)):
            raise TypeError(
                "loss must be an nn.Module, a config mapping with a 'name' key or a registered "
                f"loss name, got {type(loss).__name__}"
            )
        self.loss = build_parts({"loss": loss}, "loss")["loss"]
        self.dims = _check_dims(dims)
        self.weights = _check_weights(weights, len(self.dims))

    def compute(self, *args: Any, **kwargs: Any) -> LossOutput:
        """The wrapped loss at every prefix size: the weighted sum and the prefixed terms."""
        outputs = {}
        for d in self.dims:
            cut = tuple(_prefix(a, d) for a in args), {k: _prefix(v, d) for k, v in kwargs.items()}
            outputs[f"dim_{d}"] = run_part(f"dim_{d}", self.loss, *cut, not self.loss_only)
        factors = dict(zip(outputs, self.weights, strict=True))
        loss = weighted_sum({n: out.loss for n, out in outputs.items()}, factors)
        return self.output(loss, lambda: prefixed_terms(outputs))

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Forward the step hook to the wrapped loss."""
        call_hooks([self.loss], "update_step", step, total_steps)

    def update_epoch(self, epoch: int) -> None:
        """Forward the epoch hook to the wrapped loss."""
        call_hooks([self.loss], "update_epoch", epoch)

    #: NT-Xent over the full 16 features and their first 8.
    example_options: ClassVar[dict[str, Any]] = {"loss": {"name": "simclr"}, "dims": (16, 8)}

    shown = "dims weights"
