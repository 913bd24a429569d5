"""Plain data types shared by drivers and the agent: a Reading, the HJ 212 data flags, time helpers.

This module imports nothing from the project; `drivers` may import it and nothing else from `agent`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import NamedTuple

# HJ 212 data flags (DOMAIN.md): one letter per reading.
FLAG_NORMAL = "N"  # normal
FLAG_STOPPED = "F"  # instrument stopped
FLAG_MAINTENANCE = "M"  # maintenance
FLAG_MANUAL = "S"  # manually set value
FLAG_FAULT = "D"  # device fault (Modbus exception, fault status word)
FLAG_CALIBRATION = "C"  # calibration
FLAG_OVER_RANGE = "T"  # above the instrument's measuring range
FLAG_COMM = "B"  # communication failure between instrument and gateway (no answer, bad CRC)
FLAGS = frozenset("NFMSDCTB")

# Streams of the buffer; each has its own seq numbering.
STREAM_READINGS = "readings"
STREAM_AGGREGATES = "aggregates"
STREAM_ALARMS = "alarms"
STREAMS = (STREAM_READINGS, STREAM_AGGREGATES, STREAM_ALARMS)


class Reading(NamedTuple):
    """One value of one channel of one device at one instant, as a driver produced it.

    `ts_ms` is Unix time in milliseconds (UTC). `value` is None when the read failed; the flag then
    says why (B no answer / bad frame, D instrument fault). `seq` is 0 until the buffer stored it.
    An immutable tuple: tens of them are made every second, and a tuple is made four times faster
    than a frozen dataclass. `Buffer.insert_readings` binds the fields in this order.
    """

    device: str
    channel: str
    ts_ms: int
    value: float | None
    unit: str | None = None
    flag: str = FLAG_NORMAL
    seq: int = 0


def now_ms() -> int:
    """Wall-clock time in Unix milliseconds (for timestamps, never for intervals)."""
    return time.time_ns() // 1_000_000


def iso_utc_ms(ts_ms: int) -> str:
    """`2026-11-29T02:00:00.000Z` for a Unix-millisecond timestamp (SPEC §4 `ts`)."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def parse_iso_utc_ms(text: str) -> int:
    """Inverse of `iso_utc_ms`: accepts any ISO 8601 time with a zone; returns Unix milliseconds."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"time without zone: {text!r}")
    return round(dt.timestamp() * 1000)
