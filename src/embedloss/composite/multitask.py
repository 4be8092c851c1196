"""Per-task losses with fixed, dynamic (DWA) or learned (uncertainty) weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from embedloss._validation import check_choice, check_flags, check_positive_float
from embedloss.base.base_loss import Examples, LossOutput
from embedloss.composite._parts import PartsLoss, prefixed_terms, run_part, weighted_sum
from embedloss.registry import register_loss

__all__ = ["MultitaskLoss"]

WEIGHTINGS = ("fixed", "dynamic", "uncertainty")


def _call_arguments(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(value, tuple):
        return value, {}
    if isinstance(value, Mapping):
        return (), dict(value)
    return (value,), {}


@register_loss("multitask")
class MultitaskLoss(PartsLoss):
    r"""Per-task losses combined with fixed, dynamic or learned weights.

    Task ``t`` (a key of ``losses``) is called as ``loss_t(*a_t, *b_t, **ka_t, **kb_t)`` where
    ``inputs[t]`` and ``targets[t]`` each give positional arguments (a tuple: unpacked; any
    other value: one argument), or keyword arguments (a mapping); a target of ``None`` is not
    passed. So ``inputs["cls"] = logits, targets["cls"] = y`` calls ``loss(logits, y)`` and
    ``inputs["pair"] = (z_a, z_b), targets["pair"] = None`` calls ``loss(z_a, z_b)``.

    With static weights ``w_t`` (``weights``, default 1) the loss is

    * ``"fixed"``: ``Σ_t w_t·L_t``;
    * ``"dynamic"``: ``Σ_t w_t·λ_t·L_t`` with dynamic weight averaging (Liu et al. 2019,
      Eq. 1): ``λ_t = T·softmax_t(r_t/τ_dwa)`` over the T tasks, ``r_t = L̄_t(e−1)/L̄_t(e−2)``
      the ratio of the task's mean training loss in the last two closed epochs; ``λ = 1``
      until two epochs have closed. In training mode every call adds its detached task losses
      to running sums; :meth:`update_epoch` closes the epoch (means, history, new λ). All of it
      is in buffers, so a checkpoint resumes exactly; weights never change inside an epoch;
    * ``"uncertainty"``: ``Σ_t w_t·(exp(−s_t)·L_t + s_t)`` with learned log-variances
      ``s_t = log σ_t²`` (``log_variances``, initialised to 0): Kendall et al. 2018, Eq. 10, in
      the usual implementation that drops the paper's ½ on the regression terms (a constant
      factor that moves neither the optimum of ``s_t`` nor the relative task weights).

    A task absent from ``inputs`` or ``targets`` is an error unless ``allow_missing=True``,
    which skips it (it adds nothing and its dynamic statistics are not updated); a key naming
    no task is always an error. Task losses must share one shape (scalar with ``"mean"`` or
    ``"sum"``). Terms: ``"<task>/loss"``, ``"<task>/weight"`` (the factor on ``L_t``: ``w_t``,
    ``w_t·λ_t`` or ``w_t·exp(−s_t)``), ``"<task>/<term>"`` for the task loss's own terms, and
    ``"<task>/log_variance"`` with ``"uncertainty"``. Hooks are forwarded to the task losses.

    Args:
        losses: Mapping of task names to modules, configs or registry names.
        weighting: ``"fixed"`` (default), ``"dynamic"`` or ``"uncertainty"``.
        weights: Optional static weight per task (default 1.0; not normalised).
        allow_missing: Skip tasks absent from a call instead of raising.
        dwa_temperature: τ_dwa > 0 of dynamic weight averaging (default 2.0, the paper's).

    Raises:
        ValueError: For no tasks, a bad task name or weighting, weights of unknown tasks,
            a non-positive ``dwa_temperature``; when called, a missing or unknown task.

    Example:
        >>> import torch
        >>> loss = MultitaskLoss(losses={"cls": "cross_entropy", "reg": "mse"}, weighting="uncertainty")
        >>> inputs = {"cls": torch.randn(4, 3), "reg": torch.randn(4, 2)}
        >>> targets = {"cls": torch.tensor([0, 2, 1, 0]), "reg": torch.zeros(4, 2)}
        >>> out = loss.compute(inputs, targets)
        >>> float(out.terms["cls/weight"]), sorted(n for n, _ in loss.named_parameters())
        (1.0, ['log_variances'])
    """

    log_variances: Tensor
    dynamic_weights: Tensor
    epoch_loss_sum: Tensor
    epoch_loss_count: Tensor
    loss_history: Tensor
    epochs_closed: Tensor

    def __init__(
        self,
        *,
        losses: Mapping[str, nn.Module | Mapping[str, Any] | str],
        weighting: str = "fixed",
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        dwa_temperature: float = 2.0,
    ) -> None:
        super().__init__(losses, weights)
        self.tasks = list(self.losses.keys())
        self.weighting = check_choice(weighting, "weighting", WEIGHTINGS)
        (self.allow_missing,) = check_flags(allow_missing=allow_missing)
        self.dwa_temperature = check_positive_float(dwa_temperature, "dwa_temperature")
        k = len(self.tasks)
        if self.weighting == "uncertainty":
            self.log_variances = nn.Parameter(torch.zeros(k))
        if self.weighting == "dynamic":
            f64 = torch.float64
            self.register_buffer("dynamic_weights", torch.ones(k, dtype=f64))
            self.register_buffer("epoch_loss_sum", torch.zeros(k, dtype=f64))
            self.register_buffer("epoch_loss_count", torch.zeros(k, dtype=f64))
            self.register_buffer("loss_history", torch.zeros(2, k, dtype=f64))  # [e−2, e−1]
            self._init_counter("epochs_closed")

    def _present_tasks(self, inputs: Mapping[str, Any], targets: Mapping[str, Any]) -> list[str]:
        for arg, given in (("inputs", inputs), ("targets", targets)):
            if not isinstance(given, Mapping):
                raise TypeError(
                    f"{arg} must be a mapping of task names, got {type(given).__name__}"
                )
            unknown = sorted(set(given) - set(self.tasks))
            if unknown:
                raise ValueError(f"{arg} has unknown task(s) {unknown}; tasks are {self.tasks}")
        present = [t for t in self.tasks if t in inputs and t in targets]
        missing = [t for t in self.tasks if t not in present]
        if missing and not self.allow_missing:
            raise ValueError(
                f"task(s) {missing} missing from inputs or targets; pass both for every task "
                "or construct with allow_missing=True"
            )
        if not present:
            raise ValueError(f"no task of {self.tasks} is present in both inputs and targets")
        return present

    def compute(self, inputs: Mapping[str, Any], targets: Mapping[str, Any]) -> LossOutput:
        """Per-task losses of ``loss_t(inputs[t], targets[t])`` combined (see the class docstring)."""
        outputs = {}
        for task in self._present_tasks(inputs, targets):
            args, kwargs = _call_arguments(inputs[task])
            if targets[task] is not None:
                more_args, more_kwargs = _call_arguments(targets[task])
                args, kwargs = (*args, *more_args), {**kwargs, **more_kwargs}
            outputs[task] = run_part(task, self.losses[task], args, kwargs, not self.loss_only)
        task_losses = {t: o.loss for t, o in outputs.items()}
        # Each task's factor on its loss (in its terms as "weight") and learned log-variance.
        extras: dict[str, dict[str, Tensor | float]] = {}
        for task, value in task_losses.items():
            i, weight = self.tasks.index(task), self.weights[task]
            if self.weighting == "dynamic":
                extras[task] = {"weight": weight * self.dynamic_weights[i].to(value.dtype)}
            elif self.weighting == "uncertainty":
                s = self.log_variances[i].to(value.dtype)
                extras[task] = {"weight": weight * torch.exp(-s), "log_variance": s}
            else:
                extras[task] = {"weight": weight}
        loss = weighted_sum(task_losses, {t: extra["weight"] for t, extra in extras.items()})
        if self.weighting == "uncertainty":
            for task, extra in extras.items():
                loss = loss + self.weights[task] * extra["log_variance"]  # the regulariser
        if self.weighting == "dynamic" and self.training:
            with torch.no_grad():  # device-side running sums: nothing is read on the host
                for task, value in task_losses.items():
                    i = self.tasks.index(task)
                    self.epoch_loss_sum[i] += value.detach().double().mean()
                    self.epoch_loss_count[i] += 1
        return self.output(loss, lambda: prefixed_terms(outputs, extras))

    @torch.no_grad()
    def update_epoch(self, epoch: int) -> None:
        """Close the epoch: with ``"dynamic"``, turn the running sums into DWA weights.

        A call with nothing accumulated (e.g. before the first epoch) changes nothing. A task
        seen in no call of the epoch keeps its previous mean. Forwarded to the task losses.
        """
        super().update_epoch(epoch)
        if self.weighting != "dynamic" or not bool(self.epoch_loss_count.any()):
            return  # (a hook: reading a value here is off the step path)
        count = self.epoch_loss_count
        latest = torch.where(
            count > 0, self.epoch_loss_sum / count.clamp(min=1), self.loss_history[1]
        )
        self.loss_history[0] = self.loss_history[1]
        self.loss_history[1] = latest
        self._set_counter("epochs_closed", self._counter("epochs_closed") + 1)
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()
        if self._counter("epochs_closed") >= 2:
            previous = self.loss_history[0]
            ratio = torch.where(previous > 0, latest / previous.clamp(min=1e-300), 1.0)
            k = len(self.tasks)
            self.dynamic_weights.copy_(k * torch.softmax(ratio / self.dwa_temperature, dim=0))

    #: A classification and a regression task with learned (uncertainty) weights.
    example_options: ClassVar[dict[str, Any]] = {
        "losses": {"cls": "cross_entropy", "reg": "mse"},
        "weighting": "uncertainty",
    }

    @classmethod
    def draw_examples(cls, g: torch.Generator, n: int, d: int, dtype: torch.dtype) -> Examples:
        """``inputs`` and ``targets`` mappings for :meth:`example_kwargs`'s two tasks."""
        x_cls, x_reg = (torch.randn(n, d, generator=g).to(dtype) for _ in range(2))
        y_cls, y_reg = torch.randint(0, d, (n,), generator=g), torch.randn(n, d, generator=g)
        return ({"cls": x_cls, "reg": x_reg}, {"cls": y_cls, "reg": y_reg.to(dtype)}), {}

    shown = "weighting!r weights allow_missing"
