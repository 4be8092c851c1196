"""The base of DINO and iBOT: two temperatures, the teacher centre (a buffer) and its update."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypedDict

import torch
from torch import Tensor

from embedloss._validation import (
    check_bool,
    check_float,
    check_int,
    check_positive_float,
    check_reduction,
    check_tensor,
)
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.distillation import entropy, update_center_

if TYPE_CHECKING:
    from typing_extensions import Required

__all__ = [
    "CenteredTeacherLoss",
    "TeacherArgs",
    "TeacherKeywords",
    "TeacherOptions",
    "TeacherResult",
]


class TeacherResult(NamedTuple):
    """What a centred-teacher loss computes for a batch: the loss and what its terms need."""

    loss: Tensor  # reduced
    per_sample: Tensor  # (n,) cross-entropy per sample
    teacher_log_probs: Tensor  # (..., K) centred teacher log-probabilities, no gradient
    mask: Tensor | None  # (N, P) the teacher rows that count (iBOT), or None: all of them
    center_total: Tensor  # (K,) sum of the teacher rows the centre follows
    center_count: Tensor  # () their number


class TeacherOptions(NamedTuple):
    """How a centred-teacher loss scores a batch: centre, ``(τ_t, τ_s)``, reduction, over ranks."""

    center: Tensor | None
    temperatures: tuple[float, float]
    reduction: str
    distributed: bool

    @classmethod
    def create(
        cls,
        center: Tensor | None = None,
        teacher_temperature: float = 0.04,
        student_temperature: float = 0.1,
        reduction: str = "mean",
        gather_distributed: bool = False,
    ) -> TeacherOptions:
        """Checked options of a functional loss (``center``, if given, a ``(K,)`` tensor)."""
        if center is not None:
            check_tensor(center, "center")
            if center.dim() != 1:
                raise ValueError(f"center must have shape (K,), got {tuple(center.shape)}")
        temperatures = (
            check_positive_float(teacher_temperature, "teacher_temperature"),
            check_positive_float(student_temperature, "student_temperature"),
        )
        distributed = check_bool(gather_distributed, "gather_distributed")
        return cls(center, temperatures, check_reduction(reduction), distributed)


class TeacherKeywords(TypedDict, total=False):
    """The keywords of :meth:`TeacherOptions.create`, for a functional's ``**keywords``."""

    center: Tensor | None
    teacher_temperature: float
    student_temperature: float
    reduction: str
    gather_distributed: bool


class TeacherArgs(TypedDict, total=False):
    """The options of :class:`CenteredTeacherLoss`, for a subclass's ``**options: Unpack[...]``."""

    output_dim: Required[int]
    teacher_temperature: float
    student_temperature: float
    center_momentum: float
    reduction: str
    gather_distributed: bool


class CenteredTeacherLoss(BaseLoss):
    """Options and state shared by DINO and iBOT (see :class:`~embedloss.DINOLoss`).

    Its constructor (iBOT's; DINO passes these on as ``**options: Unpack[TeacherArgs]``) checks
    ``output_dim`` (K), τ_t, τ_s > 0, the momentum m in [0, 1], ``reduction`` and
    ``gather_distributed``. The centre is a float64 buffer ``center`` ``(output_dim,)`` (an EMA
    keeps its precision), updated after the loss in training mode only (:meth:`_output`).

    Args:
        output_dim: K, the number of outputs of the head (sizes the centre).
        teacher_temperature: τ_t > 0 (default 0.04).
        student_temperature: τ_s > 0 (default 0.1).
        center_momentum: m in [0, 1] of the centre's EMA (default 0.9).
        reduction: ``"mean"`` over samples (iBOT: images), ``"sum"`` or ``"none"``.
        gather_distributed: All-reduce the centre's sums; reduce the loss over every rank.
    """

    center: Tensor

    def __init__(
        self,
        *,
        output_dim: int,
        teacher_temperature: float = 0.04,
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        reduction: str = "mean",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self.output_dim = check_int(output_dim, "output_dim", low=1)
        self.teacher_temperature = check_positive_float(teacher_temperature, "teacher_temperature")
        self.student_temperature = check_positive_float(student_temperature, "student_temperature")
        self.center_momentum = check_float(center_momentum, "center_momentum", low=0.0, high=1.0)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self.register_buffer("center", torch.zeros(output_dim, dtype=torch.float64))

    @property
    def current_teacher_temperature(self) -> float:
        """τ_t of this call (a host value: no device read)."""
        return self.teacher_temperature

    def _output(self, core: Callable[..., TeacherResult], *inputs: Any) -> LossOutput:
        """The core's loss and terms; then, in training mode, the centre's EMA step.

        Terms: ``teacher_entropy``, ``kl``, ``center_norm`` (of the centre this batch is scored
        with: the terms are built before the update), τ_t. ``kl`` is the mean cross-entropy
        minus the mean teacher entropy, weighted as the loss weights the teacher rows (per
        sample over its views, or over its masked patches).
        """
        temperatures = (self.current_teacher_temperature, self.student_temperature)
        options = TeacherOptions(self.center, temperatures, self.reduction, self.gather_distributed)
        result = core(*inputs, options)

        def terms() -> dict[str, Tensor | float]:
            h = entropy(result.teacher_log_probs)
            h_mean = h_sample = h.mean()
            if result.mask is not None:  # (N, P) masked patches: weighted as the loss is
                masked = torch.where(result.mask, h, 0.0)
                w = result.mask.to(h.dtype)
                h_mean = masked.sum() / w.sum().clamp(min=1)
                h_sample = (masked.sum(-1) / w.sum(-1).clamp(min=1)).mean()
            return {
                "teacher_entropy": h_mean,
                "kl": result.per_sample.mean() - h_sample,
                "center_norm": self.center.norm(),
                "teacher_temperature": temperatures[0],
            }

        output = self.output(result.loss, terms)
        if self.training:  # all ranks' teacher rows when distributed
            total, count = result.center_total, result.center_count
            update_center_(self.center, total, count, self.center_momentum, options.distributed)
        return output

    #: A 16-dimensional head, as the shared tests' inputs.
    example_options: ClassVar[dict[str, Any]] = {"output_dim": 16}

    shown = "output_dim teacher_temperature student_temperature center_momentum reduction!r"
