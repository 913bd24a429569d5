"""A disk that fills up under the buffer (other files took the space): clear errors, no crash, the
readings of the meantime held in memory, and nothing lost once space is freed."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from harness import (
    AgentProcess,
    Broker,
    Collector,
    build_preload_shim,
    db_last_seq,
    fill_disk,
    run_cli,
    sim_config,
    wait_for,
    write_config,
)

import agent.recorder as recorder_module
from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms
from agent.recorder import Recorder


def test_full_disk_holds_readings_in_memory_and_loses_nothing_when_space_returns(tmp_path, small_disk):
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=50, interval=0.1,
                        storage={"path": str(small_disk / "buffer.db"), "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 500, 20, "readings before the disk fills")
        filler = fill_disk(small_disk, leave_bytes=64 * 1024)
        wait_for(lambda: "refused" in agent.log() or "No space left" in agent.log(), 60,
                 "a clear log line about the full disk")
        stalled = db_last_seq(small_disk / "buffer.db")
        assert agent.alive(), "the agent survives a full disk"
        filler.unlink()  # the operator frees space
        wait_for(lambda: db_last_seq(small_disk / "buffer.db") > stalled + 500, 30, "recording resumes")
        target = db_last_seq(small_disk / "buffer.db")
        wait_for(lambda: platform.has_readings_upto(target), 60,
                 f"every seq 1..{target} delivered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    readings = platform.json_messages("/data")
    assert not [m for m in readings if "gap" in m], "no reading was dropped: they waited in memory"


def test_a_full_disk_is_logged_as_the_disk_not_the_buffer_with_what_to_do(tmp_path, small_disk):
    """SQLite says "database or disk is full" at the size cap and on a full disk alike; the operator
    reading the journal must tell them apart: a full disk names the buffer's path, the space left and
    what to do (the cap is the agent's own business, the disk is the operator's), once a minute."""
    broker = Broker(tmp_path / "broker").start()
    config = sim_config(tmp_path, broker, channels=50, interval=0.1,
                        storage={"path": str(small_disk / "buffer.db"), "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(small_disk / "buffer.db") >= 500, 20, "readings before the disk fills")
        filler = fill_disk(small_disk, leave_bytes=16 * 1024)
        line = wait_for(lambda: next((x for x in agent.log().splitlines() if "buffer write refused" in x), None),
                        60, "the full disk logged")
        assert f"the disk holding {small_disk / 'buffer.db'} is full" in line, line
        assert "kB free" in line and "free space on it" in line, line
        filler.unlink()
        wait_for(lambda: "buffer writes work again" in agent.log(), 30, "the end logged")
    finally:
        assert agent.stop() == 0
        broker.stop()


def test_a_disk_full_at_start_is_waited_out_without_a_restart_loop(tmp_path, small_disk):
    """The gateway boots with its disk full: no traceback and no exit (systemd would give up after its
    start limit), one clear line, and the station starts by itself once space is freed."""
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, storage={"path": str(small_disk / "buffer.db")})
    cfg = write_config(tmp_path / "station.yaml", config)
    filler = fill_disk(small_disk, leave_bytes=0)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "cannot open the buffer" in agent.log(), 30, "a clear line about the buffer")
        assert agent.alive() and "Traceback" not in agent.log()
        assert agent.log().count("cannot open the buffer") == 1, "logged once, not at every retry"
        filler.unlink()
        wait_for(lambda: len(platform.reading_seqs()) >= 10, 40, "readings once space is freed")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert set(platform.reading_seqs()) >= set(range(1, 11))


def test_a_compaction_the_disk_has_no_room_for_keeps_every_row_and_gives_its_wal_back(small_disk, caplog):
    """The start-time compaction of a file larger than its (lowered) cap copies the rows kept through the
    WAL: on a disk without room for that copy it fails, is logged, and leaves every row as it was; what it
    had written into the WAL is given back to the disk (audit W: 86 KB stayed on a full 3 MB tmpfs)."""
    path = small_disk / "buffer.db"
    buf = Buffer.open_writer(path, max_mb=4)
    for block in range(40):
        t = now_ms()
        buf.begin()
        buf.insert_readings([Reading("d", f"c{i % 10}", t + i, float(block * 1000 + i), "mg/L", "N")
                             for i in range(1000)])
        buf.commit()
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 30_000)
    buf.commit()
    buf.set_size_cap(1)  # a reload lowered the cap: published rows go first
    buf.begin()
    buf.evict(int(2**20 * 0.85), now_ms())
    buf.commit()
    kept = [(r.seq, r.value) for r in buf.readings_after(0, 50_000)]
    buf.close()
    assert path.stat().st_size > 2**20 and len(kept) > 5_000
    fill_disk(small_disk, leave_bytes=64 * 1024)  # less than the rows kept: no room for the copy

    with caplog.at_level(logging.INFO, logger="agent.buffer"):
        buf = Buffer.open_writer(path, max_mb=1)
    try:
        assert "could not be compacted" in caplog.text
        assert [(r.seq, r.value) for r in buf.readings_after(0, 50_000)] == kept
        assert path.with_name(path.name + "-wal").stat().st_size <= 8 * 1024, "the failed copy's WAL given back"
    finally:
        buf.close()


# Writes to the files whose path starts with $FAILWRITE_PREFIX fail with EIO (or the errno $FAILWRITE_ERRNO) while
# $FAILWRITE_TRIGGER exists: an SD card returning I/O errors for a while, a file system the kernel remounted
# read-only (EROFS) (the shim is checked by the test through the agent's log).
FAILWRITE_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_write)(int, const void *, size_t);

__attribute__((constructor)) static void init(void) {
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_write = dlsym(RTLD_NEXT, "write");
}

static int fail_errno(void) {
    const char *e = getenv("FAILWRITE_ERRNO");
    return e ? atoi(e) : EIO;
}

static int failing(int fd) {
    const char *prefix = getenv("FAILWRITE_PREFIX"), *trigger = getenv("FAILWRITE_TRIGGER");
    char link[64], path[PATH_MAX];
    if (fd <= 2 || !prefix || !trigger || access(trigger, F_OK) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    if (failing(fd)) { errno = fail_errno(); return -1; }
    return real_pwrite64(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return pwrite64(fd, buf, n, off); }

ssize_t write(int fd, const void *buf, size_t n) {
    if (failing(fd)) { errno = fail_errno(); return -1; }
    return real_write(fd, buf, n);
}
"""


def test_a_buffer_refusing_writes_is_said_on_the_retained_status_and_its_end_logged(tmp_path):
    """The card returns I/O errors for a while: the readings wait in memory (nothing lost), and an
    operator who reads only the retained P/status learns why the station's readings stopped coming
    (before, its devices merely went stale in `status`, P/status said nothing); once writes work
    again, the status says so and the log says how long it lasted."""
    build = tmp_path / "shim"
    build.mkdir()
    so = build_preload_shim(FAILWRITE_C, "failwrite", build, "write-error")
    trigger = tmp_path / "failing"
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    data = tmp_path / "data"
    config = sim_config(tmp_path, broker, interval=0.2, storage={"path": str(data / "buffer.db")})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg, env={"LD_PRELOAD": str(so), "FAILWRITE_PREFIX": str(data / "buffer.db"),
                                   "FAILWRITE_TRIGGER": str(trigger)})

    def statuses() -> list[dict]:
        return [json.loads(p) for t, p, _ in platform.messages if t.endswith("/status")]

    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the card fails")
        wait_for(lambda: any("buffer_error" in s for s in statuses()), 20, "the summary in the retained status")
        assert statuses()[-1]["buffer_error"] is None
        trigger.touch()
        said = wait_for(lambda: next((s for s in statuses() if s.get("buffer_error")), None), 60,
                        "a retained status saying the buffer refuses writes")
        assert "disk I/O error" in said["buffer_error"] and said["state"] == "online"
        stalled = db_last_seq(data / "buffer.db")
        trigger.unlink()
        wait_for(lambda: "buffer writes work again" in agent.log(), 20, "the end of the trouble logged")
        wait_for(lambda: statuses()[-1].get("buffer_error", "") is None, 60, "the status cleared")
        target = db_last_seq(data / "buffer.db")
        assert target > stalled
        wait_for(lambda: platform.has_readings_upto(target), 30, f"every seq 1..{target} delivered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert agent.log().count("buffer write failed") == 1, "the error logged once, not at every retry"
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "nothing dropped: held in memory"


def test_an_eviction_needs_no_more_disk_beside_the_file_than_a_round_of_it(small_disk, monkeypatch, caplog):
    """Every page an eviction frees goes through the WAL: in one transaction, dropping 4 MB of readings
    needed 4 MB of disk beside the file, and on a disk without it the eviction failed at every try while
    nothing more could be stored (audit Y: at the default 256 MB cap, 37 MiB, where the README asks for
    max_mb + 8 MiB). In rounds, each committed and checkpointed, the WAL is reused from round to round."""
    monkeypatch.setattr(recorder_module, "EVICT_ROUND_ROWS", 5_000)
    path = small_disk / "buffer.db"
    buf = Buffer.open_writer(path, max_mb=6)
    t = now_ms()
    while buf.used_bytes() < 5.5 * 2**20:  # a long outage: nothing published
        buf.begin()
        buf.insert_readings([Reading("d", f"c{i % 10}", t + i, float(i), "mg/L", "N") for i in range(5_000)])
        buf.commit()
    buf.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert free < 3 * 2**20, "less room beside the file than the eviction below deletes"
    rec = Recorder(buf, commit_interval_ms=50, keep_sent_days=7, max_mb=6)
    rec.start()
    try:
        with caplog.at_level(logging.INFO, logger="agent.recorder"):
            rec.set_limits(max_mb=2, keep_sent_days=7, commit_interval_ms=50)  # a reload lowers the cap
            rec.submit([Reading("d", "c0", now_ms(), 1.0, "mg/L", "N")])
            assert rec.flush(30)
            wait_for(lambda: rec.gaps_recorded, 30, "the eviction down to the lowered cap")
        assert "eviction failed" not in caplog.text
        reader = Buffer.open_reader(path)
        try:
            assert reader.used_bytes() <= 0.85 * 2 * 2**20
            gaps = reader.pending_gaps()
            assert [(g.first_seq, g.reason) for g in gaps] == [(1, "buffer_full")]
            assert reader.first_seq() == gaps[0].last_seq + 1, "the only missing seqs are the announced gap"
        finally:
            reader.close()
    finally:
        rec.stop()
        buf.close()


def test_a_disk_without_room_for_the_cap_and_its_wal_is_warned_of(small_disk, caplog):
    """`max_mb` the disk can hold, but not with the WAL beside it (an eviction round's WAL peaked at 14 MiB
    at the default cap, audit Y): the start warns, as it does for a cap larger than the disk."""
    from agent.runtime import warn_if_disk_smaller_than_cap

    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        warn_if_disk_smaller_than_cap(small_disk / "buffer.db", 1)  # 1 MB on a disk of 8
    assert "has room for 8 MB, less than max_mb + 16 MB for its WAL" in caplog.text


def test_status_while_the_agent_cannot_create_its_buffer_says_so_not_an_empty_backlog(tmp_path, small_disk):
    """An agent that cannot create its buffer (a full disk at the first start) holds its readings in
    memory and tries again; `status` said `backlog 0 unsent readings (last seq 0)` and `running (pid
    None)`, as if nothing waited. It says that the running agent has no buffer yet, the backlog unknown."""
    broker = Broker(tmp_path / "broker").start()
    cfg = write_config(tmp_path / "station.yaml",
                       sim_config(tmp_path, broker, storage={"path": str(small_disk / "buffer.db")}))
    fill_disk(small_disk, leave_bytes=0)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "cannot open the buffer" in agent.log(), 30, "the agent cannot open its buffer")
        result = run_cli("status", "-c", str(cfg), "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["agent"]["running"] is True
        # nothing waits stored (its readings are in its memory), and no seq was ever issued: last_seq 0
        assert status["backlog"] is None and status["last_seq"] == 0, status
        assert status["buffer_error"] == f"the running agent has no buffer at {small_disk / 'buffer.db'} yet: " \
                                          "its readings wait in its memory"
        text = run_cli("status", "-c", str(cfg)).stdout
        assert "agent    running (pid unknown)" in text, text  # the full disk kept the pid out of the lock file
        assert "backlog  unknown: the running agent has no buffer" in text, text
    finally:
        assert agent.stop() == 0
        broker.stop()


def corrupt_buffer_of_300_readings(path: Path) -> Path:
    """A buffer at `path` of 300 readings of device "old", 1..100 acknowledged, left as after a crash, its meta
    table's page overwritten: corrupt, the readings' pages readable."""
    buf = Buffer.open_writer(path)
    t = now_ms() - 600_000
    for k in range(0, 300, 50):
        buf.begin()
        buf.insert_readings([Reading("old", "c00", t + k + i, float(k + i), "mg/L") for i in range(50)])
        buf.commit()
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 100)
    buf.commit()
    buf.conn.close()  # as after a crash
    with sqlite3.connect(path) as conn:
        meta_page = conn.execute("SELECT pageno FROM dbstat WHERE name='meta' ORDER BY pageno").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((meta_page - 1) * 1024)
        f.write(b"\xa5" * 1024)
    return path


def test_a_corrupt_buffer_found_at_a_start_on_a_full_disk_is_salvaged_once_there_is_room(tmp_path, small_disk):
    """The start finds the file corrupt and the disk full: it is moved aside, but no fresh file can be
    made. The start is retried every 10 s, and the retry only opened a fresh file: the unpublished rows
    of the file moved aside were never salvaged, announced lost (buffer_missing). They are salvaged and
    published once the operator frees space."""
    path = corrupt_buffer_of_300_readings(small_disk / "buffer.db")
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=1, interval=0.5,
                        storage={"path": str(path), "commit_interval_ms": 100})
    filler = fill_disk(small_disk, leave_bytes=40 * 1024)  # room to check the file (its -shm), not for a fresh one
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: "retrying every" in agent.log(), 30, "the start waiting for room")
        assert list(small_disk.glob("buffer.db.corrupt-*")), agent.log()[-3000:]
        filler.unlink()  # the operator frees space
        old = lambda: sorted({r["seq"] for m in platform.json_messages("/data")  # noqa: E731
                              for r in m.get("readings", []) if r["device"] == "old"})
        wait_for(lambda: old() == list(range(101, 301)), 60, "the unpublished rows salvaged and published")
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    gaps = [m["gap"] for m in platform.json_messages("/data") if "gap" in m]
    assert not [g for g in gaps if g[0] <= 300], gaps


def test_a_stop_while_the_start_waits_for_room_to_salvage_says_which_file_keeps_the_rows(tmp_path, small_disk):
    """Stopped (`systemctl restart` on a full disk) while the start waits for room for the fresh file of a
    corrupt buffer moved aside: the stop said nothing, and the next start announced the unacknowledged seqs
    as lost without a word of the file that keeps them. The stop now names it, as a stop while running does."""
    path = corrupt_buffer_of_300_readings(small_disk / "buffer.db")
    broker = Broker(tmp_path / "broker").start()
    config = sim_config(tmp_path, broker, channels=1, interval=0.5,
                        storage={"path": str(path), "commit_interval_ms": 100})
    filler = fill_disk(small_disk, leave_bytes=40 * 1024)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: "retrying every" in agent.log(), 30, "the start waiting for room")
        moved = [p for p in small_disk.glob("buffer.db.corrupt-*") if not p.name.endswith((".txt", "-wal", "-shm"))]
        assert len(moved) == 1, list(small_disk.iterdir())
    finally:
        assert agent.stop() == 0
        filler.unlink()
        broker.stop()
    assert (f"stopping before the corrupt buffer moved aside as {moved[0].name} could be salvaged" in agent.log()), \
        agent.log()[-3000:]


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_corrupt_buffer_whose_start_was_stopped_waiting_for_room_is_salvaged_at_the_next_start(
        tmp_path, small_disk, how):
    """Stopped (or killed: a power cut) while the start waits for room for the fresh file of a corrupt
    buffer moved aside: the next start ignored the file moved aside, made a fresh file and announced the
    unacknowledged seqs as lost (`buffer_missing`), though its rows were readable. A marker beside the
    buffer keeps the pending salvage: the next start with room salvages it, once, and its rows are
    published once each, no gap announced over them."""
    path = corrupt_buffer_of_300_readings(small_disk / "buffer.db")
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=1, interval=0.5,
                        storage={"path": str(path), "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    old = lambda: [r["seq"] for m in platform.json_messages("/data")  # noqa: E731
                   for r in m.get("readings", []) if r["device"] == "old"]
    filler = fill_disk(small_disk, leave_bytes=40 * 1024)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "retrying every" in agent.log(), 30, "the start waiting for room")
        if how == "killed":
            agent.kill9()
        else:
            assert agent.stop() == 0
        filler.unlink()  # the operator frees space, then the service starts again
        agent = AgentProcess(cfg)
        wait_for(lambda: sorted(set(old())) == list(range(101, 301)), 60,
                 "the unpublished rows salvaged and published")
        wait_for(lambda: len([s for s in platform.reading_seqs() if s > 300]) >= 3, 30, "new readings after them")
        assert "Traceback" not in agent.log()
        assert agent.stop() == 0
        assert sorted(old()) == list(range(101, 301)), "each salvaged row published once"
        gaps = [m["gap"] for m in platform.json_messages("/data") if "gap" in m]
        assert not [g for g in gaps if g[0] <= 300], gaps
        assert not list(small_disk.glob("buffer.db.unsalvaged-*")), "the pending salvage is done: its marker gone"

        top = max(platform.reading_seqs())
        agent = AgentProcess(cfg)  # a third start salvages nothing again
        wait_for(lambda: any(s > top for s in platform.reading_seqs()), 30, "readings of the third start")
        assert agent.stop() == 0
        assert "salvag" not in agent.log(), agent.log()[-3000:]
        assert sorted(old()) == list(range(101, 301)), "no salvaged row published again"
    finally:
        agent.stop()
        platform.close()
        broker.stop()
