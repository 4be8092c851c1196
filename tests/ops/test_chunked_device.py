"""The tiled core reads nothing back to the host, and its gradient paths follow ``reduced``.

* Forward and backward run on ``meta`` tensors (shapes known, no values): any ``.item()``,
  ``bool(tensor)``, data-dependent branch or data-dependent shape would raise there, so this is
  a CPU-testable proof that the step path never synchronises with the device.
* ``reduced=True`` (the caller only sums or averages the per-anchor losses) finishes the
  gradients during the forward; they must equal the dense gradients for ``mean`` and ``sum``.
  ``reduced=False`` recomputes in the backward and must equal the dense gradients for any
  per-anchor upstream gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from embedloss.ops import chunked_rows
from embedloss.ops.anchors import PairSpec, reduce_anchor_losses
from embedloss.ops.info_nce import info_nce, symmetric_info_nce

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _tensors(n: int, m: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    s = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    return q, k, s


def _close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max()}"


def _meta(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    m = t.detach().to("meta")
    return m.requires_grad_() if t.requires_grad else m


def _weight_fn(logits: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return 0.3 * torch.tanh(logits) + 0.01 * rows.unsqueeze(1) - 0.02 * cols.unsqueeze(0)


def _sim_spec(n: int, decoupled: bool = False) -> PairSpec:
    idx = torch.arange(n)
    return PairSpec(
        positive_index=torch.cat([idx + n, idx]),
        self_index=torch.arange(2 * n),
        positive_in_denominator=not decoupled,
    )


LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
ROW_CASES = {
    "diagonal": (PairSpec(), {}),
    "simclr": (_sim_spec(4), {}),
    "decoupled, smoothing": (_sim_spec(4, decoupled=True), {"label_smoothing": 0.1}),
    "labels, weight fn": (PairSpec(query_labels=LABELS, key_labels=LABELS), {"w": "fn"}),
    "false negatives, weights": (
        PairSpec(
            positive_index=torch.arange(8),
            query_labels=LABELS,
            key_labels=LABELS,
            labels_mark="false_negatives",
        ),
        {"w": "tensor", "label_smoothing": 0.2},
    ),
}


def _row_kwargs(options: dict, n: int, m: int) -> dict:
    kw = {k: v for k, v in options.items() if k != "w"}
    if options.get("w") == "fn":
        kw["negative_log_weights"] = _weight_fn
    elif options.get("w") == "tensor":
        kw["negative_log_weights"] = torch.randn(n, m, generator=torch.Generator().manual_seed(3))
    return kw


def _spec_to(spec: PairSpec, device: str) -> PairSpec:
    def move(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    return PairSpec(
        positive_index=move(spec.positive_index),
        query_labels=move(spec.query_labels),
        key_labels=move(spec.key_labels),
        labels_mark=spec.labels_mark,
        self_index=move(spec.self_index),
        positive_in_denominator=spec.positive_in_denominator,
    )


@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_info_nce_runs_on_meta(case, reduced):
    spec, options = ROW_CASES[case]
    q, k, s = (_meta(t) for t in _tensors(8, 8, 5, torch.float32))
    kw = _row_kwargs(options, 8, 8)
    if isinstance(kw.get("negative_log_weights"), Tensor):
        kw["negative_log_weights"] = kw["negative_log_weights"].to("meta")
    out = info_nce(q, k, s, _spec_to(spec, "meta"), chunk_size=2, reduced=reduced, **kw)
    assert out.loss.device.type == "meta" and out.correct.device.type == "meta"
    loss = reduce_anchor_losses(out, "mean") if reduced else out.loss.sum()
    grads = torch.autograd.grad(loss, (q, k, s))
    assert [tuple(g.shape) for g in grads] == [(8, 5), (8, 5), ()]
    assert all(g.device.type == "meta" for g in grads)


@pytest.mark.parametrize("labels", [None, LABELS])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "w": "fn"}, {"w": "tensor"}])
def test_symmetric_runs_on_meta(labels, options):
    x, y, s = (_meta(t) for t in _tensors(8, 8, 5, torch.float32, seed=1))
    kw = _row_kwargs(options, 8, 8)
    if isinstance(kw.get("negative_log_weights"), Tensor):
        kw["negative_log_weights"] = kw["negative_log_weights"].to("meta")
    lab = None if labels is None else labels.to("meta")
    a, b = symmetric_info_nce(x, y, s, labels=lab, chunk_size=2, reduced=True, **kw)
    assert a.loss.device.type == b.correct.device.type == "meta"
    grads = torch.autograd.grad(a.loss.mean() + b.loss.sum(), (x, y, s))
    assert [tuple(g.shape) for g in grads] == [(8, 5), (8, 5), ()]


def test_meta_run_would_catch_a_host_read():
    # the check can fail: reading a value of a meta tensor raises
    x = torch.ones(3, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(x.sum() > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_reduced_eager_gradients_equal_dense(case, reduction, dtype):
    spec, options = ROW_CASES[case]
    q, k, s = _tensors(8, 8, 5, dtype, seed=2)
    kw = _row_kwargs(options, 8, 8)
    if isinstance(kw.get("negative_log_weights"), Tensor):
        kw["negative_log_weights"] = kw["negative_log_weights"].to(dtype)
    results = []
    for chunk in (None, 3):
        out = info_nce(q, k, s, spec, chunk_size=chunk, reduced=True, **kw)
        loss = reduce_anchor_losses(out, reduction)
        results.append((loss, torch.autograd.grad(loss, (q, k, s))))
    (ld, gd), (lt, gt) = results
    _close(lt, ld, dtype, "loss")
    for a, b, name in zip(gt, gd, "qks", strict=True):
        _close(a, b, dtype, f"grad {name}")


def test_reduced_gradients_are_computed_in_the_forward(monkeypatch):
    # reduced=True: the backward never recomputes; reduced=False: it always does
    calls = []
    original = chunked_rows.row_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked_rows, "row_backward", spy)
    q, k, s = _tensors(7, 7, 3, torch.float64)
    out = info_nce(q, k, s, chunk_size=3, reduced=True)
    torch.autograd.grad(out.loss.mean(), (q, k, s))
    assert calls == []
    out = info_nce(q, k, s, chunk_size=3, reduced=False)
    torch.autograd.grad(out.loss.mean(), (q, k, s))
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_unreduced_gradients_equal_dense_for_any_upstream(case, dtype):
    spec, options = ROW_CASES[case]
    q, k, s = _tensors(8, 8, 5, dtype, seed=4)
    kw = _row_kwargs(options, 8, 8)
    if isinstance(kw.get("negative_log_weights"), Tensor):
        kw["negative_log_weights"] = kw["negative_log_weights"].to(dtype)
    gen = torch.Generator().manual_seed(8)
    upstream = (torch.randn(8, generator=gen, dtype=torch.float64) * 3).to(dtype)  # any sign
    grads = []
    for chunk in (None, 3):
        out = info_nce(q, k, s, spec, chunk_size=chunk, reduced=False, **kw)
        grads.append(torch.autograd.grad((out.loss * upstream).sum(), (q, k, s)))
    for a, b, name in zip(grads[1], grads[0], "qks", strict=True):
        _close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("labels", [None, LABELS])
def test_symmetric_gradients_for_signed_per_anchor_upstream(labels):
    x, y, s = _tensors(8, 8, 5, torch.float64, seed=5)
    gen = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    w1[3] = 0.0  # a zero upstream gradient leaves the anchor out of G
    grads = []
    for chunk in (None, 3):
        a, b = symmetric_info_nce(x, y, s, labels=labels, chunk_size=chunk, label_smoothing=0.1)
        grads.append(torch.autograd.grad((a.loss * w1).sum() + (b.loss * w2).sum(), (x, y, s)))
    for a, b, name in zip(grads[1], grads[0], "xys", strict=True):
        _close(a, b, torch.float64, f"grad {name}")
