"""Bus pollers: one thread per bus (one transaction at a time on the wire) serving its devices in turn.

Each device is polled at its own interval on a monotonic schedule (`Schedule`): its slots are start +
k × interval. The bus serves the devices that are due in the order of how long they have been due (the
most overdue first; among equally overdue ones, the one served least recently), and never waits while a
device is due. A poll that comes late by a whole interval or more (the bus is overrun: a silent slave
costs timeout × tries per poll) skips the slots it missed instead of bursting to catch up, and a device
whose poll takes longer than its interval is due again as soon as that poll ends (so it alternates with
the others instead of leaving the bus idle). Missed slots mean fewer readings than intervals: each
device says so in a WARNING naming the bus, the device and how late the poll came, at most once a minute
with the count missed in between. Readings go to a sink (the recorder); `quiet_until` tells the recorder
when this bus hands over readings next, so that a group commit need not wait for readings that will not
come within its window. A driver that raises is a bug, not a wire error: it is logged (rate-limited),
its channels are not stored for that poll, and the bus goes on. A poller that replaces others (a
reload changed its bus or devices) first waits for them to end, so that one transaction at a time is on
the wire, and then polls each device an interval after its last poll by them. Imports `agent.model`
and the `drivers.base` interface only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from agent.logutil import RateLimitedLog
from agent.model import Reading, now_ms
from agent.threadname import name_this_thread
from drivers.base import Driver

log = logging.getLogger(__name__)

OVERRUN_LOG_EVERY_S = 60.0


class Schedule:
    """When each device of one bus is due; pure logic on monotonic times (seconds).

    Device i has slots at `start + k * interval[i]`. `slot[i]` is its next slot; `ready[i]` the time it
    may be polled next: its slot, or the end of its last poll when that poll ran past the slot.
    """

    def __init__(self, intervals: Sequence[float], start: float):
        self.intervals = [max(float(iv), 1e-3) for iv in intervals]
        self.slot = [start] * len(self.intervals)
        self.ready = [start] * len(self.intervals)
        self.last_start = [-math.inf] * len(self.intervals)

    def next(self) -> int:
        """The device to serve next: due the longest (earliest `ready`), then served least recently."""
        return min(range(len(self.ready)), key=lambda i: (self.ready[i], self.last_start[i]))

    def quiet_until(self) -> float:
        """The earliest time any device may be polled."""
        return min(self.ready, default=math.inf)

    def done(self, i: int, started: float, ended: float) -> tuple[float, int]:
        """Device i was polled from `started` to `ended`: reschedule it. Returns how late the poll started
        after its slot, and how many of its slots went by without a poll (0 when on time)."""
        interval = self.intervals[i]
        late = max(0.0, started - self.slot[i])
        missed = math.floor(late / interval)
        self.slot[i] += (missed + 1) * interval  # the first slot after the start: missed ones are skipped
        self.ready[i] = max(self.slot[i], ended)
        self.last_start[i] = started
        return late, missed


class _OverrunReport:
    """A device's missed slots, logged at once and then at most every `every_s` with the count since."""

    def __init__(self, bus_name: str, device_id: str, interval: float, every_s: float = OVERRUN_LOG_EVERY_S):
        self.bus_name = bus_name
        self.device_id = device_id
        self.interval = interval
        self.every_s = every_s
        self.missed = 0  # since the last line
        self.worst = 0.0
        self._last = -math.inf
        self.lines = 0

    def note(self, late: float, missed: int, now: float) -> None:
        self.missed += missed
        self.worst = max(self.worst, late)
        if now - self._last < self.every_s:
            return
        if self.lines == 0:
            log.warning("bus %s: device %s polled %.1f s late (interval %g s), %d poll(s) missed: the bus is "
                        "overrun (its polls take longer than the devices' intervals allow; a silent slave "
                        "costs timeout x tries per poll)", self.bus_name, self.device_id, late, self.interval,
                        self.missed)
        else:
            log.warning("bus %s: device %s still polled late: %d poll(s) missed in the last %.0f s, up to "
                        "%.1f s late (interval %g s); the bus is overrun", self.bus_name, self.device_id,
                        self.missed, now - self._last, self.worst, self.interval)
        self.lines += 1
        self._last = now
        self.missed = 0
        self.worst = 0.0


class BusPoller(threading.Thread):
    """Polls `drivers` (all on one bus) until `stop()`."""

    def __init__(self, bus_name: str, drivers: Sequence[Driver], sink: Callable[[list[Reading]], None],
                 resume: Mapping[str, float] | None = None,
                 on_problem: Callable[[str, str | None], None] | None = None,
                 predecessors: Sequence[BusPoller] = ()):
        super().__init__(name=f"bus:{bus_name}", daemon=True)
        self.bus_name = bus_name
        self.drivers = list(drivers)
        self.sink = sink
        self.on_problem = on_problem  # (device id, why its last poll failed or None): after every poll
        # device id -> monotonic start of its last poll by the poller this one replaces (a reload): its
        # next poll keeps to its interval instead of coming at once
        self.resume = dict(resume or {})
        # pollers this one replaces (stopped, maybe still in a poll): it opens no link before they end,
        # then takes their devices' last polls as `resume`
        self.predecessors = list(predecessors)
        self._schedule: Schedule | None = None
        self._stop_event = threading.Event()
        self._close_at_end = True
        self._drivers_closed = False
        self.last_progress = time.monotonic()
        # Monotonic time before which this bus hands over no readings: 0 while it polls (or is about
        # to), the next due poll between polls, infinity once stopped. Read by the recorder.
        self.quiet_until = 0.0
        self.polls = 0
        self.missed: dict[str, int] = {d.device_id: 0 for d in self.drivers}  # slots skipped per device
        self._overrun = {d.device_id: _OverrunReport(bus_name, d.device_id, d.interval) for d in self.drivers}
        self._errlog = RateLimitedLog(log, every_s=60)

    def stop(self, close_drivers: bool = True) -> None:
        """End the polling loop. With `close_drivers` false the drivers stay open after it, so that
        their buses still carry alarm action writes, until `close_drivers()`."""
        self._close_at_end = close_drivers
        self._stop_event.set()

    def close_drivers(self) -> None:
        """Close every driver, once (the polling loop has ended)."""
        if self._drivers_closed:
            return
        self._drivers_closed = True
        for driver in self.drivers:
            try:
                driver.close()
            except Exception:  # noqa: BLE001
                log.exception("closing device %s", driver.device_id)

    def last_polls(self) -> dict[str, float]:
        """Device id -> monotonic start of its last poll, for this poller's devices only (for the
        poller that replaces this one): its own poll, or the one it was handed (`resume`, or its
        predecessors' when it was stopped before they ended)."""
        mine = {d.device_id for d in self.drivers}
        inherited = {dev: t for pred in self.predecessors for dev, t in pred.last_polls().items() if dev in mine}
        out = inherited | {d.device_id: self.resume[d.device_id] for d in self.drivers if d.device_id in self.resume}
        schedule = self._schedule
        if schedule is not None:
            out.update({d.device_id: t for d, t in zip(self.drivers, schedule.last_start, strict=True)
                        if t != -math.inf})
        return out

    def _wait_for_predecessors(self) -> bool:
        """Wait until the pollers this one replaces have ended (their poll under way may hold the
        wire for timeout x tries), then take their devices' last polls; False when stopped meanwhile.
        While waiting, this loop's progress is theirs: one stuck on a dead wire shows as hung."""
        for pred in self.predecessors:
            while pred.is_alive():
                self.last_progress = min(time.monotonic(), pred.last_progress)
                if self._stop_event.wait(0.05):
                    return False
                pred.join(0.5)
        mine = {d.device_id for d in self.drivers}
        for pred in self.predecessors:
            self.resume.update({dev: t for dev, t in pred.last_polls().items() if dev in mine})
        self.predecessors = []  # not kept alive by this one
        self.last_progress = time.monotonic()
        return True

    def run(self) -> None:
        name_this_thread()
        if not self._wait_for_predecessors():  # replaced or stopped before it polled at all
            self.quiet_until = float("inf")
            if self._close_at_end:
                self.close_drivers()
            return
        for driver in self.drivers:  # a driver that opens its link by itself (a serial line) opens it now
            start_link = getattr(driver, "start", None)
            if start_link is not None:
                start_link()
        start = time.monotonic()
        schedule = self._schedule = Schedule([d.interval for d in self.drivers], start)
        for i, driver in enumerate(self.drivers):
            if driver.device_id in self.resume:
                due = max(start, self.resume[driver.device_id] + schedule.intervals[i])
                schedule.slot[i] = schedule.ready[i] = due
                # served before a device of the bus that no poller has polled yet, when both are due
                schedule.last_start[i] = self.resume[driver.device_id]
        if self.resume:
            self.quiet_until = schedule.quiet_until()
        if not self.drivers:
            self.quiet_until = float("inf")  # nothing to hand over, ever
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                self.last_progress = now
                if not self.drivers:
                    self._stop_event.wait(1.0)
                    continue
                i = schedule.next()
                wait = schedule.ready[i] - now
                if wait > 0:
                    # Wake at least every second so that the watchdog sees this loop alive.
                    self._stop_event.wait(min(wait, 1.0))
                    continue
                driver = self.drivers[i]
                self.quiet_until = 0.0
                started = time.monotonic()
                readings = self._poll(driver)
                ended = time.monotonic()
                late, missed = schedule.done(i, started, ended)
                if missed:
                    self.missed[driver.device_id] += missed
                    self._overrun[driver.device_id].note(late, missed, ended)
                self.quiet_until = schedule.quiet_until()  # before the hand-over, which may trigger a commit
                if readings:
                    self.sink(readings)
        finally:
            self.quiet_until = float("inf")
            if self._close_at_end:
                self.close_drivers()

    def _poll(self, driver: Driver) -> list[Reading]:
        try:
            readings = driver.poll(now_ms())
        except Exception as exc:  # noqa: BLE001 - a driver bug must not stop the bus
            self._errlog.error("device %s: driver error %s: %s", driver.device_id, type(exc).__name__, exc)
            self._note_problem(driver.device_id, f"driver error {type(exc).__name__}")
            return []
        self.polls += 1
        self._note_problem(driver.device_id, getattr(driver, "problem", None))
        return readings

    def _note_problem(self, device_id: str, problem: str | None) -> None:
        if self.on_problem is not None:
            self.on_problem(device_id, problem)
