"""Ranks that disagree, or a rank that fails, give every rank the same clear error: no hang.

Real gloo processes with a short process-group timeout: a hang would surface as a gloo timeout
(or a "connection closed" abort) on some rank instead of the expected ``ValueError``.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.multiprocessing as mp

from embedloss import create_loss
from tests.distributed.harness import free_port, process_group

WORLD = 2


def _call(case: str, rank: int):
    g = torch.Generator().manual_seed(rank)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    options = {"temperature": 0.1}
    labels = None
    if case == "dim" and rank == 1:
        a, b = a[:, :6], b[:, :6]
    if case == "dtype" and rank == 1:
        a, b = a.double(), b.double()
    if case == "labels" and rank == 0:
        labels = torch.tensor([0, 1, 0, 1])
    if case == "option" and rank == 1:
        options["temperature"] = 0.2
    if case == "local_error" and rank == 1:
        b = b[:3]
    if case == "uneven":
        a, b = a[: 1 + 2 * rank], b[: 1 + 2 * rank]
    loss = create_loss("clip", gather_distributed=True, **options)
    if case == "method" and rank == 1:  # compute may run collectives for its terms
        return loss.compute(a.requires_grad_(), b, labels).loss
    if case == "no_grad" and rank == 0:  # only ranks with a graph run the backward's collectives
        with torch.no_grad():
            return loss(a.requires_grad_(), b, labels)
    return loss(a.requires_grad_(), b, labels)


def _worker(rank: int, port: int, case: str, out_dir: str) -> None:
    with process_group(rank, WORLD, port, timeout_s=20):
        try:
            value = _call(case, rank)
            value.backward()
            result = f"ok {float(value):.6f}"
        except Exception as err:  # the test reads what each rank saw
            result = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as fh:
        fh.write(result)


def _run(case: str, tmp_path) -> list[str]:
    start = time.monotonic()
    mp.spawn(_worker, args=(free_port(), case, str(tmp_path)), nprocs=WORLD, join=True)
    assert time.monotonic() - start < 20, "a rank waited for the process-group timeout"
    return [(tmp_path / f"rank{r}.txt").read_text(encoding="utf-8") for r in range(WORLD)]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("dim", r"image_embeddings differs \(rank 0: float32 \(N, 8\); rank 1: float32 \(N, 6\)\)"),
        (
            "dtype",
            r"image_embeddings differs \(rank 0: float32 \(N, 8\); rank 1: float64 \(N, 8\)\)",
        ),
        ("labels", r"labels differs \(rank 0: int64 \(N\); rank 1: absent\)"),
        ("option", r"option logit_scale differs \(rank 0: 2\.30258\d*; rank 1: 1\.60943\d*\)"),
        ("local_error", r"rank 1 failed before joining the others: ValueError: image_embeddings "),
        ("no_grad", r"graph differs \(rank 0: False; rank 1: True\)"),
    ],
)
def test_every_rank_raises_the_same_clear_error(case, expected, tmp_path):
    seen = _run(case, tmp_path)
    assert seen[0] == seen[1], seen
    assert seen[0].startswith("ValueError: CLIPLoss.forward: "), seen[0]
    assert re.search(expected, seen[0]), seen[0]


def test_ranks_calling_forward_and_compute_raise_instead_of_waiting(tmp_path):
    seen = _run("method", tmp_path)
    for rank, context in enumerate(("forward", "compute")):
        assert seen[rank].startswith(f"ValueError: CLIPLoss.{context}: "), seen[rank]
        assert re.search(r"method differs \(rank 0: 'forward'; rank 1: 'compute'\)", seen[rank])


def test_agreeing_ranks_with_uneven_batches_run(tmp_path):
    seen = _run("uneven", tmp_path)
    assert all(s.startswith("ok ") for s in seen), seen
