"""Which layout a buffer file has, read without writing to it: what lets an agent refuse a file a newer
agent wrote (a downgrade) instead of taking it for a corrupt one, moving it aside or writing rows it
no longer understands. Imports nothing from the project.

The rule, for every future change of the buffer file: `SCHEMA_VERSION` is raised when an agent that
knows only the older number could lose or damage data by writing the file (a column it would leave
empty, a table it would not keep in step with the rows, a value whose meaning changed). A change an
older agent can ignore safely (a new table or meta key it never touches) keeps the number. The
state kept in meta counts too: an older agent discards an `alarm_state` or `aggregate_state` whose `v`
it does not know (it would raise active alarms again and publish periods twice), so a new `v` there
raises SCHEMA_VERSION (`STATE_VERSIONS` below; tests/unit/test_buffer_schema.py holds them together). The
number is kept twice: in `meta.schema_version` and in the file header's `user_version` (4 bytes at
offset 60, readable even where this SQLite cannot parse the newer file's schema). An agent opens a
file whose number is at most its own (and brings an older one up to its own), and refuses one whose
number is higher, leaving it untouched.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from urllib.parse import quote

SCHEMA_VERSION = 1  # the buffer layout this agent writes and knows
STATE_VERSIONS = {"alarms": 1, "aggregates": 1}  # the meta state formats SCHEMA_VERSION 1 holds
HEADER = b"SQLite format 3\x00"
MAX_READ_FORMAT = 2  # header byte 18: 1 rollback journal, 2 WAL; higher: a SQLite file format this one lacks


class NewerBuffer(Exception):
    """The buffer file was written by a newer edge-agent (or a newer SQLite) than this one."""


def header_versions(path: Path) -> tuple[int, int] | None:
    """(read format version, user_version) from the file's 100-byte header; None when it is not a
    SQLite file header (empty, missing, damaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return None
    if len(head) < 100 or not head.startswith(HEADER):
        return None
    return head[18], struct.unpack(">I", head[60:64])[0]


def readonly_uri(path: Path, immutable: bool = False) -> str:
    """The URI SQLite opens `path` by read-only (`mode=ro`; `immutable=1`: a file no connection writes,
    read without locks, -wal or -shm). The path is percent-encoded: a `#`, `?` or `%` in a directory's
    name is part of the path, not the URI's fragment, query or an escape (`.../site#2/buffer.db` opened,
    and created, `.../site` read-write). An absolute path gets the URI's empty authority (`file:///...`):
    a path that starts with `//` (`${STATE_DIR}/buffer.db` with STATE_DIR=/) is not read as a host."""
    authority = "//" if path.is_absolute() else ""
    return f"file:{authority}{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")


def meta_schema_version(path: Path) -> int | None:
    """`meta.schema_version` as a read-only connection sees it (the WAL included); None when it
    cannot be read (no such table yet, a damaged file: the writer's own checks deal with those). With
    no WAL beside the file (a clean close) it is opened `immutable`: no -wal or -shm is made for it."""
    wal = path.with_name(path.name + "-wal").exists()
    try:
        conn = sqlite3.connect(readonly_uri(path, immutable=not wal), uri=True, timeout=10)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None
    except (sqlite3.Error, ValueError, TypeError):
        return None
    finally:
        conn.close()


def refuse_newer(path: Path) -> None:
    """Raise NewerBuffer when the existing file at `path` has a layout newer than SCHEMA_VERSION (or a
    SQLite file format newer than this SQLite reads). Writes nothing."""
    if not path.exists() or path.stat().st_size == 0:
        return
    header = header_versions(path)
    meta = meta_schema_version(path)
    # Both numbers are written in one transaction: a readable meta number is the file's, and a header that
    # disagrees with it is damaged (a flipped bit is not a downgrade; `Buffer._create_schema` puts it right).
    # The header alone counts only where meta cannot be read (a schema this SQLite cannot parse).
    found = meta if meta is not None else (header[1] if header else 0)
    if found > SCHEMA_VERSION:
        raise NewerBuffer(
            f"buffer {path} has schema version {found}, written by a newer edge-agent; this one knows "
            f"schema version {SCHEMA_VERSION} and will not write it (the file is left untouched). "
            "Install the newer edge-agent again, or point storage.path at another file")
    if header and header[0] > MAX_READ_FORMAT:
        raise NewerBuffer(
            f"buffer {path} uses SQLite file format {header[0]}, newer than this SQLite "
            f"({sqlite3.sqlite_version}) reads; the file is left untouched. Run the edge-agent (and "
            "SQLite) that wrote it")
