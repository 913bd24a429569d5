"""A Modbus register map entry (`registers:` in a device or a profile) as a plain dataclass.

Pydantic validates it inside the config (see `agent.config`) and in `drivers.profiles`; drivers use it
as is. Decoding lives in `drivers.modbus_codec`; grouping into requests in `drivers.planner`.
Imports nothing from `agent` but `agent.model`.

An entry is either a measurement (`role: value`, the default: one reading per poll) or a status word
(`role: status`: no reading of its own; its value sets the HJ 212 flag of the device's readings):

    - {channel: w01018, address: 0x42, type: float32, order: DCBA, unit: mg/L, range: [0, 2000]}
    - {channel: i12001, address: 0x44, role: status, flags: {0: N, 1: M, 2: D, 3: C, 7: N, 9: N}}
    - {channel: flag, address: 0x45, role: status, ascii: low}        # 'N', 'M', 'D', ... as a byte
    - {channel: alarm, address: 0x46, role: status, bits: {0: D, 3: M}, applies_to: [w01018]}

A status word says how to read it in exactly one way:
- `flags: {value: FLAG}`: the (integer) status value looked up in the map;
- `ascii: high|low`: the flag letter is an ASCII byte in the high or low byte of a 16-bit register;
  `flags: {letter: FLAG}` may translate vendor letters (`{K: C}`); an HJ 212 letter stands for itself;
- `bits: {bit: FLAG}`: every set bit that is listed contributes its flag (0 = least significant).
A value that the map does not know (or a byte that is no letter) gives `default_flag` (D: data that
cannot be vouched for is not reported as normal). `applies_to` lists the channels it flags (default: all
`role: value` channels of the device). `range: [min, max]` is the instrument's measuring range: a value
above max gets flag T (HJ 212 has no flag below range; min is kept for simulators and documentation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field

from agent.model import FLAGS

RegisterType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Table = Literal["holding", "input", "coil", "discrete"]
Role = Literal["value", "status"]
AsciiByte = Literal["high", "low"]

# 16-bit registers per value (bit tables: one bit per value).
REGISTER_COUNTS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
BIT_TABLES = frozenset({"coil", "discrete"})
INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64", "bool"})
CHANNEL_RE = re.compile(r"[A-Za-z0-9_]+")


def _check_channel(channel: str) -> str:
    if not CHANNEL_RE.fullmatch(channel):
        raise ValueError(f"{channel!r} must be letters, digits and _ only")
    return channel


# Register numbers of manuals: (table, first 5-digit number, first 6-digit number), counted from 1.
_REFERENCE_BLOCKS: tuple[tuple[Table, int, int], ...] = (("input", 30001, 300001), ("holding", 40001, 400001))


def register_reference(number: int) -> tuple[Table, int] | None:
    """(table, 0-based protocol address) of a register written in the "Modicon" numbering of manuals,
    when `number` is one: 30001..39999 and 300001..365536 are input registers, 40001..49999 and
    400001..465536 holding registers, counted from 1 (register 40001 is address 0 of holding)."""
    for table, five, six in _REFERENCE_BLOCKS:
        if five <= number <= five + 9998:
            return table, number - five
        if six <= number <= six + 0xFFFF:
            return table, number - six
    return None


def _check_address(address: int) -> int:
    if not 0 <= address <= 0xFFFF:
        reference = register_reference(address)
        hint = f": register {address} is address {reference[1]} of {reference[0]}" if reference else ""
        raise ValueError(f"{address} is outside 0..65535 (0-based protocol address{hint})")
    return address


# Checked field by field when pydantic validates an entry (every problem of an entry reported at once),
# and again by __post_init__ for an entry built directly.
ChannelName = Annotated[str, AfterValidator(_check_channel)]
Address = Annotated[int, AfterValidator(_check_address), Field(json_schema_extra={"minimum": 0, "maximum": 0xFFFF})]
_FLAG_LETTERS = "".join(sorted(FLAGS))


def _check_flag(where: str, flag: object) -> str:
    if not isinstance(flag, str) or flag not in FLAGS:
        raise ValueError(f"{where}: {flag!r} is not an HJ 212 flag (one of {', '.join(_FLAG_LETTERS)})")
    return flag


@dataclass(frozen=True)
class RegisterSpec:
    """One channel read from a Modbus device: where it is, how to decode it, how to scale it.

    `address` is the 0-based protocol address in `table`; the value occupies `count` registers (bits
    for coil/discrete) from there. Status entries (`role: status`) carry `flags`/`ascii`/`bits`,
    `default_flag` and `applies_to`; measurement entries may carry `range`. See the module docstring.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    channel: ChannelName
    address: Address
    type: RegisterType = "uint16"
    order: WordOrder = "ABCD"
    table: Table = "holding"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    role: Role = "value"
    range: tuple[float, float] | None = None
    flags: dict[int | str, str] | None = None
    ascii: AsciiByte | None = None
    bits: dict[int, str] | None = None
    default_flag: str = "D"
    applies_to: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Runs on direct construction and after pydantic validated the fields. A bit table holds bits:
        # the default type (uint16) there means bool, so `{table: coil, address: 3}` is enough.
        if self.table in BIT_TABLES and self.type != "bool":
            if self.type != "uint16":
                raise ValueError(f"type: {self.table} entries are bits; use type bool, not {self.type}")
            object.__setattr__(self, "type", "bool")
        for key, check in (("channel", _check_channel), ("address", _check_address)):  # built directly
            try:
                check(getattr(self, key))
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        if self.address + self.count > 0x10000:
            raise ValueError(f"address: a {self.type} at {self.address} runs past register 65535")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale: {self.scale} must be a finite number other than 0")
        if not math.isfinite(self.offset):
            raise ValueError(f"offset: {self.offset} must be finite")
        if self.range is not None:
            object.__setattr__(self, "range", tuple(self.range))  # a list when built directly
            if len(self.range) != 2:
                raise ValueError(f"range: {list(self.range)} must be [min, max]")
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"range: [{lo}, {hi}] must be two finite numbers, min < max")
        _check_flag("default_flag", self.default_flag)
        if self.role == "status":
            self._check_status()
        else:
            for key in ("flags", "ascii", "bits", "applies_to"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for a status word (add `role: status`)")

    def _check_status(self) -> None:
        if self.range is not None:
            raise ValueError("range: a status word has no measuring range")
        if self.type not in INTEGER_TYPES:
            raise ValueError(f"type: a status word must be an integer type or bool, not {self.type}")
        modes = [k for k in ("ascii", "bits") if getattr(self, k) is not None]
        if self.flags is not None and self.ascii is None:
            modes.append("flags")
        if len(modes) != 1:
            raise ValueError("role: status needs exactly one of `flags: {value: FLAG}`, `ascii: high|low`, "
                             f"`bits: {{bit: FLAG}}` (got {', '.join(modes) or 'none'})")
        if self.ascii is not None:
            if self.type not in ("uint16", "int16"):
                raise ValueError(f"ascii: the flag letter is a byte of a 16-bit register, not a {self.type}")
            letters: dict[int | str, str] = {}
            for key, flag in (self.flags or {}).items():
                if not (isinstance(key, str) and len(key) == 1 and key.isascii() and key.isprintable()):
                    raise ValueError(f"flags: with ascii the keys are single letters, not {key!r}")
                letters[key] = _check_flag(f"flags.{key}", flag)
            object.__setattr__(self, "flags", letters or None)
        elif self.flags is not None:
            values: dict[int | str, str] = {}
            for key, flag in self.flags.items():
                try:
                    number = int(key)
                except ValueError:
                    raise ValueError(f"flags: key {key!r} is not an integer status value") from None
                values[number] = _check_flag(f"flags.{key}", flag)
            object.__setattr__(self, "flags", values)
        else:
            width = 16 * self.count if self.type != "bool" else 1
            for bit, flag in (self.bits or {}).items():
                if not 0 <= bit < width:
                    raise ValueError(f"bits: bit {bit} is outside 0..{width - 1} of a {self.type}")
                _check_flag(f"bits.{bit}", flag)
        if self.applies_to is not None:
            if isinstance(self.applies_to, str):
                object.__setattr__(self, "applies_to", (self.applies_to,))
            object.__setattr__(self, "applies_to", tuple(self.applies_to))
            if not self.applies_to:
                raise ValueError("applies_to: empty; leave it out to flag every channel of the device")
            for name in self.applies_to:
                if not CHANNEL_RE.fullmatch(name):
                    raise ValueError(f"applies_to: {name!r} is not a channel name")

    def __hash__(self) -> int:  # the dict fields make the generated hash fail; equal specs share these
        return hash((self.channel, self.table, self.address, self.type, self.order, self.role))

    @property
    def count(self) -> int:
        """Registers (bits for coil/discrete) this entry occupies."""
        return REGISTER_COUNTS[self.type]

    @property
    def end(self) -> int:
        """First address after this entry."""
        return self.address + self.count


def value_channels(specs: Iterable[RegisterSpec]) -> list[str]:
    """The channels that produce readings (`role: value`), in map order."""
    return [s.channel for s in specs if s.role == "value"]


def check_map(specs: Iterable[RegisterSpec]) -> None:
    """Checks a whole device map (after a profile and inline entries were merged): channel names
    unique, every `applies_to` names a measurement channel of the same map. Raises ValueError."""
    specs = list(specs)
    seen: set[str] = set()
    for spec in specs:
        if spec.channel in seen:
            raise ValueError(f"channel {spec.channel!r} appears twice in the register map")
        seen.add(spec.channel)
    values = set(value_channels(specs))
    for spec in specs:
        for name in spec.applies_to or ():
            if name not in values:
                raise ValueError(f"{spec.channel}.applies_to: {name!r} is not a measurement channel of "
                                 f"this map (known: {', '.join(sorted(values)) or 'none'})")


def as_dict(spec: RegisterSpec) -> dict[str, object]:
    """The entry as YAML-ready data, without keys that are at their default."""
    out: dict[str, object] = {}
    for name, default in _DEFAULTS.items():
        value = getattr(spec, name)
        if value != default:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


_DEFAULTS: Mapping[str, object] = {
    "channel": None,
    "address": None,
    "type": "uint16",
    "order": "ABCD",
    "table": "holding",
    "scale": 1.0,
    "offset": 0.0,
    "unit": None,
    "role": "value",
    "range": None,
    "flags": None,
    "ascii": None,
    "bits": None,
    "default_flag": "D",
    "applies_to": None,
}


def overlaps(specs: Iterable[RegisterSpec]) -> list[tuple[RegisterSpec, RegisterSpec]]:
    """Pairs of entries that read some of the same registers (or bits) of one table: a misplaced
    address, usually (a float32 at 0 and another at 1)."""
    by_table: dict[str, list[RegisterSpec]] = {}
    for spec in specs:
        by_table.setdefault(spec.table, []).append(spec)
    out = []
    for items in by_table.values():
        items.sort(key=lambda s: s.address)
        for i, a in enumerate(items):
            for b in items[i + 1:]:
                if b.address >= a.address + a.count:
                    break
                out.append((a, b))
    return out
