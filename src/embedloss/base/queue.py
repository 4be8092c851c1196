"""A FIFO queue of past embeddings (and optional labels) kept in buffers: MoCo, NNCLR."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from embedloss._validation import check_int, check_labels
from embedloss.ops.distributed import gather_with_grad

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """The most recent ``size`` rows of embeddings seen in training, with optional labels.

    A queue holds ``streams`` aligned feature arrays that share one pointer (MoCo's keys and,
    when symmetric, its queries; NNCLR's support set is one stream), in the buffers
    ``features`` ``(streams, size, D)``, ``labels`` and ``labeled`` ``(size,)``, ``ptr`` and
    ``count`` (0-d). So ``state_dict`` round-trips it bit-exactly and ``.to(device)`` moves it.

    * It **starts empty**; :meth:`entries` returns only the filled rows (or None).
    * :meth:`enqueue` writes a batch after the oldest rows (FIFO, wrapping around the end);
      with ``gather_distributed`` it enqueues the rows of every rank, in rank order, so every
      rank holds the same queue.
    * ``features`` is allocated on the first :meth:`enqueue`, with the rows' size, device and
      dtype (later rows are cast to it); loading a ``state_dict`` adopts the stored shape.
    * The pointer, the fill and the labelled flags have exact host copies, so reading the
      queue and enqueueing never read a value back from the device.

    Entries enqueued without labels cannot be compared with labels: asking for the labels
    while such entries are queued raises (call :meth:`reset`).

    Args:
        size: The number of rows kept, >= 1.
        streams: The number of aligned feature arrays, >= 1 (default 1).

    Raises:
        ValueError: If ``size`` or ``streams`` is < 1.

    Example:
        >>> queue = FeatureQueue(4)
        >>> queue.enqueue(torch.ones(3, 2), labels=torch.tensor([0, 1, 2]))
        >>> queue.enqueue(2 * torch.ones(2, 2), labels=torch.tensor([3, 4]))
        >>> queue.entries(dim=2)[:, 0], queue.entry_labels(), queue.n_filled
        (tensor([2., 1., 1., 2.]), tensor([4, 1, 2, 3]), 4)
    """

    features: Tensor
    labels: Tensor
    labeled: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, *, streams: int = 1) -> None:
        super().__init__()
        self.size = check_int(size, "queue_size", low=1)
        self.streams = check_int(streams, "streams", low=1)
        self.register_buffer("features", torch.zeros(streams, 0, 0))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("labeled", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._host = {"ptr": 0, "count": 0}
        self._labeled_host = bytearray(size)
        self._register_load_state_dict_pre_hook(self._adopt_stored_shape)
        self.register_load_state_dict_post_hook(FeatureQueue._read_host_copies)

    @property
    def n_filled(self) -> int:
        """The number of filled rows (from the host copy of ``count``: no device read)."""
        return self._host["count"]

    @property
    def fill(self) -> float:
        """The filled fraction in [0, 1]."""
        return self.n_filled / self.size

    @property
    def fully_labeled(self) -> bool:
        """Whether every filled row was enqueued with labels (host copy: no device read)."""
        return not self._labeled_host.count(0, 0, self.n_filled)

    def check_batch(self, x: Tensor, name: str) -> None:
        """Raise unless ``x`` ``(n, ...)`` is on the queue's device and n <= size."""
        if x.device != self.ptr.device:
            raise ValueError(
                f"{name} is on {x.device} but the queue buffers are on {self.ptr.device}; "
                "move the loss with .to(device) like any stateful module"
            )
        if x.shape[0] > self.size:
            raise ValueError(
                f"the batch ({x.shape[0]} rows of {name}) is larger than the queue "
                f"(queue_size={self.size}); raise queue_size or lower the batch size"
            )

    def entries(self, dim: int, stream: int = 0) -> Tensor | None:
        """A copy of the filled rows ``(count, D)`` of ``stream``, or None while empty.

        Raises:
            ValueError: If the queued rows are not of size ``dim``.
        """
        count = self.n_filled
        if count == 0:
            return None
        if self.features.shape[-1] != dim:
            raise ValueError(
                f"embedding size D={dim} does not match the queue's D={self.features.shape[-1]}; "
                "use a new loss (or reset the queue) for a new embedding size"
            )
        # A copy: autograd may keep it for backward, and enqueue overwrites the buffer in place.
        return self.features[stream, :count].clone()

    def entry_labels(self) -> Tensor | None:
        """The labels ``(count,)`` of the filled rows, or None while empty.

        Raises:
            ValueError: If a filled row was enqueued without labels.
        """
        count = self.n_filled
        if count == 0:
            return None
        if not self.fully_labeled:
            raise ValueError(
                "labels were given but the queue holds rows enqueued without labels; pass "
                "labels on every call or reset the queue"
            )
        return self.labels[:count]

    @torch.no_grad()
    def enqueue(
        self, *features: Tensor, labels: Tensor | None = None, gather_distributed: bool = False
    ) -> None:
        """Write a batch after the newest rows (from every rank when ``gather_distributed``).

        Args:
            *features: One ``(n, D)`` tensor per stream.
            labels: Optional ``(n,)`` labels of the rows.
            gather_distributed: Enqueue the rows of every rank, in rank order.

        Raises:
            ValueError: If the number of tensors is not ``streams``, labels do not match, or
                the (gathered) batch is larger than the queue.
        """
        if len(features) != self.streams:
            raise ValueError(f"enqueue needs {self.streams} feature tensor(s), got {len(features)}")
        rows = [gather_with_grad(f.detach(), gather_distributed).tensor for f in features]
        if labels is not None:
            check_labels(labels, features[0].shape[0])
            labels = gather_with_grad(labels, gather_distributed).tensor
        b, size, ptr = rows[0].shape[0], self.size, self._host["ptr"]
        if b > size:
            raise ValueError(
                f"the batch gathered from all ranks ({b} rows) is larger than the queue "
                f"(queue_size={size}); raise queue_size"
            )
        if self.features.numel() == 0:
            self.features = rows[0].new_zeros(self.streams, size, rows[0].shape[1])
        slots = (torch.arange(b, device=self.ptr.device) + ptr) % size
        for stream, x in enumerate(rows):
            self.features[stream, slots] = x.to(self.features.dtype)
        if labels is not None:
            self.labels[slots] = labels.to(self.labels.dtype)
        self.labeled[slots] = labels is not None
        flags, head = bytes([labels is not None]) * b, min(b, size - ptr)
        self._labeled_host[ptr : ptr + head] = flags[:head]
        self._labeled_host[: b - head] = flags[head:]  # the rows that wrapped around
        self._set("ptr", (ptr + b) % size)
        self._set("count", min(self.n_filled + b, size))

    def _set(self, name: str, value: int) -> None:
        self._host[name] = value
        (self.ptr if name == "ptr" else self.count).fill_(value)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (rows are forgotten; the allocated storage is kept)."""
        self.features.zero_()
        self.labels.zero_()
        self.labeled.zero_()
        self._set("ptr", 0)
        self._set("count", 0)
        self._labeled_host = bytearray(self.size)

    def _adopt_stored_shape(self, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        # Allocated lazily: adopt the stored shape and dtype before the copy.
        stored = state_dict.get(prefix + "features")
        if isinstance(stored, Tensor) and stored.shape != self.features.shape:
            self.features = torch.empty_like(stored, device=self.features.device)

    def _read_host_copies(self, *_: Any) -> None:
        # Loading is off the step path: the host copies are read back here, once.
        self._host = {"ptr": int(self.ptr), "count": int(self.count)}
        self._labeled_host = bytearray(self.labeled.cpu().tolist())

    def extra_repr(self) -> str:
        """Shown by ``print(queue)``."""
        return f"size={self.size}, streams={self.streams}, filled={self.n_filled}"
