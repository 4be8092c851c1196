"""Real two-process (gloo, CPU) checks of gather_distributed for siglip and alignment_uniformity.

Contract (as clip/simclr): the mean over ranks of the returned losses equals the single-process
loss on the concatenated batch, each rank's local embeddings receive world_size × the
single-process gradient, and module parameters receive, averaged over ranks (what DDP does),
the single-process gradient. Ranks hold uneven batches (4 and 2 rows).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedloss import AlignmentUniformityLoss, SigLIPLoss
from embedloss.functional import alignment_uniformity_loss, siglip_loss
from embedloss.metrics import uniformity

SPLIT = (4, 2)
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(
        6, 5, generator=g, dtype=torch.float64
    )


def _cases():
    """name → (fn(x, y, labels, module) -> loss, module factory or None, uses labels)."""
    return {
        "siglip": (
            lambda x, y, lab, m: siglip_loss(
                x, y, temperature=0.3, bias=-1.0, gather_distributed=m
            ),
            None,
            False,
        ),
        "siglip_labels": (
            lambda x, y, lab, m: siglip_loss(
                x, y, temperature=0.3, bias=-1.0, labels=lab, gather_distributed=m
            ),
            None,
            True,
        ),
        "siglip_sum": (
            lambda x, y, lab, m: siglip_loss(x, y, reduction="sum", gather_distributed=m),
            None,
            False,
        ),
        "siglip_module": (
            lambda x, y, lab, mod: mod(x, y),
            lambda g: SigLIPLoss(temperature=0.2, bias=-2.0, gather_distributed=g),
            False,
        ),
        "au": (
            lambda x, y, lab, m: alignment_uniformity_loss(
                x, y, alpha=1.5, t=3.0, weight=0.7, gather_distributed=m
            ),
            None,
            False,
        ),
        "au_labels": (
            lambda x, y, lab, m: alignment_uniformity_loss(x, y, labels=lab, gather_distributed=m),
            None,
            True,
        ),
        "au_sum": (
            lambda x, y, lab, m: alignment_uniformity_loss(
                x, y, reduction="sum", gather_distributed=m
            ),
            None,
            False,
        ),
        "au_module": (
            lambda x, y, lab, mod: mod(x, y),
            lambda g: AlignmentUniformityLoss(gather_distributed=g),
            False,
        ),
        "uniformity": (lambda x, y, lab, m: uniformity(x, 2.0, gather_distributed=m), None, False),
    }


def _run(name, x, y, labels, distributed):
    fn, factory, _ = _cases()[name]
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    if factory is None:
        loss = fn(x, y, labels, distributed)
        params = []
    else:
        module = factory(distributed).double()
        loss = fn(x, y, labels, module)
        params = list(module.parameters())
    inputs = [x, y, *params]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), [
        torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)
    ]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        start = sum(SPLIT[:rank])
        sl = slice(start, start + SPLIT[rank])
        results = {name: _run(name, x[sl], y[sl], LABELS[sl], True) for name in _cases()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_distributed_matches_single_process(tmp_path):
    world = len(SPLIT)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, y = _data()
    for name in _cases():
        loss, grads = _run(name, x, y, LABELS, False)
        losses = torch.stack([r[name][0] for r in ranks])
        torch.testing.assert_close(losses.mean(), loss, rtol=1e-10, atol=1e-10, msg=name)
        for which in (0, 1):  # x, y: each rank's rows get world × the single-process gradient
            local = torch.cat([r[name][1][which] for r in ranks])
            torch.testing.assert_close(
                local, world * grads[which], rtol=1e-10, atol=1e-10, msg=name
            )
        for k in range(2, len(grads)):  # module parameters: DDP's average over ranks
            averaged = torch.stack([r[name][1][k] for r in ranks]).mean(0)
            torch.testing.assert_close(averaged, grads[k], rtol=1e-10, atol=1e-10, msg=name)
