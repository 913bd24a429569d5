"""The pure frame layer of the self-streaming serial sensors (Plantower PMS5003, Nova SDS011).

Decoders, encoders (for tests and simulators), command frames, incremental `FrameReader`s that find
frames in a noisy byte stream, and `LatestInInterval` (SPEC §2: the latest valid frame of the
interval, or nothing, which the driver turns into value null with flag B). No I/O, no logging: the
readers count what they reject and the driver reports it. Imports only the standard library.

Channels (SPEC: HJ 212 codes where one exists, otherwise `[A-Za-z0-9_]+`):

- `pm1_cf1`, `pm25_cf1`, `pm10_cf1` (words 1-3): PM1.0 / PM2.5 / PM10 at CF=1, ug/m3;
- `a34005`, `a34004`, `a34002` (words 4-6): PM1.0 / PM2.5 / PM10, atmospheric environment, ug/m3;
- `n0_3`, `n0_5`, `n1_0`, `n2_5`, `n5_0`, `n10` (words 7-12): particles of diameter above
  0.3 / 0.5 / 1.0 / 2.5 / 5.0 / 10 um in 0.1 L of air, unit `count/0.1L`.

Word 13 (reserved; version and error code on some firmware) is not a channel. SDS011 frames give
`a34004` (PM2.5) and `a34002` (PM10) in ug/m3 with a resolution of 0.1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import ClassVar, TypeAlias

Frame: TypeAlias = dict[str, float]
"""A decoded frame's values: channel name -> value (see the list in the module docstring)."""

UNIT_MASS = "ug/m3"
UNIT_COUNT = "count/0.1L"


class FrameError(ValueError):
    """A byte string that is not a valid frame. `reason` is one of "size", "header", "length",
    "tail", "checksum"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Plantower PMS5003
# --------------------------------------------------------------------------------------------------

PMS5003_HEADER = b"\x42\x4d"
PMS5003_FRAME_SIZE = 32
PMS5003_LENGTH = 0x001C  # bytes after the length field: 13 words + checksum
PMS5003_REPLY_SIZE = 8  # answer to a mode/sleep command: 42 4D 00 04 CMD DATA CSH CSL
PMS5003_REPLY_LENGTH = 0x0004

# Channels in the order of the frame's first 12 words.
PMS5003_CHANNELS: tuple[str, ...] = (
    "pm1_cf1",
    "pm25_cf1",
    "pm10_cf1",
    "a34005",
    "a34004",
    "a34002",
    "n0_3",
    "n0_5",
    "n1_0",
    "n2_5",
    "n5_0",
    "n10",
)
PMS5003_UNITS: dict[str, str] = dict.fromkeys(PMS5003_CHANNELS[:6], UNIT_MASS)
PMS5003_UNITS.update(dict.fromkeys(PMS5003_CHANNELS[6:], UNIT_COUNT))
_PMS5003_FIELDS = tuple((ch, 4 + 2 * k) for k, ch in enumerate(PMS5003_CHANNELS))  # (channel, offset)

# Command bytes (the sensor's "CMD" field) and ready-made command frames.
PMS5003_CMD_MODE = 0xE1  # data 0: passive (answers read commands), 1: active (streams frames)
PMS5003_CMD_READ = 0xE2  # in passive mode: send one data frame
PMS5003_CMD_SLEEP = 0xE4  # data 0: sleep (fan off), 1: wake up


def pms5003_command(cmd: int, data: int = 0) -> bytes:
    """A 7-byte command frame `42 4D CMD DATAH DATAL CSH CSL`, checksum = u16 sum of the first 5."""
    if not 0 <= cmd <= 0xFF or not 0 <= data <= 0xFFFF:
        raise ValueError(f"PMS5003 command out of range: cmd={cmd!r} data={data!r}")
    body = PMS5003_HEADER + bytes((cmd, data >> 8, data & 0xFF))
    return body + (sum(body) & 0xFFFF).to_bytes(2, "big")


PMS5003_PASSIVE_MODE = pms5003_command(PMS5003_CMD_MODE, 0)  # 42 4D E1 00 00 01 70
PMS5003_ACTIVE_MODE = pms5003_command(PMS5003_CMD_MODE, 1)  # 42 4D E1 00 01 01 71
PMS5003_PASSIVE_READ = pms5003_command(PMS5003_CMD_READ, 0)  # 42 4D E2 00 00 01 71
PMS5003_SLEEP = pms5003_command(PMS5003_CMD_SLEEP, 0)  # 42 4D E4 00 00 01 73
PMS5003_WAKE = pms5003_command(PMS5003_CMD_SLEEP, 1)  # 42 4D E4 00 01 01 74


def _pms5003_values(buf: bytes | bytearray | memoryview, i: int) -> Frame:
    """The 12 channels of the (already checked) frame starting at `buf[i]`."""
    return {ch: float((buf[i + o] << 8) | buf[i + o + 1]) for ch, o in _PMS5003_FIELDS}


def decode_pms5003(frame: bytes | bytearray | memoryview) -> Frame:
    """Values of one 32-byte PMS5003 data frame; raises `FrameError` when it is not a valid one."""
    b = bytes(frame)
    if len(b) != PMS5003_FRAME_SIZE:
        raise FrameError("size", f"PMS5003 frame must be {PMS5003_FRAME_SIZE} bytes, got {len(b)}")
    if b[:2] != PMS5003_HEADER:
        raise FrameError("header", f"PMS5003 frame must start with 42 4D, got {b[:2].hex(' ')}")
    length = int.from_bytes(b[2:4], "big")
    if length != PMS5003_LENGTH:
        raise FrameError("length", f"PMS5003 length field must be 0x001C, got 0x{length:04X}")
    expected = sum(b[:30]) & 0xFFFF
    got = int.from_bytes(b[30:32], "big")
    if got != expected:
        raise FrameError("checksum", f"PMS5003 checksum 0x{got:04X}, computed 0x{expected:04X}")
    return _pms5003_values(b, 0)


def encode_pms5003(values: Mapping[str, float], reserved: int = 0) -> bytes:
    """A valid 32-byte PMS5003 data frame (for tests and simulators).

    `values` maps channel names of `PMS5003_CHANNELS` to numbers, rounded to the nearest integer;
    a missing channel is 0. Unknown names and values outside 0..65535 raise `ValueError`.
    `reserved` is word 13 (0..65535).
    """
    unknown = set(values) - set(PMS5003_CHANNELS)
    if unknown:
        raise ValueError(f"unknown PMS5003 channels: {sorted(unknown)}")
    words = [_u16(values.get(ch, 0), ch) for ch in PMS5003_CHANNELS] + [_u16(reserved, "reserved")]
    body = PMS5003_HEADER + PMS5003_LENGTH.to_bytes(2, "big") + b"".join(w.to_bytes(2, "big") for w in words)
    return body + (sum(body) & 0xFFFF).to_bytes(2, "big")


def _u16(value: float, name: str) -> int:
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    raw = round(value)
    if not 0 <= raw <= 0xFFFF:
        raise ValueError(f"{name}: {value!r} does not fit an unsigned 16-bit word")
    return raw


# --------------------------------------------------------------------------------------------------
# Nova SDS011
# --------------------------------------------------------------------------------------------------

SDS011_HEAD = 0xAA
SDS011_TAIL = 0xAB
SDS011_CMD_DATA = 0xC0  # the data frame the sensor streams (or answers a query with)
SDS011_CMD_REPLY = 0xC5  # the sensor's answer to a setting command (same 10-byte layout)
SDS011_HEADER = bytes((SDS011_HEAD, SDS011_CMD_DATA))
SDS011_FRAME_SIZE = 10
SDS011_CHANNELS: tuple[str, ...] = ("a34004", "a34002")
SDS011_UNITS: dict[str, str] = {"a34004": UNIT_MASS, "a34002": UNIT_MASS}
SDS011_DEFAULT_ID = 0xA160  # id1 = 0xA1, id2 = 0x60, as in the test vector AA C0 D4 04 3A 0A A1 60 1D AB
SDS011_CMD_QUERY = 0x04  # "query data": a sensor in query mode answers it with one data frame


def sds011_command(cmd: int, data: bytes = b"", id: int = 0xFFFF) -> bytes:
    """A 19-byte SDS011 command (Nova's control protocol, not in DOMAIN.md): `AA B4 cmd`, twelve data
    bytes (zero-padded), the sensor id (FF FF: any sensor), checksum = sum of bytes 2..16 mod 256, `AB`."""
    body = bytes((cmd,)) + data.ljust(12, b"\x00") + id.to_bytes(2, "big")
    return bytes((SDS011_HEAD, 0xB4)) + body + bytes((sum(body) & 0xFF, SDS011_TAIL))


SDS011_QUERY = sds011_command(SDS011_CMD_QUERY)  # AA B4 04 00 x12 FF FF 02 AB


def _sds011_values(buf: bytes | bytearray | memoryview, i: int) -> Frame:
    return {
        "a34004": ((buf[i + 3] << 8) | buf[i + 2]) / 10,
        "a34002": ((buf[i + 5] << 8) | buf[i + 4]) / 10,
    }


def decode_sds011(frame: bytes | bytearray | memoryview) -> Frame:
    """Values of one 10-byte SDS011 data frame (`AA C0 ...`); raises `FrameError` when invalid."""
    b = bytes(frame)
    if len(b) != SDS011_FRAME_SIZE:
        raise FrameError("size", f"SDS011 frame must be {SDS011_FRAME_SIZE} bytes, got {len(b)}")
    if b[:2] != SDS011_HEADER:
        raise FrameError("header", f"SDS011 data frame must start with AA C0, got {b[:2].hex(' ')}")
    if b[9] != SDS011_TAIL:
        raise FrameError("tail", f"SDS011 frame must end with AB, got {b[9]:02X}")
    expected = sum(b[2:8]) & 0xFF
    if b[8] != expected:
        raise FrameError("checksum", f"SDS011 checksum 0x{b[8]:02X}, computed 0x{expected:02X}")
    return _sds011_values(b, 0)


def encode_sds011(pm25: float, pm10: float, id: int = SDS011_DEFAULT_ID) -> bytes:
    """A valid 10-byte SDS011 data frame (for tests and simulators).

    `pm25`, `pm10` in ug/m3, rounded to 0.1 (0..6553.5, else `ValueError`). `id` is the 16-bit
    device id, written as id1 (high byte) then id2 (low byte): 0xA160 gives `... A1 60 ...`.
    """
    if not 0 <= id <= 0xFFFF:
        raise ValueError(f"SDS011 id out of range: {id!r}")
    p25 = _u16(pm25 * 10, "pm25")
    p10 = _u16(pm10 * 10, "pm10")
    data = bytes((p25 & 0xFF, p25 >> 8, p10 & 0xFF, p10 >> 8, id >> 8, id & 0xFF))
    return bytes((SDS011_HEAD, SDS011_CMD_DATA)) + data + bytes((sum(data) & 0xFF, SDS011_TAIL))


# --------------------------------------------------------------------------------------------------
# Incremental readers
# --------------------------------------------------------------------------------------------------

# What `_examine` says about the candidate at a sync position.
_NEED_MORE = 0  # not enough bytes yet to decide
_FRAME = 1  # a valid data frame
_REPLY = 2  # a valid command answer: skipped, counted in `replies`
_NOT_HEADER = 3  # the sync byte(s) matched but the rest of the header did not: plain garbage
_BAD_LENGTH = 4
_BAD_TAIL = 5
_BAD_CHECKSUM = 6


class FrameReader:
    """Finds valid frames of one protocol in a byte stream fed in arbitrary pieces.

    `feed(data)` returns the values of every data frame completed by `data`, in stream order. It
    resynchronises on the header after garbage, joins frames split across reads, separates frames
    glued together, and never raises on any byte content. A rejected candidate (bad length, tail or
    checksum) is counted and the search resumes one byte after its first byte, so a false header
    inside garbage never swallows the real frame that follows it. Command answers of the sensor are
    recognised and skipped (`replies`) rather than counted as errors.

    Memory: after `feed` returns, at most `max_frame_size - 1` bytes wait for the rest of a frame.

    Counters (never reset by the reader; the driver may read and reset them):
    `frames` valid data frames, `replies` valid command answers, `bad_length` / `bad_tail` /
    `bad_checksum` rejected candidates, `garbage_bytes` bytes in no valid frame or answer (rejected
    candidates' bytes included), `bytes_fed` all bytes given to `feed`. At any time
    `bytes_fed == frames * frame_size + replies * reply_size + garbage_bytes + pending`.
    """

    protocol: ClassVar[str]
    sync: ClassVar[bytes]  # searched for; `_examine` decides what follows
    frame_size: ClassVar[int]
    reply_size: ClassVar[int]
    max_frame_size: ClassVar[int]

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames = 0
        self.replies = 0
        self.bad_length = 0
        self.bad_tail = 0
        self.bad_checksum = 0
        self.garbage_bytes = 0
        self.bytes_fed = 0

    @property
    def pending(self) -> int:
        """Bytes kept for a frame that has not arrived completely."""
        return len(self._buf)

    @property
    def rejected(self) -> int:
        """Candidates rejected so far (bad length, tail or checksum)."""
        return self.bad_length + self.bad_tail + self.bad_checksum

    def counters(self) -> dict[str, int]:
        """The counters as a dict (for health reports)."""
        return {
            "frames": self.frames,
            "replies": self.replies,
            "bad_length": self.bad_length,
            "bad_tail": self.bad_tail,
            "bad_checksum": self.bad_checksum,
            "garbage_bytes": self.garbage_bytes,
            "bytes_fed": self.bytes_fed,
        }

    def clear(self) -> None:
        """Forget a partial frame (e.g. after reopening the port); its bytes count as garbage."""
        self.garbage_bytes += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take the next bytes of the stream; return the values of the frames they complete."""
        if not data:
            return []
        buf = self._buf
        buf += data
        self.bytes_fed += len(data)
        n = len(buf)
        sync = self.sync
        out: list[Frame] = []
        pos = 0
        while pos < n:
            i = buf.find(sync, pos)
            if i < 0:
                keep = self._partial_sync(buf, pos, n)
                self.garbage_bytes += n - keep - pos
                pos = n - keep
                break
            self.garbage_bytes += i - pos
            pos = i
            status, size = self._examine(buf, i, n)
            if status == _NEED_MORE:
                break
            if status == _FRAME:
                out.append(self._values(buf, i))
                self.frames += 1
                pos += size
            elif status == _REPLY:
                self.replies += 1
                pos += size
            else:
                if status == _BAD_LENGTH:
                    self.bad_length += 1
                elif status == _BAD_TAIL:
                    self.bad_tail += 1
                elif status == _BAD_CHECKSUM:
                    self.bad_checksum += 1
                # Resume one byte after the candidate's start, never after its claimed end.
                self.garbage_bytes += 1
                pos += 1
        del buf[:pos]
        return out

    def _partial_sync(self, buf: bytearray, pos: int, n: int) -> int:
        """How many bytes at the end of `buf[pos:n]` are a proper prefix of the sync bytes."""
        sync = self.sync
        for k in range(min(len(sync) - 1, n - pos), 0, -1):
            if buf[n - k : n] == sync[:k]:
                return k
        return 0

    def _examine(self, buf: bytearray, i: int, n: int) -> tuple[int, int]:
        """(status, size) of the candidate whose sync bytes start at `buf[i]`."""
        raise NotImplementedError

    def _values(self, buf: bytearray, i: int) -> Frame:
        raise NotImplementedError


class Pms5003Reader(FrameReader):
    """`FrameReader` for PMS5003 data frames; skips the 8-byte answers to mode/sleep commands."""

    protocol = "pms5003"
    sync = PMS5003_HEADER
    frame_size = PMS5003_FRAME_SIZE
    reply_size = PMS5003_REPLY_SIZE
    max_frame_size = PMS5003_FRAME_SIZE

    def _examine(self, buf: bytearray, i: int, n: int) -> tuple[int, int]:
        if n - i < 4:
            return _NEED_MORE, 0
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length == PMS5003_LENGTH:
            size, status = PMS5003_FRAME_SIZE, _FRAME
        elif length == PMS5003_REPLY_LENGTH:
            size, status = PMS5003_REPLY_SIZE, _REPLY
        else:
            return _BAD_LENGTH, 0
        if n - i < size:
            return _NEED_MORE, 0
        if sum(buf[i : i + size - 2]) & 0xFFFF != (buf[i + size - 2] << 8) | buf[i + size - 1]:
            return _BAD_CHECKSUM, 0
        return status, size

    def _values(self, buf: bytearray, i: int) -> Frame:
        return _pms5003_values(buf, i)


class Sds011Reader(FrameReader):
    """`FrameReader` for SDS011 data frames (`AA C0`); skips the sensor's `AA C5` answers."""

    protocol = "sds011"
    sync = bytes((SDS011_HEAD,))
    frame_size = SDS011_FRAME_SIZE
    reply_size = SDS011_FRAME_SIZE
    max_frame_size = SDS011_FRAME_SIZE

    def _examine(self, buf: bytearray, i: int, n: int) -> tuple[int, int]:
        if n - i < 2:
            return _NEED_MORE, 0
        cmd = buf[i + 1]
        if cmd == SDS011_CMD_DATA:
            status = _FRAME
        elif cmd == SDS011_CMD_REPLY:
            status = _REPLY
        else:
            return _NOT_HEADER, 0
        if n - i < SDS011_FRAME_SIZE:
            return _NEED_MORE, 0
        if buf[i + 9] != SDS011_TAIL:
            return _BAD_TAIL, 0
        if sum(buf[i + 2 : i + 8]) & 0xFF != buf[i + 8]:
            return _BAD_CHECKSUM, 0
        return status, SDS011_FRAME_SIZE

    def _values(self, buf: bytearray, i: int) -> Frame:
        return _sds011_values(buf, i)


READERS: dict[str, type[FrameReader]] = {"pms5003": Pms5003Reader, "sds011": Sds011Reader}
"""Reader class by driver name (`driver:` in the config)."""


def make_reader(protocol: str) -> FrameReader:
    """A fresh reader for `protocol` ("pms5003" or "sds011"); `KeyError` for any other name."""
    return READERS[protocol]()


# --------------------------------------------------------------------------------------------------
# The latest frame of an interval (SPEC §2)
# --------------------------------------------------------------------------------------------------


def latest_in_interval(frames: Iterable[tuple[float, Frame]], start: float, end: float) -> Frame | None:
    """Values of the frame received last in `start < t <= end`, or None when there is none.

    `frames` are `(t, values)` pairs with `t` a monotonic receive time. When several frames share
    the latest time (one read delivered them all), the one that comes last in `frames` wins.
    """
    best: Frame | None = None
    best_t = float("-inf")
    for t, values in frames:
        if start < t <= end and t >= best_t:
            best, best_t = values, t
    return best


class LatestInInterval:
    """Keeps the latest frame until the driver's next poll takes it (O(1) memory).

    `add(values, t)` for each decoded frame, `t` its monotonic receive time (frames of one read share
    it; the one added later wins). `take(now)` returns the values of the latest frame added since the
    previous `take` (or creation) and received within the last `interval` seconds, or None, for which
    the driver writes value null with flag B. A frame is returned at most once, so a silent sensor
    never looks alive through a repeated old value, and a late poll never reports a frame older than
    one interval.
    """

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.interval = float(interval)
        self._values: Frame | None = None
        self._t = float("-inf")

    def add(self, values: Frame, t: float | None = None) -> None:
        """Record a frame received at monotonic time `t` (default: now)."""
        if t is None:
            t = time.monotonic()
        if t >= self._t:
            self._values, self._t = values, t

    def extend(self, frames: Iterable[Frame], t: float | None = None) -> None:
        """Record the frames of one read, all received at `t` (default: now), oldest first."""
        if t is None:
            t = time.monotonic()
        for values in frames:
            self.add(values, t)

    def take(self, now: float | None = None) -> Frame | None:
        """The latest frame's values of the interval ending at `now` (default: now), or None.
        Starts the next interval."""
        if now is None:
            now = time.monotonic()
        values = self._values if self._t > now - self.interval else None
        self._values, self._t = None, float("-inf")
        return values
