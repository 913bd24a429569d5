"""`edge-agent tail`: subscribe to a station's topics and print what arrives, decoded, one line each.

Flags seq gaps and duplicates per stream, so a platform engineer (or the demo) sees at once whether
delivery is complete. A message that is not JSON is read as an HJ 212 packet (`payload: hj212`): its
CN, DataTime and items are shown, a bad frame is flagged, and the pieces of a split packet are shown
once the last one arrives (HJ 212 has no seq: gaps cannot be flagged there; a data packet repeated,
whatever its QN, is flagged DUP). A message larger than MAX_MESSAGE_BYTES is not decoded (its size and
first bytes are shown), and no line shows more than MAX_LINE_CHARS characters of a message.
Imports `agent.hj212` only (and paho).
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import SplitResult, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.hj212 import Hj212Error, Packet, Reassembler, codes, decode
from agent.logutil import printable

MAX_MISSING_RANGES = 1000  # per stream; the oldest are forgotten beyond this
MAX_PACKETS_REMEMBERED = 100_000  # HJ 212 packets whose repetition is flagged; the oldest are forgotten
MAX_RESENDS_WATCHED = 100  # resend commands seen on P/cmd waiting for their reply; the oldest are forgotten
DISCONNECTED = "tail was disconnected"  # why a jump is tail's own, not the station's
DURING_RESEND = "tail started during a resend"
# Whoever may publish under the station's topics chooses the size of what tail prints. A data message of
# the largest batch (mqtt.max_batch 10 000 readings of ~130 bytes) is ~1.3 MB: beyond MAX_MESSAGE_BYTES a
# message is not decoded, its size and its first SHOWN_BYTES are shown. No line shows more than
# MAX_LINE_CHARS characters of it (a `status` reply of a station of 50 instruments is ~60 KB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SHOWN_BYTES = 200
MAX_LINE_CHARS = 100_000


@dataclass
class SeqTracker:
    """Highest seq seen per stream; reports gaps (missing ranges), duplicates, and seqs that arrive
    late into a range reported missing."""

    last: dict[str, int] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)  # the first seq seen: tail saw none before it
    missing: dict[str, list[list[int]]] = field(default_factory=dict)  # [first, last] still missing
    announced_gaps: list[tuple[int, int]] = field(default_factory=list)  # readings seqs the station dropped
    reassembler: Reassembler = field(default_factory=Reassembler)  # split HJ 212 packets
    # Streams whose next jump is tail's own, not the station's, and why (DISCONNECTED, DURING_RESEND).
    unseen: dict[str, str] = field(default_factory=dict)
    # Resends asked for on P/cmd, not yet answered: id -> their seq range (None: by time, any seq).
    resends: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    started_in_resend: bool = False  # tail's first readings came during a resend: until its answer or a jump
    # The contents of the HJ 212 data packets seen (hashed), oldest first (a dict keeps insertion order)
    packets: dict[int, None] = field(default_factory=dict)

    def see_packet(self, kind: str, packet: Packet) -> str:
        """`DUP` when a data packet (one with a DataTime) with the same command, station, DataTime and
        items came before on this topic: HJ 212 has no seq, and a resend or a re-publication after a
        reconnection repeats a packet under a new QN. (Two devices measuring one pollutant that give the
        same value in the same second are the same packet too, to a platform as here.)"""
        if packet.get("DataTime") is None:
            return ""
        key = hash((kind, packet.cn, packet.mn, tuple(packet.items())))
        if key in self.packets:
            return "DUP"
        self.packets[key] = None
        if len(self.packets) > MAX_PACKETS_REMEMBERED:
            del self.packets[next(iter(self.packets))]
        return ""

    def lost_sight(self) -> None:
        """tail's connection dropped: what is published until it is back never reaches it (a clean
        session), so the next jump of each stream is tail's own, not the station's."""
        self.unseen = dict.fromkeys(self.last, DISCONNECTED)

    def resend_asked(self, command: dict) -> None:
        """A resend command on P/cmd. Before any reading of tail's own, the readings that follow are
        (also) the resend's, older than the live ones: the jump from them to the live ones is tail's own."""
        low, high = command.get("from_seq"), command.get("to_seq")
        seqs = (low, high) if _are_seqs(low, high) else None
        self.resends[repr(command.get("id"))] = seqs
        if len(self.resends) > MAX_RESENDS_WATCHED:  # never answered (a flood of commands): the oldest go
            del self.resends[next(iter(self.resends))]
        if "readings" not in self.last:
            self.started_in_resend = True
            self.unseen["readings"] = DURING_RESEND

    def resend_answered(self, reply: dict) -> None:
        """A reply on P/cmd/reply: one to a resend (or the refusal of one) ends it. When every reading
        tail saw lies in the seqs a resend covered (its command came before tail subscribed), the next
        jump is tail's own too."""
        self.resends.pop(repr(reply.get("id")), None)
        if not self.resends:
            self.started_in_resend = False  # the flag, if still set, goes with the next reading
        low, high = reply.get("from_seq"), reply.get("to_seq")
        if (reply.get("cmd") == "resend" and _are_seqs(low, high) and "readings" in self.last
                and not self.missing.get("readings") and low <= self.first["readings"]
                and self.last["readings"] <= high):
            self.unseen["readings"] = DURING_RESEND

    def announce_gap(self, first: object, last: object) -> list[tuple[int, int]]:
        """The station said it dropped readings `first..last` (the last MAX_MISSING_RANGES are kept);
        ValueError when they are not seqs (kept, they would break the comparison of every later jump).
        Returns the ranges tail had already reported missing that this accounts for (the readings beyond
        a gap may go out before its announcement), no longer waited for."""
        if not _are_seqs(first, last):
            raise ValueError(f"gap bounds {first!r}..{last!r} are not integers")
        self.announced_gaps.append((first, last))
        del self.announced_gaps[:-MAX_MISSING_RANGES]
        explained, kept = [], []
        for a, b in self.missing.get("readings", []):
            lost, covered = _split_by_announced(a, b, [(first, last)])
            explained += covered
            kept += [[x, y] for x, y in lost]
        if explained:
            self.missing["readings"] = kept
        return explained

    def see(self, stream: str, seq: object) -> str:
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError(f"seq {seq!r} is not an integer")
        held = stream == "readings" and self.started_in_resend  # until the resend is answered or a jump
        unseen = self.unseen.get(stream) if held else self.unseen.pop(stream, None)
        prev = self.last.get(stream)
        if held and prev is None and not any(r is None or r[0] <= seq <= r[1] for r in self.resends.values()):
            held = self.started_in_resend = False  # a live reading came first: tail counts from it
            unseen = self.unseen.pop(stream, None)
        if prev is None or seq == prev + 1:
            self.last[stream] = seq
            self.first.setdefault(stream, seq)
            return ""
        if seq < self.first[stream]:  # a resend of what was published before tail started: never seen here
            return "EARLIER (before tail started)"
        if seq <= prev:
            return "LATE (was missing)" if self._fill(stream, seq) else "DUP"
        self.last[stream] = seq
        if held:
            self.started_in_resend = False
            self.unseen.pop(stream, None)
        first, last = prev + 1, seq - 1
        # Announcements name readings seqs (they come on the data topic); a grown gap comes in parts.
        lost, announced = _split_by_announced(first, last, self.announced_gaps if stream == "readings" else [])
        if not lost:
            return f"(announced gap {first}..{last})"
        ranges = self.missing.setdefault(stream, [])
        ranges.extend([a, b] for a, b in lost)
        del ranges[:-MAX_MISSING_RANGES]
        note = f"GAP {_ranges(lost)} " + (f"not seen here ({unseen})" if unseen else "missing")
        return note + (f" ({_ranges(announced)} announced)" if announced else "")

    def _fill(self, stream: str, seq: int) -> bool:
        """Take `seq` out of the missing ranges; False if it was not missing (a duplicate)."""
        ranges = self.missing.get(stream, [])
        for i, (a, b) in enumerate(ranges):
            if a <= seq <= b:
                ranges[i:i + 1] = [r for r in ([a, seq - 1], [seq + 1, b]) if r[0] <= r[1]]
                return True
        return False


def _are_seqs(*values: object) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _split_by_announced(first: int, last: int, announced: Sequence[tuple[int, int]]
                        ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The ranges of `first..last` that no announced gap covers (lost), and those that announced gaps
    cover (however many announcements, overlapping or adjacent, they take), in seq order."""
    lost: list[tuple[int, int]] = []
    covered: list[tuple[int, int]] = []
    at = first  # the lowest seq not yet placed
    for a, b in sorted(announced):
        if b < at or a > last:
            continue
        if a > at:
            lost.append((at, a - 1))
        start, end = max(a, at), min(b, last)
        if covered and covered[-1][1] + 1 == start:
            covered[-1] = (covered[-1][0], end)
        else:
            covered.append((start, end))
        at = end + 1
        if at > last:
            break
    if at <= last:
        lost.append((at, last))
    return lost, covered


def _ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{a}..{b}" for a, b in ranges)


def format_message(topic: str, payload: bytes, tracker: SeqTracker) -> list[str]:
    """Lines to print for one message; a message that does not have the shape of SPEC §4 is shown as
    malformed (tail goes on with the next one). Anyone allowed to publish under the station's topics
    (P/cmd: the platform) chooses what is printed: its control characters are shown escaped, so that
    it can neither forge a line of its own nor drive the terminal (`logutil.printable`), and their size is
    capped (MAX_MESSAGE_BYTES, MAX_LINE_CHARS)."""
    kind = topic.rsplit("/", 1)[-1] if not topic.endswith("/cmd/reply") else "reply"
    if len(payload) > MAX_MESSAGE_BYTES:
        shown = _PW_FIELD.sub(b"PW=***", payload[:SHOWN_BYTES])  # never an HJ 212 access password
        lines = [f"{kind:<6} TOO LARGE: {len(payload)} bytes, not decoded; the first {SHOWN_BYTES} shown "
                 f"({len(payload) - SHOWN_BYTES} cut): {shown!r}"]
    else:
        try:
            lines = _message_lines(kind, payload, tracker)
        except Exception as exc:  # noqa: BLE001 - whatever a publisher sends, tail keeps printing
            lines = [f"{kind:<6} MALFORMED ({type(exc).__name__}: {exc}): {payload[:120]!r}"]
    return [printable(_cut(line)) for line in lines]


def _cut(line: str) -> str:
    """`line` up to MAX_LINE_CHARS characters, then how many more there were (escaped afterwards:
    a control character then takes up to 10 columns)."""
    if len(line) <= MAX_LINE_CHARS:
        return line
    return f"{line[:MAX_LINE_CHARS]} \u2026 ({len(line) - MAX_LINE_CHARS} more characters not shown)"


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
        explained = tracker.announce_gap(a, b)
        said = f": the GAP {_ranges(explained)} above is accounted for" if explained else ""
        lines.append(f"GAP    seq {a}..{b} dropped at the station ({msg.get('reason')}){said}")
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
        if kind == "cmd" and msg.get("cmd") == "resend":
            tracker.resend_asked(msg)
        elif kind == "reply":
            tracker.resend_answered(msg)
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
    return _packet_lines(kind, packet, tracker.see_packet(kind, packet))


def _packet_lines(kind: str, packet: Packet, note: str = "") -> list[str]:
    name = _command_name(packet.cn)
    head = f"{kind:<6} HJ 212 CN={packet.cn}{f' ({name})' if name else ''} MN={packet.mn} ST={packet.st}"
    data_time = packet.get("DataTime")
    if data_time is not None:
        head += f" DataTime={data_time}"
    head += f" QN={packet.qn} Flag={packet.flag}"
    lines = [f"{head} {note}".rstrip()]
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


RETRY_FIRST_S = 1.0  # after every URL failed: the wait before the next round, doubling...
RETRY_MAX_S = 30.0  # ...up to this (the agent's default reconnect_max)
CONNACK_TIMEOUT_S = 10.0  # a broker that took the connection but does not answer it: the next attempt
STABLE_CONNECTION_S = 10.0  # a connection lost sooner is followed by the wait of a failed round
_LOGIN_REFUSED = ("Not authorized", "Bad user name or password")


def _reader_gone(out: TextIO) -> bool:
    """Whether `out` is a pipe whose reader has gone (`| head` has its lines): told without writing,
    for the time tail has nothing new to say."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def tail(url: str | Sequence[str], base_topic: str, out: TextIO = sys.stdout, username: str | None = None,
         password: str | None = None, tls: dict | None = None, stop: threading.Event | None = None) -> None:
    """Print every message under `base_topic/#` until interrupted (or `stop` is set). `url`: the broker,
    or the station's `urls` in failover order: an attempt that fails goes on with the next one, as the
    agent does, so that tail finds the station's messages on the broker it publishes to; each attempt
    speaks TLS when its own URL is mqtts:// (`tls`: the station's files, if any). Every round of URLs
    that all failed, and every connection lost within STABLE_CONNECTION_S, is followed by a wait,
    RETRY_FIRST_S doubling to RETRY_MAX_S. Why an attempt
    failed (refused, a login refused, ...) is said once per cause until tail subscribes again, not at
    every attempt."""
    targets = [urlsplit(u) for u in ([url] if isinstance(url, str) else list(url))]
    tracker = SeqTracker()
    done = stop or threading.Event()
    reader_gone = threading.Event()
    said: set[str] = set()  # the causes said since tail last subscribed

    def say(lines: Sequence[str]) -> None:
        """Print (from the main thread); `edge-agent tail ... | head`: once whoever read the lines is gone,
        we go too."""
        try:
            for line in lines:
                print(line, file=out, flush=True)
        except BrokenPipeError:
            reader_gone.set()
            done.set()

    def say_once(line: str) -> None:
        if line not in said:
            said.add(line)
            say([line])

    def wait(seconds: float) -> None:
        """Wait, ending at once when tail is to end (its reader gone included)."""
        end = time.monotonic() + seconds
        while not done.is_set() and (left := end - time.monotonic()) > 0:
            if _reader_gone(out):
                reader_gone.set()
                done.set()
                return
            done.wait(min(left, 0.25))

    def attempt(target: SplitResult) -> bool:
        """One connection to `target`, kept until it ends (or tail does); whether it subscribed."""
        host, port = address(target)
        where = f"{host}:{port}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        if username is not None:
            client.username_pw_set(username, password)
        if target.scheme == "mqtts":
            files = tls or {}
            client.tls_set(ca_certs=files.get("ca"), certfile=files.get("cert"), keyfile=files.get("key"))
        state: dict = {"subscribed": False, "reason": None, "answered": False}

        def on_connect(c, userdata, flags, reason_code, properties):
            state["answered"] = True
            if reason_code.is_failure:
                login = str(reason_code) in _LOGIN_REFUSED
                hint = " (check mqtt.username and mqtt.password / password_file)" if login else ""
                say_once(f"# broker {where} refused the connection: {reason_code}{hint}; retrying")
                return
            c.subscribe(f"{base_topic}/#", qos=1)
            state["subscribed"] = True
            said.clear()
            say([f"# subscribed to {base_topic}/# on {target.hostname}:{target.port or ''}"])

        client.on_connect = on_connect
        client.on_message = lambda c, userdata, message: say(format_message(message.topic, message.payload, tracker))
        client.on_disconnect = lambda c, userdata, flags, reason_code, properties: state.update(reason=reason_code)
        try:
            client.connect(host, port, keepalive=60)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            say_once(f"# cannot connect to {target.hostname}:{target.port or ''} ({why}); retrying")
            return False
        answer_by = time.monotonic() + CONNACK_TIMEOUT_S
        try:
            while not done.is_set() and client.loop(timeout=0.25) == mqtt.MQTT_ERR_SUCCESS:
                if _reader_gone(out):
                    reader_gone.set()
                    done.set()
                elif not state["answered"] and time.monotonic() > answer_by:
                    say_once(f"# broker {where} does not answer (no CONNACK within {CONNACK_TIMEOUT_S:g} s); retrying")
                    break
        finally:  # tail's own end, or a broker that does not answer: a clean DISCONNECT
            client.disconnect()
            client.loop(timeout=0)
        if state["subscribed"] and not done.is_set():
            tracker.lost_sight()
            say([f"# disconnected ({state['reason']}); reconnecting: what is published meanwhile is not seen here"])
        return state["subscribed"]

    at, failed, delay = 0, 0, RETRY_FIRST_S
    try:
        while not done.is_set():
            started = time.monotonic()
            if attempt(targets[at]):
                if time.monotonic() - started < STABLE_CONNECTION_S:  # dropped soon (an ACL that closes
                    wait(delay)  # it at the SUBSCRIBE): not again at once, as fast as the broker answers
                    delay = min(delay * 2, RETRY_MAX_S)
                else:
                    delay = RETRY_FIRST_S
                failed = 0  # the same broker first again
                continue
            at = (at + 1) % len(targets)
            failed += 1
            if failed >= len(targets):
                wait(delay)
                failed, delay = 0, min(delay * 2, RETRY_MAX_S)
    except KeyboardInterrupt:
        pass
    finally:
        done.set()
        if reader_gone.is_set() and out is sys.stdout:  # else Python's flush at exit raises it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
