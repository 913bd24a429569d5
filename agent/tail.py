"""`edge-agent tail`: subscribe to a station's topics and print what arrives, decoded, one line each.

Flags seq gaps and duplicates per stream, so a platform engineer (or the demo) sees at once whether
delivery is complete. A message that is not JSON is read as an HJ 212 packet (`payload: hj212`): its
CN, DataTime and items are shown, a bad frame is flagged, and the pieces of a split packet are shown
once the last one arrives (HJ 212 has no seq: gaps cannot be flagged there).
Imports `agent.hj212` only (and paho).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import SplitResult, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.hj212 import Hj212Error, Packet, Reassembler, codes, decode

MAX_MISSING_RANGES = 1000  # per stream; the oldest are forgotten beyond this


@dataclass
class SeqTracker:
    """Highest seq seen per stream; reports gaps (missing ranges), duplicates, and seqs that arrive
    late into a range reported missing."""

    last: dict[str, int] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)  # the first seq seen: tail saw none before it
    missing: dict[str, list[list[int]]] = field(default_factory=dict)  # [first, last] still missing
    announced_gaps: list[tuple[int, int]] = field(default_factory=list)
    reassembler: Reassembler = field(default_factory=Reassembler)  # split HJ 212 packets
    unseen: set[str] = field(default_factory=set)  # streams whose next jump happened while tail was disconnected

    def lost_sight(self) -> None:
        """tail's connection dropped: what is published until it is back never reaches it (a clean
        session), so the next jump of each stream is tail's own, not the station's."""
        self.unseen = set(self.last)

    def see(self, stream: str, seq: object) -> str:
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError(f"seq {seq!r} is not an integer")
        unseen = stream in self.unseen
        self.unseen.discard(stream)
        prev = self.last.get(stream)
        if prev is None or seq == prev + 1:
            self.last[stream] = seq
            self.first.setdefault(stream, seq)
            return ""
        if seq < self.first[stream]:  # a resend of what was published before tail started: never seen here
            return "EARLIER (before tail started)"
        if seq <= prev:
            return "LATE (was missing)" if self._fill(stream, seq) else "DUP"
        self.last[stream] = seq
        first, last = prev + 1, seq - 1
        if any(a <= first and last <= b for a, b in self.announced_gaps):
            return f"(announced gap {first}..{last})"
        ranges = self.missing.setdefault(stream, [])
        ranges.append([first, last])
        del ranges[:-MAX_MISSING_RANGES]
        return f"GAP {first}..{last} " + ("not seen here (tail was disconnected)" if unseen else "missing")

    def _fill(self, stream: str, seq: int) -> bool:
        """Take `seq` out of the missing ranges; False if it was not missing (a duplicate)."""
        ranges = self.missing.get(stream, [])
        for i, (a, b) in enumerate(ranges):
            if a <= seq <= b:
                ranges[i:i + 1] = [r for r in ([a, seq - 1], [seq + 1, b]) if r[0] <= r[1]]
                return True
        return False


def format_message(topic: str, payload: bytes, tracker: SeqTracker) -> list[str]:
    """Lines to print for one message; a message that does not have the shape of SPEC §4 is shown as
    malformed (tail goes on with the next one)."""
    kind = topic.rsplit("/", 1)[-1] if not topic.endswith("/cmd/reply") else "reply"
    try:
        return _message_lines(kind, payload, tracker)
    except Exception as exc:  # noqa: BLE001 - whatever a publisher sends, tail keeps printing
        return [f"{kind:<6} MALFORMED ({type(exc).__name__}: {exc}): {payload[:120]!r}"]


def _message_lines(kind: str, payload: bytes, tracker: SeqTracker) -> list[str]:
    try:
        msg = json.loads(payload)
    except (ValueError, RecursionError):
        if payload.startswith(b"##"):
            return format_hj212(kind, payload, tracker)
        text = payload.decode("utf-8", "replace").strip()
        return [f"{kind:<6} {text}"]
    if not isinstance(msg, dict):
        return [f"{kind:<6} {payload.decode('utf-8', 'replace')}"]
    lines = []
    if "readings" in msg:
        for r in msg["readings"]:
            note = tracker.see("readings", r.get("seq", -1))
            value = "null" if r.get("value") is None else r["value"]
            lines.append(f"data   #{r.get('seq')} {r.get('device')}.{r.get('channel')} {r.get('ts')} "
                         f"{value} {r.get('unit') or ''} {r.get('flag')} {note}".rstrip())
    elif "gap" in msg:
        a, b = msg["gap"]
        tracker.announced_gaps.append((a, b))
        lines.append(f"GAP    seq {a}..{b} dropped at the station ({msg.get('reason')})")
    elif "aggregates" in msg:
        for g in msg["aggregates"]:
            note = tracker.see("aggregates", g.get("seq", -1))
            lines.append(f"agg    #{g.get('seq')} {g.get('device')}.{g.get('channel')} {g.get('period')} "
                         f"{g.get('start')} avg={g.get('avg')} min={g.get('min')} max={g.get('max')} "
                         f"n={g.get('count')} {g.get('flag')} {note}".rstrip())
    elif "alarm" in msg:
        a = msg["alarm"]
        note = tracker.see("alarms", a.get("seq", -1))
        lines.append(f"ALARM  #{a.get('seq')} {a.get('id')} {a.get('state')} value={a.get('value')} "
                     f"threshold={a.get('threshold')} {a.get('ts')} {note}".rstrip())
    else:
        lines.append(f"{kind:<6} {json.dumps(msg, ensure_ascii=False)}")
    return lines


def _command_name(cn: str) -> str:
    try:
        return codes()["commands"].meaning(cn) or ""
    except (KeyError, OSError, ValueError):
        return ""


_PW_FIELD = re.compile(rb"PW=[^;&]*")


def format_hj212(kind: str, payload: bytes, tracker: SeqTracker) -> list[str]:
    """Lines for an HJ 212 frame: ``CN name DataTime=… QN=…`` then one line per pollutant."""
    try:
        piece = decode(payload.strip() + b"\r\n")
        packet = tracker.reassembler.add(piece)
    except Hj212Error as exc:
        shown = _PW_FIELD.sub(b"PW=***", payload[:120])[:80]  # never the access password, even here
        reason = _PW_FIELD.sub(b"PW=***", str(exc).encode()).decode()
        return [f"{kind:<6} BAD HJ 212 frame ({type(exc).__name__}: {reason}): {shown!r}"]
    if packet is None:
        return [f"{kind:<6} HJ 212 CN={piece.cn} QN={piece.qn} piece {piece.pno}/{piece.pnum} (waiting for the rest)"]
    return _packet_lines(kind, packet)


def _packet_lines(kind: str, packet: Packet) -> list[str]:
    name = _command_name(packet.cn)
    head = f"{kind:<6} HJ 212 CN={packet.cn}{f' ({name})' if name else ''} MN={packet.mn} ST={packet.st}"
    data_time = packet.get("DataTime")
    if data_time is not None:
        head += f" DataTime={data_time}"
    head += f" QN={packet.qn} Flag={packet.flag}"
    lines = [head]
    pollutants = packet.pollutants()
    for code, fields in pollutants.items():
        lines.append(f"         {code}: " + " ".join(f"{k}={v}" for k, v in fields.items()))
    other = [f"{k}={v}" for k, v in packet.items() if k != "DataTime" and "-" not in k]
    if other:
        lines.append("         " + " ".join(other))
    return lines


def address(parts: SplitResult) -> tuple[str, int]:
    """Host and port of a broker url (default ports 1883, 8883 for mqtts)."""
    return parts.hostname or "localhost", parts.port or (8883 if parts.scheme == "mqtts" else 1883)


def tail(url: str | Sequence[str], base_topic: str, out: TextIO = sys.stdout, username: str | None = None,
         password: str | None = None, tls: dict | None = None, stop: threading.Event | None = None) -> None:
    """Print every message under `base_topic/#` until interrupted (or `stop` is set). `url`: the broker,
    or the station's `urls` in failover order: an attempt that fails goes on with the next one, as the
    agent does, so that tail finds the station's messages on the broker it publishes to."""
    urls = [url] if isinstance(url, str) else list(url)
    targets = [urlsplit(u) for u in urls]
    at = [0]  # the url of the current attempt
    parts = targets[0]
    tracker = SeqTracker()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    if username is not None:
        client.username_pw_set(username, password)
    if parts.scheme == "mqtts":
        tls = tls or {}
        client.tls_set(ca_certs=tls.get("ca"), certfile=tls.get("cert"), keyfile=tls.get("key"))

    done = stop or threading.Event()
    reader_gone = threading.Event()

    def say(lines: Sequence[str]) -> None:
        """Print from paho's thread; `edge-agent tail ... | head`: once whoever read the lines is gone
        (whichever line finds it gone: a message, or a connection attempt's), we go too."""
        try:
            for line in lines:
                print(line, file=out, flush=True)
        except BrokenPipeError:
            reader_gone.set()
            done.set()

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            say([f"# broker refused: {reason_code}"])
            return
        c.subscribe(f"{base_topic}/#", qos=1)
        now = targets[at[0]]
        say([f"# subscribed to {base_topic}/# on {now.hostname}:{now.port or ''}"])

    def on_message(c, userdata, message):
        say(format_message(message.topic, message.payload, tracker))

    def on_disconnect(c, userdata, flags, reason_code, properties):
        if not done.is_set():  # not tail's own end
            tracker.lost_sight()
            say([f"# disconnected ({reason_code}); reconnecting: what is published meanwhile is not seen here"])

    def on_connect_fail(c, userdata):  # called by paho within its `except OSError`: the error is at hand
        error = sys.exc_info()[1]
        why = f" ({error.strerror or error})" if isinstance(error, OSError) else ""
        now = targets[at[0]]
        say([f"# cannot connect to {now.hostname}:{now.port or ''}{why}; retrying"])
        if len(targets) > 1:  # the next attempt goes to the next broker (connect_async only sets where)
            at[0] = (at[0] + 1) % len(targets)
            c.connect_async(*address(targets[at[0]]))

    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.connect_async(*address(parts))
    client.loop_start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        done.set()  # tail's own end: not said as a lost connection
        client.loop_stop()
        client.disconnect()
        if reader_gone.is_set() and out is sys.stdout:  # else Python's flush at exit raises it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
