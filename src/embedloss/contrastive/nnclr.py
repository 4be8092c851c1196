"""NNCLR: NT-Xent with nearest neighbours from a support set as positives (Dwibedi et al. 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_embeddings, check_int, check_pair, check_same_shape
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.base.queue import FeatureQueue
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    PairedResult,
    contrastive_keywords,
    nt_xent,
)
from embedloss.ops.neighbours import nearest_neighbour_index
from embedloss.ops.similarity import l2_normalize
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["NNCLRLoss", "nnclr_loss"]


class _Neighbours(NamedTuple):
    """Each view's neighbour: vector, row in the support set, cosine."""

    vectors: Tensor  # (n, D) the neighbour of each view (no gradient)
    position: Tensor | None  # (n,) its row in the support set, None without one
    similarity: Tensor  # (n,) cosine of the view and its neighbour


class _NNCLR(NamedTuple):
    loss: Tensor
    directions: tuple[PairedResult, PairedResult]  # (NN(z_a), p_b) and (NN(z_b), p_a)
    neighbours: tuple[_Neighbours, _Neighbours]
    keys: Tensor  # (n, D) prepared z_a, no gradient: what the support set receives


def _nearest(view: Tensor, support: Tensor | None) -> _Neighbours:
    """The support row most similar (cosine) to each row of ``view``; itself without support."""
    unit = l2_normalize(view)
    if support is None:
        return _Neighbours(view, None, (unit * unit).sum(-1))
    bank = l2_normalize(support.to(view.dtype))  # (K, D)
    index = nearest_neighbour_index(unit, bank)
    return _Neighbours(support[index].to(view.dtype), index, (unit * bank[index]).sum(-1))


def _nnclr(
    z_a: Tensor,
    z_b: Tensor,
    p_a: Tensor | None,
    p_b: Tensor | None,
    support: Tensor | None,
    labels: Tensor | None,
    options: ContrastiveOptions,
) -> _NNCLR:
    """Both NT-Xent terms, their neighbours, and the keys for the support set."""
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    if (p_a is None) != (p_b is None):
        raise ValueError("pass both predictions p_a and p_b, or neither")
    if p_a is not None and p_b is not None:
        check_pair(p_a, p_b, "p_a", "p_b")
        check_same_shape(p_a, z_a, "p_a", "z_a")
    if support is not None:
        check_embeddings(support, "support")
        if support.shape[1] != z_a.shape[-1]:
            raise ValueError(
                f"support must have the views' D={z_a.shape[-1]}, got {tuple(support.shape)}"
            )
    a, b = options.prepare(z_a.detach(), z_b.detach())
    near_a, near_b = _nearest(a, support), _nearest(b, support)
    pred_a, pred_b = (z_a, z_b) if p_a is None or p_b is None else (p_a, p_b)
    first = nt_xent(near_a.vectors, pred_b, labels, options)
    second = nt_xent(near_b.vectors, pred_a, labels, options)
    loss = (first.loss + second.loss) / 2
    return _NNCLR(loss, (first, second), (near_a, near_b), a)


@contrastive_keywords()
def nnclr_loss(
    z_a: Tensor,
    z_b: Tensor,
    support: Tensor | None = None,
    *,
    p_a: Tensor | None = None,
    p_b: Tensor | None = None,
    labels: Tensor | None = None,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""NNCLR's loss: NT-Xent between each view's nearest neighbour and the other view.

    For views ``z_a``, ``z_b`` ``(N, D)``, optional predictions ``p_a``, ``p_b`` (the
    prediction head's outputs; the views themselves by default) and a support set ``Q`` of past
    embeddings, ``NN(z) = argmax_{q∈Q} cos(z, q)`` (no gradient; ``z`` itself while ``Q`` is
    empty) and (Dwibedi et al. 2021, Eq. 1–2, symmetrised; lightly's NNCLR recipe)

        L = ½·[ NT-Xent(NN(z_a), p_b) + NT-Xent(NN(z_b), p_a) ]

    with NT-Xent as :func:`~embedloss.contrastive.simclr_loss` (the 2N anchors of a pair, each
    against its partner and the other 2N − 2 rows).

    Args:
        z_a: ``(N, D)`` embeddings of the first view (looked up in the support set).
        z_b: ``(N, D)`` embeddings of the second view.
        support: ``(K, D)`` support set of past embeddings, or None for none.
        p_a: Optional ``(N, D)`` predictions of the first view (with ``p_b``).
        p_b: Optional ``(N, D)`` predictions of the second view.
        temperature: τ > 0 (default 0.1, NNCLR).
        labels: Optional ``(N,)`` identities; equal labels are positives.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (``(2N,)``, the two terms averaged).
        normalize: L2-normalise the inputs (default True).
        chunk_size: Core tiling: ``None`` dense, an int, or ``"auto"``.
        gather_distributed: Score local anchors against the keys of every rank.

    Shape:
        z_a, z_b, p_a, p_b: ``(N, D)``; support: ``(K, D)``; output: scalar or ``(2N,)``.

    Raises:
        ValueError: For mismatched shapes, only one prediction, or τ <= 0.

    Example:
        >>> z_a, z_b = torch.randn(4, 8), torch.randn(4, 8)
        >>> support = torch.randn(16, 8)
        >>> nnclr_loss(z_a, z_b, support).shape
        torch.Size([])
    """
    options = ContrastiveOptions.create(**keywords)
    return _nnclr(z_a, z_b, p_a, p_b, support, labels, options).loss


@register_loss("nnclr")
class NNCLRLoss(BaseContrastiveLoss):
    """NNCLR: nearest neighbours from a FIFO support set as positives (Dwibedi et al. 2021).

    See :func:`nnclr_loss` for the formula. The support set is a
    :class:`~embedloss.base.queue.FeatureQueue` (submodule ``queue``) with MoCo's semantics: it
    starts empty (a view is then its own neighbour: plain NT-Xent), only filled rows are
    searched, and the prepared ``z_a`` of the batch (with its ``labels``, if given) is enqueued
    FIFO **after** the loss, in training mode only, from every rank with
    ``gather_distributed`` (every rank searches the same set); ``state_dict`` round-trips it.

    Terms: ``accuracy`` (NT-Xent top-1, both terms), ``nn_similarity`` (mean cosine of a view
    and its neighbour), ``queue_fill`` (before this batch is enqueued), ``temperature``; with
    labels and a fully labelled queue, ``nn_accuracy`` (the neighbour has the view's label).

    Args:
        temperature, reduction, normalize, chunk_size, gather_distributed: As :func:`nnclr_loss`.
        queue_size: Rows of the support set (default 98304, NNCLR).
        **options: ``learnable_temperature``: as :class:`~embedloss.base.BaseContrastiveLoss`.

    Raises:
        ValueError: For τ <= 0, ``queue_size < 1``, a batch larger than the queue, an
            embedding size other than the queue's, or inputs on another device than the loss.

    Example:
        >>> loss_fn = NNCLRLoss(queue_size=32)
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> out = loss_fn.compute(z_a, z_b)  # empty support set: each view is its own neighbour
        >>> out.terms["queue_fill"].item(), loss_fn.queue.n_filled
        (0.0, 8)
    """

    def __init__(self, *, queue_size: int = 98304, **options: Unpack[ContrastiveArgs]) -> None:
        super().__init__(**options)
        self.queue_size = check_int(queue_size, "queue_size", low=1)
        self.queue = FeatureQueue(queue_size)

    def compute(
        self,
        z_a: Tensor,
        z_b: Tensor,
        p_a: Tensor | None = None,
        p_b: Tensor | None = None,
        *,
        labels: Tensor | None = None,
    ) -> LossOutput:
        """Loss and terms for views ``(N, D)`` (and predictions); then enqueue ``z_a``."""
        queue, fill = self.queue, self.queue.fill
        check_pair(z_a, z_b, "z_a", "z_b", labels)
        queue.check_batch(z_a, "z_a")
        labelled = not self.loss_only and labels is not None and queue.fully_labeled
        stored = queue.entry_labels() if labelled else None
        stored = None if stored is None else stored.clone()  # the enqueue overwrites the labels
        support = queue.entries(z_a.shape[1])
        result = _nnclr(z_a, z_b, p_a, p_b, support, labels, self.options())
        if self.training:
            queue.enqueue(result.keys, labels=labels, gather_distributed=self.gather_distributed)

        def terms() -> dict[str, Tensor | float]:
            first, second = (d.anchors[0].correct.float().mean() for d in result.directions)
            near = result.neighbours
            values: dict[str, Tensor | float] = {
                "accuracy": (first + second) / 2,
                "nn_similarity": torch.cat([n.similarity for n in near]).mean(),
                "queue_fill": fill,
                "temperature": 1.0 / self.scale(dtype=torch.float64),
            }
            if stored is not None and labels is not None:  # a filled queue: both views' rows
                found = torch.cat([stored[n.position] for n in near])  # (2n,)
                values["nn_accuracy"] = (found == labels.repeat(2)).float().mean()
            return values

        return self.output(result.loss, terms)

    #: A small support set.
    example_options: ClassVar[dict[str, Any]] = {"queue_size": 64}

    shown = "temperature:g queue_size reduction!r"
