import itertools
import math

import pytest

from embedloss.ops.schedules import cosine_schedule


def test_cosine_schedule_endpoints_midpoint_and_clamp():
    assert cosine_schedule(0, 10, start=0.99, end=1.0) == pytest.approx(0.99, abs=1e-15)
    assert cosine_schedule(10, 10, start=0.99, end=1.0) == 1.0
    assert cosine_schedule(25, 10, start=0.99, end=1.0) == 1.0  # past the end
    assert cosine_schedule(3, 12, start=2.0, end=0.0) == pytest.approx(1 + math.cos(math.pi / 4))
    decreasing = [cosine_schedule(k, 8, start=0.2, end=0.04) for k in range(9)]
    assert all(a > b for a, b in itertools.pairwise(decreasing))


def test_cosine_schedule_bad_inputs():
    with pytest.raises(ValueError, match="a cosine schedule needs total_steps"):
        cosine_schedule(3, None, start=1.0, end=0.0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        cosine_schedule(-1, 5, start=1.0, end=0.0)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        cosine_schedule(1, 0, start=1.0, end=0.0)
    with pytest.raises(TypeError, match="step must be an int"):
        cosine_schedule(1.5, 5, start=1.0, end=0.0)
