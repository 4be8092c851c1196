"""Peer implementations timed by ``bench_losses.py --peers`` (factories taking ``temperature``).

* ``openclip_style``: open_clip's ``ClipLoss`` as written there — both logit matrices
  ``s·image@textᵀ`` and ``s·text@imageᵀ`` materialised, ``F.cross_entropy`` each way
  (6 GEMM units and about four N×N buffers).
* ``pml_ntxent``: pytorch-metric-learning's ``NTXentLoss`` on the 2N views with labels
  ``[0..N-1, 0..N-1]`` (raises ``ImportError`` if the package is missing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Loss = Callable[[Tensor, Tensor], Tensor]


def openclip_style(temperature: float = 0.07) -> Loss:
    logit_scale = 1.0 / temperature

    def loss(image: Tensor, text: Tensor) -> Tensor:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits_per_image = logit_scale * image @ text.T
        logits_per_text = logit_scale * text @ image.T
        labels = torch.arange(image.shape[0], device=image.device)
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2

    return loss


def pml_ntxent(temperature: float = 0.5) -> Loss:
    from pytorch_metric_learning.losses import NTXentLoss

    fn = NTXentLoss(temperature=temperature)

    def loss(z_a: Tensor, z_b: Tensor) -> Tensor:
        idx = torch.arange(z_a.shape[0], device=z_a.device)
        return fn(torch.cat([z_a, z_b]), torch.cat([idx, idx]))

    return loss
