"""The exact InfoNCE core: the one place every InfoNCE-family loss computes through.

:func:`info_nce` scores queries against shared keys, :func:`symmetric_info_nce` scores a paired
batch in both directions (CLIP), :func:`nt_xent` scores the 2N views of a batch (SimCLR). Each
chooses between the dense kernel (:mod:`embedloss.ops.anchors`) and the tiled one
(:mod:`embedloss.ops.chunked`) by ``chunk_size``; the formula is in :mod:`embedloss.ops.anchors`.
A loss hands its options to these functions as one :class:`ContrastiveOptions` object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_chunk_size,
    check_float,
    check_pair,
    check_reduction,
    compute_dtype,
)
from embedloss.ops import chunked
from embedloss.ops.anchors import (
    AnchorLosses,
    ChunkSize,
    NegativeLogWeights,
    PairSpec,
    dense_anchor_losses,
    reduce_anchor_losses,
)
from embedloss.ops.keywords import F, keyword_options
from embedloss.ops.layouts import paired_layout, two_view_layout
from embedloss.ops.similarity import inverse_temperature, prepare_embeddings, scale_from_logit

__all__ = [
    "ContrastiveKeywords",
    "ContrastiveOptions",
    "SmoothedKeywords",
    "contrastive_keywords",
    "PairedResult",
    "info_nce",
    "nt_xent",
    "paired_symmetric",
    "symmetric_info_nce",
]


@dataclass(frozen=True)
class ContrastiveOptions:
    """How an InfoNCE-family loss scores a batch, handed to its pure function as one object.

    A module builds it per call (``BaseContrastiveLoss.options()``, from checked constructor
    arguments); a functional loss builds it from its keywords with :meth:`create`. The scale
    ``1/τ`` comes from ``temperature`` (functional) or from a module's ``logit_scale``
    (``log(1/τ)``, clamped at ``max_logit_scale``); it is computed in the inputs' dtype.

    Attributes:
        temperature: τ, a float or a 0-d tensor (used when ``logit_scale`` is None).
        logit_scale: ``log(1/τ)``, a 0-d tensor (a module's buffer or parameter), or None.
        max_logit_scale: Clamp of ``logit_scale`` (learnable or external scales), or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise the inputs first.
        chunk_size: Core tiling: ``None`` dense, an int, or ``"auto"``.
        gather_distributed: Score local anchors against the keys of every rank.
        label_smoothing: ε in [0, 1] of the losses that offer it (spread over ``A(i)``).
    """

    temperature: float | Tensor = 0.1
    logit_scale: Tensor | None = None
    max_logit_scale: float | None = None
    reduction: str = "mean"
    normalize: bool = True
    chunk_size: ChunkSize = "auto"
    gather_distributed: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def create(
        cls,
        temperature: float | Tensor = 0.1,
        reduction: str = "mean",
        normalize: bool = True,
        chunk_size: ChunkSize = "auto",
        gather_distributed: bool = False,
        label_smoothing: float = 0.0,
    ) -> ContrastiveOptions:
        """Checked options from a functional loss's keywords (a tensor τ is checked on CPU)."""
        inverse_temperature(temperature)  # the check only
        return cls(
            temperature,
            reduction=check_reduction(reduction),
            normalize=check_bool(normalize, "normalize"),
            chunk_size=check_chunk_size(chunk_size),
            gather_distributed=check_bool(gather_distributed, "gather_distributed"),
            label_smoothing=check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0),
        )

    def at(self, temperature: float | Tensor) -> ContrastiveOptions:
        """These options at another temperature τ (a float or a 0-d tensor)."""
        return dataclasses.replace(self, temperature=temperature, logit_scale=None)

    def scale_as(self, dtype: torch.dtype) -> Tensor | float:
        """``1/τ`` in the compute ``dtype`` (a float τ gives a float)."""
        if self.logit_scale is None:
            return inverse_temperature(self.temperature, dtype)
        return scale_from_logit(self.logit_scale, dtype, self.max_logit_scale)

    def prepare(self, *xs: Tensor) -> list[Tensor]:
        """The inputs in their common compute dtype, L2-normalised when ``normalize``."""
        dtype = compute_dtype(*xs)
        return [prepare_embeddings(x, normalize=self.normalize, dtype=dtype) for x in xs]

    @property
    def reduced(self) -> bool:
        """Whether per-anchor losses are only summed or averaged (``reduction`` mean or sum)."""
        return self.reduction != "none"

    def reduce(self, result: AnchorLosses, distributed: bool | None = None) -> Tensor:
        """``result`` reduced with ``reduction`` (over ranks when ``gather_distributed``)."""
        dist = self.gather_distributed if distributed is None else distributed
        return reduce_anchor_losses(result, self.reduction, distributed=dist)


class ContrastiveKeywords(TypedDict, total=False):
    """The keyword options of a functional InfoNCE-family loss (:meth:`ContrastiveOptions.create`)."""

    temperature: float | Tensor
    reduction: str
    normalize: bool
    chunk_size: ChunkSize
    gather_distributed: bool


class SmoothedKeywords(ContrastiveKeywords, total=False):
    """:class:`ContrastiveKeywords` and label smoothing."""

    label_smoothing: float


def contrastive_keywords(keywords: type = ContrastiveKeywords, **defaults: Any) -> Callable[[F], F]:
    """Decorator: a functional loss takes the ``keywords`` options, with these defaults.

    :func:`~embedloss.ops.keywords.keyword_options` over :meth:`ContrastiveOptions.create`: the
    function is written ``fn(inputs..., *, its_own=..., **keywords: Unpack[ContrastiveKeywords])``
    and gets the full, explicit signature.
    """
    return keyword_options(ContrastiveOptions.create, keywords, **defaults)


class PairedResult(NamedTuple):
    """A reduced loss and what its terms need: the per-anchor results and the prepared inputs.

    Attributes:
        loss: The reduced loss.
        anchors: Per-anchor results, one :class:`AnchorLosses` per direction.
        a: The first input as scored (dtype-cast, normalised if asked).
        b: The second input as scored.
    """

    loss: Tensor
    anchors: tuple[AnchorLosses, ...]
    a: Tensor
    b: Tensor


def _check_core_args(query: Tensor, keys: Tensor, label_smoothing: float) -> None:
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            "query and keys must be (N, D) and (M, D) with the same D, "
            f"got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)


def _tile_rows(
    chunk_size: ChunkSize, n: int, m: int, dtype: torch.dtype, weights: NegativeLogWeights
) -> int | None:
    """Rows per tile for the chunked path, or None for the dense path.

    A weight tensor that requires grad needs the dense path (its gradient is an N×M tensor).
    """
    if isinstance(weights, Tensor) and weights.requires_grad and torch.is_grad_enabled():
        return None
    return chunked.resolve_chunk_size(check_chunk_size(chunk_size), n, m, dtype)


def _resolve_weights(weights: NegativeLogWeights, logits: Tensor) -> Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.shape != logits.shape:
            raise ValueError(
                f"negative_log_weights must have shape {tuple(logits.shape)} (queries, keys), "
                f"got {tuple(weights.shape)}"
            )
        return weights
    rows = torch.arange(logits.shape[0], device=logits.device)
    cols = torch.arange(logits.shape[1], device=logits.device)
    return weights(logits.detach(), rows, cols)


def info_nce(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    spec: PairSpec | None = None,
    *,
    negative_log_weights: NegativeLogWeights = None,
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = None,
    reduced: bool = False,
) -> AnchorLosses:
    """Per-anchor InfoNCE of ``query`` against ``keys`` (formula: :mod:`embedloss.ops.anchors`).

    Args:
        query: ``(N, D)`` anchors (normalised by the caller if wanted).
        keys: ``(M, D)`` keys.
        scale: ``1/τ``, a float or a 0-d tensor (may require grad: learnable temperature).
        spec: Positives and exclusions; default: key ``i`` is the positive of query ``i``.
        negative_log_weights: ``(N, M)`` tensor or a :data:`LogWeightFn`; added to non-positive
            logits in the denominator (hard-negative reweighting).
        label_smoothing: ε in [0, 1], spread uniformly over ``A(i)``.
        chunk_size: ``None`` (dense), an int (tiles of that many query rows, see
            :mod:`embedloss.ops.chunked`) or ``"auto"`` (dense for tiny problems, tiles above).
            Tiled and dense agree in value and gradient; the tiled path gives first-order
            gradients only.
        reduced: The caller only sums or averages the per-anchor losses (``reduction`` mean or
            sum), so their upstream gradient is the same for every anchor: the tiled path may
            then finish the gradients during the forward.

    Returns:
        :class:`AnchorLosses` with ``(N,)`` tensors.

    Example:
        >>> import math
        >>> q = torch.eye(3)
        >>> out = info_nce(q, q, scale=1.0)
        >>> torch.allclose(out.loss, torch.tensor(math.log(2 + math.e) - 1))
        True
    """
    spec = PairSpec() if spec is None else spec
    _check_core_args(query, keys, label_smoothing)
    n, m = query.shape[0], keys.shape[0]
    if spec.positive_index is None and spec.query_labels is None and m < n:
        raise ValueError(
            f"without positive_index or labels, keys need at least N={n} rows, got {m}"
        )
    chunk = _tile_rows(chunk_size, n, m, query.dtype, negative_log_weights)
    if chunk is not None:
        return chunked.chunked_info_nce(
            query,
            keys,
            scale,
            spec,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=chunk,
            reduced=reduced,
        )
    logits = (query @ keys.T) * scale  # (N, M)
    log_w = _resolve_weights(negative_log_weights, logits)
    return dense_anchor_losses(logits, spec, log_w, label_smoothing)


def _symmetric_local(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    labels: Tensor | None,
    negative_log_weights: NegativeLogWeights,
    label_smoothing: float,
    chunk_size: ChunkSize,
    reduced: bool,
) -> tuple[AnchorLosses, AnchorLosses]:
    """Both directions of a local paired batch from one logit matrix (or its tiles)."""
    n = x.shape[0]
    chunk = _tile_rows(chunk_size, n, n, x.dtype, negative_log_weights)
    if chunk is not None:
        return chunked.chunked_symmetric_info_nce(
            x,
            y,
            scale,
            labels=labels,
            negative_log_weights=negative_log_weights,
            label_smoothing=label_smoothing,
            chunk_size=chunk,
            reduced=reduced,
        )
    spec = PairSpec(query_labels=labels, key_labels=labels)
    logits = (x @ y.T) * scale  # (N, N)
    log_w = _resolve_weights(negative_log_weights, logits)
    log_w_t = None if log_w is None else log_w.T
    forward = dense_anchor_losses(logits, spec, log_w, label_smoothing)
    return forward, dense_anchor_losses(logits.T, spec, log_w_t, label_smoothing)


def symmetric_info_nce(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    negative_log_weights: NegativeLogWeights = None,
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = None,
    gather_distributed: bool = False,
    reduced: bool = False,
) -> tuple[AnchorLosses, AnchorLosses]:
    """InfoNCE in both directions of a paired batch (x→y rows, y→x columns), as in CLIP.

    Pair ``i`` of ``x`` and ``y`` is positive; with ``labels`` every pair of equal labels is.
    Locally one logit matrix serves both directions; ``negative_log_weights`` given as a tensor
    is the ``(N, N)`` x→y matrix and its transpose serves y→x. With ``gather_distributed`` the
    local rows of each side are scored against the gathered other side (one core call per
    direction; no negative weights). ``reduced`` is as in :func:`info_nce`.

    Returns:
        ``(x_to_y, y_to_x)`` per-anchor results.

    Example:
        >>> a, b = symmetric_info_nce(torch.eye(2), torch.eye(2), scale=1.0)
        >>> torch.allclose(a.loss, b.loss)
        True
    """
    _check_core_args(x, y, label_smoothing)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same N, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not gather_distributed:
        return _symmetric_local(
            x, y, scale, labels, negative_log_weights, label_smoothing, chunk_size, reduced
        )
    if negative_log_weights is not None:
        raise ValueError("negative_log_weights cannot be combined with gather_distributed")
    x_keys, x_spec = paired_layout(y, x, labels, gather_distributed=True)
    y_keys, y_spec = paired_layout(x, y, labels, gather_distributed=True)
    first = info_nce(
        x,
        y_keys,
        scale,
        y_spec,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
        reduced=reduced,
    )
    second = info_nce(
        y,
        x_keys,
        scale,
        x_spec,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
        reduced=reduced,
    )
    return first, second


def paired_symmetric(
    a: Tensor,
    b: Tensor,
    labels: Tensor | None,
    options: ContrastiveOptions,
    names: tuple[str, str] = ("z_a", "z_b"),
) -> PairedResult:
    """Checked, prepared and reduced :func:`symmetric_info_nce` of paired inputs (CLIP's loss).

    ``names`` name the inputs in errors. The loss averages the two directions (per pair for
    ``reduction="none"``).
    """
    check_pair(a, b, *names, labels)
    x, y = options.prepare(a, b)
    first, second = symmetric_info_nce(
        x,
        y,
        options.scale_as(x.dtype),
        labels=labels,
        label_smoothing=options.label_smoothing,
        chunk_size=options.chunk_size,
        gather_distributed=options.gather_distributed,
        reduced=options.reduced,
    )
    loss = (options.reduce(first) + options.reduce(second)) / 2
    return PairedResult(loss, (first, second), x, y)


def nt_xent(
    z_a: Tensor,
    z_b: Tensor,
    labels: Tensor | None,
    options: ContrastiveOptions,
    *,
    decoupled: bool = False,
) -> PairedResult:
    """NT-Xent (SimCLR) over the 2n anchors ``[z_a; z_b]``, checked, prepared and reduced.

    Each anchor's positive is its other view (with ``labels``: every other view of its label)
    and the anchor itself leaves the denominator; ``decoupled`` also removes the positives from
    it (DCL). ``anchors[0]`` holds the ``(2n,)`` per-anchor results.
    """
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    a, b = options.prepare(z_a, z_b)
    query, keys, spec = two_view_layout(a, b, labels, options.gather_distributed)
    if decoupled:
        spec = dataclasses.replace(spec, positive_in_denominator=False)
    scale = options.scale_as(a.dtype)
    result = info_nce(
        query, keys, scale, spec, chunk_size=options.chunk_size, reduced=options.reduced
    )
    return PairedResult(options.reduce(result), (result,), a, b)
