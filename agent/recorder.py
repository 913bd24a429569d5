"""The recorder: the one thread that writes the buffer database, with group commit.

Pollers hand it readings (`submit`), the publisher hands it acknowledgements (`ack`) and announced
gaps; every `commit_interval_ms` it writes all of that in one transaction, so the SD card sees one
small write burst per interval and a power cut loses at most that interval. It commits sooner when
no poller will hand over readings before the interval ends (`set_quiet_check`): waiting would then
add nothing to the transaction, only a wake-up and a longer exposure to a power cut. It also keeps
the size cap (eviction), purges old published rows and snapshots per-channel health for `status`.
Imports `agent.buffer`, `agent.clock` (`AgeClock`, for the purge) and `agent.model`, with the small
helpers `agent.logutil` and `agent.threadname`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.buffer import WAL_LOST, Buffer, BufferError, RescueCutShort, is_corruption, lowest_progress
from agent.clock import AgeClock
from agent.logutil import RateLimitedLog
from agent.model import STREAM_ALARMS, STREAM_READINGS, Reading, now_ms
from agent.seqmark import mark_path
from agent.threadname import name_this_thread

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 60.0  # channel health table refresh (status also folds in the readings stored since)
ACK_PERSIST_EVERY_S = 5.0  # acknowledged watermark written at most this often (a crash re-sends at most this much)
SIZE_CHECK_EVERY_S = 5.0
PATH_CHECK_EVERY_S = 5.0  # that the buffer's path still names the file written (one stat)
PURGE_EVERY_S = 600.0
# The first pass, this long after a start: at PURGE_EVERY_S, an agent restarted more often than that (a crash
# loop, a flaky power supply) never purged by age, and only `max_mb` bounded the file
PURGE_FIRST_S = 10.0
PURGE_CATCHUP_S = 5.0  # the next pass, while a pass found more than it may delete at once (PURGE_MAX_ROWS)
MAX_PENDING = 500_000  # readings held in memory while the disk refuses writes
# Rows an eviction deletes per transaction. Every page a transaction frees goes through the WAL, so one
# transaction for all of it needed disk beside the file for as much as it deleted (37 MiB at the default
# 256 MB cap; a disk with the README's max_mb + 8 MiB free was then full for good): ~1 MB a round, which
# the checkpoint after each commit gives back before the next (audit Y).
EVICT_ROUND_ROWS = 20_000
# A reader's report of a damaged page (`suspect_corruption`) makes the recorder read the whole file
# (quick_check) at most this often: a report the check does not confirm is not worth a re-read sooner.
VERIFY_EVERY_S = 600.0


DISK_FULL_BYTES = 1024 * 1024  # a refused write with less than this free on the disk: the disk is full
# What one reading takes in the file at most (its row, its share of the pages and of the time index), to
# size the transactions that work off a backlog held in memory within the room an eviction left.
READING_BYTES = 200


def _free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the disk holding `path` (None when it cannot be told)."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _json_object(text: str | None) -> bool:
    try:
        return isinstance(json.loads(text or ""), dict)
    except ValueError:
        return False


class Recorder(threading.Thread):
    """Owns the writer `Buffer`. Thread-safe entry points: submit, ack, gap_announced, set_meta,
    add_listener, flush, stop. Everything else runs on the recorder thread."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        commit_interval_ms: int,
        keep_sent_days: float,
        max_mb: float,
        sync: str = "full",
    ):
        super().__init__(name="recorder", daemon=True)
        self.buffer = buffer
        self.commit_interval = commit_interval_ms / 1000
        self.keep_sent_days = keep_sent_days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.sync = sync
        self._cond = threading.Condition()
        self._pending: deque[Reading] = deque()
        self._events: list[tuple[str, int, dict]] = []
        self._acks: dict[str, int] = {}
        self._gaps_announced: list[tuple[int, int, tuple[int, int] | None]] = []
        self._meta: dict[str, str] = {}
        self._beside_due: set[str] = set()  # meta keys to keep beside the file once committed (set_meta)
        # Meta keys whose copy beside the file is looked after (watch_beside): True until it was compared once.
        self._beside_watched: dict[str, bool] = {}
        # Meta keys whose copy beside the file this run wrote or found there: only such a copy gone is news
        self._beside_seen: set[str] = set()
        # Alarm events up to this seq may be published: their state is kept beside the file (stored_upto)
        self._alarms_released = buffer.last_seq(STREAM_ALARMS)
        self._listeners: list[Callable[[], None]] = []
        self._stored_listeners: list[Callable[[list[Reading]], None]] = []
        self._tick_listeners: list[Callable[[], None]] = []
        self._quiet_check: Callable[[float], bool] = lambda deadline: False
        self._in_flight: Callable[[], int] = lambda: 0
        self.evict_lock = threading.Lock()  # eviction against the publisher taking rows (set_in_flight_check)
        self._new_limits: tuple[float, float, int] | None = None  # set_limits, applied by the recorder thread
        self._stopping = False
        self._flush_requested = 0
        self._flushed = 0
        # Readings per transaction while a backlog held in memory is worked off (None: all that wait). Set by
        # a write the cap refused, to what the room left by the eviction holds: one transaction for a backlog
        # larger than the cap was refused for ever, every reading taken since waiting behind it, then lost.
        self._commit_limit: int | None = None
        # (device, channel) -> [last reading, time of the last valid one, good count, bad count]
        self._channels: dict[tuple[str, str], list] = {
            (c["device"], c["channel"]): [
                Reading(c["device"], c["channel"], c["ts_ms"], c["value"], c["unit"], c["flag"], c["seq"]),
                c["last_valid_ms"], c["good"] or 0, c["bad"] or 0]
            for c in buffer.channels()
        }
        self._channels_dirty = False
        self._last_snapshot = self._last_ack_persist = self._last_size_check = self._last_path_check = 0.0
        self._wal_held = False
        self._next_purge = time.monotonic() + PURGE_FIRST_S
        self.age_clock = AgeClock()  # the purge's "now": a clock set days ahead by mistake purges nothing early
        self.age_clock.now_ms()  # from the start: a step before the first purge pass is not followed either
        self.dropped_in_memory = 0
        self.gaps_recorded = 0  # eviction rounds that recorded (or extended) a gap; the publisher watches it
        self.last_progress = time.monotonic()
        self.last_committed_seq = buffer.last_seq(STREAM_READINGS)
        self._errlog = RateLimitedLog(log, every_s=60)
        self.write_error: str | None = None  # why the buffer refuses writes (None while they work): P/status says it
        self._write_error_since = 0.0
        self._reopen = False  # the writer connection is gone (a rescue failed): open the file again
        self._rescue_pending: RescueCutShort | None = None  # a rescue the disk cut short: resumed at the reopen
        # Meta keys of the HJ 212 uplinks' progress (set_holders; None until then: a rescue keeps rows for all).
        self._holders: tuple[str, ...] | None = None
        self.detached: str | None = None  # what became of the file at the path while it is not put back yet
        self._seq_mirrors: list[Path] = []  # the seq marks kept beside other storage paths (keep_seq_marks_for)
        self._suspected: str | None = None  # a reader met a damaged page: what it said (suspect_corruption)
        self._last_verify = -VERIFY_EVERY_S

    # ------------------------------------------------------------------ any thread

    def submit(self, readings: Sequence[Reading]) -> None:
        """Queue readings for the next group commit. Never blocks; if the disk has refused writes
        for long enough that MAX_PENDING readings wait in memory, the oldest are dropped (logged)."""
        with self._cond:
            self._pending.extend(readings)
            overflow = len(self._pending) - MAX_PENDING
            if overflow > 0:
                for _ in range(overflow):
                    self._pending.popleft()
                self.dropped_in_memory += overflow
                self._errlog.error("memory queue full while the buffer refuses writes: %d readings dropped",
                                   self.dropped_in_memory)
            self._cond.notify()

    def submit_event(self, stream: str, ts_ms: int, body: dict) -> None:
        """Queue an aggregate or alarm event (it gets its seq at commit)."""
        with self._cond:
            self._events.append((stream, ts_ms, body))
            self._cond.notify()

    def ack(self, stream: str, upto_seq: int) -> None:
        """The broker acknowledged every row of `stream` up to `upto_seq`."""
        with self._cond:
            if upto_seq > self._acks.get(stream, 0):
                self._acks[stream] = upto_seq

    def gap_announced(self, gap_id: int, last_seq: int, identity: tuple[int, int] | None = None) -> None:
        """The gap `gap_id` of the file `identity` (`Buffer.identity`, as the publisher read it) was announced
        up to `last_seq`. Gap ids are each file's own (a rescued file numbers its gaps from 1 again): an
        announcement of another file's gap is dropped, or it marked an unrelated gap of this one announced."""
        with self._cond:
            self._gaps_announced.append((gap_id, last_seq, identity))
            self._cond.notify()

    def suspect_corruption(self, reader: str, exc: BaseException) -> None:
        """A reader of the file (`reader`: who) met `exc`, which says a page is damaged (`is_corruption`).
        A page damaged on the card while the agent runs is met only by whoever reads it (the drain of a
        long backlog, a resend, an uplink catching up), and would stop that reader there for good. The
        recorder thread checks the file at its next turn and, when the check confirms the damage,
        rescues it as a start does (`Buffer.rescue`: moved aside, a fresh file, what is readable
        salvaged, the seqs lost announced); the readers follow the new file."""
        with self._cond:
            if self._suspected is None:
                self._suspected = f"{reader}: {exc}"

    def set_meta(self, key: str, value: str, *, keep_beside: bool = False) -> None:
        """Write a meta value at the next commit; with `keep_beside`, into `<buffer>.<key>` too once
        committed (`Buffer.keep_beside`: what a fresh file starts from should this one be lost)."""
        with self._cond:
            self._meta[key] = value
            if keep_beside:
                self._beside_due.add(key)
            self._cond.notify()

    def watch_beside(self, key: str) -> None:
        """Look after `<buffer>.<key>`, the copy of meta `key` that `set_meta(keep_beside=True)` writes at
        each change: at the next path check it must be there and sound (one left by an earlier run may be
        missing, truncated or corrupt), then every PATH_CHECK_EVERY_S it must still exist (`rm
        buffer.db*` takes it); else it is written again from the buffer (`_check_beside`). Else it stayed
        away until the next change (an alarm event: rare), and a buffer file lost meanwhile had the fresh
        one start without it, raising an active alarm a second time."""
        with self._cond:
            self._beside_watched[key] = True

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the recorder thread after every commit that stored new rows."""
        self._listeners.append(callback)

    def add_stored_listener(self, callback: Callable[[list[Reading]], None]) -> None:
        """`callback(readings)` runs on the recorder thread with each committed batch (with seqs)."""
        self._stored_listeners.append(callback)

    def add_tick_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the recorder thread about once a second (and after every commit)."""
        self._tick_listeners.append(callback)

    def set_in_flight_check(self, check: Callable[[], int]) -> None:
        """`check()` is the highest readings seq the publisher has offered to the broker (at or below the
        acknowledged watermark when nothing is in flight); called with `evict_lock` held, which the
        publisher holds while it takes rows from the buffer and offers them."""
        self._in_flight = check

    def set_quiet_check(self, check: Callable[[float], bool]) -> None:
        """`check(deadline)` is True when no poller hands over readings before `deadline`
        (monotonic): the group commit then writes at once instead of waiting for its window."""
        self._quiet_check = check

    def keep_seq_marks_for(self, path: str | Path) -> bool:
        """The config now names another buffer file (used from the next start): keep this buffer's seq
        high-water mark beside it too, so that its seqs continue above every seq issued here. False when
        it is kept there already (a later reload of the same file)."""
        path = Path(path)
        assert self.buffer.seqmark is not None
        mirror = mark_path(path)
        if mirror in self._seq_mirrors:
            return False
        self._seq_mirrors.append(mirror)
        self.buffer.seqmark.mirror_to(mirror)
        return True

    def _new_writer(self, buffer: Buffer) -> Buffer:
        """`buffer` replaces the writer (a rescue, a reopen): its seq mark, a new one, is kept beside the
        paths SIGHUPs named too (`keep_seq_marks_for`) before it issues a seq. Without that, the seqs the
        rescued file issued were issued again by the buffer the next start opened at the new path."""
        assert buffer.seqmark is not None
        for mirror in self._seq_mirrors:
            buffer.seqmark.mirror_to(mirror)
        return buffer

    def set_limits(self, *, max_mb: float, keep_sent_days: float, commit_interval_ms: int) -> None:
        """New storage limits (a reload), applied by the recorder thread at its next pass: the size cap
        (a smaller one evicts at once, as SPEC §3 says), the age purge and the group-commit window."""
        with self._cond:
            self._new_limits = (max_mb, keep_sent_days, commit_interval_ms)
            self._cond.notify()

    def _apply_limits(self) -> None:
        if self._new_limits is None:  # every commit passes here: no lock unless a reload set limits
            return
        with self._cond:
            limits, self._new_limits = self._new_limits, None
        if limits is None:
            return
        max_mb, self.keep_sent_days, commit_interval_ms = limits
        self.commit_interval = commit_interval_ms / 1000
        self.max_bytes = int(max_mb * 1024 * 1024)
        try:
            self.buffer.set_size_cap(max_mb)
        except sqlite3.Error as exc:
            self._errlog.error("cannot set the buffer's size cap to %s MB: %s", max_mb, exc)
        self._last_size_check = 0.0  # checked against the new cap at once

    def set_holders(self, meta_keys: Sequence[str]) -> None:
        """The meta keys under which the other consumers of the buffer (HJ 212 uplinks) keep their
        progress: published rows they have not delivered yet are purged only when the size cap
        leaves no other choice (`Buffer.evict`), never for their age."""
        self._holders = tuple(meta_keys)

    def _held(self) -> dict[str, int]:
        """Per stream, the seq up to which every holder has delivered it (recorder thread). A holder's
        record names the streams it consumes (an uplink writes its record before polling starts)."""
        records = []
        for key in self._holders or ():
            try:
                records.append(self.buffer.meta_value(key))
            except sqlite3.Error:
                continue
        return lowest_progress(records)

    def seen_channels(self) -> dict[str, dict[str, str | None]]:
        """device -> {channel: unit of its latest reading} of every channel stored so far."""
        out: dict[str, dict[str, str | None]] = {}
        for (device, channel), row in list(self._channels.items()):  # one C-level copy: no lock needed
            out.setdefault(device, {})[channel] = row[0].unit
        return out

    def file_identity(self) -> tuple[int, int] | None:
        """The file the recorder writes now (`Buffer.identity`): readers follow a new file at the path
        only once it is this one."""
        return self.buffer.identity

    def open_reader(self) -> Buffer:
        """A read-only connection to the file the recorder writes now; BufferError while another file
        (or none) stands at the path, until the recorder has put its own back (`_check_path`)."""
        return Buffer.open_reader(self.buffer.path, expect=self.file_identity())

    def detached_text(self) -> str | None:
        """While the file written is not at its path and not put back yet (`_check_path`), in words for
        P/status and systemd's STATUS=; else None."""
        what = self.detached
        return f"buffer file {what} while the agent runs, not put back yet (see the log)" if what else None

    def stored_upto(self, stream: str) -> int:
        """The last seq of `stream` stored (or being stored now): the publisher reads no further. For
        alarms, the last one whose state is also kept beside the file: published before that, an event
        was raised a second time by a fresh file after a crash in between and the loss of this one."""
        if stream == STREAM_ALARMS:
            return self._alarms_released
        return self.buffer.last_seq(stream)

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit everything queued so far now; True when done within `timeout`."""
        with self._cond:
            self._flush_requested += 1
            target = self._flush_requested
            self._cond.notify()
            return self._cond.wait_for(lambda: self._flushed >= target or not self.is_alive(), timeout)

    def flush_settled(self, rounds: int = 4, timeout: float = 10.0) -> None:
        """Flush until a commit leaves nothing queued: what the listeners queue in reply to a commit
        (an alarm event, a period, their state) is committed too. For a stop, once polling ended."""
        for _ in range(rounds):
            if not self.flush(timeout):
                return
            with self._cond:
                if not (self._pending or self._events or self._meta):
                    return

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, persist acknowledgements, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join(timeout)

    # ------------------------------------------------------------------ recorder thread

    def run(self) -> None:
        name_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work, timeout=1.0)
                if (self._pending and not self._stopping and self._flushed >= self._flush_requested
                        and self._commit_limit is None):  # (a backlog being worked off goes on at once)
                    # Group commit: let the interval fill up before writing, unless nothing more
                    # will come within it (checked again at every hand-over).
                    deadline = time.monotonic() + self.commit_interval
                    while not self._stopping and self._flushed >= self._flush_requested:
                        left = deadline - time.monotonic()
                        if left <= 0 or self._quiet_check(deadline):
                            break
                        self._cond.wait(left)
                stopping = self._stopping
                flush_target = self._flush_requested
            self.last_progress = time.monotonic()
            if self._nothing_to_write(stopping):
                self._after_commit([], [])
                continue
            self._commit_once(final=stopping)
            with self._cond:
                if not self._pending or stopping:
                    self._flushed = max(self._flushed, flush_target)
                self._cond.notify_all()
            if stopping:
                # Once more (the failed commit made room if it could), and on while a backlog goes in in parts.
                while self._pending or self._events:
                    left = len(self._pending) + len(self._events)
                    self._commit_once(final=True)
                    if len(self._pending) + len(self._events) >= left:
                        break
                self._report_unwritten()
                if not self._reopen:  # (a writer that lost its connection has no file of its own to put back)
                    self._check_path(stopping=True)
                return

    def _report_unwritten(self) -> None:
        """At a stop: what the last commit could not write (a full disk) is lost with the process; say so."""
        with self._cond:
            readings, events = len(self._pending), len(self._events)
        if readings or events:
            log.error("stopping with %d readings and %d events that could not be written to the buffer (see the "
                      "errors above); they are lost", readings, events)
        if self._rescue_pending is not None:
            log.error("stopping before the corrupt buffer moved aside as %s could be salvaged (no fresh file could "
                      "be made): its rows stay in it, and the next start with room "
                      "salvages it (a marker beside the buffer says so)", self._rescue_pending.moved.name)

    def _nothing_to_write(self, stopping: bool) -> bool:
        """Idle wake-up: no rows, no metadata, no acknowledgement due — skip the transaction."""
        with self._cond:
            if stopping or self._has_work() or self._flush_requested > self._flushed:
                return False
            acks_due = any(self._acks.get(s, 0) > self.buffer.sent_upto(s) for s in self._acks)
        return not (acks_due and time.monotonic() - self._last_ack_persist >= ACK_PERSIST_EVERY_S)

    def _has_work(self) -> bool:
        return bool(self._pending or self._events or self._gaps_announced or self._meta or self._stopping
                    or self._flush_requested > self._flushed)

    def _commit_once(self, final: bool = False) -> None:
        if self._reopen:
            try:
                max_mb = self.max_bytes / (1024 * 1024)
                pending = self._rescue_pending
                self.buffer = self._new_writer(
                    Buffer.resume_rescue(self.buffer.path, pending.moved, pending.acked, sync=self.sync, max_mb=max_mb,
                                         progress=self._progressing, holders=self._holders) if pending is not None
                    else Buffer.open_writer(self.buffer.path, sync=self.sync, max_mb=max_mb))
                self._reopen = False
                self._rescue_pending = None
            except (sqlite3.Error, OSError, BufferError) as exc:
                if self.write_error is None:
                    self._write_error_since = time.monotonic()
                self.write_error = f"cannot open the buffer file: {exc}"
                self._errlog.error("cannot open the buffer file: %s; %d readings wait in memory, retrying",
                                   exc, len(self._pending))
                time.sleep(min(self.commit_interval, 1.0))
                return
        with self._cond:
            if self._commit_limit is None or len(self._pending) <= self._commit_limit:
                batch = list(self._pending)
                self._pending.clear()
            else:  # the oldest part of a backlog, in whole polls: the rest in the next transactions
                batch = self._take_whole_polls(self._commit_limit)
            events = self._events
            self._events = []
            gaps = self._gaps_announced
            self._gaps_announced = []
            meta = self._meta
            self._meta = {}
            acks = dict(self._acks)
        now = time.monotonic()
        persist_acks = final or now - self._last_ack_persist >= ACK_PERSIST_EVERY_S
        snapshot = final or (self._channels_dirty and now - self._last_snapshot >= SNAPSHOT_EVERY_S)
        try:
            self.buffer.begin()
            stored = self.buffer.insert_readings(batch) if batch else []
            for stream, ts_ms, body in events:
                self.buffer.insert_event(stream, ts_ms, body)
            if persist_acks:
                for stream, upto in acks.items():
                    self.buffer.set_sent_upto(stream, upto)
            for gap_id, last_seq, identity in gaps:
                if identity is None or identity == self.buffer.identity:
                    self.buffer.mark_gap_announced(gap_id, last_seq)
            for key, value in meta.items():
                self.buffer.set_meta(key, value)
            self._track_channels(stored)
            if snapshot:
                self._write_snapshot()
            self.buffer.commit()
        except Exception as exc:  # noqa: BLE001 - the one writer must never die: keep the batch, retry
            self.buffer.rollback()
            self._on_write_error(exc, batch, events, gaps, meta)
            return
        with self._cond:
            if not self._pending:
                self._commit_limit = None
            elif self._commit_limit is not None:  # taken: the next part may be larger (a failure sizes it again)
                self._commit_limit *= 2
        if self.write_error is not None:
            log.warning("buffer writes work again after %.0f s: %d readings held in memory meanwhile are stored",
                        time.monotonic() - self._write_error_since, len(batch))
            self.write_error = None
        if persist_acks and acks:  # the first acknowledgement after a start is written at the next commit
            self._last_ack_persist = now
        if snapshot:
            self._last_snapshot = now
            self._channels_dirty = False
        if self._beside_due:
            self._keep_beside(meta)
        with self._cond:
            if not self._beside_due:  # (else a newer state is still to be kept, at its own commit)
                self._alarms_released = self.buffer.last_seq(STREAM_ALARMS)
        self._after_commit(stored, events)

    def _keep_beside(self, committed: dict[str, str]) -> None:
        """Copy the meta values just committed that are to be kept beside the file (a newer value
        already queued is kept at its own commit)."""
        with self._cond:
            due = {k: committed[k] for k in self._beside_due if k in committed and k not in self._meta}
            self._beside_due -= due.keys()
        for key, value in due.items():
            try:
                self.buffer.keep_beside(key, value)
            except OSError as exc:
                self._errlog.error("cannot keep %s beside the buffer file (%s): should the file be lost, a fresh "
                                   "one would start without it", key, exc)
                continue
            self._beside_seen.add(key)

    def _after_commit(self, stored: list[Reading], events: list) -> None:
        """Tell the listeners (alarm engine, aggregator, publisher) and do the periodic housekeeping.
        The publisher is woken last: it then does not wait for the interpreter while this thread
        finishes (one thread switch per commit instead of several)."""
        if stored:
            self.last_committed_seq = stored[-1].seq
            for stored_callback in self._stored_listeners:
                self._safely(stored_callback, stored)
        for tick in self._tick_listeners:
            self._safely(tick)
        self._housekeeping(time.monotonic())
        if stored or events:
            for callback in self._listeners:
                callback()

    def _safely(self, callback: Callable, *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - a listener bug must not stop the recorder
            log.exception("recorder listener %r failed", callback)

    def _on_write_error(self, exc: Exception, batch: list[Reading], events: list, gaps: list[tuple],
                        meta: dict[str, str]) -> None:
        """Keep everything in memory and retry next interval; make room or rescue the file first."""
        if self.write_error is None:
            self._write_error_since = time.monotonic()
        self.write_error = str(exc) or type(exc).__name__
        with self._cond:
            self._pending.extendleft(reversed(batch))
            self._events[:0] = events
            self._gaps_announced[:0] = gaps
            self._meta = {**meta, **self._meta}
        if is_corruption(exc):
            self._rescue_corrupt(exc)
            return
        try:
            self.buffer.reload_counters()
        except sqlite3.Error as exc2:
            self._errlog.error("re-reading the buffer's counters failed: %s", exc2)
        now = time.monotonic()
        if now - self._last_path_check >= PATH_CHECK_EVERY_S:  # no housekeeping while writes fail: checked here
            self._last_path_check = now
            self._check_path()
        text = str(exc).lower()
        if "full" in text:
            # Either the size cap or the disk itself is full (then the cap is out of reach): free a
            # tenth of what is in use, so that new rows reuse freed pages instead of growing the file.
            try:
                target = min(int(self.max_bytes * 0.8), int(self.buffer.used_bytes() * 0.9))
            except sqlite3.Error:
                target = int(self.max_bytes * 0.8)
            free = _free_bytes(self.buffer.path)
            if free is not None and free < DISK_FULL_BYTES:  # the disk, not the cap: the operator's to cure
                self._errlog.error("buffer write refused: the disk holding %s is full (%.0f kB free): free space on "
                                   "it (other files took it; files moved aside beside the buffer count too); "
                                   "%d readings wait in memory meanwhile (at most %d), published rows are evicted",
                                   self.buffer.path, free / 1024, len(batch), MAX_PENDING)
            else:
                self._errlog.error("buffer write refused (%s): evicting to make room; %d readings wait in memory",
                                   exc, len(batch))
            self._make_room(target)
            self._limit_commits_to_room()
            try:
                self.buffer.give_wal_back()  # the WAL's space back to the disk, a frame in it again
            except sqlite3.Error:
                pass
            time.sleep(min(self.commit_interval, 1.0))
        else:
            self._errlog.error("buffer write failed (%s); %d readings kept in memory, retrying", exc, len(batch))
            time.sleep(min(self.commit_interval, 1.0))

    def _take_whole_polls(self, limit: int) -> list[Reading]:
        """The oldest `limit` readings waiting, and the rest of the poll the last of them belongs to (a
        poll's readings are stored in one transaction: readers group them by device and time; caller
        holds `_cond`)."""
        pending = self._pending
        batch = [pending.popleft() for _ in range(limit)]
        last = batch[-1]
        while pending and pending[0].device == last.device and pending[0].ts_ms == last.ts_ms:
            batch.append(pending.popleft())
        return batch

    def _limit_commits_to_room(self) -> None:
        """After an eviction for a write the cap refused: the next transactions take at most the readings the
        room left below the cap holds, so that a backlog larger than the cap goes in part by part (each part
        evicted in its turn, as the oldest unpublished readings, with its gap) instead of never."""
        try:
            room = self.max_bytes - self.buffer.used_bytes()
        except sqlite3.Error:
            return
        self._commit_limit = max(1, room // READING_BYTES)

    def _rescue_corrupt(self, exc: Exception) -> None:
        """The file turned out corrupt while running: rescue it (readers notice the new file)."""
        self.buffer.close_corrupt()
        try:
            self.buffer = self._new_writer(Buffer.rescue(self.buffer.path, exc, sync=self.sync,
                                                         max_mb=self.max_bytes / (1024 * 1024),
                                                         progress=self._progressing, holders=self._holders))
        except RescueCutShort as exc2:  # moved aside, no fresh file yet: its salvage is done at the retry
            self._rescue_pending = exc2
            self._errlog.error("cannot start a fresh buffer file after corruption: %s; retrying, and salvaging "
                               "%s once it can", exc2, exc2.moved.name)
            self._reopen = True
            time.sleep(min(self.commit_interval, 1.0))
        except (sqlite3.Error, OSError, BufferError) as exc2:
            # The disk refuses even a fresh file: open it again at the next commit (it then starts
            # empty above the high-water mark, or rescues whatever is at the path by then).
            self._errlog.error("cannot start a fresh buffer file after corruption: %s; retrying", exc2)
            self._reopen = True
            time.sleep(min(self.commit_interval, 1.0))

    def _verify_suspected(self) -> None:
        """Check the file a reader found damaged (`suspect_corruption`); rescue it when the check agrees."""
        with self._cond:
            said, self._suspected = self._suspected, None
        self._last_verify = time.monotonic()
        started = time.monotonic()
        try:
            damage = self.buffer.damage_found(progress=self._progressing)
        except (sqlite3.Error, OSError, BufferError) as exc:
            self._errlog.error("cannot check the buffer file a reader found damaged (%s): %s", said, exc)
            return
        finally:
            self._progressing()
        if damage is None:
            log.warning("a reader of the buffer met an error that says a page is damaged (%s), but the integrity "
                        "check finds the file sound (%.1f s)", said, time.monotonic() - started)
            return
        log.error("buffer %s is damaged while the agent runs (%s; integrity check: %s): rescuing it",
                  self.buffer.path, said, damage)
        self._rescue_corrupt(sqlite3.DatabaseError(f"database disk image is malformed: {damage}"))
        with self._cond:
            self._suspected = None  # what readers met before the rescue was in the file moved aside

    def _progressing(self) -> None:
        """A long step (a salvage) is under way: the watchdog must not take the thread for stuck."""
        self.last_progress = time.monotonic()

    def _housekeeping(self, now: float) -> None:
        self._apply_limits()
        if self._suspected is not None and now - self._last_verify >= VERIFY_EVERY_S and not self._reopen:
            self._verify_suspected()
        if now - self._last_path_check >= PATH_CHECK_EVERY_S and not self._reopen:
            self._last_path_check = now
            self._check_path()
        if now - self._last_size_check >= SIZE_CHECK_EVERY_S:
            self._last_size_check = now
            try:
                if self.buffer.used_bytes() > self.max_bytes * 0.95:
                    self._make_room(int(self.max_bytes * 0.85))
                self._check_wal()
            except sqlite3.Error as exc:
                self._errlog.error("size check failed: %s", exc)
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_S
            try:
                self.buffer.begin()
                n = self.buffer.purge_sent(self.keep_sent_days, self.age_clock.now_ms(), self._held())
                self.buffer.commit()
                if self.buffer.purge_cut_short:  # a station storing more than PURGE_MAX_ROWS in 10 minutes (audit Y)
                    self._next_purge = now + PURGE_CATCHUP_S
                if n:
                    log.info("purged %d published rows stored more than %g days ago", n, self.keep_sent_days)
            except sqlite3.Error as exc:
                self.buffer.rollback()
                self._errlog.error("purge failed: %s", exc)

    def _check_path(self, stopping: bool = False) -> None:
        """The path must name the file written: one deleted, renamed or replaced while the agent runs
        (`rm buffer.db*`, `mv`, another station's file or an old backup put in its place) would leave
        this thread committing into a file no later start finds, and readers following the path to
        another file. The file is put back (`Buffer.write_back`), what stood at the path moved aside;
        meanwhile the readers go on reading the file written (`open_reader`). Readings polled
        meanwhile wait in memory as for any write. A disk without room for the copy: retried here. The
        seq mark beside the file, deleted with it, is written again (`SeqMark.keep`)."""
        buf = self.buffer
        if buf.seqmark is not None:
            buf.seqmark.keep()  # `rm buffer.db*` takes it too
        self._check_beside()  # and the copies of meta kept beside the file
        what = buf.path_state()
        if what is None:
            return
        with self._cond:
            acked = max(self._acks.get(STREAM_READINGS, 0), buf.sent_upto(STREAM_READINGS))
        last = buf.last_seq(STREAM_READINGS)
        if self.detached is None:
            self.detached = what
            if what == WAL_LOST:
                log.error("buffer %s: its -wal was deleted while the agent runs: what was committed since the last "
                          "checkpoint is only in the WAL the agent holds open, which a crash or a power cut would "
                          "lose, and other readers of the file meet an I/O error; writing the database back at "
                          "that path (every row it holds, readings up to seq %d)", buf.path, last)
            else:
                log.error("buffer %s was %s while the agent runs: putting the file the agent writes back at that "
                          "path (every row it holds, readings up to seq %d), whatever stands there now moved aside",
                          buf.path, what, last)
        started = time.monotonic()
        try:
            self.buffer, moved = buf.write_back(sync=self.sync, max_mb=self.max_bytes / (1024 * 1024),
                                                progress=self._progressing)
        except (sqlite3.Error, OSError, BufferError) as exc:
            if stopping:
                lost = (f"readings seq {acked + 1}..{last}, not yet published, are lost with this process unless "
                        "the file was only renamed (they are in it then); the next start continues the seqs and "
                        "announces them as a gap" if last > acked else "every reading in it was published")
                log.error("stopping while %s is not the buffer file the agent wrote (%s) and it cannot be put back "
                          "(%s): %s", buf.path, self.detached, exc, lost)
            else:
                self._errlog.error("cannot put the buffer file back at %s (%s): the agent goes on with the file it "
                                   "holds open, which no later start would find; retrying every %.0f s (free some "
                                   "space?)", buf.path, exc, PATH_CHECK_EVERY_S, key="write-back")
            self._progressing()
            return
        self._progressing()
        log.warning("buffer %s put back in %.1f s: readings up to seq %d, %d of them unpublished, kept with their "
                    "seqs%s", buf.path, time.monotonic() - started, last, max(last - acked, 0),
                    f"; the file that stood there is kept as {moved.name}" if moved is not None else "")
        self.detached = None

    def _check_beside(self) -> None:
        """Write a watched copy beside the file (`watch_beside`) again from the buffer when it is missing,
        or at the first check when it is damaged (not a JSON object; one that merely differs is an older
        copy, as meta saved without `keep_beside` leaves it). A value waiting to be committed, or committed
        and waiting to be kept beside, is written at its own commit instead. A warning says a copy gone or
        damaged; one never written yet (meta saved without `keep_beside` only: a station that never raised
        an alarm) is written with an info line (it was "missing" at every start, on every gateway)."""
        with self._cond:
            due = {k: compare for k, compare in self._beside_watched.items()
                   if k not in self._beside_due and k not in self._meta}
        for key, compare in due.items():
            path = self.buffer.beside_path(key)
            try:
                if path.exists():
                    self._beside_seen.add(key)
                    if not compare:
                        continue
                value = self.buffer.meta_value(key)
                kept = self.buffer.beside_value(key) if compare and value is not None else None
                if value is not None and (not compare or not _json_object(kept)):
                    self.buffer.keep_beside(key, value)
                    if kept is not None:
                        log.warning("%s was damaged (not a JSON object: truncated or corrupt): written again from "
                                    "the buffer", path)
                    elif key in self._beside_seen:
                        log.warning("%s was deleted while the agent runs: written again from the buffer", path)
                    else:
                        log.info("%s written from the buffer (kept beside it from now on)", path)
                    self._beside_seen.add(key)
            except (OSError, sqlite3.Error) as exc:
                self._errlog.error("cannot write %s from the buffer (%s): should the buffer file be lost, a fresh one "
                                   "would start without it; trying again every %.0f s", path, exc,
                                   PATH_CHECK_EVERY_S, key=f"beside-{key}")
                continue
            with self._cond:
                self._beside_watched[key] = False

    def _check_wal(self) -> None:
        """The WAL is outside `max_mb` and bounded only by checkpoints, which another process can hold
        back by keeping a read transaction open (an `sqlite3` shell left at a prompt after a query):
        say so while it lasts (rate-limited), and when it is over."""
        held = self.buffer.wal_held_back()
        if held:
            self._wal_held = True
            self._errlog.warning("%s-wal has grown to %.0f MB and cannot be checkpointed: another process keeps "
                                 "a read transaction open on the buffer (an sqlite3 shell or a backup tool?); "
                                 "close it, or the WAL grows until the disk is full", self.buffer.path,
                                 held / (1 << 20), key="wal-held")
        elif self._wal_held:
            self._wal_held = False
            log.info("%s-wal is checkpointed again", self.buffer.path)

    def _make_room(self, target_bytes: int) -> None:
        """Evict (`Buffer.evict`) in rounds of EVICT_ROUND_ROWS, each committed (and checkpointed) on its
        own, each with the publisher held off (`evict_lock`): what it has acknowledged is written first, so
        that delivered rows count as published, and what it has in flight is kept. Between rounds the
        publisher goes on (a reload lowering a 1.4 GB cap evicts for tens of seconds: audit Z)."""
        purged = dropped = undelivered = 0
        gap = None
        try:
            while True:
                with self.evict_lock:
                    with self._cond:
                        acks = dict(self._acks)
                    self.buffer.begin()
                    for stream, upto in acks.items():
                        self.buffer.set_sent_upto(stream, upto)
                    p, d, g, u = self.buffer.evict(target_bytes, now_ms(), self._held(), self._in_flight(),
                                                   max_rows=EVICT_ROUND_ROWS)
                    self.buffer.commit()
                purged, dropped, undelivered, gap = purged + p, dropped + d, undelivered + u, g or gap
                self.last_progress = time.monotonic()
                if not (p or d) or self.buffer.used_bytes() <= target_bytes:
                    break
        except sqlite3.Error as exc:  # the rounds committed before stay done, and are reported below
            self.buffer.rollback()
            self.buffer.reload_counters()
            self._errlog.error("eviction failed: %s", exc)
        if purged:
            log.warning("buffer at its size cap: purged %d published rows", purged)
        if undelivered:  # each round at the cap while a platform stays away: rate-limited
            self._errlog.error("buffer at its size cap: %d of the purged rows were published on MQTT but not "
                               "yet delivered by an HJ 212 uplink (its platform has been unreachable for long): "
                               "that platform will miss them", undelivered)
        if dropped and gap:
            self.gaps_recorded += 1
            log.error("buffer full of unpublished data: dropped %d oldest readings (seq %d..%d), gap recorded",
                      dropped, gap.first_seq, gap.last_seq)
            for callback in self._listeners:
                callback()

    # ------------------------------------------------------------------ channel health

    def _track_channels(self, stored: list[Reading]) -> None:
        channels = self._channels
        for r in stored:
            row = channels.get(r[:2])
            if row is None:
                row = channels[r[:2]] = [r, None, 0, 0]
            row[0] = r
            if r.value is None:
                row[3] += 1
            else:
                row[1] = r.ts_ms
                row[2] += 1
        if stored:
            self._channels_dirty = True

    def _write_snapshot(self) -> None:
        if self._channels:
            self.buffer.upsert_channels((r.device, r.channel, r.seq, r.ts_ms, r.value, r.unit, r.flag, last_valid,
                                         good, bad) for r, last_valid, good, bad in self._channels.values())
