"""The web console's charts (`agent.console`): `History`, the last 24 h of every channel in 1-minute
buckets (sum, min, max and count of valid values, failed readings) and of every device's polls (polls,
failed, partial, the last failure), in fixed-size rings (`_Ring`, `_Series`, `_Polls`) fed by the
recorder and prefilled from the buffer (`_first_seq_at`: where the last 24 h begin).

Imports `agent.buffer` (`Buffer`, the reader of the prefill) and `agent.model`; nothing else from the
project. Its log lines are the console's (logger `agent.console`).
"""

from __future__ import annotations

import logging
import math
import threading
from array import array
from collections import deque
from collections.abc import Iterable
from typing import Any

from agent.buffer import Buffer
from agent.model import Reading, iso_utc_ms, now_ms

log = logging.getLogger("agent.console")  # the console's lines, under one name as before the split

HISTORY_HOURS = 24  # the in-memory history covers this many hours ...
BUCKET_MS = 60_000  # ... in buckets of one minute
MINUTES = HISTORY_HOURS * 60
FUTURE_MINUTES = 60  # readings stamped further ahead than this (a wrong instrument clock) are not charted
MAX_SERIES = 1000  # bound on the channels kept in memory (about 58 KB each; a station has tens)
MAX_PENDING = 200_000  # readings held while the prefill runs


class _Ring:
    """A ring of MINUTES slots, one per minute; a slot is reused when a newer minute maps onto it."""

    __slots__ = ("minute",)

    def __init__(self) -> None:
        self.minute = array("q", [-1]) * MINUTES

    def _slot(self, minute: int) -> int | None:
        i = minute % MINUTES
        held = self.minute[i]
        if held == minute:
            return i
        if held > minute:
            return None  # older than what the ring holds now
        self.minute[i] = minute
        self._reset(i)
        return i

    def _reset(self, i: int) -> None:
        raise NotImplementedError

    def slots(self, first: int, last: int) -> Iterable[tuple[int, int]]:
        """(minute, slot index) of the filled minutes in [first, last], oldest first."""
        for m in range(max(first, last - MINUTES + 1), last + 1):
            i = m % MINUTES
            if self.minute[i] == m:
                yield m, i


class _Series(_Ring):
    """One channel: sum, min, max and count of valid values, and count of failed readings per minute."""

    __slots__ = ("total", "low", "high", "n", "bad", "unit")

    def __init__(self) -> None:
        super().__init__()
        self.total = array("d", [0.0]) * MINUTES
        self.low = array("d", [math.inf]) * MINUTES
        self.high = array("d", [-math.inf]) * MINUTES
        self.n = array("i", [0]) * MINUTES
        self.bad = array("i", [0]) * MINUTES
        self.unit: str | None = None

    def _reset(self, i: int) -> None:
        self.total[i] = 0.0
        self.low[i] = math.inf
        self.high[i] = -math.inf
        self.n[i] = 0
        self.bad[i] = 0

    def merge(self, minute: int, total: float, low: float, high: float, n: int, bad: int) -> None:
        i = self._slot(minute)
        if i is None:
            return
        if n:
            self.total[i] += total
            self.low[i] = min(self.low[i], low)
            self.high[i] = max(self.high[i], high)
            self.n[i] += n
        self.bad[i] += bad

    def points(self, first: int, last: int) -> list[dict[str, Any]]:
        out = []
        for m, i in self.slots(first, last):
            n = self.n[i]
            out.append({"t": iso_utc_ms(m * BUCKET_MS), "avg": self.total[i] / n if n else None,
                        "min": self.low[i] if n else None, "max": self.high[i] if n else None,
                        "n": n, "bad": self.bad[i]})
        return out


class _Polls(_Ring):
    """One device: polls, failed polls (every value null) and partial ones (some null) per minute."""

    __slots__ = ("polls", "failed", "partial", "last_failure_ms")

    def __init__(self) -> None:
        super().__init__()
        self.polls = array("i", [0]) * MINUTES
        self.failed = array("i", [0]) * MINUTES
        self.partial = array("i", [0]) * MINUTES
        self.last_failure_ms: int | None = None

    def _reset(self, i: int) -> None:
        self.polls[i] = self.failed[i] = self.partial[i] = 0

    def merge(self, minute: int, polls: int, failed: int, partial: int) -> None:
        i = self._slot(minute)
        if i is not None:
            self.polls[i] += polls
            self.failed[i] += failed
            self.partial[i] += partial

    def counts(self, first: int, last: int) -> dict[str, int]:
        polls = failed = partial = 0
        for _, i in self.slots(first, last):
            polls += self.polls[i]
            failed += self.failed[i]
            partial += self.partial[i]
        return {"polls": polls, "failed": failed, "partial": partial}


class History:
    """The last 24 h of every channel in 1-minute buckets, and of every device's polls.

    `observe` is a recorder stored-listener (recorder thread, O(readings), no I/O). `prefill` reads
    the buffer's readings of the last 24 h once at start; readings the listener saw meanwhile are
    held until then and only those above the prefill's last seq are added, so none counts twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._polls: dict[str, _Polls] = {}
        self._boundary: int | None = None  # highest seq covered by the prefill; None while it runs
        self._pending: deque[Reading] = deque(maxlen=MAX_PENDING)
        self._warned_full = False

    @property
    def ready(self) -> bool:
        return self._boundary is not None

    def observe(self, readings: list[Reading]) -> None:
        """A committed batch of readings (recorder thread)."""
        with self._lock:
            if self._boundary is None:
                self._pending.extend(readings)
            else:
                self._ingest(readings, self._boundary)

    def _series_for(self, device: str, channel: str) -> _Series | None:
        s = self._series.get((device, channel))
        if s is None:
            if len(self._series) >= MAX_SERIES:
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("console: more than %d channels; the others are not charted", MAX_SERIES)
                return None
            s = self._series[(device, channel)] = _Series()
        return s

    def _polls_for(self, device: str) -> _Polls:
        p = self._polls.get(device)
        if p is None:
            p = self._polls[device] = _Polls()
        return p

    def _ingest(self, readings: Iterable[Reading], above_seq: int) -> None:
        horizon = now_ms() // BUCKET_MS + FUTURE_MINUTES
        polls: dict[tuple[str, int], list[int]] = {}  # (device, ts) -> [readings, null values]
        for r in readings:
            if r.seq <= above_seq:
                continue
            minute = r.ts_ms // BUCKET_MS
            if minute > horizon:
                continue
            s = self._series_for(r.device, r.channel)
            v = float(r.value) if r.value is not None else math.nan
            valid = math.isfinite(v)
            if s is not None:
                if r.unit:
                    s.unit = r.unit
                if valid:
                    s.merge(minute, v, v, v, 1, 0)
                else:
                    s.merge(minute, 0.0, math.inf, -math.inf, 0, 1)
            counts = polls.setdefault((r.device, r.ts_ms), [0, 0])
            counts[0] += 1
            counts[1] += 0 if valid else 1
        for (device, ts_ms), (n, nulls) in polls.items():
            p = self._polls_for(device)
            p.merge(ts_ms // BUCKET_MS, 1, int(nulls == n), int(0 < nulls < n))
            if nulls and (p.last_failure_ms is None or ts_ms > p.last_failure_ms):
                p.last_failure_ms = ts_ms

    def prefill(self, reader: Buffer, now: int) -> int:
        """Fill the rings from the buffer's readings of the last 24 h; returns the readings read.
        Aggregation runs in SQLite (one pass per query), not in Python."""
        conn = reader.conn
        cutoff = (now // BUCKET_MS - MINUTES + 1) * BUCKET_MS
        top = conn.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
        first = _first_seq_at(conn, cutoff - 600_000, top)  # 10 min of slack for out-of-order stamps
        where = "WHERE seq BETWEEN ? AND ? AND ts_ms >= ?"
        args = (first, top, cutoff)
        channel_rows = conn.execute(
            "SELECT device, channel, ts_ms / 60000, total(value), min(value), max(value), count(value), "
            f"count(*) - count(value), max(unit) FROM readings {where} GROUP BY device, channel, ts_ms / 60000",
            args).fetchall()
        poll_rows = conn.execute(
            "SELECT device, ts_ms / 60000, count(*), sum(nulls = n), sum(nulls > 0 AND nulls < n), "
            "max(CASE WHEN nulls > 0 THEN ts_ms END) FROM (SELECT device, ts_ms, count(*) AS n, "
            f"count(*) - count(value) AS nulls FROM readings {where} GROUP BY device, ts_ms) "
            "GROUP BY device, ts_ms / 60000", args).fetchall()
        with self._lock:
            count = 0
            for device, channel, minute, total, low, high, n, bad, unit in channel_rows:
                s = self._series_for(device, channel)
                if s is not None:
                    s.merge(int(minute), float(total or 0.0), math.inf if low is None else float(low),
                            -math.inf if high is None else float(high), int(n), int(bad))
                    s.unit = unit or s.unit
                count += int(n) + int(bad)
            for device, minute, polls, failed, partial, last_failure in poll_rows:
                p = self._polls_for(device)
                p.merge(int(minute), int(polls), int(failed or 0), int(partial or 0))
                if last_failure is not None and (p.last_failure_ms is None or last_failure > p.last_failure_ms):
                    p.last_failure_ms = int(last_failure)
            self._finish_prefill(top)
        return count

    def prefill_failed(self) -> None:
        """Start empty: every reading the listener saw counts."""
        with self._lock:
            self._finish_prefill(0)

    def _finish_prefill(self, boundary: int) -> None:
        self._boundary = boundary
        pending = list(self._pending)
        self._pending.clear()
        self._ingest(pending, boundary)

    def points(self, device: str, channel: str, first_minute: int, last_minute: int) -> list[dict[str, Any]]:
        with self._lock:
            s = self._series.get((device, channel))
            return s.points(first_minute, last_minute) if s is not None else []

    def unit(self, device: str, channel: str) -> str | None:
        s = self._series.get((device, channel))
        return s.unit if s is not None else None

    def known(self, device: str, channel: str) -> bool:
        return (device, channel) in self._series

    def devices(self) -> list[str]:
        with self._lock:
            return list(self._polls)

    def poll_counts(self, device: str, now: int) -> dict[str, Any]:
        """Polls, failed and partial polls of the last hour and the last 24 h, and the last failure."""
        last = now // BUCKET_MS
        with self._lock:
            p = self._polls.get(device)
            if p is None:
                return {"last_hour": None, "last_24h": None, "last_failure": None}
            return {"last_hour": p.counts(last - 59, last), "last_24h": p.counts(last - MINUTES + 1, last),
                    "last_failure": iso_utc_ms(p.last_failure_ms) if p.last_failure_ms else None}


def _first_seq_at(conn: Any, ts_ms: int, top: int) -> int:
    """The first seq whose reading is stamped at or after `ts_ms`, by binary search on seq (rows are in
    time order but for the odd late stamp); `top + 1` when there is none."""
    low = conn.execute("SELECT min(seq) FROM readings").fetchone()[0]
    if low is None:
        return top + 1
    hi = top + 1
    while low < hi:
        mid = (low + hi) // 2
        row = conn.execute("SELECT ts_ms FROM readings WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)).fetchone()
        if row is None or row[0] >= ts_ms:
            hi = mid
        else:
            low = mid + 1
    return int(low)
