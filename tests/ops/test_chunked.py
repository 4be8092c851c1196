"""The tiled InfoNCE core equals the dense one — value, validity, correctness and gradients.

Oracles: the dense path (``chunk_size=None``) and an independent float64 loop written from the
core's equation ``L_i = log Σ_{A(i)} exp(ℓ + w) − (1−ε)·mean_{P(i)} ℓ − ε·mean_{A(i)} ℓ``.
Gradients are compared for an upstream gradient that is the same for every anchor (the eager
path, computed during the forward) and for arbitrary per-anchor weights (the recomputing
backward), with respect to the queries, the keys and a learnable scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from embedloss import CLIPLoss, InfoNCELoss, SimCLRLoss
from embedloss.ops import chunked
from embedloss.ops.anchors import AnchorLosses, PairSpec, reduce_anchor_losses
from embedloss.ops.info_nce import info_nce, symmetric_info_nce

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _tensors(n: int, m: int, d: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.7):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    return q, k, s


def _close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max()}"


def _grads(out: AnchorLosses, weights: Tensor | None, inputs: tuple[Tensor, ...]):
    loss = out.loss.sum() if weights is None else (out.loss * weights).sum()
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def _compare_row(q, k, s, spec, chunk, dtype, **kw):
    """Tiled vs dense info_nce: values, masks, and both gradient paths."""
    dense = info_nce(q, k, s, spec, chunk_size=None, **kw)
    tiled = info_nce(q, k, s, spec, chunk_size=chunk, **kw)
    _close(tiled.loss, dense.loss, dtype, "loss")
    assert torch.equal(tiled.valid, dense.valid)
    assert torch.equal(tiled.correct, dense.correct)
    gen = torch.Generator().manual_seed(5)
    upstream = torch.rand(q.shape[0], generator=gen, dtype=torch.float64).to(dtype)
    for w in (None, upstream):  # uniform (eager gradients), then per-anchor (recompute)
        for gt, gd, name in zip(
            _grads(tiled, w, (q, k, s)), _grads(dense, w, (q, k, s)), "qks", strict=True
        ):
            _close(
                gt, gd, dtype, f"grad {name} (upstream {'uniform' if w is None else 'weighted'})"
            )
    return dense, tiled


def _sim_layout(n: int) -> PairSpec:
    idx = torch.arange(n)
    return PairSpec(positive_index=torch.cat([idx + n, idx]), self_index=torch.arange(2 * n))


LABELS_Q = torch.tensor([0, 1, 2, 0, 1, 3, 0])
LABELS_K = torch.tensor([1, 0, 0, 2, 4, 1, 0, 3, 2, 1])

ROW_SPECS: dict[str, Callable[[], tuple[int, int, PairSpec]]] = {
    "diagonal, M != N": lambda: (7, 10, PairSpec()),
    "simclr layout (self excluded)": lambda: (8, 8, _sim_layout(4)),
    "simclr layout, decoupled": lambda: (
        8,
        8,
        PairSpec(
            positive_index=_sim_layout(4).positive_index,
            self_index=_sim_layout(4).self_index,
            positive_in_denominator=False,
        ),
    ),
    "labels as positives (multi-positive)": lambda: (
        7,
        10,
        PairSpec(query_labels=LABELS_Q, key_labels=LABELS_K),
    ),
    "labels, decoupled": lambda: (
        7,
        10,
        PairSpec(query_labels=LABELS_Q, key_labels=LABELS_K, positive_in_denominator=False),
    ),
    "labels as false negatives": lambda: (
        7,
        10,
        PairSpec(
            positive_index=torch.arange(7),
            query_labels=LABELS_Q,
            key_labels=LABELS_K,
            labels_mark="false_negatives",
        ),
    ),
    "labels with self exclusion (supcon layout)": lambda: (
        8,
        8,
        PairSpec(
            query_labels=torch.tensor([0, 1, 0, 2, 0, 1, 0, 2]),
            key_labels=torch.tensor([0, 1, 0, 2, 0, 1, 0, 2]),
            self_index=torch.arange(8),
        ),
    ),
}


def _weight_fn(logits: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    # depends on the logit and on the global indices, so a wrong tile offset would show
    return 0.3 * torch.tanh(logits) + 0.01 * rows.unsqueeze(1) - 0.02 * cols.unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(ROW_SPECS))
@pytest.mark.parametrize("option", ["plain", "smoothing", "weights", "weight_fn"])
def test_info_nce_tiled_equals_dense(dtype, layout, option):
    n, m, spec = ROW_SPECS[layout]()
    q, k, s = _tensors(n, m, 5, dtype)
    kw: dict = {}
    if option == "smoothing":
        kw["label_smoothing"] = 0.2
    elif option == "weights":
        gen = torch.Generator().manual_seed(3)
        kw["negative_log_weights"] = torch.randn(n, m, generator=gen, dtype=dtype)
        kw["label_smoothing"] = 0.1
    elif option == "weight_fn":
        kw["negative_log_weights"] = _weight_fn
    for chunk in (3, 1, n + 5):  # remainder tile, one row per tile, a single tile
        _compare_row(q, k, s, spec, chunk, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 0, 2, 1, 0, 3])])
@pytest.mark.parametrize("option", ["plain", "smoothing", "weights", "weight_fn"])
def test_symmetric_tiled_equals_dense(dtype, labels, option):
    n = 7
    x, y, s = _tensors(n, n, 5, dtype, seed=1)
    kw: dict = {"labels": labels}
    if option == "smoothing":
        kw["label_smoothing"] = 0.3
    elif option == "weights":
        gen = torch.Generator().manual_seed(4)
        kw["negative_log_weights"] = torch.randn(n, n, generator=gen, dtype=dtype)
        kw["label_smoothing"] = 0.1
    elif option == "weight_fn":
        kw["negative_log_weights"] = _weight_fn
    gen = torch.Generator().manual_seed(6)
    w1, w2 = torch.rand(2, n, generator=gen, dtype=torch.float64).to(dtype)
    for chunk in (3, 1, 100):
        d_xy, d_yx = symmetric_info_nce(x, y, s, chunk_size=None, **kw)
        t_xy, t_yx = symmetric_info_nce(x, y, s, chunk_size=chunk, **kw)
        for t, d in ((t_xy, d_xy), (t_yx, d_yx)):
            _close(t.loss, d.loss, dtype, "loss")
            assert torch.equal(t.valid, d.valid) and torch.equal(t.correct, d.correct)
        for a, b in ((1.0, 1.0), (w1, w2), (1.0, 0.0)):  # uniform, arbitrary, one direction
            g_t = torch.autograd.grad(
                (t_xy.loss * a).sum() + (t_yx.loss * b).sum(), (x, y, s), retain_graph=True
            )
            g_d = torch.autograd.grad(
                (d_xy.loss * a).sum() + (d_yx.loss * b).sum(), (x, y, s), retain_graph=True
            )
            for gt, gd, name in zip(g_t, g_d, "xys", strict=True):
                _close(gt, gd, dtype, f"grad {name}")


def test_symmetric_weights_transpose_serve_the_other_direction():
    # y→x with weights W equals info_nce of y against x with weights Wᵀ
    x, y, s = _tensors(6, 6, 4, torch.float64, seed=2)
    w = torch.randn(6, 6, dtype=torch.float64)
    _, yx = symmetric_info_nce(x, y, s, negative_log_weights=w, chunk_size=4)
    ref = info_nce(y, x, s, negative_log_weights=w.T, chunk_size=None)
    _close(yx.loss, ref.loss, torch.float64, "y→x loss")


# ----------------------------------------------------------------------------------------------
# an independent loop oracle (float64), for both paths
# ----------------------------------------------------------------------------------------------


def _loop_oracle(q, k, s, positive, denominator, w=None, eps=0.0):
    losses, valid = [], []
    for i in range(q.shape[0]):
        pos = [a for a in range(k.shape[0]) if positive(i, a)]
        den = [a for a in range(k.shape[0]) if denominator(i, a)]
        if not pos or not den:
            losses.append(q.new_zeros(()))
            valid.append(False)
            continue
        logit = [s * (q[i] @ k[a]) for a in range(k.shape[0])]
        terms = torch.stack([logit[a] + (0.0 if (w is None or a in pos) else w[i, a]) for a in den])
        loss = torch.logsumexp(terms, 0) - (1 - eps) * torch.stack([logit[p] for p in pos]).mean()
        if eps:
            loss = loss - eps * torch.stack([logit[a] for a in den]).mean()
        losses.append(loss)
        valid.append(True)
    return torch.stack(losses), torch.tensor(valid)


@pytest.mark.parametrize("chunk", [None, 2])
def test_loop_oracle_supcon_layout_with_weights_and_smoothing(chunk):
    lab = torch.tensor([0, 1, 0, 2, 0, 1])
    q, k, s = _tensors(6, 6, 3, torch.float64, seed=7)
    w = torch.randn(6, 6, dtype=torch.float64)
    spec = PairSpec(query_labels=lab, key_labels=lab, self_index=torch.arange(6))
    out = info_nce(q, k, s, spec, negative_log_weights=w, label_smoothing=0.25, chunk_size=chunk)
    ref, valid = _loop_oracle(
        q,
        k,
        s,
        lambda i, a: a != i and lab[i] == lab[a],
        lambda i, a: a != i,
        w,
        0.25,
    )
    assert torch.equal(out.valid, valid)  # label 2 appears twice, label 1 twice: all valid
    _close(out.loss, ref, torch.float64, "loss")
    g = torch.autograd.grad(out.loss.sum(), (q, k, s))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, s))
    for a, b, name in zip(g, g_ref, "qks", strict=True):
        _close(a, b, torch.float64, f"grad {name}")


@pytest.mark.parametrize("chunk", [None, 3])
def test_loop_oracle_false_negatives_decoupled(chunk):
    ql, kl = LABELS_Q, LABELS_K
    q, k, s = _tensors(7, 10, 3, torch.float64, seed=8)
    spec = PairSpec(
        positive_index=torch.arange(7),
        query_labels=ql,
        key_labels=kl,
        labels_mark="false_negatives",
        positive_in_denominator=False,
    )
    out = info_nce(q, k, s, spec, chunk_size=chunk)
    ref, valid = _loop_oracle(
        q, k, s, lambda i, a: a == i, lambda i, a: a != i and bool(kl[a] != ql[i])
    )
    assert torch.equal(out.valid, valid)
    _close(out.loss, ref, torch.float64, "loss")
    g = torch.autograd.grad((out.loss * torch.arange(7.0, dtype=torch.float64)).sum(), (q, k))
    g_ref = torch.autograd.grad((ref * torch.arange(7.0, dtype=torch.float64)).sum(), (q, k))
    for a, b in zip(g, g_ref, strict=True):
        _close(a, b, torch.float64, "grad")


# ----------------------------------------------------------------------------------------------
# invalid anchors, correctness, extremes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 4])
def test_invalid_anchors_have_zero_loss_and_no_gradient(chunk):
    q, k, _ = _tensors(6, 6, 3, torch.float64)
    # anchor 1: its positive is itself (removed); 4: out of range; 5: negative index
    spec = PairSpec(
        positive_index=torch.tensor([1, 0, 3, 2, 9, -1]),
        self_index=torch.tensor([0, 0, 2, 3, 4, 5]),
    )
    out = info_nce(q, k, 2.0, spec, chunk_size=chunk)
    assert out.valid.tolist() == [True, False, True, True, False, False]
    assert (out.loss[~out.valid] == 0).all() and not out.correct[~out.valid].any()
    weights = torch.tensor([1.0, 5.0, 1.0, 1.0, 7.0, 3.0], dtype=torch.float64)
    (g_q,) = torch.autograd.grad((out.loss * weights).sum(), (q,))
    assert torch.isfinite(g_q).all() and (g_q[[1, 4, 5]] == 0).all()
    dense = info_nce(q, k, 2.0, spec, chunk_size=None)
    _close(out.loss, dense.loss, torch.float64, "loss")


@pytest.mark.parametrize("chunk", [None, 2])
def test_empty_denominator_is_invalid_not_nan(chunk):
    # every key shares the label and the positives are left out of the denominator
    q, k, s = _tensors(4, 5, 3, torch.float64)
    spec = PairSpec(
        query_labels=torch.zeros(4, dtype=torch.long),
        key_labels=torch.zeros(5, dtype=torch.long),
        positive_in_denominator=False,
    )
    out = info_nce(q, k, s, spec, chunk_size=chunk)
    assert not out.valid.any() and (out.loss == 0).all()
    grads = torch.autograd.grad(reduce_anchor_losses(out, "mean"), (q, k, s), allow_unused=True)
    assert all(g is None or (torch.isfinite(g).all() and (g == 0).all()) for g in grads)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_correct_follows_the_dense_first_maximum_on_ties(chunk):
    # exact ties between a positive and a negative: the first maximum decides, as argmax does
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2])
    sim = PairSpec(positive_index=torch.tensor([3, 2, 1, 0]), self_index=torch.arange(4))
    cases = [
        PairSpec(),
        sim,
        PairSpec(query_labels=labels, key_labels=labels),
        PairSpec(query_labels=labels, key_labels=labels, positive_in_denominator=False),
    ]
    for spec in cases:
        dense = info_nce(q, k, 1.0, spec, chunk_size=None)
        tiled = info_nce(q, k, 1.0, spec, chunk_size=chunk)
        assert torch.equal(tiled.correct, dense.correct), spec
    for lab in (None, labels):
        d_xy, d_yx = symmetric_info_nce(q, k, 1.0, labels=lab, chunk_size=None)
        t_xy, t_yx = symmetric_info_nce(q, k, 1.0, labels=lab, chunk_size=chunk)
        assert torch.equal(t_xy.correct, d_xy.correct)
        assert torch.equal(t_yx.correct, d_yx.correct)
    # rows [1,1,0,1], [0,0,1,0], [1,1,1,1], [1,1,0,1]: row 0's positive (key 0) is the first max
    assert info_nce(q, k, 1.0, chunk_size=chunk).correct.tolist() == [True, False, False, False]
    # columns of the same matrix: only column 0 has its positive (row 0) first
    assert symmetric_info_nce(q, k, 1.0, chunk_size=chunk)[1].correct.tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_correct_with_identical_embeddings_everywhere():
    z = torch.ones(5, 3, dtype=torch.float64)
    for chunk in (None, 2):
        assert info_nce(z, z, 1.0, chunk_size=chunk).correct.tolist() == [True] + [False] * 4
        xy, yx = symmetric_info_nce(z, z, 1.0, chunk_size=chunk)
        assert xy.correct.tolist() == yx.correct.tolist() == [True] + [False] * 4


def _extreme_run(x, y, scale, chunk, w1):
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    s = torch.tensor(scale, dtype=x.dtype, requires_grad=True)
    a, b = symmetric_info_nce(x, y, s, chunk_size=chunk, label_smoothing=0.1)
    g = torch.autograd.grad((a.loss * w1.to(x.dtype)).sum() + b.loss.sum(), (x, y, s))
    r = info_nce(x, y, s, chunk_size=chunk)
    g2 = torch.autograd.grad(r.loss.mean(), (x, y, s))
    values = (a.loss, b.loss, *g, r.loss, *g2)
    return values, (a.correct, b.correct, r.correct)


def _extreme_inputs(seed):
    """23 unit vectors on each side (float64) and per-row weights."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(23, 6, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(23, 6, generator=gen, dtype=torch.float64), dim=1)
    return x, y, torch.rand(23, generator=gen, dtype=torch.float64)


def _assert_exact(run, truth):
    """Values and gradients at float64 tolerance; top-1 flags equal."""
    for t, d in zip(run[0], truth[0], strict=True):
        _close(t, d, torch.float64, "float64")
    for t, d in zip(run[1], truth[1], strict=True):
        assert torch.equal(t, d)


@pytest.mark.parametrize("scale", [1000.0, 100.0, 0.01])
def test_extreme_temperatures_stay_exact(scale):
    # τ = 1e-3 on unit vectors spreads the logits over ±1000: the symmetric path's shared-exp
    # shortcuts must notice and fall back (column fix-up, two-exp backward, shifted μ).
    x, y, w1 = _extreme_inputs(11)
    truth = _extreme_run(x, y, scale, None, w1)
    tiled64 = _extreme_run(x, y, scale, 4, w1)
    for t in tiled64[0]:
        assert torch.isfinite(t).all()
    _assert_exact(tiled64, truth)
    # float32: at τ = 1e-3 the rounding of the logits (~6e-5) is amplified by the scale, so
    # both float32 paths are compared with the float64 truth: tiled is as accurate as dense.
    dense32, _ = _extreme_run(x.float(), y.float(), scale, None, w1)
    tiled32, _ = _extreme_run(x.float(), y.float(), scale, 4, w1)
    for t, d, ref in zip(tiled32, dense32, truth[0], strict=True):
        assert torch.isfinite(t).all()
        size = ref.abs().max().clamp(min=1)
        err_tiled = ((t.double() - ref).abs().max() / size).item()
        err_dense = ((d.double() - ref).abs().max() / size).item()
        assert err_tiled <= max(2 * err_dense, 1e-5), (err_tiled, err_dense)


@pytest.mark.parametrize("chunk", [1, 64])
def test_extreme_spread_within_one_tile_or_one_row(chunk):
    # every row and every column exponentiated against its own maximum: one tile holding
    # logits from -1000 to 1000 (or tiles of a single row) is as exact as the dense path
    x, y, w1 = _extreme_inputs(12)
    _assert_exact(_extreme_run(x, y, 1000.0, chunk, w1), _extreme_run(x, y, 1000.0, None, w1))


# ----------------------------------------------------------------------------------------------
# precision, devices, memory, policy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(half):
    q16 = torch.randn(9, 8).to(half).requires_grad_()
    k16 = torch.randn(9, 8).to(half).requires_grad_()
    out = info_nce(q16, k16, 2.0, chunk_size=4)
    assert out.loss.dtype == torch.float32
    q32 = q16.detach().float().requires_grad_()
    k32 = k16.detach().float().requires_grad_()
    ref = info_nce(q32, k32, 2.0, chunk_size=None)
    _close(out.loss, ref.loss, torch.float32, "loss")
    (g16,) = torch.autograd.grad(out.loss.sum(), (q16,))
    (g32,) = torch.autograd.grad(ref.loss.sum(), (q32,))
    assert g16.dtype == half
    assert torch.allclose(g16.float(), g32, atol=1e-2, rtol=1e-2)  # rounding to half only
    a, b = symmetric_info_nce(q16, k16, 2.0, chunk_size=4)
    ra, rb = symmetric_info_nce(q32, k32, 2.0, chunk_size=None)
    _close(a.loss, ra.loss, torch.float32, "x→y")
    _close(b.loss, rb.loss, torch.float32, "y→x")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kind", ["info_nce", "symmetric", "labels", "smoothing"])
def test_tiled_path_never_builds_an_n_by_m_buffer(kind):
    n, chunk = 96, 8
    q, k, s = _tensors(n, n, 4, torch.float32)
    labels = torch.arange(n) % 5
    with _LargestTensor() as largest:
        if kind == "info_nce":
            out = info_nce(q, k, s, _sim_layout(n // 2), chunk_size=chunk)
            loss = (out.loss * torch.rand(n)).sum()  # the recomputing backward too
        elif kind == "labels":
            spec = PairSpec(query_labels=labels, key_labels=labels)
            loss = info_nce(q, k, s, spec, chunk_size=chunk).loss.mean()
        else:
            eps = 0.1 if kind == "smoothing" else 0.0
            a, b = symmetric_info_nce(q, k, s, chunk_size=chunk, label_smoothing=eps)
            loss = a.loss.mean() + b.loss.sum()
        torch.autograd.grad(loss, (q, k, s))
    assert largest.numel <= chunk * n, largest.numel  # a tile, never n·n
    with _LargestTensor() as largest:
        info_nce(q, k, s, chunk_size=None).loss.sum()
    assert largest.numel == n * n  # the check can fail: the dense path does build one


def test_resolve_chunk_size_policy():
    limit_rows = int(math.sqrt(chunked.DENSE_LIMIT_BYTES / (4 * chunked.DENSE_BUFFERS)))
    assert chunked.resolve_chunk_size("auto", limit_rows - 10, limit_rows - 10) is None
    # just above the limit: tiled, one tile covering every row
    assert chunked.resolve_chunk_size("auto", limit_rows + 10, limit_rows + 10) == limit_rows + 10
    rows = chunked.resolve_chunk_size("auto", 10_000, 3000)
    assert rows is not None and rows % 64 == 0 and rows >= chunked.MIN_TILE_ROWS
    assert chunked.resolve_chunk_size("auto", 131072, 131072) == chunked.MIN_TILE_ROWS
    assert chunked.resolve_chunk_size("auto", 200_000, 300, torch.float64) == 4096
    assert chunked.resolve_chunk_size(None, 10**6, 10**6) is None
    assert chunked.resolve_chunk_size(7, 3, 3) == 7


def test_auto_tiles_large_problems(monkeypatch):
    calls = []
    original = chunked.chunked_info_nce

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunked_info_nce", spy)
    q, k, s = _tensors(40, 40, 3, torch.float32)
    dense = info_nce(q, k, s, chunk_size="auto")  # small: dense
    assert calls == []
    monkeypatch.setattr(chunked, "DENSE_LIMIT_BYTES", 1024)
    monkeypatch.setattr(chunked, "MIN_TILE_ROWS", 16)
    monkeypatch.setattr(chunked, "TILE_BYTES", 16 * 40 * 4)
    tiled = info_nce(q, k, s, chunk_size="auto")
    assert calls == [16]
    _close(tiled.loss, dense.loss, torch.float32, "auto")


def test_weight_tensor_requiring_grad_uses_dense_path():
    q, k, s = _tensors(6, 6, 3, torch.float64)
    w = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    out = info_nce(q, k, s, negative_log_weights=w, chunk_size=2)
    (gw,) = torch.autograd.grad(out.loss.sum(), (w,))
    assert gw.abs().sum() > 0


def test_weight_errors():
    q, k, s = _tensors(6, 5, 3, torch.float64)
    with pytest.raises(ValueError, match=r"negative_log_weights must have shape \(6, 5\)"):
        info_nce(
            q,
            k,
            s,
            PairSpec(positive_index=torch.arange(6) % 5),
            negative_log_weights=torch.zeros(5, 6),
            chunk_size=2,
        )
    with pytest.raises(ValueError, match=r"function must return a tensor of shape \(2, 5\)"):
        info_nce(
            q,
            k,
            s,
            PairSpec(positive_index=torch.arange(6) % 5),
            negative_log_weights=lambda lg, r, c: lg[:, :2],
            chunk_size=2,
        )
    with pytest.raises(ValueError, match=r"negative_log_weights must have shape \(6, 6\) \(x, y\)"):
        symmetric_info_nce(q, q, s, negative_log_weights=torch.zeros(6, 5), chunk_size=2)


def test_weight_function_may_return_its_input():
    q, k, s = _tensors(6, 6, 3, torch.float64)
    fn = lambda logits, rows, cols: logits  # noqa: E731  # aliases the tile buffer
    t = info_nce(q, k, s, negative_log_weights=fn, chunk_size=4)
    d = info_nce(q, k, s, negative_log_weights=fn, chunk_size=None)
    _close(t.loss, d.loss, torch.float64, "loss")


def test_no_grad_forward_and_keys_only_gradient():
    q, k, s = _tensors(7, 9, 3, torch.float64)
    with torch.no_grad():
        out = info_nce(q, k, s, chunk_size=2)
    assert out.loss.grad_fn is None
    _close(out.loss, info_nce(q, k, s, chunk_size=None).loss.detach(), torch.float64, "loss")
    q0 = q.detach()
    t = info_nce(q0, k, 2.0, chunk_size=2, label_smoothing=0.1)
    d = info_nce(q0, k, 2.0, chunk_size=None, label_smoothing=0.1)
    for w in (None, torch.rand(7, dtype=torch.float64)):
        (gt,) = _grads(t, w, (k,))
        (gd,) = _grads(d, w, (k,))
        _close(gt, gd, torch.float64, "grad k")


def test_repeated_backward_recomputes():
    q, k, s = _tensors(7, 7, 3, torch.float64)
    t = info_nce(q, k, s, chunk_size=3)
    first = torch.autograd.grad(t.loss.mean(), (q,), retain_graph=True)[0]
    second = torch.autograd.grad(t.loss.mean(), (q,))[0]  # eager gradients already used
    _close(first, second, torch.float64, "second backward")


def test_gradcheck_tiled():
    q, k, s = _tensors(5, 6, 3, torch.float64)
    lab = torch.tensor([0, 1, 0, 1, 2])
    klab = torch.tensor([0, 1, 2, 0, 1, 2])

    def row(q_, k_, s_):
        spec = PairSpec(query_labels=lab, key_labels=klab)
        return info_nce(q_, k_, s_, spec, label_smoothing=0.1, chunk_size=2).loss

    def sym(x_, y_, s_):
        a, b = symmetric_info_nce(x_, y_, s_, label_smoothing=0.2, chunk_size=2)
        return torch.cat([a.loss, b.loss])

    assert torch.autograd.gradcheck(row, (q, k, s))
    assert torch.autograd.gradcheck(sym, (q, k[:5].detach().requires_grad_(), s))


def test_higher_order_gradients_are_refused_with_a_clear_error():
    q, k, s = _tensors(5, 5, 3, torch.float64)
    out = info_nce(q, k, s, chunk_size=2)
    with pytest.raises(RuntimeError, match=r"first-order gradients only.*chunk_size=None"):
        torch.autograd.grad(out.loss.sum(), (q,), create_graph=True)
    a, _ = symmetric_info_nce(q, k, s, chunk_size=2)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(a.loss.sum(), (q,), create_graph=True)
    dense = info_nce(q, k, s, chunk_size=None)  # the dense path supports them
    (g,) = torch.autograd.grad(dense.loss.sum(), (q,), create_graph=True)
    assert g.requires_grad


# ----------------------------------------------------------------------------------------------
# end to end through the losses
# ----------------------------------------------------------------------------------------------


def _views(n: int, d: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return a, b


def _module_grads(loss, params, *inputs, **kw):
    out = loss.compute(*inputs, **kw)
    tensors = [t for t in (*inputs, *params) if isinstance(t, Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out.loss.sum(), tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_simclr_loss_tiled_equals_dense(reduction, with_labels):
    a, b = _views(11, 6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 5, 6]) if with_labels else None
    results = []
    for chunk in (None, 7):
        loss = SimCLRLoss(temperature=0.3, reduction=reduction, chunk_size=chunk).double()
        out, grads = _module_grads(loss, [], a, b, labels)
        results.append((out, grads))
    (od, gd), (ot, gt) = results
    _close(ot.loss, od.loss, torch.float64, "loss")
    for name in od.terms:
        _close(ot.terms[name], od.terms[name], torch.float64, name)
    for x, y in zip(gt, gd, strict=True):
        _close(x, y, torch.float64, "grad")


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"labels": True}])
def test_clip_loss_tiled_equals_dense(learnable, options):
    a, b = _views(13, 6, seed=1)
    labels = (
        torch.tensor([0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 0]) if options.get("labels") else None
    )
    eps = options.get("label_smoothing", 0.0)
    results = []
    for chunk in (None, 5):
        torch.manual_seed(0)
        loss = CLIPLoss(learnable_temperature=learnable, label_smoothing=eps, chunk_size=chunk)
        loss = loss.double()
        params = [p for p in loss.parameters()]
        out, grads = _module_grads(loss, params, a, b, labels)
        results.append((out, grads))
    (od, gd), (ot, gt) = results
    _close(ot.loss, od.loss, torch.float64, "loss")
    assert len(gt) == (3 if learnable else 2)  # the temperature's gradient is compared too
    for x, y in zip(gt, gd, strict=True):
        _close(x, y, torch.float64, "grad")
    for name in od.terms:
        _close(ot.terms[name], od.terms[name], torch.float64, name)


def test_clip_external_logit_scale_gradient_float32():
    a, b = _views(21, 8, dtype=torch.float32, seed=2)
    grads = []
    for chunk in (None, 4):
        scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        loss = CLIPLoss(chunk_size=chunk)(a, b, logit_scale=scale)
        grads.append(torch.autograd.grad(loss, (a, b, scale)))
    for x, y in zip(*grads, strict=True):
        _close(x, y, torch.float32, "grad")


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("mode", ["in_batch", "labels", "shared_negatives"])
def test_info_nce_loss_tiled_equals_dense(learnable, mode):
    q, p = _views(9, 5, seed=3)
    gen = torch.Generator().manual_seed(9)
    kwargs: dict = {}
    if mode == "labels":
        kwargs["labels"] = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 5])
    if mode == "shared_negatives":
        kwargs["negative_keys"] = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    results = []
    for chunk in (None, 4):
        loss = InfoNCELoss(
            temperature=0.2, learnable_temperature=learnable, reduction="none", chunk_size=chunk
        ).double()
        out = loss.compute(q, p, **kwargs)
        weights = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)  # non-uniform upstream
        tensors = [q, p, *loss.parameters()]
        grads = torch.autograd.grad((out.loss * weights).sum(), tensors)
        results.append((out.loss, grads))
    (ld, gd), (lt, gt) = results
    _close(lt, ld, torch.float64, "loss")
    for x, y in zip(gt, gd, strict=True):
        _close(x, y, torch.float64, "grad")


def test_simclr_bfloat16_inputs_tiled_equals_dense():
    a, b = _views(10, 8, dtype=torch.bfloat16, seed=4)
    vals = []
    for chunk in (None, 3):
        loss = SimCLRLoss(chunk_size=chunk)(a, b)
        assert loss.dtype == torch.float32
        vals.append((loss, *torch.autograd.grad(loss, (a, b))))
    _close(vals[1][0], vals[0][0], torch.float32, "loss")
    for x, y in zip(vals[1][1:], vals[0][1:], strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tiled_matches_cpu_dense(dtype):
    a, b = _views(300, 32, dtype=torch.float32, seed=5)
    ref = CLIPLoss(chunk_size=None).double()
    loss_ref = ref(a.double(), b.double())
    g_ref = torch.autograd.grad(loss_ref, (a, b))
    ac = a.detach().cuda().to(dtype).requires_grad_()
    bc = b.detach().cuda().to(dtype).requires_grad_()
    loss = CLIPLoss(chunk_size=64).cuda()(ac, bc)
    g = torch.autograd.grad(loss, (ac, bc))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(loss.item() - loss_ref.item()) <= tol * max(1.0, abs(loss_ref.item()))
    for x, y in zip(g, g_ref, strict=True):
        assert torch.allclose(x.double().cpu(), y.double(), atol=tol, rtol=tol)
    s_ref = SimCLRLoss(chunk_size=None).double()(a.double(), b.double())
    s = SimCLRLoss(chunk_size=64).cuda()(ac, bc)
    assert abs(s.item() - s_ref.item()) <= tol * max(1.0, abs(s_ref.item()))
