"""HJ 212 TCP uplinks: one thread per `hj212.uplinks` entry keeps a connection to a platform.

Each uplink reads the buffer on its own (read-only connection), sends a CN 2011 packet per device poll
and a 2051/2061/2031 packet per period start with Flag A set (Flag=5), waits for the platform's 9014
within `timeout`, re-sends `retries` times, then drops the connection and reconnects with backoff.
Its progress is its own watermark per stream, kept in the buffer's meta table under
``uplink:<host>:<port>`` (written through the recorder, at most every few seconds): MQTT and every
uplink advance independently, and what a platform has not acknowledged is sent again on the next
connection (at-least-once, like MQTT). It also answers the platform's requests on the connection:
backfill (2051/2061/2031, and 2011 for the stored real-time data, with BeginTime/EndTime), 2011 without
times (real-time data, sent anyway: QnRtn=1), 1011 get time, 1012 set time (logged, the clock is
never changed), 1061 get the real-time data interval, 1062 set it (logged, never changed); anything else
is refused with 9011. Bad input never ends the thread.
Imports `agent.buffer`, `agent.hj212`, `agent.model`, `agent.logutil`, `agent.publisher` (the HJ 212
packet builder shared with `payload: hj212`); never `drivers`.

Decisions:

* A new uplink (no stored progress) starts with the readings stored *from now on* and with every
  stored aggregate: real-time data is for the live view, so a platform added later is not flooded
  with days of 2011 packets; history reaches it as period data (pushed, and on request).
* One packet in flight per uplink (stop-and-wait): HJ 212 platforms acknowledge packet by packet,
  and a 9014 names only the QN. Pieces of a split packet each carry Flag A and are each awaited, except
  on a platform that answered a split packet only after its last piece (some acknowledge a packet once
  it is whole): a piece not answered within `timeout` is then not sent again, the next one follows,
  and from then on the pieces go one after the other, only the last waiting for the 9014 (else the
  uplink resent the first piece of its first split packet for ever). A second 9014 naming one split packet
  undoes that (the platform answers each piece; one 9014 was only slow): else a platform gone after
  reading a first piece had its 9014 count for the whole packet.
* Answers (9011, 9012) use ST=91 and the request's QN (SPEC §4); answers from the platform (9011..9014) are never
  answered. A request whose Flag asks for no answer (A bit clear: Flag=4 in HJ 212-2017, DOMAIN.md) gets no 9011,
  neither acceptance nor refusal (a refusal is logged); it is still executed, its data and 9012 being its result, not
  its answer. One without Flag (HJ/T 212-2005 style) is answered. A request with a bad CRC is answered QnRtn=9
  whatever its Flag says (the Flag of a damaged packet cannot be trusted). The records of a backfill and the 1011 time
  report carry data, so they use the station's ST, the request's QN and Flag=4 (no 9014 expected: the exchange is
  closed by the 9012).
* Request checks, in order: MN (QnRtn 4), PW (3), ST = station's or 91 (5), Flag version 2017 or no Flag (6), QN
  present (7: the answer gets a QN of its own, as every packet has one); then an unsupported CN is answered QnRtn=8
  (CN error), a backfill or 1012 without valid times and a 1062 without a valid RtdInterval QnRtn=2 (refused). A
  request with a bad CRC whose data segment names this station's MN and a QN (bytes over 0x7F, which the noise that
  broke the CRC may have set, read as '?') is answered QnRtn=9 (CRC error) and never executed: the platform knows to
  send it again. Any other frame that does not decode is logged (rate-limited) and dropped. A request whose QN is not
  17 digits is checked and answered like one without QN (its QN cannot be echoed: a QN is 17 digits). One whose MN,
  PW, ST or CN is malformed (a PW of 7 characters: a mistyped password) is refused with the code of its first fault in
  the order above (CN: 8), never executed; its answer names the station's own PW and MN in place of the request's when
  those could not be in a valid packet. A 9014, 9011, 9012 or 9013 so malformed (a 9014 whose PW is over 6 characters)
  is never taken nor answered (an answer is not answered): logged, first at once then once a minute with the count,
  naming its CN and QN (a 9014 not taken leaves its data packet to go again).
* A request holding bytes over 0x7F (Chinese text in UTF-8, which HJ 212-2017 is said to use, or GBK) with a
  good length (in bytes) and CRC is refused, never executed, with a log line naming its CN, QN, the encoding
  and where the text starts: QnRtn=2 (refused), or 3/4 when its PW/MN holds the text (its answer then names
  the station's own). Such a frame was given up at its first byte over 0x7F: the request went unanswered.
* What the platform sends may end in a lone LF instead of CRLF (some platform software ends its packets so):
  `FrameReader(allow_lf=True)`. A packet with a bad CRC is never taken, whatever its ending (a request is
  answered QnRtn 9 as above; a 9014 does not count), nor one that ends in nothing or in CR alone (the end
  still frames a packet over TCP; the hj212 analyzer driver, on a serial line, is more lenient).
* A platform that never acknowledges, or drops every connection, logs its first "no 9014" and
  "connection dropped" lines at once, then one a minute with the count.
  A 9011 refusing a data packet (QnRtn 2..9: the platform takes our PW, MN or ST for wrong) is logged
  the same way with the code's meaning; the packet is then treated as unacknowledged.
* 1012 (set time): answered 9011 QnRtn=1, logged with the offset, never applied; 9012 ExeRtn=1 when
  the clock already agrees within `TIME_TOLERANCE_S`, else ExeRtn=2 (failed), so that a platform is
  never told a wrong clock was set.
* 1061 reports `RtdInterval`, the interval at which real-time data goes out: the shortest device interval
  (`rtd_interval`, from the configuration; a 2011 packet goes out at each poll). An uplink not given one
  refuses 1061 (QnRtn=2) rather than say a made-up value.
* 1062 (set the real-time interval) is a remote change of configuration, which a command never makes
  (SPEC §4): answered as 1012, 9011 QnRtn=1, logged, never applied (in memory or in a file), 9012 ExeRtn=1
  when the interval already is the one asked, else ExeRtn=2; without a valid `RtdInterval`, QnRtn=2.
* 1013 (the station asks for time calibration) is never sent: its answer is a 1012, which is never applied
  (above), so it could only earn an ExeRtn=2 at every reconnection (README, HJ 212).
* Uplink progress holds back the buffer's purge (`Recorder.set_holders`): rows published on MQTT but
  not yet delivered by an uplink are not purged for their age, and at the size cap they go only after
  every other published row (logged as an error: that platform misses them). A stretch of readings
  an uplink finds missing when it reads on is logged as an error, never skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import select
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from agent.buffer import Buffer, BufferError, EventRow, Poll, is_corruption
from agent.hj212 import (
    ANSWER_CNS,
    CN_DATA_ACK,
    CN_DAY,
    CN_HOUR,
    CN_MINUTE,
    CN_REALTIME,
    CN_REQUEST_ANSWER,
    FLAG_ANSWER,
    FLAG_V2017,
    BadCrc,
    BadHeader,
    BadQn,
    FrameReader,
    Hj212Error,
    NotAscii,
    Packet,
    Reassembler,
    ReassemblyError,
    codes,
    encode,
    first_instant_ms,
    format_number,
    format_time,
    last_instant_ms,
    parse_number,
    parse_time,
    reply_9011,
    reply_9012,
)
from agent.hj212_payload import Hj212Identity, Hj212Message, Hj212Payload, group_periods
from agent.logutil import RateLimitedLog
from agent.model import STREAM_AGGREGATES, STREAM_READINGS, iso_utc_ms, now_ms
from agent.threadname import name_this_thread

log = logging.getLogger(__name__)

META_PREFIX = "uplink:"
PERSIST_EVERY_S = 5.0  # progress written at most this often (a crash re-sends at most this much)
POLL_PAGE = 200  # readings read at once
EVENT_PAGE = 200  # aggregate rows read at once
BACKFILL_PAGE = 500
SCAN_PROGRESS_STEPS = 100_000  # SQLite VM steps between two notes of progress while a backfill reads the buffer
TIME_TOLERANCE_S = 60.0  # 1012: a clock within this of the platform's counts as set
CONNECT_TIMEOUT_S = 10.0
RECV_BYTES = 65536
SPLIT_QNS_REMEMBERED = 8  # split packets whose 9014s are still counted (a late one tells the platform's way)

CN_GET_TIME = "1011"
CN_SET_TIME = "1012"
CN_GET_RTD_INTERVAL = "1061"
CN_SET_RTD_INTERVAL = "1062"
ST_SYSTEM = "91"
UNIT_BY_CN = {CN_MINUTE: "m", CN_HOUR: "h", CN_DAY: "d"}

QNRTN_OK, QNRTN_REFUSED, QNRTN_PW, QNRTN_MN, QNRTN_ST, QNRTN_FLAG, QNRTN_QN = 1, 2, 3, 4, 5, 6, 7
QNRTN_CN = 8
QNRTN_CRC = 9
EXERTN_OK, EXERTN_FAILED, EXERTN_NO_DATA = 1, 2, 100


@dataclass(frozen=True)
class UplinkTarget:
    """One `hj212.uplinks` entry."""

    host: str
    port: int
    timeout: float = 10.0
    retries: int = 3

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def meta_key(self) -> str:
        """Where this uplink's progress is kept in the buffer's meta table."""
        return f"{META_PREFIX}{self.host}:{self.port}"


def stop_uplinks(uplinks: list[Uplink], timeout: float) -> dict[str, dict[str, int]]:
    """Stop every uplink in parallel, waiting up to `timeout` s in all; returns their progress by meta key.
    One that has not ended by then (a DNS lookup of the platform's name heeds no stop) is retired: it ends
    on its own, and never writes its progress over its successor's."""
    for u in uplinks:
        u.request_stop()
    deadline = time.monotonic() + timeout
    for u in uplinks:
        u.join(max(deadline - time.monotonic(), 0.1))
    for u in uplinks:
        if u.is_alive():
            u.retire()
            log.warning("uplink %s has not stopped within %.0f s; left to end on its own (its progress is "
                        "carried on by its successor, if any)", u.target.name, timeout)
    return {u.target.meta_key: u.marks for u in uplinks}


class ProgressSink(Protocol):
    """Where an uplink persists its progress and which buffer file it reads (`agent.recorder.Recorder`)."""

    def set_meta(self, key: str, value: str) -> None: ...

    def open_reader(self) -> Buffer: ...

    def file_identity(self) -> tuple[int, int] | None: ...

    def suspect_corruption(self, reader: str, exc: BaseException) -> None: ...


class LinkDown(Exception):
    """The connection is unusable (closed, reset, no acknowledgement): reconnect."""


class Uplink(threading.Thread):
    """Keeps one platform connection and delivers the buffer over it (see the module docstring).

    `recorder` (an `agent.recorder.Recorder`) persists the progress (`set_meta`). The starting
    watermarks are read when the object is built, so build it before polling starts. `marks`
    carries the progress of the uplink this one replaces (SIGHUP), which may not be committed yet.
    `rtd_interval`: seconds between two real-time data packets (the shortest device interval), for 1061.
    Thread-safe entry points: wake, stop, marks, state, apply_settings.
    """

    def __init__(self, target: UplinkTarget, identity: Hj212Identity, db_path: str | Path, recorder: ProgressSink, *,
                 reconnect_max: float = 30.0, marks: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.time, rtd_interval: float | None = None) -> None:
        super().__init__(name=f"uplink:{target.name}", daemon=True)
        self.target = target
        self.identity = identity
        self.db_path = str(db_path)
        self.recorder = recorder
        self.reconnect_max = reconnect_max
        self.clock = clock
        self.rtd_interval = rtd_interval
        self.payload = Hj212Payload(identity, clock)
        self.tz = identity.tz
        self._stop_event = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock: socket.socket | None = None
        self._frames = FrameReader(allow_lf=True, allow_non_ascii=True)
        self._reassembler = Reassembler()
        self._queue: deque[tuple[str, Poll | list[EventRow]]] = deque()
        self._backoff = 0.5
        self._errlog = RateLimitedLog(log, every_s=300)
        # Lines a platform that misbehaves for days would repeat at every packet or connection: the first
        # at once, then one a minute with the count (never reset by a new connection).
        self._linklog = RateLimitedLog(log, every_s=60)
        self._reader: Buffer | None = recorder.open_reader()
        self._marks, stored = self._initial_marks(marks)
        self._missing_logged: tuple[int, int] | None = None
        # A platform seen acknowledging a split packet once, after its last piece (not each piece)
        self._acks_whole_packets = False
        # The 9014s naming each of the last split packets sent (their pieces share one QN). More than one
        # for any of them says the platform acknowledges each piece after all: a 9014 that was merely slow
        # made it look otherwise, and the second may come only while the next packet is sent.
        self._split_acks: dict[str, int] = {}
        self._dirty = not stored
        self._last_persist = 0.0
        self._persist_lock = threading.Lock()
        self._retired = False
        self.state = "connecting"
        self.last_error: str | None = None
        self.since = iso_utc_ms(now_ms())
        self.packets_acked = 0
        self.last_progress = time.monotonic()
        if not stored:
            self._persist(force=True)

    # ------------------------------------------------------------------ any thread

    def wake(self) -> None:
        """New rows were committed (recorder listener)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def request_stop(self) -> None:
        """Ask the thread to drop the connection and end (unacknowledged data stays for next time)."""
        self._stop_event.set()
        self.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """`request_stop`, then wait for the thread (a send in progress may take up to `timeout`)."""
        self.request_stop()
        self.join(timeout)

    def discard(self) -> None:
        """Close what the constructor opened, for an uplink that will never be started."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._wake_r.close()
        self._wake_w.close()

    @property
    def marks(self) -> dict[str, int]:
        """Highest seq per stream the platform acknowledged (with all before it)."""
        return dict(self._marks)

    # ------------------------------------------------------------------ progress

    def _initial_marks(self, given: dict[str, int] | None) -> tuple[dict[str, int], bool]:
        assert self._reader is not None
        if given is not None:
            return {STREAM_READINGS: given.get(STREAM_READINGS, 0),
                    STREAM_AGGREGATES: given.get(STREAM_AGGREGATES, 0)}, False
        text = self._reader.meta_value(self.target.meta_key)
        if text:
            try:
                data = json.loads(text)
                return {STREAM_READINGS: int(data[STREAM_READINGS]),
                        STREAM_AGGREGATES: int(data[STREAM_AGGREGATES])}, True
            except (ValueError, KeyError, TypeError) as exc:
                log.error("uplink %s: stored progress unreadable (%s); starting from now", self.target.name, exc)
        last_reading, _ = self._reader.stream_state(STREAM_READINGS)
        log.info("uplink %s: new; sends readings from seq %d on and every stored aggregate",
                 self.target.name, last_reading + 1)
        return {STREAM_READINGS: last_reading, STREAM_AGGREGATES: 0}, False

    def _advance(self, stream: str, upto: int) -> None:
        if upto > self._marks[stream]:
            self._marks[stream] = upto
            self._dirty = True
        self._persist()

    def _persist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._dirty and not force:
            return
        if not force and now - self._last_persist < PERSIST_EVERY_S:
            return
        record = {**self._marks, "state": self.state, "error": self.last_error, "since": self.since}
        with self._persist_lock:
            if self._retired:  # a successor writes this record now (`retire`)
                return
            self.recorder.set_meta(self.target.meta_key, json.dumps(record, separators=(",", ":")))
        self._dirty = False
        self._last_persist = now

    def retire(self) -> None:
        """For an uplink asked to stop that has not ended yet (its successor may start): its record is written
        now, for the last time (its thread would put its older marks and "agent stopped" over its successor's)."""
        with self._persist_lock:
            if not self._retired:
                record = {**self._marks, "state": "offline", "error": "agent stopped", "since": iso_utc_ms(now_ms())}
                self.recorder.set_meta(self.target.meta_key, json.dumps(record, separators=(",", ":")))
                self._retired = True

    def _set_state(self, state: str, error: str | None) -> None:
        if state != self.state or error != self.last_error:
            self.state, self.last_error, self.since = state, error, iso_utc_ms(now_ms())
            self._persist(force=True)

    # ------------------------------------------------------------------ thread

    def run(self) -> None:
        name_this_thread()
        try:
            while not self._stop_event.is_set():
                self.last_progress = time.monotonic()
                try:
                    if self._sock is None:
                        if not self._connect():
                            self._pause(self._next_backoff())
                        continue
                    self._step()
                except LinkDown as exc:
                    self._disconnect(str(exc))
                    if not self._stop_event.is_set():
                        self._pause(self._next_backoff())
                except (sqlite3.Error, BufferError) as exc:
                    self._disconnect(f"buffer unreadable: {exc}")
                    self._reopen_reader(exc)
                except Exception as exc:  # noqa: BLE001 - an uplink must never die
                    log.exception("uplink %s: unexpected error", self.target.name)
                    self._disconnect(f"internal error: {type(exc).__name__}")
                    self._pause(self._next_backoff())
        finally:
            self._disconnect("agent stopping")
            self._set_state("offline", "agent stopped")
            self._persist(force=True)
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._wake_r.close()
            self._wake_w.close()

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._stop_event.wait(min(left, 1.0))
            self.last_progress = time.monotonic()

    def apply_settings(self, reconnect_max: float, rtd_interval: float | None) -> None:
        """A reload that keeps this uplink (and its connection): the new backoff ceiling and real-time
        interval (1061) take effect now. Thread-safe (plain attribute writes the uplink thread reads)."""
        self.reconnect_max = reconnect_max
        self.rtd_interval = rtd_interval
        self._backoff = min(self._backoff, reconnect_max)

    def _next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max)
        return random.uniform(delay / 2, delay)

    def _reopen_reader(self, exc: Exception) -> None:
        self._errlog.error("uplink %s: reading the buffer failed (%s); reopening it", self.target.name, exc)
        if is_corruption(exc):
            self.recorder.suspect_corruption(f"uplink {self.target.name}", exc)
        try:
            if self._reader is not None:
                self._reader.close()
        except sqlite3.Error:
            pass
        self._reader = None
        self._pause(1.0)
        try:
            self._reader = self.recorder.open_reader()
        except (sqlite3.Error, BufferError, OSError) as exc2:
            self._errlog.error("uplink %s: cannot reopen the buffer: %s", self.target.name, exc2)

    # ------------------------------------------------------------------ connection

    def _connect(self) -> bool:
        t = self.target
        try:
            sock = socket.create_connection((t.host, t.port), timeout=min(t.timeout, CONNECT_TIMEOUT_S))
        except OSError as exc:
            why = f"cannot connect: {exc}"
            self._set_state("offline", why)
            self._errlog.error("uplink %s: %s; retrying with backoff", t.name, why)
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(t.timeout)
        self._sock = sock
        self._frames = FrameReader(allow_lf=True, allow_non_ascii=True)
        self._reassembler = Reassembler()
        self._queue.clear()
        log.info("uplink %s connected", t.name)
        self._errlog = RateLimitedLog(log, every_s=300)
        self._set_state("online", None)
        return True

    def _disconnect(self, why: str) -> None:
        sock, self._sock = self._sock, None
        self._queue.clear()  # what was taken but not acknowledged is read again from the watermark
        if sock is None:
            return
        try:
            sock.close()
        except OSError:
            pass
        if self._stop_event.is_set():
            log.info("uplink %s closed", self.target.name)
        else:
            self._linklog.warning("uplink %s: connection dropped: %s", self.target.name, why)
            self._set_state("offline", why)
        self._persist(force=True)

    def _send(self, frame: bytes) -> None:
        """All of `frame` within `timeout`, noting progress and heeding a stop while the platform does not
        read (a sendall blocked for a long `timeout` withheld the watchdog, and held a stop or reload)."""
        sock = self._sock
        if sock is None:
            raise LinkDown("not connected")
        deadline = time.monotonic() + self.target.timeout
        view = memoryview(frame)
        while view:
            if self._stop_event.is_set():
                raise LinkDown("agent stopping")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkDown("send failed: timed out (the platform does not read)")
            try:
                _, writable, _ = select.select([], [sock], [], min(left, 1.0))
                self.last_progress = time.monotonic()
                if writable:
                    view = view[sock.send(view):]
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError) as exc:  # includes socket.timeout
                raise LinkDown(f"send failed: {exc}") from None

    def _send_packet(self, packet: Packet) -> None:
        for frame in encode(packet):
            self._send(frame)

    # ------------------------------------------------------------------ delivering the buffer

    def _step(self) -> None:
        """Answer what the platform asked, then deliver one packet (or wait for work)."""
        if self._reader is None:  # a reopen failed: tried again (`run`)
            raise BufferError("the buffer file is not open")
        if self._reader.identity != self.recorder.file_identity():
            raise BufferError("the recorder writes a new file (a corrupt one rescued, or its own put back)")
        self._receive(0)
        item = self._next_message()
        if item is None:
            self._persist()  # progress made in a burst is written once due, not only at the next packet
            self._receive(1.0)
            return
        stream, message = item
        if len(message.frames) == 1:
            self._send_and_wait(message.frames[0], message.qn)
        else:
            self._deliver_split(message)
        self.packets_acked += 1
        self._backoff = 0.5
        self._advance(stream, message.last_seq)

    def _deliver_split(self, message: Hj212Message) -> None:
        """The pieces of a split packet, which share one QN, so that a 9014 does not say which piece it
        acknowledges. To a platform that acknowledges each piece, the packet is delivered once it has sent
        as many 9014s as there are pieces (a slow first one, which came while the last piece was awaited,
        counted for the packet: a platform gone after reading the first piece never got the rest). To one
        that acknowledges a packet once, after its last piece (seen when, a piece unanswered, the last
        piece's wait ends with one 9014 only), one 9014 after the last piece."""
        qn, *pieces, last = message.qn, *message.frames
        self._split_acks.pop(qn, None)  # (the same packet again, on a new connection: counted afresh)
        self._split_acks[qn] = 0
        while len(self._split_acks) > SPLIT_QNS_REMEMBERED:
            del self._split_acks[next(iter(self._split_acks))]
        unanswered = 0
        for number, frame in enumerate(pieces, 1):
            if self._acks_whole_packets:
                self._send(frame)
            elif not self._send_and_wait(frame, qn, tries=1, must=False, acks=lambda n=number: n):
                unanswered += 1
        whole = len(message.frames)

        def acks_needed() -> int:  # read at each 9014: a late second one may show the platform's way meanwhile
            return 1 if self._acks_whole_packets else whole

        if self._send_and_wait(last, qn, tries=1 if unanswered else None, must=not unanswered, acks=acks_needed):
            return
        if self._split_acks.get(qn, 0) == 0:  # nothing at all: sent again as any unacknowledged packet
            self._send_and_wait(last, qn, tries=self.target.retries, acks=acks_needed)
            return
        self._acks_whole_packets = True
        log.info("uplink %s: the platform acknowledges a split packet once, after its last piece; pieces now "
                 "go one after the other, the last one waiting for the 9014", self.target.name)

    def _next_message(self) -> tuple[str, Hj212Message] | None:
        """The next packet to deliver: aggregates first (few, and what platforms keep), then polls."""
        while True:
            if not self._queue:
                self._fill_queue()
            if not self._queue:
                return None
            stream, rows = self._queue.popleft()
            flag = FLAG_V2017 | FLAG_ANSWER
            if isinstance(rows, Poll):
                message = self.payload.poll_message(rows, flag)
            else:
                message = self.payload.period_message(rows, flag)
            if message.frames:
                return stream, message
            self._advance(stream, message.last_seq)  # nothing HJ 212 can say: skip, in order

    def _fill_queue(self) -> None:
        assert self._reader is not None
        rows = self._reader.events_after(STREAM_AGGREGATES, self._marks[STREAM_AGGREGATES], EVENT_PAGE)
        groups = list(group_periods(rows))
        if len(rows) == EVENT_PAGE and len(groups) > 1:
            groups.pop()  # its period start may go on beyond this page
        if groups:
            self._queue.extend((STREAM_AGGREGATES, g) for g in groups)
            return
        polls = self._reader.reading_polls(self._marks[STREAM_READINGS], POLL_PAGE)
        if polls and polls[0].first_seq > self._marks[STREAM_READINGS] + 1:
            missing = (self._marks[STREAM_READINGS] + 1, polls[0].first_seq - 1)
            if missing != self._missing_logged:
                self._missing_logged = missing
                log.error("uplink %s: readings seq %d..%d are no longer in the buffer (purged at its size cap while "
                          "this platform was unreachable, dropped, or lost with a corrupt file): it will not get "
                          "them", self.target.name, *missing)
        self._queue.extend((STREAM_READINGS, p) for p in polls)

    def _send_and_wait(self, frame: bytes, qn: str, *, tries: int | None = None, must: bool = True,
                       acks: Callable[[], int] | None = None) -> bool:
        """Send `frame` until a 9014 names `qn` (True), at most `tries` times (1 + retries); then LinkDown, or
        False when not `must`. For a piece of a split packet, `acks` says how many 9014s naming `qn` it
        takes (`_deliver_split`)."""
        t = self.target

        def answered(acked: set[str]) -> bool:
            return qn in acked if acks is None else self._split_acks.get(qn, 0) >= acks()

        for attempt in range(t.retries + 1 if tries is None else tries):
            if attempt:  # a platform that never acknowledges: not a line per packet (rate-limited)
                self._linklog.warning("uplink %s: no 9014 for QN %s within %ss; sending again (%d/%d)",
                                      t.name, qn, t.timeout, attempt, t.retries)
            self._send(frame)
            deadline = time.monotonic() + t.timeout
            while True:
                if self._stop_event.is_set():
                    raise LinkDown("agent stopping")
                self.last_progress = time.monotonic()
                left = deadline - time.monotonic()
                if left <= 0:  # the 9014 may be waiting, read after a long answer to a request (a backfill)
                    if answered(self._receive(0)):
                        return True
                    break
                if answered(self._receive(left)):
                    return True
        if not must:
            return False
        raise LinkDown(f"no 9014 for QN {qn} after {t.retries + 1} tries")

    # ------------------------------------------------------------------ receiving

    def _receive(self, timeout: float) -> set[str]:
        """Read what the platform sent (waiting up to `timeout`), answer its requests; returns the QNs
        acknowledged by 9014 in what was read."""
        sock = self._sock
        if sock is None:
            raise LinkDown("not connected")
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], max(timeout, 0))
        except (OSError, ValueError) as exc:
            raise LinkDown(f"select failed: {exc}") from None
        if self._wake_r in readable:
            self._drain_wake()
        if sock not in readable:
            return set()
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return set()
        except OSError as exc:
            raise LinkDown(f"receive failed: {exc}") from None
        if not data:
            raise LinkDown("closed by the platform")
        acked: set[str] = set()
        for item in self._frames.feed(data):
            if isinstance(item, Hj212Error):
                self._bad_frame(item)
                continue
            try:
                packet = self._reassembler.add(item)
            except ReassemblyError as exc:
                self._errlog.warning("uplink %s: split packet dropped: %s", self.target.name, exc)
                continue
            if packet is None:
                continue
            if packet.cn == CN_DATA_ACK:
                if packet.qn is not None and packet.mn == self.identity.mn:
                    acked.add(packet.qn)
                    self._count_split_ack(packet.qn)
                continue
            if packet.cn == CN_REQUEST_ANSWER:
                self._refused_by_platform(packet)
                continue
            if packet.cn in ANSWER_CNS:
                continue  # 9012, 9013: answers to nothing we asked: ignored, never answered
            self._answer(packet)
        return acked

    def _refused_by_platform(self, answer: Packet) -> None:
        """A 9011 from the platform: we ask nothing, but a platform that refuses a data packet (our PW, MN or
        ST taken for wrong) may say so with QnRtn 2..9 instead of a 9014. Logged with its meaning (else the
        journal said only "no 9014", for ever); the packet is sent again as for a missing 9014."""
        code = answer.get("QnRtn")
        if answer.mn != self.identity.mn or code in (None, "1"):
            return
        meaning = codes()["qn_rtn"].meaning(code or "")
        self._linklog.warning("uplink %s: the platform refuses packet QN %s: QnRtn=%s (%s); check hj212 st/pw and "
                              "station.id against what the platform expects", self.target.name, answer.qn, code,
                              meaning or "unknown code", key=f"refused-by-platform:{code if meaning else '?'}")

    def _count_split_ack(self, qn: str) -> None:
        """A 9014 for `qn`. A second one for one of the last split packets: the platform acknowledges each
        piece, whatever a slow 9014 made it look like. Taken for one that answers whole packets, it had any
        9014 (the first piece's) count for the packet: a platform gone after the first piece lost the rest."""
        if qn not in self._split_acks:
            return
        self._split_acks[qn] += 1
        if self._split_acks[qn] > 1 and self._acks_whole_packets:
            self._acks_whole_packets = False
            log.info("uplink %s: the platform acknowledges each piece of a split packet after all; each piece now "
                     "waits for its 9014", self.target.name)

    def _bad_frame(self, error: Hj212Error) -> None:
        """A frame that does not decode is dropped; a request with a bad CRC, addressed to this station
        with a QN (bytes over 0x7F read as '?'), is answered QnRtn 9 (CRC error) so the platform knows to send it again;
        one whose only fault is its QN is answered as a request without QN (QnRtn 7); one whose MN, PW, ST or
        CN is malformed (a password of 7 characters) is refused with the code of its first fault
        (`_refuse_malformed`); one holding text that is not ASCII (`NotAscii`) is refused QnRtn=2, or with the
        code of a header field that holds it (`_refuse_not_ascii`)."""
        if isinstance(error, NotAscii) and error.packet is not None and error.packet.pnum is None \
                and error.packet.cn not in ANSWER_CNS:
            self._refuse_not_ascii(error.packet, error)
            return
        if isinstance(error, BadHeader) and error.packet is not None and error.packet.pnum is None \
                and error.packet.cn not in ANSWER_CNS:
            self._refuse_malformed(error.packet, error.fields)
            return
        if isinstance(error, BadQn) and error.packet is not None and error.packet.pnum is None \
                and error.packet.cn not in ANSWER_CNS:
            self._errlog.warning("uplink %s: request CN=%s with a malformed QN (%s)", self.target.name,
                                 error.packet.cn, error, key="bad-qn")
            self._answer(error.packet)
            return
        answer = error.packet if isinstance(error, (BadHeader, BadQn, NotAscii)) else None
        if answer is not None and answer.cn in ANSWER_CNS:
            # An answer is never answered; a malformed one is never acted on (a 9014 with a PW of 7 characters
            # does not count: the packet it names goes again). Said with what it names, not as "a bad frame".
            self._linklog.warning("uplink %s: %s QN=%s from the platform not taken: %s%s", self.target.name,
                                  answer.cn, answer.qn, error, "; the data packet it acknowledges goes again"
                                  if answer.cn == CN_DATA_ACK else "", key=f"bad-answer:{answer.cn}")
            return
        request = error.packet if isinstance(error, BadCrc) else None
        if (request is not None and request.qn is not None and request.mn == self.identity.mn
                and request.cn not in ANSWER_CNS):
            self._errlog.warning("uplink %s: request CN=%s QN=%s with a bad CRC (%s): answered QnRtn=%d",
                                 self.target.name, request.cn, request.qn, error, QNRTN_CRC, key="bad-crc")
            self._send_packet(reply_9011(request, QNRTN_CRC))
            return
        self._errlog.warning("uplink %s: bad frame from the platform dropped: %s", self.target.name, error,
                             key=f"bad-frame:{type(error).__name__}")

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------------ answering requests

    def _check(self, request: Packet) -> int:
        """QnRtn for a request's header: 1 when it may be executed."""
        ident = self.identity
        if request.mn != ident.mn:
            return QNRTN_MN
        if request.pw != ident.pw:
            return QNRTN_PW
        if request.st not in (ident.st, ST_SYSTEM):
            return QNRTN_ST
        if request.flag is not None and request.version != 1:
            return QNRTN_FLAG
        if request.qn is None:
            return QNRTN_QN
        return QNRTN_OK

    def _reply_9011(self, request: Packet, code: int) -> None:
        """The request answer 9011 with QnRtn `code`, unless the request's Flag asks for no answer (A bit clear:
        Flag=4 in HJ 212-2017); a request without Flag (HJ/T 212-2005 style) is answered. A refusal left
        unanswered so is logged (its reason is logged where it is refused)."""
        if request.flag is None or request.answer_requested:
            self._send_packet(reply_9011(request, code))
        elif code != QNRTN_OK:
            self._errlog.warning("uplink %s: request CN=%.8s QN=%s refused with QnRtn=%d, not answered: its Flag=%d "
                                 "asks for no answer", self.target.name, request.cn, request.qn, code, request.flag,
                                 key=f"unanswered:{code}")

    def _refuse(self, request: Packet, code: int) -> None:
        """Answer 9011 with QnRtn `code` (a request without QN gets a QN of its own: every packet has one)."""
        self._errlog.warning("uplink %s: refused request CN=%.8s QN=%s: QnRtn=%d", self.target.name, request.cn,
                             request.qn, code, key=f"refused:{code}")
        if request.qn is None:
            request = dataclasses.replace(request, qn=self.payload.next_qn())
        self._reply_9011(request, code)

    def _refuse_not_ascii(self, request: Packet, error: NotAscii) -> None:
        """A request holding text that is not ASCII (UTF-8 or GBK: `NotAscii`), never executed (what it asks may
        be in that text): refused with the code of its first fault in `_check`'s order (a PW or MN holding such
        text is never the station's), else QnRtn=2 (refused); the answer names the station's PW and MN in
        place of the request's where those hold it."""
        self._errlog.warning("uplink %s: request CN=%.8s QN=%s holds %s; refused, never executed (HJ 212 fields "
                             "are ASCII: check the platform's character encoding)", self.target.name, request.cn,
                             request.qn, error, key=f"not-ascii:{error.utf8}")
        self._refuse_malformed(request, error.fields, otherwise=QNRTN_REFUSED)

    def _refuse_malformed(self, request: Packet, fields: frozenset[str], otherwise: int = QNRTN_CN) -> None:
        """A request with a malformed MN, PW, ST or CN (`BadHeader`), never executed: refused with the code of
        its first fault in `_check`'s order (a malformed value never equals the station's), QnRtn 8 when only
        its CN is. Its answer names the station's own MN and PW where the request's do not fit a packet (a
        PW of 7 characters echoed would make the answer itself invalid); ST and CN are not echoed (9011, 91)."""
        code = self._check(request)
        if code == QNRTN_OK:
            code = otherwise
        ident = self.identity
        self._refuse(dataclasses.replace(request, pw=ident.pw if "PW" in fields else request.pw,
                                         mn=ident.mn if "MN" in fields else request.mn), code)

    def _answer(self, request: Packet) -> None:
        name = self.target.name
        code = self._check(request)
        if code != QNRTN_OK:
            self._refuse(request, code)
            return
        self._backoff = 0.5
        handlers = {CN_MINUTE: self._backfill, CN_HOUR: self._backfill, CN_DAY: self._backfill,
                    CN_REALTIME: self._realtime, CN_GET_TIME: self._get_time, CN_SET_TIME: self._set_time,
                    CN_GET_RTD_INTERVAL: self._get_rtd_interval, CN_SET_RTD_INTERVAL: self._set_rtd_interval}
        handler = handlers.get(request.cn)
        if handler is None:
            self._errlog.log(logging.INFO, "uplink %s: request CN=%s is not supported; refused with QnRtn=%d", name,
                             request.cn, QNRTN_CN, key=f"unsupported:{request.cn}")
            self._reply_9011(request, QNRTN_CN)
            return
        handler(request)

    def _time_item(self, request: Packet, key: str) -> datetime | None:
        text = request.get(key)
        if not text:
            return None
        try:
            return parse_time(text, self.tz)
        except Hj212Error:
            return None

    def _realtime(self, request: Packet) -> None:
        """2011 from the platform: with BeginTime/EndTime, a backfill of real-time data (the stored
        polls); without, a request for real-time data, which this uplink sends anyway: 9011 QnRtn=1."""
        if request.get("BeginTime") is None and request.get("EndTime") is None:
            self._reply_9011(request, QNRTN_OK)
            return
        self._backfill(request)

    def _backfill(self, request: Packet) -> None:
        """2051/2061/2031/2011 with BeginTime/EndTime (inclusive): 9011, the stored records, 9012."""
        begin, end = self._time_item(request, "BeginTime"), self._time_item(request, "EndTime")
        if begin is None or end is None or begin > end:
            self._errlog.warning("uplink %s: backfill CN=%s QN=%s without a valid BeginTime..EndTime; refused",
                                 self.target.name, request.cn, request.qn, key="bad-range")
            self._reply_9011(request, QNRTN_REFUSED)
            return
        self._reply_9011(request, QNRTN_OK)
        # Both inclusive, in station time: the records whose DataTime lies between them, also those of
        # the repeated autumn hour's second pass, and from a BeginTime in the spring gap on. The instants
        # from the first time the clock showed BeginTime to the last time it showed EndTime hold them all,
        # and in a range that ends or starts inside the repeated hour also some whose DataTime does not
        # lie in it: `shown` leaves those out.
        start_ms = first_instant_ms(begin)
        end_ms = last_instant_ms(end.replace(microsecond=999_000))  # DataTime has whole seconds
        first, last = format_time(begin), format_time(end)

        def shown(ts_ms: int) -> bool:
            return first <= format_time(datetime.fromtimestamp(ts_ms // 1000, self.tz)) <= last

        count = 0
        records = (self._poll_records if request.cn == CN_REALTIME else self._period_records)(
            start_ms, end_ms, request, shown)
        reader = self._reader
        assert reader is not None
        # Readings have no time index: a 2011 backfill reads the table by seq, 2 minutes for a 1.4 GB
        # buffer not in the page cache (audit Y). SQLite working through it is progress, not a hang.
        reader.conn.set_progress_handler(self._reading_the_buffer, SCAN_PROGRESS_STEPS)
        try:
            for message in records:
                for frame in message.frames:
                    self._send(frame)
                count += 1 if message.frames else 0
                self.last_progress = time.monotonic()
        except sqlite3.OperationalError:
            if self._stop_event.is_set():  # the query was interrupted for the stop (`_reading_the_buffer`)
                raise LinkDown("agent stopping") from None
            raise
        finally:
            reader.conn.set_progress_handler(None, 0)
        log.info("uplink %s: backfill CN=%s %s..%s: %d records sent", self.target.name, request.cn,
                 format_time(begin), format_time(end), count)
        self._send_packet(reply_9012(request, EXERTN_OK if count else EXERTN_NO_DATA))

    def _reading_the_buffer(self) -> int:
        """SQLite's progress handler during a backfill: progress for the watchdog; a stop interrupts the query
        (else a stop or reload waited for a scan of minutes, and a reload's successor ran beside it)."""
        self.last_progress = time.monotonic()
        return 1 if self._stop_event.is_set() else 0

    def _period_records(self, start_ms: int, end_ms: int, request: Packet,
                        shown: Callable[[int], bool]) -> Iterator[Hj212Message]:
        rows = (row for row in self._rows_between(start_ms, end_ms, UNIT_BY_CN[request.cn]) if shown(row.ts_ms))
        for group in group_periods(rows):
            yield self.payload.period_message(group, FLAG_V2017, qn=request.qn)

    def _poll_records(self, start_ms: int, end_ms: int, request: Packet,
                      shown: Callable[[int], bool]) -> Iterator[Hj212Message]:
        assert self._reader is not None
        after = 0
        while polls := self._reader.polls_between(start_ms, end_ms, after_seq=after, limit=BACKFILL_PAGE):
            for poll in polls:
                if shown(poll.ts_ms):
                    yield self.payload.poll_message(poll, FLAG_V2017, qn=request.qn)
            after = polls[-1].last_seq

    def _rows_between(self, start_ms: int, end_ms: int, unit: str) -> Iterator[EventRow]:
        assert self._reader is not None
        after: tuple[int, int] | None = None
        while True:
            page = self._reader.aggregates_between(start_ms, end_ms, unit=unit, after=after, limit=BACKFILL_PAGE)
            yield from page
            if len(page) < BACKFILL_PAGE:
                return
            after = (page[-1].ts_ms, page[-1].seq)

    def _get_time(self, request: Packet) -> None:
        """1011: 9011, a 1011 packet with SystemTime (station time), 9012."""
        self._reply_9011(request, QNRTN_OK)
        group: dict[str, str] = {}
        pol_id = request.get("PolId")
        if pol_id:
            group["PolId"] = pol_id
        group["SystemTime"] = format_time(datetime.fromtimestamp(self.clock(), self.tz))
        ident = self.identity
        self._send_packet(Packet(qn=request.qn, st=ident.st, cn=CN_GET_TIME, pw=ident.pw, mn=ident.mn,
                                 flag=FLAG_V2017, cp=[group]))
        self._send_packet(reply_9012(request, EXERTN_OK))

    def _set_time(self, request: Packet) -> None:
        """1012: logged, never applied to the system clock (see the module docstring)."""
        wanted = self._time_item(request, "SystemTime")
        if wanted is None:
            self._errlog.warning("uplink %s: 1012 QN=%s without a valid SystemTime; refused", self.target.name,
                                 request.qn, key="bad-system-time")
            self._reply_9011(request, QNRTN_REFUSED)
            return
        self._reply_9011(request, QNRTN_OK)
        offset = wanted.timestamp() - self.clock()
        agrees = abs(offset) <= TIME_TOLERANCE_S
        self._errlog.warning("uplink %s: platform asks to set the clock to %s (%+.0f s from ours); the agent never "
                             "changes the system clock%s", self.target.name, format_time(wanted), offset,
                             "" if agrees else " - check NTP (timedatectl)", key="set-time")
        self._send_packet(reply_9012(request, EXERTN_OK if agrees else EXERTN_FAILED))

    def _rtd_interval_text(self) -> str | None:
        return None if self.rtd_interval is None else format_number(self.rtd_interval)

    def _get_rtd_interval(self, request: Packet) -> None:
        """1061: 9011, a 1061 packet with RtdInterval (seconds), 9012; refused (QnRtn=2) when not known."""
        interval = self._rtd_interval_text()
        if interval is None:
            self._errlog.warning("uplink %s: 1061 QN=%s asks for the real-time interval, which this uplink was not "
                                 "given; refused", self.target.name, request.qn, key="rtd-interval-unknown")
            self._reply_9011(request, QNRTN_REFUSED)
            return
        self._reply_9011(request, QNRTN_OK)
        ident = self.identity
        self._send_packet(Packet(qn=request.qn, st=ident.st, cn=CN_GET_RTD_INTERVAL, pw=ident.pw, mn=ident.mn,
                                 flag=FLAG_V2017, cp=[{"RtdInterval": interval}]))
        self._send_packet(reply_9012(request, EXERTN_OK))

    def _set_rtd_interval(self, request: Packet) -> None:
        """1062: logged, never applied (a command never changes the configuration; see the module docstring)."""
        text = request.get("RtdInterval") or ""
        try:
            wanted = parse_number(text, "RtdInterval")
        except Hj212Error:
            wanted = None
        if wanted is None or wanted <= 0:
            self._errlog.warning("uplink %s: 1062 QN=%s without a valid RtdInterval; refused", self.target.name,
                                 request.qn, key="bad-rtd-interval")
            self._reply_9011(request, QNRTN_REFUSED)
            return
        self._reply_9011(request, QNRTN_OK)
        agrees = self.rtd_interval is not None and wanted == self.rtd_interval
        self._errlog.warning("uplink %s: platform asks to set the real-time interval (RtdInterval) to %s s (ours: %s); "
                             "a remote command never changes the configuration: set the devices' `interval` in the "
                             "configuration file", self.target.name, format_number(wanted),
                             self._rtd_interval_text() or "not known", key="set-rtd-interval")
        self._send_packet(reply_9012(request, EXERTN_OK if agrees else EXERTN_FAILED))
