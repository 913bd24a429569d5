"""A provincial platform's reader of HJ 212-2017 packets carried in MQTT messages (`mqtt.payload: hj212`),
written from SPEC.md §4 and DOMAIN.md alone: it imports nothing from agent/ or drivers/ (its CRC is the test
platform's, `hj212_platform.crc212`). Each MQTT message
must hold exactly one packet: ``##`` + 4-digit data-segment length + data segment + 4 hex CRC + CRLF, the
length right, the CRC right (DOMAIN.md's algorithm, not Modbus's), the data segment at most 1024
characters. `read` returns what a platform would store, and the list of every rule the message broke."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from hj212_platform import crc212  # the test platform's, from DOMAIN.md (checked against its examples)

MAX_SEGMENT = 1024  # DOMAIN.md: the data segment is at most 1024 characters
PLAIN_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")  # no exponent, no "+", no "inf"/"nan"
QN_TEXT = re.compile(r"[0-9]{17}")
TIME_TEXT = re.compile(r"[0-9]{14}")
HEAD_ORDER = ("QN", "ST", "CN", "PW", "MN", "Flag")


@dataclass
class Received:
    """One MQTT message read as an HJ 212 packet."""

    raw: bytes
    head: dict[str, str] = field(default_factory=dict)
    groups: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def cn(self) -> str | None:
        return self.head.get("CN")

    def item(self, key: str) -> str | None:
        for group in self.groups:
            if key in group:
                return group[key]
        return None

    def codes(self) -> dict[str, dict[str, str]]:
        """`{"w01018": {"Rtd": "23.4", "Flag": "N"}}` from the items named `<code>-<field>`."""
        out: dict[str, dict[str, str]] = {}
        for group in self.groups:
            for key, value in group.items():
                if "-" in key:
                    code, _, name = key.partition("-")
                    out.setdefault(code, {})[name] = value
        return out

    def data_time(self, tz: str) -> datetime:
        return datetime.strptime(self.item("DataTime") or "", "%Y%m%d%H%M%S").replace(tzinfo=ZoneInfo(tz))


def read(raw: bytes) -> Received:
    """Checks the frame, the CRC and the segment's grammar; fills head and CP groups as far as they parse."""
    r = Received(raw)
    m = re.fullmatch(rb"##([0-9]{4})(.*)([0-9A-Fa-f]{4})\r\n", raw, re.DOTALL)
    if not m:
        r.problems.append(f"not one frame ##LLLL...CRC\\r\\n: {raw[:40]!r}...{raw[-10:]!r}")
        return r
    segment = m.group(2)
    if int(m.group(1)) != len(segment):
        r.problems.append(f"length field {m.group(1).decode()} but segment has {len(segment)} bytes")
    if len(segment) > MAX_SEGMENT:
        r.problems.append(f"segment of {len(segment)} characters exceeds {MAX_SEGMENT}")
    if int(m.group(3), 16) != crc212(segment):
        r.problems.append(f"CRC {m.group(3).decode()} but segment's CRC is {crc212(segment):04X}")
    if m.group(3).decode() != m.group(3).decode().upper():
        r.problems.append("CRC not written in upper case")
    try:
        text = segment.decode("ascii")
    except UnicodeDecodeError:
        r.problems.append("segment is not ASCII")
        return r
    if "##" in text or "\r" in text or "\n" in text:
        r.problems.append("a second packet or a line break inside the segment")
    head_text, sep, rest = text.partition("CP=&&")
    if not sep or not rest.endswith("&&"):
        r.problems.append("no CP=&&...&& at the end of the segment")
        return r
    fields = head_text.split(";")
    if fields[-1] != "":
        r.problems.append("header does not end with ';' before CP")
    for f in fields[:-1]:
        key, eq, value = f.partition("=")
        if not eq or key in r.head:
            r.problems.append(f"bad or repeated header field {f!r}")
        r.head[key] = value
    known = [k for k in r.head if k in HEAD_ORDER]
    if known != [k for k in HEAD_ORDER if k in r.head]:
        r.problems.append(f"header fields out of the standard's order: {list(r.head)}")
    cp = rest[:-2]
    if cp:
        for group_text in cp.split(";"):
            group: dict[str, str] = {}
            for item in group_text.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key or "&" in item:
                    r.problems.append(f"bad CP item {item!r}")
                group[key] = value
            r.groups.append(group)
    return r


def qn_problem(qn: str | None) -> str | None:
    """Why a QN is not YYYYMMDDhhmmsszzz, or None."""
    if qn is None or not QN_TEXT.fullmatch(qn):
        return f"QN {qn!r} is not 17 digits"
    try:
        datetime.strptime(qn[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return f"QN {qn!r} is not a date"
    return None


def number_problem(text: str | None) -> str | None:
    if text is None or not PLAIN_DECIMAL.fullmatch(text):
        return f"{text!r} is not a plain decimal number"
    return None
