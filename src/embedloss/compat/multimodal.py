"""Legacy multimodal names: CLIP-style, mixed and simple contrastive losses, recall@k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from embedloss._validation import check_tensor
from embedloss.compat._adapter import (
    CLIP_DIRECTIONS,
    LegacyLoss,
    MatchIds,
    PairedLoss,
    deprecated,
    metric,
    metrics,
    renamed,
    retrieval_metrics,
)
from embedloss.composite.mixed_multimodal import MixedMultimodalLoss as _Mixed
from embedloss.metrics import recall_at_k
from embedloss.multimodal.clip import CLIPLoss as _CLIP
from embedloss.multimodal.feature_consistency import FeatureConsistencyLoss as _Consistency
from embedloss.ops.similarity import l2_normalize, positive_mask_from_labels
from embedloss.supervised.mse import MSELoss as _MSE

__all__ = [
    "CLIPLoss",
    "CLIPStyleLoss",
    "FeatureConsistencyLoss",
    "MixedMultimodalLoss",
    "MultiModalMixedContrastiveLoss",
    "SimpleContrastiveLoss",
    "compute_recall_at_k",
]


class CLIPStyleLoss(PairedLoss):
    """Legacy CLIP loss with label smoothing and retrieval metrics: :class:`embedloss.CLIPLoss`.

    Samples sharing a ``match_id`` are all positives (uniform target over them) instead of one
    positive drawn at random. ``mean_similarity``, ``matched_similarity`` (the diagonal pairs)
    and ``similarity_gap`` (their difference) keep the legacy scale: cosine / τ.

    Args:
        temperature: τ > 0 (default 0.07).
        use_hard_negatives: Ignored, with a warning (the legacy class never used it; see
            :class:`embedloss.HardNegativeLoss`).
        hard_negative_weight: Ignored, with a warning.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ε in [0, 1] (default 0).
        cache_labels: Ignored, with a warning.

    Returns (forward):
        ``{"loss", "v2t_loss", "t2v_loss", "v2t_accuracy", "t2v_accuracy", "accuracy",
        "mean_similarity", "matched_similarity", "similarity_gap", "recalls"}``.

    Example:
        >>> import torch
        >>> x = torch.eye(3)
        >>> out = CLIPStyleLoss(temperature=0.5)(vision_features=x, text_features=x)
        >>> out["accuracy"].item(), out["matched_similarity"].item(), sorted(out["recalls"])[:2]
        (1.0, 2.0, ['avg_recall@1', 'avg_recall@10'])
    """

    replacement = "embedloss.CLIPLoss (registry 'clip')"

    def __init__(
        self,
        temperature: float = 0.07,
        use_hard_negatives: bool | None = None,
        hard_negative_weight: float | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        cache_labels: bool | None = None,
    ) -> None:
        super().__init__(
            use_hard_negatives=use_hard_negatives or None,
            hard_negative_weight=hard_negative_weight,
            cache_labels=cache_labels,
        )
        self.loss = _CLIP(
            temperature=temperature, label_smoothing=label_smoothing, reduction=reduction
        )

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds = None,
        similarity_matrix: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; a given ``similarity_matrix`` is ignored with a warning."""
        self.ignore_forward(similarity_matrix=similarity_matrix)
        return super().forward(vision_features, text_features, match_ids, **inputs)

    def outputs(self, v: Tensor, t: Tensor, labels: Tensor | None) -> dict[str, Any]:
        """Loss and legacy metrics of one batch."""
        out = self.loss.compute(v, t, labels)
        terms, n = out.terms, v.shape[0]
        scale = 1.0 / terms["temperature"]
        matched = terms["positive_similarity"] * scale
        mean = (terms["positive_similarity"] + (n - 1) * terms["negative_similarity"]) / n * scale
        return {
            "loss": out.loss,
            **renamed(terms, **CLIP_DIRECTIONS),
            **retrieval_metrics(v, t, labels),
            "mean_similarity": metric(mean),
            "matched_similarity": metric(matched),
            "similarity_gap": metric(matched - mean),
        }


class CLIPLoss(CLIPStyleLoss):
    """The consolidation's ``CLIPLoss``: :class:`CLIPStyleLoss` with ``label_smoothing`` second.

    For the new tensor-returning loss use :class:`embedloss.CLIPLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        label_smoothing: float = 0.0,
        use_hard_negatives: bool | None = None,
        hard_negative_weight: float | None = None,
        reduction: str = "mean",
        cache_labels: bool | None = None,
    ) -> None:
        super().__init__(
            temperature,
            use_hard_negatives,
            hard_negative_weight,
            reduction,
            label_smoothing,
            cache_labels,
        )


LEGACY_MIXED_WEIGHTS = {"infonce": 0.4, "nt_xent": 0.3, "supervised": 0.3}


class MultiModalMixedContrastiveLoss(LegacyLoss):
    """Legacy weighted InfoNCE + NT-Xent + SupCon: :class:`embedloss.MixedMultimodalLoss`.

    ``match_ids`` mark extra positives of the CLIP and NT-Xent parts (``pair_labels``); class
    ``labels`` enable the SupCon part. Without labels that part is dropped (its weight is not
    given to the others; ``loss_supervised`` reports 0, as before).

    Args:
        temperature: τ > 0 shared by the parts (default 0.07).
        loss_weights: ``{"infonce", "nt_xent", "supervised"}`` weights (default 0.4, 0.3, 0.3;
            missing keys keep their default).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        add_projection: Per-modality projection heads (needs ``input_dim``).
        projection_dim: Output size of the heads (default 256).
        input_dim: Feature size for the heads.

    Returns (forward):
        ``{"loss", "loss_infonce", "loss_nt_xent", "loss_supervised", "v2t_accuracy",
        "t2v_accuracy", "accuracy", "recalls"}``.
    """

    replacement = "embedloss.MixedMultimodalLoss (registry 'mixed_multimodal')"

    def __init__(
        self,
        temperature: float = 0.07,
        loss_weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        add_projection: bool = False,
        projection_dim: int = 256,
        input_dim: int | None = None,
    ) -> None:
        super().__init__()
        weights = {**LEGACY_MIXED_WEIGHTS, **(loss_weights or {})}
        unknown = sorted(set(weights) - set(LEGACY_MIXED_WEIGHTS))
        if unknown:
            raise ValueError(
                f"loss_weights keys must be among {sorted(LEGACY_MIXED_WEIGHTS)}, got {unknown}"
            )
        self.init_heads(add_projection, input_dim, projection_dim)
        self.loss = _Mixed(
            temperature=temperature,
            clip_weight=weights["infonce"],
            nt_xent_weight=weights["nt_xent"],
            supcon_weight=weights["supervised"],
            reduction=reduction,
        )

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds = None,
        labels: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; ``labels`` are the class labels of the SupCon part."""
        v, t, ids = self.paired_inputs(vision_features, text_features, match_ids, inputs)
        out = self.loss.compute(v, t, labels, ids)
        return {
            "loss": out.loss,
            **renamed(out.terms, loss_infonce="loss_clip", loss_nt_xent="loss_nt_xent"),
            "loss_supervised": metric(out.terms.get("loss_supcon", 0.0)),
            **retrieval_metrics(v, t, ids),
        }


class MixedMultimodalLoss(MultiModalMixedContrastiveLoss):
    """The consolidation's ``MixedMultimodalLoss``: :class:`MultiModalMixedContrastiveLoss`.

    The same arguments, the head arguments in the order ``input_dim, projection_dim,
    add_projection``. For the new tensor-returning loss use :class:`embedloss.MixedMultimodalLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        loss_weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        input_dim: int | None = None,
        projection_dim: int = 256,
        add_projection: bool = False,
    ) -> None:
        super().__init__(
            temperature, loss_weights, reduction, add_projection, projection_dim, input_dim
        )


class SimpleContrastiveLoss(LegacyLoss):
    """Legacy InfoNCE + 0.5·alignment MSE + 0.2·``decor_loss``, by CLIP and MSE.

    ``loss = clip(v, t) + 0.5·mse + 0.2·decor_loss``: the symmetric InfoNCE of
    :class:`embedloss.CLIPLoss` (samples of equal ``match_ids`` all positive), and the
    :class:`embedloss.MSELoss` between the L2-normalised features of every positive pair, each
    anchor's pairs weighted ``1/|P(i)|`` so that every anchor counts once (the legacy loss drew
    one positive at random). ``decor_loss`` is a scalar the model provides (optional).
    ``pos_sim``/``neg_sim`` are the mean logits (cosine / τ) of the diagonal pairs and of the
    other pairs, ``separation`` their difference.

    Args:
        temperature: τ > 0 (default 0.1).

    Returns (forward):
        ``{"loss", "infonce_loss", "mse_loss", "v2t_loss", "t2v_loss", "accuracy", "pos_sim",
        "neg_sim", "separation", "temperature", "decor_loss"}``.
    """

    replacement = "embedloss.CLIPLoss ('clip') + 0.5·embedloss.MSELoss ('mse'), e.g. as embedloss.CombinedLoss"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.contrastive = _CLIP(temperature=temperature)
        self.alignment = _MSE()

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        match_ids: MatchIds = None,
        decor_loss: Tensor | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; ``decor_loss`` is added with weight 0.2 when given."""
        v, t, ids = self.paired_inputs(vision_features, text_features, match_ids, inputs)
        out = self.contrastive.compute(v, t, ids)
        labels = torch.arange(v.shape[0], device=v.device) if ids is None else ids
        anchor, partner = positive_mask_from_labels(labels).nonzero(as_tuple=True)
        counts = torch.bincount(anchor).to(v.dtype)
        mse = self.alignment(
            l2_normalize(v)[anchor], l2_normalize(t)[partner], 1.0 / counts[anchor]
        )
        loss = out.loss + 0.5 * mse
        decor = torch.zeros(())
        if decor_loss is not None:
            check_tensor(decor_loss, "decor_loss")
            if decor_loss.numel() != 1:
                raise ValueError(
                    f"decor_loss must be a scalar, got shape {tuple(decor_loss.shape)}"
                )
            loss, decor = loss + 0.2 * decor_loss.reshape(()), decor_loss
        terms = out.terms
        scale = 1.0 / terms["temperature"]
        pos, neg = terms["positive_similarity"] * scale, terms["negative_similarity"] * scale
        return {
            "loss": loss,
            **metrics(infonce_loss=out.loss, mse_loss=mse),
            **renamed(terms, **CLIP_DIRECTIONS),
            "accuracy": retrieval_metrics(v, t, ids, recalls=False)["accuracy"],
            **metrics(
                pos_sim=pos,
                neg_sim=neg,
                separation=pos - neg,
                temperature=terms["temperature"],
                decor_loss=decor,
            ),
        }


def compute_recall_at_k(
    similarity: Tensor,
    K: Sequence[int] = (1, 5, 10),
    v2t_targets: Tensor | None = None,
    t2i_targets: Tensor | None = None,
) -> dict[str, float]:
    """Legacy retrieval recall@k of a similarity matrix: :func:`embedloss.metrics.recall_at_k`.

    ``v2t_targets[i]`` is the column that matches row ``i`` and ``t2i_targets[j]`` the row that
    matches column ``j`` (default: the diagonal). A query is a hit at k when fewer than k
    non-matching keys score at least as high as its match (ties count against it).

    Returns:
        ``{"v2t_recall@k", "t2i_recall@k", "avg_recall@k"}`` for each k, as floats.

    Example:
        >>> import torch
        >>> sim = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # row 1 prefers column 0
        >>> compute_recall_at_k(sim, K=[1])
        {'v2t_recall@1': 0.5, 't2i_recall@1': 1.0, 'avg_recall@1': 0.75}
    """
    deprecated("compute_recall_at_k", "embedloss.metrics.recall_at_k")
    check_tensor(similarity, "similarity")
    ks = tuple(K)

    def one_direction(sim: Tensor, targets: Tensor | None) -> dict[str, float]:
        if targets is None:
            return recall_at_k(sim, k=ks)
        keys = torch.arange(sim.shape[1], device=sim.device)
        return recall_at_k(sim, k=ks, labels=targets, key_labels=keys)

    v2t = one_direction(similarity, v2t_targets)
    t2i = one_direction(similarity.T, t2i_targets)
    out: dict[str, float] = {}
    for k in ks:
        out[f"v2t_recall@{k}"] = v2t[f"query_to_key_recall@{k}"]
        out[f"t2i_recall@{k}"] = t2i[f"query_to_key_recall@{k}"]
        out[f"avg_recall@{k}"] = (out[f"v2t_recall@{k}"] + out[f"t2i_recall@{k}"]) / 2
    return out


class FeatureConsistencyLoss(LegacyLoss):
    """Legacy consistency with frozen reference encoders: :class:`embedloss.FeatureConsistencyLoss`.

    ``loss = vision_weight·d(v, ref_v(vision_inputs)) + text_weight·d(t, ref_t(text_inputs))``
    over the modalities that have a reference model. The reference models are frozen deep
    copies taken at construction (always in eval mode, never trained); the modules passed in
    are left as they are.

    Args:
        reference_vision_model: Frozen reference vision encoder (or None).
        reference_text_model: Frozen reference text encoder (or None).
        vision_weight: Weight of the vision term (default 1).
        text_weight: Weight of the text term (default 1).
        distance_fn: ``"cosine"`` (default), ``"l2"``, ``"l1"`` or ``"smooth_l1"``.
        normalize_features: L2-normalise before the distance (default True).
        detach_reference: Kept for the signature; reference features never carry gradients.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns (forward):
        ``{"loss", "feature_consistency_loss", "vision_consistency_loss",
        "text_consistency_loss", "vision_weight", "text_weight"}``.
    """

    replacement = "embedloss.FeatureConsistencyLoss (registry 'feature_consistency')"

    def __init__(
        self,
        reference_vision_model: nn.Module | None = None,
        reference_text_model: nn.Module | None = None,
        vision_weight: float = 1.0,
        text_weight: float = 1.0,
        distance_fn: str = "cosine",
        normalize_features: bool = True,
        detach_reference: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        given = {"vision": reference_vision_model, "text": reference_text_model}
        models = {m: model for m, model in given.items() if model is not None}
        self.weights = {"vision": vision_weight, "text": text_weight}
        self.loss = _Consistency(
            distance=distance_fn,
            normalize=normalize_features,
            reference_models=models,
            weights={m: self.weights[m] for m in models},
            detach_reference=detach_reference,
            reduction=reduction,
        )

    def forward(
        self,
        vision_features: Tensor,
        text_features: Tensor,
        vision_inputs: Any = None,
        text_inputs: Any = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Loss and legacy metrics; each modality with a reference model needs its inputs."""
        self.ignore_inputs(inputs)
        given = {"vision": (vision_features, vision_inputs), "text": (text_features, text_inputs)}
        active = [m for m in given if m in self.loss.reference_models]
        if active:
            out = self.loss.compute(
                {m: given[m][0] for m in active}, inputs={m: given[m][1] for m in active}
            )
            loss, terms = out.loss, out.terms
        else:  # no reference model: nothing to be consistent with
            loss, terms = vision_features.new_zeros(()), {}
        result: dict[str, Any] = {"loss": loss, "feature_consistency_loss": metric(loss.mean())}
        for m in given:
            result[f"{m}_consistency_loss"] = metric(terms.get(f"consistency_{m}", 0.0))
            result[f"{m}_weight"] = metric(self.weights[m])
        return result
