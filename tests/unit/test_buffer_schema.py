"""The buffer's layout version (agent.bufferschema) on real files: a file a newer agent wrote is refused,
untouched, instead of being taken for corruption and moved aside; older files are brought up to date."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from agent import aggregate, alarms
from agent.buffer import Buffer
from agent.bufferschema import SCHEMA_VERSION, STATE_VERSIONS, NewerBuffer, header_versions
from agent.model import Reading, now_ms


def make_buffer(path: Path, n: int = 5) -> None:
    buf = Buffer.open_writer(path)
    buf.begin()
    buf.insert_readings([Reading("d", "c", now_ms() + i, float(i), "mg/L", "N") for i in range(n)])
    buf.commit()
    buf.close()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of the directory with a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def as_newer_agent(path: Path, version: int, *, unparseable: bool = False) -> None:
    """What a newer agent might leave: a higher schema version (meta and header) and, with `unparseable`,
    a schema this SQLite cannot read (a table definition in a syntax it does not know)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    conn.execute(f"PRAGMA user_version={version}")
    if unparseable:
        conn.execute("CREATE TABLE future(x)")
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql='CREATE TABLE future(x) WITH SOMETHING NEW' WHERE name='future'")
        conn.execute("PRAGMA writable_schema=OFF")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_a_fresh_buffer_keeps_its_schema_version_in_meta_and_header(tmp_path):
    make_buffer(tmp_path / "buffer.db")
    assert header_versions(tmp_path / "buffer.db") == (2, SCHEMA_VERSION)
    conn = sqlite3.connect(tmp_path / "buffer.db")
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_a_buffer_from_before_the_header_version_gets_it_at_open(tmp_path):
    path = tmp_path / "buffer.db"
    make_buffer(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA user_version=0")  # as every agent before this one left it
    conn.close()
    Buffer.open_writer(path).close()
    assert header_versions(path) == (2, SCHEMA_VERSION)


@pytest.mark.parametrize("unparseable", [False, True], ids=["readable", "schema-this-sqlite-cannot-parse"])
def test_a_buffer_written_by_a_newer_agent_is_refused_and_left_untouched(tmp_path, unparseable):
    path = tmp_path / "buffer.db"
    make_buffer(path)
    as_newer_agent(path, SCHEMA_VERSION + 1, unparseable=unparseable)
    before = snapshot(tmp_path)
    with pytest.raises(NewerBuffer, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer edge-agent"):
        Buffer.open_writer(path, max_mb=1)
    assert snapshot(tmp_path) == before  # not moved aside as corrupt, no row, mark or WAL written


def test_a_buffer_in_a_newer_sqlite_file_format_is_refused_not_moved_aside(tmp_path):
    path = tmp_path / "buffer.db"
    make_buffer(path)
    data = bytearray(path.read_bytes())
    data[18] = data[19] = 3  # a file format this SQLite does not know: it says "file is not a database"
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.raises(NewerBuffer, match="SQLite file format 3"):
        Buffer.open_writer(path)
    assert snapshot(tmp_path) == before


def test_a_new_state_format_in_meta_comes_with_a_new_schema_version():
    """An agent discards an alarm or aggregate state whose `v` it does not know (raising active alarms
    again, publishing periods twice): a downgrade must be refused before that, so a new state format
    raises SCHEMA_VERSION too (agent/bufferschema.py); update STATE_VERSIONS with both."""
    assert {"alarms": alarms.STATE_VERSION, "aggregates": aggregate.STATE_VERSION} == STATE_VERSIONS, \
        "a state format changed: raise bufferschema.SCHEMA_VERSION (older agents must refuse the file)"


def test_a_damaged_header_version_beside_a_readable_older_one_in_meta_is_not_a_downgrade(tmp_path):
    """A newer agent writes both numbers in one transaction; a user_version that disagrees with a readable
    meta.schema_version is damage (a bit flipped on the card, bytes 60..63), not a newer agent. Taken for
    one, the start ended with exit 3, which systemd does not restart: the station stopped for good over a
    sound file. The file is used (meta's number counts) and its header put right."""
    path = tmp_path / "buffer.db"
    make_buffer(path)
    data = bytearray(path.read_bytes())
    data[60] ^= 0x80  # user_version 1 -> 0x80000001
    path.write_bytes(bytes(data))
    buf = Buffer.open_writer(path)
    try:
        assert buf.last_seq() == 5, "the same file, every row"
    finally:
        buf.close()
    assert header_versions(path) == (2, SCHEMA_VERSION)
