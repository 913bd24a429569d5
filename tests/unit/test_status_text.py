"""`edge-agent status` (text form) shows values as the instrument's display does: every digit."""

from __future__ import annotations

import pytest

from agent.status import format_value


@pytest.mark.parametrize(("value", "shown"), [
    (None, "null"),
    (-123456789.0, "-123456789"),
    (-1234.5625, "-1234.5625"),
    (-12345.6789, "-12345.6789"),
    (12.300000000000001, "12.3"),  # raw x 0.1: the double's noise beyond 15 digits is not shown
    (8987183256397123.0, "8987183256397123"),
    (0.0, "0"),
    (3e-7, "3e-07"),
    (float("nan"), "nan"),
])
def test_values_keep_their_digits(value, shown):
    assert format_value(value) == shown
