"""JSON payloads of the MQTT topics (SPEC §4): data, gap, aggregates, alarm, status, command replies.

The readings themselves are encoded by SQLite (`agent.buffer.READING_JSON`), which keeps the drain's
hot path in C. Imports nothing from the project.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

PAYLOAD_VERSION = 1


def data_message(station_id: str, items: str) -> bytes:
    """A data message around readings already encoded as JSON objects (see `buffer.READING_JSON`)."""
    return ('{"v":1,"station":' + json.dumps(station_id, ensure_ascii=False) + ',"readings":[' + items + "]}").encode()


def gap_message(station_id: str, first_seq: int, last_seq: int, reason: str) -> bytes:
    return _dumps({"v": PAYLOAD_VERSION, "station": station_id, "gap": [first_seq, last_seq], "reason": reason})


def aggregates_message(station_id: str, aggregates: Sequence[dict]) -> bytes:
    return _dumps({"v": PAYLOAD_VERSION, "station": station_id, "aggregates": list(aggregates)})


def alarm_message(station_id: str, alarm: dict) -> bytes:
    return _dumps({"v": PAYLOAD_VERSION, "station": station_id, "alarm": alarm})


def status_message(station_id: str, state: str, **extra: object) -> bytes:
    return _dumps({"v": PAYLOAD_VERSION, "station": station_id, "state": state, **extra})


def reply_message(cmd_id: object, ok: bool, **extra: object) -> bytes:
    return _dumps({"v": PAYLOAD_VERSION, "id": cmd_id, "ok": ok, **extra})


def finite(value: object) -> object:
    """`value` with its NaN and infinities (not JSON) made null, in dicts, lists and tuples too (the
    console's documents use it as well)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _dumps(obj: object) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # an event stored with inf or NaN (by an older version): its number is lost, not the
        # event, and never the messages after it (the publisher retried it forever, publishing nothing else)
        obj = finite(obj)
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON may carry ("\ud800" in a command id) and UTF-8
        # cannot: escaped the way it came, so that the platform gets back the very string it sent
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()
