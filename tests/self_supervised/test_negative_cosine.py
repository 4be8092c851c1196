"""Negative cosine (BYOL/SimSiam): loop oracle, stop-gradient, symmetric form, closed forms."""

from __future__ import annotations

import pytest
import torch

from embedloss import create_loss
from embedloss.self_supervised import NegativeCosineLoss, negative_cosine_loss
from tests.self_supervised.selfsup_oracles import negative_cosine_oracle


def _pairs(n: int = 5, d: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]


def test_value_and_gradient_match_the_loop_oracle() -> None:
    p, z, _, _ = _pairs()
    p1, p2 = p.clone().requires_grad_(), p.clone().requires_grad_()
    z1 = z.clone().requires_grad_()
    got = negative_cosine_loss(p1, z1)
    per_sample = negative_cosine_oracle(p2, z)
    ref = sum(per_sample) / len(per_sample)
    assert abs(float((got - ref).detach())) < 1e-12
    got.backward()
    ref.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=1e-12)
    assert z1.grad is None  # stop-gradient on the target
    none = negative_cosine_loss(p, z, reduction="none")
    assert torch.allclose(none, torch.stack(per_sample), atol=1e-14)
    assert torch.allclose(negative_cosine_loss(p, z, reduction="sum"), none.sum())


def test_symmetric_form_is_simsiam_equation_2() -> None:
    p_a, z_b, p_b, z_a = (t.requires_grad_() for t in _pairs())
    got = negative_cosine_loss(p_a, z_b, p_b, z_a)
    half_a = sum(negative_cosine_oracle(p_a, z_b)) / 5
    half_b = sum(negative_cosine_oracle(p_b, z_a)) / 5
    assert abs(float((got - (half_a / 2 + half_b / 2)).detach())) < 1e-12
    got.backward()
    assert z_a.grad is None and z_b.grad is None
    assert p_a.grad is not None and p_b.grad is not None
    module = NegativeCosineLoss(symmetric=True)
    assert torch.equal(module(p_a, z_b, p_b, z_a), got)


def test_closed_forms() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert float(negative_cosine_loss(p, 5 * p)) == pytest.approx(-1.0, abs=1e-15)  # scale-free
    assert float(negative_cosine_loss(p, -p)) == pytest.approx(1.0, abs=1e-15)
    orthogonal = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-4.0, 3.0]], dtype=torch.float64)
    assert float(negative_cosine_loss(p, orthogonal)) == pytest.approx(0.0, abs=1e-15)
    # BYOL, Eq. 2: ‖p̂ − ẑ‖² = 2 − 2·cos = 2 + 2·D(p, z), per sample
    q, z, _, _ = _pairs()
    byol = (q / q.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1)
    assert torch.allclose(2 + 2 * negative_cosine_loss(q, z, reduction="none"), byol, atol=1e-14)


def test_zero_vectors_stay_finite() -> None:
    p = torch.zeros(2, 3, requires_grad=True)
    loss = negative_cosine_loss(p, torch.ones(2, 3))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(p.grad).all()


def test_module_terms_and_reductions() -> None:
    p, z, _, _ = _pairs()
    out = NegativeCosineLoss().compute(p, z)
    assert set(out.terms) == {"cosine_similarity", "target_std"}
    assert torch.allclose(out.terms["cosine_similarity"].double(), -out.loss, atol=1e-6)
    zn = z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(
        out.terms["target_std"].double(), zn.std(0, correction=0).mean(), atol=1e-6
    )
    collapsed = NegativeCosineLoss().compute(p, torch.ones_like(z))
    assert float(collapsed.terms["target_std"]) == pytest.approx(0.0, abs=1e-7)
    assert NegativeCosineLoss(reduction="none")(p, z).shape == (5,)
    assert isinstance(create_loss("simsiam"), NegativeCosineLoss)
    assert torch.equal(
        NegativeCosineLoss(gather_distributed=True)(p, z), NegativeCosineLoss()(p, z)
    )


def test_example_inputs_fit_the_symmetric_signature() -> None:
    args, kwargs = NegativeCosineLoss.example_inputs(dtype=torch.bfloat16)
    loss = NegativeCosineLoss(**NegativeCosineLoss.example_kwargs())
    out = loss(*args, **kwargs)
    assert len(args) == 4 and out.dim() == 0 and out.dtype == torch.float32


def test_gradcheck() -> None:
    p, z, q, y = _pairs(3, 4)
    p.requires_grad_()
    q.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: negative_cosine_loss(a, z, b, y), (p, q))


def test_bad_inputs_raise_clear_errors() -> None:
    p, z, q, y = _pairs()
    with pytest.raises(
        ValueError,
        match=r"the symmetric form needs both p_b and z_a .* got p_b=a tensor and z_a=None",
    ):
        negative_cosine_loss(p, z, q)
    with pytest.raises(
        ValueError, match=r"symmetric=True\) takes \(p_a, z_b, p_b, z_a\); p_b and z_a are missing"
    ):
        NegativeCosineLoss(symmetric=True)(p, z)
    with pytest.raises(
        ValueError, match=r"symmetric=False\) takes \(p_a, z_b\); pass symmetric=True"
    ):
        NegativeCosineLoss()(p, z, q, y)
    with pytest.raises(
        ValueError, match=r"p_a and z_b must have the same shape, got \(5, 6\) and \(5, 3\)"
    ):
        negative_cosine_loss(p, z[:, :3])
    with pytest.raises(ValueError, match=r"p_a and p_b must have the same shape"):
        negative_cosine_loss(p, z, q[:3], y[:3])
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        NegativeCosineLoss(reduction="avg")
    with pytest.raises(TypeError, match=r"symmetric must be a bool"):
        NegativeCosineLoss(symmetric=None)  # type: ignore[arg-type]
