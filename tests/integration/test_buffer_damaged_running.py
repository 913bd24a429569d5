"""A page of the buffer damaged on the card while the agent runs: only a reader that reaches it meets
the damage (the drain of a backlog after an outage, a platform's resend). Before, that reader failed
there for ever: the drain stopped at the damaged page, every later reading undelivered until a
restart, and a resend over it was never answered, holding up every resend after it. Now the reader
tells the recorder, which checks the file and rescues it as a start does (moved aside, a fresh file,
what is readable salvaged with its seqs, the seqs lost announced as a gap). Real agent processes, a
real mosquitto, real SQLite files damaged on disk.

The older frames of the WAL (from before it started over) may still hold copies of the damaged page:
SQLite no longer reads them, but the salvage's page scan does, and delivers the page's readings. Whether
a copy is still there when the rescue comes depends on how far the WAL has been written over since: a
test that wants the page lost damages those copies too; one that leaves them accepts either outcome,
per reading, as a receiver must (delivered as stored, or announced lost, never both, never neither)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from harness import AgentProcess, Broker, Collector, db_last_seq, sim_config, wait_for, write_config

from agent.buffer import READING_JSON

PAGE_SIZE = 1024  # the buffer's (agent.buffer.PAGE_SIZE)


def start_station(tmp_path: Path, broker: Broker) -> tuple[Path, AgentProcess]:
    path = tmp_path / "buffer.db"
    # max_batch above any backlog here: nothing is encoded ahead while offline, the drain reads the file
    config = sim_config(tmp_path, broker, channels=20, interval=0.1, mqtt={"max_batch": 10000})
    return path, AgentProcess(write_config(tmp_path / "station.yaml", config))


def leaves(path: Path) -> list[tuple[int, int, int]]:
    """The readings table's leaf pages in key order, as (page number, first seq, last seq)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        pages = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name='readings' AND pagetype='leaf' "
                             "ORDER BY path").fetchall()
        out, before = [], 0
        for pageno, ncell in pages:
            first, last = (conn.execute("SELECT seq FROM readings ORDER BY seq LIMIT 1 OFFSET ?", (k,)).fetchone()[0]
                           for k in (before, before + ncell - 1))
            out.append((pageno, first, last))
            before += ncell
    return out


def wal_frames(path: Path, pageno: int) -> tuple[list[int], list[int]]:
    """The offsets in `path`-wal of the frames holding page `pageno`: (of the WAL's current generation,
    which SQLite reads; of older ones, which it no longer reads but the salvage's page scan does)."""
    data = Path(f"{path}-wal").read_bytes()
    page_size, salts = int.from_bytes(data[8:12], "big"), data[16:24]
    current, stale = [], []
    for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        if int.from_bytes(data[offset:offset + 4], "big") == pageno:
            (current if data[offset + 8:offset + 16] == salts else stale).append(offset + 24)
    return current, stale


def damage_a_leaf(path: Path, above: int, *, stale_copies_too: bool) -> dict[int, dict]:
    """Overwrite, in the file on disk, a leaf page of readings whose seqs are all above `above` (not one
    of the last pages, which new rows still change), and with `stale_copies_too` the copies of it in the
    WAL's older frames as well; returns the page's readings as the agent publishes them, by seq. The page
    is first checkpointed into the file and the WAL started over by a later commit (its header's
    checkpoint sequence number changes then), so that SQLite reads no copy of it from the WAL. The damage
    is done holding the WAL's write lock: the agent writes no frame meanwhile (it waits)."""
    def restarts() -> int:
        with open(f"{path}-wal", "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    def checkpointed() -> bool:  # (a reader in the middle of a read holds it back)
        with sqlite3.connect(str(path)) as conn:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return busy == 0 and frames == copied

    before = restarts()
    wait_for(lambda: checkpointed() and restarts() != before, 20, "the WAL checkpointed and started over")
    candidates = [leaf for leaf in leaves(path)[:-3] if leaf[1] > above]
    assert len(candidates) >= 3, f"enough pages of readings above seq {above}: {leaves(path)}"
    pageno, first, last = candidates[len(candidates) // 2]
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        page = {seq: json.loads(text) for seq, text in conn.execute(
            f"SELECT seq, {READING_JSON} FROM readings WHERE seq BETWEEN ? AND ?", (first, last))}
        current, stale = wal_frames(path, pageno)
        assert not current, "no copy of the page SQLite reads in the WAL"
        with open(path, "r+b") as f:
            f.seek((pageno - 1) * PAGE_SIZE)
            f.write(b"\xa5" * PAGE_SIZE)
        if stale_copies_too:
            with open(f"{path}-wal", "r+b") as f:
                for offset in stale:
                    f.seek(offset)
                    f.write(b"\xa5" * PAGE_SIZE)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    assert sorted(page) == list(range(first, last + 1)), (first, last, sorted(page))
    return page


def announced_gaps(platform: Collector) -> list[dict]:
    return [m for m in platform.json_messages("/data") if "gap" in m]


def unexplained(platform: Collector, upto: int) -> list[int]:
    """The seqs up to `upto` neither delivered nor announced lost."""
    covered = set(platform.reading_seqs())
    for m in announced_gaps(platform):
        covered.update(range(m["gap"][0], m["gap"][1] + 1))
    return sorted(set(range(1, upto + 1)) - covered)


def every_seq_delivered_or_announced(platform: Collector, upto: int) -> None:
    try:
        wait_for(lambda: not unexplained(platform, upto), 30, f"every seq up to {upto} delivered or announced lost")
    except AssertionError:
        missing = unexplained(platform, upto)
        raise AssertionError(f"{len(missing)} seqs neither delivered nor announced: {missing[:10]}; gaps "
                             f"{[m['gap'] for m in announced_gaps(platform)]}") from None


def rescued(path: Path, agent: AgentProcess) -> bool:
    return "is damaged while the agent runs" in agent.log() and bool(list(path.parent.glob("buffer.db.corrupt-*")))


def gap_runs(platform: Collector) -> list[tuple[int, int]]:
    return [(m["gap"][0], m["gap"][1]) for m in announced_gaps(platform)]


@pytest.mark.parametrize("stale_copies", ["damaged too", "left in the WAL"])
def test_a_page_damaged_in_the_backlog_costs_its_readings_not_the_rest_of_the_drain(tmp_path, stale_copies):
    """With the page's copies in the WAL damaged too, its readings are lost and announced; with them
    left, each of its readings is delivered as it was stored or announced lost. Either way every other
    reading arrives, in order, once (the backlog was never offered before the outage), and no seq is both
    delivered and announced lost."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    path, agent = start_station(tmp_path, broker)
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 100, 20, "readings before the outage")
        broker.stop()
        offered = db_last_seq(path)  # the broker is gone: no seq above this one reached it
        wait_for(lambda: db_last_seq(path) > offered + 1200, 30, "a backlog while the broker is away")
        page = damage_a_leaf(path, above=offered + 1, stale_copies_too=stale_copies == "damaged too")
        before = db_last_seq(path)
        broker.start()
        wait_for(lambda: rescued(path, agent), 30, "the damaged file checked, moved aside and rescued")
        target = wait_for(lambda: (n := max(platform.reading_seqs())) > before + 100 and n, 20,
                          "readings from the fresh file delivered")
        every_seq_delivered_or_announced(platform, target)
        readings = [r for m in platform.json_messages("/data") for r in m.get("readings", [])]
        seqs = [r["seq"] for r in readings]
        runs = gap_runs(platform)
        announced = lambda seq: any(a <= seq <= b for a, b in runs)  # noqa: E731
        both = sorted(s for s in set(seqs) if announced(s))
        assert not both, f"seqs delivered and announced lost: {both[:10]}; gaps {runs}"
        lost_readable = [s for s in range(1, before + 1) if s not in page and announced(s)]
        assert not lost_readable, f"readable readings announced lost: {lost_readable[:10]}; gaps {runs}"
        assert all(r["reason"] == "buffer_corrupt" for r in announced_gaps(platform)), announced_gaps(platform)
        firsts = list(dict.fromkeys(seqs))
        assert firsts == sorted(firsts), "readings arrive in seq order"
        twice = sorted(s for s, n in Counter(seqs).items() if n > 1 and s > offered)
        assert not twice, f"readings never offered before the outage arrived more than once: {twice[:10]}"
        delivered_of_page = {r["seq"]: r for r in readings if r["seq"] in page}
        assert all(r == page[s] for s, r in delivered_of_page.items()), "the page's readings arrive as stored"
        if stale_copies == "damaged too":
            assert not delivered_of_page, "no copy of the page's readings was left to read"
            assert all(announced(s) for s in page), f"seqs {min(page)}..{max(page)} announced lost: {runs}"
        assert agent.alive(), "the agent keeps running"
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
    platform.close()
    broker.stop()


def test_a_resend_over_a_damaged_page_is_answered_and_later_ones_are_too(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    platform = Collector(broker, "env/#")
    path, agent = start_station(tmp_path, broker)

    def resend(cmd_id: str, first: int, last: int) -> dict:
        platform.client.publish("env/TEST0001/cmd", json.dumps({"id": cmd_id, "cmd": "resend", "from_seq": first,
                                                                "to_seq": last}), qos=1)

        def reply() -> dict | None:
            return next((m for m in platform.json_messages("/cmd/reply") if m.get("id") == cmd_id), None)

        return wait_for(reply, 30, f"the reply to resend {cmd_id}")

    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 1000, 30, "readings delivered")
        page = damage_a_leaf(path, above=0, stale_copies_too=True)
        first, last = min(page), max(page)
        answer = resend("over-the-damage", 1, last + 50)
        if answer["ok"]:  # read from the rescued file: the damaged page's readings are missing from it
            missing = answer.get("missing", [])
            assert any(a <= first and last <= b for a, b in missing), (first, last, json.dumps(answer))
        else:
            assert "malformed" in answer["error"], answer
        wait_for(lambda: rescued(path, agent), 30, "the damaged file checked, moved aside and rescued")
        newest = wait_for(lambda: (n := max(platform.reading_seqs())) > last + 2000 and n, 20,
                          "readings from the fresh file delivered")
        every_seq_delivered_or_announced(platform, newest)
        answer = resend("after-the-rescue", first - 100, newest)
        assert answer["ok"], answer
        missing = {s for a, b in answer.get("missing", []) for s in range(a, b + 1)}
        assert answer["count"] + len(missing) == newest - first + 101, f"every seq accounted for: {answer}"
        assert set(range(first, last + 1)) <= missing, answer
        assert agent.alive()
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0
    platform.close()
    broker.stop()
