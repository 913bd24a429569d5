"""Drivers of the instruments on a `type: serial` bus: `pms5003`, `sds011` and `hj212` (SPEC §2).

One `SerialLine` owns each bus's port: its reader thread opens the port (and reopens it when it comes
back after vanishing), reads whatever arrives and hands each chunk, stamped with its monotonic receive
time, to the devices on the bus, whose frame readers decode it. `poll()` therefore never waits on the
wire, except a PMS5003 in passive mode or an SDS011 in query mode, for which it sends a read command
(a query) and waits at most the bus's `timeout` (capped at half the interval) for the answer. At each
poll a device reports the latest valid frame received since its previous poll, or value None with
flag B for every channel when none came
(except at the very first poll, right at start-up, which closes no interval and reports nothing when
no frame is there yet, so that a restart does not leave a flag-B row behind).

Imports pyserial, `agent.model`, `agent.logutil`, `agent.hj212`,
`drivers.serial_frames` and `drivers.serial_port`; never `agent.config`
(the bus and device objects are duck-typed: `bus.port`, `bus.baudrate`, ..., `device.driver`,
`device.interval`, optionally `device.channels` for hj212).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import serial

from agent import hj212
from agent.logutil import FlapLimiter
from agent.model import FLAG_COMM, FLAG_NORMAL, FLAGS, Reading
from drivers.base import Driver
from drivers.serial_frames import (
    PMS5003_CHANNELS,
    PMS5003_PASSIVE_MODE,
    PMS5003_PASSIVE_READ,
    PMS5003_UNITS,
    SDS011_CHANNELS,
    SDS011_QUERY,
    SDS011_UNITS,
    Frame,
    FrameReader,
    LatestInInterval,
    make_reader,
)
from drivers.serial_port import open_error, open_exclusive

__all__ = [
    "Hj212Driver",
    "Pms5003Driver",
    "SerialLine",
    "Sds011Driver",
    "StreamDriver",
    "build_bus_drivers",
]

log = logging.getLogger(__name__)

SERIAL_DRIVERS = ("pms5003", "sds011", "hj212")
REOPEN_EVERY_S = 1.0  # a missing port is tried again this often
READ_TIMEOUT_S = 0.2  # the reader thread's longest blocking read (bounds how fast close() returns)
REJECT_LOG_EVERY_S = 60.0  # rejected frames are logged at most this often per device, with counts
STILL_SILENT_EVERY_S = 900.0  # a sensor that stays silent is reminded of in the log this often
GARBAGE_LOG_MIN = 32  # garbage alone (no rejected candidate) is worth a log line from this many bytes
WINDOW_FACTOR = 1.5  # a frame older than 1.5 intervals is never reported (a late poll still gets its frame)
MAX_LEARNT_CHANNELS = 100  # channels an hj212 analyzer may name beyond its declared ones (see Hj212Driver)
MAX_CODE = 64  # the longest channel code an HJ 212 packet can carry (check-config's limit)
# DataTimes an hj212 reading may take (UTC): 1970-01-01 up to 9999-01-01, which every part of the agent
# can date (an ISO time, a period in the station timezone, an HJ 212 DataTime again)
DATA_TIME_MIN_MS, DATA_TIME_MAX_MS = 0, 253_370_764_800_000

ByteListener = Callable[[bytes, float], None]


# --------------------------------------------------------------------------------------------------
# The port owner
# --------------------------------------------------------------------------------------------------


class SerialLine:
    """One serial port, owned by one reader thread, shared by the devices of one bus.

    `subscribe(cb)`: `cb(data, t)` runs on the reader thread for every chunk read (`t` = monotonic
    receive time); it must be quick and must not raise (what it raises is logged and dropped).
    `on_open(cb)`: `cb()` runs on the reader thread after every (re)open, e.g. to send a mode command.
    `write(data)` sends from any thread and returns False when the port is not open or the write
    failed (it never raises, and never blocks longer than the bus timeout).

    The port is opened by the reader thread, never by the caller: a missing USB adapter at start-up
    costs nothing but a log line. A port that vanishes (read or write error) is closed and tried again
    every `reopen_every` seconds; each transition is logged once. Devices `acquire()` the line and
    `release()` it in their `close()`; the last release stops the thread and closes the port.
    """

    def __init__(
        self,
        bus_name: str,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        bytesize: int = 8,
        stopbits: int = 1,
        timeout: float = 1.0,
        reopen_every: float = REOPEN_EVERY_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        self.bus_name = bus_name
        self.port = port
        self.baudrate = int(baudrate)
        self.parity = str(parity).upper()
        self.bytesize = int(bytesize)
        self.stopbits = int(stopbits)
        self.timeout = float(timeout)
        self.reopen_every = float(reopen_every)
        self.read_timeout = float(read_timeout)
        self.opens = 0  # successful opens
        self.losses = 0  # times the open port failed
        self.bytes_read = 0
        self._serial: serial.Serial | None = None
        self._lock = threading.Lock()  # guards _serial (open/close) and serialises writes
        self._subscribers: list[ByteListener] = []
        self._open_listeners: list[Callable[[], None]] = []
        self._users = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"serial:{bus_name}", daemon=True)
        self._cb_errors = 0
        self._failing_logged = False  # "cannot open" logged (before the port was ever open)
        self.open_error = ""  # why the port is not open ("" while it is, or before the first attempt)
        self._port_log = FlapLimiter()  # "lost"/"is back" lines of a port that was open

    # ---------------------------------------------------------------- any thread

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def describe(self) -> str:
        return f"{self.port} ({self.baudrate} {self.bytesize}{self.parity}{self.stopbits})"

    def subscribe(self, callback: ByteListener) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: ByteListener) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def on_open(self, callback: Callable[[], None]) -> None:
        self._open_listeners.append(callback)

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def write(self, data: bytes) -> bool:
        with self._lock:
            ser = self._serial
            if ser is None:
                return False
            try:
                ser.write(data)
                return True
            except (OSError, serial.SerialException) as exc:
                # The reader thread notices a vanished port too; a write timeout (nobody reading on
                # the other end) is not a reason to close the port.
                log.debug("bus %s: write to %s failed: %s", self.bus_name, self.port, exc)
                return False

    def close(self) -> None:
        """Stop the reader thread and close the port (idempotent)."""
        self._stop.set()
        ser = self._serial
        if ser is not None:
            try:
                ser.cancel_read()
            except Exception:  # noqa: BLE001 - best effort to wake the reader early
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.read_timeout + 2.0)
        self._close_port()

    # ---------------------------------------------------------------- reader thread

    def _open_port(self) -> serial.Serial:
        return open_exclusive(self.port, baudrate=self.baudrate, parity=self.parity, bytesize=self.bytesize,
                              stopbits=self.stopbits, read_timeout=self.read_timeout, write_timeout=self.timeout)

    def _close_port(self) -> None:
        with self._lock:
            ser, self._serial = self._serial, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: BLE001 - the port is gone anyway
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the line must outlive any surprise; the port is reopened
                log.exception("bus %s: unexpected error on serial port %s; reopening it", self.bus_name, self.port)
                self._close_port()
                self._stop.wait(self.reopen_every)
        self._close_port()

    def _step(self) -> None:
        """Open the port if needed, else read once (at most `read_timeout`) and hand the bytes on."""
        if self._serial is None:
            try:
                ser = self._open_port()
            except (OSError, ValueError, serial.SerialException) as exc:
                self.open_error = open_error(exc)
                if self.opens:
                    self._log_loss(None)  # still gone: a loss left unlogged (flapping) is logged once due
                elif not self._failing_logged:
                    self._failing_logged = True
                    log.warning("bus %s: cannot open serial port %s: %s; trying again every %g s",
                                self.bus_name, self.port, self.open_error, self.reopen_every)
                self._stop.wait(self.reopen_every)
                return
            with self._lock:
                self._serial = ser
            self.open_error = ""
            self.opens += 1
            self._failing_logged = False
            if self.opens == 1:
                log.info("bus %s: serial port %s open", self.bus_name, self.describe())
            elif self._port_log.back():
                log.info("bus %s: serial port %s is back", self.bus_name, self.port)
            for listener in list(self._open_listeners):
                self._call(listener)
            return
        ser = self._serial
        try:
            data = ser.read(1)
            if data:
                waiting = ser.in_waiting
                if waiting:
                    data += ser.read(waiting)
        except (OSError, TypeError, serial.SerialException) as exc:
            if self._stop.is_set():
                return
            self.losses += 1
            self.open_error = f"lost: {_short(exc)}"
            self._log_loss(exc)
            self._close_port()
            self._stop.wait(min(self.reopen_every, 0.2))
            return
        if data:
            t = time.monotonic()
            self.bytes_read += len(data)
            for subscriber in list(self._subscribers):
                self._call(subscriber, data, t)

    def _log_loss(self, exc: BaseException | None) -> None:
        """The open port failed (`exc`), or is still gone (None): one line per loss, but a port that
        flaps (a loose USB connector) logs at most three a minute, the next with the count in between."""
        unlogged = self._port_log.lost(time.monotonic())
        if unlogged is None:
            return
        why = f" ({_short(exc)})" if exc is not None else ""
        more = f"; it was lost {unlogged} more time(s) since the last such line" if unlogged else ""
        log.warning("bus %s: serial port %s lost%s; reopening it when it comes back%s", self.bus_name, self.port,
                    why, more)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - a driver bug must not stop the line
            self._cb_errors += 1
            if self._cb_errors <= 3 or self._cb_errors % 1000 == 0:
                log.exception("bus %s: device callback failed (%d so far)", self.bus_name, self._cb_errors)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------------
# Shared driver parts
# --------------------------------------------------------------------------------------------------


class _RejectReport:
    """Logs a device's rejected frames at most once per `every` seconds, with the counts accumulated
    since its previous line (the first line comes at once)."""

    def __init__(self, device_id: str, every: float) -> None:
        self.device_id = device_id
        self.every = every
        self._base: dict[str, int] = {}
        self._last = -math.inf
        self.lines = 0

    def update(self, counters: Mapping[str, int], rejects: Sequence[str], garbage_key: str,
               detail: str = "") -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        delta = {k: counters.get(k, 0) - self._base.get(k, 0) for k in (*rejects, garbage_key)}
        rejected = sum(delta[k] for k in rejects)
        garbage = delta[garbage_key]
        if rejected == 0 and garbage < GARBAGE_LOG_MIN:
            return
        since = "since start" if self._last == -math.inf else f"in the last {now - self._last:.0f} s"
        parts = ", ".join(f"{k.replace('_', ' ')} {delta[k]}" for k in rejects if delta[k])
        log.warning("device %s: %d frame(s) rejected%s and %d garbage byte(s) %s%s", self.device_id, rejected,
                    f" ({parts})" if parts else "", garbage, since, f"; last: {detail}" if detail else "")
        self._base = dict(counters)
        self._last = now
        self.lines += 1


class _Silence:
    """Logs once when a device stops sending valid frames and once when it comes back; a sensor that
    flaps (frames a little rarer than the interval) logs at most three such pairs a minute."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.silent_polls = 0
        self.total_silent_polls = 0
        self._flaps = FlapLimiter()
        self._logged_at = 0.0  # monotonic time of the last line about its silence
        self.problem: str | None = None  # why the last poll had no values, for `status`

    def update(self, got_frame: bool, line: SerialLine) -> None:
        if got_frame:
            if self.silent_polls and self._flaps.back():
                log.info("device %s: valid frames again after %d poll(s) without", self.device_id, self.silent_polls)
            self.silent_polls = 0
            self.problem = None
            return
        self.silent_polls += 1
        self.total_silent_polls += 1
        now = time.monotonic()
        unlogged = self._flaps.lost(now)
        port_open = line.is_open
        why = "" if port_open else " (its serial port is not open)"
        self.problem = "no valid frame in the last interval" + (
            "" if port_open else f" (serial port {line.port} not open: {line.open_error or 'opening it'})")
        if unlogged is not None:
            self._logged_at = now
            more = f"; it fell silent {unlogged} more time(s) since the last such line" if unlogged else ""
            log.warning("device %s: no valid frame in the last interval%s; value null, flag B until it sends "
                        "again%s", self.device_id, why, more)
        elif now - self._logged_at >= STILL_SILENT_EVERY_S:
            self._logged_at = now
            log.warning("device %s: still no valid frame, %d polls in a row%s", self.device_id, self.silent_polls,
                        why)


# --------------------------------------------------------------------------------------------------
# PMS5003 / SDS011: frames that stream by themselves
# --------------------------------------------------------------------------------------------------


class StreamDriver:
    """A sensor whose frames are decoded by a `drivers.serial_frames.FrameReader`; at each poll the
    latest valid frame since the previous poll (and at most `WINDOW_FACTOR` intervals old) becomes one
    reading per channel, else every channel gets value None, flag B."""

    protocol: ClassVar[str]
    channels: ClassVar[tuple[str, ...]]
    units: ClassVar[Mapping[str, str]]
    _REJECTS: ClassVar[tuple[str, ...]] = ("bad_length", "bad_tail", "bad_checksum")

    def __init__(self, device_id: str, interval: float, line: SerialLine, *,
                 reject_log_every: float = REJECT_LOG_EVERY_S) -> None:
        self.device_id = device_id
        self.interval = float(interval)
        self.line = line
        self.reader: FrameReader = make_reader(self.protocol)
        self._cond = threading.Condition()
        self._latest = LatestInInterval(self.interval * WINDOW_FACTOR)
        self.frames = 0  # valid frames received
        self.polls = 0
        self._rejects = _RejectReport(device_id, reject_log_every)
        self._silence = _Silence(device_id)
        self._closed = False
        line.acquire()
        line.subscribe(self._on_bytes)
        line.on_open(self._on_open)

    # reader thread
    def _on_bytes(self, data: bytes, t: float) -> None:
        with self._cond:
            frames = self.reader.feed(data)
            if frames:
                self._latest.extend(frames, t)
                self.frames += len(frames)
                self._cond.notify_all()

    def _on_open(self) -> None:
        with self._cond:
            self.reader.clear()  # a partial frame from before the port was lost cannot be completed

    # poller thread
    def _before_take(self) -> None:
        """Hook: what to send to the sensor before the interval's frame is taken."""

    def poll(self, ts_ms: int) -> list[Reading]:
        self.polls += 1
        try:
            self._before_take()
        except Exception:  # noqa: BLE001 - never let a write problem cost the interval's frame
            log.exception("device %s: sending the read command failed", self.device_id)
        with self._cond:
            values = self._latest.take()
            counters = self.reader.counters()
        self._rejects.update(counters, self._REJECTS, "garbage_bytes")
        if values is None and self.polls == 1:
            return []  # the poll at start-up closes no interval: nothing was missed yet
        self._silence.update(values is not None, self.line)
        return self._readings(ts_ms, values)

    def _readings(self, ts_ms: int, values: Frame | None) -> list[Reading]:
        if values is None:
            return [Reading(self.device_id, ch, ts_ms, None, self.units.get(ch), FLAG_COMM) for ch in self.channels]
        return [Reading(self.device_id, ch, ts_ms, values[ch], self.units.get(ch), FLAG_NORMAL) for ch in self.channels]

    @property
    def problem(self) -> str | None:
        """Why the last poll had no values (None when it had them), for `status`."""
        return self._silence.problem

    def stats(self) -> dict[str, int]:
        """Counters for tests and health reports."""
        with self._cond:
            return {**self.reader.counters(), "polls": self.polls, "silent_polls": self._silence.total_silent_polls,
                    "reject_log_lines": self._rejects.lines}

    def start(self) -> None:
        """Start the shared line (its thread opens the port); idempotent. The bus poller calls it when it
        begins, after the poller it replaces has closed the port."""
        if not self._closed:
            self.line.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.line.unsubscribe(self._on_bytes)
        self.line.release()


class Pms5003Driver(StreamDriver):
    """Plantower PMS5003: a34005/a34004/a34002 (atmospheric), the CF=1 values and particle counts.

    Passive mode when the sensor supports it: the passive-mode command is sent at every open of the
    port and at each poll until the sensor answers it; from then on each poll sends a read command and
    waits (at most the bus timeout, capped at half the interval) for the frame it asks for. A sensor
    that does not answer a read command (power-cycled: back in active mode) is sent the passive-mode
    command again, and the next poll still asks and waits: an answer broken on the line (bad
    checksum) costs that poll its frame, not the next one too. Streaming frames are accepted all the
    time.
    """

    protocol = "pms5003"
    channels = PMS5003_CHANNELS
    units = PMS5003_UNITS

    def __init__(self, device_id: str, interval: float, line: SerialLine, *,
                 reject_log_every: float = REJECT_LOG_EVERY_S) -> None:
        super().__init__(device_id, interval, line, reject_log_every=reject_log_every)
        self.passive = False  # the sensor answered our passive-mode command
        self._mode_base: int | None = None  # reader.replies when the mode command was last sent
        self.mode_commands = 0
        self.read_commands = 0

    def _send_mode(self) -> None:
        with self._cond:
            base = self.reader.replies
        if self.line.write(PMS5003_PASSIVE_MODE):
            self.mode_commands += 1
            with self._cond:
                if self._mode_base is None or not self.passive:
                    self._mode_base = base

    def _on_open(self) -> None:
        super()._on_open()
        with self._cond:
            self.passive = False
            self._mode_base = None
        self._send_mode()

    def _before_take(self) -> None:
        if not self.line.is_open:
            return
        with self._cond:
            if not self.passive and self._mode_base is not None and self.reader.replies > self._mode_base:
                self.passive = True
                log.info("device %s: PMS5003 answered the passive-mode command; reading it on demand", self.device_id)
            passive = self.passive
            before = self.frames
        if not passive:
            self._send_mode()
            if self.line.write(PMS5003_PASSIVE_READ):  # for sensors that switch without answering
                self.read_commands += 1
            return
        if not self.line.write(PMS5003_PASSIVE_READ):
            return
        self.read_commands += 1
        wait = min(self.line.timeout, max(0.05, self.interval / 2))
        with self._cond:
            answered = self._cond.wait_for(lambda: self.frames > before, timeout=wait)
        if not answered:
            log.debug("device %s: no answer to the read command within %.2f s", self.device_id, wait)
            self._send_mode()  # in case it was power-cycled (back in active mode); still read at the next poll

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "passive": int(self.passive), "mode_commands": self.mode_commands,
                "read_commands": self.read_commands}


class Sds011Driver(StreamDriver):
    """Nova SDS011: a34004 (PM2.5) and a34002 (PM10), streamed about once a second in its default
    active reporting mode, when nothing is sent to it.

    A sensor set to query mode (a setting it keeps across power cycles: sensor libraries and tools set
    it to spare the laser) sends nothing until asked. So a poll that finds no frame since the previous
    one sends the query command (`AA B4 04 ... FF FF 02 AB`, any sensor id) without waiting: that poll
    reads null/B (nothing came in its interval). A frame within the bus timeout (capped at half the
    interval) after it, and no other before the next poll, shows the query mode: from then on each poll
    sends the query and waits that long for its answer, until a frame arrives unasked (the sensor streams
    again). A streaming sensor is sent nothing but such a query at a poll that found no frame, and the
    mode is never changed (that is written to the sensor's flash).
    """

    protocol = "sds011"
    channels = SDS011_CHANNELS
    units = SDS011_UNITS

    def __init__(self, device_id: str, interval: float, line: SerialLine, *,
                 reject_log_every: float = REJECT_LOG_EVERY_S) -> None:
        super().__init__(device_id, interval, line, reject_log_every=reject_log_every)
        self.query_mode = False  # the sensor answers queries and sends nothing unasked
        self.queries = 0  # query commands sent
        self._wait = max(0.05, self.interval / 2)  # the answer's wait (with the bus timeout, at the first query)
        self._frames_seen = 0  # `frames` when the previous poll ended
        self._probe_at: float | None = None  # monotonic time of a query sent without waiting
        self._probe_answered = False  # a frame came within `_wait` after it
        self._mode_logged = False

    def _on_bytes(self, data: bytes, t: float) -> None:
        before = self.frames
        super()._on_bytes(data, t)
        if self.frames > before and self._probe_at is not None:
            with self._cond:
                if self._probe_answered or self.frames - before > 1 or t - self._probe_at > self._wait:
                    # More frames than one answer, or one too late: a sensor that streams (it may have just
                    # started, right after the query), not one in query mode, which answers once.
                    self._probe_answered, self._probe_at = False, None
                else:
                    self._probe_answered = True

    def _before_take(self) -> None:
        self._wait = min(self.line.timeout, max(0.05, self.interval / 2))
        with self._cond:
            before = self.frames
            unasked = before > self._frames_seen and not self._probe_answered
            probe_answered, self._probe_answered, self._probe_at = self._probe_answered, False, None
        try:
            if self.query_mode and unasked:
                self.query_mode = False
                log.info("device %s: SDS011 sends frames by itself again (active mode)", self.device_id)
            elif probe_answered and not self.query_mode:
                self.query_mode = True
                if not self._mode_logged:
                    self._mode_logged = True
                    log.info("device %s: SDS011 answered the query command (it is in query mode); asking it at "
                             "each poll", self.device_id)
            elif before == self._frames_seen and self.line.is_open:
                self._ask(before, wait=self.query_mode)
        finally:
            with self._cond:
                self._frames_seen = self.frames

    def _ask(self, before: int, wait: bool) -> None:
        """Send the query; in query mode wait for its answer, else note when it was sent (a probe)."""
        sent_at = time.monotonic()
        if not wait:
            with self._cond:
                self._probe_at = sent_at
        if not self.line.write(SDS011_QUERY):
            return
        self.queries += 1
        if wait:
            with self._cond:
                if not self._cond.wait_for(lambda: self.frames > before, timeout=self._wait):
                    log.debug("device %s: no answer to the query within %.2f s", self.device_id, self._wait)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "query_mode": int(self.query_mode), "queries": self.queries}


# --------------------------------------------------------------------------------------------------
# HJ 212 instruments on a serial line
# --------------------------------------------------------------------------------------------------


def _pollutant_unit(code: str) -> str | None:
    try:
        table = hj212.codes().get("pollutants")
    except Exception:  # noqa: BLE001 - a unit is a nicety, never a reason to fail
        return None
    entry = table.codes.get(code) if table is not None else None
    unit = entry.get("unit") if entry is not None else None
    return unit or None


def _ts_ms(dt: datetime) -> int:
    return int(dt.replace(microsecond=0).timestamp()) * 1000 + dt.microsecond // 1000


def _ts_ms_of(packet: hj212.Packet, tz: tzinfo, now_ms: int) -> int:
    """A CN 2011 packet's DataTime (station timezone) in ms; ValueError when it has none.

    A DataTime of the hour that the clock shows twice where DST ends is the pass nearer `now_ms` (this
    machine's clock): the analyzer's clock says it now, and read as the first pass, every packet of the
    second one was dated an hour back."""
    text = packet.get("DataTime")
    if not text:
        raise ValueError("CN 2011 packet without DataTime")
    local = hj212.parse_time(text, tz)
    ts = min((_ts_ms(local.replace(fold=fold)) for fold in (0, 1)), key=lambda ms: abs(ms - now_ms))
    if not DATA_TIME_MIN_MS <= ts < DATA_TIME_MAX_MS:
        raise ValueError(f"DataTime {text} lies outside the years 1970..9998 (UTC)")
    return ts


class Hj212Driver:
    """An analyzer that sends HJ 212 CN 2011 real-time packets by itself over RS-232/485.

    Every `<code>-Rtd` item becomes a reading of channel `<code>` with its `<code>-Flag` (N when
    absent), stamped with the packet's DataTime in the station timezone; an item with `-Flag` but no
    (or an empty) `-Rtd` is value None with that flag. Packets with a bad CRC, length or syntax are
    rejected whole, and so are packets without a valid DataTime or with a non-numeric value or an
    unknown flag (the HJ 212 CRC lets 1 corrupted frame in 256 through: a malformed item is taken as
    a sign of one). A packet ending in LF or CR alone, or in nothing, is taken (its length and CRC
    frame it; some analyzers' firmware gets the CRLF wrong), and so is one whose MN is over 24 or PW over
    6 characters (neither is used here). Other commands (minute/hour data, ...)
    are ignored; split packets are reassembled. A packet that asks for an answer (Flag A bit) gets a
    CN 9014 acknowledgement, and so does each piece of a split packet that asks (see `_accept`), unless
    its MN or PW is too long to be echoed in a valid packet (no 9014 is better than an invalid one).

    Channels are not known in advance: at each poll every channel declared in the config
    (`device.channels`, if any), stored before this start (`seen`) or seen so far gets the latest item
    received since the previous poll, or value None with flag B when none came. A B reading is stamped
    with the poll time on the analyzer's clock (the poll time shifted by the offset between the last
    packet's DataTime and the time it arrived): an analyzer whose clock lags, or whose DataTime is the
    measurement's time, would otherwise see its channels' times step back at the next packet.

    An analyzer names at most MAX_LEARNT_CHANNELS channels beyond the declared ones, each code at most
    MAX_CODE characters: the items of any other code are dropped (counted, logged once). A packet of
    thousands of items, or codes that change from packet to packet, would otherwise add a channel each,
    read null/B at every poll from then on (and after every restart), each with its own stale alarm.
    Likewise a DataTime outside 1970..9998 (year 1, year 9999 in the station timezone) rejects the packet.
    """

    _REJECTS: ClassVar[tuple[str, ...]] = ("bad_crc", "bad_length", "malformed", "bad_content")

    def __init__(self, device_id: str, interval: float, line: SerialLine, *, timezone: str | tzinfo = "Asia/Shanghai",
                 declared: Mapping[str, str | None] | None = None,
                 seen: Mapping[str, str | None] | None = None,
                 reject_log_every: float = REJECT_LOG_EVERY_S) -> None:
        self.device_id = device_id
        self.interval = float(interval)
        self.line = line
        self.tz: tzinfo = ZoneInfo(timezone) if isinstance(timezone, str) else timezone
        self.reader = hj212.FrameReader(allow_missing_crlf=True)  # length and CRC frame a packet
        self._reassembler = hj212.Reassembler()
        self._cond = threading.Condition()
        self._window = self.interval * WINDOW_FACTOR
        # channel -> unit, in first-seen order (declared channels first)
        self.known: dict[str, str | None] = {ch: (unit or _pollutant_unit(ch)) for ch, unit in (declared or {}).items()}
        # channels stored before this start (`seen`): learnt then, so they count towards the limit
        self._learnt = 0
        self.learn_stored(seen or {})
        self._refused_logged = False
        # channel -> (value, flag, ts_ms, receive time) of the latest item since the previous poll
        self._latest: dict[str, tuple[float | None, str, int, float]] = {}
        self.counters: Counter[str] = Counter()
        self._last_error = ""
        self.polls = 0
        self._rejects = _RejectReport(device_id, reject_log_every)
        self._silence = _Silence(device_id)
        self._got_packet = False
        self._clock_offset_ms = 0  # the last packet's DataTime minus our wall clock when it arrived
        self._closed = False
        line.acquire()
        line.subscribe(self._on_bytes)
        line.on_open(self._on_open)

    def learn_stored(self, seen: Mapping[str, str | None]) -> None:
        """The channels (and units) stored for this device before this start, learnt then: each gets its
        reading (null/B when no item came) at every poll, and counts towards MAX_LEARNT_CHANNELS. Given
        at construction, or once the buffer is open when polling started before (`agent.runtime`)."""
        with self._cond:
            for ch, unit in seen.items():
                if ch in self.known or len(ch) > MAX_CODE or self._learnt >= MAX_LEARNT_CHANNELS:
                    continue
                self.known[ch] = unit or _pollutant_unit(ch)
                self._learnt += 1

    # reader thread
    def _on_open(self) -> None:
        with self._cond:
            self.reader.reset()
            self._reassembler.clear()

    def _on_bytes(self, data: bytes, t: float) -> None:
        acks: list[bytes] = []
        with self._cond:
            for item in self.reader.feed(data):
                if isinstance(item, hj212.BadHeader) and item.packet is not None and item.fields <= {"MN", "PW"}:
                    item = item.packet  # an analyzer's MN and PW are never used: only their length is wrong
                if isinstance(item, hj212.Hj212Error):
                    self._reject(item)
                    continue
                ack = self._accept(item, t)
                if ack is not None:
                    acks.append(ack)
        for frame in acks:
            self.line.write(frame)

    def _reject(self, error: Exception, kind: str | None = None) -> None:
        if kind is None:
            kind = ("bad_crc" if isinstance(error, hj212.BadCrc) else
                    "bad_length" if isinstance(error, hj212.BadLength) else "malformed")
        self.counters[kind] += 1
        self._last_error = _short(error)

    def _accept(self, piece: hj212.Packet, t: float) -> bytes | None:
        """Takes a valid frame; returns the 9014 to write back when it asks for one. Each piece of a split
        packet is answered (each carries Flag A: an analyzer may wait for it before sending the next), and
        so is a packet of a command the agent does not use (minute data...: it arrived whole, and the
        analyzer would otherwise send it again and again); a 2011 packet whose content is refused is not."""
        try:
            packet = self._reassembler.add(piece)
        except hj212.ReassemblyError as exc:
            self._reject(exc, "malformed")
            return None
        ack = self._ack(piece)
        if packet is None:
            return ack  # more pieces to come
        if packet.cn != hj212.CN_REALTIME:
            self.counters["ignored"] += 1
            return ack
        try:
            ts = _ts_ms_of(packet, self.tz, int(time.time() * 1000))
            items = self._items(packet, ts)
        except ValueError as exc:
            self._reject(exc, "bad_content")
            return None
        self.counters["packets"] += 1
        self._got_packet = True
        self._clock_offset_ms = ts - int(time.time() * 1000)
        for code, (value, flag, ts) in items.items():
            if code in self.known or self._learn(code):
                self._latest[code] = (value, flag, ts, t)
        return ack

    @staticmethod
    def _ack(packet: hj212.Packet) -> bytes | None:
        """The 9014 for `packet` (a whole packet or one piece) when it asks for an answer, else None (also when
        the packet's MN or PW is too long to be echoed in a valid packet). An answer is never answered: two
        devices would answer each other's answers for ever."""
        if not packet.answer_requested or packet.cn in hj212.ANSWER_CNS:
            return None
        try:
            return hj212.encode_one(hj212.ack_9014(packet))
        except ValueError:
            return None

    def _learn(self, code: str) -> bool:
        """A channel named for the first time: known from now on, unless its code is too long or the
        analyzer has named MAX_LEARNT_CHANNELS undeclared ones already (then False: its items are dropped)."""
        if len(code) > MAX_CODE or self._learnt >= MAX_LEARNT_CHANNELS:
            self.counters["channels_refused"] += 1
            if not self._refused_logged:
                self._refused_logged = True
                why = (f"its code is longer than {MAX_CODE} characters" if len(code) > MAX_CODE else
                       f"the analyzer already named {MAX_LEARNT_CHANNELS} channels that are not declared")
                log.warning("device %s: channel %.70s dropped: %s (declare the channels it measures under "
                            "`channels:`; no more such lines)", self.device_id, code, why)
            return False
        self.known[code] = _pollutant_unit(code)
        self._learnt += 1
        log.info("device %s: channel %s seen for the first time", self.device_id, code)
        return True

    def _items(self, packet: hj212.Packet, ts: int) -> dict[str, tuple[float | None, str, int]]:
        """code -> (value, flag, ts_ms) of a CN 2011 packet dated `ts`; ValueError rejects the whole packet."""
        items: dict[str, tuple[float | None, str, int]] = {}
        for code, fields in packet.pollutants().items():
            if "Rtd" not in fields and "Flag" not in fields:
                continue
            rtd = fields.get("Rtd")
            value = None if rtd is None or rtd == "" else hj212.parse_number(rtd, f"{code}-Rtd")
            flag_text = fields.get("Flag")
            if flag_text is None or flag_text == "":
                flag = FLAG_NORMAL if value is not None else FLAG_COMM
            else:
                flag = flag_text.upper()
                if flag not in FLAGS:
                    raise ValueError(f"{code}-Flag={flag_text[:8]!r} is not an HJ 212 data flag")
            if value is None and flag == FLAG_NORMAL:
                flag = FLAG_COMM  # "normal" without a value says nothing: no usable value reached us
            items[code] = (value, flag, ts)
        return items

    # poller thread
    def poll(self, ts_ms: int) -> list[Reading]:
        self.polls += 1
        now = time.monotonic()
        with self._cond:
            latest, self._latest = self._latest, {}
            got_packet, self._got_packet = self._got_packet, False
            missing_ts = ts_ms + self._clock_offset_ms
            known = list(self.known.items())
            counters = {**self.counters, "garbage_bytes": self.reader.bytes_dropped}
            detail = self._last_error
        self._rejects.update(counters, self._REJECTS, "garbage_bytes", detail)
        if not latest and self.polls == 1:
            return []  # the poll at start-up closes no interval: nothing was missed yet
        out = []
        fresh = False
        for code, unit in known:
            item = latest.get(code)
            if item is not None and item[3] > now - self._window:
                value, flag, ts, _ = item
                out.append(Reading(self.device_id, code, ts, value, unit, flag))
                fresh = True
            else:
                out.append(Reading(self.device_id, code, missing_ts, None, unit, FLAG_COMM))
        self._silence.update(fresh or (got_packet and not known), self.line)
        return out

    @property
    def problem(self) -> str | None:
        """Why the last poll had no values (None when it had them), for `status`."""
        return self._silence.problem

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self.counters, "garbage_bytes": self.reader.bytes_dropped, "polls": self.polls,
                    "silent_polls": self._silence.total_silent_polls, "reject_log_lines": self._rejects.lines}

    def start(self) -> None:
        """Start the shared line (its thread opens the port); idempotent. The bus poller calls it when it
        begins, after the poller it replaces has closed the port."""
        if not self._closed:
            self.line.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.line.unsubscribe(self._on_bytes)
        self.line.release()


# --------------------------------------------------------------------------------------------------
# Entry point for agent.runtime
# --------------------------------------------------------------------------------------------------


def _declared_channels(device: Any) -> dict[str, str | None]:
    """Channels a config declares for a device (`channels:` mapping, if the config has one)."""
    channels = getattr(device, "channels", None)
    if not isinstance(channels, Mapping):
        return {}
    out: dict[str, str | None] = {}
    for code, spec in channels.items():
        unit = spec.get("unit") if isinstance(spec, Mapping) else getattr(spec, "unit", None)
        out[str(code)] = str(unit) if unit else None
    return out


def build_bus_drivers(bus_name: str, bus: Any, devices: Mapping[str, Any], timezone: str = "Asia/Shanghai", *,
                      seen: Mapping[str, Mapping[str, str | None]] | None = None,
                      reject_log_every: float = REJECT_LOG_EVERY_S,
                      reopen_every: float = REOPEN_EVERY_S, start: bool = True) -> list[Driver]:
    """The drivers of the devices on serial bus `bus_name`, sharing one `SerialLine` (started here, or
    with `start=False` by the first driver's `start()`; the port is opened by the line's thread, so a
    missing port is no error). `bus` needs `port` and may have
    `baudrate`, `parity`, `bytesize`, `stopbits`, `timeout`; each device needs `driver` (pms5003,
    sds011 or hj212) and `interval`. `timezone` is the station's, for HJ 212 DataTime. `seen` gives
    per device the channels (and units) stored before: an hj212 analyzer's channels are otherwise known
    only from its packets, and one silent since a restart would read nothing instead of null/B.
    Raises ValueError for a device whose driver cannot run on a serial bus."""
    line = SerialLine(
        bus_name,
        str(bus.port),
        baudrate=getattr(bus, "baudrate", 9600),
        parity=getattr(bus, "parity", "N"),
        bytesize=getattr(bus, "bytesize", 8),
        stopbits=getattr(bus, "stopbits", 1),
        timeout=getattr(bus, "timeout", 1.0),
        reopen_every=reopen_every,
    )
    tz = ZoneInfo(timezone)
    drivers: list[Driver] = []
    kinds: Counter[str] = Counter()
    for dev_id, dev in devices.items():
        kind = getattr(dev, "driver", None)
        interval = float(getattr(dev, "interval", 60.0))
        if kind == "pms5003":
            drivers.append(Pms5003Driver(dev_id, interval, line, reject_log_every=reject_log_every))
        elif kind == "sds011":
            drivers.append(Sds011Driver(dev_id, interval, line, reject_log_every=reject_log_every))
        elif kind == "hj212":
            drivers.append(Hj212Driver(dev_id, interval, line, timezone=tz, declared=_declared_channels(dev),
                                       seen=(seen or {}).get(dev_id), reject_log_every=reject_log_every))
        else:
            for d in drivers:
                d.close()
            raise ValueError(f"device {dev_id}: driver {kind!r} cannot run on serial bus {bus_name} "
                             f"(use {', '.join(SERIAL_DRIVERS)})")
        kinds[str(kind)] += 1
    for kind, count in kinds.items():
        if count > 1:
            log.warning("bus %s: %d %s devices share one serial line; each sees every frame on it "
                        "(the frames do not say which device sent them)", bus_name, count, kind)
    if drivers and start:
        line.start()
    return drivers
