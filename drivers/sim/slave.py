"""A Modbus slave for simulators and tests: PDU handling, RTU framing on a pseudo-terminal, Modbus TCP.

Strict where real slaves are strict: RTU frames with a bad CRC and frames for other unit ids are
ignored; a read or write outside what a `DataModel` defines gets exception 02; malformed PDUs get
exception 03, unknown functions 01. Faults for tests (`Fault`): no answer, an exception to every request,
an answer with a corrupted CRC, an answer that comes `delay` seconds late, and well-formed answers (valid
CRC) that do not answer the request: another function code, one register (or byte of bits) short,
another unit id. Counts requests and wire bytes per unit (what the slave saw: the measure used by the
benchmark). Plain threads, no asyncio. Imports nothing from `agent`.

Functions served: 1 read coils, 2 read discrete inputs, 3 read holding, 4 read input registers,
5 write single coil, 6 write single register, 15 write coils, 16 write registers.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import tty
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger(__name__)

Table = Literal["holding", "input", "coil", "discrete"]
READ_TABLES: dict[int, Table] = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
EXC_ILLEGAL_FUNCTION = 1
EXC_ILLEGAL_ADDRESS = 2
EXC_ILLEGAL_VALUE = 3
EXC_DEVICE_FAILURE = 4


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (init 0xFFFF, reflected polynomial 0xA001); sent low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """unit + PDU + CRC (low byte first)."""
    body = bytes([unit]) + pdu
    return body + crc16(body).to_bytes(2, "little")


class DataModel(Protocol):
    """What a unit serves: `read` returns the values (0/1 for bits) or an exception code; `write` None
    or an exception code. An optional `fault` attribute (a `Fault` or None) is honoured by `SlaveCore`."""

    def read(self, table: Table, address: int, count: int) -> list[int] | int: ...

    def write(self, table: Table, address: int, values: list[int]) -> int | None: ...


FaultKind = Literal["silent", "exception", "badcrc", "late", "wrongfc", "shortcount", "wrongunit"]
_OTHER_READ_FC = {1: 2, 2: 1, 3: 4, 4: 3}


@dataclass(frozen=True)
class Fault:
    """A unit misbehaving on purpose. `kind`: "silent" (no answer at all), "exception" (every request
    answered with exception `code`), "badcrc" (RTU answers with a corrupted CRC; on TCP: no answer),
    "late" (every answer sent `delay` seconds after its request, without holding up the line: a slave
    slower than the master's timeout), "wrongfc" (a read answered with the other table's function code:
    3 <-> 4, 1 <-> 2), "shortcount" (a read answered one register, or one byte of bits, short, byte count
    to match), "wrongunit" (answers carry unit id + 1). `relabel` with "late" on TCP: the late answer
    carries the transaction id of the latest request on its connection, as a TCP-to-RTU gateway does
    that forwards a late RTU answer to the request it is serving. `delays` with "late": the n-th request
    to the unit is answered after `delays[n % len(delays)]` seconds instead (answers then overtake each
    other, as at a caching gateway: cached registers at once, the others slowly)."""

    kind: FaultKind
    code: int = EXC_DEVICE_FAILURE
    delay: float = 0.0
    relabel: bool = False
    delays: tuple[float, ...] = ()


class RegisterBank:
    """A static `DataModel`: values set by the test. With `strict`, addresses never `set` are
    undefined (exception 02, as picky instruments do); otherwise they read 0."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.tables: dict[str, dict[int, int]] = {"holding": {}, "input": {}, "coil": {}, "discrete": {}}
        self.fault: Fault | None = None
        self.max_read: int | None = None  # longer reads are refused with exception 03 (as small PLCs do)

    def set(self, table: Table, address: int, values: Iterable[int]) -> None:
        for i, v in enumerate(values):
            self.tables[table][address + i] = int(v)

    def get(self, table: Table, address: int, count: int = 1) -> list[int]:
        t = self.tables[table]
        return [t.get(a, 0) for a in range(address, address + count)]

    def defined(self, table: Table, address: int, count: int) -> bool:
        t = self.tables[table]
        return all(a in t for a in range(address, address + count))

    def read(self, table: Table, address: int, count: int) -> list[int] | int:
        if self.max_read is not None and count > self.max_read:
            return EXC_ILLEGAL_VALUE
        if self.strict and not self.defined(table, address, count):
            return EXC_ILLEGAL_ADDRESS
        return self.get(table, address, count)

    def write(self, table: Table, address: int, values: list[int]) -> int | None:
        if table not in ("holding", "coil"):
            return EXC_ILLEGAL_FUNCTION
        if self.strict and not self.defined(table, address, len(values)):
            return EXC_ILLEGAL_ADDRESS
        self.set(table, address, values)
        return None


@dataclass
class UnitCounters:
    """What one unit saw: valid requests addressed to it, and wire bytes in and out."""

    requests: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0

    def reset(self) -> None:
        self.requests = self.rx_bytes = self.tx_bytes = 0


class SlaveCore:
    """The units on one link (RTU line or TCP endpoint) and the protocol logic, transport-free."""

    def __init__(self, units: Mapping[int, DataModel]):
        self.units: dict[int, DataModel] = dict(units)
        self.counters: dict[int, UnitCounters] = {u: UnitCounters() for u in self.units}
        self.lock = threading.Lock()  # one request at a time per link, like the real thing

    def fault_of(self, unit: int) -> Fault | None:
        return getattr(self.units.get(unit), "fault", None)

    def handle(self, unit: int, pdu: bytes) -> bytes | None:
        """The response PDU for a request PDU to `unit`, or None when the unit does not answer."""
        model = self.units.get(unit)
        if model is None or not pdu:
            return None
        fault = getattr(model, "fault", None)
        if fault is not None and fault.kind == "silent":
            return None
        fc = pdu[0]
        if fault is not None and fault.kind == "exception":
            return bytes([fc | 0x80, fault.code])
        try:
            response = _dispatch(model, pdu)
        except (struct.error, IndexError, ValueError):
            return bytes([fc | 0x80, EXC_ILLEGAL_VALUE])
        if fault is not None and response[0] in _OTHER_READ_FC:
            if fault.kind == "wrongfc":
                response = bytes([_OTHER_READ_FC[response[0]]]) + response[1:]
            elif fault.kind == "shortcount" and response[1] > 0:
                short = 1 if response[0] in (1, 2) else 2
                response = bytes([response[0], response[1] - short]) + response[2:-short]
        return response

    def answer_unit(self, unit: int) -> int:
        """The unit id an answer of `unit` carries (another one with the "wrongunit" fault)."""
        fault = self.fault_of(unit)
        return (unit + 1) & 0xFF if fault is not None and fault.kind == "wrongunit" else unit

    def answer_delay(self, unit: int) -> float:
        """How late the answer to the request just counted (`counters[unit].requests`) goes out."""
        fault = self.fault_of(unit)
        if fault is None or fault.kind != "late":
            return 0.0
        if fault.delays:
            return fault.delays[(self.counters[unit].requests - 1) % len(fault.delays)]
        return fault.delay


def _exc(fc: int, code: int) -> bytes:
    return bytes([fc | 0x80, code])


def _dispatch(model: DataModel, pdu: bytes) -> bytes:
    fc = pdu[0]
    if fc in READ_TABLES:
        address, count = struct.unpack(">HH", pdu[1:5])
        bits = fc in (1, 2)
        if len(pdu) != 5 or not 1 <= count <= (2000 if bits else 125) or address + count > 0x10000:
            return _exc(fc, EXC_ILLEGAL_VALUE if len(pdu) != 5 or count == 0 else EXC_ILLEGAL_ADDRESS)
        got = model.read(READ_TABLES[fc], address, count)
        if isinstance(got, int):
            return _exc(fc, got)
        if bits:
            data = bytearray((count + 7) // 8)
            for i, v in enumerate(got):
                if v:
                    data[i // 8] |= 1 << (i % 8)
            return bytes([fc, len(data)]) + bytes(data)
        return bytes([fc, 2 * count]) + b"".join(int(v & 0xFFFF).to_bytes(2, "big") for v in got)
    if fc in (5, 6):
        if len(pdu) != 5:
            return _exc(fc, EXC_ILLEGAL_VALUE)
        address, value = struct.unpack(">HH", pdu[1:5])
        if fc == 5:
            if value not in (0x0000, 0xFF00):
                return _exc(fc, EXC_ILLEGAL_VALUE)
            err = model.write("coil", address, [1 if value else 0])
        else:
            err = model.write("holding", address, [value])
        return _exc(fc, err) if err else bytes(pdu)
    if fc in (15, 16):
        address, count, nbytes = struct.unpack(">HHB", pdu[1:6])
        payload = pdu[6:]
        if len(payload) != nbytes or count == 0:
            return _exc(fc, EXC_ILLEGAL_VALUE)
        if fc == 15:
            if nbytes != (count + 7) // 8:
                return _exc(fc, EXC_ILLEGAL_VALUE)
            values = [(payload[i // 8] >> (i % 8)) & 1 for i in range(count)]
            err = model.write("coil", address, values)
        else:
            if nbytes != 2 * count:
                return _exc(fc, EXC_ILLEGAL_VALUE)
            values = [int.from_bytes(payload[i : i + 2], "big") for i in range(0, nbytes, 2)]
            err = model.write("holding", address, values)
        return _exc(fc, err) if err else bytes([fc]) + pdu[1:5]
    return _exc(fc, EXC_ILLEGAL_FUNCTION)


def _rtu_request_length(buf: bytes | bytearray) -> int | None:
    """Length of the RTU request frame at the start of `buf`, or None while it cannot be known yet."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (1, 2, 3, 4, 5, 6):
        return 8
    if fc in (15, 16):
        return 9 + buf[6] if len(buf) >= 7 else None
    return -1  # unknown function: the frame ends at the next silence


class RtuPtyServer:
    """Serves a `SlaveCore` with RTU framing on a pseudo-terminal whose slave end is linked at `link`.

    `start()` creates the pty pair, puts it in raw mode and points `link` (a symlink) at it; `stop()`
    closes it (the device vanishes, as an unplugged USB adapter does) and removes the link. An existing
    `link` that is a symlink (left by a crash) is replaced; anything else there is never touched.
    """

    SILENCE_S = 0.02  # a pause this long ends a frame (3.5 characters is 4 ms at 9600 baud; ptys are instant)

    def __init__(self, core: SlaveCore, link: str | Path):
        self.core = core
        self.link = Path(link)
        self.pty_name: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()  # late answers are written from timer threads
        self._generation = 0  # bumped by stop(): a late answer never goes to a closed (or reused) fd

    def start(self) -> RtuPtyServer:
        if self.link.is_symlink():
            self.link.unlink()
        elif self.link.exists():
            raise FileExistsError(f"{self.link} exists and is not a symlink: refusing to replace it")
        self.link.parent.mkdir(parents=True, exist_ok=True)
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation: bytes pass as they are
        self._master, self._slave = master, slave  # keep the slave open: the master then never reads EIO
        self.pty_name = os.ttyname(slave)
        os.symlink(self.pty_name, self.link)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"rtu-sim:{self.link.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._write_lock:
            self._generation += 1
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None
        try:
            if self.link.is_symlink() and os.readlink(self.link) == self.pty_name:
                self.link.unlink()
        except OSError:
            pass

    def _run(self) -> None:
        assert self._master is not None
        fd = self._master
        buf = bytearray()
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], self.SILENCE_S if buf else 0.1)
            except (OSError, ValueError):
                return
            if not ready:
                if buf:  # silence: whatever is buffered is a complete (or broken) frame
                    self._frame(bytes(buf), fd)
                    buf.clear()
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            buf += chunk
            while buf:
                need = _rtu_request_length(buf)
                if need is None or need == -1 or len(buf) < need:
                    break  # wait for more bytes, or for the silence that ends it
                frame = bytes(buf[:need])
                del buf[:need]
                self._frame(frame, fd)

    def _frame(self, frame: bytes, fd: int) -> None:
        if len(frame) < 4 or crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            log.debug("rtu sim: dropped a frame with a bad CRC: %s", frame.hex())
            return
        unit = frame[0]
        if unit not in self.core.units:
            return  # another slave's request (or a broadcast we do not serve)
        with self.core.lock:
            counters = self.core.counters[unit]
            counters.requests += 1
            counters.rx_bytes += len(frame)
            response = self.core.handle(unit, frame[1:-2])
            if response is None:
                return
            out = rtu_frame(self.core.answer_unit(unit), response)
            fault = self.core.fault_of(unit)
            if fault is not None and fault.kind == "badcrc":
                out = out[:-2] + bytes([out[-2] ^ 0xFF, out[-1]])
            counters.tx_bytes += len(out)
            delay = self.core.answer_delay(unit)
        if delay > 0:
            timer = threading.Timer(delay, self._send, (fd, out, self._generation))
            timer.daemon = True
            timer.start()
        else:
            self._send(fd, out, self._generation)

    def _send(self, fd: int, out: bytes, generation: int) -> None:
        with self._write_lock:
            if generation != self._generation:
                return
            try:
                os.write(fd, out)
            except OSError:
                pass


class TcpServer:
    """Serves a `SlaveCore` as Modbus TCP (MBAP framing) on `host:port` (port 0: any free port)."""

    def __init__(self, core: SlaveCore, host: str = "127.0.0.1", port: int = 0):
        self.core = core
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # late answers are sent from timer threads
        self._latest_tid: dict[socket.socket, int] = {}  # per connection, for Fault(relabel=True)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> TcpServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stop.clear()
        t = threading.Thread(target=self._accept, name=f"tcp-sim:{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    @property
    def connection_count(self) -> int:
        """Client connections currently open."""
        with self._lock:
            return len(self._conns)

    def drop_connections(self) -> None:
        """Close every client connection (a gateway rebooting); the listener stays."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        self.drop_connections()
        for t in self._threads:
            t.join(5)
        self._threads.clear()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"tcp-sim-conn:{self.port}", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 7:
                    tid, proto, length, unit = struct.unpack(">HHHB", buf[:7])
                    if proto != 0 or not 2 <= length <= 254:
                        return  # not Modbus TCP: drop the connection, as devices do
                    if len(buf) < 6 + length:
                        break
                    pdu, buf = buf[7 : 6 + length], buf[6 + length :]
                    self._latest_tid[conn] = tid
                    self._request(conn, tid, unit, pdu)
        finally:
            with self._lock:
                self._conns.discard(conn)
            self._latest_tid.pop(conn, None)
            conn.close()

    def _request(self, conn: socket.socket, tid: int, unit: int, pdu: bytes) -> None:
        if unit not in self.core.units:
            return  # like a gateway whose RS-485 slave does not answer
        with self.core.lock:
            counters = self.core.counters[unit]
            counters.requests += 1
            counters.rx_bytes += 7 + len(pdu)
            response = self.core.handle(unit, pdu)
            fault = self.core.fault_of(unit)
            if response is None or (fault is not None and fault.kind == "badcrc"):
                return
            out = struct.pack(">HHHB", tid, 0, len(response) + 1, self.core.answer_unit(unit)) + response
            counters.tx_bytes += len(out)
            delay = self.core.answer_delay(unit)
            relabel = fault is not None and fault.relabel
        if delay > 0:
            timer = threading.Timer(delay, self._send, (conn, out, relabel))
            timer.daemon = True
            timer.start()
        else:
            self._send(conn, out)

    def _send(self, conn: socket.socket, out: bytes, relabel: bool = False) -> None:
        with self._send_lock:
            if relabel:
                out = self._latest_tid.get(conn, 0).to_bytes(2, "big") + out[2:]
            try:
                conn.sendall(out)
            except OSError:
                pass
