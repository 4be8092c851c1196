"""Doctests see ``torch`` without importing it (the modules need not import it themselves)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    doctest_namespace["torch"] = torch
