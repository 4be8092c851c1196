"""What the pair-based metric-learning losses share: options, example inputs, terms."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from embedloss.base.base_loss import BaseLoss, LossOutput, detached_terms
from embedloss.ops.pair_losses import PairOptions, PairResult

__all__ = ["BasePairLoss", "labelled_examples"]


def labelled_examples(
    n: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``((embeddings (n, d), labels (n,)), {})`` with two samples of each label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // 2
    centres = torch.randn(n, d, generator=g)[labels]
    embeddings = (centres + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
    return (embeddings, labels), {}


class BasePairLoss(BaseLoss):
    """Base of the losses over pairs of labelled embeddings (:mod:`embedloss.ops.pair_losses`).

    Holds the options every such loss takes and hands them to its pure function as one
    :class:`~embedloss.ops.pair_losses.PairOptions` (:meth:`options`), which a subclass builds
    from its own explicit constructor arguments with ``PairOptions.create``. A loss implements
    :meth:`_result` (its one pure call); ``compute`` adds the terms ``{TERM: Σ count,
    "anchors_without_terms": ...}`` (none when ``TERM`` is None), ``forward`` returns the loss.
    """

    TERM: ClassVar[str | None] = None

    def __init__(self, options: PairOptions) -> None:
        super().__init__(reduction=options.reduction)
        self._options = options

    def options(self) -> PairOptions:
        """The checked options of this loss."""
        return self._options

    def _result(self, embeddings: Tensor, labels: Tensor) -> PairResult:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Loss and terms for ``embeddings (N, D)`` and ``labels (N,)``."""
        result = self._result(embeddings, labels)
        if self.TERM is None:
            return LossOutput(result.loss, {})
        with torch.no_grad():
            terms = detached_terms(
                **{self.TERM: result.counts.sum()},
                anchors_without_terms=(result.counts == 0).sum(),
            )
        return LossOutput(result.loss, terms)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``embeddings (N, D)`` and ``labels (N,)`` (see :meth:`compute`)."""
        return self._result(embeddings, labels).loss

    @classmethod
    def example_inputs(
        cls, n: int = 8, d: int = 16, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(embeddings (n, d), labels (n,))`` with two samples of each label."""
        return labelled_examples(n, d, dtype, seed)

    @property
    def gather_distributed(self) -> bool:
        """Whether the loss uses the batch of every rank (see ``gather_distributed``)."""
        return self._options.gather_distributed

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        o = self._options
        return f"distance={o.distance!r}, normalize={o.normalize}, reduction={o.reduction!r}"
