"""`embedloss info` describes every option of every loss (a base class documents the shared ones)."""

from __future__ import annotations

import re

import pytest

from embedloss import list_losses
from embedloss.cli.info import format_info


@pytest.mark.parametrize("name", list_losses())
def test_every_option_is_described(name):
    text = format_info(name)
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    undescribed = [
        line.strip() for line in options if re.match(r"^  \w+ = ", line) and "  —  " not in line
    ]
    assert not undescribed, f"{name}: options without a description: {undescribed}"
    assert "**" not in "\n".join(options)
