"""What the proxy-based losses share: the learnable ``weight``, class cosines, checks, examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedloss._validation import (
    check_bool,
    check_embeddings,
    check_int,
    check_labels,
    compute_dtype,
    on_host,
)
from embedloss.base.base_loss import BaseLoss, Examples, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.similarity import l2_normalize

if TYPE_CHECKING:
    from typing_extensions import Required

__all__ = ["BaseProxyLoss", "ProxyArgs", "ProxyOptions", "class_cosines", "margin_softmax"]


class ClassCosines(NamedTuple):
    """Cosines ``(N, C)`` of embeddings and class centres, and the checked labels ``(N,)``."""

    cosine: Tensor
    labels: Tensor


def class_cosines(
    embeddings: Tensor, labels: Tensor, weight: Tensor, sub_centers: int = 1
) -> ClassCosines:
    """Checked cosines of ``embeddings (N, D)`` with the class centres ``weight (C·k, D)``.

    Rows ``c·k … c·k + k − 1`` of ``weight`` are class ``c``'s ``k = sub_centers`` sub-centres
    and the class's cosine is their largest (Deng et al. 2020). Labels are range-checked on CPU.
    """
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0])
    check_embeddings(weight, "weight")
    rows, dim = weight.shape
    classes = rows // sub_centers
    if embeddings.shape[1] != dim:
        raise ValueError(
            f"embeddings must have embedding_dim={dim} features, got {embeddings.shape[1]}"
        )
    if on_host(labels) and labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"labels must be class indices in [0, {classes}), got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    dtype = compute_dtype(embeddings, weight)
    x = l2_normalize(embeddings.to(dtype))
    w = l2_normalize(weight.to(dtype))
    cosine = x @ w.T  # (N, C·k)
    if sub_centers > 1:
        cosine = cosine.view(-1, classes, sub_centers).amax(dim=2)  # (N, C)
    return ClassCosines(cosine, labels.long())


def target_cosine(cc: ClassCosines) -> Tensor:
    """``cos θ_y (N,)``: each sample's cosine with its own class."""
    return cc.cosine.gather(1, cc.labels.unsqueeze(1)).squeeze(1)


class ProxyOptions(NamedTuple):
    """A proxy loss's layout and reduction: ``k`` centres per class, ``reduction``, over ranks."""

    sub_centers: int = 1
    reduction: str = "mean"
    gather_distributed: bool = False


def margin_softmax(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    scale: float,
    target: Callable[[Tensor], Tensor],
    options: ProxyOptions,
) -> tuple[Tensor, ClassCosines]:
    """Reduced cross-entropy of ``scale·cos θ`` with ``cos θ_y`` made ``target(cos θ_y)``.

    ``target`` applies the loss's margin (ArcFace's ``cos(θ + m)``, CosFace's ``cos θ − m``);
    the other classes keep ``cos θ_j``.
    """
    cc = class_cosines(embeddings, labels, weight, options.sub_centers)
    y = cc.labels.unsqueeze(1)
    logits = cc.cosine.scatter(1, y, target(target_cosine(cc)).unsqueeze(1)) * scale  # (N, C)
    per_sample = F.cross_entropy(logits, cc.labels, reduction="none")
    distributed = options.gather_distributed
    return reduce_samples(per_sample, options.reduction, distributed=distributed), cc


class ProxyArgs(TypedDict, total=False):
    """The options of :class:`BaseProxyLoss`, for a subclass's ``**options: Unpack[...]``."""

    num_classes: Required[int]
    embedding_dim: Required[int]
    reduction: str
    gather_distributed: bool
    seed: int | None


class BaseProxyLoss(BaseLoss):
    """Base of the losses with learnable class centres ``weight (C·k, D)`` (as ``nn.Linear``).

    A subclass names its own options and passes these on as ``**options: Unpack[ProxyArgs]``
    (ArcFace also its ``k`` sub-centres, positionally). The centres start from
    N(0, :meth:`_init_std`²), drawn from the global RNG, or with ``seed`` from a seeded generator
    (the same centres on every DDP rank without a broadcast). A loss implements ``compute``.

    Args:
        num_classes: C >= 1.
        embedding_dim: D >= 1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (as the loss's function).
        gather_distributed: Reduce over the samples of every rank (DDP).
        seed: Seed of the centres' initialisation (default None: the global RNG).
    """

    weight: nn.Parameter

    def __init__(
        self,
        sub_centers: int = 1,
        /,
        *,
        num_classes: int,
        embedding_dim: int,
        reduction: str = "mean",
        gather_distributed: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.sub_centers = check_int(sub_centers, "sub_centers", low=1)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        g = None if seed is None else torch.Generator().manual_seed(check_int(seed, "seed"))
        shape = (num_classes * sub_centers, embedding_dim)
        self.weight = nn.Parameter(torch.randn(shape, generator=g) * self._init_std())

    def _init_std(self) -> float:
        return 0.01  # the official ArcFace's

    def options(self) -> ProxyOptions:
        """This loss's layout and reduction."""
        return ProxyOptions(self.sub_centers, self.reduction, self.gather_distributed)

    #: Four classes of 16-dimensional embeddings, seeded centres (the conformance inputs).
    example_options: ClassVar[dict[str, Any]] = {"num_classes": 4, "embedding_dim": 16, "seed": 0}

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``(embeddings (n, d), labels (n,))`` with labels in ``[0, 4)``."""
        labels = torch.arange(n) % 4
        embeddings = torch.randn(n, d, generator=g).to(dtype)
        return (embeddings, labels), {}

    shown = "num_classes embedding_dim reduction!r"


class MarginLoss(BaseProxyLoss):
    """ArcFace's and CosFace's base: :func:`margin_softmax` with the target logit :meth:`_target`."""

    scale: float

    def _target(self, cos: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Loss and terms for ``embeddings (N, D)`` and ``labels (N,)``."""
        options, target = self.options(), self._target
        loss, cc = margin_softmax(embeddings, labels, self.weight, self.scale, target, options)

        def terms() -> dict[str, Tensor | float]:
            accuracy = (cc.cosine.argmax(dim=1) == cc.labels).float().mean()
            return {"accuracy": accuracy, "target_cosine": target_cosine(cc).mean()}

        return self.output(loss, terms)
