"""forward is generated from compute and never builds the logging terms (BaseLoss.output)."""

from __future__ import annotations

import pytest

from embedloss import BaseLoss, loss_info


@pytest.mark.parametrize(
    "name", ["clip", "siglip", "feature_consistency", "alignment_uniformity", "mixed_multimodal"]
)
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


def test_siglip_forward_computes_no_similarity_terms(monkeypatch):
    import torch

    import embedloss.multimodal.siglip as siglip

    calls = []
    terms = siglip.pair_similarity_terms
    monkeypatch.setattr(siglip, "pair_similarity_terms", lambda *a: calls.append(1) or terms(*a))
    loss = siglip.SigLIPLoss()
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    loss(x, y)
    assert calls == []
    assert set(loss.compute(x, y).terms) >= {"bias", "negative_similarity"}
    assert calls == [1]
