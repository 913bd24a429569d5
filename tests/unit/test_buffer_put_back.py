"""The buffer file deleted, renamed or replaced while the recorder writes it (storage audit X, H1/H2), on
real SQLite files: the recorder puts its own file back with every row and seq, moves aside (never deletes)
what stood at the path, and readers read only the file the recorder writes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from harness import fill_disk

from agent.buffer import Buffer, BufferError
from agent.model import STREAM_READINGS, Reading, now_ms
from agent.recorder import Recorder


def readings(n: int, device: str = "d") -> list[Reading]:
    t = now_ms()
    return [Reading(device, f"c{i % 10}", t + i, float(i), "mg/L", "N") for i in range(n)]


def seqs_in(path: Path, device: str | None = None) -> list[int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        sql = "SELECT seq FROM readings" + (" WHERE device=?" if device else "") + " ORDER BY seq"
        return [r[0] for r in conn.execute(sql, (device,) if device else ())]
    finally:
        conn.close()


def recorder_with(path: Path, n: int, sent: int = 0) -> Recorder:
    buf = Buffer.open_writer(path)
    buf.begin()
    buf.insert_readings(readings(n))
    buf.set_sent_upto(STREAM_READINGS, sent)
    buf.commit()
    return Recorder(buf, commit_interval_ms=50, keep_sent_days=7, max_mb=64)


def commit(recorder: Recorder, rows: list[Reading]) -> None:
    """One group commit of the recorder, its path check left to the test (`_check_path`)."""
    recorder._last_path_check = time.monotonic()
    recorder.submit(rows)
    recorder._commit_once()


def other_buffer(path: Path, n: int) -> Path:
    buf = Buffer.open_writer(path)
    buf.begin()
    buf.insert_readings(readings(n, device="other"))
    buf.commit()
    buf.close()
    return path


@pytest.mark.parametrize("how", ["rm", "mv"])
def test_a_deleted_or_renamed_file_is_put_back_with_every_row_and_seq(tmp_path, how):
    path = tmp_path / "buffer.db"
    recorder = recorder_with(path, 300, sent=100)
    old_identity = recorder.file_identity()
    reader = recorder.open_reader()
    try:
        if how == "rm":
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
        else:
            os.rename(path, tmp_path / "buffer.db.bak")
        commit(recorder, readings(50))  # into the file the recorder holds open
        recorder._check_path()
        assert recorder.detached is None
        assert recorder.file_identity() != old_identity
        assert seqs_in(path) == list(range(1, 351)), "every row, with its seq"
        assert recorder.buffer.sent_upto(STREAM_READINGS) == 100
        commit(recorder, readings(10))
        assert seqs_in(path)[-1] == 360, "numbering goes on in the file put back"
        assert reader.readings_after(349, 10)[0].seq == 350, "the old reader still reads the file written then"
        fresh = recorder.open_reader()
        assert fresh.readings_after(350, 100)[-1].seq == 360
        fresh.close()
        if how == "mv":
            assert (tmp_path / "buffer.db.bak").exists(), "the renamed file is left alone"
            assert seqs_in(tmp_path / "buffer.db.bak") == list(range(1, 351))
        assert not list(tmp_path.glob("*.foreign-*")), "nothing stood at the path: nothing moved aside"
        assert path.with_name("buffer.db-wal").exists(), "closing the old connection left the new file's WAL"
    finally:
        reader.close()
        recorder.buffer.close()
    reopened = Buffer.open_writer(path)
    try:
        assert reopened.last_seq(STREAM_READINGS) == 360 and not reopened.pending_gaps()
    finally:
        reopened.close()


def test_another_file_put_in_place_is_never_read_and_is_kept_beside(tmp_path):
    path = tmp_path / "buffer.db"
    other = other_buffer(tmp_path / "other" / "buffer.db", 500)
    recorder = recorder_with(path, 200, sent=50)
    own = recorder.file_identity()
    reader = recorder.open_reader()
    try:
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        shutil.copy(other, tmp_path / "buffer.db.tmp")
        os.rename(tmp_path / "buffer.db.tmp", path)
        commit(recorder, readings(20))
        with pytest.raises(BufferError, match="not the file the recorder writes"):
            recorder.open_reader()
        assert reader.identity == own and reader.readings_after(200, 100)[-1].seq == 220
        recorder._check_path()
        kept = [p for p in tmp_path.glob("buffer.db.foreign-*") if not p.name.endswith((".txt", "-wal", "-shm"))]
        assert len(kept) == 1 and kept[0].with_name(kept[0].name + ".txt").exists()
        kept = kept[0]
        assert seqs_in(kept, "other") == list(range(1, 501)), "the foreign file is kept as it was"
        assert seqs_in(path) == list(range(1, 221)) and not seqs_in(path, "other")
        fresh = recorder.open_reader()
        assert fresh.identity == recorder.file_identity() != own
        fresh.close()
    finally:
        reader.close()
        recorder.buffer.close()


def test_no_room_for_the_copy_keeps_writing_the_open_file_and_retries(small_disk, caplog):
    """A disk without room for the copy: logged, nothing lost, the recorder goes on in the file it holds
    open and puts it back once there is room."""
    path = small_disk / "buffer.db"
    recorder = recorder_with(path, 5000)
    try:
        path.unlink()
        filler = fill_disk(small_disk, leave_bytes=32 * 1024)
        recorder._check_path()
        assert recorder.detached == "deleted or renamed"
        assert "cannot put the buffer file back" in caplog.text
        assert not list(small_disk.glob("*restore*")), "no partial copy left"
        commit(recorder, readings(10))  # the disk is full: they wait in memory
        filler.unlink()
        commit(recorder, [])
        assert recorder.buffer.last_seq(STREAM_READINGS) == 5010
        recorder._check_path()
        assert recorder.detached is None and seqs_in(path) == list(range(1, 5011))
    finally:
        recorder.buffer.close()


def test_a_stop_before_the_file_could_be_put_back_says_what_is_lost(small_disk, caplog):
    path = small_disk / "buffer.db"
    recorder = recorder_with(path, 5000, sent=4000)
    path.unlink()
    fill_disk(small_disk, leave_bytes=32 * 1024)
    recorder.start()
    try:
        recorder.stop()
        assert not recorder.is_alive()
        assert "readings seq 4001..5000, not yet published, are lost with this process" in caplog.text
        assert "Traceback" not in caplog.text
    finally:
        recorder.buffer.close()
