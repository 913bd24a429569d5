"""What the web console (`agent.console`) says of the gateway beside the `status` document:
`DrainMeter`, readings committed and acknowledged per second over the last minute, and how long the
backlog takes to drain at that pace; `clock_state`, whether the gateway's clock is set and synchronized
(the kernel's NTP status); `system_uptime`; `_local_time`, the time in the station's timezone.

Imports nothing from the project.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

DRAIN_WINDOW_S = 60.0  # rates for the drain estimate are measured over this long
CLOCK_SET_AFTER_MS = 1_704_067_200_000  # 2024-01-01: a gateway clock before this was never set


class DrainMeter:
    """Readings committed and acknowledged per second over the last minute, sampled every 2 s."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def sample(self, committed: int, acked: int, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        with self._lock:
            if acked <= 0 or (self._samples and acked < self._samples[-1][2]):
                self._samples.clear()  # not started yet, or the watermark was reset
            self._samples.append((at, committed, acked))
            while len(self._samples) > 2 and at - self._samples[0][0] > DRAIN_WINDOW_S:
                self._samples.popleft()

    def estimate(self, committed: int, acked: int, broker_state: str) -> dict[str, Any]:
        backlog = max(committed - acked, 0)
        with self._lock:
            samples = list(self._samples)
        rate_in = rate_out = None
        if len(samples) >= 2 and samples[-1][0] - samples[0][0] >= 1.0:
            (t0, c0, a0), (t1, c1, a1) = samples[0], samples[-1]
            rate_in = max(c1 - c0, 0) / (t1 - t0)
            rate_out = max(a1 - a0, 0) / (t1 - t0)
        eta = None
        if broker_state != "online":
            state = "waiting for the broker"
        elif rate_in is None or rate_out is None:
            state = "measuring"
        elif backlog <= max(2 * rate_in, 10):
            state, eta = "up to date", 0.0
        elif rate_out > rate_in:
            state, eta = "draining", backlog / (rate_out - rate_in)
        else:
            state = "not shrinking"
        return {"backlog": backlog, "in_per_s": _round(rate_in), "out_per_s": _round(rate_out),
                "eta_s": _round(eta), "state": state}


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def clock_state(now: int) -> str:
    """`not set` (before 2024), `synchronized` / `not synchronized` (the kernel's NTP status, as
    `timedatectl` shows it, read with adjtimex(2) in read-only mode) or `unknown`."""
    if now < CLOCK_SET_AFTER_MS:
        return "not set"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex with modes=0: read only; 512 >= its size
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return "unknown"
    if state < 0:
        return "unknown"
    return "not synchronized" if state == 5 else "synchronized"  # 5: TIME_ERROR (STA_UNSYNC)


def system_uptime() -> float | None:
    """Seconds since the gateway booted (Linux), or None."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _local_time(now: int, timezone: str) -> str:
    tz: tzinfo = UTC
    try:
        tz = ZoneInfo(timezone)
    except Exception:  # noqa: BLE001 - validated by the config; a broken tzdata must not break the page
        pass
    return datetime.fromtimestamp(now / 1000, tz).isoformat(timespec="seconds")
