"""The seq high-water mark kept beside a new `storage.path` (SIGHUP) must outlive a runtime rescue of the
running file: the buffer opened at the new path on the next start continues above every seq issued."""

from __future__ import annotations

import sqlite3

from harness import wait_for

from agent.buffer import Buffer
from agent.model import Reading, now_ms
from agent.recorder import Recorder

PAGE_SIZE = 1024  # agent.buffer's


def readings(n: int) -> list[Reading]:
    t = now_ms()
    return [Reading("d", f"c{i % 50}", t + i, float(i), "mg/L", "N") for i in range(n)]


def damage_a_middle_leaf(path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name='readings' AND pagetype='leaf' "
                                            "ORDER BY path")]
    with open(path, "r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * PAGE_SIZE)
        f.write(b"\xa5" * PAGE_SIZE)


def test_a_rescue_while_running_keeps_the_mark_beside_the_new_storage_path(tmp_path):
    old, new = tmp_path / "old" / "buffer.db", tmp_path / "new" / "buffer.db"
    recorder = Recorder(Buffer.open_writer(old), commit_interval_ms=20, keep_sent_days=7, max_mb=64)
    recorder.start()
    try:
        recorder.submit(readings(2000))
        assert recorder.flush()
        recorder.keep_seq_marks_for(new)  # a SIGHUP named another buffer file, used from the next start
        damage_a_middle_leaf(old)
        first_file = recorder.file_identity()
        recorder.suspect_corruption("publisher", sqlite3.DatabaseError("database disk image is malformed"))
        recorder.submit(readings(10))  # the recorder's next turn checks the file and rescues it
        wait_for(lambda: recorder.file_identity() != first_file, 20, "the damaged file rescued")
        for _ in range(3):  # the rescued file's seqs go on past the reservation the mirror was given
            recorder.submit(readings(6000))
        assert recorder.flush()
        issued = recorder.stored_upto("readings")
    finally:
        recorder.stop()
        recorder.buffer.close()
    fresh = Buffer.open_writer(new)  # the next start, at the new path
    try:
        fresh.begin()
        (reading,) = fresh.insert_readings(readings(1))
        fresh.commit()
    finally:
        fresh.close()
    assert reading.seq > issued, f"seq {reading.seq} at the new path, {issued} already issued at the old one"
