"""What an alarm action writes (an alarm rule's `action:`, SPEC §2 "alarms"): `ActionWriter`, the
writer the engine is given (a Modbus coil or holding register of a configured device); `_Target`, one
coil or register that actions write, with what the engine knows of it (the alarms that want it on, the
state last written, the write in flight, failures and the next retry, `min_on`) and how it is saved
in the alarm state; `_ActionWorker`, the thread that runs the writes one at a time, off the recorder
thread; ACTION_RETRY_FIRST_S and ACTION_RETRY_MAX_S, when a failed write is tried again. When to
write, and what a write's result changes, is the engine's (`agent.alarms`, `AlarmEngine._run_actions`).

Imports `agent.threadname` only.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.threadname import name_this_thread

ACTION_RETRY_FIRST_S = 2.0  # a failed action write is retried after this, doubling ...
ACTION_RETRY_MAX_S = 60.0  # ... up to this


class ActionWriter(Protocol):
    """Writes a Modbus coil or holding register of a configured device; raises on failure."""

    def __call__(self, device_id: str, kind: str, address: int, value: int | bool) -> None: ...


@dataclass
class _Target:
    """One thing an action writes (device, coil/register, address) and its state machine."""

    key: str
    device: str
    kind: str  # "coil" | "register"
    address: int
    on_value: int | bool
    off_value: int | bool
    min_on: float
    active_ids: set[str] = field(default_factory=set)
    written: bool | None = None  # last state confirmed written (None: unknown)
    touched: bool = False  # a write was attempted: an unknown state may be "on"
    orphan: bool = False  # no rule names it any more: switch it off, then forget it
    inflight: bool | None = None  # state being written right now
    on_since: float | None = None  # monotonic time "on" was confirmed
    retry_at: float = 0.0
    failures: int = 0

    @property
    def desired(self) -> bool:
        return bool(self.active_ids)

    def to_json(self, now: float, wall_ms: int) -> dict[str, Any]:
        """The saved form; `now` (monotonic) and `wall_ms` (Unix ms) are the same instant: the time "on"
        was confirmed is saved in Unix ms (the monotonic clock starts again at a reboot)."""
        on_ms = None if self.on_since is None else wall_ms - round((now - self.on_since) * 1000)
        return {"device": self.device, "kind": self.kind, "address": self.address, "on": self.on_value,
                "off": self.off_value, "min_on": self.min_on, "written": self.written, "touched": self.touched,
                "on_ms": on_ms}

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any], now: float, wall_ms: int) -> _Target | None:
        """A saved target (`now` and `wall_ms` as for `to_json`); None when the data is not one. "On" confirmed
        at a time after `wall_ms` (the clock stepped back since: a gateway without a real-time clock, booted
        before NTP) is taken as long ago, as before the time was saved: "off" is then not held back."""
        try:
            target = cls(key, str(data["device"]), str(data["kind"]), int(data["address"]), data["on"],
                         data["off"], float(data["min_on"]))
        except (KeyError, TypeError, ValueError):
            return None
        written = data.get("written")
        target.written = written if isinstance(written, bool) else None
        # A write was tried: its state is unknown after a failure (written None), and it may be on. A
        # state saved before "touched" was has none; it is then known from `written` alone.
        touched = data.get("touched")
        target.touched = touched if isinstance(touched, bool) else target.written is not None
        on_ms = data.get("on_ms")
        if target.written is True and isinstance(on_ms, int) and not isinstance(on_ms, bool) and on_ms <= wall_ms:
            target.on_since = now - (wall_ms - on_ms) / 1000  # min_on counts across a restart
        return target


class _ActionWorker(threading.Thread):
    """Runs action writes one at a time, off the recorder thread (a Modbus write may wait for a
    timeout); results are collected by the engine's next tick."""

    def __init__(self, writer: ActionWriter):
        super().__init__(name="alarm-actions", daemon=True)
        self.writer = writer
        self._queue: queue.Queue[tuple | None] = queue.Queue()
        self._results: deque[tuple[str, bool, int | bool, BaseException | None]] = deque()
        self._idle = threading.Condition()
        self._unfinished = 0  # jobs submitted and not yet written (or failed)

    def submit(self, key: str, on: bool, device: str, kind: str, address: int, value: int | bool) -> None:
        with self._idle:
            self._unfinished += 1
        self._queue.put((key, on, device, kind, address, value))

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` for every submitted write to finish; True when they did."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def results(self) -> list[tuple[str, bool, int | bool, BaseException | None]]:
        """(target key, on, value written, error or None) of the writes done since the last call."""
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def stop(self) -> None:
        self._queue.put(None)

    def run(self) -> None:
        name_this_thread()
        while True:
            job = self._queue.get()
            if job is None:
                return
            key, on, device, kind, address, value = job
            try:
                self.writer(device, kind, address, value)
            except Exception as exc:  # noqa: BLE001 - reported to the engine, which retries
                self._results.append((key, on, value, exc))
            else:
                self._results.append((key, on, value, None))
            with self._idle:
                self._unfinished -= 1
                self._idle.notify_all()
