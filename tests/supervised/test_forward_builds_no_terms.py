"""forward is generated from compute and never builds the logging terms (BaseLoss.output)."""

from __future__ import annotations

import pytest

from embedloss import BaseLoss, loss_info


@pytest.mark.parametrize("name", ["cross_entropy", "mse", "supcon", "cross_modal_supcon"])
def test_forward_skips_the_terms_compute_builds_them(name, monkeypatch):
    built = []
    output = BaseLoss.output

    def counting(self, loss, terms):
        return output(self, loss, lambda: built.append(type(self).__name__) or terms())

    monkeypatch.setattr(BaseLoss, "output", counting)
    cls = loss_info(name).cls
    loss = cls(**cls.example_kwargs())
    args, kwargs = cls.example_inputs()
    value = loss(*args, **kwargs)
    assert built == []
    out = loss.compute(*args, **kwargs)
    assert built and out.terms
    assert value.shape == out.loss.shape
