"""Data for ``embedloss train``: the embedded digits, user ``.npz`` files, seeded augmentations.

* ``digits``: scikit-learn's 1797 handwritten 8×8 digits (shipped with scikit-learn, no download),
  pixels scaled to [0, 1]. For the ``paired`` task the top half (rows 0–3) and the bottom half
  (rows 4–7) of each digit are the two modalities.
* ``--data FILE.npz``: ``x`` (and ``y``) for ssl/supervised, ``x_a`` and ``x_b`` for paired; read
  without pickle. ``x`` of shape ``(N, H, W)`` or ``(N, C, H, W)`` is treated as images (shifts
  apply), ``(N, F)`` as feature vectors (noise and masking only); other shapes are refused.
  Values are min-max scaled with the training split's range; the run records that scaling
  (:class:`InputSpec`) so that its encoder can be applied to raw inputs later.

Every random choice comes from a generator seeded by :func:`derived_seed`, so runs repeat
exactly, and a sample's augmentation depends only on the seed, epoch, step and its position in
the global batch — the same in a single process and under DDP.

Example:
    >>> x = torch.arange(4.0).reshape(1, 4)  # one 2×2 image
    >>> shift_images(x, torch.tensor([[1, 0]]), (2, 2), 1)  # one pixel down
    tensor([[0., 0., 0., 1.]])
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from embedloss.cli.config import CLIError

__all__ = [
    "InputSpec",
    "Split",
    "TaskData",
    "ViewParams",
    "apply_view",
    "derived_seed",
    "describe_perturbation",
    "seeded_generator",
    "draw_view_params",
    "input_array",
    "load_task_data",
    "read_npz",
    "perturb",
    "shift_images",
]


@dataclass(frozen=True)
class Split:
    """One split: inputs ``a`` ``(n, F_a)``, paired inputs ``b`` ``(n, F_b)``, labels ``y`` ``(n,)``."""

    a: Tensor
    b: Tensor | None
    y: Tensor | None

    def __len__(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class InputSpec:
    """How raw samples of one modality become model inputs: flatten, then ``(x − lo) / scale``.

    Attributes:
        shape: The shape of one raw sample, e.g. ``(8, 8)``; ``(F,)`` for feature vectors.
        lo: The subtracted offset (the training split's minimum).
        scale: The divisor (the training split's range; 1 for a constant split).
    """

    shape: tuple[int, ...]
    lo: float
    scale: float

    @property
    def features(self) -> int:
        """Model inputs per sample (the product of :attr:`shape`)."""
        return int(torch.Size(self.shape).numel())

    def apply(self, x: Tensor) -> Tensor:
        """Flatten ``x`` ``(N, *shape)`` and scale it exactly as the training data was."""
        flat = x.reshape(x.shape[0], -1).float()
        return (flat - torch.tensor(self.lo)) / torch.tensor(self.scale)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (stored in a run's checkpoint)."""
        return {"shape": list(self.shape), "lo": self.lo, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """The inverse of :meth:`as_dict`."""
        return cls(tuple(int(v) for v in d["shape"]), float(d["lo"]), float(d["scale"]))


@dataclass(frozen=True)
class TaskData:
    """Train and held-out splits for one task, plus what the augmentations need to know."""

    name: str
    train: Split
    test: Split
    image_shape: tuple[int, ...] | None  # rows of ``a`` are images (H, W) or (C, H, W)
    num_classes: int  # 0 without labels
    inputs: dict[str, InputSpec] = field(default_factory=dict)  # "a" (and "b"): raw → model input


def derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`derived_seed` ``(seed, *parts)``."""
    return torch.Generator().manual_seed(derived_seed(seed, *parts))


# ----------------------------------------------------------------------------- loading


def _digits() -> tuple[Tensor, Tensor]:
    """The 1797 digits ``(N, 8, 8)`` (pixels 0..16) and their labels, from scikit-learn's install.

    The CSV that ``sklearn.datasets.load_digits`` parses is read directly when it is where
    scikit-learn keeps it (importing ``sklearn.datasets`` costs seconds); otherwise
    ``load_digits`` is called.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None:  # pragma: no cover - the [cli] extra installs it
        raise CLIError("the digits dataset needs scikit-learn: pip install 'embedloss[cli]'")
    roots = list(spec.submodule_search_locations or [])
    csv = next(
        (p for r in roots if (p := Path(r) / "datasets" / "data" / "digits.csv.gz").is_file()),
        None,
    )
    if csv is not None:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)  # (1797, 65): pixels, label
        pixels, target = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a scikit-learn that moved its data file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.data, bunch.target
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 8, 8)
    return images, torch.as_tensor(target, dtype=torch.long)


def read_npz(path: str) -> dict[str, Any]:
    """The arrays of an ``.npz`` file, read without pickle; any problem is a :class:`CLIError`."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"data file {path!r} does not exist")
    with p.open("rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise CLIError(
            f"data file {path!r} holds a single array; an .npz archive with named arrays is "
            "needed (numpy.savez(file, x=..., y=...))"
        )
    if magic.startswith(b"\x80"):
        raise CLIError(
            f"data file {path!r} holds pickled data, which is refused for safety; save plain "
            "arrays with numpy.savez(file, x=..., y=...)"
        )
    if not magic.startswith(b"PK"):
        raise CLIError(
            f"data file {path!r} is not an .npz archive; save it with numpy.savez(file, x=..., y=...)"
        )
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise CLIError(f"cannot read data file {path!r} as .npz: {err}") from None
    arrays: dict[str, Any] = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as err:
                if "pickle" in str(err) or "Object arrays" in str(err):
                    raise CLIError(
                        f"array {name!r} in {path!r} is an object array (loading it would need "
                        "pickle, which is refused for safety); store numeric arrays"
                    ) from None
                raise CLIError(f"cannot read array {name!r} in {path!r}: {err}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise CLIError(f"cannot read array {name!r} in {path!r}: {err}") from None
    return arrays


def input_array(arrays: dict[str, Any], name: str, path: str) -> Tensor:
    """The samples ``arrays[name]`` of ``path`` as float32, checked as every command checks them.

    Raises:
        CLIError: If the array is missing, not real numbers, not ``(N, features...)`` with
            ``N >= 1`` (up to ``(N, C, H, W)``), holds NaN or infinite values, or values beyond
            float32's range (the model computes in float32).
    """
    import numpy as np

    if name not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        hint = ""
        if name == "x" and {"x_a", "x_b"} <= set(arrays):
            hint = (
                "; it holds 'x_a' and 'x_b', a paired file: train with --task paired or a paired "
                "loss (e.g. --loss clip)"
            )
        elif name in ("x_a", "x_b") and "x" in arrays:
            hint = "; the paired task reads pairs 'x_a' and 'x_b' (for 'x', pass --task ssl or supervised)"
        raise CLIError(f"data file {path!r} has no array {name!r} (found: {found}){hint}")
    arr = arrays[name]
    numeric = np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    if not numeric or np.issubdtype(arr.dtype, np.complexfloating):
        raise CLIError(
            f"array {name!r} in {path!r} must be numeric (ints, floats or bools), got dtype {arr.dtype}"
        )
    if arr.ndim < 2 or arr.shape[0] == 0 or arr[0].size == 0:
        raise CLIError(
            f"array {name!r} in {path!r} must have shape (N, features...) with N >= 1, got {arr.shape}"
        )
    if arr.ndim > 4:
        raise CLIError(
            f"array {name!r} in {path!r} has shape {arr.shape}; expected (N, features), "
            "(N, H, W) images or (N, C, H, W) images"
        )
    if not np.isfinite(arr).all():
        raise CLIError(f"array {name!r} in {path!r} contains NaN or infinite values")
    top = max(abs(float(arr.min())), abs(float(arr.max())))  # no float64 copy of the data
    largest = float(np.finfo(np.float32).max)
    if top > largest:
        raise CLIError(
            f"array {name!r} in {path!r} has values up to {top:.3g} in magnitude, which exceed "
            f"float32's range (±{largest:.3g}) that the model computes in; rescale them"
        )
    return torch.as_tensor(arr.astype(np.float32))


def _labels(arrays: dict[str, Any], path: str, n: int, required: bool) -> Tensor | None:
    import numpy as np

    if "y" not in arrays:
        if required:
            found = ", ".join(sorted(arrays)) or "none"
            raise CLIError(
                f"data file {path!r} has no array 'y' (labels), which the supervised task needs (found: {found})"
            )
        return None
    y = arrays["y"]
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise CLIError(f"array 'y' in {path!r} must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise CLIError(f"array 'y' in {path!r} must have shape (N,), got {y.shape}")
    if y.shape[0] != n:
        raise CLIError(
            f"arrays in {path!r} have mismatched lengths: 'x' has {n} rows but 'y' has {y.shape[0]}"
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise CLIError(f"array 'y' in {path!r} must hold integer class labels, got non-integers")
    _, codes = np.unique(y, return_inverse=True)
    return torch.as_tensor(codes.reshape(-1), dtype=torch.long)


def _fit_scaling(x: Tensor, train_idx: Tensor) -> InputSpec:
    """Min-max scaling with the training split's range (one scalar range for all features)."""
    train = x[train_idx]
    lo, hi = train.min(), train.max()
    scale = float(hi - lo) if hi > lo else 1.0
    return InputSpec(tuple(int(d) for d in x.shape[1:]), float(lo), scale)


def _scaled(name: str, x: Tensor, spec: InputSpec, path: str) -> Tensor:
    if x[0].numel() != spec.features:
        raise CLIError(
            f"array {name!r} in {path!r} has {x[0].numel()} values per sample (shape "
            f"{tuple(x.shape[1:])}); the run's encoder takes {spec.features} "
            f"(shape {spec.shape})"
        )
    return spec.apply(x)


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    n_test = round(test_fraction * n)
    if n_test < 1 or n - n_test < 2:
        raise CLIError(
            f"{n} samples are too few to split into train and held-out sets (test_fraction={test_fraction})"
        )
    perm = torch.randperm(n, generator=seeded_generator(seed, "split"))
    return perm[n_test:], perm[:n_test]


def _npz_arrays(
    path: str, task: str
) -> tuple[dict[str, Tensor], Tensor | None, tuple[int, ...] | None]:
    """The inputs by modality, the labels and the image shape of a user's ``.npz``."""
    arrays = read_npz(path)
    if task == "paired":
        xa, xb = input_array(arrays, "x_a", path), input_array(arrays, "x_b", path)
        if xa.shape[0] != xb.shape[0]:
            raise CLIError(
                f"arrays in {path!r} have mismatched lengths: 'x_a' has {xa.shape[0]} rows "
                f"but 'x_b' has {xb.shape[0]}"
            )
        return {"a": xa, "b": xb}, _labels(arrays, path, xa.shape[0], required=False), None
    x = input_array(arrays, "x", path)
    y = _labels(arrays, path, x.shape[0], required=task == "supervised")
    image_shape = tuple(int(d) for d in x.shape[1:]) if x.ndim >= 3 else None
    return {"a": x}, y, image_shape


def load_task_data(
    data_cfg: Mapping[str, Any],
    task: str,
    seed: int,
    inputs: Mapping[str, InputSpec] | None = None,
) -> TaskData:
    """Load the configured data for ``task`` and split it deterministically by ``seed``.

    Args:
        data_cfg: The ``data`` section of a config (``dataset`` or ``path``, ``test_fraction``).
        task: ``ssl``, ``paired`` or ``supervised``.
        seed: Seeds the split.
        inputs: The scaling of a trained run (:class:`InputSpec` by modality) to apply instead
            of fitting one to this data; the sample shapes must then match the run's.

    Raises:
        CLIError: For a missing/unreadable file, missing arrays, mismatched lengths, non-numeric
            or object arrays, or too few samples.
    """
    frac = float(data_cfg["test_fraction"])
    y: Tensor | None
    if data_cfg.get("path") is None:
        path = name = "digits"
        images, y = _digits()  # raw pixels 0..16, scaled by the specs below
        image_shape: tuple[int, ...] | None = (8, 8)
        raw = {"a": images}
        if task == "paired":  # top and bottom halves as the two modalities
            raw, image_shape = {"a": images[:, :4], "b": images[:, 4:]}, None
        fitted = {m: InputSpec(tuple(x.shape[1:]), 0.0, 16.0) for m, x in raw.items()}
    else:
        path = data_cfg["path"]
        name = Path(path).name
        raw, y, image_shape = _npz_arrays(path, task)
        fitted = {}
    train_idx, test_idx = _split_indices(raw["a"].shape[0], frac, seed)
    specs = dict(inputs) if inputs is not None else {}
    for m, x in raw.items():
        if m not in specs:
            specs[m] = fitted[m] if m in fitted else _fit_scaling(x, train_idx)
    a = _scaled("x_a" if task == "paired" else "x", raw["a"], specs["a"], path)
    b = _scaled("x_b", raw["b"], specs["b"], path) if "b" in raw else None
    if task != "paired" and y is not None and int(y.max()) < 1:
        raise CLIError(f"the labels of {name!r} hold a single class; at least two are needed")

    def take(idx: Tensor) -> Split:
        return Split(a[idx], None if b is None else b[idx], None if y is None else y[idx])

    num_classes = 0 if y is None else int(y.max()) + 1
    used = {m: specs[m] for m in raw}
    return TaskData(name, take(train_idx), take(test_idx), image_shape, num_classes, used)


def describe_perturbation(
    image_shape: tuple[int, ...] | None, shift: int, noise: float, mask: float = 0.0
) -> str:
    """What a perturbation (or a training view) does to these inputs, in words.

    Example:
        >>> describe_perturbation(None, 1, 0.1)
        'Gaussian noise σ=0.1 (feature vectors: no shifts)'
        >>> describe_perturbation((8, 8), 1, 0.1, mask=0.1)
        'random shifts of up to 1 pixel, masking p=0.1 and Gaussian noise σ=0.1'
    """
    parts = []
    if image_shape is not None and shift > 0:
        parts.append(f"random shifts of up to {shift} pixel{'s' if shift > 1 else ''}")
    if mask > 0:
        parts.append(f"masking p={mask:g}")
    if noise > 0:
        parts.append(f"Gaussian noise σ={noise:g}")
    text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
    text = text or "nothing (clean)"
    if image_shape is None and shift > 0:
        text += " (feature vectors: no shifts)"
    return text


# ----------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one augmented view of ``B`` rows (``None``: component off)."""

    shift: Tensor | None  # (B, 2) integer offsets (dy, dx)
    keep: Tensor | None  # (B, F) bool, False = masked pixel
    noise: Tensor | None  # (B, F) additive noise

    def rows(self, index: Tensor) -> ViewParams:
        """The parameters of the selected rows."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return ViewParams(take(self.shift), take(self.keep), take(self.noise))


def draw_view_params(
    rows: int,
    features: int,
    generator: torch.Generator,
    *,
    shift: int,
    mask: float,
    noise: float,
    image_shape: tuple[int, ...] | None,
) -> ViewParams:
    """Draw shifts (images only), masks and noise for ``rows`` samples, in that fixed order."""
    offsets = None
    if shift > 0 and image_shape is not None:
        offsets = torch.randint(-shift, shift + 1, (rows, 2), generator=generator)
    keep = torch.rand(rows, features, generator=generator) >= mask if mask > 0 else None
    eps = noise * torch.randn(rows, features, generator=generator) if noise > 0 else None
    return ViewParams(offsets, keep, eps)


def shift_images(
    x: Tensor, offsets: Tensor, image_shape: tuple[int, ...], max_shift: int
) -> Tensor:
    """Translate each flattened image in ``x`` ``(B, C·H·W)`` by ``offsets`` ``(B, 2)``, zero-filled.

    ``image_shape`` is ``(H, W)`` or ``(C, H, W)``; every channel moves by the same offset.
    """
    h, w = image_shape[-2:]
    n = x.shape[0]
    s = max_shift
    img = x.reshape(n, -1, h, w)  # (B, C, H, W)
    padded = torch.nn.functional.pad(img, (s, s, s, s))  # (B, C, H+2s, W+2s)
    dy, dx = offsets[:, 0].to(x.device), offsets[:, 1].to(x.device)
    rows = torch.arange(h, device=x.device)[None, :, None] + s - dy[:, None, None]  # (B, H, 1)
    cols = torch.arange(w, device=x.device)[None, None, :] + s - dx[:, None, None]  # (B, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).reshape(n, -1)


def apply_view(
    x: Tensor, params: ViewParams, image_shape: tuple[int, ...] | None, max_shift: int
) -> Tensor:
    """Apply a view's shift, then mask, then noise to ``x`` ``(B, F)``."""
    if params.shift is not None and image_shape is not None:
        x = shift_images(x, params.shift, image_shape, max_shift)
    if params.keep is not None:
        x = x * params.keep.to(x.device)
    if params.noise is not None:
        x = x + params.noise.to(x.device)
    return x


def perturb(
    x: Tensor, image_shape: tuple[int, ...] | None, *, shift: int, noise: float, seed: int
) -> Tensor:
    """The seeded nuisance perturbation of a held-out split (shifts and noise, no masking)."""
    params = draw_view_params(
        x.shape[0],
        x.shape[1],
        seeded_generator(seed, "eval-perturbation"),
        shift=shift,
        mask=0.0,
        noise=noise,
        image_shape=image_shape,
    )
    return apply_view(x, params, image_shape, shift)
