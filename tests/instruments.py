"""Independent instruments for acceptance tests, written from SPEC.md §2 and DOMAIN.md alone.

Nothing here imports the project (`agent`, `drivers`) or pymodbus: the frames, CRCs, checksums and the
register encodings of every `type` and `order` are this file's own code (HJ 212's CRC is the test
platform's, `hj212_platform.crc212`), from the protocol documents, so that a bug shared by the agent
and its own simulators cannot hide here.

- `ModbusTcpServer`: a Modbus TCP server (MBAP, functions 01 02 03 04 05 06 15 16) on a loopback port.
- `ModbusRtuSlave`: one or more Modbus RTU slaves on one pseudo-terminal (several units on one bus),
  CRC-16/Modbus computed here.
- `Unit`: one instrument's four tables and its misbehaviour (`mode`): `normal`, `silent`,
  `exception` (code `exception_code`), `badcrc`, `short`, `other_unit`, `trailing`, `dribble` (the
  answer in pieces), `split` and `leading` (RTU: two chunks 30 ms apart; a 00 byte before the
  answer), `close_after` (TCP: the connection closed after each answer), and `delay`
  seconds before each answer. Every request is logged with its time (`Unit.requests`). Each unit is
  its own instrument: while one takes its `delay`, the servers hear and answer the others' requests
  (`_Later`); a unit answers its own requests in order.
- `put_value`: writes a value of any SPEC §2 type in any order into a table.
- `pms5003_frame`, `sds011_frame`, `hj212_packet`: serial frames with their own checksums, and
  `SerialStreamer`, which writes bytes into a pty in pieces chosen by the test; `PassivePms5003`, a
  PMS5003 in passive mode answering the agent's read commands.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

from hj212_platform import crc212  # HJ 212's CRC: the test platform's, from DOMAIN.md, not the project's

# ------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------


def crc16_modbus(data: bytes) -> int:
    """CRC-16/Modbus: init 0xFFFF, reflected polynomial 0xA001, `crc ^= byte` then 8 shifts."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    """An RTU frame with its CRC appended, low byte first."""
    crc = crc16_modbus(frame)
    return frame + bytes([crc & 0xFF, crc >> 8])


# ------------------------------------------------------------------------------------------------
# Register encodings (SPEC §2)
# ------------------------------------------------------------------------------------------------

_PACK = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "int64": ">q", "uint64": ">Q",
         "float32": ">f", "float64": ">d"}


def registers_for(value, type_: str, order: str = "ABCD") -> list[int]:
    """The 16-bit registers (lowest address first) that carry `value` as SPEC §2 describes:
    ABCD big-endian; CDAB words reversed; BADC bytes swapped inside each word; DCBA fully
    little-endian (words reversed and bytes swapped)."""
    big = struct.pack(_PACK[type_], value)  # bytes A B C D (E F G H), most significant first
    words = [big[i:i + 2] for i in range(0, len(big), 2)]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


@dataclass
class Unit:
    """One Modbus instrument: its tables and how it misbehaves."""

    unit_id: int
    holding: dict[int, int] = field(default_factory=dict)
    input: dict[int, int] = field(default_factory=dict)
    coil: dict[int, bool] = field(default_factory=dict)
    discrete: dict[int, bool] = field(default_factory=dict)
    mode: str = "normal"
    exception_code: int = 4
    delay: float = 0.0
    split_gap: float = 0.0  # mode `late_split` (Modbus TCP): seconds between the MBAP header and the rest
    requests: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, function, address, count)
    writes: list[tuple[int, int, object]] = field(default_factory=list)  # (function, address, value)

    def put(self, table: str, address: int, value, type_: str = "uint16", order: str = "ABCD") -> None:
        """Store `value` of `type_` at `address` of `table` (bool: one coil/discrete bit)."""
        target = getattr(self, table)
        if table in ("coil", "discrete"):
            target[address] = bool(value)
            return
        for i, word in enumerate(registers_for(value, type_, order)):
            target[address + i] = word

    def answer(self, pdu: bytes) -> bytes | None:
        """The response PDU for request `pdu` (None: not answered at all)."""
        function = pdu[0]
        address, count = struct.unpack(">HH", pdu[1:5]) if len(pdu) >= 5 else (0, 0)
        self.requests.append((time.monotonic(), function, address, count))
        if self.mode == "silent":
            return None
        if self.mode == "exception":
            return bytes([function | 0x80, self.exception_code])
        if function in (1, 2):
            bits = self.coil if function == 1 else self.discrete
            if not 1 <= count <= 2000 or any(a not in bits for a in range(address, address + count)):
                return bytes([function | 0x80, 2])
            packed = bytearray((count + 7) // 8)
            for i in range(count):
                if bits[address + i]:
                    packed[i // 8] |= 1 << (i % 8)
            return bytes([function, len(packed)]) + bytes(packed)
        if function in (3, 4):
            regs = self.holding if function == 3 else self.input
            if not 1 <= count <= 125 or any(a not in regs for a in range(address, address + count)):
                return bytes([function | 0x80, 2])
            body = b"".join(regs[a].to_bytes(2, "big") for a in range(address, address + count))
            return bytes([function, len(body)]) + body
        if function == 5:
            self.coil[address] = count == 0xFF00
            self.writes.append((5, address, count == 0xFF00))
            return pdu[:5]
        if function == 6:
            self.holding[address] = count
            self.writes.append((6, address, count))
            return pdu[:5]
        if function == 16:
            values = [int.from_bytes(pdu[6 + 2 * i:8 + 2 * i], "big") for i in range(count)]
            for i, v in enumerate(values):
                self.holding[address + i] = v
            self.writes.append((16, address, values))
            return pdu[:5]
        if function == 15:
            for i in range(count):
                self.coil[address + i] = bool(pdu[6 + i // 8] >> (i % 8) & 1)
            self.writes.append((15, address, [self.coil[address + i] for i in range(count)]))
            return pdu[:5]
        return bytes([function | 0x80, 1])

    def reads(self) -> list[float]:
        """Times of the read requests this unit received."""
        return [t for t, f, _, _ in self.requests if f in (1, 2, 3, 4)]


class _Later:
    """The answers of units with a `delay`, each sent by a thread of its own `delay` after its request
    arrived: each unit is its own instrument, so one slave's thinking time does not keep the server (or
    the line) from hearing and answering the others' requests, as on a real bus or a gateway that
    forwards requests concurrently. A unit answers its own requests in order (each waits for the one
    before). The threads end at once when `stop` is set."""

    def __init__(self, stop: threading.Event):
        self._stop = stop
        self._last: dict[int, threading.Thread] = {}  # unit id -> the thread of its latest answer

    def send(self, unit: Unit, write) -> None:
        """Call `write()` `unit.delay` seconds from now, after the unit's earlier answers."""
        at = time.monotonic() + unit.delay
        before = self._last.get(unit.unit_id)

        def run() -> None:
            if before is not None:
                before.join()
            if not self._stop.wait(max(0.0, at - time.monotonic())):
                write()

        t = threading.Thread(target=run, daemon=True, name=f"indep-unit{unit.unit_id}")
        self._last[unit.unit_id] = t
        t.start()


# ------------------------------------------------------------------------------------------------
# Modbus TCP
# ------------------------------------------------------------------------------------------------


class ModbusTcpServer:
    """A Modbus TCP server on 127.0.0.1: MBAP header (transaction, protocol 0, length, unit) + PDU."""

    def __init__(self, units: list[Unit]):
        self.units = {u.unit_id: u for u in units}
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted so far

    def start(self) -> ModbusTcpServer:
        t = threading.Thread(target=self._accept, daemon=True, name="indep-tcp")
        t.start()
        self._threads.append(t)
        return self

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        """Read the requests of one connection; each is answered at once, or (a unit with a `delay`) by a
        thread of its own `delay` after it arrived (`_Later`), while the next requests are read."""
        send_lock = threading.Lock()  # one answer's bytes at a time on the connection
        later = _Later(self._stop)
        with conn:
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    head = self._recv_exact(conn, 7)
                    if head is None:
                        return
                    tid, proto, length, unit_id = struct.unpack(">HHHB", head)
                    pdu = self._recv_exact(conn, length - 1)
                    if pdu is None:
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return
                unit = self.units.get(unit_id)
                if unit is None:
                    continue  # nobody there: no answer
                response = unit.answer(pdu)
                if response is None:
                    continue
                frame = self._frame(unit, tid, proto, unit_id, response)
                if unit.delay:
                    later.send(unit, lambda u=unit, f=frame: self._send(conn, send_lock, u, f))
                elif not self._send(conn, send_lock, unit, frame):
                    return

    @staticmethod
    def _frame(unit: Unit, tid: int, proto: int, unit_id: int, response: bytes) -> bytes:
        """The answer's bytes as `unit` (mis)behaves: another unit's id, one byte short, trailing bytes."""
        reply_unit = (unit_id % 247) + 1 if unit.mode == "other_unit" else unit_id
        body = bytes([reply_unit]) + response
        frame = struct.pack(">HHH", tid, proto, len(body)) + body
        if unit.mode == "short":
            frame = frame[:-1]
        elif unit.mode == "trailing":
            frame += b"\x00\x17"
        return frame

    def _send(self, conn: socket.socket, lock: threading.Lock, unit: Unit, frame: bytes) -> bool:
        """Write `frame` as `unit` does (in pieces for `dribble` and `late_split`); False when the connection
        is over (failed, or closed after the answer by a `close_after` gateway)."""
        with lock:
            try:
                if unit.mode == "dribble":  # the MBAP header and the PDU in two segments
                    conn.sendall(frame[:7])
                    time.sleep(0.05)
                    conn.sendall(frame[7:])
                elif unit.mode == "late_split":  # the header, then the rest `split_gap` s later
                    conn.sendall(frame[:7])
                    time.sleep(unit.split_gap)
                    conn.sendall(frame[7:])
                else:
                    conn.sendall(frame)
                if unit.mode == "close_after":  # a gateway that closes the connection after each answer
                    conn.shutdown(socket.SHUT_RDWR)  # (from a delayed answer's thread too: the reads end)
                    return False
            except OSError:
                return False
        return True

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(2)


# ------------------------------------------------------------------------------------------------
# Modbus RTU on a pseudo-terminal
# ------------------------------------------------------------------------------------------------


def _rtu_request_length(buf: bytes) -> int | None:
    """Length of the request frame at the start of `buf` (None: not enough bytes to know)."""
    if len(buf) < 2:
        return None
    function = buf[1]
    if function in (15, 16):
        return 9 + buf[6] if len(buf) >= 7 else None
    return 8


class _LinkedPty:
    """A pseudo-terminal whose slave end is linked at `link` (the `port` of the agent's configuration),
    served by a thread of the subclass (`_run`) until `close()`."""

    def __init__(self, link: os.PathLike | str, thread_name: str):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = str(link)
        if os.path.lexists(self.path):
            os.unlink(self.path)
        os.symlink(os.ttyname(self.slave), self.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=thread_name)

    def _run(self) -> None:
        raise NotImplementedError

    def _chunks(self) -> Iterator[bytes]:
        """What the agent writes on the line, as it comes, until `close()` (a port the agent closed reads
        nothing: the slave end stays open here)."""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                yield os.read(self.master, 512)
            except OSError:
                time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if os.path.islink(self.path):
            os.unlink(self.path)


class ModbusRtuSlave(_LinkedPty):
    """Several Modbus RTU units on one pseudo-terminal; `path` (a symlink to the pty's slave end) is
    the bus `port` of the agent's configuration. Answers frames whose CRC is right and whose unit is
    served; other bytes are skipped one at a time (resynchronisation)."""

    def __init__(self, units: list[Unit], link: os.PathLike | str):
        super().__init__(link, "indep-rtu")
        self.units = {u.unit_id: u for u in units}
        self.crc_errors = 0
        self._write_lock = threading.Lock()  # one answer's bytes at a time on the line
        self._later = _Later(self._stop)

    def start(self) -> ModbusRtuSlave:
        self._thread.start()
        return self

    def _run(self) -> None:
        buf = b""
        for chunk in self._chunks():
            buf += chunk
            while True:
                n = _rtu_request_length(buf)
                if n is None or len(buf) < n:
                    break
                frame = buf[:n]
                if crc16_modbus(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                    self.crc_errors += 1
                    buf = buf[1:]
                    continue
                buf = buf[n:]
                self._answer(frame[0], frame[1:-2])

    def _answer(self, unit_id: int, pdu: bytes) -> None:
        unit = self.units.get(unit_id)
        if unit is None:
            return
        response = unit.answer(pdu)
        if response is None:
            return
        reply_unit = (unit_id % 247) + 1 if unit.mode == "other_unit" else unit_id
        frame = with_crc(bytes([reply_unit]) + response)
        if unit.mode == "badcrc":
            frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
        elif unit.mode == "short":
            frame = frame[:-3] + with_crc(frame[:-3])[-2:]  # one data byte less, CRC made to match
        elif unit.mode == "trailing":
            frame += b"\x00\x17\x42"
        if unit.mode == "leading":  # a byte as the RS-485 transceiver turns round, before the answer
            frame = b"\x00" + frame
        if unit.delay:  # its own thinking time: the other slaves on the line go on hearing their requests
            self._later.send(unit, lambda: self._write(unit, frame))
        else:
            self._write(unit, frame)

    def _write(self, unit: Unit, frame: bytes) -> None:
        """Put `frame` on the line as `unit` does (in pieces for `split` and `dribble`); never after
        `close()`, whose file descriptor number may already name another file."""
        with self._write_lock:
            if self._stop.is_set():
                return
            if unit.mode == "split":  # two chunks 30 ms apart (a USB adapter's latency timer)
                os.write(self.master, frame[:3])
                time.sleep(0.03)
                os.write(self.master, frame[3:])
                return
            if unit.mode == "dribble":  # byte by byte, a few ms apart (a USB adapter's chunks)
                for b in frame:
                    os.write(self.master, bytes([b]))
                    time.sleep(0.003)
                return
            os.write(self.master, frame)

    def close(self) -> None:
        self._stop.set()
        with self._write_lock:  # a delayed answer being written ends before the descriptors close
            pass
        super().close()


# ------------------------------------------------------------------------------------------------
# Serial streaming sensors
# ------------------------------------------------------------------------------------------------


def pms5003_frame(words: list[int], *, corrupt: bool = False) -> bytes:
    """PMS5003: 42 4D, length 0x001C, 13 big-endian u16, checksum = u16 sum of bytes 0..29."""
    assert len(words) == 13
    body = b"\x42\x4d" + (28).to_bytes(2, "big") + b"".join(w.to_bytes(2, "big") for w in words)
    check = sum(body) & 0xFFFF
    if corrupt:
        check ^= 0x0101
    return body + check.to_bytes(2, "big")


def sds011_frame(pm25_tenths: int, pm10_tenths: int, device_id: int = 0xA1B2, *, corrupt: bool = False) -> bytes:
    """SDS011: AA C0 p25L p25H p10L p10H id1 id2 cs AB; cs = sum of bytes 2..7 mod 256."""
    data = pm25_tenths.to_bytes(2, "little") + pm10_tenths.to_bytes(2, "little") + device_id.to_bytes(2, "big")
    cs = sum(data) & 0xFF
    if corrupt:
        cs ^= 0x01
    return b"\xaa\xc0" + data + bytes([cs]) + b"\xab"


def hj212_packet(segment: str, *, corrupt: bool = False) -> bytes:
    """`##` + 4-digit length + data segment + 4 hex CRC + CRLF (DOMAIN.md)."""
    data = segment.encode("ascii")
    crc = crc212(data) ^ (0x0001 if corrupt else 0)
    return b"##" + f"{len(data):04d}".encode() + data + f"{crc:04X}".encode() + b"\r\n"


class PassivePms5003(_LinkedPty):
    """A PMS5003 as its datasheet describes it, on a pty linked at `link`: it streams nothing once the
    passive-mode command `42 4D E1 00 00 ..` came (answered `42 4D 00 04 E1 00 cs`), and answers each
    read command `42 4D E2 ..` with one data frame whose words all hold the count of reads answered
    (1, 2, ...). The answers numbered in `corrupt` go out with a bad checksum."""

    def __init__(self, link: os.PathLike | str, corrupt: set[int] | None = None):
        super().__init__(link, "indep-pms5003")
        self.corrupt = set(corrupt or ())
        self.passive = False
        self.answered = 0
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        for chunk in self._chunks():
            buf += chunk
            while (start := buf.find(b"\x42\x4d")) >= 0 and len(buf) - start >= 7:
                command, data = buf[start + 2], buf[start + 4]
                buf = buf[start + 7:]
                if command == 0xE1:
                    self.passive = data == 0
                    body = bytes([0x42, 0x4D, 0x00, 0x04, 0xE1, data])
                    os.write(self.master, body + (sum(body) & 0xFFFF).to_bytes(2, "big"))
                elif command == 0xE2 and self.passive:
                    self.answered += 1
                    os.write(self.master, pms5003_frame([self.answered] * 13, corrupt=self.answered in self.corrupt))


class SerialStreamer(_LinkedPty):
    """A pty whose slave end is linked at `link`; the test writes bytes into it (`send`), and what the
    agent writes to the sensor is kept in `received`."""

    def __init__(self, link: os.PathLike | str):
        super().__init__(link, "indep-serial")
        self.received = b""
        self._thread.start()

    def _run(self) -> None:
        for chunk in self._chunks():
            self.received += chunk

    def send(self, data: bytes) -> None:
        os.write(self.master, data)
