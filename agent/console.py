"""The local web console (`console:` section): a read-only HTTP server inside the agent for the technician
at the station — one page (HTML, inline CSS and JS, charts drawn as inline SVG) and a small JSON API.

Standard library only: `http.server.ThreadingHTTPServer` on a daemon thread. Imports `agent` (version),
`agent.buffer`, `agent.config`, `agent.model`, `agent.status` and `agent.logutil`; it sees the running station only
through the attributes of `StationView` and never writes anything: no config, no instrument, no file.

- GET /api/status: the `edge-agent status --json` document, plus a `console` key (station identity,
  uptimes, clock, drain estimate, buffer cap, per-device poll failures, configured channels).
- GET /api/history?channel=DEVICE.CHANNEL&hours=N: 1-minute buckets (avg/min/max/count) of the last N
  hours (0 < N <= 24) from an in-memory history fed by the recorder and prefilled from the buffer.
- GET /api/alarms[?limit=N]: active alarms and the latest alarm events.
Errors are JSON `{"error": ..., "status": ...}` with the status code; never a stack trace, never the
request's own bytes. A malformed request line or header block is answered `400 Bad Request` with a status line
and headers like any other answer.

One request per connection (HTTP/1.0). Its request line and headers must arrive whole within
REQUEST_DEADLINE_S, or the connection is closed unanswered. At most MAX_CLIENTS connections are held; when
they are all taken, a new connection takes the place of the oldest one still sending its request (that one is
closed), so that clients trickling headers to hold slots (slowloris) cannot lock the technician out.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import importlib.resources
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, tzinfo
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from agent import __version__
from agent.buffer import Buffer
from agent.config import Config, ConfigError, read_password_file
from agent.config import Console as ConsoleSettings
from agent.logutil import RateLimitedLog
from agent.model import STREAM_ALARMS, Reading, iso_utc_ms, now_ms
from agent.payloads import finite
from agent.status import collect

__all__ = ["HISTORY_HOURS", "Console", "ConsoleError", "History", "StationView", "start_console"]

log = logging.getLogger(__name__)

HISTORY_HOURS = 24  # the in-memory history covers this many hours ...
BUCKET_MS = 60_000  # ... in buckets of one minute
MINUTES = HISTORY_HOURS * 60
FUTURE_MINUTES = 60  # readings stamped further ahead than this (a wrong instrument clock) are not charted
MAX_SERIES = 1000  # bound on the channels kept in memory (about 58 KB each; a station has tens)
MAX_PENDING = 200_000  # readings held while the prefill runs
STATUS_TTL_S = 1.0  # several tabs polling share one status document per second
DRAIN_WINDOW_S = 60.0  # rates for the drain estimate are measured over this long
SAMPLE_EVERY_S = 2.0
MAX_CLIENTS = 32  # connections held at once (the station is never affected); see _Server for who gets one
REQUEST_DEADLINE_S = 5.0  # a connection's request line and headers must all arrive within this, or it is closed
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together (a browser sends 1-2 KB)
MAX_AUTH_FAILURES = 20  # wrong passwords from one address within AUTH_WINDOW_S before it gets 429
AUTH_WINDOW_S = 60.0
RECENT_ALARMS = 50
CLOCK_SET_AFTER_MS = 1_704_067_200_000  # 2024-01-01: a gateway clock before this was never set
_CHANNEL_RE = re.compile(r"[a-z0-9_-]{1,64}\.[A-Za-z0-9_]{1,64}")
_NUMBER_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


class ConsoleError(Exception):
    """The console cannot start (unreadable password file, address in use, ...)."""


class _RecorderView(Protocol):
    @property
    def last_committed_seq(self) -> int: ...

    def add_stored_listener(self, callback: Callable[[list[Reading]], None]) -> None: ...


class _PublisherView(Protocol):
    @property
    def state(self) -> str: ...

    def acked_upto(self, stream: str = ...) -> int: ...


class _AlarmsView(Protocol):
    def limits(self, channel: str) -> list[dict[str, Any]]: ...


class StationView(Protocol):
    """What the console reads of the running station (`agent.runtime.Station`); `config` may be
    replaced by a reload at any time."""

    @property
    def config(self) -> Config: ...

    @property
    def recorder(self) -> _RecorderView: ...

    @property
    def publisher(self) -> _PublisherView: ...

    @property
    def alarms(self) -> _AlarmsView: ...


# --------------------------------------------------------------------------------------------------
# History: per-channel 1-minute buckets and per-device poll counts, in fixed-size rings


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


# --------------------------------------------------------------------------------------------------
# Drain estimate, clock, uptime


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


# --------------------------------------------------------------------------------------------------
# The password file


class _Password:
    """The console password: the file's content without its trailing newline (read as the MQTT
    password file is, `read_password_file`), re-read when the file changes. Unreadable or empty →
    None (every request is then refused: the console fails closed). `shown`: the file's path as
    messages may show it, None where it may be the secret itself (`Config.shown_file`)."""

    def __init__(self, path: Path, shown: str | None):
        self.path = path
        self.name = f"console.password_file {shown}" if shown else "console.password_file"
        self._stamp: tuple[int, int] | None = None
        self._digest: bytes | None = None
        self._errlog = RateLimitedLog(log, every_s=300)
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the file now; raises ConsoleError (never quoting the file) when it is unusable."""
        if self.digest() is None:
            raise ConsoleError(f"{self.name}: cannot read a password from it")

    def digest(self) -> bytes | None:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    text = read_password_file(self.path)
                    self._digest = hashlib.sha256(text.encode("utf-8")).digest() if text else None
                    self._stamp = stamp
                    if self._digest is None:
                        self._errlog.error("%s is empty: every request is refused", self.name)
            except (OSError, ValueError) as exc:  # str(OSError) would quote the path
                reason = str(exc) if isinstance(exc, ValueError) else exc.strerror or exc.__class__.__name__
                self._errlog.error("%s cannot be read (%s): every request is refused", self.name, reason)
                self._digest = None
                self._stamp = None
            return self._digest

    def matches(self, given: str) -> bool | None:
        """True/False; None when there is no usable password file."""
        digest = self.digest()
        if digest is None:
            return None
        return hmac.compare_digest(hashlib.sha256(given.encode("utf-8")).digest(), digest)


class _Throttle:
    """Wrong passwords per client address: more than MAX_AUTH_FAILURES in AUTH_WINDOW_S → 429."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(client)
            if q is None:
                return False
            while q and now - q[0] > AUTH_WINDOW_S:
                q.popleft()
            return len(q) >= MAX_AUTH_FAILURES

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures.setdefault(client, deque(maxlen=MAX_AUTH_FAILURES)).append(time.monotonic())


# --------------------------------------------------------------------------------------------------
# The console


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Console:
    """The console of one running station. `start()` binds and serves; `stop()` ends it."""

    def __init__(self, station: StationView, settings: ConsoleSettings):
        self.station = station
        self.settings = settings
        self.history = History()
        self.drain = DrainMeter()
        self.password = (_Password(settings.password_file, station.config.shown_file(("console", "password_file")))
                         if settings.password_file is not None else None)
        self.throttle = _Throttle()
        self.started_ms = now_ms()
        self.started_mono = time.monotonic()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self._status_lock = threading.Lock()
        self._warned_settings = False
        self.errlog = RateLimitedLog(log, every_s=60)

    @property
    def url(self) -> str:
        host, port = self.server_address()
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def server_address(self) -> tuple[str, int]:
        if self._server is not None:
            addr = self._server.server_address
            return str(addr[0]), int(addr[1])
        return self.settings.address()

    def start(self) -> None:
        """Bind the listen address and start serving; raises ConsoleError (the station runs on)."""
        if self.password is not None:
            self.password.load()
        host, port = self.settings.address()
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            raise ConsoleError(f"console cannot listen on {self.settings.listen}: {exc.strerror or exc}") from None
        self.station.recorder.add_stored_listener(self.history.observe)
        for name, target in (("console-http", self._serve), ("console-prefill", self._prefill),
                             ("console-sampler", self._sample_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        access = "password required" if self.password is not None else "no password: this machine only"
        log.info("console serving %s (%s)", self.url, access)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            # shutdown() waits for serve_forever(); bounded, so that a console problem never holds the stop
            stopper = threading.Thread(target=self._server.shutdown, name="console-stop", daemon=True)
            stopper.start()
            stopper.join(5)
            self._server.server_close()
        for t in self._threads:
            t.join(5)
        log.info("console stopped")

    # ------------------------------------------------------------------ background threads

    def _serve(self) -> None:
        assert self._server is not None
        self._server.serve_forever(poll_interval=0.5)

    def _prefill(self) -> None:
        started = time.monotonic()
        try:
            reader = Buffer.open_reader(self.station.config.storage.path)
            try:
                n = self.history.prefill(reader, now_ms())
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - the charts then start empty; the console still serves
            log.warning("console: could not read the last 24 h from the buffer (%s); charts start empty", exc)
            self.history.prefill_failed()
            return
        log.info("console: history prefilled from %d stored readings in %.1f s", n, time.monotonic() - started)

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.drain.sample(self.station.recorder.last_committed_seq, self.station.publisher.acked_upto())
                current = self.station.config.console
                if current != self.settings and not self._warned_settings:
                    self._warned_settings = True
                    log.warning("console settings changed: they take effect at the next restart")
            except Exception as exc:  # noqa: BLE001 - sampling must never end the console
                self.errlog.error("console sampler failed: %s", exc)

    # ------------------------------------------------------------------ documents

    def status_document(self) -> dict[str, Any]:
        """`status --json` plus the `console` key; cached for STATUS_TTL_S."""
        with self._status_lock:
            now_mono = time.monotonic()
            if self._status_cache is not None and now_mono - self._status_cache[0] < STATUS_TTL_S:
                return self._status_cache[1]
            doc = self._build_status()
            self._status_cache = (now_mono, doc)
            return doc

    def _build_status(self) -> dict[str, Any]:
        config = self.station.config
        intervals = {d: dev.interval for d, dev in config.devices.items()}
        known = {d: dev.known_channels() for d, dev in config.devices.items()}
        path = config.storage.path
        reader = Buffer.open_reader(path) if path.exists() else None
        try:
            doc = collect(reader, intervals, known)
        finally:
            if reader is not None:
                reader.close()
        doc["station"] = config.station.id
        doc["agent"] = {"running": True, "pid": os.getpid()}  # as `status` says it (this is the agent)
        now = now_ms()
        committed = self.station.recorder.last_committed_seq
        acked = self.station.publisher.acked_upto()
        used = (doc.get("buffer") or {}).get("used_bytes")
        max_bytes = int(config.storage.max_mb * 1024 * 1024)
        devices: dict[str, Any] = {}
        for dev_id in [*config.devices, *[d for d in self.history.devices() if d not in config.devices]]:
            dev = config.devices.get(dev_id)
            channels = (dev.known_channels() or []) if dev is not None else []
            units = {code: ch.unit for code, ch in (dev.channels or {}).items()} if dev is not None else {}
            devices[dev_id] = {
                "in_config": dev is not None,
                "driver": dev.driver if dev is not None else None,
                "bus": dev.bus if dev is not None else None,
                "interval": dev.interval if dev is not None else None,
                "channels": channels,
                "units": {c: u for c, u in units.items() if u},
                "polls": self.history.poll_counts(dev_id, now),
            }
        doc["console"] = {
            "station": {"id": config.station.id, "name": config.station.name, "type": config.station.type,
                        "timezone": config.station.timezone},
            "agent": {"version": __version__, "pid": os.getpid(), "started": iso_utc_ms(self.started_ms),
                      "uptime_s": round(time.monotonic() - self.started_mono, 1)},
            "system": {"uptime_s": system_uptime()},
            "clock": {"utc": iso_utc_ms(now), "local": _local_time(now, config.station.timezone),
                      "timezone": config.station.timezone, "state": clock_state(now)},
            "drain": self.drain.estimate(committed, acked, self.station.publisher.state),
            "buffer": {"used_bytes": used, "max_bytes": max_bytes,
                       "percent": round(100 * used / max_bytes, 1) if used is not None and max_bytes else None},
            "devices": devices,
            "history": {"ready": self.history.ready, "hours": HISTORY_HOURS, "bucket_s": BUCKET_MS // 1000},
        }
        return doc

    def history_document(self, channel: str, hours: float) -> dict[str, Any]:
        device, code = channel.split(".", 1)
        config = self.station.config
        dev = config.devices.get(device)
        configured = dev is not None and code in (dev.known_channels() or [])
        if not configured and not self.history.known(device, code):
            raise ApiError(404, f"unknown channel {channel!r} (not in the config and no readings in memory)")
        now = now_ms()
        last = now // BUCKET_MS
        first = last - math.ceil(hours * 60) + 1
        unit = self.history.unit(device, code)
        if unit is None and dev is not None and dev.channels and code in dev.channels:
            unit = dev.channels[code].unit
        limits = self.station.alarms.limits(channel)  # those in force: presets too, not a shadowed wildcard
        return {"channel": channel, "device": device, "code": code, "unit": unit, "hours": hours,
                "bucket_s": BUCKET_MS // 1000, "from": iso_utc_ms(first * BUCKET_MS),
                "to": iso_utc_ms((last + 1) * BUCKET_MS), "ready": self.history.ready, "limits": limits,
                "points": self.history.points(device, code, first, last)}

    def alarms_document(self, limit: int) -> dict[str, Any]:
        path = self.station.config.storage.path
        if not path.exists():
            return {"active": [], "recent": []}
        reader = Buffer.open_reader(path)
        try:
            try:
                active = json.loads(reader.meta_value("active_alarms") or "[]")
            except ValueError:
                active = []
            top, _ = reader.stream_state(STREAM_ALARMS)
            events = reader.events_after(STREAM_ALARMS, max(top - limit, 0), limit)
        finally:
            reader.close()
        return {"active": active, "recent": [e.body for e in reversed(events)]}


def start_console(station: StationView) -> Console | None:
    """Start the console when the config has a `console:` section; None when it has none or it cannot
    start (logged: the station itself runs on without it)."""
    settings = station.config.console
    if settings is None:
        return None
    console = Console(station, settings)
    try:
        console.start()
    except (ConsoleError, ConfigError) as exc:
        log.error("%s; running without the console", exc)
        return None
    return console


# --------------------------------------------------------------------------------------------------
# HTTP


def _query(raw: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters, each at most once, only the allowed names. Empty fields (`a=1&`, `&&`) are
    nothing, as browsers and scripts that build queries leave them."""
    raw = "&".join(field for field in raw.split("&") if field)
    if not raw:
        return {}
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=True, max_num_fields=10)
    except ValueError:
        raise ApiError(400, "malformed query string") from None
    out = {}
    for name, values in parsed.items():
        if name not in allowed:
            hint = f"; allowed: {', '.join(allowed)}" if allowed else "; this endpoint takes none"
            raise ApiError(400, f"unknown parameter {name[:40]!r}{hint}")
        if len(values) != 1:
            raise ApiError(400, f"parameter {name!r} given {len(values)} times")
        out[name] = values[0]
    return out


def _number(params: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    text = params.get(name)
    if text is None:
        return float(default)
    if not _NUMBER_RE.fullmatch(text):
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}")
    value = float(text)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}")
    return value


def _api_status(console: Console, params: dict[str, str]) -> dict[str, Any]:
    return console.status_document()


def _api_history(console: Console, params: dict[str, str]) -> dict[str, Any]:
    channel = params.get("channel")
    if not channel:
        raise ApiError(400, "missing parameter 'channel' (DEVICE.CHANNEL, e.g. cod.w01018)")
    if not _CHANNEL_RE.fullmatch(channel):
        raise ApiError(400, "channel must be DEVICE.CHANNEL, e.g. cod.w01018")
    hours = _number(params, "hours", HISTORY_HOURS, 0, HISTORY_HOURS)
    if hours <= 0:
        raise ApiError(400, f"hours must be a number from 0 to {HISTORY_HOURS} (not 0)")
    return console.history_document(channel, hours)


def _api_alarms(console: Console, params: dict[str, str]) -> dict[str, Any]:
    limit = _number(params, "limit", RECENT_ALARMS, 1, 500)
    if not limit.is_integer():
        raise ApiError(400, "limit must be a whole number from 1 to 500")
    return console.alarms_document(int(limit))


def _api_index(console: Console, params: dict[str, str]) -> dict[str, Any]:
    return {"endpoints": {
        "/api/status": "the `edge-agent status --json` document plus a `console` key",
        "/api/history?channel=DEVICE.CHANNEL&hours=N": f"1-minute avg/min/max of the last N hours (<= {HISTORY_HOURS})",
        "/api/alarms?limit=N": "active alarms and the latest N alarm events (default 50, at most 500)",
    }}


_ROUTES: dict[str, tuple[Callable[[Console, dict[str, str]], dict[str, Any]], tuple[str, ...]]] = {
    "/api": (_api_index, ()),
    "/api/status": (_api_status, ()),
    "/api/history": (_api_history, ("channel", "hours")),
    "/api/alarms": (_api_alarms, ("limit",)),
}


def _json_bytes(doc: Any) -> bytes:
    try:
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(finite(doc), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _is_ip_or_localhost(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _head_end(data: bytearray, start: int) -> int:
    """Offset just past the blank line that ends a request head (CRLF or bare LF), or -1."""
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := data.find(sep, start)) >= 0]
    return min(ends) if ends else -1


class _Server(ThreadingHTTPServer):
    """At most MAX_CLIENTS connections at once, each in a thread; IPv6 when asked.

    A connection holds a slot from accept to close. When all are taken, a new connection evicts the oldest
    one still sending its request (shut down under the lock: its handler's read ends and it closes): a
    client cannot keep the technician out by opening connections and trickling headers, however many it
    opens, and each slot it holds is lost after REQUEST_DEADLINE_S anyway. Only when every slot is busy
    answering a complete request is the new connection closed unanswered (those answers take milliseconds).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], console: Console):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.console = console
        self._lock = threading.Lock()
        self._clients: dict[Any, bool] = {}  # connection -> still sending its request; in accept order
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                oldest = next((conn for conn, sending in self._clients.items() if sending), None)
                if oldest is None:
                    self.shutdown_request(request)
                    return
                del self._clients[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._clients[request] = True
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def request_arrived(self, request: Any) -> bool:
        """The handler has the whole request: no longer evictable. False if it was evicted meanwhile."""
        with self._lock:
            if request not in self._clients:
                return False
            self._clients[request] = False
            return True

    def _release(self, request: Any) -> None:
        with self._lock:
            self._clients.pop(request, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver does
            self.handle_error(request, client_address)
        finally:
            self._release(request)  # before the close: eviction never touches a closed socket
            self.shutdown_request(request)


_REQUEST_ERRORS = {
    400: "malformed request: expected METHOD /path HTTP/1.x and headers",
    414: "request line too long",
    431: "request headers too large or too many",
    501: "method not supported; the console is read-only: use GET",
    505: "HTTP version not supported; use HTTP/1.0 or HTTP/1.1",
}


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD only; everything answered with security headers and, for errors, a JSON body."""

    server: _Server
    server_version = "edge-agent-console"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # so that errors before the version is parsed have a status line too
    timeout = 10  # seconds for each write of the answer (the request itself: REQUEST_DEADLINE_S in all)

    def handle(self) -> None:
        """One request per connection; its head read against one deadline, then parsed by http.server."""
        self.close_connection = True
        head = self._read_head()
        if head is None:
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.connection.settimeout(self.timeout)
        self.handle_one_request()

    def _read_head(self) -> bytes | None:
        """The request line and headers, read straight from the socket within REQUEST_DEADLINE_S in all (a
        timeout per read lets a client that trickles a line now and then hold its slot for ever). None when
        the client closed, was too slow or was evicted (see _Server), or the head was too large (answered)."""
        sock = self.connection
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("console %s: request not complete within %g s; closed", self.address_string(),
                          REQUEST_DEADLINE_S)
                return None
            try:
                sock.settimeout(left)
                chunk = sock.recv(16384)
            except TimeoutError:
                continue
            except OSError:
                return None
            if chunk:
                start = max(0, len(data) - 2)
                data += chunk
                end = _head_end(data, start)
            elif data:
                end = len(data)  # the client stopped sending: what came is its request (as http.server does)
            else:
                return None
            if end >= 0:
                return bytes(data[:end]) if self.server.request_arrived(self.request) else None
            if len(data) > MAX_HEAD_BYTES:
                self.requestline, self.command, self.request_version = "", None, self.default_request_version
                self.send_error(431 if b"\n" in data else 414)
                return None

    def parse_request(self) -> bool:
        """http.server's, but a request line must be METHOD TARGET HTTP/x.y: an empty one or an HTTP/0.9 one
        (which http.server answers with no status line or headers at all) is a 400."""
        if len(str(self.raw_requestline, "iso-8859-1").split()) != 3:
            self.requestline, self.command, self.request_version = "", None, self.default_request_version
            self.send_error(400)
            return False
        return super().parse_request()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def _refuse_method(self) -> None:
        self._send_json(405, {"error": "the console is read-only: use GET", "status": 405},
                        [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _dispatch(self) -> None:
        console = self.server.console
        try:
            if not self._authorized(console):
                return
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                _query(url.query, ())
                self._send(200, PAGE_BYTES, "text/html; charset=utf-8", csp=PAGE_CSP)
                return
            route = _ROUTES.get(url.path.rstrip("/") or "/")
            if route is None:
                raise ApiError(404, "not found; the console serves /, /api/status, /api/history and /api/alarms")
            handler, allowed = route
            params = _query(url.query, allowed)
            self._send(200, _json_bytes(handler(console, params)), "application/json; charset=utf-8")
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message, "status": exc.status})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - logged here; the client gets a plain 500, never a trace
            console.errlog.error("console: %s %s failed: %s", self.command, self.path[:200],
                                 f"{type(exc).__name__}: {exc}")
            log.debug("console request failure", exc_info=True)
            self._send_json(500, {"error": "internal error (see the agent's log)", "status": 500})

    def _authorized(self, console: Console) -> bool:
        if console.password is None:
            # Loopback only: refuse names other than an IP or localhost, so that a web page the
            # technician opens cannot reach the console through DNS rebinding.
            if not _is_ip_or_localhost(self.headers.get("Host", "")):
                self._send_json(403, {"error": "open the console by address (http://127.0.0.1:PORT/)",
                                      "status": 403})
                return False
            return True
        client = str(self.client_address[0])
        if console.throttle.blocked(client):
            self._send_json(429, {"error": "too many wrong passwords; try again in a minute", "status": 429},
                            [("Retry-After", str(int(AUTH_WINDOW_S)))])
            return False
        header = self.headers.get("Authorization", "")
        given: str | None = None
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            if ":" in decoded:
                given = decoded.split(":", 1)[1]
        ok = console.password.matches(given) if given is not None else False
        if ok is None:
            self._send_json(503, {"error": "the console password file cannot be read (see the agent's log)",
                                  "status": 503})
            return False
        if ok:
            return True
        if header:
            console.throttle.failed(client)
            console.errlog.warning("console: wrong password from %s", client)
        self._send_json(401, {"error": "password required (HTTP basic auth, any user name)", "status": 401},
                        [("WWW-Authenticate", 'Basic realm="edge-agent console", charset="UTF-8"')])
        return False

    def _send(self, status: int, body: bytes, ctype: str, extra: Iterable[tuple[str, str]] = (),
              csp: str = "default-src 'none'; frame-ancestors 'none'") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", csp)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, doc: dict[str, Any], extra: Iterable[tuple[str, str]] = ()) -> None:
        self._send(status, _json_bytes(doc), "application/json; charset=utf-8", extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found in the request itself (malformed request line or headers, unsupported method): a
        status line, the usual headers and JSON, with a fixed text: http.server's `message` quotes the
        request's bytes, which are never echoed."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        try:
            self._send_json(code, {"error": _REQUEST_ERRORS.get(code, phrase.lower()), "status": code},
                            [("Connection", "close")])
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("console %s: " + format, self.address_string(), *args)


# --------------------------------------------------------------------------------------------------
# The page: HTML, CSS and JS in one response; nothing else is fetched but the JSON API. They are kept in
# agent/data/console.{html,css,js}; the CSS and JS are inlined where the HTML says @CSS@ and @JS@.


def _page_part(name: str) -> str:
    return importlib.resources.files("agent").joinpath("data", name).read_text("utf-8")


_CSS = _page_part("console.css")
_JS = _page_part("console.js")
_HTML = _page_part("console.html")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


PAGE_BYTES = _HTML.replace("@CSS@", _CSS).replace("@JS@", _JS).encode("utf-8")
PAGE_CSP = (f"default-src 'none'; script-src {_csp_hash(_JS)}; style-src {_csp_hash(_CSS)}; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
