"""A buffer directory the agent may not write (a file system mounted read-only: a card the kernel
remounted read-only after errors, an image flashed read-only): a start says so in one clear line, exits
into no restart loop, polls nothing it could not keep, loses nothing already stored, and starts by
itself once the directory is writable again. A real read-only tmpfs (root: CI runs as root), real agent
processes, a real mosquitto."""

from __future__ import annotations

import errno
import json
import subprocess

from harness import AgentProcess, Broker, Collector, build_preload_shim, db_last_seq, sim_config, wait_for, write_config
from test_disk_full import FAILWRITE_C


def remount(mount, mode: str) -> None:
    """Refused as busy while a process holds a file there open for writing (SQLite opens the -shm so
    even for a read-only connection): tried until it is done."""
    def done() -> bool:
        result = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True, text=True)
        assert result.returncode == 0 or "busy" in result.stderr, result.stderr
        return result.returncode == 0
    wait_for(done, 20, f"the file system remounted {mode}", interval=0.2)


def test_a_read_only_buffer_directory_at_start_is_said_waited_out_and_loses_nothing(tmp_path, small_disk):
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    path = small_disk / "buffer.db"
    broker_url = broker.url
    config = sim_config(tmp_path, broker, interval=0.2, storage={"path": str(path)})
    config["mqtt"]["url"] = "mqtt://127.0.0.1:1"  # the first run publishes nothing: its rows wait in the buffer
    cfg = write_config(tmp_path / "station.yaml", config)
    first = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(path) >= 20, 20, "readings stored")
    finally:
        assert first.stop() == 0
    stored = db_last_seq(path)
    config["mqtt"]["url"] = broker_url
    write_config(cfg, config)
    remount(small_disk, "ro")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "cannot open the buffer" in agent.log(), 30, "a clear line about the buffer")
        log = agent.log()
        assert "Read-only file system" in log and str(small_disk) in log, log[-3000:]
        assert "mounted read-only: remount it read-write" in log, log[-3000:]
        assert agent.alive() and "Traceback" not in log
        assert db_last_seq(path) == stored, "the rows stored stay as they are"
        remount(small_disk, "rw")
        wait_for(lambda: db_last_seq(path) > stored + 10, 40, "readings once the directory is writable")
        target = db_last_seq(path)
        wait_for(lambda: platform.has_readings_upto(target), 30, f"every seq 1..{target} delivered")
        assert agent.log().count("cannot open the buffer") == 1, "logged once, not at every retry"
    finally:
        try:
            remount(small_disk, "rw")
        finally:
            assert agent.stop() == 0
            platform.close()
            broker.stop()
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "nothing lost, no gap"


def test_a_buffer_gone_read_only_while_running_keeps_polling_into_memory_and_loses_nothing(tmp_path):
    """The kernel remounts the card read-only (errors=remount-ro) under a running agent: every write to
    the open buffer fails with EROFS (a remount cannot be done by hand while files are open for writing:
    the write-error shim of test_disk_full gives EROFS instead). The agent keeps polling into memory, says
    why in the retained status, keeps the rows stored (nothing moved aside as corrupt), and once writes
    work again stores and publishes every reading, no gap."""
    build = tmp_path / "shim"
    build.mkdir()
    so = build_preload_shim(FAILWRITE_C, "failwrite", build, "write-error")
    trigger = tmp_path / "read-only"
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    data = tmp_path / "data"
    path = data / "buffer.db"
    cfg = write_config(tmp_path / "station.yaml",
                       sim_config(tmp_path, broker, interval=0.2, storage={"path": str(path)}))
    agent = AgentProcess(cfg, env={"LD_PRELOAD": str(so), "FAILWRITE_PREFIX": str(path),
                                   "FAILWRITE_TRIGGER": str(trigger), "FAILWRITE_ERRNO": str(errno.EROFS)})

    def statuses() -> list[dict]:
        return [json.loads(p) for t, p, _ in platform.messages if t.endswith("/status")]

    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 30, 20, "readings before the file system goes read-only")
        trigger.touch()
        said = wait_for(lambda: next((s for s in statuses() if s.get("buffer_error")), None), 60,
                        "a retained status saying the buffer refuses writes")
        assert said["state"] == "online", said
        stalled = db_last_seq(path)
        wait_for(lambda: "buffer write failed" in agent.log(), 10, "the write error logged")
        assert agent.alive()
        trigger.unlink()
        wait_for(lambda: "buffer writes work again" in agent.log(), 30, "the end of the trouble logged")
        wait_for(lambda: db_last_seq(path) > stalled + 10, 20, "readings stored again")
        target = db_last_seq(path)
        wait_for(lambda: platform.has_readings_upto(target), 30, f"every seq 1..{target} delivered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    log = agent.log()
    assert "Traceback" not in log and not list(data.glob("buffer.db.corrupt-*")), log[-3000:]
    assert not [m for m in platform.json_messages("/data") if "gap" in m], "nothing dropped: held in memory"
