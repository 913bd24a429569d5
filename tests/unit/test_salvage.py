"""A corrupt buffer file on real SQLite files: what is still readable of it reaches the fresh file
with its seqs, and every seq the fresh file cannot account for is recorded as a gap to announce."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import fill_disk

from agent.buffer import SALVAGE_UNFINISHED, Buffer, RescueCutShort
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, Reading, now_ms
from agent.pagescan import scan
from agent.recorder import VERIFY_EVERY_S, Recorder
from agent.salvage import GAP_REASON
from agent.seqmark import SeqMark
from agent.status import collect
from agent.uplink import META_PREFIX


def readings(n: int) -> list[Reading]:
    t = now_ms()
    return [Reading("d", f"c{i % 10}", t + i, float(i), "mg/L", "N") for i in range(n)]


def filled_buffer(path: Path, n: int, *, sent: int, clean: bool = False) -> None:
    """A closed buffer file with `n` readings in commits of 40 (the first `sent` acknowledged), one
    aggregate event and an alarm state in meta. Its writer ends as after a power cut (the mark beside
    it does not know its last seq: new ones go above the mark), or with `clean`, by a clean close
    (the mark notes its last seq and watermark)."""
    buf = Buffer.open_writer(path)
    for k in range(0, n, 40):
        buf.begin()
        buf.insert_readings(readings(min(40, n - k)))
        buf.commit()
    buf.begin()
    buf.insert_event(STREAM_AGGREGATES, now_ms(), {"period": "1h", "n": 1})
    buf.set_sent_upto(STREAM_READINGS, sent)
    buf.set_meta("alarm_state", '{"active": ["cod.w01018"]}')
    buf.commit()
    if clean:
        buf.close()
    else:
        buf.conn.close()


def pages_of(path: Path, table: str, pagetype: str = "leaf") -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name=? AND pagetype=? ORDER BY pageno",
                                           (table, pagetype))]
    finally:
        conn.close()


def damage(path: Path, pageno: int, page_size: int = 1024) -> None:
    with open(path, "r+b") as f:
        f.seek((pageno - 1) * page_size)
        f.write(b"\xa5" * page_size)


def gaps(buf: Buffer) -> list[tuple[int, int, str]]:
    return [(g.first_seq, g.last_seq, g.reason) for g in buf.pending_gaps()]


def root_page(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT pageno FROM dbstat WHERE name=? AND path='/'", (table,)).fetchone()[0]
    finally:
        conn.close()


def raise_two_alarms_clear_one(path: Path) -> None:
    buf = Buffer.open_writer(path)
    buf.begin()
    for ts, body in [(1000, {"id": "sim.a:above", "channel": "sim.a", "rule": "above", "state": "raised",
                             "value": 90, "threshold": 80, "ts": "2026-11-29T00:00:01.000Z"}),
                     (2000, {"id": "sim.b:above", "channel": "sim.b", "rule": "above", "state": "raised",
                             "value": 9, "threshold": 8, "ts": "2026-11-29T00:00:02.000Z"}),
                     (3000, {"id": "sim.b:above", "channel": "sim.b", "rule": "above", "state": "cleared",
                             "value": 7, "threshold": 8, "ts": "2026-11-29T00:00:03.000Z"})]:
        buf.insert_event(STREAM_ALARMS, ts, body)
    buf.commit()
    buf.close()


def assert_next_seq(buf: Buffer, expected: int) -> None:
    buf.begin()
    assert buf.insert_readings(readings(1))[0].seq == expected, "new readings continue above the high-water mark"
    buf.commit()

def assert_one_pages_readings_lost(buf: Buffer, last: int, mark: int, page_rows: int = 50) -> None:
    """Every reading 1..last is salvaged but for those of one damaged page, which are announced as
    lost, as is the jump from `last` to the high-water mark."""
    salvaged = {r.seq for r in buf.readings_after(0, 10_000)}
    announced = gaps(buf)
    assert {reason for _, _, reason in announced} == {GAP_REASON}
    lost = {s for a, b, _ in announced for s in range(a, min(b, last) + 1)}
    assert len(lost) <= page_rows, "a 1 KiB page holds a few dozen readings: only those are lost"
    assert salvaged | lost == set(range(1, last + 1)), "every other reading, before and after the damage"
    assert not salvaged & lost
    assert max(b for _, b, _ in announced) == mark, "the jump to the high-water mark is announced too"

def test_unpublished_readings_survive_damage_to_another_table(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 2000, sent=500)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]  # reserved beside the file
    damage(path, pages_of(path, "meta")[0])
    calls: list[int] = []
    buf = Buffer.open_writer(path, progress=lambda: calls.append(1))
    try:
        assert calls, "a long salvage says it is progressing (systemd's start timeout, the watchdog)"
        assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name], "the damaged file is kept"
        got = buf.readings_after(0, 10_000)
        assert [r.seq for r in got] == list(range(501, 2001)), "every unpublished reading, same seq"
        assert (got[0].channel, got[0].value, got[0].unit) == ("c0", 20.0, "mg/L"), "the 501st reading's value"
        assert buf.sent_upto(STREAM_READINGS) == 500, "publishing resumes at the first salvaged reading"
        assert gaps(buf) == [(2001, mark, GAP_REASON)], "the jump to the high-water mark is announced"
        assert [e.body["period"] for e in buf.events_after(STREAM_AGGREGATES, 0, 10)] == ["1h"]
        buf.begin()
        new = buf.insert_readings(readings(1))
        buf.commit()
        assert new[0].seq == mark + 1, "new readings continue above the high-water mark"
    finally:
        buf.close()


def test_with_the_watermark_page_damaged_what_was_acknowledged_is_not_sent_again(tmp_path):
    """The acknowledged watermark noted beside the mark at the clean stop stands in for the file's
    own: days of published readings kept for `resend` would otherwise all be published again."""
    path = tmp_path / "b.db"
    filled_buffer(path, 2000, sent=500, clean=True)
    damage(path, pages_of(path, "streams")[0])
    buf = Buffer.open_writer(path)
    try:
        assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
        assert [r.seq for r in buf.readings_after(0, 10_000)] == list(range(501, 2001))
    finally:
        buf.close()


def test_a_watermark_noted_by_another_buffer_above_all_of_this_one_is_not_taken(tmp_path):
    """storage.path changed and changed back: the note beside the mark may be another buffer's."""
    path = tmp_path / "b.db"
    filled_buffer(path, 2000, sent=500, clean=True)
    marks = json.loads((tmp_path / "b.db.seq").read_text())
    (tmp_path / "b.db.seq").write_text(json.dumps({**marks, "readings.acked": 30_000}))
    damage(path, pages_of(path, "streams")[0])
    buf = Buffer.open_writer(path)
    try:
        assert [r.seq for r in buf.readings_after(0, 10_000)] == list(range(1, 2001)), "a duplicate, never a loss"
    finally:
        buf.close()

@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_a_damaged_page_of_readings_costs_only_the_readings_on_it(tmp_path, which):
    path = tmp_path / "b.db"
    filled_buffer(path, 3000, sent=0)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    leaves = pages_of(path, "readings")
    damage(path, {"first": leaves[0], "middle": leaves[len(leaves) // 2], "last": leaves[-1]}[which])
    buf = Buffer.open_writer(path)
    try:
        assert_one_pages_readings_lost(buf, 3000, mark)
        assert len(buf.readings_after(0, 10_000)) < 3000, "the damaged page's readings are gone"
        assert_next_seq(buf, mark + 1)
    finally:
        buf.close()


def test_after_a_clean_close_a_damaged_file_s_seqs_continue_right_after_its_last_one(tmp_path):
    """The mark noted the last seq issued at the clean close: no seq above it was ever issued, so the
    fresh file continues right after it, and only the damaged page's readings are announced lost."""
    path = tmp_path / "b.db"
    filled_buffer(path, 3000, sent=0, clean=True)
    leaves = pages_of(path, "readings")
    damage(path, leaves[len(leaves) // 2])
    buf = Buffer.open_writer(path)
    try:
        salvaged = {r.seq for r in buf.readings_after(0, 10_000)}
        [(first, last, reason)] = gaps(buf)
        assert reason == GAP_REASON and 0 < last - first < 50, "one page's readings, no jump beyond seq 3000"
        assert salvaged == set(range(1, 3001)) - set(range(first, last + 1))
        assert_next_seq(buf, 3001)
    finally:
        buf.close()


def test_a_file_with_nothing_readable_starts_fresh_above_the_mark_and_announces_the_jump(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 100, sent=0)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    path.write_bytes(b"\x00garbage from a failing SD card" * 3000)
    buf = Buffer.open_writer(path)
    try:
        assert buf.readings_after(0, 10) == []
        assert gaps(buf) == [(1, mark, "buffer_corrupt")], \
            "where the old file tells nothing, the mark beside it tells what was acknowledged (nothing)"
        buf.begin()
        assert buf.insert_readings(readings(1))[0].seq > 100
        buf.commit()
    finally:
        buf.close()


def test_a_file_found_corrupt_while_running_is_replaced_and_readers_notice(tmp_path):
    """The recorder's rescue while running: same salvage, and a reader of the old file sees that the
    path now holds another file (the publisher and the HJ 212 uplink then reopen)."""
    path = tmp_path / "b.db"
    filled_buffer(path, 400, sent=100)
    recorder = Recorder(Buffer.open_writer(path), commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    reader = Buffer.open_reader(path)
    try:
        assert not reader.replaced()
        damage(path, pages_of(path, "meta")[0])
        recorder._rescue_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
        assert reader.replaced()
        fresh = Buffer.open_reader(path)
        assert [r.seq for r in fresh.readings_after(0, 1000)] == list(range(101, 401))
        assert not fresh.replaced()
        fresh.close()
    finally:
        reader.close()
        recorder.buffer.close()


def test_a_rescue_the_full_disk_cut_short_still_salvages_once_there_is_room(small_disk):
    """The file turns out corrupt while the disk is full: it is moved aside (a rename needs no room), but
    the fresh file cannot be made. The recorder retries, and the retry only opened a fresh file: the
    rows of the file moved aside (300 unpublished readings here) were never salvaged, announced lost as
    `buffer_missing` though they were readable. The retry, once there is room, salvages them."""
    path = small_disk / "b.db"
    filled_buffer(path, 400, sent=100)
    recorder = Recorder(Buffer.open_writer(path), commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    try:
        damage(path, pages_of(path, "meta")[0])
        filler = fill_disk(small_disk, leave_bytes=0)
        recorder._rescue_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
        assert list(small_disk.glob("b.db.corrupt-*")), "moved aside all the same"
        filler.unlink()  # the operator frees space
        recorder._commit_once()
        fresh = Buffer.open_reader(path)
        try:
            assert [r.seq for r in fresh.readings_after(0, 1000)] == list(range(101, 401))
            assert not [g for g in gaps(fresh) if g[0] <= 400], gaps(fresh)
        finally:
            fresh.close()
    finally:
        recorder.buffer.close()


def test_a_rescue_the_full_disk_cut_short_is_salvaged_once_by_the_next_start(small_disk):
    """As above, but the agent stops (or is killed) before there is room for the fresh file: the next start
    made a fresh file and announced the 300 unpublished seqs as lost (`buffer_missing`), the file moved aside
    ignored. The marker beside the buffer has the next start with room salvage it, and only that start."""
    path = small_disk / "b.db"
    filled_buffer(path, 400, sent=100)
    recorder = Recorder(Buffer.open_writer(path), commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    damage(path, pages_of(path, "meta")[0])
    filler = fill_disk(small_disk, leave_bytes=0)
    recorder._rescue_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    assert recorder._rescue_pending is not None, "no fresh file yet"
    with pytest.raises(RescueCutShort):
        Buffer.open_writer(path)  # a start on the still full disk waits for room, as the first did
    filler.unlink()  # the agent was stopped; the operator frees space; it starts again
    buf = Buffer.open_writer(path)
    try:
        assert [r.seq for r in buf.readings_after(0, 1000)] == list(range(101, 401))
        assert not [g for g in gaps(buf) if g[0] <= 400], gaps(buf)
        assert not list(small_disk.glob("b.db.unsalvaged-*")), "the marker gone once salvaged"
        buf.begin()
        buf.set_sent_upto(STREAM_READINGS, 400)  # all delivered
        buf.commit()
    finally:
        buf.close()
    buf = Buffer.open_writer(path)  # a later start salvages nothing again
    try:
        assert buf.sent_upto(STREAM_READINGS) == 400 and not [g for g in gaps(buf) if g[0] <= 400]
    finally:
        buf.close()


def test_a_reader_s_report_of_a_damaged_page_is_checked_before_the_file_is_rescued(tmp_path):
    """`suspect_corruption`: the recorder reads the whole file before it rescues it (a report the check
    does not confirm leaves the file as it is), and not again within VERIFY_EVERY_S."""
    path = tmp_path / "b.db"
    filled_buffer(path, 400, sent=100)
    recorder = Recorder(Buffer.open_writer(path), commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    malformed = sqlite3.DatabaseError("database disk image is malformed")
    moved_aside = lambda: list(tmp_path.glob("b.db.corrupt-*"))  # noqa: E731
    try:
        recorder.suspect_corruption("publisher", malformed)
        recorder._housekeeping(time.monotonic())
        assert not moved_aside(), "a file the check finds sound is kept"
        damaged = pages_of(path, "readings")[5]
        damage(path, damaged)
        recorder.suspect_corruption("publisher", malformed)
        recorder._housekeeping(time.monotonic())
        assert not moved_aside(), "checked again only VERIFY_EVERY_S after the last check"
        recorder._housekeeping(time.monotonic() + VERIFY_EVERY_S)
        assert moved_aside(), "the damage confirmed: the file rescued"
        fresh = Buffer.open_reader(path)
        kept = [r.seq for r in fresh.readings_after(0, 1000)]
        lost = sorted(set(range(101, 401)) - set(kept))
        assert lost and gaps(fresh)[0] == (lost[0], lost[-1], GAP_REASON), "the damaged page's readings announced"
        assert kept[0] == 101 and kept[-1] == 400
        fresh.close()
    finally:
        recorder.buffer.close()


def test_a_rescue_while_running_salvages_the_copies_of_a_damaged_page_its_wal_still_holds(tmp_path):
    """A page damaged on the card after it was checkpointed: SQLite no longer reads the copies of it that
    older frames of the WAL still hold (the WAL started over), but the salvage finds them there. The
    running rescue closes the writer before it moves the file aside; when no other connection had the file
    open (the publisher's reader dropped after its failed read), SQLite checkpointed the WAL at that close
    and deleted it with those copies, and the page's readings were announced lost though readable: whether
    they were depended on the publisher's timing."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    for _ in range(10):
        buf.begin()
        buf.insert_readings(readings(40))
        buf.commit()
    busy, frames, copied = buf.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied
    buf.begin()
    buf.insert_readings(readings(1))  # the WAL starts over: its older frames are no longer SQLite's
    buf.set_sent_upto(STREAM_READINGS, 40)
    buf.commit()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:  # the fourth leaf of readings in key order, and its seqs
        leaves = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name='readings' AND pagetype='leaf' "
                              "ORDER BY path").fetchall()
        damaged, cells = leaves[3]
        before = sum(n for _, n in leaves[:3])
        on_page = [r[0] for r in conn.execute("SELECT seq FROM readings ORDER BY seq LIMIT ? OFFSET ?",
                                              (cells, before))]
    finally:
        conn.close()
    in_wal = {row[0] for _, row, _ in scan(path, {STREAM_READINGS}, wal_only=True)}
    assert on_page and set(on_page) <= in_wal, "the WAL's older frames hold copies of the page"
    recorder = Recorder(buf, commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    try:
        damage(path, damaged)
        recorder.suspect_corruption("publisher", sqlite3.DatabaseError("database disk image is malformed"))
        recorder._housekeeping(time.monotonic() + VERIFY_EVERY_S)
        assert list(tmp_path.glob("b.db.corrupt-*")), "the damage confirmed: the file rescued"
        fresh = Buffer.open_reader(path)
        try:
            assert [r.seq for r in fresh.readings_after(0, 1000)] == list(range(41, 402)), "every reading salvaged"
            assert not [g for g in gaps(fresh) if g[0] <= 401], gaps(fresh)
        finally:
            fresh.close()
    finally:
        recorder.buffer.close()


def crashed_copy(tmp_path: Path, commits: int, also=None) -> tuple[Path, int]:
    """A buffer after `commits` commits of 40 readings (and what `also(buf, k)` adds to the k-th),
    copied as a power cut leaves it (its newest commits in the WAL, nothing checkpointed): the copy's
    directory and the last seq issued."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    crashed.mkdir()
    buf = Buffer.open_writer(live / "b.db")
    for k in range(commits):
        buf.begin()
        issued = buf.insert_readings(readings(40))
        if also is not None:
            also(buf, k)
        buf.commit()
    for name in ("b.db", "b.db-wal", "b.db.seq"):
        (crashed / name).write_bytes((live / name).read_bytes())
    buf.close()
    return crashed, issued[-1].seq


def test_a_damaged_wal_frame_is_corruption_not_a_silently_shorter_file(tmp_path):
    """After a crash the newest commits live in the WAL. A damaged frame there makes SQLite drop
    every commit after it without a word: the file looks sound, only shorter, and the seqs of the
    dropped rows (maybe published already) would be issued again. It is treated as corruption."""
    crashed, last = crashed_copy(tmp_path, commits=30)
    wal = crashed / "b.db-wal"
    frames = (wal.stat().st_size - 32) // 1048
    with open(wal, "r+b") as f:  # one frame a third of the way in: bit rot
        f.seek(32 + frames // 3 * 1048 + 24 + 500)
        f.write(b"\xde\xad\xbe\xef")
    again = Buffer.open_writer(crashed / "b.db")
    try:
        assert [p for p in crashed.iterdir() if ".corrupt-" in p.name], "treated as corrupt, kept aside"
        again.begin()
        assert again.insert_readings(readings(1))[0].seq > last, "no seq issued before is issued again"
        again.commit()
        announced = [(g.first_seq, g.last_seq) for g in again.pending_gaps()]
        assert announced and announced[-1][1] >= last, "the seqs it can no longer account for are announced"
    finally:
        again.close()


@pytest.mark.parametrize("offset", [16, 28], ids=["salt", "checksum"])
def test_a_damaged_wal_header_is_corruption_and_its_frames_are_salvaged(tmp_path, offset):
    """A damaged WAL header makes SQLite ignore the whole WAL without a word: every commit since the
    last checkpoint would be gone and its seqs issued again."""
    crashed, last = crashed_copy(tmp_path, commits=30)
    with open(crashed / "b.db-wal", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))
    mark = json.loads((crashed / "b.db.seq").read_text())[STREAM_READINGS]
    again = Buffer.open_writer(crashed / "b.db")
    try:
        assert [p for p in crashed.iterdir() if ".corrupt-" in p.name], "treated as corrupt, kept aside"
        assert [r.seq for r in again.readings_after(0, 10_000)] == list(range(1, last + 1)), "read from the frames"
        assert gaps(again) == [(last + 1, mark, GAP_REASON)]
        assert_next_seq(again, mark + 1)
    finally:
        again.close()

def test_after_a_damaged_wal_frame_state_and_watermark_come_from_the_frames_that_follow(tmp_path):
    """An alarm raised in a commit after the damaged frame: its event is recovered from the frames
    that follow, and so must be the state written with it, or the alarm would be raised twice."""
    def raise_alarm_late(buf: Buffer, k: int) -> None:
        if k == 25:
            buf.insert_event(STREAM_ALARMS, 1000, {"id": "d.c1:above", "channel": "d.c1", "rule": "above",
                                                    "state": "raised", "value": 9, "threshold": 8,
                                                    "ts": "2026-11-29T00:00:01.000Z"})
            buf.set_meta("alarm_state", '{"v": 1, "active": [{"id": "d.c1:above"}]}')
            buf.set_sent_upto(STREAM_READINGS, 1000)
        if k == 2:
            buf.set_meta("alarm_state", '{"v": 1, "active": []}')

    crashed, last = crashed_copy(tmp_path, commits=30, also=raise_alarm_late)
    wal = crashed / "b.db-wal"
    frames = (wal.stat().st_size - 32) // 1048
    with open(wal, "r+b") as f:
        f.seek(32 + frames // 3 * 1048 + 24 + 500)
        f.write(b"\xde\xad\xbe\xef")
    again = Buffer.open_writer(crashed / "b.db")
    try:
        assert [e.body["id"] for e in again.events_after(STREAM_ALARMS, 0, 10)] == ["d.c1:above"]
        assert json.loads(again.meta_value("alarm_state") or "{}")["active"] == [{"id": "d.c1:above"}], \
            "the state that goes with the recovered event"
        assert again.readings_after(0, 1)[0].seq == 1001, "what was acknowledged (newest copy) is not sent again"
    finally:
        again.close()

def test_with_the_newest_copy_of_the_state_damaged_the_alarms_follow_their_events(tmp_path):
    """The WAL frame holding the newest alarm state is damaged; the event written with it is not.
    The older state says active: the alarm would be cleared a second time."""
    def raise_then_clear(buf: Buffer, k: int) -> None:
        for at, state, active in ((5, "raised", '[{"id": "d.c1:above"}]'), (20, "cleared", "[]")):
            if k == at:
                buf.insert_event(STREAM_ALARMS, 1000 + k, {"id": "d.c1:above", "channel": "d.c1", "rule": "above",
                                                           "state": state, "value": 9, "threshold": 8,
                                                           "ts": "2026-11-29T00:00:01.000Z"})
                buf.set_meta("alarm_state", '{"v": 1, "active": ' + active + '}')

    crashed, _ = crashed_copy(tmp_path, commits=30, also=raise_then_clear)
    meta_page = pages_of(tmp_path / "live" / "b.db", "meta")[0]
    wal = crashed / "b.db-wal"
    data = bytearray(wal.read_bytes())
    frames = [i for i in range((len(data) - 32) // 1048)
              if int.from_bytes(data[32 + i * 1048:36 + i * 1048], "big") == meta_page]
    newest = 32 + frames[-1] * 1048 + 24
    data[newest:newest + 1024] = b"\xa5" * 1024
    wal.write_bytes(bytes(data))
    again = Buffer.open_writer(crashed / "b.db")
    try:
        assert [e.body["state"] for e in again.events_after(STREAM_ALARMS, 0, 10)] == ["raised", "cleared"]
        assert json.loads(again.meta_value("alarm_state") or "{}")["active"] == [], "cleared, as its last event says"
    finally:
        again.close()

def test_a_crash_leaves_a_wal_that_opens_as_it_is(tmp_path):
    crashed, last = crashed_copy(tmp_path, commits=10)
    again = Buffer.open_writer(crashed / "b.db")
    try:
        assert not [p for p in crashed.iterdir() if ".corrupt-" in p.name]
        assert not (crashed / "b.db-wal.kept").exists(), "the WAL's safety link goes once the file proves sound"
        again.begin()
        assert again.insert_readings(readings(1))[0].seq == last + 1, "numbering goes right on"
        again.commit()
    finally:
        again.close()


def test_with_the_state_page_damaged_the_active_alarms_are_rebuilt_from_the_alarm_events(tmp_path):
    """An alarm raised before the damage must not be raised a second time (SPEC §4): its state lived
    in the damaged meta page, its events in the alarms table."""
    path = tmp_path / "b.db"
    filled_buffer(path, 200, sent=0)
    raise_two_alarms_clear_one(path)
    damage(path, pages_of(path, "meta")[0])
    buf = Buffer.open_writer(path)
    try:
        state = json.loads(buf.meta_value("alarm_state") or "{}")
        assert [(a["id"], a["since_ms"], a["threshold"]) for a in state["active"]] == [("sim.a:above", 1000, 80)]
        shown = json.loads(buf.meta_value("active_alarms") or "[]")
        assert [(a["id"], a["since"]) for a in shown] == [("sim.a:above", "2026-11-29T00:00:01.000Z")]
    finally:
        buf.close()


@pytest.mark.parametrize("damaged", ["file header (page 1)", "root page of readings"])
def test_rows_under_a_damaged_header_or_root_page_are_read_from_their_leaf_pages(tmp_path, damaged):
    """Page 1 and a table's root page are rewritten at nearly every checkpoint: the pages a failing
    card damages most. SQLite then reaches no row at all, but the leaf pages still hold them."""
    path = tmp_path / "b.db"
    filled_buffer(path, 3000, sent=1000)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    damage(path, 1 if damaged.startswith("file") else root_page(path, "readings"))
    buf = Buffer.open_writer(path)
    try:
        got = buf.readings_after(0, 10_000)
        assert [r.seq for r in got] == list(range(1001, 3001)), "every unpublished reading, same seq, none published"
        assert [(r.channel, r.value, r.unit, r.flag) for r in got] == [
            (f"c{(s - 1) % 40 % 10}", float((s - 1) % 40), "mg/L", "N") for s in range(1001, 3001)], "their values"
        assert buf.sent_upto(STREAM_READINGS) == 1000, "publishing resumes at the first salvaged reading"
        assert gaps(buf) == [(3001, mark, GAP_REASON)], "only the jump to the high-water mark is announced"
        assert [e.body["period"] for e in buf.events_after(STREAM_AGGREGATES, 0, 10)] == ["1h"]
        assert_next_seq(buf, mark + 1)
    finally:
        buf.close()


def test_with_the_root_and_a_leaf_damaged_only_the_leafs_readings_are_lost_and_announced(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 3000, sent=0)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    leaves = pages_of(path, "readings")
    damage(path, root_page(path, "readings"))
    damage(path, leaves[len(leaves) // 2])
    buf = Buffer.open_writer(path)
    try:
        assert_one_pages_readings_lost(buf, 3000, mark)
        assert len(buf.readings_after(0, 10_000)) < 3000, "the damaged leaf's readings are gone"
    finally:
        buf.close()


def test_with_the_file_header_damaged_the_active_alarms_come_back_from_the_alarm_pages(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 200, sent=200)
    raise_two_alarms_clear_one(path)
    damage(path, 1)
    buf = Buffer.open_writer(path)
    try:
        state = json.loads(buf.meta_value("alarm_state") or "{}")
        assert [(a["id"], a["since_ms"]) for a in state["active"]] == [("sim.a:above", 1000)], \
            "raised before the damage, not raised a second time"
        assert buf.readings_after(0, 10) == [], "the published readings are not sent again"
    finally:
        buf.close()


def test_the_commits_after_a_damaged_wal_frame_are_read_from_the_frames_that_follow(tmp_path):
    """SQLite stops reading a WAL at a damaged frame; the frames after it still hold their rows (and
    later copies of the damaged page often hold its rows too)."""
    crashed, last = crashed_copy(tmp_path, commits=30)
    wal = crashed / "b.db-wal"
    frames = (wal.stat().st_size - 32) // 1048
    with open(wal, "r+b") as f:
        f.seek(32 + frames // 3 * 1048 + 24 + 500)
        f.write(b"\xde\xad\xbe\xef")
    mark = json.loads((crashed / "b.db.seq").read_text())[STREAM_READINGS]
    wal_size = wal.stat().st_size
    again = Buffer.open_writer(crashed / "b.db")
    try:
        kept = [p for p in crashed.iterdir() if p.name.endswith("-wal") and ".corrupt-" in p.name]
        assert [p.stat().st_size for p in kept] == [wal_size], "the whole WAL is kept beside the damaged file"
        assert not (crashed / "b.db-wal.kept").exists()
        assert_one_pages_readings_lost(again, last, mark)
    finally:
        again.close()


def test_with_the_file_header_damaged_an_unannounced_gap_is_still_announced(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 400, sent=0)
    buf = Buffer.open_writer(path)
    buf.begin()
    announced = buf.record_gap(STREAM_READINGS, 1, 40, "buffer_full", now_ms())
    buf.mark_gap_announced(announced.id, 40)
    buf.record_gap(STREAM_READINGS, 101, 140, "buffer_full", now_ms())
    buf.commit()
    buf.close()
    damage(path, 1)
    buf = Buffer.open_writer(path)
    try:
        assert (101, 140, "buffer_full") in gaps(buf)
        assert (1, 40, "buffer_full") not in gaps(buf), "announced already"
    finally:
        buf.close()


def buffer_behind_an_uplink(path: Path, uplinks: dict[str, int]) -> None:
    """A closed buffer file with 3000 readings, the first 2000 acknowledged by MQTT, and one aggregate
    event, acknowledged too; `uplinks`: the HJ 212 uplinks' progress in readings (host:port -> seq)."""
    buf = Buffer.open_writer(path)
    for _ in range(0, 3000, 40):
        buf.begin()
        buf.insert_readings(readings(40))
        buf.commit()
    buf.begin()
    buf.insert_event(STREAM_AGGREGATES, now_ms(), {"period": "1h", "n": 1})
    buf.set_sent_upto(STREAM_READINGS, 2000)
    buf.set_sent_upto(STREAM_AGGREGATES, 1)
    for where, upto in uplinks.items():
        buf.set_meta(f"{META_PREFIX}{where}", json.dumps({STREAM_READINGS: upto, STREAM_AGGREGATES: 0,
                                                           "state": "offline", "error": None, "since": None}))
    buf.commit()
    buf.close()


def test_rows_an_hj212_uplink_has_not_delivered_are_salvaged_and_not_published_again(tmp_path):
    """Published on MQTT, not yet acknowledged by an HJ 212 platform (its uplink's progress lags): the
    buffer keeps such rows for the uplink (never purged for their age). A corrupt file's salvage copied only
    what MQTT had not acknowledged: the platform lost every readable reading and period between its progress
    and MQTT's, with the uplink's error 'no longer in the buffer … lost with a corrupt file' (audit audb)."""
    path = tmp_path / "b.db"
    buffer_behind_an_uplink(path, {"127.0.0.1:9000": 1200})
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    damage(path, pages_of(path, "readings")[-3])  # a leaf of readings MQTT has not published yet
    buf = Buffer.open_writer(path)
    try:
        assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
        lost = {s for a, b, _ in gaps(buf) for s in range(a, min(b, 3000) + 1)}
        assert lost and min(lost) > 2000, "only the damaged page's readings, all unpublished, are announced lost"
        polls = buf.reading_polls(1200, 10_000)  # what the uplink reads from its progress on
        assert [r.seq for p in polls for r in p.readings] == sorted(set(range(1201, 3001)) - lost)
        assert buf.sent_upto(STREAM_READINGS) == 2000, "MQTT does not publish again what its broker acknowledged"
        assert [e.body["period"] for e in buf.events_after(STREAM_AGGREGATES, 0, 10)] == ["1h"], "the platform's period"
        assert buf.sent_upto(STREAM_AGGREGATES) == 1
        assert json.loads(buf.meta_value(f"{META_PREFIX}127.0.0.1:9000"))[STREAM_READINGS] == 1200
        assert_next_seq(buf, mark + 1)
    finally:
        buf.close()


def test_the_progress_of_an_uplink_no_longer_configured_does_not_widen_the_salvage(tmp_path):
    """An uplink removed from the configuration leaves its progress in the meta (here at 0). Counted by the
    salvage, it had every row still stored copied (as much room again as the file: on a full card the copy
    failed, and the unpublished rows it could have kept were announced lost); only the uplinks configured
    now hold rows back."""
    path = tmp_path / "b.db"
    buffer_behind_an_uplink(path, {"10.0.0.9:9000": 0, "127.0.0.1:9000": 1200})  # removed, configured
    damage(path, pages_of(path, "readings")[-3])
    buf = Buffer.open_writer(path, holders=[f"{META_PREFIX}127.0.0.1:9000"])
    try:
        lost = {s for a, b, _ in gaps(buf) for s in range(a, min(b, 3000) + 1)}
        stored = [r.seq for p in buf.reading_polls(0, 10_000) for r in p.readings]
        assert stored == sorted(set(range(1201, 3001)) - lost), "the configured uplink's rows on, not every row"
    finally:
        buf.close()


@pytest.mark.parametrize("mark", ["kept", "lost too"])
def test_a_salvage_the_disk_has_no_room_for_still_announces_what_the_fresh_file_lacks(tmp_path, small_disk, mark):
    """A long outage fills the buffer to its cap, then the card damages a page: the rescue's copy of the
    unpublished rows needs as much room again, and the disk (the README's max_mb + 16 MiB) has not got it.
    The salvage stopped, rolled back, and the fresh file continued above the old seqs with nothing
    announced: 29 000 readings gone without a gap, a jump SPEC §3 forbids; with the mark beside the file lost
    too, the fresh file numbered from 1 again, every seq issued twice (audit audb)."""
    path = small_disk / "b.db"
    buf = Buffer.open_writer(path)
    for _ in range(0, 30_000, 1000):
        buf.begin()
        buf.insert_readings(readings(1000))
        buf.commit()
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 1000)
    buf.commit()
    buf.close()
    damage(path, pages_of(path, "readings")[len(pages_of(path, "readings")) // 2])
    if mark == "lost too":
        (small_disk / "b.db.seq").unlink()
    filler = fill_disk(small_disk, leave_bytes=300 * 1024)
    buf = Buffer.open_writer(path)
    try:
        assert [p for p in small_disk.iterdir() if p.name.endswith(".txt")], "the damaged file is kept, with its note"
        stored = {r.seq for r in buf.readings_after(0, 40_000)}
        announced = {s for a, b, _ in gaps(buf) for s in range(a, b + 1)}
        assert set(range(1001, 30_001)) <= stored | announced, "every unpublished seq salvaged or announced lost"
        assert not announced & set(range(1, 1001)), "what the broker acknowledged is not announced lost"
        filler.unlink()
        assert_next_seq(buf, 30_001)
    finally:
        buf.close()


def test_status_during_a_salvage_says_the_backlog_is_not_known_yet(tmp_path):
    """While the rows of a corrupt file are copied into the fresh one (minutes for a large file), `status`
    read the fresh file as it was before that commit: `backlog 0`, no alarm active, as if nothing waited.
    It says that a salvage is under way and the backlog unknown; once done, the salvaged backlog."""
    path = tmp_path / "b.db"
    filled_buffer(path, 2000, sent=500)
    damage(path, pages_of(path, "meta")[0])
    seen: list[dict] = []

    def status_now() -> None:
        if not seen:
            reader = Buffer.open_reader(path)
            try:
                seen.append(collect(reader, {"d": 1.0}))
            finally:
                reader.close()

    buf = Buffer.open_writer(path, progress=status_now)
    try:
        assert seen, "the salvage reported progress"
        during = seen[0]
        assert during["backlog"] is None and during["last_seq"] is None and during["alarms"] is None, during
        moved = min((p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name), key=len)  # not its -wal
        assert during["buffer_error"].startswith(f"salvaging what is readable of {moved} "), during["buffer_error"]
        reader = Buffer.open_reader(path)
        try:
            after = collect(reader, {"d": 1.0})
        finally:
            reader.close()
        assert after["backlog"] == 1500 and "buffer_error" not in after, after
    finally:
        buf.close()


def test_a_salvage_cut_short_is_not_said_under_way_once_the_agent_opens_the_file_again(tmp_path):
    path = tmp_path / "b.db"
    filled_buffer(path, 100, sent=40, clean=True)
    buf = Buffer.open_writer(path)
    buf.set_meta(SALVAGE_UNFINISHED, "b.db.corrupt-20261201T000000")  # the agent was killed while salvaging
    buf.conn.close()
    buf = Buffer.open_writer(path)
    try:
        assert buf.meta_value(SALVAGE_UNFINISHED) is None
        assert collect(buf, {"d": 1.0})["backlog"] == 60
    finally:
        buf.close()


KILLED_DURING_THE_SALVAGE = """
import os, sys
from agent.buffer import Buffer
Buffer.open_writer(sys.argv[1], progress=lambda: os._exit(9))  # killed at its first batch of rows
"""


def test_a_salvage_cut_short_by_a_kill_is_done_again_at_the_next_start(tmp_path):
    """The agent killed while it copied the rows of a corrupt file into the fresh one (a power cut, the
    watchdog, an OOM kill: minutes for a large file): at the next start the fresh file opened as it was,
    empty, and its rows were neither copied nor announced lost: 1500 readings waiting to be sent gone
    without a gap (backlog 0, last seq 10000). The salvage is done again from the file moved aside, as
    the uninterrupted one does. The acknowledged watermarks noted beside the mark (the salvage's hint where
    the old file's are unreadable; the gap's start should the file be lost) stay the old file's: the
    fresh file's own claimed every seq below the mark acknowledged."""
    results = []
    for killed in (False, True):
        path = tmp_path / ("killed" if killed else "whole") / "b.db"
        path.parent.mkdir()
        filled_buffer(path, 2000, sent=500)
        damage(path, pages_of(path, "meta")[0])
        if killed:
            acked = SeqMark(path.with_name("b.db.seq")).acked()
            run = subprocess.run([sys.executable, "-c", KILLED_DURING_THE_SALVAGE, str(path)], capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 9, run.stderr
            assert SeqMark(path.with_name("b.db.seq")).acked() == acked
        buf = Buffer.open_writer(path)
        try:
            assert buf.meta_value(SALVAGE_UNFINISHED) is None
            status = collect(buf, {"d": 1.0})
            results.append((status["backlog"], status["last_seq"], gaps(buf),
                            [r.seq for r in buf.readings_after(0, 10_000)]))
        finally:
            buf.close()
    whole, killed = results
    assert whole[0] == 1500, whole[:3]
    assert killed == whole, "the same readings and gaps as a salvage let run to its end"
