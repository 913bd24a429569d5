"""`storage.keep_sent_days` on a gateway that restarts often: the age purge ran its first pass only 10
minutes after a start, so an agent restarted more often than that (a crash loop, a flaky power supply)
never purged by age, and only the size cap bounded the file. A real agent process on a real SQLite file
prepared by the test."""

from __future__ import annotations

import sqlite3
from contextlib import closing

from harness import AgentProcess, sim_config, wait_for, write_config

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms

DAY_MS = 86_400_000


def test_published_readings_older_than_keep_sent_days_go_soon_after_a_start(tmp_path, broker):
    db = tmp_path / "buffer.db"
    buf = Buffer.open_writer(db)
    eight_days_ago = now_ms() - 8 * DAY_MS
    buf.begin()
    buf.insert_readings([Reading("sim0", f"c{i % 3:02d}", eight_days_ago + i, 1.0, "mg/L", "N") for i in range(300)])
    buf.set_sent_upto(STREAM_READINGS, 300)  # published (and acknowledged) then
    buf.purge_sent(7, eight_days_ago)  # the pass of that day noted them as stored then (it deletes nothing)
    buf.commit()
    buf.close()
    config = sim_config(tmp_path, broker, channels=3, interval=0.5, storage={"keep_sent_days": 7})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))

    def oldest_seq() -> int:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT min(seq) FROM readings").fetchone()[0] or 0

    try:
        wait_for(lambda: oldest_seq() > 300, 45, "the readings published 8 days ago purged")
    finally:
        assert agent.stop() == 0
    assert "purged 300 published rows stored more than 7 days ago" in agent.log(), agent.log()
