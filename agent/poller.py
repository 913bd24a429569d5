"""Bus pollers: one thread per bus (one transaction at a time on the wire) serving its devices in turn.

Each device is polled at its own interval on a monotonic schedule; a poll that overruns pushes the
next one back instead of bursting to catch up. Readings go to a sink (the recorder); `quiet_until`
tells the recorder when this bus hands over readings next, so that a group commit need not wait
for readings that will not come within its window. A driver that
raises is a bug, not a wire error: it is logged (rate-limited), its channels are not stored for that
poll, and the bus goes on. Imports `agent.model` and the `drivers.base` interface only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from agent.logutil import RateLimitedLog
from agent.model import Reading, now_ms
from agent.threadname import name_this_thread
from drivers.base import Driver

log = logging.getLogger(__name__)


class BusPoller(threading.Thread):
    """Polls `drivers` (all on one bus) until `stop()`."""

    def __init__(self, bus_name: str, drivers: Sequence[Driver], sink: Callable[[list[Reading]], None]):
        super().__init__(name=f"bus:{bus_name}", daemon=True)
        self.bus_name = bus_name
        self.drivers = list(drivers)
        self.sink = sink
        self._stop_event = threading.Event()
        self.last_progress = time.monotonic()
        # Monotonic time before which this bus hands over no readings: 0 while it polls (or is about
        # to), the next due poll between polls, infinity once stopped. Read by the recorder.
        self.quiet_until = 0.0
        self.polls = 0
        self._errlog = RateLimitedLog(log, every_s=60)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        name_this_thread()
        start = time.monotonic()
        due = {i: start for i in range(len(self.drivers))}
        try:
            while not self._stop_event.is_set():
                i = min(due, key=due.__getitem__)
                wait = due[i] - time.monotonic()
                self.last_progress = time.monotonic()
                if wait > 0:
                    # Wake at least every second so that the watchdog sees this loop alive.
                    self._stop_event.wait(min(wait, 1.0))
                    continue
                driver = self.drivers[i]
                self.quiet_until = 0.0
                readings = self._poll(driver)
                now = time.monotonic()
                due[i] += driver.interval
                if due[i] <= now:  # overran: skip the missed slots rather than burst
                    due[i] = now + driver.interval
                self.quiet_until = min(due.values())  # before the hand-over, which may trigger a commit
                if readings:
                    self.sink(readings)
        finally:
            self.quiet_until = float("inf")
            for driver in self.drivers:
                try:
                    driver.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing device %s", driver.device_id)

    def _poll(self, driver: Driver) -> list[Reading]:
        try:
            readings = driver.poll(now_ms())
        except Exception as exc:  # noqa: BLE001 - a driver bug must not stop the bus
            self._errlog.error("device %s: driver error %s: %s", driver.device_id, type(exc).__name__, exc)
            return []
        self.polls += 1
        return readings
