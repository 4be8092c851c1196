"""SigLIP's pairwise sigmoid image–text loss (Zhai et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from embedloss._validation import check_bool, check_float, check_pair, check_tensor, on_host
from embedloss.base.base_loss import LossOutput
from embedloss.base.contrastive import BaseContrastiveLoss, ContrastiveArgs
from embedloss.base.mixins import register_scalar
from embedloss.ops.info_nce import (
    ContrastiveKeywords,
    ContrastiveOptions,
    PairedResult,
    contrastive_keywords,
)
from embedloss.ops.layouts import paired_layout
from embedloss.ops.sigmoid import sigmoid_pairs
from embedloss.ops.similarity import pair_similarity_terms
from embedloss.registry import register_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SigLIPLoss", "siglip_loss"]

NAMES = ("image_embeddings", "text_embeddings")


def _check_bias(bias: float | Tensor) -> float | Tensor:
    """A float bias (checked finite) or a 0-d tensor bias (checked on CPU, kept differentiable)."""
    if not isinstance(bias, Tensor):
        return check_float(bias, "bias")
    if bias.numel() != 1:
        raise ValueError(f"bias must be a scalar, got a tensor of shape {tuple(bias.shape)}")
    if on_host(bias) and not bool(torch.isfinite(bias.detach()).all()):
        raise ValueError(f"bias must be finite, got {float(bias.detach())!r}")
    return bias.reshape(())


def _siglip(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    labels: Tensor | None,
    bias: float | Tensor,
    options: ContrastiveOptions,
    negative_only: bool = False,
) -> PairedResult:
    """Per-image row sums ``L_i = −Σ_j log σ(z_ij·ℓ_ij)`` ``(n,)`` of ``sigmoid_pairs``, reduced.

    With ``gather_distributed`` each rank's images are scored against the texts of every rank
    (gathered with gradient): the rows of all ranks cover each pair of the global batch once.
    ``correct`` marks images whose top-scoring text is a positive; every anchor is ``valid``.
    """
    check_pair(image_embeddings, text_embeddings, *NAMES, labels)
    if check_bool(negative_only, "negative_only") and labels is not None:
        raise ValueError("labels cannot be combined with negative_only (every pair is negative)")
    img, txt = options.prepare(image_embeddings, text_embeddings)
    b = bias.to(img.dtype) if isinstance(bias, Tensor) else bias
    keys, spec = paired_layout(img, txt, labels, options.gather_distributed)
    result = sigmoid_pairs(
        img,
        keys,
        options.scale_as(img.dtype),
        b,
        spec,
        negative_only=negative_only,
        chunk_size=options.chunk_size,
        reduced=options.reduced,
    )
    return PairedResult(options.reduce(result), (result,), img, txt)


@contrastive_keywords()
def siglip_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    bias: float | Tensor = -10.0,
    labels: Tensor | None = None,
    negative_only: bool = False,
    **keywords: Unpack[ContrastiveKeywords],
) -> Tensor:
    r"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Eq. 1 and Algorithm 1).

    With L2-normalised image and text embeddings ``x_i``, ``y_j``, logits
    ``ℓ_ij = x_i·y_j/τ + b`` and ``z_ij = +1`` for positive pairs, ``−1`` otherwise:

        L = −(1/N)·Σ_i Σ_j log σ(z_ij·ℓ_ij)

    Every image–text pair is an independent binary classification, so there is no softmax over
    the batch. The positives are the diagonal, or, with ``labels``, every pair sharing a label.
    The paper initialises ``τ = 0.1`` (``t' = log 10``) and ``b = −10``, which keeps the initial
    loss small despite the N² − N negatives.

    Args:
        image_embeddings: ``(N, D)``.
        text_embeddings: ``(N, D)``; row ``i`` pairs with image ``i``.
        temperature: τ > 0 (float, or a 0-d tensor for a learnable τ). Default 0.1.
        bias: The logit bias ``b`` (float, or a 0-d tensor for a learnable bias). Default −10.
        labels: Optional ``(N,)`` identities; equal labels are positives.
        reduction: ``"mean"`` (the paper's ``L``), ``"sum"`` (``N·L``) or ``"none"``: the
            ``(N,)`` per-image row sums ``−Σ_j log σ(z_ij·ℓ_ij)``, whose mean is ``L``.
        normalize: L2-normalise the inputs first (default True).
        chunk_size: ``None`` (dense logits), an int (row tiles of that many images, exact, with
            O((N + M)·D) memory; see :mod:`embedloss.ops.sigmoid`) or ``"auto"`` (dense for
            tiny batches, tiles above).
        gather_distributed: Score local images against the texts of every rank; the mean over
            ranks of the returned losses is the single-process loss of the global batch.
        negative_only: Every pair is a negative (``z_ij = −1``), as when a rank scores its
            images against a block of another rank's texts; no ``labels`` then.

    Shape:
        image_embeddings, text_embeddings: ``(N, D)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, labels of the wrong length, τ <= 0,
            a non-finite bias, an unknown reduction, or labels with ``negative_only``.
        TypeError: For a ``chunk_size`` that is not None, "auto" or an int, or a non-bool
            ``negative_only``.

    Example:
        >>> import math
        >>> x = torch.eye(3)  # identical orthonormal pairs: one positive and two zero cosines
        >>> loss = siglip_loss(x, x, temperature=1.0, bias=0.0)
        >>> expected = -(math.log(1 / (1 + math.exp(-1))) + 2 * math.log(0.5))
        >>> round(loss.item(), 6) == round(expected, 6)
        True
    """
    options = ContrastiveOptions.create(**keywords)
    bias = _check_bias(bias)
    return _siglip(image_embeddings, text_embeddings, labels, bias, options, negative_only).loss


@register_loss("siglip")
class SigLIPLoss(BaseContrastiveLoss, learnable_temperature=True):
    """SigLIP's pairwise sigmoid image–text loss with a learnable temperature and bias.

    See :func:`siglip_loss` for the formula (Zhai et al. 2023, Eq. 1). The temperature is stored
    as ``logit_scale = log(1/τ)`` (the paper's ``t'``; default ``log 10``), clamped at 100, and
    the bias as ``logit_bias``; each is an ``nn.Parameter`` when learnable, else a buffer.
    ``negative_only=True`` in a call makes every pair a negative (a block of another rank's
    texts; see :func:`siglip_loss`). Terms: ``accuracy`` (an image's top-scoring text is a
    positive), ``positive_similarity``, ``negative_similarity``, ``temperature``, ``bias``.

    Args:
        temperature, bias: Initial τ > 0 (default 0.1) and logit bias (default −10).
        learnable_temperature: Learn ``logit_scale`` (default True, as in the paper).
        learnable_bias: Learn ``logit_bias`` (default True, as in the paper).
        **options: ``reduction``, ``normalize``, ``chunk_size`` (default ``"auto"``) and
            ``gather_distributed``: as :func:`siglip_loss`.

    Raises:
        ValueError: If τ <= 0 or the bias is not finite.
        TypeError: If a ``learnable_*`` flag is not a bool.

    Example:
        >>> loss = SigLIPLoss()
        >>> sorted(name for name, _ in loss.named_parameters())
        ['logit_bias', 'logit_scale']
        >>> loss(torch.randn(6, 16), torch.randn(6, 16)).shape
        torch.Size([])
    """

    logit_bias: Tensor

    def __init__(
        self,
        *,
        bias: float = -10.0,
        learnable_bias: bool = True,
        **options: Unpack[ContrastiveArgs],
    ) -> None:
        super().__init__(**options)
        self._learnable_bias = check_bool(learnable_bias, "learnable_bias")
        register_scalar(self, "logit_bias", check_float(bias, "bias"), learnable_bias)

    @property
    def bias(self) -> float:
        """The current logit bias ``b``."""
        return float(self.logit_bias.detach())

    def compute(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
        logit_bias: Tensor | None = None,
        *,
        negative_only: bool = False,
    ) -> LossOutput:
        """Loss and terms; ``logit_scale``/``logit_bias`` (0-d) override the module's own."""
        bias = self.logit_bias if logit_bias is None else check_tensor(logit_bias, "logit_bias")
        if bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar tensor, got shape {tuple(bias.shape)}")
        options = self.options(logit_scale)
        bias = bias.reshape(())
        result = _siglip(image_embeddings, text_embeddings, labels, bias, options, negative_only)

        def terms() -> dict[str, Tensor | float]:
            paired = self.paired_output(result, options).terms
            return {**paired, "bias": bias, **pair_similarity_terms(result.a, result.b)}

        return self.output(result.loss, terms)

    shown = (
        "temperature:.4g bias:.4g learnable_temperature=_learnable_temperature "
        "learnable_bias=_learnable_bias reduction!r"
    )
