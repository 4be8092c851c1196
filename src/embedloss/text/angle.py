"""AnglE: angle-optimised text embeddings (Li & Li 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_float, check_positive_float, compute_dtype
from embedloss.base.base_loss import LossOutput
from embedloss.ops.anchors import PairSpec, reduce_anchor_losses
from embedloss.ops.info_nce import info_nce
from embedloss.ops.keywords import keyword_options
from embedloss.ops.layouts import two_view_layout
from embedloss.ops.ranking import angle_similarity, ranking_loss
from embedloss.ops.similarity import l2_normalize
from embedloss.registry import register_loss
from embedloss.text._scored import BaseScoredPairLoss, check_scored_pairs

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AnglELoss", "angle_loss"]


class _Parts(NamedTuple):
    """A weight or a scale per part of the loss."""

    cosine: float
    ibn: float
    angle: float

    @classmethod
    def checked(cls, values: tuple[float, ...], kind: str) -> _Parts:
        """Weights >= 0 or scales > 0, each error naming ``<part>_<kind>``."""
        pairs, zero = zip(values, cls._fields, strict=True), kind == "weight"
        return cls(*(check_positive_float(v, f"{n}_{kind}", allow_zero=zero) for v, n in pairs))


class _Options(NamedTuple):
    weights: _Parts
    scales: _Parts
    ibn_threshold: float
    gather_distributed: bool

    @classmethod
    def create(
        cls,
        cosine_weight: float = 1.0,
        ibn_weight: float = 1.0,
        angle_weight: float = 1.0,
        cosine_scale: float = 20.0,
        ibn_scale: float = 20.0,
        angle_scale: float = 20.0,
        ibn_threshold: float = 1.0,
        gather_distributed: bool = False,
    ) -> _Options:
        weights = _Parts.checked((cosine_weight, ibn_weight, angle_weight), "weight")
        scales = _Parts.checked((cosine_scale, ibn_scale, angle_scale), "scale")
        threshold = check_float(ibn_threshold, "ibn_threshold")
        return cls(weights, scales, threshold, check_bool(gather_distributed, "gather_distributed"))


class _Keywords(TypedDict, total=False):
    """The options of :meth:`_Options.create`: AnglE's function and module take them all."""

    cosine_weight: float
    ibn_weight: float
    angle_weight: float
    cosine_scale: float
    ibn_scale: float
    angle_scale: float
    ibn_threshold: float
    gather_distributed: bool


def _in_batch_negatives(a: Tensor, b: Tensor, positive: Tensor, o: _Options) -> Tensor:
    """InfoNCE over the 2N texts: a text of a positive pair against its partner, all else negative."""
    x, y = l2_normalize(a), l2_normalize(b)
    query, keys, spec = two_view_layout(x, y, None, o.gather_distributed)
    assert spec.positive_index is not None  # the label-free two-view layout has one
    pair_positive = torch.cat([positive, positive])  # (2n,)
    index = torch.where(pair_positive, spec.positive_index, keys.shape[0])  # out of range: none
    spec = PairSpec(positive_index=index, self_index=spec.self_index)
    result = info_nce(query, keys, o.scales.ibn, spec, chunk_size="auto", reduced=True)
    return reduce_anchor_losses(result, "mean", distributed=o.gather_distributed)


def _angle(a: Tensor, b: Tensor, scores: Tensor, o: _Options) -> LossOutput:
    """The weighted sum and its (unweighted) parts; a part of weight 0 is not computed."""
    check_scored_pairs(a, b, scores)
    if a.shape[1] % 2:
        raise ValueError(
            f"angle needs an even embedding dimension (real and imaginary halves), got {a.shape[1]}"
        )
    dtype = compute_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    gather = o.gather_distributed
    parts: dict[str, Tensor] = {}
    if o.weights.cosine:
        cosine = (l2_normalize(a) * l2_normalize(b)).sum(dim=1)
        parts["cosine"] = ranking_loss(cosine, scores, o.scales.cosine, gather_distributed=gather)
    if o.weights.ibn:
        parts["ibn"] = _in_batch_negatives(a, b, scores >= o.ibn_threshold, o)
    if o.weights.angle:
        similarity = angle_similarity(a, b)
        parts["angle"] = ranking_loss(similarity, scores, o.scales.angle, gather_distributed=gather)
    loss = sum((getattr(o.weights, k) * v for k, v in parts.items()), a.new_zeros(()))
    return LossOutput(loss, parts)


@keyword_options(_Options.create, _Keywords)
def angle_loss(
    embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor, **keywords: Unpack[_Keywords]
) -> Tensor:
    r"""AnglE loss (Li & Li 2023, Eq. 7): CoSENT + in-batch negatives + the angle objective.

        L = w₁·L_cos + w₂·L_ibn + w₃·L_angle

    * ``L_cos``: CoSENT (:func:`~embedloss.text.cosent_loss`) of the pairs' cosines, scale λ₁.
    * ``L_ibn``: InfoNCE over the 2N texts with scale λ₂: each text of a *positive* pair
      (``score >= ibn_threshold``) against its partner, every other text a negative; the mean
      runs over the texts of positive pairs (the official code divides by all 2N texts; the
      two agree when every pair is positive). AnglE marks positives with the label 1 and casts
      labels to int, which ``ibn_threshold=1`` reproduces for non-negative scores.
    * ``L_angle``: the CoSENT ranking, with scale λ₃, of the pairs' angle similarity Δ in
      complex space (:func:`~embedloss.ops.ranking.angle_similarity`, as the official
      ``angle_loss``): pairs with higher scores should have a higher Δ (sentence-transformers'
      ``AnglELoss`` is this term alone).

    A part with weight 0 is skipped. A value of the whole batch: no per-sample ``reduction``.

    Args:
        embeddings_a: ``(N, D)`` first sentences, D even.
        embeddings_b: ``(N, D)`` second sentences.
        scores: ``(N,)`` gold similarity scores.
        cosine_weight: w₁ >= 0 (default 1).
        ibn_weight: w₂ >= 0 (default 1).
        angle_weight: w₃ >= 0 (default 1).
        cosine_scale: λ₁ > 0 (default 20).
        ibn_scale: λ₂ > 0, i.e. 1/τ (default 20).
        angle_scale: λ₃ > 0 (default 20).
        ibn_threshold: Scores at or above it make a pair a positive of ``L_ibn`` (default 1).
        gather_distributed: Rank and contrast the pairs of every rank together (DDP).

    Shape:
        embeddings ``(N, D)``, scores ``(N,)``; output: scalar.

    Raises:
        ValueError: For mismatched shapes, an odd D, negative weights or scales <= 0.

    Example:
        >>> a = torch.randn(4, 8)
        >>> b = a + 0.1 * torch.randn(4, 8)
        >>> loss = angle_loss(a, b, torch.tensor([1.0, 0.2, 0.6, 1.0]))
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """
    return _angle(embeddings_a, embeddings_b, scores, _Options.create(**keywords)).loss


@register_loss("angle")
class AnglELoss(BaseScoredPairLoss):
    """AnglE: CoSENT, in-batch negatives and the angle objective, weighted (Li & Li 2023).

    See :func:`angle_loss` for the formula. A value of the whole batch (no ``reduction``).
    Terms: the unweighted parts ``cosine``, ``ibn``, ``angle`` (those with a non-zero weight).

    Args:
        cosine_weight, ibn_weight, angle_weight, cosine_scale, ibn_scale: As :func:`angle_loss`.
        angle_scale, ibn_threshold, gather_distributed: As :func:`angle_loss`.

    Example:
        >>> loss = AnglELoss(ibn_weight=0.0)
        >>> out = loss.compute(torch.randn(4, 8), torch.randn(4, 8), torch.rand(4))
        >>> sorted(out.terms)
        ['angle', 'cosine']
    """

    @keyword_options(_Options.create, _Keywords)
    def __init__(self, **options: Unpack[_Keywords]) -> None:
        super().__init__()
        self._options = _Options.create(**options)
        self.weights, self.scales, self.ibn_threshold, self.gather_distributed = self._options

    def compute(self, embeddings_a: Tensor, embeddings_b: Tensor, scores: Tensor) -> LossOutput:
        """Loss and terms for pairs ``(embeddings_a[i], embeddings_b[i])`` and ``scores (N,)``."""
        loss, parts = _angle(embeddings_a, embeddings_b, scores, self._options)
        return self.output(loss, lambda: parts)

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        return f"weights={tuple(self.weights)}, scales={tuple(self.scales)}"
