"""The driver interface every instrument driver implements, and what a bus poller expects of it.

A driver belongs to one device. The bus poller that owns the device's bus calls `poll()` at the
device's interval; `poll()` does its own I/O on the bus it was given and never raises for anything
that comes from the wire: a failed read is a reading with value None and flag B (or D).
"""

from __future__ import annotations

from typing import Protocol

from agent.model import Reading


class Driver(Protocol):
    """One device. `poll(ts_ms)` returns one reading per channel, stamped `ts_ms` unless the
    instrument supplies its own time (an HJ 212 instrument's DataTime). A driver that can tell why a
    poll failed has a `problem` attribute (a short text, None after a good poll): the poller hands its
    changes on, and `status` shows it beside the device's health. A driver that opens its link by
    itself (a serial line read by its own thread) may have a `start()` method: the poller calls it when
    it begins, after the poller it replaces (a reload) has closed that link."""

    device_id: str
    interval: float

    def poll(self, ts_ms: int) -> list[Reading]: ...

    def close(self) -> None: ...
