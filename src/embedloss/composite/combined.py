"""A weighted sum of named losses fed the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from embedloss.base.base_loss import LossOutput
from embedloss.composite._parts import PartsLoss, prefixed_terms, run_part, weighted_sum
from embedloss.registry import register_loss

__all__ = ["CombinedLoss"]


@register_loss("combined")
class CombinedLoss(PartsLoss):
    """A weighted sum of named losses, each called with the same inputs.

        L = Σ_k w_k·L_k(*args, **kwargs)

    Each part is an ``nn.Module`` (an embedloss loss, or any module returning a tensor, a
    :class:`~embedloss.base.base_loss.LossOutput` or a mapping with a ``"loss"`` key), a
    config mapping ``{"name": ..., **kwargs}`` built with
    :func:`~embedloss.registry.create_loss_from_config`, or a registered name. Parts live in
    the ``nn.ModuleDict`` ``losses``, so ``state_dict()``, ``.to()`` and ``parameters()`` cover
    them, and the hooks ``update_step`` / ``update_epoch`` are forwarded to each. :meth:`compute`
    calls embedloss parts through their ``compute`` (module forward hooks do not fire);
    :meth:`forward` calls every part as a module and builds no terms.

    Terms are namespaced with ``"/"`` (``"."`` is not allowed in module names):
    ``"<name>/loss"`` (the part's unweighted loss) and ``"<name>/<term>"`` for each of its
    terms, e.g. ``"clip/accuracy"``. The parts' losses must have one shape (use the same
    ``reduction`` in each); the combined loss has that shape.

    Args:
        losses: Mapping of part names to modules, configs or registry names (at least one).
        weights: Optional mapping of part names to finite weights; a missing name weighs 1.0.

    Raises:
        TypeError: For a part that is not a module, mapping or str, or a non-numeric weight.
        ValueError: For no parts, a bad part name, weights naming unknown parts, or (when
            called) parts returning losses of different shapes.

    Example:
        >>> import torch
        >>> loss = CombinedLoss(
        ...     losses={"clip": {"name": "clip", "temperature": 0.1}, "simclr": "simclr"},
        ...     weights={"simclr": 0.5},
        ... )
        >>> out = loss.compute(torch.randn(4, 8), torch.randn(4, 8))
        >>> sorted(out.terms)[:3]
        ['clip/accuracy', 'clip/loss', 'clip/loss_image_to_text']
    """

    def __init__(
        self,
        *,
        losses: Mapping[str, nn.Module | Mapping[str, Any] | str],
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(losses, weights)

    def compute(self, *args: Any, **kwargs: Any) -> LossOutput:
        """Call every part with ``(*args, **kwargs)``; the weighted sum and the prefixed terms."""
        terms = not self.loss_only
        outputs = {n: run_part(n, p, args, kwargs, terms) for n, p in self.losses.items()}
        loss = weighted_sum({n: o.loss for n, o in outputs.items()}, self.weights)
        return self.output(loss, lambda: prefixed_terms(outputs))

    #: CLIP plus half of NT-Xent: both take two ``(n, d)`` views.
    example_options: ClassVar[dict[str, Any]] = {
        "losses": {"clip": {"name": "clip"}, "simclr": {"name": "simclr"}},
        "weights": {"simclr": 0.5},
    }

    shown = "weights"
