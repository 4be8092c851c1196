"""The parts a method adds to training: the method table, EMA teachers, heads, crops, masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from embedloss import DINOLoss, IBOTPatchLoss
from embedloss.cli.config import CLIError
from embedloss.cli.methods import GRID, Method, resolve_method
from embedloss.cli.models import Branch, PatchTokens, PrototypeHead, TaskModel
from embedloss.cli.objectives import IBOTObjective, scored_pairs
from embedloss.cli.tasks import make_plan
from embedloss.cli.views import (
    MASK_RATIO,
    draw_patch_masks,
    epoch_order,
    local_crops,
    steps_per_epoch,
)


def _plan(name):
    return make_plan({"name": name}, "auto")


# ----------------------------------------------------------------------- the method table


def test_the_method_table_resolves_and_round_trips():
    dino = resolve_method(_plan("dino"), {}, (8, 8))
    assert dino == Method("prototypes", 0.996, "cosine", 4, 256, False)
    assert resolve_method(_plan("dino"), dino.as_config(), (8, 8)) == dino
    assert resolve_method(_plan("ibot_patch"), {}, (8, 8)).patches
    byol = resolve_method(_plan("negative_cosine"), {"teacher_momentum": None}, (8, 8))
    assert (byol.head, byol.teacher_momentum, byol.teacher_schedule) == ("predictor", None, None)
    assert resolve_method(_plan("moco"), {}, None).teacher_schedule == "constant"
    assert resolve_method(_plan("swav"), {}, None).local_crops == 0  # feature vectors
    simclr = resolve_method(_plan("simclr"), {"teacher_momentum": "auto"}, (8, 8))
    assert simclr == Method("projector") and simclr.as_config() == dict.fromkeys(
        ("teacher_momentum", "teacher_schedule", "local_crops", "prototypes")
    )
    assert resolve_method(_plan("matryoshka"), {}, (8, 8)).head == "none"
    assert resolve_method(_plan("cross_entropy"), {}, (8, 8)).head == "classifier"


@pytest.mark.parametrize(
    ("name", "method", "shape", "message"),
    [
        ("simclr", {"prototypes": 8}, (8, 8), "method.prototypes does not apply to 'simclr'"),
        ("dino", {"teacher_momentum": None}, (8, 8), "'dino' distils from its EMA teacher"),
        ("dino", {"local_crops": 2}, None, "method.local_crops are crops of images"),
        ("ibot_patch", {}, None, "'ibot_patch' needs images"),
        ("ibot_patch", {}, (6, 6), "height and width must be multiples of 4, got (6, 6)"),
    ],
)
def test_the_method_table_refuses_what_does_not_apply(name, method, shape, message):
    with pytest.raises(CLIError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_method(_plan(name), method, shape)


# ----------------------------------------------------------------------- models


def _model(style, method, **kw):
    torch.manual_seed(0)
    return TaskModel(
        "ssl", style, 64, None, 10, hidden_dim=16, embedding_dim=8, head_dim=6, method=method, **kw
    )


def test_the_teacher_follows_the_student_after_each_step():
    model = _model("moco", Method("projector", 0.9, "constant"))
    teacher = model.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    assert {"teacher.encoder.encoder.0.weight", "teacher.current_momentum"} <= set(
        model.state_dict()
    )
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.after_optimizer_step(0, 10)
    online = model.branch.state_dict()
    for key, value in teacher.encoder.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key])
    # BYOL / DINO: the momentum of step k follows the cosine from the base to 1
    model = _model("predictor", Method("predictor", 0.99, "cosine"))
    assert model.scheduled_teacher
    for step in (0, 5, 10):
        model.after_optimizer_step(step, 10)
        expected = 1 - 0.01 * (math.cos(math.pi * step / 10) + 1) / 2
        assert model.teacher.momentum == pytest.approx(expected, abs=1e-12)
    rows = model.teacher_rows(torch.randn(6, 64), chunk=4)
    assert rows.shape == (6, 6) and not rows.requires_grad
    assert _model("pair", Method()).teacher_rows(torch.randn(2, 64)) is None


def test_heads_of_each_method():
    head = PrototypeHead(8, 6, 5, "batch")
    x = torch.randn(10, 8)
    out = head(x)
    z = torch.nn.functional.normalize(head.mlp(x), dim=1)
    torch.testing.assert_close(out, z @ torch.nn.functional.normalize(head.prototypes, dim=1).T)
    assert out.abs().max() <= 1 + 1e-6
    (rows,) = _model("predictor", Method("predictor"))((torch.randn(4, 64),))
    assert rows.shape == (4, 12)  # projection | prediction
    assert _model("predictor", Method("predictor")).head[0].out_features == 16  # wide (BYOL)
    (rows,) = _model("dino", Method("prototypes", 0.9, "cosine", 2, 7))((torch.randn(4, 64),))
    assert rows.shape == (4, 7)
    (rows,) = _model("labels", Method("none"))((torch.randn(4, 64),))
    assert rows.shape == (4, 8)  # the encoder's own output


def test_patch_tokens_mask_pixels_and_place_tokens():
    torch.manual_seed(0)
    patches = PatchTokens((8, 8), 5)
    with torch.no_grad():
        patches.mask_token.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    x = torch.randn(3, 64)
    mask = torch.rand(3, GRID * GRID) < 0.5
    got = patches.mask(x, mask)
    for n in range(3):  # loop oracle: pixel (r, c) is in patch (r // 2, c // 2)
        for r in range(8):
            for c in range(8):
                if mask[n, (r // 2) * GRID + c // 2]:
                    assert got[n, r * 8 + c] == 10.0 * (1 + (r % 2) * 2 + c % 2)
                else:
                    assert got[n, r * 8 + c] == x[n, r * 8 + c]
    e = torch.randn(3, 5)
    torch.testing.assert_close(patches.tokens(e)[:, 7], e + patches.position[7])
    # a branch with patches: the [CLS] outputs, then those of the 16 tokens
    head = torch.nn.Linear(5, 4)
    branch = Branch(torch.nn.Linear(64, 5), head, patches)
    out = branch(x, mask, with_patches=True)
    emb = branch.encoder(patches.mask(x, mask))
    torch.testing.assert_close(out[:, :4], head(emb))
    torch.testing.assert_close(out[:, 4 + 4 * 7 : 4 + 4 * 8], head(emb + patches.position[7]))
    assert PatchTokens((3, 8, 4), 5).mask(
        torch.zeros(1, 96), torch.ones(1, 16, dtype=bool)
    ).shape == (1, 96)


# ----------------------------------------------------------------------- views


def test_the_epoch_order_is_distributed_samplers_and_repeats_past_the_data():
    for size in (1, 2):
        for rank in range(size):
            sampler = DistributedSampler(
                range(50), num_replicas=size, rank=rank, shuffle=True, seed=3, drop_last=True
            )
            sampler.set_epoch(2)
            ours = epoch_order(50, batch=8, rank=rank, size=size, epoch=2, seed=3)
            expected = list(sampler)[: steps_per_epoch(50, 8) * 8 // size]
            assert ours.tolist() == expected
    big = epoch_order(10, batch=36, rank=0, size=1, epoch=0, seed=0)
    assert big.shape == (36,) and steps_per_epoch(10, 36) == 1
    counts = torch.bincount(big, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 4  # every sample, 3 or 4 times
    halves = [epoch_order(10, batch=36, rank=r, size=2, epoch=0, seed=0) for r in range(2)]
    assert torch.equal(torch.stack(halves, 1).reshape(-1), big)


def test_local_crops_are_boxes_resized_back_and_rank_independent():
    x = torch.randn(4, 64)
    gen = torch.Generator().manual_seed(0)
    crops = local_crops(x, (8, 8), 3, gen, torch.arange(4), 4, 0.0)
    assert crops.shape == (12, 64) and not torch.equal(crops[:4], x)
    # a rank draws what the single process draws for its rows (positions 1 and 3 of 4)
    gen = torch.Generator().manual_seed(0)
    part = local_crops(x[[1, 3]], (8, 8), 3, gen, torch.tensor([1, 3]), 4, 0.0)
    torch.testing.assert_close(part.reshape(3, 2, 64), crops.reshape(3, 4, 64)[:, [1, 3]])
    # the identity box is the image itself (bilinear sampling at the pixel centres)
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 8, 8], align_corners=False)
    same = torch.nn.functional.grid_sample(img, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(same, img)


def test_patch_masks_follow_dinov2():
    masks = draw_patch_masks(2, 2000, torch.Generator().manual_seed(0))
    assert masks.shape == (2, 2000, GRID * GRID) and masks.dtype == torch.bool
    counts = masks.sum(-1).flatten()
    masked = counts > 0
    assert 0.45 < masked.float().mean() < 0.55
    lo, hi = (round(r * GRID * GRID) for r in MASK_RATIO)
    assert counts[masked].min() >= max(lo, 1) and counts[masked].max() <= hi


# ----------------------------------------------------------------------- objectives


def test_scored_pairs_use_every_row_once_with_graded_scores():
    torch.manual_seed(0)
    a, b, y = torch.randn(30, 4), torch.randn(30, 4), torch.randint(0, 3, (30,))
    ea, eb, scores = scored_pairs(a, b, y)
    assert torch.equal(ea, a)
    partner = [next(j for j in range(30) if torch.equal(eb[i], b[j])) for i in range(30)]
    assert sorted(partner) == list(range(30))  # a permutation
    for i, j in enumerate(partner):
        expected = 1.0 if i == j else (0.5 if y[i] == y[j] else 0.0)
        assert scores[i] == expected
    assert (scores[:10] == 1).all() and (scores[10:20] == 0.5).float().mean() > 0.5


def test_the_ibot_objective_is_dinos_cls_loss_plus_the_patch_loss():
    torch.manual_seed(0)
    patch = IBOTPatchLoss(output_dim=6, teacher_temperature=0.05)
    objective = IBOTObjective(patch)
    student = [torch.randn(4, 6) for _ in range(3)]
    teacher = [torch.randn(4, 6) for _ in range(2)]
    s_p, t_p, mask = torch.randn(8, 16, 6), torch.randn(8, 16, 6), torch.rand(8, 16) < 0.4
    out = objective.compute(student, teacher, s_p, t_p, mask)
    dino = DINOLoss(output_dim=6, teacher_temperature=0.05)
    separate = IBOTPatchLoss(output_dim=6, teacher_temperature=0.05)
    expected = dino(student, teacher) + separate(s_p, t_p, mask)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(objective.cls.center, dino.center)
    torch.testing.assert_close(objective.patch.center, separate.center)
    assert {"cls.center", "patch.center", "cls.epoch"} <= set(objective.state_dict())
    objective.update_epoch(3)
    assert objective.cls._counter("epoch") == 3
