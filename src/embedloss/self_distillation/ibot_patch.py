"""iBOT's masked-patch self-distillation loss (Zhou et al. 2022), as DINOv2 uses it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss._validation import (
    check_embeddings,
    check_finite,
    check_same_shape,
    check_tensor,
    compute_dtype,
    on_host,
)
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.distillation import teacher_log_probs
from embedloss.ops.keywords import keyword_options
from embedloss.registry import register_loss
from embedloss.self_distillation._teacher import (
    CenteredTeacherLoss,
    TeacherKeywords,
    TeacherOptions,
    TeacherResult,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["IBOTPatchLoss", "ibot_patch_loss"]


def _ibot(student: Tensor, teacher: Tensor, mask: Tensor, options: TeacherOptions) -> TeacherResult:
    """Checked, reduced iBOT patch loss and the masked teacher rows its centre follows.

    Only the masked patches are scored: the values of the others are not checked.
    """
    center, temperatures = options.center, options.temperatures
    check_embeddings(student, "student_patches", ndim=3, shape="(N, P, K)", finite=False)
    check_embeddings(teacher, "teacher_patches", ndim=3, shape="(N, P, K)", finite=False)
    check_same_shape(student, teacher, "student_patches", "teacher_patches")
    if center is not None and student.shape[-1] != center.shape[-1]:
        raise ValueError(
            f"student_patches must have K={center.shape[-1]} outputs per patch (output_dim), "
            f"got {student.shape[-1]}"
        )
    check_tensor(mask, "mask")
    if mask.dtype != torch.bool or mask.shape != student.shape[:2]:
        raise ValueError(
            f"mask must be a bool (N, P) = {tuple(student.shape[:2])} tensor marking the masked "
            f"patches, got shape {tuple(mask.shape)} and dtype {mask.dtype}"
        )
    for x, name in ((student, "student_patches"), (teacher, "teacher_patches")):
        if on_host(x):
            check_finite(torch.where(mask.unsqueeze(-1), x, 0.0), f"{name} (masked patches)")
    dtype = compute_dtype(student, teacher)
    masked = mask.unsqueeze(-1)  # (N, P, 1)
    log_p = teacher_log_probs(teacher, center, temperatures[0], dtype)  # (N, P, K), no grad
    p = torch.where(masked, log_p.exp(), 0.0)  # unmasked patches score nothing
    log_q = F.log_softmax(student.to(dtype) / temperatures[1], dim=-1)  # (N, P, K)
    ce = -(p * log_q).sum(-1)  # (N, P)
    per_image = ce.sum(1) / mask.sum(1).clamp(min=1).to(dtype)  # (N,)
    loss = reduce_samples(per_image, options.reduction, distributed=options.distributed)
    total = torch.where(masked, teacher.detach().to(dtype), 0.0).sum(dim=(0, 1))  # (K,)
    return TeacherResult(loss, per_image, log_p, mask, total, mask.sum())


@keyword_options(TeacherOptions.create, TeacherKeywords)
def ibot_patch_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    mask: Tensor,
    **keywords: Unpack[TeacherKeywords],
) -> Tensor:
    r"""IBOT's cross-entropy of centred teacher and student patch tokens on masked patches.

    For image b with masked patches ``M_b`` (the student saw them masked, the teacher did not),
    teacher and student patch outputs ``t_bp``, ``s_bp`` and centre ``c`` (Zhou et al. 2022,
    Eq. 2, ``L_MIM``; DINOv2's ``iBOTPatchLoss.forward_masked``):

        ℓ_b = 1/max(|M_b|, 1) · Σ_{p∈M_b} −Σ_k softmax((t_bp − c)/τ_t)_k · log softmax(s_bp/τ_s)_k

    averaged over the N images; an image without masked patches contributes 0 and still counts
    in the mean, as in DINOv2. The teacher side carries no gradient. Every patch is scored and
    the mask selects (fixed shapes: no host read), so the cost is that of N·P patches.

    Args:
        student_patches: ``(N, P, K)`` student head outputs of the patch tokens.
        teacher_patches: ``(N, P, K)`` teacher head outputs of the same patches.
        mask: ``(N, P)`` bool, True where the student's input patch was masked.
        center: Optional ``(K,)`` centre subtracted from the teacher outputs.
        teacher_temperature: τ_t > 0 (default 0.04).
        student_temperature: τ_s > 0 (default 0.1).
        reduction: ``"mean"`` over images, ``"sum"``, or ``"none"`` (``(N,)``).
        gather_distributed: Reduce over the images of every rank.

    Shape:
        patches: ``(N, P, K)``; mask: ``(N, P)``; output: scalar or ``(N,)``.

    Raises:
        TypeError: If an input is not a tensor (the patches floating-point).
        ValueError: For mismatched shapes, a mask that is not bool ``(N, P)``, or τ <= 0.

    Example:
        >>> import math
        >>> s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)  # uniform: log K per patch
        >>> mask = torch.tensor([[True, False, True], [False, False, False]])
        >>> round(ibot_patch_loss(s, t, mask).item(), 6) == round(math.log(4) / 2, 6)
        True
    """
    options = TeacherOptions.create(**keywords)
    return _ibot(student_patches, teacher_patches, mask, options).loss


@register_loss("ibot_patch")
class IBOTPatchLoss(CenteredTeacherLoss):
    """iBOT's masked-patch self-distillation loss with its own centre (Zhou et al. 2022; DINOv2).

    See :func:`ibot_patch_loss` for the formula. The centre (a float64 buffer ``center``
    ``(output_dim,)``, separate from DINO's) follows the teacher outputs of the masked patches, as
    :class:`DINOLoss`'s follows its views: ``c ← m·c + (1 − m)·mean over the masked patches`` after
    the loss, in training mode only (all ranks with ``gather_distributed``: the exact global mean,
    where DINOv2 averages the ranks' means); nothing masked leaves it unchanged. Terms:
    ``teacher_entropy`` (over masked patches), ``kl``, ``center_norm``, ``teacher_temperature``.

    Args:
        output_dim: K, the number of outputs of the iBOT head; the other arguments are those of
            :class:`~embedloss.self_distillation._teacher.CenteredTeacherLoss`.

    Raises:
        ValueError: For τ <= 0, a momentum outside [0, 1], ``output_dim < 1`` or patch outputs
            whose size is not ``output_dim``.

    Example:
        >>> loss_fn = IBOTPatchLoss(output_dim=8)
        >>> student, teacher = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
        >>> mask = torch.rand(2, 6) < 0.5
        >>> out = loss_fn.compute(student, teacher, mask)
        >>> out.loss.shape, sorted(out.terms)
        (torch.Size([]), ['center_norm', 'kl', 'teacher_entropy', 'teacher_temperature'])
    """

    def compute(self, student_patches: Tensor, teacher_patches: Tensor, mask: Tensor) -> LossOutput:
        """Loss and terms for ``(N, P, K)`` patch outputs and the ``(N, P)`` mask."""
        return self._output(_ibot, student_patches, teacher_patches, mask)

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """Patch outputs ``(n, 6, d)`` of student and teacher, about half the patches masked."""
        teacher = torch.randn(n, 6, d, generator=g)
        student = teacher + 0.5 * torch.randn(n, 6, d, generator=g)
        mask = torch.rand(n, 6, generator=g) < 0.5
        return (student.to(dtype), teacher.to(dtype), mask), {}
