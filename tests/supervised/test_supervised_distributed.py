"""gather_distributed with real processes (gloo on CPU): losses and gradients of two ranks
holding uneven shares of a batch must reproduce the single-process result."""

import os
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedloss.multimodal.mixed_multimodal import mixed_multimodal_loss
from embedloss.supervised.cross_modal_supcon import cross_modal_supcon_loss
from embedloss.supervised.supcon import supcon_loss

SIZES = (5, 3)
N = sum(SIZES)


def _cases():
    g = torch.Generator().manual_seed(0)
    views = torch.randn(N, 2, 6, generator=g, dtype=torch.float64)
    a, b = torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randn(N, 6, generator=g)
    b = b.double()
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0, 3])
    multi_hot = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [0, 1], [1, 0]])
    return {
        "supcon_labels": (partial(supcon_loss, temperature=0.2), (views,), labels),
        "supcon_one": (
            partial(supcon_loss, contrast_mode="one", base_temperature=0.1),
            (views,),
            labels,
        ),
        "supcon_multi_hot": (partial(supcon_loss, temperature=0.3), (views,), multi_hot),
        "supcon_unlabelled": (partial(supcon_loss, temperature=0.3), (views,), None),
        "cross_modal_all": (partial(cross_modal_supcon_loss, temperature=0.2), (a, b), labels),
        "cross_modal_hot": (
            partial(cross_modal_supcon_loss, contrast_mode="cross"),
            (a, b),
            multi_hot,
        ),
        "mixed": (partial(mixed_multimodal_loss, temperature=0.1), (a, b), labels),
    }


def _call(name, fn, tensors, labels, gather):
    if name == "mixed":
        return fn(*tensors, labels=labels, gather_distributed=gather)
    return fn(*tensors, labels, gather_distributed=gather)


def _worker(rank, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SIZES)
    )
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    results = {}
    for name, (fn, tensors, labels) in _cases().items():
        local = [t[rows].clone().requires_grad_(True) for t in tensors]
        loss = _call(name, fn, local, None if labels is None else labels[rows], True)
        loss.backward()
        results[name] = (loss.detach(), [t.grad for t in local])
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_gather_distributed_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(SIZES), join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(len(SIZES))]
    world = len(SIZES)
    for name, (fn, tensors, labels) in _cases().items():
        full = [t.clone().requires_grad_(True) for t in tensors]
        expected = _call(name, fn, full, labels, False)
        grads = torch.autograd.grad(expected, full)
        mean_loss = sum(r[name][0] for r in ranks) / world
        torch.testing.assert_close(mean_loss, expected.detach(), rtol=1e-9, atol=1e-9, msg=name)
        for i, grad in enumerate(grads):
            gathered = torch.cat([r[name][1][i] for r in ranks]) / world
            torch.testing.assert_close(gathered, grad, rtol=1e-9, atol=1e-9, msg=name)
