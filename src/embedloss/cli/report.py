"""What a run tells its user: the summary table and headline, ``history.jsonl``, the curves, TensorBoard.

Example:
    >>> doc = {
    ...     "loss": "simclr", "task": "ssl", "input_kind": "images",
    ...     "metrics": {"knn_accuracy": 0.9, "clean_knn_accuracy": 0.95},
    ...     "baselines": {
    ...         "random_encoder": {"knn_accuracy": 0.4, "clean_knn_accuracy": 0.9},
    ...         "raw_features": {"knn_accuracy": 0.5, "clean_knn_accuracy": 0.98},
    ...     },
    ... }
    >>> print(headline(doc))
    simclr: k-NN accuracy (perturbed held-out) 0.900 — beats the random encoder (0.400, +0.500) and raw pixels (0.500, +0.400).
    why: raw pixels already reach 0.980 on the clean held-out split, near the ceiling; the perturbed split measures what training adds: invariance to the perturbation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedloss.cli.evaluate import PRIMARY_METRIC

__all__ = [
    "METRIC_LABELS",
    "TensorBoardLog",
    "format_summary",
    "headline",
    "plot_curves",
    "write_history",
]

METRIC_LABELS = {
    "knn_accuracy": "k-NN accuracy (perturbed held-out)",
    "linear_probe_accuracy": "linear-probe accuracy (perturbed)",
    "clean_knn_accuracy": "k-NN accuracy (clean held-out)",
    "recall@1": "recall@1 (held-out, both directions)",
    "recall@5": "recall@5 (held-out, both directions)",
    "precision_at_1": "precision@1 (perturbed held-out)",
    "r_precision": "R-precision (perturbed)",
    "map_at_r": "MAP@R (perturbed)",
}


def _raw_label(doc: dict[str, Any]) -> str:
    return "raw pixels" if doc.get("input_kind") == "images" else "raw features"


def _verdict(value: float, base: float) -> str:
    return "beats" if value > base else "does NOT beat"


def headline(doc: dict[str, Any]) -> str:
    """The trained model against both baselines on the task's metric, and one sentence on why."""
    key = PRIMARY_METRIC[doc["task"]]
    value = doc["metrics"][key]
    rand = doc["baselines"]["random_encoder"][key]
    raw = doc["baselines"].get("raw_features")
    first = (
        f"{doc['loss']}: {METRIC_LABELS.get(key, key)} {value:.3f} — "
        f"{_verdict(value, rand)} the random encoder ({rand:.3f}, {value - rand:+.3f})"
    )
    if raw is not None:
        same = _verdict(value, raw[key]) == _verdict(value, rand)
        joint = "and" if same else f"but {_verdict(value, raw[key])}"
        first += f" {joint} {_raw_label(doc)} ({raw[key]:.3f}, {value - raw[key]:+.3f})"
    if doc["task"] == "paired":
        why = (
            "why: the two modalities are only comparable after training (raw features of one "
            "say nothing about the other, so there is no raw baseline); a random encoder is "
            "near chance."
        )
        return f"{first}.\n{why}"
    clean = raw.get("clean_knn_accuracy") if raw is not None else None
    if clean is not None and clean >= 0.9:
        why = (
            f"why: {_raw_label(doc)} already reach {clean:.3f} on the clean held-out split, near "
            "the ceiling; the perturbed split measures what training adds: invariance to the "
            "perturbation."
        )
    else:
        why = (
            "why: the held-out split is perturbed as training views are, so the metric rewards an "
            "embedding that keeps the classes apart despite the perturbation."
        )
    return f"{first}.\n{why}"


def format_summary(doc: dict[str, Any]) -> str:
    """A table of the run's metrics against its baselines, then the :func:`headline`."""
    metrics, base = doc["metrics"], doc["baselines"]
    if not metrics:
        return "  (no labels: the accuracy metrics need an array 'y' in the data file)"
    cols = [(doc["loss"], metrics), ("random encoder", base.get("random_encoder") or {})]
    if base.get("raw_features") is not None:
        cols.append((_raw_label(doc), base["raw_features"]))
    width = max(len(METRIC_LABELS.get(k, k)) for k in metrics)
    lines = [" " * (width + 2) + "".join(f"{name:>16}" for name, _ in cols)]
    for key in metrics:
        cells = "".join(f"{vals.get(key, float('nan')):>16.3f}" for _, vals in cols)
        lines.append(f"  {METRIC_LABELS.get(key, key):<{width}}{cells}")
    return "\n".join([*lines, headline(doc)])


def write_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """One JSON object per epoch (rewritten whole, so a resumed run's file stays consistent)."""
    path.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")


def plot_curves(
    path: Path, history: Sequence[dict[str, Any]], doc: dict[str, Any], title: str
) -> None:
    """Loss and the held-out metric against epochs, with the baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    key = PRIMARY_METRIC[doc["task"]]
    metric = [h.get("eval", {}).get(key, math.nan) for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-", lw=1.5)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (epoch mean)")
    ax_metric.plot(epochs, metric, "o-", lw=1.5, label=doc["loss"])
    baselines = doc.get("baselines") or {}
    for name, label, style in (
        ("random_encoder", "random encoder", ":"),
        ("raw_features", _raw_label(doc), "--"),
    ):
        value = (baselines.get(name) or {}).get(key)
        if value is not None:
            ax_metric.axhline(value, ls=style, color="grey", lw=1, label=label)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(METRIC_LABELS.get(key, key))
    ax_metric.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class TensorBoardLog:
    """Per-epoch scalars in ``DIR/tensorboard`` when the ``tensorboard`` package is installed."""

    def __init__(self, directory: Path) -> None:
        import importlib.util

        self.writer: Any = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

    @property
    def enabled(self) -> bool:
        """Whether event files are written."""
        return self.writer is not None

    def epoch(self, record: dict[str, Any]) -> None:
        """Log one ``history.jsonl`` record (loss, terms, learning rate, held-out metric)."""
        if self.writer is None:
            return
        step = int(record["epoch"])
        self.writer.add_scalar("train/loss", record["loss"], step)
        self.writer.add_scalar("train/lr", record["lr"], step)
        for group in ("terms", "eval"):
            for key, value in record.get(group, {}).items():
                self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
