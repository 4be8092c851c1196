"""Data, splits, augmentations and the .npz reader of `embedloss train`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from embedloss.cli.config import CLIError
from embedloss.cli.data import (
    InputSpec,
    apply_view,
    derived_seed,
    describe_perturbation,
    draw_view_params,
    load_task_data,
    perturb,
    seeded_generator,
    shift_images,
)
from embedloss.cli.evaluate import knn_accuracy

DIGITS = {"dataset": "digits", "path": None, "test_fraction": 0.25}


def _npz_cfg(path: str) -> dict:
    return {"dataset": None, "path": path, "test_fraction": 0.25}


def test_shift_matches_a_loop_oracle():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 5 * 4, generator=g)
    offsets = torch.randint(-2, 3, (7, 2), generator=g)
    got = shift_images(x, offsets, (5, 4), 2).reshape(7, 5, 4)
    img = x.reshape(7, 5, 4)
    for n in range(7):
        dy, dx = offsets[n].tolist()
        for r in range(5):
            for c in range(4):
                src_r, src_c = r - dy, c - dx
                inside = 0 <= src_r < 5 and 0 <= src_c < 4
                assert got[n, r, c] == (img[n, src_r, src_c] if inside else 0.0)


def test_apply_view_masks_then_adds_noise():
    x = torch.ones(2, 4)
    params = draw_view_params(
        2, 4, seeded_generator(0, "t"), shift=0, mask=0.5, noise=0.1, image_shape=None
    )
    assert params.shift is None and params.keep is not None and params.noise is not None
    assert torch.equal(apply_view(x, params, None, 0), params.keep.float() + params.noise)
    none = draw_view_params(
        2, 4, seeded_generator(0), shift=1, mask=0.0, noise=0.0, image_shape=None
    )
    assert none.shift is None and none.keep is None and none.noise is None


def test_seeds_are_stable_and_distinct():
    assert derived_seed(0, "a", 1) == derived_seed(0, "a", 1) != derived_seed(0, "a", 2)
    assert 0 <= derived_seed(123, "x") < 2**63


def test_ddp_ranks_see_the_single_process_batch_with_the_same_augmentation():
    """Rank r's local sample j sits at position r + W·j of the global batch (what train.py uses)."""
    n, batch, world = 50, 8, 2
    local = batch // world
    single = list(DistributedSampler(range(n), num_replicas=1, rank=0, seed=5, drop_last=True))
    ranks = [
        list(DistributedSampler(range(n), num_replicas=world, rank=r, seed=5, drop_last=True))
        for r in range(world)
    ]
    for step in range(n // batch):
        global_batch = single[step * batch : (step + 1) * batch]
        for r in range(world):
            mine = ranks[r][step * local : (step + 1) * local]
            positions = [r + world * j for j in range(local)]
            assert mine == [global_batch[p] for p in positions]


def test_digits_match_scikit_learn_and_split_deterministically():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_task_data(DIGITS, "ssl", 0)
    assert data.image_shape == (8, 8) and data.num_classes == 10
    assert len(data.train) == 1348 and len(data.test) == 449
    everything = torch.cat([data.train.a, data.test.a])
    expected = torch.as_tensor(bunch.data, dtype=torch.float32) / 16
    # the split is a permutation of the dataset: same rows, same labels
    assert torch.equal(everything.sum(0), expected.sum(0))
    assert sorted(torch.cat([data.train.y, data.test.y]).tolist()) == sorted(bunch.target.tolist())
    again = load_task_data(DIGITS, "ssl", 0)
    assert torch.equal(again.test.a, data.test.a)
    other = load_task_data(DIGITS, "ssl", 1)
    assert not torch.equal(other.test.a, data.test.a)
    paired = load_task_data(DIGITS, "paired", 0)
    assert paired.image_shape is None and paired.train.a.shape[1] == paired.train.b.shape[1] == 32
    assert torch.equal(torch.cat([paired.test.a, paired.test.b], 1), data.test.a)


def test_perturbation_hurts_raw_pixels_as_the_issue_says():
    data = load_task_data(DIGITS, "ssl", 0)
    clean = knn_accuracy(data.train.a, data.train.y, data.test.a, data.test.y)
    shifted = perturb(data.test.a, data.image_shape, shift=1, noise=0.1, seed=0)
    assert torch.equal(shifted, perturb(data.test.a, data.image_shape, shift=1, noise=0.1, seed=0))
    pert = knn_accuracy(data.train.a, data.train.y, shifted, data.test.y)
    assert clean > 0.97 and 0.4 < pert < 0.65


def test_npz_images_labels_and_scaling(npz):
    x = np.arange(30 * 9, dtype=np.int16).reshape(30, 3, 3)
    y = np.array([5.0, 2.0, 9.0] * 10)
    data = load_task_data(_npz_cfg(npz(x=x, y=y)), "supervised", 0)
    assert data.image_shape == (3, 3) and data.num_classes == 3 and data.name == "data.npz"
    assert sorted(set(data.train.y.tolist())) == [0, 1, 2]
    assert data.train.a.min() == 0 and data.train.a.max() == 1  # train range scaled to [0, 1]
    chw = load_task_data(
        _npz_cfg(npz("f.npz", x=np.ones((30, 2, 2, 3)) * np.arange(30)[:, None, None, None])),
        "ssl",
        0,
    )  # (N, C, H, W): images with channels, not flattened features
    assert chw.image_shape == (2, 2, 3) and chw.train.a.shape[1] == 12 and chw.train.y is None
    assert chw.inputs["a"].shape == (2, 2, 3)
    flat = load_task_data(_npz_cfg(npz("v.npz", x=np.random.rand(30, 5))), "ssl", 0)
    assert flat.image_shape is None and flat.inputs["a"].shape == (5,)
    pairs = load_task_data(
        _npz_cfg(npz("p.npz", x_a=np.random.rand(20, 4), x_b=np.random.rand(20, 2, 3))), "paired", 0
    )
    assert pairs.train.b.shape[1] == 6 and pairs.num_classes == 0


@pytest.mark.parametrize(
    ("arrays", "task", "message"),
    [
        ({"features": np.zeros((20, 4))}, "ssl", "has no array 'x' (found: features)"),
        (
            {"x": np.zeros((20, 4))},
            "supervised",
            "has no array 'y' (labels), which the supervised task needs",
        ),
        (
            {"x": np.zeros((20, 4)), "y": np.zeros(19)},
            "ssl",
            "mismatched lengths: 'x' has 20 rows but 'y' has 19",
        ),
        (
            {"x_a": np.zeros((20, 4)), "x_b": np.zeros((21, 4))},
            "paired",
            "'x_a' has 20 rows but 'x_b' has 21",
        ),
        ({"x_a": np.zeros((20, 4))}, "paired", "has no array 'x_b'"),
        (
            {"x": np.array([["a", "b"]] * 20)},
            "ssl",
            "must be numeric (ints, floats or bools), got dtype <U1",
        ),
        ({"x": np.zeros((20, 2), dtype=complex)}, "ssl", "must be numeric"),
        ({"x": np.zeros(20)}, "ssl", "must have shape (N, features...)"),
        ({"x": np.full((20, 2), np.nan)}, "ssl", "contains NaN or infinite values"),
        ({"x": np.zeros((20, 2)), "y": np.full(20, 0.5)}, "supervised", "got non-integers"),
        (
            {"x": np.zeros((20, 2)), "y": np.array(["a"] * 20)},
            "supervised",
            "must hold integer class labels",
        ),
        ({"x": np.zeros((20, 2)), "y": np.zeros((20, 1))}, "supervised", "must have shape (N,)"),
        ({"x": np.zeros((20, 2)), "y": np.zeros(20)}, "supervised", "hold a single class"),
        ({"x": np.zeros((2, 2))}, "ssl", "too few to split"),
        ({"x": np.array([None] * 20, dtype=object)}, "ssl", "object array"),
        (
            {"x": np.zeros((20, 1, 2, 2, 2))},
            "ssl",
            "has shape (20, 1, 2, 2, 2); expected (N, features), (N, H, W) images or (N, C, H, W) images",
        ),
        (
            {"x_a": np.zeros((20, 2)), "x_b": np.zeros((20, 2))},
            "ssl",
            "it holds 'x_a' and 'x_b', a paired file: train with --task paired or a paired loss "
            "(e.g. --loss clip)",
        ),
        (
            {"x": np.zeros((20, 2))},
            "paired",
            "the paired task reads pairs 'x_a' and 'x_b' (for 'x', pass --task ssl or supervised)",
        ),
    ],
)
def test_npz_errors_are_clear(npz, arrays, task, message):
    with pytest.raises(CLIError, match=None) as err:
        load_task_data(_npz_cfg(npz(**arrays)), task, 0)
    assert message in str(err.value)


def test_unreadable_files(tmp_path):
    text = tmp_path / "t.npz"
    text.write_text("not a zip")
    with pytest.raises(CLIError, match=r"is not an .npz archive; save it with numpy.savez"):
        load_task_data(_npz_cfg(str(text)), "ssl", 0)
    broken = tmp_path / "b.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CLIError, match=r"cannot read data file .* as \.npz"):
        load_task_data(_npz_cfg(str(broken)), "ssl", 0)
    single = tmp_path / "s.npy"
    np.save(single, np.zeros((20, 2)))
    with pytest.raises(CLIError, match=r"holds a single array; an \.npz archive"):
        load_task_data(_npz_cfg(str(single)), "ssl", 0)
    pickled = tmp_path / "p.npz"
    import pickle

    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CLIError, match="holds pickled data, which is refused for safety"):
        load_task_data(_npz_cfg(str(pickled)), "ssl", 0)
    with pytest.raises(CLIError, match="does not exist"):
        load_task_data(_npz_cfg(str(tmp_path / "nope.npz")), "ssl", 0)


def test_shift_moves_every_channel_alike():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3 * 5 * 4, generator=g)
    offsets = torch.randint(-1, 2, (4, 2), generator=g)
    got = shift_images(x, offsets, (3, 5, 4), 1).reshape(4, 3, 5, 4)
    for c in range(3):
        one = x.reshape(4, 3, 5 * 4)[:, c]
        assert torch.equal(got[:, c], shift_images(one, offsets, (5, 4), 1).reshape(4, 5, 4))


def test_a_runs_scaling_is_recorded_and_reapplied(npz):
    x = np.random.default_rng(0).normal(3.0, 2.0, (40, 6)).astype(np.float32)
    path = npz(x=x)
    data = load_task_data(_npz_cfg(path), "ssl", 0)
    spec = data.inputs["a"]
    assert spec == InputSpec.from_dict(spec.as_dict()) and spec.shape == (6,)
    everything = spec.apply(torch.as_tensor(x))  # the raw file, scaled as training scaled it
    assert torch.equal(everything[_split(40)], data.test.a)
    other = npz("o.npz", x=x[:30] * 2)
    again = load_task_data(_npz_cfg(other), "ssl", 0, inputs={"a": spec})
    assert torch.equal(
        torch.cat([again.train.a, again.test.a]).sort(0).values,
        spec.apply(torch.as_tensor(x[:30] * 2)).sort(0).values,
    )
    with pytest.raises(CLIError, match=r"has 3 values per sample .* the run's encoder takes 6"):
        load_task_data(_npz_cfg(npz("s.npz", x=x[:, :3])), "ssl", 0, inputs={"a": spec})
    digits = load_task_data(DIGITS, "ssl", 0)
    assert digits.inputs["a"] == InputSpec((8, 8), 0.0, 16.0)


def _split(n: int) -> torch.Tensor:
    from embedloss.cli.data import _split_indices

    return _split_indices(n, 0.25, 0)[1]


def test_perturbations_are_described_truthfully():
    assert describe_perturbation((8, 8), 1, 0.1) == (
        "random shifts of up to 1 pixel and Gaussian noise σ=0.1"
    )
    assert (
        describe_perturbation(None, 1, 0.1) == "Gaussian noise σ=0.1 (feature vectors: no shifts)"
    )
    assert describe_perturbation((3, 8, 8), 2, 0.0) == "random shifts of up to 2 pixels"
    assert describe_perturbation(None, 0, 0.0) == "nothing (clean)"
