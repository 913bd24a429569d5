"""Salvage: what can still be read from a buffer file moved aside as corrupt goes into the fresh one.

A failing SD card damages a page or a few, rarely a whole file: the readings the broker has not yet
acknowledged — maybe days of them after an outage — are often still readable. When a corrupt file
has been moved aside and a fresh one started (`Buffer.rescue`), `salvage_into` copies into the
fresh file, with their seqs unchanged:

- every stream's rows above the old file's acknowledged watermark (all rows when the watermark
  cannot be read: a duplicate is harmless, a loss is not), so that they are still delivered, in
  order, before the new rows, which continue above the high-water mark (SPEC §3); and the published
  rows an HJ 212 uplink has not delivered yet (its progress in the old meta), which stay published;
- the old file's gaps not yet announced, and its meta rows (alarm and aggregate state, broker);
  when those are unreadable, the active alarms are rebuilt from the alarm events.

A damaged stretch of a table is stepped over: the next readable seq is found by probing forward
(doubling, then bisecting), so that one bad page costs the rows on it, not the rest of the table.
What SQL cannot read — rows under a damaged interior page, or the whole file when page 1 or the
schema is damaged — is looked for in the raw leaf pages of the file and its WAL (`agent.pagescan`);
without a readable watermark there, every row found is copied.

The readings seqs the fresh file can no longer account for are announced as a gap with reason
`buffer_corrupt`: each unreadable stretch, and the stretch from the last seq known of the old file
to the high-water mark, whose seqs were either lost with the damage or never issued. A receiver thus
sees every jump in seq explained (SPEC §3: "a gap means loss and exists only where ... announced").
Where the old file tells nothing (not a database any more), the stretch runs from the acknowledged
watermark noted beside the mark, else from the block the mark reserved. The moved-aside file is
only read, never changed.

Imports `agent.model`, `agent.pagescan`, `agent.buffer`'s `lowest_progress` and `SALVAGE_UNFINISHED`,
`agent.bufferschema`'s `readonly_uri` (and, to rebuild the alarm state, `agent.alarms`'s state version);
the fresh `Buffer` is passed in.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.buffer import SALVAGE_UNFINISHED, lowest_progress, marker_of_pending_salvage
from agent.bufferschema import readonly_uri
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, STREAMS
from agent.pagescan import GAPS_TABLE, META_TABLE, STREAMS_TABLE, scan

if TYPE_CHECKING:
    from agent.buffer import Buffer

log = logging.getLogger(__name__)

GAP_REASON = "buffer_corrupt"
COLUMNS = {
    STREAM_READINGS: "seq, ts_ms, device, channel, value, unit, flag",
    STREAM_AGGREGATES: "seq, ts_ms, body",
    STREAM_ALARMS: "seq, ts_ms, body",
}
MAX_DAMAGED_STRETCHES = 1000  # per table: beyond that the file is garbage, stop reading it
CHUNK = 5000  # rows per INSERT batch
UPLINK_PREFIX = "uplink:"  # the meta keys of the HJ 212 uplinks' progress (agent.uplink.META_PREFIX)


@dataclass
class StreamSalvage:
    """What was recovered of one stream."""

    rows: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    unreadable: list[tuple[int, int | None]] = field(default_factory=list)  # (first, last or None: to the end)
    held: int = 0  # rows published on MQTT, copied for an HJ 212 uplink that has not delivered them yet


@dataclass
class SalvageReport:
    streams: dict[str, StreamSalvage] = field(default_factory=dict)
    gaps_announced: list[tuple[int, int]] = field(default_factory=list)  # readings ranges recorded as gaps
    error: str | None = None  # why nothing at all could be read

    def summary(self) -> str:
        parts = [f"{name} {s.rows} (seq {s.first_seq}..{s.last_seq})" if s.rows else f"{name} 0"
                 for name, s in self.streams.items()]
        text = "salvaged unpublished rows: " + ", ".join(parts) if parts else "salvaged nothing"
        held = [f"{name} {s.held}" for name, s in self.streams.items() if s.held]
        if held:
            text += "; published rows an HJ 212 uplink has not delivered yet: " + ", ".join(held)
        if self.gaps_announced:
            text += "; gap(s) to announce: " + ", ".join(f"{a}..{b}" for a, b in self.gaps_announced)
        if self.error:
            text += f"; {self.error}"
        return text


def salvage_into(moved: Path, fresh: Buffer, now_ms: int, progress: Callable[[], None] | None = None,
                 acked_hint: Mapping[str, int] | None = None, holders: Sequence[str] | None = None) -> SalvageReport:
    """Copy what is readable of `moved` (a corrupt buffer file, with its -wal beside it) into
    `fresh` (a freshly created writer Buffer, above the high-water mark), in one transaction; meta
    `SALVAGE_UNFINISHED` (the moved file's name), committed before it and removed by it, tells `status`
    meanwhile that the backlog is not known yet.
    `progress()` is called after every batch of rows (a large buffer takes a while: the caller
    keeps systemd's start timeout or watchdog informed). `acked_hint`: the acknowledged watermarks
    noted beside the high-water mark (`SeqMark.acked`), used for a stream whose own watermark cannot
    be read. `holders`: the meta keys of the HJ 212 uplinks configured now (`Recorder.set_holders`; None:
    every uplink whose progress the old file holds), for whom published rows they have not delivered are
    copied too. Never raises: what went wrong is in the report, and the fresh file is then left as it was."""
    report = SalvageReport()
    try:
        old = sqlite3.connect(readonly_uri(moved), uri=True, timeout=5, check_same_thread=False)
    except sqlite3.Error as exc:
        report.error = f"cannot open it: {exc}"
        _taken_over(fresh, moved)
        return report
    try:
        fresh.set_meta(SALVAGE_UNFINISHED, moved.name)  # `status` meanwhile: the backlog is not known yet
        _taken_over(fresh, moved)  # a stop from now on is a salvage cut short, done again (`Buffer.open_writer`)
    except sqlite3.Error:
        pass  # a full disk: the salvage itself says what it can
    try:
        fresh.begin()
        try:
            _salvage(old, moved, fresh, now_ms, report, progress or (lambda: None), acked_hint or {}, holders)
            fresh.conn.execute("DELETE FROM meta WHERE key=?", (SALVAGE_UNFINISHED,))
            fresh.commit()
        except BaseException:
            fresh.rollback()
            raise
        _taken_over(fresh, moved)
        fresh.reload_counters()
    except Exception as exc:  # noqa: BLE001 - an I/O error of a failing card too: the agent must start
        report.error = f"salvage stopped: {exc}"
        report.streams.clear()
        report.gaps_announced.clear()
        if _announce_unsalvaged(old, fresh, now_ms, report, acked_hint or {}):
            _taken_over(fresh, moved)
    finally:
        old.close()
    return report


def _taken_over(fresh: Buffer, moved: Path) -> None:
    """The marker of `moved`'s pending salvage (`agent.buffer.marker_of_pending_salvage`) is no longer
    needed: the fresh file's meta says a salvage is under way, or it is over."""
    try:
        marker_of_pending_salvage(fresh.path, moved).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s (%s)", marker_of_pending_salvage(fresh.path, moved).name, exc)


def _announce_unsalvaged(old: sqlite3.Connection, fresh: Buffer, now_ms: int, report: SalvageReport,
                         acked_hint: Mapping[str, int]) -> bool:
    """The salvage stopped (a disk without room for the copy: a long outage filled the buffer to its cap, and
    the copy needs as much again) and left the fresh file as it was: announce every readings seq above what
    was acknowledged up to the fresh file's first as lost (a small write that fits where the copy did not),
    with the old file's unannounced gaps. Its rows stay in the file moved aside."""
    try:
        watermarks = _read_watermarks(old)
    except sqlite3.Error:
        watermarks = None
    mark = max(fresh.last_seq(STREAM_READINGS), (watermarks or {}).get(STREAM_READINGS, (0, 0))[0])
    if watermarks is not None and STREAM_READINGS in watermarks:
        acked = watermarks[STREAM_READINGS][1]
    elif STREAM_READINGS in acked_hint:
        acked = acked_hint[STREAM_READINGS]
    else:  # as for a deleted file (`Buffer._announce_jump`): from the block the mark reserved
        acked = max(0, mark - (fresh.seqmark.block if fresh.seqmark is not None else mark))
    try:
        fresh.begin()
        try:
            for stream, (top, _) in (watermarks or {}).items():  # new seqs above the old file's, mark or not
                fresh.conn.execute("UPDATE streams SET floor_seq=max(floor_seq, ?) WHERE name=?", (top, stream))
            if acked < mark:
                fresh.record_gap(STREAM_READINGS, acked + 1, mark, GAP_REASON, now_ms)
                report.gaps_announced.append((acked + 1, mark))
            _copy_pending_gaps(old, fresh, now_ms)
            fresh.conn.execute("DELETE FROM meta WHERE key=?", (SALVAGE_UNFINISHED,))
            fresh.commit()
        except BaseException:
            fresh.rollback()
            raise
        fresh.reload_counters()
    except Exception as exc:  # noqa: BLE001 - the disk refuses even that: said in the log line
        report.gaps_announced.clear()
        report.error += f"; nor could the seqs it did not copy be announced: {exc}"
        return False
    return True


def _salvage(old: sqlite3.Connection, moved: Path, fresh: Buffer, now_ms: int, report: SalvageReport,
             progress: Callable[[], None], acked_hint: Mapping[str, int], holders: Sequence[str] | None) -> None:
    watermarks = _read_watermarks(old)  # stream -> (last seq known, acknowledged watermark), when readable
    sql_readable = watermarks is not None or _readable(old, STREAM_READINGS)
    # Page 1 or the schema damaged: SQLite reads nothing, but the leaf pages may hold it all. Else the
    # WAL's frames may hold newer copies than SQLite read (it stops at a damaged frame).
    state = _state_from_pages(moved, progress, wal_only=sql_readable)
    if not sql_readable:
        watermarks = state.marks or None
    elif watermarks is not None:
        for stream, (top, acked) in state.marks.items():  # watermarks only move forward
            old_top, old_acked = watermarks.get(stream, (0, 0))
            watermarks[stream] = (max(top, old_top), max(acked, old_acked))
    known = {stream: watermarks.get(stream) if watermarks else None for stream in STREAMS}
    for stream, hint in acked_hint.items():
        # The watermark noted at the last clean stop or block reservation, when the file's own is lost:
        # rows up to it were delivered. Only if this file holds rows at or above it (one noted by a
        # buffer at another storage.path would lie above all of them).
        probe = _probe(old, stream, hint) if sql_readable and stream in known and known[stream] is None else None
        if probe:
            known[stream] = (hint, hint)
    sent = {stream: known[stream][1] if known[stream] else 0 for stream in STREAMS}
    # Rows published on MQTT that an HJ 212 uplink has not delivered yet: the buffer keeps them for it, so
    # does the salvage (they stay published for MQTT: only those above `sent` are published again).
    held = _uplink_progress(old if sql_readable else None, state.meta, holders)
    start = {stream: min(sent[stream], held.get(stream, sent[stream])) for stream in STREAMS}
    for stream in STREAMS:
        got = report.streams[stream] = StreamSalvage()
        if not sql_readable:
            got.unreadable = [(start[stream] + 1, None)]
            continue
        for rows in _rows_after(old, stream, start[stream], got):
            _insert(fresh, stream, rows)
            got.last_seq = rows[-1][0]
            progress()
        if not got.unreadable or got.unreadable[-1][1] is not None:
            # Rows beyond all the file knows of: commits SQLite dropped after a damaged WAL frame.
            beyond = max(got.last_seq or 0, known[stream][0] if known[stream] else 0, sent[stream])
            got.unreadable.append((beyond + 1, None))
    alarm_events: dict[int, tuple[tuple, int]] = {}  # seq -> (row, age): every alarm event the pages hold
    _fill_from_pages(moved, fresh, report, alarm_events, progress)
    for stream in STREAMS:
        got = report.streams[stream]
        got.rows, got.first_seq, got.last_seq = fresh.conn.execute(
            f"SELECT count(*), min(seq), max(seq) FROM {stream} WHERE seq > ?", (sent[stream],)).fetchone()
        got.held = fresh.conn.execute(f"SELECT count(*) FROM {stream} WHERE seq <= ?", (sent[stream],)).fetchone()[0]
        if got.unreadable:  # what the page scan did not find either
            if known[stream] is None and not sql_readable and got.first_seq is not None:
                got.unreadable = [(got.first_seq, None)]  # no watermark: the rows before may have been published
            # Below `sent` MQTT lost nothing (the rows kept for an uplink only): no gap to announce there.
            got.unreadable = [run for a, b in got.unreadable if b is None or b > sent[stream]
                              for run in _missing(fresh, stream, max(a, sent[stream] + 1), b)]
        if got.rows:
            # Publishing resumes at the first salvaged row; the new ones follow above the mark.
            fresh.conn.execute("UPDATE streams SET sent_upto=? WHERE name=?", (got.first_seq - 1, stream))
        if known[stream] is not None:
            # New seqs go above every seq the old file knew of, even without the mark beside it.
            fresh.conn.execute("UPDATE streams SET floor_seq=max(floor_seq, ?) WHERE name=?",
                               (known[stream][0], stream))
        if stream == STREAM_READINGS:
            _record_lost_stretches(fresh, got, known[stream], now_ms, report, acked_hint.get(stream))
    if sql_readable:
        _copy_pending_gaps(old, fresh, now_ms)
        _copy_meta(old, fresh)
    else:
        for _, stream, first, last, reason, announced in state.gaps.values():
            if not announced:
                fresh.record_gap(stream, first, last, reason, now_ms)
    # The state (alarms, aggregates, uplinks) as the newest WAL frames hold it: written in the same
    # transactions as the events recovered from them, so that no alarm or period comes twice.
    for key, value in state.meta.items():
        fresh.set_meta(key, value)
    # An alarm event newer than the newest readable alarm state (its copy was on a damaged frame):
    # the events tell which alarms are active, or one would be raised or cleared a second time.
    newest_event = max((age for _, age in alarm_events.values()), default=0)
    if newest_event > state.meta_age.get("alarm_state", 0) or (not sql_readable and "alarm_state" not in state.meta):
        log.warning("salvage: the old file's alarm state is older than its alarm events, or unreadable; the "
                    "active alarms are rebuilt from the events")
        events = {row[0]: row for row, _ in alarm_events.values()}
        if sql_readable:
            events.update((row[0], row) for rows in _rows_after(old, STREAM_ALARMS, 0, StreamSalvage()) for row in rows)
        _rebuild_active_alarms((events[seq] for seq in sorted(events)), fresh)


def _insert(fresh: Buffer, stream: str, rows: list[tuple]) -> None:
    placeholders = ",".join("?" * len(rows[0]))
    fresh.conn.executemany(f"INSERT OR IGNORE INTO {stream}({COLUMNS[stream]}) VALUES ({placeholders})", rows)


@dataclass
class _PageState:
    """What the raw pages say of the old file's state: per stream (last seq known, acknowledged
    watermark), the gaps by id, and the meta rows of the WAL's newest frames."""

    marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    gaps: dict[int, tuple] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    meta_age: dict[str, int] = field(default_factory=dict)  # the transaction each meta row comes from


def _state_from_pages(moved: Path, progress: Callable[[], None], wal_only: bool) -> _PageState:
    """Of watermarks and gaps, the highest copy is the latest (a watermark only moves forward, a gap
    only grows). Of a meta row, only a copy from the WAL's current generation can be dated: the
    newest frame's wins (a page of the file may be a freed page's stale copy)."""
    state = _PageState()
    for table, row, age in scan(moved, (STREAMS_TABLE, GAPS_TABLE, META_TABLE), progress=progress,
                                wal_only=wal_only):
        if table == STREAMS_TABLE:
            name, floor, sent = row
            top, acked = state.marks.get(name, (0, 0))
            state.marks[name] = (max(top, floor, sent), max(acked, sent))
        elif table == GAPS_TABLE:
            seen = state.gaps.get(row[0])
            if seen is None or (row[3], row[5]) > (seen[3], seen[5]):  # extended, or announced, since
                state.gaps[row[0]] = row
        elif age >= 1 and row[0] != "schema_version" and age >= state.meta_age.get(row[0], 0):
            state.meta[row[0]], state.meta_age[row[0]] = row[1], age
    return state


def _fill_from_pages(moved: Path, fresh: Buffer, report: SalvageReport, alarm_events: dict[int, tuple[tuple, int]],
                     progress: Callable[[], None]) -> None:
    """Insert the rows the page scan finds in the stretches SQL could not read; collect every alarm
    event, with the age of its newest copy (`agent.pagescan.scan`), into `alarm_events`."""
    stretches = {stream: got.unreadable for stream, got in report.streams.items() if got.unreadable}

    def inside(stream: str, seq: int) -> bool:
        return any(a <= seq and (b is None or seq <= b) for a, b in stretches.get(stream, ()))

    def want(table: str, seq: int) -> bool:
        return inside(table, seq) or table == STREAM_ALARMS

    batches: dict[str, list[tuple]] = {stream: [] for stream in STREAMS}
    for table, row, age in scan(moved, set(stretches) | {STREAM_ALARMS}, want, progress):
        if table == STREAM_ALARMS and age >= alarm_events.get(row[0], (row, age))[1]:
            alarm_events[row[0]] = (row, age)
        if inside(table, row[0]):
            batches[table].append(row)
            if len(batches[table]) >= CHUNK:
                _insert(fresh, table, batches[table])
                batches[table] = []
    for table, rows in batches.items():
        if rows:
            _insert(fresh, table, rows)


def _missing(fresh: Buffer, stream: str, first: int, last: int | None) -> list[tuple[int, int | None]]:
    """The runs of seqs in [first, last] (None: open-ended) that the fresh file does not hold."""
    runs: list[tuple[int, int | None]] = []
    cursor = first
    for (seq,) in fresh.conn.execute(f"SELECT seq FROM {stream} WHERE seq >= ? AND seq <= ? ORDER BY seq",
                                     (first, last if last is not None else 2**63 - 1)):
        if seq > cursor:
            runs.append((cursor, seq - 1))
        cursor = seq + 1
    if last is None or cursor <= last:
        runs.append((cursor, last))
    return runs


def _read_watermarks(old: sqlite3.Connection) -> dict[str, tuple[int, int]] | None:
    try:
        rows = old.execute("SELECT name, floor_seq, sent_upto FROM streams").fetchall()
    except sqlite3.Error:
        return None
    out = {}
    for name, floor, sent in rows:
        top = 0
        if name in COLUMNS:
            try:
                top = old.execute(f"SELECT max(seq) FROM {name}").fetchone()[0] or 0
            except sqlite3.Error:
                pass  # the last page is damaged: the watermark and the floor still tell something
        out[str(name)] = (max(int(floor or 0), int(top), int(sent or 0)), int(sent or 0))
    return out


def _readable(old: sqlite3.Connection, table: str) -> bool:
    try:
        old.execute(f"SELECT seq FROM {table} LIMIT 1").fetchall()
        return True
    except sqlite3.Error:
        return False


def _rows_after(old: sqlite3.Connection, table: str, after: int, got: StreamSalvage) -> Iterator[list[tuple]]:
    """Batches of readable rows with seq > after, in seq order; unreadable stretches go to `got`."""
    cursor = after
    while len(got.unreadable) < MAX_DAMAGED_STRETCHES:
        try:
            rows = old.execute(f"SELECT {COLUMNS[table]} FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?",
                               (cursor, CHUNK)).fetchall()
        except sqlite3.Error:
            rows = _rows_one_by_one(old, table, cursor)  # up to the damage
            if not rows:
                nxt = _next_readable(old, table, cursor)
                got.unreadable.append((cursor + 1, None if nxt is None else nxt - 1))
                if nxt is None:
                    return
                cursor = nxt - 1
                continue
        if not rows:
            return
        yield rows
        cursor = rows[-1][0]


def _rows_one_by_one(old: sqlite3.Connection, table: str, after: int) -> list[tuple]:
    """Rows with seq > after up to the first that cannot be read (or CHUNK of them). One query per
    row: a scan reads one row ahead, so it fails on the last good row before a damaged page."""
    rows: list[tuple] = []
    while len(rows) < CHUNK:
        row = _probe(old, table, after + 1)
        if row is None or row == UNREADABLE:
            break
        rows.append(row)
        after = row[0]
    return rows


UNREADABLE = ()  # what _probe returns when the page holding the seq asked for cannot be read


def _probe(old: sqlite3.Connection, table: str, at: int) -> tuple | None:
    """The whole row of the first seq >= at; None past the end; UNREADABLE when it cannot be read."""
    try:
        return old.execute(f"SELECT {COLUMNS[table]} FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1",
                           (at,)).fetchone()
    except sqlite3.Error:
        return UNREADABLE


def _next_readable(old: sqlite3.Connection, table: str, after: int) -> int | None:
    """The first seq above `after` whose row can be read past a damaged stretch (probing forward,
    doubling the step, then bisecting back); None when none can."""
    bad, step = after, 1
    while after + step < 2**62:
        found = _probe(old, table, after + step)
        if found is None:
            return None
        if found != UNREADABLE:
            lo, hi = bad, after + step  # probing at lo fails, at hi succeeds
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _probe(old, table, mid) == UNREADABLE:
                    lo = mid
                else:
                    hi = mid
            first = _probe(old, table, hi)
            return first[0] if first else found[0]
        bad = after + step
        step *= 2
    return None


def _record_lost_stretches(fresh: Buffer, got: StreamSalvage, known: tuple[int, int] | None, now_ms: int,
                           report: SalvageReport, acked_hint: int | None) -> None:
    """Record the readings seqs the fresh file cannot account for as gaps to announce."""
    mark = fresh.last_seq(STREAM_READINGS)
    stretches = list(got.unreadable)
    if known is None and not got.rows:
        # Nothing of the old file tells where its seqs stood (not a database any more): from the
        # watermark noted beside the mark (rows up to it were delivered), else from the block the
        # mark reserved, as for a deleted file (`Buffer._announce_jump`).
        block = fresh.seqmark.block if fresh.seqmark is not None else mark
        stretches = [(acked_hint + 1 if acked_hint is not None else max(1, mark - block + 1), mark)]
    elif known is not None or got.rows:
        last_known = max(got.last_seq or 0, known[0] if known else 0)
        # A trailing unreadable stretch runs to the last seq known; the rest up to the mark may never
        # have been issued, or were lost with the damage: either way the receiver sees a jump.
        stretches = [(a, b if b is not None else last_known) for a, b in stretches]
        stretches.append((last_known + 1, mark))
    for first, last in stretches:
        if last is not None and first <= last:
            fresh.record_gap(STREAM_READINGS, first, last, GAP_REASON, now_ms)
            report.gaps_announced.append((first, last))


def _uplink_progress(old: sqlite3.Connection | None, page_meta: Mapping[str, str],
                     holders: Sequence[str] | None) -> dict[str, int]:
    """Per stream, the lowest progress of the HJ 212 uplinks (meta `uplink:<host>:<port>`, as `agent.uplink`
    keeps it) in the old file's meta (`old`: None when SQL cannot read it) or in its newest WAL frames
    (`page_meta`, which wins); of those among `holders` only, when given. The progress of an uplink removed
    from the configuration stays in the meta: counted, it had the salvage copy every row still stored,
    as much room again as the file, and a disk without it lost the unpublished rows the copy could have kept."""
    records: dict[str, str] = {}
    if old is not None:
        try:
            records = {str(k): v for k, v in old.execute(
                f"SELECT key, value FROM meta WHERE substr(key, 1, {len(UPLINK_PREFIX)}) = ?", (UPLINK_PREFIX,))}
        except sqlite3.Error:
            pass
    records.update((k, v) for k, v in page_meta.items() if k.startswith(UPLINK_PREFIX))
    if holders is not None:
        records = {k: v for k, v in records.items() if k in holders}
    return lowest_progress(records.values())


def _copy_pending_gaps(old: sqlite3.Connection, fresh: Buffer, now_ms: int) -> None:
    try:
        rows = old.execute("SELECT stream, first_seq, last_seq, reason FROM gaps WHERE announced=0 "
                           "ORDER BY id").fetchall()
    except sqlite3.Error as exc:
        log.warning("salvage: the old file's unannounced gaps are unreadable (%s)", exc)
        return
    for stream, first, last, reason in rows:
        fresh.record_gap(str(stream), int(first), int(last), str(reason), now_ms)


def _copy_meta(old: sqlite3.Connection, fresh: Buffer) -> None:
    try:
        rows = old.execute("SELECT key, value FROM meta WHERE key != 'schema_version'").fetchall()
    except sqlite3.Error as exc:
        log.warning("salvage: the old file's state (alarms, aggregates) is unreadable (%s); the active "
                    "alarms are rebuilt from its alarm events", exc)
        _rebuild_active_alarms((row for rows in _rows_after(old, STREAM_ALARMS, 0, StreamSalvage()) for row in rows),
                               fresh)
        return
    for key, value in rows:
        fresh.set_meta(str(key), str(value))


def _rebuild_active_alarms(events: Iterable[tuple], fresh: Buffer) -> None:
    """The alarms whose last readable event (of `events`: alarm rows in seq order) is `raised`, as the
    alarm engine's saved state: an alarm raised before the damage is not raised a second time
    (SPEC §4: raised once, cleared once)."""
    from agent.alarms import STATE_VERSION  # the engine's state format (this rare path only)

    last: dict[str, tuple[int, dict]] = {}
    for _, ts_ms, text in events:
        try:
            body = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            last[body["id"]] = (int(ts_ms), body)
    if not last:  # nothing readable: no state, so that the copy kept beside the file is taken (`runtime`)
        return
    active = [(ts_ms, body) for ts_ms, body in last.values() if body.get("state") == "raised"]
    state = [{"id": b["id"], "channel": b.get("channel"), "rule": b.get("rule"), "since_ms": ts_ms,
              "value": b.get("value"), "threshold": b.get("threshold")} for ts_ms, b in active]
    shown = [{"id": b["id"], "channel": b.get("channel"), "rule": b.get("rule"), "since": b.get("ts"),
              "value": b.get("value"), "threshold": b.get("threshold")} for _, b in active]
    fresh.set_meta("alarm_state", json.dumps({"v": STATE_VERSION, "active": state}, separators=(",", ":")))
    fresh.set_meta("active_alarms", json.dumps(shown, separators=(",", ":")))
