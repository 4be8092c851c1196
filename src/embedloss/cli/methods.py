"""What a training method adds around the encoder: its head, an EMA teacher, crops and masks.

The config's ``method`` section holds the values a method decides (``auto`` takes the table
below; the resolved values are written to ``config.yaml``):

=============  ===========================  =====================  ============  ==========
style (loss)   head                         EMA teacher            local crops   prototypes
=============  ===========================  =====================  ============  ==========
``moco``       projector                    0.99, constant         –             –
``predictor``  wide projector + predictor   0.996 → 1, cosine      –             –
(BYOL)                                      (null: SimSiam)
``nnclr``      wide projector + predictor   0.99 → 1, cosine       –             –
``dino``       projector + prototypes       0.996 → 1, cosine      4             256
``ibot``       the same, + patch tokens     0.996 → 1, cosine      4             256
``swav``       projector + prototypes       –                      4             256
=============  ===========================  =====================  ============  ==========

Every other style has a projector (``classifier``: a linear classifier; ``matryoshka``: no head,
the loss sees the encoder's output) and none of these parts. BYOL's and DINO's base momentum is
the papers' 0.996, rising to 1 by the cosine schedule over the run's steps; MoCo's is constant,
0.99 rather than MoCo v2's 0.999, whose time constant (1000 steps) exceeds a digits run (a few
hundred steps). The wide heads (``hidden_dim`` wide, as BYOL's 4096-wide MLPs) matter: with
``head_dim``-wide ones BYOL's perturbed k-NN accuracy fell from 0.77 to 0.63 in tuning runs.
NNCLR's paper has no teacher; with one (its nearest neighbours and positives from the
teacher's projections, the predictions from the student) it learnt more here (perturbed k-NN
0.87 against 0.85 on the quality table's budget), and ``teacher_momentum: null`` is the paper's
NNCLR. SwAV's prototypes: 256 as DINO's (0.84 on that budget, against 0.81 with 128 and 0.78
with 64).
Local crops are images only: on feature vectors ``auto`` gives none.

Example:
    >>> from embedloss.cli.tasks import make_plan
    >>> m = resolve_method(make_plan({"name": "dino"}, "auto"), {}, (8, 8))
    >>> m.head, m.teacher_momentum, m.teacher_schedule, m.local_crops, m.prototypes
    ('prototypes', 0.996, 'cosine', 4, 256)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedloss.cli.config import METHOD_KEYS, CLIError
from embedloss.cli.tasks import LossPlan

__all__ = ["GRID", "STYLE_DEFAULTS", "Method", "resolve_method"]

#: iBOT's patches: a GRID × GRID grid over the image.
GRID = 4
#: The method values of each style (a style absent here takes none of them).
STYLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "moco": {"teacher_momentum": 0.99, "teacher_schedule": "constant"},
    "predictor": {"teacher_momentum": 0.996, "teacher_schedule": "cosine"},
    "nnclr": {"teacher_momentum": 0.99, "teacher_schedule": "cosine"},
    "dino": {
        "teacher_momentum": 0.996,
        "teacher_schedule": "cosine",
        "local_crops": 4,
        "prototypes": 256,
    },
    "ibot": {
        "teacher_momentum": 0.996,
        "teacher_schedule": "cosine",
        "local_crops": 4,
        "prototypes": 256,
    },
    "swav": {"local_crops": 4, "prototypes": 256},
}
HEADS = {
    "classifier": "classifier",
    "predictor": "predictor",
    "nnclr": "predictor",
    "dino": "prototypes",
    "ibot": "prototypes",
    "swav": "prototypes",
}
#: Styles that cannot train without their EMA teacher (the teacher is their target).
NEEDS_TEACHER = ("dino", "ibot")


@dataclass(frozen=True)
class Method:
    """The resolved method of a run: what the model builds and the views it is fed."""

    head: str = "projector"  # projector | predictor | prototypes | classifier | none
    teacher_momentum: float | None = None  # None: no EMA teacher
    teacher_schedule: str | None = None  # constant | cosine (to 1)
    local_crops: int | None = None  # None: not a multi-crop method
    prototypes: int | None = None
    patches: bool = False  # iBOT: patch tokens and masked global views

    def as_config(self) -> dict[str, Any]:
        """The ``method`` section of ``config.yaml``."""
        return {
            "teacher_momentum": self.teacher_momentum,
            "teacher_schedule": self.teacher_schedule,
            "local_crops": self.local_crops,
            "prototypes": self.prototypes,
        }


def _applies(key: str) -> str:
    styles = [s for s, d in STYLE_DEFAULTS.items() if key in d]
    return ", ".join(styles)


def resolve_method(
    plan: LossPlan, method_cfg: Mapping[str, Any], image_shape: tuple[int, ...] | None
) -> Method:
    """The method of ``plan``: the config's values, ``auto`` (or missing) from the table.

    Args:
        plan: The loss plan (its style picks the table's row).
        method_cfg: The config's ``method`` section.
        image_shape: The shape of one image, or None for feature vectors.

    Raises:
        CLIError: For a value the method does not take, no teacher where one is needed, local
            crops or patches of feature vectors, or images that a 4×4 grid does not divide.
    """
    defaults = STYLE_DEFAULTS.get(plan.style, {})
    values: dict[str, Any] = {}
    for key in METHOD_KEYS:
        given = method_cfg.get(key, "auto")
        if key not in defaults:
            if given not in ("auto", None):
                raise CLIError(
                    f"method.{key} does not apply to {plan.name!r} ({plan.style} style); it "
                    f"applies to the {_applies(key)} styles"
                )
            values[key] = None
        else:
            values[key] = defaults[key] if given == "auto" else given
    if values["teacher_momentum"] is None:
        if plan.style in NEEDS_TEACHER:
            raise CLIError(
                f"{plan.name!r} distils from its EMA teacher: method.teacher_momentum must be "
                "a number in [0, 1], not null"
            )
        values["teacher_schedule"] = None
    crops = values["local_crops"]
    if image_shape is None:
        if crops and method_cfg.get("local_crops", "auto") != "auto":
            raise CLIError(
                "method.local_crops are crops of images; these inputs are feature vectors "
                "(set it to 0, or train on images)"
            )
        crops = None if crops is None else 0
        if plan.style == "ibot":
            raise CLIError(
                f"{plan.name!r} needs images: its patch tokens are a {GRID}×{GRID} grid of "
                "patches, and these inputs are feature vectors"
            )
    if plan.style == "ibot" and any(d % GRID for d in image_shape[-2:]):  # type: ignore[index]
        raise CLIError(
            f"{plan.name!r} cuts images into a {GRID}×{GRID} grid of patches: height and width "
            f"must be multiples of {GRID}, got {tuple(image_shape)}"  # type: ignore[arg-type]
        )
    head = plan.head or HEADS.get(plan.style, "projector")
    return Method(
        head,
        values["teacher_momentum"],
        values["teacher_schedule"],
        crops,
        values["prototypes"],
        plan.style == "ibot",
    )
