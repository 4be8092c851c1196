"""composite losses."""

from embedloss.composite.combined import CombinedLoss
from embedloss.composite.multitask import MultitaskLoss

__all__: list[str] = [
    "CombinedLoss",
    "MultitaskLoss",
]
