"""The inputs of one training step: the data order, augmented views, local crops, patch masks.

Every random choice is a function of the seed, the epoch, the step and a sample's position in
the global batch (:func:`~embedloss.cli.data.seeded_generator`), so a run repeats exactly, a
resumed run continues exactly, and a rank of a DDP run draws what the single process would.

* **Order.** Epoch ``e`` visits a permutation of the training split seeded by ``seed + e`` (as
  ``DistributedSampler``); a step takes the next ``B`` positions, rank ``r`` of ``W`` the
  positions ``r, r + W, ...`` of them. A batch larger than the training split (the digits have
  1348 training images) is filled with further permutations: an image then appears several
  times in one step, each time augmented differently, and an epoch is one step.
* **Global views**: the two augmented views of :mod:`embedloss.cli.data` (shift, mask, noise).
* **Local crops** (multi-crop methods): a random square covering 56–81% of the image's area
  (a side of 75–90%), resized back to the full size by bilinear interpolation, plus noise: DINO's
  and SwAV's small crops, at the digits' scale (:data:`LOCAL_SIDE`).
* **Patch masks** (iBOT): each global view is masked with probability ½, then a share of its
  patches drawn uniformly from [0.1, 0.5] is masked (at least one), as DINOv2.

Example:
    >>> order = epoch_order(10, batch=4, rank=0, size=1, epoch=0, seed=0)
    >>> order.shape  # two steps of 4 (the last 2 samples wait for the next epoch)
    torch.Size([8])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss.cli.data import TaskData, apply_view, draw_view_params, seeded_generator
from embedloss.cli.methods import GRID, Method
from embedloss.cli.tasks import StepTargets

__all__ = [
    "StepBatch",
    "draw_patch_masks",
    "epoch_order",
    "local_crops",
    "make_batch",
    "steps_per_epoch",
]

#: Side of a local crop as a fraction of the image's (area 56–81%). On 8×8 digits smaller crops
#: (a side of 50–75%) lose the digit's identity: in tuning runs they cost DINO about 0.06 of
#: perturbed k-NN accuracy, more than leaving the local crops out.
LOCAL_SIDE = (0.75, 0.9)
#: iBOT's masking (DINOv2): probability that a view is masked, range of its masked share.
MASK_PROBABILITY = 0.5
MASK_RATIO = (0.1, 0.5)


def steps_per_epoch(n: int, batch: int) -> int:
    """Optimiser steps of one epoch: the whole batches in ``n`` samples, at least one."""
    return max(n // batch, 1)


def epoch_order(n: int, *, batch: int, rank: int, size: int, epoch: int, seed: int) -> Tensor:
    """The sample indices rank ``rank`` of ``size`` takes, step after step, in ``epoch``.

    Steps take consecutive runs of ``batch`` positions of the epoch's permutation (rank ``r``:
    positions ``r, r + size, ...`` of each run); a ``batch`` larger than ``n`` is filled with
    further seeded permutations, so samples repeat within a step.
    """
    steps = steps_per_epoch(n, batch)
    needed = steps * batch
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))]
    for r in range(1, math.ceil(needed / n)):
        perms.append(torch.randperm(n, generator=seeded_generator(seed, "order", epoch, r)))
    return torch.cat(perms)[:needed][rank::size]


def local_crops(
    x: Tensor,
    image_shape: tuple[int, ...],
    crops: int,
    generator: torch.Generator,
    positions: Tensor,
    batch: int,
    noise: float,
) -> Tensor:
    """``crops`` local crops of each flat image of ``x`` ``(b, F)``, stacked crop after crop.

    The crops' boxes and noise are drawn for all ``batch`` samples of the global batch (in a
    fixed order) and the rows ``positions`` kept, so that every rank draws what one process
    would. Returns ``(crops·b, F)``.
    """
    b, f = x.shape
    c, h, w = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
    side = torch.empty(crops, batch).uniform_(*LOCAL_SIDE, generator=generator)
    centre = (torch.rand(crops, batch, 2, generator=generator) * 2 - 1) * (1 - side).unsqueeze(-1)
    eps = noise * torch.randn(crops, batch, f, generator=generator) if noise > 0 else None
    side, centre = side[:, positions], centre[:, positions]  # (crops, b), (crops, b, 2)
    theta = torch.zeros(crops * b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side.reshape(-1)
    theta[:, :, 2] = centre.reshape(-1, 2)  # (x, y) of the box centre, in [-1, 1]
    theta = theta.to(x.device, x.dtype)
    images = x.reshape(b, c, h, w).repeat(crops, 1, 1, 1)  # (crops·b, C, H, W)
    grid = F.affine_grid(theta, [crops * b, c, h, w], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", align_corners=False).reshape(crops * b, f)
    if eps is not None:
        out = out + eps[:, positions].reshape(crops * b, f).to(x.device, x.dtype)
    return out


def draw_patch_masks(views: int, batch: int, generator: torch.Generator) -> Tensor:
    """The iBOT masks ``(views, batch, P)`` of the global views of a global batch (bool)."""
    p = GRID * GRID
    masked = torch.rand(views, batch, generator=generator) < MASK_PROBABILITY
    ratio = torch.empty(views, batch).uniform_(*MASK_RATIO, generator=generator)
    count = (ratio * p).round().clamp(min=1) * masked  # patches to mask, 0 if unmasked
    rank = torch.rand(views, batch, p, generator=generator).argsort(-1).argsort(-1)
    return rank < count.unsqueeze(-1)


@dataclass(frozen=True)
class StepBatch:
    """The inputs of one step, on the run's device."""

    groups: tuple[tuple[Tensor, ...], ...]  # per group: (x,) or (x, mask); see TaskModel.group
    teacher: Tensor | None  # the teacher's inputs: the global views, unmasked
    targets: StepTargets


def make_batch(
    data: TaskData,
    cfg: Mapping[str, Any],
    method: Method,
    where: tuple[int, int, torch.device],
    epoch: int,
    step: int,
    idx: Tensor,
    repeats: bool,
) -> StepBatch:
    """The inputs of step ``step`` of ``epoch`` for the local samples ``idx``.

    Args:
        data: The task's data.
        cfg: The run's config (``seed``, ``batch_size``, ``augment``).
        method: The run's method (local crops, patches, teacher).
        where: ``(rank, world size, device)``.
        epoch: The epoch (0-based).
        step: The step within the epoch.
        idx: The local samples' indices into the training split.
        repeats: The batch repeats samples: their indices become the ssl identities.
    """
    rank, size, device = where
    seed, batch, aug = int(cfg["seed"]), int(cfg["batch_size"]), cfg["augment"]
    # Local sample j of a step sits at position rank + size·j of the global batch (the order is
    # dealt round-robin), so it gets that position's augmentation.
    positions = torch.arange(len(idx)) * size + rank
    gen = seeded_generator(seed, "augment", epoch, step)
    train_b = data.train.b if data.train.b is not None else data.train.a
    views = []
    for x in (data.train.a[idx], train_b[idx]):
        params = draw_view_params(
            batch,
            x.shape[1],
            gen,
            shift=aug["shift"],
            mask=aug["mask"],
            noise=aug["noise"],
            image_shape=data.image_shape,
        ).rows(positions)
        views.append(apply_view(x, params, data.image_shape, aug["shift"]).to(device))
    y = None if data.train.y is None else data.train.y[idx].to(device)
    ids = idx.to(device) if repeats else None
    if data.train.b is not None:  # paired: one group per modality
        return StepBatch(((views[0],), (views[1],)), None, StepTargets(y, ids, None, 0))
    glob = torch.cat(views)  # (2b, F): view a of every sample, then view b
    first: tuple[Tensor, ...] = (glob,)
    mask = None
    if method.patches:
        drawn = draw_patch_masks(2, batch, seeded_generator(seed, "masks", epoch, step))
        mask = drawn[:, positions].reshape(2 * len(idx), -1).to(device)
        first = (glob, mask)
    groups = [first]
    if method.local_crops and data.image_shape is not None:
        gen_local = seeded_generator(seed, "local-crops", epoch, step)
        x = data.train.a[idx].to(device)
        crops = local_crops(
            x, data.image_shape, method.local_crops, gen_local, positions, batch, aug["noise"]
        )
        groups.append((crops,))
    teacher = glob if method.teacher_momentum is not None else None
    return StepBatch(tuple(groups), teacher, StepTargets(y, ids, mask, data.num_classes))
