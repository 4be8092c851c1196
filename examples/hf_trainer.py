"""Train an embedding model with an embedloss loss in a Hugging Face ``transformers.Trainer``.

    python examples/hf_trainer.py                                   # SimCLR
    python examples/hf_trainer.py --loss moco                       # momentum teacher + queue
    python examples/hf_trainer.py --loss siglip --loss-options '{"learnable_temperature": true}'
    python examples/hf_trainer.py --loss supcon                     # labels
    python examples/hf_trainer.py --resume runs/hf/checkpoint-20 --max-steps 40

The model holds the encoder, the loss and (for moco) a ``MomentumEncoder`` teacher, and its
``forward`` returns the loss's ``LossOutput``; the trainer's ``compute_loss`` returns its loss.
So, with nothing else to write:

* **parameters**: ``Trainer`` optimises ``model.parameters()``, the loss's included (a learnable
  τ, SigLIP's bias);
* **state**: queues, centres and counters, and the teacher, are in ``model.state_dict()``, so
  every checkpoint holds them and ``--resume`` restores them;
* **schedules, teacher, logging**: ``EmbedlossCallback`` calls ``update_step`` /
  ``update_epoch``, moves the teacher after each optimiser step and adds every term of
  ``compute(...)`` to the trainer's logs (``trainer.state.log_history``, TensorBoard, ...);
* **distributed**: under ``torchrun`` the loss is built with ``gather_distributed=True``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import embedloss
from embedloss import MomentumEncoder
from embedloss.integrations.transformers import EmbedlossCallback


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class EmbeddingModel(nn.Module):
    """Encoder + projector, the embedloss loss, and a momentum teacher for moco."""

    def __init__(
        self,
        loss: str = "simclr",
        loss_options: dict | None = None,
        *,
        in_dim: int = 32,
        dim: int = 16,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        options = dict(loss_options or {})
        params = inspect.signature(embedloss.loss_info(loss).cls).parameters
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "gather_distributed" in params:
            options.setdefault("gather_distributed", True)
        self.loss = embedloss.create_loss(loss, **options)
        self.supervised = embedloss.loss_info(loss).category in ("supervised", "metric_learning")
        self.student = nn.Sequential(mlp(in_dim, 64, dim), mlp(dim, 64, dim))
        self.teacher = (
            MomentumEncoder(self.student, momentum=momentum)
            if embedloss.loss_info(loss).name == "moco"
            else None
        )

    def forward(
        self, x_a: Tensor, x_b: Tensor, labels: Tensor | None = None
    ) -> embedloss.LossOutput:
        z_a = self.student(x_a)
        if self.teacher is not None:  # MoCo: the key of the other view comes from the teacher
            return self.loss.compute(z_a, self.teacher(x_b))
        z_b = self.student(x_b)
        if self.supervised:
            if labels is None:
                raise ValueError(f"{type(self.loss).__name__} needs labels: pass a 'labels' column")
            return self.loss.compute(torch.cat([z_a, z_b]), torch.cat([labels, labels]))
        return self.loss.compute(z_a, z_b)


class EmbedlossTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` returns the model's embedloss loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        # The loss and the teacher are in the model: its checkpoints already hold their state.
        self.embedloss = EmbedlossCallback(model.loss, teacher=model.teacher, save_state=False)
        self.embedloss.attach(self)  # first, so that reporting integrations see the terms

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        self.embedloss.record(out.terms)
        return (out.loss, dict(out.terms)) if return_outputs else out.loss


class SyntheticViews(Dataset):
    """Two noisy views of samples around ``num_classes`` centres, with their class."""

    def __init__(self, n: int = 512, in_dim: int = 32, num_classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(num_classes, in_dim, generator=g)
        self.labels = torch.arange(n) % num_classes
        x = centres[self.labels] + torch.randn(n, in_dim, generator=g)
        self.x_a = x + 0.3 * torch.randn(n, in_dim, generator=g)
        self.x_b = x + 0.3 * torch.randn(n, in_dim, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x_a": self.x_a[i], "x_b": self.x_b[i], "labels": self.labels[i]}


def make_trainer(args: argparse.Namespace) -> EmbedlossTrainer:
    torch.manual_seed(args.seed)
    model = EmbeddingModel(args.loss, args.loss_options)
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    return EmbedlossTrainer(model=model, args=training_args, train_dataset=SyntheticViews())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", default="simclr", help="registry name (embedloss list)")
    p.add_argument("--loss-options", type=json.loads, default={}, help="JSON constructor options")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--output", default="runs/hf")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> EmbedlossTrainer:
    args = parse_args(argv)
    trainer = make_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume)
    if trainer.is_world_process_zero():
        print(json.dumps(trainer.state.log_history[-2]))  # the last training log, terms included
    return trainer


if __name__ == "__main__":
    main()
