"""The WAL, outside `max_mb`, grows without bound while another process keeps a read transaction open
on the buffer (an `sqlite3` shell left at its prompt): the recorder says so, with what to do, while it
lasts, and says when it is over. Real files, a real second SQLite connection as the other process."""

from __future__ import annotations

import logging
import sqlite3

import pytest
from harness import wait_for

import agent.buffer
import agent.recorder
from agent.buffer import Buffer
from agent.model import Reading
from agent.recorder import Recorder


def store(recorder: Recorder, count: int, start: int) -> None:
    for first in range(start, start + count, 500):
        recorder.submit([Reading("cod", f"c{i % 40}", 1_700_000_000_000 + i, float(i), "mg/L")
                         for i in range(first, first + 500)])
    assert recorder.flush()


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    monkeypatch.setattr(agent.buffer, "WAL_HELD_BYTES", 256 << 10)  # 16 MiB in the field
    monkeypatch.setattr(agent.recorder, "SIZE_CHECK_EVERY_S", 0.05)
    buffer = Buffer.open_writer(tmp_path / "buffer.db")
    recorder = Recorder(buffer, commit_interval_ms=50, keep_sent_days=7, max_mb=10)
    recorder.start()
    yield recorder
    recorder.stop()
    recorder.buffer.close()


def test_a_reader_holding_the_wal_back_is_named_and_its_end_noticed(recorder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="agent.recorder")
    store(recorder, 2_000, 0)
    shell = sqlite3.connect(tmp_path / "buffer.db")
    shell.execute("BEGIN")
    assert shell.execute("SELECT count(*) FROM readings").fetchone()[0] == 2_000  # its snapshot, kept open
    store(recorder, 40_000, 2_000)
    wal = tmp_path / "buffer.db-wal"
    assert wal.stat().st_size > 1 << 20  # beyond what a checkpoint would leave (journal_size_limit)
    held = wait_for(lambda: [r.getMessage() for r in caplog.records if "cannot be checkpointed" in r.getMessage()],
                    10, "the warning about the WAL held back")
    assert "another process keeps a read transaction open" in held[0] and "close it" in held[0]
    assert not [r for r in caplog.records if "checkpointed again" in r.getMessage()]

    shell.rollback()
    shell.close()
    store(recorder, 2_000, 42_000)  # commits after the reader left: the checkpoint completes
    wait_for(lambda: [r for r in caplog.records if "checkpointed again" in r.getMessage()], 10,
             "the note that the WAL is checkpointed again")
    assert recorder.buffer.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 44_000


def test_only_a_wal_that_a_checkpoint_cannot_empty_counts_as_held_back(tmp_path, monkeypatch):
    monkeypatch.setattr(agent.buffer, "WAL_HELD_BYTES", 256 << 10)
    buf = Buffer.open_writer(tmp_path / "buffer.db")

    def write(count: int) -> None:
        for _batch in range(0, count, 500):
            buf.begin()
            buf.insert_readings([Reading("cod", f"c{i % 40}", 1_700_000_000_000 + i, float(i)) for i in range(500)])
            buf.commit()

    write(20_000)  # a WAL beyond the threshold, of its own making: the autocheckpoint empties it
    assert (tmp_path / "buffer.db-wal").stat().st_size > 256 << 10
    assert buf.wal_held_back() == 0
    shell = sqlite3.connect(tmp_path / "buffer.db")
    shell.execute("BEGIN")
    shell.execute("SELECT count(*) FROM readings").fetchone()
    write(40_000)
    assert buf.wal_held_back() == (tmp_path / "buffer.db-wal").stat().st_size > 1 << 20
    shell.rollback()
    write(500)
    assert buf.wal_held_back() == 0
    shell.close()
    buf.close()
