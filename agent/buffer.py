"""The SQLite buffer: the durable queue between acquisition and delivery (SPEC §3).

`Buffer` opens (or creates, or rescues) the database file and offers the operations of the one
writer (`agent.recorder` owns a writer `Buffer`) and of readers (the publisher, `edge-agent status`),
each on its own connection. It imports only `agent.model`, `agent.seqmark`, `agent.memtrim`,
`agent.pagescan` (the WAL header check), `agent.bufferschema` (the layout version, the read-only URI)
and `agent.clock`.

Design: rows are append-only, keyed by `seq` (INTEGER PRIMARY KEY, so the table is ordered by seq).
Publication progress is a watermark per stream (`streams.sent_upto`: every row with seq <= it is
acknowledged) instead of a flag per row, so acknowledging never rewrites old pages. `seq` never goes
back: a stream's next seq is above the largest of the rows present, `streams.floor_seq` (the highest
seq ever purged or evicted) and, for a fresh file, the high-water mark kept beside it (`SeqMark`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.bufferschema import SCHEMA_VERSION, readonly_uri, refuse_newer
from agent.clock import EARLIEST_PLAUSIBLE
from agent.memtrim import release_free_memory
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, STREAMS, Reading
from agent.pagescan import wal_header_valid
from agent.payloads import finite
from agent.seqmark import SeqMark, mark_path, write_atomically

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKLOG_COUNTED = 1_000_000  # rows `backlog` counts one by one; past that it works the figure out
PURGE_MAX_ROWS = 100_000  # per stream and pass (every 10 min): 14 M a day; one pass ~0.1 s on a VM
WAL_HELD_BYTES = 16 << 20  # a WAL this large that a checkpoint cannot empty: someone holds a reader open
PAGE_SIZE = 1024  # small pages: a commit of a few dozen readings rewrites ~3 KB, not ~12 KB (SD wear)


# One reading as the JSON object of SPEC §4, built by SQLite itself: the drain's hot path stays in C.
# `ts` is exact to the millisecond. SQLite writes a REAL with 15 significant digits, so whole numbers
# from 1e15 up (64-bit counters, totalizers) are passed as INTEGER, which it writes exactly; smaller
# values keep their REAL form (2.0 stays 2.0). The 15 digits round the few doubles above
# 1.79769313486231e308 up to a number no JSON reader can hold (it reads infinity): those are written as
# that largest 15-digit number.
FLOAT_MAX_15 = "1.79769313486231e308"
READING_JSON = ("json_object('seq',seq,'device',device,'channel',channel,"
                "'ts',strftime('%Y-%m-%dT%H:%M:%fZ',ts_ms/1000.0,'unixepoch'),"
                f"'value',CASE WHEN value>{FLOAT_MAX_15} THEN {FLOAT_MAX_15} "
                f"WHEN value<-{FLOAT_MAX_15} THEN -{FLOAT_MAX_15} "
                "WHEN abs(value)>=1e15 AND value=CAST(value AS INTEGER) "
                "THEN CAST(value AS INTEGER) ELSE value END,'unit',unit,'flag',flag)")


# An aggregate row's `period`; NULL for a body that is not JSON (one holding `Infinity`, as versions before
# insert_event refused non-finite numbers stored them): json_extract raised on it, failing the whole query.
PERIOD_OF_BODY = "CASE WHEN json_valid(body) THEN json_extract(body, '$.period') END"


@dataclass(frozen=True, slots=True)
class JsonBatch:
    """Consecutive stored readings as the comma-separated JSON objects of a data message."""

    first_seq: int
    last_seq: int
    count: int
    items: str


SALVAGE_UNFINISHED = "salvage_unfinished"  # meta: the file moved aside whose rows a salvage is copying in
WAL_LOST = "left without its -wal"  # `path_state`: the -wal of the file written deleted while it runs
GAP_BUFFER_MISSING = "buffer_missing"  # the reason of a gap of seqs a fresh buffer file cannot account for


class BufferError(Exception):
    """The buffer cannot be opened or written (not a corruption we can rescue)."""


class RescueCutShort(BufferError):
    """`Buffer.rescue` moved the corrupt file aside (to `moved`) but could not start the fresh one (a full
    disk): `Buffer.resume_rescue(moved, acked)` does the rest once it can, salvage included."""

    def __init__(self, message: str, moved: Path, acked: dict[str, int]):
        super().__init__(message)
        self.moved = moved
        self.acked = acked


@dataclass(frozen=True, slots=True)
class Gap:
    """Unpublished readings dropped by eviction, to be announced on the data topic."""

    id: int
    stream: str
    first_seq: int
    last_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class EventRow:
    """A stored aggregate or alarm event: its seq, time and JSON body (the payload object)."""

    seq: int
    ts_ms: int
    body: dict


@dataclass(frozen=True, slots=True)
class Poll:
    """The readings of one device poll: consecutive seqs of one device with the same `ts_ms`."""

    device: str
    ts_ms: int
    readings: tuple[Reading, ...]

    @property
    def first_seq(self) -> int:
        return self.readings[0].seq

    @property
    def last_seq(self) -> int:
        return self.readings[-1].seq


# Aggregate period names ("10m", "1h", "1d") end with their unit; HJ 212 asks by unit (2051/2061/2031).
PERIOD_UNITS = frozenset("mhd")


def is_corruption(exc: BaseException) -> bool:
    """True for the SQLite errors that mean the file is damaged (not busy, not full)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _identity(path: Path) -> tuple[int, int] | None:
    """The file `path` names now, as (st_dev, st_ino); None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wal_commits_lost(path: Path, conn: sqlite3.Connection) -> int:
    """How many committed transactions the WAL holds beyond what SQLite recovered from it. SQLite
    reads the WAL up to its first damaged frame and silently drops the rest: after a damaged frame
    the file looks sound but has lost its newest rows, and their seqs would be issued again. Frames
    of the current WAL generation (the header's salts) carrying a commit mark beyond SQLite's last
    valid frame are such transactions; so are all those of a WAL whose header is damaged (SQLite
    then ignores the whole WAL). The last one alone is left out: a power cut during its fsync tears
    it, and it was never reported committed (SQLite then rightly drops it)."""
    wal = path.with_name(path.name + "-wal")
    try:
        size = wal.stat().st_size
        valid = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]  # SQLite's valid frames
        with open(wal, "rb") as f:
            header = f.read(32)
            if len(header) < 32 or valid < 0:
                return 0
            _, _, page_size, _, salt1, salt2 = struct.unpack(">6I", header[:24])
            if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                page_size = PAGE_SIZE  # a damaged header: the buffer's own page size
            frame = 24 + page_size
            if not wal_header_valid(header):
                # A damaged header makes SQLite ignore the whole WAL: the first frame's salts name the
                # generation its commits belong to.
                f.seek(32 + 8)
                salt1, salt2 = struct.unpack(">2I", f.read(8) or b"\0" * 8)
                valid = 0
            commits = 0
            for i in range(valid, (size - 32) // frame):
                f.seek(32 + i * frame)
                _, db_size, s1, s2 = struct.unpack(">4I", f.read(16))
                commits += db_size != 0 and (s1, s2) == (salt1, salt2)
    except (OSError, struct.error):
        return 0
    return max(0, commits - 1)


def _wal_has_no_frame(path: Path) -> bool:
    """True when the file's WAL is gone or holds no frame. Every writer's first commit writes a frame
    (`_write_first_frame`), and later checkpoints keep the WAL's length, so after a crash an empty WAL
    is one that was deleted while the writer ran (it went on in the deleted file) and made again,
    empty, by the next connection to open the file (`edge-agent status`, the publisher): the rows
    since the last checkpoint went with the deleted one (`SeqMark.lost_rows`). The one other way, a
    crash right after the TRUNCATE checkpoint of a full disk, before the frame written right after it
    (`give_wal_back`), or with no room left even for that, costs a needless jump, never a seq."""
    try:
        return path.with_name(path.name + "-wal").stat().st_size <= 32  # the header alone, or nothing
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _kept_wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal.kept")


def _keep_wal(path: Path) -> Path | None:
    """A hard link to the WAL, made before SQLite opens the file. Closing the last connection
    checkpoints the WAL and deletes it, with the frames after a damaged one that SQLite could not
    use; if the file proves corrupt, the link keeps them for the salvage (`move_aside` takes it)."""
    wal, kept = path.with_name(path.name + "-wal"), _kept_wal(path)
    try:
        kept.unlink(missing_ok=True)  # left by a start that died
        if wal.stat().st_size <= 32:
            return None
        os.link(wal, kept)
        return kept
    except OSError:
        return None  # no WAL, or a file system without hard links: the check goes on without a copy


def may_access(path: Path, mode: int) -> bool:
    """os.access with the ids that open files (`sudo -u` sets both; a test may set the effective ones only)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _unwritten_where_readers_cannot_write(path: Path) -> bool:
    """Whether a reader opens `path` as immutable: a read-only connection to a WAL database makes the -wal
    and -shm beside it when they are not there, and cannot where this user may not write the directory (a
    read-only file system, the agent's state directory to another user: "unable to open database file").
    No -wal there means that no connection writes the file (a writer's is there from its open to its
    close): it is read as it is, without locks or -shm."""
    return not os.path.lexists(path.with_name(path.name + "-wal")) and not may_access(path.parent, os.W_OK)


def _connect(path: Path, *, readonly: bool, sync: str) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(readonly_uri(path, immutable=_unwritten_where_readers_cannot_write(path)), uri=True,
                               timeout=10, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA cache_size=-1024")  # 1 MiB of page cache per connection: reads are sequential
    if not readonly:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise BufferError(f"cannot put {path} in WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA journal_size_limit=8388608")
    return conn


class Buffer:
    """One connection to the buffer database. Open with `Buffer.open_writer` (exactly one, owned by
    the recorder thread) or `Buffer.open_reader` (any number, any process)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, writer: bool, seqmark: SeqMark | None):
        self.path = path
        self.conn = conn
        self.writer = writer
        self.seqmark = seqmark
        self._last_seq: dict[str, int] = {}
        self._sent_upto: dict[str, int] = {}
        self.identity = _identity(path)  # the file this connection reads: (st_dev, st_ino)
        self._sides: dict[str, tuple[int, int] | None] = {}  # its -wal and -shm as last seen at the path
        self.purge_cut_short = False  # the last `purge_sent` left aged rows of a stream for the next pass

    def replaced(self) -> bool:
        """True when the file at `path` is no longer the one this connection reads (moved aside as
        corrupt, deleted, renamed, or another file put in its place)."""
        return _identity(self.path) != self.identity

    def path_state(self) -> str | None:
        """Writer: None while `path` names this connection's file and its -wal is the one SQLite writes
        (both -wal and -shm are noted then, for `write_back`); else what happened, in words for the log:
        the file deleted, renamed or replaced, or its -wal deleted (WAL_LOST; `rm buffer.db-wal`): this
        connection goes on committing into the WAL it holds open, which no longer has a name, so what it
        committed since the last checkpoint would go with the process (a crash, a power cut), and other
        readers of the path (`status`) meet a disk I/O error."""
        now = _identity(self.path)
        if now == self.identity:
            sides = {suffix: _identity(self._side(suffix)) for suffix in ("-wal", "-shm")}
            noted = self._sides.get("-wal")
            if noted is not None and sides["-wal"] != noted:
                return WAL_LOST
            self._sides = sides
            return None
        return "deleted or renamed" if now is None else "replaced by another file"

    def _side(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open_writer(cls, path: str | Path, *, sync: str = "full", max_mb: float | None = None,
                    progress: Callable[[], None] | None = None, holders: Sequence[str] | None = None) -> Buffer:
        """Open or create the database for writing. A corrupt file is rescued (`rescue`). `progress` is
        called now and then while a step that reads or copies the whole file runs: the integrity check,
        the compaction, a salvage (2 minutes for a 1.4 GB buffer not in the page cache on the test VM:
        systemd's start timeout is extended as it goes). `holders`: as for `rescue`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_newer(path)  # a downgrade: never taken for corruption, never written (NewerBuffer)
        pending = pending_salvages(path)
        if pending and not (path.exists() and _holds_schema(path)):  # stopped before the fresh file was made
            return cls.resume_rescue(path, pending[0], SeqMark(mark_path(path)).acked(), sync=sync, max_mb=max_mb,
                                     progress=progress, holders=holders)
        seqmark = SeqMark(mark_path(path))
        try:
            buf = cls._open_checked(path, sync, seqmark, progress=progress, announce_jump=not pending)
        except sqlite3.DatabaseError as exc:
            if pending and not is_corruption(exc):  # the fresh file a full disk cut short (an -shm it cannot grow)
                raise RescueCutShort(f"{exc} (the fresh file after {pending[0].name})", pending[0],
                                     seqmark.acked()) from exc
            if not is_corruption(exc):
                raise BufferError(f"cannot open buffer {path}: {exc}") from exc
            return cls.rescue(path, exc, sync=sync, max_mb=max_mb, progress=progress, holders=holders)
        moved = buf.meta_value(SALVAGE_UNFINISHED)
        if moved is not None:
            buf._salvage_cut_short(path.with_name(moved), progress, holders)
            for marker in pending:  # the meta took over from the marker (stopped before it was removed)
                marker_of_pending_salvage(path, marker).unlink(missing_ok=True)
        elif pending:  # the fresh file was made, its salvage never began (stopped, or a disk without room)
            buf._salvage_cut_short(pending[0], progress, holders)
        if max_mb is not None:
            buf.set_size_cap(max_mb)
            _reporting(buf.compact_over_cap, progress)
        return buf

    @classmethod
    def rescue(cls, path: Path, exc: BaseException, *, sync: str, max_mb: float | None,
               progress: Callable[[], None] | None = None, holders: Sequence[str] | None = None) -> Buffer:
        """`path` is corrupt (`exc` says how): move it aside (never deleted), start a fresh file whose
        seqs continue above the old high-water mark, and salvage into it what is still readable of
        the old one (`agent.salvage`; `progress()` after every batch of rows; `holders`: the meta keys of
        the HJ 212 uplinks configured now, for whom it keeps what they have not delivered). Everything is
        logged."""
        moved = move_aside(path, str(exc), pending_salvage=True)
        log.error("buffer %s is corrupt (%s); moved aside to %s, starting a fresh one", path, exc, moved)
        acked = SeqMark(mark_path(path)).acked()  # read before the fresh file notes its own
        try:
            buf = cls._open_checked(path, sync, SeqMark(mark_path(path)), announce_jump=False)
        except (sqlite3.Error, OSError) as exc2:
            raise RescueCutShort(f"{exc2} (the fresh file after {moved.name})", moved, acked) from exc2
        return buf._after_rescue(moved, acked, max_mb, progress, holders)

    @classmethod
    def resume_rescue(cls, path: Path, moved: Path, acked: dict[str, int], *, sync: str, max_mb: float | None,
                      progress: Callable[[], None] | None = None, holders: Sequence[str] | None = None) -> Buffer:
        """The rest of a `rescue` the disk cut short (RescueCutShort): the fresh file, and the salvage of
        `moved` into it with the watermarks `acked` noted before. Before, the retry only opened a fresh
        file: the unpublished rows of `moved`, readable, were announced lost. What a failed attempt left
        at `path` (a fresh file without its schema, or empty) holds nothing and is replaced."""
        if path.exists() and not _holds_schema(path):
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
        try:
            buf = cls._open_checked(path, sync, SeqMark(mark_path(path)), announce_jump=False)
        except (sqlite3.Error, OSError) as exc:
            raise RescueCutShort(f"{exc} (the fresh file after {moved.name})", moved, acked) from exc
        log.warning("buffer %s: fresh file started after %s; salvaging it now", path, moved.name)
        return buf._after_rescue(moved, acked, max_mb, progress, holders)

    def _after_rescue(self, moved: Path, acked: dict[str, int], max_mb: float | None,
                      progress: Callable[[], None] | None, holders: Sequence[str] | None) -> Buffer:
        """A rescue's fresh file is open: note the old watermarks, salvage `moved` into it, apply the cap."""
        assert self.seqmark is not None
        self.seqmark.note_acked(acked)  # not the fresh file's: a salvage cut short is done again with them
        self._salvage_from(moved, acked, progress, holders)
        if max_mb is not None:
            self.set_size_cap(max_mb)
        return self

    def _salvage_cut_short(self, moved: Path, progress: Callable[[], None] | None,
                           holders: Sequence[str] | None) -> None:
        """The agent was stopped (killed, a power cut) while it salvaged `moved` into this fresh file, whose
        transaction never committed: done again, as the rows of `moved` were neither copied nor announced.
        A file that holds rows of its own (written by a version that does not know the mark) keeps them."""
        if not moved.exists() or any(self.conn.execute(f"SELECT EXISTS(SELECT 1 FROM {stream})").fetchone()[0]
                                     for stream in STREAMS):
            log.error("buffer %s: a salvage from %s was cut short, and %s: not salvaged again", self.path, moved.name,
                      "that file is gone" if not moved.exists() else "this file holds rows of its own")
            self.conn.execute("DELETE FROM meta WHERE key=?", (SALVAGE_UNFINISHED,))
            marker_of_pending_salvage(self.path, moved).unlink(missing_ok=True)
            return
        log.warning("buffer %s: the salvage from %s was cut short; salvaging again", self.path, moved.name)
        self._salvage_from(moved, self.seqmark.acked() if self.seqmark is not None else {}, progress, holders)

    def _salvage_from(self, moved: Path, acked: dict[str, int], progress: Callable[[], None] | None,
                      holders: Sequence[str] | None) -> None:
        """Salvage into this fresh file what is readable of `moved` (`agent.salvage`), and log what it did."""
        from agent.salvage import salvage_into  # only on this rare path

        report = salvage_into(moved, self, int(time.time() * 1000), progress, acked, holders)
        if self.seqmark is not None:
            self.seqmark.note_acked(self._sent_upto)  # the salvaged rows wait below the mark
        log.warning("buffer %s: from %s %s", self.path, moved.name, report.summary())

    @classmethod
    def _open_checked(cls, path: Path, sync: str, seqmark: SeqMark, announce_jump: bool = True,
                      progress: Callable[[], None] | None = None, restored: bool = False) -> Buffer:
        """Open (or create) and check the file; `announce_jump=False` when the salvage announces it;
        `restored`: the copy `write_back` just made of the running writer's file, which lost nothing."""
        fresh = not path.exists() or path.stat().st_size == 0
        wal_missing = not fresh and _wal_has_no_frame(path)
        kept = None if fresh or restored else _keep_wal(path)
        conn = _connect(path, readonly=False, sync=sync)
        try:
            if not fresh and not restored:
                result = _reporting(lambda: conn.execute("PRAGMA quick_check(1)").fetchone()[0], progress)
                if result != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed: quick_check: {result}")
                lost = _wal_commits_lost(path, conn)
                if lost:
                    raise sqlite3.DatabaseError(f"database disk image is malformed: the WAL holds {lost} committed "
                                                "transactions SQLite had to drop (a damaged frame before them)")
            buf = cls(path, conn, writer=True, seqmark=seqmark)
            buf._create_schema()
            buf._load_counters(fresh_file=fresh, announce_jump=announce_jump, opening=True, wal_missing=wal_missing,
                               rereading=restored)
            seqmark.ensure_above(buf._last_seq, acked=buf._sent_upto)
            buf._write_first_frame()
            seqmark.note_running(volatile=sync != "full")
        except BaseException:
            conn.close()  # the WAL is gone now (checkpointed and deleted), but `kept` stays for the rescue
            raise
        if kept is not None:
            kept.unlink(missing_ok=True)
        buf.path_state()  # notes its -wal and -shm
        return buf

    @classmethod
    def open_reader(cls, path: str | Path, expect: tuple[int, int] | None = None) -> Buffer:
        """Open an existing database read-only (works while the agent writes to it). `expect`: the
        identity of the writer's file (`Buffer.identity`); another file found at `path` (the writer has
        not put its own back yet, `write_back`) is refused with BufferError instead of read."""
        path = Path(path)
        if not path.exists():
            raise BufferError(f"no buffer database at {path} (has the agent run yet?)")
        if expect is not None and _identity(path) != expect:
            raise BufferError(f"{path} is not the file the recorder writes (deleted, renamed or replaced while "
                              "the agent runs); waiting for the recorder to put its own back")
        conn = _connect(path, readonly=True, sync="normal")
        buf = cls(path, conn, writer=False, seqmark=None)
        if expect is not None and buf.identity != expect:  # replaced while it was being opened
            conn.close()
            raise BufferError(f"{path} was replaced while it was being opened")
        return buf

    def damage_found(self, progress: Callable[[], None] | None = None) -> str | None:
        """What SQLite's `PRAGMA quick_check` finds wrong with this file as it is on disk now, None when
        nothing. Read through a connection of its own: a page this one still holds good in its cache
        would hide the damaged copy every other reader gets. `progress()` as for `open_writer`. Raises
        BufferError when the path names another file by now, sqlite3.Error when it cannot be read."""
        reader = Buffer.open_reader(self.path, expect=self.identity)
        try:
            result = _reporting(lambda: reader.conn.execute("PRAGMA quick_check(1)").fetchone()[0], progress)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            return str(exc)
        finally:
            reader.close()
        return None if result == "ok" else result

    def write_back(self, *, sync: str, max_mb: float | None,
                   progress: Callable[[], None] | None = None) -> tuple[Buffer, Path | None]:
        """Writer, between transactions, when `path` no longer names this connection's file (`path_state`):
        put this database back at `path`, every row and seq as committed, and return a writer on it with
        where what stood at `path` was moved (never deleted; None when nothing stood there). The steps:
        a copy beside the path (VACUUM INTO: a consistent snapshot, WAL included; rows keep their seqs,
        INTEGER PRIMARY KEYs), fsynced; whatever is at the path moved aside as `NAME.foreign-STAMP` with
        its -wal and -shm (this file's own -wal/-shm, left at their names when the file alone was moved,
        are removed: they hold nothing the copy lacks); the copy renamed into place. This connection is
        closed only then: SQLite then sees its file moved and neither checkpoints it nor deletes the
        `-wal` named after the path (the new file's). Raises (sqlite3.Error, OSError, BufferError) with
        this connection still open and writable, the copy removed: a disk without room for it, say.
        `progress()` is called now and then while the copy is made (a large file takes a while)."""
        assert self.writer and self.seqmark is not None
        tmp = self.path.with_name(self.path.name + ".restore-tmp")
        tmp.unlink(missing_ok=True)  # an earlier attempt's partial copy
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a renamed file keeps every row itself too
        except sqlite3.Error as exc:
            log.warning("checkpoint before putting the buffer back failed: %s", exc)
        if progress is not None:
            def tick() -> int:
                progress()
                return 0  # go on

            self.conn.set_progress_handler(tick, 1_000_000)
        try:
            self.conn.execute("VACUUM INTO ?", (str(tmp),))
            _fsync_path(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.conn.set_progress_handler(None, 0)
        copy = _identity(tmp)
        for suffix, ident in self._sides.items():
            side = self._side(suffix)
            if ident is not None and _identity(side) == ident:
                side.unlink()  # this file's own: the copy has all it held, and this connection keeps it open
        moved = None
        if _identity(self.path) == self.identity:  # its own file, only its -wal deleted (WAL_LOST): replaced
            for suffix in ("-wal", "-shm"):  # a -wal there now was made by a reader since: nothing writes it
                self._side(suffix).unlink(missing_ok=True)
        elif _identity(self.path) is not None or any(self._side(s).exists() for s in ("-wal", "-shm")):
            moved = move_aside(self.path, "put in place of the running agent's buffer file, which the agent "
                               "then put back", kind="foreign")
        os.replace(tmp, self.path)
        try:
            _fsync_path(self.path.parent, directory=True)
        except OSError:
            pass
        try:
            buf = self._open_checked(self.path, sync, self.seqmark, restored=True)
            if max_mb is not None:
                buf.set_size_cap(max_mb)
        except BaseException:
            if _identity(self.path) == copy:
                os.replace(self.path, tmp)  # not left at the path as if it were another file
            raise
        if buf._last_seq != self._last_seq:
            log.error("buffer %s put back with last seqs %s, not %s as written", self.path, buf._last_seq,
                      self._last_seq)
        self.conn.close()
        return buf, moved

    def close_corrupt(self) -> None:
        """Writer, its file found corrupt while running (`Buffer.rescue` follows): close the connection and
        keep the WAL whole for the salvage (the link `_keep_wal` makes, which `move_aside` takes). Closed as
        the last connection to the file, SQLite checkpoints the WAL and deletes it, and with it the older
        frames' copies of a page damaged in the file since (frames SQLite no longer reads once the WAL started
        over, but `agent.pagescan` does): whether a reader had the file open then decided whether the
        page's readings were salvaged or announced lost."""
        if _identity(self.path) == self.identity:  # not a file put at the path since: its WAL is not this one's
            _keep_wal(self.path)
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self.writer:
            complete = False
            try:
                busy, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                complete = busy == 0 and frames == copied
            except sqlite3.Error as exc:
                log.warning("checkpoint at close failed: %s", exc)
            if self.seqmark is not None:  # a buffer that replaces this one knows what was issued and delivered
                if not (complete and self.seqmark.note_closed(self._last_seq, self._sent_upto)):
                    self.seqmark.note_acked(self._sent_upto)  # rows still in the WAL: `running` stays 1
        self.conn.close()

    TABLES = ("readings", STREAM_AGGREGATES, STREAM_ALARMS, "streams", "stored_upto", "gaps", "meta", "channels")

    def _create_schema(self) -> None:
        """Tables and stream rows in one transaction: a reader (`edge-agent status` while a first start
        creates the file) sees either no tables at all or every table with its stream rows."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            present = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not set(self.TABLES) <= present:
                self._create_tables()
            # The layout version in the header too (`agent.bufferschema`), where a later agent reads it
            # even if its SQLite cannot parse this file's schema; files from before it was kept there get it.
            if self.conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # older, or damaged
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.conn.execute("UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
                                  (str(SCHEMA_VERSION), SCHEMA_VERSION))
            for stream in STREAMS:
                self.conn.execute(
                    "INSERT OR IGNORE INTO streams(name, floor_seq, sent_upto) VALUES (?, 0, 0)", (stream,)
                )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _write_first_frame(self) -> None:
        """A first commit that writes a WAL frame makes the WAL durable (with `sync: full` SQLite syncs it
        and its directory entry then); from now on a start that finds no WAL after a crash knows that it
        was deleted (`SeqMark.lost_rows`). It must change a row: SQLite writes nothing for an update
        that leaves a row as it was (audit W)."""
        self.conn.execute("INSERT INTO meta(key, value) VALUES ('opened_ms', ?) "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(time.time_ns() // 1_000_000),))

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reader: one read transaction around several queries, so that they all see the file as one
        commit left it (`status`: a backlog and a last seq of the same moment, while the recorder commits
        between them). Held for those few queries only: a read transaction holds checkpoints back."""
        if self.writer or self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def has_schema(self) -> bool:
        """False while the file is still being created by a first start (no tables committed yet)."""
        return self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='streams'").fetchone() is not None

    def _create_tables(self) -> None:
        """Create what is missing (a new file, or one from an older version). sqlite-utils is imported
        only here, and unloaded afterwards with what it brought (click, dateutil, tabulate...: 1.5 MB
        a gateway would otherwise carry for months after its first start)."""
        loaded = {name.partition(".")[0] for name in sys.modules}
        try:
            self._create_tables_with_sqlite_utils()
        finally:
            for name in [n for n in sys.modules if n.partition(".")[0] not in loaded]:
                del sys.modules[name]
            release_free_memory(collect=True)

    def _create_tables_with_sqlite_utils(self) -> None:
        import sqlite_utils

        db = sqlite_utils.Database(self.conn)
        db.table("readings").create(
            {"seq": int, "ts_ms": int, "device": str, "channel": str, "value": float, "unit": str, "flag": str},
            pk="seq", not_null={"ts_ms", "device", "channel", "flag"}, if_not_exists=True,
        )
        for stream in (STREAM_AGGREGATES, STREAM_ALARMS):
            db.table(stream).create({"seq": int, "ts_ms": int, "body": str}, pk="seq", if_not_exists=True)
        db.table("streams").create(
            {"name": str, "floor_seq": int, "sent_upto": int}, pk="name", if_not_exists=True
        )
        db.table("stored_upto").create(  # `purge_sent`: rows of `stream` up to `seq` were stored by `stored_ms`
            {"stream": str, "seq": int, "stored_ms": int}, pk=("stream", "seq"), if_not_exists=True
        )
        db.table("gaps").create(
            {"id": int, "stream": str, "first_seq": int, "last_seq": int, "reason": str,
             "created_ms": int, "announced": int},
            pk="id", if_not_exists=True,
        )
        db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db.table("channels").create(
            {"device": str, "channel": str, "seq": int, "ts_ms": int, "value": float, "unit": str,
             "flag": str, "last_valid_ms": int, "good": int, "bad": int},
            pk=("device", "channel"), if_not_exists=True,
        )
        self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                          (str(SCHEMA_VERSION),))

    def _load_counters(self, fresh_file: bool = False, announce_jump: bool = False, opening: bool = False,
                       wal_missing: bool = False, rereading: bool = False) -> None:
        """Read each stream's last seq and watermark. Only a file that may lack seqs issued before
        (fresh: first start, or the old one lost or moved aside; `opening`, one that `SeqMark.lost_rows`
        says lost rows) is moved above the high-water mark; this writes, the rest only reads. `rereading`:
        this writer's own file after a rollback (`reload_counters`), which lost nothing."""
        assert self.seqmark is not None
        marks = self.seqmark.read()
        for stream in STREAMS:
            floor, sent = self.conn.execute(
                "SELECT floor_seq, sent_upto FROM streams WHERE name=?", (stream,)
            ).fetchone()
            top = self.conn.execute(f"SELECT max(seq) FROM {stream}").fetchone()[0] or 0
            last = max(top, floor)
            mark = marks.get(stream, 0)
            # A fresh file, one whose last seq lies a whole reservation block below the mark (it lost
            # rows, or another buffer at this path issued seqs: the mark is kept beside a new
            # storage.path), or one that lost rows by the mark's notes (an older copy put back, its WAL
            # deleted after a crash): continue above every seq that may ever have been issued.
            lost = not rereading and (fresh_file or last < mark - self.seqmark.block or (
                opening and self.seqmark.lost_rows(stream, last, wal_missing)))
            # After a clean close the last seq issued is known exactly: no need to skip to the mark. A file
            # a whole block below the mark may be another buffer's (that one issued above it); a fresh file
            # always lies that far below once a block is used up, and the clean close's note stands for it.
            issued = self.seqmark.issued_at_clean_close(stream)
            foreign = not fresh_file and last < mark - self.seqmark.block
            top = mark if issued is None or foreign else min(max(issued, last), mark)
            if last < top and lost:
                if not fresh_file:
                    log.warning("buffer %s: stream %s ends at seq %d, but seqs up to %d may have been issued "
                                "(an older copy of the file, its WAL deleted after a crash, or a power cut "
                                "with sync: normal)", self.path, stream,
                                last, top)
                log.info("stream %s continues above seq %d", stream, top)
                if stream == STREAM_READINGS and announce_jump:
                    self._announce_jump(last, top, fresh_file)
                last = top
                sent = top if fresh_file else sent  # rows still unpublished in the file stay so
                self.conn.execute(
                    "UPDATE streams SET floor_seq=?, sent_upto=? WHERE name=?", (last, sent, stream)
                )
            self._last_seq[stream] = last
            self._sent_upto[stream] = min(sent, last)

    def _announce_jump(self, last: int, mark: int, fresh_file: bool) -> None:
        """Readings seqs up to `mark` (the high-water mark, or the last seq issued before a clean
        close) that this file cannot account for: issued by a buffer that is
        gone (deleted, lost with its card, left at another `storage.path`) or never issued. Receivers
        see them skipped; SPEC §3 wants every gap announced, so this one is, as `buffer_missing`,
        from the acknowledged watermark a buffer here last noted beside the mark (at its clean close
        or its last block reservation: rows above it may have been lost with that buffer), else from
        the block the mark reserved."""
        assert self.seqmark is not None
        acked = self.seqmark.acked().get(STREAM_READINGS)
        known = acked if acked is not None else (mark - self.seqmark.block if fresh_file else last)
        first = max(last, known) + 1
        if first <= mark:
            self.record_gap(STREAM_READINGS, first, mark, GAP_BUFFER_MISSING, int(time.time() * 1000))
            log.warning("buffer %s: readings seqs %d..%d are not in this file (it is new, or another buffer "
                        "issued them): announced as a gap (buffer_missing)", self.path, first, mark)

    # ------------------------------------------------------------------ writer side

    def last_seq(self, stream: str = STREAM_READINGS) -> int:
        return self._last_seq[stream]

    def sent_upto(self, stream: str = STREAM_READINGS) -> int:
        return self._sent_upto[stream]

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def reload_counters(self) -> None:
        """After a rollback: drop the in-memory counters advanced by the failed transaction. The file is
        the truth then: the rolled-back seqs were never committed nor offered to anyone, so they are
        issued again, even where the failed batch had raised the reservation beside the file a block
        above what the file holds (that is no loss, and no reason to jump): the reservation comes back
        down (`SeqMark.release`), or a crash before the retry commits has the next start jump to it."""
        self._load_counters(rereading=True)
        if self.seqmark is not None:
            self.seqmark.release(self._last_seq)

    def _next_seqs(self, stream: str, n: int) -> int:
        """Reserve n seqs; returns the first. Grows the external high-water mark when needed."""
        first = self._last_seq[stream] + 1
        self._last_seq[stream] += n
        assert self.seqmark is not None
        self.seqmark.ensure_above({stream: self._last_seq[stream]}, acked=self._sent_upto)
        return first

    def insert_readings(self, readings: Sequence[Reading]) -> list[Reading]:
        """Append readings (inside the caller's transaction); returns them with their seq."""
        first = self._next_seqs(STREAM_READINGS, len(readings))
        # Plain tuples in the column order of a Reading: sqlite3 binds those twice as fast as a
        # tuple subclass (measured); Reading._make is the cheapest way to make Readings of them.
        rows = [(d, c, t, v, u, f, seq) for seq, (d, c, t, v, u, f, _) in enumerate(readings, first)]
        self.conn.executemany(
            "INSERT INTO readings(device, channel, ts_ms, value, unit, flag, seq) VALUES (?,?,?,?,?,?,?)", rows
        )
        return list(map(Reading._make, rows))

    def insert_event(self, stream: str, ts_ms: int, body: dict) -> int:
        """Append an aggregate or alarm event (its body gets `seq`); returns the seq."""
        if stream not in (STREAM_AGGREGATES, STREAM_ALARMS):
            raise ValueError(f"not an event stream: {stream}")
        seq = self._next_seqs(stream, 1)
        body = {"seq": seq, **body}
        try:
            text = json.dumps(body, separators=(",", ":"), allow_nan=False)
        except ValueError:
            # inf or NaN (statistics of a float64 instrument's 1.8e308): JSON cannot say them, and a body
            # holding `Infinity` made SQLite's json_extract fail on the whole table (see PERIOD_OF_BODY)
            log.warning("%s event seq %d: a number that is not finite is stored as null", stream, seq)
            text = json.dumps(finite(body), separators=(",", ":"), allow_nan=False)
        self.conn.execute(f"INSERT INTO {stream}(seq, ts_ms, body) VALUES (?,?,?)", (seq, ts_ms, text))
        return seq

    def set_sent_upto(self, stream: str, seq: int) -> None:
        """Persist the acknowledgement watermark (only ever moves forward)."""
        seq = min(seq, self._last_seq[stream])
        if seq > self._sent_upto[stream]:
            self._sent_upto[stream] = seq
            self.conn.execute("UPDATE streams SET sent_upto=? WHERE name=?", (seq, stream))

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def upsert_channels(self, rows: Iterable[tuple]) -> None:
        """rows: (device, channel, seq, ts_ms, value, unit, flag, last_valid_ms, good, bad)."""
        self.conn.executemany(
            "INSERT INTO channels(device, channel, seq, ts_ms, value, unit, flag, last_valid_ms, good, bad) "
            "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(device, channel) DO UPDATE SET "
            "seq=excluded.seq, ts_ms=excluded.ts_ms, value=excluded.value, unit=excluded.unit, "
            "flag=excluded.flag, last_valid_ms=excluded.last_valid_ms, good=excluded.good, bad=excluded.bad",
            list(rows),
        )

    def mark_gap_announced(self, gap_id: int, last_seq: int) -> None:
        """The gap was announced up to `last_seq`; if eviction has extended it since, only the part
        above stays pending (each dropped seq is announced once)."""
        self.conn.execute("UPDATE gaps SET announced=1 WHERE id=? AND last_seq<=?", (gap_id, last_seq))
        self.conn.execute("UPDATE gaps SET first_seq=max(first_seq, ?) WHERE id=? AND announced=0",
                          (last_seq + 1, gap_id))

    # ------------------------------------------------------------------ size cap and purge

    def set_size_cap(self, max_mb: float) -> None:
        """Hard cap: SQLite refuses to grow the file beyond it (SQLITE_FULL), eviction keeps below. The
        WAL comes on top: after a checkpoint it is cut back to an eighth of the cap (1 to 8 MiB)."""
        self.max_bytes = int(max_mb * 1024 * 1024)
        pages = max(self.max_bytes // PAGE_SIZE, 64)
        self.conn.execute(f"PRAGMA max_page_count={pages}")
        self.conn.execute(f"PRAGMA journal_size_limit={min(8 << 20, max(1 << 20, self.max_bytes // 8))}")

    def compact_over_cap(self) -> None:
        """At start: a file larger than the cap (the cap was lowered: eviction keeps the pages in use below
        it, but SQLite never gives free pages back to the disk) is rewritten without its free pages
        (VACUUM), before polling starts, so that lowering `max_mb` frees the card. Rows and seqs stay as
        they are. When it cannot (the disk too full for the copy), the file stays as it is: logged."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        if pages * PAGE_SIZE <= self.max_bytes or not free:
            return
        started = time.monotonic()
        try:
            self.conn.execute("VACUUM")
            self.give_wal_back()  # and a first frame again, as at every open
        except sqlite3.Error as exc:
            log.warning("buffer %s is %.1f MB, above max_mb %.1f, and could not be compacted: %s",
                        self.path, pages * PAGE_SIZE / 2**20, self.max_bytes / 2**20, exc)
            try:  # what the failed copy wrote into the WAL is given back to the disk
                self.give_wal_back()
            except sqlite3.Error:
                pass  # the recorder's commits report a disk that stays full
            return
        after = self.conn.execute("PRAGMA page_count").fetchone()[0]
        log.info("buffer %s was %.1f MB, above max_mb %.1f: compacted to %.1f MB in %.1f s", self.path,
                 pages * PAGE_SIZE / 2**20, self.max_bytes / 2**20, after * PAGE_SIZE / 2**20,
                 time.monotonic() - started)

    def give_wal_back(self) -> None:
        """Checkpoint the WAL and cut it to nothing (its space back to a full disk), then write a frame into it
        again (`_write_first_frame`), which fits in the space just given back: left empty until the next
        commit (for as long as the disk stays full), a crash meanwhile had the next start take it for a
        deleted one (`_wal_has_no_frame`), jump to the mark and announce up to a block of seqs never issued
        as buffer_missing (audit Z)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._write_first_frame()

    def wal_held_back(self) -> int:
        """Bytes of the WAL when it has grown past `WAL_HELD_BYTES` because a checkpoint cannot copy all
        of it back (another connection keeps an old read transaction open), else 0."""
        try:
            size = self.path.with_name(self.path.name + "-wal").stat().st_size
        except OSError:
            return 0
        if size < WAL_HELD_BYTES:
            return 0
        _busy, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return size if copied < frames else 0

    def used_bytes(self) -> int:
        """Bytes of the file in use (pages not on the free list)."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * PAGE_SIZE

    def purge_sent(self, keep_sent_days: float, now_ms: int, held: Mapping[str, int] | None = None) -> int:
        """Delete published readings and events stored more than `keep_sent_days` ago (caller's
        transaction). `held`: per stream, the seq up to which the other consumers (HJ 212 uplinks)
        have delivered too; rows above it are kept for them.

        A row's age is the time it was stored, not its `ts_ms` (an instrument's clock, SPEC §2, may
        be days off either way). Seqs are issued in storage order, so each pass notes the stream's last
        seq with the time (`stored_upto`: every row up to that seq was stored by then) and deletes up
        to the newest note older than the cutoff: a seq range, its cost in proportion to what goes (at
        most PURGE_MAX_ROWS a stream, the rest at the next pass: a file from before the notes, noted
        as a whole at its first pass, must not stall the recorder's commits when it ages).
        A pass while the wall clock is implausible (not set yet after a boot) does nothing: it would
        take every note for one in the future and date it then, and the first pass once NTP has set the
        clock would find them all 56 years old. A note in the future of a plausible clock (it stepped
        back) counts as written now."""
        cutoff = now_ms - int(keep_sent_days * 86_400_000)
        deleted = 0
        self.purge_cut_short = False
        if now_ms < EARLIEST_PLAUSIBLE * 1000:
            return 0
        for stream in STREAMS:
            self.conn.execute("UPDATE stored_upto SET stored_ms=? WHERE stream=? AND stored_ms>?",
                              (now_ms, stream, now_ms))
            self.conn.execute("INSERT OR IGNORE INTO stored_upto(stream, seq, stored_ms) VALUES (?,?,?)",
                              (stream, self._last_seq[stream], now_ms))
            sent = min(self._sent_upto[stream], (held or {}).get(stream, self._sent_upto[stream]))
            stored = self.conn.execute("SELECT max(seq) FROM stored_upto WHERE stream=? AND stored_ms<=?",
                                       (stream, cutoff)).fetchone()[0]
            oldest = self.conn.execute(f"SELECT min(seq) FROM {stream}").fetchone()[0]
            if oldest is not None:  # notes of rows gone otherwise (evicted at the cap) say nothing any more
                self.conn.execute("DELETE FROM stored_upto WHERE stream=? AND seq<?", (stream, oldest))
            first = oldest or 0
            upto = min(sent, stored or 0, first + PURGE_MAX_ROWS - 1)
            # Cut short by the limit, which counts seqs: fewer rows than it go when the range has holes (the
            # seqs of a gap or of a jump), so the row count alone missed that more waits (audit Z).
            self.purge_cut_short |= oldest is not None and upto < min(sent, stored or 0)
            if upto:
                deleted += self._delete_upto(stream, upto)
                self.conn.execute("DELETE FROM stored_upto WHERE stream=? AND seq<=?", (stream, upto))
        return deleted

    def _delete_upto(self, stream: str, upto: int, first: int = 0) -> int:
        """Delete the rows of `stream` with `first` <= seq <= `upto`; their seqs are never issued again."""
        cur = self.conn.execute(f"DELETE FROM {stream} WHERE seq BETWEEN ? AND ?", (first, upto))
        self.conn.execute(
            "UPDATE streams SET floor_seq = max(floor_seq, ?) WHERE name=?", (upto, stream)
        )
        return cur.rowcount

    def evict(self, target_bytes: int, now_ms: int, held: Mapping[str, int] | None = None,
              in_flight_upto: int = 0, max_rows: int | None = None) -> tuple[int, int, Gap | None, int]:
        """Free space until `used_bytes() <= target_bytes` (caller's transaction): published readings
        first (oldest first), then published events, then the oldest unpublished readings — those
        are recorded as a gap to announce. Unpublished alarms and aggregates are never dropped.
        `held` (per stream: delivered by the HJ 212 uplinks up to there) makes the rows published
        but not yet delivered by an uplink go only after every other published row. Readings up to
        `in_flight_upto` (offered to the broker, not yet acknowledged) are kept: they may well arrive,
        and a gap must hold only seqs that never reached it.
        `max_rows`: stop once about that many rows are gone (the caller commits and calls again: every
        page a transaction frees is written to the WAL, so one transaction for the whole of it needs
        disk beside the file for as much as it deletes).
        Returns (published rows purged, unpublished readings dropped, gap or None, published rows
        purged that an uplink had not delivered yet)."""
        purged = dropped = undelivered = 0
        gap = None
        chunk = 2000
        budget = max_rows if max_rows is not None else 2**63

        def more() -> bool:
            return purged + dropped < budget and self.used_bytes() > target_bytes

        for stage in ("delivered", "published"):
            for stream in (STREAM_READINGS, STREAM_AGGREGATES, STREAM_ALARMS):
                sent = self._sent_upto[stream]
                limit = min(sent, (held or {}).get(stream, sent)) if stage == "delivered" else sent
                while more():
                    lo = self.conn.execute(f"SELECT min(seq) FROM {stream}").fetchone()[0]
                    if lo is None or lo > limit:
                        break
                    upto = min(limit, lo + chunk - 1)
                    n = self._delete_upto(stream, upto)
                    purged += n
                    undelivered += n if stage == "published" else 0
        keep = max(self._sent_upto[STREAM_READINGS], in_flight_upto)
        while more():
            # The next `chunk` rows, one step each along the primary key (never a walk of every row above
            # `keep`: 12 s for 30 M readings, once per chunk).
            seqs = [r[0] for r in self.conn.execute("SELECT seq FROM readings WHERE seq > ? ORDER BY seq LIMIT ?",
                                                    (keep, chunk))]
            if not seqs:
                break
            lo, upto = seqs[0], seqs[-1]
            dropped += self._delete_upto(STREAM_READINGS, upto, first=lo)
            # A gap per run of seqs dropped: the seqs between runs were never stored here (a jump, a salvage's
            # loss: announced already; or acknowledged before a fresh file), and are not the cap's to announce.
            for first, last in _runs(seqs):
                gap = self.record_gap(STREAM_READINGS, first, last, "buffer_full", now_ms)
            if keep == self._sent_upto[STREAM_READINGS]:  # nothing in flight below: the watermark passes the gap
                self.set_sent_upto(STREAM_READINGS, upto)
            keep = upto
        return purged, dropped, gap, undelivered

    def record_gap(self, stream: str, first: int, last: int, reason: str, now_ms: int) -> Gap:
        """Record dropped seqs; extends the newest unannounced gap when the ranges touch. A range that begins
        below that gap (an eviction after a reconnection: the publisher's cursor, and with it what is kept as
        in flight, fell back to the watermark) has its part below recorded as a gap of its own: merged, the
        gap kept its first seq, and the seqs between were deleted and never announced (audit Z)."""
        row = self.conn.execute(
            "SELECT id, first_seq, last_seq FROM gaps WHERE stream=? AND announced=0 AND reason=? "
            "ORDER BY id DESC LIMIT 1", (stream, reason)
        ).fetchone()
        if row and row[2] + 1 >= first:
            if first < row[1]:
                below = self._insert_gap(stream, first, min(last, row[1] - 1), reason, now_ms)
                if last < row[1]:
                    return below
            self.conn.execute("UPDATE gaps SET last_seq=? WHERE id=?", (max(last, row[2]), row[0]))
            return Gap(row[0], stream, row[1], max(last, row[2]), reason)
        return self._insert_gap(stream, first, last, reason, now_ms)

    def _insert_gap(self, stream: str, first: int, last: int, reason: str, now_ms: int) -> Gap:
        cur = self.conn.execute(
            "INSERT INTO gaps(stream, first_seq, last_seq, reason, created_ms, announced) VALUES (?,?,?,?,?,0)",
            (stream, first, last, reason, now_ms),
        )
        return Gap(int(cur.lastrowid or 0), stream, first, last, reason)

    # ------------------------------------------------------------------ reader side

    def stream_state(self, stream: str = STREAM_READINGS) -> tuple[int, int]:
        """(last seq stored or ever issued, acknowledged watermark) as the file says now."""
        floor, sent = self.conn.execute(
            "SELECT floor_seq, sent_upto FROM streams WHERE name=?", (stream,)
        ).fetchone()
        top = self.conn.execute(f"SELECT max(seq) FROM {stream}").fetchone()[0] or 0
        return max(top, floor), sent

    def readings_after(self, after_seq: int, limit: int) -> list[Reading]:
        rows = self.conn.execute(
            "SELECT seq, ts_ms, device, channel, value, unit, flag FROM readings WHERE seq > ? "
            "ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [Reading(r[2], r[3], r[1], r[4], r[5], r[6], r[0]) for r in rows]

    def latest_per_channel(self, after_seq: int, limit: int) -> list[tuple]:
        """Of the first `limit` readings with seq > after_seq: each channel's last one, as (device, channel,
        seq, ts_ms, value, unit, flag, last_valid_ms), last_valid_ms being the time of its last reading with
        a value (None when it has none there). One row per channel, whatever the number of readings: SQLite
        folds them (a max() picks the row its bare columns come from), so `status` does not build a Python
        object per reading (at 2000 readings/s that was 50 000 of them, ~25 MB, for each `status`)."""
        recent = ("SELECT seq, ts_ms, device, channel, value, unit, flag FROM readings WHERE seq > ? "
                  "ORDER BY seq LIMIT ?")
        last = {(r[0], r[1]): r for r in self.conn.execute(
            f"SELECT device, channel, max(seq), ts_ms, value, unit, flag FROM ({recent}) GROUP BY device, channel",
            (after_seq, limit))}
        valid = {(r[0], r[1]): r[3] for r in self.conn.execute(
            f"SELECT device, channel, max(seq), ts_ms FROM ({recent}) WHERE value IS NOT NULL "
            "GROUP BY device, channel", (after_seq, limit))}
        return [(*row, valid.get(key)) for key, row in last.items()]

    def readings_json(self, after_seq: int, limit: int, upto_seq: int | None = None,
                      ts_range: tuple[int, int] | None = None) -> JsonBatch | None:
        """Up to `limit` readings with seq > after_seq (and <= upto_seq), encoded, in seq order; with
        `ts_range` (start_ms, end_ms), only those whose `ts_ms` lies in it (both inclusive)."""
        when, args = _ts_filter(ts_range)
        row = self.conn.execute(
            f"SELECT min(seq), max(seq), count(*), group_concat(j, ',') FROM (SELECT seq, {READING_JSON} AS j "
            f"FROM readings WHERE seq > ? AND seq <= ?{when} ORDER BY seq LIMIT ?)",
            (after_seq, upto_seq if upto_seq is not None else 2**63 - 1, *args, limit),
        ).fetchone()
        if not row[2]:
            return None
        return JsonBatch(row[0], row[1], row[2], row[3])

    def missing_between(self, stream: str, first: int, last: int) -> list[list[int]]:
        """The runs of `stream` seqs from `first` to `last` that are not stored, as [from, to] pairs."""
        runs, expected = [], first
        for (seq,) in self.conn.execute(f"SELECT seq FROM {stream} WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                        (first, last)):
            if seq > expected:
                runs.append([expected, seq - 1])
            expected = seq + 1
        if expected <= last:
            runs.append([expected, last])
        return runs

    def events_after(self, stream: str, after_seq: int, limit: int) -> list[EventRow]:
        rows = self.conn.execute(
            f"SELECT seq, ts_ms, body FROM {stream} WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [EventRow(r[0], r[1], json.loads(r[2])) for r in rows]

    def reading_polls(self, after_seq: int, max_readings: int, *, upto_seq: int | None = None,
                      max_polls: int | None = None, ts_range: tuple[int, int] | None = None,
                      scan_upto: int | None = None) -> list[Poll]:
        """Readings with seq > after_seq (and <= upto_seq) in seq order, grouped per device poll.

        A poll is a run of consecutive seqs of one device with one `ts_ms` (the recorder stores each
        poll's readings together, in one transaction). About `max_readings` readings are read; the
        last poll is completed beyond that limit (a poll is never cut in two), and at most
        `max_polls` polls are returned. With `ts_range` (start_ms, end_ms, both inclusive) only the
        polls taken in it; with `scan_upto`, only the rows up to that seq are looked at (one bounded
        step of a long scan), the last poll still being completed up to `upto_seq`.
        """
        upto = upto_seq if upto_seq is not None else 2**63 - 1
        scan = upto if scan_upto is None else min(upto, scan_upto)
        when, args = _ts_filter(ts_range)
        sql = ("SELECT seq, ts_ms, device, channel, value, unit, flag FROM readings WHERE seq > ? AND seq <= ?"
               "{} ORDER BY seq LIMIT ?")
        rows = self.conn.execute(sql.format(when), (after_seq, scan, *args, max(max_readings, 1))).fetchall()
        if not rows:
            return []
        groups = _poll_groups(rows)
        if max_polls is not None and len(groups) > max_polls:
            groups = groups[:max_polls]
        elif len(rows) >= max_readings or rows[-1][0] == scan < upto:
            # The limit, or the end of the step, may have cut the last poll: read the rest of it (its rows
            # follow in seq and share its time, so they need no time filter).
            last = groups[-1]
            while True:
                more = self.conn.execute(sql.format(""), (last[-1][0], upto, 256)).fetchall()
                same = list(itertools.takewhile(lambda r: (r[1], r[2]) == (last[0][1], last[0][2]), more))
                last.extend(same)
                if len(same) < 256:
                    break
        return [_poll(g) for g in groups]

    def polls_between(self, start_ms: int, end_ms: int, *, after_seq: int = 0, limit: int = 1000) -> list[Poll]:
        """The device polls taken in [start_ms, end_ms] (both inclusive), in seq order, from seq >
        after_seq: what a platform's 2011 backfill asks for. About `limit` readings per call; page on
        with `after_seq` = the last poll's `last_seq` (a full page leaves out its last poll, which the
        limit may have cut, unless it is the only one). A scan by seq: readings have no time index."""
        rows = self.conn.execute(
            "SELECT seq, ts_ms, device, channel, value, unit, flag FROM readings WHERE seq > ? "
            "AND ts_ms BETWEEN ? AND ? ORDER BY seq LIMIT ?", (after_seq, start_ms, end_ms, max(limit, 1))
        ).fetchall()
        groups = _poll_groups(rows)
        if len(rows) >= limit and len(groups) > 1:
            groups.pop()
        return [_poll(g) for g in groups]

    def newest_period_starts(self, within: int = 10_000) -> dict[str, int]:
        """The period start (`ts_ms`) of the last computed period (highest seq) of each period name ("10m",
        "1h", "1d") among the last `within` aggregate events: periods up to there are computed already. The
        last computed, not the latest start: periods computed while the clock was years ahead, before it was
        corrected, must not count every period until then as done (SQLite takes `ts_ms` from the max(seq) row)."""
        rows = self.conn.execute(
            f"SELECT {PERIOD_OF_BODY}, ts_ms, max(seq) FROM {STREAM_AGGREGATES} "
            f"WHERE seq > (SELECT coalesce(max(seq), 0) FROM {STREAM_AGGREGATES}) - ? GROUP BY 1", (within,)
        ).fetchall()
        return {str(name): int(start) for name, start, _ in rows if name is not None}

    def aggregates_between(self, start_ms: int, end_ms: int, *, unit: str | None = None,
                           after: tuple[int, int] | None = None, limit: int = 1000) -> list[EventRow]:
        """Aggregate events whose period start (`ts_ms`) lies in [start_ms, end_ms], both inclusive,
        ordered by (period start, seq): what a platform's backfill request (2051/2061/2031) asks for.

        `unit` ("m", "h" or "d") keeps only periods of that unit ("10m", "1h", "1d"). Page through a
        long range with `after` = (ts_ms, seq) of the last row of the previous page: the index scan then
        starts at `after`'s time (given as the range's lower bound: with both bounds in the query, SQLite
        started each page at `start_ms`, and a year of 10-minute periods took a minute to page through).
        """
        if unit is not None and unit not in PERIOD_UNITS:
            raise ValueError(f"period unit {unit!r} is not one of m, h, d")
        sql = f"SELECT seq, ts_ms, body FROM {STREAM_AGGREGATES} WHERE ts_ms BETWEEN ? AND ?"
        args: list[object] = [start_ms if after is None else max(start_ms, after[0]), end_ms]
        if after is not None:
            sql += " AND (ts_ms > ? OR seq > ?)"
            args += [after[0], after[1]]
        if unit is not None:
            sql += f" AND substr({PERIOD_OF_BODY}, -1) = ?"
            args.append(unit)
        sql += " ORDER BY ts_ms, seq LIMIT ?"
        args.append(limit)
        return [EventRow(r[0], r[1], json.loads(r[2])) for r in self.conn.execute(sql, args).fetchall()]

    def ensure_time_index(self) -> None:
        """Writer only: an index on aggregates(ts_ms), for `aggregates_between` (idempotent)."""
        self.conn.execute(
            f"CREATE INDEX IF NOT EXISTS {STREAM_AGGREGATES}_ts_ms ON {STREAM_AGGREGATES}(ts_ms)"
        )

    def pending_gaps(self) -> list[Gap]:
        rows = self.conn.execute(
            "SELECT id, stream, first_seq, last_seq, reason FROM gaps WHERE announced=0 ORDER BY id"
        ).fetchall()
        return [Gap(*r) for r in rows]

    def first_seq(self, stream: str = STREAM_READINGS, after: int = 0) -> int | None:
        """The oldest seq still stored (above `after`); None when there is none."""
        return self.conn.execute(f"SELECT min(seq) FROM {stream} WHERE seq > ?", (after,)).fetchone()[0]

    def has_after(self, stream: str, after_seq: int) -> bool:
        """Whether a row has seq > after_seq (one step down the primary key, whatever the backlog)."""
        return self.conn.execute(f"SELECT 1 FROM {stream} WHERE seq > ? LIMIT 1", (after_seq,)).fetchone() is not None

    def backlog(self, stream: str, after_seq: int) -> tuple[int, bool]:
        """How many rows have seq > after_seq, and whether that figure is exact. Up to BACKLOG_COUNTED rows
        are counted (~0.1 s); past that the figure is worked out from the seqs: the span from the first
        such seq to the last, less the recorded gaps inside it (rows dropped, seqs skipped by a fresh
        file). A count walks every row: 3 s for a 30 M readings backlog, at every `status`, every
        console refresh (3 s) and every MQTT `status` command (audit Y)."""
        counted = self.count_between(stream, after_seq + 1, 2**63 - 1, BACKLOG_COUNTED + 1)
        if counted <= BACKLOG_COUNTED:
            return counted, True
        first = self.conn.execute(f"SELECT min(seq) FROM {stream} WHERE seq > ?", (after_seq,)).fetchone()[0]
        last = self.conn.execute(f"SELECT max(seq) FROM {stream}").fetchone()[0]
        holes, upto = 0, first - 1
        for lo, hi in self.conn.execute(
                "SELECT max(first_seq, ?), min(last_seq, ?) FROM gaps WHERE stream=? AND last_seq >= ? "
                "AND first_seq <= ? ORDER BY first_seq", (first, last, stream, first, last)):
            # Gap records may overlap (one announced, then a wider one dropped across it): each seq counts once.
            lo = max(lo, upto + 1)
            if hi >= lo:
                holes += hi - lo + 1
            upto = max(upto, hi)
        return max(counted, last - first + 1 - holes), False

    def count_between(self, stream: str, first: int, last: int, at_most: int) -> int:
        """How many rows have first <= seq <= last, counting no further than `at_most`."""
        return int(self.conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {stream} WHERE seq BETWEEN ? AND ? "
                                     "LIMIT ?)", (first, last, at_most)).fetchone()[0])

    def meta_value(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def beside_path(self, key: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{key}")

    def keep_beside(self, key: str, value: str) -> None:
        """Keep a meta value in the file `<buffer>.<key>` too (atomically; raises OSError), for a fresh
        buffer file to start from should this one be lost (`beside_value`)."""
        write_atomically(self.beside_path(key), value)

    def beside_value(self, key: str) -> str | None:
        """The value `keep_beside` last kept for `key`; None when there is none or it cannot be read. Bytes
        that are not UTF-8 (a damaged file) are read as U+FFFD: the reader then says what it makes of it."""
        try:
            return self.beside_path(key).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s (%s); going without it", self.beside_path(key), exc)
            return None

    def channels(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT device, channel, seq, ts_ms, value, unit, flag, last_valid_ms, good, bad FROM channels "
            "ORDER BY device, channel"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


PROGRESS_EVERY_S = 5.0  # a long step of the open calls `progress()` this often (systemd: EXTEND_TIMEOUT 30 s)


def _reporting(step: Callable[[], T], progress: Callable[[], None] | None) -> T:
    """`step()`, calling `progress()` every PROGRESS_EVERY_S while it runs. SQLite runs an integrity check
    as one VM instruction (its progress handler is never called during it), so the step runs in a thread
    of its own (sqlite3 lets the GIL go while SQLite works) and this one reports."""
    if progress is None:
        return step()
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, step()))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="buffer-check", daemon=True)
    worker.start()
    while True:
        worker.join(PROGRESS_EVERY_S)
        if not worker.is_alive():
            break
        progress()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def lowest_progress(records: Iterable[str | None]) -> dict[str, int]:
    """Per stream, the lowest seq among the progress records of the buffer's other consumers (the HJ 212
    uplinks' meta values: JSON objects stream -> seq delivered); records that do not parse are skipped."""
    held: dict[str, int] = {}
    for text in records:
        try:
            marks = json.loads(text or "{}")
        except (TypeError, ValueError):
            continue
        for stream in STREAMS:
            mark = marks.get(stream) if isinstance(marks, dict) else None
            if isinstance(mark, int) and not isinstance(mark, bool):
                held[stream] = min(held.get(stream, mark), mark)
    return held


def _ts_filter(ts_range: tuple[int, int] | None) -> tuple[str, tuple[int, ...]]:
    """The SQL condition (and its arguments) keeping the rows whose `ts_ms` lies in `ts_range`, both ends
    inclusive; nothing for None."""
    return ("", ()) if ts_range is None else (" AND ts_ms BETWEEN ? AND ?", ts_range)


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Increasing seqs as runs of consecutive ones, (first, last) each."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and runs[-1][1] + 1 == seq:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _poll_groups(rows: Sequence[tuple]) -> list[list[tuple]]:
    """Readings rows (seq, ts_ms, device, ...) in seq order, cut into polls: runs of one device and time."""
    groups: list[list[tuple]] = []
    for row in rows:
        if groups and groups[-1][-1][2] == row[2] and groups[-1][-1][1] == row[1]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _poll(rows: list[tuple]) -> Poll:
    return Poll(rows[0][2], rows[0][1], tuple(Reading(r[2], r[3], r[1], r[4], r[5], r[6], r[0]) for r in rows))


def _holds_schema(path: Path) -> bool:
    """Whether the file at `path` is a database with the buffer's tables (read only, never changed)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM sqlite_master WHERE name='readings'").fetchone()[0] > 0
        finally:
            conn.close()
    except sqlite3.Error:
        return True  # not known: kept (a rescue of it is `open_writer`'s)


def marker_of_pending_salvage(path: Path, moved: Path) -> Path:
    """The empty file `NAME.unsalvaged-corrupt-STAMP` beside the buffer at `path`: the salvage of `moved`
    (`NAME.corrupt-STAMP`) into the buffer has not begun yet. Made before the corrupt file is renamed, removed
    once the fresh file's meta `SALVAGE_UNFINISHED` (committed at the salvage's start) takes over, or the
    salvage is done: a start finding it salvages `moved` (a stop, a kill or a power cut before the fresh file
    could be made, a full disk). Empty: a full disk has room for its name, not for a byte of it."""
    return path.with_name(f"{path.name}.unsalvaged-{moved.name[len(path.name) + 1:]}")


def pending_salvages(path: Path) -> list[Path]:
    """The files moved aside whose salvage into the buffer at `path` has not begun (`marker_of_pending_salvage`),
    oldest first. A marker whose file is gone is removed (logged)."""
    prefix = f"{path.name}.unsalvaged-"
    try:
        markers = sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    found = []
    for marker in markers:
        moved = path.with_name(f"{path.name}.{marker.name[len(prefix):]}")
        if moved.exists():
            found.append(moved)
        else:
            log.error("buffer %s: %s was to be salvaged, but it is gone: not salvaged", path, moved.name)
            marker.unlink(missing_ok=True)
    return found


def move_aside(path: Path, reason: str, kind: str = "corrupt", pending_salvage: bool = False) -> Path:
    """Rename a damaged database (and its -wal/-shm) to `NAME.corrupt-TIMESTAMP` (`kind`: another word
    for it, `foreign` for a file that is not the agent's); never deletes. The WAL is taken from the
    link `_keep_wal` made when there is one. `pending_salvage`: its `marker_of_pending_salvage` is made
    first (a failure to make it is logged, and the rename done all the same)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{kind}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{stamp}-{n}")
    if pending_salvage:
        try:
            marker_of_pending_salvage(path, target).touch()
        except OSError as exc:
            log.warning("cannot make the marker of %s's pending salvage (%s): a stop before it is salvaged loses "
                        "its rows", target.name, exc)
    if path.exists():  # `write_back` may find a -wal or -shm alone
        os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if suffix == "-wal" and _kept_wal(path).exists():  # the whole WAL, as it was before the check
            os.replace(_kept_wal(path), target.with_name(target.name + suffix))
            side.unlink(missing_ok=True)  # never left beside the fresh file: SQLite would replay it into it
        elif side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    note = target.with_name(target.name + ".txt")
    try:
        note.write_text(f"moved aside by edge-agent at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {reason}\n")
    except OSError as exc:  # a full disk: the file is moved all the same, and its rescue goes on
        log.warning("cannot write the note %s (%s): %s", note.name, exc, reason)
    return target
