"""SigLIP's pairwise sigmoid image–text loss (Zhai et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedloss._validation import check_float, check_pair, check_tensor, compute_dtype
from embedloss.base.base_loss import LossOutput, detached_terms
from embedloss.base.contrastive import BaseContrastiveLoss
from embedloss.ops.info_nce import AnchorLosses, pair_masks, reduce_anchor_losses
from embedloss.ops.layouts import paired_layout
from embedloss.ops.similarity import (
    inverse_temperature,
    pair_similarity_terms,
    prepare_embeddings,
    similarity_matrix,
)
from embedloss.registry import register_loss

__all__ = ["SigLIPLoss", "siglip_anchor_losses", "siglip_loss"]


def _scalar(value: float | Tensor, name: str, dtype: torch.dtype) -> Tensor | float:
    """A float bias (checked finite) or a 0-d tensor bias (kept differentiable)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not math.isfinite(float(value.detach())):
            raise ValueError(f"{name} must be finite, got {float(value.detach())!r}")
        return value.reshape(()).to(dtype)
    return check_float(value, name)


def siglip_anchor_losses(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    bias: float | Tensor = -10.0,
    labels: Tensor | None = None,
    normalize: bool = True,
    gather_distributed: bool = False,
) -> AnchorLosses:
    """Per-image row sums ``L_i = −Σ_j log σ(z_ij·ℓ_ij)``, ``(N,)`` (see :func:`siglip_loss`).

    With ``gather_distributed`` the texts of every rank are gathered (with gradient) and each
    rank's images are scored against all of them, so the rows of all ranks together cover every
    image–text pair of the global batch exactly once. ``correct`` marks images whose top-scoring
    text is a positive; every anchor is ``valid``.
    """
    check_pair(image_embeddings, text_embeddings, "image_embeddings", "text_embeddings", labels)
    dtype = compute_dtype(image_embeddings, text_embeddings)
    img = prepare_embeddings(image_embeddings, normalize=normalize, dtype=dtype)
    txt = prepare_embeddings(text_embeddings, normalize=normalize, dtype=dtype)
    scale = inverse_temperature(temperature, dtype)
    b = _scalar(bias, "bias", dtype)
    keys, spec = paired_layout(img, txt, labels, gather_distributed)
    rows = torch.arange(img.shape[0], device=img.device)
    cols = torch.arange(keys.shape[0], device=img.device)
    positive, _ = pair_masks(spec, rows, cols)  # (n, N)
    logits = similarity_matrix(img, keys, scale) + b  # (n, N)
    signs = positive.to(logits.dtype) * 2 - 1  # z_ij: +1 positive, −1 negative
    loss = -F.logsigmoid(signs * logits).sum(dim=1)  # (n,)
    with torch.no_grad():
        correct = positive.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    return AnchorLosses(loss, torch.ones_like(correct), correct)


def siglip_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    bias: float | Tensor = -10.0,
    labels: Tensor | None = None,
    reduction: str = "mean",
    normalize: bool = True,
    gather_distributed: bool = False,
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
        gather_distributed: Score local images against the texts of every rank; the mean over
            ranks of the returned losses is the single-process loss of the global batch.

    Shape:
        image_embeddings, text_embeddings: ``(N, D)``; output: scalar, or ``(N,)`` for ``"none"``.

    Raises:
        ValueError: For mismatched shapes, an empty batch, labels of the wrong length, τ <= 0,
            a non-finite bias or an unknown reduction.

    Example:
        >>> import math
        >>> x = torch.eye(3)  # identical orthonormal pairs: one positive and two zero cosines
        >>> loss = siglip_loss(x, x, temperature=1.0, bias=0.0)
        >>> expected = -(math.log(1 / (1 + math.exp(-1))) + 2 * math.log(0.5))
        >>> round(loss.item(), 6) == round(expected, 6)
        True
    """
    result = siglip_anchor_losses(
        image_embeddings,
        text_embeddings,
        temperature=temperature,
        bias=bias,
        labels=labels,
        normalize=normalize,
        gather_distributed=gather_distributed,
    )
    return reduce_anchor_losses(result, reduction, distributed=gather_distributed)


@register_loss("siglip")
class SigLIPLoss(BaseContrastiveLoss):
    """SigLIP's pairwise sigmoid image–text loss with a learnable temperature and bias.

    See :func:`siglip_loss` for the formula (Zhai et al. 2023, Eq. 1). The temperature is stored
    as ``logit_scale = log(1/τ)`` (the paper's ``t'``; default ``log 10``), clamped at 100, and
    the bias as ``logit_bias``; each is an ``nn.Parameter`` when learnable, else a buffer.
    The loss is elementwise over pairs and does not go through the InfoNCE core, so it has no
    ``chunk_size`` option. Terms: ``accuracy`` (an image's top-scoring text is a positive),
    ``positive_similarity``, ``negative_similarity``, ``temperature``, ``bias``.

    Args:
        temperature: Initial τ > 0 (default 0.1).
        bias: Initial logit bias (default −10).
        learnable_temperature: Learn ``logit_scale`` (default True, as in the paper).
        learnable_bias: Learn ``logit_bias`` (default True, as in the paper).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-image row sums, see :func:`siglip_loss`).
        normalize: L2-normalise inputs (default True).
        gather_distributed: Score local images against the texts of all ranks (DDP).

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
        temperature: float = 0.1,
        bias: float = -10.0,
        learnable_temperature: bool = True,
        learnable_bias: bool = True,
        reduction: str = "mean",
        normalize: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            learnable_temperature=learnable_temperature,
            reduction=reduction,
            normalize=normalize,
            chunk_size=None,
            gather_distributed=gather_distributed,
        )
        value = check_float(bias, "bias")
        if not isinstance(learnable_bias, bool):
            raise TypeError(f"learnable_bias must be a bool, got {type(learnable_bias).__name__}")
        self._learnable_bias = learnable_bias
        if learnable_bias:
            self.logit_bias = nn.Parameter(torch.tensor(value))
        else:
            # float64 keeps a fixed bias exact; it is cast to the compute dtype when used.
            self.register_buffer("logit_bias", torch.tensor(value, dtype=torch.float64))

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
    ) -> LossOutput:
        """Loss and terms; ``logit_scale``/``logit_bias`` (0-d) override the module's own."""
        check_pair(image_embeddings, text_embeddings, "image_embeddings", "text_embeddings", labels)
        dtype = compute_dtype(image_embeddings, text_embeddings)
        bias = self.logit_bias if logit_bias is None else check_tensor(logit_bias, "logit_bias")
        if bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar tensor, got shape {tuple(bias.shape)}")
        bias = bias.reshape(()).to(dtype)
        result = siglip_anchor_losses(
            image_embeddings,
            text_embeddings,
            temperature=1.0 / self.scale(logit_scale, dtype=dtype),
            bias=bias,
            labels=labels,
            normalize=self._normalize,
            gather_distributed=self.gather_distributed,
        )
        loss = reduce_anchor_losses(result, self.reduction, distributed=self.gather_distributed)
        img = self.normalize_embeddings(image_embeddings.to(dtype))
        txt = self.normalize_embeddings(text_embeddings.to(dtype))
        terms = detached_terms(
            accuracy=result.correct.float().mean(),
            temperature=1.0 / self.scale(logit_scale, dtype=torch.float64),
            bias=bias,
            **pair_similarity_terms(img, txt),
        )
        return LossOutput(loss, terms)

    def forward(
        self,
        image_embeddings: Tensor,
        text_embeddings: Tensor,
        labels: Tensor | None = None,
        logit_scale: Tensor | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """The SigLIP loss (see :meth:`compute`)."""
        return self.compute(image_embeddings, text_embeddings, labels, logit_scale, logit_bias).loss

    def extra_repr(self) -> str:
        """Shown by ``print(loss)``."""
        return (
            f"temperature={self.temperature:.4g}, bias={self.bias:.4g}, "
            f"learnable_temperature={self._learnable_temperature}, "
            f"learnable_bias={self._learnable_bias}, reduction={self.reduction!r}"
        )
