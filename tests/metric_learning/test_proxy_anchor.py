import pytest
import torch
from pytorch_metric_learning import losses

from embedloss import ProxyAnchorLoss
from embedloss.functional import proxy_anchor_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.metric_learning.oracles import proxy_anchor_oracle


def _inputs(n=10, d=5, classes=6, seed=60):
    y = torch.arange(n) % 4  # classes 4 and 5 have no sample: not in P⁺
    return randn64(n, d, seed=seed), y, randn64(classes, d, seed=seed + 1)


def test_matches_the_loop_oracle():
    x, y, w = _inputs()
    got = proxy_anchor_loss(x, y, w, alpha=16.0, delta=0.2)
    assert_close_with_grads(got, proxy_anchor_oracle(x, y, w, 16.0, 0.2), (x, w))


def test_parity_with_pytorch_metric_learning():
    # PML's ProxyAnchorLoss(margin=δ, alpha=α) holds the proxies as (C, D) like ours; its
    # DivisorReducer divides the positive sum by |P⁺| and the negative sum by C (Eq. 4).
    x, y, w = _inputs(n=12, seed=61)
    pml = losses.ProxyAnchorLoss(num_classes=6, embedding_size=5, margin=0.1, alpha=32)
    pml.proxies.data = w.detach().clone()
    ref = pml(x, y)
    got = proxy_anchor_loss(x, y, w, alpha=32.0, delta=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g_ours, g_ref = torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, pml.proxies))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_reductions_terms_and_large_alpha():
    x, y, w = _inputs()
    per = proxy_anchor_loss(x, y, w, reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(per.sum(), proxy_anchor_loss(x, y, w, reduction="sum"))
    loss = ProxyAnchorLoss(num_classes=6, embedding_dim=5, seed=0)
    assert loss.weight.std().item() == pytest.approx((2 / 6) ** 0.5, rel=0.5)
    out = loss.compute(x, y)
    assert out.terms["proxies_with_positives"].item() == 4.0
    big = proxy_anchor_loss(x.float(), y, w.float(), alpha=1e4)
    assert torch.isfinite(big)


def test_bad_inputs():
    x, y, w = _inputs()
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 6\)"):
        proxy_anchor_loss(x, y + 3, w)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        ProxyAnchorLoss(num_classes=3, embedding_dim=4, alpha=-1.0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        ProxyAnchorLoss(num_classes="3", embedding_dim=4)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        proxy_anchor_loss(x, y[:4], w)
