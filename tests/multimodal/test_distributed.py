"""Two-process (gloo, CPU) checks that the shared harness does not make.

``tests/distributed/test_distributed_losses.py`` checks loss values and input gradients of
siglip and alignment_uniformity. Here: the gradients of SigLIP's learnable temperature and bias,
averaged over ranks as DDP does, equal the single-process gradients; and the distributed
``metrics.uniformity`` equals the single-process value on every rank, with world_size × the
single-process gradient on each rank's rows. Ranks hold uneven batches (4 and 2 rows).
"""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from embedloss import SigLIPLoss
from embedloss.metrics import uniformity
from tests.distributed.harness import _split, free_port, process_group

SIZES = [4, 2]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return x, torch.randn(6, 5, generator=g, dtype=torch.float64)


def _run(x, y, distributed):
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    loss = SigLIPLoss(temperature=0.2, bias=-2.0, gather_distributed=distributed).double()
    value = loss(x, y)
    grads = torch.autograd.grad(value, [loss.logit_scale, loss.logit_bias])
    unif = uniformity(x, 3.0, gather_distributed=distributed)
    (grad_x,) = torch.autograd.grad(unif, [x])
    return {
        "siglip": value.detach(),
        "params": grads,
        "uniformity": unif.detach(),
        "grad_x": grad_x,
    }


def _worker(rank, world, port, out_dir):
    with process_group(rank, world, port):
        x, y = _data()
        result = _run(_split(x, SIZES, rank), _split(y, SIZES, rank), True)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_parameter_gradients_and_uniformity_metric(tmp_path):
    world = len(SIZES)
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, y = _data()
    single = _run(x, y, False)
    mean_loss = torch.stack([r["siglip"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, single["siglip"], rtol=1e-10, atol=1e-10)
    for k in range(2):  # logit_scale, logit_bias: DDP averages the ranks' gradients
        averaged = torch.stack([r["params"][k] for r in ranks]).mean()
        torch.testing.assert_close(averaged, single["params"][k], rtol=1e-10, atol=1e-10)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["uniformity"], single["uniformity"], rtol=1e-10, atol=1e-10)
        expected = world * _split(single["grad_x"], SIZES, rank)
        torch.testing.assert_close(r["grad_x"], expected, rtol=1e-10, atol=1e-10)
