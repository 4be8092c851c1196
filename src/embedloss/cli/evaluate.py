"""Evaluation of ``embedloss train``: k-NN, linear probe and cross-modal retrieval.

* ssl / supervised: embeddings of the clean training split are the reference; the held-out split
  is **perturbed** by seeded 1-pixel shifts and noise (on clean 8×8 digits raw pixels already reach
  ~98% k-NN, under shifts about 50%, so invariance is what a representation can add).
  ``knn_accuracy`` (cosine k-NN, majority vote) and ``linear_probe_accuracy`` (logistic regression
  on standardised embeddings) are measured on the perturbed split, ``clean_knn_accuracy`` on the
  clean one.
* paired: ``recall@1`` and ``recall@5`` of held-out cross-modal retrieval (cosine), the mean of the
  a→b and b→a directions.
* Further metrics of labelled embeddings are entries of :data:`LABELLED_METRICS`: the retrieval
  metrics of metric learning (Musgrave et al. 2020; :func:`embedloss.metrics.retrieval_metrics`,
  cosine): ``precision_at_1``, ``r_precision`` and ``map_at_r``, each computed on the perturbed
  held-out queries against the clean training reference and reported everywhere the others are
  (``train``'s summary and ``metrics.json``, ``embedloss eval``).
* A Matryoshka run also reports k-NN accuracy, precision@1 and MAP@R of the embeddings' first
  ``d`` features for each nested size ``d`` (``dim_<d>/knn_accuracy`` ...), for the model and
  the random encoder.

Each epoch of training also measures the task's main metric (:func:`epoch_metrics`: k-NN or
recall@1, no probe) for the learning curves.

Example:
    >>> a = torch.eye(3)
    >>> recall_at_k(a, a, ks=(1,))
    {'recall@1': 1.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from embedloss import metrics
from embedloss.cli.data import Split, TaskData, perturb

__all__ = [
    "LABELLED_METRICS",
    "NESTED_METRICS",
    "PRIMARY_METRIC",
    "EvalSetup",
    "classification_metrics",
    "epoch_metrics",
    "evaluate",
    "evaluate_with_baselines",
    "knn_accuracy",
    "linear_probe_accuracy",
    "recall_at_k",
    "retrieval_metrics",
]

Embed = Callable[[Tensor], Tensor]
#: (reference embeddings, reference labels, query embeddings, query labels) → a score.
LabelledMetric = Callable[[Tensor, Tensor, Tensor, Tensor], float]

#: The metric a task is judged on (the headline, the learning curve).
PRIMARY_METRIC = {"ssl": "knn_accuracy", "supervised": "knn_accuracy", "paired": "recall@1"}


def _retrieval(key: str) -> LabelledMetric:
    def score(ref: Tensor, ref_y: Tensor, queries: Tensor, query_y: Tensor) -> float:
        found = metrics.retrieval_metrics(queries, query_y, reference=ref, reference_labels=ref_y)
        return found[key]

    score.__name__ = key
    return score


#: More metrics of labelled held-out embeddings, reported after the built-in ones.
LABELLED_METRICS: dict[str, LabelledMetric] = {
    key: _retrieval(key) for key in ("precision_at_1", "r_precision", "map_at_r")
}
#: What a Matryoshka run reports at each nested size.
NESTED_METRICS = ("knn_accuracy", "precision_at_1", "map_at_r")


class Embedder(Protocol):
    """What is evaluated: a model's ``embed(x, modality)`` (a :class:`~embedloss.cli.models.TaskModel`)."""

    def embed(self, x: Tensor, modality: str = "a") -> Tensor: ...


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.double(), dim=1)


def knn_accuracy(
    train_emb: Tensor, train_y: Tensor, test_emb: Tensor, test_y: Tensor, k: int = 5
) -> float:
    """Accuracy of cosine k-NN majority vote (ties go to the smaller class index)."""
    sim = _unit(test_emb) @ _unit(train_emb).T  # (n_test, n_train)
    k = min(k, train_emb.shape[0])
    idx = sim.topk(k, dim=1).indices  # (n_test, k)
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(test_emb.shape[0], classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], torch.ones(idx.shape, dtype=torch.float64))
    return float((votes.argmax(dim=1) == test_y).double().mean())


def linear_probe_accuracy(
    train_emb: Tensor, train_y: Tensor, test_emb: Tensor, test_y: Tensor
) -> float:
    """Accuracy of a multinomial logistic-regression probe on standardised features.

    The objective is scikit-learn's default (``C=1``): mean cross-entropy plus ``‖W‖²/(2n)``,
    minimised by full-batch L-BFGS in float64 (deterministic on CPU).
    """
    x_train, x_test = train_emb.double(), test_emb.double()
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay put
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(x_train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / x_train.shape[0]
    opt = torch.optim.LBFGS(
        [weight, bias],
        max_iter=500,
        tolerance_grad=1e-6,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x_train @ weight + bias  # (n, C)
        loss = torch.nn.functional.cross_entropy(logits, train_y) + 0.5 * l2 * weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        pred = (x_test @ weight + bias).argmax(dim=1)
    return float((pred == test_y).double().mean())


def recall_at_k(a: Tensor, b: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Cross-modal recall@k, averaged over a→b and b→a (pair ``i`` matches pair ``i``).

    A thin view of :func:`embedloss.metrics.recall_at_k` keeping only the averaged keys.
    """
    both = metrics.recall_at_k(a, b, k=tuple(ks))
    return {f"recall@{k}": both[f"recall@{k}"] for k in ks}


@torch.no_grad()
def _embed_all(fn: Embed, x: Tensor, batch: int = 2048) -> Tensor:
    return torch.cat([fn(x[i : i + batch]).double().cpu() for i in range(0, x.shape[0], batch)])


def classification_metrics(
    embed: Embed,
    train: Split,
    test: Split,
    perturbed_test: Tensor,
    *,
    k: int,
    device: torch.device,
    nested_dims: Sequence[int] = (),
) -> dict[str, float]:
    """``knn_accuracy``, ``linear_probe_accuracy`` (perturbed held-out), ``clean_knn_accuracy``.

    Then the :data:`LABELLED_METRICS`, and for each of ``nested_dims`` smaller than the
    embedding the :data:`NESTED_METRICS` of the first ``d`` features (``dim_<d>/<metric>``).
    """
    assert train.y is not None and test.y is not None

    def run(x: Tensor) -> Tensor:
        return _embed_all(lambda t: embed(t.to(device)), x)

    ref, clean, pert = run(train.a), run(test.a), run(perturbed_test)
    out = {
        "knn_accuracy": knn_accuracy(ref, train.y, pert, test.y, k),
        "linear_probe_accuracy": linear_probe_accuracy(ref, train.y, pert, test.y),
        "clean_knn_accuracy": knn_accuracy(ref, train.y, clean, test.y, k),
    }
    for name, fn in LABELLED_METRICS.items():
        out[name] = float(fn(ref, train.y, pert, test.y))
    for d in nested_dims:
        if d >= ref.shape[1]:
            continue
        r, q = ref[:, :d], pert[:, :d]
        out[f"dim_{d}/knn_accuracy"] = knn_accuracy(r, train.y, q, test.y, k)
        for name in NESTED_METRICS[1:]:
            out[f"dim_{d}/{name}"] = float(LABELLED_METRICS[name](r, train.y, q, test.y))
    return out


def retrieval_metrics(
    embed_a: Embed, embed_b: Embed, test: Split, *, device: torch.device
) -> dict[str, float]:
    """Held-out cross-modal ``recall@1`` and ``recall@5``."""
    assert test.b is not None
    a = _embed_all(lambda t: embed_a(t.to(device)), test.a)
    b = _embed_all(lambda t: embed_b(t.to(device)), test.b)
    return recall_at_k(a, b)


def perturbed_split(
    test: Split, image_shape: tuple[int, ...] | None, eval_cfg: dict, seed: int
) -> Tensor:
    """The held-out inputs under the configured nuisance perturbation."""
    return perturb(
        test.a, image_shape, shift=int(eval_cfg["shift"]), noise=float(eval_cfg["noise"]), seed=seed
    )


@dataclass(frozen=True)
class EvalSetup:
    """The data of an evaluation: the task's splits, the perturbed held-out inputs, k."""

    task: str
    data: TaskData
    perturbed: Tensor | None  # None for the paired task and for unlabelled data
    k: int
    device: torch.device
    nested_dims: tuple[int, ...] = ()  # Matryoshka's prefix sizes

    @classmethod
    def build(
        cls,
        task: str,
        data: TaskData,
        cfg: dict[str, Any],
        device: torch.device,
        nested_dims: Sequence[int] = (),
    ) -> EvalSetup:
        """Perturb the held-out split once, as the run's ``eval`` section says.

        ``nested_dims`` (a Matryoshka run's) apply unless ``eval.dims`` lists others.
        """
        labelled = data.train.y is not None and data.test.y is not None
        pert = None
        if task != "paired" and labelled:
            pert = perturbed_split(data.test, data.image_shape, cfg["eval"], int(cfg["seed"]))
        dims = cfg["eval"].get("dims") or nested_dims
        return cls(task, data, pert, int(cfg["eval"]["k"]), device, tuple(int(d) for d in dims))


def _with_device(fn: Callable[[Tensor, str], Tensor], device: torch.device, m: str) -> Embed:
    return lambda x: fn(x.to(device), m)


def evaluate(
    embed: Callable[[Tensor, str], Tensor], setup: EvalSetup, nested: bool = True
) -> dict[str, float]:
    """The task's metrics of ``embed(x, modality)`` (``{}`` without labels on ssl/supervised).

    ``nested``: also the metrics at the setup's nested sizes (not for raw features).
    """
    data, dev = setup.data, setup.device
    if setup.task == "paired":
        return retrieval_metrics(
            _with_device(embed, dev, "a"), _with_device(embed, dev, "b"), data.test, device=dev
        )
    if setup.perturbed is None:
        return {}
    return classification_metrics(
        _with_device(embed, dev, "a"),
        data.train,
        data.test,
        setup.perturbed,
        k=setup.k,
        device=dev,
        nested_dims=setup.nested_dims if nested else (),
    )


@torch.no_grad()
def epoch_metrics(model: Embedder, setup: EvalSetup) -> dict[str, float]:
    """The task's main metric only (cheap: no probe), for the per-epoch learning curve."""
    data, dev = setup.data, setup.device
    if setup.task == "paired":
        a = _embed_all(_with_device(model.embed, dev, "a"), data.test.a)
        assert data.test.b is not None
        b = _embed_all(_with_device(model.embed, dev, "b"), data.test.b)
        return recall_at_k(a, b, ks=(1,))
    if setup.perturbed is None:
        return {}
    assert data.train.y is not None and data.test.y is not None
    embed = _with_device(model.embed, dev, "a")
    ref, pert = _embed_all(embed, data.train.a), _embed_all(embed, setup.perturbed)
    return {"knn_accuracy": knn_accuracy(ref, data.train.y, pert, data.test.y, setup.k)}


def evaluate_with_baselines(
    model: Embedder, initial: Embedder, setup: EvalSetup
) -> tuple[dict[str, float], dict[str, dict[str, float] | None]]:
    """The trained model's metrics and the baselines': the random encoder and raw features.

    Raw features have no cross-modal baseline (``None`` on the paired task).
    """
    metrics_ = evaluate(model.embed, setup)
    baselines: dict[str, dict[str, float] | None] = {
        "random_encoder": evaluate(initial.embed, setup),
        "raw_features": None
        if setup.task == "paired"
        else evaluate(lambda x, m: x, setup, nested=False),
    }
    return metrics_, baselines
