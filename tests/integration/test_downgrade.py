"""A downgrade: `edge-agent run` on a buffer a newer agent wrote refuses it (exit 3, one CRITICAL line
that says what to do), leaves every file as it was, and the station's readings are still all there
for the newer agent. Real agent processes, a real mosquitto, real SQLite files."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from harness import AgentProcess, Broker, db_last_seq, sim_config, wait_for, write_config

from agent.bufferschema import SCHEMA_VERSION


def files(directory: Path) -> dict[str, str]:
    """Every file's hash but the instance lock's and the -shm's (SQLite's shared-memory index of the WAL,
    which every reader, `edge-agent status` too, may rebuild: it holds no data)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith((".lock", "-shm"))}


def test_an_agent_refuses_a_buffer_written_by_a_newer_agent_and_leaves_it_untouched(tmp_path):
    broker = Broker(tmp_path / "broker")  # never started: the readings stay in the buffer
    data = tmp_path / "data"
    data.mkdir()
    path = data / "buffer.db"
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, storage={"path": str(path)}))
    agent = AgentProcess(cfg)
    wait_for(lambda: db_last_seq(path) >= 20, 20, "readings stored")
    assert agent.stop() == 0
    stored = db_last_seq(path)
    conn = sqlite3.connect(path, isolation_level=None)  # what a newer agent's migration would leave
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    before = files(data)

    older = AgentProcess(cfg)
    wait_for(lambda: not older.alive(), 20, "the agent to refuse the buffer and exit")
    assert older.stop() == 3, older.log()
    log = older.log()
    assert f"schema version {SCHEMA_VERSION + 1}, written by a newer edge-agent" in log
    assert "Install the newer edge-agent again" in log
    assert "Traceback" not in log and "corrupt" not in log
    assert files(data) == before, "the refused buffer, its WAL and its seq mark are left as they were"
    assert db_last_seq(path) == stored
