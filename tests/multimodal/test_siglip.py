import math

import pytest
import torch
import torch.nn.functional as F

from embedloss import SigLIPLoss, create_loss
from embedloss.functional import siglip_loss
from tests.helpers import assert_close_with_grads, randn64
from tests.multimodal.oracles import log_sigmoid, siglip_oracle


@pytest.mark.parametrize(("tau", "bias"), [(0.1, -10.0), (0.5, 1.0), (2.0, 0.3)])
def test_matches_paper_equation_oracle(tau, bias):
    x, y = randn64(5, 4, seed=1), randn64(5, 4, seed=2)
    assert_close_with_grads(
        siglip_loss(x, y, temperature=tau, bias=bias), siglip_oracle(x, y, tau, bias), (x, y)
    )


def test_labels_match_oracle():
    x, y = randn64(6, 3, seed=3), randn64(6, 3, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 2, 0])
    assert_close_with_grads(
        siglip_loss(x, y, temperature=0.3, bias=-1.0, labels=labels),
        siglip_oracle(x, y, 0.3, -1.0, labels),
        (x, y),
    )


def test_unnormalised_matches_oracle():
    x, y = randn64(4, 3, seed=5), randn64(4, 3, seed=6)
    assert_close_with_grads(
        siglip_loss(x, y, temperature=1.0, bias=0.5, normalize=False),
        siglip_oracle(x, y, 1.0, 0.5, normalize=False),
        (x, y),
    )


def test_learnable_temperature_and_bias_gradients_match_oracle():
    x, y = randn64(4, 3, seed=7), randn64(4, 3, seed=8)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert_close_with_grads(
        siglip_loss(x, y, temperature=tau, bias=b), siglip_oracle(x, y, tau, b), (x, y, tau, b)
    )


def test_matches_algorithm_1_pseudocode():
    # Zhai et al. 2023, Algorithm 1, transcribed line by line (t = exp(t'), labels = 2I − 1).
    img, txt = (
        randn64(7, 5, seed=9, requires_grad=False),
        randn64(7, 5, seed=10, requires_grad=False),
    )
    t_prime, b = torch.tensor(math.log(10.0), dtype=torch.float64), -10.0
    n = img.shape[0]
    zimg, ztxt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = zimg @ ztxt.T * t_prime.exp() + b
    labels = 2 * torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64)
    expected = -F.logsigmoid(labels * logits).sum() / n
    torch.testing.assert_close(siglip_loss(img, txt), expected, rtol=1e-12, atol=1e-12)


def test_distinct_labels_reproduce_label_free():
    x, y = randn64(5, 4, seed=11, requires_grad=False), randn64(5, 4, seed=12, requires_grad=False)
    torch.testing.assert_close(
        siglip_loss(x, y, labels=torch.arange(5) * 3 + 1), siglip_loss(x, y), rtol=0, atol=0
    )


def test_closed_form_identical_orthonormal_pairs():
    n, tau, b = 5, 0.25, -3.0
    x = torch.eye(n, 8, dtype=torch.float64)
    expected = -(log_sigmoid(1 / tau + b) + (n - 1) * log_sigmoid(-b))
    assert siglip_loss(x, x, temperature=tau, bias=b).item() == pytest.approx(expected, rel=1e-12)


def test_closed_form_uniform_similarities():
    # Every embedding identical: every logit is s = 1/τ + b; one positive and N−1 negatives per row.
    n, tau, b = 6, 0.5, -1.5
    x = torch.ones(n, 3, dtype=torch.float64)
    s = 1 / tau + b
    expected = -(log_sigmoid(s) + (n - 1) * log_sigmoid(-s))
    assert siglip_loss(x, x, temperature=tau, bias=b).item() == pytest.approx(expected, rel=1e-12)
    # All labels equal: every pair is positive.
    assert siglip_loss(
        x, x, temperature=tau, bias=b, labels=torch.zeros(n, dtype=torch.long)
    ).item() == pytest.approx(-n * log_sigmoid(s), rel=1e-12)


def test_log_space_stays_finite_for_huge_logits():
    x = torch.randn(6, 4) * 1e3
    loss = siglip_loss(x, -x, temperature=1e-3, bias=0.0, normalize=False)
    assert torch.isfinite(loss)
    x.requires_grad_(True)
    siglip_loss(x, x.detach(), temperature=1e-3, bias=50.0).backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck():
    x, y = randn64(4, 3, seed=13), randn64(4, 3, seed=14)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2])
    assert torch.autograd.gradcheck(
        lambda a, c, t, bb: siglip_loss(a, c, temperature=t, bias=bb, labels=labels), (x, y, tau, b)
    )


def test_reductions_are_per_image_row_sums():
    x, y = randn64(5, 4, seed=15, requires_grad=False), randn64(5, 4, seed=16, requires_grad=False)
    per = siglip_loss(x, y, reduction="none")
    assert per.shape == (5,)
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    signs = 2 * torch.eye(5, dtype=torch.float64) - 1
    torch.testing.assert_close(per, -F.logsigmoid(signs * (xn @ yn.T / 0.1 - 10)).sum(1))
    torch.testing.assert_close(per.mean(), siglip_loss(x, y))
    torch.testing.assert_close(siglip_loss(x, y, reduction="sum"), per.sum())


def test_module_defaults_are_the_papers_initialisation():
    loss = SigLIPLoss()
    assert loss.temperature == pytest.approx(0.1)
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss.bias == -10.0
    assert {n for n, p in loss.named_parameters() if p.requires_grad} == {
        "logit_scale",
        "logit_bias",
    }
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(loss(x, y), siglip_loss(x, y, temperature=0.1, bias=-10.0))
    loss(x, y).backward()
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None


def test_fixed_temperature_and_bias_are_buffers():
    loss = SigLIPLoss(temperature=0.05, bias=2.5, learnable_temperature=False, learnable_bias=False)
    assert list(loss.parameters()) == []
    assert set(dict(loss.named_buffers())) == {"logit_scale", "logit_bias"}
    assert loss.temperature == pytest.approx(0.05, rel=1e-12) and loss.bias == 2.5
    assert "learnable_bias=False" in repr(loss)


def test_state_dict_round_trip_restores_learned_values():
    loss = SigLIPLoss()
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    for _ in range(3):
        opt.zero_grad()
        loss(x, y).backward()
        opt.step()
    fresh = SigLIPLoss()
    fresh.load_state_dict(loss.state_dict())
    assert fresh.temperature == loss.temperature and fresh.bias == loss.bias != -10.0
    torch.testing.assert_close(fresh(x, y), loss(x, y))


def test_external_logit_scale_and_bias_override_the_modules():
    loss = SigLIPLoss()
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(math.log(1 / 0.5), requires_grad=True)
    bias = torch.tensor(1.5, requires_grad=True)
    out = loss.compute(x, y, logit_scale=scale, logit_bias=bias)
    torch.testing.assert_close(out.loss, siglip_loss(x, y, temperature=0.5, bias=1.5))
    assert out.terms["temperature"].item() == pytest.approx(0.5, rel=1e-6)
    assert out.terms["bias"].item() == 1.5
    out.loss.backward()
    assert scale.grad is not None and bias.grad is not None and loss.logit_bias.grad is None


def test_terms():
    x = torch.eye(4, 6)
    out = create_loss("siglip").compute(x, x)
    assert out.terms["accuracy"].item() == 1.0
    assert out.terms["positive_similarity"].item() == pytest.approx(1.0)
    assert out.terms["negative_similarity"].item() == pytest.approx(0.0, abs=1e-7)
    assert out.terms["temperature"].item() == pytest.approx(0.1)
    assert out.terms["bias"].item() == -10.0
    assert all(not t.requires_grad and t.ndim == 0 for t in out.terms.values())
    # Swapped texts: no image ranks its own text first.
    assert create_loss("siglip").compute(x, x.roll(1, 0)).terms["accuracy"].item() == 0.0


def test_half_precision_computes_in_float32():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    loss = SigLIPLoss()
    out = loss(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(x.bfloat16().float(), y.bfloat16().float()))


def test_bad_inputs():
    with pytest.raises(
        ValueError,
        match=r"image_embeddings and text_embeddings must have the same shape, got \(3, 4\) and \(3, 5\)",
    ):
        SigLIPLoss()(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(3,\) to match the batch, got \(2,\)"
    ):
        SigLIPLoss()(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        SigLIPLoss(temperature=0)
    with pytest.raises(ValueError, match=r"bias must be a finite number in \[-inf, inf\], got inf"):
        SigLIPLoss(bias=float("inf"))
    with pytest.raises(TypeError, match="learnable_bias must be a bool, got str"):
        SigLIPLoss(learnable_bias="yes")
    with pytest.raises(ValueError, match=r"logit_bias must be a scalar tensor, got shape \(2,\)"):
        SigLIPLoss()(torch.randn(3, 4), torch.randn(3, 4), logit_bias=torch.zeros(2))
    with pytest.raises(ValueError, match=r"bias must be a scalar, got a tensor of shape \(2,\)"):
        siglip_loss(torch.randn(3, 4), torch.randn(3, 4), bias=torch.zeros(2))
    with pytest.raises(ValueError, match=r"bias must be finite, got nan"):
        siglip_loss(torch.randn(3, 4), torch.randn(3, 4), bias=torch.tensor(float("nan")))
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        siglip_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="avg")


# ----------------------------------------------------------------------------------------------
# the tiled kernel (embedloss.ops.sigmoid) equals the dense path
# ----------------------------------------------------------------------------------------------

TILE_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _leaves(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = 0.5 * x.detach() + torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    tau = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    b = torch.tensor(-1.5, dtype=dtype, requires_grad=True)
    return x, y.requires_grad_(), tau, b


def _close(a, b, dtype, what):
    tol = TILE_TOL[dtype]
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["diagonal", "labels", "negative_only"])
def test_tiled_equals_dense_value_and_all_gradients(mode, reduction, dtype):
    n = 9
    x, y, tau, b = _leaves(n, 5, dtype, seed=21)
    kw: dict = {"temperature": tau, "bias": b, "reduction": reduction}
    if mode == "labels":
        kw["labels"] = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2])
    kw["negative_only"] = mode == "negative_only"
    upstream = torch.linspace(-0.7, 1.9, n, dtype=dtype)  # per-row, signed (reduction "none")
    results = []
    for chunk in (None, 4, 1, 100):  # dense; a remainder tile; one row per tile; one tile
        loss = siglip_loss(x, y, chunk_size=chunk, **kw)
        total = (loss * upstream).sum() if reduction == "none" else loss
        results.append((loss, torch.autograd.grad(total, (x, y, tau, b))))
    (ld, gd) = results[0]
    for lt, gt in results[1:]:
        _close(lt, ld, dtype, "loss")
        for a, c, name in zip(gt, gd, ("x", "y", "temperature", "bias"), strict=True):
            _close(a, c, dtype, f"grad {name}")


def test_negative_only_matches_its_equation():
    # every pair negative: L = (1/N) Σ_i Σ_j −log(1 − σ(ℓ_ij)), ℓ = x_i·y_j/τ + b on unit rows
    x, y = randn64(6, 4, seed=22), randn64(6, 4, seed=23)
    tau, b = 0.4, 0.3
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / tau + b
    expected = -torch.log(1 - torch.sigmoid(logits)).sum() / 6
    for chunk in (None, 2):
        assert_close_with_grads(
            siglip_loss(x, y, temperature=tau, bias=b, negative_only=True, chunk_size=chunk),
            expected,
            (x, y),
        )


@pytest.mark.parametrize("options", [{}, {"labels": True}, {"negative_only": True}])
def test_gradcheck_tiled(options):
    x, y = randn64(4, 3, seed=24), randn64(4, 3, seed=25)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2]) if options.get("labels") else None
    neg = options.get("negative_only", False)

    def fn(a, c, t, bb):
        return siglip_loss(
            a,
            c,
            temperature=t,
            bias=bb,
            labels=labels,
            negative_only=neg,
            chunk_size=3,
            reduction="none",
        )

    assert torch.autograd.gradcheck(fn, (x, y, tau, b))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tiled_runs_on_meta_device(reduction):
    # no value is read back on the step path: forward and backward on meta tensors
    x = torch.empty(8, 5, device="meta", requires_grad=True)
    y = torch.empty(8, 5, device="meta", requires_grad=True)
    loss = SigLIPLoss(chunk_size=3, reduction=reduction).to("meta")
    for labels in (None, torch.tensor([0, 1, 0, 2, 1, 3, 0, 2], device="meta")):
        out = loss(x, y, labels)
        assert out.device.type == "meta"
        total = out.sum()
        gx, gy, gs, gb = torch.autograd.grad(total, (x, y, loss.logit_scale, loss.logit_bias))
        assert gx.shape == x.shape and gy.shape == y.shape and gs.shape == gb.shape == ()
    out = loss(x, y, negative_only=True)
    assert out.device.type == "meta"


def test_module_tiled_equals_dense_with_learnable_scale_and_bias():
    x, y = randn64(11, 6, seed=26), randn64(11, 6, seed=27)
    results = []
    for chunk in (None, 4):
        loss = SigLIPLoss(temperature=0.2, bias=-2.0, chunk_size=chunk).double()
        out = loss.compute(x, y)
        params = (x, y, loss.logit_scale, loss.logit_bias)
        results.append((out, torch.autograd.grad(out.loss, params)))
    (od, gd), (ot, gt) = results
    torch.testing.assert_close(ot.loss, od.loss, rtol=1e-9, atol=1e-9)
    for a, c in zip(gt, gd, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
    for name in od.terms:
        torch.testing.assert_close(ot.terms[name], od.terms[name], rtol=1e-9, atol=1e-9)
    neg_d = SigLIPLoss(chunk_size=None).double()(x, y, negative_only=True)
    neg_t = SigLIPLoss(chunk_size=4).double()(x, y, negative_only=True)
    torch.testing.assert_close(neg_t, neg_d, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(neg_t, SigLIPLoss(chunk_size=4).double()(x, y))  # it changes L


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_tiled_accuracy_follows_the_dense_first_maximum(chunk):
    # exact ties: an image ranks several texts equally; the first of them decides
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    for labels in (None, torch.tensor([0, 1, 0, 2])):
        dense = SigLIPLoss(chunk_size=None, normalize=False).double().compute(x, y, labels)
        tiled = SigLIPLoss(chunk_size=chunk, normalize=False).double().compute(x, y, labels)
        assert tiled.terms["accuracy"] == dense.terms["accuracy"]
    # rows [1,1,0,1], [0,0,1,0], [1,1,1,1], [1,1,0,1]: only image 0 ranks its own text first
    out = SigLIPLoss(chunk_size=chunk, normalize=False).double().compute(x, y)
    assert out.terms["accuracy"].item() == 0.25


def test_tiled_extreme_logits_stay_exact():
    x, y = randn64(10, 4, seed=28) * 30, randn64(10, 4, seed=29) * 30
    for kw in ({"temperature": 1e-3, "bias": 5.0}, {"temperature": 1e-3, "bias": -5e3}):
        dense = siglip_loss(x, y, normalize=False, chunk_size=None, **kw)
        tiled = siglip_loss(x, y, normalize=False, chunk_size=3, **kw)
        assert torch.isfinite(tiled)
        assert_close_with_grads(tiled, dense, (x, y))


def test_tiled_path_never_builds_an_n_by_n_buffer():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    n, chunk = 64, 8
    x, y = torch.randn(n, 4, requires_grad=True), torch.randn(n, 4, requires_grad=True)
    for reduction, labels in (("mean", None), ("none", torch.arange(n) % 5)):
        loss = SigLIPLoss(chunk_size=chunk, reduction=reduction)
        with Largest() as largest:
            torch.autograd.grad(loss(x, y, labels).sum(), (x, y))
        assert largest.numel <= chunk * n, largest.numel
    with Largest() as largest:
        SigLIPLoss(chunk_size=None)(x, y)
    assert largest.numel == n * n  # the check can fail: the dense path builds one


def test_auto_tiles_large_batches(monkeypatch):
    from embedloss.ops import chunked, sigmoid

    calls = []
    original = sigmoid.chunked_siglip

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sigmoid, "chunked_siglip", spy)
    x, y = torch.randn(40, 3), torch.randn(40, 3)
    dense = siglip_loss(x, y)  # small: dense
    assert calls == []
    monkeypatch.setattr(chunked, "DENSE_LIMIT_BYTES", 1024)
    monkeypatch.setattr(chunked, "MIN_TILE_ROWS", 16)
    monkeypatch.setattr(chunked, "TILE_BYTES", 16 * 40 * 4)
    torch.testing.assert_close(siglip_loss(x, y), dense, rtol=1e-5, atol=1e-5)
    assert calls == [16]


def test_negative_only_and_chunk_size_errors():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="labels cannot be combined with negative_only"):
        siglip_loss(x, y, labels=torch.tensor([0, 1, 0]), negative_only=True)
    with pytest.raises(TypeError, match="negative_only must be a bool, got str"):
        SigLIPLoss()(x, y, negative_only="yes")
    with pytest.raises(TypeError, match="chunk_size must be None, 'auto' or an int"):
        SigLIPLoss(chunk_size=2.5)
    with pytest.raises(ValueError, match="chunk_size must be"):
        siglip_loss(x, y, chunk_size=0)
