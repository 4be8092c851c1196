"""SwAV: swapped prediction of Sinkhorn–Knopp cluster codes (Caron et al. 2020)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_int,
    check_positive_float,
    check_reduction,
    compute_dtype,
)
from embedloss.base.base_loss import BaseLoss, Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.distillation import Views, cross_view_entropy, stack_views
from embedloss.ops.sinkhorn import sinkhorn_knopp
from embedloss.registry import register_loss

__all__ = ["SwAVLoss", "swav_loss"]


class _Options(NamedTuple):
    temperature: float
    sinkhorn_iterations: int
    epsilon: float
    reduction: str
    gather_distributed: bool

    @classmethod
    def create(
        cls, temperature: float, iterations: int, epsilon: float, reduction: str, gather: bool
    ) -> _Options:
        return cls(
            check_positive_float(temperature, "temperature"),
            check_int(iterations, "sinkhorn_iterations", low=1),
            check_positive_float(epsilon, "epsilon"),
            check_reduction(reduction),
            check_bool(gather, "gather_distributed"),
        )


def _swav(high: Views, low: Views, queue: Views | None, o: _Options) -> tuple[Tensor, Tensor]:
    """Checked, reduced SwAV loss and the codes ``(V_h, n, K)`` (no gradient)."""
    h = stack_views(high, "high_resolution_outputs")  # (V_h, n, K)
    k, v_h = h.shape[-1], h.shape[0]
    lo = stack_views(low, "low_resolution_outputs", dim=k, allow_empty=True)
    if lo.shape[0] > 0 and lo.shape[1] != h.shape[1]:
        raise ValueError(
            "low_resolution_outputs must hold the same N samples per view as "
            f"high_resolution_outputs, got {lo.shape[1]} and {h.shape[1]}"
        )
    dtype = compute_dtype(h, lo)
    views = torch.cat([h.to(dtype), lo.to(dtype)]) if lo.shape[0] > 0 else h  # (V, n, K)
    if views.shape[0] < 2:
        raise ValueError("SwAV needs at least two crops (high- and low-resolution together)")
    q = None if queue is None else stack_views(queue, "queue_outputs", dim=k)  # (V_h, M, K)
    if q is not None and q.shape[0] != v_h:
        raise ValueError(
            f"queue_outputs must hold one (M, K) queue per high-resolution crop ({v_h}), "
            f"got {q.shape[0]}"
        )
    (v, n, _), codes = views.shape, []
    for i in range(v_h):  # crop i's codes, from its scores and its queue's (if given)
        scores = views[i] if q is None else torch.cat([views[i], q[i].to(views.dtype)])
        code = sinkhorn_knopp(
            scores,
            iterations=o.sinkhorn_iterations,
            epsilon=o.epsilon,
            distributed=o.gather_distributed,
        )
        codes.append(code[:n])
    targets = torch.stack(codes)  # (V_h, n, K)
    log_predictions = F.log_softmax(views / o.temperature, dim=-1)  # (V, n, K)
    per_sample = cross_view_entropy(targets, log_predictions) / (v_h * (v - 1))  # (n,)
    return reduce_samples(per_sample, o.reduction, distributed=o.gather_distributed), targets


def swav_loss(
    high_resolution_outputs: Views,
    low_resolution_outputs: Views = (),
    queue_outputs: Views | None = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    epsilon: float = 0.05,
    reduction: str = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    r"""SwAV's swapped prediction: each crop predicts the codes of the other crops.

    For prototype scores ``z_v`` ``(N, K)`` of V crops, the first V_h at high resolution (Caron
    et al. 2020, Eq. 1–3; the official ``main_swav.py``), the codes ``q_i`` of each
    high-resolution crop come from Sinkhorn–Knopp over its scores (and its queue's, then
    dropped), without gradient (:func:`~embedloss.ops.sinkhorn.sinkhorn_knopp`), and

        ℓ_b = 1/(V_h·(V − 1)) · Σ_{i<V_h} Σ_{v≠i} −Σ_k q_i,bk · log softmax(z_v,b/τ)_k

    averaged over the N samples.

    Args:
        high_resolution_outputs: V_h ``(N, K)`` prototype scores, or one ``(N, V_h, K)`` tensor.
        low_resolution_outputs: V_l ``(N, K)`` scores of the small crops (no codes), or one
            ``(N, V_l, K)`` tensor; none by default.
        queue_outputs: Optional scores of stored past features: V_h ``(M, K)`` (one queue per
            high-resolution crop) or one ``(M, V_h, K)`` tensor. They enlarge the batch the
            codes are balanced over, and get no codes of their own.
        temperature: τ > 0 of the predictions (default 0.1).
        sinkhorn_iterations: Rounds of Sinkhorn–Knopp, >= 1 (default 3).
        epsilon: ε > 0 of Sinkhorn–Knopp (default 0.05).
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` (``(N,)``).
        gather_distributed: Balance the codes over the samples (and queues) of every rank,
            and reduce the loss over every rank.

    Shape:
        scores: ``(N, K)`` per crop; output: scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        TypeError: If the scores are not tensors (or a sequence of them).
        ValueError: For fewer than two crops, mismatched shapes, a queue count other than
            V_h, or invalid options.

    Example:
        >>> z = [torch.zeros(4, 3), torch.zeros(4, 3)]  # uniform scores: uniform codes
        >>> round(swav_loss(z).item(), 4) == round(torch.tensor(3.0).log().item(), 4)
        True
    """
    options = _Options.create(
        temperature, sinkhorn_iterations, epsilon, reduction, gather_distributed
    )
    return _swav(high_resolution_outputs, low_resolution_outputs, queue_outputs, options)[0]


@register_loss("swav")
class SwAVLoss(BaseLoss):
    """SwAV's swapped-prediction loss with Sinkhorn–Knopp codes (Caron et al. 2020).

    See :func:`swav_loss` for the formula. The loss keeps no state: the prototypes belong to
    the model, and a queue of past features (``queue_outputs``, their scores against the
    current prototypes) to the training loop, as in the official code.

    **Whole-batch codes** (:mod:`embedloss.self_distillation`): balanced over the batch a call
    sees (all ranks with ``gather_distributed``, as the official ``distributed_sinkhorn``; under
    gradient accumulation a weaker equipartition per micro-batch, which a queue enlarges).

    Terms: ``code_entropy`` (mean entropy of a sample's code: low when assignments are
    confident), ``cluster_entropy`` (entropy of the batch's mean code: ``log K`` when the
    prototypes are used equally), ``temperature``.

    Args:
        temperature, sinkhorn_iterations, epsilon, reduction, gather_distributed: As
            :func:`swav_loss`.

    Raises:
        ValueError: For τ <= 0, ε <= 0 or ``sinkhorn_iterations < 1``.

    Example:
        >>> loss_fn = SwAVLoss()
        >>> high = [torch.randn(8, 5), torch.randn(8, 5)]  # scores against 5 prototypes
        >>> low = [torch.randn(8, 5) for _ in range(4)]
        >>> out = loss_fn.compute(high, low)
        >>> out.loss.shape, sorted(out.terms)
        (torch.Size([]), ['cluster_entropy', 'code_entropy', 'temperature'])
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        epsilon: float = 0.05,
        reduction: str = "mean",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self._options = _Options.create(
            temperature, sinkhorn_iterations, epsilon, reduction, gather_distributed
        )
        self.temperature, self.sinkhorn_iterations, self.epsilon = self._options[:3]
        self.gather_distributed = self._options.gather_distributed

    def compute(
        self,
        high_resolution_outputs: Views,
        low_resolution_outputs: Views = (),
        queue_outputs: Views | None = None,
    ) -> LossOutput:
        """Loss and terms for the crops' prototype scores (and optional queue scores)."""
        high, low = high_resolution_outputs, low_resolution_outputs
        loss, codes = _swav(high, low, queue_outputs, self._options)
        return self.output(
            loss,
            lambda: {
                "code_entropy": torch.special.entr(codes).sum(-1).mean(),
                "cluster_entropy": torch.special.entr(codes.mean(dim=1)).sum(-1).mean(),
                "temperature": self.temperature,
            },
        )

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Two high- and two low-resolution crops' scores against ``d`` prototypes, in [-1, 1]."""
        base = torch.randn(n, d, generator=g)
        crops = [(base + 0.5 * torch.randn(n, d, generator=g)).tanh().to(dtype) for _ in range(4)]
        return (crops[:2], crops[2:]), {}

    shown = "temperature sinkhorn_iterations epsilon reduction!r"
