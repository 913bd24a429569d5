"""A start whose buffer takes seconds to open polls from the start: a real agent process, a real Modbus
TCP instrument polled every 0.2 s, a real broker, the buffer's opening made slow by an LD_PRELOAD shim.

Opening the buffer checks the whole file (quick_check), compacts it above its cap or salvages a corrupt
one: ~2 minutes for a 1.4 GB file not in the page cache, which is the start after a power cut. Before,
nothing was polled until it was open: every reading of that time was never taken, a gap in the data with
no reason. The shim stalls the process's first read of the buffer file (inside `Buffer.open_writer`, on
whichever thread makes it), like a cold card would, until the test releases it (or, without a release
file, for a fixed time); the pollers' readings of that time must be stored and published, in seq order,
none lost, each with the time it was taken, also when the file is corrupt (salvaged).

Nothing here depends on the machine's speed: the instrument numbers the requests it answers, the
opening is released only once it has answered POLLS_WHILE_OPENING of them, and every answer must be
found in the buffer exactly once, in order, stamped between the answers before and after it.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from harness import AgentProcess, Collector, build_preload_shim, sim_config, wait_for, write_config
from instruments import ModbusTcpServer, Unit

from agent.buffer import Buffer
from agent.model import Reading, iso_utc_ms

STALL_S = 4.0
INTERVAL = 0.2
POLLS_WHILE_OPENING = 10  # answered by the instrument before the test lets the opening finish

STALL_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The first read of the file SLOW_OPEN_PATH by this process waits: until the file SLOW_OPEN_RELEASE
   exists when that is set (at most 120 s), else SLOW_OPEN_S seconds: a buffer whose opening (its
   integrity check, its salvage) reads a cold card. Every read after it is untouched. */
static int stalled;

static void stall_once(int fd) {
    if (__atomic_load_n(&stalled, __ATOMIC_ACQUIRE)) return;
    const char *want = getenv("SLOW_OPEN_PATH");
    if (!want) return;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return;
    target[n] = 0;
    if (strcmp(target, want) != 0 || __atomic_exchange_n(&stalled, 1, __ATOMIC_ACQ_REL)) return;
    const char *release = getenv("SLOW_OPEN_RELEASE");
    if (release) {
        fprintf(stderr, "SHIM: stalling the first read of %s until %s exists\n", want, release);
        struct timespec tick = {0, 10 * 1000 * 1000};
        for (int i = 0; i < 12000 && access(release, F_OK) != 0; i++) nanosleep(&tick, NULL);
        fprintf(stderr, "SHIM: released\n");
        return;
    }
    double s = atof(getenv("SLOW_OPEN_S") ? getenv("SLOW_OPEN_S") : "0");
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    fprintf(stderr, "SHIM: stalling the first read of %s for %.1f s\n", want, s);
    nanosleep(&ts, NULL);
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    stall_once(fd);
    return real(fd, buf, count);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread");
    stall_once(fd);
    return real(fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    stall_once(fd);
    return real(fd, buf, count, offset);
}
"""

OLD_ROWS = 300


def _old_buffer(path: Path) -> int:
    """A buffer left by an earlier run: OLD_ROWS readings of another device, all published."""
    buf = Buffer.open_writer(path)
    t = int(time.time() * 1000) - 3_600_000
    buf.begin()
    buf.insert_readings([Reading("old", "c00", t + i * 1000, float(i), "mg/L") for i in range(OLD_ROWS)])
    buf.set_sent_upto("readings", buf.last_seq())
    buf.commit()
    last = buf.last_seq()
    buf.close()
    return last


def _corrupt(path: Path) -> None:
    """Damage the file header's page-size field and a leaf page: SQLite reports the file corrupt."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[16:18] = b"\x00\x03"  # an impossible page size
        f.seek(0)
        f.write(data)


@dataclass
class CountingUnit(Unit):
    """An instrument whose holding registers 0 and 1 both read how many read requests it has answered,
    this one included: the readings stored say which poll each came from."""

    answered: list[float] = field(default_factory=list)  # wall time of each read answered, in order

    def answer(self, pdu: bytes) -> bytes | None:
        if pdu[:1] == b"\x03":
            self.holding[0] = self.holding[1] = len(self.answered) + 1
            self.answered.append(time.time())
        return super().answer(pdu)


def _log_time(log: str, pattern: str) -> float:
    """Wall time (s) of the agent's first log line matching `pattern`."""
    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+ " + pattern, log, re.M)
    assert m, f"no log line /{pattern}/ in:\n{log[-3000:]}"
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logging's


def _rows(path: Path, above: int, device: str = "dev0") -> list[tuple[int, str, int, float | None]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT seq, channel, ts_ms, value FROM readings WHERE device=? AND seq > ? "
                            "ORDER BY seq", (device, above)).fetchall()


def _start_slow(tmp_path: Path, broker, unit: CountingUnit) -> tuple[AgentProcess, Collector, Path, ModbusTcpServer]:
    """The agent polling `unit` every INTERVAL, its buffer's opening held until `unit` has answered
    POLLS_WHILE_OPENING requests, then released; returns once the agent runs."""
    so = build_preload_shim(STALL_C, "slowopen", tmp_path, "slow buffer open")
    server = ModbusTcpServer([unit]).start()
    collector = Collector(broker, "env/TEST0001/#")
    config = sim_config(tmp_path, broker, devices=0)
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 10}}
    config["devices"] = {"dev0": {"bus": "lan", "slave": unit.unit_id, "interval": INTERVAL, "registers": [
        {"channel": "c00", "address": 0, "type": "uint16"}, {"channel": "c01", "address": 1, "type": "uint16"}]}}
    db = Path(config["storage"]["path"])
    release = tmp_path / "release-the-opening"
    agent = AgentProcess(write_config(tmp_path / "agent.yaml", config),
                         env={"LD_PRELOAD": str(so), "SLOW_OPEN_PATH": str(db), "SLOW_OPEN_RELEASE": str(release)})
    wait_for(lambda: "SHIM: stalling" in agent.log() or not agent.alive(), 60, "the opening under way")
    wait_for(lambda: len(unit.answered) >= POLLS_WHILE_OPENING or not agent.alive(), 60,
             f"{POLLS_WHILE_OPENING} polls answered while the buffer opens")
    assert "open: readings last seq" not in agent.log(), f"opened before the release:\n{agent.log()[-3000:]}"
    release.touch()
    wait_for(lambda: "running:" in agent.log() or not agent.alive(), 60, "the agent running")
    assert agent.alive(), agent.log()[-3000:]
    return agent, collector, db, server


def _check_every_poll_stored(rows: list[tuple[int, str, int, float | None]], unit: CountingUnit,
                             opened: float) -> None:
    """Every poll the instrument answered is stored once per channel, in the order answered (seq order),
    stamped with the time it was taken: after the answer before it and before its own. The first
    POLLS_WHILE_OPENING of them were answered before the buffer opened."""
    answered = list(unit.answered)
    assert len(answered) >= POLLS_WHILE_OPENING
    assert answered[POLLS_WHILE_OPENING - 1] < opened, "the instrument was not polled while the buffer opened"
    for channel in ("c00", "c01"):
        got = [(int(value), ts) for _, ch, ts, value in rows if ch == channel]
        assert [n for n, _ in got] == list(range(1, len(answered) + 1)), (
            f"{channel}: stored polls {[n for n, _ in got]}, answered 1..{len(answered)}")
        for n, ts in got:
            after = int(answered[n - 2] * 1000) if n > 1 else 0
            assert after <= ts <= answered[n - 1] * 1000, (
                f"{channel}: poll {n} stamped {ts}, not when it was taken ({after}..{answered[n - 1] * 1000:.0f})")


def test_readings_taken_while_the_buffer_opens_are_stored_and_published(broker, tmp_path):
    old_last = _old_buffer(tmp_path / "buffer.db")
    unit = CountingUnit(1)
    agent, collector, db, server = _start_slow(tmp_path, broker, unit)
    try:
        opened = _log_time(agent.log(), r"buffer .* open: readings last seq")
        wait_for(lambda: len(_rows(db, old_last)) >= 2 * (POLLS_WHILE_OPENING + 10), 30,
                 "readings stored after the start")
        assert agent.stop() == 0
        rows = _rows(db, old_last)
        # the readings of the time the buffer was opened are there, seqs following on from the old ones
        _check_every_poll_stored(rows, unit, opened)
        seqs = [seq for seq, _, _, _ in rows]
        assert seqs == list(range(old_last + 1, old_last + 1 + len(seqs))), "seqs not contiguous"
        # and every one was published (before the stop's grace ran out), in seq order
        published = [r["seq"] for m in collector.json_messages("/data") for r in m.get("readings", [])
                     if r.get("device") == "dev0"]
        assert sorted(set(published)) == seqs, f"published {len(set(published))} of {len(seqs)}"
        assert published == sorted(published), "published out of seq order"
        held = re.search(r"(\d+) readings taken while the buffer was opened are stored", agent.log())
        assert held and int(held.group(1)) >= 2 * POLLS_WHILE_OPENING, agent.log()[-3000:]
    finally:
        collector.close()
        agent.stop()
        server.close()


def test_salvaged_buffer_start_keeps_the_readings_taken_meanwhile(broker, tmp_path):
    old_last = _old_buffer(tmp_path / "buffer.db")
    _corrupt(tmp_path / "buffer.db")
    unit = CountingUnit(1)
    agent, collector, db, server = _start_slow(tmp_path, broker, unit)
    try:
        log = agent.log()
        assert "corrupt" in log, log[-3000:]
        opened = _log_time(log, r"buffer .* open: readings last seq")
        wait_for(lambda: len(_rows(db, 0)) >= 2 * (POLLS_WHILE_OPENING + 10), 30, "readings stored after the start")
        assert agent.stop() == 0
        rows = _rows(db, 0)
        _check_every_poll_stored(rows, unit, opened)
        seqs = [seq for seq, _, _, _ in rows]
        assert seqs[0] > old_last and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        published = [r["seq"] for m in collector.json_messages("/data") for r in m.get("readings", [])
                     if r.get("device") == "dev0"]
        assert sorted(set(published)) == seqs, f"published {len(set(published))} of {len(seqs)}"
    finally:
        collector.close()
        agent.stop()
        server.close()


def test_sigterm_while_the_buffer_opens_stores_what_was_polled(broker, tmp_path):
    old_last = _old_buffer(tmp_path / "buffer.db")
    so = build_preload_shim(STALL_C, "slowopen", tmp_path, "slow buffer open")
    config = sim_config(tmp_path, broker, interval=INTERVAL, channels=2)
    db = Path(config["storage"]["path"])
    agent = AgentProcess(write_config(tmp_path / "agent.yaml", config),
                         env={"LD_PRELOAD": str(so), "SLOW_OPEN_PATH": str(db), "SLOW_OPEN_S": str(STALL_S)})
    wait_for(lambda: "SHIM: stalling" in agent.log(), 30, "the opening under way")
    time.sleep(1.0)  # polls to keep: the stall lasts STALL_S from here
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0, agent.log()[-3000:]
    log = agent.log()
    assert "stopped cleanly" in log, log[-3000:]
    rows = _rows(db, old_last, "sim0")
    assert len(rows) >= 2, f"the readings polled before the stop were not stored:\n{log[-3000:]}"


def test_an_exceedance_while_the_buffer_opens_raises_its_alarm_counted_from_when_it_was_polled(broker, tmp_path):
    """The start after a power cut: the buffer takes long to open, the pollers' readings wait in memory.
    The COD rises above its limit for longer than the rule's `delay` and falls back, all while the file
    opens. SPEC §2: the delay counts on a monotonic clock from the first value beyond the limit. The alarm
    engine took every reading held over 5 s as taken 5 s before it was stored: the exceedance, squeezed
    into one instant, never lasted the delay, and no alarm was raised for it (after a long opening, an
    alarm was raised a whole opening late)."""
    delay = 2.0
    unit = Unit(1, holding={0: 300})  # COD 30.0 mg/L: within the limit
    server = ModbusTcpServer([unit]).start()
    so = build_preload_shim(STALL_C, "slowopen", tmp_path, "slow buffer open")
    collector = Collector(broker, "env/TEST0001/#")
    config = sim_config(tmp_path, broker, devices=0,
                        alarms=[{"channel": "cod.w01018", "above": 50, "delay": delay}])
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 10}}
    config["devices"] = {"cod": {"bus": "lan", "slave": 1, "interval": INTERVAL, "registers": [
        {"channel": "w01018", "address": 0, "type": "uint16", "scale": 0.1, "unit": "mg/L"}]}}
    db = Path(config["storage"]["path"])
    release = tmp_path / "release-the-opening"
    agent = AgentProcess(write_config(tmp_path / "agent.yaml", config),
                         env={"LD_PRELOAD": str(so), "SLOW_OPEN_PATH": str(db), "SLOW_OPEN_RELEASE": str(release)})
    try:
        wait_for(lambda: "SHIM: stalling" in agent.log(), 60, "the opening under way")

        def polled_for(seconds: float, since: float) -> bool:
            return bool(unit.reads()) and unit.reads()[-1] - since >= seconds

        unit.put("holding", 0, 600)  # 60.0 mg/L: above the limit ...
        rose = time.monotonic()
        wait_for(lambda: polled_for(delay + 1, rose), 30, "the exceedance polled for longer than the delay")
        unit.put("holding", 0, 300)  # ... and back, then 6 s more: every value beyond is held over 5 s
        fell = time.monotonic()
        wait_for(lambda: polled_for(6, fell), 30, "the values back within polled for 6 s")
        assert "open: readings last seq" not in agent.log(), "opened before the release"
        release.touch()
        wait_for(lambda: "running:" in agent.log(), 60, "the agent running")

        def alarm_events() -> list[dict]:
            by_seq = {m["alarm"]["seq"]: m["alarm"] for m in collector.json_messages("/alarm")}
            return [by_seq[s] for s in sorted(by_seq)]

        wait_for(lambda: [a["state"] for a in alarm_events()] == ["raised", "cleared"], 20,
                 "the exceedance's alarm raised and cleared")
        raised = alarm_events()[0]
        above = [ts for _, ch, ts, value in _rows(db, 0, "cod") if value == 60]
        assert (raised["id"], raised["value"], raised["threshold"]) == ("cod.w01018:above", 60, 50)
        # raised by the first value beyond the limit taken `delay` after the first one, as it was polled
        first_due = next(ts for ts in above if ts >= above[0] + (delay - 0.1) * 1000)
        assert raised["ts"] == iso_utc_ms(first_due)
    finally:
        collector.close()
        agent.stop()
        server.close()
