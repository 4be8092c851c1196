"""What the trainer composes around a registered loss: iBOT's objective, scored pairs, parts.

* :class:`IBOTObjective`: ``ibot_patch`` alone scores the masked patches of a view that the
  teacher saw whole; nothing in it relates two augmented views, so on its own it cannot teach
  the invariance the digits task measures. iBOT (Zhou et al. 2022, Eq. 3) and DINOv2 train it
  beside DINO's loss on the [CLS] outputs, and so does ``embedloss train``.
* :func:`scored_pairs`: CoSENT and AnglE learn from pairs with a graded similarity score. The
  digits have none, so a batch of two augmented views with class labels is turned into pairs
  whose score comes from what makes two inputs alike: the same image (1), the same class
  (0.5), different classes (0).
* :func:`combined_parts`: a ``combined`` loss whose parts need different inputs (a pair-style
  loss and single-style regularisers: DINOv2 adds KoLeo at weight 0.1 to its invariance loss)
  is called part by part, each with its own inputs, and summed with the combined's weights.

Example:
    >>> a, b = torch.zeros(9, 2), torch.ones(9, 2)
    >>> scored_pairs(a, b, torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0]))[2]
    tensor([1.0000, 1.0000, 1.0000, 0.5000, 0.0000, 0.0000, 0.5000, 0.0000, 0.0000])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.composite import CombinedLoss
from embedloss.composite._parts import prefixed, run_part, weighted_sum
from embedloss.self_distillation import DINOLoss, IBOTPatchLoss

__all__ = ["IBOTObjective", "combined_parts", "scored_pairs"]


class IBOTObjective(nn.Module):
    r"""iBOT's objective: DINO's loss on the [CLS] outputs plus the masked-patch loss.

        L = L_[CLS](student crops, teacher global crops) + L_MIM(student patches, teacher patches)

    (Zhou et al. 2022, Eq. 3, both weights 1). The [CLS] part is a :class:`~embedloss.DINOLoss`
    with the patch loss's output size, temperatures, centre momentum and distribution, and a
    centre of its own (as in iBOT); both centres are in :meth:`state_dict`. Terms are the two
    losses' own, prefixed ``cls/`` and ``patch/``, plus ``cls_loss`` and ``patch_loss``.

    Args:
        patch: The configured ``ibot_patch`` loss.
    """

    def __init__(self, patch: IBOTPatchLoss) -> None:
        super().__init__()
        self.patch = patch
        self.cls = DINOLoss(
            output_dim=patch.output_dim,
            teacher_temperature=patch.teacher_temperature,
            student_temperature=patch.student_temperature,
            center_momentum=patch.center_momentum,
            gather_distributed=patch.gather_distributed,
        )

    # Neither part has a step schedule; the hooks exist because the trainer calls them.
    update_step = BaseLoss.update_step

    def update_epoch(self, epoch: int) -> None:
        """Forward the epoch to both parts."""
        self.cls.update_epoch(epoch)
        self.patch.update_epoch(epoch)

    def compute(
        self,
        student_cls: list[Tensor],
        teacher_cls: list[Tensor],
        student_patches: Tensor,
        teacher_patches: Tensor,
        mask: Tensor,
    ) -> LossOutput:
        """Both losses and their terms (each updates its own centre in training mode)."""
        cls = self.cls.compute(student_cls, teacher_cls)
        patch = self.patch.compute(student_patches, teacher_patches, mask)
        terms = {"cls_loss": cls.loss.detach(), "patch_loss": patch.loss.detach()}
        terms.update({f"cls/{k}": v for k, v in cls.terms.items()})
        terms.update({f"patch/{k}": v for k, v in patch.terms.items()})
        return LossOutput(cls.loss + patch.loss, terms)

    def forward(self, *args: Tensor | list[Tensor]) -> Tensor:
        """The summed loss (see :meth:`compute`)."""
        return self.compute(*args).loss  # type: ignore[arg-type]


def scored_pairs(a: Tensor, b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Graded pairs from two views ``a``, ``b`` ``(n, D)`` of n labelled samples.

    Pair ``i`` is ``(a_i, b_π(i))`` with π a permutation (every row is used once, so in-batch
    negatives never meet a copy of themselves): the first third of the rows pair with their own
    other view (score 1); the second third with the next sample of the same class in label order
    (score 0.5, or 0 at the boundary between two classes); the last third with the next sample in
    batch order (mostly another class: score 0, or 0.5).

    Returns:
        ``(a, b[π], scores)``: the loss's ``(embeddings_a, embeddings_b, scores)``.
    """
    n = a.shape[0]
    third = n // 3
    idx = torch.arange(n, device=a.device)
    partner = idx.clone()
    mid = idx[third : 2 * third]
    order = mid[torch.argsort(labels[mid], stable=True)]  # the middle third by label
    partner[order] = order.roll(-1)
    last = idx[2 * third :]
    partner[last] = last.roll(-1)
    same_class = (labels[partner] == labels).to(a.dtype)
    scores = torch.where(partner == idx, torch.ones_like(same_class), 0.5 * same_class)
    return a, b[partner], scores


def combined_parts(
    loss: CombinedLoss, inputs: Mapping[str, tuple[tuple[Tensor, ...], dict[str, Tensor]]]
) -> LossOutput:
    """What ``loss.compute`` returns, with each part called on its own ``(args, kwargs)``.

        L = Σ_k w_k·L_k(inputs[k])

    The weights are the combined loss's; the terms are named as its own: ``"<part>/loss"`` (the
    part's unweighted loss) and ``"<part>/<term>"``.

    Args:
        loss: The ``combined`` loss.
        inputs: The positional and keyword arguments of each part, by part name.
    """
    outputs = {name: run_part(name, part, *inputs[name]) for name, part in loss.losses.items()}
    total = weighted_sum({n: o.loss for n, o in outputs.items()}, loss.weights)
    return LossOutput(total, {k: v for n, o in outputs.items() for k, v in prefixed(n, o).items()})
