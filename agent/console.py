"""The local web console (`console:` section): a read-only HTTP server inside the agent for the technician
at the station — one page (HTML, inline CSS and JS, charts drawn as inline SVG) and a small JSON API.

Standard library only: `http.server.ThreadingHTTPServer` on a daemon thread. It sees the running station
only through the attributes of `StationView` and never writes anything: no config, no instrument, no file.

- GET /api/status: the `edge-agent status --json` document, plus a `console` key (station identity,
  uptimes, clock, drain estimate, buffer cap, per-device poll failures, configured channels).
- GET /api/history?channel=DEVICE.CHANNEL&hours=N: 1-minute buckets (avg/min/max/count) of the last N
  hours (0 < N <= 24) from an in-memory history fed by the recorder and prefilled from the buffer.
- GET /api/alarms[?limit=N]: active alarms and the latest alarm events.
Errors are JSON `{"error": ..., "status": ...}` with the status code; never a stack trace, never the
request's own bytes (but an unknown query parameter's name, at most 40 characters, quoted in the JSON).
A malformed request line or header block is answered `400 Bad Request` with a status line and headers
like any other answer.

One request per connection (HTTP/1.0), whose head must arrive within REQUEST_DEADLINE_S; at most
MAX_CLIENTS connections, a new one taking the place of the oldest still sending its request: see
`agent.consolehttp`.

This module holds `Console` (its threads; the documents of the API: status, history, alarms) and
`start_console`, and re-exports the names other modules import from it, so that `from agent.console
import X` is the way in. Its parts, from the bottom up (each module imports only modules above it in
this list; `agent.consoleapi` and `agent.consolehttp` name `Console` for type checking only):
- `agent.consolepage`: the page (`agent/data/console.{html,css,js}`) and its Content-Security-Policy.
- `agent.consolemeters`: the drain estimate, the clock's state, the uptime, the local time.
- `agent.consolehistory`: `History`, the charts' last 24 h in 1-minute buckets.
- `agent.consoleauth`: the password file, the throttle of wrong passwords, `ConsoleError`.
- `agent.consoleapi`: the JSON API's endpoints and their parameters, `ApiError`.
- `agent.consolehttp`: the HTTP server and its request handler.
- `agent.console`: this module.
Imports those modules, `agent` (version), `agent.buffer`, `agent.config`, `agent.model`, `agent.status`
and `agent.logutil`; nothing else from the project. `agent.runtime` imports it only when the config has
a `console:` section, and nothing else imports its parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import __version__
from agent.buffer import Buffer
from agent.config import Config, ConfigError
from agent.config import Console as ConsoleSettings
from agent.consoleapi import ApiError
from agent.consoleauth import ConsoleError, _Password, _Throttle
from agent.consolehistory import BUCKET_MS, HISTORY_HOURS, History
from agent.consolehttp import MAX_CLIENTS, MAX_HEAD_BYTES, REQUEST_DEADLINE_S, _Server
from agent.consolemeters import DrainMeter, _local_time, clock_state, system_uptime
from agent.logutil import RateLimitedLog
from agent.model import STREAM_ALARMS, Reading, iso_utc_ms, now_ms
from agent.status import collect, uplink_names

__all__ = [
    "HISTORY_HOURS",
    "MAX_CLIENTS",
    "MAX_HEAD_BYTES",
    "REQUEST_DEADLINE_S",
    "Console",
    "ConsoleError",
    "History",
    "StationView",
    "start_console",
]

log = logging.getLogger(__name__)

STATUS_TTL_S = 1.0  # several tabs polling share one status document per second
SAMPLE_EVERY_S = 2.0


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
            doc = collect(reader, intervals, known, uplink_names(config))
        finally:
            if reader is not None:
                reader.close()
        doc["station"] = config.station.id
        doc["agent"] = {"running": True, **self.station.agent_record()}  # as `status` says it (this is the agent)
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
