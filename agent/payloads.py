"""JSON payloads of the MQTT topics (SPEC §4): data, gap, aggregates, alarm, status, command replies.

The data encoder is on the drain's hot path: it writes JSON text directly and caches the escaped
strings and timestamps that repeat from reading to reading. Imports `agent.model` only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from agent.model import Reading, iso_utc_ms

PAYLOAD_VERSION = 1


class DataEncoder:
    """Encodes batches of readings as `{"v":1,"station":…,"readings":[…]}` (UTF-8 bytes)."""

    def __init__(self, station_id: str):
        self.station_id = station_id
        self._head = '{"v":1,"station":' + json.dumps(station_id, ensure_ascii=False) + ',"readings":['
        self._names: dict[tuple[str, str, str | None], tuple[str, str]] = {}
        self._last_ts = -1
        self._last_ts_text = ""

    def _ts(self, ts_ms: int) -> str:
        if ts_ms != self._last_ts:
            self._last_ts = ts_ms
            self._last_ts_text = iso_utc_ms(ts_ms)
        return self._last_ts_text

    def _name_part(self, r: Reading) -> tuple[str, str]:
        key = (r.device, r.channel, r.unit)
        part = self._names.get(key)
        if part is None:
            if len(self._names) > 10_000:
                self._names.clear()
            names = (',"device":' + json.dumps(r.device, ensure_ascii=False)
                     + ',"channel":' + json.dumps(r.channel, ensure_ascii=False))
            unit = json.dumps(r.unit, ensure_ascii=False) if r.unit is not None else "null"
            part = self._names[key] = (names, unit)
        return part

    def encode(self, readings: Sequence[Reading]) -> bytes:
        items = []
        for r in readings:
            names, unit = self._name_part(r)
            items.append(
                f'{{"seq":{r.seq}{names},"ts":"{self._ts(r.ts_ms)}","value":{format_value(r.value)},'
                f'"unit":{unit},"flag":"{r.flag}"}}'
            )
        return (self._head + ",".join(items) + "]}").encode()


def format_value(value: float | None) -> str:
    """JSON number for a reading value; null for None and for NaN/inf (JSON has no such numbers)."""
    if value is None or not math.isfinite(value):
        return "null"
    return repr(float(value))


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


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
