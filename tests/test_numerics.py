"""Numerical robustness of every loss: label dtypes, the scale of the inputs, half precision.

A loss gives the same value for inputs that mean the same thing (bool and integer labels,
embeddings scaled by a constant when the loss normalises them), and finite inputs never give a
NaN or a non-finite gradient: a value the loss cannot represent is a clear error instead.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from embedloss import list_losses, loss_info


def _label_argument(name: str) -> str | None:
    """The forward argument holding ``(N,)`` class labels, if the loss takes one."""
    cls = loss_info(name).cls
    params = list(inspect.signature(cls.forward).parameters)[1:]  # after self
    args, kwargs = cls.example_inputs(8, 16)
    for key in ("labels", "targets"):
        if key in params:
            i = params.index(key)
            given = args[i] if i < len(args) else kwargs.get(key)
            return key if given is None or isinstance(given, torch.Tensor) else None
    return None


def _tilings(name: str) -> list[int | None]:
    return [None, 4] if "chunk_size" in loss_info(name).signature.parameters else [None]


@pytest.mark.parametrize(
    ("name", "chunk_size"),
    [(n, c) for n in list_losses() if _label_argument(n) for c in _tilings(n)],
)
def test_bool_labels_mean_the_same_as_integer_labels(name, chunk_size):
    cls = loss_info(name).cls
    args, kwargs = cls.example_inputs(8, 16, dtype=torch.float64)
    key = _label_argument(name)
    position = list(inspect.signature(cls.forward).parameters).index(key) - 1  # after self
    options = cls.example_kwargs() | ({} if chunk_size is None else {"chunk_size": chunk_size})
    loss = cls(**options)

    def call(labels):
        call_args, call_kwargs = list(args), dict(kwargs)
        if position < len(call_args):
            call_args[position] = labels
        else:
            call_kwargs[key] = labels
        torch.manual_seed(0)
        return copy.deepcopy(loss)(*call_args, **call_kwargs)

    flags = torch.tensor([True, False, False, True] * 2)
    expected = call(flags.long())
    for dtype in (torch.bool, torch.uint8, torch.int32):
        torch.testing.assert_close(call(flags.to(dtype)), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=f"{key} must be an integer or bool tensor of a dtype"):
        call(flags.to(torch.uint16))  # sorting and comparing it is missing from torch
