"""Alignment and uniformity on the hypersphere (Wang & Isola 2020)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from embedloss._validation import (
    check_coefficients,
    check_flags,
    check_pair,
    check_positive_float,
    compute_dtype,
)
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.anchors import reduce_samples
from embedloss.ops.distributed import gather_with_grad
from embedloss.ops.similarity import prepare_embeddings
from embedloss.ops.statistics import alignment_per_anchor, log_uniformity
from embedloss.registry import register_loss

__all__ = ["AlignmentUniformityLoss", "alignment_uniformity_loss"]


@dataclass(frozen=True)
class _Options:
    """α, t, the weight λ, normalisation and the distributed switch, checked when built."""

    alpha: float = 2.0
    t: float = 2.0
    weight: float = 1.0
    normalize: bool = True
    gather_distributed: bool = False

    def __post_init__(self) -> None:
        check_positive_float(self.alpha, "alpha")
        check_positive_float(self.t, "t")
        check_coefficients(weight=self.weight)
        check_flags(normalize=self.normalize, gather_distributed=self.gather_distributed)


def _alignment_uniformity(
    z_a: Tensor, z_b: Tensor, labels: Tensor | None, options: _Options, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The checked, reduced loss, the per-pair alignment ``(N,)`` and the uniformity (0-d).

    The uniformity is a batch quantity shared by every pair (``align_i + λ·uniformity``), so
    any reduction of the per-pair values carries it with the right weight.
    """
    check_pair(z_a, z_b, "z_a", "z_b", labels)
    dtype, dist = compute_dtype(z_a, z_b), options.gather_distributed
    a = prepare_embeddings(z_a, normalize=options.normalize, dtype=dtype)
    b = prepare_embeddings(z_b, normalize=options.normalize, dtype=dtype)
    keys, key_labels = b, labels
    if labels is not None and dist:
        # Same-label positives may live on other ranks; unlabelled pairs are always local.
        keys = gather_with_grad(b, True).tensor
        key_labels = gather_with_grad(labels, True).tensor
    align = alignment_per_anchor(a, keys, options.alpha, labels, key_labels).loss  # (N,)
    uniform = (log_uniformity(a, options.t, dist) + log_uniformity(b, options.t, dist)) / 2
    per_pair = align + options.weight * uniform  # (N,)
    return reduce_samples(per_pair, reduction, distributed=dist), align, uniform


def alignment_uniformity_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    weight: float = 1.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    gather_distributed: bool = False,
) -> Tensor:
    r"""Alignment plus weighted uniformity (Wang & Isola 2020, Eqs. 4–5 and their official code).

    For L2-normalised positive pairs ``(x_i, y_i)``:

        L_align   = (1/N)·Σ_i ‖x_i − y_i‖₂^α                                   (Eq. 4)
        L_unif(x) = log( (2/(N(N−1)))·Σ_{i<j} exp(−t·‖x_i − x_j‖₂²) )          (Eq. 5)
        L         = L_align + weight·(L_unif(x) + L_unif(y))/2

    i.e. ``align_loss(x, y, alpha) + lam * (uniform_loss(x, t) + uniform_loss(y, t)) / 2`` of the
    official code: uniformity is averaged over the two views (modalities). Uniformity is
    computed in log space (as :func:`embedloss.metrics.uniformity`). With ``labels``, ``x_i`` is
    aligned with every ``y_j`` of its label (mean over them); uniformity, which has no notion of
    positives, is unchanged.

    Args:
        z_a: ``(N, D)`` first view / modality (``x``).
        z_b: ``(N, D)`` second view / modality (``y``); row ``i`` pairs with ``z_a[i]``.
        alpha: α > 0 of the alignment (default 2).
        t: t > 0 of the uniformity (default 2).
        weight: λ >= 0 of the uniformity (default 1).
        labels: Optional ``(N,)`` identities; equal labels are positive pairs.
        reduction: ``"mean"`` (``L``), ``"sum"`` or ``"none"``: the ``(N,)`` values
            ``align_i + weight·uniformity`` (the batch uniformity shared by every pair), so that
            their mean is ``L`` and their sum is the ``"sum"`` reduction.
        normalize: L2-normalise the inputs first (default True, as the paper assumes).
        gather_distributed: Uniformity (and labelled alignment) over the embeddings of every
            rank; the mean over ranks of the returned losses is the single-process loss.

    Shape:
        z_a, z_b: ``(N, D)`` with N >= 2; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For mismatched shapes, fewer than two pairs, labels of the wrong length,
            α <= 0, t <= 0 or weight < 0.

    Example:
        >>> x = torch.eye(4)  # perfectly aligned; all pairs at squared distance 2
        >>> round(alignment_uniformity_loss(x, x).item(), 6)  # 0 + (−2·2)
        -4.0
    """
    options = _Options(alpha, t, weight, normalize, gather_distributed)
    return _alignment_uniformity(z_a, z_b, labels, options, reduction)[0]


@register_loss("alignment_uniformity")
class AlignmentUniformityLoss(BaseLoss):
    """Alignment plus weighted uniformity on the hypersphere (Wang & Isola 2020, Eqs. 4–5).

    See :func:`alignment_uniformity_loss` for the formula. Terms: ``alignment`` (mean over
    pairs), ``uniformity`` (mean of the two views).

    Args:
        alpha, t, weight, reduction, normalize, gather_distributed: As
            :func:`alignment_uniformity_loss`.

    Raises:
        ValueError: If α <= 0, t <= 0 or weight < 0.
        TypeError: If ``gather_distributed`` is not a bool.

    Example:
        >>> loss = AlignmentUniformityLoss(weight=0.5)
        >>> out = loss.compute(torch.randn(8, 16), torch.randn(8, 16))
        >>> sorted(out.terms)
        ['alignment', 'uniformity']
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        t: float = 2.0,
        weight: float = 1.0,
        reduction: str = "mean",
        normalize: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(reduction=reduction)
        self.options = _Options(alpha, t, weight, normalize, gather_distributed)

    def compute(self, z_a: Tensor, z_b: Tensor, labels: Tensor | None = None) -> LossOutput:
        """Loss and terms for paired ``(N, D)`` embeddings and optional ``labels (N,)``."""
        loss, align, uniform = _alignment_uniformity(z_a, z_b, labels, self.options, self.reduction)
        return self.output(loss, lambda: {"alignment": align.mean(), "uniformity": uniform})

    @property
    def gather_distributed(self) -> bool:
        """Whether the loss uses the batch of every rank (see ``gather_distributed``)."""
        return self.options.gather_distributed

    shown = "options.alpha options.t options.weight reduction!r"
