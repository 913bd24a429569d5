"""The rolling window of an alarm rule's `window: S` (SPEC §2 "alarms"): `_Window`, the mean of a
channel's readings of the last S seconds (reading timestamps) in about WINDOW_BUCKETS (sum, count)
buckets, and how it is saved with the alarm state and restored (`to_json`, `from_json`);
MIN_WINDOW_COVERAGE, the share of the window its readings must cover before the engine
(`agent.alarms`) compares the mean with a limit, and `covered`, the time they cover.

Imports nothing from the project.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

MIN_WINDOW_COVERAGE = 0.75  # a window mean needs readings over this share of the window
WINDOW_BUCKETS = 120  # a window keeps at most about this many (sum, count) buckets


def covered(span_ms: float, count: int, interval_ms: float) -> float:
    """Milliseconds of a window that `count` readings spanning `span_ms` (oldest to newest) cover, each
    reading standing for one poll `interval_ms`: their span plus one interval, and never more than one
    interval per reading. A dropout inside the window (failed polls: null values, which never enter it)
    is a gap: 5 minutes of values before 10 minutes of failed polls are no 15-minute mean, where their
    span alone said the window was covered."""
    if interval_ms <= 0:
        return span_ms
    return min(span_ms + interval_ms, count * interval_ms)


class _Window:
    """Mean of the readings of the last `seconds` (reading timestamps), in (sum, count) buckets of
    `seconds / WINDOW_BUCKETS`: O(1) per reading, bounded memory even for 24-hour windows. A bucket is
    four machine numbers in four arrays (its index, sum, count and oldest reading time): 32 bytes, where
    a list of four Python numbers took ~200 (200 channels with a 300 s window: 0.8 MB instead of 4.9)."""

    __slots__ = ("seconds", "span_ms", "bucket_ms", "index", "sums", "counts", "oldest", "total", "count", "newest")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.span_ms = int(seconds * 1000)
        self.bucket_ms = max(1, self.span_ms // WINDOW_BUCKETS)
        self.index = array("q")  # the buckets, oldest first: ts_ms // bucket_ms
        self.sums = array("d")
        self.counts = array("q")
        self.oldest = array("q")  # the oldest reading time in the bucket
        self.total = 0.0
        self.count = 0
        self.newest: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def add(self, ts_ms: int, value: float) -> None:
        if self.newest is not None and ts_ms <= self.newest - self.span_ms:
            self.clear()  # the clock stepped back by more than the window (or a very late reading)
        index = ts_ms // self.bucket_ms
        if not self.index or index > self.index[-1]:
            self._insert(len(self.index), index, value, 1, ts_ms)
        else:
            self._add_old(index, ts_ms, value)
        self.total += value
        self.count += 1
        if self.newest is None or ts_ms > self.newest:
            self.newest = ts_ms
            self._expire()

    def _insert(self, pos: int, index: int, total: float, count: int, oldest: int) -> None:
        self.index.insert(pos, index)
        self.sums.insert(pos, total)
        self.counts.insert(pos, count)
        self.oldest.insert(pos, oldest)

    def _add_old(self, index: int, ts_ms: int, value: float) -> None:
        for pos in range(len(self.index) - 1, -1, -1):  # rare: a reading older than the newest bucket
            if self.index[pos] == index:
                self.sums[pos] += value
                self.counts[pos] += 1
                self.oldest[pos] = min(self.oldest[pos], ts_ms)
                return
            if self.index[pos] < index:
                self._insert(pos + 1, index, value, 1, ts_ms)
                return
        self._insert(0, index, value, 1, ts_ms)

    def _expire(self) -> None:
        assert self.newest is not None
        horizon = self.newest - self.span_ms
        n = 0
        while n < len(self.index) and (self.index[n] + 1) * self.bucket_ms <= horizon:
            n += 1
        if n:
            for column in (self.index, self.sums, self.counts, self.oldest):
                del column[:n]
            self._recount()  # no drift of the running sum

    def _recount(self) -> None:
        try:
            self.total = math.fsum(self.sums)
        except OverflowError:  # values near the double max (a float64 register reads 1e308): no mean
            self.total = math.nan
        self.count = sum(self.counts)

    def clear(self) -> None:
        for column in (self.index, self.sums, self.counts, self.oldest):
            del column[:]
        self.total = 0.0
        self.count = 0
        self.newest = None

    def mean(self) -> float | None:
        """None without readings, or while values near the double max overflow the sum (until they leave)."""
        mean = self.total / self.count if self.count else math.nan
        return mean if math.isfinite(mean) else None

    def since(self, horizon_ms: int) -> tuple[float | None, int, int]:
        """(mean, span in milliseconds, count) of the readings in the buckets that end after `horizon_ms`,
        as `_expire` would keep them: this window read from another channel's time (a background channel
        whose readings stopped while the site's go on). (None, 0, 0) when none is left."""
        n = 0
        while n < len(self.index) and (self.index[n] + 1) * self.bucket_ms <= horizon_ms:
            n += 1
        if n == 0:
            return self.mean(), self.covered_ms(), self.count
        if n == len(self.index) or self.newest is None:
            return None, 0, 0
        count = sum(self.counts[n:])
        try:
            mean = math.fsum(self.sums[n:]) / count
        except OverflowError:
            return None, 0, 0
        return (mean if math.isfinite(mean) else None), int(self.newest - self.oldest[n]), count

    def covered_ms(self) -> int:
        """Milliseconds between the oldest and the newest reading in the window."""
        if not self.index or self.newest is None:
            return 0
        return int(self.newest - self.oldest[0])

    def to_json(self) -> dict[str, Any]:
        return {"s": self.seconds, "w": self.bucket_ms, "n": self.newest,
                "b": [list(b) for b in zip(self.index, self.sums, self.counts, self.oldest, strict=True)]}

    @classmethod
    def from_json(cls, seconds: float, data: Any) -> _Window:
        w = cls(seconds)
        try:
            if data.get("s") != seconds or data.get("w") != w.bucket_ms:
                return w
            for index, total, count, oldest in data["b"]:
                w._insert(len(w), int(index), float(total), int(count), int(oldest))
            w.newest = int(data["n"]) if data.get("n") is not None else None
            w._recount()
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
            return cls(seconds)
        return w
