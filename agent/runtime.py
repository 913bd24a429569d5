"""`edge-agent run`: wires config -> drivers -> pollers -> recorder -> buffer -> publisher, and runs it.

Owns the process lifecycle: signals (SIGTERM/SIGINT stop, SIGHUP reload), the systemd notification
protocol (READY, WATCHDOG only while every loop makes progress, STATUS), and the orderly shutdown
of SPEC §1 (stop polling, commit, publish the backlog for at most `shutdown_grace`, say offline).
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import select
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__, instance
from agent.aggregate import Aggregator
from agent.alarms import AlarmEngine
from agent.buffer import Buffer, BufferError, RescueCutShort
from agent.bufferschema import NewerBuffer
from agent.clock import ClockWatch
from agent.config import Config, ConfigError, load_config
from agent.configproblem import Problem
from agent.hj212_payload import Hj212Identity
from agent.logutil import RateLimitedLog
from agent.memtrim import release_free_memory
from agent.model import iso_utc_ms, now_ms
from agent.poller import BusPoller
from agent.pollerset import SIM_PREFIX, PollerSpec, plan_reload, poller_specs
from agent.publisher import BrokerSettings, Publisher
from agent.recorder import Recorder
from agent.sdnotify import Notifier
from agent.startsink import StartSink
from agent.status import collect, unreadable, uplink_names
from agent.uplink import Uplink, UplinkTarget, stop_uplinks
from drivers.simulated import SimChannelSpec, SimulatedDriver

if TYPE_CHECKING:
    from agent.console import Console

log = logging.getLogger(__name__)

UPLINK_STOP_S = 15.0  # a stop or reload waits this long for the HJ 212 uplinks in all
PROGRESS_DEADLINE_S = 60.0  # a loop silent for longer than this (or 2 watchdog periods) is hung
ACTION_STOP_WAIT_S = 10.0  # at a stop, how long alarm action writes under way may take
BUFFER_RETRY_S = 10.0  # a buffer that cannot be opened at start is tried again this often
BUFFER_RETRY_LOG_S = 300.0  # and its error logged again this often


class UnsupportedConfig(Exception):
    """The config is valid but asks for something this version cannot run yet."""


def broker_settings(config: Config) -> BrokerSettings:
    """The publisher's settings from the `mqtt` section (reads the password file now: ConfigError at
    `mqtt.password_file` when it cannot be read)."""
    m = config.mqtt
    tls = m.tls
    return BrokerSettings(
        urls=m.broker_urls(),
        client_id=m.client_id or config.station.id,
        station_id=config.station.id,
        topic_prefix=m.topic_prefix,
        qos=m.qos,
        max_batch=m.max_batch,
        reconnect_max=m.reconnect_max,
        keepalive=m.keepalive,
        username=m.username,
        password=config.read_mqtt_password(),
        tls_ca=str(tls.ca) if tls and tls.ca else None,
        tls_cert=str(tls.cert) if tls and tls.cert else None,
        tls_key=str(tls.key) if tls and tls.key else None,
        tls_names=config.tls_file_names(),
        payload=m.payload,
        # only `payload: hj212` packets carry it: an edit of the hj212 section must not reconnect otherwise
        hj212=hj212_identity(config) if m.payload == "hj212" else None,
    )


def hj212_identity(config: Config) -> Hj212Identity | None:
    """MN (station id), ST and PW of the `hj212` section and the station timezone; None without it."""
    h = config.hj212
    if h is None:
        return None
    return Hj212Identity(mn=config.station.id, st=f"{h.st:02d}", pw=h.pw, timezone=config.station.timezone)


def uplink_targets(config: Config) -> list[UplinkTarget]:
    """The `hj212.uplinks` entries of `config`."""
    return [UplinkTarget(host=u.host, port=u.port, timeout=u.timeout, retries=u.retries)
            for u in (config.hj212.uplinks if config.hj212 is not None else [])]


def rtd_interval(config: Config) -> float | None:
    """Seconds between two real-time data packets (HJ 212 `RtdInterval`, CN 1061): the shortest device interval,
    since a CN 2011 packet goes out at each device poll."""
    return min((dev.interval for dev in config.devices.values()), default=None)


def build_uplinks(config: Config, recorder: Recorder, marks: dict[str, dict[str, int]] | None = None) -> list[Uplink]:
    """One `Uplink` per `hj212.uplinks` entry (not started). `marks`: progress of the uplinks they replace.
    The recorder then keeps what they have not delivered yet (`Recorder.set_holders`)."""
    identity = hj212_identity(config)
    uplinks: list[Uplink] = []
    try:
        for target in uplink_targets(config):
            assert identity is not None  # an hj212 section gives an identity
            uplinks.append(Uplink(target, identity, config.storage.path, recorder,
                                  reconnect_max=config.mqtt.reconnect_max, marks=(marks or {}).get(target.meta_key),
                                  rtd_interval=rtd_interval(config)))
    except BaseException:
        for built in uplinks:  # not started: what they opened is closed here
            built.discard()
        raise
    recorder.set_holders([u.target.meta_key for u in uplinks])
    return uplinks


BUS_DRIVER_MODULES = {"rtu": "drivers.modbus", "tcp": "drivers.modbus", "serial": "drivers.serial_drivers"}


def _bus_module(bus_type: str):
    """The driver module serving a bus type (`build_bus_drivers(bus_name, bus, devices)`), or None."""
    try:
        return importlib.import_module(BUS_DRIVER_MODULES[bus_type])
    except ImportError:
        return None


def check_supported(config: Config) -> None:
    """Refuse, with a clear message, what the config validates but this version does not run yet.
    (The HJ 212 password's rules are part of the config's validation: `Hj212.pw`.)"""
    problems = []
    for bus_name, bus in config.buses.items():
        if _bus_module(bus.type) is None and any(d.bus == bus_name for d in config.devices.values()):
            problems.append(f"buses.{bus_name}: {bus.type} buses are not yet supported by this version")
    if problems:
        raise UnsupportedConfig("; ".join(problems))


def build_pollers(config: Config, sink, seen: dict[str, dict[str, str | None]] | None = None,
                  on_problem: Callable[[str, str | None], None] | None = None,
                  only: Collection[str] | None = None,
                  predecessors: Callable[[PollerSpec], list[BusPoller]] | None = None) -> list[BusPoller]:
    """One poller per bus, serving all its devices in turn (and one per bus-less simulated device).
    `seen`: the channels (and units) each device has stored readings for, for drivers that learn their
    channels from the wire (hj212). `only`: the names of the pollers to build (a reload);
    `predecessors`: the stopped pollers each must wait for (`BusPoller.predecessors`), from whose last
    polls each device keeps to its interval."""
    pollers = []
    for name, spec in poller_specs(config).items():
        if only is not None and name not in only:
            continue
        before = predecessors(spec) if predecessors is not None else []
        if spec.simulated:
            (dev_id, dev), = spec.devices.items()
            channels = [SimChannelSpec(code=code, **ch.model_dump()) for code, ch in (dev.channels or {}).items()]
            driver = SimulatedDriver(dev_id, dev.interval, channels, dropout=dev.dropout or 0.0, seed=dev.seed)
            pollers.append(BusPoller(name, [driver], sink, on_problem=on_problem, predecessors=before))
            continue
        module = _bus_module(spec.bus.type)
        if module is None:
            raise UnsupportedConfig(f"buses.{name}: {spec.bus.type} buses are not yet supported by this version")
        # a serial line is started by its poller, once the poller it replaces has closed the port
        extra = {"timezone": spec.timezone, "seen": seen or {}, "start": False} if spec.bus.type == "serial" else {}
        pollers.append(BusPoller(name, module.build_bus_drivers(name, spec.bus, spec.devices, **extra), sink,
                                 on_problem=on_problem, predecessors=before))
    return pollers


def device_intervals(config: Config) -> dict[str, float]:
    return {dev_id: dev.interval for dev_id, dev in config.devices.items()}


def device_channels(config: Config) -> dict[str, list[str] | None]:
    """Each device's channels when the config tells them (None: learnt from the wire), for `status`."""
    return {dev_id: dev.known_channels() for dev_id, dev in config.devices.items()}


def log_config_warnings(config: Config) -> None:
    """check-config's warnings in the journal too, at start and at each reload (a technician may reload
    an edit without checking it first). Those of alarm rules are left to the alarm engine, which says
    them as it applies the rules ("rule not applied", "action skipped"), but for a stale rule shorter
    than a poll interval, which the engine does not judge."""
    for warning in config.warnings:
        if not warning.path.startswith("alarms") or warning.path.endswith(".stale"):
            log.warning("%s", warning)


LIVE_STORAGE_KEYS = ("max_mb", "keep_sent_days", "commit_interval_ms")  # a reload applies these at once


def storage_changes(running, edited) -> tuple[list[str], list[str]]:
    """The `storage` keys the edited file gives another value than the one in force: lines saying those
    a reload applies at once (`LIVE_STORAGE_KEYS`), and lines saying those read at start only (`sync`;
    `storage.path` has its own message)."""
    def show(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    changed = [key for key in type(running).model_fields
               if key != "path" and getattr(running, key) != getattr(edited, key)]
    applied = [f"storage.{key}: {show(getattr(edited, key))} (was {show(getattr(running, key))})"
               for key in changed if key in LIVE_STORAGE_KEYS]
    waiting = [f"storage.{key} is {show(getattr(edited, key))} in the file but {show(getattr(running, key))} in "
               "force: it takes effect at the next restart (systemctl restart edge-agent)"
               for key in changed if key not in LIVE_STORAGE_KEYS]
    return applied, waiting


class _LazyDeviceWriter:
    """`drivers.modbus.DeviceWriter`, imported at the first action write (the Modbus master is loaded
    only when needed)."""

    def __init__(self, drivers):
        self._drivers = drivers
        self._writer = None

    def __call__(self, device_id: str, kind: str, address: int, value: int | bool) -> None:
        if self._writer is None:
            from drivers.modbus import DeviceWriter

            self._writer = DeviceWriter(self._drivers)
        self._writer(device_id, kind, address, value)


WAL_ROOM_MB = 16  # disk beside `max_mb` for the WAL (up to 8 MiB kept, an eviction round on top: README)


def warn_if_disk_smaller_than_cap(path: Path, max_mb: float) -> None:
    """The size cap only helps if the disk can hold it and the WAL beside it: say so (at start, and when a
    reload changes the cap) when it cannot."""
    try:
        st = os.statvfs(path.parent)
        room = st.f_bavail * st.f_frsize + (path.stat().st_size if path.exists() else 0)
    except OSError:
        return
    if room < (max_mb + WAL_ROOM_MB) * 1024 * 1024:
        log.warning("storage.max_mb is %s MB but the disk has room for %.0f MB, less than max_mb + %d MB for its "
                    "WAL: the disk may fill up before the cap (readings then wait in memory until space returns)",
                    max_mb, room / 1048576, WAL_ROOM_MB)


def warn_of_moved_aside(path: Path) -> None:
    """Files moved aside beside the buffer (`NAME.corrupt-…`, `NAME.foreign-…`, with their -wal, -shm and
    .txt note) are never deleted (SPEC §3) and lie outside `max_mb`: on a card that keeps failing they add
    up to a full disk over the years. Said at every start while there are any."""
    try:
        found = [p for p in path.parent.iterdir()
                 if p.name.startswith((f"{path.name}.corrupt-", f"{path.name}.foreign-"))]
        size = sum(p.stat().st_size for p in found)
    except OSError:
        return
    if found:
        log.warning("%d files moved aside beside the buffer (%s…) take %.1f MB outside storage.max_mb; the agent "
                    "never deletes them: copy them off the gateway if they are wanted, then delete them",
                    len(found), min(found).name, size / 1048576)


class DeviceProblems:
    """Why each device's polls fail (the drivers' `problem`), kept in the buffer's meta `device_problems`
    for `status` (another process) whenever it changes: a device that keeps failing the same way writes
    nothing more."""

    def __init__(self, set_meta: Callable[[str, str], None]):
        self._set_meta = set_meta
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._known: set[str] | None = None  # the configured devices, once a reload has said which
        set_meta("device_problems", "{}")  # what the previous run left is not news of this one

    def failing(self) -> list[str]:
        """The devices whose last poll failed (any thread)."""
        with self._lock:
            return sorted(self._problems)

    def problems(self) -> dict[str, str]:
        """Why each of them failed, as `status` shows it (any thread)."""
        with self._lock:
            return dict(sorted(self._problems.items()))

    def keep_only(self, device_ids: set[str]) -> None:
        """A reload removed devices: what was noted of them is no longer news, nor what a poller the
        reload stopped notes of them as it ends its last poll."""
        with self._lock:
            self._known = set(device_ids)
            for device_id in set(self._problems) - device_ids:
                del self._problems[device_id]
            self._write()

    def note(self, device_id: str, problem: str | None) -> None:
        """After every poll (any bus poller thread)."""
        with self._lock:
            if self._problems.get(device_id) == problem or (self._known is not None and device_id not in self._known):
                return
            if problem is None:
                del self._problems[device_id]
            else:
                self._problems[device_id] = problem
            self._write()

    def _write(self) -> None:  # with the lock held: the recorder writes the last value given
        self._set_meta("device_problems", json.dumps(self._problems, separators=(",", ":"), sort_keys=True))


def _open_hint(cause: BaseException) -> str:
    """What to do about a buffer that cannot be opened, by the error's errno where it has one."""
    code = getattr(cause, "errno", None)
    if code == errno.EROFS:
        return "its file system is mounted read-only: remount it read-write (dmesg says why it went read-only)"
    if code in (errno.EACCES, errno.EPERM):
        return "this user may not write its directory: check the owner and permissions of the directory and files"
    if code == errno.ENOSPC:
        return "free space on its disk"
    return "check free space and the permissions of its directory"


def _saved_alarm_state(buffer: Buffer) -> tuple[str | None, bool]:
    """The alarm state of the previous run, and whether it comes from beside the file: a buffer file
    that holds none (fresh: the old one was deleted or lost to corruption) starts from the copy kept
    beside it, so that an alarm active then is not raised a second time (SPEC §4)."""
    saved = buffer.meta_value("alarm_state")
    if saved is not None:
        return saved, False
    beside = buffer.beside_value("alarm_state")
    if beside is not None:
        log.info("alarm state taken from %s: the buffer file holds none", buffer.beside_path("alarm_state"))
    return beside, beside is not None


class Station:
    """A running station. `run()` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(self, config_path: str | Path, config: Config):
        self.config_path = str(config_path)
        self.config = config
        self.notifier = Notifier()
        # Set by the signal handlers, which must take no lock: a handler runs in the main thread between
        # two bytecodes, possibly while that thread holds the very lock (an Event's) it would wait for.
        # They set a flag and write a byte to a pipe the main loop waits on (async-signal-safe).
        self._stop_requested = False
        self._failed: list[str] = []  # threads that ended by themselves (a bug): the run then ends with 1
        self._reload_requested = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.pollers: list[BusPoller] = []
        # The pollers' sink until the recorder exists: polling starts once the buffer's lock is held, before
        # the buffer is open (its check may take minutes after a power cut: agent.startsink)
        self.sink: StartSink | None = None
        self._retired: list[BusPoller] = []  # stopped by a reload, maybe still ending their poll
        self.clock = ClockWatch()
        self._clock_synced: bool | None = None
        self._clock_recorded: object = "unset"
        self.uplinks: list[Uplink] = []
        self._uplinks_due: tuple[Config, dict[str, dict[str, int]]] | None = None  # a reload's, not started yet
        self._uplink_log = RateLimitedLog(log, every_s=60)
        self.console: Console | None = None
        # The buffer's locks (agent.instance), held until the process ends; `buffer_path` is the path they were
        # taken for (a reload may name another: the next start's).
        self._instance_lock: instance.Held | None = None
        # Said on the retained status (a restart is not a reconnect); moved with each step of the wall clock,
        # so that a start before NTP set the clock (a Pi without a real-time clock) is right once it has.
        self._started_ms = now_ms()
        self.started = iso_utc_ms(self._started_ms)
        # Why the last reload was refused (None once one succeeds): the station runs an older configuration
        # than its file, and its next start will fail on that file; said wherever an operator looks.
        self.config_error: str | None = None

    def run(self) -> int:
        """Run until stopped; raises AlreadyRunning (before touching the buffer) when another agent runs
        with the same buffer, unless under systemd, where it waits for it (`_open_buffer`)."""
        self._install_signals()  # first: a signal during start-up is acted on once running, never lost
        cfg = self.config
        storage = cfg.storage
        release_free_memory(collect=True)  # what loading the configuration built and dropped
        try:
            buffer = self._open_buffer()
        except BaseException:
            self._stop_early_polling()
            raise
        if buffer is None:  # stopped while waiting for it
            self._stop_early_polling()
            log.info("stopped cleanly")
            return 0
        buffer.ensure_time_index()  # HJ 212 backfill requests ask for aggregates by time
        log.info("buffer %s open: readings last seq %d, acknowledged up to %d", storage.path,
                 buffer.last_seq(), buffer.sent_upto())
        warn_if_disk_smaller_than_cap(storage.path, storage.max_mb)
        warn_of_moved_aside(Path(storage.path))
        self.recorder = Recorder(buffer, commit_interval_ms=storage.commit_interval_ms,
                                 keep_sent_days=storage.keep_sent_days, max_mb=storage.max_mb, sync=storage.sync)
        self.recorder.set_quiet_check(self._pollers_quiet_until)
        self.publisher = Publisher(broker_settings(cfg), str(storage.path), self.recorder, self._status,
                                   self._summary, started=self.started)
        self._record_agent()
        self.recorder.add_listener(self.publisher.wake)
        self.recorder.set_in_flight_check(self.publisher.in_flight_upto)
        self.recorder.start()
        self.publisher.start()
        self.uplinks = build_uplinks(cfg, self.recorder)  # before polling: a new uplink starts "from now"
        self.recorder.add_listener(self._wake_uplinks)
        for u in self.uplinks:
            u.start()
        # Always built: with no rules it still clears alarms left active by rules since removed.
        # Alarm actions write through the bus that owns the device, resolved at each write so that
        # pollers rebuilt by SIGHUP are used. The writer is given even when no rule has an action
        # (yet): an output left "on" by a rule since removed is switched off, and an action added by
        # SIGHUP is run.
        writer = _LazyDeviceWriter(lambda: [d for p in self.pollers for d in p.drivers])
        saved_alarms, from_beside = _saved_alarm_state(buffer)
        self.alarms = AlarmEngine(cfg, self.recorder, saved_alarms, writer, resave=from_beside,
                                  saved_windows=buffer.meta_value("alarm_windows"))
        self.recorder.watch_beside("alarm_state")  # `rm buffer.db*` takes it: written again, as the seq mark is
        self.recorder.add_stored_listener(self.alarms.observe)
        # Rebuilds its open periods from the stored readings before any reading of this run is stored.
        self.aggregator = Aggregator(cfg, self.recorder, buffer.meta_value("aggregate_state"),
                                     self.recorder.open_reader)
        self.recorder.add_stored_listener(self.aggregator.observe)
        if cfg.console is not None:  # imported only when configured: it costs memory
            from agent.console import start_console

            self.console = start_console(self)  # None if it could not start (logged)
        self._store_early_readings()
        # Ticks only now: a period that ended while the buffer was opened is computed with its readings
        self.recorder.add_tick_listener(self.alarms.tick)
        self.recorder.add_tick_listener(self.aggregator.tick)
        self.notifier.notify("READY=1\nSTATUS=running")
        log.info("station %s running: %d devices on %d pollers", cfg.station.id, len(cfg.devices), len(self.pollers))
        self._main_loop()
        self._shutdown()
        return 1 if self._failed else 0

    def _open_buffer(self) -> Buffer | None:
        """The writer buffer. A failure that time or a technician may cure (a full disk, a file or
        directory the agent may not write, an I/O error) is logged and retried every BUFFER_RETRY_S,
        the service reported running (systemd's STATUS= says why nothing is polled) instead of ending
        in a restart loop that systemd gives up on; None when a stop is asked meanwhile.
        Another agent holding the buffer (`instance.hold`) ends a run started by hand at once
        (AlreadyRunning: the technician sees why); under systemd it is waited for the same way: the
        service restarted while a technician's run by hand holds the buffer would otherwise use up its
        start limit in a minute and stay failed, recording nothing, after that run ended."""
        storage = self.config.storage
        failures = 0
        rescue: RescueCutShort | None = None  # a corrupt file moved aside whose fresh file the disk refused
        while True:
            if self._instance_lock is not None and self.sink is None:
                self._start_polling()  # this agent owns the buses now
            try:
                if self._instance_lock is None:  # held until the process ends; raises AlreadyRunning
                    self._instance_lock = instance.hold(storage.path)
                    continue  # polling starts (above) before the buffer is opened
                holders = [t.meta_key for t in uplink_targets(self.config)]
                if rescue is not None:  # the corrupt file is moved aside: the fresh one, then its salvage
                    return Buffer.resume_rescue(storage.path, rescue.moved, rescue.acked, sync=storage.sync,
                                                max_mb=storage.max_mb, progress=self._opening, holders=holders)
                return Buffer.open_writer(storage.path, sync=storage.sync, max_mb=storage.max_mb,
                                          progress=self._opening, holders=holders)
            except NewerBuffer:
                raise  # a downgrade: waiting cures nothing, and the file must stay as it is
            except RescueCutShort as exc:  # else the retry opened a fresh file and never salvaged the old one
                rescue = exc
                reason = f"cannot start a fresh buffer {storage.path} after its corrupt one was moved aside: {exc}"
                hint = f"free space on its disk: {exc.moved.name} is salvaged into it then"
            except instance.AlreadyRunning as exc:
                if not self.notifier.enabled:
                    raise
                reason, hint = str(exc).split(";")[0], "waiting for it to end"
            except (BufferError, sqlite3.Error, OSError) as exc:
                cause = exc.__cause__ if isinstance(exc, BufferError) and exc.__cause__ else exc
                reason = f"cannot open the buffer {storage.path}: {cause}"
                hint = _open_hint(cause)
            if failures % max(1, round(BUFFER_RETRY_LOG_S / BUFFER_RETRY_S)) == 0:
                log.error("%s; %s (%s); retrying every %g s", reason,
                          "readings wait in memory until it opens" if self.sink is not None else
                          "nothing is polled until it opens", hint, BUFFER_RETRY_S)
            failures += 1
            self.notifier.notify(f"READY=1\nSTATUS={reason}; retrying")
            deadline = time.monotonic() + BUFFER_RETRY_S
            while not self._stop_requested and (left := deadline - time.monotonic()) > 0:
                self.notifier.notify("WATCHDOG=1")
                self._wait_for_signal(min(left, 5.0))
            if self._stop_requested:
                if rescue is not None:  # as the recorder says it at a stop while running
                    log.error("stopping before the corrupt buffer moved aside as %s could be salvaged (no fresh "
                              "file could be made): its rows stay in it, and the next start with room "
                              "salvages it (a marker beside the buffer says so)", rescue.moved.name)
                return None

    def _start_polling(self) -> None:
        """Start the pollers as soon as the buffer's lock is held (one agent per buffer, hence per bus),
        before the buffer is open: their readings wait in `self.sink` until the recorder exists. Opening
        checks the whole file (quick_check), compacts or salvages it: minutes for a large file not in the
        page cache (a start after a power cut), every reading of which was never taken before."""
        self.sink = StartSink()
        self.device_problems = DeviceProblems(self.sink.set_meta)
        self.pollers = build_pollers(self.config, self.sink.submit, on_problem=self.device_problems.note)
        for p in self.pollers:
            p.start()

    def _store_early_readings(self) -> None:
        """Once the alarm engine and the aggregator listen: the readings taken while the buffer was opened
        are handed to the recorder, in the order they were taken, and committed (seqs issued now, as for
        any reading stored late); from now on the pollers' readings go straight to it. The hj212 drivers
        learn the channels stored before this start, as a build after the open gave them."""
        assert self.sink is not None
        seen = self.recorder.seen_channels()
        for driver in (d for p in self.pollers for d in p.drivers):
            learn = getattr(driver, "learn_stored", None)
            if learn is not None:
                learn(seen.get(driver.device_id, {}))
        self.alarms.held_poll_times(self.sink.poll_times())  # their delays count from when they were polled
        held = self.sink.attach(self.recorder.submit, self.recorder.set_meta)
        if held or self.sink.dropped:
            self.recorder.flush()
            log.info("%d readings taken while the buffer was opened are stored%s", held,
                     f" ({self.sink.dropped} older ones were dropped: more than {self.sink.limit} waited)"
                     if self.sink.dropped else "")
        self.alarms.held_poll_times({})

    def _opening(self) -> None:
        """Called every few seconds while the buffer's check, compaction or salvage runs (main thread). The
        integrity check, a compaction or a corrupt file's salvage may take minutes on a large buffer not in
        the page cache (a start after a power cut): systemd's start timeout is extended as it goes
        (EXTEND_TIMEOUT_USEC; without systemd this does nothing). A stop asked meanwhile stops polling
        here (SPEC §1: within PROGRESS_EVERY_S); what was polled is stored once the buffer is open, then
        the agent stops as usual."""
        self.notifier.notify("EXTEND_TIMEOUT_USEC=30000000")
        if self._stop_requested:
            for p in self.pollers:
                p.stop(close_drivers=False)  # their buses still carry the alarm actions of the shutdown

    def _stop_early_polling(self) -> None:
        """The buffer was never opened (a stop asked meanwhile, or an error that ends the run): stop the
        pollers and say what they took that cannot be stored."""
        for p in self.pollers:
            p.stop()
        deadline = time.monotonic() + 10  # a poller stuck on a dead wire must not hold the stop
        for p in self.pollers:
            p.join(max(deadline - time.monotonic(), 0.1))
        lost = (self.sink.held() + self.sink.dropped) if self.sink is not None else 0
        if lost:
            log.error("stopping before the buffer could be opened: %d readings taken meanwhile are lost", lost)

    def _pollers_quiet_until(self, deadline: float) -> bool:
        """True when no poller hands over readings before `deadline` (for the recorder's group commit)."""
        return all(p.quiet_until >= deadline for p in [*self.pollers, *self._retired])

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _request_stop(self) -> None:
        self._stop_requested = True
        self._poke()

    def request_reload(self) -> None:
        """Reload the config at the next turn of the main loop (SIGHUP; async-signal-safe)."""
        self._reload_requested = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: the main loop has a wake-up pending anyway
            pass

    def _wait_for_signal(self, timeout: float) -> None:
        if select.select([self._wake_r], [], [], timeout)[0]:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _main_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        tick = min(interval, 5.0) if interval else 5.0
        next_status = 0.0
        was_hung = False
        self._hung_log = RateLimitedLog(log, every_s=60)
        self._lock_log = RateLimitedLog(log, every_s=60)
        while not self._stop_requested:
            self._wait_for_signal(tick)
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
                next_status = 0.0  # `systemctl status` after `systemctl reload`: whether it was refused, at once
            self._start_due_uplinks()
            self._watch_clock()
            self._keep_lock()
            self._failed = self.ended_loops()
            if self._failed:
                log.critical("%s ended unexpectedly (its error is logged above); stopping, so that the agent "
                             "starts afresh (systemd restarts it) rather than run on without it",
                             ", ".join(self._failed))
                break
            hung = self.hung_loops()
            if hung:
                self._hung_log.error("no progress in %s; withholding the watchdog ping", ", ".join(hung))
                was_hung = True
                continue
            if was_hung:
                log.warning("every loop makes progress again; watchdog pings resumed")
                was_hung = False
            if interval:
                self.notifier.notify("WATCHDOG=1")
            now = time.monotonic()
            if self.notifier.enabled and now >= next_status:
                next_status = now + 30
                self.notifier.notify(f"STATUS={self.summary()}")

    def _keep_lock(self) -> None:
        """A lock file of the buffer deleted while the agent runs (`rm .buffer.db.lock`; `rm buffer.db*` takes
        the one older edge-agents look at): taken again on a new file, so that `status` sees this agent and a
        second `run` on the same buffer is refused (`instance.keep_held`)."""
        if self._instance_lock is None:
            return
        try:
            made = instance.keep_held(self._instance_lock)
        except instance.AlreadyRunning as exc:
            self._lock_log.error("a lock file of the buffer %s was deleted while this agent runs, and another "
                                 "process took a new one: %s", self._instance_lock.buffer_path,
                                 str(exc).split(";")[0], key="lock")
            return
        except OSError as exc:
            self._lock_log.error("a lock file of the buffer %s was deleted while this agent runs and cannot be made "
                                 "again (%s): a second agent on the same buffer would not be refused",
                                 self._instance_lock.buffer_path, exc, key="lock")
            return
        for path in made:
            log.warning("the buffer's lock file %s was deleted while the agent runs: made again (status sees this "
                        "agent, a second one on the same buffer is refused)", path)

    def _watch_clock(self) -> None:
        """Log a wall-clock step or a change of NTP synchronisation, and record both for `status`."""
        step = self.clock.check()
        synced = self.clock.state()["synchronized"]
        if step is not None:
            log.warning("wall clock stepped by %+.1f s; readings keep the time they were taken at, intervals "
                        "and delays run on the monotonic clock", step.seconds)
            self._started_ms += round(step.seconds * 1000)
            self.started = self.publisher.started = iso_utc_ms(self._started_ms)
            self._record_agent()
        if synced != self._clock_synced:
            if synced is False:
                log.warning("system clock not synchronised (no NTP yet): reading times may be wrong until it is")
            elif synced and self._clock_synced is False:
                log.info("system clock synchronised")
            self._clock_synced = synced
        if step is not None or synced != self._clock_recorded:
            self._clock_recorded = synced
            self.recorder.set_meta("clock", json.dumps(self.clock.state()))

    def ended_loops(self) -> list[str]:
        """Names of the loops that ended though no stop was asked: an exception no loop expected. Left
        alone, a dead publisher kept the process polling into the buffer and publishing nothing, with a
        retained `offline` status, until the watchdog (if any) ended it."""
        loops: list = [*self.pollers, self.recorder, self.publisher, *self.uplinks]
        return [t.name for t in loops if not t.is_alive()]

    def hung_loops(self) -> list[str]:
        """Names of the loops (pollers, recorder, publisher) that made no progress recently."""
        interval = self.notifier.watchdog_interval or 0
        deadline = max(PROGRESS_DEADLINE_S, 4 * interval)
        now = time.monotonic()
        loops: list = [*self.pollers, self.recorder, self.publisher, *self.uplinks]
        return [t.name for t in loops if now - t.last_progress > deadline or not t.is_alive()]

    def summary(self) -> str:
        """One line for systemd's STATUS=: backlog, broker state, active alarms."""
        p = self.publisher
        backlog = max(self.recorder.last_committed_seq - p.acked_upto(), 0)
        try:
            alarms = len(self.alarms.active())
        except RuntimeError:  # the engine changed its state meanwhile (it runs on the recorder thread)
            alarms = 0
        refused = self.recorder.write_error
        return (("the last reload was refused (see the journal), the previous configuration runs; "
                 if self.config_error else "")
                + (f"buffer refuses writes ({refused}), readings wait in memory; " if refused else "")
                + (f"{self.recorder.detached_text()}; " if self.recorder.detached else "")
                + f"backlog {backlog}, broker {p.state}, {alarms} active alarms, "
                f"last seq {self.recorder.last_committed_seq}")

    def agent_record(self) -> dict:
        """This agent as `status` shows it under `agent` (beside `running`): pid, version, start time and
        why the last reload was refused (null when it was not)."""
        return {"pid": os.getpid(), "version": __version__, "started": self.started, "config_error": self.config_error}

    def _record_agent(self) -> None:
        """Keep `agent_record()` in the buffer's meta `agent`, for `edge-agent status` (another process)."""
        self.recorder.set_meta("agent", json.dumps(self.agent_record(), separators=(",", ":")))

    def _refuse_reload(self, problems: list[str], shown: list[Problem] | None = None) -> None:
        """A reload that does not load: logged line by line, the running configuration kept, and the
        refusal kept for the retained status, `status` and systemd's STATUS= until a reload succeeds.
        `shown`: the file's problems and warnings in file order, when it did not validate: logged as
        check-config prints them (every warning: no rule of that file is applied, so the alarm engine
        says none of them)."""
        for line in shown or problems:
            if isinstance(line, Problem) and line.warning:
                log.warning("%s", line)
            else:
                log.error("reload refused: %s", line)
        log.error("keeping the running configuration; the next start would fail on this file: fix it and reload")
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        self.config_error = (f"reload refused at {iso_utc_ms(now_ms())}, running the configuration loaded before: "
                             f"{problems[0]}{more}")
        self._record_agent()

    def _summary(self) -> dict | None:
        """What the retained `P/status` says of the station beside `online` (publisher thread); None
        until the alarm engine and the pollers are set up (after the publisher starts: it connects
        meanwhile), rather than a summary that says no alarm is active when one was restored."""
        problems = getattr(self, "device_problems", None)
        alarms = getattr(self, "alarms", None)
        if problems is None or alarms is None:
            return None
        return {"started": self.started, "failing_devices": problems.failing(), "device_problems": problems.problems(),
                "active_alarms": alarms.active_ids(),
                "buffer_error": self.recorder.write_error or self.recorder.detached_text(),
                "config_error": self.config_error}

    def _status(self) -> dict:
        """The `status` command's answer: what `edge-agent status --json` shows, this agent included."""
        try:
            reader = self.recorder.open_reader()
        except BufferError as exc:  # the file at the path is not the one written, until it is put back
            status = unreadable(device_intervals(self.config), str(exc))
        else:
            try:
                status = collect(reader, device_intervals(self.config), device_channels(self.config),
                                 uplink_names(self.config))
            finally:
                reader.close()
        return {**status, "station": self.config.station.id, "agent": {"running": True, **self.agent_record()}}

    def reload(self) -> None:
        """SIGHUP: load the config again; a bad one is logged and the running one kept."""
        log.info("SIGHUP: reloading %s", self.config_path)
        try:
            new = load_config(self.config_path, check_files=True)
            check_supported(new)
            settings = broker_settings(new)
        except ConfigError as exc:
            self._refuse_reload([str(p) for p in exc.problems],
                                sorted(exc.problems + exc.warnings, key=lambda p: (p.line, p.col)))
            return
        except (UnsupportedConfig, OSError, ValueError) as exc:
            self._refuse_reload([str(exc)])
            return
        plan = plan_reload(poller_specs(self.config), poller_specs(new))
        running = {p.bus_name: p for p in self.pollers}
        retired = [p for p in self._retired if p.is_alive()] + [running[n] for n in plan.restarted + plan.stopped]

        def predecessors(spec: PollerSpec) -> list[BusPoller]:
            """A simulated device's poller waits for its own predecessor; a bus poller for every bus
            poller still ending (the same wire may have another name now)."""
            if spec.simulated:
                return [p for p in retired if p.bus_name == spec.name]
            return [p for p in retired if not p.bus_name.startswith(SIM_PREFIX)]

        try:  # built before anything is applied: nothing is opened until they start
            fresh = build_pollers(new, self.recorder.submit, self.recorder.seen_channels(),
                                  self.device_problems.note, only=set(plan.restarted + plan.started),
                                  predecessors=predecessors)
        except Exception as exc:  # noqa: BLE001 - a driver that cannot be built must not end the agent
            self._refuse_reload([f"cannot set up the devices ({type(exc).__name__}: {exc})"])
            return
        if self.config_error is not None:
            self.config_error = None
            self._record_agent()
        applied, waiting = storage_changes(self.config.storage, new.storage)
        for line in waiting:
            log.warning("%s", line)
        if self.console is None and new.console != self.config.console:  # a running console says it itself
            log.warning("console settings changed: they take effect at the next restart (systemctl restart edge-agent)")
        if applied:
            log.info("storage limits applied: %s", "; ".join(applied))
            self.recorder.set_limits(**{key: getattr(new.storage, key) for key in LIVE_STORAGE_KEYS})
            if new.storage.max_mb != self.config.storage.max_mb:
                warn_if_disk_smaller_than_cap(self.config.storage.path, new.storage.max_mb)
        if new.storage.path != self.config.storage.path:
            if self.recorder.keep_seq_marks_for(new.storage.path):  # news: said in full once
                log.warning("storage.path changed to %s: this agent writes %s until it restarts (`status` with the "
                            "new file reads the new path meanwhile); the buffer started there will number every "
                            "stream on from this one's high-water mark (kept beside it in %s.seq), never again "
                            "from 1", new.storage.path, self.config.storage.path, new.storage.path)
            else:  # a later reload with that path still in the file: said as `storage.sync` is
                log.warning("storage.path is %s in the file but %s in force: it takes effect at the next restart "
                            "(systemctl restart edge-agent)", new.storage.path, self.config.storage.path)
        self.publisher.update_settings(settings)
        self._reload_uplinks(new)
        for name in plan.restarted + plan.stopped:
            running[name].stop()  # not waited for: its successor waits, the other buses poll on
        self._retired = retired
        live = {key: getattr(new.storage, key) for key in LIVE_STORAGE_KEYS}
        self.config = new.model_copy(update={"storage": self.config.storage.model_copy(update=live)})
        self.alarms.reconfigure(self.config)
        self.aggregator.reconfigure(self.config)
        self.device_problems.keep_only(set(self.config.devices))
        by_name = {p.bus_name: p for p in fresh} | {n: running[n] for n in plan.kept}
        self.pollers = [by_name[name] for name in poller_specs(self.config) if name in by_name]
        for p in fresh:
            p.start()
        log.info("configuration reloaded: %d devices (%s)", len(new.devices), plan.summary())
        if new.env_names:  # a process's environment is fixed at its start: an edited EnvironmentFile is not seen
            log.info("%s: the values the agent started with (its environment is read at start only): an edit of the "
                     "service's environment file takes effect at the next restart (systemctl restart edge-agent)",
                     ", ".join(f"${{{name}}}" for name in new.env_names))
        log_config_warnings(new)

    def _wake_uplinks(self) -> None:
        for u in self.uplinks:
            u.wake()

    def _stop_uplinks(self) -> dict[str, dict[str, int]]:
        """Stop every uplink (in parallel); returns their progress by meta key."""
        marks = stop_uplinks(self.uplinks, UPLINK_STOP_S)
        self.uplinks = []
        return marks

    def _reload_uplinks(self, new: Config) -> None:
        """SIGHUP: restart the uplinks when their list or the HJ 212 identity changed; otherwise give them
        the new backoff ceiling and real-time interval (those a reload before could not start yet too)."""
        if new.hj212 == self.config.hj212 and new.station == self.config.station:
            for u in self.uplinks:
                u.apply_settings(new.mqtt.reconnect_max, rtd_interval(new))
            if self._uplinks_due is not None:
                self._uplinks_due = (new.model_copy(update={"storage": self.config.storage}), self._uplinks_due[1])
            return
        marks = self._stop_uplinks()
        if self._uplinks_due is not None:  # those a reload before could not start yet: their progress too
            marks = {**self._uplinks_due[1], **marks}
        self._uplinks_due = (new.model_copy(update={"storage": self.config.storage}), marks)
        self._start_due_uplinks()

    def _start_due_uplinks(self) -> None:
        """Start the uplinks a reload asked for. Each opens the buffer: while the file is away from its path
        (deleted or renamed, not put back yet) that fails, and is tried again at each turn of the main loop
        (it raised out of the reload, ending the agent without its orderly stop)."""
        if self._uplinks_due is None:
            return
        config, marks = self._uplinks_due
        try:
            uplinks = build_uplinks(config, self.recorder, marks)
        except (BufferError, sqlite3.Error, OSError) as exc:
            self._uplink_log.error("cannot start the HJ 212 uplinks yet (%s); retrying", exc)
            return
        self._uplinks_due = None
        self.uplinks = uplinks
        for u in self.uplinks:
            u.start()
        log.info("HJ 212 uplinks reloaded: %d", len(self.uplinks))

    def _shutdown(self) -> None:
        grace = self.config.mqtt.shutdown_grace
        log.info("stopping: polling stopped, committing, publishing the backlog for up to %ss", grace)
        self.notifier.notify("STOPPING=1")
        if self.console is not None:
            self.console.stop()
        self.alarms.polling_stopped()  # a stale rule must not take the stop for silent instruments
        for p in self.pollers:
            p.stop(close_drivers=False)  # their buses still carry the alarm actions of the last readings
        deadline = time.monotonic() + 10  # a poller stuck on a dead wire must not hold the stop
        for p in [*self._retired, *self.pollers]:  # a reload's stopped pollers may still end a poll
            p.join(max(deadline - time.monotonic(), 0.1))
        self.alarms.save_at_next_tick()  # the flush's commit ticks it; the recorder's last commit writes it
        # The last readings, then what the alarm engine and the aggregator make of them (events, state),
        # all committed before the publisher's last drain; an output that an alarm's clear switches
        # off is written before the buses close, and its new state committed.
        self.recorder.flush_settled()
        self.alarms.finish_actions(ACTION_STOP_WAIT_S)
        self.recorder.flush_settled()
        self.publisher.drain_and_stop(grace)
        self._stop_uplinks()  # before the recorder stops: their last progress is committed with it
        self.recorder.stop()
        self.alarms.close()
        self.aggregator.close()
        for p in self.pollers:
            if not p.is_alive():  # one stuck on a dead wire holds its bus: left to the process's end
                p.close_drivers()
        self.recorder.buffer.close()
        if self._failed:
            log.error("stopped after %s ended unexpectedly; exit status 1", ", ".join(self._failed))
        else:
            log.info("stopped cleanly")
