"""``combined`` of a pair-style loss and single-style regularisers (DINOv2: + 0.1·KoLeo)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from embedloss import KoLeoLoss, SimCLRLoss
from embedloss.cli.config import CLIError
from embedloss.cli.main import main
from embedloss.cli.tasks import StepTargets, build_loss, compute_loss, make_plan
from embedloss.cli.use import load_encoder

SIMCLR_KOLEO = {
    "name": "combined",
    "losses": {"simclr": {"name": "simclr"}, "koleo": {"name": "koleo"}},
    "weights": {"koleo": 0.1},
}


def test_simclr_plus_koleo_is_planned_part_by_part():
    plan = make_plan(SIMCLR_KOLEO, "auto")
    assert (plan.task, plan.style) == ("ssl", "parts")
    assert dict(plan.part_styles) == {"simclr": "pair", "koleo": "single"}
    with pytest.raises(CLIError, match="loss 'combined' cannot be trained on the 'supervised'"):
        make_plan(SIMCLR_KOLEO, "supervised")


def test_the_loss_is_simclr_of_the_views_plus_a_tenth_of_koleo_of_both():
    torch.manual_seed(0)
    plan = make_plan(SIMCLR_KOLEO, "auto")
    loss = build_loss(plan, distributed=False)
    z = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    out = compute_loss(plan, loss, (z,), None, StepTargets())
    (grad,) = torch.autograd.grad(out.loss, z)
    z_a, z_b = z[:8], z[8:]
    simclr, koleo = SimCLRLoss()(z_a, z_b), KoLeoLoss()(torch.cat([z_a, z_b]))
    expected = simclr + 0.1 * koleo
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    # each part's own (unweighted) loss is logged (in float32), named as CombinedLoss names them
    for part, value in (("koleo", koleo), ("simclr", simclr)):
        torch.testing.assert_close(
            out.terms[f"{part}/loss"].double(), value.detach(), atol=1e-6, rtol=0
        )
    assert {"simclr/accuracy", "koleo/nearest_neighbour_distance"} <= set(out.terms)
    # koleo of the two views apart is another number: the concatenation is what it sees
    apart = simclr + 0.1 * (KoLeoLoss()(z_a) + KoLeoLoss()(z_b)) / 2
    assert not torch.allclose(out.loss, apart)


def test_repeated_samples_label_only_the_parts_that_take_labels():
    plan = make_plan(SIMCLR_KOLEO, "auto")
    loss = build_loss(plan, distributed=False)
    z, ids = torch.randn(8, 5), torch.tensor([0, 1, 0, 2])
    out = compute_loss(plan, loss, (z,), None, StepTargets(identities=ids))
    expected = SimCLRLoss()(z[:4], z[4:], labels=ids) + 0.1 * KoLeoLoss()(z)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("losses", "name", "message"),
    [
        (
            {"a": {"name": "simclr"}, "b": "supcon"},
            "combined",
            "the sub-losses of 'combined' need different inputs (labels, pair); the trainer "
            "combines losses of one style, or in 'combined' pair-style losses with single-style "
            "regularisers (e.g. simclr + koleo)",
        ),
        (
            {"a": "moco", "b": "koleo"},
            "combined",
            "the sub-losses of 'combined' need different inputs (moco, single)",
        ),
        (
            {"a": "simclr", "b": "koleo"},
            "multitask",
            "the sub-losses of 'multitask' need different inputs (pair, single)",
        ),
        ({"a": "koleo"}, "combined", "'combined' over single-style losses is not supported"),
    ],
)
def test_other_mixes_are_refused_clearly(losses, name, message):
    with pytest.raises(CLIError, match=re.escape(message)):
        make_plan({"name": name, "losses": losses}, "auto")


def test_a_paired_loss_with_koleo_needs_the_ssl_task_named():
    cfg = {"name": "combined", "losses": {"clip": "clip", "koleo": "koleo"}}
    with pytest.raises(CLIError, match="cannot tell which task suits 'combined'"):
        make_plan(cfg, "auto")
    assert make_plan(cfg, "ssl").style == "parts"
    with pytest.raises(CLIError, match="cannot be trained on the 'paired' task"):
        make_plan(cfg, "paired")


def test_simclr_plus_koleo_trains_end_to_end(tmp_path, capsys):
    config = tmp_path / "combo.yaml"
    config.write_text(yaml.safe_dump({"loss": SIMCLR_KOLEO, "epochs": 2, "batch_size": 64}))
    out = tmp_path / "run"
    assert main(["train", "-q", "--config", str(config), "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in doc["metrics"].values())
    terms = doc["history"][0]["terms"]
    assert {"simclr/loss", "koleo/loss", "koleo/nearest_neighbour_distance"} <= set(terms)
    for h in doc["history"]:  # the logged loss is the weighted sum of the logged parts
        expected = h["terms"]["simclr/loss"] + 0.1 * h["terms"]["koleo/loss"]
        assert h["loss"] == pytest.approx(expected, rel=1e-5)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["loss"] == SIMCLR_KOLEO and cfg["task"] == "ssl"
    assert load_encoder(out)(torch.zeros(3, 8, 8)).shape == (3, 64)
