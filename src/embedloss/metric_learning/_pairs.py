"""What the pair-based metric-learning losses share: options, the one pure call, terms, examples."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from embedloss.base.base_loss import BaseLoss, Examples, LossOutput
from embedloss.ops.keywords import keyword_options
from embedloss.ops.pair_losses import PairKeywords, PairOptions, RowLoss, labelled_pair_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BasePairLoss"]


class BasePairLoss(BaseLoss):
    """Base of the losses over pairs of labelled embeddings (:mod:`embedloss.ops.pair_losses`).

    Takes the options of :meth:`PairOptions.create <embedloss.ops.pair_losses.PairOptions.create>`
    (a subclass names only its own and passes these on as ``**options: Unpack[PairKeywords]``),
    kept as one :class:`~embedloss.ops.pair_losses.PairOptions` (:meth:`options`). A loss gives
    its row loss (:meth:`_row_loss`) and whether it scores similarities (``SIMILARITY``);
    ``compute`` adds the terms ``{TERM: Σ count, "anchors_without_terms": ...}`` (none when
    ``TERM`` is None). ``print(loss)`` shows a loss's own options, then the shared ones.

    Args:
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared_euclidean"``.
        normalize: L2-normalise the embeddings first (default True).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size: Row tiles (``None``, an int or ``"auto"``).
        gather_distributed: Use the embeddings of all ranks (DDP).
    """

    TERM: ClassVar[str | None] = None
    SIMILARITY: ClassVar[bool] = False

    @keyword_options(PairOptions.create, PairKeywords)
    def __init__(self, **keywords: Unpack[PairKeywords]) -> None:
        options = PairOptions.create(**keywords)
        super().__init__(reduction=options.reduction)
        self._options = options

    def options(self) -> PairOptions:
        """The checked options of this loss."""
        return self._options

    @property
    def gather_distributed(self) -> bool:
        """Whether the loss uses the batch of every rank."""
        return self._options.gather_distributed

    def _row_loss(self) -> RowLoss:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Loss and terms for ``embeddings (N, D)`` and ``labels (N,)``."""
        options, rows, term = self._options, self._row_loss(), self.TERM
        result = labelled_pair_loss(embeddings, labels, options, rows, similarity=self.SIMILARITY)

        def terms() -> dict[str, Tensor | float]:
            if term is None:
                return {}
            return {term: result.counts.sum(), "anchors_without_terms": (result.counts == 0).sum()}

        return self.output(result.loss, terms)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``(embeddings (n, d), labels (n,))`` with two samples of each label."""
        labels = torch.arange(n) // 2
        centres = torch.randn(n, d, generator=g)[labels]
        return ((centres + 0.5 * torch.randn(n, d, generator=g)).to(dtype), labels), {}

    shown: ClassVar[str] = "_options.distance!r _options.normalize _options.reduction!r"
