"""Mixins that add shared behaviour to losses: methods only, never constructor arguments.

A loss calls ``self._init_temperature(...)``, ``self._init_normalization(...)`` and friends from
its own explicit constructor, so ``inspect.signature(Loss)`` shows every option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from embedloss._validation import (
    check_choice,
    check_float,
    check_int,
    check_positive_float,
    check_tensor,
)
from embedloss.ops.similarity import l2_normalize

__all__ = [
    "HardNegativeMiningMixin",
    "NormalizationMixin",
    "ProjectionMixin",
    "TemperatureScalingMixin",
]


class TemperatureScalingMixin:
    """Fixed or learnable temperature τ, stored as ``logit_scale = log(1/τ)`` (CLIP's convention).

    A learnable scale is an ``nn.Parameter`` clamped to ``max_scale`` (default 100, as CLIP) when
    used; a fixed one is a buffer, so it follows ``.to()`` and ``state_dict`` like any state.
    """

    logit_scale: Tensor
    _learnable_temperature: bool
    _max_logit_scale: float

    def _init_temperature(
        self,
        temperature: float,
        learnable: bool = False,
        max_scale: float = 100.0,
        name: str = "temperature",
    ) -> None:
        tau = check_positive_float(temperature, name)
        check_positive_float(max_scale, "max_scale")
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable_temperature must be a bool, got {type(learnable).__name__}")
        self._learnable_temperature = learnable
        self._max_logit_scale = math.log(max_scale)
        if learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))  # type: ignore[assignment]
        else:
            # float64 keeps a fixed τ exact (loss.temperature == 0.07); it is cast when used.
            value = torch.tensor(math.log(1.0 / tau), dtype=torch.float64)
            self.register_buffer("logit_scale", value)  # type: ignore[attr-defined]

    def scale(
        self, logit_scale: Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``1/τ`` as a 0-d tensor of ``dtype`` (differentiable when learnable or passed in).

        Args:
            logit_scale: An externally owned ``log(1/τ)`` to use instead of this module's.
            dtype: The dtype of the result (the loss's compute dtype).
        """
        if logit_scale is None:
            ls = self.logit_scale
        else:
            ls = check_tensor(logit_scale, "logit_scale")
            if ls.numel() != 1:
                raise ValueError(
                    f"logit_scale must be a scalar tensor, got shape {tuple(ls.shape)}"
                )
            ls = ls.reshape(())
        ls = ls.to(dtype)
        if self._learnable_temperature or logit_scale is not None:
            ls = ls.clamp(max=self._max_logit_scale)
        return ls.exp()

    @property
    def temperature(self) -> float:
        """The current τ (after clamping)."""
        # Rounded to 12 significant digits so that τ = 0.1 reads back as 0.1, not 0.09999999999999998.
        return float(f"{float(1.0 / self.scale(dtype=torch.float64).detach()):.12g}")


class NormalizationMixin:
    """Optional L2 normalisation of embeddings (``normalize=True`` by default in every loss)."""

    _normalize: bool
    _norm_dim: int
    _norm_eps: float

    def _init_normalization(
        self, normalize: bool = True, dim: int = -1, eps: float = 1e-12
    ) -> None:
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self._normalize = normalize
        self._norm_dim = dim
        self._norm_eps = check_positive_float(eps, "eps")

    def normalize_embeddings(self, x: Tensor) -> Tensor:
        """L2-normalise ``x`` if enabled; half precision is upcast to float32 either way."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return l2_normalize(x, self._norm_dim, self._norm_eps) if self._normalize else x


def _mlp(input_dim: int, output_dim: int, hidden_dim: int, num_layers: int) -> nn.Module:
    if num_layers == 2:
        return nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim),
        )
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim),
    )


class ProjectionMixin:
    """Projection heads owned by a loss: a 2-layer MLP, a 3-layer MLP with BatchNorm, or a given module.

    With ``modalities`` one head per modality is built (``project(x, "vision")``). A loss that owns
    heads has parameters: pass ``loss.parameters()`` to the optimiser.
    """

    projection: nn.Module | None

    def _init_projection(
        self,
        input_dim: int | None,
        output_dim: int = 256,
        *,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        head: nn.Module | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        if head is not None:
            if not isinstance(head, nn.Module):
                raise TypeError(f"projection head must be an nn.Module, got {type(head).__name__}")
            self.projection = head
            return
        if input_dim is None:
            self.projection = None
            return
        check_int(input_dim, "input_dim", low=1)
        check_int(output_dim, "projection_dim", low=1)
        check_choice(num_layers, "num_layers", (2, 3))  # type: ignore[arg-type]
        hidden = input_dim if hidden_dim is None else check_int(hidden_dim, "hidden_dim", low=1)
        if modalities is None:
            self.projection = _mlp(input_dim, output_dim, hidden, num_layers)
        else:
            self.projection = nn.ModuleDict(
                {m: _mlp(input_dim, output_dim, hidden, num_layers) for m in modalities}
            )

    def project(self, x: Tensor, modality: str | None = None) -> Tensor:
        """Apply the (per-modality) head; identity when the loss has none."""
        if self.projection is None:
            return x
        if isinstance(self.projection, nn.ModuleDict):
            if modality is None or modality not in self.projection:
                raise ValueError(
                    f"modality must be one of {list(self.projection.keys())}, got {modality!r}"
                )
            return self.projection[modality](x)
        return self.projection(x)


HARD_NEGATIVE_STRATEGIES = ("none", "hard", "semi_hard", "beta")


class HardNegativeMiningMixin:
    """Per-row reweighting of negatives, returned as log-weights added to the negative logits.

    Strategies (weights are computed without gradient, as importance weights):

    * ``"none"``: all zeros.
    * ``"hard"``: negatives at or above the row's ``percentile`` of negative similarity get weight
      ``factor`` (log-weight ``log(factor)``).
    * ``"semi_hard"``: negatives with ``s_pos − margin < s_neg < s_pos`` (close to, but below, the
      positive) get weight ``factor``.
    * ``"beta"``: Robinson et al. 2021 (Eq. 4): weights ∝ ``exp(β·s_neg)``, normalised so the mean
      weight over a row's negatives is 1.
    """

    _hn_strategy: str
    _hn_factor: float
    _hn_percentile: float
    _hn_margin: float
    _hn_beta: float

    def _init_hard_negative_mining(
        self,
        strategy: str = "semi_hard",
        factor: float = 2.0,
        percentile: float = 0.9,
        margin: float = 0.2,
        beta: float = 1.0,
    ) -> None:
        self._hn_strategy = check_choice(strategy, "strategy", HARD_NEGATIVE_STRATEGIES)
        self._hn_factor = check_float(factor, "hard_negative_factor", low=1.0)
        self._hn_percentile = check_float(percentile, "percentile", low=0.0, high=1.0)
        self._hn_margin = check_positive_float(margin, "margin", allow_zero=True)
        self._hn_beta = check_positive_float(beta, "beta", allow_zero=True)

    @torch.no_grad()
    def negative_log_weights(self, similarity: Tensor, positive: Tensor) -> Tensor:
        """Log-weights ``(N, M)`` for ``similarity (N, M)`` and a boolean ``positive`` mask.

        Entries on positives are 0; the loss core ignores them anyway.
        """
        negative = ~positive
        zeros = torch.zeros_like(similarity)
        if self._hn_strategy == "none":
            return zeros
        if self._hn_strategy == "beta":
            scores = (self._hn_beta * similarity).masked_fill(positive, float("-inf"))
            count = negative.sum(dim=1, keepdim=True).clamp(min=1).to(similarity.dtype)
            log_w = scores - scores.logsumexp(dim=1, keepdim=True) + count.log()
            return torch.where(negative, log_w, zeros)
        boost = math.log(self._hn_factor)
        if self._hn_strategy == "hard":
            masked = similarity.masked_fill(positive, float("nan"))
            threshold = masked.nanquantile(self._hn_percentile, dim=1, keepdim=True)
            chosen = negative & (similarity >= threshold)
        else:
            pos_sim = similarity.masked_fill(negative, float("-inf")).amax(dim=1, keepdim=True)
            chosen = negative & (similarity < pos_sim) & (similarity > pos_sim - self._hn_margin)
        return torch.where(chosen, torch.full_like(similarity, boost), zeros)
