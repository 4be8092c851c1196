r"""Exact tiled pairwise sigmoid loss (SigLIP): the three GEMMs of the floor, O((N + M)·D) memory.

**The loss and its gradient.** For images ``x_i`` (N, D), texts ``y_j`` (M, D), a scale ``s``
and a bias ``b`` the logits are ``ℓ = s·X·Yᵀ + b``; with ``z_ij = +1`` on positive pairs and
``−1`` elsewhere (every pair with ``negative_only``) each row's loss is

    L_i = Σ_j −log σ(z_ij·ℓ_ij) = Σ_j softplus(u_ij),    u_ij = −z_ij·ℓ_ij

— a sum over pairs, with no normalisation across the batch, so a tile needs no log-sum-exp and
no information from other tiles. ``∂L_i/∂ℓ_ij = −z_ij·σ(u_ij)`` (``σ(ℓ) − 1`` on positives,
``σ(ℓ)`` on negatives), so with ``G = g ∘ (−z ∘ σ(u))``

    dX = s·G·Y,    dY = s·Gᵀ·X,    ds = Σ_i x_i·(G·Y)_i,    db = Σ_ij G_ij

The gradient of a tile is known as soon as its logits are: when the caller only sums or
averages the rows (``reduced``), the forward pushes each tile's ``G`` through the two gradient
GEMMs right away — three GEMM units in all, the floor — and the backward scales the result by
the (device-side) common upstream gradient. Otherwise the backward recomputes each tile once
and folds the per-row ``g_i`` into the GEMMs' inputs and outputs.

**Phases of a tile** (``c`` rows, a row-major ``(c, M)`` buffer): *compute logits*
(``s·x_t·Yᵀ``, then ``+ b``), *mark pairs* (top-1 from the raw logits; positives negated in
place, so the buffer holds ``u``), *update statistics* (``softplus(u)`` summed per row),
*accumulate gradients* (``σ(u)`` into a second buffer, positives' sign flipped, two GEMMs).
Negating the positives first keeps both ``softplus`` and ``σ`` free of cancellation: no
``σ(ℓ) − 1`` is ever formed.
Peak memory: two ``(c, M)`` tile buffers (one without eager gradients), plus a ``(c, M)`` mask
for label positives, and O((N + M)·D) — never ``N·M``.

Every tensor stays on the inputs' device and no value is read back (the kernel runs on
``meta`` tensors). First-order gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from embedloss.ops.anchors import AnchorLosses, ChunkSize, PairSpec, pair_masks
from embedloss.ops.chunked import resolve_chunk_size
from embedloss.ops.tiles import (
    NEG_INF,
    as_scale,
    compute_dtype,
    first_order_only,
    logits_tile,
    max_and_prefix_max,
    put,
    tile_bounds,
    uniform_factor,
)

__all__ = ["chunked_siglip", "sigmoid_pairs"]

#: SigLIP's tiles finish value and gradient in one pass and beat its dense form from N ≈ 512
#: (measured on a 2-core CPU, one thread, D = 512, tiled / dense time: 1.07 at N = 256, 0.84 at
#: 512, 0.93 at 1024), so ``"auto"`` keeps it dense only up to 1/16 of the InfoNCE limit
#: (N·M ≤ 2¹⁶ in float32).
DENSE_FRACTION = 1 / 16

#: ``softplus(u) = u`` above this (the rest, ``log1p(e^-u)`` < 5e-18, is below float64 precision).
SOFTPLUS_LINEAR = 40.0
Grads = tuple[Tensor | None, Tensor | None, Tensor, Tensor]


@dataclass
class SigmoidPlan:
    """Everything the tiles need besides the tensors autograd tracks."""

    spec: PairSpec  # positives: positive_index, or labels (ignored with negative_only)
    negative_only: bool
    chunk: int
    eager: bool  # finish the gradients during the forward (the caller's loss is reduced)

    @property
    def masked(self) -> bool:
        """Positives from label equality (``(c, M)`` masks) rather than one index per row."""
        return not self.negative_only and self.spec.uses_labels


class SigmoidPass:
    """One pass over the row tiles: the forward, or the recompute of a backward."""

    def __init__(
        self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, plan: SigmoidPlan, grads: bool
    ) -> None:
        n, m = x.shape[0], y.shape[0]
        self.y, self.bias, self.plan = y, bias, plan
        self.xs = x * scale  # (N, D): the scale enters the GEMM once
        self.cols = torch.arange(m, device=x.device)
        chunk = min(plan.chunk, n)
        self.buf = x.new_empty(chunk * m)
        self.buf2 = x.new_empty(chunk * m) if grads else None  # the gradient tile
        index = plan.spec.positive_index
        self.pos = torch.arange(n, device=x.device) if index is None else index.long()
        self.pos_ok = (self.pos >= 0) & (self.pos < m)
        self.pos = self.pos.clamp(0, m - 1)

    def logits(self, r0: int, r1: int) -> Tensor:
        """Phase *compute logits*: ``ℓ = s·x_t·Yᵀ + b`` into the tile buffer."""
        s = logits_tile(self.buf, self.xs[r0:r1], self.y, False)
        return s.add_(self.bias)

    def mark(self, s: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        """Phase *mark pairs*: ``correct`` from ``ℓ``, then ``ℓ → u`` (positives negated).

        Returns ``correct`` and the positive mask of label layouts.
        """
        if self.plan.negative_only:
            return torch.zeros(r1 - r0, dtype=torch.bool, device=s.device), None
        if self.plan.masked:
            rows = torch.arange(r0, r1, device=s.device)
            pos, _ = pair_masks(self.plan.spec, rows, self.cols)
            correct = pos.gather(1, s.argmax(1, keepdim=True)).squeeze(1)  # the first maximum
            torch.where(pos, s.neg(), s, out=s)
            return correct, pos
        p, ok = self.pos[r0:r1], self.pos_ok[r0:r1]
        pos_l = s.gather(1, p.unsqueeze(1)).squeeze(1)
        put(s, p, ok, NEG_INF)
        best, before = max_and_prefix_max(s, p)  # the first maximum is p: beat before, tie after
        correct = ok & (pos_l >= best) & (pos_l > before)
        put(s, p, ok, -pos_l)
        return correct, None

    def gradient(self, s: Tensor, pos: Tensor | None, r0: int, r1: int) -> Tensor:
        """``−z ∘ σ(u)`` (the gradient for an upstream 1) into the second tile buffer."""
        assert self.buf2 is not None
        g = self.buf2[: s.numel()].view_as(s)
        torch.sigmoid(s, out=g)
        if pos is not None:
            torch.where(pos, g.neg(), g, out=g)
        elif not self.plan.negative_only:
            p, ok = self.pos[r0:r1], self.pos_ok[r0:r1]
            put(g, p, ok, -g.gather(1, p.unsqueeze(1)).squeeze(1))
        return g

    def statistics(self, s: Tensor) -> Tensor:
        """Phase *update statistics*: ``Σ_j softplus(u_ij)`` (the tile buffer is consumed)."""
        torch.ops.aten.softplus.out(s, 1, SOFTPLUS_LINEAR, out=s)
        return s.sum(1)


class SigmoidGrads:
    """``(dx, dy, ds, db)`` accumulated tile by tile; row weights ``g`` fold into the GEMMs."""

    def __init__(self, x: Tensor, y: Tensor, want: tuple[bool, bool, bool, bool]) -> None:
        self.want = want
        self.u = torch.empty_like(x) if want[0] or want[2] else None  # G·Y
        self.dy = torch.empty_like(y) if want[1] else None
        self.db = x.new_zeros(())
        self._dy_started = False

    def tile(self, g_t: Tensor, run: SigmoidPass, r0: int, r1: int, h: Tensor | None) -> None:
        """Phase *accumulate gradients*: ``G_t·Y``, ``G_tᵀ·(h ∘ s·x_t)`` and ``Σ G_t``."""
        xs_t = run.xs[r0:r1] if h is None else run.xs[r0:r1] * h.unsqueeze(1)
        if self.u is not None:
            torch.mm(g_t, run.y, out=self.u[r0:r1])
            if h is not None:
                self.u[r0:r1].mul_(h.unsqueeze(1))
        if self.dy is not None:
            if self._dy_started:
                self.dy.addmm_(g_t.T, xs_t)
            else:
                torch.mm(g_t.T, xs_t, out=self.dy)
                self._dy_started = True
        if self.want[3]:
            rows = g_t.sum(1)
            self.db += rows.sum() if h is None else rows @ h

    def finish(self, x: Tensor, scale: Tensor) -> Grads:
        """Close the sums: ``dx = s·U``, ``ds = Σ x·U``."""
        if self.dy is not None and not self._dy_started:
            self.dy.zero_()
        u = self.u
        ds = (x * u).sum() if u is not None and self.want[2] else x.new_zeros(())
        dx = u.mul_(scale) if u is not None and self.want[0] else None
        return dx, self.dy, ds, self.db


def sigmoid_forward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    plan: SigmoidPlan,
    want: tuple[bool, bool, bool, bool],
) -> tuple[Tensor, Tensor, Grads | None]:
    """Per-row losses and ``correct`` (+ the gradients for an upstream 1 with ``plan.eager``)."""
    n = x.shape[0]
    run = SigmoidPass(x, y, scale, bias, plan, plan.eager)
    loss = x.new_empty(n)
    correct = torch.empty(n, dtype=torch.bool, device=x.device)
    grads = SigmoidGrads(x, y, want) if plan.eager else None
    for r0, r1 in tile_bounds(n, plan.chunk):
        s = run.logits(r0, r1)  # compute logits
        correct[r0:r1], pos = run.mark(s, r0, r1)  # mark pairs
        g_t = run.gradient(s, pos, r0, r1) if grads is not None else None
        loss[r0:r1] = run.statistics(s)  # update statistics
        if grads is not None and g_t is not None:
            grads.tile(g_t, run, r0, r1, None)  # accumulate gradients
    return loss, correct, None if grads is None else grads.finish(x, scale)


def sigmoid_backward(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    plan: SigmoidPlan,
    grad_loss: Tensor,
    want: tuple[bool, bool, bool, bool],
) -> Grads:
    """Recompute every tile with the per-row upstream gradient ``grad_loss``."""
    run = SigmoidPass(x, y, scale, bias, plan, True)
    grads = SigmoidGrads(x, y, want)
    h = grad_loss.to(x.dtype)
    for r0, r1 in tile_bounds(x.shape[0], plan.chunk):
        s = run.logits(r0, r1)
        _, pos = run.mark(s, r0, r1)
        grads.tile(run.gradient(s, pos, r0, r1), run, r0, r1, h[r0:r1])
    return grads.finish(x, scale)


class SigmoidPairs(torch.autograd.Function):
    """``(loss, correct)`` per row of the pairwise sigmoid loss."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, plan: SigmoidPlan
    ) -> tuple[Tensor, Tensor]:
        """Every row tile once; with ``plan.eager`` the gradients too (for an upstream 1)."""
        want = (x.requires_grad, y.requires_grad, scale.requires_grad, bias.requires_grad)
        loss, correct, grads = sigmoid_forward(x, y, scale, bias, plan, want)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.plan, ctx.grads = plan, grads
        return loss, correct

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _gc: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None]:
        """Scale the eager gradients by the shared upstream gradient, or recompute."""
        first_order_only()
        x, y, scale, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        want = (bool(need[0]), bool(need[1]), bool(need[2]), bool(need[3]))
        grads, ctx.grads = ctx.grads, None  # a second backward recomputes
        if grads is None:
            dx, dy, ds, db = sigmoid_backward(x, y, scale, bias, ctx.plan, grad_loss, want)
        else:  # computed for an upstream gradient of 1 per row; the caller's is uniform
            f = uniform_factor(grad_loss, torch.ones_like(grad_loss, dtype=torch.bool))
            f = f.to(x.dtype)
            dx, dy, ds, db = grads
            dx = None if dx is None else dx.mul_(f)
            dy = None if dy is None else dy.mul_(f)
            ds, db = ds * f, db * f
        return (
            dx if want[0] else None,
            dy if want[1] else None,
            ds.to(scale.dtype) if want[2] else None,
            db.to(bias.dtype) if want[3] else None,
            None,
        )


def chunked_siglip(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    bias: Tensor | float,
    spec: PairSpec,
    *,
    negative_only: bool = False,
    chunk_size: int,
    reduced: bool = False,
) -> AnchorLosses:
    """Tiled pairwise sigmoid loss of ``x (N, D)`` against ``y (M, D)`` (inputs checked by the caller).

    Args:
        x: ``(N, D)`` images (normalised by the caller if wanted).
        y: ``(M, D)`` texts (all ranks' texts under ``gather_distributed``).
        scale: ``s = 1/τ``, a float or a 0-d tensor (may require grad).
        bias: ``b``, a float or a 0-d tensor (may require grad).
        spec: The positives: ``positive_index`` (default: the diagonal), or labels.
        negative_only: Every pair is a negative (``spec`` is ignored).
        chunk_size: Rows per tile.
        reduced: The caller only sums or averages the rows, so their upstream gradient is the
            same for every row: the gradients are then finished during the forward.

    Returns:
        :class:`~embedloss.ops.anchors.AnchorLosses`: ``(N,)`` row sums ``Σ_j −log σ(z_ij·ℓ_ij)``,
        all valid, and ``correct`` (the first maximum of ``ℓ_i`` is a positive).
    """
    dtype = compute_dtype(x, y)
    xc, yc = x.to(dtype), y.to(dtype)
    s, b = as_scale(scale, xc), as_scale(bias, xc)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xc, yc, s, b))
    plan = SigmoidPlan(
        spec=spec,
        negative_only=bool(negative_only),
        chunk=max(1, int(chunk_size)),
        eager=needs_grad and bool(reduced),
    )
    loss, correct = SigmoidPairs.apply(xc, yc, s, b, plan)
    return AnchorLosses(loss, torch.ones_like(correct), correct)


def sigmoid_pairs(
    x: Tensor,
    y: Tensor,
    scale: Tensor | float,
    bias: Tensor | float,
    spec: PairSpec | None = None,
    *,
    negative_only: bool = False,
    chunk_size: ChunkSize = None,
    reduced: bool = False,
) -> AnchorLosses:
    """Per-row pairwise sigmoid losses of ``x`` against ``y``, dense or tiled by ``chunk_size``.

    The arguments are those of :func:`chunked_siglip`, with ``chunk_size`` ``None`` (the dense
    ``(N, M)`` logits), an int (tiles of that many rows) or ``"auto"`` (dense for tiny
    problems, tiles above, as the InfoNCE core). Both paths agree in value and gradient.

    Example:
        >>> out = sigmoid_pairs(torch.eye(2), torch.eye(2), 1.0, 0.0)
        >>> torch.allclose(out.loss, torch.full((2,), 0.6931 + 0.3133), atol=1e-4)
        True
    """
    spec = PairSpec() if spec is None else spec
    chunk = resolve_chunk_size(chunk_size, x.shape[0], y.shape[0], x.dtype, DENSE_FRACTION)
    if chunk is not None:
        return chunked_siglip(
            x, y, scale, bias, spec, negative_only=negative_only, chunk_size=chunk, reduced=reduced
        )
    rows = torch.arange(x.shape[0], device=x.device)
    cols = torch.arange(y.shape[0], device=x.device)
    positive, _ = pair_masks(spec, rows, cols)  # (N, M)
    if negative_only:
        positive = torch.zeros_like(positive)
    logits = (x @ y.T) * scale + bias  # (N, M)
    signs = positive.to(logits.dtype) * 2 - 1  # z_ij: +1 positive, −1 negative
    loss = -F.logsigmoid(signs * logits).sum(dim=1)  # (N,)
    with torch.no_grad():
        correct = positive.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    return AnchorLosses(loss, torch.ones_like(correct), correct)
