"""`edge-agent status` (text form) shows values as the instrument's display does: every digit; and
says why it could not read a buffer: a file this user may not read, or a damaged one."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from harness import as_another_user

from agent import status
from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms
from agent.status import format_value, unreadable_buffer

DAMAGED = "run moves a damaged file aside when it starts, or once its own reads or writes meet the damage"

AS_THE_AGENT = "run status as the agent's user: sudo -u edge-agent edge-agent status -c /etc/edge-agent/edge-agent.yaml"


@pytest.mark.parametrize(("value", "shown"), [
    (None, "null"),
    (-123456789.0, "-123456789"),
    (-1234.5625, "-1234.5625"),
    (-12345.6789, "-12345.6789"),
    (12.300000000000001, "12.3"),  # raw x 0.1: the double's noise beyond 15 digits is not shown
    (8987183256397123.0, "8987183256397123"),
    (0.0, "0"),
    (3e-7, "3e-07"),
    (float("nan"), "nan"),
])
def test_values_keep_their_digits(value, shown):
    assert format_value(value) == shown


def test_what_status_says_of_a_buffer_it_could_not_read_follows_what_this_user_may_do(tmp_path, monkeypatch):
    """Pure logic, os.access stubbed (root may do anything, so a real refusal cannot be made here):
    permission denied with the command to run as the agent's user when an access reading takes is
    missing; SQLite's error and the damaged-file hint otherwise."""
    path = tmp_path / "buffer.db"
    path.write_bytes(b"")
    (tmp_path / "buffer.db-wal").write_bytes(b"")  # left by an agent killed with -9, without its -shm
    opening = sqlite3.OperationalError("unable to open database file")
    denied = f"cannot read the buffer {path}: permission denied"
    cases = [  # (what os.access refuses, what status says)
        (lambda p, mode: Path(p) == path, (denied, AS_THE_AGENT)),  # the file (mode 600, another owner)
        (lambda p, mode: Path(p) == tmp_path and mode & os.X_OK, (denied, AS_THE_AGENT)),  # its directory
        (lambda p, mode: Path(p) == tmp_path and mode & os.W_OK, (denied, AS_THE_AGENT)),  # no -shm to create
        (lambda p, mode: False, (f"cannot read the buffer {path}: unable to open database file",
                                 DAMAGED)),
    ]
    for refused, said in cases:
        monkeypatch.setattr(status.os, "access", lambda p, mode, refused=refused, **_: not refused(p, mode))
        assert unreadable_buffer(path, opening, "/etc/edge-agent/edge-agent.yaml") == said
    (tmp_path / "buffer.db-wal").unlink()  # no -wal: read as immutable, no -shm made; the error is the file's
    monkeypatch.setattr(status.os, "access", lambda p, mode, **_: not (Path(p) == tmp_path and mode & os.W_OK))
    assert unreadable_buffer(path, opening, "station.yaml") == (
        f"cannot read the buffer {path}: unable to open database file", DAMAGED)
    (tmp_path / "buffer.db-shm").write_bytes(b"")  # an agent runs: the reader needs no directory write
    monkeypatch.setattr(status.os, "access", lambda p, mode, **_: not (Path(p) == tmp_path and mode & os.W_OK))
    damaged = sqlite3.DatabaseError("file is not a database")
    assert unreadable_buffer(path, damaged, "station.yaml") == (
        f"cannot read the buffer {path}: file is not a database", DAMAGED)
    locked = sqlite3.OperationalError("database is locked")  # held by another process for all of busy_timeout
    assert unreadable_buffer(path, locked, "station.yaml") == (
        f"cannot read the buffer {path}: database is locked",
        "another process holds it locked (a sqlite3 shell, a backup): try again once it is done"), \
        "a locked file is not a damaged one"


def test_a_buffer_in_a_directory_this_user_may_not_enter_is_permission_denied():
    top = Path(tempfile.mkdtemp(prefix="edge-agent-status-"))  # in /tmp: every user may reach it
    state = top / "state"
    try:
        top.chmod(0o755)
        state.mkdir()
        path = state / "buffer.db"
        sqlite3.connect(path).close()
        state.chmod(0)
        with as_another_user():
            with pytest.raises((sqlite3.Error, OSError)) as info:
                Buffer.open_reader(path)
            said = unreadable_buffer(path, info.value, "/etc/edge-agent/edge-agent.yaml")
        assert said == (f"cannot read the buffer {path}: permission denied", AS_THE_AGENT)
    finally:
        state.chmod(0o700)
        shutil.rmtree(top)


def test_a_buffer_in_a_directory_this_user_may_not_write_is_read():
    """A stopped agent's buffer (no -wal) where this user may not write (a read-only file system, the
    agent's state directory): the reader needs no -wal or -shm of its own. It was "unable to open
    database file", told as permission denied: run status as the agent's user (root too, read-only)."""
    top = Path(tempfile.mkdtemp(prefix="edge-agent-status-"))  # in /tmp: every user may reach it
    path = top / "buffer.db"
    try:
        top.chmod(0o755)
        writer = Buffer.open_writer(path)
        writer.begin()
        writer.insert_readings([Reading("cod", "w01018", now_ms(), 23.4, "mg/L", "N")])
        writer.commit()
        writer.close()
        path.chmod(0o644)
        with as_another_user():
            reader = Buffer.open_reader(path)
            try:
                assert reader.stream_state(STREAM_READINGS)[0] == 1
            finally:
                reader.close()
        assert sorted(p.name for p in top.iterdir()) == ["buffer.db", "buffer.db.seq"], "nothing made beside"
    finally:
        shutil.rmtree(top)


def test_a_first_start_that_makes_its_buffer_while_status_looks_still_gives_a_last_seq(tmp_path, monkeypatch, capsys):
    """At a first start the agent reserves its first seqs (the `.seq` file) as it creates its buffer. A
    `status` that found no buffer yet and read the `.seq` file a moment later found seqs reserved and said
    last_seq null: a script waiting for `last_seq >= N` failed on it (the acceptance test did, in a full run).
    The `.seq` file is read before the buffer: nothing was issued there before the buffer was looked at."""
    from agent import cli, instance
    from agent.seqmark import SeqMark

    buffer = tmp_path / "buffer.db"
    text = (Path(__file__).parent / "configs" / "spec-example.yaml").read_text()
    config = tmp_path / "station.yaml"
    config.write_text(text.replace("/var/lib/edge-agent/buffer.db", str(buffer)))
    lock = instance.hold(buffer)  # the agent runs: it holds the lock before its buffer is open
    real_collect = status.collect

    def agent_opens_its_buffer_meanwhile(*args, **kwargs):
        SeqMark(buffer.with_name("buffer.db.seq")).ensure_above({"readings": 0})
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(status, "collect", agent_opens_its_buffer_meanwhile)
    try:
        cli.main(["status", "-c", str(config), "--json"])
    finally:
        lock.close()
    out = json.loads(capsys.readouterr().out)
    assert out["backlog"] is None and out["last_seq"] == 0, out
