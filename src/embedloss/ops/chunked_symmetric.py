"""Tiled symmetric InfoNCE (CLIP): one forward pass, one recompute in the backward.

The derivation and the invariants are in :mod:`embedloss.ops.chunked`. The forward visits row
tiles of ``x`` against all of ``y``: *compute logits* (base-2 units, transposed tile layout),
*mark pairs* (positives, weights, the first maximum of every row and column) and *update
statistics* (each row's log-sum-exp from its tile; each column's merged across tiles). The
backward computes every tile again and, in *accumulate gradients*, forms
``G = g_r·(P_row − T) + g_c·(P_col − T)`` before the two GEMMs.
Peak memory: two ``(c, N)`` tile buffers and O(N·D) — never an ``(N, N)`` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from embedloss.ops.tiles import (
    LN2,
    LOG2E,
    NEG_INF,
    Grads,
    Weights,
    first_order_only,
    like_tile,
    logits_tile,
    tile_bounds,
    tile_weights,
)

__all__ = ["SymPlan", "SymmetricSoftmax"]


@dataclass
class SymPlan:
    """Everything the symmetric tiles need besides the tensors autograd tracks."""

    labels: Tensor | None
    n_pos: Tensor  # (N,) positives per anchor (the same in both directions)
    weights: Weights
    eps: float
    chunk: int
    uniform: bool  # the caller only sums or averages: one upstream gradient per direction


def _finite(v: Tensor) -> Tensor:
    return torch.where(torch.isfinite(v), v, 0.0)


def _label_mask(labels: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The ``(rows, cols)`` same-label mask, laid out like a (transposed) tile."""
    return (labels[cols].unsqueeze(1) == labels[rows].unsqueeze(0)).T


class SymForward:
    """The forward pass: row statistics per tile, column statistics merged across tiles.

    Invariants after each tile (base-2 units): ``col_ref_j + log₂ col_sum_j`` is the
    log-sum-exp of column ``j`` over the rows seen so far, ``col_ref_j`` its largest term so the
    sum lies in ``[1, rows]``; in the diagonal layout ``col_before_j`` / ``col_after_j`` are the
    largest logits of column ``j`` in the rows before / after row ``j`` seen so far; with labels
    ``col_best_j`` is its largest logit and ``col_hit_j`` whether its first occurrence (lowest
    row) is a positive.
    """

    def __init__(self, x: Tensor, y: Tensor, scale: Tensor, plan: SymPlan) -> None:
        n, chunk = x.shape[0], min(plan.chunk, x.shape[0])
        self.y, self.plan, self.n = y, plan, n
        self.xs = x * (scale * LOG2E)  # (N, D): the scale and log₂e enter the GEMM once
        self.cols = torch.arange(n, device=x.device)
        self.ones_n = x.new_ones(n)
        self.buf, self.buf2 = x.new_empty(chunk * n), x.new_empty(chunk * n)
        # on the tile's diagonal block, stored transposed (block_t[k, i] = ℓ₂[r0 + i, r0 + k]):
        # 0 where k < i (column before the row's positive), -inf elsewhere; and k > i
        before = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).triu(1)
        self.bias_before = x.new_zeros(chunk, chunk).masked_fill_(~before, NEG_INF)
        self.bias_after = x.new_zeros(chunk, chunk).masked_fill_(~before.T, NEG_INF)
        self.block_buf = x.new_empty(2, chunk, chunk)
        self.ref_r, self.lsum_r = x.new_empty(n), x.new_empty(n)
        self.col_ref, self.col_sum = x.new_full((n,), NEG_INF), x.new_zeros(n)
        self.pos_r, self.pos_c = x.new_empty(n), x.new_zeros(n)  # Σ_P ℓ₂ per row / column
        self.tot_r, self.tot_c = x.new_zeros(n), x.new_zeros(n)  # Σ ℓ₂ (label smoothing)
        self.correct_r = torch.empty(n, dtype=torch.bool, device=x.device)
        self.col_best, self.col_before, self.col_after = (x.new_full((n,), NEG_INF) for _ in "abc")
        self.col_hit = torch.zeros(n, dtype=torch.bool, device=x.device)

    def tile(self, r0: int, r1: int) -> None:
        """All phases of one row tile."""
        s = logits_tile(self.buf, self.xs[r0:r1], self.y, True)  # compute logits
        rows = torch.arange(r0, r1, device=s.device)
        w = tile_weights(self.plan.weights, s, rows, self.cols, r0, r1)
        if self.plan.eps > 0:
            self.tot_r[r0:r1] = torch.mv(s, self.ones_n)
            self.tot_c.add_(s.sum(0))
        if self.plan.labels is None:  # mark pairs
            row_max, col_max = self._mark_diagonal(s, w, r0, r1)
        else:
            row_max, col_max = self._mark_labels(s, w, r0, r1)
        self._statistics(s, row_max, col_max, r0, r1)

    def _mark_diagonal(
        self, s: Tensor, w: Tensor | None, r0: int, r1: int
    ) -> tuple[Tensor, Tensor]:
        """Positives on the diagonal: the first maximum both ways, then the weighted ``z₂``.

        Row ``i``'s positive is the first maximum iff it beats every column before ``i`` and
        ties at most the columns after; the columns before are ``[0, r0)`` and the strict lower
        triangle of the tile's diagonal ``(c, c)`` block. Columns likewise, across tiles.
        """
        c = r1 - r0
        diag = torch.arange(r0, r1, device=s.device).unsqueeze(1)
        d = s.gather(1, diag).squeeze(1)  # ℓ₂_ii
        self.pos_r[r0:r1], self.pos_c[r0:r1] = d, d
        s.scatter_(1, diag, NEG_INF)
        block_t = s[:, r0:r1].T  # contiguous (c, c), the diagonal at -inf
        # row i's logits in the columns before / after column i (-inf elsewhere)
        k_lt_i = torch.add(block_t, self.bias_before[:c, :c], out=self.block_buf[0, :c, :c])
        k_gt_i = torch.add(block_t, self.bias_after[:c, :c], out=self.block_buf[1, :c, :c])
        before = _amax_cols(s, 0, r0, k_lt_i.amax(0))  # row i: the columns j < i
        after = _amax_cols(s, r1, self.n, k_gt_i.amax(0))  # the columns j > i
        self.correct_r[r0:r1] = (d > before) & (d >= after)
        col = s.amax(0)  # this tile's rows, without the diagonal
        torch.maximum(self.col_before[r1:], col[r1:], out=self.col_before[r1:])
        torch.maximum(self.col_after[:r0], col[:r0], out=self.col_after[:r0])
        blk_before = torch.maximum(self.col_before[r0:r1], k_gt_i.amax(1))  # rows i < j
        blk_after = torch.maximum(self.col_after[r0:r1], k_lt_i.amax(1))  # rows i > j
        self.col_before[r0:r1], self.col_after[r0:r1] = blk_before, blk_after
        if w is not None:
            s.add_(w)
        s.scatter_(1, diag, d.unsqueeze(1))  # the positives are not reweighted
        if w is not None:
            return s.amax(1), s.amax(0)
        col_max = col.clone()
        col_max[r0:r1] = torch.maximum(col[r0:r1], d)
        return torch.maximum(torch.maximum(before, after), d), col_max

    def _mark_labels(self, s: Tensor, w: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Positives from labels: sums of positive logits, first maxima, the weighted ``z₂``."""
        labels = self.plan.labels
        assert labels is not None
        rows = torch.arange(r0, r1, device=s.device)
        pos = _label_mask(labels, rows, self.cols)
        ps = torch.where(pos, s, 0.0)
        self.pos_r[r0:r1] = torch.mv(ps, self.ones_n)
        self.pos_c.add_(ps.sum(0))
        del ps
        row_best, row_arg = s.max(1)  # the first maximum of each row
        col_best, col_arg = s.max(0)  # and of each column, over this tile's rows
        self.correct_r[r0:r1] = labels[row_arg] == labels[rows]
        hit = labels[col_arg + r0] == labels
        better = col_best > self.col_best  # strict: an earlier tile keeps a tie
        self.col_hit = torch.where(better, hit, self.col_hit)
        torch.maximum(self.col_best, col_best, out=self.col_best)
        if w is None:
            return row_best, col_best
        s.add_(w.masked_fill(pos, 0.0))
        return s.amax(1), s.amax(0)

    def _statistics(self, s: Tensor, row_max: Tensor, col_max: Tensor, r0: int, r1: int) -> None:
        """Phase *update statistics*: exact row sums, column sums merged into the running ones.

        Each direction is exponentiated against its own maxima, so every row's and every
        column's largest term is 1 whatever the spread of the logits (τ = 1e-3 included).
        """
        a, b = _finite(row_max), _finite(col_max)
        e = like_tile(self.buf2, s)
        torch.sub(s, a.unsqueeze(1), out=e).exp2_()  # 2^(z₂ − a_i)
        self.ref_r[r0:r1] = a
        self.lsum_r[r0:r1] = torch.mv(e, self.ones_n).log2()
        s.sub_(b.unsqueeze(0)).exp2_()  # 2^(z₂ − b_j)
        t_sum = s.sum(0)
        new_ref = torch.maximum(self.col_ref, b)
        self.col_sum.mul_((self.col_ref - new_ref).exp2()).add_(t_sum * (b - new_ref).exp2())
        self.col_ref = new_ref

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(loss_r, loss_c, correct_r, correct_c, lse₂)``; ``lse₂`` is ``(4, N)``, base 2."""
        eps, n = self.plan.eps, self.n
        n_pos = self.plan.n_pos.to(self.xs.dtype)
        lsum_c = self.col_sum.log2()
        gap_r = (self.ref_r + self.lsum_r) - (1.0 - eps) * self.pos_r / n_pos
        gap_c = (self.col_ref + lsum_c) - (1.0 - eps) * self.pos_c / n_pos
        if eps > 0:
            gap_r = gap_r - eps * self.tot_r / n
            gap_c = gap_c - eps * self.tot_c / n
        if self.plan.labels is None:
            d = self.pos_c
            correct_c = (d > self.col_before) & (d >= self.col_after)
        else:
            correct_c = self.col_hit
        lse = torch.stack([self.ref_r, self.lsum_r, self.col_ref, lsum_c])
        return LN2 * gap_r, LN2 * gap_c, self.correct_r, correct_c, lse


def _amax_cols(s: Tensor, c0: int, c1: int, also: Tensor) -> Tensor:
    """Row maxima of ``s[:, c0:c1]`` and ``also`` (``also`` alone for an empty range)."""
    if c1 <= c0:
        return also
    return torch.maximum(s[:, c0:c1].amax(1), also)


class SymBackward:
    """The recompute: ``G = g_r·(P_row − T) + g_c·(P_col − T)`` tile by tile, then two GEMMs.

    ``|g|`` joins each direction's shift (``|g|·2^(z₂ − L₂) = 2^(z₂ − (L₂ − log₂|g|))``);
    the signs are applied in the pass that adds the two directions, or — when the caller's
    loss is reduced and each direction has one upstream gradient — to the outputs at the end.
    """

    def __init__(self, x: Tensor, y: Tensor, scale: Tensor, plan: SymPlan, lse: Tensor) -> None:
        n, chunk = x.shape[0], min(plan.chunk, x.shape[0])
        self.x, self.y, self.plan, self.lse, self.n = x, y, plan, lse, n
        self.xs = x * (scale * LOG2E)
        self.cols = torch.arange(n, device=x.device)
        self.buf, self.buf2 = x.new_empty(chunk * n), x.new_empty(chunk * n)

    def shifts(self, g_r: Tensor, g_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(shift_r, shift_c, sign_r, sign_c)``; the signs are 0-d when ``plan.uniform``."""
        lse = self.lse
        shift_r = _gradient_shift(lse[0] + lse[1], g_r)
        shift_c = _gradient_shift(lse[2] + lse[3], g_c)
        if self.plan.uniform:  # every anchor of a direction has the same gradient
            g_r, g_c = g_r.sum(), g_c.sum()
        return shift_r, shift_c, _sign(g_r), _sign(g_c)

    def tile(
        self, r0: int, r1: int, g: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
    ) -> Tensor:
        """``G`` of one row tile (in the tile buffer)."""
        g_r, g_c, shift_r, shift_c, sign_r, sign_c = g
        s = logits_tile(self.buf, self.xs[r0:r1], self.y, True)  # compute logits
        rows = torch.arange(r0, r1, device=s.device)
        w = tile_weights(self.plan.weights, s, rows, self.cols, r0, r1)
        pos = None if self.plan.labels is None else _label_mask(self.plan.labels, rows, self.cols)
        if w is not None:
            _add_weights(s, w, pos, rows)
        e = like_tile(self.buf2, s)  # accumulate gradients
        torch.sub(s, shift_r[r0:r1].unsqueeze(1), out=e).exp2_()  # |g_r|·P_row
        s.sub_(shift_c.unsqueeze(0)).exp2_()  # |g_c|·P_col
        if self.plan.uniform:  # G·sign_c, the sign applied at the end
            s.addcmul_(e, sign_r * sign_c)
        else:
            s.mul_(sign_c.unsqueeze(0)).addcmul_(e, sign_r[r0:r1].unsqueeze(1))
        self._subtract_targets(s, pos, rows, g_r, g_c)
        return s

    def _subtract_targets(
        self, s: Tensor, pos: Tensor | None, rows: Tensor, g_r: Tensor, g_c: Tensor
    ) -> None:
        """``G −= (1−ε)·(g_r_i/|P(i)| + g_c_j/|P(j)|)`` on the positive pairs (in ``G``'s sign)."""
        keep = 1.0 - self.plan.eps
        if pos is None:  # T_ii of both directions (P_ii − 1 cancels when P_ii ≈ 1)
            t = keep * (g_r[rows] + g_c[rows])
            s.scatter_add_(1, rows.unsqueeze(1), -t.unsqueeze(1))
            return
        n_pos = self.plan.n_pos.to(s.dtype)
        t = (keep * g_r[rows] / n_pos[rows]).unsqueeze(1) + (keep * g_c / n_pos).unsqueeze(0)
        s.sub_(torch.where(pos, t, 0.0))


def _add_weights(s: Tensor, w: Tensor, pos: Tensor | None, rows: Tensor) -> None:
    """``ℓ₂ → z₂``: the (base-2) weights on every pair but the positives."""
    if pos is not None:
        s.add_(w.masked_fill(pos, 0.0))
        return
    diag = rows.unsqueeze(1)
    d = s.gather(1, diag)
    s.add_(w)
    s.scatter_(1, diag, d)


def _sign(g: Tensor) -> Tensor:
    """``±1`` (``+1`` for 0: a zero gradient's terms vanish through its shift)."""
    return torch.where(g >= 0, 1.0, -1.0).to(g.dtype)


def _gradient_shift(lse2: Tensor, g: Tensor) -> Tensor:
    """``lse₂ − log₂|g|`` (``+inf`` where ``g = 0``, so that its terms vanish)."""
    mag = g.abs()
    return torch.where(mag > 0, lse2 - mag.log2(), float("inf"))


def sym_backward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    plan: SymPlan,
    lse: Tensor,
    g_r: Tensor,
    g_c: Tensor,
    want: tuple[bool, bool, bool],
) -> Grads:
    """One recompute of every tile, the gradient GEMMs, the uniform targets at the end."""
    run = SymBackward(x, y, scale, plan, lse)
    g_r, g_c = g_r.to(x.dtype), g_c.to(x.dtype)
    shift_r, shift_c, sign_r, sign_c = run.shifts(g_r, g_c)
    # with one sign per direction the tiles hold sign_c·G: pass sign_c·g to the targets
    t_r, t_c = (g_r * sign_c, g_c * sign_c) if plan.uniform else (g_r, g_c)
    terms = (t_r, t_c, shift_r, shift_c, sign_r, sign_c)
    want_x, want_y, want_s = want
    u = torch.empty_like(x) if want_x or want_s else None  # G·Y, row tile by row tile
    dy = torch.empty_like(y) if want_y else None  # Gᵀ·X₂: the first tile writes
    for r0, r1 in tile_bounds(run.n, plan.chunk):
        s = run.tile(r0, r1, terms)
        if u is not None:
            torch.mm(s, y, out=u[r0:r1])
        if dy is not None:
            if r0 == 0:
                torch.mm(s.T, run.xs[r0:r1], out=dy)
            else:
                dy.addmm_(s.T, run.xs[r0:r1])
    fix = sign_c * LN2 if plan.uniform else x.new_tensor(LN2)
    if dy is not None:
        dy.mul_(fix)  # Gᵀ·X₂ → s·Gᵀ·X (and the sign)
    if u is not None and plan.uniform:
        u.mul_(sign_c)
    if plan.eps > 0:
        _smoothing_targets(u, dy, x * scale, y, g_r, g_c, plan.eps)
    ds = (x * u).sum() if u is not None and want_s else x.new_zeros(())
    dx = u.mul_(scale) if u is not None and want_x else None
    return dx, dy, ds


def _smoothing_targets(
    u: Tensor | None, dy: Tensor | None, xs: Tensor, y: Tensor, g_r: Tensor, g_c: Tensor, eps: float
) -> None:
    """The uniform label-smoothing target ``ε/N·(g_r_i + g_c_j)`` on all rows at once."""
    n = xs.shape[0]
    if u is not None:
        u.sub_((eps / n) * (g_r.unsqueeze(1) * y.sum(0).unsqueeze(0) + (g_c @ y).unsqueeze(0)))
    if dy is not None:
        dy.sub_((eps / n) * ((g_r @ xs).unsqueeze(0) + g_c.unsqueeze(1) * xs.sum(0)))


class SymmetricSoftmax(torch.autograd.Function):
    """``(loss_r, loss_c, correct_r, correct_c)`` of a paired batch, both directions."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, plan: SymPlan
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One pass over the row tiles; saves the ``(4, N)`` log-sum-exps."""
        run = SymForward(x, y, scale, plan)
        for r0, r1 in tile_bounds(x.shape[0], plan.chunk):
            run.tile(r0, r1)
        loss_r, loss_c, correct_r, correct_c, lse = run.finish()
        ctx.mark_non_differentiable(correct_r, correct_c)
        ctx.save_for_backward(x, y, scale, lse)
        ctx.plan = plan
        return loss_r, loss_c, correct_r, correct_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_r: Tensor, g_c: Tensor, _a: Tensor | None, _b: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        """One recompute of every tile with the per-anchor gradients of both directions."""
        first_order_only()
        x, y, scale, lse = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        dx, dy, ds = sym_backward(x, y, scale, ctx.plan, lse, g_r, g_c, want)
        return dx, dy, ds.to(scale.dtype) if want[2] else None, None
