"""Raw page scan: the rows of a damaged buffer file that SQLite can no longer reach.

SQLite finds a row through its table's interior pages, and every page through page 1, the file
header. Those are the pages written most often (at nearly every checkpoint), so the ones a failing
SD card damages most; the damage then makes every row beneath them unreachable, although the leaf
pages that hold the rows are intact. `scan` reads the file and its WAL page by page, decodes every
cell of every table-leaf page, and keeps the records that have exactly the shape of a buffer table:
readings, aggregate and alarm events, stream watermarks, gaps, meta rows. `agent.salvage` takes
from them what it could not read through SQL. It also checks a WAL header as SQLite does
(`wal_header_valid`: a damaged one makes SQLite ignore the whole WAL).

Only the cells a page still lists are read (rows deleted from a page are not brought back). A page
freed by a purge keeps old rows: the caller filters them by the acknowledged watermark. A readings
row never changes once written, so any copy of it is as good as another; of a watermark, the
highest copy is the latest (it only moves forward); of other rows, the copy in the newest frame of
the WAL's current generation (`age`: the transaction that wrote it). Every field is checked: a
damaged page yields nothing, not something wrong. Imports `agent.model` only.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from agent.model import FLAGS, STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, STREAMS

DEFAULT_PAGE_SIZE = 1024  # the buffer's own (agent.buffer.PAGE_SIZE), when no header tells it
WAL_HEADER = 32
WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums of little-endian, big-endian words
WAL_FRAME_HEADER = 24
LEAF_TABLE = 0x0D
TS_RANGE = (946_684_800_000, 4_102_444_800_000)  # 2000 .. 2100, in ms
DEVICE = re.compile(r"[a-z0-9_-]+")
CHANNEL = re.compile(r"[A-Za-z0-9_]+")


STREAMS_TABLE = "streams"  # rows (name, floor_seq, sent_upto)
GAPS_TABLE = "gaps"  # rows (id, stream, first_seq, last_seq, reason, announced)
META_TABLE = "meta"  # rows (key, value)
EVENTS = "events"  # an aggregate or alarm event, before its body tells which
EVENT_STREAMS = {EVENTS: (STREAM_AGGREGATES, STREAM_ALARMS)}
PROGRESS_EVERY = 4096  # pages
_INT = frozenset(range(1, 7)) | {8, 9}  # the serial types of an integer


def scan(path: Path, tables: Collection[str], want: Callable[[str, int], bool] = lambda table, rowid: True,
         progress: Callable[[], None] | None = None, *, wal_only: bool = False) -> Iterator[tuple[str, tuple, int]]:
    """(table, row, age) for every row of `tables` found in the pages of `path` and of its WAL
    (`path`-wal; only there with `wal_only`) for which `want(table, rowid)` holds (asked before the
    row is decoded: a scan that wants little is quick). Tables: the three streams, with rows in the
    column order of `agent.salvage.COLUMNS`, and `STREAMS_TABLE`, `GAPS_TABLE`, `META_TABLE`. The
    same row may come more than once. `age` orders the copies: 0 from the file, n >= 1 from the
    n-th transaction of the WAL's current generation (the higher, the newer; the frames after its
    last commit count as one more), -1 from an older generation's frame. `progress()` is called
    every few thousand pages."""
    shapes = {EVENTS if t in EVENT_STREAMS[EVENTS] else t for t in tables}
    page_size = _page_size(path)
    for count, (pageno, page, age) in enumerate(_pages(path, page_size, wal_only), 1):
        if progress and count % PROGRESS_EVERY == 0:
            progress()
        for rowid, types, payload, at in _leaf_cells(page, 100 if pageno == 1 else 0):
            table = _table_of(types)
            if table not in shapes:
                break  # the cells of a page all belong to one table: skip the page
            if not any(want(t, rowid) for t in EVENT_STREAMS.get(table, (table,)) if t in tables):
                continue
            try:
                values = _values(types, payload, at)
            except (IndexError, ValueError, UnicodeDecodeError, struct.error):
                continue
            found = _row(table, rowid, values) if values is not None else None
            if found is not None and found[0] in tables and (table != EVENTS or want(found[0], rowid)):
                yield found[0], found[1], age


def _page_size(path: Path) -> int:
    """From the file header, else from the WAL header, else the buffer's own page size."""
    for name, offset in ((path, 16), (path.with_name(path.name + "-wal"), 8)):
        try:
            with open(name, "rb") as f:
                f.seek(offset)
                raw = f.read(4)
        except OSError:
            continue
        size = int.from_bytes(raw[:2], "big") if name == path else int.from_bytes(raw, "big")
        size = 65536 if size == 1 else size
        if 512 <= size <= 65536 and size & (size - 1) == 0:
            return size
    return DEFAULT_PAGE_SIZE


def _pages(path: Path, page_size: int, wal_only: bool = False) -> Iterator[tuple[int, bytes, int]]:
    """(page number, content, age: see `scan`) of every page of the file, then of every frame of its
    WAL. The WAL's current generation is the one its header's salts name, or, when the header is
    damaged, the first frame's."""
    try:
        with open(path, "rb") as f:
            pageno = 1
            while not wal_only and len(page := f.read(page_size)) == page_size:
                yield pageno, page, 0
                pageno += 1
    except OSError:
        pass
    try:
        with open(path.with_name(path.name + "-wal"), "rb") as f:
            header = f.read(WAL_HEADER)
            current = header[16:24] if wal_header_valid(header) else None
            transaction = 1
            while len(frame := f.read(WAL_FRAME_HEADER + page_size)) == WAL_FRAME_HEADER + page_size:
                salts = frame[8:16]
                current = current or salts
                ours = salts == current
                yield int.from_bytes(frame[:4], "big"), frame[WAL_FRAME_HEADER:], transaction if ours else -1
                if ours and frame[4:8] != b"\0\0\0\0":  # a commit frame (the database size after it)
                    transaction += 1
    except OSError:
        pass


def wal_checksum(data: bytes, magic: int) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), words in the byte order `magic` says."""
    words = struct.unpack(f"{'>' if magic & 1 else '<'}{len(data) // 4}I", data)
    s0 = s1 = 0
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_header_valid(header: bytes) -> bool:
    """Whether a WAL header (its first 32 bytes) is intact: SQLite ignores the whole WAL otherwise."""
    if len(header) < WAL_HEADER:
        return False
    magic = int.from_bytes(header[:4], "big")
    return magic in WAL_MAGIC and wal_checksum(header[:24], magic) == struct.unpack(">2I", header[24:32])


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = 0
    for k in range(9):
        byte = buf[i + k]
        if k == 8:
            return (value << 8) | byte, i + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + k + 1
    raise AssertionError("unreachable")


def _leaf_cells(page: bytes, at: int) -> Iterator[tuple[int, list[int], bytes, int]]:
    """(rowid, serial types, payload, offset of the values in it) of each cell of a table-leaf page
    whose payload lies wholly on the page."""
    if page[at] != LEAF_TABLE:
        return
    ncells = int.from_bytes(page[at + 3:at + 5], "big")
    usable = len(page)
    for k in range(min(ncells, (usable - at - 8) // 2)):
        ptr = int.from_bytes(page[at + 8 + 2 * k:at + 10 + 2 * k], "big")
        try:
            size, i = _varint(page, ptr)
            rowid, i = _varint(page, i)
            if size > usable - 35 or i + size > usable:
                continue  # spills onto overflow pages (no buffer row is that long) or runs off the page
            payload = page[i:i + size]
            header_size, j = _varint(payload, 0)
            types = []
            while j < header_size:
                t = payload[j]
                if t < 0x80:  # nearly always: one byte
                    j += 1
                else:
                    t, j = _varint(payload, j)
                types.append(t)
        except IndexError:
            continue
        if j == header_size:
            yield rowid, types, payload, header_size


def _values(types: list[int], payload: bytes, pos: int) -> list | None:
    """The values of an SQLite record, None when they do not fill its body exactly."""
    values: list = []
    for t in types:
        if t in (0, 8, 9):
            values.append(None if t == 0 else t - 8)
        elif 1 <= t <= 6:
            n = (1, 2, 3, 4, 6, 8)[t - 1]
            values.append(int.from_bytes(payload[pos:pos + n], "big", signed=True))
            pos += n
        elif t == 7:
            values.append(struct.unpack(">d", payload[pos:pos + 8])[0])
            pos += 8
        elif t >= 13 and t % 2:
            n = (t - 13) // 2
            values.append(payload[pos:pos + n].decode("utf-8"))
            pos += n
        else:
            return None  # a blob or a reserved type: no buffer table holds one
    return values if pos == len(payload) else None


def _is_text(t: int) -> bool:
    return t >= 13 and t % 2 == 1


def _table_of(types: list[int]) -> str | None:
    """Which buffer table a record of these serial types can belong to (by shape alone)."""
    if len(types) == 7 and types[0] == 0:
        if types[1] in _INT:
            return STREAM_READINGS
        if _is_text(types[1]):
            return GAPS_TABLE
    elif len(types) == 2 and _is_text(types[0]) and _is_text(types[1]):
        return META_TABLE
    elif len(types) == 3:
        if types[0] == 0 and types[1] in _INT and _is_text(types[2]):
            return EVENTS
        if _is_text(types[0]) and types[1] in _INT and types[2] in _INT:
            return STREAMS_TABLE
    return None


def _row(table: str, rowid: int, v: list) -> tuple[str, tuple] | None:
    """(table, row), once the values are checked against what the table holds; None if they are not.
    An event's table is the stream its body belongs to."""
    if table == STREAM_READINGS:
        return (table, (rowid, *v[1:])) if _is_reading(v) else None
    if table == EVENTS:
        stream = _event_stream(rowid, v[2])
        return (stream, (rowid, v[1], v[2])) if stream else None
    if table == STREAMS_TABLE:
        return (table, tuple(v)) if v[0] in STREAMS else None
    if table == META_TABLE:
        return table, tuple(v)
    if (v[1] in STREAMS and all(isinstance(x, int) for x in (v[2], v[3], v[5])) and isinstance(v[4], str)
            and v[6] in (0, 1)):  # gaps
        return (table, (rowid, v[1], v[2], v[3], v[4], v[6]))
    return None


def _is_reading(v: list) -> bool:
    _, ts_ms, device, channel, value, unit, flag = v
    return (v[0] is None and isinstance(ts_ms, int) and TS_RANGE[0] <= ts_ms <= TS_RANGE[1]
            and isinstance(device, str) and DEVICE.fullmatch(device) is not None
            and isinstance(channel, str) and CHANNEL.fullmatch(channel) is not None
            and (value is None or isinstance(value, (int, float))) and (unit is None or isinstance(unit, str))
            and flag in FLAGS)


def _event_stream(rowid: int, text: str) -> str | None:
    """Which event stream a body belongs to: it carries its own seq, and an alarm's or a period's keys."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("seq") != rowid:
        return None
    if "period" in body:
        return STREAM_AGGREGATES
    if "rule" in body and "state" in body:
        return STREAM_ALARMS
    return None
