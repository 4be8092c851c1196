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
positives and exclusions are written with ``scatter``, and the target part of ``G`` (``K[p_i]``,
label smoothing over ``A(i)``) is applied to the gradients once after the last tile, as
gathers and index-adds of whole rows. Per tile the elementwise work is one ``exp`` per logit and
a few reductions; in the symmetric loss one ``exp`` serves both directions (the column sums in
the forward, ``g_r·P_row + g_c·P_col`` in the backward), guarded by range checks that fall back
to a second ``exp`` (or a per-column recomputation) where a shared exponent could underflow,
e.g. at τ = 1e-3. ``correct`` reproduces the dense ``argmax`` (ties go to the first maximum).

Exactness: the same expression as the dense path, in a different summation order — equal to
~1e-15 (float64) / ~1e-6 (float32). Half-precision inputs are computed in float32. The tiled
functions give first-order gradients (``create_graph=True`` raises; use ``chunk_size=None``).
Negative log-weights are constants (a weight tensor that requires grad makes
:func:`~embedloss.ops.info_nce.info_nce` use the dense path). A callable weight function is
called once per tile in the forward and again in a recomputing backward; it must be
deterministic, compute each entry from its tile row (full key width) and not modify the
logits it is given.

Devices: every tensor is created on the inputs' device and nothing assumes a CPU; the host
synchronises per tile only for the range checks and for exact ties (a scalar each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from embedloss.ops.anchors import AnchorLosses, PairSpec, pair_masks

__all__ = [
    "DENSE_LIMIT_BYTES",
    "TILE_BYTES",
    "chunked_info_nce",
    "chunked_symmetric_info_nce",
    "resolve_chunk_size",
]

#: ``chunk_size="auto"`` stays dense while the dense path's working set — about
#: ``DENSE_BUFFERS`` buffers of N×M elements — is below this (512 KiB, N = M ≈ 148 in float32).
#: Measured on a 2-core CPU (forward+backward, float32): the tiled path is already faster
#: from N ≈ 128 (CLIP 3.0 vs 3.7 ms) and 2.5–4× faster from N = 512; the dense path is kept
#: for tiny batches, where it does fewer Python-level operations.
DENSE_LIMIT_BYTES = 512 * 2**10
DENSE_BUFFERS = 6
#: Target size of one tile buffer for ``"auto"`` (16 MiB: the tile and its coefficient buffer
#: stay in a 32 MiB L3 cache); the row count is clamped to [``MIN_TILE_ROWS``,
#: ``MAX_TILE_ROWS``], the minimum keeping the three GEMMs per tile efficient for wide keys.
TILE_BYTES = 16 * 2**20
MIN_TILE_ROWS = 512
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
        >>> resolve_chunk_size("auto", 64, 64) is None
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
        return weights[r0:r1].to(logits.dtype)
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


def _logits_tile(buf: Tensor, a: Tensor, b: Tensor, transposed: bool) -> Tensor:
    """``a·bᵀ`` (``(c, M)``) written into the flat buffer ``buf``.

    With ``transposed`` the product is computed as ``(b·aᵀ)ᵀ`` into an ``(M, c)`` layout and
    returned as a transposed view: for a short, wide tile (``c ≪ M``) that GEMM runs faster
    (~15% with MKL on a 2-core EPYC), and the other tile buffers then use the same layout.
    """
    c, m = a.shape[0], b.shape[0]
    if transposed:
        return torch.mm(b, a.T, out=buf[: c * m].view(m, c)).T
    return torch.mm(a, b.T, out=buf[: c * m].view(c, m))


def _like_tile(buf: Tensor, s: Tensor) -> Tensor:
    """A view of the flat ``buf`` with the shape and memory layout of the tile ``s``."""
    c, m = s.shape
    if s.stride(0) == 1 and c > 1:
        return buf[: c * m].view(m, c).T
    return buf[: c * m].view(c, m)


# ----------------------------------------------------------------------------------------------
# Row softmax (info_nce)
# ----------------------------------------------------------------------------------------------


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
    """Per-row positive and excluded columns of a single-positive layout (all N rows)."""

    pos: Tensor  # (N,) positive column (clamped into range)
    pos_ok: Tensor  # (N,) the row has its positive
    self_col: Tensor | None  # (N,) the excluded own column (clamped)
    self_ok: Tensor | None
    n_den: Tensor  # (N,) size of the denominator
    valid: Tensor

    @staticmethod
    def build(spec: PairSpec, n: int, m: int, device: torch.device) -> _SparseRows:
        rows = torch.arange(n, device=device)
        pos = rows if spec.positive_index is None else spec.positive_index.long().to(device)
        pos_ok = (pos >= 0) & (pos < m)
        pos = pos.clamp(0, m - 1)
        n_excl = torch.zeros_like(pos)
        self_col = self_ok = None
        if spec.self_index is not None:
            raw = spec.self_index.long().to(device)
            self_ok = (raw >= 0) & (raw < m)
            self_col = raw.clamp(0, m - 1)
            pos_ok = pos_ok & ~(self_ok & (self_col == pos))
            n_excl = n_excl + self_ok.long()
        if not spec.positive_in_denominator:
            n_excl = n_excl + pos_ok.long()
        n_den = m - n_excl
        return _SparseRows(pos, pos_ok, self_col, self_ok, n_den, pos_ok & (n_den > 0))


class _RowGrads:
    """Gradient accumulation over the row tiles, with the O(N·D) terms applied once at the end.

    Each tile contributes ``U_t = E_t·K`` (written into the query-gradient buffer) and
    ``dK += E_tᵀ·(a_t ∘ s·q_t)``, where ``E_t`` is the exponentiated tile and ``a_t`` a per-row
    factor (``1/Σexp`` in the forward, the upstream gradient in a recompute). The positive's
    target is subtracted in the tile itself (``P_ip − 1`` must be formed before any sum: with a
    sharp softmax it cancels); the uniform label-smoothing target over ``A(i)`` is applied in
    :meth:`finish` to all rows at once, as gathers and index-adds of whole rows. Explicit-mask
    tiles (``a_t = None``) already hold the full gradient ``G_t``.
    """

    def __init__(self, query: Tensor, keys: Tensor, want: tuple[bool, bool, bool]) -> None:
        self.want_q, self.want_k, self.want_s = want
        self.u = torch.empty_like(query) if self.want_q or self.want_s else None
        self.dk = torch.empty_like(keys) if self.want_k else None
        self._dk_started = False

    def tile(self, g_t: Tensor, keys: Tensor, qs_t: Tensor, r0: int, r1: int) -> None:
        if self.u is not None:
            torch.mm(g_t, keys, out=self.u[r0:r1])
        if self.dk is not None:
            if self._dk_started:
                self.dk.addmm_(g_t.T, qs_t)
            else:  # the first tile writes: no zero fill of an (M, D) buffer
                torch.mm(g_t.T, qs_t, out=self.dk)
                self._dk_started = True

    def finish(
        self,
        query: Tensor,
        keys: Tensor,
        qs: Tensor,
        scale: Tensor,
        plan: _RowPlan,
        sp: _SparseRows | None,
        a: Tensor | None,
        h: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(dq, dk, ds)``; ``a`` and ``h`` (``(N,)``) are the row factor and target weight."""
        u, dk = self.u, self.dk
        if dk is not None and not self._dk_started:
            dk.zero_()
        if sp is not None and a is not None and h is not None:
            eps = plan.eps
            e = h * eps / sp.n_den.clamp(min=1).to(h.dtype) if eps > 0 else None
            excluded = None  # Σ of the keys outside A(i), per row
            if e is not None:
                excluded = torch.zeros_like(qs)
                if sp.self_col is not None and sp.self_ok is not None:
                    excluded += keys[sp.self_col] * sp.self_ok.unsqueeze(1)
                if not plan.spec.positive_in_denominator:
                    excluded += keys[sp.pos] * sp.pos_ok.unsqueeze(1)
            if u is not None:
                u.mul_(a.unsqueeze(1))
                if e is not None and excluded is not None:
                    u.sub_(e.unsqueeze(1) * (keys.sum(0).unsqueeze(0) - excluded))
            if dk is not None and e is not None:
                dk.sub_(e @ qs)
                if sp.self_col is not None and sp.self_ok is not None:
                    dk.index_add_(0, sp.self_col, qs * (e * sp.self_ok).unsqueeze(1))
                if not plan.spec.positive_in_denominator:
                    dk.index_add_(0, sp.pos, qs * (e * sp.pos_ok).unsqueeze(1))
        ds = (query * u).sum() if u is not None and self.want_s else query.new_zeros(())
        dq = u.mul_(scale) if u is not None and self.want_q else None
        return dq, dk, ds


def _row_logits(
    s: Tensor,
    plan: _RowPlan,
    w: Tensor | None,
    layout: _SparseRows | tuple[Tensor, Tensor],
    r0: int,
    r1: int,
    neg_inf: float,
) -> None:
    """Turn the raw tile ``ℓ`` into the masked, weighted ``z`` in place.

    ``layout`` is the single-positive description of all rows or the tile's
    ``(positive, denominator)`` masks.
    """
    if not isinstance(layout, _SparseRows):
        pos, den = layout
        if w is not None:
            s.add_(w.masked_fill(pos, 0.0))
        s.masked_fill_(~den, neg_inf)
        return
    p, p_ok = layout.pos[r0:r1], layout.pos_ok[r0:r1]
    pos_l = s.gather(1, p.unsqueeze(1)).squeeze(1)
    if layout.self_col is not None and layout.self_ok is not None:
        _put(s, layout.self_col[r0:r1], layout.self_ok[r0:r1], neg_inf)
    if w is not None:
        s.add_(w)
        if plan.spec.positive_in_denominator:
            _put(s, p, p_ok, pos_l)  # positives are not reweighted
    if not plan.spec.positive_in_denominator:
        _put(s, p, p_ok, neg_inf)


def _row_forward(
    query: Tensor,
    keys: Tensor,
    scale: Tensor,
    plan: _RowPlan,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor] | None]:
    """Losses, validity, correctness and log-sum-exps of all rows (+ eager gradients)."""
    n, m = query.shape[0], keys.shape[0]
    dtype, device = query.dtype, query.device
    neg_inf = float("-inf")
    eps = plan.eps
    loss = query.new_empty(n)
    ref = query.new_empty(n)  # log-sum-exp of row i = ref_i + lsum_i, kept apart for precision
    lsum = query.new_empty(n)
    correct = torch.empty(n, dtype=torch.bool, device=device)
    cols = torch.arange(m, device=device)
    ones_m = query.new_ones(m)
    qs = query * scale  # (N, D)
    sp = _SparseRows.build(plan.spec, n, m, device) if plan.sparse else None
    valid = sp.valid if sp is not None else torch.empty(n, dtype=torch.bool, device=device)
    grads = _RowGrads(query, keys, want) if plan.eager else None
    a_all = query.new_empty(n) if plan.eager and sp is not None else None
    buf = query.new_empty(min(plan.chunk, n) * m)
    for r0 in range(0, n, plan.chunk):
        r1 = min(r0 + plan.chunk, n)
        rows = torch.arange(r0, r1, device=device)
        s = _logits_tile(buf, qs[r0:r1], keys, plan.sparse)  # (c, M) logits ℓ
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        if sp is not None:
            v = sp.valid[r0:r1]
            p, p_ok = sp.pos[r0:r1], sp.pos_ok[r0:r1]
            if eps > 0:
                total = torch.mv(s, ones_m)
            pos_term = s.gather(1, p.unsqueeze(1)).squeeze(1)
            if sp.self_col is not None and sp.self_ok is not None:
                self_col, self_ok = sp.self_col[r0:r1], sp.self_ok[r0:r1]
                self_l = s.gather(1, self_col.unsqueeze(1)).squeeze(1)
                _put(s, self_col, self_ok, neg_inf)
            # the best key other than the positive: for `correct` and as the shift
            _put(s, p, p_ok, neg_inf)
            neg_max = s.amax(1)
            _put(s, p, p_ok, pos_term)
            correct[r0:r1] = _top1(s, v, pos_term, neg_max, p)
            if w is not None:
                s.add_(w)
                _put(s, p, p_ok, pos_term)  # positives are not reweighted
            if plan.spec.positive_in_denominator:
                shift = torch.maximum(neg_max, torch.where(p_ok, pos_term, neg_inf))
            else:
                _put(s, p, p_ok, neg_inf)
                shift = neg_max
            if w is not None:
                shift = s.amax(1)
            if eps > 0:
                den_sum = total
                if sp.self_col is not None and sp.self_ok is not None:
                    den_sum = den_sum - torch.where(self_ok, self_l, 0.0)
                if not plan.spec.positive_in_denominator:
                    den_sum = den_sum - torch.where(p_ok, pos_term, 0.0)
                den_mean = den_sum / sp.n_den[r0:r1].clamp(min=1).to(dtype)
        else:
            pos, den = pair_masks(plan.spec, rows, cols)
            n_pos, n_den = pos.sum(1), den.sum(1)
            v = (n_pos > 0) & (n_den > 0)
            valid[r0:r1] = v
            pos_term = torch.where(pos, s, 0.0).sum(1) / n_pos.clamp(min=1).to(dtype)
            if eps > 0:
                den_mean = torch.where(den, s, 0.0).sum(1) / n_den.clamp(min=1).to(dtype)
            pos_max = s.masked_fill(~pos, neg_inf).amax(1)
            neg_max = s.masked_fill(pos | ~den, neg_inf).amax(1)
            correct[r0:r1] = _top1(s, v, pos_max, neg_max, pos, den | pos)
            _row_logits(s, plan, w, (pos, den), r0, r1, neg_inf)
            shift = s.amax(1)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        s.sub_(shift.unsqueeze(1)).exp_()  # exp(z − shift)
        sum_exp = torch.mv(s, ones_m)
        log_sum = sum_exp.log()
        row_loss = (shift + log_sum) - (1.0 - eps) * pos_term
        if eps > 0:
            row_loss = row_loss - eps * den_mean
        loss[r0:r1] = torch.where(v, row_loss, 0.0)
        ref[r0:r1] = shift
        lsum[r0:r1] = log_sum
        if grads is not None:
            a = torch.where(v, 1.0 / sum_exp, 0.0)
            if sp is not None and a_all is not None:
                a_all[r0:r1] = a
                # G = a·(E − (1−ε)·Σexp·onehot(p)): the positive's target, in tile units
                target = torch.where(v, (1.0 - eps) * sum_exp, 0.0)
                s.scatter_add_(1, sp.pos[r0:r1].unsqueeze(1), -target.unsqueeze(1))
                grads.tile(s, keys, qs[r0:r1] * a.unsqueeze(1), r0, r1)
            else:
                s.mul_(a.unsqueeze(1))
                _masked_target(s, pos, den, v.to(dtype), n_pos, n_den, eps)
                grads.tile(s, keys, qs[r0:r1], r0, r1)
    out = None
    if grads is not None:
        h = valid.to(dtype) if sp is not None else None
        out = grads.finish(query, keys, qs, scale, plan, sp, a_all, h)
    return loss, valid, correct, torch.stack([ref, lsum]), out


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


def _row_backward(
    query: Tensor,
    keys: Tensor,
    scale: Tensor,
    plan: _RowPlan,
    lse: Tensor,
    valid: Tensor,
    grad_loss: Tensor,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Recompute the tiles with a per-anchor upstream gradient ``grad_loss``.

    ``lse`` is ``(2, N)``: the shift ``ref`` and ``log Σ exp(z − ref)`` of every row. The tile
    holds ``exp(z − ref)`` (``z − ref`` exact near the maximum) and ``exp(−lsum)`` joins the
    per-row factor, so the softmax is as precise as the dense one even when ``|lse|`` is large.
    """
    n, m = query.shape[0], keys.shape[0]
    device = query.device
    neg_inf = float("-inf")
    cols = torch.arange(m, device=device)
    qs = query * scale
    sp = _SparseRows.build(plan.spec, n, m, device) if plan.sparse else None
    grads = _RowGrads(query, keys, want)
    shift_all = lse[0]
    sum_all = torch.where(valid, lse[1].exp(), 1.0)  # Σ exp(z − ref) of every valid row
    h_all = torch.where(valid, grad_loss.to(query.dtype), 0.0)
    a_all = h_all / sum_all
    buf = query.new_empty(min(plan.chunk, n) * m)
    for r0 in range(0, n, plan.chunk):
        r1 = min(r0 + plan.chunk, n)
        rows = torch.arange(r0, r1, device=device)
        s = _logits_tile(buf, qs[r0:r1], keys, plan.sparse)
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        layout = sp if sp is not None else pair_masks(plan.spec, rows, cols)
        _row_logits(s, plan, w, layout, r0, r1, neg_inf)
        s.sub_(shift_all[r0:r1].unsqueeze(1)).exp_()  # exp(z − ref) = P·Σ
        h, a = h_all[r0:r1], a_all[r0:r1]
        if isinstance(layout, _SparseRows):
            # G = a·(E − (1−ε)·Σ·onehot(p)), the positive's target in tile units
            target = torch.where(layout.valid[r0:r1], (1.0 - plan.eps) * sum_all[r0:r1], 0.0)
            s.scatter_add_(1, layout.pos[r0:r1].unsqueeze(1), -target.unsqueeze(1))
            grads.tile(s, keys, qs[r0:r1] * a.unsqueeze(1), r0, r1)
        else:
            pos, den = layout
            s.mul_(a.unsqueeze(1))
            _masked_target(s, pos, den, h, pos.sum(1), den.sum(1), plan.eps)
            grads.tile(s, keys, qs[r0:r1], r0, r1)
    return grads.finish(query, keys, qs, scale, plan, sp, a_all if sp else None, h_all)


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
        grads = ctx.grads
        ctx.grads = None
        factor = _uniform_value(grad_loss, valid) if grads is not None else None
        if grads is None or factor is None:
            dq, dk, ds = _row_backward(query, keys, scale, ctx.plan, lse, valid, grad_loss, want)
        else:  # the eager gradients, for an upstream gradient of 1 per anchor
            dq, dk, ds = grads
            f = factor.to(ds.dtype)
            dq = None if dq is None else dq.mul_(f)
            dk = None if dk is None else dk.mul_(f)
            ds = ds * f
        return (
            dq if want[0] else None,
            dk if want[1] else None,
            ds.to(scale.dtype) if want[2] else None,
            None,
        )


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
    reduced: bool = False,
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


def _sym_positive(labels: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The ``(rows, cols)`` same-label mask, laid out like a (transposed) tile."""
    return (labels[cols].unsqueeze(1) == labels[rows].unsqueeze(0)).T


def _unshifted_exp_ok(row_max: Tensor, col_max: Tensor, n: int, dtype: torch.dtype) -> bool:
    """Whether ``exp(z)`` itself gives every row and column sum to full precision.

    No sum may overflow (``max + log n`` below the exponent range) and every row's and column's
    largest term must be a normal number well above underflow.
    """
    top, bottom = (600.0, 600.0) if dtype == torch.float64 else (60.0, 40.0)
    hi = float(row_max.max())
    lo = min(float(row_max.min()), float(col_max.min()))
    return hi + float(torch.tensor(n).log()) <= top and lo >= -bottom


def _sym_forward(
    x: Tensor, y: Tensor, scale: Tensor, plan: _SymPlan
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row and column losses and correctness in one pass over row tiles.

    Also returns the ``(4, N)`` log-sum-exps as reference + log of the sum, rows then columns.
    """
    n = x.shape[0]
    dtype, device = x.dtype, x.device
    neg_inf = float("-inf")
    eps, chunk = plan.eps, plan.chunk
    cols = torch.arange(n, device=device)
    ones_n = x.new_ones(n)
    ones_c = x.new_ones(min(chunk, n))
    xs = x * scale  # (N, D)
    ref_r = x.new_empty(n)  # log-sum-exp of row i = ref_r_i + lsum_r_i, kept apart
    lsum_r = x.new_empty(n)
    col_ref = x.new_full((n,), neg_inf)  # running column reference and Σ exp(z − ref)
    col_sum = x.new_zeros(n)
    zero = x.new_zeros(())
    pos_r = x.new_empty(n)  # Σ_{P} ℓ of each row
    pos_c = x.new_zeros(n)
    tot_r = x.new_zeros(n)
    tot_c = x.new_zeros(n)
    correct_r = torch.empty(n, dtype=torch.bool, device=device)
    pos_max_c = x.new_full((n,), neg_inf)
    neg_max_c = x.new_full((n,), neg_inf)
    all_rows = torch.ones(min(chunk, n), dtype=torch.bool, device=device)
    buf = x.new_empty(min(chunk, n) * n)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        c = r1 - r0
        rows = torch.arange(r0, r1, device=device)
        xs_t = xs[r0:r1]
        s = _logits_tile(buf, xs_t, y, True)  # (c, N) logits ℓ
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        if eps > 0:
            tot_r[r0:r1] = torch.mv(s, ones_n)
            tot_c += torch.mv(s.T, ones_c[:c])
        if plan.labels is None:
            diag = rows.unsqueeze(1)
            d = s.gather(1, diag).squeeze(1)  # ℓ_ii
            pos_r[r0:r1] = d
            pos_c[r0:r1] = d
            s.scatter_(1, diag, neg_inf)
            neg_r = s.amax(1)
            tile_col_max = s.amax(0)  # without the diagonal (completed below)
            torch.maximum(neg_max_c, tile_col_max, out=neg_max_c)
            pos_max_c[r0:r1] = d
            s.scatter_(1, diag, d.unsqueeze(1))
            tile_col_max = tile_col_max.clone()
            torch.maximum(tile_col_max[r0:r1], d, out=tile_col_max[r0:r1])
            correct_r[r0:r1] = _top1(s, all_rows[:c], d, neg_r, rows)
            if w is not None:
                s.add_(w)
                s.scatter_(1, diag, d.unsqueeze(1))
            row_max = s.amax(1) if w is not None else torch.maximum(neg_r, d)
        else:
            pos = _sym_positive(plan.labels, rows, cols)
            ps = torch.where(pos, s, 0.0)
            pos_r[r0:r1] = torch.mv(ps, ones_n)
            pos_c += torch.mv(ps.T, ones_c[:c])
            del ps
            masked = s.masked_fill(~pos, neg_inf)
            pmax_r = masked.amax(1)
            pmax_c = masked.amax(0)
            torch.maximum(pos_max_c, pmax_c, out=pos_max_c)
            masked.copy_(s).masked_fill_(pos, neg_inf)
            nmax_r = masked.amax(1)
            nmax_c = masked.amax(0)
            torch.maximum(neg_max_c, nmax_c, out=neg_max_c)
            del masked
            tile_col_max = torch.maximum(pmax_c, nmax_c)
            correct_r[r0:r1] = _top1(s, all_rows[:c], pmax_r, nmax_r, pos)
            if w is not None:
                s.add_(w.masked_fill(pos, 0.0))
                row_max = s.amax(1)
            else:
                row_max = torch.maximum(pmax_r, nmax_r)
        # Column sums of this tile, as Σ_i exp(z_ij − ref_j) with a reference ref_j, merged
        # into the running (col_ref, col_sum) in the linear domain: one rounding of the
        # log-sum-exp at the end, as in the dense path, however many tiles there are.
        if w is None and _unshifted_exp_ok(row_max, tile_col_max, n, dtype):
            s.exp_()  # every sum is exact without a shift: skip a pass over the tile
            ref_r[r0:r1] = 0.0
            lsum_r[r0:r1] = torch.mv(s, ones_n).log()
            t_ref, t_sum = zero, torch.mv(s.T, ones_c[:c])
        else:
            shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
            ref = shift.max()  # R, the tile's largest logit
            # Columns whose maximum lies far below R would lose precision in the shared exp:
            # they keep their own reference, from the tile's own logits (before the exp).
            col_max = s.amax(0) if w is not None else tile_col_max
            bad = ~(col_max >= ref - _exp_range(dtype))
            sb = None
            if bool(bad.any()):
                bad_cols = bad.nonzero().squeeze(1)
                sb = s[:, bad_cols].clone()  # (c, k) logits z of those columns
            s.sub_(shift.unsqueeze(1)).exp_()  # exp(z − shift_i)
            ref_r[r0:r1] = shift
            lsum_r[r0:r1] = torch.mv(s, ones_n).log()
            # From the same exp: Σ_i exp(z_ij − R) = Σ_i e^{shift_i − R}·E_ij.
            t_sum = torch.mv(s.T, (shift - ref).exp())
            t_ref = ref
            if sb is not None:
                b_ref = sb.amax(0)
                b_ref = torch.where(torch.isfinite(b_ref), b_ref, 0.0)
                t_ref = ref.expand(n).clone()
                t_ref[bad_cols] = b_ref
                t_sum[bad_cols] = (sb - b_ref).exp().sum(0)
        new_ref = torch.maximum(col_ref, t_ref)
        col_sum.mul_((col_ref - new_ref).exp()).add_(t_sum * (t_ref - new_ref).exp())
        col_ref = new_ref
    lsum_c = col_sum.log()
    correct_c = pos_max_c > neg_max_c
    tie = pos_max_c == neg_max_c
    if bool(tie.any()):
        correct_c[tie] = _column_top1(xs, y, plan, tie.nonzero().squeeze(1))
    n_pos = plan.n_pos.to(dtype)
    loss_r = (ref_r + lsum_r) - (1.0 - eps) * pos_r / n_pos
    loss_c = (col_ref + lsum_c) - (1.0 - eps) * pos_c / n_pos
    if eps > 0:
        loss_r = loss_r - eps * tot_r / n
        loss_c = loss_c - eps * tot_c / n
    return loss_r, loss_c, correct_r, correct_c, torch.stack([ref_r, lsum_r, col_ref, lsum_c])


def _column_top1(xs: Tensor, y: Tensor, plan: _SymPlan, cols: Tensor) -> Tensor:
    """``correct`` of tied columns: whether the first maximum over all rows is a positive.

    Scans the row tiles again for these columns only (rare: exact ties of a positive with a
    negative), keeping the first row that attains each column's maximum.
    """
    best = xs.new_full((cols.numel(),), float("-inf"))
    arg = torch.zeros(cols.numel(), dtype=torch.long, device=xs.device)
    y_c = y[cols]
    for r0 in range(0, xs.shape[0], plan.chunk):
        v = torch.mm(xs[r0 : r0 + plan.chunk], y_c.T)  # (c, k)
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
    lse: Tensor,
    g_r: Tensor,
    g_c: Tensor,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """One recompute of every tile: ``G = g_r·(P_row − T_row) + g_c·(P_col − T_col)``.

    The uniform label-smoothing target is applied to the gradients once at the end; the
    positives' targets are formed in the tiles (``P_ii − 1`` cancels when the softmax is sharp).
    """
    n = x.shape[0]
    dtype, device = x.dtype, x.device
    eps, chunk = plan.eps, plan.chunk
    want_x, want_y, want_s = want
    u = torch.empty_like(x) if want_x or want_s else None  # G·Y, row tile by row tile
    dy = torch.empty_like(y) if want_y else None  # the first tile writes, the others add
    cols = torch.arange(n, device=device)
    g_r, g_c = g_r.to(dtype), g_c.to(dtype)
    n_pos = plan.n_pos.to(dtype)
    ref_r, lsum_r, ref_c, lsum_c = lse  # each log-sum-exp as reference + log of the sum
    lse_r, lse_c = ref_r + lsum_r, ref_c + lsum_c  # only for the range checks
    lse_c_min = float(lse_c.min())
    xs = x * scale
    buf = x.new_empty(min(chunk, n) * n)
    buf2 = x.new_empty(min(chunk, n) * n)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        rows = torch.arange(r0, r1, device=device)
        xs_t = xs[r0:r1]
        s = _logits_tile(buf, xs_t, y, True)
        w = _tile_weights(plan.weights, s, rows, cols, r0, r1)
        pos = None
        if plan.labels is not None:
            pos = _sym_positive(plan.labels, rows, cols)
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
        coef = _like_tile(buf2, s)
        if mu is not None:
            # g_r·P_row + g_c·P_col = exp(z − μ)·(g_r_i·e^{μ − lse_r_i} + g_c_j·e^{μ − lse_c_j}):
            # one exp serves both directions.
            if mu != 0.0:
                s.sub_(mu)
            s.exp_()
            # products of exponentials, never the exponential of a rounded large sum
            alpha = gr * (mu - ref_r[r0:r1]).exp() * (-lsum_r[r0:r1]).exp()
            beta = g_c * (mu - ref_c).exp() * (-lsum_c).exp()
            torch.add(alpha.unsqueeze(1), beta.unsqueeze(0), out=coef)
            s.mul_(coef)
        else:
            torch.sub(s, ref_c.unsqueeze(0), out=coef).exp_()
            coef.mul_((g_c * (-lsum_c).exp()).unsqueeze(0))
            s.sub_(ref_r[r0:r1].unsqueeze(1)).exp_()
            s.mul_((gr * (-lsum_r[r0:r1]).exp()).unsqueeze(1)).add_(coef)
        if pos is not None:
            t = (gr * (1.0 - eps) / n_pos[r0:r1]).unsqueeze(1) + (
                (1.0 - eps) * g_c / n_pos
            ).unsqueeze(0)
            s.sub_(torch.where(pos, t, 0.0))
            del t
        else:  # T_ii of both directions, formed in the tile (P_ii − 1 cancels when P_ii ≈ 1)
            diag_target = (1.0 - eps) * (gr + g_c[r0:r1])
            s.scatter_add_(1, rows.unsqueeze(1), -diag_target.unsqueeze(1))
        if u is not None:
            torch.mm(s, y, out=u[r0:r1])
        if dy is not None:
            if r0 == 0:
                torch.mm(s.T, xs_t, out=dy)
            else:
                dy.addmm_(s.T, xs_t)
    # the uniform label-smoothing target ε/N·(g_r_i + g_c_j), on all rows at once
    if u is not None and eps > 0:
        u.sub_((eps / n) * (g_r.unsqueeze(1) * y.sum(0).unsqueeze(0) + (g_c @ y).unsqueeze(0)))
    if dy is not None and eps > 0:
        dy.sub_((eps / n) * ((g_r @ xs).unsqueeze(0) + g_c.unsqueeze(1) * xs.sum(0).unsqueeze(0)))
    ds = (x * u).sum() if u is not None and want_s else x.new_zeros(())
    dx = u.mul_(scale) if u is not None and want_x else None
    return dx, dy, ds


class _SymmetricSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, plan: _SymPlan
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loss_r, loss_c, correct_r, correct_c, lse = _sym_forward(x, y, scale, plan)
        ctx.mark_non_differentiable(correct_r, correct_c)
        ctx.save_for_backward(x, y, scale, lse)
        ctx.plan = plan
        return loss_r, loss_c, correct_r, correct_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_r: Tensor, g_c: Tensor, _a: Tensor | None, _b: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        _first_order_only()
        x, y, scale, lse = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        dx, dy, ds = _sym_backward(x, y, scale, ctx.plan, lse, g_r, g_c, want)
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
    reduced: bool = False,
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
