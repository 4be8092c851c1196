import warnings
from contextlib import contextmanager

import pytest

from embedloss.compat._adapter import reset_warning_registry


def pytest_collection_modifyitems(items):
    # Legacy names warn by design; tests that check the warnings record them explicitly.
    for item in items:
        if "tests/compat" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
            item.add_marker(
                pytest.mark.filterwarnings("ignore::embedloss.compat.IgnoredArgumentWarning")
            )


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    reset_warning_registry()
    yield
    reset_warning_registry()


@contextmanager
def recorded():
    """Record every warning raised in the block (the once-per-class registry still applies)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def of(caught, category):
    return [w for w in caught if issubclass(w.category, category)]
