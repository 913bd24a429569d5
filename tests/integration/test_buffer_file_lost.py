"""The buffer file deleted, renamed or replaced while the agent runs (storage audit X, H1 and H2): the agent
keeps running, says so in an ERROR line, puts its own file back at the path with every row and seq (the
process still holds it open), never publishes another file found there, and keeps that file beside.
Real agent processes, a real mosquitto restarted on its port, real SQLite files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from harness import (
    AgentProcess,
    Broker,
    Collector,
    db_last_seq,
    fill_disk,
    run_cli,
    sim_config,
    start_station,
    wait_for,
    write_config,
)

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms


def contiguous_from_one(seqs: list[int]) -> bool:
    return bool(seqs) and set(seqs) == set(range(1, max(seqs) + 1))


def goes_on_in_the_file_put_back(agent: AgentProcess, path: Path) -> None:
    """The recorder puts its own file back at the path, and recording goes on in it."""
    wait_for(lambda: "put back" in agent.log(), 20, "the recorder puts its own file back at the path")
    put_back = db_last_seq(path)
    wait_for(lambda: db_last_seq(path) > put_back + 15, 20, "recording goes on in the file put back")


def restart_continues(cfg: Path, path: Path, platform: Collector) -> None:
    """A clean restart after the stop: the numbering goes on right after the last seq, no gap announced."""
    issued = db_last_seq(path)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: max(platform.reading_seqs()) > issued + 10, 30, "readings of the restarted agent")
    finally:
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()
    assert min(s for s in platform.reading_seqs() if s > issued) == issued + 1, "numbering continues"


@pytest.mark.parametrize("how", ["rm", "mv"])
def test_a_buffer_deleted_or_renamed_during_a_broker_outage_loses_nothing(tmp_path, how):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    path, cfg, agent = start_station(tmp_path, broker)
    data = path.parent
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the outage")
        broker.stop()
        delivered = max(platform.reading_seqs())
        wait_for(lambda: db_last_seq(path) > delivered + 30, 20, "a backlog while the broker is away")
        if how == "rm":
            for suffix in ("", "-wal", "-shm"):
                data.joinpath("buffer.db" + suffix).unlink(missing_ok=True)
        else:
            os.rename(path, data / "buffer.db.bak")
        goes_on_in_the_file_put_back(agent, path)
        assert "buffer " + str(path) + " was deleted or renamed while the agent runs" in agent.log()
        broker.start()
        last = db_last_seq(path)
        wait_for(lambda: platform.has_readings_upto(last), 30, f"every seq 1..{last} delivered")
        assert agent.alive(), "the agent keeps running"
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
    if how == "mv":
        assert (data / "buffer.db.bak").exists(), "the renamed file is left where it was put"
        assert db_last_seq(data / "buffer.db.bak") >= delivered + 30
    assert not list(data.glob("buffer.db.foreign-*")), "nothing stood at the path: nothing moved aside"
    restart_continues(cfg, path, platform)
    platform.close()
    broker.stop()
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "no gap announced"
    assert contiguous_from_one(platform.reading_seqs())


@pytest.mark.parametrize("sides", [("-wal",), ("-wal", "-shm")])
def test_a_wal_deleted_while_running_is_made_again_so_a_crash_after_it_loses_nothing(tmp_path, sides):
    """`rm buffer.db-wal` (a technician taking it for a temporary file): the writer goes on committing into
    the WAL it holds open, which no longer has a name. Nothing of what it held since the last checkpoint
    (the whole buffer of a young file) reached the database file, other readers (`status`) met a disk I/O
    error, and a kill -9 or a power cut lost all of it (announced at the next start as buffer_missing).
    The recorder notices it as it notices the file deleted, and writes its database back at the path."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    path, cfg, agent = start_station(tmp_path, broker)
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the outage")
        broker.stop()
        delivered = max(platform.reading_seqs())
        wait_for(lambda: db_last_seq(path) > delivered + 30, 20, "a backlog while the broker is away")
        for suffix in sides:
            path.with_name(path.name + suffix).unlink()
        goes_on_in_the_file_put_back(agent, path)
        assert f"buffer {path}: its -wal was deleted while the agent runs" in agent.log(), agent.log()[-3000:]
        status = run_cli("status", "-c", str(cfg))
        assert status.returncode == 0 and "cannot read" not in status.stdout, status.stdout
        last = db_last_seq(path)
        agent.kill9()  # a crash or power cut after it: the rows committed before it are in the file at the path
        agent = AgentProcess(cfg)
        broker.start()
        wait_for(lambda: platform.has_readings_upto(last), 30, f"every seq 1..{last} delivered")
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    gaps = [m["gap"] for m in platform.json_messages("/data") if "gap" in m]
    assert not [g for g in gaps if g[0] <= last], f"gaps announced over seqs that were stored: {gaps}"
    assert not list(path.parent.glob("buffer.db.foreign-*")), "the agent's own file is not another's"


def test_rm_buffer_db_star_leaves_the_lock_and_the_seq_mark_in_place_too(tmp_path, broker):
    """`rm buffer.db*`, as a technician cleaning up types it, takes the lock file and the seq mark with
    the database. The file was put back, but not those: `status` said the agent was NOT running, a
    second `run` started on the same buffer (two writers: `UNIQUE constraint failed: readings.seq`, the
    two kicking each other off the broker), and the high-water mark that keeps seqs from being issued
    again after a corrupt file was gone. Both are made again, as the file is."""
    path, cfg, agent = start_station(tmp_path, broker)
    mark = path.with_name("buffer.db.seq")
    try:
        wait_for(lambda: mark.exists() and db_last_seq(path) > 10, 20, "readings stored")
        for p in list(path.parent.glob("buffer.db*")):
            p.unlink()
        goes_on_in_the_file_put_back(agent, path)
        wait_for(lambda: mark.exists(), 20, "the seq mark written again")
        assert json.loads(mark.read_text())["readings"] > db_last_seq(path), mark.read_text()
        wait_for(lambda: "agent    running" in run_cli("status", "-c", str(cfg)).stdout, 20,
                 "status sees the agent running again")
        second = run_cli("run", "-c", str(cfg), timeout=30)
        assert second.returncode == 1 and f"pid {agent.proc.pid}" in second.stderr, second.stderr[-2000:]
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0


def test_another_stations_buffer_put_in_place_is_never_published_and_is_kept(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    # Another station's buffer, with more readings than this station will have published by the swap.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = sim_config(other_dir, broker, station_id="OTHER0001", channels=10, interval=0.1)
    other["devices"] = {"other0": other["devices"]["sim0"]}
    other["mqtt"]["url"] = "mqtt://127.0.0.1:1"  # it publishes nothing
    other_agent = AgentProcess(write_config(other_dir / "station.yaml", other))
    try:
        wait_for(lambda: db_last_seq(other_dir / "buffer.db") >= 400, 30, "the other station's readings")
    finally:
        assert other_agent.stop() == 0
    other_last = db_last_seq(other_dir / "buffer.db")

    path, cfg, agent = start_station(tmp_path, broker)
    data = path.parent
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the swap")
        for suffix in ("-wal", "-shm"):  # a restored backup, a file copied from another gateway
            data.joinpath("buffer.db" + suffix).unlink(missing_ok=True)
        shutil.copy(other_dir / "buffer.db", data / "buffer.db.tmp")
        os.rename(data / "buffer.db.tmp", path)
        goes_on_in_the_file_put_back(agent, path)
        assert "was replaced by another file while the agent runs" in agent.log()
        last = db_last_seq(path)
        wait_for(lambda: platform.has_readings_upto(last), 30, f"every seq 1..{last} delivered")
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
    devices = {r["device"] for m in platform.json_messages("/data") for r in m.get("readings", [])}
    assert devices == {"sim0"}, "none of the other station's readings is published as this station's"
    kept = [p for p in data.glob("buffer.db.foreign-*") if not p.name.endswith((".txt", "-wal", "-shm"))]
    assert len(kept) == 1, "the other file is kept beside, under a name that says what it is"
    assert db_last_seq(kept[0]) == other_last
    restart_continues(cfg, path, platform)
    platform.close()
    broker.stop()
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "no gap announced"
    assert contiguous_from_one(platform.reading_seqs())


def test_no_room_to_put_a_deleted_buffer_back_keeps_the_agent_running_until_there_is(tmp_path, small_disk):
    """The copy does not fit on the disk: logged, the agent (its publisher too) keeps running on the file
    it holds open, and puts it back once space is freed; nothing is lost."""
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    path = small_disk / "buffer.db"
    config = sim_config(tmp_path, broker, channels=3, interval=0.2,
                        storage={"path": str(path), "commit_interval_ms": 100})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the deletion")
        for suffix in ("", "-wal", "-shm"):
            small_disk.joinpath("buffer.db" + suffix).unlink(missing_ok=True)
        filler = fill_disk(small_disk, leave_bytes=16 * 1024)  # other files took the space
        wait_for(lambda: "cannot put the buffer file back" in agent.log(), 20, "a clear line about the copy")
        held = len(platform.reading_seqs())
        wait_for(lambda: len(platform.reading_seqs()) > held or "refused" in agent.log(), 20,
                 "publishing from the open file, or its writes refused too")
        assert agent.alive() and "Traceback" not in agent.log(), "the publisher waits, it does not die"
        filler.unlink()  # the operator frees space
        goes_on_in_the_file_put_back(agent, path)  # once there is room
        last = db_last_seq(path)
        wait_for(lambda: platform.has_readings_upto(last), 30, f"every seq 1..{last} delivered")
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "no gap announced"
    assert contiguous_from_one(platform.reading_seqs())


def test_a_sighup_that_changes_the_uplinks_while_the_file_is_away_does_not_end_the_agent(tmp_path, broker):
    """A reload that restarts the HJ 212 uplinks opens the buffer for each new one. While the file was
    away from its path (deleted or renamed, not put back yet: up to 5 s) that opening raised out of the
    reload and ended the main thread with a traceback: no orderly stop, and the file the agent held
    was never put back, its unpublished readings stranded. The agent goes on and the uplinks start
    once the file is back at its path."""
    import signal
    import socket

    path, cfg, agent = start_station(tmp_path, broker)
    platform = socket.create_server(("127.0.0.1", 0))
    platform.settimeout(30)
    try:
        wait_for(lambda: db_last_seq(path) > 10, 20, "readings stored")
        config = sim_config(tmp_path, broker, channels=3, interval=0.2, station_id="14010500000017",
                            storage={"path": str(path), "commit_interval_ms": 100})
        config["hj212"] = {"st": 32, "pw": "s3cr3T",
                           "uplinks": [{"host": "127.0.0.1", "port": platform.getsockname()[1]}]}
        os.rename(path, path.with_name("renamed.db"))
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        conn, _ = platform.accept()  # the new uplink connects, once the file is back at its path
        conn.close()
        assert agent.alive(), agent.log()[-3000:]
        wait_for(lambda: "put back" in agent.log(), 10, "the file put back")
        assert agent.stop() == 0
        assert "Traceback" not in agent.log()
    finally:
        platform.close()
        agent.stop()


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_status_of_a_stopped_station_whose_buffer_is_gone_says_so_not_a_first_start(tmp_path, how):
    """The buffer file deleted (or left empty, a card that lost it) while the agent is stopped, its seq
    mark still beside: seqs were issued here and the unsent readings went with the file. `status` said
    `no buffer database at … yet (the agent has not run with this config)`, `backlog 0`, `last seq 0`,
    as before a first start; it says the file is missing, what was issued and acknowledged, and the
    figures it cannot know are unknown (null), as for a file it cannot read."""
    path = tmp_path / "buffer.db"
    buf = Buffer.open_writer(path)
    buf.begin()
    buf.insert_readings([Reading("sim0", "c00", now_ms() - 100_000 + i, float(i), "mg/L") for i in range(50)])
    buf.set_sent_upto(STREAM_READINGS, 20)
    buf.commit()
    buf.close()
    path.unlink()
    if how == "emptied":
        path.write_bytes(b"")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, Broker(tmp_path / "unused")))
    text = run_cli("status", "-c", str(cfg))
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stderr
    assert "yet" not in text.stdout and "backlog  0" not in text.stdout, text.stdout
    assert f"the buffer {path} is missing" in text.stdout and "seq 20" in text.stdout, text.stdout
    doc = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    assert doc["backlog"] is None and doc["last_seq"] is None, doc
    assert doc["buffer_error"].startswith(f"the buffer {path} is missing"), doc
