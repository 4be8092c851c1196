"""An exponential-moving-average (momentum) copy of a module: MoCo's key encoder, BYOL's target."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from embedloss._validation import check_choice, check_float
from embedloss.ops.schedules import cosine_schedule

__all__ = ["MomentumEncoder"]

SCHEDULES = ("constant", "cosine")


class MomentumEncoder(nn.Module):
    r"""A frozen EMA copy of an online module, updated by an explicit :meth:`update` call.

    After each optimiser step of the online encoder ``θ_q`` the copy ``θ_k`` follows it by
    (He et al. 2020, MoCo, Eq. 2)

        θ_k ← m·θ_k + (1 − m)·θ_q

    Floating-point buffers (e.g. BatchNorm running statistics) are averaged the same way, other
    buffers (``num_batches_tracked``) are copied. With ``schedule="cosine"`` the momentum rises
    from ``momentum`` to ``final_momentum`` over training (Grill et al. 2020, BYOL, Sec. 3.2):

        m(k) = m_final − (m_final − m_base)·(cos(π·k/K) + 1)/2

    driven by :meth:`update_step` ``(k, K)``; the current value is a buffer, so ``state_dict``
    resumes the schedule.

    The copy is frozen: its parameters never require grad (``train()`` does not change that) and
    :meth:`forward` runs it under ``torch.no_grad()``. Its train/eval mode follows this wrapper's,
    so it can be called in either mode. The online module is referenced, not registered: it does
    not appear in ``parameters()`` or ``state_dict()`` of the wrapper (the trainer owns it).

    Args:
        module: The online encoder to follow (copied with ``copy.deepcopy``).
        momentum: Base momentum ``m`` in [0, 1] (default 0.999, MoCo).
        schedule: ``"constant"`` (default) or ``"cosine"``.
        final_momentum: The momentum reached at the end of a cosine schedule (default 1.0).

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
        ValueError: For a momentum outside [0, 1] or an unknown schedule.

    Example:
        >>> online = torch.nn.Linear(4, 2)
        >>> target = MomentumEncoder(online, momentum=0.9)
        >>> with torch.no_grad():
        ...     _ = online.weight.add_(1.0)
        >>> target.update()
        >>> bool(torch.allclose(target.encoder.weight, online.weight - 0.9))
        True
        >>> target(torch.randn(3, 4)).requires_grad
        False
    """

    base_momentum: Tensor
    current_momentum: Tensor

    def __init__(
        self,
        module: nn.Module,
        *,
        momentum: float = 0.999,
        schedule: str = "constant",
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        m = check_float(momentum, "momentum", low=0.0, high=1.0)
        self.final_momentum = check_float(final_momentum, "final_momentum", low=0.0, high=1.0)
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)
        self.encoder = copy.deepcopy(module)
        self.encoder.requires_grad_(False)
        # A plain attribute, not a submodule: the online weights stay out of this state_dict.
        object.__setattr__(self, "_online", module)
        self.register_buffer("base_momentum", torch.tensor(m, dtype=torch.float64))
        self.register_buffer("current_momentum", torch.tensor(m, dtype=torch.float64))

    @property
    def online(self) -> nn.Module:
        """The module this copy follows."""
        online: nn.Module = self.__dict__["_online"]
        return online

    @property
    def momentum(self) -> float:
        """The momentum :meth:`update` uses when called without one."""
        return float(self.current_momentum)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA copy without building a graph."""
        with torch.no_grad():
            return self.encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """Move the copy towards the online module: ``θ_k ← m·θ_k + (1 − m)·θ_q``.

        Args:
            momentum: ``m`` in [0, 1] for this update; default: the scheduled momentum.

        Raises:
            ValueError: If ``momentum`` is outside [0, 1] or the online module's parameters or
                buffers no longer match the copy's (names and shapes).
        """
        m = (
            self.momentum
            if momentum is None
            else check_float(momentum, "momentum", low=0.0, high=1.0)
        )
        targets = dict(self.encoder.named_parameters())
        sources = dict(self.online.named_parameters())
        self._check_same(targets, sources, "parameters")
        for name, target in targets.items():
            target.lerp_(sources[name].detach().to(target.dtype), 1.0 - m)
        target_buffers = dict(self.encoder.named_buffers())
        source_buffers = dict(self.online.named_buffers())
        self._check_same(target_buffers, source_buffers, "buffers")
        for name, buffer in target_buffers.items():
            source = source_buffers[name].detach()
            if buffer.is_floating_point():
                buffer.lerp_(source.to(buffer.dtype), 1.0 - m)
            else:
                buffer.copy_(source)

    @staticmethod
    def _check_same(
        targets: Mapping[str, Tensor], sources: Mapping[str, Tensor], what: str
    ) -> None:
        if targets.keys() != sources.keys() or any(
            targets[k].shape != sources[k].shape for k in targets
        ):
            raise ValueError(
                f"the online module's {what} no longer match the momentum copy's "
                f"(names or shapes differ); build a new MomentumEncoder"
            )

    def update_step(self, step: int, total_steps: int | None = None) -> None:
        """Set the scheduled momentum for step ``k`` of ``K`` (cosine schedule; no-op when constant).

        Raises:
            ValueError: With ``schedule="cosine"`` and no ``total_steps``, or a negative step.
        """
        if self.schedule == "constant":
            return
        value = cosine_schedule(step, total_steps, float(self.base_momentum), self.final_momentum)
        self.current_momentum.fill_(value)

    def extra_repr(self) -> str:
        """Shown by ``print(encoder)``."""
        return f"momentum={self.momentum}, schedule={self.schedule!r}"
