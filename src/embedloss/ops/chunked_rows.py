"""Tiled row-softmax InfoNCE (``info_nce``, ``nt_xent``): one pass, gradients during the forward.

The derivation and the invariants are in :mod:`embedloss.ops.chunked`. A row tile of ``c``
queries against all ``M`` keys goes through four phases — *compute logits* (one GEMM into the
reused row-major tile buffer, in base-2 units), *mark pairs* (positives, exclusions, weights,
``correct``), *update statistics* (the tile becomes ``exp(z − ref_i)`` in place, one row sum)
and *accumulate gradients* (``G = P − T`` pushed through the two GEMMs of :class:`RowGrads`).
Peak memory: the ``(c, M)`` tile buffer (plus its masks for label layouts) and O((N + M)·D)
for the gradients — never an ``(N, M)`` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from embedloss.ops.anchors import PairSpec, pair_masks
from embedloss.ops.tiles import (
    LN2,
    LOG2E,
    NEG_INF,
    Grads,
    Weights,
    first_order_only,
    logits_tile,
    max_and_prefix_max,
    put,
    tile_bounds,
    tile_weights,
    uniform_factor,
)

__all__ = ["RowPlan", "RowSoftmax"]
Masks = tuple[Tensor, Tensor, Tensor, Tensor]  # positive, denominator, |P(i)|, |A(i)|


@dataclass
class RowPlan:
    """Everything the row tiles need besides the tensors autograd tracks."""

    spec: PairSpec
    sparse: bool  # one positive per row: indices, no (c, M) masks
    weights: Weights
    eps: float
    chunk: int
    eager: bool  # finish the gradients during the forward (the caller's loss is reduced)


@dataclass
class SparseRows:
    """Per-row positive and excluded columns of a single-positive layout (all N rows)."""

    pos: Tensor  # (N,) positive column (clamped into range)
    pos_ok: Tensor  # (N,) the row has its positive
    self_col: Tensor | None  # (N,) the excluded own column (clamped)
    self_ok: Tensor | None
    n_den: Tensor  # (N,) size of the denominator
    valid: Tensor

    @staticmethod
    def build(spec: PairSpec, n: int, m: int, device: torch.device) -> SparseRows:
        """The rows of ``spec`` for ``n`` queries and ``m`` keys (indices only, no masks)."""
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
        return SparseRows(pos, pos_ok, self_col, self_ok, n_den, pos_ok & (n_den > 0))


@dataclass
class Tile:
    """What *mark pairs* hands to the later phases of one tile (logits in base-2 units)."""

    r0: int
    r1: int
    valid: Tensor  # (c,)
    pos_term: Tensor  # (c,) mean logit of the positives
    shift: Tensor  # (c,) the row's reference ``ref`` (its largest term), finite
    den_mean: Tensor | None  # (c,) mean logit of the denominator (label smoothing only)
    masks: Masks | None  # label layouts


class RowGrads:
    """Gradient accumulation over the row tiles, with the O(N·D) terms applied once at the end.

    Each tile contributes ``U_t = G_t·K`` (written into the query-gradient buffer) and
    ``dK += G_tᵀ·(a_t ∘ Q₂_t)`` with ``Q₂ = log₂e·s·Q`` (the GEMM's scaled queries; ``dK`` is
    multiplied by ``ln 2`` once at the end). In single-positive tiles ``G_t`` is in tile units
    (``E − Σ·onehot(p)``) and the row factor ``a_t`` (``1/Σexp`` in the forward, the upstream
    gradient over it in a recompute) scales ``U`` in :meth:`finish`; mask tiles hold ``G_t``.
    The uniform label-smoothing target over ``A(i)`` is applied in :meth:`finish` to all rows
    at once, as gathers and index-adds of whole rows.
    """

    def __init__(self, query: Tensor, keys: Tensor, want: tuple[bool, bool, bool]) -> None:
        self.want_q, self.want_k, self.want_s = want
        self.u = torch.empty_like(query) if self.want_q or self.want_s else None
        self.dk = torch.empty_like(keys) if self.want_k else None
        self._dk_started = False

    def tile(self, g_t: Tensor, keys: Tensor, qs_t: Tensor, r0: int, r1: int) -> None:
        """Push the tile's gradient ``g_t`` through ``G·K`` and ``Gᵀ·Q₂``."""
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
        run: RowPass,
        scale: Tensor,
        factors: tuple[Tensor, Tensor] | None,
    ) -> Grads:
        """``(dq, dk, ds)``; ``factors`` are the row factor ``a`` and target weight ``h``."""
        if self.dk is not None and not self._dk_started:
            self.dk.zero_()
        if run.sp is not None and factors is not None:
            a, h = factors
            if self.u is not None:
                self.u.mul_(a.unsqueeze(1))
            if run.plan.eps > 0:
                self._smoothing_target(run, h * run.plan.eps / run.sp.n_den.clamp(min=1))
        u = self.u
        ds = (query * u).sum() if u is not None and self.want_s else query.new_zeros(())
        dq = u.mul_(scale) if u is not None and self.want_q else None
        dk = None if self.dk is None else self.dk.mul_(LN2)
        return dq, dk, ds

    def _smoothing_target(self, run: RowPass, e: Tensor) -> None:
        """Subtract the uniform target ``e_i`` over ``A(i)`` (all keys but the excluded)."""
        sp, keys, qs = run.sp, run.keys, run.qs
        assert sp is not None
        decoupled = not run.plan.spec.positive_in_denominator
        excluded = torch.zeros_like(qs)  # Σ of the keys outside A(i), per row
        if sp.self_col is not None and sp.self_ok is not None:
            excluded += keys[sp.self_col] * sp.self_ok.unsqueeze(1)
        if decoupled:
            excluded += keys[sp.pos] * sp.pos_ok.unsqueeze(1)
        if self.u is not None:
            self.u.sub_(e.unsqueeze(1) * (keys.sum(0).unsqueeze(0) - excluded))
        if self.dk is not None:
            self.dk.sub_(e @ qs)
            if sp.self_col is not None and sp.self_ok is not None:
                self.dk.index_add_(0, sp.self_col, qs * (e * sp.self_ok).unsqueeze(1))
            if decoupled:
                self.dk.index_add_(0, sp.pos, qs * (e * sp.pos_ok).unsqueeze(1))


class RowPass:
    """One pass over the row tiles: the forward, or the recompute of a backward.

    The tile holds base-2 logits ``ℓ₂ = log₂e·ℓ`` (``log₂e`` joins the scale in the GEMM's
    queries), so that the exponential is ``exp2``, about three times cheaper than ``exp`` on
    CPUs; every result leaves in natural units.
    """

    def __init__(self, query: Tensor, keys: Tensor, scale: Tensor, plan: RowPlan) -> None:
        n, m = query.shape[0], keys.shape[0]
        self.keys, self.plan = keys, plan
        self.qs = query * (scale * LOG2E)  # (N, D): the scale enters the GEMM once
        self.cols = torch.arange(m, device=query.device)
        self.ones_m = query.new_ones(m)
        self.sp = SparseRows.build(plan.spec, n, m, query.device) if plan.sparse else None
        self.buf = query.new_empty(min(plan.chunk, n) * m)  # the tile buffer, reused

    def logits(self, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        """Phase *compute logits*: ``ℓ₂`` into the tile buffer, and the tile's weights."""
        s = logits_tile(self.buf, self.qs[r0:r1], self.keys, False)
        rows = torch.arange(r0, r1, device=s.device)
        return s, tile_weights(self.plan.weights, s, rows, self.cols, r0, r1)

    def mark(self, s: Tensor, w: Tensor | None, r0: int, r1: int) -> tuple[Tile, Tensor]:
        """Phase *mark pairs* for the plan's layout: ``ℓ₂ → z₂`` in place, and ``correct``."""
        if self.sp is not None:
            return self._mark_sparse(s, w, r0, r1)
        return self._mark_masked(s, w, r0, r1)

    def _mark_sparse(self, s: Tensor, w: Tensor | None, r0: int, r1: int) -> tuple[Tile, Tensor]:
        """One positive per row: indices only."""
        sp, spec, eps = self.sp, self.plan.spec, self.plan.eps
        assert sp is not None
        p, p_ok, v = sp.pos[r0:r1], sp.pos_ok[r0:r1], sp.valid[r0:r1]
        total = torch.mv(s, self.ones_m) if eps > 0 else None
        pos_term = s.gather(1, p.unsqueeze(1)).squeeze(1)
        excluded = None
        if sp.self_col is not None and sp.self_ok is not None:
            self_col, self_ok = sp.self_col[r0:r1], sp.self_ok[r0:r1]
            excluded = torch.where(self_ok, s.gather(1, self_col.unsqueeze(1)).squeeze(1), 0.0)
            put(s, self_col, self_ok, NEG_INF)
        put(s, p, p_ok, NEG_INF)
        # the best other key (top-1 and the shift), and the best key before the positive: the
        # positive is the first maximum (dense argmax) iff it beats the first, ties the rest
        neg_max, before = max_and_prefix_max(s, p)
        correct = v & (pos_term >= neg_max) & (pos_term > before)
        put(s, p, p_ok, pos_term)
        if w is not None:
            s.add_(w)
            put(s, p, p_ok, pos_term)  # positives are not reweighted
        if spec.positive_in_denominator:
            shift = torch.maximum(neg_max, torch.where(p_ok, pos_term, NEG_INF))
        else:
            put(s, p, p_ok, NEG_INF)
            shift = neg_max
        if w is not None:
            shift = s.amax(1)
        den_mean = None
        if total is not None:
            den_sum = total if excluded is None else total - excluded
            if not spec.positive_in_denominator:
                den_sum = den_sum - torch.where(p_ok, pos_term, 0.0)
            den_mean = den_sum / sp.n_den[r0:r1].clamp(min=1).to(s.dtype)
        return Tile(r0, r1, v, pos_term, _finite(shift), den_mean, None), correct

    def _mark_masked(self, s: Tensor, w: Tensor | None, r0: int, r1: int) -> tuple[Tile, Tensor]:
        """Positives and exclusions from ``(c, M)`` masks (label layouts)."""
        rows = torch.arange(r0, r1, device=s.device)
        pos, den = pair_masks(self.plan.spec, rows, self.cols)
        n_pos, n_den = pos.sum(1), den.sum(1)
        v = (n_pos > 0) & (n_den > 0)
        pos_term = torch.where(pos, s, 0.0).sum(1) / n_pos.clamp(min=1).to(s.dtype)
        den_mean = None
        if self.plan.eps > 0:
            den_mean = torch.where(den, s, 0.0).sum(1) / n_den.clamp(min=1).to(s.dtype)
        top = s.masked_fill(~(den | pos), NEG_INF).argmax(1, keepdim=True)  # the first maximum
        correct = v & pos.gather(1, top).squeeze(1)
        if w is not None:
            s.add_(w.masked_fill(pos, 0.0))
        s.masked_fill_(~den, NEG_INF)
        shift = _finite(s.amax(1))
        return Tile(r0, r1, v, pos_term, shift, den_mean, (pos, den, n_pos, n_den)), correct

    def remark(self, s: Tensor, w: Tensor | None, r0: int, r1: int) -> Masks | None:
        """*Mark pairs* of a recompute: the forward's ``z₂``, without its statistics."""
        sp, spec = self.sp, self.plan.spec
        if sp is None:
            pos, den = pair_masks(spec, torch.arange(r0, r1, device=s.device), self.cols)
            if w is not None:
                s.add_(w.masked_fill(pos, 0.0))
            s.masked_fill_(~den, NEG_INF)
            return pos, den, pos.sum(1), den.sum(1)
        p, p_ok = sp.pos[r0:r1], sp.pos_ok[r0:r1]
        pos_l = s.gather(1, p.unsqueeze(1)).squeeze(1)
        if sp.self_col is not None and sp.self_ok is not None:
            put(s, sp.self_col[r0:r1], sp.self_ok[r0:r1], NEG_INF)
        if w is not None:
            s.add_(w)
            if spec.positive_in_denominator:
                put(s, p, p_ok, pos_l)  # positives are not reweighted
        if not spec.positive_in_denominator:
            put(s, p, p_ok, NEG_INF)
        return None

    def push(
        self, grads: RowGrads, s: Tensor, r0: int, r1: int, a: Tensor, terms: tuple[Tensor, ...]
    ) -> None:
        """Phase *accumulate gradients*: the tile holds ``exp(z − ref)``; form ``G``, push it.

        Single positive: ``G = a·(E − (1−ε)·Σ·onehot(p))`` with the target in tile units and
        ``a`` folded into ``Q₂`` (``a`` then scales ``U`` in :meth:`RowGrads.finish`);
        ``terms = (Σ,)`` (0 for invalid rows). Masks: ``G = a·E − T`` in the tile;
        ``terms = (h, *masks)``.
        """
        qs_t = self.qs[r0:r1]
        if self.sp is not None:
            target = (1.0 - self.plan.eps) * terms[0]
            s.scatter_add_(1, self.sp.pos[r0:r1].unsqueeze(1), -target.unsqueeze(1))
            grads.tile(s, self.keys, qs_t * a.unsqueeze(1), r0, r1)
            return
        h, pos, den, n_pos, n_den = terms
        zero = s.new_zeros(())
        s.mul_(a.unsqueeze(1))
        s.sub_(
            torch.where(pos, (h * (1.0 - self.plan.eps) / n_pos.clamp(min=1)).unsqueeze(1), zero)
        )
        if self.plan.eps > 0:
            s.sub_(torch.where(den, (h * self.plan.eps / n_den.clamp(min=1)).unsqueeze(1), zero))
        grads.tile(s, self.keys, qs_t, r0, r1)


def _finite(shift: Tensor) -> Tensor:
    return torch.where(torch.isfinite(shift), shift, 0.0)


def row_forward(
    query: Tensor, keys: Tensor, scale: Tensor, plan: RowPlan, want: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Grads | None]:
    """Losses, validity, correctness, references ``(2, N)`` of all rows (+ eager gradients).

    The saved references are ``ref₂`` (base-2 units) and ``lsum = log Σ exp(z − ref)``, so that
    the log-sum-exp of row ``i`` is ``ln2·ref₂_i + lsum_i``.
    """
    n, dtype = query.shape[0], query.dtype
    run = RowPass(query, keys, scale, plan)
    loss, ref, lsum = query.new_empty(n), query.new_empty(n), query.new_empty(n)
    correct = torch.empty(n, dtype=torch.bool, device=query.device)
    valid = run.sp.valid if run.sp is not None else correct.clone()
    grads = RowGrads(query, keys, want) if plan.eager else None
    a_all = query.new_empty(n) if grads is not None and run.sp is not None else None
    for r0, r1 in tile_bounds(n, plan.chunk):
        s, w = run.logits(r0, r1)  # compute logits
        t, correct[r0:r1] = run.mark(s, w, r0, r1)  # mark pairs
        valid[r0:r1] = t.valid
        s.sub_(t.shift.unsqueeze(1)).exp2_()  # update statistics: exp(z − ref)
        sum_exp = torch.mv(s, run.ones_m)
        lsum[r0:r1], ref[r0:r1] = sum_exp.log(), t.shift
        gap = t.shift - (1.0 - plan.eps) * t.pos_term
        if t.den_mean is not None:
            gap = gap - plan.eps * t.den_mean
        loss[r0:r1] = torch.where(t.valid, LN2 * gap + lsum[r0:r1], 0.0)
        if grads is None:
            continue
        a = torch.where(t.valid, 1.0 / sum_exp, 0.0)  # accumulate gradients (upstream 1)
        if a_all is not None:
            a_all[r0:r1] = a
            run.push(grads, s, r0, r1, a, (torch.where(t.valid, sum_exp, 0.0),))
        else:
            assert t.masks is not None
            run.push(grads, s, r0, r1, a, (t.valid.to(dtype), *t.masks))
    out = None
    if grads is not None:
        factors = (a_all, valid.to(dtype)) if a_all is not None else None
        out = grads.finish(query, run, scale, factors)
    return loss, valid, correct, torch.stack([ref, lsum]), out


def row_backward(
    query: Tensor,
    keys: Tensor,
    scale: Tensor,
    plan: RowPlan,
    lse: Tensor,
    valid: Tensor,
    grad_loss: Tensor,
    want: tuple[bool, bool, bool],
) -> Grads:
    """Recompute the tiles with a per-anchor upstream gradient ``grad_loss``.

    The tile holds ``exp(z − ref)`` with the forward's ``ref`` (``z − ref`` exact near the
    maximum) and ``exp(−lsum)`` joins the per-row factor, so the softmax is as precise as the
    dense one even when ``|lse|`` is large.
    """
    run = RowPass(query, keys, scale, plan)
    grads = RowGrads(query, keys, want)
    sum_all = torch.where(valid, lse[1].exp(), 1.0)  # Σ exp(z − ref) of every valid row
    h_all = torch.where(valid, grad_loss.to(query.dtype), 0.0)
    a_all = h_all / sum_all
    target_all = torch.where(valid, sum_all, 0.0)
    for r0, r1 in tile_bounds(query.shape[0], plan.chunk):
        s, w = run.logits(r0, r1)
        masks = run.remark(s, w, r0, r1)
        s.sub_(lse[0, r0:r1].unsqueeze(1)).exp2_()  # exp(z − ref) = P·Σ
        terms = (target_all[r0:r1],) if masks is None else (h_all[r0:r1], *masks)
        run.push(grads, s, r0, r1, a_all[r0:r1], terms)
    factors = (a_all, h_all) if run.sp is not None else None
    return grads.finish(query, run, scale, factors)


class RowSoftmax(torch.autograd.Function):
    """``(loss, valid, correct)`` of every row; gradients eager (``plan.eager``) or recomputed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, query: Tensor, keys: Tensor, scale: Tensor, plan: RowPlan
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every row tile once; with ``plan.eager`` the gradients too (for an upstream 1)."""
        want = (query.requires_grad, keys.requires_grad, scale.requires_grad)
        loss, valid, correct, lse, grads = row_forward(query, keys, scale, plan, want)
        ctx.mark_non_differentiable(valid, correct)
        ctx.save_for_backward(query, keys, scale, lse, valid)
        ctx.plan, ctx.grads = plan, grads
        return loss, valid, correct

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _gv: Tensor | None, _gc: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        """Scale the eager gradients by the shared upstream gradient, or recompute."""
        first_order_only()
        query, keys, scale, lse, valid = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        grads, ctx.grads = ctx.grads, None  # a second backward recomputes
        if grads is None:
            dq, dk, ds = row_backward(query, keys, scale, ctx.plan, lse, valid, grad_loss, want)
        else:  # computed for an upstream gradient of 1 per anchor; the caller's is uniform
            f = uniform_factor(grad_loss, valid).to(query.dtype)
            dq, dk, ds = grads
            dq = None if dq is None else dq.mul_(f)
            dk = None if dk is None else dk.mul_(f)
            ds = ds * f
        return (
            dq if want[0] else None,
            dk if want[1] else None,
            ds.to(scale.dtype) if want[2] else None,
            None,
        )
