"""gather_distributed with real processes (gloo on CPU): every loss equals the single-process loss.

Two ranks hold uneven shards (3 and 2 rows) of one batch. With DDP semantics the mean of the
ranks' losses is the single-process loss on the whole batch, and each rank's gradient is
world_size × the single-process gradient of its rows (DDP averages it back). MoCo's queues must
be identical on every rank and equal to the single-process queue.
"""

import os

import torch
import torch.multiprocessing as mp

from embedloss import DCLLoss, DCLWLoss, DynamicTemperatureLoss, HardNegativeLoss, MoCoLoss
from tests.distributed.harness import free_port, process_group

SIZES = (3, 2)
WORLD = len(SIZES)


def _data(step):
    g = torch.Generator().manual_seed(step)
    a = torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1]) + 3 * step
    return a, b, labels


def _losses(gather):
    return {
        "dcl": DCLLoss(gather_distributed=gather),
        "dclw": DCLWLoss(gather_distributed=gather),
        "hard_negative": HardNegativeLoss(
            strategy="hard", percentile=0.5, gather_distributed=gather
        ),
        "dynamic_temperature": DynamicTemperatureLoss(ema_momentum=0.5, gather_distributed=gather),
        "moco": MoCoLoss(
            queue_size=8, in_batch_negatives=True, symmetric=True, gather_distributed=gather
        ),
    }


def _run(rows, gather):
    """Three training steps of every loss on ``rows`` of the batch: losses, gradients, state."""
    out = {}
    for name, loss_fn in _losses(gather).items():
        for step in range(3):
            a, b, labels = _data(step)
            a = a[rows].clone().requires_grad_(True)
            b = b[rows].clone().requires_grad_(True)
            loss = loss_fn(a, b, labels[rows])
            ga, gb = torch.autograd.grad(loss, (a, b))
            out[f"{name}/{step}"] = (loss.detach(), ga, gb)
        out[f"{name}/state"] = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    return out


def _worker(rank, port, result_dir):
    with process_group(rank, WORLD, port):
        start = sum(SIZES[:rank])
        results = _run(slice(start, start + SIZES[rank]), True)
        # each rank's batch fits a queue of 4, the gathered batch of 5 does not
        small = MoCoLoss(queue_size=4, gather_distributed=True)
        try:
            small(torch.randn(SIZES[rank], 6), torch.randn(SIZES[rank], 6))
        except ValueError as err:
            results["queue_error"] = str(err)
        torch.save(results, os.path.join(result_dir, f"{rank}.pt"))


def test_gathered_losses_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for r in ranks:
        assert r.pop("queue_error").startswith(
            "the batch gathered from all ranks (5 keys) is larger"
        )
    single = _run(slice(None), False)
    for key, expected in single.items():
        if key.endswith("/state"):
            for name, value in expected.items():
                for r in range(WORLD):
                    torch.testing.assert_close(
                        ranks[r][key][name], value, rtol=1e-12, atol=1e-12, msg=f"{key} {name}"
                    )
            continue
        loss, ga, gb = expected
        torch.testing.assert_close(
            sum(r[key][0] for r in ranks) / WORLD, loss, rtol=1e-10, atol=1e-12, msg=key
        )
        torch.testing.assert_close(
            torch.cat([r[key][1] for r in ranks]) / WORLD, ga, rtol=1e-10, atol=1e-12, msg=key
        )
        torch.testing.assert_close(
            torch.cat([r[key][2] for r in ranks]) / WORLD, gb, rtol=1e-10, atol=1e-12, msg=key
        )
