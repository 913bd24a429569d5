"""`edge-agent simulate -c FILE`: simulated instruments for every Modbus device of FILE that names a profile.

For each `type: tcp` bus, a Modbus TCP server on the bus's host:port serves its devices by unit id
(`slave`), as an RS-485-to-Ethernet gateway would. For each `type: rtu` bus, a pseudo-terminal pair is
created and its slave end linked at the bus's `port` path (the link is created, with its directory, and
removed on exit; a path that exists and is not a symlink is never replaced), and all that bus's
simulated slaves answer on it with real RTU framing (CRC, unit ids, silence between frames). Devices
without a built-in `profile` are left unserved: on an RTU line they stay silent, as an absent slave does.
A bus `port` path is used as written: relative paths are relative to the working directory, so prefer
absolute ones (see config/examples/modbus-demo.yaml).

Faults: set EDGE_AGENT_SIM_CONTROL to a YAML file `{device_id: fault}`; it is re-read within 0.2 s of a
change. Faults: `silent` (no answer: flag B at the agent), `badcrc` (RTU answer with a corrupted CRC: B;
on TCP no answer), `exception` or `{exception: CODE}` (every request refused with Modbus exception CODE,
default 04: flag D), `maintenance` / `calibration` / `fault` (the status words say so: flags M / C / D),
`normal`. Example:

    cod: silent
    dust: maintenance
    flow: {exception: 2}

Serial buses (`type: serial`: PMS5003, SDS011, HJ 212 streams) are served by
`drivers.sim.serial_sim.serve_serial` when that module is present. Runs until SIGINT/SIGTERM. The bus
and device models are duck-typed; nothing from `agent.config` is imported.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers import profiles
from drivers.sim.instruments import SimControl, SimInstrument
from drivers.sim.slave import RtuPtyServer, SlaveCore, TcpServer

log = logging.getLogger(__name__)

CONTROL_ENV = "EDGE_AGENT_SIM_CONTROL"


@dataclass
class SimBus:
    """One simulated link: its instruments by unit id, and the server once started."""

    name: str
    kind: str
    where: str  # host:port or the port path
    units: dict[int, SimInstrument] = field(default_factory=dict)
    devices: dict[int, str] = field(default_factory=dict)  # unit id -> device id
    server: RtuPtyServer | TcpServer | None = None


def plan_simulation(config: Any) -> tuple[list[SimBus], dict[str, SimInstrument]]:
    """The simulated buses and instruments for `config` (a loaded config, duck-typed)."""
    buses: dict[str, SimBus] = {}
    instruments: dict[str, SimInstrument] = {}
    for dev_id, dev in config.devices.items():
        bus_name = getattr(dev, "bus", None)
        if not bus_name or bus_name not in config.buses:
            continue
        bus = config.buses[bus_name]
        if bus.type not in ("rtu", "tcp"):
            continue
        if not getattr(dev, "profile", None):
            log.info("simulate: device %s has no built-in profile: not simulated", dev_id)
            continue
        specs = dev.register_map()
        profile = profiles.load(dev.profile)
        strict = profile.max_gap == 0  # such analyzers refuse reads across undefined registers
        where = f"{bus.host}:{bus.port}" if bus.type == "tcp" else str(bus.port)
        sim_bus = buses.setdefault(bus_name, SimBus(bus_name, bus.type, where))
        unit = int(dev.slave if dev.slave is not None else 1)
        if unit in sim_bus.units:
            log.error("simulate: device %s: slave %d on %s is already %s; not simulated", dev_id, unit,
                      bus_name, sim_bus.devices[unit])
            continue
        inst = SimInstrument(dev_id, specs, seed=unit, strict=strict)
        sim_bus.units[unit] = inst
        sim_bus.devices[unit] = dev_id
        instruments[dev_id] = inst
    return list(buses.values()), instruments


def start_bus(sim_bus: SimBus, bus: Any) -> None:
    """Start the server of one simulated bus (raises OSError when the address or path is unusable)."""
    core = SlaveCore(sim_bus.units)
    if sim_bus.kind == "tcp":
        sim_bus.server = TcpServer(core, str(bus.host), int(bus.port)).start()
    else:
        sim_bus.server = RtuPtyServer(core, str(bus.port)).start()


def _serial_starter() -> Callable[[Any, threading.Event], list[Any]] | None:
    """`drivers.sim.serial_sim.serve_serial` (streaming serial instruments), when it is installed."""
    try:
        from drivers.sim.serial_sim import serve_serial
    except ImportError:
        return None
    return serve_serial


def _cannot_serve_hint(exc: OSError, bus_name: str, bus: Any) -> str:
    """What to change when a TCP bus cannot be served here: a station's file names its gateway's address
    (192.168.1.50), which the technician's laptop does not have, or a port only root may open."""
    if getattr(bus, "type", None) != "tcp":
        return ""
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f" ({bus.host} is not an address of this machine: to simulate the station here, use a copy of"
                f" the file whose bus {bus_name} has host: 127.0.0.1)")
    if exc.errno == errno.EACCES and int(bus.port) < 1024:
        return (f" (port {bus.port} needs root: run simulate as root, or use a copy of the file whose bus"
                f" {bus_name} has a port above 1023 and host: 127.0.0.1)")
    return ""


def serve(config: Any, *, stop: threading.Event | None = None, control: str | None = None,
          on_ready: Callable[[list[SimBus]], None] | None = None) -> int:
    """Serve the simulated instruments of `config` until SIGINT/SIGTERM (or `stop` is set).

    Modbus buses are served here; `serial` buses (PMS5003, SDS011, HJ 212 streams) by
    `drivers.sim.serial_sim.serve_serial`. Returns 0 after a clean stop, 1 when nothing could be served
    or a simulator could not start."""
    stop = stop or threading.Event()
    sim_buses, instruments = plan_simulation(config)
    started: list[SimBus] = []
    serial_sims: list[Any] = []
    try:
        for sb in sim_buses:
            try:
                start_bus(sb, config.buses[sb.name])
            except OSError as exc:
                log.error("simulate: bus %s: cannot serve %s: %s%s", sb.name, sb.where, exc,
                          _cannot_serve_hint(exc, sb.name, config.buses[sb.name]))
                return 1
            started.append(sb)
            served = ", ".join(f"{sb.devices[u]} (slave {u}, {getattr(config.devices[sb.devices[u]], 'profile', '')})"
                               for u in sorted(sb.units))
            at = sb.where
            if isinstance(sb.server, RtuPtyServer):
                at = f"{sb.where} -> {sb.server.pty_name}"
            log.info("simulate: bus %s (%s %s) serving %s", sb.name, sb.kind, at, served)
        start_serial = _serial_starter()
        if start_serial is not None:
            try:
                serial_sims = start_serial(config, stop)
            except Exception as exc:  # noqa: BLE001 - SimulatorError and OSError: report, stop the rest
                log.error("simulate: serial instruments: %s", exc)
                return 1
        if not started and not serial_sims:
            log.error("simulate: no Modbus device with a built-in profile on an rtu or tcp bus, and no serial "
                      "instrument: nothing to serve")
            return 1
        control_path = control if control is not None else os.environ.get(CONTROL_ENV)
        ctl = SimControl(control_path, instruments)
        ctl.refresh()
        if control_path:
            log.info("simulate: faults from %s (re-read when it changes)", control_path)
        signalled = _install_signals()
        if on_ready is not None:
            on_ready(started)
        while not (stop.is_set() or signalled):
            time.sleep(0.2)
            ctl.refresh()
    finally:
        stop.set()  # also stops the serial simulators
        for sb in started:
            if sb.server is not None:
                sb.server.stop()
        for sim in serial_sims:
            sim.join(5)
        if started or serial_sims:
            log.info("simulate: stopped")
    return 0


def _install_signals() -> list[int]:
    """SIGINT/SIGTERM noted in the returned list. The handler takes no lock: it runs in the main thread
    between two bytecodes, possibly while that thread holds an Event's lock (setting the Event there
    could deadlock); the main loop sets `stop` itself."""
    signalled: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: signalled.append(signum))
    return signalled


def instruments_by_device(buses: list[SimBus]) -> Mapping[str, SimInstrument]:
    """Device id -> instrument of started buses (for tests driving faults in-process)."""
    return {sb.devices[u]: inst for sb in buses for u, inst in sb.units.items()}
