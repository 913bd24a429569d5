"""JSON payloads (agent.payloads) and the numbers that go into them: JSON has no NaN or infinity, and a
number an instrument may send (the largest double, from a float64 register) must never become one."""

from __future__ import annotations

import json
import math
import sys

from agent.aggregate import _number as aggregate_number
from agent.alarms import _as_published
from agent.payloads import aggregates_message, alarm_message


def strict(payload: bytes) -> dict:
    def refuse(name: str) -> float:
        raise ValueError(f"{name} is not JSON")

    return json.loads(payload, parse_constant=refuse)


def test_an_event_stored_with_a_non_finite_number_is_published_with_null():
    """An event an older version stored with inf (it rounded the largest double to 15 digits) was retried
    for ever: nothing was published after it, also after a restart (audit Q)."""
    alarm = {"seq": 3, "id": "big.x:above", "value": math.inf, "threshold": 50, "ts": "2026-11-30T00:00:00.000Z"}
    assert strict(alarm_message("S1", alarm))["alarm"] == {**alarm, "value": None}
    body = {"seq": 4, "avg": math.nan, "min": -math.inf, "max": 1.0}
    assert strict(aggregates_message("S1", [body]))["aggregates"] == [{**body, "avg": None, "min": None}]


def test_the_largest_double_stays_a_number_when_rounded_for_publishing():
    top = sys.float_info.max
    assert _as_published(top) == top and _as_published(-top) == -top
    assert aggregate_number(top) == top and aggregate_number(-top) == -top
    assert _as_published(1 / 3) == float(f"{1 / 3:.15g}") and aggregate_number(1 / 3) == float(f"{1 / 3:.10g}")
