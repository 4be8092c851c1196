"""An embedloss loss inside a Hugging Face ``transformers.Trainer``.

The trainer owns the loop; :class:`EmbedlossCallback` gives the loss what the loop does not
know about: its schedules (``update_step`` before each optimiser step, ``update_epoch`` at each
epoch), an optional :class:`~embedloss.MomentumEncoder` teacher (moved after each optimiser
step), its terms (averaged over the steps between two logs, next to the trainer's ``loss``) and
its state (queues, centres, counters) saved in every checkpoint and restored on resume.

The loss's own parameters (a learnable τ, SigLIP's bias) reach the optimiser when the loss is
a submodule of the model the trainer gets (``transformers.Trainer`` optimises
``model.parameters()``), or, with sentence-transformers, of the loss module the trainer gets
(see :mod:`embedloss.integrations.sentence_transformers`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from embedloss import BaseLoss
from embedloss._validation import check_bool, describe
from embedloss.momentum import MomentumEncoder

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "embedloss.integrations.transformers needs transformers: "
        "pip install 'embedloss[integrations]'"
    ) from err

__all__ = ["STATE_FILE", "EmbedlossCallback"]

#: The file each checkpoint folder gets for the loss's (and teacher's) state.
STATE_FILE = "embedloss_state.pt"


class EmbedlossCallback(TrainerCallback):  # type: ignore[misc]
    """Drive an embedloss loss from a ``transformers.Trainer`` (or sentence-transformers').

    Per event: ``on_step_begin`` calls ``loss.update_step(global_step, max_steps)`` (and the
    teacher's momentum schedule), ``on_step_end`` moves the teacher towards its online module,
    ``on_epoch_begin`` calls ``loss.update_epoch(epoch)``; ``on_log`` adds the mean of every
    term :meth:`record` saw since the last log to the trainer's log (a term whose name is
    already there, such as ``loss``, is logged as ``loss_<name>``); ``on_save`` writes
    ``{"loss": state_dict, "teacher": state_dict}`` to ``checkpoint-<step>/embedloss_state.pt``
    (main process only) and ``on_train_begin`` reads it back when the trainer resumes from a
    checkpoint of its ``output_dir``.

    Terms are this process's own (under DDP each rank records its anchors; the main process
    logs its mean). Register the callback before a reporting integration should see the terms:
    callbacks run in order, and the trainer puts its ``report_to`` integrations first, so pass
    it to :meth:`attach` (which puts it first) rather than ``callbacks=[...]`` when TensorBoard
    or W&B must show them; the trainer's ``state.log_history`` gets them either way.

    Args:
        loss: The embedloss loss the trainer's model or loss module calls.
        teacher: An optional :class:`~embedloss.MomentumEncoder` to update after every step.
        save_state: Save and restore the loss's and the teacher's state with the checkpoints
            (default True). Pass False when they are submodules of the trainer's model, whose
            checkpoint already holds them.

    Raises:
        TypeError: If ``loss`` is not an embedloss loss, ``teacher`` not a ``MomentumEncoder``
            or ``save_state`` not a bool.

    Example:
        >>> import embedloss
        >>> loss = embedloss.create_loss("clip", learnable_temperature=True)
        >>> callback = EmbedlossCallback(loss)
        >>> callback.record(loss.compute(torch.randn(8, 4), torch.randn(8, 4)).terms)
        >>> logs = {"loss": 2.1}
        >>> callback.add_terms(logs)
        >>> sorted(logs)[:3]
        ['accuracy', 'loss', 'loss_image_to_text']
    """

    def __init__(
        self,
        loss: nn.Module,
        *,
        teacher: MomentumEncoder | None = None,
        save_state: bool = True,
    ) -> None:
        if not isinstance(loss, BaseLoss):
            raise TypeError(f"loss must be an embedloss loss (a BaseLoss), got {describe(loss)}")
        if teacher is not None and not isinstance(teacher, MomentumEncoder):
            raise TypeError(
                f"teacher must be an embedloss.MomentumEncoder or None, got {describe(teacher)}"
            )
        self.loss = loss
        self.teacher = teacher
        self.save_state = check_bool(save_state, "save_state")
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    # -- terms ---------------------------------------------------------------------------------

    def record(self, terms: Mapping[str, Tensor]) -> None:
        """Add one step's terms (``LossOutput.terms``) to the running sums; training mode only.

        The sums stay on the terms' device (no synchronisation until the next log).
        """
        if not self.loss.training:
            return
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = value if name not in self._sums else self._sums[name] + value
        self._count += 1

    def add_terms(self, logs: dict[str, float]) -> None:
        """Put the mean of each recorded term into ``logs`` and start new sums."""
        if self._count == 0:
            return
        for name, total in self._sums.items():
            key = f"loss_{name}" if name in logs else name
            logs[key] = (total / self._count).item()
        self._sums, self._count = {}, 0

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"loss": ..., "teacher": ... or None}``: what :data:`STATE_FILE` holds."""
        teacher = None if self.teacher is None else self.teacher.state_dict()
        return {"loss": self.loss.state_dict(), "teacher": teacher}

    def load_state(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Restore the loss (and teacher) from ``checkpoint_dir/embedloss_state.pt``.

        Raises:
            FileNotFoundError: If the folder has no such file.
        """
        path = os.path.join(checkpoint_dir, STATE_FILE)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.loss.load_state_dict(state["loss"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])

    # -- trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """On resume (``global_step > 0``), restore the state saved with that checkpoint."""
        if not self.save_state or state.global_step == 0:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isfile(os.path.join(folder, STATE_FILE)):
            self.load_state(folder)
        else:
            warnings.warn(
                f"resuming at step {state.global_step} but {folder} has no {STATE_FILE}: the "
                "loss starts from its current state; call load_state(checkpoint_dir) first "
                "to restore it from another folder",
                stacklevel=2,
            )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``loss.update_epoch(epoch)`` with the index of the epoch that starts."""
        self.loss.update_epoch(int(state.epoch or 0))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``update_step(global_step, max_steps)`` on the loss and the teacher."""
        self.loss.update_step(state.global_step, state.max_steps)
        if self.teacher is not None:
            self.teacher.update_step(state.global_step, state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After the optimiser step: the teacher follows its online module."""
        if self.teacher is not None:
            self.teacher.update()

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the terms to a training log (one with ``loss``) and to its history entry."""
        if logs is None or "loss" not in logs or self._count == 0:
            return
        before = set(logs)
        self.add_terms(logs)
        added = {k: v for k, v in logs.items() if k not in before}
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(added)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the state next to the checkpoint the trainer has just saved (main process)."""
        if not self.save_state or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))

    def attach(self, trainer: Any) -> EmbedlossCallback:
        """Register this callback first on ``trainer`` (before its reporting integrations).

        Returns:
            This callback.
        """
        trainer.callback_handler.callbacks.insert(0, self)
        return self
