"""The links of a Modbus bus (`drivers.modbus.ModbusBus` owns one): `_RtuPort`, the serial port of an RTU
bus, and `_TcpLink`, a Modbus TCP connection, both speaking the master's side of the protocol, and
`_Link`, what they share: the requests sent whose answer has not been seen yet, kept for the late window,
which of them a frame answers (`_claim`), and the wait before a request whose answer would look like an
earlier one's still due (`_settle`). `exchange(ask)` sends one request and returns its answer, or raises
`_NoFrame`, `_BadFrame` (`_Flood`) or `_LinkFailed`; `BusStats` counts what happened on the bus.

Imports `drivers.modbus_frames`, `drivers.planner` (RTU character and gap times), `drivers.serial_port`
and pyserial; nothing else from the project. Its log lines are the Modbus master's (logger
`drivers.modbus`).

A hostile or broken peer cannot make the master hold memory or the wire: every read loop is bounded in
time (it waits at most `timeout`, plus the transfer time of an answer that has begun: on TCP at most one
more `timeout`) and in bytes kept (received bytes are cut into frames as they arrive; a link never holds
more than about one largest frame: 260 bytes on TCP, 511 on RTU, `BusStats.peak_buffered`). A Modbus TCP
peer that sends what does not parse as Modbus TCP, or before a request more bytes than the answers still
outstanding could be (a peer that streams without end), fails the try and has its connection closed; the
next try opens a fresh one. An RTU line that does not fall silent for the frame gap within `timeout`
(noise, a babbling device) fails the try before the request is sent. Either way the bytes are counted and
dropped, and the device reads null/B as for a silent slave (`BusStats.floods`), within
`timeout * (retries + 1)`.

Answers. Every request goes through `ModbusBus._transact` (reads and writes alike) and every answer is checked
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
On Modbus TCP a request asked again by the next poll (the same request, another `_transact` call) is another
request: an answer whose transaction id names the poll that gave up is late, never taken for the new one (a
slave 1.6 timeouts slow with one register read N every other poll with the last poll's values), and it is not
waited for (`_Link._settle`). On RTU, or from a gateway that labels late answers with the current id, nothing
tells those two answers apart: one to the same request is taken.
Answers may also overtake each other (a caching gateway answers what it holds at once, the rest slowly), so a
request is not sent while an earlier one whose answer would look alike is still in its late window: the master
first waits for that answer, or the window's end (`_Link._settle`; only a slave that already answers late
costs this, and the retries of one poll's request are not held up).
Before each request, whatever arrived since the last answer is dropped (on RTU also waiting for the line
to be silent for 3.5 characters, the RTU frame gap, at most `timeout`). On TCP the transaction id must
agree as well. So the values of a request come only from an answer to that very request (to an earlier
try of it at most). An answer later than the late window is no longer recognised as late; it is still
refused when it cannot answer the request (other unit, function or byte count).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import serial

from drivers.modbus_frames import _Ask, _BadFrame, _OutOfStep, _take_mbap_frame, _take_rtu_frame, crc16
from drivers.planner import rtu_char_bits, rtu_gap_s
from drivers.serial_port import open_exclusive

log = logging.getLogger("drivers.modbus")  # the Modbus master's lines, all under one logger name

#: Bytes arrived on an RTU line but no valid frame: the usual causes, for the technician.
GARBLED_RTU = "garbled answer (bytes but no valid frame: check baudrate, parity and the A/B wiring)"


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


class _Flood(_BadFrame):
    """More bytes than any answer could be (a peer or a line that never stops sending): the try fails
    without waiting for the answer; a TCP connection is closed (the next try opens a fresh one)."""


class _NoFrame(Exception):
    """No answer within the timeout (nothing, or, `garbled`, nothing that makes a valid frame). Not
    TimeoutError: that one is an OSError, which means a failing port here."""

    def __init__(self, text: str, garbled: bool = False):
        super().__init__(text)
        self.garbled = garbled


class _LinkFailed(Exception):
    """The port or connection failed while in use (it has been closed); the transaction may reopen it."""


@dataclass
class _Sent:
    ask: _Ask
    short_until: float  # its late window for any slave: `2 * timeout` after the request (+ transfer)
    until: float  # its late window for a slave proven late (`_Link._proven_late`)


#: A slow failed TCP connect is tried again only after this many times what it cost: the bus spends at
#: most a fifth of its time on a peer that does not answer; a refused connect is retried at once.
CONNECT_BACKOFF = 4.0
#: ...but never more than this many seconds later (the broker's default `reconnect_max`): what a connect
#: costs includes the host name's resolution, and a name server that hangs 20 s would otherwise keep the
#: bus's devices at null/B for 80 s after the gateway is back.
CONNECT_BACKOFF_MAX_S = 30.0
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
        already answers late costs this wait; retries of one request are not held up, nor is the same
        request asked again by the next poll (see `_TcpLink._tids`); waiting for that one would cost
        every poll of a slave proven late, then dead, a whole late window."""
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

    def exchange(self, ask: _Ask, transaction: int) -> tuple[int, bytes]:  # noqa: ARG002 - RTU has no id
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
                        # ...or to the same request asked by an earlier poll: without a transaction id, an
                        # answer to it and one to this request are the same bytes (see `_TcpLink._tids`)
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
    answers still outstanding could be, closes the connection (`_OutOfStep`, `_Flood`); so does a frame
    begun within a try's timeout and still unfinished one more timeout later (a peer that sends fewer
    bytes than its MBAP length says: the bytes that would finish it are the next answer's)."""

    _RECENT_TIDS = 64
    _MUTE_TRIES = 3  # tries in a row without a byte received: the connection is reopened
    _MAX_FRAME = 260  # the largest Modbus TCP frame: the 6-byte MBAP prefix and a length of at most 254

    def __init__(self, host: str, port: int, *, timeout: float, stats: BusStats, bus_name: str):
        super().__init__(timeout, stats, bus_name)
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self.open_error = ""  # why the last connect() failed
        self._retry_at = 0.0  # monotonic: no connect attempt before (see connect())
        self._mute = 0
        self._tid = 0
        self._tids: dict[int, int] = {}  # recent MBAP transaction ids -> the `_transact` call that sent them
        # `transaction`: which `ModbusBus._transact` call sent each try (a poll's request, with its retries).
        # The same request asked again by the next poll is another transaction; on TCP an answer whose
        # transaction id names an earlier one is that one's late answer, never taken for this one's (a gateway
        # that relabels late answers uses the current id: then, as on RTU, where nothing tells a slave slower
        # than the timeout from one whose last request was lost on the line, an answer to the same request is
        # taken).
        self._buf = bytearray()  # received, not yet a complete frame (less than _MAX_FRAME bytes)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> bool:
        """Open the connection; False when it cannot be opened (`open_error` says why). A failed attempt
        that took at least half the timeout is not repeated before CONNECT_BACKOFF times what it cost
        has passed (at most CONNECT_BACKOFF_MAX_S): a peer that does not answer (powered off, cable cut)
        costs the whole timeout per attempt (a host unreachable or a name server that does not answer,
        seconds), and the devices of its bus, each polled in turn, would otherwise spend the bus's time
        on it and skip their polls."""
        if self._sock is not None:
            return True
        started = time.monotonic()
        if started < self._retry_at:
            return False
        try:
            sock = socket.create_connection((self.host, self.port), timeout=max(self.timeout, 0.1))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # sendall() keeps that timeout
        except OSError as exc:
            self.open_error = _connect_error(exc)
            ended = time.monotonic()
            if ended - started >= self.timeout / 2:  # a slow failure; one refused at once is tried again at once
                self._retry_at = ended + min(CONNECT_BACKOFF * (ended - started), CONNECT_BACKOFF_MAX_S)
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

    def exchange(self, ask: _Ask, transaction: int) -> tuple[int, bytes]:
        sock = self._sock
        if sock is None:
            raise _LinkFailed(f"{self.host}:{self.port} is not connected")
        try:
            self._settle(ask, lambda seconds: self._receive_late(sock, seconds))
            self._drop_pending(sock)
            buf = self._buf
            tid = self._next_tid()
            pdu = ask.pdu()
            self._tids[tid] = transaction
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
                    # The same request asked by an earlier poll fits as well as this one (`_TcpLink._tids`):
                    # an answer whose transaction id names that poll is its late answer, not this one's.
                    if owner.ask == ask and self._tids.get(got_tid) == transaction:
                        self._mute = 0
                        return fc, data
                    self._late_answer(owner)
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0 and buf and now < deadline + self.timeout:
                    # An answer begun within the timeout may end after it (an RTU answer gets its transfer
                    # time too): a gateway that writes the MBAP header and the PDU apart, a slave just at
                    # the timeout. Its end is awaited within the late window, before anything else is sent,
                    # so what completes it can only answer what was asked: reopening the connection and
                    # trying again would end the same way, a reading lost and a connection at every try.
                    remaining = deadline + self.timeout - now
                if remaining <= 0:
                    if buf:
                        # Part of a frame whose end did not come within that: a peer that sends fewer
                        # bytes than its MBAP length says (a gateway off by one) would have the next
                        # answer's first bytes taken for this frame's end, another request's bytes read
                        # as this request's values. The stream is out of step: start afresh.
                        log.debug("bus %s: %d bytes of an unfinished frame from %s:%d a timeout after the timeout; "
                                  "reopening the connection", self.bus_name, len(buf), self.host, self.port)
                        self.close()
                        raise _NoFrame("garbled answer", garbled=True)
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
        that keep coming for `timeout`, are a peer that sends what nobody asked for: `_Flood`. When no
        request waits for its answer any more, no byte received can be (the start of) one: a peer that
        sends more than its MBAP length says (a serial converter forwarding an RTU answer's CRC too)
        leaves bytes that would otherwise put the next answer out of step, refused at every poll."""
        buf = self._buf
        self._prune()
        budget = self._MAX_FRAME * (len(self._sent) + 2)
        limit = time.monotonic() + self.timeout
        dropped = 0
        try:
            while True:
                if not self._sent:
                    self.stats.discarded_bytes += len(buf)
                    del buf[:]
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
