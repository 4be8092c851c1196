"""Evaluation of ``embedloss train``: k-NN, linear probe and cross-modal retrieval.

* ssl / supervised: embeddings of the clean training split are the reference; the held-out split
  is **perturbed** by seeded 1-pixel shifts and noise (on clean 8×8 digits raw pixels already reach
  ~98% k-NN, under shifts about 50%, so invariance is what a representation can add).
  ``knn_accuracy`` (cosine k-NN, majority vote) and ``linear_probe_accuracy`` (logistic regression
  on standardised embeddings) are measured on the perturbed split, ``clean_knn_accuracy`` on the
  clean one.
* paired: ``recall@1`` and ``recall@5`` of held-out cross-modal retrieval (cosine), the mean of the
  a→b and b→a directions.

Example:
    >>> a = torch.eye(3)
    >>> recall_at_k(a, a, ks=(1,))
    {'recall@1': 1.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from embedloss import metrics
from embedloss.cli.data import Split, perturb

__all__ = [
    "classification_metrics",
    "knn_accuracy",
    "linear_probe_accuracy",
    "recall_at_k",
    "retrieval_metrics",
]

Embed = Callable[[Tensor], Tensor]


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
) -> dict[str, float]:
    """``knn_accuracy``, ``linear_probe_accuracy`` (perturbed held-out) and ``clean_knn_accuracy``."""
    assert train.y is not None and test.y is not None

    def run(x: Tensor) -> Tensor:
        return _embed_all(lambda t: embed(t.to(device)), x)

    ref, clean, pert = run(train.a), run(test.a), run(perturbed_test)
    return {
        "knn_accuracy": knn_accuracy(ref, train.y, pert, test.y, k),
        "linear_probe_accuracy": linear_probe_accuracy(ref, train.y, pert, test.y),
        "clean_knn_accuracy": knn_accuracy(ref, train.y, clean, test.y, k),
    }


def retrieval_metrics(
    embed_a: Embed, embed_b: Embed, test: Split, *, device: torch.device
) -> dict[str, float]:
    """Held-out cross-modal ``recall@1`` and ``recall@5``."""
    assert test.b is not None
    a = _embed_all(lambda t: embed_a(t.to(device)), test.a)
    b = _embed_all(lambda t: embed_b(t.to(device)), test.b)
    return recall_at_k(a, b)


def perturbed_split(
    test: Split, image_shape: tuple[int, int] | None, eval_cfg: dict, seed: int
) -> Tensor:
    """The held-out inputs under the configured nuisance perturbation."""
    return perturb(
        test.a, image_shape, shift=int(eval_cfg["shift"]), noise=float(eval_cfg["noise"]), seed=seed
    )
