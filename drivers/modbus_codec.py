"""Modbus value codec: 16-bit registers (or coil bits) <-> values, status words -> HJ 212 flags.

Pure functions, no I/O; used by the Modbus driver, the simulators and the tests. Imports nothing from
`agent` but `agent.model`.

Byte placement. A value's bytes in big-endian order are called A B C D (32 bits) or A B C D E F G H
(64 bits), A the most significant; `rN` is the N-th register on the wire (lowest address first), each
register written high byte first:

    32 bits   r0    r1                 64 bits   r0    r1    r2    r3
    ABCD      A B   C D                ABCD      A B   C D   E F   G H   most significant word first
    CDAB      C D   A B                CDAB      G H   E F   C D   A B   words reversed
    BADC      B A   D C                BADC      B A   D C   F E   H G   bytes swapped in each word
    DCBA      D C   B A                DCBA      H G   F E   D C   B A   fully little-endian

    16 bits   r0
    ABCD      A B      the register as transmitted (Modbus registers are big-endian on the wire)
    CDAB      A B      one word: nothing to reverse
    BADC      B A      bytes swapped
    DCBA      B A      little-endian

So CDAB reverses the word order, BADC swaps the bytes inside every word, DCBA does both; the same rule
holds for a one-register value, whose bytes BADC and DCBA swap (SPEC §2: "BADC (byte-swapped), DCBA
(little-endian)"). `bool` is one coil/discrete bit, or a register that is non-zero (byte order is
irrelevant to "non-zero").

Value = raw × scale + offset, computed in decimal from the shortest representation of each number, so
that int16 1234 × 0.01 is 12.34 (not 12.340000000000002) and a float32 123.456 is reported as 123.456
(not 123.45600128173828, which is only the float32 nearest to what the instrument meant).

NaN and ±inf from an instrument: `decode` returns None and `evaluate` gives flag D. Analyzers send NaN
for "no valid measurement" (lamp off, reagent empty, between cycles after a fault); JSON and HJ 212
cannot carry it, and a reading with value null must say why: D (instrument fault) is the honest flag.
`encode` accepts NaN/inf for float types so that simulators can reproduce this.

Flags from a value: T when above `range` max, D when non-finite. Flags from a status word:
`flag_from_status`. Several flags for one reading: `combine_flags` keeps the most severe one.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from decimal import Decimal

from agent.model import FLAG_FAULT, FLAG_NORMAL, FLAG_OVER_RANGE
from drivers.registers import REGISTER_COUNTS, RegisterSpec, RegisterType, WordOrder

__all__ = [
    "FLAG_PRECEDENCE",
    "combine_flags",
    "decode",
    "decode_raw",
    "encode",
    "encode_raw",
    "evaluate",
    "flag_from_status",
    "register_count",
    "status_flags_by_channel",
]

# struct format (big-endian) of each multi-byte type; bool handled apart.
_FORMATS: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}
_INT_RANGES: dict[str, tuple[int, int]] = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}

# Most severe first. A missing answer (B) or fault (D) means the value cannot be trusted at all; the
# instrument's own state (stopped, maintenance, calibration) explains a value better than "over range"
# does (a calibration standard may well be above the range); S and T qualify a value that is real.
FLAG_PRECEDENCE = "BDFMCSTN"
_RANK = {flag: i for i, flag in enumerate(FLAG_PRECEDENCE)}


def register_count(type_: RegisterType) -> int:
    """16-bit registers a value of `type_` occupies (1 bit for bool in a coil/discrete table)."""
    return REGISTER_COUNTS[type_]


def _words_to_bytes(words: Sequence[int], order: WordOrder) -> bytes:
    """Registers as received -> the value's bytes in big-endian order (A first)."""
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise ValueError(f"register value {w!r} is not a 16-bit unsigned integer")
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if order in ("BADC", "DCBA"):
        data = bytes(data[i ^ 1] for i in range(len(data)))
    return data


def _bytes_to_words(data: bytes, order: WordOrder) -> list[int]:
    """The value's big-endian bytes -> registers as they go on the wire."""
    if order in ("BADC", "DCBA"):
        data = bytes(data[i ^ 1] for i in range(len(data)))
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    return words


def decode_raw(words: Sequence[int], type_: RegisterType, order: WordOrder = "ABCD") -> int | float | bool:
    """The raw value in `words` (exactly `register_count(type_)` registers, or one bit for bool).

    Raises ValueError for a wrong number of registers or a register outside 0..65535.
    """
    n = REGISTER_COUNTS[type_]
    if len(words) != n:
        raise ValueError(f"{type_} needs {n} register(s), got {len(words)}")
    if type_ == "bool":
        w = words[0]
        if isinstance(w, bool):
            return w
        if not 0 <= w <= 0xFFFF:
            raise ValueError(f"register value {w!r} is not a 16-bit unsigned integer")
        return w != 0
    data = _words_to_bytes(words, order)
    (raw,) = struct.unpack(_FORMATS[type_], data)
    if type_ == "float32" and math.isfinite(raw):
        raw = _shortest_float32(raw, data)
    return raw


def encode_raw(raw: int | float | bool, type_: RegisterType, order: WordOrder = "ABCD") -> list[int]:
    """Inverse of `decode_raw`: the registers (or the bit as 0/1) that carry `raw`.

    Integers must fit the type (ValueError otherwise); a float too large for float32 is an error too.
    """
    if type_ == "bool":
        return [1 if raw else 0]
    if type_ in _INT_RANGES:
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError(f"{raw!r} is not an integer; a {type_} holds integers")
            raw = int(raw)
        lo, hi = _INT_RANGES[type_]
        if not lo <= raw <= hi:
            raise ValueError(f"{raw} does not fit a {type_} ({lo}..{hi})")
    try:
        data = struct.pack(_FORMATS[type_], raw)
    except (OverflowError, struct.error) as exc:
        raise ValueError(f"{raw!r} does not fit a {type_}: {exc}") from None
    return _bytes_to_words(data, order)


def _shortest_float32(raw: float, data: bytes) -> float:
    """The shortest decimal that packs back to the same float32 bits (as a Python float)."""
    for digits in (6, 7, 8):
        candidate = float(f"{raw:.{digits}g}")
        if struct.pack(">f", candidate) == data:
            return candidate
    return raw  # 9 significant digits always round-trip: `raw` itself


def _dec(x: float | int) -> Decimal:
    return Decimal(x) if isinstance(x, int) else Decimal(repr(x))


def _scaled(raw: int | float | bool, spec: RegisterSpec) -> float:
    if isinstance(raw, bool):
        raw = int(raw)
    if spec.scale == 1.0 and spec.offset == 0.0:
        return float(raw)
    return float(_dec(raw) * _dec(spec.scale) + _dec(spec.offset))


def decode(words: Sequence[int], spec: RegisterSpec) -> float | None:
    """raw × scale + offset for the registers of `spec` (see the module docstring); None for NaN/inf."""
    raw = decode_raw(words, spec.type, spec.order)
    if isinstance(raw, float) and not math.isfinite(raw):
        return None
    value = _scaled(raw, spec)
    return value if math.isfinite(value) else None  # a float64 near the limit times a scale


def encode(value: float, spec: RegisterSpec) -> list[int]:
    """Inverse of `decode`: the registers an instrument sends for `value` (for simulators, tests and
    writes). (value − offset) / scale is rounded to the nearest integer for integer types (a value
    that then does not fit the type is a ValueError); NaN/inf only for float types."""
    if spec.type == "bool" and isinstance(value, bool):
        return encode_raw(value, "bool")
    if not math.isfinite(value):
        if spec.type not in ("float32", "float64"):
            raise ValueError(f"{value} cannot be sent as a {spec.type}")
        return encode_raw(value, spec.type, spec.order)
    if spec.scale == 1.0 and spec.offset == 0.0:
        raw_dec = _dec(value)
    else:
        raw_dec = (_dec(value) - _dec(spec.offset)) / _dec(spec.scale)
    if spec.type in ("float32", "float64"):
        raw_float = float(raw_dec)
        if not math.isfinite(raw_float):
            raise ValueError(f"{value} does not fit a {spec.type} with scale {spec.scale}")
        return encode_raw(raw_float, spec.type, spec.order)
    raw_int = int(raw_dec.to_integral_value())
    if spec.type == "bool":
        return [1 if raw_int else 0]
    return encode_raw(raw_int, spec.type, spec.order)


def evaluate(words: Sequence[int], spec: RegisterSpec) -> tuple[float | None, str]:
    """(value, flag) of a measurement read without error: (None, D) for NaN/inf, T above `range`
    max, N otherwise. The device's status flag is combined by the caller (`combine_flags`)."""
    value = decode(words, spec)
    if value is None:
        return None, FLAG_FAULT
    if spec.range is not None and value > spec.range[1]:
        return value, FLAG_OVER_RANGE
    return value, FLAG_NORMAL


def flag_from_status(words: Sequence[int], spec: RegisterSpec) -> str:
    """The HJ 212 flag a status word (`role: status`) says, from its registers as read.

    `flags`: the raw integer (scale and offset are not applied) looked up in the map; `ascii`: the
    high or low byte as a letter (case-insensitive), an HJ 212 letter standing for itself unless
    `flags` maps it; `bits`: the most severe flag of the listed bits that are set, N when none is.
    Anything the map does not know gives `default_flag`.
    """
    if spec.role != "status":
        raise ValueError(f"{spec.channel} is not a status word (role: {spec.role})")
    if spec.ascii is not None:
        word = int(decode_raw(words, "uint16"))
        byte = (word >> 8) & 0xFF if spec.ascii == "high" else word & 0xFF
        letter = chr(byte)
        if spec.flags:
            mapped = spec.flags.get(letter, spec.flags.get(letter.upper()))
            if mapped is not None:
                return mapped
        upper = letter.upper()
        if byte < 0x80 and upper.isalpha() and upper in FLAG_PRECEDENCE:
            return upper
        return spec.default_flag
    raw = int(decode_raw(words, spec.type, spec.order))
    if spec.bits is not None:
        unsigned = raw & ((1 << (16 * spec.count)) - 1) if spec.type != "bool" else raw
        return combine_flags(flag for bit, flag in spec.bits.items() if unsigned >> bit & 1)
    assert spec.flags is not None  # RegisterSpec guarantees one mode
    return spec.flags.get(raw, spec.default_flag)


def combine_flags(flags: Iterable[str]) -> str:
    """The most severe of `flags` in `FLAG_PRECEDENCE` order (B D F M C S T N); N for none."""
    best = FLAG_NORMAL
    for flag in flags:
        if _RANK[flag] < _RANK[best]:
            best = flag
    return best


def status_flags_by_channel(
    status: Iterable[tuple[RegisterSpec, str]], channels: Iterable[str]
) -> dict[str, str]:
    """Spreads each status word's flag over the channels it applies to (`applies_to`, default all of
    `channels`): the flag each measurement channel inherits from the device's status words, N when
    none speaks for it. `status` pairs a status spec with its flag (from `flag_from_status`, or the
    failure flag when the status word itself could not be read)."""
    result: dict[str, str] = dict.fromkeys(channels, FLAG_NORMAL)
    for spec, flag in status:
        targets: Iterable[str] = spec.applies_to if spec.applies_to is not None else list(result)
        for name in targets:
            if name in result:
                result[name] = combine_flags((result[name], flag))
    return result
