"""A second, stricter HJ 212-2017 checker written from DOMAIN.md and SPEC.md §4 alone (audit audhj): it
imports nothing from agent/, drivers/ or the other test platforms, so a mistake shared by the agent's codec
and the first test platform (tests/hj212_platform.py) does not hide here.

`check(raw)` returns a `Checked` packet with every rule it broke in `problems`; `StrictPlatform` is a TCP
platform that records every byte stream it gets as checked packets and answers data with 9014.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field

MAX_SEGMENT = 1024  # DOMAIN.md: data segment at most 1024 characters, packet at most 1036 bytes
DATA_FLAGS = set("NFMSDCTB")  # DOMAIN.md: data flags
SYSTEM_CODES = {"21", "22", "23", "31", "32", "39", "91"}
PLAIN_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")  # no exponent, no '+', no leading zeros
TIME14 = re.compile(r"[0-9]{14}")
HEAD = ("QN", "ST", "CN", "PW", "MN", "Flag")


def crc_hj212(data: bytes) -> int:
    """DOMAIN.md, literally: init 0xFFFF; crc = (crc >> 8) ^ byte; then 8 times shift right and xor
    0xA001 when the bit shifted out was 1."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ byte
        for _ in range(8):
            lsb = crc & 1
            crc >>= 1
            if lsb:
                crc ^= 0xA001
    return crc


def build(segment: str) -> bytes:
    """A frame around `segment` (for requests a test platform sends)."""
    data = segment.encode("ascii")
    return b"##" + f"{len(data):04d}".encode() + data + f"{crc_hj212(data):04X}".encode() + b"\r\n"


def valid_time(text: str) -> bool:
    if not TIME14.fullmatch(text):
        return False
    y, mo, d, h, mi, s = (int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14)))
    return 1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 60 and y >= 2000


@dataclass
class Checked:
    raw: bytes
    head: dict[str, str] = field(default_factory=dict)
    groups: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def cn(self) -> str:
        return self.head.get("CN", "")

    @property
    def qn(self) -> str:
        return self.head.get("QN", "")

    @property
    def flag(self) -> int:
        return int(self.head.get("Flag", "0") or 0)

    def item(self, key: str) -> str | None:
        for g in self.groups:
            if key in g:
                return g[key]
        return None

    def codes(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for g in self.groups:
            for key, value in g.items():
                code, sep, name = key.partition("-")
                if sep:
                    out.setdefault(code, {})[name] = value
        return out


def check(raw: bytes) -> Checked:  # noqa: C901 - one rule after the other, as a platform reads
    c = Checked(raw)
    p = c.problems
    if len(raw) > MAX_SEGMENT + 12:
        p.append(f"packet of {len(raw)} bytes exceeds {MAX_SEGMENT + 12}")
    if raw[:2] != b"##":
        p.append("no ## at start")
        return c
    if raw[-2:] != b"\r\n":
        p.append("no CRLF at end")
    length_text = raw[2:6]
    if not re.fullmatch(rb"[0-9]{4}", length_text):
        p.append(f"length field {length_text!r}")
        return c
    n = int(length_text)
    segment = raw[6:6 + n]
    crc_text = raw[6 + n:10 + n]
    if 6 + n + 4 + 2 != len(raw):
        p.append(f"length {n} does not fit the frame of {len(raw)} bytes")
    if n > MAX_SEGMENT:
        p.append(f"data segment {n} > {MAX_SEGMENT}")
    if not re.fullmatch(rb"[0-9A-F]{4}", crc_text):
        p.append(f"CRC text {crc_text!r} is not 4 upper-case hex digits")
    elif int(crc_text, 16) != crc_hj212(segment):
        p.append(f"CRC {crc_text.decode()} != {crc_hj212(segment):04X}")
    if re.search(rb"[^\x21-\x7e]", segment):
        p.append("segment holds a byte that is not printable ASCII without space")
    text = segment.decode("ascii", "replace")
    if not text.startswith("QN="):
        p.append("segment does not start with QN=")
    if not text.endswith("&&"):
        p.append("segment does not end with &&")
    at = text.find("CP=&&")
    if at < 0:
        p.append("no CP=&&")
        return c
    head_text, cp = text[:at], text[at + 5:-2]
    if not head_text.endswith(";"):
        p.append("no ; before CP")
    keys = []
    for part in head_text.rstrip(";").split(";"):
        k, eq, v = part.partition("=")
        if not eq:
            p.append(f"header part {part!r}")
            continue
        if k in c.head:
            p.append(f"header {k} twice")
        c.head[k] = v
        keys.append(k)
    want = list(HEAD) + (["PNUM", "PNO"] if "PNUM" in c.head else [])
    if keys != want:
        p.append(f"header keys {keys} (want {want})")
    qn = c.head.get("QN", "")
    if not (re.fullmatch(r"[0-9]{17}", qn) and valid_time(qn[:14]) and int(qn[14:]) < 1000):
        p.append(f"QN {qn!r} is not YYYYMMDDhhmmsszzz")
    if c.head.get("ST") not in SYSTEM_CODES:
        p.append(f"ST {c.head.get('ST')!r} not a system code")
    if not re.fullmatch(r"[0-9]{4}", c.head.get("CN", "")):
        p.append(f"CN {c.head.get('CN')!r}")
    if len(c.head.get("PW", "")) > 6:
        p.append("PW longer than 6")
    if not 1 <= len(c.head.get("MN", "")) <= 24:
        p.append("MN not 1..24 characters")
    flag_text = c.head.get("Flag", "")
    if not re.fullmatch(r"[0-9]+", flag_text):
        p.append(f"Flag {flag_text!r}")
    else:
        flag = int(flag_text)
        if flag >> 2 != 1:
            p.append(f"Flag {flag}: version bits are not 2017's 000001")
        if bool(flag & 2) != ("PNUM" in c.head):
            p.append(f"Flag {flag}: D bit and PNUM/PNO disagree")
    if "PNUM" in c.head:
        pnum, pno = c.head.get("PNUM", ""), c.head.get("PNO", "")
        if not (pnum.isdigit() and pno.isdigit() and 1 <= int(pno) <= int(pnum)):
            p.append(f"PNUM/PNO {pnum}/{pno}")
    if cp:
        for g in cp.split(";"):
            group: dict[str, str] = {}
            if not g:
                p.append("empty CP group")
            for item in g.split(","):
                k, eq, v = item.partition("=")
                if not eq or not k or "=" in v or "&" in item:
                    p.append(f"CP item {item!r}")
                    continue
                if k in group:
                    p.append(f"CP key {k} twice in a group")
                group[k] = v
            c.groups.append(group)
    seen: set[str] = set()
    for g in c.groups:
        for k, v in g.items():
            if k in seen and k != "DataTime":
                p.append(f"CP key {k} twice in the packet")
            seen.add(k)
            code, sep, name = k.partition("-")
            if not sep:
                if k in ("DataTime", "SystemTime", "BeginTime", "EndTime") and not valid_time(v):
                    p.append(f"{k}={v!r} is not YYYYMMDDhhmmss")
                continue
            if name in ("Rtd", "Avg", "Min", "Max", "Cou"):
                if not PLAIN_NUMBER.fullmatch(v) or v == "-0":
                    p.append(f"{k}={v!r} is not a plain decimal")
            elif name == "Flag":
                if v not in DATA_FLAGS:
                    p.append(f"{k}={v!r} is not a data flag")
            elif name != "SampleTime":
                p.append(f"unknown field {k}")
    if c.cn in ("2011", "2051", "2061", "2031"):
        if not c.groups or list(c.groups[0]) != ["DataTime"]:
            p.append("data packet does not start with a DataTime group")
    return c


def split_stream(buf: bytearray) -> list[bytes]:
    """Takes whole frames (## .. CRLF, by the length field) off the front of `buf`."""
    out = []
    while True:
        start = buf.find(b"##")
        if start < 0:
            del buf[:max(len(buf) - 1, 0)]
            return out
        del buf[:start]
        if len(buf) < 6:
            return out
        if not buf[2:6].isdigit():
            del buf[:2]
            continue
        end = 6 + int(buf[2:6]) + 6
        if len(buf) < end:
            return out
        out.append(bytes(buf[:end]))
        del buf[:end]


class StrictPlatform:
    """A TCP platform: records every packet it receives (checked), answers data that asks (Flag A) with
    9014 unless `ack` is False."""

    def __init__(self, pw: str = "123456", ack: bool = True):
        self.pw = pw
        self.ack = ack
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.packets: list[Checked] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.closed:
                conn.close()
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            for raw in split_stream(buf):
                c = check(raw)
                with self.lock:
                    self.packets.append(c)
                if self.ack and c.flag & 1 and c.head.get("ST") != "91":
                    try:
                        conn.sendall(build(f"QN={c.qn};ST=91;CN=9014;PW={self.pw};MN={c.head.get('MN')};"
                                           "Flag=4;CP=&&&&"))
                    except OSError:
                        return

    def send(self, data: bytes) -> None:
        with self.lock:
            conn = self.conns[-1]
        conn.sendall(data)

    def of(self, cn: str) -> list[Checked]:
        with self.lock:
            return [c for c in self.packets if c.cn == cn]

    def drop_connections(self) -> None:
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Stop listening (shutdown wakes the accepting thread: a bare close left it blocked in accept, which
        then took one more connection) and drop every connection."""
        self.closed = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.drop_connections()


STANDARD_EXAMPLE = (b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                    b"CP=&&RtdInterval=30&&1C80\r\n")
STANDARD_ACK = (b"##0087QN=20160801085000001;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;"
                b"CP=&&&&C241\r\n")
