"""SigLIP's generated forward skips its similarity terms (the generic check: test_conformance)."""

from __future__ import annotations

import torch

import embedloss.multimodal.siglip as siglip


def test_siglip_forward_computes_no_similarity_terms(monkeypatch):

    calls = []
    terms = siglip.pair_similarity_terms
    monkeypatch.setattr(siglip, "pair_similarity_terms", lambda *a: calls.append(1) or terms(*a))
    loss = siglip.SigLIPLoss()
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    loss(x, y)
    assert calls == []
    assert set(loss.compute(x, y).terms) >= {"bias", "negative_similarity"}
    assert calls == [1]
