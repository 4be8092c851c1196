"""The tile helpers of the tiled kernels, against plain loops."""

from __future__ import annotations

import pytest
import torch

from embedloss.ops.tiles import (
    LN2,
    LOG2E,
    label_counts,
    max_and_prefix_max,
    tile_weights,
    uniform_factor,
)


@pytest.mark.parametrize("m", [1, 3, 10, 128, 130, 300])
@pytest.mark.parametrize("width", [4, 128])
def test_max_and_prefix_max_equals_a_loop(m, width):
    gen = torch.Generator().manual_seed(m * width)
    for _ in range(10):
        s = torch.randint(0, 4, (7, m), generator=gen).double()  # many exact ties
        index = torch.randint(0, m, (7,), generator=gen)
        row_max, before = max_and_prefix_max(s, index, width)
        for i in range(7):
            assert row_max[i] == s[i].max()
            expected = s[i, : index[i]].max() if index[i] > 0 else float("-inf")
            assert before[i] == expected


def test_label_counts_equals_a_loop():
    labels = torch.tensor([3, 1, 3, 0, 3, 1, 7])
    expected = [sum(int(b == a) for b in labels) for a in labels]
    assert label_counts(labels).tolist() == expected


def test_uniform_factor_is_the_mean_over_valid_anchors():
    grad = torch.tensor([0.25, 9.0, 0.25, 0.25])
    valid = torch.tensor([True, False, True, True])
    assert uniform_factor(grad, valid).item() == 0.25
    assert uniform_factor(grad, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_tile_weights_are_in_base_2_units_and_the_function_sees_natural_logits():
    logits2 = torch.tensor([[2.0, -1.0], [0.5, 4.0]]) * LOG2E
    seen = []

    def fn(logits, rows, cols):
        seen.append(logits.clone())
        logits.mul_(0.0)  # may modify what it is given: the tile buffer is not touched
        return logits + 1.0

    w2 = tile_weights(fn, logits2, torch.arange(2), torch.arange(2), 0, 2)
    torch.testing.assert_close(seen[0], logits2 * LN2)
    torch.testing.assert_close(w2, torch.full((2, 2), LOG2E))
    torch.testing.assert_close(logits2, torch.tensor([[2.0, -1.0], [0.5, 4.0]]) * LOG2E)
    const = tile_weights(torch.ones(4, 2), logits2, torch.arange(2), torch.arange(2), 1, 3)
    torch.testing.assert_close(const, torch.full((2, 2), LOG2E))
