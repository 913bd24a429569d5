"""A disk that fills up under the buffer (other files took the space): clear errors, no crash, the
readings of the meantime held in memory, and nothing lost once space is freed."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from harness import AgentProcess, Broker, Collector, db_last_seq, sim_config, wait_for, write_config

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs for the buffer."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave_bytes: int):
    """Take all the space of `disk` but `leave_bytes` with a filler file (like logs gone wild)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    size = max(st.f_bavail * st.f_frsize - leave_bytes, 0)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


def test_full_disk_holds_readings_in_memory_and_loses_nothing_when_space_returns(tmp_path, small_disk):
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=50, interval=0.1,
                        storage={"path": str(small_disk / "buffer.db"), "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 500, 20, "readings before the disk fills")
        filler = fill(small_disk, leave_bytes=64 * 1024)
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


def test_a_disk_full_at_start_is_waited_out_without_a_restart_loop(tmp_path, small_disk):
    """The gateway boots with its disk full: no traceback and no exit (systemd would give up after its
    start limit), one clear line, and the station starts by itself once space is freed."""
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, storage={"path": str(small_disk / "buffer.db")})
    cfg = write_config(tmp_path / "station.yaml", config)
    filler = fill(small_disk, leave_bytes=0)
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
    fill(small_disk, leave_bytes=64 * 1024)  # less than the rows kept: no room for the copy

    with caplog.at_level(logging.INFO, logger="agent.buffer"):
        buf = Buffer.open_writer(path, max_mb=1)
    try:
        assert "could not be compacted" in caplog.text
        assert [(r.seq, r.value) for r in buf.readings_after(0, 50_000)] == kept
        assert path.with_name(path.name + "-wal").stat().st_size <= 8 * 1024, "the failed copy's WAL given back"
    finally:
        buf.close()
