"""Normalisation, similarity and positive masks: the building blocks every loss shares."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from embedloss._validation import check_labels, check_positive_float, on_host
from embedloss.ops.distributed import gather_with_grad

__all__ = [
    "SimilarityGap",
    "inverse_temperature",
    "group_counts",
    "l2_normalize",
    "label_codes",
    "labels_from_match_ids",
    "mean_pair_similarity",
    "pair_similarity_terms",
    "positive_mask_from_labels",
    "power_of_two_above",
    "prepare_embeddings",
    "scale_from_logit",
    "similarity_gap",
    "similarity_matrix",
]


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Scale ``x`` to unit L2 norm along ``dim``, at any scale; a zero row stays zero.

    Each row is first divided by the power of two nearest above its largest entry (exact, so an
    ordinary row gives exactly ``F.normalize``'s result), so its squares neither overflow nor
    underflow: rows scaled by 1e19 or 1e-20 normalise as well as rows of norm 1. The scaled norm
    of a non-zero row is at least 0.5, so ``eps`` < 0.5 acts on zero rows only: they are scaled
    by ``1/eps``, stay zero, and pass the upstream gradient through (``F.normalize``'s ``1/eps``
    would overflow in half precision). The gradient is written out (:class:`_UnitRows`), so the
    rescaling costs no more than autograd through ``F.normalize``; it is differentiable again.

    Half-precision inputs are normalised in float32, so the result is float32 for them.

    Example:
        >>> l2_normalize(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return _UnitRows.apply(x, dim, eps)[0]


class _UnitRows(torch.autograd.Function):
    """``(y, 1/n)``: the rows of ``x`` over their norms ``n``, computed at a safe scale.

    Backward: ``∂L/∂x = (g − y·⟨g, y⟩)/n`` for the rows, and ``−y·g'/n²`` for the returned
    ``1/n`` (which only a second derivative reaches: both outputs keep the graph exact).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor]:
        scale = power_of_two_above(x.abs().amax(dim, keepdim=True), zero=1 / eps)
        scaled = x / scale
        norm = torch.linalg.vector_norm(scaled, dim=dim, keepdim=True).clamp_min(eps)
        y, inverse = scaled / norm, 1 / (norm * scale)
        ctx.dim = dim
        ctx.save_for_backward(y, inverse)
        return y, inverse

    @staticmethod
    def backward(ctx: Any, g: Tensor, g_inverse: Tensor | None) -> tuple[Tensor, None, None]:
        y, inverse = ctx.saved_tensors
        grad = torch.addcmul(g, y, (g * y).sum(ctx.dim, keepdim=True), value=-1).mul_(inverse)
        if g_inverse is not None:
            grad = grad - y * (g_inverse * inverse * inverse)
        return grad, None, None


def power_of_two_above(peak: Tensor, zero: float = 1.0) -> Tensor:
    """``2^e`` for each ``peak = m·2^e`` (``m`` in [0.5, 1)), and ``zero`` where ``peak`` is 0.

    Dividing values whose largest magnitude is ``peak`` by it is exact and leaves them in
    [0.5, 1): their squares and sums of squares neither overflow nor underflow.

    Example:
        >>> power_of_two_above(torch.tensor([3.0, 0.25, 0.0]))
        tensor([4.0000, 0.5000, 1.0000])
    """
    return torch.where(peak > 0, peak / torch.frexp(peak).mantissa, zero)


def similarity_matrix(a: Tensor, b: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Scaled dot products ``scale * a @ b.T``: logits of shape ``(N, M)`` for ``a (N, D)``, ``b (M, D)``.

    Example:
        >>> similarity_matrix(torch.eye(2), torch.eye(2), scale=2.0)
        tensor([[2., 0.],
                [0., 2.]])
    """
    return (a @ b.transpose(-2, -1)) * scale


def positive_mask_from_labels(query_labels: Tensor, key_labels: Tensor | None = None) -> Tensor:
    """Boolean mask ``(N, M)``, true where a query and a key share a label.

    Example:
        >>> positive_mask_from_labels(torch.tensor([0, 1, 0]))
        tensor([[ True, False,  True],
                [False,  True, False],
                [ True, False,  True]])
    """
    keys = query_labels if key_labels is None else key_labels
    return query_labels.unsqueeze(1) == keys.unsqueeze(0)


def label_codes(labels: Tensor) -> Tensor:
    """Group ids in ``[0, N)`` of ``labels (N,)``: equal labels get equal codes.

    A code is the position of the label's first occurrence in sorted order, so the result has
    a fixed shape and is computed without reading a value back to the host (unlike
    ``torch.unique``): per-group sums can use ``(N, ...)`` buffers and ``index_add``. Labels of
    any integer or bool dtype are compared as int64 (a cast that keeps equality), since
    ``searchsorted`` supports neither bool nor the wide unsigned dtypes.

    Example:
        >>> label_codes(torch.tensor([7, 3, 7, 5]))
        tensor([2, 0, 2, 1])
    """
    flat = labels.reshape(-1).long()
    return torch.searchsorted(flat.sort().values, flat)


def group_counts(codes: Tensor) -> Tensor:
    """``(N,)`` sizes of the groups of :func:`label_codes` ``codes``, indexed by code.

    ``group_counts(codes)[codes]`` is, for each entry, how many entries share its label.
    """
    return torch.zeros_like(codes).index_add_(0, codes, torch.ones_like(codes))


def labels_from_match_ids(
    match_ids: Sequence[Hashable] | Tensor, device: torch.device | None = None
) -> Tensor:
    """Turn legacy ``match_ids`` (a list of hashables; equal ids are positives) into integer labels.

    Ids are numbered in order of first appearance, so the result is deterministic.

    Raises:
        TypeError: If ``match_ids`` is not a sequence of hashable values or an integer tensor.

    Example:
        >>> labels_from_match_ids(["cat", "dog", "cat"])
        tensor([0, 1, 0])
    """
    if isinstance(match_ids, Tensor):
        return check_labels(
            match_ids, match_ids.shape[0] if match_ids.dim() else -1, "match_ids"
        ).to(device)
    if isinstance(match_ids, (str, bytes)) or not isinstance(match_ids, Sequence):
        raise TypeError(f"match_ids must be a list of hashable ids, got {type(match_ids).__name__}")
    index: dict[Hashable, int] = {}
    try:
        codes = [index.setdefault(m, len(index)) for m in match_ids]
    except TypeError as err:
        raise TypeError(f"match_ids must contain hashable ids: {err}") from None
    return torch.tensor(codes, dtype=torch.long, device=device)


def inverse_temperature(
    temperature: Tensor | float, dtype: torch.dtype | None = None
) -> Tensor | float:
    """``1/τ`` for a float τ (checked finite and > 0) or a 0-d tensor τ (kept differentiable).

    A tensor τ is checked only when it is on the CPU (no device synchronisation otherwise) and
    cast to ``dtype`` when one is given.

    Raises:
        ValueError: If τ is not finite and positive, or a tensor τ has more than one element.
    """
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}"
            )
        if on_host(temperature):
            value = float(temperature.detach())
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        tau = temperature.reshape(())
        return 1.0 / (tau if dtype is None else tau.to(dtype))
    return 1.0 / check_positive_float(temperature, "temperature")


def scale_from_logit(
    logit_scale: Tensor, dtype: torch.dtype, max_logit_scale: float | None = None
) -> Tensor:
    """``1/τ = exp(logit_scale)`` in ``dtype``, the log-scale clamped at ``max_logit_scale``.

    CLIP stores a learnable temperature as ``logit_scale = log(1/τ)`` and clamps it at
    ``log 100``; the cast comes first so that the exponential is computed in ``dtype``.
    """
    ls = logit_scale.reshape(()).to(dtype)
    if max_logit_scale is not None:
        ls = ls.clamp(max=max_logit_scale)
    return ls.exp()


def prepare_embeddings(x: Tensor, *, normalize: bool, dtype: torch.dtype) -> Tensor:
    """Cast ``x`` to the compute ``dtype`` (halves go to float32) and L2-normalise if asked."""
    x = x.to(dtype)
    return l2_normalize(x) if normalize else x


@torch.no_grad()
def mean_pair_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Mean ``a_i·b_i`` of matched rows ``(N, D)`` (the mean cosine for normalised inputs), detached.

    Example:
        >>> mean_pair_similarity(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        tensor(0.5000)
    """
    return (a * b).sum(-1).mean()


@torch.no_grad()
def pair_similarity_terms(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Mean cosine of matched pairs and of mismatched pairs, in O(N·D) (normalised inputs)."""
    n = a.shape[0]
    matched = (a * b).sum(-1)  # (N,)
    total = a.sum(0) @ b.sum(0)  # Σ_ij a_i·b_j without an N×N matrix
    mismatched = (total - matched.sum()) / max(n * (n - 1), 1)
    return {"positive_similarity": matched.mean(), "negative_similarity": mismatched}


class SimilarityGap(NamedTuple):
    """Mean cosine of positive pairs and of negative pairs (float64, detached)."""

    positive: Tensor
    negative: Tensor

    @property
    def gap(self) -> Tensor:
        """``positive − negative``."""
        return self.positive - self.negative


@torch.no_grad()
def similarity_gap(
    z_a: Tensor, z_b: Tensor, labels: Tensor | None = None, *, gather_distributed: bool = False
) -> SimilarityGap:
    """Mean cosine of the positive pairs ``(i, j)`` (``i = j``, or equal labels) and of the rest.

    Computed in float64 in O(N·D) from per-identity sums, without an N×N matrix: the positive
    sum is ``Σ_c (Σ_{i∈c} a_i)·(Σ_{j∈c} b_j)``. With no negative pair the negative mean is 0.
    With ``gather_distributed`` the statistics are those of the batch of every rank.

    Example:
        >>> stats = similarity_gap(torch.eye(3), torch.eye(3))
        >>> stats.positive.item(), stats.negative.item()
        (1.0, 0.0)
    """
    a = l2_normalize(gather_with_grad(z_a.detach(), gather_distributed).tensor.double())
    b = l2_normalize(gather_with_grad(z_b.detach(), gather_distributed).tensor.double())
    n = a.shape[0]
    if labels is None:
        codes = torch.arange(n, device=a.device)
    else:
        labels = gather_with_grad(labels, gather_distributed).tensor
        codes = label_codes(labels)
    sum_a = a.new_zeros(a.shape).index_add_(0, codes, a)  # (n, D): per-group sums, by code
    sum_b = b.new_zeros(b.shape).index_add_(0, codes, b)
    positive_sum = (sum_a * sum_b).sum()
    positive_count = group_counts(codes).double().square().sum()
    negative_count = n * n - positive_count
    negative_sum = a.sum(0) @ b.sum(0) - positive_sum
    negative = torch.where(
        negative_count > 0, negative_sum / negative_count.clamp(min=1), negative_sum.new_zeros(())
    )
    return SimilarityGap(positive_sum / positive_count, negative)
