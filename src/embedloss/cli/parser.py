"""The argument parser of ``embedloss``: its commands and their flags."""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any, NoReturn

import embedloss
from embedloss.cli.config import DEFAULT_CONFIG, LR_SCHEDULES, PRECISIONS, TASKS
from embedloss.registry import CATEGORIES

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"embedloss: error: {message} (see '{self.prog} --help')\n")


def _add_train(sub: Any) -> None:
    d = DEFAULT_CONFIG
    p = sub.add_parser(
        "train",
        help="train an embedding model with a loss and evaluate it",
        description=(
            "Train a small MLP embedding model with any registered loss on the embedded digits\n"
            "dataset (or your .npz), then evaluate it against a random encoder and raw inputs.\n"
            "Flags override --config, which overrides the defaults. With --output DIR a\n"
            "checkpoint is written after every epoch; --resume DIR continues the run."
        ),
        epilog=(
            "examples:\n"
            "  embedloss train                                  # simclr on digits, ~10 s\n"
            "  embedloss train --loss clip --output runs/clip   # paired task, writes a run\n"
            "  embedloss train --resume runs/clip --epochs 40   # continue it to 40 epochs\n"
            "  embedloss train --loss moco --loss-option temperature=0.1 --lr-schedule cosine\n"
            "  embedloss train --loss dino --method-option teacher_momentum=0.996\n"
            "  embedloss train --batch-size 16384 --micro-batch-size 2048 --norm layer\n"
            "  embedloss train --config runs/clip/config.yaml   # repeat that run exactly\n"
            "  torchrun --nproc_per_node 2 -m embedloss train   # DDP (gloo on CPU)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--loss", metavar="NAME", help="registered loss name or alias (default simclr)")
    p.add_argument(
        "--loss-option",
        action="append",
        metavar="NAME=VALUE",
        dest="loss_options",
        help="a constructor argument of the loss, VALUE read as YAML (repeatable), e.g. "
        "temperature=0.1",
    )
    p.add_argument(
        "--method-option",
        action="append",
        metavar="NAME=VALUE",
        dest="method_options",
        help="the method's teacher_momentum (null: none), teacher_schedule, local_crops or "
        "prototypes (repeatable), e.g. teacher_momentum=0.996",
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="a YAML or .json config, e.g. a run's config.yaml"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=("digits",), help="embedded dataset (default digits)")
    src.add_argument("--data", metavar="FILE.npz", help="your data: x [and y], or x_a and x_b")
    p.add_argument("--task", choices=("auto", *TASKS), help="default: from the loss's family")
    p.add_argument("--epochs", type=int, metavar="N", help=f"default {d['epochs']}")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        dest="batch_size",
        help=f"global batch, split over processes (default {d['batch_size']}); larger than "
        "the training split: samples repeat, augmented differently",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        metavar="M",
        dest="micro_batch_size",
        help="train through GradCache, M encoder inputs at a time (the same gradients as the "
        "whole batch in the activation memory of M)",
    )
    p.add_argument(
        "--norm",
        choices=("batch", "layer", "none"),
        help="normalisation layers of the MLPs (default batch; layer: exact under micro-batches)",
    )
    p.add_argument(
        "--lr", type=float, metavar="LR", help=f"peak AdamW learning rate (default {d['lr']})"
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        dest="lr_schedule",
        help="after the warm-up: constant, or cosine decay to 0 (default constant)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        metavar="W",
        dest="warmup_epochs",
        help="linear learning-rate warm-up over W epochs (default 0)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        metavar="WD",
        dest="weight_decay",
        help=f"AdamW weight decay of the model (default {d['weight_decay']})",
    )
    p.add_argument(
        "--grad-clip",
        type=float,
        metavar="NORM",
        dest="grad_clip",
        help="clip the global gradient norm to NORM (default: no clipping)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16: autocast the model and loss (CPU and CUDA; default fp32)",
    )
    p.add_argument(
        "--seed", type=int, metavar="S", help=f"default {d['seed']}; same seed, same numbers"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write the run there: checkpoint.pt and history.jsonl every epoch, config.yaml, "
        "metrics.json, curves.png (and tensorboard/ when installed)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --output DIR"
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (its config; --epochs and the steps' settings such as "
        "--lr may change, not the loss, its options, the model, method or seed)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_use(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="write the embeddings of a trained run's encoder",
        description="Embed the samples of an .npz with the encoder of a run (train --output DIR).",
        epilog="example:\n  embedloss embed --run runs/demo --data mine.npz --out mine.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--data", required=True, metavar="FILE.npz", help="the samples to embed")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="where to write (N, D) float32")
    p.add_argument(
        "--modality",
        choices=("a", "b"),
        default="a",
        help="b: the second encoder of a paired run (reads x_b)",
    )
    p.add_argument(
        "--key", metavar="NAME", help="the array to embed (default x, or x_a / x_b when paired)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p = sub.add_parser(
        "eval",
        help="evaluate a trained run on its held-out split or on your data",
        description=(
            "Report the task's metrics of a run (k-NN, linear probe, recall@k ...) against the\n"
            "random encoder and raw inputs, on the run's held-out split or on --data FILE.npz\n"
            "(split like training data into reference samples and held-out queries)."
        ),
        epilog="example:\n  embedloss eval --run runs/demo --data mine.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--data", metavar="FILE.npz", help="labelled data (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def build_parser(bench: ModuleType | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``bench`` (the bench module) adds the bench command's options."""
    parser = _Parser(prog="embedloss", description=(embedloss.__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embedloss {embedloss.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the registered losses")
    p_list.add_argument("--category", choices=CATEGORIES)
    p_list.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p_info = sub.add_parser("info", help="describe one loss")
    p_info.add_argument("name")
    p_info.add_argument("--full", action="store_true", help="also print the whole docstring")
    _add_train(sub)
    _add_use(sub)
    p_bench = sub.add_parser("bench", help="speed and memory benchmark", add_help=bench is not None)
    if bench is not None:
        bench.add_arguments(p_bench)
    else:  # its options are only known once the module is imported (``embedloss bench ...``)
        p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser
