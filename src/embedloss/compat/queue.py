"""Legacy queue names: ``MemoryQueueContrastiveLoss``, ``MoCoLoss`` (consolidation), ``EMAMoCoLoss``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from embedloss._validation import check_float
from embedloss.compat._adapter import LegacyLoss, PairedLoss, metric
from embedloss.contrastive.moco import MoCoLoss as _MoCo
from embedloss.momentum import MomentumEncoder

__all__ = ["EMAMoCoLoss", "MemoryQueueContrastiveLoss", "MoCoLoss"]

#: The legacy rule keeps the eased temperature until the queue is this full.
FULL = 0.95


class MemoryQueueContrastiveLoss(PairedLoss):
    """Legacy multi-positive InfoNCE with queues of past negatives: :class:`embedloss.MoCoLoss`.

    ``MoCoLoss(in_batch_negatives=True, symmetric=True)`` with the vision features as queries
    and the text features as keys: vision→text scores the batch's texts and a queue of past
    texts, text→vision the batch's images and a queue of past images. The queues start empty
    (unfilled slots are not scored), the batch enters them after the loss is computed, and only
    in training mode. ``match_ids`` make in-batch positives only, as before: each batch's labels
    are offset past every label already queued, so no queue entry is masked. While the queue fills (below 95 %) τ eases from
    ``max_temperature_factor·τ`` down to τ, the legacy rule (``adaptive_temperature``).

    Args:
        dim: Ignored, with a warning.
        queue_size: Entries per queue (default 8192).
        temperature: τ > 0 (default 0.07).
        adaptive_temperature: Ease τ while the queue fills (default True).
        max_temperature_factor: τ multiplier of an empty queue (default 1.3).

    Returns (forward):
        ``{"loss", "loss_v2t", "loss_t2v", "temperature", "queue_fill", "accuracy"}``.

    Example:
        >>> import torch
        >>> loss = MemoryQueueContrastiveLoss(queue_size=8, temperature=0.1)
        >>> fills = [loss(torch.randn(4, 16), torch.randn(4, 16))["queue_fill"].item() for _ in range(3)]
        >>> fills  # the queue starts empty and fills after each batch
        [0.0, 0.5, 1.0]
    """

    label_offset: Tensor
    loss: _MoCo
    replacement = (
        "embedloss.MoCoLoss (registry 'moco', alias 'memory_queue') with "
        "in_batch_negatives=True, symmetric=True"
    )
    legacy_terms: ClassVar[dict[str, str]] = {
        "loss_v2t": "loss_query_to_key",
        "loss_t2v": "loss_key_to_query",
        "temperature": "temperature",
        "queue_fill": "queue_fill",
        "accuracy": "accuracy",
    }

    def __init__(
        self,
        dim: int | None = None,
        queue_size: int = 8192,
        temperature: float = 0.07,
        adaptive_temperature: bool = True,
        max_temperature_factor: float = 1.3,
    ) -> None:
        super().__init__(dim=dim)
        self.base_temperature = temperature
        self.adaptive_temperature = adaptive_temperature
        self.max_temperature_factor = check_float(
            max_temperature_factor, "max_temperature_factor", low=1.0
        )
        self.loss = _MoCo(
            temperature=temperature, queue_size=queue_size, in_batch_negatives=True, symmetric=True
        )
        self.register_buffer("label_offset", torch.zeros((), dtype=torch.long))

    def _ease_temperature(self) -> None:
        fill = int(self.loss.queue_count) / self.loss.queue_size
        tau = self.base_temperature
        if self.adaptive_temperature and fill < FULL:
            tau_max = tau * self.max_temperature_factor
            tau = tau_max - (tau_max - tau) * fill
        self.loss.logit_scale.fill_(math.log(1.0 / tau))

    def outputs(self, v: Tensor, t: Tensor, labels: Tensor | None) -> dict[str, Any]:
        """Loss and legacy metrics; the batch is enqueued afterwards in training mode."""
        self._ease_temperature()
        codes = torch.arange(v.shape[0], device=v.device) if labels is None else labels
        out = super().outputs(v, t, codes + self.label_offset)
        if self.training:
            self.label_offset.add_(v.shape[0])
        return out


class MoCoLoss(MemoryQueueContrastiveLoss):
    """The consolidation's ``MoCoLoss``: :class:`MemoryQueueContrastiveLoss`, same arguments.

    For the new tensor-returning loss use :class:`embedloss.MoCoLoss`.
    """


class EMAMoCoLoss(LegacyLoss):
    """Legacy MoCo with EMA key encoders: :class:`embedloss.MoCoLoss` + ``MomentumEncoder``.

    The key encoders are frozen EMA copies of ``vision_encoder`` and ``text_encoder``
    (:class:`embedloss.contrastive.MomentumEncoder`; the legacy class never stored its
    encoders, so every call failed). Queries are the online features (``vision_features`` /
    ``text_features``, or the online encoders applied to the raw ``vision_queries`` /
    ``text_queries``); keys are the EMA encoders applied to the raw inputs. Vision→text scores
    each vision query against the batch's text keys and a queue of past text keys
    (``MoCoLoss(in_batch_negatives=True)``), text→vision the reverse with its own queue. In
    training mode the keys are enqueued after the loss and the EMA copies move by
    ``θ_k ← m·θ_k + (1 − m)·θ_q`` (``update_key_encoder``).

    Args:
        vision_encoder: The online vision encoder (the trainer keeps optimising it).
        text_encoder: The online text encoder.
        dim: Ignored, with a warning.
        K: Entries per queue (default 65536).
        m: EMA momentum (default 0.999).
        T: τ > 0 (default 0.07).
        symmetric: Also score text→vision (default True).
        update_key_encoder: Move the EMA copies after every training call (default True).

    Returns (forward):
        ``{"loss", "v2t_loss", "t2v_loss", "v2t_accuracy", "t2v_accuracy", "accuracy",
        "queue_size", "queue_fill", "momentum"}``.
    """

    replacement = "embedloss.MoCoLoss (registry 'moco') with embedloss.contrastive.MomentumEncoder key encoders"

    def __init__(
        self,
        vision_encoder: nn.Module,
        text_encoder: nn.Module,
        dim: int | None = None,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        symmetric: bool = True,
        update_key_encoder: bool = True,
    ) -> None:
        super().__init__(dim=dim)
        self.symmetric = symmetric
        self.update_key_encoder = update_key_encoder
        self.vision_key_encoder = MomentumEncoder(vision_encoder, momentum=m)
        self.text_key_encoder = MomentumEncoder(text_encoder, momentum=m)
        self.v2t = _MoCo(temperature=T, queue_size=K, in_batch_negatives=True)
        self.t2v = (
            _MoCo(temperature=T, queue_size=K, in_batch_negatives=True) if symmetric else None
        )

    def forward(
        self,
        vision_queries: Any,
        text_queries: Any,
        vision_features: Tensor | None = None,
        text_features: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics for raw inputs (and optionally their online features)."""
        self.ignore_inputs(inputs)
        v = (
            self.vision_key_encoder.online(vision_queries)
            if vision_features is None
            else vision_features
        )
        t = self.text_key_encoder.online(text_queries) if text_features is None else text_features
        text_keys = self.text_key_encoder(text_queries)
        v2t = self.v2t.compute(v, text_keys)
        zero = metric(0.0)
        t2v_loss, t2v_accuracy, loss = zero, zero, v2t.loss
        if self.t2v is not None:
            t2v = self.t2v.compute(t, self.vision_key_encoder(vision_queries))
            loss = (v2t.loss + t2v.loss) / 2
            t2v_loss, t2v_accuracy = metric(t2v.loss.mean()), metric(t2v.terms["accuracy"])
        if self.training and self.update_key_encoder:
            self.vision_key_encoder.update()
            self.text_key_encoder.update()
        v2t_accuracy = metric(v2t.terms["accuracy"])
        accuracy = v2t_accuracy if self.t2v is None else (v2t_accuracy + t2v_accuracy) / 2
        return {
            "loss": loss,
            "v2t_loss": metric(v2t.loss.mean()),
            "t2v_loss": t2v_loss,
            "v2t_accuracy": v2t_accuracy,
            "t2v_accuracy": t2v_accuracy,
            "accuracy": accuracy,
            "queue_size": self.v2t.queue_size,
            "queue_fill": metric(v2t.terms["queue_fill"]),
            "momentum": self.vision_key_encoder.momentum,
        }
