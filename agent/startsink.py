"""The pollers' sink from the start of `run`: polling starts as soon as the agent holds its buffer's lock,
before the buffer is open.

Opening the buffer checks the whole file (quick_check), compacts one above its cap or salvages a corrupt
one: minutes for a large file not in the page cache, which is a start after a power cut. Readings taken
meanwhile are held here in the order they were taken (with the devices' problems, for the meta), and
handed to the recorder once it exists (`attach`), which stores them as it stores readings that waited
for a disk refusing writes: in that order, with their own timestamps, seqs issued as they are stored.
From then on every reading goes straight to the recorder. At most `limit` readings are held (the
recorder's MAX_PENDING): beyond, the oldest are dropped, counted and logged. Imports `agent.model` and
`agent.recorder` (for MAX_PENDING) only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from agent.model import Reading, now_ms
from agent.recorder import MAX_PENDING

log = logging.getLogger(__name__)


class StartSink:
    """Thread-safe: `submit` (the pollers), `set_meta` (their problems), `attach` (once), `held`."""

    def __init__(self, limit: int = MAX_PENDING):
        self.limit = limit
        self._lock = threading.Lock()
        self._held: deque[Reading] = deque()
        self._meta: dict[str, str] = {}
        self._submit: Callable[[Sequence[Reading]], None] | None = None
        self._set_meta: Callable[[str, str], None] | None = None
        self.dropped = 0  # readings dropped while held (over `limit`)
        # (device, ts_ms) of each poll held -> (monotonic s, Unix ms) when it was handed over: for the alarm
        # delays, which count from when a value was polled (`poll_times`)
        self._polled: dict[tuple[str, int], tuple[float, int]] = {}

    def submit(self, readings: Sequence[Reading]) -> None:
        """A poller's readings: held until `attach`, then handed over at once. Never blocks for long."""
        with self._lock:  # held while handing over too: no reading overtakes those held before it
            if self._submit is not None:
                self._submit(readings)
                return
            self._held.extend(readings)
            clocks = (time.monotonic(), now_ms())
            for r in readings:
                self._polled.setdefault((r.device, r.ts_ms), clocks)
            overflow = len(self._held) - self.limit
            if overflow > 0:
                for _ in range(overflow):
                    self._held.popleft()
                if self.dropped == 0:
                    log.error("the buffer is not open yet and %d readings wait in memory: the oldest are "
                              "dropped from now on", self.limit)
                self.dropped += overflow

    def set_meta(self, key: str, value: str) -> None:
        """A meta value (`Recorder.set_meta`): the last one of each key is kept until `attach`."""
        with self._lock:
            if self._set_meta is not None:
                self._set_meta(key, value)
            else:
                self._meta[key] = value

    def held(self) -> int:
        """How many readings wait for the recorder."""
        with self._lock:
            return len(self._held)

    def poll_times(self) -> dict[tuple[str, int], tuple[float, int]]:
        """When each poll held so far was handed over: (device, ts_ms) -> (monotonic s, Unix ms), both
        clocks read at once (`AlarmEngine.held_poll_times`)."""
        with self._lock:
            return dict(self._polled)

    def attach(self, submit: Callable[[Sequence[Reading]], None], set_meta: Callable[[str, str], None]) -> int:
        """Hand what is held to the recorder (`Recorder.submit`, `Recorder.set_meta`), in order, and
        forward everything from now on; returns how many readings were held."""
        with self._lock:
            held = list(self._held)
            self._held.clear()
            self._polled.clear()
            for key, value in self._meta.items():
                set_meta(key, value)
            self._meta.clear()
            if held:
                submit(held)
            self._submit, self._set_meta = submit, set_meta
        return len(held)
