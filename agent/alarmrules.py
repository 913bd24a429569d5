"""What the alarm engine (`agent.alarms`) evaluates: `_Rule`, an alarm rule of the configuration as
applied (its kinds of alarm and their ids, preset, window, action target; the channels it matches),
`_Channel`, what the engine knows of one `device.channel` (last valid reading, start of a fault, last
value, windows, alarms), and `_Instance`, one alarm (a rule on a channel: active or not, the delay
pending, the clear under way); and the arithmetic of an evaluation: the rules' names, which readings
count (`_measured`: flagged N or T and finite; FAULT_FLAGS for the fault rule), when a reading was
taken (`_taken_at`), whether a delay is up (`_lasted`) and where a limit's hysteresis band ends
(`_band_edge`).

Imports `agent.config` (`Alarm`), `agent.model` (flags, `Reading`), `agent.alarmpresets`,
`agent.alarmwindow` and `agent.alarmactions`; nothing else from the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.alarmactions import _Target
from agent.alarmpresets import Preset, PresetLimit
from agent.alarmwindow import _Window
from agent.config import Alarm
from agent.model import FLAG_COMM, FLAG_FAULT, FLAG_NORMAL, FLAG_OVER_RANGE, Reading

FAULT_FLAGS = frozenset({FLAG_COMM, FLAG_FAULT})  # the device fault rule: no answer, or the device says fault
MEASURED_FLAGS = frozenset({FLAG_NORMAL, FLAG_OVER_RANGE})  # values compared with limits
READING_AGE_MAX_S = 5.0  # a reading reaches the engine this long after it was taken at most (see _taken_at)
POLL_JITTER_S = 0.1  # polls start this much late at most, by the scheduler's whims (see _lasted)

RULE_ABOVE, RULE_BELOW, RULE_STALE, RULE_FAULT = "above", "below", "stale", "fault"


def _measured(r: Reading) -> bool:
    """A value that counts for limits and windows: present, finite, with a measurement flag."""
    return r.value is not None and r.flag in MEASURED_FLAGS and math.isfinite(r.value)


def _taken_at(now: float, wall_ms: int, ts_ms: int) -> float:
    """When a reading was taken, on the monotonic clock: `now` less its age by the wall clock. A batch
    reaches the engine after the bus transaction and the group commit, whose length varies by a few
    milliseconds from poll to poll: timed from its arrival, a `delay` of two polls would often take
    three. The age is kept within 0..READING_AGE_MAX_S, so that a timestamp from an analyzer's own clock
    or a wall-clock step moves a delay by that much at most."""
    return now - min(max((wall_ms - ts_ms) / 1000, 0.0), READING_AGE_MAX_S)


def _lasted(since: float, now: float, delay: float) -> bool:
    """Whether a condition that began at `since` has lasted `delay` seconds at `now`, give or take
    POLL_JITTER_S: a poll is stamped when its thread runs, a few milliseconds after its turn, so the
    values of a delay of two poll intervals are often 1.995 intervals apart."""
    return now - since >= delay - POLL_JITTER_S


def _band_edge(limit: float, hysteresis: float, above: bool) -> float:
    """X − hysteresis (`above`) or X + hysteresis, to 15 significant digits as the numbers are written:
    0.8 − 0.1 is 0.7, where binary floats make it 0.7000000000000001 (and a value of 0.7, not below
    the band, would clear)."""
    edge = limit - hysteresis if above else limit + hysteresis
    return float(f"{edge:.15g}")


@dataclass
class _Rule:
    index: int
    alarm: Alarm
    specificity: int  # 2 "dev.ch", 1 "dev.*", 0 "*"
    kinds: list[tuple[str, str]]  # (rule name in events, id suffix)
    preset: Preset | None
    window: float | None
    target: _Target | None

    def matches(self, key: str) -> bool:
        pattern = self.alarm.channel
        if pattern == "*":
            return True
        if pattern.endswith(".*"):
            return key.split(".", 1)[0] == pattern[:-2]
        return key == pattern


class _Channel:
    """What the engine knows of one `device.channel`."""

    __slots__ = ("key", "device", "code", "unit", "last_valid_mono", "fault_since", "last_value", "last_value_ms",
                 "last_value_mono", "windows", "instances", "passive")

    def __init__(self, key: str, started: float):
        self.key = key
        self.device, self.code = key.split(".", 1)
        self.unit: str | None = None
        self.last_valid_mono = started  # not seen yet: the stale clock runs from the engine's start
        self.fault_since: float | None = None
        self.last_value: float | None = None  # last measured value (flag N/T)
        self.last_value_ms: int | None = None  # its reading's time (the instrument's clock, for an hj212 one)
        self.last_value_mono: float | None = None  # when it was taken on this machine's monotonic clock
        self.windows: dict[float, _Window] = {}
        self.instances: list[_Instance] = []
        # Neither a rule's background nor a preset's cold-start channel: with no instances and no
        # windows either, no rule looks at its readings and the engine skips them.
        self.passive = True


class _Instance:
    """One alarm: a rule applied to a channel."""

    __slots__ = ("id", "rule_name", "rule", "channel", "limit", "active", "since_ms", "value", "threshold",
                 "pending", "clearing", "_unit_seen", "_factor")

    def __init__(self, id_: str, rule_name: str, rule: _Rule, channel: _Channel, limit: PresetLimit | None):
        self.id = id_
        self.rule_name = rule_name
        self.rule = rule
        self.channel = channel
        self.limit = limit  # the preset's limit for this channel code
        self.active = False
        self.since_ms: int | None = None
        self.value: float | None = None
        self.threshold: float | None = None
        self.pending: float | None = None  # monotonic start of "beyond the limit"
        self.clearing: float | None = None  # monotonic start of "back within"
        self._unit_seen: str | None = None
        self._factor = 1.0
