"""Metrics for embeddings: retrieval recall@k, accuracy, alignment/uniformity, effective rank.

``recall_at_k``, ``accuracy`` and ``effective_rank`` are evaluation quantities: they run under
``torch.no_grad()`` and return Python floats. ``alignment`` and ``uniformity`` return tensors and
are differentiable, because :class:`~embedloss.multimodal.AlignmentUniformityLoss` is built
from them; wrap them in ``torch.no_grad()`` when they are only measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor

from embedloss._validation import (
    check_embeddings,
    check_int,
    check_labels,
    check_positive_float,
    check_same_dim,
    check_same_shape,
    check_tensor,
    compute_dtype,
)
from embedloss.ops.anchors import reduce_anchor_losses
from embedloss.ops.distances import (
    check_distance,
    pair_similarity,
    prepare_for_distance,
    prepared_pair,
)
from embedloss.ops.similarity import positive_mask_from_labels, prepare_embeddings
from embedloss.ops.statistics import alignment_per_anchor, log_uniformity

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["accuracy", "alignment", "effective_rank", "recall_at_k", "uniformity"]


def alignment(
    x: Tensor,
    y: Tensor,
    alpha: float = 2.0,
    *,
    labels: Tensor | None = None,
    key_labels: Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    r"""Alignment of positive pairs (Wang & Isola 2020, Eq. 4): ``E_(x,y)~pos ‖x − y‖₂^α``.

    Without labels the positive pairs are ``(x_i, y_i)`` (the official ``align_loss``:
    ``(x − y).norm(dim=1).pow(alpha).mean()``). With ``labels``, anchor ``x_i`` is aligned with
    every ``y_j`` of the same label (``key_labels``, default ``labels``) and its value is the
    mean over them; anchors with no such ``y_j`` are left out of the mean. Differentiable, with
    gradient 0 (not NaN) at coinciding points for any α > 0.

    Args:
        x: ``(N, D)`` anchors.
        y: ``(N, D)`` positives, or ``(M, D)`` keys when ``key_labels`` is given.
        alpha: α > 0 (default 2).
        labels: Optional ``(N,)`` identities of ``x``.
        key_labels: Optional ``(M,)`` identities of ``y`` (needs ``labels``).
        normalize: L2-normalise ``x`` and ``y`` first (default True; the paper's features lie
            on the unit hypersphere).
        reduction: ``"mean"`` or ``"none"`` (the ``(N,)`` per-anchor values).

    Raises:
        ValueError: For mismatched shapes, labels of the wrong length, α <= 0 or a bad reduction.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(alignment(x, x.flip(1)).item(), 6)  # each pair at distance √2: (√2)² = 2
        2.0
    """
    alpha = check_positive_float(alpha, "alpha")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'none'; got {reduction!r}")
    check_embeddings(x, "x")
    check_embeddings(y, "y")
    if key_labels is not None and labels is None:
        raise ValueError("key_labels needs labels (the identities of x) as well")
    if key_labels is None:
        check_same_shape(x, y, "x", "y")
    else:
        check_same_dim(x, y, "x", "y")
        check_labels(key_labels, y.shape[0], "key_labels")
    if labels is not None:
        check_labels(labels, x.shape[0])
    dtype = compute_dtype(x, y)
    x = prepare_embeddings(x, normalize=normalize, dtype=dtype)
    y = prepare_embeddings(y, normalize=normalize, dtype=dtype)
    return reduce_anchor_losses(alignment_per_anchor(x, y, alpha, labels, key_labels), reduction)


def uniformity(
    x: Tensor, t: float = 2.0, *, normalize: bool = True, gather_distributed: bool = False
) -> Tensor:
    r"""Uniformity (Wang & Isola 2020, Eq. 5): ``log E_{i<j} exp(−t·‖x_i − x_j‖₂²)``.

    The mean runs over the ``N(N−1)/2`` distinct pairs (the official ``uniform_loss``:
    ``torch.pdist(x).pow(2).mul(-t).exp().mean().log()``), computed in log space as
    ``logsumexp(−t·d²) − log(N(N−1)/2)`` so it stays finite for far-apart points. Lower is more
    uniform; on the unit sphere it is at least ``−4t``.

    With ``gather_distributed`` the embeddings of every rank are gathered and the value is that
    of the global batch on every rank; gradients reach each rank's embeddings as world size ×
    the single-process gradient (what DDP's averaging expects).

    Args:
        x: ``(N, D)`` embeddings, N >= 2 (over all ranks).
        t: The scale t > 0 (default 2).
        normalize: L2-normalise ``x`` first (default True).
        gather_distributed: Measure over the embeddings of all ranks.

    Raises:
        ValueError: For fewer than two embeddings or t <= 0.

    Example:
        >>> x = torch.eye(3)  # every pair at squared distance 2
        >>> round(uniformity(x, t=2.0).item(), 6)
        -4.0
    """
    t = check_positive_float(t, "t")
    check_embeddings(x, "x")
    x = prepare_embeddings(x, normalize=normalize, dtype=compute_dtype(x))
    return log_uniformity(x, t, gather_distributed)


def _ks(k: int | Sequence[int]) -> tuple[int, ...]:
    values = (k,) if isinstance(k, int) else tuple(k)
    if not values:
        raise ValueError("k must name at least one cut-off, got an empty sequence")
    return tuple(check_int(v, "k", low=1) for v in values)


def _hits(similarity: Tensor, positive: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@k of the rows: a row is a hit when fewer than k non-positives tie or beat its best positive."""
    best = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1)
    ahead = ((similarity >= best) & ~positive).sum(dim=1)  # (N,)
    valid = positive.any(dim=1)
    if not bool(valid.any()):
        raise ValueError("no query has a positive key; check labels and key_labels")
    return {k: (ahead[valid] < k).double().mean().item() for k in ks}


@torch.no_grad()
def recall_at_k(
    similarity: Tensor,
    keys: Tensor | None = None,
    *,
    k: int | Sequence[int] = (1, 5, 10),
    labels: Tensor | None = None,
    key_labels: Tensor | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    r"""Retrieval recall@k in both directions, and their average.

    ``recall_at_k(similarity)`` takes an ``(N, M)`` query–key similarity; ``recall_at_k(queries,
    keys)`` builds it as the cosine (``normalize=True``) or dot product of ``(N, D)`` queries and
    ``(M, D)`` keys. Without labels query ``i`` matches key ``i`` (square similarity). With
    ``labels`` (and ``key_labels`` for the keys, default ``labels``) a query is matched by every
    key of its label; a legacy target index per query is ``labels=targets,
    key_labels=torch.arange(M)``.

    A query is a hit at ``k`` when fewer than ``k`` non-matching keys score **at least** as high
    as its best matching key. Ties therefore count against the query, which makes the result
    deterministic and gives a collapsed embedding (all similarities equal) recall 0, not a lucky
    one. Queries with no matching key are left out. The reverse direction scores keys as
    queries against the queries (the transposed similarity).

    Args:
        similarity: ``(N, M)`` similarities, or ``(N, D)`` queries when ``keys`` is given.
        keys: Optional ``(M, D)`` keys.
        k: A cut-off or a sequence of cut-offs, each >= 1 (default ``(1, 5, 10)``).
        labels: Optional ``(N,)`` identities of the queries.
        key_labels: Optional ``(M,)`` identities of the keys (needs ``labels``).
        normalize: Cosine similarity of ``queries``/``keys`` (ignored for a similarity matrix).

    Returns:
        ``{"query_to_key_recall@k", "key_to_query_recall@k", "recall@k"}`` for each ``k``, as
        floats in [0, 1] (``recall@k`` is the mean of the two directions).

    Raises:
        ValueError: For a non-square similarity without labels, labels of the wrong length,
            ``k < 1``, or when no query has a matching key.

    Example:
        >>> sim = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # query 1 prefers key 0
        >>> r = recall_at_k(sim, k=(1, 2))
        >>> r["query_to_key_recall@1"], r["key_to_query_recall@1"], r["recall@2"]
        (0.5, 1.0, 1.0)
    """
    ks = _ks(k)
    check_tensor(similarity, "similarity")
    if keys is not None:
        check_embeddings(similarity, "queries")
        check_embeddings(keys, "keys")
        check_same_dim(similarity, keys, "queries", "keys")
        dtype = compute_dtype(similarity, keys)
        q = prepare_embeddings(similarity, normalize=normalize, dtype=dtype)
        similarity = q @ prepare_embeddings(keys, normalize=normalize, dtype=dtype).T
    elif similarity.dim() != 2 or similarity.numel() == 0:
        raise ValueError(
            f"similarity must be a non-empty (N, M) matrix, got shape {tuple(similarity.shape)}"
        )
    n, m = similarity.shape
    if key_labels is not None and labels is None:
        raise ValueError("key_labels needs labels (the identities of the queries) as well")
    if labels is None:
        if n != m:
            raise ValueError(
                f"without labels query i matches key i, so the similarity must be square, got "
                f"shape {(n, m)}; pass labels and key_labels for another ground truth"
            )
        positive = torch.eye(n, dtype=torch.bool, device=similarity.device)
    else:
        query_labels = check_labels(labels, n)
        if key_labels is None and n != m:
            raise ValueError(f"key_labels are needed for {m} keys and {n} queries")
        key_labels = (
            query_labels if key_labels is None else check_labels(key_labels, m, "key_labels")
        )
        positive = positive_mask_from_labels(
            query_labels.to(similarity.device), key_labels.to(similarity.device)
        )
    forward = _hits(similarity, positive, ks)
    backward = _hits(similarity.T, positive.T, ks)
    out: dict[str, float] = {}
    for c in ks:
        out[f"query_to_key_recall@{c}"] = forward[c]
        out[f"key_to_query_recall@{c}"] = backward[c]
        out[f"recall@{c}"] = (forward[c] + backward[c]) / 2
    return out


@torch.no_grad()
def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy of ``(N, C)`` logits against ``(N,)`` class indices.

    Ties go to the lowest class index (``argmax``), so the result is deterministic.

    Raises:
        ValueError: For logits that are not ``(N, C)``, targets of the wrong length or targets
            outside ``[0, C)``.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]]), torch.tensor([0, 1, 1]))
        0.666...
    """
    check_embeddings(logits, "logits")
    check_labels(targets, logits.shape[0], "targets")
    if bool(((targets < 0) | (targets >= logits.shape[1])).any()):
        raise ValueError(
            f"targets must be class indices in [0, {logits.shape[1]}), got values from "
            f"{int(targets.min())} to {int(targets.max())}"
        )
    return (logits.argmax(dim=1) == targets.to(logits.device)).double().mean().item()


@torch.no_grad()
def effective_rank(embeddings: Tensor, *, center: bool = False) -> float:
    r"""Effective rank of an ``(N, D)`` matrix (Roy & Vetterli 2007, Def. 1 and Eq. 3).

    With singular values ``σ_k`` and ``p_k = σ_k / Σ_j σ_j``, the effective rank is the exponential
    of the entropy of ``p``: ``erank = exp(−Σ_k p_k·log p_k)`` (``0·log 0 = 0``). It lies between
    1 and the rank, and measures dimensional collapse of embeddings. Computed in float64; an
    all-zero matrix gives 0.

    Args:
        embeddings: ``(N, D)``.
        center: Subtract the mean embedding first (Roy & Vetterli do not; default False).

    Example:
        >>> round(effective_rank(torch.eye(4)), 6)
        4.0
        >>> round(effective_rank(torch.ones(5, 3)), 6)  # rank one
        1.0
    """
    check_embeddings(embeddings, "embeddings")
    x = embeddings.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    return math.exp(-torch.special.xlogy(p, p).sum().item())


# ------------------------------------------------------------------------- retrieval metrics


def _retrieval_inputs(
    embeddings: Tensor,
    labels: Tensor,
    reference: Tensor | None,
    reference_labels: Tensor | None,
    distance: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """Checked, prepared ``(queries, labels, references, reference labels, self excluded)``."""
    check_distance(distance)
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0])
    if (reference is None) != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together")
    if reference is None or reference_labels is None:
        q = prepare_for_distance(
            embeddings, distance, normalize=False, dtype=compute_dtype(embeddings)
        )
        return q, labels, q, labels, True
    check_embeddings(reference, "reference")
    check_same_dim(embeddings, reference, "embeddings", "reference")
    check_labels(reference_labels, reference.shape[0], "reference_labels")
    q, r = prepared_pair(embeddings, reference, distance, normalize=False)
    return q, labels, r, reference_labels.to(labels.device), False


@torch.no_grad()
def retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    *,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    distance: str = "cosine",
    chunk_size: int = 1024,
) -> dict[str, float]:
    r"""Precision@1, R-precision and MAP@R of label retrieval (Musgrave et al. 2020, §3.2).

    Each query ranks the references by ``distance`` (:mod:`embedloss.ops.distances`; closest
    first, ties in reference order). With ``R`` the number of references sharing the query's
    label and ``rel(k)`` whether the ``k``-th reference does:

    * ``precision_at_1`` = ``rel(1)``;
    * ``r_precision`` = ``(1/R)·Σ_{k≤R} rel(k)``;
    * ``map_at_r`` = ``(1/R)·Σ_{k≤R} P(k)·rel(k)``, with ``P(k)`` the precision at ``k``;

    each averaged over the queries with ``R > 0``. Without ``reference`` the queries retrieve
    among themselves and each query is left out of its own ranking (pytorch-metric-learning's
    ``AccuracyCalculator`` with ``ref_includes_query``). Queries are scored in row tiles of
    ``chunk_size`` (memory O(chunk·M)).

    Args:
        embeddings: ``(N, D)`` queries.
        labels: ``(N,)`` their labels.
        reference: Optional ``(M, D)`` references (default: the queries themselves).
        reference_labels: ``(M,)`` labels of ``reference`` (given with it).
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.
        chunk_size: Queries per tile (default 1024).

    Returns:
        ``{"precision_at_1", "r_precision", "map_at_r"}`` as floats in [0, 1].

    Raises:
        ValueError: For mismatched shapes, an unknown distance, ``reference`` without
            ``reference_labels``, or when no query has a reference of its label.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.0, 1.0], [0.5, 0.5], [0.3, 0.7]])
        >>> retrieval_metrics(x, torch.tensor([0, 0, 1, 1, 1]))
        {'precision_at_1': 0.6, 'r_precision': 0.7, 'map_at_r': 0.65}
    """
    q, q_labels, ref, ref_labels, exclude_self = _retrieval_inputs(
        embeddings, labels, reference, reference_labels, distance
    )
    chunk = check_int(chunk_size, "chunk_size", low=1)
    sums = torch.zeros(3, dtype=torch.float64)
    counted = 0
    cols = torch.arange(ref.shape[0], device=ref.device)
    for start in range(0, q.shape[0], chunk):
        stop = min(start + chunk, q.shape[0])
        score = pair_similarity(q[start:stop], ref, distance)  # (c, M), larger = closer
        same = q_labels[start:stop].unsqueeze(1) == ref_labels.unsqueeze(0)  # (c, M)
        if exclude_self:
            own = torch.arange(start, stop, device=ref.device).unsqueeze(1) == cols.unsqueeze(0)
            score = score.masked_fill(own, float("-inf"))
            same = same & ~own
        r = same.sum(dim=1)  # (c,)
        keep = r > 0
        order = score.argsort(dim=1, descending=True, stable=True)
        rel = same.gather(1, order).double()  # (c, M): relevance by rank
        ranks = torch.arange(1, ref.shape[0] + 1, dtype=torch.float64, device=rel.device)
        within_r = ranks.unsqueeze(0) <= r.unsqueeze(1)
        hits = (rel * within_r).sum(dim=1)
        precision = rel.cumsum(dim=1) / ranks
        ap = (precision * rel * within_r).sum(dim=1)
        r_safe = r.clamp(min=1).double()
        per_query = torch.stack([rel[:, 0], hits / r_safe, ap / r_safe], dim=1)  # (c, 3)
        sums += per_query[keep].sum(dim=0).cpu()
        counted += int(keep.sum())
    if counted == 0:
        raise ValueError("no query has a reference with its label; check labels")
    p1, rp, mapr = (sums / counted).tolist()
    return {"precision_at_1": p1, "r_precision": rp, "map_at_r": mapr}


class RetrievalOptions(TypedDict, total=False):
    """The keyword options of :func:`retrieval_metrics`, shared by the single-metric functions."""

    reference: Tensor | None
    reference_labels: Tensor | None
    distance: str
    chunk_size: int


def precision_at_1(
    embeddings: Tensor, labels: Tensor, **options: Unpack[RetrievalOptions]
) -> float:
    """Precision@1 of :func:`retrieval_metrics` (same arguments).

    Example:
        >>> precision_at_1(torch.eye(2).repeat(2, 1), torch.tensor([0, 1, 0, 1]))
        1.0
    """
    return retrieval_metrics(embeddings, labels, **options)["precision_at_1"]


def r_precision(embeddings: Tensor, labels: Tensor, **options: Unpack[RetrievalOptions]) -> float:
    """R-precision of :func:`retrieval_metrics` (same arguments)."""
    return retrieval_metrics(embeddings, labels, **options)["r_precision"]


def map_at_r(embeddings: Tensor, labels: Tensor, **options: Unpack[RetrievalOptions]) -> float:
    """MAP@R of :func:`retrieval_metrics` (same arguments)."""
    return retrieval_metrics(embeddings, labels, **options)["map_at_r"]


__all__ += ["map_at_r", "precision_at_1", "r_precision", "retrieval_metrics"]
