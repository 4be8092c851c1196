r"""Exact tiled InfoNCE: O(chunk·M) memory, never an N×M buffer, the dense values and gradients.

**The loss and its gradient.** For queries ``q_i`` (N, D), keys ``k_a`` (M, D) and a scale
``s = 1/τ`` the logits are ``ℓ = s·Q·Kᵀ``; with negative log-weights ``w`` (zero on positives)
the scored logits are ``z = ℓ + w``. Per anchor (formula in :mod:`embedloss.ops.anchors`)

    L_i = log Σ_{a∈A(i)} exp(z_ia) − Σ_a T_ia·ℓ_ia,   T_ia = (1−ε)·[a∈P(i)]/|P(i)| + ε·[a∈A(i)]/|A(i)|

so ``∂L_i/∂ℓ_ia = P_ia − T_ia`` with ``P = softmax_{A(i)}(z)``: softmax minus target (the
weights are constants). With an upstream gradient ``g_i`` and ``G = g ∘ (P − T)`` the chain
rule through ``ℓ = s·Q·Kᵀ`` gives

    dQ = s·G·K,    dK = s·Gᵀ·Q,    ds = Σ_i q_i·(G·K)_i

Three GEMMs of the logits' size — ``ℓ = s·Q·Kᵀ``, ``G·K`` and ``Gᵀ·Q`` — are the floor of any
exact implementation; everything else is O(N·M) elementwise work or O((N+M)·D).

**Tiles.** The queries are cut into row tiles of ``c`` rows; a tile's logits ``(c, M)`` live in
one reused buffer, so each row's log-sum-exp is computed from the whole row at once (exact, no
online rescaling) and the masks of a tile are rebuilt from indices
(:func:`~embedloss.ops.anchors.pair_masks`).
Peak memory: one (row softmax) or two (symmetric) ``(c, M)`` tile buffers, plus ``(c, M)``
masks for label layouts, and O((N + M)·D) for inputs and gradients — never ``N·M``.

**Row softmax** (``info_nce``, ``nt_xent``; :mod:`embedloss.ops.chunked_rows`). A row's
softmax is complete inside its tile, so when the caller only sums or averages the per-anchor
losses (``reduced=True``: every valid anchor's upstream gradient is one number ``g``) the
forward forms ``G_t = P_t − T_t`` right after the statistics and pushes it through ``G_t·K``
and ``G_tᵀ·Q_t``: three GEMM units in all, the floor. The backward multiplies these gradients
by ``g``, read on the device as the mean of the upstream gradient over the valid anchors
(never checked: ``reduced`` is the caller's promise). With ``reduced=False`` the forward only
keeps the log-sum-exps and the backward recomputes every tile with the per-anchor ``g_i``.

**Symmetric softmax** (CLIP, ``symmetric_info_nce``; :mod:`embedloss.ops.chunked_symmetric`).
The loss is ``L = Σ_i g_r·L_row_i + Σ_j g_c·L_col_j`` over one logit matrix, so
``∂L/∂ℓ = g_r·(P_row − T) + g_c·(P_col − T)``. A column's softmax needs every row tile, so the
gradient cannot be formed during the forward: the forward computes the logits once (row
log-sum-exps per tile, column log-sum-exps merged across tiles), the backward computes them
again and then runs the two gradient GEMMs — four GEMM units, against six for open_clip's
``ClipLoss`` (two logit matrices, each with its two gradient GEMMs).

Each direction is exponentiated against its own references (rows against row maxima, columns
against column maxima): one exponential serving both directions is exact only while every
row's and column's leading terms fit one rank-1 shift of the exponent range, which a spread of
logits wider than ~170 (float32) breaks — τ = 1e-3 on unit vectors spreads them over ±1000 —
and checking that per tile would read values back to the host.

**Invariants.**

* Logits are held in base-2 units, ``ℓ₂ = log₂e·ℓ`` (``log₂e`` joins the scale in the GEMM's
  inputs), so that every exponential is an ``exp2`` — about three times cheaper than ``exp``
  on CPUs, with the same rounding; results leave in natural units.
* A log-sum-exp is stored as a reference plus the log of a sum, ``lse = ref + log Σ exp(z −
  ref)`` with ``ref`` the largest term, so the sum lies in ``[1, M]`` and neither overflows
  nor loses its leading term, at any temperature (τ = 1e-3 and large norms included). The
  backward recomputes ``exp(z − ref_i)`` with the saved ``ref``, so its softmax is as precise
  as the forward's.
* The tile buffer holds ``ℓ₂`` after *compute logits*, ``z₂`` (positives, exclusions at
  ``−inf``, weights) after *mark pairs*, ``exp(z − ref)`` after *update statistics* and
  ``G`` (in tile units) after the target is subtracted in *accumulate gradients*. The positive's
  target is subtracted inside the tile, before any sum (``P_ip − 1`` cancels when the softmax
  is sharp); uniform targets (label smoothing) are applied to whole rows after the last tile.
* The eager gradients of the row softmax are valid only for an upstream gradient that is the
  same for every valid anchor — exactly when the caller passes ``reduced=True``; a second
  backward of the same graph recomputes.
* ``correct`` is the dense path's ``argmax``: the first maximum (lowest index) of
  ``A(i) ∪ P(i)`` must be a positive, decided on the device from maxima over the columns
  before and after the positive (no argmax pass, no host reads).

**Devices.** Every tensor is created on the inputs' device and nothing reads a value back:
no ``.item()``, no data-dependent branch or shape, so the kernels run on ``meta`` tensors.
Half-precision inputs are computed in float32. Tiled and dense agree to ~1e-15 (float64) /
~1e-6 (float32): the same expressions in a different summation order. The tiled functions give
first-order gradients (``create_graph=True`` raises; use ``chunk_size=None``). Negative
log-weights are constants (a weight tensor that requires grad makes
:func:`~embedloss.ops.info_nce.info_nce` use the dense path); a weight function is called once
per tile in the forward and again in a recomputing backward, must be deterministic, compute
each entry from its tile row (full key width); it gets a copy of the tile's logits (natural
units), which it may keep or modify.
"""

from __future__ import annotations

import torch
from torch import Tensor

from embedloss.ops.anchors import AnchorLosses, PairSpec
from embedloss.ops.chunked_rows import RowPlan, RowSoftmax
from embedloss.ops.chunked_symmetric import SymmetricSoftmax, SymPlan
from embedloss.ops.tiles import Weights, as_scale, compute_dtype, label_counts

__all__ = [
    "DENSE_LIMIT_BYTES",
    "MIN_TILE_ROWS",
    "TILE_BYTES",
    "chunked_info_nce",
    "chunked_symmetric_info_nce",
    "resolve_chunk_size",
]

#: ``chunk_size="auto"`` stays dense while the dense path's working set — about
#: ``DENSE_BUFFERS`` buffers of N×M elements — is below this (24 MiB: N·M ≤ 2²⁰ in float32, i.e.
#: CLIP up to N = 1024, SimCLR up to 512 pairs). Measured on a 2-core CPU, one thread,
#: forward+backward, D = 512 (tiled / dense time): CLIP 1.35 at N = 256, 1.06 at 1024, 0.91 at
#: 2048; SimCLR (2N rows) 1.28 at N = 256, 1.06 at 512, 0.81 at 1024. Below the crossover the
#: dense path's few large kernels beat the tiles' per-tile work; above it the tiles win (and keep
#: memory O(N·tile)).
DENSE_LIMIT_BYTES = 24 * 2**20
DENSE_BUFFERS = 6
#: Target size of one tile buffer for ``"auto"`` (16 MiB: the tile and its coefficient buffer
#: stay in a 32 MiB L3 cache); the row count is clamped to [``MIN_TILE_ROWS``,
#: ``MAX_TILE_ROWS``], the minimum keeping the three GEMMs per tile efficient for wide keys.
TILE_BYTES = 16 * 2**20
MIN_TILE_ROWS = 512
MAX_TILE_ROWS = 4096


def resolve_chunk_size(
    chunk_size: int | str | None,
    n: int,
    m: int,
    dtype: torch.dtype = torch.float32,
    dense_fraction: float = 1.0,
) -> int | None:
    """The tile height for ``chunk_size`` (``None``: use the dense path).

    ``"auto"`` is dense while ``n·m·itemsize·DENSE_BUFFERS <= DENSE_LIMIT_BYTES·dense_fraction``
    (a kernel whose tiles are cheaper relative to its dense form passes a fraction below 1) and
    otherwise tiles of ``TILE_BYTES / (m·itemsize)`` rows, clamped and rounded down to a
    multiple of 64.

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
    if n * m * itemsize * DENSE_BUFFERS <= DENSE_LIMIT_BYTES * dense_fraction:
        return None
    rows = max(MIN_TILE_ROWS, min(MAX_TILE_ROWS, TILE_BYTES // (m * itemsize)))
    if rows >= 64:
        rows = rows // 64 * 64  # GEMM-friendly
    return max(1, min(rows, n))


def _constant_weights(weights: Weights, shape: tuple[int, int], names: str) -> Weights:
    """A weight tensor checked against ``shape`` and detached (the tiles treat it as constant)."""
    if not isinstance(weights, Tensor):
        return weights
    if weights.shape != shape:
        raise ValueError(
            f"negative_log_weights must have shape {shape} ({names}), got {tuple(weights.shape)}"
        )
    return weights.detach()


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

    Row tiles of ``chunk_size`` queries against all keys; exact log-sum-exp per row. With
    ``reduced`` (the caller only sums or averages the per-anchor losses) the gradients are
    computed during the forward (three GEMM units in all); otherwise the backward recomputes.
    """
    dtype = compute_dtype(query, keys)
    q, k = query.to(dtype), keys.to(dtype)
    s = as_scale(scale, q)
    shape = (q.shape[0], k.shape[0])
    weights = _constant_weights(negative_log_weights, shape, "queries, keys")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or s.requires_grad)
    plan = RowPlan(
        spec=spec,
        sparse=spec.query_labels is None or spec.key_labels is None,
        weights=weights,
        eps=float(label_smoothing),
        chunk=max(1, int(chunk_size)),
        eager=needs_grad and bool(reduced),
    )
    loss, valid, correct = RowSoftmax.apply(q, k, s, plan)
    return AnchorLosses(loss, valid, correct)


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
    backward: four GEMM units. A column's softmax is only complete after the last tile, so the
    backward recomputes either way; ``reduced`` (one upstream gradient per direction) saves a
    pass per tile there.
    """
    dtype = compute_dtype(x, y)
    xc, yc = x.to(dtype), y.to(dtype)
    s = as_scale(scale, xc)
    n = xc.shape[0]
    weights = _constant_weights(negative_log_weights, (n, n), "x, y")
    if labels is None:
        n_pos = torch.ones(n, dtype=torch.long, device=xc.device)
    else:
        n_pos = label_counts(labels.to(xc.device))
    plan = SymPlan(
        labels=labels,
        n_pos=n_pos,
        weights=weights,
        eps=float(label_smoothing),
        chunk=max(1, int(chunk_size)),
        uniform=bool(reduced),
    )
    loss_r, loss_c, correct_r, correct_c = SymmetricSoftmax.apply(xc, yc, s, plan)
    valid = torch.ones(n, dtype=torch.bool, device=xc.device)
    return AnchorLosses(loss_r, valid, correct_r), AnchorLosses(loss_c, valid.clone(), correct_c)
