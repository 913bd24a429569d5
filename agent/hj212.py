"""HJ 212-2017 codec: CRC, frames, packets, split/reassembly, a byte-stream splitter, packet builders.

Pure functions over bytes and text (no I/O); used by the MQTT `hj212` payload, the serial `hj212`
instrument driver and the TCP uplink. May import only the standard library, PyYAML and `agent.model`.

Frame: ``##`` + 4-digit data-segment length + data segment + 4 hex CRC + ``\\r\\n``; data segment
``QN=..;ST=..;CN=..;PW=..;MN=..;Flag=..;[PNUM=..;PNO=..;]CP=&&<groups>&&`` where groups are separated
by ``;`` and the items of a group by ``,`` (DOMAIN.md, HJ 212 section).

Decisions:

* Decoding is strict: exact length, CRC, trailing CRLF, printable ASCII, known header fields each at
  most once, required ST/CN/PW/MN, PNUM/PNO present exactly when the Flag's D bit is set,
  ``key=value`` items, no empty group, no duplicate key in a group, ``&`` and ``=`` never inside a
  value. Deliberate leniencies: CRC in lower-case hex; header fields in any order (encoding always
  writes QN ST CN PW MN Flag PNUM PNO CP); QN and Flag optional (HJ/T 212-2005 style packets);
  any version bits in Flag (see `Packet.version`); empty item values (``w01012-Rtd=``); a malformed
  MN, PW, ST or CN (QN) in an otherwise good data segment raises `BadHeader` carrying the packet, so a
  request can be refused with the QnRtn of its fault rather than dropped (as `BadQn`); and, only
  with ``allow_missing_crlf=True`` (off by default), a frame that ends right after its CRC
  (`FrameReader`: followed by a lone CR or LF, taken as its end, by the next frame's ``##``, or by
  nothing yet); `FrameReader(allow_lf=True)` takes a frame ending in a lone LF but still insists on
  an end (some platform software ends its packets with LF). With ``allow_non_ascii`` (the TCP uplink),
  bytes over 0x7F do not end a candidate frame: one with good length and CRC comes out as `NotAscii`,
  carrying what its ASCII says, so that a request holding Chinese text (UTF-8 or GBK) is refused and
  logged rather than lost in the byte stream; it is never taken as a packet.
* HJ 212 has no null: a real-time value that is missing is sent as ``<code>-Flag`` alone (no
  ``-Rtd``); period statistics that are None are omitted.
* A data segment over 1024 characters is split between CP groups (a group longer than a whole
  piece is cut between items and then reads back as several consecutive groups); every piece
  carries the same QN; `Reassembler` concatenates the pieces' groups in PNO order.
* Error messages never contain the password (no secrets in logs or exceptions).
* The standard's CRC keeps only 8 bits of state between bytes (``crc = T[(crc >> 8) ^ byte]``), so
  there are only 256 possible CRC values: it detects every single-byte change but lets 1 random
  frame in 256 through. The stream reader therefore also insists on length, CRLF, ASCII and syntax.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType

import yaml

from agent.model import FLAGS

__all__ = [
    "BadCrc",
    "BadHeader",
    "BadLength",
    "BadQn",
    "CodeTable",
    "FLAG_ANSWER",
    "FLAG_SPLIT",
    "FLAG_V2017",
    "FrameReader",
    "Hj212Error",
    "MAX_DATA_LEN",
    "Malformed",
    "NotAscii",
    "Packet",
    "QnSource",
    "ReassemblyError",
    "Reassembler",
    "ack_9014",
    "codes",
    "crc16",
    "decode",
    "encode",
    "encode_one",
    "format_number",
    "first_instant_ms",
    "format_time",
    "last_instant_ms",
    "make_qn",
    "parse_number",
    "parse_time",
    "period_items",
    "period_packet",
    "realtime_items",
    "realtime_packet",
    "reply_9011",
    "reply_9012",
]

# --- constants of the standard ---------------------------------------------------------------------

MAX_DATA_LEN = 1024  # data segment limit of HJ 212-2017 (packet at most 1036 bytes)
FLAG_ANSWER = 0b01  # A bit: the receiver must answer
FLAG_SPLIT = 0b10  # D bit: the packet is one piece of a split packet (PNUM/PNO present)
FLAG_V2017 = 0b000001 << 2  # version bits V5..V0 = 000001 -> Flag=4 (no answer), 5 (answer requested)

CN_REALTIME = "2011"
CN_MINUTE = "2051"
CN_HOUR = "2061"
CN_DAY = "2031"
CN_PERIODS = frozenset({CN_MINUTE, CN_HOUR, CN_DAY})
CN_REQUEST_ANSWER = "9011"
CN_EXECUTION_RESULT = "9012"
CN_NOTICE_ANSWER = "9013"
CN_DATA_ACK = "9014"
ANSWER_CNS = frozenset({CN_REQUEST_ANSWER, CN_EXECUTION_RESULT, CN_NOTICE_ANSWER, CN_DATA_ACK})  # never answered
ST_SYSTEM = "91"

PW_MAX = 6  # "PW=" + 6 characters in HJ 212-2017
MN_MAX = 24  # "MN=" + 24 characters in HJ 212-2017
PNUM_MAX = 9999

_HEADER_KEYS = ("QN", "ST", "CN", "PW", "MN", "Flag", "PNUM", "PNO")
_REQUIRED_KEYS = ("ST", "CN", "PW", "MN")
# Printable ASCII except space and the separators ; , & =
_TOKEN_CHAR = r"[!-%'-+\--:<>-~]"
_QN_RE = re.compile(r"[0-9]{17}")
_ST_RE = re.compile(r"[0-9]{2}")
_CN_RE = re.compile(r"[0-9]{4}")
_PW_RE = re.compile(_TOKEN_CHAR + f"{{0,{PW_MAX}}}")
_MN_RE = re.compile(_TOKEN_CHAR + f"{{1,{MN_MAX}}}")
_FLAG_RE = re.compile(r"0|[1-9][0-9]{0,2}")
_PNUM_RE = re.compile(r"[1-9][0-9]{0,3}")
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
_VALUE_RE = re.compile(r"[ -%'-+\--:<>-~]*")  # like _TOKEN_CHAR, space allowed, may be empty
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_]+")  # SPEC: channel codes have no '-'
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TIME_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{3})?")
_NON_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # bytes that are never text, in any encoding
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_CRC_TEXT_RE = re.compile(rb"[0-9A-Fa-f]{4}")

# --- errors ----------------------------------------------------------------------------------------


class Hj212Error(ValueError):
    """Base of every error raised on bad HJ 212 input (a ValueError, so generic handlers work)."""


class Malformed(Hj212Error):
    """The frame or data segment does not follow the HJ 212 syntax."""


class BadLength(Hj212Error):
    """The 4-digit length does not match the data segment, or exceeds the limit."""


class BadCrc(Hj212Error):
    """The CRC written in the frame differs from the CRC of its data segment. `packet`: what the data
    segment says when it parses (untrusted: only to answer a request with QnRtn 9), else None."""

    packet: Packet | None = None


class BadQn(Malformed):
    """The QN is not 17 digits. `packet`: what the rest of the data segment says, without a QN, when it
    parses (only to answer a request with QnRtn 7), else None."""

    packet: Packet | None = None


class BadHeader(Malformed):
    """Header fields a request's answer can name (MN, PW, ST, CN; and QN) are malformed, the rest of the data
    segment is good: a PW over 6 characters is a mistyped password, to be answered QnRtn 3 (PW error), not
    dropped. `fields`: the malformed keys; `packet`: the data segment with those fields' raw text (None for
    the QN), untrusted and not encodable as it is: only to answer the request with a refusal."""

    packet: Packet | None = None
    fields: frozenset[str] = frozenset()


class NotAscii(Malformed):
    """A frame whose length and CRC are good but whose data segment holds bytes over 0x7F: text in UTF-8
    (which HJ 212-2017 is said to use for Chinese; unconfirmed) or GBK (seen in the field), where every field
    this codec reads is ASCII. Raised only with ``allow_non_ascii``. `packet`: what the data segment says with
    each such byte read as '?' (None when even that does not parse), untrusted: only to refuse a request;
    `fields`: the header fields holding such bytes; `offset`: the first one's; `utf8`: the segment is UTF-8.
    The message never quotes the text (it may be a password)."""

    packet: Packet | None = None
    fields: frozenset[str] = frozenset()
    offset: int = 0
    utf8: bool = False


class ReassemblyError(Hj212Error):
    """Pieces of a split packet contradict each other."""


# --- CRC -------------------------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            carry = crc & 1
            crc >>= 1
            if carry:
                crc ^= 0xA001
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """The HJ 212 CRC of `data` (the data segment, `QN=` .. closing `&&`).

    Init 0xFFFF; per byte ``crc = (crc >> 8) ^ byte`` then 8 right shifts, xor 0xA001 when the bit
    shifted out is 1 (not the Modbus CRC). Since the first step leaves an 8-bit value, the 8 shifts
    are a 256-entry table lookup.
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc >> 8) ^ byte]
    return crc


# --- packet ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Packet:
    """One HJ 212 packet (data segment). Values are kept as the exact strings of the wire.

    `cp` is a list of groups; each group is a dict (insertion-ordered) of item key -> value string,
    e.g. ``[{"DataTime": "20160801085857"}, {"w01018-Rtd": "23.4", "w01018-Flag": "N"}]``.
    `flag` None means no Flag field (HJ/T 212-2005 style); `pnum`/`pno` are set only on a piece of a
    split packet.
    """

    qn: str | None = None
    st: str
    cn: str
    pw: str
    mn: str
    flag: int | None = FLAG_V2017
    pnum: int | None = None
    pno: int | None = None
    cp: list[dict[str, str]] = field(default_factory=list)

    @property
    def version(self) -> int | None:
        """Protocol version bits V5..V0 of Flag (1 for HJ 212-2017), None without Flag."""
        return None if self.flag is None else self.flag >> 2

    @property
    def answer_requested(self) -> bool:
        """The A bit of Flag: the sender wants an answer (9011 / 9014)."""
        return self.flag is not None and bool(self.flag & FLAG_ANSWER)

    @property
    def is_split(self) -> bool:
        """This packet is one piece of a split packet (PNUM/PNO set)."""
        return self.pnum is not None

    def items(self) -> Iterator[tuple[str, str]]:
        """All CP items of all groups, in order."""
        for group in self.cp:
            yield from group.items()

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of the first CP item named `key` (keys are case-sensitive)."""
        for group in self.cp:
            if key in group:
                return group[key]
        return default

    def get_float(self, key: str) -> float | None:
        """The first item `key` as a float; None when absent or empty; Malformed when not a number."""
        text = self.get(key)
        if text is None or text == "":
            return None
        return parse_number(text, key)

    def data_time(self, tz: tzinfo) -> datetime | None:
        """`DataTime` as an aware datetime in the station timezone `tz`, None when absent."""
        text = self.get("DataTime")
        return None if text is None else parse_time(text, tz)

    def pollutants(self) -> dict[str, dict[str, str]]:
        """Items named ``<code>-<field>`` grouped by code: ``{"w01018": {"Rtd": "23.4", "Flag": "N"}}``.

        Items without ``-`` (DataTime, QnRtn, ...) are left out; the first occurrence wins.
        """
        result: dict[str, dict[str, str]] = {}
        for key, value in self.items():
            code, sep, name = key.partition("-")
            if sep and code and name:
                result.setdefault(code, {}).setdefault(name, value)
        return result


# --- numbers and times -----------------------------------------------------------------------------


def format_number(x: float | int, decimals: int | None = None) -> str:
    """`x` in plain decimal, never exponent notation: at most 15 significant digits (as the JSON
    payload and the period statistics have them, so that a period's Min never exceeds the Rtd it
    came from), no trailing zeros.

    ``23.4 -> "23.4"``, ``5.0 -> "5"``, ``1e-7 -> "0.0000001"``, ``-0.0 -> "0"``. `decimals` rounds
    first (useful for float32 values: ``format_number(23.399999618530273, 3) -> "23.4"``). Ints are
    written exactly. NaN and infinities raise ValueError (HJ 212 has no way to say them).
    """
    if isinstance(x, bool):
        raise TypeError("format_number: bool is not a number")
    if isinstance(x, int):
        return str(x)
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"format_number: {value!r} cannot be sent in HJ 212")
    if decimals is not None:
        value = round(value, decimals)
    rounded = float(f"{value:.15g}")
    text = format(Decimal(repr(rounded if math.isfinite(rounded) else value)), "f")  # near the float max
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def parse_number(text: str, what: str = "value") -> float:
    """A decimal number of a CP item (exponent accepted on reading); Malformed otherwise."""
    if not _NUMBER_RE.fullmatch(text):
        raise Malformed(f"{what}: {text[:40]!r} is not a decimal number")
    value = float(text)
    if not math.isfinite(value):
        raise Malformed(f"{what}: {text[:40]!r} is out of range")
    return value


def _in_tz(dt: datetime, tz: tzinfo | None) -> datetime:
    if tz is None:
        return dt
    if dt.tzinfo is None:
        raise ValueError("naive datetime given together with a timezone: pass an aware datetime")
    return dt.astimezone(tz)


def format_time(dt: datetime, tz: tzinfo | None = None) -> str:
    """``YYYYMMDDhhmmss`` of `dt`, converted to `tz` first when given (then `dt` must be aware).

    Without `tz` the datetime's own wall-clock fields are written (naive = already station time).
    """
    d = _in_tz(dt, tz)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}{d.hour:02d}{d.minute:02d}{d.second:02d}"


def make_qn(dt: datetime, tz: tzinfo | None = None) -> str:
    """A QN (request id) ``YYYYMMDDhhmmsszzz`` for `dt` (milliseconds truncated)."""
    d = _in_tz(dt, tz)
    return format_time(d) + f"{d.microsecond // 1000:03d}"


def parse_time(text: str, tz: tzinfo) -> datetime:
    """``YYYYMMDDhhmmss`` (station local time) -> aware datetime in `tz`.

    A 3-digit millisecond suffix (``YYYYMMDDhhmmsszzz``, the QN form, also seen in DataTime values of
    deployed loggers) is accepted. Invalid text or dates raise Malformed.
    """
    m = _TIME_RE.fullmatch(text)
    if not m:
        raise Malformed(f"time {text[:40]!r} is not YYYYMMDDhhmmss")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    millis = int(m.group(7) or 0)
    try:
        return datetime(year, month, day, hour, minute, second, millis * 1000, tzinfo=tz)
    except ValueError as exc:
        raise Malformed(f"time {text!r} is not a valid date: {exc}") from None


def first_instant_ms(local: datetime) -> int:
    """The earliest instant (Unix ms) at which the station clock shows `local`'s wall-clock fields or a
    later time: a backfill's `BeginTime` (aware, in the station timezone, as `parse_time` gives it).

    Where the clock is set back (the repeated hour of autumn) that is the first of the two times it
    shows them; where it skips them (the spring-forward gap), the instant it skipped to. `timestamp()`
    alone takes neither: it resolves a time in the gap with the offset before the change, an hour late.
    """
    first, second = local.replace(fold=0).timestamp(), local.replace(fold=1).timestamp()
    if first <= second:  # one instant, or the first of two
        return round(first * 1000)
    return _transition_ms(local, second, first)


def last_instant_ms(local: datetime) -> int:
    """The latest instant (Unix ms) at which the station clock shows `local`'s wall-clock fields or an
    earlier time: a backfill's `EndTime`. In the repeated hour, the second of the two times it shows them;
    in the spring-forward gap, the last millisecond before the clock skipped."""
    first, second = local.replace(fold=0).timestamp(), local.replace(fold=1).timestamp()
    if first <= second:
        return round(second * 1000)
    return _transition_ms(local, second, first) - 1


def _transition_ms(local: datetime, low: float, high: float) -> int:
    """The instant in (low, high] (Unix seconds) at which the clock skipped over `local`'s wall time."""
    tz = local.tzinfo
    after = datetime.fromtimestamp(high, tz).utcoffset()
    lo, hi = int(low), int(high)
    while hi - lo > 1:  # zone transitions fall on whole seconds
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi * 1000


class QnSource:
    """Strictly increasing QNs from a wall clock, in the station timezone.

    Two packets built in the same millisecond (or after the clock stepped back) still get distinct
    QNs: the next QN is at least the last one plus 1 ms.
    """

    def __init__(self, tz: tzinfo, clock: Callable[[], float] = time.time) -> None:
        self._tz = tz
        self._clock = clock
        self._last_ms = -1

    def __call__(self) -> str:
        now_ms = int(self._clock() * 1000)
        self._last_ms = max(now_ms, self._last_ms + 1)
        seconds, millis = divmod(self._last_ms, 1000)
        dt = datetime.fromtimestamp(seconds, self._tz).replace(microsecond=millis * 1000)
        return make_qn(dt)


# --- encoding --------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _validate(packet: Packet) -> None:
    """Raise ValueError unless `packet` encodes to a frame that `decode` accepts unchanged."""
    _check(
        packet.qn is None or (isinstance(packet.qn, str) and bool(_QN_RE.fullmatch(packet.qn))),
        f"QN {packet.qn!r} is not 17 digits",
    )
    _check(
        isinstance(packet.st, str) and bool(_ST_RE.fullmatch(packet.st)), f"ST {packet.st!r} is not 2 digits"
    )
    _check(
        isinstance(packet.cn, str) and bool(_CN_RE.fullmatch(packet.cn)), f"CN {packet.cn!r} is not 4 digits"
    )
    _check(
        isinstance(packet.pw, str) and bool(_PW_RE.fullmatch(packet.pw)),
        f"PW must be at most {PW_MAX} printable ASCII characters without space or ; , & =",
    )
    _check(
        isinstance(packet.mn, str) and bool(_MN_RE.fullmatch(packet.mn)),
        f"MN {packet.mn!r} must be 1..{MN_MAX} printable ASCII characters without space or ; , & =",
    )
    flag = packet.flag
    _check(flag is None or (type(flag) is int and 0 <= flag <= 255), f"Flag {flag!r} is not 0..255")
    split_bit = flag is not None and bool(flag & FLAG_SPLIT)
    if packet.pnum is None and packet.pno is None:
        _check(not split_bit, "Flag has the D (split) bit but PNUM/PNO are not set")
    else:
        pnum, pno = packet.pnum, packet.pno
        _check(
            type(pnum) is int and type(pno) is int and 1 <= pno <= pnum <= PNUM_MAX,
            f"PNUM/PNO {pnum!r}/{pno!r} must satisfy 1 <= PNO <= PNUM <= {PNUM_MAX}",
        )
        _check(split_bit, "PNUM/PNO are set but Flag lacks the D (split) bit")
    _check(isinstance(packet.cp, list), "cp must be a list of groups")
    for index, group in enumerate(packet.cp):
        _check(isinstance(group, Mapping) and len(group) > 0, f"CP group {index} must be a non-empty dict")
        for key, value in group.items():
            _check(
                isinstance(key, str) and bool(_KEY_RE.fullmatch(key)),
                f"CP key {key!r} must be [A-Za-z0-9_-]+",
            )
            _check(isinstance(value, str), f"CP {key}: value {value!r} must be a str (see format_number)")
            _check(
                bool(_VALUE_RE.fullmatch(value)),
                f"CP {key}: value {value[:40]!r} must be printable ASCII without ; , & =",
            )


def _head(packet: Packet, flag: int | None, pnum: int | None, pno: int | None) -> str:
    parts = [] if packet.qn is None else [f"QN={packet.qn}"]
    parts += [f"ST={packet.st}", f"CN={packet.cn}", f"PW={packet.pw}", f"MN={packet.mn}"]
    if flag is not None:
        parts.append(f"Flag={flag}")
    if pnum is not None:
        parts += [f"PNUM={pnum}", f"PNO={pno}"]
    parts.append("CP=&&")
    return ";".join(parts)


def _group_text(group: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in group.items())


def _frame(segment: str) -> bytes:
    data = segment.encode("ascii")
    return b"##%04d%s%04X\r\n" % (len(data), data, crc16(data))


def encode_one(packet: Packet, *, max_data_len: int = MAX_DATA_LEN) -> bytes:
    """The one frame of `packet`; ValueError when invalid or when the data segment is too long."""
    _validate(packet)
    segment = (
        _head(packet, packet.flag, packet.pnum, packet.pno) + ";".join(map(_group_text, packet.cp)) + "&&"
    )
    if len(segment) > max_data_len:
        raise ValueError(
            f"data segment of {len(segment)} characters exceeds {max_data_len}; use encode() to split it"
        )
    return _frame(segment)


def _pack(groups: list[dict[str, str]], budget: int) -> list[list[str]]:
    """Greedy packing of CP groups into pieces whose CP text (groups joined by ';') is <= budget.

    A group that does not fit the room left starts the next piece; only a group longer than a
    whole piece is cut between items (filling the current piece first), never inside an item.
    """
    pieces: list[list[str]] = [[]]  # each piece: list of group texts
    size = 0  # CP characters used in the last piece
    for group in groups:
        text = _group_text(group)
        need = len(text) + (1 if pieces[-1] else 0)
        if size + need <= budget:
            pieces[-1].append(text)
            size += need
            continue
        if len(text) <= budget:
            pieces.append([text])
            size = len(text)
            continue
        continuing = False  # the last group text of the last piece belongs to this group
        for key, value in group.items():
            item = f"{key}={value}"
            if len(item) > budget:
                raise ValueError(
                    f"CP item {item[:40]!r}... is longer than a whole packet ({budget} characters)"
                )
            need = len(item) + (1 if pieces[-1] else 0)
            if size + need > budget:
                pieces.append([item])
                size = len(item)
            elif continuing:
                pieces[-1][-1] += "," + item
                size += need
            else:
                pieces[-1].append(item)
                size += need
            continuing = True
    return [piece for piece in pieces if piece]


def encode(packet: Packet, *, max_data_len: int = MAX_DATA_LEN) -> list[bytes]:
    """The frames of `packet`: one if its data segment fits `max_data_len`, else a split packet.

    Splitting needs a QN (shared by every piece) and a Flag (the D bit is added); pieces are cut
    between CP groups, and only a group longer than a whole piece is cut between its items. A leading
    ``DataTime=..`` group is repeated at the head of every piece, so that a platform that reads each
    piece on its own can still date its values (`Reassembler` keeps it once). Raises ValueError for
    an invalid packet.
    """
    _validate(packet)
    segment = (
        _head(packet, packet.flag, packet.pnum, packet.pno) + ";".join(map(_group_text, packet.cp)) + "&&"
    )
    if len(segment) <= max_data_len:
        return [_frame(segment)]
    if packet.pnum is not None:
        raise ValueError(
            f"piece PNO={packet.pno} of a split packet is {len(segment)} characters, over {max_data_len}"
        )
    if packet.qn is None or packet.flag is None:
        raise ValueError("a packet that must be split needs a QN and a Flag")
    flag = packet.flag | FLAG_SPLIT
    common = [_group_text(packet.cp[0])] if _is_time_group(packet.cp[:1]) else []
    for digits in range(1, 5):
        widest = 10**digits - 1
        overhead = len(_head(packet, flag, widest, widest)) + len("&&") + sum(len(t) + 1 for t in common)
        budget = max_data_len - overhead
        if budget <= 0:
            raise ValueError(f"max_data_len {max_data_len} leaves no room for CP data")
        pieces = _pack(packet.cp[len(common):], budget)
        if len(pieces) <= widest:
            break
    else:
        raise ValueError(f"packet needs more than {PNUM_MAX} pieces")
    total = len(pieces)
    return [
        _frame(_head(packet, flag, total, number) + ";".join(common + texts) + "&&")
        for number, texts in enumerate(pieces, start=1)
    ]


def _is_time_group(groups: list[dict[str, str]]) -> bool:
    """The groups start with a ``DataTime=..`` group alone (the time of every value that follows)."""
    return bool(groups) and list(groups[0]) == ["DataTime"]


# --- decoding --------------------------------------------------------------------------------------


def decode(
    frame: bytes | bytearray | memoryview,
    *,
    allow_missing_crlf: bool = False,
    max_data_len: int = MAX_DATA_LEN,
    allow_non_ascii: bool = False,
) -> Packet:
    """Parse one complete frame; raise a Hj212Error subclass saying precisely what is wrong.

    With `allow_non_ascii`, a frame whose only fault is text over 0x7F (no control byte) raises `NotAscii`
    (which carries what the rest of it says) rather than a plain `Malformed`.

    Checks, in order: ``##``, 4-digit length (<= `max_data_len`), trailing CRLF (optional with
    `allow_missing_crlf`), length = data segment, CRC (upper or lower-case hex), printable ASCII,
    header fields, ``CP=&&...&&`` and its groups/items.
    """
    raw = bytes(frame)
    if not raw.startswith(b"##"):
        raise Malformed("frame does not start with '##'")
    digits = raw[2:6]
    if len(digits) < 4 or not digits.isdigit():
        raise Malformed("frame header is not '##' followed by 4 decimal digits")
    declared = int(digits)
    if declared > max_data_len:
        raise BadLength(f"declared data segment length {declared} exceeds {max_data_len}")
    if raw.endswith(b"\r\n"):
        body = raw[6:-2]
    elif allow_missing_crlf:
        body = raw[6:]
    else:
        raise Malformed("frame does not end with CRLF")
    if len(body) < 4:
        raise Malformed("frame too short for a CRC")
    data, crc_text = body[:-4], body[-4:]
    if len(data) != declared:
        raise BadLength(f"declared data segment length {declared}, actual {len(data)}")
    if not _CRC_TEXT_RE.fullmatch(crc_text):
        raise Malformed("CRC field is not 4 hexadecimal digits")
    expected = crc16(data)
    if int(crc_text, 16) != expected:
        error = BadCrc(f"CRC {crc_text.decode('ascii')} in frame, {expected:04X} computed over the data segment")
        try:  # what the frame would say, for an answer naming its QN (QnRtn 9): never to be acted on. Line
            # noise that broke the CRC may also have set bytes over 0x7F: read as '?', as `_not_ascii` does
            error.packet = _parse_segment(_NON_ASCII.sub(b"?", data).decode("ascii"))
        except Hj212Error:
            pass
        raise error
    bad = _NON_PRINTABLE.search(data)
    if bad:
        if allow_non_ascii and not _CONTROL.search(data):
            raise _not_ascii(data)
        raise Malformed(f"byte 0x{data[bad.start()]:02X} at data offset {bad.start()} is not printable ASCII")
    return _parse_segment(data.decode("ascii"))


def _not_ascii(data: bytes) -> NotAscii:
    """The NotAscii error of a data segment holding bytes over 0x7F (and no control byte)."""
    match = _NON_ASCII.search(data)
    offset = match.start() if match else 0
    try:
        data.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    what = "UTF-8 text" if utf8 else "bytes over 0x7F that are not UTF-8 (GBK text?)"
    error = NotAscii(f"{what} at data offset {offset}: HJ 212 fields are ASCII")
    # Structure survives reading each such byte as '?': UTF-8 bytes of non-ASCII characters are all over 0x7F
    # and GBK's second bytes are 0x40 or over, never one of ; , & = (all below 0x40).
    header = data.split(b"CP=&&", 1)[0]
    fields = {part.partition(b"=")[0].decode("ascii", "replace") for part in header.split(b";")
              if _NON_ASCII.search(part.partition(b"=")[2])}
    try:
        packet: Packet | None = _parse_segment(_NON_ASCII.sub(b"?", data).decode("ascii"))
    except (BadHeader, BadQn) as exc:
        packet = exc.packet
        fields |= set(exc.fields) if isinstance(exc, BadHeader) else set()
    except Hj212Error:
        packet = None
    error.packet, error.fields, error.offset, error.utf8 = packet, frozenset(fields), offset, utf8
    return error


def _parse_segment(text: str) -> Packet:
    start = text.find("CP=&&")
    if start < 0:
        raise Malformed("no 'CP=&&' in data segment")
    if len(text) < start + 7 or not text.endswith("&&"):
        raise Malformed("CP is not terminated by '&&' at the end of the data segment")
    if start == 0 or text[start - 1] != ";":
        raise Malformed("header fields must precede 'CP=&&', separated by ';'")
    cp_text = text[start + 5 : -2]
    if "&" in cp_text:
        raise Malformed("'&' inside CP")

    fields: dict[str, str] = {}
    for part in text[: start - 1].split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            raise Malformed(f"header field {key[:20]!r} has no '='")
        if key not in _HEADER_KEYS:
            raise Malformed(f"unknown header field {key[:20]!r}")
        if key in fields:
            raise Malformed(f"header field {key} appears twice")
        fields[key] = value
    for key in _REQUIRED_KEYS:
        if key not in fields:
            raise Malformed(f"header field {key} is missing")

    bad: dict[str, str] = {}  # fields a refusal can name (BadHeader): key -> what is wrong

    def field_value(key: str, pattern: re.Pattern[str], rule: str, secret: bool = False,
                    answerable: bool = False) -> str | None:
        value = fields.get(key)
        if value is not None and not pattern.fullmatch(value):
            shown = "" if secret else f" {value[:30]!r}"
            if not answerable:
                raise Malformed(f"{key}{shown} is not {rule}")
            bad[key] = f"{key}{shown} is not {rule}"
        return value

    qn = fields.get("QN")
    bad_qn = None  # a QN that is not one: the rest is still parsed, for an answer QnRtn 7 (BadQn)
    if qn is not None and not _QN_RE.fullmatch(qn):
        bad_qn, qn = qn, None
    st = field_value("ST", _ST_RE, "2 digits", answerable=True)
    cn = field_value("CN", _CN_RE, "4 digits", answerable=True)
    pw = field_value("PW", _PW_RE, f"at most {PW_MAX} characters without space or ; , & =", secret=True,
                     answerable=True)
    mn = field_value("MN", _MN_RE, f"1..{MN_MAX} characters without space or ; , & =", answerable=True)
    flag_text = field_value("Flag", _FLAG_RE, "a decimal number without leading zeros")
    pnum_text = field_value("PNUM", _PNUM_RE, "a number 1..9999")
    pno_text = field_value("PNO", _PNUM_RE, "a number 1..9999")
    flag = None if flag_text is None else int(flag_text)
    if flag is not None and flag > 255:
        raise Malformed(f"Flag {flag} exceeds 255")
    split_bit = flag is not None and bool(flag & FLAG_SPLIT)
    if (pnum_text is None) != (pno_text is None):
        raise Malformed("PNUM and PNO must come together")
    pnum = None if pnum_text is None else int(pnum_text)
    pno = None if pno_text is None else int(pno_text)
    if pnum is not None and pno is not None and pno > pnum:
        raise Malformed(f"PNO {pno} exceeds PNUM {pnum}")
    if split_bit != (pnum is not None):
        raise Malformed("Flag's D (split) bit and the presence of PNUM/PNO disagree")

    groups: list[dict[str, str]] = []
    if cp_text:
        for number, group_text in enumerate(cp_text.split(";"), start=1):
            if not group_text:
                raise Malformed(f"CP group {number} is empty")
            group: dict[str, str] = {}
            for item in group_text.split(","):
                key, sep, value = item.partition("=")
                if not sep:
                    raise Malformed(f"CP group {number}: item {item[:30]!r} has no '='")
                if not _KEY_RE.fullmatch(key):
                    raise Malformed(f"CP group {number}: key {key[:30]!r} is not [A-Za-z0-9_-]+")
                if "=" in value:
                    raise Malformed(f"CP {key}: '=' inside the value")
                if key in group:
                    raise Malformed(f"CP group {number}: key {key} appears twice")
                group[key] = value
            groups.append(group)
    assert st is not None and cn is not None and pw is not None and mn is not None
    packet = Packet(qn=qn, st=st, cn=cn, pw=pw, mn=mn, flag=flag, pnum=pnum, pno=pno, cp=groups)
    if bad:
        if bad_qn is not None:
            bad["QN"] = f"QN {bad_qn[:30]!r} is not 17 digits"
        header_error = BadHeader("; ".join(bad.values()))
        header_error.packet, header_error.fields = packet, frozenset(bad)
        raise header_error
    if bad_qn is not None:
        error = BadQn(f"QN {bad_qn[:30]!r} is not 17 digits")
        error.packet = packet
        raise error
    return packet


# --- split packets ---------------------------------------------------------------------------------


class Reassembler:
    """Joins the pieces of split packets (same MN, QN, CN; PNO 1..PNUM, any arrival order).

    `add` returns the whole packet (D bit cleared, no PNUM/PNO, groups concatenated in PNO order)
    when the last piece arrives, None before; an unsplit packet comes straight back. A repeated
    identical piece is ignored; contradicting pieces raise ReassemblyError and drop that packet.
    At most `max_pending` incomplete packets and `max_pieces` pieces in all are kept; the oldest packet
    is dropped beyond that (`dropped` counts them), and a piece whose PNUM exceeds `max_pieces` is
    refused at once (a ReassemblyError): that packet could never be completed. A piece of a packet of
    1024 characters is held as ~9 KB of Python objects: PNUM 9999 at 16 packets took 1.4 GB of a
    gateway's memory, sent by a platform in seconds (a real packet is split into a few pieces).
    """

    def __init__(self, max_pending: int = 16, max_pieces: int = 256) -> None:
        if max_pending < 1 or max_pieces < 1:
            raise ValueError("max_pending and max_pieces must be >= 1")
        self.max_pending = max_pending
        self.max_pieces = max_pieces
        self.dropped = 0
        self._pending: dict[tuple[str, str, str], dict[int, Packet]] = {}
        self._held = 0  # pieces in _pending

    @property
    def pending(self) -> int:
        """Number of incomplete split packets held."""
        return len(self._pending)

    def clear(self) -> None:
        self._pending.clear()
        self._held = 0

    def _drop(self, key: tuple[str, str, str]) -> None:
        self._held -= len(self._pending.pop(key))

    def add(self, packet: Packet) -> Packet | None:
        if packet.pnum is None or packet.pno is None:
            return packet
        if packet.qn is None:
            raise ReassemblyError("split packet piece without QN cannot be matched to its other pieces")
        if packet.pnum > self.max_pieces:
            raise ReassemblyError(f"QN {packet.qn}: PNUM {packet.pnum} exceeds the {self.max_pieces} pieces "
                                  "a packet may have here")
        key = (packet.mn, packet.qn, packet.cn)
        pieces = self._pending.get(key)
        if pieces is None:
            if len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending)))
                self.dropped += 1
            pieces = self._pending[key] = {}
        elif pieces:
            first = next(iter(pieces.values()))
            if (first.pnum, first.st, first.pw, first.flag) != (
                packet.pnum,
                packet.st,
                packet.pw,
                packet.flag,
            ):
                self._drop(key)
                raise ReassemblyError(f"QN {packet.qn}: piece {packet.pno} disagrees with earlier pieces")
        if packet.pno in pieces:
            if pieces[packet.pno] != packet:
                self._drop(key)
                raise ReassemblyError(f"QN {packet.qn}: two different pieces numbered {packet.pno}")
            return None
        pieces[packet.pno] = packet
        self._held += 1
        while self._held > self.max_pieces:  # the oldest other packets go first (this one fits: PNUM checked)
            self._drop(next(k for k in self._pending if k != key))
            self.dropped += 1
        if len(pieces) < packet.pnum:
            return None
        self._drop(key)
        first = pieces[1].cp
        repeated = first[:1] if _is_time_group(first) else []  # each piece's copy of the DataTime group
        groups = [dict(group) for group in first] + [
            dict(group)
            for number in range(2, packet.pnum + 1)
            for group in pieces[number].cp[len(repeated) if pieces[number].cp[: len(repeated)] == repeated else 0 :]
        ]
        assert packet.flag is not None  # decode guarantees Flag when PNUM is present
        return Packet(
            qn=packet.qn,
            st=packet.st,
            cn=packet.cn,
            pw=packet.pw,
            mn=packet.mn,
            flag=packet.flag & ~FLAG_SPLIT,
            cp=groups,
        )


# --- stream splitter -------------------------------------------------------------------------------


class FrameReader:
    """Splits a byte stream (serial line, TCP) into packets; never raises on input.

    `feed(data)` returns, in stream order, a Packet for every valid frame and a Hj212Error for every
    candidate frame (``##`` + 4 digits) that turned out bad. Bytes outside frames are dropped
    silently (counted in `bytes_dropped`). After any bad candidate the reader rescans from the byte
    after its ``##``, so a real frame hidden behind a false header is still found. A candidate is
    given up as soon as a byte that cannot be in a frame (not printable ASCII) shows up in its data
    segment, so a false header in noise does not hold back the frames behind it. At most one
    candidate frame (<= max_data_len + 12 bytes) is kept between calls: memory is bounded.
    With `allow_non_ascii` only control bytes give a candidate up (bytes over 0x7F may be text: such a frame
    comes out as a `NotAscii` error). A frame ends in CRLF; with `allow_lf` in a lone LF too (a frame without
    an end is still refused);
    with `allow_missing_crlf` in a lone CR or LF, before the next ``##``, or right after its CRC.
    """

    def __init__(self, *, max_data_len: int = MAX_DATA_LEN, allow_missing_crlf: bool = False,
                 allow_lf: bool = False, allow_non_ascii: bool = False) -> None:
        if not 0 < max_data_len <= 9999:
            raise ValueError("max_data_len must be 1..9999")
        self.max_data_len = max_data_len
        self.allow_missing_crlf = allow_missing_crlf
        self.allow_lf = allow_lf  # a lone LF ends a frame too (CRLF or LF: a frame still needs its end)
        # Bytes over 0x7F may be in a frame (text in UTF-8 or GBK, from a platform): decoded as NotAscii
        self.allow_non_ascii = allow_non_ascii
        self._never_in_frame = _CONTROL if allow_non_ascii else _NON_PRINTABLE
        self.frames_ok = 0
        self.frames_bad = 0
        self.bytes_dropped = 0
        self._buf = bytearray()
        self._resume = 0  # data bytes of the held candidate already checked for printability
        self._swallow = b""  # CRLF still expected after a frame accepted without it (lenient mode)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame (e.g. after reopening the port)."""
        self._buf.clear()
        self._resume = 0
        self._swallow = b""

    def _bad(self, out: list[Packet | Hj212Error], error: Hj212Error) -> None:
        out.append(error)
        self.frames_bad += 1
        self.bytes_dropped += 1  # the first '#' of the candidate; the rest is rescanned

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet | Hj212Error]:
        out: list[Packet | Hj212Error] = []
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        resume = self._resume
        while self._swallow and pos < n:
            if buf[pos] == self._swallow[0]:
                self._swallow = self._swallow[1:]
            elif buf[pos] == 0x0A and self._swallow == b"\r\n":
                self._swallow = b""  # a lone LF ends the frame
            else:
                self._swallow = b""
                break
            pos += 1
        while True:
            start = buf.find(b"##", pos)
            if start < 0:
                keep = n - 1 if n > pos and buf[n - 1] == 0x23 else n
                self.bytes_dropped += keep - pos
                pos, resume = keep, 0
                break
            if start != pos:
                self.bytes_dropped += start - pos
                pos, resume = start, 0
            if n - pos < 6:
                resume = 0
                break
            digits = bytes(buf[pos + 2 : pos + 6])
            if not digits.isdigit():
                self.bytes_dropped += 1
                pos, resume = pos + 1, 0
                continue
            length = int(digits)
            if length > self.max_data_len:
                self._bad(
                    out, BadLength(f"declared data segment length {length} exceeds {self.max_data_len}")
                )
                pos, resume = pos + 1, 0
                continue
            end = pos + 6 + length + 4  # end of the CRC
            bad = self._never_in_frame.search(buf, max(pos + 6, resume), min(n, end))
            if bad:
                offset = bad.start() - pos - 6
                self._bad(
                    out,
                    Malformed(
                        f"byte 0x{buf[bad.start()]:02X} at data offset {offset} is not printable ASCII"
                    ),
                )
                pos, resume = pos + 1, 0
                continue
            if n < end:
                resume = n
                break
            tail = bytes(buf[end : end + 2])
            swallow = b""
            if tail == b"\r\n":
                frame_end = stop = end + 2
            elif self.allow_lf and tail[:1] == b"\n":
                frame_end, stop = end, end + 1
            elif len(tail) < 2 and b"\r\n".startswith(tail):
                if not self.allow_missing_crlf:
                    resume = end
                    break  # wait for the CRLF
                frame_end, stop, swallow = end, end + len(tail), b"\r\n"[len(tail) :]
            elif self.allow_missing_crlf and tail == b"#":
                resume = end
                break  # the next frame's "##", or a byte that refuses this one: the next byte tells
            elif self.allow_missing_crlf and (tail[:1] in (b"\r", b"\n") or tail == b"##"):
                # A lone CR or LF ends the frame (firmware that sends one of the two), or the next frame
                # begins; any other byte there is a length field gone wrong (the CRC is weak): refused.
                frame_end, stop = end, end + (tail != b"##")
            else:
                frame_end = stop = end + 2
            try:
                packet = decode(
                    bytes(buf[pos:frame_end]),
                    allow_missing_crlf=self.allow_missing_crlf or frame_end == end,
                    max_data_len=self.max_data_len,
                    allow_non_ascii=self.allow_non_ascii,
                )
            except Hj212Error as exc:
                self._bad(out, exc)
                pos, resume = pos + 1, 0
                continue
            out.append(packet)
            self.frames_ok += 1
            pos, resume = stop, 0
            self._swallow = swallow
        del buf[:pos]
        self._resume = max(resume - pos, 0)
        return out


# --- builders --------------------------------------------------------------------------------------


def _st_text(st: str | int) -> str:
    return f"{st:02d}" if isinstance(st, int) else st


def _cn_text(cn: str | int) -> str:
    return f"{cn:04d}" if isinstance(cn, int) else cn


def _check_channel(code: str) -> None:
    if not isinstance(code, str) or not _CHANNEL_RE.fullmatch(code):
        raise ValueError(f"channel code {code!r} must be [A-Za-z0-9_]+ (no '-')")


def _check_flag(code: str, flag: str) -> None:
    if flag not in FLAGS:
        raise ValueError(f"{code}: data flag {flag!r} is not one of {''.join(sorted(FLAGS))}")


def realtime_packet(
    mn: str,
    st: str | int,
    pw: str,
    data_time: datetime,
    items: Mapping[str, tuple[float | int | None, str]],
    qn: str | None = None,
    flag: int = FLAG_V2017,
    *,
    tz: tzinfo | None = None,
    decimals: int | None = None,
) -> Packet:
    """A CN 2011 real-time data packet: ``DataTime=..;<code>-Rtd=v,<code>-Flag=f;...``.

    `items` maps channel code -> (value, data flag). HJ 212 has no null: a None value is sent as
    ``<code>-Flag=<flag>`` alone, without ``-Rtd``. `data_time` is converted to `tz` when given
    (station timezone). `qn` defaults to `make_qn(data_time)`; callers that send several packets
    for the same instant should pass distinct QNs (see QnSource).
    """
    local = _in_tz(data_time, tz)
    groups: list[dict[str, str]] = [{"DataTime": format_time(local)}]
    for code, (value, data_flag) in items.items():
        _check_channel(code)
        _check_flag(code, data_flag)
        group = {} if value is None else {f"{code}-Rtd": format_number(value, decimals)}
        group[f"{code}-Flag"] = data_flag
        groups.append(group)
    return Packet(
        qn=make_qn(local) if qn is None else qn,
        st=_st_text(st),
        cn=CN_REALTIME,
        pw=pw,
        mn=mn,
        flag=flag,
        cp=groups,
    )


_PERIOD_FIELDS = (("cou", "Cou"), ("min", "Min"), ("avg", "Avg"), ("max", "Max"))


def period_packet(
    cn: str | int,
    mn: str,
    st: str | int,
    pw: str,
    data_time: datetime,
    items: Mapping[str, Mapping[str, float | int | str | None]],
    qn: str | None = None,
    flag: int = FLAG_V2017,
    *,
    tz: tzinfo | None = None,
    decimals: int | None = None,
) -> Packet:
    """A CN 2051 (minute), 2061 (hour) or 2031 (day) packet; `data_time` is the period start.

    `items` maps code -> ``{"avg", "min", "max", "cou", "flag"}`` (each optional; None is omitted);
    items are written ``-Cou, -Min, -Avg, -Max, -Flag``.
    """
    cn_text = _cn_text(cn)
    if cn_text not in CN_PERIODS:
        raise ValueError(f"CN {cn!r} is not a period data command ({', '.join(sorted(CN_PERIODS))})")
    local = _in_tz(data_time, tz)
    groups: list[dict[str, str]] = [{"DataTime": format_time(local)}]
    for code, stats in items.items():
        _check_channel(code)
        unknown = set(stats) - {"avg", "min", "max", "cou", "flag"}
        if unknown:
            raise ValueError(f"{code}: unknown statistics {sorted(unknown)}")
        group: dict[str, str] = {}
        for name, suffix in _PERIOD_FIELDS:
            value = stats.get(name)
            if value is not None:
                if isinstance(value, str):
                    raise ValueError(f"{code}: {name} must be a number")
                group[f"{code}-{suffix}"] = format_number(value, decimals)
        data_flag = stats.get("flag")
        if data_flag is not None:
            if not isinstance(data_flag, str):
                raise ValueError(f"{code}: flag must be a str")
            _check_flag(code, data_flag)
            group[f"{code}-Flag"] = data_flag
        if not group:
            raise ValueError(f"{code}: nothing to send (all statistics and the flag are None)")
        groups.append(group)
    return Packet(
        qn=make_qn(local) if qn is None else qn,
        st=_st_text(st),
        cn=cn_text,
        pw=pw,
        mn=mn,
        flag=flag,
        cp=groups,
    )


def realtime_items(packet: Packet) -> dict[str, tuple[float | None, str | None]]:
    """Inverse of `realtime_packet`: code -> (Rtd value or None, Flag or None).

    Codes that have neither ``-Rtd`` nor ``-Flag`` are left out; an empty ``-Rtd`` reads as None.
    Raises Malformed when an Rtd value is not a number.
    """
    result: dict[str, tuple[float | None, str | None]] = {}
    for code, fields in packet.pollutants().items():
        if "Rtd" not in fields and "Flag" not in fields:
            continue
        rtd = fields.get("Rtd")
        value = None if rtd is None or rtd == "" else parse_number(rtd, f"{code}-Rtd")
        result[code] = (value, fields.get("Flag"))
    return result


def period_items(packet: Packet) -> dict[str, dict[str, float | str | None]]:
    """Inverse of `period_packet`: code -> {"cou", "min", "avg", "max": float | None, "flag": str | None}."""
    result: dict[str, dict[str, float | str | None]] = {}
    for code, fields in packet.pollutants().items():
        if not any(suffix in fields for _, suffix in _PERIOD_FIELDS) and "Flag" not in fields:
            continue
        stats: dict[str, float | str | None] = {}
        for name, suffix in _PERIOD_FIELDS:
            text = fields.get(suffix)
            stats[name] = None if text is None or text == "" else parse_number(text, f"{code}-{suffix}")
        stats["flag"] = fields.get("Flag")
        result[code] = stats
    return result


def _reply(request: Packet, cn: str, cp: list[dict[str, str]]) -> Packet:
    # Our own version (2017: the only one spoken), whatever the request says (a request of another
    # version is answered QnRtn=6 in 2017's terms); no answer requested, not split.
    return Packet(qn=request.qn, st=ST_SYSTEM, cn=cn, pw=request.pw, mn=request.mn, flag=FLAG_V2017, cp=cp)


def reply_9011(request: Packet, qn_rtn: int = 1) -> Packet:
    """Request answer (CN 9011, ``QnRtn``: 1 ok, 2 refused, 3..9 PW/MN/ST/Flag/QN/CN/CRC error)."""
    return _reply(request, CN_REQUEST_ANSWER, [{"QnRtn": str(int(qn_rtn))}])


def reply_9012(request: Packet, exe_rtn: int = 1) -> Packet:
    """Execution result (CN 9012, ``ExeRtn``: 1 ok, 2 failed, 100 no data)."""
    return _reply(request, CN_EXECUTION_RESULT, [{"ExeRtn": str(int(exe_rtn))}])


def ack_9014(request: Packet) -> Packet:
    """Data acknowledgement (CN 9014, empty CP) for a data packet that requested an answer."""
    return _reply(request, CN_DATA_ACK, [])


# --- code tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeTable:
    """One code table of agent/data/hj212_codes.yaml, with the standard it comes from."""

    name: str
    standard: str
    year: int
    description: str
    codes: Mapping[str, Mapping[str, str]]

    def meaning(self, code: str) -> str | None:
        entry = self.codes.get(code)
        return None if entry is None else entry.get("meaning")


@functools.cache
def codes(path: str | Path | None = None) -> Mapping[str, CodeTable]:
    """The HJ 212 code tables (pollutants, systems, commands, data_flags, qn_rtn, exe_rtn, ...).

    Read once from the packaged ``agent/data/hj212_codes.yaml`` (or `path`); codes are strings.
    """
    if path is None:
        text = importlib.resources.files("agent").joinpath("data/hj212_codes.yaml").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("tables"), dict):
        raise ValueError("HJ 212 code tables: top-level 'tables' mapping missing")
    tables: dict[str, CodeTable] = {}
    for name, table in document["tables"].items():
        if not isinstance(table, dict) or not {"standard", "year", "codes"} <= set(table):
            raise ValueError(f"HJ 212 code table {name!r} needs standard, year and codes")
        entries = {
            str(code): MappingProxyType({str(k): str(v) for k, v in (entry or {}).items()})
            for code, entry in table["codes"].items()
        }
        tables[str(name)] = CodeTable(
            name=str(name),
            standard=str(table["standard"]),
            year=int(table["year"]),
            description=str(table.get("description", "")),
            codes=MappingProxyType(entries),
        )
    return MappingProxyType(tables)
