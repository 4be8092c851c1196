"""Small MLP encoders, the heads of each method, and EMA teachers for ``embedloss train``.

The encoder is built first after seeding, so every loss of a task starts from the same random
encoder (which is also the ``random_encoder`` baseline). Heads follow the method
(:mod:`embedloss.cli.methods`): a projector (the loss sees projections, evaluation uses the
encoder), a projector plus predictor (BYOL, SimSiam, NNCLR), an MLP onto normalised prototypes
(DINO, iBOT, SwAV), a linear classifier, none (Matryoshka), or, for the paired task, one encoder
per modality. A method with an EMA teacher gets a :class:`~embedloss.MomentumEncoder` copy of
encoder and head, updated by :meth:`TaskModel.after_optimizer_step` and saved with the model.

The model is called on *groups* of inputs (the two augmented views stacked, then the local crops
of a multi-crop method) and returns one row tensor per group; rows are computed independently
(apart from BatchNorm), which is what gradient caching needs.

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = TaskModel("ssl", "pair", 64, None, 10, hidden_dim=32, embedding_dim=8, head_dim=8)
    >>> [t.shape for t in model((torch.randn(4, 64),))]  # two views of 2 samples, stacked
    [torch.Size([4, 8])]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedloss.cli.methods import GRID, Method
from embedloss.momentum import MomentumEncoder

__all__ = ["Branch", "Encoder", "PatchTokens", "PrototypeHead", "TaskModel", "mlp"]


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


def _head(in_dim: int, out_dim: int, norm: str, hidden: int | None = None) -> nn.Sequential:
    """``Linear → Norm → ReLU → Linear``, ``hidden`` wide (default ``out_dim``)."""
    width = out_dim if hidden is None else hidden
    return nn.Sequential(
        nn.Linear(in_dim, width), _norm(norm, width), nn.ReLU(), nn.Linear(width, out_dim)
    )


class PrototypeHead(nn.Module):
    """A projector, L2-normalised, scored against K L2-normalised prototypes: cosines in [-1, 1].

    DINO's head (Caron et al. 2021: MLP, normalised bottleneck, weight-normalised last layer
    with its norm fixed to 1) and SwAV's prototypes (Caron et al. 2020: normalised features
    against normalised prototypes) are both this map. The MLP is the projector of the other
    methods (two layers, ``bottleneck`` wide): on the digits DINO's three-layer, wider MLP
    learnt a weaker encoder (perturbed k-NN 0.70 against 0.72 on the default budget).

    Args:
        in_dim: Input width (the encoder's embedding).
        bottleneck: Width of the MLP and of the normalised features.
        prototypes: K, the number of outputs.
        norm: Normalisation layers of the MLP.
    """

    def __init__(self, in_dim: int, bottleneck: int, prototypes: int, norm: str) -> None:
        super().__init__()
        self.mlp = _head(in_dim, bottleneck, norm)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.normal_(self.prototypes, std=bottleneck**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, in_dim)`` → ``(n, K)`` cosines."""
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


class PatchTokens(nn.Module):
    """iBOT's patch path for an MLP encoder: a grid of patches, a mask token, patch positions.

    The image is cut into a ``GRID × GRID`` grid of patches. :meth:`mask` replaces the pixels of
    masked patches by a learned mask token (one value per pixel of a patch), so the student sees
    the masked image; :meth:`tokens` gives one token per patch, the image's embedding plus a
    learned embedding of the patch's position, which the (shared) head maps to the patch's
    output. A patch's token thus says what the whole image's embedding implies at that place:
    for the masked patches of the student, an inference from the visible ones.

    Args:
        image_shape: ``(H, W)`` or ``(C, H, W)``, H and W multiples of ``GRID``.
        embedding_dim: The encoder's output width.
    """

    pixel_patch: Tensor
    pixel_slot: Tensor

    def __init__(self, image_shape: tuple[int, ...], embedding_dim: int) -> None:
        super().__init__()
        c, h, w = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
        ph, pw = h // GRID, w // GRID
        rows, cols = torch.arange(h), torch.arange(w)
        patch = (rows // ph)[:, None] * GRID + (cols // pw)[None, :]  # (H, W)
        slot = (rows % ph)[:, None] * pw + (cols % pw)[None, :]  # (H, W): pixel within patch
        channel = torch.arange(c)[:, None, None] * (ph * pw)
        self.register_buffer("pixel_patch", patch.expand(c, h, w).reshape(-1), persistent=False)
        self.register_buffer("pixel_slot", (slot + channel).reshape(-1), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(c * ph * pw))
        self.position = nn.Parameter(0.02 * torch.randn(GRID * GRID, embedding_dim))

    @property
    def count(self) -> int:
        """Patches per image."""
        return GRID * GRID

    def mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Flat images ``(n, F)`` with the masked patches ``(n, P)`` set to the mask token."""
        hidden = mask[:, self.pixel_patch]  # (n, F)
        return torch.where(hidden, self.mask_token[self.pixel_slot].to(x.dtype), x)

    def tokens(self, embedding: Tensor) -> Tensor:
        """Patch tokens ``(n, P, E)`` of embeddings ``(n, E)``."""
        return embedding.unsqueeze(1) + self.position


class Branch(nn.Module):
    """Encoder → head (→ patch outputs): what a student computes and its EMA teacher copies.

    ``forward(x, mask=None, with_patches=False)`` returns ``(n, K)`` head outputs, or with
    ``with_patches`` ``(n, K + P·K)``: the head outputs then those of the ``P`` patch tokens.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module | None, patches: PatchTokens | None
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.patches = encoder, head, patches

    def forward(self, x: Tensor, mask: Tensor | None = None, with_patches: bool = False) -> Tensor:
        """Head outputs of ``x`` ``(n, F)`` (masked where ``mask`` says; see the class)."""
        if mask is not None:
            assert self.patches is not None
            x = self.patches.mask(x, mask)
        e = self.encoder(x)
        out = e if self.head is None else self.head(e)
        if not with_patches:
            return out
        assert self.patches is not None and self.head is not None
        tokens = self.patches.tokens(e)  # (n, P, E)
        per_patch = self.head(tokens.flatten(0, 1)).reshape(x.shape[0], -1)  # (n, P·K)
        return torch.cat([out, per_patch], dim=1)


class TaskModel(nn.Module):
    """Encoder(s) plus the method's heads and teacher; ``forward`` returns the loss's rows.

    Args:
        task: ``ssl``, ``paired`` or ``supervised``.
        style: The loss's call style (see :mod:`embedloss.cli.tasks`).
        in_a: Input features of the (first) modality.
        in_b: Input features of the second modality (paired task).
        num_classes: Classes for a classifier head.
        hidden_dim: Width of the MLPs.
        embedding_dim: Output size of the encoder(s): the evaluated representation.
        head_dim: Output size of the projector / predictor (the bottleneck of a prototype head).
        norm: Normalisation layers of the MLPs: ``batch``, ``layer`` or ``none``.
        method: The method's head, teacher, prototypes and patches (default: a projector, or a
            classifier for the classifier style).
        image_shape: The shape of one image (patch tokens need it).
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
        method: Method | None = None,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if method is None:
            method = Method("classifier" if style == "classifier" else "projector")
        self.task, self.style, self.method = task, style, method
        self.encoder = mlp(in_a, hidden_dim, embedding_dim, norm)
        self.encoder_b: nn.Module | None = None
        self.head: nn.Module | None = None
        self.predictor: nn.Module | None = None
        self.patches: PatchTokens | None = None
        self.teacher: MomentumEncoder | None = None
        if task == "paired":
            self.encoder_b = mlp(in_b or in_a, hidden_dim, embedding_dim, norm)
        elif method.head == "classifier":
            self.head = nn.Linear(embedding_dim, num_classes)
        elif method.head == "prototypes":
            assert method.prototypes is not None
            self.head = PrototypeHead(embedding_dim, head_dim, method.prototypes, norm)
        elif method.head != "none":
            if method.head == "predictor":  # BYOL's wide projector and predictor
                self.head = _head(embedding_dim, head_dim, norm, hidden_dim)
                self.predictor = _head(head_dim, head_dim, norm, hidden_dim)
            else:
                self.head = _head(embedding_dim, head_dim, norm)
        if method.patches:
            assert image_shape is not None
            self.patches = PatchTokens(image_shape, embedding_dim)
        # Not a submodule: encoder and head are registered above under their own names.
        object.__setattr__(self, "_branch", Branch(self.encoder, self.head, self.patches))
        if method.teacher_momentum is not None and task != "paired":
            self.teacher = MomentumEncoder(
                self.branch,
                momentum=method.teacher_momentum,
                schedule=method.teacher_schedule or "constant",
            )

    @classmethod
    def from_config(
        cls,
        task: str,
        style: str,
        in_a: int,
        in_b: int | None,
        num_classes: int,
        model_cfg: dict[str, Any],
        method: Method | None = None,
        image_shape: tuple[int, ...] | None = None,
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
            method=method,
            image_shape=image_shape,
        )

    @property
    def branch(self) -> Branch:
        """Encoder and head as one module (what the teacher copies)."""
        branch: Branch = self.__dict__["_branch"]
        return branch

    @property
    def scheduled_teacher(self) -> bool:
        """Whether the teacher's momentum follows a schedule over the run's steps."""
        return self.teacher is not None and self.teacher.schedule != "constant"

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After optimiser step ``step`` (0-based) of ``total_steps``: the EMA teacher follows.

        The momentum of step k is the schedule's ``m(k)`` (``MomentumEncoder.update_step``);
        ``θ_teacher ← m·θ_teacher + (1 − m)·θ_student`` then copies the just-updated weights.
        """
        if self.teacher is not None:
            self.teacher.update_step(step, total_steps)
            self.teacher.update()

    def embed(self, x: Tensor, modality: str = "a") -> Tensor:
        """The evaluated representation: encoder output of modality ``"a"`` or ``"b"``."""
        if modality == "b" and self.encoder_b is not None:
            return self.encoder_b(x)
        return self.encoder(x)

    def group(self, index: int, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The rows of input group ``index``: ``(n, F)`` inputs (and iBOT's ``(n, P)`` mask).

        Paired task: group 0 is modality a, group 1 modality b. Otherwise group 0 holds the
        global views (the only one with patch outputs), group 1 the local crops.
        """
        if self.encoder_b is not None:
            return self.encoder(x) if index == 0 else self.encoder_b(x)
        rows = self.branch(x, mask, with_patches=self.patches is not None and index == 0)
        if self.predictor is None:
            return rows
        return torch.cat([rows, self.predictor(rows)], dim=1)  # projection | prediction

    def forward(self, *groups: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """One row tensor per input group (each a tuple ``(x,)`` or ``(x, mask)``)."""
        return tuple(self.group(i, *g) for i, g in enumerate(groups))

    @torch.no_grad()
    def teacher_rows(self, x: Tensor, chunk: int | None = None) -> Tensor | None:
        """The EMA teacher's rows of the (unmasked) global views ``x``, or None without one.

        ``chunk`` runs the teacher that many rows at a time (no graph is kept either way).
        """
        if self.teacher is None:
            return None
        with_patches = self.patches is not None
        parts = x.split(chunk) if chunk else (x,)
        return torch.cat([self.teacher(p, None, with_patches) for p in parts])


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
        if x.dim() < 2 or x.shape[1:].numel() != self.features:
            raise ValueError(
                f"x must hold samples of shape {self.shape} ({self.features} values each), "
                f"got shape {tuple(x.shape)}"
            )
        flat = x.reshape(x.shape[0], self.features)  # N = 0 too: an empty (0, D) result
        return self.encoder((flat.float() - self.lo) / self.scale)
