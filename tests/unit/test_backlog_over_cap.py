"""A backlog held in memory (readings the buffer refused while the cap was full of rows it could not evict
yet) that is larger than `storage.max_mb` can hold, on a real SQLite file and the real recorder thread:
SPEC §3 drops the oldest unpublished readings and records their seqs as a gap; the readings taken since
are stored."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from harness import wait_for

from agent.buffer import Buffer
from agent.model import Reading, now_ms
from agent.recorder import Recorder

MAX_MB = 0.1


def polls(n: int, device: str) -> list[Reading]:
    """`n` polls of 40 channels of `device`, one time each."""
    t = now_ms()
    return [Reading(device, f"c{c:02d}", t + p, float(c), "mg/L", "N") for p in range(n) for c in range(40)]


def stored(path: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def test_a_backlog_in_memory_larger_than_the_cap_is_stored_with_its_oldest_readings_announced_as_a_gap(tmp_path):
    path = tmp_path / "buffer.db"
    recorder = Recorder(Buffer.open_writer(path, max_mb=MAX_MB), commit_interval_ms=50, keep_sent_days=7,
                        max_mb=MAX_MB)
    recorder.submit(polls(500, "backlog"))  # 20 000 readings, ~2 MB of rows: twenty times what the cap holds
    recorder.submit(polls(1, "late"))
    transactions: list[list[Reading]] = []
    recorder.add_stored_listener(transactions.append)
    recorder.start()
    try:
        wait_for(lambda: stored(path, "SELECT 1 FROM readings WHERE device='late'"), 30,
                 "the readings taken after the backlog stored")
        recorder.submit(polls(1, "later"))
        wait_for(lambda: stored(path, "SELECT 1 FROM readings WHERE device='later'"), 30,
                 "the next readings stored as they come")
    finally:
        recorder.stop()
    rows = stored(path, "SELECT seq FROM readings ORDER BY seq")
    gaps = stored(path, "SELECT first_seq, last_seq FROM gaps WHERE reason='buffer_full' ORDER BY first_seq")
    dropped = {seq for first, last in gaps for seq in range(first, last + 1)}
    kept = {seq for (seq,) in rows}
    # every reading got its seq: kept in the file, or dropped (the oldest) and recorded as a gap
    assert kept | dropped == set(range(1, 20_081)) and not kept & dropped, (gaps, min(kept), max(kept))
    assert max(dropped) < min(kept), "the oldest readings are the ones dropped"
    # and each poll went in whole, in one transaction (readers group a poll's rows: one HJ 212 packet each)
    polls_per_transaction = [{(r.device, r.ts_ms) for r in batch} for batch in transactions]
    assert sum(map(len, polls_per_transaction)) == len(set().union(*polls_per_transaction)) == 502
