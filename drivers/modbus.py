"""Modbus RTU and TCP: one `ModbusBus` per configured bus (owns the link), one `ModbusDriver` per device.

`build_bus_drivers(bus_name, bus, devices)` is what `agent.runtime` calls for `type: rtu` and `type: tcp`
buses. Imports `agent.model`, `agent.logutil`, the pure Modbus modules of `drivers` (registers, codec,
planner, profiles, modbus_frames), `drivers.modbus_link` (the links) and `drivers.serial_port`; never
`agent.config`: the bus and device models are duck-typed.

The link. A bus owns its link: the serial port (`_RtuPort`, pyserial) or the TCP connection
(`_TcpLink`), both speaking the master's side of the protocol (`drivers.modbus_link`), and one lock,
"the wire": a transaction (request and answer, with its retries) happens only while holding it, so an
RS-485 line never sees two masters' requests at once. The bus poller thread holds the wire for a whole
device poll. A request is sent at most `retries + 1` times, each waiting at most `timeout` for the
answer to begin (on RTU an answer that has begun is then given its transfer time at the bus's baud
rate), so a silent slave costs at most `timeout * (retries + 1)`, after which the device is given up for
this poll and the poller moves on; a device given up SILENT_AFTER_POLLS polls in a row gets one try per
poll until it answers (a dead slave costs the bus one timeout per poll).
A serial port is checked (one `stat()` of its path) before every transaction: when the path vanished
(USB adapter unplugged) or now names another device (replugged) the port is closed, and it is reopened
when the path is back. A TCP connection that dropped is reopened by the next transaction (once within
it, not counted as a retry), and one that stays mute for 3 tries in a row is reopened too (a peer gone
without closing it); a slow failed connect (no answer) is not tried again for 4 times what it cost
(`modbus_link.CONNECT_BACKOFF`, at most 30 s: `CONNECT_BACKOFF_MAX_S`): meanwhile the bus's devices
read null/B at once. Each bus logs one line when its link is lost and one when it is back (a link that
flaps: at most three "lost" lines a minute, then one with the count of losses in between; one that stays
down: a reminder every
STILL_FAILING_EVERY_S with how long it has been down); each device one line when it stops answering
properly (and at most one more per other kind of failure: no answer, bad answer, exception), a
reminder with the count every STILL_FAILING_EVERY_S while it keeps failing, and one when it recovers:
never one per poll, whatever bytes its answers hold.

The requests and answers as bytes (`_Ask`, CRC, RTU and MBAP frames) are in `drivers.modbus_frames`; the
links, how they bound what a peer can make them hold and how they tell a late answer from the answer to
the request sent now (the late window), in `drivers.modbus_link`.

Writes (`ModbusBus.write`, `ModbusDriver.write`) may be requested from any thread (the alarm engine):
they are queued and return a `concurrent.futures.Future[WriteResult]` at once. Whoever holds the wire
runs the queue: the bus poller right after the device poll in progress, or, when the wire is idle, a
short-lived helper thread started by `write()`. So a write never interleaves with a poll's requests,
waits at most one device poll, and runs in request order (an "on" is never overtaken by its "off").
`DeviceWriter` adapts this to the alarm engine's blocking `ActionWriter` call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.logutil import FlapLimiter
from agent.model import FLAG_COMM, FLAG_FAULT, Reading
from drivers import profiles
from drivers.modbus_codec import combine_flags, evaluate, flag_from_status, status_flags_by_channel
from drivers.modbus_frames import COIL_ON, FC_WRITE_COIL, FC_WRITE_REGISTER, _Ask, _BadFrame, crc16
from drivers.modbus_link import BusStats, _Flood, _LinkFailed, _NoFrame, _RtuPort, _TcpLink
from drivers.planner import Request, naive_plan, plan, slice_response
from drivers.registers import RegisterSpec, value_channels
from drivers.serial_port import open_error

log = logging.getLogger(__name__)

__all__ = [
    "EXC_ILLEGAL_ADDRESS",
    "DeviceWriter",
    "ExceptionReply",
    "LinkDown",
    "ModbusBus",
    "ModbusDriver",
    "BadAnswer",
    "Garbled",
    "NoAnswer",
    "WireError",
    "WriteFailed",
    "WriteResult",
    "build_bus_drivers",
    "crc16",
]

EXC_ILLEGAL_ADDRESS = 2
EXC_ILLEGAL_VALUE = 3  # also "quantity of registers out of range": a read longer than the slave serves
#: What a Modbus exception code means, and what to check, as the log says it.
EXCEPTION_MEANING = {
    1: "illegal function: the slave does not serve this table (check `table`)",
    2: "illegal data address: no such register (check the register map's addresses)",
    3: "illegal data value: a read longer than the slave serves (check the map's entries)",
    4: "slave device failure",
    5: "acknowledge: busy with a long command",
    6: "slave device busy",
}
WriteKind = Literal["coil", "register"]


class WireError(Exception):
    """A transaction that did not produce data; `flag` is the HJ 212 flag its readings get."""

    flag = FLAG_COMM


class LinkDown(WireError):
    """The serial port or the TCP connection is not available (nothing was sent)."""


# Exception codes with which a gateway reports that the device behind it gave no answer.
GATEWAY_NO_ANSWER = {0x0A: "exception 10 (gateway path unavailable)",
                     0x0B: "exception 11 (gateway target device failed to respond)"}


class NoAnswer(WireError):
    """No valid answer after all tries (timeout, bad CRC, garbled or mismatched frame)."""


class BadAnswer(NoAnswer):
    """The last try was answered, but not with an answer to the request (other unit, function code, byte
    count or echo): refused, like no answer (flag B)."""


class Garbled(NoAnswer):
    """The last try got bytes that make no valid frame (a wrong baud rate or parity, noise): like no
    answer (flag B)."""


class ExceptionReply(WireError):
    """The slave answered with a Modbus exception (`code`: 1 illegal function, 2 illegal address, ...)."""

    flag = FLAG_FAULT

    def __init__(self, code: int):
        super().__init__(f"Modbus exception {code:02d}")
        self.code = code


@dataclass(frozen=True)
class WriteResult:
    """Outcome of one `write`: `ok`, or `error` saying why not (`flag` B: no answer/link, D: refused)."""

    device_id: str
    kind: WriteKind
    address: int
    value: int
    ok: bool
    error: str | None = None
    flag: str | None = None


@dataclass
class _PendingWrite:
    device_id: str
    slave: int
    kind: WriteKind
    address: int
    value: int
    future: Future[WriteResult] = field(default_factory=Future)


class ModbusBus:
    """One physical Modbus link (`kind` "rtu": a serial port; "tcp": host:port) shared by its devices.

    `read()` is for the thread holding the wire (`with bus.owned(): ...`); `write()` for anybody.
    `slaves` maps the device ids on this bus to their unit ids (for `write`).
    """

    def __init__(
        self,
        name: str,
        kind: Literal["rtu", "tcp"],
        *,
        port: str | None = None,
        baudrate: int = 9600,
        parity: str = "N",
        bytesize: int = 8,
        stopbits: int = 1,
        host: str | None = None,
        tcp_port: int = 502,
        timeout: float = 0.5,
        retries: int = 1,
        slaves: Mapping[str, int] | None = None,
    ):
        if kind not in ("rtu", "tcp"):
            raise ValueError(f"bus {name}: kind must be rtu or tcp, not {kind!r}")
        if kind == "rtu" and not port:
            raise ValueError(f"bus {name}: an rtu bus needs a port")
        if kind == "tcp" and not host:
            raise ValueError(f"bus {name}: a tcp bus needs a host")
        self.name = name
        self.kind = kind
        self.port = port
        self.host = host
        self.tcp_port = tcp_port
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.slaves: dict[str, int] = dict(slaves or {})
        self.stats = BusStats()
        self._transaction = 0  # numbers each `_transact` call (on TCP an answer must name one of its tries)
        self._serial_settings: dict[str, Any] = {"baudrate": baudrate, "parity": parity, "bytesize": bytesize,
                                                 "stopbits": stopbits}
        self._wire = threading.Lock()
        self._writes: deque[_PendingWrite] = deque()
        self._client: _RtuPort | _TcpLink | None = None
        self._opened_id: tuple[int, int, int] | None = None  # identity of the serial device we opened
        self._up: bool | None = None  # None until the first attempt
        self._was_up = False
        self._link_log = FlapLimiter()  # "lost" lines of a link that flaps: at most three a minute
        self.down_reason = ""  # why the link was last found unusable
        self._down_since = self._down_reminded = 0.0  # monotonic: when it went down, when that was last said
        self._users = 0
        self._closed = False

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def from_config(cls, name: str, bus: Any, slaves: Mapping[str, int] | None = None) -> ModbusBus:
        """A bus from a config bus model (duck-typed: `type`, `port`/`host`, `timeout`, `retries`, ...)."""
        kind = bus.type
        timeout = float(getattr(bus, "timeout", 0.5 if kind == "rtu" else 1.0))
        retries = int(getattr(bus, "retries", 1))
        if kind == "rtu":
            return cls(name, "rtu", port=str(bus.port), baudrate=int(bus.baudrate), parity=str(bus.parity),
                       bytesize=int(bus.bytesize), stopbits=int(bus.stopbits), timeout=timeout, retries=retries,
                       slaves=slaves)
        if kind == "tcp":
            return cls(name, "tcp", host=str(bus.host), tcp_port=int(bus.port), timeout=timeout, retries=retries,
                       slaves=slaves)
        raise ValueError(f"bus {name}: type {kind!r} is not a Modbus bus (rtu or tcp)")

    def describe(self) -> str:
        """The link as a technician names it: the serial port, or host:port."""
        return str(self.port) if self.kind == "rtu" else f"{self.host}:{self.tcp_port}"

    @property
    def busy(self) -> bool:
        """True while somebody holds the wire (a device poll or a write in progress)."""
        return self._wire.locked()

    @property
    def is_up(self) -> bool | None:
        """True when the link was usable at the last attempt, False when lost, None before the first."""
        return self._up

    def _make_client(self) -> _RtuPort | _TcpLink:
        if self.kind == "rtu":
            s = self._serial_settings
            return _RtuPort(str(self.port), baudrate=int(s["baudrate"]), parity=str(s["parity"]),
                            bytesize=int(s["bytesize"]), stopbits=int(s["stopbits"]), timeout=self.timeout,
                            stats=self.stats, bus_name=self.name)
        return _TcpLink(str(self.host), self.tcp_port, timeout=self.timeout, stats=self.stats, bus_name=self.name)

    # ------------------------------------------------------------------------------------------- link

    def _port_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(str(self.port))  # follows a symlink (a pty link, /dev/serial/by-id/...)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_rdev)

    def _close_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead port may fail in many ways
                pass
        self._opened_id = None

    def _mark_down(self, reason: str) -> None:
        self.down_reason = reason
        self._close_client()
        now = time.monotonic()
        verb = "lost" if self._was_up else "cannot open"
        if self._up is not False:
            self._down_since = self._down_reminded = now
        elif now - self._down_reminded >= STILL_FAILING_EVERY_S:  # as for a failing device: the journal's last hour
            self._down_reminded = now
            log.warning("bus %s: still cannot open %s (%s), down for %.0f min; its devices read flag B until it "
                        "returns", self.name, self.describe(), reason, (now - self._down_since) / 60)
        unlogged = self._link_log.lost(now)
        if unlogged is not None:  # a link that flaps logs at most one line a minute
            more = f"; it was lost {unlogged} more time(s) since the last such line" if unlogged else ""
            log.warning("bus %s: %s %s (%s); its devices read flag B until it returns%s", self.name, verb,
                        self.describe(), reason, more)
        self._up = False

    def _mark_up(self) -> None:
        if self._up is not True and (self._link_log.back() or not self._was_up):
            log.info("bus %s: %s %s", self.name, self.describe(), "is back" if self._was_up else "open")
        self._up = self._was_up = True

    def _open_failure_reason(self) -> str:
        if isinstance(self._client, _TcpLink):
            return self._client.open_error or "connection failed"
        try:
            fd = os.open(str(self.port), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            return open_error(exc)
        os.close(fd)
        return "open failed: busy, locked by another program, or not a serial port"

    def _ensure_link(self) -> bool:
        """Open the link if needed; False (and the bus marked down) when it cannot be used now."""
        if self._closed:
            return False
        if self.kind == "rtu":
            identity = self._port_identity()
            if identity is None:
                self._mark_down("device path missing")
                return False
            if self._client is not None and self._client.connected and identity != self._opened_id:
                self._close_client()  # the path now names another device: replugged, reopen it
        if self._client is None:
            self._client = self._make_client()
        if not self._client.connected:
            if not self._client.connect():
                self._mark_down(self._open_failure_reason())
                return False
            if self.kind == "rtu":
                self._opened_id = self._port_identity()
        self._mark_up()
        return True

    def _after_failure(self) -> None:
        """A transaction failed: on a serial bus, find out whether the port itself went away."""
        if self.kind == "rtu" and self._port_identity() is None:
            self._mark_down("device path vanished")

    # ------------------------------------------------------------------------------------ transaction

    def _transact(self, ask: _Ask, max_tries: int | None = None) -> bytes:
        """Send `ask` with our retries (at most `max_tries` tries when given); returns the data of its answer,
        checked to answer it (see `drivers.modbus_link`'s docstring), or raises a WireError. Every read and
        write goes through here."""
        last = "no answer"
        failure: type[NoAnswer] = NoAnswer  # what the last try got: nothing, garbage, or another answer
        allowed = self.retries + 1 if max_tries is None else max(1, min(max_tries, self.retries + 1))
        self._transaction += 1
        transaction = self._transaction
        tries = 0
        reopened = False
        while tries < allowed:
            if not self._ensure_link():
                raise LinkDown(f"{self.describe()} unavailable")
            assert self._client is not None  # _ensure_link made it
            self.stats.requests += 1
            try:
                fc, data = self._client.exchange(ask, transaction)
            except _LinkFailed:
                # The port or socket failed and was closed (peer closed, write error). Reopening it once is not
                # a retry: a TCP server that restarted answers the request on the fresh connection. Logged
                # at debug only: some gateways close idle connections, which would be a line per poll.
                self._close_client()
                last, failure = "connection lost", NoAnswer
                self._after_failure()
                if self._up is False:
                    raise LinkDown(f"{self.describe()} lost") from None
                if not reopened:
                    reopened = True
                    log.debug("bus %s: connection to %s dropped; reopening it", self.name, self.describe())
                    continue
                tries += 1
                continue
            except _BadFrame as exc:
                # Not an answer to this request: never decoded, the try failed (retried, then B). So does a
                # flood (more bytes than any answer, a line never silent): dropped, a TCP connection closed.
                self.stats.bad_answers += 1
                if isinstance(exc, _Flood):
                    self.stats.floods += 1
                # An RTU line that never fell silent: nothing can be heard on it, as on a silent one (its
                # devices go to one try per poll). A TCP peer's flood closed the connection: the next
                # try, on a fresh one, may be answered.
                noise = isinstance(exc, _Flood) and self.kind == "rtu"
                last, failure = str(exc), Garbled if noise else BadAnswer
                log.debug("bus %s: answer to %s refused: %s", self.name, ask, exc)
                tries += 1
                continue
            except Exception as exc:  # noqa: BLE001 - timeout, garbled frame, anything from the wire
                last = str(exc) if isinstance(exc, _NoFrame) else f"no valid answer ({type(exc).__name__})"
                failure = Garbled if isinstance(exc, _NoFrame) and exc.garbled else NoAnswer
                tries += 1
                continue
            if fc & 0x80:
                if data[0] in GATEWAY_NO_ANSWER:
                    # A Modbus TCP-to-RTU gateway says the instrument behind it did not answer: no answer
                    # (retried, then flag B), not a fault the instrument reports (flag D).
                    last, failure = f"the gateway answered {GATEWAY_NO_ANSWER[data[0]]}", NoAnswer
                    tries += 1
                    continue
                self.stats.exceptions += 1
                raise ExceptionReply(data[0])
            return data
        self.stats.no_answer += 1
        self._after_failure()
        if self._up is False:
            raise LinkDown(f"{self.describe()} lost")
        raise failure(f"{last}, after {allowed} tr{'y' if allowed == 1 else 'ies'}")

    def read(self, slave: int, table: str, address: int, count: int, *, max_tries: int | None = None) -> list[int]:
        """`count` registers (holding/input) or bits as 0/1 (coil/discrete) from `address` of `slave`, tried
        `retries + 1` times (or at most `max_tries`).

        Call while holding the wire (`owned()`). Raises LinkDown, NoAnswer or ExceptionReply."""
        ask = _Ask.read(slave, table, address, count)
        return ask.values(self._transact(ask, max_tries))

    @contextmanager
    def owned(self) -> Iterator[ModbusBus]:
        """Hold the wire for a sequence of transactions (one device poll); queued writes run first and
        right after it, so they never wait longer than one device poll."""
        with self._wire:
            self._run_writes()
            try:
                yield self
            finally:
                self._run_writes()
        self._drain_if_free()

    # ------------------------------------------------------------------------------------------ writes

    def write(self, device_id: str, kind: WriteKind, address: int, value: int | bool) -> Future[WriteResult]:
        """Queue a write of one coil (`value` true/false or 1/0) or one holding register (an int16 or
        uint16) of `device_id` on this bus; see the module docstring for when it runs. Raises ValueError
        at once for an unknown device or an impossible value; wire problems end up in the WriteResult."""
        if device_id not in self.slaves:
            raise ValueError(f"bus {self.name}: no device {device_id!r} (devices: {', '.join(sorted(self.slaves))})")
        if kind not in ("coil", "register"):
            raise ValueError(f"write kind must be 'coil' or 'register', not {kind!r}")
        if not 0 <= int(address) <= 0xFFFF:
            raise ValueError(f"address {address} is outside 0..65535")
        if kind == "coil":
            if value not in (0, 1, True, False):
                raise ValueError(f"a coil is written 0 or 1 (true/false), not {value!r}")
            raw = 1 if value else 0
        else:
            raw = int(value)
            if raw != value or not -0x8000 <= raw <= 0xFFFF:
                raise ValueError(f"a register holds an int16 or uint16, not {value!r}")
            raw &= 0xFFFF
        pending = _PendingWrite(device_id, self.slaves[device_id], kind, int(address), raw)
        if self._closed:
            pending.future.set_result(self._write_result(pending, "bus closed", FLAG_COMM))
            return pending.future
        self._writes.append(pending)
        threading.Thread(target=self._drain_if_free, name=f"modbus-write:{self.name}", daemon=True).start()
        return pending.future

    def _drain_if_free(self) -> None:
        # Whoever releases the wire calls this, and so does write(): a queued write is never stranded.
        while self._writes:
            if not self._wire.acquire(blocking=False):
                return  # the holder runs the queue when it is done
            try:
                self._run_writes()
            finally:
                self._wire.release()

    def _run_writes(self) -> None:
        while self._writes:
            try:
                pending = self._writes.popleft()
            except IndexError:
                return
            if not pending.future.set_running_or_notify_cancel():
                continue
            pending.future.set_result(self._execute_write(pending))

    def _execute_write(self, w: _PendingWrite) -> WriteResult:
        if w.kind == "coil":
            ask = _Ask(w.slave, FC_WRITE_COIL, w.address, value=COIL_ON if w.value else 0)
        else:
            ask = _Ask(w.slave, FC_WRITE_REGISTER, w.address, value=w.value)
        try:
            self._transact(ask)
        except WireError as exc:
            log.warning("device %s: write %s %d = %d failed: %s", w.device_id, w.kind, w.address, w.value, exc)
            return self._write_result(w, str(exc), exc.flag)
        except Exception as exc:  # noqa: BLE001 - a write must always resolve its future
            log.exception("device %s: write %s %d failed", w.device_id, w.kind, w.address)
            return self._write_result(w, f"{type(exc).__name__}: {exc}", FLAG_COMM)
        log.info("device %s: wrote %s %d = %d", w.device_id, w.kind, w.address, w.value)
        return self._write_result(w, None, None)

    @staticmethod
    def _write_result(w: _PendingWrite, error: str | None, flag: str | None) -> WriteResult:
        return WriteResult(w.device_id, w.kind, w.address, w.value, ok=error is None, error=error, flag=flag)

    # ------------------------------------------------------------------------------------------- close

    def attach(self) -> None:
        """A driver starts using this bus (the bus closes when its last driver closes)."""
        self._users += 1

    def detach(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    def close(self) -> None:
        """Close the link; writes still queued fail with "bus closed"."""
        with self._wire:
            self._closed = True
            self._close_client()
            while self._writes:
                w = self._writes.popleft()
                if w.future.set_running_or_notify_cancel():
                    w.future.set_result(self._write_result(w, "bus closed", FLAG_COMM))


#: Polls in a row a device was given up (no answer, or a garbled one, after all its tries) after which
#: each of its polls makes one try only, until it answers: a dead slave then costs the bus one timeout
#: per poll, not timeout x (retries + 1), and the devices after it keep their interval (DOMAIN.md,
#: DESIGN.md).
SILENT_AFTER_POLLS = 2
#: A device that keeps failing is reminded of in the log this often (the first line comes at once).
STILL_FAILING_EVERY_S = 900.0


class ModbusDriver:
    """One Modbus device on a `ModbusBus`: plans its map once, reads it each `poll`.

    `requests` overrides the plan (e.g. `planner.naive_plan(specs)` for comparisons).
    """

    def __init__(
        self,
        device_id: str,
        bus: ModbusBus,
        slave: int,
        interval: float,
        specs: Sequence[RegisterSpec],
        *,
        plan_kwargs: Mapping[str, int] | None = None,
        requests: Sequence[Request] | None = None,
    ):
        self.device_id = device_id
        self.interval = float(interval)
        self.bus = bus
        self.slave = int(slave)
        self.specs = list(specs)
        if requests is None:
            requests = plan(self.specs, **(plan_kwargs or {}))
        self.requests: list[Request] = list(requests)
        self._values = [s for s in self.specs if s.role == "value"]
        self._status = [s for s in self.specs if s.role == "status"]
        self._channels = value_channels(self.specs)
        self._problems: set[str] = set()  # kinds of problem logged since the device last answered properly
        self._given_up = 0  # polls in a row given up for no (valid) answer: see SILENT_AFTER_POLLS
        self.problem: str | None = None  # why the last poll failed (for `status`)
        self._failed_polls = 0  # polls in a row with a problem, and when the last line about them was logged
        self._failing_logged_at = 0.0
        self.last_poll_s = 0.0
        self.polls = 0
        bus.slaves.setdefault(device_id, self.slave)
        bus.attach()
        self._closed = False

    def poll(self, ts_ms: int) -> list[Reading]:
        """One reading per value channel, stamped `ts_ms`; never raises for anything from the wire."""
        start = time.monotonic()
        with self.bus.owned():
            results, problem = self._read_all()
        readings = self._readings(ts_ms, results)
        self._report(problem)
        self.polls += 1
        self.last_poll_s = time.monotonic() - start
        return readings

    def write(self, kind: WriteKind, address: int, value: int | bool) -> Future[WriteResult]:
        """`ModbusBus.write` for this device."""
        return self.bus.write(self.device_id, kind, address, value)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bus.detach()

    # ---------------------------------------------------------------------------------------- reading

    def _read_all(self) -> tuple[dict[RegisterSpec, list[int] | str], tuple[str, str] | None]:
        """Each entry's registers, or the flag of its failure; and the worst problem (kind, text)."""
        results: dict[RegisterSpec, list[int] | str] = {}
        problem: tuple[str, str] | None = None
        i = 0
        max_tries = 1 if self._given_up >= SILENT_AFTER_POLLS else None
        while i < len(self.requests):
            req = self.requests[i]
            try:
                words = self.bus.read(self.slave, req.table, req.address, req.count, max_tries=max_tries)
            except ExceptionReply as exc:
                if exc.code in (EXC_ILLEGAL_ADDRESS, EXC_ILLEGAL_VALUE) and len(req.members) > 1:
                    split = naive_plan(req.members)
                    self.requests[i : i + 1] = split
                    log.warning("device %s: slave %d refused the merged read of %s %d..%d (exception %02d); "
                                "reading its %d entries one by one from now on", self.device_id, self.slave,
                                req.table, req.address, req.end - 1, exc.code, len(split))
                    continue
                for m in req.members:
                    results[m] = FLAG_FAULT
                meaning = EXCEPTION_MEANING.get(exc.code)
                problem = problem or ("exception", f"exception {exc.code:02d} reading {req.table} "
                                                   f"{req.address}+{req.count}" + (f" ({meaning})" if meaning else ""))
                i += 1
                continue
            except LinkDown as exc:
                return dict.fromkeys(self.specs, FLAG_COMM), ("link", str(exc))
            except NoAnswer as exc:
                # Given up for this poll: every channel B, and the bus moves on (SPEC §2).
                kind = {BadAnswer: "bad answer", Garbled: "garbled answer"}.get(type(exc), "no answer")
                # Silent (or garbled, or an RTU line never silent) counts towards one try per poll; frames
                # that answer something else mean a peer that talks (a TCP flood is found, and its
                # connection closed, on a second try).
                self._given_up = 0 if isinstance(exc, BadAnswer) else self._given_up + 1
                return dict.fromkeys(self.specs, FLAG_COMM), (kind, str(exc))
            except Exception as exc:  # noqa: BLE001 - whatever else came off the wire: B, never a raise
                return dict.fromkeys(self.specs, FLAG_COMM), ("bad answer", f"{type(exc).__name__}: {exc}")
            try:
                for spec, words_of in slice_response(req, words):
                    results[spec] = words_of
            except ValueError as exc:
                for m in req.members:
                    results[m] = FLAG_COMM
                problem = problem or ("bad answer", str(exc))
            i += 1
        self._given_up = 0  # it answered (values or an exception): its retries are worth their time again
        return results, problem

    def _readings(self, ts_ms: int, results: Mapping[RegisterSpec, list[int] | str]) -> list[Reading]:
        status_pairs: list[tuple[RegisterSpec, str]] = []
        for spec in self._status:
            got = results.get(spec, FLAG_COMM)
            if isinstance(got, str):
                status_pairs.append((spec, got))
                continue
            try:
                status_pairs.append((spec, flag_from_status(got, spec)))
            except ValueError:
                status_pairs.append((spec, spec.default_flag))
        inherited = status_flags_by_channel(status_pairs, self._channels)
        readings = []
        for spec in self._values:
            got = results.get(spec, FLAG_COMM)
            if isinstance(got, str):
                readings.append(Reading(self.device_id, spec.channel, ts_ms, None, spec.unit, got))
                continue
            try:
                value, flag = evaluate(got, spec)
            except ValueError:
                value, flag = None, FLAG_COMM
            flag = combine_flags((flag, inherited.get(spec.channel, "N")))
            readings.append(Reading(self.device_id, spec.channel, ts_ms, value, spec.unit, flag))
        return readings

    def _report(self, problem: tuple[str, str] | None) -> None:
        """One log line when the device stops answering properly (with the first problem's text), one when
        it recovers. While it fails, a poll's problem is logged again only when it is of a kind (no answer,
        bad answer, exception) not logged yet since it last answered properly: the text of a bad answer
        (its bytes) or the register of an exception may differ at every poll, which is not news. So a
        device that never recovers logs one line per kind, never one per poll, and a reminder with the
        count of failed polls every STILL_FAILING_EVERY_S."""
        if problem is not None and problem[0] == "link":
            reason = f": {self.bus.down_reason}" if self.bus.down_reason else ""
            self.problem = f"bus {self.bus.name}: {problem[1]}{reason}"
            return  # the bus logs its link once, for all its devices
        if problem is None:
            self.problem = None
            if self._problems and self.polls:
                log.info("device %s (slave %d on %s): answering normally again", self.device_id, self.slave,
                         self.bus.name)
            self._problems.clear()
            self._failed_polls = 0
            return
        kind, text = problem
        what = text if text.startswith(kind) else f"{kind}: {text}"  # not "no answer: no answer, after 2 tries"
        self._failed_polls += 1
        now = time.monotonic()
        if kind in self._problems:
            # The last poll's text ("after 1 try" once tried once per poll), but a bad answer's only when
            # its kind changes: its text holds the bytes received, other at every poll (a write each).
            if kind != "bad answer" or not (self.problem or "").startswith(kind):
                self.problem = what
            if now - self._failing_logged_at >= STILL_FAILING_EVERY_S:  # a reminder: the journal's last hour shows it
                self._failing_logged_at = now
                log.warning("device %s (slave %d on %s): still failing, %d polls in a row: %s", self.device_id,
                            self.slave, self.bus.name, self._failed_polls, what)
            else:
                log.debug("device %s (slave %d on %s): still failing: %s", self.device_id, self.slave,
                          self.bus.name, what)
            return
        self._problems.add(kind)
        self._failing_logged_at = now
        self.problem = what
        log.warning("device %s (slave %d on %s): %s", self.device_id, self.slave, self.bus.name, what)


class WriteFailed(Exception):
    """A write that did not happen; `result` says why (flag B: no answer or link down, D: refused)."""

    def __init__(self, result: WriteResult):
        super().__init__(f"device {result.device_id}: write {result.kind} {result.address} = {result.value} "
                         f"failed: {result.error}")
        self.result = result


class DeviceWriter:
    """The alarm engine's `ActionWriter`: `writer(device_id, kind, address, value)` writes through the
    device's bus (queued between polls, see the module docstring), blocks until done and raises
    WriteFailed (or LookupError for a device that is not a Modbus device being polled).

    `drivers` returns the drivers currently polled (called at each write, so that pollers rebuilt by a
    config reload are picked up): e.g. `lambda: [d for p in station.pollers for d in p.drivers]`.
    """

    def __init__(self, drivers: Callable[[], Iterable[Any]], timeout: float = 60.0):
        self._drivers = drivers
        self.timeout = timeout

    def __call__(self, device_id: str, kind: str, address: int, value: int | bool) -> None:
        for driver in self._drivers():
            if getattr(driver, "device_id", None) == device_id and isinstance(driver, ModbusDriver):
                if kind not in ("coil", "register"):
                    raise ValueError(f"write kind must be 'coil' or 'register', not {kind!r}")
                result = driver.write(kind, address, value).result(self.timeout)  # type: ignore[arg-type]
                if not result.ok:
                    raise WriteFailed(result)
                return
        raise LookupError(f"device {device_id!r} is not a Modbus device being polled: cannot write to it")


def build_bus_drivers(bus_name: str, bus: Any, devices: Mapping[str, Any]) -> list[ModbusDriver]:
    """One `ModbusDriver` per device of `devices` (id -> device model), all sharing one `ModbusBus` built
    from `bus` (the config's bus model). A device's map is its profile merged with its inline registers
    (`device.register_map()`), planned with the profile's `max_gap`/`max_block` when it has one."""
    slaves = {dev_id: int(dev.slave if dev.slave is not None else 1) for dev_id, dev in devices.items()}
    shared = ModbusBus.from_config(bus_name, bus, slaves)
    drivers = []
    for dev_id, dev in devices.items():
        specs = dev.register_map()
        if not specs:
            log.error("device %s: no register map (give a profile or registers); not polled", dev_id)
            continue
        kwargs = profiles.plan_args(profiles.load(dev.profile)) if getattr(dev, "profile", None) else {}
        drivers.append(ModbusDriver(dev_id, shared, slaves[dev_id], dev.interval, specs, plan_kwargs=kwargs))
    return drivers
