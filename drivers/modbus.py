"""Modbus RTU and TCP: one `ModbusBus` per configured bus (owns the link), one `ModbusDriver` per device.

`build_bus_drivers(bus_name, bus, devices)` is what `agent.runtime` calls for `type: rtu` and `type: tcp`
buses. Imports `agent.model`, `agent.logutil`, the pure Modbus modules of `drivers` (registers, codec,
planner, profiles), `drivers.serial_port` and pyserial; never `agent.config`: the bus and device models
are duck-typed.

The link. A bus owns its link: the serial port (`_RtuPort`, pyserial) or the TCP connection (`_TcpLink`),
both speaking the master's side of the protocol here, and one lock, "the wire": a transaction (request
and answer, with its retries) happens only while holding it, so an RS-485 line never sees two masters'
requests at once. The bus poller thread holds the wire for a whole device poll. A request is sent at
most `retries + 1` times, each waiting at most `timeout` for the answer to begin (on RTU an answer that
has begun is then given its transfer time at the bus's baud rate), so a silent slave costs at most
`timeout * (retries + 1)`, after which the device is given up for this poll and the poller moves on; a
device given up SILENT_AFTER_POLLS polls in a row gets one try per poll until it answers (a dead slave
costs the bus one timeout per poll).
A serial port is checked (one `stat()` of its path) before every transaction: when the path vanished
(USB adapter unplugged) or now names another device (replugged) the port is closed, and it is reopened
when the path is back. A TCP connection that dropped is reopened by the next transaction (once within
it, not counted as a retry), and one that stays mute for 3 tries in a row is reopened too (a peer gone
without closing it). Each bus logs one line when its link is lost and one when it is back (a link that
flaps: at most three "lost" lines a minute, then one with the count of losses in between); each device
one line when it stops answering properly (and at most one more per other kind of failure: no answer,
bad answer, exception), a reminder with the count every STILL_FAILING_EVERY_S while it keeps failing,
and one when it recovers: never one per poll, whatever bytes its answers hold.

A hostile or broken peer cannot make the master hold memory or the wire: every read loop is bounded in
time (it waits at most `timeout`, plus on RTU the transfer time of an answer that has begun) and in bytes
kept (received bytes are cut into frames as they arrive; a link never holds more than about one largest
frame: 260 bytes on TCP, 511 on RTU, `BusStats.peak_buffered`). A Modbus TCP peer that sends what does
not parse as Modbus TCP, or before a request more bytes than the answers still outstanding could be (a
peer that streams without end), fails the try and has its connection closed; the next try opens a fresh
one. An RTU line that does not fall silent for the frame gap within `timeout` (noise, a babbling device)
fails the try before the request is sent. Either way the bytes are counted and dropped, and the device
reads null/B as for a silent slave (`BusStats.floods`), within `timeout * (retries + 1)`.

Answers. Every request goes through `_transact` (reads and writes alike) and every answer is checked
against the request it is taken for (`_Ask.mismatch`): the unit id, the function code (or the same code
+ 0x80 for a Modbus exception), the byte count for the quantity asked (a read of n registers is answered
by 2n bytes, of n bits by ceil(n/8)), the echo of a single write. An answer that does not fit is a bad
frame: never decoded as this request's values, the try fails and is retried, then the device reads
null/B like any other failure (SPEC §2). A slave slower than `timeout` answers a request after the master
gave up on it, while the master already waits for the next request, and that late answer may look
exactly like the next one's (same unit, function and byte count, other registers). So each link keeps
the requests it sent whose answer has not been seen yet, for a late window of `2 * timeout` (what real
masters such as libmodbus allow for a late answer after a timeout before they flush), and gives each
frame that arrives to the oldest of them that it answers (a slave answers in order): a frame that goes
to an earlier request is a late answer and is dropped, one that answers no request sent is a bad frame.
A slave whose answer came within that window after a request it was not for is proven late: for the
next 20 timeouts (at least 10 s) after each such answer, its requests' late window is that long too
(audit V: the answers of a slave 2.5 timeouts slow were taken for the next look-alike request's values,
flag N; it now reads B). Only a definitely late answer renews the proof: a request lost on the line
(noise) must not keep a healthy slave one answer behind (audit W), and is forgotten after `2 * timeout`.
Answers may also overtake each other (a caching gateway answers what it holds at once, the rest
slowly), so a request is not sent while an earlier one whose answer would look alike is still in its
late window: the master first waits for that answer, or the window's end (`_Link._settle`; only a
slave that already answers late costs this, and the retries of one request are not held up).
Before each request, whatever arrived since the last answer is dropped (on RTU also waiting for the line
to be silent for 3.5 characters, the RTU frame gap, at most `timeout`). On TCP the transaction id must
agree as well. So the values of a request come only from an answer to that very request (to an earlier
try of it at most). An answer later than the late window is no longer recognised as late; it is still
refused when it cannot answer the request (other unit, function or byte count).

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
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import serial

from agent.logutil import FlapLimiter
from agent.model import FLAG_COMM, FLAG_FAULT, Reading
from drivers import profiles
from drivers.modbus_codec import combine_flags, evaluate, flag_from_status, status_flags_by_channel
from drivers.planner import Request, naive_plan, plan, rtu_char_bits, rtu_gap_s, slice_response
from drivers.registers import RegisterSpec, value_channels
from drivers.serial_port import open_error, open_exclusive

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
#: Bytes arrived on an RTU line but no valid frame: the usual causes, for the technician.
GARBLED_RTU = "garbled answer (bytes but no valid frame: check baudrate, parity and the A/B wiring)"
WriteKind = Literal["coil", "register"]

_READ_FC = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
FC_WRITE_COIL = 5
FC_WRITE_REGISTER = 6
COIL_ON = 0xFF00


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
class BusStats:
    """Counters of one bus since it was built (for benchmarks, tests and diagnostics)."""

    requests: int = 0  # request frames sent, retries included
    no_answer: int = 0  # transactions given up after all tries
    exceptions: int = 0  # Modbus exception replies
    bad_answers: int = 0  # answers refused: other unit, function code, byte count or echo than asked
    late_answers: int = 0  # answers to an earlier request (a slave slower than the timeout), dropped
    discarded_bytes: int = 0  # bytes that arrived between requests (late answers, noise), dropped
    floods: int = 0  # tries failed because the peer sent more than any answer could be or the line never fell silent
    peak_buffered: int = 0  # most received bytes a link held at once (bounded: about one largest frame)


class _BadFrame(Exception):
    """A frame that is not an answer to the request it arrived for."""


class _OutOfStep(_BadFrame):
    """A Modbus TCP stream that does not parse as MBAP frames: it cannot be resynchronised."""


class _Flood(_BadFrame):
    """More bytes than any answer could be (a peer or a line that never stops sending): the try fails
    without waiting for the answer; a TCP connection is closed (the next try opens a fresh one)."""


class _NoFrame(Exception):
    """No answer within the timeout (nothing, or, `garbled`, nothing that makes a valid frame). Not
    TimeoutError: that one is an OSError, which means a failing port here."""

    def __init__(self, text: str, garbled: bool = False):
        super().__init__(text)
        self.garbled = garbled


@dataclass(frozen=True)
class _Ask:
    """One request as it goes on the wire, and what answers it (`mismatch`).

    `count` is the quantity of a read (registers or bits); `value` the field a single write sends
    (0xFF00 / 0x0000 for a coil, the register for a holding register)."""

    unit: int
    fc: int
    address: int
    count: int = 1
    value: int = 0

    @classmethod
    def read(cls, unit: int, table: str, address: int, count: int) -> _Ask:
        return cls(int(unit), _READ_FC[table], int(address), int(count))

    @property
    def is_read(self) -> bool:
        return self.fc in (1, 2, 3, 4)

    def data_bytes(self) -> int:
        """Bytes of data in a normal answer to a read: 2 per register, 1 per 8 bits."""
        return (self.count + 7) // 8 if self.fc in (1, 2) else 2 * self.count

    def pdu(self) -> bytes:
        return struct.pack(">BHH", self.fc, self.address, self.count if self.is_read else self.value)

    def answer_length(self) -> int:
        """Length of the RTU frame of a normal answer (unit, function, data, CRC)."""
        return 5 + self.data_bytes() if self.is_read else 8

    def mismatch(self, unit: int, fc: int, data: bytes) -> str | None:
        """Why the answer PDU `fc` + `data` from `unit` does not answer this request; None when it does."""
        if unit != self.unit:
            return f"an answer from unit {unit} to a request to unit {self.unit}"
        if fc == self.fc | 0x80:
            return None if len(data) == 1 and data[0] else f"a malformed exception reply ({data.hex()})"
        if fc != self.fc:
            return f"function code {fc} in the answer to a function {self.fc} request"
        if self.is_read:
            want = self.data_bytes()
            if not data or data[0] != want or len(data) != want + 1:
                got = data[0] if data else "no"
                what = "bits" if self.fc in (1, 2) else "registers"
                return f"byte count {got} in the answer to a read of {self.count} {what} ({want} expected)"
            return None
        if data != self.pdu()[1:]:
            return f"the echo {data.hex()} does not match the write {self.pdu()[1:].hex()}"
        return None

    def values(self, data: bytes) -> list[int]:
        """The registers, or the bits as 0/1, of a checked answer's data."""
        if self.fc in (1, 2):
            return [(data[1 + i // 8] >> (i % 8)) & 1 for i in range(self.count)]
        return [int.from_bytes(data[i : i + 2], "big") for i in range(1, 1 + 2 * self.count, 2)]

    @property
    def what(self) -> str:
        """The request without its unit, as a technician reads it: "holding 0+2", "write coil 3 = 65280"."""
        name = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "write coil", 6: "write register"}
        tail = f"+{self.count}" if self.is_read else f" = {self.value}"
        return f"{name.get(self.fc, f'function {self.fc}')} {self.address}{tail}"

    def __str__(self) -> str:
        return f"{self.what} of unit {self.unit}"


class _LinkFailed(Exception):
    """The port or connection failed while in use (it has been closed); the transaction may reopen it."""


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc16_table()


def crc16(data: bytes | bytearray) -> int:
    """Modbus RTU CRC-16 (init 0xFFFF, reflected polynomial 0xA001); it goes on the wire low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def _rtu_answer_length(buf: bytearray, start: int) -> int | None:
    """Length of an answer frame starting at `buf[start]` judging by its function code (None: not the start
    of an answer we know, or its byte count has not arrived yet)."""
    fc = buf[start + 1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4):
        return 5 + buf[start + 2] if start + 2 < len(buf) else None
    if fc in (5, 6, 15, 16):
        return 8
    return None


def _take_rtu_frame(buf: bytearray) -> tuple[int, int, bytes] | None:
    """The first complete, CRC-valid answer frame in `buf` as (unit, function code, data); it and every
    byte before it (noise, a broken frame) are removed from `buf`. None while there is none: a frame
    still arriving, or garbage whose supposed length has not arrived, does not hide a valid frame after it."""
    for start in range(len(buf) - 3):
        length = _rtu_answer_length(buf, start)
        if length is None or start + length > len(buf):
            continue
        end = start + length
        if crc16(buf[start : end - 2]) == int.from_bytes(buf[end - 2 : end], "little"):
            frame = bytes(buf[start:end])
            del buf[:end]
            return frame[0], frame[1], frame[2:-2]
    return None


def _take_mbap_frame(buf: bytearray) -> tuple[int, int, int, bytes] | None:
    """The first Modbus TCP frame in `buf` as (transaction id, unit, function code, data), removed from
    `buf`; None while it is incomplete. Raises _OutOfStep when the stream is not Modbus TCP: it cannot be
    resynchronised, the caller closes the connection."""
    if len(buf) < 7:
        return None
    tid, proto, length, unit = struct.unpack(">HHHB", buf[:7])
    if proto != 0 or not 2 <= length <= 254:
        raise _OutOfStep(f"not a Modbus TCP answer ({bytes(buf[:16]).hex()})")
    if len(buf) < 6 + length:
        return None
    pdu = bytes(buf[7 : 6 + length])
    del buf[: 6 + length]
    return tid, unit, pdu[0], pdu[1:]


@dataclass
class _Sent:
    ask: _Ask
    short_until: float  # its late window for any slave: `2 * timeout` after the request (+ transfer)
    until: float  # its late window for a slave proven late (`_Link._proven_late`)


LATE_WINDOW_TIMEOUTS = 20  # a slave proven late: its late answers are recognised this many timeouts...
LATE_WINDOW_MIN_S = 10.0  # ...and at least this long after their request


class _Link:
    """What the RTU and TCP links share: the requests sent whose answer has not been seen yet, kept for the
    late window, and which of them a frame answers: the oldest one it fits (a slave answers in order).
    The window is `2 * timeout`, and `late_s` for a slave proven late: one whose answer came within
    `2 * timeout` after a request it was not for, no longer than `late_s` ago. See the module docstring."""

    def __init__(self, timeout: float, stats: BusStats, bus_name: str):
        self.timeout = timeout
        self.late_s = max(LATE_WINDOW_TIMEOUTS * timeout, LATE_WINDOW_MIN_S)
        self.short_s = 2 * timeout
        self.stats = stats
        self.bus_name = bus_name
        self._sent: deque[_Sent] = deque()
        self._late_logged: set[int] = set()
        self._late_until: dict[int, float] = {}  # unit -> end of its proof of lateness

    def _proven_late(self, unit: int, now: float) -> bool:
        return self._late_until.get(unit, 0.0) > now

    def _window_end(self, entry: _Sent, now: float) -> float:
        return entry.until if self._proven_late(entry.ask.unit, now) else entry.short_until

    def _prune(self) -> None:
        """Forget the requests whose longest late window is over (also when no frame ever comes)."""
        now = time.monotonic()
        if any(e.until < now for e in self._sent):
            self._sent = deque(e for e in self._sent if e.until >= now)

    def _remember(self, ask: _Ask, transfer_s: float) -> float:
        """Note a request just sent (its answer takes `transfer_s` on the wire); returns the time its answer
        must have begun by (`timeout` from now)."""
        self._prune()
        now = time.monotonic()
        self._sent.append(_Sent(ask, now + self.short_s + transfer_s, now + self.late_s + transfer_s))
        return now + self.timeout

    def _claim(self, unit: int, fc: int, data: bytes) -> _Sent | None:
        """The oldest request still in its late window that this frame answers (it stops waiting); None
        when it answers none of them."""
        self._prune()
        now = time.monotonic()
        for entry in self._sent:
            if now <= self._window_end(entry, now) and entry.ask.mismatch(unit, fc, data) is None:
                self._sent.remove(entry)
                return entry
        return None

    def _settle(self, ask: _Ask, receive: Callable[[float], None]) -> None:
        """Before sending `ask`: while a request still waits for its answer that an answer to `ask` would
        also fit (same unit, function and byte count, other registers: a retry's first try was answered
        late), wait for that answer, at most to the end of its late window (`2 * timeout`; longer for a
        slave proven late, whose proof lapses `late_s` after its last late answer). Two look-alike requests
        outstanding at once could not be told apart if their answers overtook each other (a caching
        gateway answers what it holds at once and the rest slowly). `receive(seconds)` waits at most
        that long for bytes and hands every complete frame among them to `_claim`. Only a slave that
        already answers late costs this wait; retries of one request are not held up."""
        while True:
            self._prune()
            now = time.monotonic()
            ends = [self._window_end(e, now) for e in self._sent if e.ask != ask and e.ask.unit == ask.unit
                    and ask.is_read and e.ask.fc == ask.fc and e.ask.data_bytes() == ask.data_bytes()]
            left = max(ends, default=0.0) - now
            if left <= 0:
                return
            receive(left)

    def _late_answer(self, owner: _Sent) -> None:
        """A frame answered `owner`, not the request waiting now. Within `2 * timeout` of `owner` that
        proves the slave late (its answers to look-alike requests are told apart for `late_s` from now);
        an answer matched to an older request only because the slave is already proven late does not
        renew the proof (a request lost on the line would otherwise keep it one answer behind)."""
        now = time.monotonic()
        if now <= owner.short_until:
            self._late_until[owner.ask.unit] = now + self.late_s
        self._late_answer_logged(owner.ask)

    def _late_answer_logged(self, owner: _Ask) -> None:
        self.stats.late_answers += 1
        if owner.unit in self._late_logged:
            log.debug("bus %s: dropped a late answer to %s", self.bus_name, owner)
            return
        self._late_logged.add(owner.unit)
        log.warning("bus %s: unit %d answers later than the timeout (%g s): dropped its late answer to %s; "
                    "late answers are never taken for another request (raise the bus timeout if this slave "
                    "is just slow)", self.bus_name, owner.unit, self.timeout, owner.what)

    def _forget(self) -> None:
        self._sent.clear()

    def _note_buffered(self, size: int) -> None:
        if size > self.stats.peak_buffered:
            self.stats.peak_buffered = size


class _RtuPort(_Link):
    """The serial port of an RTU bus and the master's side of Modbus RTU on it (see the module docstring).

    `connected` / `connect()` / `close()`; `exchange(ask)` sends one request and returns (function code,
    data) of its answer, or raises `_NoFrame` (no answer in time), `_BadFrame` (a frame that answers no
    request sent) or `_LinkFailed` (the port failed; it is closed)."""

    _MAX_FRAME = 256  # the largest Modbus RTU frame: unit, a PDU of at most 253 bytes, CRC

    def __init__(self, path: str, *, baudrate: int, parity: str, bytesize: int, stopbits: int, timeout: float,
                 stats: BusStats, bus_name: str):
        super().__init__(timeout, stats, bus_name)
        self.path = path
        self.baudrate, self.parity, self.bytesize, self.stopbits = baudrate, str(parity).upper(), bytesize, stopbits
        self.char_s = rtu_char_bits(bytesize, parity, stopbits) / max(1, baudrate)
        self.silence_s = rtu_gap_s(baudrate, self.char_s)
        self._serial: serial.Serial | None = None
        self._last_rx = 0.0

    @property
    def connected(self) -> bool:
        return self._serial is not None

    def connect(self) -> bool:
        if self._serial is not None:
            return True
        try:  # reads never block (read_timeout 0): waiting is done with select()
            ser = open_exclusive(self.path, baudrate=self.baudrate, parity=self.parity, bytesize=self.bytesize,
                                 stopbits=self.stopbits, read_timeout=0, write_timeout=max(self.timeout, 0.1))
        except (OSError, ValueError, serial.SerialException):
            return False
        self._serial = ser
        self._forget()
        self._last_rx = 0.0
        return True

    def close(self) -> None:
        ser, self._serial = self._serial, None
        self._forget()
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: BLE001 - the port is gone anyway
                pass

    def exchange(self, ask: _Ask) -> tuple[int, bytes]:
        ser = self._serial
        if ser is None:
            raise _LinkFailed(f"{self.path} is not open")
        try:
            self._settle(ask, lambda seconds: self._receive_late(ser, seconds))
            self._quiet_line(ser)
            body = bytes([ask.unit]) + ask.pdu()
            ser.write(body + crc16(body).to_bytes(2, "little"))
            ser.flush()  # returns once the request is on the wire
            transfer = self.char_s * ask.answer_length()
            deadline = self._remember(ask, transfer)
            buf = bytearray()
            while True:
                while (frame := _take_rtu_frame(buf)) is not None:
                    owner = self._claim(*frame)
                    if owner is None:
                        raise _BadFrame(ask.mismatch(*frame) or "a frame that answers no request sent")
                    if owner.ask == ask:  # this request's answer (possibly to an earlier try of it)
                        return frame[1], frame[2]
                    self._late_answer(owner)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _NoFrame(GARBLED_RTU, garbled=True) if buf else _NoFrame("no answer")
                ready, _, _ = select.select([ser.fileno()], [], [], remaining)
                if ready:
                    if transfer:  # an answer has begun within the timeout: give it the time to arrive
                        deadline, transfer = deadline + transfer, 0.0
                    self._read_into(ser, buf)
        except (OSError, serial.SerialException) as exc:
            self.close()
            raise _LinkFailed(f"{self.path}: {exc}") from None

    def _read_into(self, ser: serial.Serial, buf: bytearray) -> int:
        """Read what the port holds, at most one frame's worth, into `buf` (which holds no complete frame:
        the caller took them out); returns the bytes read. A frame still to complete in `buf` began within
        its last `_MAX_FRAME - 1` bytes, so the bytes before those are dropped first: `buf` never holds
        more than two frames' worth, whatever the line sends."""
        if len(buf) >= self._MAX_FRAME:
            del buf[: len(buf) - (self._MAX_FRAME - 1)]
        data = ser.read(min(max(1, ser.in_waiting), self._MAX_FRAME))
        if data:
            self._last_rx = time.monotonic()
            buf += data
            self._note_buffered(len(buf))
        return len(data)

    def _receive_late(self, ser: serial.Serial, seconds: float) -> None:
        """Wait at most `seconds` for an answer still due (`_settle`), then read until the line falls
        silent (at most one frame's transfer time); a frame among the bytes retires its request."""
        if not select.select([ser.fileno()], [], [], seconds)[0]:
            return
        frames = bytearray()
        deadline = time.monotonic() + self.char_s * self._MAX_FRAME + self.silence_s
        while True:
            self._read_into(ser, frames)
            while (frame := _take_rtu_frame(frames)) is not None:
                owner = self._claim(*frame)
                if owner is not None:
                    self._late_answer(owner)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ser.fileno()], [], [], min(left, max(self.silence_s, 0.002)))[0]:
                return

    def _quiet_line(self, ser: serial.Serial) -> None:
        """Before a request: drop whatever arrived since the last answer (late answers, noise; a frame
        among it still retires the request it answers) and wait until the line has been silent for
        the frame gap. A line that does not fall silent within `timeout` (noise, a babbling device) fails
        the try with `_Flood` before the request is sent: no answer could be heard on it."""
        pending = bytearray()
        dropped = 0
        head = bytearray()  # the first bytes dropped, for the debug log
        limit = time.monotonic() + self.timeout
        try:
            while True:
                now = time.monotonic()
                if ser.in_waiting and now < limit:
                    got = self._read_into(ser, pending)
                    dropped += got
                    if len(head) < 64:
                        head += pending[len(pending) - got :][: 64 - len(head)]
                    while (frame := _take_rtu_frame(pending)) is not None:
                        owner = self._claim(*frame)
                        if owner is not None:
                            self._late_answer(owner)
                    continue
                gap_left = self._last_rx + self.silence_s - now
                if gap_left <= 0 and not ser.in_waiting:
                    return
                if now >= limit:
                    raise _Flood(f"noise on the line: it did not fall silent for the frame gap within the "
                                 f"timeout ({self.timeout:g} s; {dropped} bytes dropped)")
                select.select([ser.fileno()], [], [], min(max(gap_left, 0.0), limit - now))
        finally:
            if dropped:
                self.stats.discarded_bytes += dropped
                log.debug("bus %s: dropped %d bytes that arrived between requests: %s", self.bus_name, dropped,
                          head.hex())


def _connect_error(exc: OSError) -> str:
    """Why a TCP connection could not be opened, as a technician reads it: refused (nothing listens
    on that port), timed out (wrong address, the gateway off), the name not resolved, no route."""
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return exc.strerror or type(exc).__name__


class _TcpLink(_Link):
    """A Modbus TCP connection and the master's side of the protocol on it; same interface as `_RtuPort`.

    Each try gets its own transaction id. An answer is taken for a request only when its transaction id
    names a try of that request and the oldest request it answers (by content, see `_Link`) is that
    request too: a gateway that answers late, or labels a late answer with the current transaction id
    (some TCP-to-RTU gateways and simple servers do), is caught either way.

    Received bytes are cut into frames as they arrive, and never more is read than completes the frame in
    progress, so the receive buffer (kept across requests: the stream stays in step) holds less than one
    largest frame. What does not parse as Modbus TCP, or more bytes waiting before a request than the
    answers still outstanding could be, closes the connection (`_OutOfStep`, `_Flood`)."""

    _RECENT_TIDS = 64
    _MUTE_TRIES = 3  # tries in a row without a byte received: the connection is reopened
    _MAX_FRAME = 260  # the largest Modbus TCP frame: the 6-byte MBAP prefix and a length of at most 254

    def __init__(self, host: str, port: int, *, timeout: float, stats: BusStats, bus_name: str):
        super().__init__(timeout, stats, bus_name)
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self.open_error = ""  # why the last connect() failed
        self._mute = 0
        self._tid = 0
        self._tids: dict[int, _Ask] = {}  # recent transaction ids -> what they asked
        self._buf = bytearray()  # received, not yet a complete frame (less than _MAX_FRAME bytes)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> bool:
        if self._sock is not None:
            return True
        try:
            sock = socket.create_connection((self.host, self.port), timeout=max(self.timeout, 0.1))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # sendall() keeps that timeout
        except OSError as exc:
            self.open_error = _connect_error(exc)
            return False
        self.open_error = ""
        self._sock = sock
        self._forget()
        self._tids.clear()
        self._buf = bytearray()
        self._mute = 0
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._forget()
        self._buf = bytearray()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _next_tid(self) -> int:
        self._tid = self._tid % 0xFFFF + 1
        return self._tid

    def exchange(self, ask: _Ask) -> tuple[int, bytes]:
        sock = self._sock
        if sock is None:
            raise _LinkFailed(f"{self.host}:{self.port} is not connected")
        try:
            self._settle(ask, lambda seconds: self._receive_late(sock, seconds))
            self._drop_pending(sock)
            buf = self._buf
            tid = self._next_tid()
            pdu = ask.pdu()
            self._tids[tid] = ask
            while len(self._tids) > self._RECENT_TIDS:
                del self._tids[next(iter(self._tids))]
            sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, ask.unit) + pdu)
            deadline = self._remember(ask, 0.0)
            received = False
            while True:
                while (frame := _take_mbap_frame(buf)) is not None:
                    got_tid, unit, fc, data = frame
                    owner = self._claim(unit, fc, data)
                    if owner is None:
                        raise _BadFrame(ask.mismatch(unit, fc, data) or "a frame that answers no request sent")
                    if owner.ask == ask and self._tids.get(got_tid) == ask:
                        self._mute = 0
                        return fc, data
                    self._late_answer(owner)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._mute = 0 if received else self._mute + 1
                    if self._mute >= self._MUTE_TRIES:
                        # A peer that vanished without closing (cable, 4G) looks like this: start afresh.
                        log.debug("bus %s: no byte from %s:%d for %d tries; reopening the connection",
                                  self.bus_name, self.host, self.port, self._mute)
                        self.close()
                    raise _NoFrame("garbled answer", garbled=True) if buf else _NoFrame("no answer")
                ready, _, _ = select.select([sock], [], [], remaining)
                if ready:
                    self._receive(sock)
                    received = True
        except (_OutOfStep, _Flood):
            self.close()  # the next try starts on a fresh connection, in step
            raise
        except (OSError, _LinkFailed) as exc:
            self.close()
            raise _LinkFailed(f"{self.host}:{self.port}: {exc}") from None

    def _receive(self, sock: socket.socket) -> int:
        """Read at most what completes the frame in progress into `_buf` (the caller has taken every
        complete frame out of it, so it holds less than `_MAX_FRAME` bytes); returns the bytes read."""
        chunk = sock.recv(max(1, self._MAX_FRAME - len(self._buf)))
        if not chunk:
            raise _LinkFailed("connection closed by the peer")
        self._buf += chunk
        self._note_buffered(len(self._buf))
        return len(chunk)

    def _receive_late(self, sock: socket.socket, seconds: float) -> None:
        """Wait at most `seconds` for bytes (`_settle`); the frames among them retire the requests they
        answer, as late answers."""
        if select.select([sock], [], [], seconds)[0]:
            self._receive(sock)
            while (frame := _take_mbap_frame(self._buf)) is not None:
                owner = self._claim(*frame[1:])
                if owner is not None:
                    self._late_answer(owner)

    def _drop_pending(self, sock: socket.socket) -> None:
        """Before a request: whatever arrived since the last answer is late (each frame retires the request
        it answers) and is dropped; a frame still arriving stays in `_buf` (its end comes later). A
        connection the peer closed is noticed here. The late answers still possible are those of the
        requests in their late window: more bytes than those could be (with a frame of slack), or bytes
        that keep coming for `timeout`, are a peer that sends what nobody asked for: `_Flood`."""
        buf = self._buf
        self._prune()
        budget = self._MAX_FRAME * (len(self._sent) + 2)
        limit = time.monotonic() + self.timeout
        dropped = 0
        try:
            while True:
                while (frame := _take_mbap_frame(buf)) is not None:
                    owner = self._claim(*frame[1:])
                    if owner is not None:
                        self._late_answer(owner)
                if not select.select([sock], [], [], 0)[0]:
                    return
                if dropped >= budget or time.monotonic() >= limit:
                    raise _Flood(f"the peer sends more than any answer could be ({dropped} bytes nobody asked "
                                 f"for before the request); connection closed")
                dropped += self._receive(sock)
        finally:
            self.stats.discarded_bytes += dropped


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
        unlogged = self._link_log.lost(time.monotonic())
        if unlogged is not None:  # a link that flaps logs at most one line a minute
            verb = "lost" if self._was_up else "cannot open"
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
        checked to answer it (see the module docstring), or raises a WireError. Every read and write goes
        through here."""
        last = "no answer"
        failure: type[NoAnswer] = NoAnswer  # what the last try got: nothing, garbage, or another answer
        allowed = self.retries + 1 if max_tries is None else max(1, min(max_tries, self.retries + 1))
        tries = 0
        reopened = False
        while tries < allowed:
            if not self._ensure_link():
                raise LinkDown(f"{self.describe()} unavailable")
            assert self._client is not None  # _ensure_link made it
            self.stats.requests += 1
            try:
                fc, data = self._client.exchange(ask)
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
                last, failure = str(exc), BadAnswer
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
                # Silent (or garbled) counts towards one try per poll; frames that answer something else
                # mean a peer that talks (a flood is found, and its connection closed, on a second try).
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
