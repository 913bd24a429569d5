"""Local alarms end to end: a simulated analyzer -> agent process -> SQLite -> real mosquitto.

The agent runs as a real process (`edge-agent run`) against a mosquitto the test starts; what is
checked is what the platform and a technician see: the alarm events on `P/alarm` (SPEC §4), the
active alarms in `edge-agent status --json`, and "raised once, cleared once" across restarts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time

import pytest
from harness import (
    AgentProcess,
    Broker,
    Collector,
    build_preload_shim,
    db_last_seq,
    run_cli,
    sim_config,
    wait_for,
    write_config,
)
from harness import cod_alarm_station as station
from instruments import ModbusTcpServer, Unit

ALARM_ID = "cod.w01018:above"
ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def alarm_events(collector: Collector) -> list[dict]:
    """Alarm messages received, one per seq (delivery is at-least-once), in seq order."""
    by_seq = {m["alarm"]["seq"]: m for m in collector.json_messages("/alarm")}
    return [by_seq[s] for s in sorted(by_seq)]


def states(collector: Collector) -> list[str]:
    return [m["alarm"]["state"] for m in alarm_events(collector)]


def stored_alarms(db) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM alarms").fetchone()[0]


def stored_readings(db) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM readings").fetchone()[0]


def status_alarms(cfg) -> list[dict]:
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["alarms"]


def raise_the_alarm(tmp_path, broker, collector, *, crash: bool = False):
    """Run the COD station (value 60, limit 50) until the alarm is raised on P/alarm, then stop the
    agent (SIGTERM, or kill -9 with `crash`); returns the config file."""
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised"], 20, "the alarm raised on P/alarm")
    finally:
        if crash:
            agent.kill9()
        else:
            assert agent.stop() == 0
    return cfg


def test_alarm_is_raised_once_across_a_restart_and_cleared_once(tmp_path, broker, collector):
    db = tmp_path / "buffer.db"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised"], 20, "the alarm raised on P/alarm")
        raised = alarm_events(collector)[0]
        assert raised == {"v": 1, "station": "TEST0001",
                          "alarm": {"seq": 1, "id": ALARM_ID, "channel": "cod.w01018", "rule": "above",
                                    "state": "raised", "value": 60, "threshold": 50,
                                    "ts": raised["alarm"]["ts"]}}
        assert list(raised["alarm"]) == ["seq", "id", "channel", "rule", "state", "value", "threshold", "ts"]
        assert ISO_MS_Z.fullmatch(raised["alarm"]["ts"])
        active = wait_for(lambda: status_alarms(cfg), 10, "status lists the alarm")
        assert [{k: a[k] for k in ("id", "channel", "rule", "since", "value")} for a in active] == [
            {"id": ALARM_ID, "channel": "cod.w01018", "rule": "above", "since": raised["alarm"]["ts"], "value": 60}]
    finally:
        assert agent.stop() == 0

    # Restart with the value still high: the alarm stays active, and is not raised again.
    before = stored_readings(db)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: stored_readings(db) >= before + 25, 20, "readings after the restart")
        wait_for(lambda: max(collector.reading_seqs() or [0]) >= before + 20, 20, "readings published")
        assert stored_alarms(db) == 1, "no second event after the restart"
        assert states(collector) == ["raised"]
        assert [a["id"] for a in status_alarms(cfg)] == [ALARM_ID]

        # The value drops (config rewritten, SIGHUP): cleared once.
        write_config(cfg, station(tmp_path, broker, cod_mean=10))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: states(collector) == ["raised", "cleared"], 30, "the alarm cleared on P/alarm")
        cleared = alarm_events(collector)[1]["alarm"]
        assert {k: cleared[k] for k in ("seq", "id", "channel", "rule", "state", "value", "threshold")} == {
            "seq": 2, "id": ALARM_ID, "channel": "cod.w01018", "rule": "above", "state": "cleared",
            "value": 10, "threshold": 50}
        assert wait_for(lambda: status_alarms(cfg) == [], 10, "status lists no active alarm")
        settled = stored_readings(db)
        wait_for(lambda: stored_readings(db) >= settled + 20, 20, "more readings")
        assert stored_alarms(db) == 2 and states(collector) == ["raised", "cleared"]
    finally:
        assert agent.stop() == 0


def test_an_alarm_that_ended_while_the_agent_was_down_is_cleared_at_start(tmp_path, broker, collector):
    db = tmp_path / "buffer.db"
    cfg = raise_the_alarm(tmp_path, broker, collector)
    write_config(cfg, station(tmp_path, broker, cod_mean=10))  # fixed while the gateway was off
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: states(collector) == ["raised", "cleared"], 20, "the alarm cleared after the restart")
        before = stored_readings(db)
        wait_for(lambda: stored_readings(db) >= before + 20, 20, "more readings")
        assert stored_alarms(db) == 2 and states(collector) == ["raised", "cleared"]
        assert status_alarms(cfg) == []
    finally:
        assert agent.stop() == 0


@pytest.mark.parametrize("how", ["deleted", "overwritten"])
def test_an_alarm_active_when_the_buffer_file_is_lost_is_not_raised_again(tmp_path, broker, collector, how):
    """The gateway crashes with the alarm active and its buffer file is then lost (deleted, or
    overwritten with random bytes: corrupt beyond salvage): the fresh file starts from the alarm state
    kept beside it, so the platform sees the alarm raised once and, when the value drops, cleared once
    (SPEC §4)."""
    db = tmp_path / "buffer.db"
    cfg = raise_the_alarm(tmp_path, broker, collector, crash=True)
    for lost in (db, db.with_name("buffer.db-wal"), db.with_name("buffer.db-shm")):
        if how == "deleted":
            lost.unlink(missing_ok=True)
        elif lost.exists():
            lost.write_bytes(os.urandom(lost.stat().st_size or 4096))

    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(db) > 0, 20, "a fresh buffer file")
        before = stored_readings(db)
        wait_for(lambda: stored_readings(db) >= before + 25, 20, "readings in the fresh file")
        wait_for(lambda: max(collector.reading_seqs() or [0]) >= before + 20, 20, "readings published")
        assert states(collector) == ["raised"], "the alarm was raised a second time by the fresh file"
        assert [a["id"] for a in status_alarms(cfg)] == [ALARM_ID]
        assert "alarm state taken from" in agent.log()

        write_config(cfg, station(tmp_path, broker, cod_mean=10))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: states(collector) == ["raised", "cleared"], 30, "the alarm cleared on P/alarm")
        cleared = alarm_events(collector)[1]["alarm"]
        assert (cleared["id"], cleared["value"], cleared["threshold"]) == (ALARM_ID, 10, 50)
        assert cleared["seq"] > alarm_events(collector)[0]["alarm"]["seq"]
        assert wait_for(lambda: status_alarms(cfg) == [], 10, "status lists no active alarm")
    finally:
        assert agent.stop() == 0


SLOWSYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int (*real_fsync)(int);

__attribute__((constructor)) static void init(void) { real_fsync = dlsym(RTLD_NEXT, "fsync"); }

/* A slow card: fsync of a file whose path ends with $SLOWSYNC_SUFFIX waits while $SLOWSYNC_TRIGGER exists. */
int fsync(int fd) {
    const char *suffix = getenv("SLOWSYNC_SUFFIX"), *trigger = getenv("SLOWSYNC_TRIGGER");
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (suffix && trigger && n > 0) {
        path[n] = 0;
        size_t ls = strlen(suffix), lp = strlen(path);
        if (lp >= ls && strcmp(path + lp - ls, suffix) == 0)
            while (access(trigger, F_OK) == 0) usleep(10000);
    }
    return real_fsync(fd);
}
"""


def test_an_alarm_is_published_only_once_its_state_is_kept_beside_the_file(tmp_path):
    """The state kept beside the buffer file (for a fresh file, should this one be lost) is written after
    the event's commit, an fsync or two later on a slow card; a publisher that read the buffer meanwhile
    sent the committed event. A crash then, and the file lost: the platform had the alarm raised, the fresh
    file had no state, and the alarm was raised a second time (SPEC §4: raised once; a run of the test
    above failed so on a loaded machine). An alarm event is now published once its state is beside the
    file. Here the card holds the state's fsync while the broker comes back: the publisher's first round
    looks at the alarms before the readings."""
    build = tmp_path / "shim"
    build.mkdir()
    so = build_preload_shim(SLOWSYNC_C, "slowsync", build, "slow-fsync")
    slow = tmp_path / "slow"
    slow.touch()
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    try:
        broker.stop()  # down while the alarm is raised: the readings and the event wait in the buffer
        db = tmp_path / "buffer.db"
        cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, cod_mean=60))
        agent = AgentProcess(cfg, env={"LD_PRELOAD": str(so), "SLOWSYNC_SUFFIX": "buffer.db.alarm_state.tmp",
                                       "SLOWSYNC_TRIGGER": str(slow)})
        try:
            wait_for(lambda: db_last_seq(db) > 0 and stored_alarms(db) == 1, 20, "the raise committed")
            after = stored_readings(db)  # the recorder now waits for the card: nothing more is committed
            broker.start()
            wait_for(lambda: platform.has_readings_upto(after), 20, "the readings stored before it published")
            assert not (tmp_path / "buffer.db.alarm_state").exists(), "the state beside the file is being written"
        finally:
            agent.kill9()
        for lost in (db, db.with_name("buffer.db-wal"), db.with_name("buffer.db-shm")):
            lost.unlink(missing_ok=True)
        slow.unlink()
        agent = AgentProcess(cfg)
        try:
            wait_for(lambda: db_last_seq(db) > 0 and stored_alarms(db) == 1, 20, "the raise in the fresh file")
            before = stored_readings(db)
            wait_for(lambda: max(platform.reading_seqs() or [0]) >= before + 20, 20, "readings published")
            assert states(platform) == ["raised"], "raised a second time"
        finally:
            assert agent.stop() == 0
    finally:
        platform.close()
        broker.stop()


def test_a_device_removed_by_a_reload_during_its_poll_raises_no_stale_alarm(tmp_path, broker, collector):
    """A dead analyzer (no Modbus answer, 3 s timeout) is removed from the file and SIGHUP sent while a
    poll of it waits for its timeout. That poll's null/B readings reach the alarm engine after the reload:
    the `*` stale rule was applied to the channel again as if new (its stale clock at the agent's start),
    and raised `dead.x:stale` at once, for a device no longer configured, listed by `status` until the
    next restart. Its alarm is cleared once by the reload, and nothing more."""
    dead = Unit(unit_id=1, mode="silent")
    server = ModbusTcpServer([dead]).start()
    try:
        config = sim_config(tmp_path, broker, devices=1, interval=0.2, channels=1,
                            alarms=[{"channel": "*", "stale": 1}],
                            buses={"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 3,
                                           "retries": 0}})
        config["devices"]["dead"] = {"bus": "lan", "slave": 1, "interval": 1,
                                     "registers": [{"channel": "x", "address": 0, "type": "uint16"}]}
        cfg = write_config(tmp_path / "station.yaml", config)
        agent = AgentProcess(cfg)
        try:
            wait_for(lambda: states(collector) == ["raised"], 20, "the dead analyzer's stale alarm")
            asked = len(dead.reads())
            wait_for(lambda: len(dead.reads()) > asked, 10, "a poll of the dead analyzer under way")
            del config["devices"]["dead"]
            write_config(cfg, config)
            agent.signal(signal.SIGHUP)
            wait_for(lambda: states(collector)[:2] == ["raised", "cleared"], 10, "its alarm cleared by the reload")
            wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
            # The poll under way ends (timeout) 3 s after its request; then the stale rule's 1 s.
            polled = dead.reads()[-1]
            wait_for(lambda: time.monotonic() > polled + 3 + 1 + 2, 10, "the poll's end and a stale delay")
            assert stored_readings_of(tmp_path / "buffer.db", "dead") > 0
            assert [(m["alarm"]["id"], m["alarm"]["state"]) for m in alarm_events(collector)] == [
                ("dead.x:stale", "raised"), ("dead.x:stale", "cleared")]
            assert status_alarms(cfg) == []
        finally:
            assert agent.stop() == 0
    finally:
        server.close()


def stored_readings_of(db, device: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM readings WHERE device = ?", (device,)).fetchone()[0]


def test_a_stop_during_a_link_outage_raises_no_stale_alarm_for_channels_that_answered(tmp_path, broker, collector):
    """SIGTERM stops polling and then goes on publishing the backlog for up to `shutdown_grace` s; with the
    link down the whole grace passes. The `*` stale rule went on counting meanwhile: every channel, whose
    device answered to the last poll, was raised stale by the agent's own stop (in the buffer, in `status`),
    and cleared by the first poll after the restart: a raise and a clear on the platform for instruments
    that never stopped answering."""
    db = tmp_path / "buffer.db"
    config = sim_config(tmp_path, broker, devices=1, interval=0.5, channels=2, alarms=[{"channel": "*", "stale": 2}],
                        mqtt={"shutdown_grace": 5})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: max(collector.reading_seqs() or [0]) >= 10, 20, "readings published")
        broker.stop()  # the 4G link drops: the stop below waits the whole grace for it
        before = stored_readings(db)
        wait_for(lambda: stored_readings(db) >= before + 4, 10, "readings polled during the outage")
    finally:
        assert agent.stop() == 0
    assert "stopped cleanly" in agent.log()
    assert stored_alarms(db) == 0, "stale alarms raised while the agent itself was stopping"
    assert status_alarms(cfg) == []
