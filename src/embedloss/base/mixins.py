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
    check_bool,
    check_choice,
    check_finite_scalar,
    check_int,
    check_positive_float,
    check_tensor,
)
from embedloss.ops.mining import HardNegativeMining, hard_negative_log_weights
from embedloss.ops.similarity import l2_normalize, scale_from_logit

__all__ = [
    "register_scalar",
    "HardNegativeMiningMixin",
    "NormalizationMixin",
    "ProjectionMixin",
    "TemperatureScalingMixin",
]


def register_scalar(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    """Give ``module`` a 0-d ``name``: an ``nn.Parameter`` when learnable, else a float64 buffer.

    The one way a loss stores a scalar it may learn (τ as ``logit_scale``, SigLIP's bias): a
    buffer follows ``.to()`` and ``state_dict`` like any state, and float64 keeps a fixed value
    exact (it is cast to the compute dtype when used). The buffer stays float64 through
    ``module.half()`` / ``.bfloat16()`` / ``.float()`` (``BaseLoss`` keeps it exact), so a fixed
    τ reads the same whatever the module's dtype.
    """
    if learnable:
        setattr(module, name, nn.Parameter(torch.tensor(value)))
        return
    module.register_buffer(name, torch.tensor(value, dtype=torch.float64))
    exact: set[str] = module.__dict__.setdefault("_exact_scalars", set())
    exact.add(name)


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
        self._learnable_temperature = check_bool(learnable, "learnable_temperature")
        self._max_logit_scale = math.log(max_scale)
        if learnable and tau < 1.0 / max_scale:
            raise ValueError(
                f"{name}={temperature!r} is below {1.0 / max_scale:g}, the smallest a learnable "
                f"temperature can take (logit_scale = log(1/τ) is clamped at log({max_scale:g}), "
                f"as CLIP does); pass learnable_temperature=False to train at {temperature!r}, "
                f"or a {name} >= {1.0 / max_scale:g}"
            )
        register_scalar(self, "logit_scale", math.log(1.0 / tau), learnable)  # type: ignore[arg-type]

    def scale(
        self, logit_scale: Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``1/τ`` as a 0-d tensor of ``dtype`` (differentiable when learnable or passed in).

        Args:
            logit_scale: An externally owned ``log(1/τ)`` to use instead of this module's.
            dtype: The dtype of the result (the loss's compute dtype).
        """
        ls, clamp = self._logit_scale_and_clamp(logit_scale)
        return scale_from_logit(ls, dtype, clamp)

    def _logit_scale_and_clamp(self, logit_scale: Tensor | None) -> tuple[Tensor, float | None]:
        """The ``log(1/τ)`` to use (this module's or ``logit_scale``) and its clamp, if any.

        Raises:
            ValueError: If ``logit_scale`` is not a scalar, or (on CPU) either scale is not
                finite — a learnable one that became NaN means training diverged.
        """
        if logit_scale is None:
            clamp = self._max_logit_scale if self._learnable_temperature else None
            check_finite_scalar(self.logit_scale, "the loss's own logit_scale (log(1/τ))")
            return self.logit_scale, clamp
        check_tensor(logit_scale, "logit_scale")
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must be a scalar tensor, got shape {tuple(logit_scale.shape)}"
            )
        check_finite_scalar(logit_scale, "logit_scale")
        return logit_scale, self._max_logit_scale

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
        self._normalize = check_bool(normalize, "normalize")
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


class HardNegativeMiningMixin:
    """Per-row reweighting of negatives, returned as log-weights added to the negative logits.

    The strategies (``"none"``, ``"hard"``, ``"semi_hard"``, ``"beta"``) and their options are
    those of :func:`embedloss.ops.mining.hard_negative_log_weights`, the one implementation this
    mixin stores options for.
    """

    mining: HardNegativeMining

    def _init_hard_negative_mining(self, mining: HardNegativeMining) -> None:
        """Store the options, validated."""
        self.mining = mining.checked()

    def negative_log_weights(self, similarity: Tensor, positive: Tensor) -> Tensor:
        """Log-weights ``(N, M)`` for ``similarity (N, M)`` and a boolean ``positive`` mask.

        Entries on positives are 0; the loss core ignores them anyway.
        """
        return hard_negative_log_weights(similarity, positive, self.mining)
