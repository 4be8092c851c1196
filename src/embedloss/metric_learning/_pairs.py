"""What the pair-based metric-learning losses share: options, example inputs, terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from embedloss.base.base_loss import BaseLoss, detached_terms
from embedloss.ops.anchors import ChunkSize
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
    :class:`~embedloss.ops.pair_losses.PairOptions` (:meth:`options`).
    """

    def __init__(
        self,
        *,
        distance: str = "cosine",
        normalize: bool = True,
        reduction: str = "mean",
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self._options = PairOptions.create(
            distance, normalize, reduction, chunk_size, gather_distributed
        )

    def options(self) -> PairOptions:
        """The checked options of this loss."""
        return self._options

    @staticmethod
    def counted_terms(result: PairResult, name: str) -> dict[str, Tensor]:
        """``{name: Σ count}`` (what the mean divides by) and ``anchors_without_terms``."""
        with torch.no_grad():
            return detached_terms(
                **{name: result.counts.sum()},
                anchors_without_terms=(result.counts == 0).sum(),
            )

    @classmethod
    def example_inputs(
        cls, n: int = 8, d: int = 16, *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(embeddings (n, d), labels (n,))`` with two samples of each label."""
        return labelled_examples(n, d, dtype, seed)

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        o = self._options
        return f"distance={o.distance!r}, normalize={o.normalize}, reduction={o.reduction!r}"
