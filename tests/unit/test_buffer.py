"""The SQLite buffer and its one writer, on real database files: seq rules, eviction, corruption."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from harness import wait_for

import agent.buffer as buffer_module
import agent.seqmark as seqmark_module
from agent.buffer import Buffer
from agent.bufferschema import SCHEMA_VERSION, meta_schema_version
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, Reading, iso_utc_ms, now_ms
from agent.recorder import Recorder
from agent.seqmark import SeqMark


def readings(n: int, device: str = "d", start_ms: int | None = None) -> list[Reading]:
    t = start_ms if start_ms is not None else now_ms()
    return [Reading(device, f"c{i % 10}", t + i, float(i), "mg/L", "N") for i in range(n)]


def store(buf: Buffer, rows: list[Reading]) -> list[Reading]:
    buf.begin()
    out = buf.insert_readings(rows)
    buf.commit()
    return out


DAY_MS = 86_400_000


def vm_steps(conn: sqlite3.Connection, action, *args):
    """`action(*args)`'s result and the SQLite VM steps it took on `conn` (counted ten at a time): work
    that does not depend on the machine's speed."""
    count = [0]

    def step() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(step, 10)
    try:
        return action(*args), count[0] * 10
    finally:
        conn.set_progress_handler(None, 0)


def purge(buf: Buffer, keep_sent_days: float, at_ms: int, held: dict[str, int] | None = None) -> int:
    """One pass of the recorder's age purge at wall-clock time `at_ms`."""
    buf.begin()
    n = buf.purge_sent(keep_sent_days, at_ms, held)
    buf.commit()
    return n


def test_a_clock_set_days_ahead_for_a_while_purges_nothing_kept_for_resend(tmp_path):
    """`keep_sent_days` against a wall clock set 3 days ahead by mistake between two purge passes (audit
    U): with the recorder's age clock the published readings of the last minutes stay for `resend`; they
    go once they are truly a day old."""
    from agent.clock import AgeClock

    clock = {"wall": now_ms(), "mono": 1000.0}
    age = AgeClock(wall_ms=lambda: clock["wall"], mono=lambda: clock["mono"])
    buf = Buffer.open_writer(tmp_path / "b.db")
    store(buf, readings(100))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 100)
    buf.commit()
    assert purge(buf, 1, age.now_ms()) == 0

    def later(seconds: float, step_ms: int = 0) -> int:
        clock["mono"] += seconds
        clock["wall"] += int(seconds * 1000) + step_ms
        return age.now_ms()

    assert purge(buf, 1, later(600, step_ms=3 * DAY_MS)) == 0, "stored 10 minutes ago"
    assert purge(buf, 1, later(600)) == 0
    assert purge(buf, 1, later(600, step_ms=-3 * DAY_MS)) == 0, "the clock corrected"
    assert buf.first_seq() == 1
    assert purge(buf, 1, later(DAY_MS / 1000)) == 100, "a day later they go"
    buf.close()


def test_a_lowered_cap_gives_the_free_pages_back_at_the_next_start(tmp_path, caplog):
    """Lowering `max_mb` evicts down to the new cap, but SQLite keeps the freed pages in the file: a
    technician who lowered the cap to free the card got nothing back (audit T). The next start
    rewrites the file without them; the rows kept, their seqs and the numbering stay."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path, max_mb=2)
    for _ in range(12):
        store(buf, readings(1000))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 11_000)
    buf.commit()
    buf.set_size_cap(0.3)  # a reload with the lower cap: published rows go first
    buf.begin()
    buf.evict(int(0.3 * 2**20 * 0.85), now_ms())
    buf.commit()
    kept = [(r.seq, r.value) for r in buf.readings_after(0, 20_000)]
    buf.close()
    before = path.stat().st_size
    assert before > 0.3 * 2**20, "eviction alone leaves the file as large as it was"

    with caplog.at_level("INFO", logger="agent.buffer"):
        buf = Buffer.open_writer(path, max_mb=0.3)
    assert path.stat().st_size <= 0.3 * 2**20 < before
    assert path.with_name(path.name + "-wal").stat().st_size > 32, "a frame after the compaction, as at every open"
    assert "above max_mb 0.3: compacted to" in caplog.text
    assert [(r.seq, r.value) for r in buf.readings_after(0, 20_000)] == kept
    assert store(buf, readings(1))[0].seq == 12_001
    buf.close()


def test_the_integrity_check_of_a_big_buffer_reports_progress_while_it_runs(tmp_path, monkeypatch):
    """The check at every open reads the whole file: 119 s for a 1.4 GB buffer not in the page cache (a
    start after a power cut) on the test VM, past the unit's TimeoutStartSec=90, before READY=1; systemd
    killed each start. SQLite runs the check as one VM step (no progress handler is called), so it runs in
    a thread while `progress` (systemd's EXTEND_TIMEOUT_USEC in `run`) is called (audit Y)."""
    monkeypatch.setattr(buffer_module, "PROGRESS_EVERY_S", 0)  # report at every turn: the check takes ms here
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(50_000))
    buf.close()
    calls = []
    buf = Buffer.open_writer(path, max_mb=64, progress=lambda: calls.append(1))
    try:
        assert calls, "progress reported during the check"
        assert buf.last_seq() == 50_000
    finally:
        buf.close()


def test_every_open_writes_a_wal_frame_so_that_a_missing_wal_means_a_deleted_one(tmp_path):
    """`SeqMark.lost_rows` takes a WAL missing after a crash for one deleted with its rows; that holds only
    once the writer has committed a frame (SQLite then syncs the WAL and its directory entry). The open
    used an update that changed nothing, for which SQLite writes no frame (audit W): the WAL stayed
    empty until the first readings."""
    path = tmp_path / "b.db"
    Buffer.open_writer(path).close()  # closing checkpoints the WAL and deletes it
    buf = Buffer.open_writer(path)
    try:
        wal = path.with_name(path.name + "-wal")
        assert wal.exists() and wal.stat().st_size > 32, "a frame after the WAL header"
    finally:
        buf.close()


def test_a_sync_normal_writer_that_cannot_read_its_boot_id_is_taken_for_one_of_another_boot(tmp_path, monkeypatch):
    """`sync: normal` leaves the last commits to the kernel: after a reboot under such a writer, its seqs
    since the last write-back may be lost, published or not, and must not be issued again. Whether the
    machine rebooted is told by the kernel's boot id, which a hardened unit can hide (`ProcSubset=pid`
    hides /proc/sys): the writer then noted 0, "fsyncs every commit", and a start after a power cut
    issued the lost seqs again for other readings. Unknown counts as another boot: a jump, announced."""
    monkeypatch.setattr(seqmark_module, "BOOT_ID", tmp_path / "no-proc-sys" / "boot_id")
    mark = SeqMark(tmp_path / "b.db.seq")
    mark.note_running(volatile=True)
    assert mark.lost_rows(STREAM_READINGS, 0, wal_missing=False), "the boot of the last writer is not known"
    mark.note_running(volatile=False)
    assert not mark.lost_rows(STREAM_READINGS, 0, wal_missing=False), "`sync: full` needs no boot id"


def test_seq_strictly_increasing_and_continues_after_restart(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    first = store(buf, readings(5))
    assert [r.seq for r in first] == [1, 2, 3, 4, 5]
    buf.close()
    buf = Buffer.open_writer(path)
    again = store(buf, readings(3))
    assert [r.seq for r in again] == [6, 7, 8]
    buf.close()


def test_a_failed_commit_whose_batch_crossed_the_reservation_issues_its_seqs_again_without_a_jump(tmp_path):
    # The batch raised the reservation beside the file (to its end + a block) before its commit failed
    # (SQLITE_FULL at the cap, a full disk): the rolled-back seqs were never committed nor published, so
    # the retry gets them again. Taking the file for one that lost rows made seqs jump 10 000, unannounced.
    buf = Buffer.open_writer(tmp_path / "buffer.db")
    batch = [Reading("sim0", f"c{i % 50}", 1_796_000_000_000 + i, 1.0, "mg/L", "N") for i in range(500)]
    buf.begin()
    buf.insert_readings(batch * 19 + batch[:300])  # seqs 1..9800, the reservation at 10 000
    buf.commit()
    buf.begin()
    buf.insert_readings(batch)  # 9801..10300 cross the reservation
    buf.rollback()
    buf.reload_counters()
    buf.begin()
    stored = buf.insert_readings(batch)
    buf.commit()
    assert (stored[0].seq, stored[-1].seq) == (9801, 10300)
    assert buf.conn.execute("SELECT count(*) FROM gaps").fetchone()[0] == 0
    buf.close()


def test_seq_never_reused_after_everything_is_purged(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(10, start_ms=0))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 10)
    buf.commit()
    t = now_ms()
    assert purge(buf, 1, t) == 0, "stored just now: kept"
    assert purge(buf, 1, t + DAY_MS) == 10
    buf.close()
    buf = Buffer.open_writer(path)
    assert buf.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 0
    assert store(buf, readings(1))[0].seq == 11
    buf.close()


def test_corrupt_file_is_moved_aside_and_seq_continues_above_high_water_mark(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(25))
    buf.close()
    original = path.read_bytes()
    # Damage the file: overwrite the middle pages with garbage, keep the header.
    damaged = bytearray(original)
    for i in range(4096, len(damaged)):
        damaged[i] = 0xA5
    path.write_bytes(bytes(damaged[:100]) + b"\x13" * 50 + bytes(damaged[150:]))
    buf = Buffer.open_writer(path)
    moved = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(".txt")]
    assert moved, "the damaged file must be kept"
    seq = store(buf, readings(1))[0].seq
    assert seq > 25
    buf.close()


def test_not_a_database_file_is_moved_aside(tmp_path, caplog):
    """...and logged as the README's troubleshooting table quotes it (it quoted `buffer … is corrupt;
    moved aside`, which a technician grepping the journal for it never found: the reason comes
    between the two)."""
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with caplog.at_level("ERROR", logger="agent.buffer"):
        buf = Buffer.open_writer(path)
    assert store(buf, readings(1))[0].seq == 1
    kept = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(".txt")]
    assert kept and kept[0].read_bytes().startswith(b"this is not sqlite")
    buf.close()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    quoted = re.search(r"^\| `(buffer … is corrupt[^`]*)`", readme, re.M)
    assert quoted, "the README's troubleshooting table has the corrupt buffer's line"
    pattern = ".*".join(re.escape(part) for part in quoted.group(1).split("…"))
    assert any(re.search(pattern, record.getMessage()) for record in caplog.records), (pattern, caplog.text)


def test_a_file_overwritten_entirely_announces_its_lost_seqs_from_what_was_acknowledged(tmp_path):
    """Nothing of the old file is readable (random bytes over all of it): the seqs above what the last
    clean stop noted as acknowledged went with it, and receivers are told (SPEC §3)."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(60))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 47)
    buf.commit()
    buf.close()
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256))
    buf = Buffer.open_writer(path)
    try:
        assert gaps(buf) == [(48, 60, "buffer_corrupt")], "up to the last seq the clean close noted"
        assert store(buf, readings(1))[0].seq == 61
    finally:
        buf.close()


def test_lost_database_file_continues_seq_from_the_mark_beside_it(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(7))
    buf.close()
    path.unlink()
    buf = Buffer.open_writer(path)
    assert store(buf, readings(1))[0].seq > 7
    buf.close()


def gaps(buf: Buffer) -> list[tuple[int, int, str]]:
    return [(g.first_seq, g.last_seq, g.reason) for g in buf.pending_gaps()]


def reopen_without_the_file(tmp_path) -> tuple[int, Buffer]:
    """Delete b.db (and its WAL) but keep the mark beside it; open it again: (the mark, the buffer)."""
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    for name in ("b.db", "b.db-wal", "b.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    return mark, Buffer.open_writer(tmp_path / "b.db")

def test_a_deleted_file_s_jump_is_announced_from_what_was_acknowledged(tmp_path):
    """SPEC §3: a gap exists only where announced. A technician deletes the buffer file; the fresh one
    continues above the mark, and receivers must not take the skipped seqs for an unexplained loss."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(30))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 20)  # 21..30 still unpublished: lost with the file
    buf.commit()
    buf.close()
    _, buf = reopen_without_the_file(tmp_path)
    try:
        # The clean close noted seq 30 as the last issued: none above it ever was.
        assert gaps(buf) == [(21, 30, "buffer_missing")]
        assert store(buf, readings(1))[0].seq == 31
    finally:
        buf.close()


def test_after_a_clean_close_a_deleted_file_s_alarm_seqs_continue_without_a_jump(tmp_path):
    """Alarm and aggregate seqs have no gap announcement: after a clean close, whose last seqs the
    mark noted, a fresh file continues them right after those (a platform sees no hole)."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    buf.begin()
    for _ in range(3):
        buf.insert_event(STREAM_ALARMS, now_ms(), {"id": "x:above", "state": "raised"})
    buf.commit()
    buf.close()
    _, buf = reopen_without_the_file(tmp_path)
    try:
        buf.begin()
        assert buf.insert_event(STREAM_ALARMS, now_ms(), {"id": "x:above", "state": "cleared"}) == 4
        buf.commit()
    finally:
        buf.close()


def test_after_a_crash_a_deleted_file_s_jump_is_announced_from_the_reserved_block(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(30))
    buf.conn.close()  # the process died: no clean close, nothing noted beside the mark
    mark, buf = reopen_without_the_file(tmp_path)
    try:
        assert gaps(buf) == [(mark - 10_000 + 1, mark, "buffer_missing")], "the seqs the mark may not cover"
    finally:
        buf.close()


def killed_while_writing(path, rows: int, acked: int = 0) -> None:
    """A writer process stores `rows` readings (acknowledging `acked` of them) and is killed (-9)."""
    code = ("import os, signal, sys; sys.path[:0] = [sys.argv[2]]; from agent.buffer import Buffer; "
            "from agent.model import STREAM_READINGS, Reading; b = Buffer.open_writer(sys.argv[1]); "
            "n, acked = int(sys.argv[3]), int(sys.argv[4]); b.begin(); "
            "b.insert_readings([Reading('d', 'c', 1_764_000_000_000 + i, float(i), None, 'N') for i in range(n)]); "
            "b.set_sent_upto(STREAM_READINGS, acked); b.commit(); os.kill(os.getpid(), signal.SIGKILL)")
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code, str(path), repo, str(rows), str(acked)], timeout=60)
    assert done.returncode == -signal.SIGKILL


def test_a_wal_deleted_after_a_crash_never_lets_seqs_be_issued_twice(tmp_path):
    """SPEC §3: seqs are never reused. A technician deletes buffer.db-wal (and -shm) after a crash:
    the rows committed since the last checkpoint are gone with it, and their seqs must not be handed
    out again to other readings (a receiver deduplicating on seq would drop those)."""
    path = tmp_path / "b.db"
    killed_while_writing(path, 56, acked=20)
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    for name in ("b.db-wal", "b.db-shm"):
        (tmp_path / name).unlink()
    buf = Buffer.open_writer(path)
    try:
        assert buf.last_seq() == mark and store(buf, readings(1))[0].seq == mark + 1
        assert gaps(buf) == [(1, mark, "buffer_missing")], "all the file lost, none acknowledged as far as it knows"
    finally:
        buf.close()


def test_a_crash_with_its_wal_in_place_continues_without_a_jump(tmp_path):
    path = tmp_path / "b.db"
    killed_while_writing(path, 56)
    buf = Buffer.open_writer(path)
    try:
        assert store(buf, readings(1))[0].seq == 57 and gaps(buf) == []
    finally:
        buf.close()
    buf = Buffer.open_writer(path)  # and after that clean close, with no WAL left, neither
    try:
        assert store(buf, readings(1))[0].seq == 58 and gaps(buf) == []
    finally:
        buf.close()


def killed_while_a_refused_batch_waits(path: Path, setup: str, batch: int) -> None:
    """In a process of its own: `setup` (Python opening the buffer `b` at `path`, storing with `rows(n)`,
    and setting `mb`, the cap), then a batch of `batch` readings that the cap refuses, handed to the
    recorder's write-error path as a failed commit is (kept in memory for a retry); then kill -9."""
    code = ("import os, signal, sqlite3, sys; sys.path[:0] = [sys.argv[2]]; from agent.buffer import Buffer; "
            "from agent.model import STREAM_READINGS, Reading; from agent.recorder import Recorder; "
            "rows = lambda n: [Reading('d', f'c{i % 10}', 1_764_000_000_000 + i, float(i), None, 'N') "
            "for i in range(n)]; " + setup +
            "rec = Recorder(b, commit_interval_ms=50, keep_sent_days=7, max_mb=mb); "
            f"batch = rows({batch}); b.begin()\n"
            "try:\n    b.insert_readings(batch); b.commit()\n"
            "except sqlite3.OperationalError as exc:\n    b.rollback(); rec._on_write_error(exc, batch, [], [], {})\n"
            "else:\n    sys.exit('the cap refused nothing')\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code, str(path), repo], timeout=60)
    assert done.returncode == -signal.SIGKILL, done


def test_a_crash_after_a_full_buffer_gave_its_wal_back_continues_without_a_jump(tmp_path):
    """A commit refused as full (the cap or the disk) has the recorder checkpoint the WAL with TRUNCATE, to give
    its space back to the disk. Left empty until the next commit (a second later, or for as long as the disk
    stays full), a crash meanwhile made the next start take the empty WAL for a deleted one: it jumped to the
    mark and announced up to a block of seqs never issued as buffer_missing (audit Z)."""
    path = tmp_path / "b.db"
    killed_while_a_refused_batch_waits(path, "b = Buffer.open_writer(sys.argv[1], max_mb=0.25); "
                                       "b.begin(); b.insert_readings(rows(100)); "
                                       "b.set_sent_upto(STREAM_READINGS, 100); b.commit(); mb = 0.25; ", batch=9_500)
    buf = Buffer.open_writer(path)
    try:
        assert store(buf, readings(1))[0].seq == 101 and gaps(buf) == []
    finally:
        buf.close()


def test_a_crash_while_a_refused_batch_waits_in_memory_continues_without_a_jump(tmp_path):
    """A batch refused at the cap (or by a full disk) had raised the reservation beside the file to its end
    + a block before its commit failed. The rollback issues those seqs again, but the reservation stayed up:
    a kill -9 or a power cut before the retry committed had the next start take the file for one a whole
    block below the mark (rows lost, or another buffer's), jump there and announce 10 500 seqs never issued
    as buffer_missing (audit audb)."""
    path = tmp_path / "b.db"
    killed_while_a_refused_batch_waits(path, "b = Buffer.open_writer(sys.argv[1]); "
                                       "b.begin(); b.insert_readings(rows(9_900)); b.commit(); "
                                       "mb = b.conn.execute('PRAGMA page_count').fetchone()[0] / 1024; "
                                       "b.set_size_cap(mb); ",
                                       batch=500)  # 9901..10400 cross the reservation at 10 000
    buf = Buffer.open_writer(path)
    try:
        assert store(buf, readings(1))[0].seq == 9_901, "the seqs the rolled-back batch had are issued again"
        assert [g for g in gaps(buf) if g[2] == "buffer_missing"] == [], "no seq was lost: no gap to announce"
    finally:
        buf.close()


def test_an_older_copy_of_the_file_put_back_never_lets_seqs_be_issued_twice(tmp_path):
    """An operator restores a backup of buffer.db: the seqs issued since must not come again."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(35))
    buf.close()
    shutil.copy(path, tmp_path / "backup.db")
    buf = Buffer.open_writer(path)
    store(buf, readings(35))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 50)
    buf.commit()
    buf.close()
    shutil.copy(tmp_path / "backup.db", path)
    buf = Buffer.open_writer(path)
    try:
        assert store(buf, readings(1))[0].seq == 71, "after the last seq the clean close noted"
        assert gaps(buf) == [(51, 70, "buffer_missing")], "from what the platform acknowledged"
    finally:
        buf.close()


def test_a_first_start_announces_no_gap(tmp_path):
    buf = Buffer.open_writer(tmp_path / "b.db")
    try:
        assert gaps(buf) == []
    finally:
        buf.close()


def test_eviction_purges_published_first_then_oldest_unpublished_with_a_gap(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path, max_mb=1)
    stored = store(buf, readings(20_000))
    buf.begin()
    buf.insert_event(STREAM_ALARMS, now_ms(), {"id": "x:above", "state": "raised"})
    buf.set_sent_upto(STREAM_READINGS, 5_000)
    buf.commit()
    used = buf.used_bytes()
    # First: a target reachable by dropping published rows only.
    buf.begin()
    purged, dropped, gap, _ = buf.evict(used - 100_000, now_ms())
    buf.commit()
    assert purged > 0 and dropped == 0 and gap is None
    low = buf.conn.execute("SELECT min(seq) FROM readings").fetchone()[0]
    assert low <= 5_001
    # Then a target that needs unpublished rows to go: all published rows go before any unpublished.
    buf.begin()
    purged2, dropped2, gap, _ = buf.evict(buf.used_bytes() // 2, now_ms())
    buf.commit()
    assert dropped2 > 0 and gap is not None
    assert gap.first_seq == 5_001, "only unpublished rows are in the gap, starting after the published"
    low = buf.conn.execute("SELECT min(seq) FROM readings").fetchone()[0]
    assert low == gap.last_seq + 1
    assert buf.conn.execute("SELECT count(*) FROM alarms").fetchone()[0] == 1, "alarms are kept"
    assert [(g.first_seq, g.last_seq) for g in buf.pending_gaps()] == [(gap.first_seq, gap.last_seq)]
    # New readings still get fresh seqs above everything.
    assert store(buf, readings(1))[0].seq == stored[-1].seq + 1
    buf.close()


def test_dropping_unpublished_readings_costs_what_it_drops_not_the_backlog(tmp_path):
    """At the cap with a long outage's backlog (nothing published), each round of eviction does the same
    small work on a big table as on a small one (SQLite VM steps counted). It used to read min and max
    seq above the watermark in one query, which walks every row above it, once per 2000 rows dropped:
    30 M readings at a 1.4 GB cap kept the recorder in one eviction for hours (audit Y)."""
    steps = {}
    for n in (20_000, 300_000):
        buf = Buffer.open_writer(tmp_path / f"{n}.db")
        store(buf, readings(n))
        buf.begin()
        (_, dropped, gap, _), taken = vm_steps(buf.conn, buf.evict, buf.used_bytes() - 200_000, now_ms())
        buf.commit()
        assert dropped > 2_000 and gap is not None and gap.first_seq == 1
        steps[n] = taken / dropped
        buf.close()
    assert steps[300_000] < 2 * steps[20_000], steps


def test_eviction_keeps_the_readings_in_flight_and_announces_each_dropped_seq_once(tmp_path):
    """Connected over a link slower than the station: the cap drops unpublished readings while the
    publisher has some in flight. Those may arrive, so they stay (a gap holds only seqs that never
    reached the broker); and a gap extended after its announcement is announced for its new part only."""
    buf = Buffer.open_writer(tmp_path / "b.db", max_mb=1)
    store(buf, readings(20_000))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 1_000)
    buf.commit()
    buf.begin()
    _, dropped, gap, _ = buf.evict(buf.used_bytes() // 2, now_ms(), in_flight_upto=3_000)
    buf.commit()
    assert dropped > 0 and gap is not None and gap.first_seq == 3_001, "the gap starts above what is in flight"
    in_flight = buf.conn.execute("SELECT count(*) FROM readings WHERE seq BETWEEN 1001 AND 3000").fetchone()[0]
    assert in_flight == 2_000, "the readings in flight are kept"
    assert buf.sent_upto() == 1_000, "the watermark waits for their acknowledgement"
    # More dropped while the announcement of the first round was on its way: the same gap grows.
    first_round = gap.last_seq
    buf.begin()
    _, _, grown, _ = buf.evict(buf.used_bytes() // 2, now_ms(), in_flight_upto=3_000)
    buf.commit()
    assert grown is not None and (grown.id, grown.first_seq) == (gap.id, 3_001) and grown.last_seq > first_round
    buf.begin()
    buf.mark_gap_announced(gap.id, first_round)  # the first round's announcement acknowledged
    buf.commit()
    assert [(g.first_seq, g.last_seq) for g in buf.pending_gaps()] == [(first_round + 1, grown.last_seq)]
    buf.begin()
    buf.mark_gap_announced(gap.id, grown.last_seq)
    buf.commit()
    assert buf.pending_gaps() == []
    buf.close()


def test_an_eviction_below_a_pending_gap_after_a_reconnection_announces_every_seq_it_drops(tmp_path):
    """After a reconnection the publisher starts over from the watermark: what it has in flight, which the cap
    keeps, falls back below a gap an earlier eviction left pending. The next eviction drops from just above
    it; merged into that gap, which kept its first seq, the seqs between were deleted and in no gap, never
    announced (audit Z; SPEC: every gap is announced)."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    store(buf, readings(60))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 20)
    buf.commit()
    buf.begin()
    buf.evict(0, now_ms(), in_flight_upto=49)  # connected: 21..49 in flight, 50..60 dropped
    buf.commit()
    assert gaps(buf) == [(50, 60, "buffer_full")]
    store(buf, readings(40))  # 61..100
    buf.begin()
    buf.evict(0, now_ms(), in_flight_upto=30)  # reconnected: 21..30 in flight again
    buf.commit()
    kept = {r.seq for r in buf.readings_after(0, 1_000)}
    announced = {seq for first, last, _ in gaps(buf) for seq in range(first, last + 1)}
    assert kept == set(range(21, 31))
    assert set(range(21, 101)) - kept - announced == set(), "every dropped seq in a gap to announce"
    buf.close()


def test_the_wal_is_cut_back_in_proportion_to_a_small_cap(tmp_path):
    # max_mb bounds buffer.db; the WAL on top is cut back after a checkpoint to an eighth of the cap
    # (at least 1 MiB, at most 8 MiB): a 3 MB cap on a small card must not carry an 8 MiB WAL.
    buf = Buffer.open_writer(tmp_path / "b.db", max_mb=3)
    assert buf.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == 1 << 20
    buf.set_size_cap(32)
    assert buf.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == 4 << 20
    buf.set_size_cap(256)
    assert buf.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == 8 << 20
    buf.close()


def test_rows_an_uplink_has_not_delivered_go_last_and_never_for_their_age(tmp_path):
    """MQTT published everything; an HJ 212 uplink delivered up to seq 2000 (`held`). The size cap
    purges what both have first, then what only MQTT has (counted: that platform misses them); the
    age purge never takes what the uplink still needs."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    store(buf, readings(10_000, start_ms=0))  # old enough for any age purge
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 10_000)
    buf.commit()
    held = {STREAM_READINGS: 2_000}
    t = now_ms()
    assert purge(buf, 1, t, held) == 0
    assert purge(buf, 1, t + DAY_MS, held) == 2_000
    assert buf.first_seq() == 2_001, "the age purge stops where the uplink is"
    used = buf.used_bytes()
    buf.begin()
    purged, dropped, gap, undelivered = buf.evict(int(used * 0.9), now_ms(), held={STREAM_READINGS: 5_000})
    buf.commit()
    assert 0 < purged <= 3_000 and (dropped, gap, undelivered) == (0, None, 0), "delivered rows were enough"
    assert buf.first_seq() <= 5_001
    buf.begin()
    purged, dropped, gap, undelivered = buf.evict(buf.used_bytes() // 3, now_ms(), held={STREAM_READINGS: 5_000})
    buf.commit()
    assert 0 < undelivered < purged and dropped == 0, "every delivered row first, then published ones it lacks"
    assert buf.first_seq() > 5_001
    buf.close()


def test_the_age_purge_goes_by_the_time_rows_were_stored_not_the_instruments_clock(tmp_path):
    """An hj212 instrument whose clock is 8 days behind, polled with a device on the gateway's clock,
    everything published: the purge takes what was stored over `keep_sent_days` ago (whatever its
    stamp: behind, or ahead like the last row of the old batch) and leaves every row stored since,
    the lagging device's too, to resend requests."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    t = now_ms()

    def batch(stored_ms: int, n: int) -> list[Reading]:
        rows = []
        for i in range(n):
            rows += [Reading("hj", "w01018", stored_ms - 8 * DAY_MS + i, 1.0, "mg/L", "N"),
                     Reading("cod", "w01018", stored_ms + i, 2.0, "mg/L", "N")]
        return rows

    old = store(buf, batch(t - 8 * DAY_MS, 500) + [Reading("ahead", "c", t + 30 * DAY_MS, 3.0, "", "N")])
    assert purge(buf, 7, t - 8 * DAY_MS) == 0  # the recorder's pass 8 days ago: notes what is stored
    current = store(buf, batch(t, 500))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, current[-1].seq)
    buf.commit()
    assert purge(buf, 7, t) == len(old)
    assert buf.first_seq() == current[0].seq
    assert [r.seq for r in buf.readings_after(0, 10_000)] == [r.seq for r in current], "all resendable"
    assert purge(buf, 7, t + 7 * DAY_MS - 1) == 0, "not stored 7 days ago yet"
    buf.close()
    buf = Buffer.open_writer(tmp_path / "b.db")
    assert store(buf, readings(1))[0].seq == current[-1].seq + 1
    buf.close()


def test_age_purge_notes_of_rows_evicted_at_the_cap_do_not_pile_up_for_years(tmp_path):
    """An HJ 212 uplink that never delivers holds every row back from the age purge, so the size cap
    evicts them; each pass (every 10 minutes) still notes the stream's last seq. Those notes of rows that
    are gone were never deleted: 52 000 rows a stream and year, for as long as the uplink is dead."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    t0 = 1_800_000_000_000
    for i in range(144 * 20):  # 20 days, a pass every 10 minutes, the cap evicting all but the last day
        now = t0 + i * 600_000
        buf.begin()
        store_rows = buf.insert_readings(readings(10, start_ms=now))
        buf.set_sent_upto(STREAM_READINGS, store_rows[-1].seq)
        buf.purge_sent(7, now, held={STREAM_READINGS: 0})
        buf._delete_upto(STREAM_READINGS, store_rows[-1].seq - 1440)  # what eviction leaves: the last 144 passes
        buf.commit()
    notes = buf.conn.execute("SELECT count(*) FROM stored_upto WHERE stream=?", (STREAM_READINGS,)).fetchone()[0]
    assert notes <= 145, notes
    buf.close()


def test_the_age_purge_survives_wall_clock_steps(tmp_path):
    """Rows stored while the clock was unset (1970 after a boot without a real-time clock) or ahead
    are kept `keep_sent_days` from when the clock is right: they are not purged at once, nor held
    until the wrong time comes round."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    t = now_ms()
    store(buf, readings(100, start_ms=60_000))
    assert purge(buf, 7, 60_000) == 0  # clock unset: nothing noted
    store(buf, readings(100, start_ms=t + 365 * DAY_MS))
    assert purge(buf, 7, t + 365 * DAY_MS) == 0  # clock a year ahead
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 200)
    buf.commit()
    assert purge(buf, 7, t) == 0  # stepped back: what was noted counts as stored now
    assert purge(buf, 7, t + 7 * DAY_MS - 1) == 0
    assert purge(buf, 7, t + 7 * DAY_MS) == 200
    buf.close()


def test_a_restart_with_the_clock_unset_does_not_age_what_was_stored_before(tmp_path):
    """A gateway without a real-time clock reboots in 1970 and its network (NTP) comes back after the first
    purge pass: that pass took every note of the previous run for one in the future and dated it 1970, so
    the pass after NTP set the clock purged every published reading at once, hours old, instead of keeping
    them `keep_sent_days` for resend requests (audit audb)."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    t = now_ms()
    store(buf, readings(100, start_ms=t))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 100)
    buf.commit()
    assert purge(buf, 7, t) == 0  # a pass of the previous run notes the 100 readings as stored now
    buf.close()
    buf = Buffer.open_writer(path)  # the reboot, the clock at 1970 + 10 minutes for the first pass
    try:
        assert purge(buf, 7, 600_000) == 0
        assert purge(buf, 7, t + 3_600_000) == 0, "NTP set the clock: the readings are an hour old, not 56 years"
        assert purge(buf, 7, t + 7 * DAY_MS) == 100, "kept keep_sent_days from when they were stored"
    finally:
        buf.close()


def test_the_age_purge_costs_what_it_deletes_not_the_table_size(tmp_path):
    """Every row published, none old: a pass does the same small work on a big table as on a small one
    (SQLite VM steps counted), so it never stalls the recorder's commits."""
    steps = {}
    for n in (10_000, 200_000):
        buf = Buffer.open_writer(tmp_path / f"{n}.db")
        store(buf, readings(n))
        buf.begin()
        buf.set_sent_upto(STREAM_READINGS, n)
        buf.commit()
        t = now_ms()
        purge(buf, 7, t)
        purged, steps[n] = vm_steps(buf.conn, purge, buf, 7, t + 3_600_000)
        assert purged == 0
        buf.close()
    assert steps[200_000] <= steps[10_000] + 100 and steps[200_000] < 2_000, steps


def test_a_large_aged_backlog_is_purged_a_bounded_slice_per_pass(tmp_path, monkeypatch):
    """A file from before the age purge noted storage times is noted as a whole at its first pass;
    when that ages, each pass takes a bounded slice, so the recorder's commits never wait long."""
    monkeypatch.setattr(buffer_module, "PURGE_MAX_ROWS", 1_000)
    buf = Buffer.open_writer(tmp_path / "b.db")
    store(buf, readings(2_500))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 2_500)
    buf.commit()
    t = now_ms()
    assert purge(buf, 7, t) == 0
    assert [purge(buf, 7, t + 7 * DAY_MS + i) for i in range(4)] == [1_000, 1_000, 500, 0]
    assert buf.first_seq() is None
    assert store(buf, readings(1))[0].seq == 2_501
    buf.close()


def test_size_cap_is_a_hard_limit(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path, max_mb=0.5)
    try:
        for _ in range(100):
            store(buf, readings(2000))
        raise AssertionError("the cap was not enforced")
    except sqlite3.OperationalError as exc:
        assert "full" in str(exc)
        buf.rollback()
    assert path.stat().st_size <= 0.5 * 1024 * 1024 + 4096
    buf.close()


def test_recorder_group_commits_and_keeps_the_cap(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path, max_mb=0.5)
    rec = Recorder(buf, commit_interval_ms=50, keep_sent_days=7, max_mb=0.5)
    rec.start()
    for _ in range(60):
        rec.submit(readings(500))
        assert rec.flush(30)
    rec.stop()
    assert path.stat().st_size <= 0.5 * 1024 * 1024 + 4096
    reader = Buffer.open_reader(path)
    last, _ = reader.stream_state()
    assert last == 30_000, "every reading got a seq"
    gaps = reader.pending_gaps()
    assert gaps and gaps[0].first_seq == 1
    low = reader.conn.execute("SELECT min(seq) FROM readings").fetchone()[0]
    assert low == gaps[-1].last_seq + 1, "the only missing seqs are the announced gap"
    reader.close()
    buf.close()


def test_the_cap_counts_what_the_broker_acknowledged_and_what_is_in_flight_as_no_loss(tmp_path):
    """The acknowledged watermark is written at most every 5 s: rows the broker acknowledged since
    were evicted as unpublished and announced lost although delivered. Eviction now writes the
    acknowledgements first and keeps what the publisher has in flight."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path, max_mb=1)
    store(buf, readings(20_000))
    rec = Recorder(buf, commit_interval_ms=50, keep_sent_days=7, max_mb=1)
    rec.set_in_flight_check(lambda: 9_000)
    rec.start()
    try:
        rec.ack(STREAM_READINGS, 8_000)  # acknowledged, not yet written (ACK_PERSIST_EVERY_S)
        rec.submit(readings(20_000))  # over the cap: the next size check evicts
        assert rec.flush(30)
        wait_for(lambda: Buffer.open_reader(path).pending_gaps(), 30, "an eviction")
    finally:
        rec.stop()
    reader = Buffer.open_reader(path)
    (gap,) = reader.pending_gaps()
    assert gap.first_seq == 9_001, "neither acknowledged (..8000) nor in-flight (..9000) readings are in the gap"
    assert reader.conn.execute("SELECT min(seq) FROM readings").fetchone()[0] == 8_001
    reader.close()
    buf.close()


def test_recorder_persists_acknowledgements_on_stop(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    rec = Recorder(buf, commit_interval_ms=20, keep_sent_days=7, max_mb=10)
    rec.start()
    rec.submit(readings(100))
    assert rec.flush(10)
    rec.ack(STREAM_READINGS, 60)
    rec.stop()
    buf.close()
    reader = Buffer.open_reader(path)
    assert reader.stream_state() == (100, 60)
    reader.close()


def test_a_stop_that_cannot_write_its_last_readings_says_how_many_are_lost(tmp_path, caplog):
    """The disk is full at a stop (SQLite refuses to grow the file: max_page_count, as a full disk
    would): the readings held in memory die with the process, and the log says so."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    rec = Recorder(buf, commit_interval_ms=20, keep_sent_days=7, max_mb=10)
    rec.start()
    rec.submit(readings(10))
    assert rec.flush(10)
    pages = buf.conn.execute("PRAGMA page_count").fetchone()[0]
    buf.conn.execute(f"PRAGMA max_page_count={pages}")
    rec.submit(readings(5000))
    rec.stop()
    buf.close()
    assert "stopping with 5000 readings and 0 events that could not be written" in caplog.text


def test_the_first_acknowledgement_after_a_start_is_written_at_the_next_commit(tmp_path):
    """Acknowledgements are written at most every 5 s, but not 5 s after a start with nothing to write:
    an agent that crashes again and again within 5 s of starting re-sent its whole backlog each time."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    rec = Recorder(buf, commit_interval_ms=20, keep_sent_days=7, max_mb=10)
    rec.start()
    try:
        rec.submit(readings(100))
        assert rec.flush(10)
        rec.ack(STREAM_READINGS, 60)
        rec.submit(readings(1))
        assert rec.flush(10)
        reader = Buffer.open_reader(path)
        assert reader.stream_state() == (101, 60), "written before any stop"
        reader.close()
    finally:
        rec.stop()
        buf.close()


def test_reader_sees_committed_rows_while_writer_is_open(tmp_path):
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(3))
    reader = Buffer.open_reader(path)
    assert [r.seq for r in reader.readings_after(0, 10)] == [1, 2, 3]
    store(buf, readings(2))
    assert [r.seq for r in reader.readings_after(3, 10)] == [4, 5]
    reader.close()
    buf.close()


def test_an_empty_stream_does_not_jump_after_a_restart(tmp_path):
    """Only a fresh file continues above the high-water mark; an empty stream of a healthy file
    (no alarms yet) starts at 1 after any number of restarts."""
    path = tmp_path / "b.db"
    for _ in range(3):
        buf = Buffer.open_writer(path)
        store(buf, readings(2))
        buf.close()
    buf = Buffer.open_writer(path)
    buf.begin()
    assert buf.insert_event(STREAM_ALARMS, now_ms(), {"id": "a"}) == 1
    buf.commit()
    buf.close()


def test_newest_period_starts_reads_the_latest_aggregate_rows(tmp_path):
    """What the aggregator counts as done at start, whatever its saved state says."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    assert buf.newest_period_starts() == {}
    buf.begin()
    for period, start in (("10m", 600_000), ("1h", 0), ("10m", 1_200_000), ("10m", 1_800_000), ("1d", 0)):
        buf.insert_event(STREAM_AGGREGATES, start, {"device": "cod", "channel": "w01018", "period": period})
    buf.commit()
    assert buf.newest_period_starts() == {"10m": 1_800_000, "1h": 0, "1d": 0}
    assert buf.newest_period_starts(within=2) == {"10m": 1_800_000, "1d": 0}, "the last rows only"
    buf.close()


def test_newest_period_starts_is_the_last_computed_period_not_the_latest_start(tmp_path):
    """Periods computed while the clock was 74 years ahead, then the real ones after its correction: the
    last computed is the one to count as done up to, or every period until 2100 would be skipped."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    buf.begin()
    for start in (1_790_000_000_000, 4_125_175_200_000, 1_790_000_600_000):  # 2026, 2100, 2026 again
        buf.insert_event(STREAM_AGGREGATES, start, {"device": "cod", "channel": "w01018", "period": "10m"})
    buf.commit()
    assert buf.newest_period_starts() == {"10m": 1_790_000_600_000}
    buf.close()


def test_an_event_body_with_infinity_or_nan_is_stored_as_json_and_never_stops_the_period_queries(tmp_path):
    """An event body holding inf or NaN (an aggregate of a float64 instrument's 1.8e308) was stored as
    `Infinity`, which is not JSON: SQLite's json_extract then failed on it, so the aggregator's start could
    not read the newest periods (its open periods restarted empty) and every HJ 212 backfill of a range
    holding that row failed. Such numbers are stored as null; rows stored so by an older version are
    passed over by those queries."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    buf.begin()
    buf.insert_event(STREAM_AGGREGATES, 600_000, {"period": "10m", "avg": None, "min": float("inf"),
                                                  "max": float("nan"), "count": 3})
    buf.insert_event(STREAM_AGGREGATES, 1_200_000, {"period": "10m"})
    buf.insert_event(STREAM_AGGREGATES, 0, {"period": "1h", "min": -float("inf")})
    buf.conn.execute(f"UPDATE {STREAM_AGGREGATES} SET body = ? WHERE seq = 2",  # as an older version stored it
                     ('{"seq":2,"period":"10m","min":Infinity}',))
    buf.commit()
    bodies = [body for (body,) in buf.conn.execute(f"SELECT body FROM {STREAM_AGGREGATES} WHERE seq != 2")]
    assert [json.loads(b, parse_constant=lambda name: 1 / 0) for b in bodies] == [
        {"seq": 1, "period": "10m", "avg": None, "min": None, "max": None, "count": 3},
        {"seq": 3, "period": "1h", "min": None}]
    assert buf.newest_period_starts() == {"10m": 600_000, "1h": 0}
    assert [r.seq for r in buf.aggregates_between(0, 2_000_000, unit="m")] == [1]
    buf.close()


def test_encoded_values_keep_their_digits(tmp_path):
    """The JSON SQLite builds for the data topic: whole numbers up to 2^53 (64-bit counters) digit for
    digit, ordinary values in their usual form, null as null."""
    import json

    buf = Buffer.open_writer(tmp_path / "b.db")
    values = [8987183256397123.0, -4503599627370497.0, 1e15, 2.0, 23.4, -1234.5625, 3e-7, None]
    t = now_ms()
    store(buf, [Reading("d", f"c{i}", t, v, "", "N" if v is not None else "B") for i, v in enumerate(values)])
    batch = Buffer.open_reader(buf.path).readings_json(0, 100)
    assert batch is not None
    text = f"[{batch.items}]"
    assert [r["value"] for r in json.loads(text)] == values
    assert '"value":8987183256397123,' in text and '"value":2.0,' in text and '"value":null,' in text
    buf.close()


def test_the_largest_doubles_stay_finite_numbers_in_json(tmp_path):
    """A float64 register may read the double max: SQLite's 15 digits would round it up to
    1.79769313486232e+308, which JSON readers take for infinity. The data message carries the largest
    15-digit number instead, with its sign; the stored value itself is untouched."""
    import json
    import math
    import sys

    buf = Buffer.open_writer(tmp_path / "b.db")
    top = sys.float_info.max
    values = [top, -top, 1.79769313486231e308, 1.7976931348623e308]
    store(buf, [Reading("d", f"c{i}", now_ms(), v, "", "N") for i, v in enumerate(values)])
    batch = Buffer.open_reader(buf.path).readings_json(0, 100)
    assert batch is not None
    sent = [r["value"] for r in json.loads(f"[{batch.items}]")]
    assert all(math.isfinite(v) for v in sent), sent
    assert sent == [1.79769313486231e308, -1.79769313486231e308, 1.79769313486231e308, 1.7976931348623e308]
    assert [r.value for r in buf.readings_after(0, 10)] == values
    buf.close()


def test_status_shows_a_device_gone_from_the_configuration_as_removed(tmp_path):
    from agent.status import collect

    buf = Buffer.open_writer(tmp_path / "b.db")
    store(buf, readings(3, device="gone") + readings(3, device="here"))
    reader = Buffer.open_reader(tmp_path / "b.db")
    try:
        devices = collect(reader, {"here": 60.0})["devices"]
    finally:
        reader.close()
        buf.close()
    assert devices["here"]["health"] == "ok"
    assert devices["gone"]["health"] == "removed", "not 'ok' for ever, with its last readings still shown"
    assert devices["gone"]["channels"]
    reader = Buffer.open_reader(tmp_path / "b.db")
    try:  # a channel removed from a device that stays is no longer listed under it
        here = collect(reader, {"here": 60.0}, {"here": ["c0", "c2"]})["devices"]["here"]
    finally:
        reader.close()
    assert sorted(here["channels"]) == ["c0", "c2"] and here["health"] == "ok"


def test_a_file_far_below_the_mark_beside_it_continues_above_the_mark(tmp_path):
    """Back to an older buffer file after another one at this path (a storage.path changed and changed
    back; its mark was kept up to date): numbering never goes back below what was issued."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(5))
    buf.close()
    (tmp_path / "b.db.seq").write_text('{"readings": 40000, "aggregates": 40000, "alarms": 40000}')
    buf = Buffer.open_writer(path)
    try:
        assert gaps(buf) == [(6, 40000, "buffer_missing")], "the seqs another buffer issued, or nobody"
        assert store(buf, readings(1))[0].seq == 40001
        assert [r.seq for r in buf.readings_after(0, 10)] == [1, 2, 3, 4, 5, 40001], "the old rows stay"
        assert buf.sent_upto() == 0, "and stay unpublished"
    finally:
        buf.close()


def test_an_eviction_across_a_jump_announces_only_the_seqs_it_dropped(tmp_path):
    """Unpublished readings on both sides of a jump already announced (buffer_missing): the cap drops them
    in chunks of seqs, and a chunk spanning the jump was announced as one buffer_full gap over it, so that
    a receiver was told twice, for two reasons, of seqs the cap never dropped (audit audb)."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(100))
    buf.close()
    (tmp_path / "b.db.seq").write_text('{"readings": 11500, "aggregates": 0, "alarms": 0}')  # another buffer's
    buf = Buffer.open_writer(path, max_mb=1)
    try:
        assert gaps(buf) == [(101, 11_500, "buffer_missing")]
        store(buf, readings(6000))  # 11501..17500, nothing published
        buf.begin()
        _, dropped, _, _ = buf.evict(buf.used_bytes() // 2, now_ms())
        buf.commit()
        announced = [(a, b) for a, b, reason in gaps(buf) if reason == "buffer_full"]
        said = [s for a, b in announced for s in range(a, b + 1)]
        kept = {r.seq for r in buf.readings_after(0, 10_000)}
        assert dropped and sorted(said) == sorted(set(range(1, 17_501)) - set(range(101, 11_501)) - kept), \
            "every dropped seq announced once as buffer_full, the jump's seqs only as buffer_missing"
    finally:
        buf.close()


def test_an_eviction_after_a_reconnection_does_not_announce_an_announced_gap_again(tmp_path):
    """At the cap over a slow link: a gap dropped above what was in flight is announced; the connection is lost,
    what is in flight falls back to the watermark, and the next eviction's chunk began below that gap and
    spanned it: its seqs were announced a second time inside a wider gap (audit audb)."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    try:
        store(buf, readings(60))
        buf.begin()
        buf.set_sent_upto(STREAM_READINGS, 20)
        buf.evict(0, now_ms(), in_flight_upto=49)  # 50..60 dropped
        buf.commit()
        announced = buf.pending_gaps()[0]
        buf.begin()
        buf.mark_gap_announced(announced.id, 60)
        buf.commit()
        store(buf, readings(40))  # 61..100
        buf.begin()
        buf.evict(0, now_ms(), in_flight_upto=30)  # reconnected: 31..49 and 61..100 dropped
        buf.commit()
        assert gaps(buf) == [(31, 49, "buffer_full"), (61, 100, "buffer_full")], "50..60 was said already"
    finally:
        buf.close()


def test_polls_between_pages_by_whole_polls_within_the_time_range(tmp_path):
    buf = Buffer.open_writer(tmp_path / "b.db")
    try:
        for k in range(4):
            store(buf, [
                Reading("cod", f"c{i:02d}", 1_000_000 + k * 60_000, float(i), "mg/L", "N") for i in range(40)])
        pages, after = [], 0
        while polls := buf.polls_between(1_060_000, 1_180_000, after_seq=after, limit=50):
            pages.append([(p.ts_ms, len(p.readings)) for p in polls])
            after = polls[-1].last_seq
        assert pages == [[(1_060_000, 40)], [(1_120_000, 40)], [(1_180_000, 40)]], "never a poll cut in two"
    finally:
        buf.close()


def test_after_a_crash_past_a_block_a_deleted_file_s_jump_is_announced_from_the_last_reservation(tmp_path):
    """The broker was away: seqs went past a reserved block, the acknowledged watermark stayed
    behind. A crash, the file deleted: every seq above that watermark may have been lost with it."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(3000))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 2000)
    buf.commit()
    for _ in range(9):
        store(buf, readings(1000))  # past 10 000: a new block is reserved, noting what was acknowledged
    buf.conn.close()  # the process died
    mark, buf = reopen_without_the_file(tmp_path)
    try:
        assert gaps(buf) == [(2001, mark, "buffer_missing")]
    finally:
        buf.close()


def test_status_folds_the_readings_since_the_snapshot_per_channel_without_an_object_per_reading(tmp_path):
    """`status` (the P/cmd command, the console, the CLI) shows each channel's last reading and last valid
    time from the readings stored since the recorder's channel snapshot — up to 50 000 of them at a high
    rate. Its memory must follow the number of channels, not of readings: it once built a Python object
    per reading (~25 MB at 2000 readings/s, every second with a platform polling `status`)."""
    import tracemalloc

    from agent.status import RECENT_SCAN, collect

    buf = Buffer.open_writer(tmp_path / "b.db")
    t0 = now_ms() - 60_000
    store(buf, readings(RECENT_SCAN, device="dev", start_ms=t0))  # 10 channels, 5000 readings each
    last = [Reading("dev", "c3", t0 + RECENT_SCAN + 1, 7.5, "mg/L", "N"),
            Reading("dev", "c3", t0 + RECENT_SCAN + 2, None, "mg/L", "B")]
    store(buf, last)
    reader = Buffer.open_reader(tmp_path / "b.db")
    try:
        tracemalloc.start()
        try:
            doc = collect(reader, {"dev": 1.0})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        reader.close()
        buf.close()
    c3 = doc["devices"]["dev"]["channels"]["c3"]
    assert c3["value"] is None and c3["flag"] == "B" and c3["seq"] == RECENT_SCAN + 2
    assert c3["last_valid"] == iso_utc_ms(t0 + RECENT_SCAN + 1), "the last valid reading, not the last one"
    c4 = doc["devices"]["dev"]["channels"]["c4"]
    assert c4["value"] == float(RECENT_SCAN - 6) and c4["seq"] == RECENT_SCAN - 5
    assert peak < 2_000_000, f"status over {RECENT_SCAN} readings allocated {peak / 1e6:.1f} MB at its peak"


def test_status_while_a_first_start_creates_the_file_reads_an_empty_buffer(tmp_path, monkeypatch):
    """`edge-agent status` run during the first seconds of a first start (audit T's soak) found the
    tables committed one by one and the `streams` rows not yet there: it died with a TypeError and a
    traceback. The file is now created in one transaction; a reader sees nothing or everything."""
    from agent.status import collect

    path = tmp_path / "b.db"
    seen: list[dict] = []
    create = Buffer._create_tables_with_sqlite_utils

    def create_then_look(self):  # a status in another process, right after the CREATE TABLEs
        create(self)
        reader = Buffer.open_reader(path)
        try:
            seen.append(collect(reader, {"dev": 1.0}))
        finally:
            reader.close()

    monkeypatch.setattr(Buffer, "_create_tables_with_sqlite_utils", create_then_look)
    buf = Buffer.open_writer(path)
    try:
        assert seen and seen[0]["last_seq"] == 0 and seen[0]["backlog"] == 0
        store(buf, readings(2, device="dev"))
        reader = Buffer.open_reader(path)
        try:
            assert collect(reader, {"dev": 1.0})["last_seq"] == 2
        finally:
            reader.close()
    finally:
        buf.close()


def test_after_a_clean_close_past_the_first_block_a_deleted_file_continues_right_after_its_last_seq(tmp_path):
    """README "No jump after a clean stop" on a station that issued more than one reservation block
    (10 000 readings: four minutes of 40 channels a second): the fresh file continues right after the
    last seq the clean close noted, and only what was not acknowledged is announced lost, not the
    whole rest of the reservation (a false `buffer_missing` gap of thousands of seqs never issued)."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(10_050))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 10_040)
    buf.commit()
    buf.close()
    mark, buf = reopen_without_the_file(tmp_path)
    try:
        assert mark == 10_050, "a clean close lowers the reservation to the last seq issued (seqmark.note_closed)"
        assert gaps(buf) == [(10_041, 10_050, "buffer_missing")]
        assert store(buf, readings(1))[0].seq == 10_051
    finally:
        buf.close()


def test_an_older_agent_after_a_clean_close_then_a_lost_file_never_issues_a_seq_twice(tmp_path):
    """A downgrade: this agent stops cleanly at seq 30 (noted beside the mark), an older edge-agent (one
    that notes no last seq at its close: up to d078fed) runs on the file and issues 31..50, the file is
    lost. The fresh file must not continue at 31: receivers hold 31..50 already and would drop the new
    readings as duplicates. Every edge-agent raises the reservation at its start (ensure_above), which
    tells this one that the note of its own clean close is stale."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(30))
    buf.close()
    older = SeqMark(tmp_path / "b.db.seq")
    older.ensure_above({STREAM_READINGS: 30})  # what every version does at open, before issuing 31..50
    mark, buf = reopen_without_the_file(tmp_path)
    try:
        assert mark == 10_030
        assert store(buf, readings(1))[0].seq == 10_031, "continues above the older agent's reservation"
        assert gaps(buf) == [(1, 10_030, "buffer_missing")]
    finally:
        buf.close()


def test_after_a_clean_close_past_the_first_block_a_corrupt_file_s_seqs_continue_right_after_it(tmp_path):
    """The same for a file found corrupt at the next start: every row was delivered before the clean
    stop, so nothing is announced lost and the seqs go on right after the last one."""
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(10_050))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 10_050)
    buf.commit()
    buf.close()
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256))
    buf = Buffer.open_writer(path)
    try:
        assert gaps(buf) == []
        assert store(buf, readings(1))[0].seq == 10_051
    finally:
        buf.close()


def test_a_wal_deleted_while_the_writer_runs_then_recreated_empty_never_lets_seqs_be_issued_twice(tmp_path):
    """Someone deletes buffer.db-wal while the agent runs (its writer goes on in the deleted file), then
    `edge-agent status` or the publisher opens the file: SQLite creates an empty -wal at the path. The
    writer is then killed (crash, watchdog, power cut): the rows since the last checkpoint went with the
    deleted WAL, and the empty one in its place must not pass for a WAL that kept them (SPEC §3: seqs
    never reused; a receiver deduplicating on seq would drop the new readings given the old seqs)."""
    path = tmp_path / "b.db"
    code = ("import os, signal, sys; sys.path[:0] = [sys.argv[2]]; from agent.buffer import Buffer; "
            "from agent.model import Reading; b = Buffer.open_writer(sys.argv[1]); b.begin(); "
            "b.insert_readings([Reading('d', 'c', 1_764_000_000_000 + i, float(i), None, 'N') for i in range(56)]); "
            "b.commit(); os.unlink(sys.argv[1] + '-wal')\n"
            "try:\n    Buffer.open_reader(sys.argv[1]).stream_state()\nexcept Exception:\n    pass\n"
            "b.begin(); b.insert_readings([Reading('d', 'c', 1_764_000_100_000, 1.0, None, 'N')]); b.commit()\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code, str(path), repo], timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert (tmp_path / "b.db-wal").stat().st_size == 0, "the reader made an empty WAL at the path"
    mark = json.loads((tmp_path / "b.db.seq").read_text())[STREAM_READINGS]
    buf = Buffer.open_writer(path)
    try:
        assert store(buf, readings(1))[0].seq == mark + 1, "57 seqs were issued: none of them again"
        assert gaps(buf) == [(1, mark, "buffer_missing")]
    finally:
        buf.close()


def test_status_backlog_past_the_count_limit_is_worked_out_from_the_seqs_less_the_gaps(tmp_path, monkeypatch):
    """`status` counts a backlog row by row up to BACKLOG_COUNTED; past that it works the figure out from
    the seqs, and the rows an eviction dropped inside the span (a recorded gap) are not counted as waiting."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    try:
        store(buf, readings(1000))
        buf.begin()
        buf.set_sent_upto(STREAM_READINGS, 100)
        buf.conn.execute("DELETE FROM readings WHERE seq BETWEEN 500 AND 599")  # as an eviction with seqs in flight
        buf.record_gap(STREAM_READINGS, 500, 599, "buffer_full", now_ms())
        buf.commit()
        assert buf.backlog(STREAM_READINGS, 100) == (800, True), "counted"
        monkeypatch.setattr(buffer_module, "BACKLOG_COUNTED", 50)
        assert buf.backlog(STREAM_READINGS, 100) == (800, False), "worked out: 101..1000 less the gap 500..599"
        assert buf.backlog(STREAM_READINGS, 550) == (401, False), "a span starting inside a gap: 600..1000"
        assert buf.backlog(STREAM_READINGS, 1000) == (0, True)
        assert buf.has_after(STREAM_READINGS, 999) and not buf.has_after(STREAM_READINGS, 1000)
    finally:
        buf.close()


def test_a_worked_out_backlog_counts_once_the_seqs_of_overlapping_gaps(tmp_path, monkeypatch):
    """A gap announced, then a reconnection (what is in flight falls back to the watermark) and an eviction
    whose range spans it: two gap records cover its seqs. Subtracted twice, the worked-out backlog came out
    smaller than the rows waiting (29 for 40 here; audit Z)."""
    buf = Buffer.open_writer(tmp_path / "b.db")
    try:
        store(buf, readings(60))
        buf.begin()
        buf.set_sent_upto(STREAM_READINGS, 20)
        buf.evict(0, now_ms(), in_flight_upto=49)  # 50..60 dropped
        buf.commit()
        gap_id = buf.pending_gaps()[0].id
        buf.begin()
        buf.mark_gap_announced(gap_id, 60)
        buf.commit()
        store(buf, readings(40))  # 61..100
        buf.begin()
        buf.evict(0, now_ms(), in_flight_upto=30)  # reconnected: 31..100 dropped, across the announced gap
        # An agent before audit audb recorded that as one gap over the announced one (now a gap per run of
        # seqs dropped: 31..49 and 61..100); its file keeps the records.
        buf.conn.execute("DELETE FROM gaps WHERE id != ?", (gap_id,))
        buf.conn.execute("INSERT INTO gaps(stream, first_seq, last_seq, reason, created_ms, announced) "
                         "VALUES (?, 31, 100, 'buffer_full', 0, 0)", (STREAM_READINGS,))
        buf.commit()
        store(buf, readings(30))  # 101..130
        spans = buf.conn.execute("SELECT id, first_seq, last_seq FROM gaps ORDER BY first_seq").fetchall()
        assert (gap_id, 50, 60) in spans and any(f <= 50 and last >= 60 for i, f, last in spans if i != gap_id)
        monkeypatch.setattr(buffer_module, "BACKLOG_COUNTED", 5)
        assert buf.backlog(STREAM_READINGS, 20) == (40, False), "21..30 and 101..130"
    finally:
        buf.close()


def test_status_costs_the_same_on_a_big_backlog_as_on_one_at_the_count_limit(tmp_path, monkeypatch):
    """Past BACKLOG_COUNTED rows, `status` (the CLI, every console refresh, the MQTT `status` command on the
    publisher's thread) does not walk the backlog (SQLite VM steps counted): a count of 30 M readings took
    3 s, and an open console tab cost 40 % of a core (audit Y)."""
    from agent.status import collect, render_text

    monkeypatch.setattr(buffer_module, "BACKLOG_COUNTED", 5_000)
    steps = {}
    for n in (60_000, 300_000):  # both past the RECENT_SCAN of the devices' last readings, too
        buf = Buffer.open_writer(tmp_path / f"{n}.db")
        store(buf, readings(n))
        buf.close()
        reader = Buffer.open_reader(tmp_path / f"{n}.db")
        status, steps[n] = vm_steps(reader.conn, collect, reader, {"d": 1.0})
        reader.close()
        assert status["backlog"] == n and status["backlog_exact"] is False
        assert f"backlog  about {n} unsent readings" in render_text(status)
    assert steps[300_000] < 1.2 * steps[60_000], steps


def test_an_age_purge_with_more_to_delete_than_one_pass_takes_comes_back_soon(tmp_path, monkeypatch):
    """A pass deletes at most PURGE_MAX_ROWS a stream (100 000: the recorder's commits must not stall);
    one pass every 10 minutes kept up with 167 readings a second at most, and a bigger station's file
    filled to `max_mb` and stayed there (audit Y). A pass that hit the limit is followed by another soon."""
    import agent.recorder as recorder_module

    monkeypatch.setattr(buffer_module, "PURGE_MAX_ROWS", 100)
    monkeypatch.setattr(recorder_module, "PURGE_CATCHUP_S", 0.05)
    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    store(buf, readings(400))
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, 400)
    # Seqs with no row in the second pass's range (a gap dropped while readings were in flight, or a jump):
    # that pass deletes fewer rows than the limit, and more still waits (audit Z).
    buf.conn.execute("DELETE FROM readings WHERE seq BETWEEN 150 AND 199")
    buf.conn.execute("INSERT INTO stored_upto(stream, seq, stored_ms) VALUES (?,?,?)",
                     (STREAM_READINGS, 400, now_ms() - 10 * DAY_MS))  # stored ten days ago, all published
    buf.commit()
    monkeypatch.setattr(recorder_module, "PURGE_EVERY_S", 0)  # the first pass at once
    rec = Recorder(buf, commit_interval_ms=50, keep_sent_days=7, max_mb=64)
    monkeypatch.setattr(recorder_module, "PURGE_EVERY_S", 3600)  # the next one an hour later, unless caught up
    rec.start()

    def oldest() -> int | None:
        reader = Buffer.open_reader(path)
        try:
            return reader.first_seq()
        finally:
            reader.close()

    try:
        wait_for(lambda: oldest() is None, 20, "every row older than 7 days purged")
    finally:
        rec.stop()
    try:
        purge(buf, 7, now_ms())
        assert not buf.purge_cut_short, "an empty table leaves nothing for a next pass (no pass every 5 s)"
    finally:
        buf.close()


def test_status_figures_come_from_one_state_of_the_file_while_the_recorder_commits(tmp_path, monkeypatch):
    """`backlog` and `last_seq` of one status describe the same moment: the recorder commits between
    the queries of `collect` (as it does many times a second on a busy station), and a backlog counted
    after such a commit was larger than last_seq - sent_upto (acceptance audit auds)."""
    from agent.status import collect

    path = tmp_path / "b.db"
    buf = Buffer.open_writer(path)
    try:
        store(buf, readings(100, device="dev"))
        reader = Buffer.open_reader(path)
        meta = Buffer.meta

        def meta_while_the_recorder_commits(self):  # read between last_seq and the backlog count
            if self is reader:
                store(buf, readings(50, device="dev"))
            return meta(self)

        monkeypatch.setattr(Buffer, "meta", meta_while_the_recorder_commits)
        try:
            status = collect(reader, {"dev": 1.0})
        finally:
            reader.close()
        assert (status["last_seq"], status["backlog"], status["streams"]["readings"]["last_seq"]) == (100, 100, 100)
    finally:
        buf.close()


def test_a_new_storage_path_after_a_clean_stop_continues_right_after_the_last_seq(tmp_path):
    """A SIGHUP names another buffer file (its mark kept beside it, `SeqMark.mirror_to`), then a clean stop
    and a start at the new path: the seqs go on right after the last one issued, the unpublished rows left
    in the old file announced. Since the clean close lowers the reservation (6fa72d4) the mirror kept the
    higher one it had been given, beside the lowered note: taken for stale, the new file jumped a block
    and announced 10 000 seqs never issued as missing (a false gap)."""
    old = Buffer.open_writer(tmp_path / "old.db")
    store(old, readings(30))
    old.seqmark.mirror_to(tmp_path / "b.db.seq")
    store(old, readings(20))
    old.close()
    mark, buf = reopen_without_the_file(tmp_path)
    try:
        assert store(buf, readings(1))[0].seq == 51
        assert gaps(buf) == [(1, 50, "buffer_missing")], "the 50 rows left in the old file, nothing more"
    finally:
        buf.close()


def test_a_reader_opens_the_file_at_a_path_with_uri_characters_in_it(tmp_path):
    """The readers (the publisher, `status`, the console) open the file by a `file:` URI: a `#`, `?` or
    `%` in a directory's name was taken for the URI's fragment, query or an escape, so that they read
    (and created) another file, read-write: `status` said 0 readings of a buffer holding them, and the
    publisher found no table to publish from."""
    made: list[str] = []
    for name in ("site#2", "what?x=1", "100%41"):
        made.append(name)
        path = tmp_path / name / "buffer.db"
        path.parent.mkdir()
        writer = Buffer.open_writer(path)
        store(writer, readings(5))
        for closed in (False, True):
            if closed:
                writer.close()
            reader = Buffer.open_reader(path)
            try:
                assert reader.stream_state(STREAM_READINGS)[0] == 5, (name, closed)
            finally:
                reader.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(made), "nothing opened or made beside"


def test_a_reader_opens_the_file_at_a_path_that_starts_with_two_slashes(tmp_path):
    """`storage.path: ${STATE_DIR}/buffer.db` with STATE_DIR=/ gives `//buffer.db` (normpath keeps a
    leading `//`): the writer opened it, but the readers' `file://...` URI took the first directory for
    a host, 'invalid uri authority': status could not read the buffer and the publisher published nothing."""
    path = Path("/" + str(tmp_path / "buffer.db"))
    assert str(path).startswith("//")
    writer = Buffer.open_writer(path)
    try:
        store(writer, readings(5))
        reader = Buffer.open_reader(path)
        try:
            assert reader.stream_state(STREAM_READINGS)[0] == 5
        finally:
            reader.close()
    finally:
        writer.close()
    assert meta_schema_version(path) == SCHEMA_VERSION, "the layout check reads it too"


def test_a_seq_mark_that_cannot_be_written_again_is_said_once_not_at_every_path_check(tmp_path, caplog):
    """`rm buffer.db*` on a full disk (a technician freeing space: the agent still holds buffer.db open, so
    nothing is freed) takes the seq mark, and the recorder's 5 s path check cannot write it again. That
    was a WARNING every 5 s (17 280 a day) for as long as the disk stayed full. It is said once, then once
    more when it is written again, and again should it fail anew."""
    mark = SeqMark(tmp_path / "b.db.seq")
    mark.ensure_above({STREAM_READINGS: 5})
    mark.path.unlink()
    blocker = mark.path.with_name(mark.path.name + ".tmp")
    blocker.mkdir()  # the atomic write's temporary file cannot be made (as root too, unlike a chmod)
    with caplog.at_level("WARNING", logger="agent.seqmark"):
        assert [mark.keep() for _ in range(5)] == [False] * 5
        assert caplog.text.count("cannot be written again") == 1, caplog.text
        blocker.rmdir()
        assert mark.keep() and mark.path.exists()
        assert caplog.text.count("written again") == 2, caplog.text  # "cannot be written again", "written again"
        mark.path.unlink()
        blocker.mkdir()
        assert not mark.keep() and not mark.keep()
        assert caplog.text.count("cannot be written again") == 2, caplog.text
        blocker.rmdir()
        assert mark.keep()
    assert json.loads(mark.path.read_text())[STREAM_READINGS] == 5 + mark.block, "the reservation it holds"
