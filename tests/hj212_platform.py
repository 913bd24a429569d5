"""An independent HJ 212-2017 platform for tests, written from DOMAIN.md (not from agent/): a TCP server
that frames packets on `##`..`\\r\\n`, checks length and CRC, parses the header and CP, and answers data
with 9014 when Flag asks for it. Imports nothing from agent/ or drivers/."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field


def crc212(data: bytes) -> int:
    """DOMAIN.md's CRC: init 0xFFFF; crc = (crc >> 8) ^ byte; 8 shifts with xor 0xA001."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ b
        for _ in range(8):
            out = crc & 1
            crc >>= 1
            if out:
                crc ^= 0xA001
    return crc


def frame(segment: str) -> bytes:
    data = segment.encode("ascii")
    return b"##%04d" % len(data) + data + b"%04X\r\n" % crc212(data)


HEADER_KEYS = ("QN", "ST", "CN", "PW", "MN", "Flag", "PNUM", "PNO")


@dataclass
class Packet:
    raw: bytes
    segment: str
    header: dict
    cp: str
    groups: list = field(default_factory=list)  # list of dict per ';'-group
    problems: list = field(default_factory=list)

    @property
    def cn(self) -> str:
        return self.header.get("CN", "")

    @property
    def flag(self) -> int:
        return int(self.header.get("Flag", "0"))

    def items(self) -> dict:
        """All CP items merged (later groups win)."""
        out: dict = {}
        for g in self.groups:
            out.update(g)
        return out


def parse(raw: bytes) -> Packet:
    """One framed packet (with ## and \\r\\n) into a Packet; problems lists every departure found."""
    problems = []
    if not raw.startswith(b"##") or not raw.endswith(b"\r\n"):
        problems.append("framing")
    body = raw[2:-2]
    length_txt, rest = body[:4], body[4:]
    if not re.fullmatch(rb"\d{4}", length_txt):
        problems.append(f"length field {length_txt!r}")
        n = len(rest) - 4
    else:
        n = int(length_txt)
    seg, crc_txt = rest[:-4], rest[-4:]
    if len(seg) != n:
        problems.append(f"length {n} but segment has {len(seg)}")
    if n > 1024:
        problems.append(f"segment {n} > 1024")
    if not re.fullmatch(rb"[0-9A-F]{4}", crc_txt):
        problems.append(f"crc text {crc_txt!r} not 4 upper hex")
    elif int(crc_txt, 16) != crc212(seg):
        problems.append(f"crc {crc_txt!r} != {crc212(seg):04X}")
    try:
        text = seg.decode("ascii")
    except UnicodeDecodeError:
        problems.append("non-ascii segment")
        text = seg.decode("utf-8", "replace")
    header: dict = {}
    cp = ""
    m = re.search(r"CP=&&(.*)&&$", text, re.S)
    if not m:
        problems.append("no CP=&&...&& at end")
        head = text
    else:
        cp = m.group(1)
        head = text[: m.start()]
    for part in head.split(";"):
        if not part:
            continue
        if "=" not in part:
            problems.append(f"header part {part!r}")
            continue
        k, v = part.split("=", 1)
        if k not in HEADER_KEYS:
            problems.append(f"unknown header key {k!r}")
        header[k] = v
    if head and not head.endswith(";"):
        problems.append("header does not end with ';' before CP")
    groups = []
    if cp:
        for g in cp.split(";"):
            d = {}
            for item in g.split(","):
                if "=" not in item:
                    problems.append(f"CP item {item!r}")
                    continue
                k, v = item.split("=", 1)
                if k in d:
                    problems.append(f"CP key {k!r} repeated in a group")
                d[k] = v
            groups.append(d)
    return Packet(raw, text, header, cp, groups, problems)


class Platform:
    """A listening platform. `ack` decides answers to data packets: 'auto' (9014 at once when Flag&1),
    'never', or a callable(packet) -> list of bytes to send (may sleep)."""

    def __init__(self, pw: str = "123456", ack="auto", host: str = "127.0.0.1", port: int = 0):
        self.pw = pw
        self.ack = ack
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.packets: list[Packet] = []
        self.junk: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.closed = False
        self.read_paused = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(c)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket):
        buf = b""
        while True:
            while self.read_paused.is_set() and not self.closed:
                time.sleep(0.05)
            try:
                chunk = c.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while True:
                start = buf.find(b"##")
                if start < 0:
                    if buf:
                        self.junk.append(buf)
                    buf = b""
                    break
                if start > 0:
                    self.junk.append(buf[:start])
                    buf = buf[start:]
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                raw, buf = buf[: end + 2], buf[end + 2:]
                p = parse(raw)
                p.recv_time = time.time()
                with self.lock:
                    self.packets.append(p)
                self._answer(c, p)

    def _answer(self, c, p: Packet):
        if self.ack == "never":
            return
        if callable(self.ack):
            out = self.ack(p)
        elif p.flag & 1 and p.header.get("ST") != "91":
            out = [self.ack_for(p)]
        else:
            out = []
        for b in out:
            try:
                c.sendall(b)
            except OSError:
                return

    def ack_for(self, p: Packet) -> bytes:
        h = p.header
        return frame(f"QN={h.get('QN', '')};ST=91;CN=9014;PW={self.pw};MN={h.get('MN', '')};Flag=4;CP=&&&&")

    def send(self, data: bytes, which: int = -1):
        with self.lock:
            c = self.conns[which]
        c.sendall(data)

    def of_cn(self, cn: str) -> list[Packet]:
        with self.lock:
            return [p for p in self.packets if p.cn == cn]

    def close(self):
        """Stop listening and drop every connection. shutdown() first: close() alone, from another
        thread than the one blocked in accept() or recv(), leaves the socket open under it (the port
        stays taken and the agent's connection up)."""
        self.closed = True
        self.read_paused.clear()
        with self.lock:
            socks = [self.sock, *self.conns]
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


STANDARD_EXAMPLE = (b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                    b"CP=&&RtdInterval=30&&1C80\r\n")
STANDARD_ACK = (b"##0087QN=20160801085000001;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;"
                b"CP=&&&&C241\r\n")

if __name__ == "__main__":
    for ex in (STANDARD_EXAMPLE, STANDARD_ACK):
        p = parse(ex)
        assert not p.problems, p.problems
        assert frame(p.segment) == ex
    print("standard examples ok")
