"""Step schedules driven by the explicit ``update_step(step, total_steps)`` hook."""

from __future__ import annotations

import math

from embedloss._validation import check_int

__all__ = ["cosine_schedule"]


def cosine_schedule(step: int, total_steps: int | None, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps`` (and after).

        value(k) = end + (start − end)·(1 + cos(π·min(k, K)/K))/2

    (SGDR's annealing, Loshchilov & Hutter 2017, Eq. 5, without restarts; BYOL's momentum
    schedule, Grill et al. 2020, Sec. 3.2, is the case start = τ_base, end = 1.)

    Raises:
        ValueError: If ``total_steps`` is None or < 1, or ``step`` is negative.

    Example:
        >>> cosine_schedule(50, 100, start=0.2, end=0.04)
        0.12
    """
    k = check_int(step, "step", low=0)
    if total_steps is None:
        raise ValueError("a cosine schedule needs total_steps in update_step(step, total_steps)")
    total = check_int(total_steps, "total_steps", low=1)
    return end + (start - end) * (1 + math.cos(math.pi * min(k, total) / total)) / 2
