r"""Gradient caching: the exact gradient of a large-batch step in the memory of a micro-batch.

A contrastive loss couples every sample with every other, so the batch cannot simply be cut
into micro-batches with gradients accumulated: each micro-batch's loss would see only its own
negatives. The loss is cheap in memory (embedloss's tiled core is O(N)); what grows with the
batch is the encoders' activations. Gradient caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", Sec. 3.2) splits the step at the
embeddings ``e = f_θ(x)``. By the chain rule, with ``x`` cut into micro-batches ``x_j``,

    ∂L/∂θ = Σ_j (∂e_j/∂θ)ᵀ · g_j,        g_j = ∂L/∂e_j  (rows j of ∂L/∂e)

so the step runs in three phases:

1. **embed**: each encoder runs over the micro-batches without building a graph; the RNG state
   before every micro-batch is remembered;
2. **loss**: the loss runs once on the full batch of (detached, grad-requiring) embeddings and
   is back-propagated: the loss's own parameters receive their gradient and ``g = ∂L/∂e`` is
   cached;
3. **replay**: each micro-batch runs again, with a graph and the RNG state of its first run
   (same dropout masks), and ``e_j.backward(g_j)`` accumulates its share of ``∂L/∂θ``.

Peak memory is the activations of one micro-batch, plus the embeddings and their cached
gradients (O(N·D)) and the loss's own working memory; the price is one extra forward pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parallel import DistributedDataParallel

from embedloss._validation import check_bool, check_int, describe
from embedloss.base.base_loss import BaseLoss, LossOutput
from embedloss.ops.distributed import world_info

__all__ = ["GradCache"]

#: One input of an encoder: a tensor, or a mapping / tuple of tensors split along dim 0.
Batch = Tensor | Mapping[str, Tensor] | tuple[Tensor, ...] | list[Tensor]


class _Scaler(Protocol):
    """What gradient caching needs of a ``torch.amp.GradScaler``."""

    def scale(self, outputs: Tensor) -> Tensor: ...


class _RngState(NamedTuple):
    cpu: Tensor
    cuda: list[Tensor] | None  # every initialised CUDA device's generator


class _FirstRun(NamedTuple):
    """What the replay of a micro-batch must reproduce."""

    rng: _RngState
    shape: torch.Size


def _rng_state() -> _RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return _RngState(torch.get_rng_state(), cuda)


def _set_rng_state(state: _RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)


def _split(x: Any, size: int, name: str) -> list[Any]:
    """Cut one input into micro-batches of ``size`` rows (the last may be shorter).

    An empty input is one empty micro-batch when this process is one rank of several (see
    :meth:`GradCache.step`), and an error otherwise.
    """
    if isinstance(x, Tensor):
        tensors: dict[str, Any] = {name: x}
    elif isinstance(x, Mapping):
        tensors = {f"{name}[{k!r}]": v for k, v in x.items()}
    elif isinstance(x, (tuple, list)):
        tensors = {f"{name}[{i}]": v for i, v in enumerate(x)}
    else:
        raise TypeError(
            f"{name} must be a tensor, or a dict / tuple of tensors split along dim 0, "
            f"got {describe(x)}"
        )
    rows = set()
    for where, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise TypeError(
                f"{where} must be a tensor with a batch dimension (dim 0), got {describe(t)}"
            )
        rows.add(t.shape[0])
    if len(rows) != 1 or (0 in rows and world_info()[0] == 1):
        shapes = {where: tuple(t.shape) for where, t in tensors.items()}
        raise ValueError(
            f"{name} must hold a non-empty batch (an empty one only on a rank of a process "
            "group of several), the same number of rows in every tensor (split along dim 0), "
            f"got shapes {shapes}"
        )
    if isinstance(x, Tensor):
        return list(x.split(size))
    if isinstance(x, Mapping):
        cut = {k: v.split(size) for k, v in x.items()}
        return [
            {k: parts[j] for k, parts in cut.items()} for j in range(len(next(iter(cut.values()))))
        ]
    return list(zip(*(t.split(size) for t in x), strict=True))


def _embed(encoder: nn.Module, part: Any, i: int) -> Tensor:
    """``encoder(part)``: a tensor is passed as is, a tuple unpacked, a mapping as keywords."""
    if isinstance(part, Mapping):
        out = encoder(**part)
    elif isinstance(part, tuple):
        out = encoder(*part)
    else:
        out = encoder(part)
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() == 0:
        raise TypeError(
            f"encoders[{i}] must return a floating-point (rows, ...) tensor of embeddings, "
            f"got {describe(out)}; wrap the encoder to select its embedding output"
        )
    return out


def _batch_norms(encoder: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``encoder`` that use batch statistics (training mode)."""
    return [
        f"{name or '<encoder>'}: {type(m).__name__}"
        for name, m in encoder.named_modules()
        if isinstance(m, _BatchNorm) and m.training
    ]


def _running_statistics(encoders: Sequence[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """``(buffer, copy)`` for the running statistics the embed pass is about to update."""
    seen: set[int] = set()
    out = []
    for encoder in encoders:
        for m in encoder.modules():
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                for b in m.buffers(recurse=False):
                    if id(b) not in seen:
                        seen.add(id(b))
                        out.append((b, b.detach().clone()))
    return out


def _loss_output(loss: Callable[..., Any], embeddings: list[Tensor], kwargs: dict[str, Any]):
    out = (
        loss.compute(*embeddings, **kwargs)
        if isinstance(loss, BaseLoss)
        else loss(*embeddings, **kwargs)
    )
    if isinstance(out, Tensor):
        out = LossOutput(out, {})
    if not isinstance(out, LossOutput) or not isinstance(out.loss, Tensor):
        raise TypeError(f"loss must return a tensor or a LossOutput, got {describe(out)}")
    if out.loss.dim() != 0:
        raise ValueError(
            f"loss must return a scalar to back-propagate, got shape {tuple(out.loss.shape)} "
            "(use reduction='mean' or 'sum')"
        )
    return out


class GradCache:
    r"""Train with a batch of any size in the activation memory of ``micro_batch_size`` samples.

    :meth:`step` leaves in ``.grad`` of every encoder and loss parameter exactly what

        ``loss(*[enc(x) for enc, x in zip(encoders, inputs)], **loss_kwargs).backward()``

    would have left (accumulating into existing gradients, as ``backward`` does), while only one
    micro-batch's activations are alive at a time (see the module docstring for the three
    phases). The loss is called once per step on the full batch, so stateful losses (a MoCo
    queue) update once, as without caching.

    **Exactness.** The result is exact when each encoder maps every sample independently of the
    others in its batch. Randomness is replayed: before each micro-batch's first run the state of
    the default CPU generator (and of every initialised CUDA device's) is recorded and restored
    for its re-run, so dropout masks match; after :meth:`step` the generators are where the first
    pass and the loss left them (the replay consumes nothing). Explicit ``torch.Generator``
    objects are not replayed. A BatchNorm layer in training mode normalises by the statistics of
    its micro-batch, not the full batch, so the result would differ from full-batch training: by
    default :meth:`step` raises; ``allow_batch_norm=True`` runs anyway, with a warning, the exact
    gradient of that "ghost batch norm" objective, and each micro-batch updates the running
    statistics once (as when training on the micro-batches in turn). Put BatchNorm layers in
    eval mode or use GroupNorm/LayerNorm for exact large-batch training.

    **Distributed.** With ``gather_distributed=True`` the loss gathers the cached embeddings of
    every rank itself; each rank back-propagates its own micro-batches. An encoder wrapped in
    ``DistributedDataParallel`` (or wrapping one, as a head around a DDP model; encoders that
    share one DDP module count as one) runs under ``no_sync()`` except for its last micro-batch
    of the step, so its gradients are all-reduced once; the loss's convention (each rank's gradient is
    world_size × its share) and DDP's averaging then give exactly the single-process gradient of
    the concatenated batch. Ranks may hold different numbers of samples, none included: a rank
    with an empty batch runs each encoder once on it (embeddings with no rows, for the loss to
    gather) and replays that empty micro-batch too, so it joins the loss's collectives and
    DDP's all-reduce (of a zero gradient) like the others. (Without a process group of several
    ranks an empty batch is an error.)

    **Mixed precision.** Call :meth:`step` inside ``torch.autocast``: both passes and the loss run
    under it. With a ``scaler`` (``torch.amp.GradScaler``) the loss is scaled before its
    backward, so the cached gradients and the encoders' gradients are scaled as by
    ``scaler.scale(loss).backward()``; then call ``scaler.step(optimizer)`` and
    ``scaler.update()`` as usual.

    Args:
        encoders: One module per input of :meth:`step` (a list, tuple or ``nn.ModuleList``); the
            same module may appear more than once (two views through one encoder). A tensor
            input is passed as ``encoder(x)``, a tuple as ``encoder(*x)``, a dict as
            ``encoder(**x)``; the encoder returns a ``(rows, ...)`` tensor of embeddings.
        loss: Any embedloss loss (its ``compute`` is called, so the terms come back too), or any
            callable taking the embeddings (and the keyword arguments of :meth:`step`) and
            returning a scalar tensor.
        micro_batch_size: Rows per micro-batch (>= 1); the last micro-batch may be shorter.
        scaler: Optional ``torch.amp.GradScaler`` for float16 training.
        allow_batch_norm: Run encoders with BatchNorm layers in training mode (with a
            ``UserWarning``) instead of raising (default False).

    Raises:
        TypeError: If ``encoders`` is not a sequence of modules, ``loss`` is not callable,
            ``micro_batch_size`` is not an int or ``scaler`` has no ``scale`` method.
        ValueError: If ``encoders`` is empty or ``micro_batch_size < 1``.

    Example:
        >>> import embedloss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> image_encoder, text_encoder = torch.nn.Linear(32, 16), torch.nn.Linear(24, 16)
        >>> loss = embedloss.CLIPLoss(learnable_temperature=True)
        >>> images, texts = torch.randn(10, 32), torch.randn(10, 24)
        >>> cache = GradCache([image_encoder, text_encoder], loss, micro_batch_size=4)
        >>> out = cache.step(images, texts)  # 3 micro-batches per encoder
        >>> out.loss.requires_grad, "accuracy" in out.terms, loss.logit_scale.grad is not None
        (False, True, True)
        >>> cached = image_encoder.weight.grad.clone()
        >>> image_encoder.zero_grad()
        >>> loss(image_encoder(images), text_encoder(texts)).backward()  # plain backprop
        >>> torch.allclose(cached, image_encoder.weight.grad, atol=1e-6)
        True
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        loss: Callable[..., Any],
        *,
        micro_batch_size: int,
        scaler: _Scaler | None = None,
        allow_batch_norm: bool = False,
    ) -> None:
        if isinstance(encoders, nn.Module) and not isinstance(encoders, nn.ModuleList):
            raise TypeError(
                "encoders must be a sequence of modules, one per input of step() "
                f"(e.g. [encoder] or [image_encoder, text_encoder]), got a single "
                f"{type(encoders).__name__}: wrap it in a list"
            )
        if not isinstance(encoders, (Sequence, nn.ModuleList)) or not all(
            isinstance(e, nn.Module) for e in encoders
        ):
            raise TypeError(f"encoders must be a sequence of nn.Module, got {describe(encoders)}")
        if len(encoders) == 0:
            raise ValueError("encoders must hold at least one module, got an empty sequence")
        if not callable(loss):
            raise TypeError(
                f"loss must be callable (a loss module or function), got {describe(loss)}"
            )
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {describe(scaler)}"
            )
        self.encoders: tuple[nn.Module, ...] = tuple(encoders)
        self.loss = loss
        self.micro_batch_size = check_int(micro_batch_size, "micro_batch_size", low=1)
        self.scaler = scaler
        self.allow_batch_norm = check_bool(allow_batch_norm, "allow_batch_norm")

    def step(self, *inputs: Batch, **loss_kwargs: Any) -> LossOutput:
        """Embed, compute the loss on the full batch, and accumulate the exact gradients.

        Args:
            *inputs: One batch per encoder: a tensor, or a dict / tuple of tensors, split along
                dim 0 into micro-batches (inputs may differ in batch size; on a rank of a
                process group, a batch may be empty).
            **loss_kwargs: Passed to the loss unchanged (``labels=...``): full-batch tensors.

        Returns:
            The loss's ``LossOutput``, its loss detached (the backward has been done).

        Raises:
            ValueError: If the number of inputs differs from the number of encoders, a batch is
                empty (outside a process group of several ranks) or its tensors disagree in
                rows, an encoder has a BatchNorm layer in
                training mode (unless ``allow_batch_norm``), or the loss is not a scalar.
            TypeError: If an input is not a tensor or a dict / tuple of tensors, an encoder does
                not return a floating-point tensor, or the loss returns something else.
        """
        if len(inputs) != len(self.encoders):
            raise ValueError(
                f"step() got {len(inputs)} input(s) for {len(self.encoders)} encoder(s): "
                "pass one batch per encoder, in the order of encoders"
            )
        self._check_batch_norm()
        parts = [_split(x, self.micro_batch_size, f"inputs[{i}]") for i, x in enumerate(inputs)]
        embeddings, first = self._embed(parts)
        out = _loss_output(self.loss, embeddings, loss_kwargs)
        (out.loss if self.scaler is None else self.scaler.scale(out.loss)).backward()
        after = _rng_state()
        loss, terms = out.loss.detach(), out.terms
        cached = [e.grad for e in embeddings]
        del out, embeddings  # frees the loss's graph and the embeddings; their gradients stay
        try:
            self._replay(parts, first, cached)
        finally:
            _set_rng_state(after)
        return LossOutput(loss, terms)

    def _check_batch_norm(self) -> None:
        for i, encoder in enumerate(self.encoders):
            names = _batch_norms(encoder)
            if not names:
                continue
            what = (
                f"encoders[{i}] has BatchNorm layer(s) in training mode ({', '.join(names)}): "
                "they normalise each micro-batch by its own statistics, so gradient caching "
                "does not reproduce full-batch training"
            )
            if not self.allow_batch_norm:
                raise ValueError(
                    f"{what}. Put them in eval mode, use GroupNorm / LayerNorm, or pass "
                    "allow_batch_norm=True to train with per-micro-batch statistics"
                )
            warnings.warn(f"{what}; running with per-micro-batch statistics", stacklevel=3)

    def _embed(self, parts: list[list[Any]]) -> tuple[list[Tensor], list[list[_FirstRun]]]:
        """Phase 1: every micro-batch without a graph; the RNG state before each."""
        running = _running_statistics(self.encoders)
        embeddings, first = [], []
        with torch.no_grad():
            for i, (encoder, chunks) in enumerate(zip(self.encoders, parts, strict=True)):
                runs, outs = [], []
                for chunk in chunks:
                    state = _rng_state()
                    outs.append(_embed(encoder, chunk, i))
                    runs.append(_FirstRun(state, outs[-1].shape))
                first.append(runs)
                embeddings.append(torch.cat(outs).requires_grad_())
        for buffer, saved in running:  # the replay updates them, once per micro-batch
            buffer.copy_(saved)
        return embeddings, first

    def _replay(
        self, parts: list[list[Any]], first: list[list[_FirstRun]], cached: list[Tensor | None]
    ) -> None:
        """Phase 3: every micro-batch again, with a graph, back-propagating its cached rows."""
        jobs = [
            (i, j, grad)
            for i, grad in enumerate(cached)
            if grad is not None and _needs_grad(self.encoders[i], parts[i])
            for j in range(len(parts[i]))
        ]
        ddp = [_ddp_module(e) for e in self.encoders]
        synced = [id(d or e) for d, e in zip(ddp, self.encoders, strict=True)]
        last = {synced[i]: (i, j) for i, j, _ in jobs}  # DDP all-reduces there only
        for i, j, grad in jobs:
            encoder, run = self.encoders[i], first[i][j]
            _set_rng_state(run.rng)
            with _no_sync(ddp[i], sync=last[synced[i]] == (i, j)):
                e = _embed(encoder, parts[i][j], i)
                if e.shape != run.shape:
                    raise RuntimeError(
                        f"encoders[{i}] returned shape {tuple(e.shape)} on the re-run of "
                        f"micro-batch {j} but {tuple(run.shape)} on its first run"
                    )
                start = j * self.micro_batch_size
                e.backward(grad[start : start + e.shape[0]])


def _needs_grad(encoder: nn.Module, chunks: list[Any]) -> bool:
    """Whether replaying ``encoder`` produces a gradient (a frozen one is skipped)."""
    if any(p.requires_grad for p in encoder.parameters()):
        return True
    tensors = [
        t
        for c in chunks
        for t in (c.values() if isinstance(c, Mapping) else c if isinstance(c, tuple) else (c,))
    ]
    return any(t.requires_grad for t in tensors)


def _ddp_module(encoder: nn.Module) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` module ``encoder`` is or wraps, or None.

    A module that calls a DDP model (an embedding head around it) wraps it.
    """
    if isinstance(encoder, DistributedDataParallel):
        return encoder
    return next((m for m in encoder.modules() if isinstance(m, DistributedDataParallel)), None)


@contextlib.contextmanager
def _no_sync(ddp: DistributedDataParallel | None, sync: bool) -> Iterator[None]:
    """DDP's ``no_sync()`` unless this is the DDP module's last micro-batch of the step."""
    if sync or ddp is None:
        yield
    else:
        with ddp.no_sync():
            yield
