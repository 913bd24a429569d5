"""The alarm state kept beside the buffer (`buffer.db.alarm_state`, what a fresh buffer file starts from
should the file be lost): deleted while the agent runs, it is written again and the agent goes on;
truncated or corrupt at a start, the agent says so and starts with fresh state, or, when the buffer
file holds the state, writes the copy again from it. Real agent processes, a real mosquitto, real
SQLite files."""

from __future__ import annotations

import json
import re
import signal

import pytest
from harness import AgentProcess, Broker, Collector, db_last_seq, wait_for, write_config
from harness import cod_alarm_station as station

ALARM_ID = "cod.w01018:above"


def run_until_raised_and_kept(cfg, collector: Collector, kept) -> None:
    """Run the agent until the alarm is raised and its state kept beside the buffer, then stop it (exit 0)."""
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised"] and kept_active(kept) == [ALARM_ID], 20,
                 "the alarm raised and its state kept beside the buffer")
    finally:
        assert agent.stop() == 0


def states(collector: Collector) -> list[str]:
    by_seq = {m["alarm"]["seq"]: m["alarm"]["state"] for m in collector.json_messages("/alarm")}
    return [by_seq[s] for s in sorted(by_seq)]


def kept_active(path) -> list[str] | None:
    """The ids of the active alarms in the state kept beside the buffer (None: no readable file)."""
    try:
        return [a["id"] for a in json.loads(path.read_text())["active"]]
    except (OSError, ValueError):
        return None


def test_a_station_without_alarms_keeps_its_state_beside_the_buffer_without_a_warning(tmp_path, broker):
    """A station that never raised an alarm saves its state in the buffer at a stop (and with its windows);
    the copy beside it, never written yet, was then found "missing" (or "deleted while the agent runs")
    in a WARNING line at the next start, on every gateway: a false alarm for the operator. It is written
    from the buffer without one."""
    kept = tmp_path / "buffer.db.alarm_state"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=10))
    db = tmp_path / "buffer.db"
    for _ in range(2):  # a first start, then the next
        agent = AgentProcess(cfg)
        try:
            stored = db_last_seq(db)
            wait_for(lambda stored=stored: db_last_seq(db) > stored + 20, 20, "readings")
        finally:
            assert agent.stop() == 0
        assert "written again from the buffer" not in agent.log(), agent.log()
        assert " WARNING " not in agent.log().replace("system clock not synchronised", ""), agent.log()
    assert kept_active(kept) == [], "the state is kept beside the buffer all the same"


def test_the_state_deleted_while_running_is_written_again_and_the_agent_goes_on(tmp_path, broker, collector):
    db = tmp_path / "buffer.db"
    kept = tmp_path / "buffer.db.alarm_state"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised"] and kept_active(kept) == [ALARM_ID], 20,
                 "the alarm raised and its state kept beside the buffer")
        kept.unlink()  # no alarm event follows: written again all the same (rm buffer.db* takes it too)
        wait_for(lambda: kept_active(kept) == [ALARM_ID], 20, "the state written again")
        # (at the agent's first check of the copy, which compares it with the buffer, it is found missing)
        said = re.compile(rf"{re.escape(str(kept))} was (deleted while the agent runs|missing): written again from "
                          "the buffer")
        wait_for(lambda: said.search(agent.log()), 10, "the agent saying it wrote the state again")
        kept.unlink()
        write_config(cfg, station(tmp_path, broker, cod_mean=10))
        agent.signal(signal.SIGHUP)  # the value drops: the clear is the next write
        wait_for(lambda: states(collector) == ["raised", "cleared"], 30, "the alarm cleared on P/alarm")
        wait_for(lambda: kept_active(kept) == [], 20, "the cleared state kept beside the buffer")
        stored = db_last_seq(db)
        wait_for(lambda: db_last_seq(db) > stored + 10, 20, "the agent goes on recording")
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_state_at_start_with_the_buffer_lost_starts_fresh_and_says_so(tmp_path, damage):
    """The buffer file lost (deleted) and the copy beside it damaged: nothing says which alarms were
    active, so the agent starts with none (an alarm still active is raised again) and says why."""
    broker = Broker(tmp_path / "broker").start()
    collector = Collector(broker, "env/#")
    db = tmp_path / "buffer.db"
    kept = tmp_path / "buffer.db.alarm_state"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
    run_until_raised_and_kept(cfg, collector, kept)
    for lost in (db, db.with_name("buffer.db-wal"), db.with_name("buffer.db-shm")):
        lost.unlink(missing_ok=True)
    text = kept.read_bytes()
    kept.write_bytes({"truncated": text[: len(text) // 2], "empty": b"", "garbage": b"\xff\x00" * 40}[damage])
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised", "raised"], 20, "the alarm raised by the fresh state")
        log = agent.log()
        assert f"alarm state taken from {kept}" in log, log[-3000:]
        assert "starting with no active alarms" in log, log[-3000:]
        wait_for(lambda: kept_active(kept) == [ALARM_ID], 20, "a sound state kept beside the buffer again")
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()


def test_a_damaged_state_at_start_beside_a_sound_buffer_is_written_again_from_it(tmp_path, broker, collector):
    """The buffer file holds the state: the alarm stays active (not raised again), and the damaged copy
    is replaced at once, not at the next alarm event (a buffer lost before it had no state to start from)."""
    kept = tmp_path / "buffer.db.alarm_state"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
    run_until_raised_and_kept(cfg, collector, kept)
    kept.write_bytes(kept.read_bytes()[:20])
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: kept_active(kept) == [ALARM_ID], 20, "the copy written again from the buffer")
        wait_for(lambda: f"{kept} was damaged (not a JSON object: truncated or corrupt): written again from the "
                 "buffer" in agent.log(), 10, "the agent saying it wrote the state again")
        stored = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") > stored + 10, 20, "readings after the start")
        assert states(collector) == ["raised"], "raised once"
        assert agent.alive() and "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
