"""Legacy contrastive names (and their consolidation spellings): contrastive, decoupled, NT-Xent."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from embedloss._validation import check_choice, check_float, check_reduction
from embedloss.compat._adapter import (
    CLIP_DIRECTIONS,
    LegacyLoss,
    MatchIds,
    PairedLoss,
    deprecated,
    legacy_reduce,
    metric,
    renamed,
    retrieval_metrics,
    warn_ignored,
)
from embedloss.contrastive.info_nce import InfoNCELoss as _InfoNCE
from embedloss.contrastive.simclr import SimCLRLoss as _SimCLR
from embedloss.contrastive.simclr import simclr_loss
from embedloss.multimodal.clip import CLIPLoss as _CLIP

__all__ = [
    "ContrastiveLoss",
    "DecoupledContrastiveLoss",
    "DecoupledLoss",
    "SimCLRLoss",
    "nt_xent_loss",
]

LOSS_TYPES = ("infonce", "nt_xent", "supervised")


class ContrastiveLoss(LegacyLoss):
    """Legacy bidirectional contrastive loss, computed by :class:`embedloss.CLIPLoss` or :class:`embedloss.SimCLRLoss`.

    ``loss_type="infonce"`` is CLIP's symmetric InfoNCE between the modalities (registry
    ``"clip"``); ``"nt_xent"`` is NT-Xent over the 2N embeddings ``[v; t]`` (``"simclr"``);
    ``"supervised"`` is SupCon's L_out over ``[v; t]`` with the class ``labels`` duplicated
    (Khosla et al. 2020, Eq. 2) — NT-Xent with labels, equal to ``embedloss.SupConLoss`` on
    ``torch.stack([v, t], 1)``. Samples sharing a ``match_id`` are all positives.

    Args:
        temperature: τ > 0 (default 0.07).
        loss_type: ``"infonce"`` (default), ``"nt_xent"`` or ``"supervised"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        add_projection: Build per-modality 2-layer heads ``input_dim → projection_dim`` (their
            parameters belong to this loss: give ``loss.parameters()`` to the optimiser).
        projection_dim: Output size of the heads (default 256).
        input_dim: Feature size; required for the heads.
        sampling_strategy: Ignored, with a warning (the legacy modes never activated).
        memory_bank_size: Ignored, with a warning.
        dataset_size: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "loss_v2t", "loss_t2v", "v2t_accuracy", "t2v_accuracy", "accuracy", "recalls"}``.

    Example:
        >>> import torch
        >>> loss = ContrastiveLoss(add_projection=False)
        >>> out = loss(vision_features=torch.randn(4, 8), text_features=torch.randn(4, 8),
        ...            match_ids=["a", "b", "a", "c"], class_logits=None)
        >>> sorted(out), out["loss"].shape
        (['accuracy', 'loss', 'loss_t2v', 'loss_v2t', 'recalls', 't2v_accuracy', 'v2t_accuracy'], torch.Size([]))
    """

    replacement = (
        "embedloss.CLIPLoss ('clip'); loss_type='nt_xent' → embedloss.SimCLRLoss ('simclr'), "
        "'supervised' → embedloss.SupConLoss ('supcon')"
    )
    projection_flag = "add_projection"

    def __init__(
        self,
        temperature: float = 0.07,
        loss_type: str = "infonce",
        reduction: str = "mean",
        add_projection: bool = True,
        projection_dim: int = 256,
        input_dim: int | None = None,
        sampling_strategy: str | None = None,
        memory_bank_size: int | None = None,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__()
        self.loss_type = check_choice(loss_type, "loss_type", LOSS_TYPES)
        self.reduction = check_reduction(reduction)
        warn_ignored(
            type(self).__name__,
            sampling_strategy=sampling_strategy,
            memory_bank_size=memory_bank_size,
            dataset_size=dataset_size,
        )
        self.init_heads(add_projection, input_dim, projection_dim, self.projection_flag)
        self.loss: _CLIP | _SimCLR
        if loss_type == "infonce":
            self.loss = _CLIP(temperature=temperature, reduction=reduction)
        else:  # per-anchor losses, so that the two modalities' halves can be reported
            self.loss = _SimCLR(temperature=temperature, reduction="none")

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds = None,
        indices: Tensor | None = None,
        labels: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; ``indices`` is ignored, ``labels`` used by ``"supervised"`` only."""
        v, t, ids = self.paired_inputs(vision_features, text_features, match_ids, inputs)
        if isinstance(self.loss, _CLIP):
            out = self.loss.compute(v, t, ids)
            loss, terms = out.loss, out.terms
            v2t, t2v = terms["loss_image_to_text"], terms["loss_text_to_image"]
        else:
            positives = labels if self.loss_type == "supervised" and labels is not None else ids
            per_anchor = self.loss(v, t, positives)  # (2N,): vision anchors, then text anchors
            n = v.shape[0]
            loss = legacy_reduce(per_anchor, self.reduction)
            v2t, t2v = per_anchor[:n].mean(), per_anchor[n:].mean()
        legacy = {"loss": loss, "loss_v2t": metric(v2t), "loss_t2v": metric(t2v)}
        return {**legacy, **retrieval_metrics(v, t, ids)}


class SimCLRLoss(ContrastiveLoss):
    """The consolidation's ``SimCLRLoss``: :class:`ContrastiveLoss` with ``use_projection``.

    The arguments of :class:`ContrastiveLoss` in the consolidation's order, ``use_projection``
    standing for ``add_projection``; the same inputs and outputs. For the new tensor-returning
    NT-Xent use :class:`embedloss.SimCLRLoss`.
    """

    projection_flag = "use_projection"

    def __init__(
        self,
        temperature: float = 0.07,
        loss_type: str = "infonce",
        reduction: str = "mean",
        input_dim: int | None = None,
        projection_dim: int = 256,
        use_projection: bool = True,
        sampling_strategy: str | None = None,
        memory_bank_size: int | None = None,
        dataset_size: int | None = None,
    ) -> None:
        super().__init__(
            temperature,
            loss_type,
            reduction,
            use_projection,
            projection_dim,
            input_dim,
            sampling_strategy,
            memory_bank_size,
            dataset_size,
        )


def nt_xent_loss(
    vision_features: Tensor,
    text_features: Tensor,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> Tensor:
    """Legacy NT-Xent over ``[v; t]``: :func:`embedloss.functional.simclr_loss`.

    The inputs are L2-normalised (a no-op for the normalised inputs the legacy function assumed).

    Shape:
        ``(N, D)`` each; a scalar, or ``(2N,)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), reduction="none").shape
        torch.Size([8])
    """
    deprecated("nt_xent_loss", "embedloss.functional.simclr_loss (registry 'simclr')")
    return simclr_loss(vision_features, text_features, temperature=temperature, reduction=reduction)


class DecoupledContrastiveLoss(PairedLoss):
    """Legacy cross-modal NCE plus per-modality instance discrimination, by CLIP and InfoNCE.

    ``loss = clip(v, t) + λ_v·info_nce(v, v) + λ_t·info_nce(t, t)``: the cross-modal part is
    :class:`embedloss.CLIPLoss` with samples of equal ``match_ids`` as positives; each instance
    part is :class:`embedloss.InfoNCELoss` of a modality against itself (an embedding is its
    own positive, the batch's other embeddings of that modality its negatives). It is not the
    DCL of Yeh et al. (registry ``dcl``), whose positives leave the denominator.

    Args:
        temperature: τ > 0 (default 0.07), shared by the three parts.
        lambda_v: Weight of the vision instance-discrimination term (default 0.5).
        lambda_t: Weight of the text instance-discrimination term (default 0.5).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``: the parts' per-sample sum).

    Returns (forward):
        ``{"loss", "cross_modal_loss", "instance_loss", "v2t_loss", "t2v_loss",
        "vision_inst_loss", "text_inst_loss", "v2t_accuracy", "t2v_accuracy", "accuracy"}``.

    Example:
        >>> import torch
        >>> x = torch.eye(4)
        >>> out = DecoupledContrastiveLoss(temperature=1.0)(vision_features=x, text_features=x)
        >>> round(out["loss"].item(), 4) == round(2 * out["vision_inst_loss"].item(), 4)
        True
    """

    replacement = (
        "embedloss.CLIPLoss ('clip') + weighted embedloss.InfoNCELoss ('info_nce') of each "
        "modality against itself, e.g. as embedloss.CombinedLoss"
    )

    def __init__(
        self,
        temperature: float = 0.07,
        lambda_v: float = 0.5,
        lambda_t: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.lambda_v = check_float(lambda_v, "lambda_v", low=0.0)
        self.lambda_t = check_float(lambda_t, "lambda_t", low=0.0)
        self.cross_modal = _CLIP(temperature=temperature, reduction=reduction)
        self.instance = _InfoNCE(temperature=temperature, reduction=reduction)

    def outputs(self, v: Tensor, t: Tensor, labels: Tensor | None) -> dict[str, Any]:
        """Loss and legacy metrics of one batch."""
        cross = self.cross_modal.compute(v, t, labels)
        vision_inst, text_inst = self.instance(v, v), self.instance(t, t)
        return {
            "loss": cross.loss + self.lambda_v * vision_inst + self.lambda_t * text_inst,
            "cross_modal_loss": metric(cross.loss.mean()),
            "instance_loss": metric((vision_inst.mean() + text_inst.mean()) / 2),
            **renamed(cross.terms, **CLIP_DIRECTIONS),
            "vision_inst_loss": metric(vision_inst.mean()),
            "text_inst_loss": metric(text_inst.mean()),
            **retrieval_metrics(v, t, labels, recalls=False),
        }


class DecoupledLoss(DecoupledContrastiveLoss):
    """The consolidation's ``DecoupledLoss``: :class:`DecoupledContrastiveLoss`, same arguments."""
