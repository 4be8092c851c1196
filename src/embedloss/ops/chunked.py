"""Exact tiled InfoNCE: O(chunk·M) memory, never an N×M buffer, same values and gradients.

The dense core (:mod:`embedloss.ops.info_nce`) materialises the ``(N, M)`` logits and lets
autograd keep several such buffers alive. Here the queries are cut into row tiles of ``chunk``
rows; each tile's logits ``ℓ_t = s·q_t·Kᵀ`` (``(chunk, M)``, full key width) live in one reused
buffer, so every row's log-sum-exp is exact and the masks of a tile come from
:func:`~embedloss.ops.info_nce.pair_masks` (indices only). Two custom autograd functions:

* :class:`_RowSoftmax` (``info_nce``): one pass over the tiles computes the losses *and*, when a
  gradient is needed, the gradients ``G = ∂L/∂ℓ = P − T`` (softmax minus target) of every tile,
  pushed straight through the two GEMMs ``dq_t = s·G·K`` and ``dK += s·Gᵀ·q_t`` (plus
  ``ds = Σ_i q_i·(G·K)_i`` for a learnable scale). That is three GEMM units in total, the floor
  of any implementation. The gradients are computed for an upstream gradient of 1 per anchor;
  the backward checks (O(N)) whether the actual upstream gradient is the same for every valid
  anchor (true for ``mean`` and ``sum`` reductions) and rescales them, and otherwise recomputes
  the tiles with the per-anchor gradients (e.g. ``reduction="none"`` with arbitrary weights).
* :class:`_SymmetricSoftmax` (``symmetric_info_nce``, CLIP): one forward pass over row tiles
  gives the row log-sum-exps and, online, the column log-sum-exps; the backward recomputes each
  tile once and combines both directions into one ``G`` (four GEMM units).

Single-positive layouts (the diagonal, ``positive_index``, ``self_index``) never build masks:
positives and exclusions are written with ``scatter`` and the target terms of ``G`` are applied
to the GEMM results (``K[p_i]``, column sums) instead of the ``(chunk, M)`` tile. Each tile needs
one ``exp`` pass per direction pair; where one ``exp`` serves two shifts (the column sums of the
symmetric loss), a range check guarantees the result is exact and otherwise falls back.

Exactness: the same expression as the dense path, in a different summation order — equal to
~1e-15 (float64) / ~1e-6 (float32). Half-precision inputs are computed in float32. The tiled
functions give first-order gradients (``create_graph=True`` raises; use the dense path); negative log-weights are constants
(a weight tensor that requires grad makes :func:`~embedloss.ops.info_nce.info_nce` use the dense
path). A callable weight function is called once per tile in the forward and again in a
recomputing backward; it must be deterministic, compute each entry from its tile row (full key
width) and must not modify the logits it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from embedloss.ops.info_nce import AnchorLosses, PairSpec, pair_masks

__all__ = [
    "DENSE_LIMIT_BYTES",
    "TILE_BYTES",
    "chunked_info_nce",
    "chunked_symmetric_info_nce",
    "resolve_chunk_size",
]

#: ``chunk_size="auto"`` stays dense while the dense path's working set — about
#: ``DENSE_BUFFERS`` buffers of N×M elements — is below this (256 MiB).
DENSE_LIMIT_BYTES = 256 * 2**20
DENSE_BUFFERS = 6
#: Target size of one tile buffer for ``"auto"`` (16 MiB: cache-friendly on CPUs, large enough
#: GEMMs on GPUs); the row count is clamped to [``MIN_TILE_ROWS``, ``MAX_TILE_ROWS``].
TILE_BYTES = 16 * 2**20
MIN_TILE_ROWS = 128
MAX_TILE_ROWS = 4096

WeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Weights = Tensor | WeightFn | None


def _exp_range(dtype: torch.dtype) -> float:
    # How far below a reference a term may lie and still be computed in ``dtype`` to full
    # relative precision after one shared exp (float32 underflows near e^-87, float64 e^-708).
    return 600.0 if dtype == torch.float64 else 40.0


def _shared_shift(hi: float, lo: float, dtype: torch.dtype) -> float | None:
    """A scalar ``μ`` for ``G = exp(z − μ)·(α_i + β_j)`` with ``α, β = g·e^{μ − lse}``, or None.

    ``hi`` bounds the logits from above (the largest row log-sum-exp of the tile) and ``lo`` is
    the smallest log-sum-exp involved. ``exp(z − μ)`` must not overflow (``hi − μ <= top``) and
    ``α, β <= e^{bottom}`` so that every entry of ``G`` above ~e^-30 is computed from normal
    numbers (``μ − lo <= bottom``). ``μ = 0`` (no shift pass at all) is preferred.
    """
    top, bottom = (600.0, 600.0) if dtype == torch.float64 else (60.0, 50.0)
    low, high = hi - top, lo + bottom
    if low > high:
        return None
    return min(max(0.0, low), high)


def resolve_chunk_size(
    chunk_size: int | str | None, n: int, m: int, dtype: torch.dtype = torch.float32
) -> int | None:
    """The tile height for ``chunk_size`` (``None``: use the dense path).

    ``"auto"`` is dense while ``n·m·itemsize·DENSE_BUFFERS <= DENSE_LIMIT_BYTES`` and otherwise
    tiles of ``TILE_BYTES / (m·itemsize)`` rows, clamped and rounded down to a multiple of 64.

    Example:
        >>> resolve_chunk_size("auto", 512, 512) is None
        True
        >>> resolve_chunk_size("auto", 8192, 8192)
        512
        >>> resolve_chunk_size(100, 8192, 8192)
        100
    """
    if chunk_size is None:
        return None
    if chunk_size != "auto":
        return int(chunk_size)
    itemsize = 8 if dtype == torch.float64 else 4
    if n * m * itemsize * DENSE_BUFFERS <= DENSE_LIMIT_BYTES:
        return None
    rows = max(MIN_TILE_ROWS, min(MAX_TILE_ROWS, TILE_BYTES // (m * itemsize)))
    if rows >= 64:
        rows = rows // 64 * 64  # GEMM-friendly
    return max(1, min(rows, n))


def _tile_weights(
    weights: Weights, logits: Tensor, rows: Tensor, cols: Tensor, r0: int, r1: int
) -> Tensor | None:
    """The ``(rows, cols)`` tile of the negative log-weights, never aliasing ``logits``."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        w = weights[r0:r1]
        if cols.numel() != weights.shape[1]:
            w = w[:, cols]
        return w.to(logits.dtype)
    w = weights(logits, rows, cols)
    if not isinstance(w, Tensor) or w.shape != logits.shape:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(
            f"negative_log_weights function must return a tensor of shape "
            f"{tuple(logits.shape)} (tile rows, keys), got {got}"
        )
    if w.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        w = w.clone()  # the tile buffer is modified in place below
    return w.to(logits.dtype)


def _top1(
    s: Tensor,
    valid: Tensor,
    pos_max: Tensor,
    neg_max: Tensor,
    positive: Tensor,
    union: Tensor | None = None,
) -> Tensor:
    """``correct`` of a tile: the first maximum of ``A(i) ∪ P(i)`` is a positive.

    The best positive and the best other key decide every row but exact ties; tied rows (rare)
    take the first maximum of the row, as the dense path's ``argmax`` does. ``s`` holds the
    raw logits, with keys outside ``A(i) ∪ P(i)`` at ``-inf`` unless ``union`` masks them;
    ``positive`` is each row's positive column ``(c,)`` or the positive mask ``(c, M)``.
    """
    correct = valid & (pos_max > neg_max)
    tie = valid & (pos_max == neg_max)
    if bool(tie.any()):
        idx = tie.nonzero().squeeze(1)
        scored = s[idx]
        if union is not None:
            scored.masked_fill_(~union[idx], float("-inf"))
        top = scored.argmax(1)
        if positive.dtype == torch.bool:
            correct[idx] = positive[idx].gather(1, top.unsqueeze(1)).squeeze(1)
        else:
            correct[idx] = top == positive[idx]
    return correct


def _put(s: Tensor, index: Tensor, where: Tensor, value: Tensor | float) -> None:
    """``s[i, index[i]] = value[i]`` for the rows where ``where`` holds; others unchanged."""
    idx = index.unsqueeze(1)
    current = s.gather(1, idx).squeeze(1)
    s.scatter_(1, idx, torch.where(where, value, current).unsqueeze(1))


# ----------------------------------------------------------------------------------------------
# Row softmax (info_nce)
# ----------------------------------------------------------------------------------------------


@dataclass
class _RowPlan:
    """Everything the row-softmax tiles need besides the tensors autograd tracks."""

    spec: PairSpec
    sparse: bool  # single positive per row: no (chunk, M) masks
    weights: Weights
    eps: float
    chunk: int
    eager: bool  # compute the gradients during the forward


@dataclass
class _SparseRows:
    """Per-row positive and excluded columns of a single-positive tile."""

    pos: Tensor  # (c,) positive column (clamped into range)
    pos_ok: Tensor  # (c,) the row has its positive
    self_col: Tensor | None  # (c,) the excluded own column (clamped)
    self_ok: Tensor | None
    n_den: Tensor  # (c,) size of the denominator
    valid: Tensor

    @staticmethod
    def build(spec: PairSpec, rows: Tensor, m: int) -> _SparseRows:
        pos = rows if spec.positive_index is None else spec.positive_index[rows].long()
        pos_ok = (pos >= 0) & (pos < m)
        pos = pos.clamp(0, m - 1)
        n_excl = torch.zeros_like(pos)
        self_col = self_ok = None
        if spec.self_index is not None:
            raw = spec.self_index[rows].long()
            self_ok = (raw >= 0) & (raw < m)
            self_col = raw.clamp(0, m - 1)
            pos_ok = pos_ok & ~(self_ok & (self_col == pos))
            n_excl = n_excl + self_ok.long()
        if not spec.positive_in_denominator:
            n_excl = n_excl + pos_ok.long()
        n_den = m - n_excl
        return _SparseRows(pos, pos_ok, self_col, self_ok, n_den, pos_ok & (n_den > 0))


class _TileGrads:
    """Accumulators of the gradients w.r.t. query, keys and scale over the row tiles."""

    def __init__(self, query: Tensor, keys: Tensor, want: tuple[bool, bool, bool]) -> None:
        self.want_q, self.want_k, self.want_s = want
        self.dq = torch.empty_like(query) if self.want_q else None  # each tile writes its rows
        self.dk = torch.empty_like(keys) if self.want_k else None  # see add_dk
        self._dk_started = False
        self.ds = query.new_zeros(())
        # Σ_i e_i·s·q_i of the uniform label-smoothing target: subtracted from every key's
        # gradient once at the end instead of once per tile.
        self.dk_all = query.new_zeros(query.shape[1])

    def add_dk(self, g_t: Tensor, qs: Tensor) -> None:
        """``dK += g_tᵀ·qs``; the first tile writes instead of adding (no zero fill)."""
        if self.dk is None:
            return
        if self._dk_started:
            self.dk.addmm_(g_t, qs)
        else:
            torch.mm(g_t, qs, out=self.dk)
            self._dk_started = True

    def finish(self) -> None:
        if self.dk is not None:
            if not self._dk_started:
                self.dk.zero_()
            self.dk.sub_(self.dk_all)


def _sparse_logits(
    s: Tensor, sp: _SparseRows, plan: _RowPlan, w: Tensor | None, neg_inf: float
) -> tuple[Tensor, Tensor | None]:
    """Turn the raw tile ``ℓ`` into the masked, weighted ``z`` in place.

    Returns the raw positive logits and the raw logits of the excluded own column.
    """
    pos_l = s.gather(1, sp.pos.unsqueeze(1)).squeeze(1)  # (c,)
    self_l = None
    if sp.self_col is not None and sp.self_ok is not None:
        self_l = s.gather(1, sp.self_col.unsqueeze(1)).squeeze(1)
        _put(s, sp.self_col, sp.self_ok, neg_inf)
    if w is not None:
        s.add_(w)  # the positive's weight is undone below
        if plan.spec.positive_in_denominator:
            _put(s, sp.pos, sp.pos_ok, pos_l)
    if not plan.spec.positive_in_denominator:
        _put(s, sp.pos, sp.pos_ok, neg_inf)
    return pos_l, self_l


def _apply_sparse_grads(
    e: Tensor,
    a: Tensor,
    h: Tensor,
    sp: _SparseRows,
    plan: _RowPlan,
    q_t: Tensor,
    qs_t: Tensor,
    keys: Tensor,
    key_sum: Tensor | None,
    scale: Tensor,
    grads: _TileGrads,
    r0: int,
    r1: int,
) -> None:
    """Push ``G = a·E − T`` through the GEMMs without forming ``T`` in the tile.

    ``T_ia = h_i·((1−ε)·[a = p_i] + ε/|A_i|·[a ∈ A_i])``; its products with the keys and the
    queries are gathers and index-adds of single rows.
    """
    eps = plan.eps
    hp = h * (1.0 - eps)  # (c,) weight of the positive target
    e_i = h * eps / sp.n_den.clamp(min=1).to(h.dtype) if eps > 0 else None
    need_u = grads.want_q or grads.want_s
    if need_u:
        u = torch.mm(e, keys)  # (c, D)
        u.mul_(a.unsqueeze(1))
        u.sub_(hp.unsqueeze(1) * keys.index_select(0, sp.pos))
        if e_i is not None and key_sum is not None:
            excluded = torch.zeros_like(u)
            if sp.self_col is not None and sp.self_ok is not None:
                excluded += sp.self_ok.unsqueeze(1) * keys.index_select(0, sp.self_col)
            if not plan.spec.positive_in_denominator:
                excluded += sp.pos_ok.unsqueeze(1) * keys.index_select(0, sp.pos)
            u.sub_(e_i.unsqueeze(1) * (key_sum.unsqueeze(0) - excluded))
        if grads.dq is not None:
            torch.mul(u, scale, out=grads.dq[r0:r1])
        if grads.want_s:
            grads.ds += (q_t * u).sum()
    if grads.dk is not None:
        grads.add_dk(e.T, qs_t * a.unsqueeze(1))
        grads.dk.index_add_(0, sp.pos, qs_t * (-hp).unsqueeze(1))
        if e_i is not None:
            eq = qs_t * e_i.unsqueeze(1)
            grads.dk_all += eq.sum(0)
            if sp.self_col is not None and sp.self_ok is not None:
                grads.dk.index_add_(0, sp.self_col, eq * sp.self_ok.unsqueeze(1))
            if not plan.spec.positive_in_denominator:
                grads.dk.index_add_(0, sp.pos, eq * sp.pos_ok.unsqueeze(1))


def _dense_grads(
    g: Tensor,
    q_t: Tensor,
    qs_t: Tensor,
    keys: Tensor,
    scale: Tensor,
    grads: _TileGrads,
    r0: int,
    r1: int,
) -> None:
    """Push an explicit tile gradient ``g = ∂L/∂ℓ_t`` through the GEMMs."""
    if grads.want_q or grads.want_s:
        u = torch.mm(g, keys)  # (c, D)
        if grads.dq is not None:
            torch.mul(u, scale, out=grads.dq[r0:r1])
        if grads.want_s:
            grads.ds += (q_t * u).sum()
    grads.add_dk(g.T, qs_t)


def _masked_target(
    s: Tensor,
    pos: Tensor,
    den: Tensor,
    h: Tensor,
    n_pos: Tensor,
    n_den: Tensor,
    eps: float,
) -> None:
    """``s −= T`` for explicit masks (multi-positive layouts)."""
    zero = s.new_zeros(())
    s.sub_(torch.where(pos, (h * (1.0 - eps) / n_pos.clamp(min=1)).unsqueeze(1), zero))
    if eps > 0:
        s.sub_(torch.where(den, (h * eps / n_den.clamp(min=1)).unsqueeze(1), zero))


def _row_forward(
    query: Tensor,
    keys: Tensor,
    scale: Tensor,
    plan: _RowPlan,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, _TileGrads | None]:
    """Losses, validity, correctness and log-sum-exps of all rows (+ eager gradients)."""
    n, m = query.shape[0], keys.shape[0]
    dtype, device = query.dtype, query.device
    neg_inf = float("-inf")
    eps = plan.eps
    loss = query.new_zeros(n)
    lse = query.new_zeros(n)
    valid = torch.zeros(n, dtype=torch.bool, device=device)
    correct = torch.zeros(n, dtype=torch.bool, device=device)
    cols = torch.arange(m, device=device)
    ones_m = query.new_ones(m)
    grads = _TileGrads(query, keys, want) if plan.eager else None
    key_sum = keys.sum(0) if plan.eager and eps > 0 and plan.sparse else None
    buf = query.new_empty(min(plan.chunk, n), m)
    for r0 in range(0, n, plan.chunk):
        r1 = min(r0 + plan.chunk, n)
        rows = torch.arange(r0, r1, device=device)
        q_t = query[r0:r1]
        qs_t = q_t * scale
        s = torch.mm(qs_t, keys.T, out=buf[: r1 - r0])  # (c, M) logits ℓ
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        if plan.sparse:
            sp = _SparseRows.build(plan.spec, rows, m)
            v = sp.valid
            if eps > 0:
                total = torch.mv(s, ones_m)
            pos_l = s.gather(1, sp.pos.unsqueeze(1)).squeeze(1)
            # the best non-positive of A(i) ∪ P(i), for `correct` and as the shift
            if sp.self_col is not None and sp.self_ok is not None:
                self_l = s.gather(1, sp.self_col.unsqueeze(1)).squeeze(1)
                _put(s, sp.self_col, sp.self_ok, neg_inf)
            _put(s, sp.pos, sp.pos_ok, neg_inf)
            neg_max = s.amax(1)
            _put(s, sp.pos, sp.pos_ok, pos_l)
            correct[r0:r1] = _top1(s, v, pos_l, neg_max, sp.pos)
            if w is not None:
                s.add_(w)
                _put(s, sp.pos, sp.pos_ok, pos_l)  # positives are not reweighted
            if plan.spec.positive_in_denominator:
                shift = torch.maximum(neg_max, torch.where(sp.pos_ok, pos_l, neg_inf))
            else:
                _put(s, sp.pos, sp.pos_ok, neg_inf)
                shift = neg_max
            if w is not None:
                shift = s.amax(1)
            pos_term = pos_l
            if eps > 0:
                den_sum = total
                if sp.self_col is not None and sp.self_ok is not None:
                    den_sum = den_sum - torch.where(sp.self_ok, self_l, 0.0)
                if not plan.spec.positive_in_denominator:
                    den_sum = den_sum - torch.where(sp.pos_ok, pos_l, 0.0)
                den_mean = den_sum / sp.n_den.clamp(min=1).to(dtype)
        else:
            pos, den = pair_masks(plan.spec, rows, cols)
            n_pos, n_den = pos.sum(1), den.sum(1)
            v = (n_pos > 0) & (n_den > 0)
            pos_term = torch.where(pos, s, 0.0).sum(1) / n_pos.clamp(min=1).to(dtype)
            if eps > 0:
                den_mean = torch.where(den, s, 0.0).sum(1) / n_den.clamp(min=1).to(dtype)
            pos_max = s.masked_fill(~pos, neg_inf).amax(1)
            neg_max = s.masked_fill(pos | ~den, neg_inf).amax(1)
            correct[r0:r1] = _top1(s, v, pos_max, neg_max, pos, den | pos)
            if w is not None:
                s.add_(w.masked_fill(pos, 0.0))
            s.masked_fill_(~den, neg_inf)
            shift = s.amax(1)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        s.sub_(shift.unsqueeze(1)).exp_()  # exp(z − shift)
        sum_exp = torch.mv(s, ones_m)
        row_lse = shift + sum_exp.log()
        row_loss = row_lse - (1.0 - eps) * pos_term
        if eps > 0:
            row_loss = row_loss - eps * den_mean
        loss[r0:r1] = torch.where(v, row_loss, 0.0)
        lse[r0:r1] = row_lse
        valid[r0:r1] = v
        if grads is not None:
            h = v.to(dtype)
            a = torch.where(v, 1.0 / sum_exp, 0.0)
            if plan.sparse:
                _apply_sparse_grads(
                    s, a, h, sp, plan, q_t, qs_t, keys, key_sum, scale, grads, r0, r1
                )
            else:
                s.mul_(a.unsqueeze(1))
                _masked_target(s, pos, den, h, n_pos, n_den, eps)
                _dense_grads(s, q_t, qs_t, keys, scale, grads, r0, r1)
    if grads is not None:
        grads.finish()
    return loss, valid, correct, lse, grads


def _row_backward(
    query: Tensor,
    keys: Tensor,
    scale: Tensor,
    plan: _RowPlan,
    lse: Tensor,
    valid: Tensor,
    grad_loss: Tensor,
    want: tuple[bool, bool, bool],
) -> _TileGrads:
    """Recompute the tiles with a per-anchor upstream gradient ``grad_loss``."""
    n, m = query.shape[0], keys.shape[0]
    device = query.device
    neg_inf = float("-inf")
    cols = torch.arange(m, device=device)
    grads = _TileGrads(query, keys, want)
    key_sum = keys.sum(0) if plan.eps > 0 and plan.sparse else None
    shift_all = torch.where(torch.isfinite(lse), lse, 0.0)
    h_all = torch.where(valid, grad_loss.to(query.dtype), 0.0)
    buf = query.new_empty(min(plan.chunk, n), m)
    for r0 in range(0, n, plan.chunk):
        r1 = min(r0 + plan.chunk, n)
        rows = torch.arange(r0, r1, device=device)
        q_t = query[r0:r1]
        qs_t = q_t * scale
        s = torch.mm(qs_t, keys.T, out=buf[: r1 - r0])
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        h = h_all[r0:r1]
        if plan.sparse:
            sp = _SparseRows.build(plan.spec, rows, m)
            _sparse_logits(s, sp, plan, w, neg_inf)
        else:
            pos, den = pair_masks(plan.spec, rows, cols)
            if w is not None:
                s.add_(w.masked_fill(pos, 0.0))
            s.masked_fill_(~den, neg_inf)
        s.sub_(shift_all[r0:r1].unsqueeze(1)).exp_()  # the softmax P itself
        if plan.sparse:
            _apply_sparse_grads(s, h, h, sp, plan, q_t, qs_t, keys, key_sum, scale, grads, r0, r1)
        else:
            s.mul_(h.unsqueeze(1))
            _masked_target(s, pos, den, h, pos.sum(1), den.sum(1), plan.eps)
            _dense_grads(s, q_t, qs_t, keys, scale, grads, r0, r1)
    grads.finish()
    return grads


def _first_order_only() -> None:
    # The backward runs with grad mode on only under ``create_graph=True``; its tiles are not
    # differentiable, so a second-order graph would silently be a constant.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the chunked InfoNCE path computes first-order gradients only (create_graph=True "
            "asks for more); use chunk_size=None for higher-order gradients"
        )


def _uniform_value(grad: Tensor, valid: Tensor) -> Tensor | None:
    """The common upstream gradient of the valid anchors, or None if it differs between them."""
    g = grad[valid]
    if g.numel() == 0:
        return grad.new_zeros(())
    first = g[0]
    return first if bool((g == first).all()) else None


class _RowSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, query: Tensor, keys: Tensor, scale: Tensor, plan: _RowPlan
    ) -> tuple[Tensor, Tensor, Tensor]:
        want = (query.requires_grad, keys.requires_grad, scale.requires_grad)
        loss, valid, correct, lse, grads = _row_forward(query, keys, scale, plan, want)
        ctx.mark_non_differentiable(valid, correct)
        ctx.save_for_backward(query, keys, scale, lse, valid)
        ctx.plan, ctx.grads = plan, grads
        return loss, valid, correct

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _gv: Tensor | None, _gc: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        _first_order_only()
        query, keys, scale, lse, valid = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        grads: _TileGrads | None = ctx.grads
        factor = _uniform_value(grad_loss, valid) if grads is not None else None
        if grads is None or factor is None:
            grads = _row_backward(query, keys, scale, ctx.plan, lse, valid, grad_loss, want)
            factor = None
        ctx.grads = None
        out = _scaled(grads, factor)
        return (
            out[0] if want[0] else None,
            out[1] if want[1] else None,
            out[2].to(scale.dtype) if want[2] else None,
            None,
        )


def _scaled(
    grads: _TileGrads, factor: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    if factor is None:
        return grads.dq, grads.dk, grads.ds
    f = factor.to(grads.ds.dtype)
    dq = None if grads.dq is None else grads.dq.mul_(f)
    dk = None if grads.dk is None else grads.dk.mul_(f)
    return dq, dk, grads.ds * f


def _as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(scale, Tensor):
        return scale.reshape(()).to(like.dtype)
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def chunked_info_nce(
    query: Tensor,
    keys: Tensor,
    scale: Tensor | float,
    spec: PairSpec,
    *,
    negative_log_weights: Weights = None,
    label_smoothing: float = 0.0,
    chunk_size: int,
) -> AnchorLosses:
    """Tiled :func:`~embedloss.ops.info_nce.info_nce` (arguments checked by the caller).

    Row tiles of ``chunk_size`` queries against all keys; exact log-sum-exp per row. When a
    gradient is needed it is computed during the forward (three GEMM units in all).
    """
    dtype = _compute_dtype(query, keys)
    q, k = query.to(dtype), keys.to(dtype)
    s = _as_scale(scale, q)
    if isinstance(negative_log_weights, Tensor):
        n, m = q.shape[0], k.shape[0]
        if negative_log_weights.shape != (n, m):
            raise ValueError(
                f"negative_log_weights must have shape {(n, m)} (queries, keys), "
                f"got {tuple(negative_log_weights.shape)}"
            )
        negative_log_weights = negative_log_weights.detach()
    sparse = spec.query_labels is None or spec.key_labels is None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or s.requires_grad)
    plan = _RowPlan(
        spec=spec,
        sparse=sparse,
        weights=negative_log_weights,
        eps=float(label_smoothing),
        chunk=max(1, int(chunk_size)),
        eager=needs_grad,
    )
    loss, valid, correct = _RowSoftmax.apply(q, k, s, plan)
    return AnchorLosses(loss, valid, correct)


# ----------------------------------------------------------------------------------------------
# Symmetric softmax (CLIP)
# ----------------------------------------------------------------------------------------------


@dataclass
class _SymPlan:
    labels: Tensor | None
    n_pos: Tensor  # (N,) positives per anchor (the same in both directions)
    weights: Weights
    eps: float
    chunk: int


def _sym_positive(plan: _SymPlan, rows: Tensor, cols: Tensor) -> Tensor:
    if plan.labels is None:
        return rows.unsqueeze(1) == cols.unsqueeze(0)
    return plan.labels[rows].unsqueeze(1) == plan.labels[cols].unsqueeze(0)


def _sym_forward(
    x: Tensor, y: Tensor, scale: Tensor, plan: _SymPlan
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row and column losses, correctness and log-sum-exps in one pass over row tiles."""
    n = x.shape[0]
    dtype, device = x.dtype, x.device
    neg_inf = float("-inf")
    eps, chunk = plan.eps, plan.chunk
    limit = _exp_range(dtype)
    tiny = torch.tensor(-limit, dtype=dtype).exp().item()
    cols = torch.arange(n, device=device)
    ones_n = x.new_ones(n)
    lse_r = x.new_empty(n)
    lse_c = x.new_full((n,), neg_inf)
    pos_r = x.new_empty(n)  # Σ_{P} ℓ of each row
    pos_c = x.new_zeros(n)
    tot_r = x.new_zeros(n)
    tot_c = x.new_zeros(n)
    correct_r = torch.zeros(n, dtype=torch.bool, device=device)
    pos_max_c = x.new_full((n,), neg_inf)
    neg_max_c = x.new_full((n,), neg_inf)
    buf = x.new_empty(min(chunk, n), n)
    all_rows = torch.ones(min(chunk, n), dtype=torch.bool, device=device)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        c = r1 - r0
        rows = torch.arange(r0, r1, device=device)
        xs_t = x[r0:r1] * scale
        s = torch.mm(xs_t, y.T, out=buf[:c])  # (c, N) logits ℓ
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        if eps > 0:
            tot_r[r0:r1] = torch.mv(s, ones_n)
            tot_c += torch.mv(s.T, x.new_ones(c))
        if plan.labels is None:
            diag = rows.unsqueeze(1)
            d = s.gather(1, diag).squeeze(1)  # ℓ_ii
            pos_r[r0:r1] = d
            pos_c[r0:r1] = d
            s.scatter_(1, diag, neg_inf)
            neg_r = s.amax(1)
            torch.maximum(neg_max_c, s.amax(0), out=neg_max_c)
            pos_max_c[r0:r1] = d
            s.scatter_(1, diag, d.unsqueeze(1))
            correct_r[r0:r1] = _top1(s, all_rows[:c], d, neg_r, rows)
            if w is not None:
                s.add_(w)
                s.scatter_(1, diag, d.unsqueeze(1))
            shift = s.amax(1) if w is not None else torch.maximum(neg_r, d)
        else:
            pos = _sym_positive(plan, rows, cols)
            ps = torch.where(pos, s, 0.0)
            pos_r[r0:r1] = torch.mv(ps, ones_n)
            pos_c += torch.mv(ps.T, x.new_ones(c))
            del ps
            masked = s.masked_fill(~pos, neg_inf)
            pmax_r = masked.amax(1)
            torch.maximum(pos_max_c, masked.amax(0), out=pos_max_c)
            masked.copy_(s).masked_fill_(pos, neg_inf)
            nmax_r = masked.amax(1)
            torch.maximum(neg_max_c, masked.amax(0), out=neg_max_c)
            del masked
            correct_r[r0:r1] = _top1(s, all_rows[:c], pmax_r, nmax_r, pos)
            if w is not None:
                s.add_(w.masked_fill(pos, 0.0))
                shift = s.amax(1)
            else:
                shift = torch.maximum(pmax_r, nmax_r)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        s.sub_(shift.unsqueeze(1)).exp_()  # exp(z − shift_i)
        lse_r[r0:r1] = shift + torch.mv(s, ones_n).log()
        # Column sums from the same exp: Σ_i exp(z_ij − R) = Σ_i e^{shift_i − R}·E_ij.
        ref = shift.max()
        col = torch.mv(s.T, (shift - ref).exp())
        tile_lse = ref + col.log()
        bad = col < tiny
        if bool(bad.any()):
            # a column far below the tile's maximum: recompute its tile sum with its own shift
            bad_cols = bad.nonzero().squeeze(1)
            sb = torch.mm(xs_t, y[bad_cols].T)
            wb = _tile_weights(plan.weights, sb, rows, bad_cols, r0, r1)
            if wb is not None:
                sb.add_(wb.masked_fill(_sym_positive(plan, rows, bad_cols), 0.0))
            tile_lse[bad_cols] = sb.logsumexp(0)
        torch.logaddexp(lse_c, tile_lse, out=lse_c)
    correct_c = pos_max_c > neg_max_c
    tie = pos_max_c == neg_max_c
    if bool(tie.any()):
        correct_c[tie] = _column_top1(x, y, scale, plan, tie.nonzero().squeeze(1))
    n_pos = plan.n_pos.to(dtype)
    loss_r = lse_r - (1.0 - eps) * pos_r / n_pos
    loss_c = lse_c - (1.0 - eps) * pos_c / n_pos
    if eps > 0:
        loss_r = loss_r - eps * tot_r / n
        loss_c = loss_c - eps * tot_c / n
    return loss_r, loss_c, correct_r, correct_c, lse_r, lse_c


def _column_top1(x: Tensor, y: Tensor, scale: Tensor, plan: _SymPlan, cols: Tensor) -> Tensor:
    """``correct`` of tied columns: whether the first maximum over all rows is a positive.

    Scans the row tiles again for these columns only (rare: exact ties of a positive with a
    negative), keeping the first row that attains each column's maximum.
    """
    best = x.new_full((cols.numel(),), float("-inf"))
    arg = torch.zeros(cols.numel(), dtype=torch.long, device=x.device)
    y_c = y[cols]
    for r0 in range(0, x.shape[0], plan.chunk):
        v = torch.mm(x[r0 : r0 + plan.chunk] * scale, y_c.T)  # (c, k)
        top_v, top_i = v.amax(0), v.argmax(0)
        better = top_v > best  # strict: an earlier tile keeps a tie
        best = torch.where(better, top_v, best)
        arg = torch.where(better, top_i + r0, arg)
    if plan.labels is None:
        return arg == cols
    return plan.labels[arg] == plan.labels[cols]


def _sym_backward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    plan: _SymPlan,
    lse_r: Tensor,
    lse_c: Tensor,
    g_r: Tensor,
    g_c: Tensor,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """One recompute of every tile: ``G = g_r·(P_row − T_row) + g_c·(P_col − T_col)``."""
    n = x.shape[0]
    dtype, device = x.dtype, x.device
    eps, chunk = plan.eps, plan.chunk
    want_x, want_y, want_s = want
    dx = torch.empty_like(x) if want_x else None  # every row tile writes its rows
    dy = torch.empty_like(y) if want_y else None  # the first tile writes, the others add
    ds = x.new_zeros(())
    cols = torch.arange(n, device=device)
    g_r, g_c = g_r.to(dtype), g_c.to(dtype)
    n_pos = plan.n_pos.to(dtype)
    lse_c_min = float(lse_c.min())
    # The label-smoothing target ε/N·(g_r_i + g_c_j) on every entry, applied to the products.
    gc_y = g_c @ y if eps > 0 else None  # (D,)
    y_sum = y.sum(0) if eps > 0 else None
    acc_gx = x.new_zeros(x.shape[1])  # Σ_i g_r_i·s·x_i
    acc_x = x.new_zeros(x.shape[1])  # Σ_i s·x_i
    buf = x.new_empty(min(chunk, n), n)
    buf2 = x.new_empty(min(chunk, n), n)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        c = r1 - r0
        rows = torch.arange(r0, r1, device=device)
        x_t = x[r0:r1]
        xs_t = x_t * scale
        s = torch.mm(xs_t, y.T, out=buf[:c])
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        pos = None
        if plan.labels is not None:
            pos = _sym_positive(plan, rows, cols)
        if w is not None:
            if pos is None:
                diag = rows.unsqueeze(1)
                d = s.gather(1, diag)
                s.add_(w)
                s.scatter_(1, diag, d)
            else:
                s.add_(w.masked_fill(pos, 0.0))
        gr = g_r[r0:r1]
        lr = lse_r[r0:r1]
        lr_min, lr_max = torch.aminmax(lr)
        mu = _shared_shift(float(lr_max), min(float(lr_min), lse_c_min), dtype)
        coef = buf2[:c]
        if mu is not None:
            # g_r·P_row + g_c·P_col = exp(z − μ)·(g_r_i·e^{μ − lse_r_i} + g_c_j·e^{μ − lse_c_j}):
            # one exp serves both directions.
            if mu != 0.0:
                s.sub_(mu)
            s.exp_()
            alpha = gr * (mu - lr).exp()
            beta = g_c * (mu - lse_c).exp()
            torch.add(alpha.unsqueeze(1), beta.unsqueeze(0), out=coef)
            s.mul_(coef)
        else:
            torch.sub(s, lse_c.unsqueeze(0), out=coef).exp_().mul_(g_c.unsqueeze(0))
            s.sub_(lr.unsqueeze(1)).exp_().mul_(gr.unsqueeze(1)).add_(coef)
        hr = gr * (1.0 - eps)
        if pos is not None:
            t = (hr / n_pos[r0:r1]).unsqueeze(1) + ((1.0 - eps) * g_c / n_pos).unsqueeze(0)
            s.sub_(torch.where(pos, t, 0.0))
            del t
        hd = hr + (1.0 - eps) * g_c[r0:r1]  # diagonal target (no labels)
        if want_x or want_s:
            u_t = torch.mm(s, y)  # (c, D)
            if pos is None:
                u_t.sub_(hd.unsqueeze(1) * y[r0:r1])
            if gc_y is not None and y_sum is not None:
                u_t.sub_((eps / n) * (gr.unsqueeze(1) * y_sum.unsqueeze(0) + gc_y.unsqueeze(0)))
            if dx is not None:
                torch.mul(u_t, scale, out=dx[r0:r1])
            if want_s:
                ds += (x_t * u_t).sum()
        if dy is not None:
            if r0 == 0:
                torch.mm(s.T, xs_t, out=dy)
            else:
                dy.addmm_(s.T, xs_t)
            if pos is None:
                dy[r0:r1].sub_(hd.unsqueeze(1) * xs_t)
            if eps > 0:
                acc_gx += (gr.unsqueeze(1) * xs_t).sum(0)
                acc_x += xs_t.sum(0)
    if dy is not None and eps > 0:
        dy.sub_((eps / n) * (acc_gx.unsqueeze(0) + g_c.unsqueeze(1) * acc_x.unsqueeze(0)))
    return dx, dy, ds


class _SymmetricSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, plan: _SymPlan
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loss_r, loss_c, correct_r, correct_c, lse_r, lse_c = _sym_forward(x, y, scale, plan)
        ctx.mark_non_differentiable(correct_r, correct_c)
        ctx.save_for_backward(x, y, scale, lse_r, lse_c)
        ctx.plan = plan
        return loss_r, loss_c, correct_r, correct_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_r: Tensor, g_c: Tensor, _a: Tensor | None, _b: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        _first_order_only()
        x, y, scale, lse_r, lse_c = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        dx, dy, ds = _sym_backward(x, y, scale, ctx.plan, lse_r, lse_c, g_r, g_c, want)
        return dx, dy, ds.to(scale.dtype) if want[2] else None, None


def chunked_symmetric_info_nce(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    negative_log_weights: Weights = None,
    label_smoothing: float = 0.0,
    chunk_size: int,
) -> tuple[AnchorLosses, AnchorLosses]:
    """Tiled :func:`~embedloss.ops.info_nce.symmetric_info_nce` (arguments checked by the caller).

    One forward pass over row tiles (row and online column log-sum-exps), one recompute in the
    backward: four GEMM units.
    """
    dtype = _compute_dtype(x, y)
    xc, yc = x.to(dtype), y.to(dtype)
    s = _as_scale(scale, xc)
    n = xc.shape[0]
    if isinstance(negative_log_weights, Tensor):
        if negative_log_weights.shape != (n, n):
            raise ValueError(
                f"negative_log_weights must have shape {(n, n)} (x, y), "
                f"got {tuple(negative_log_weights.shape)}"
            )
        negative_log_weights = negative_log_weights.detach()
    if labels is None:
        n_pos = torch.ones(n, dtype=torch.long, device=xc.device)
    else:
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        n_pos = counts[inverse]
    plan = _SymPlan(
        labels=labels,
        n_pos=n_pos,
        weights=negative_log_weights,
        eps=float(label_smoothing),
        chunk=max(1, int(chunk_size)),
    )
    loss_r, loss_c, correct_r, correct_c = _SymmetricSoftmax.apply(xc, yc, s, plan)
    valid = torch.ones(n, dtype=torch.bool, device=xc.device)
    return AnchorLosses(loss_r, valid, correct_r), AnchorLosses(loss_c, valid.clone(), correct_c)
