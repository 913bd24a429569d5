"""What each bus poller is built from, and what a reload (SIGHUP) does with the running pollers.

A poller serves one bus (or one bus-less simulated device). A reload keeps every poller whose bus
settings and devices are unchanged, untouched: its instruments go on being polled at their interval,
its port stays open and its drivers keep what they learnt (a silent slave's one try per poll, a merged
read refused, a failure already logged). Only the pollers of buses that changed, were added or were
removed are stopped and started; a new bus poller first waits for every stopped bus poller still in a
poll (`BusPoller.predecessors`), so that two pollers never share a wire (a bus renamed, or a device
moved between buses, is the same wire) and the reload never waits for a slow poll itself.
Imports `agent.config` (models only) and nothing that does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config import Config

SIM_PREFIX = "sim:"


@dataclass(frozen=True)
class PollerSpec:
    """What one poller is built from; two equal specs make the same poller."""

    name: str  # the bus name, or "sim:DEVICE" for a simulated device
    bus: Any = None  # the bus's config model (None for a simulated device)
    devices: dict[str, Any] = field(default_factory=dict)  # device id -> its config model, in config order
    timezone: str | None = None  # serial buses: the station timezone (HJ 212 instruments' DataTime)

    @property
    def simulated(self) -> bool:
        return self.bus is None


def poller_specs(config: Config) -> dict[str, PollerSpec]:
    """Poller name -> spec: one per simulated device (first), then one per bus that has devices."""
    specs: dict[str, PollerSpec] = {}
    on_bus: dict[str, dict[str, Any]] = {}
    for dev_id, dev in config.devices.items():
        if dev.driver == "simulated":
            specs[SIM_PREFIX + dev_id] = PollerSpec(SIM_PREFIX + dev_id, None, {dev_id: dev})
        elif dev.bus is not None:
            on_bus.setdefault(dev.bus, {})[dev_id] = dev
    for bus_name, devices in on_bus.items():
        bus = config.buses[bus_name]
        tz = config.station.timezone if bus.type == "serial" else None
        specs[bus_name] = PollerSpec(bus_name, bus, devices, tz)
    return specs


@dataclass
class ReloadPlan:
    """Poller names by what a reload does with them."""

    kept: list[str]  # unchanged: left running
    restarted: list[str]  # same name, changed bus settings or devices: replaced
    stopped: list[str]  # gone from the new config
    started: list[str]  # new in the new config

    def summary(self) -> str:
        """For the reload's log line, e.g. `restarted: lan; kept polling: rs485, sim:sim0`."""
        parts = [f"{label}: {', '.join(names)}" for label, names in (
            ("restarted", self.restarted), ("started", self.started), ("stopped", self.stopped),
            ("unchanged, kept polling", self.kept)) if names]
        return "; ".join(parts) or "no pollers"


def plan_reload(old: dict[str, PollerSpec], new: dict[str, PollerSpec]) -> ReloadPlan:
    """Which running pollers a reload keeps, restarts, stops, and which it starts."""
    return ReloadPlan(
        kept=[n for n in new if n in old and old[n] == new[n]],
        restarted=[n for n in new if n in old and old[n] != new[n]],
        stopped=[n for n in old if n not in new],
        started=[n for n in new if n not in old],
    )
