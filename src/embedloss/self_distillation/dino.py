"""DINO: self-distillation with no labels (Caron et al. 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import check_int, check_optional_positive, compute_dtype
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.distillation import Views, cross_view_entropy, stack_views, teacher_log_probs
from embedloss.ops.keywords import keyword_options
from embedloss.registry import register_loss
from embedloss.self_distillation._teacher import (
    CenteredTeacherLoss,
    TeacherArgs,
    TeacherKeywords,
    TeacherOptions,
    TeacherResult,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DINOLoss", "dino_loss"]


def _dino(student_outputs: Views, teacher_outputs: Views, options: TeacherOptions) -> TeacherResult:
    """Checked, reduced DINO loss and the teacher statistics its centre follows."""
    center, temperatures = options.center, options.temperatures
    dim = None if center is None else center.shape[-1]
    s = stack_views(student_outputs, "student_outputs", dim=dim)  # (V_s, n, K)
    t = stack_views(teacher_outputs, "teacher_outputs", dim=s.shape[-1])  # (V_t, n, K)
    (v_s, n, _), v_t = s.shape, t.shape[0]
    if t.shape[1] != n:
        raise ValueError(
            f"teacher_outputs and student_outputs must hold the same N samples per view, "
            f"got {t.shape[1]} and {n}"
        )
    if v_s < max(v_t, 2):
        raise ValueError(
            "student_outputs must hold the teacher's global views first, then any local views "
            f"(V_s >= V_t and V_s >= 2); got V_s={v_s} student and V_t={v_t} teacher views"
        )
    dtype = compute_dtype(s, t)
    log_p = teacher_log_probs(t, center, temperatures[0], dtype)  # (V_t, n, K), no grad
    log_q = F.log_softmax(s.to(dtype) / temperatures[1], dim=-1)  # (V_s, n, K)
    per_sample = cross_view_entropy(log_p.exp(), log_q) / (v_t * (v_s - 1))  # (n,)
    loss = reduce_samples(per_sample, options.reduction, distributed=options.distributed)
    total = t.detach().to(dtype).sum(dim=(0, 1))  # (K,)
    return TeacherResult(loss, per_sample, log_p, None, total, total.new_full((), v_t * n))


@keyword_options(TeacherOptions.create, TeacherKeywords)
def dino_loss(
    student_outputs: Views, teacher_outputs: Views, **keywords: Unpack[TeacherKeywords]
) -> Tensor:
    r"""DINO's cross-entropy between centred, sharpened teacher and student outputs (stateless).

    For V_t teacher views ``t_v`` (the global crops) and V_s >= V_t student views ``s_v`` (the
    same global crops first, then the local crops), with centre ``c`` (Caron et al. 2021,
    Eq. 1–3 and Algorithm 1; the official ``DINOLoss``):

        P_t(v) = softmax((t_v − c)/τ_t),   P_s(v) = softmax(s_v/τ_s)
        ℓ_b = 1/(V_t·(V_s − 1)) · Σ_{v<V_t} Σ_{u≠v} −Σ_k P_t(v)_bk · log P_s(u)_bk

    averaged over the N samples. The teacher side carries no gradient. ``center`` defaults to
    zero; :class:`DINOLoss` keeps it as an EMA of the teacher outputs.

    Args:
        student_outputs: V_s ``(N, K)`` tensors, or one ``(N, V_s, K)`` tensor.
        teacher_outputs: V_t ``(N, K)`` tensors, or one ``(N, V_t, K)`` tensor.
        center: Optional ``(K,)`` centre subtracted from the teacher outputs.
        teacher_temperature: τ_t > 0 (default 0.04).
        student_temperature: τ_s > 0 (default 0.1).
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` (``(N,)``).
        gather_distributed: Reduce over the samples of every rank (the DDP convention of
            :mod:`embedloss.ops.anchors`).

    Shape:
        views: ``(N, K)`` each; output: scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        TypeError: If the views are not tensors (or a sequence of them).
        ValueError: For views of different shapes, V_s < V_t, V_s < 2, a centre of another
            size, or τ <= 0.

    Example:
        >>> import math
        >>> t = [torch.zeros(2, 4)]  # a uniform teacher
        >>> s = [torch.zeros(2, 4), torch.zeros(2, 4)]  # and student: the loss is log K
        >>> round(dino_loss(s, t).item(), 6) == round(math.log(4), 6)
        True
    """
    return _dino(student_outputs, teacher_outputs, TeacherOptions.create(**keywords)).loss


@register_loss("dino")
class DINOLoss(CenteredTeacherLoss):
    """DINO self-distillation loss with a centred, warmed-up teacher (Caron et al. 2021).

    See :func:`dino_loss` for the formula. After the loss of a batch, in training mode only,
    the centre (a float64 buffer ``center`` ``(output_dim,)``) moves as

        c ← m·c + (1 − m)·mean of the teacher outputs of the batch (all views)

    with the sums all-reduced across ranks under ``gather_distributed``, as the official code (the
    same centre on every rank, uneven batches included; without it the centres drift apart). τ_t
    warms up as the official ``np.linspace``: ``τ_t(e) = τ_w + (τ_t − τ_w)·e / (warmup_epochs − 1)``
    for ``e < warmup_epochs``, then τ_t; the epoch (:meth:`update_epoch`) is the ``epoch`` buffer,
    so checkpoints resume exactly. Accumulating k micro-batches moves the centre k times per step
    (:mod:`embedloss.self_distillation`; ``m**(1/k)`` keeps its time constant).

    Terms (collapse monitors): ``teacher_entropy`` (of the centred teacher: near 0 when one
    output dominates, near ``log K`` when uniform), ``kl`` (the loss minus that entropy: the
    mean KL from teacher to student), ``center_norm`` (of the centre this batch was scored
    with), ``teacher_temperature``.

    Args:
        teacher_temperature: τ_t > 0 after the warm-up (default 0.04).
        warmup_teacher_temperature: τ_w > 0 at epoch 0, or None for no warm-up (default).
        warmup_epochs: Epochs of linear warm-up of τ_t (default 0).
        **options: ``output_dim`` and the rest, as
            :class:`~embedloss.self_distillation._teacher.CenteredTeacherLoss`.

    Raises:
        ValueError: For τ <= 0, a momentum outside [0, 1], ``output_dim < 1``,
            ``warmup_epochs < 0``, or outputs whose size is not ``output_dim``.

    Example:
        >>> loss_fn = DINOLoss(output_dim=8, warmup_teacher_temperature=0.02, warmup_epochs=3)
        >>> loss_fn.update_epoch(1)
        >>> student = [torch.randn(4, 8) for _ in range(4)]  # 2 global + 2 local crops
        >>> teacher = [torch.randn(4, 8) for _ in range(2)]  # the 2 global crops
        >>> out = loss_fn.compute(student, teacher)
        >>> round(out.terms["teacher_temperature"].item(), 6), bool(loss_fn.center.any())
        (0.03, True)
    """

    epoch: Tensor

    def __init__(
        self,
        *,
        warmup_teacher_temperature: float | None = None,
        warmup_epochs: int = 0,
        **options: Unpack[TeacherArgs],
    ) -> None:
        super().__init__(**options)
        self.warmup_teacher_temperature = check_optional_positive(
            warmup_teacher_temperature, "warmup_teacher_temperature"
        )
        self.warmup_epochs = check_int(warmup_epochs, "warmup_epochs", low=0)
        self._init_counter("epoch")

    def update_epoch(self, epoch: int) -> None:
        """Set the epoch (>= 0) that drives the teacher temperature's warm-up."""
        self._set_counter("epoch", check_int(epoch, "epoch", low=0))

    @property
    def current_teacher_temperature(self) -> float:
        """τ_t at the current epoch (a host value: no device read)."""
        epoch, warmup = self._counter("epoch"), self.warmup_epochs
        start = self.warmup_teacher_temperature
        if start is None or epoch >= warmup:
            return self.teacher_temperature
        return start + (self.teacher_temperature - start) * epoch / max(warmup - 1, 1)

    def compute(self, student_outputs: Views, teacher_outputs: Views) -> LossOutput:
        """Loss and terms for the student's and the teacher's views; then update the centre."""
        return self._output(_dino, student_outputs, teacher_outputs)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Three student views (two global, one local) and the two global teacher views."""
        teacher = [torch.randn(n, d, generator=g).to(dtype) for _ in range(2)]
        student = [(t.float() + 0.5 * torch.randn(n, d, generator=g)).to(dtype) for t in teacher]
        student.append(torch.randn(n, d, generator=g).to(dtype))
        return (student, teacher), {}
