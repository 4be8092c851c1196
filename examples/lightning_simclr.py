"""Train an embedding model with any embedloss loss under PyTorch Lightning.

    python examples/lightning_simclr.py                                # SimCLR, one process
    python examples/lightning_simclr.py --loss moco                    # momentum teacher + queue
    python examples/lightning_simclr.py --loss clip --loss-options '{"learnable_temperature": true}'
    python examples/lightning_simclr.py --devices 2 --strategy ddp     # two CPU processes (gloo)
    python examples/lightning_simclr.py --resume runs/lightning/last.ckpt --max-steps 80

What the LightningModule does for the loss:

* **parameters**: the loss is a submodule, so a learnable τ, SigLIP's bias or class weights are
  in ``self.parameters()`` and the optimiser trains them with the encoder;
* **state**: queues, centres and step counters are buffers of the loss, so Lightning's
  checkpoints carry them and ``--resume`` continues with them (the teacher too);
* **schedules**: ``update_epoch`` at each epoch start, ``update_step(step, total)`` before each
  step, as the embedloss command does;
* **teacher**: losses that need one (moco, negative_cosine as BYOL, dino) get a
  ``MomentumEncoder`` copy of the student, moved after every optimiser step;
* **logging**: ``self.log`` for the loss and every term of ``compute(...)``;
* **distributed**: under ``--strategy ddp`` the loss is built with ``gather_distributed=True``, so
  each rank scores its samples against the whole global batch and the gradients equal those of
  one process on the whole batch. The encoder uses LayerNorm (no per-rank batch statistics) and
  the data module shuffles with one seeded order for any number of processes, so two processes
  with batch B see the same global batches as one process with batch 2B: the runs match.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import embedloss
from embedloss import MomentumEncoder

# How each loss is called from two views; the category gives the default (pair, or labels for
# supervised and metric learning). Losses needing inputs an MLP does not have are refused.
STYLES = {
    "moco": "teacher_key",  # loss(query = student(x_a), key = teacher(x_b))
    "negative_cosine": "predictor",  # BYOL: predictor(student) against the teacher
    "dino": "distill",  # loss([student views], [teacher views]) over K prototypes
    "swav": "views",  # loss([prototype scores of each view])
    "koleo": "single",  # loss(all embeddings)
    "cross_entropy": "classifier",  # loss(linear-head logits, class)
    "mse": "classifier",  # loss(linear-head outputs, one-hot class)
    "cross_modal_supcon": "pair_labels",  # loss(z_a, z_b, labels=y)
}
# Losses made of other losses take the style of their parts (named in --loss-options).
WRAPPERS = {"matryoshka": "loss", "combined": "losses"}
UNSUPPORTED = {
    "ibot_patch": "needs patch tokens and masks (a vision transformer)",
    "feature_consistency": "needs frozen reference models",
    "multitask": "needs one input per task",
    "cosent": "needs pairs with similarity scores (see the sentence-transformers recipe)",
    "angle": "needs pairs with similarity scores (see the sentence-transformers recipe)",
}
TEACHER_STYLES = ("teacher_key", "predictor", "distill")


def call_style(name: str, options: dict | None = None) -> str:
    """How ``name`` is called (see ``STYLES``); raises for losses this example cannot train.

    A wrapper (``WRAPPERS``) is called as its parts are, which ``options`` name (registry names
    or ``{"name": ..., ...}`` configs, as the wrapper takes them); they must share one style.
    """
    info = embedloss.loss_info(name)
    if info.name in UNSUPPORTED:
        raise SystemExit(f"{info.name} {UNSUPPORTED[info.name]}: not trainable by this example")
    if info.name in WRAPPERS:
        key = WRAPPERS[info.name]
        given = (options or {}).get(key)
        parts = list(given.values()) if isinstance(given, dict) and key == "losses" else [given]
        if given is None or not all(isinstance(p, (str, dict)) for p in parts):
            raise SystemExit(f"{info.name} needs --loss-options naming {key!r} (names or configs)")
        styles = {
            call_style(p) if isinstance(p, str) else call_style(p.get("name", ""), p) for p in parts
        }
        if len(styles) > 1:
            raise SystemExit(f"{info.name}: its parts are called differently ({sorted(styles)})")
        return styles.pop()
    if info.name in STYLES:
        return STYLES[info.name]
    return "labels" if info.category in ("supervised", "metric_learning") else "pair"


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class EmbeddingModule(L.LightningModule):
    """An encoder and head trained with the embedloss loss ``loss`` (a registry name)."""

    def __init__(
        self,
        loss: str = "simclr",
        loss_options: dict | None = None,
        *,
        in_dim: int = 32,
        dim: int = 16,
        num_classes: int = 4,
        prototypes: int = 32,
        momentum: float = 0.99,
        lr: float = 1e-3,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.style = call_style(loss, loss_options)
        options = dict(loss_options or {})
        params = inspect.signature(embedloss.loss_info(loss).cls).parameters
        if "output_dim" in params:
            options.setdefault("output_dim", prototypes)  # DINO's centre has one entry per output
        if "num_classes" in params:  # arcface, cosface, proxy_anchor: class centres or proxies
            options.setdefault("num_classes", num_classes)
            options.setdefault("embedding_dim", dim)
        if distributed and "gather_distributed" in params:
            options.setdefault("gather_distributed", True)
        self.loss = embedloss.create_loss(loss, **options)
        out_dim = {"distill": prototypes, "views": prototypes, "classifier": num_classes}
        self.student = nn.Sequential(
            mlp(in_dim, 64, dim), mlp(dim, 64, out_dim.get(self.style, dim))
        )
        self.predictor = mlp(dim, 64, dim) if self.style == "predictor" else None
        self.teacher = (
            MomentumEncoder(self.student, momentum=momentum)
            if self.style in TEACHER_STYLES
            else None
        )

    def embed(self, x: Tensor) -> Tensor:
        """The representation to use downstream: the encoder's output."""
        return self.student[0](x)

    def compute(self, batch: tuple[Tensor, Tensor, Tensor]) -> embedloss.LossOutput:
        """The loss of a batch of two views ``(B, F)`` and labels ``(B,)``, in the loss's style."""
        x_a, x_b, y = batch
        z_a, z_b = self.student(x_a), self.student(x_b)
        style, compute = self.style, self.loss.compute
        if style == "pair":
            return compute(z_a, z_b)
        if style == "pair_labels":
            return compute(z_a, z_b, labels=y)
        if style == "labels":
            return compute(torch.cat([z_a, z_b]), torch.cat([y, y]))
        if style == "classifier":
            target = torch.cat([y, y])
            if self.hparams.loss == "mse":
                target = F.one_hot(target, self.hparams.num_classes).float()
            return compute(torch.cat([z_a, z_b]), target)
        if style == "single":
            return compute(torch.cat([z_a, z_b]))
        if style == "views":
            return compute([z_a, z_b])
        assert self.teacher is not None
        t_a, t_b = self.teacher(x_a), self.teacher(x_b)
        if style == "teacher_key":
            return compute(z_a, t_b)
        if style == "distill":
            return compute([z_a, z_b], [t_a, t_b])
        assert self.predictor is not None
        p_a, p_b = self.predictor(z_a), self.predictor(z_b)
        if getattr(self.loss, "symmetric", False):
            return compute(p_a, t_b, p_b, t_a)
        return compute(torch.cat([p_a, p_b]), torch.cat([t_b, t_a]))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        out = self.compute(batch)
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in out.terms.items()}, sync_dist=True)
        return out.loss

    # -- the loss's and the teacher's hooks ----------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self.loss.update_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        total = int(self.trainer.estimated_stepping_batches)
        self.loss.update_step(self.global_step, total)
        if self.teacher is not None:
            self.teacher.update_step(self.global_step, total)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.teacher is not None:  # after the optimiser step
            self.teacher.update()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # self.parameters() holds the loss's parameters; the teacher's are frozen.
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)


def make_data(n: int = 512, in_dim: int = 32, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """Two noisy views of samples around ``num_classes`` centres, with their class."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, in_dim, generator=g)
    y = torch.arange(n) % num_classes
    x = centres[y] + torch.randn(n, in_dim, generator=g)
    x_a = x + 0.3 * torch.randn(n, in_dim, generator=g)
    x_b = x + 0.3 * torch.randn(n, in_dim, generator=g)
    return TensorDataset(x_a, x_b, y)


class SyntheticViews(L.LightningDataModule):
    """``make_data()`` in batches of ``batch_size`` per process, in one shuffled order.

    Rank r of W takes every W-th sample of a permutation seeded by (seed, epoch), so the global
    batches do not depend on W (one process with batch W·B sees what W processes with B see).
    """

    def __init__(self, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        data = make_data(seed=self.seed)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(
            data, world, rank, shuffle=True, seed=self.seed, drop_last=True
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=True)


def make_trainer(args: argparse.Namespace, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        use_distributed_sampler=False,  # SyntheticViews shards the data itself
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_steps=args.max_steps,
        default_root_dir=args.output,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", default="simclr", help="registry name (embedloss list)")
    p.add_argument("--loss-options", type=json.loads, default={}, help="JSON constructor options")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn")
    p.add_argument("--output", default="runs/lightning")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> EmbeddingModule:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    module = EmbeddingModule(args.loss, args.loss_options, lr=args.lr, distributed=args.devices > 1)
    trainer = make_trainer(args)
    trainer.fit(module, SyntheticViews(args.batch_size, args.seed), ckpt_path=args.resume)
    trainer.save_checkpoint(Path(args.output) / "last.ckpt")
    if trainer.is_global_zero:
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(json.dumps({"step": trainer.global_step, **metrics}))
    return module


if __name__ == "__main__":
    main()
