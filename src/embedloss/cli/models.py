"""Small MLP encoders and heads for ``embedloss train``.

The encoder is built first after seeding, so every loss of a task starts from the same random
encoder (which is also the ``random_encoder`` baseline). Heads follow the loss's style:
a projector (the loss sees projections, evaluation uses the encoder), a projector plus predictor
(BYOL/SimSiam), a linear classifier, or, for the paired task, one encoder per modality.

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = TaskModel("ssl", "pair", 64, None, 10, hidden_dim=32, embedding_dim=8, head_dim=8)
    >>> [t.shape for t in model(torch.randn(4, 64), torch.randn(4, 64))]
    [torch.Size([4, 8]), torch.Size([4, 8])]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Encoder", "TaskModel", "mlp"]


NORMS = ("batch", "layer", "none")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    return nn.Identity()


def mlp(in_dim: int, hidden_dim: int, out_dim: int, norm: str = "batch") -> nn.Sequential:
    """``Linear → Norm → ReLU → Linear → Norm → ReLU → Linear`` (``norm``: batch, layer, none)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        _norm(norm, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        _norm(norm, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )


def _head(in_dim: int, out_dim: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), _norm(norm, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim)
    )


class TaskModel(nn.Module):
    """Encoder(s) plus the head the loss's style needs; ``forward`` returns the loss inputs.

    Args:
        task: ``ssl``, ``paired`` or ``supervised``.
        style: The loss's call style (see :mod:`embedloss.cli.tasks`).
        in_a: Input features of the (first) modality.
        in_b: Input features of the second modality (paired task).
        num_classes: Classes for a classifier head.
        hidden_dim: Width of the MLPs.
        embedding_dim: Output size of the encoder(s): the evaluated representation.
        head_dim: Output size of the projector / predictor.
        norm: Normalisation layers of the MLPs: ``batch``, ``layer`` or ``none``.
    """

    def __init__(
        self,
        task: str,
        style: str,
        in_a: int,
        in_b: int | None,
        num_classes: int,
        *,
        hidden_dim: int,
        embedding_dim: int,
        head_dim: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.task, self.style = task, style
        self.encoder = mlp(in_a, hidden_dim, embedding_dim, norm)
        self.encoder_b: nn.Module | None = None
        self.head: nn.Module | None = None
        self.predictor: nn.Module | None = None
        if task == "paired":
            self.encoder_b = mlp(in_b or in_a, hidden_dim, embedding_dim, norm)
        elif style == "classifier":
            self.head = nn.Linear(embedding_dim, num_classes)
        else:
            self.head = _head(embedding_dim, head_dim, norm)
            if style == "predictor":
                self.predictor = _head(head_dim, head_dim, norm)

    @classmethod
    def from_config(
        cls,
        task: str,
        style: str,
        in_a: int,
        in_b: int | None,
        num_classes: int,
        model_cfg: dict[str, Any],
    ) -> TaskModel:
        """The model a run's ``model`` config section describes (initialised from torch's seed)."""
        return cls(
            task,
            style,
            in_a,
            in_b,
            num_classes,
            hidden_dim=int(model_cfg["hidden_dim"]),
            embedding_dim=int(model_cfg["embedding_dim"]),
            head_dim=int(model_cfg["head_dim"]),
            norm=str(model_cfg["norm"]),
        )

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (where an EMA teacher would follow the student)."""

    def embed(self, x: Tensor, modality: str = "a") -> Tensor:
        """The evaluated representation: encoder output of modality ``"a"`` or ``"b"``."""
        if modality == "b" and self.encoder_b is not None:
            return self.encoder_b(x)
        return self.encoder(x)

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, ...]:
        """Loss inputs for a batch of two views (or two modalities) ``(B, F)`` each."""
        if self.encoder_b is not None:
            return self.encoder(x_a), self.encoder_b(x_b)
        n = x_a.shape[0]
        assert self.head is not None
        z = self.head(self.encoder(torch.cat([x_a, x_b])))  # (2B, head): one BatchNorm over both
        z_a, z_b = z[:n], z[n:]
        if self.predictor is None:
            return z_a, z_b
        p = self.predictor(z)
        return p[:n], p[n:], z_a, z_b


class Encoder(nn.Module):
    """A trained run's encoder on raw inputs: flatten, scale as in training, encode.

    ``forward`` takes a batch of raw samples ``(N, *shape)`` (or already flat ``(N, F)``), in the
    units of the training data, and returns the embeddings ``(N, D)`` the run evaluated.

    Args:
        encoder: The encoder network of one modality (a :class:`TaskModel` submodule).
        shape: The shape of one raw training sample.
        lo: The offset the training data was scaled with.
        scale: The divisor the training data was scaled with.
    """

    lo: Tensor
    scale: Tensor

    def __init__(self, encoder: nn.Module, *, shape: tuple[int, ...], lo: float, scale: float):
        super().__init__()
        self.encoder = encoder
        self.shape = tuple(shape)
        self.features = int(torch.Size(self.shape).numel())
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of raw samples ``(N, *shape)``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.features:
            raise ValueError(
                f"x must hold samples of shape {self.shape} ({self.features} values each), "
                f"got shape {tuple(x.shape)}"
            )
        return self.encoder((flat.float() - self.lo) / self.scale)
