"""MoCo: InfoNCE against a FIFO queue of past keys (He et al. 2020; MoCo v2, Chen et al. 2020)."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_int,
    check_labels,
    check_pair,
    check_tensor,
    describe,
)
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.anchors import (
    AnchorLosses,
    PairSpec,
    anchor_losses_from_logits,
    direction_terms,
    pair_masks,
)
from embedloss.ops.distributed import Gathered, gather_with_grad
from embedloss.ops.info_nce import ContrastiveOptions
from embedloss.registry import register_loss

__all__ = ["MoCoLoss", "moco_loss"]


class _Batch(NamedTuple):
    loss: Tensor  # reduced (directions averaged when symmetric)
    directions: tuple[AnchorLosses, ...]  # query→key, and key→query when symmetric
    q: Tensor  # (n, D) prepared queries
    k: Tensor  # (n, D) prepared keys
    bank: Tensor  # (K, D) prepared queue entries scored
    keys: Tensor  # (N, D) prepared keys of every rank, in rank order: what the queue receives
    queries: Tensor  # (N, D) prepared queries of every rank (the query queue of symmetric MoCo)
    labels: Tensor | None  # (N,) labels of every rank


def _check_inputs(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None,
    labels: Tensor | None,
    queue_labels: Tensor | None,
    query_queue: Tensor | None,
    symmetric: bool,
) -> None:
    check_pair(query, key, "query", "key", labels)
    if queue is None:
        if queue_labels is not None or query_queue is not None:
            raise ValueError("queue_labels and query_queue need a queue")
        return
    dim = query.shape[1]
    for name, past in (("queue", queue), ("query_queue", query_queue)):
        if past is None:
            continue
        check_tensor(past, name)
        if past.dim() != 2 or not past.is_floating_point() or past.shape[1] != dim:
            raise ValueError(
                f"{name} must be a floating-point (K, D={dim}) tensor of past embeddings, "
                f"got {describe(past)}"
            )
    if query_queue is not None and query_queue.shape != queue.shape:
        raise ValueError(
            f"query_queue must have the queue's shape {tuple(queue.shape)}, "
            f"got {tuple(query_queue.shape)}"
        )
    if symmetric and query_queue is None:
        raise ValueError(
            "symmetric=True scores key→query against past queries: pass query_queue (K, D)"
        )
    if queue_labels is not None:
        if labels is None:
            raise ValueError("queue_labels mask same-label queue entries and need labels")
        check_labels(queue_labels, queue.shape[0], "queue_labels")
    elif labels is not None and queue.shape[0] > 0:
        raise ValueError(
            "labels mask same-label queue entries: pass queue_labels (K,) with a queue"
        )


class _Options(NamedTuple):
    in_batch_negatives: bool
    symmetric: bool
    queue_positives: bool = False

    def checked(self, labels: Tensor | None) -> _Options:
        flags = _Options(*(check_bool(v, n) for n, v in zip(self._fields, self, strict=True)))
        if flags.queue_positives and labels is None:
            raise ValueError(
                "queue_positives=True counts same-label queue entries as positives and needs labels"
            )
        return flags


def _moco(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None,
    query_queue: Tensor | None,
    labels: Tensor | None,
    queue_labels: Tensor | None,
    options: ContrastiveOptions,
    flags: _Options,
) -> _Batch:
    """Both directions (the second only when symmetric), reduced, and what the queue receives."""
    q, k = options.prepare(query, key)
    scale = options.scale_as(q.dtype)
    gather = options.gather_distributed
    gk = gather_with_grad(k, gather)
    gq = gather_with_grad(q, gather and flags.symmetric)
    all_labels = None if labels is None else gather_with_grad(labels, gather).tensor
    bank, past = (
        k.new_zeros((0, k.shape[1])) if x is None else options.prepare(x.to(q.dtype))[0]
        for x in (queue, query_queue)
    )

    def direction(
        anchor: Tensor, positive: Tensor, batch: Gathered, queued: Tensor
    ) -> AnchorLosses:
        """Anchors ``(n, D)`` against ``[own positive | other in-batch embeddings | queued]``.

        MoCo's layout (Algorithm 1: ``logits = cat([l_pos, l_neg])``): column 0 holds each
        anchor's own positive, so keys differ per anchor and the dense kernel of the core is
        used. With in-batch negatives, ``batch`` holds the embeddings of every rank (the
        anchor's own row, at ``offset + i``, is removed); with labels, same-label columns other
        than column 0 leave the denominator, or, with ``queue_positives``, join column 0 as
        positives (and stay in the denominator).
        """
        others = batch.tensor if flags.in_batch_negatives else None
        negatives = queued if others is None else torch.cat([others, queued])  # (M + K, D)
        l_pos = (anchor * positive).sum(-1, keepdim=True)  # (n, 1)
        logits = torch.cat([l_pos, anchor @ negatives.T], dim=1) * scale  # (n, 1 + M + K)
        rows = torch.arange(anchor.shape[0], device=anchor.device)
        cols = torch.arange(logits.shape[1], device=anchor.device)
        key_labels = None
        if labels is not None:
            # Column 0 is every row's positive, so its label never masks it: any value will do
            # (a placeholder, since a rank of a distributed batch may hold no anchor to copy).
            parts = (labels.new_zeros(1), None if others is None else all_labels, queue_labels)
            key_labels = torch.cat([part for part in parts if part is not None])
        spec = PairSpec(
            positive_index=torch.zeros_like(rows),
            query_labels=labels,
            key_labels=key_labels,
            labels_mark="positives" if flags.queue_positives else "false_negatives",
            self_index=None if others is None else rows + 1 + batch.offset,
        )
        positive_mask, denominator = pair_masks(spec, rows, cols)
        if flags.queue_positives:  # column 0 is every row's own key
            positive_mask = positive_mask | (cols == 0)
        return anchor_losses_from_logits(logits, positive_mask, denominator)

    directions: tuple[AnchorLosses, ...] = (direction(q, k, gk, bank),)
    loss = options.reduce(directions[0])
    if flags.symmetric:
        directions += (direction(k, q, gq, past),)
        loss = (loss + options.reduce(directions[1])) / 2
    return _Batch(loss, directions, q, k, bank, gk.tensor.detach(), gq.tensor.detach(), all_labels)


def moco_loss(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.2,
    labels: Tensor | None = None,
    queue_labels: Tensor | None = None,
    query_queue: Tensor | None = None,
    in_batch_negatives: bool = False,
    symmetric: bool = False,
    queue_positives: bool = False,
    reduction: str = "mean",
    normalize: bool = True,
    gather_distributed: bool = False,
) -> Tensor:
    r"""MoCo's InfoNCE of queries against their keys and a queue of past keys (stateless).

    For normalised query ``q_i``, its key ``k_i`` and queue entries ``u_1..u_K``
    (He et al. 2020, Eq. 1; Algorithm 1 ``logits = [q·k₊, q·queue]``):

        ℓ_i = −log( exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_{m∈Q(i)} exp(q_i·u_m/τ)) )

    ``Q(i)`` is the queue without the entries whose label equals ``labels[i]`` (false
    negatives), plus, with ``in_batch_negatives``, the other in-batch keys (again without
    same-label ones). With ``queue_positives`` those same-label entries count as extra
    positives instead, as pytorch-metric-learning's ``CrossBatchMemory`` around a SupCon loss
    does: with ``P(i)`` the own key and the same-label entries and ``A(i)`` every scored key,
    ``ℓ_i = log Σ_{a∈A(i)} exp(q_i·a/τ) − mean_{p∈P(i)} q_i·p/τ`` (Khosla et al. 2020, Eq. 2).
    With ``symmetric``, keys are also anchors against their queries and the ``query_queue`` of
    past queries, and the two directions are averaged. An empty queue adds nothing: without
    in-batch negatives the loss is then exactly 0.

    Args:
        query: ``(n, D)`` queries.
        key: ``(n, D)`` keys; row ``i`` is the positive of query ``i`` (usually from a
            :class:`~embedloss.contrastive.MomentumEncoder`, without grad).
        queue: ``(K, D)`` past keys (the negatives), or None for none.
        temperature: τ > 0 (default 0.2, MoCo v2).
        labels: Optional ``(n,)`` identities; same-label keys are not negatives.
        queue_labels: ``(K,)`` labels of the queue entries (required with labels and a queue).
        query_queue: ``(K, D)`` past queries, the negatives of the key→query direction.
        in_batch_negatives: Also contrast against the other keys of the batch (all ranks).
        symmetric: Also score key→query and average the directions.
        queue_positives: Same-label queue entries (and in-batch keys) are positives, not only
            excluded negatives (needs labels).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(n,)``, directions averaged per pair).
        normalize: L2-normalise query, key and queues (default True).
        gather_distributed: In-batch negatives from every rank; losses reduced over ranks.

    Shape:
        query, key: ``(n, D)``; queue, query_queue: ``(K, D)``; output: scalar or ``(n,)``.

    Raises:
        ValueError: For mismatched shapes, labels of the wrong length, labels without
            queue_labels (or the reverse), a missing query_queue with ``symmetric``,
            ``queue_positives`` without labels, or τ <= 0.

    Example:
        >>> import math
        >>> q = torch.eye(2, 4)
        >>> queue = torch.eye(4)[2:]  # two past keys, orthogonal to the queries
        >>> loss = moco_loss(q, q, queue, temperature=1.0)
        >>> round(loss.item(), 6) == round(math.log(math.e + 2) - 1, 6)
        True
    """
    _check_inputs(query, key, queue, labels, queue_labels, query_queue, symmetric)
    options = ContrastiveOptions.create(temperature, reduction, normalize, None, gather_distributed)
    flags = _Options(in_batch_negatives, symmetric, queue_positives).checked(labels)
    return _moco(query, key, queue, query_queue, labels, queue_labels, options, flags).loss


@register_loss("moco", aliases=("memory_queue",))
class MoCoLoss(BaseContrastiveLoss):
    """MoCo v2 contrastive loss with a FIFO queue of past keys (He et al. 2020; Chen et al. 2020).

    See :func:`moco_loss` for the formula. The queue lives in buffers (``queue``, and
    ``query_queue`` when symmetric, ``queue_labels``, ``queue_labeled``, ``queue_ptr``,
    ``queue_count``), so ``state_dict`` round-trips it exactly. Semantics:

    * the queue **starts empty**; only filled entries are scored (no random initialisation);
    * keys are enqueued **after** the loss, FIFO (a batch may wrap around), in training only;
    * with ``gather_distributed`` the keys of every rank are enqueued, in rank order;
    * with ``labels`` the queue stores them (same-label entries: as :func:`moco_loss`);
      passing labels while entries enqueued without them are queued raises (call
      :meth:`reset_queue`);
    * it is allocated on the first call, with the keys' size, device and compute dtype.

    No temperature warm-up (the legacy ``MemoryQueueContrastiveLoss`` eased τ from 1.3·τ).
    For the EMA key encoder see :class:`~embedloss.contrastive.MomentumEncoder`.

    Terms: ``accuracy`` (the key outscores every negative), ``positive_similarity`` (mean cosine
    of query and key), ``negative_similarity`` (mean cosine of queries and queue entries),
    ``queue_fill`` (fraction of the queue scored, before this batch is enqueued),
    ``temperature``; with ``symmetric``, ``loss_query_to_key`` and ``loss_key_to_query``.

    Args:
        temperature, in_batch_negatives, symmetric, queue_positives, gather_distributed: As
            :func:`moco_loss`.
        queue_size: K, the number of past keys kept (default 65536).
        learnable_temperature: Learn ``logit_scale = log(1/τ)`` (clamped at 100).

    Raises:
        ValueError: For ``queue_size < 1``, τ <= 0, a batch larger than the queue, a key size
            different from the queue's, labels while unlabeled entries are queued, a call
            without labels with ``queue_positives``, or inputs on another device than the
            loss's buffers.

    Example:
        >>> from embedloss.contrastive import MomentumEncoder
        >>> encoder = torch.nn.Linear(16, 8)
        >>> key_encoder = MomentumEncoder(encoder, momentum=0.99)
        >>> loss_fn = MoCoLoss(queue_size=32)
        >>> x = torch.randn(4, 16)
        >>> out = loss_fn.compute(encoder(x), key_encoder(x + 0.1 * torch.randn(4, 16)))
        >>> out.loss.item(), out.terms["queue_fill"].item()  # empty queue: nothing to contrast
        (0.0, 0.0)
        >>> key_encoder.update()
        >>> loss_fn(encoder(x), key_encoder(x)).item() > 0, int(loss_fn.queue_count)
        (True, 8)
    """

    queue: Tensor
    query_queue: Tensor
    queue_labels: Tensor
    queue_labeled: Tensor
    queue_ptr: Tensor
    queue_count: Tensor

    def __init__(
        self,
        *,
        temperature: float = 0.2,
        queue_size: int = 65536,
        in_batch_negatives: bool = False,
        symmetric: bool = False,
        queue_positives: bool = False,
        learnable_temperature: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        # Dense: MoCo's per-query positive column makes the keys differ per query (no tiling).
        super().__init__(
            temperature=temperature,
            learnable_temperature=learnable_temperature,
            reduction=reduction,
            normalize=normalize,
            chunk_size=None,
            gather_distributed=gather_distributed,
        )
        self.queue_size = check_int(queue_size, "queue_size", low=1)
        self.in_batch_negatives = check_bool(in_batch_negatives, "in_batch_negatives")
        self.symmetric = check_bool(symmetric, "symmetric")
        self.queue_positives = check_bool(queue_positives, "queue_positives")
        for name in self._queue_names():
            self.register_buffer(name, torch.zeros(0, 0))
        self.register_buffer("queue_labels", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_labeled", torch.zeros(queue_size, dtype=torch.bool))
        self._init_counter("queue_ptr")
        self._init_counter("queue_count")
        # A host copy of the labelled flags (it follows from whether labels were passed), so
        # that the step path checks the queue without reading a buffer back from the device.
        self._labeled_host = bytearray(queue_size)
        self._register_load_state_dict_pre_hook(self._adopt_stored_queue)
        self.register_load_state_dict_post_hook(MoCoLoss._read_labeled_back)

    def _queue_names(self) -> tuple[str, ...]:
        return ("queue", "query_queue") if self.symmetric else ("queue",)

    @torch.no_grad()
    def reset_queue(self) -> None:
        """Empty the queue (entries are forgotten; the allocated storage is kept)."""
        for name in (*self._queue_names(), "queue_labels", "queue_labeled"):
            getattr(self, name).zero_()
        self._set_counter("queue_ptr", 0)
        self._set_counter("queue_count", 0)
        self._labeled_host = bytearray(self.queue_size)

    def _filled(self, dim: int, labels: Tensor | None) -> tuple[Tensor | None, ...]:
        """The scored part of the queues: ``(queue, query_queue, queue_labels)``, or Nones."""
        count = self._counter("queue_count")
        if count == 0:
            return None, None, None
        if self.queue.shape[1] != dim:
            raise ValueError(
                f"key embedding size D={dim} does not match the queue's D={self.queue.shape[1]}; "
                "use a new MoCoLoss for a new embedding size"
            )
        if labels is not None and self._labeled_host.count(0, 0, count):
            raise ValueError(
                "labels were given but the queue holds keys enqueued without labels; pass labels "
                "on every call or call reset_queue()"
            )
        # Clones: autograd keeps the bank for backward, and _enqueue overwrites the buffer in place.
        past_queries = self.query_queue[:count].clone() if self.symmetric else None
        bank_labels = None if labels is None else self.queue_labels[:count]
        return self.queue[:count].clone(), past_queries, bank_labels

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, queries: Tensor, labels: Tensor | None) -> None:
        b, size, ptr = keys.shape[0], self.queue_size, self._counter("queue_ptr")
        if self.queue.numel() == 0:
            for name in self._queue_names():
                setattr(self, name, keys.new_zeros(size, keys.shape[1]))
        slots = (torch.arange(b, device=self.queue_ptr.device) + ptr) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        if self.symmetric:
            self.query_queue[slots] = queries.to(self.query_queue.dtype)
        if labels is not None:
            self.queue_labels[slots] = labels.to(self.queue_labels.dtype)
        self.queue_labeled[slots] = labels is not None
        flag, end = bytes([labels is not None]), ptr + b
        self._labeled_host[ptr : min(end, size)] = flag * (min(end, size) - ptr)
        if end > size:  # wrapped around
            self._labeled_host[: end - size] = flag * (end - size)
        self._set_counter("queue_ptr", end % size)
        self._set_counter("queue_count", min(self._counter("queue_count") + b, size))

    def _adopt_stored_queue(self, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        # The queue is allocated lazily: adopt the stored shape and dtype before copying.
        for name in self._queue_names():
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(stored, Tensor) and stored.shape != current.shape:
                setattr(self, name, torch.empty_like(stored, device=current.device))

    def _read_labeled_back(self, *_: Any) -> None:
        # Loading is off the step path: the host copy is read back here, once.
        self._labeled_host = bytearray(self.queue_labeled.cpu().tolist())

    def compute(self, query: Tensor, key: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for ``query``, ``key`` ``(n, D)`` and optional ``labels (n,)``.

        Scores the batch against the filled queue, then (in training mode) enqueues its keys.
        """
        fill = self._counter("queue_count") / self.queue_size  # before this batch is enqueued
        check_pair(query, key, "query", "key", labels)
        if query.device != self.queue_ptr.device:
            raise ValueError(
                f"query is on {query.device} but the queue buffers are on "
                f"{self.queue_ptr.device}; move the loss with .to(device) like any stateful module"
            )
        if query.shape[0] > self.queue_size:
            raise ValueError(
                f"the batch ({query.shape[0]} keys) is larger than the queue "
                f"(queue_size={self.queue_size}); raise queue_size or lower the batch size"
            )
        flags = _Options(self.in_batch_negatives, self.symmetric, self.queue_positives)
        flags = flags.checked(labels)
        bank, past_queries, bank_labels = self._filled(query.shape[1], labels)
        batch = _moco(query, key, bank, past_queries, labels, bank_labels, self.options(), flags)
        if batch.keys.shape[0] > self.queue_size:
            raise ValueError(
                f"the batch gathered from all ranks ({batch.keys.shape[0]} keys) is larger than "
                f"the queue (queue_size={self.queue_size}); raise queue_size"
            )
        if self.training:
            self._enqueue(batch.keys, batch.queries, batch.labels)

        def terms() -> dict[str, Tensor | float]:
            q, bank, first, last = batch.q, batch.bank, batch.directions[0], batch.directions[-1]
            values = {"accuracy": first.correct.float().mean()}
            if flags.symmetric:
                values = direction_terms(first, last, ("query_to_key", "key_to_query"))
            return {
                "accuracy": values.pop("accuracy"),
                "positive_similarity": (q * batch.k).sum(-1).mean(),
                # mean cosine of every query and queue entry, without the (n, K) matrix
                "negative_similarity": (q.sum(0) @ bank.sum(0)) / max(q.size(0) * bank.size(0), 1),
                "queue_fill": fill,
                "temperature": 1.0 / self.scale(dtype=torch.float64),
                **values,
            }

        return self.output(batch.loss, terms)

    #: A small queue, and in-batch negatives so that the very first call has a gradient.
    example_options: ClassVar[dict[str, Any]] = {"queue_size": 64, "in_batch_negatives": True}

    shown = "temperature:g queue_size in_batch_negatives symmetric queue_positives reduction!r"
