"""lightly's loss modules as parity references, loaded file by file.

lightly 1.6.0 is installed without its dependencies (torchvision cannot sit beside this torch),
so ``import lightly`` fails: its package ``__init__`` files import the whole library. Here the
parent packages are registered as empty namespace modules pointing at the installed folders, so
that importing ``lightly.loss.dino_loss`` runs only that file and the files it imports. The one
heavy module those files reach, ``lightly.models.utils`` (torchvision), is replaced by a stub that
has what they use (``concat_all_gather``, needed only for distributed memory banks). A missing
lightly raises: a parity test must fail, never skip, without its reference.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

_PACKAGES = ("lightly", "lightly.loss", "lightly.models", "lightly.models.modules", "lightly.utils")


def _lightly_root() -> Path:
    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "lightly is not installed; the parity tests need it: "
            'pip install --no-deps "lightly==1.6.0"'
        )
    return Path(spec.origin).parent


def _concat_all_gather(x):
    raise NotImplementedError("the lightly stub does not gather across ranks")


def _install_stubs() -> None:
    if isinstance(sys.modules.get("lightly"), types.ModuleType) and getattr(
        sys.modules["lightly"], "__embedloss_stub__", False
    ):
        return
    root = _lightly_root()
    for name in _PACKAGES:
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        module.__embedloss_stub__ = True
        sys.modules[name] = module
    utils = types.ModuleType("lightly.models.utils")
    utils.concat_all_gather = _concat_all_gather
    sys.modules["lightly.models.utils"] = utils
    sys.modules["lightly.models"].utils = utils


def load(module: str) -> types.ModuleType:
    """Import ``lightly.<module>`` (e.g. ``"loss.dino_loss"``) without lightly's package imports."""
    _install_stubs()
    return importlib.import_module(f"lightly.{module}")


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """Make tensors that lightly creates from Python numbers (temperatures) float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
