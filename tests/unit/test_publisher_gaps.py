"""The publisher's gap announcements, on a real buffer file: what it says of a gap that the size cap
extends while the announcement is on its way. The publisher thread is not started and no broker is
involved: the announcement in flight is the state `_publish_gap` leaves behind."""

from __future__ import annotations

import sqlite3

from agent.buffer import Buffer, BufferError
from agent.model import STREAM_READINGS, Reading, now_ms
from agent.publisher import BrokerSettings, Publisher
from agent.recorder import Recorder


def test_a_gap_extended_while_its_announcement_is_unacknowledged_is_announced_for_its_new_part_only(tmp_path):
    """Audit T's soak (a link slower than the station, the cap evicting every few seconds while the
    agent stays connected) saw one gap announced as [9760, 11125], [9760, 11919], [9760, 16221],
    [9760, 18221]: each growth said the whole range again while the earlier announcement still waited
    for its PUBACK. SPEC §3 announces a dropped range once; the README, a grown gap's new part only."""
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    recorder = Recorder(writer, commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    settings = BrokerSettings(urls=["mqtt://127.0.0.1:9"], client_id="t", station_id="ST1")
    pub = Publisher(settings, str(path), recorder)
    reader = Buffer.open_reader(path)
    try:
        writer.begin()
        gap = writer.record_gap(STREAM_READINGS, 9760, 11125, "buffer_full", now_ms())
        writer.commit()
        (first,) = pub._unannounced(reader.pending_gaps())
        assert (first.first_seq, first.last_seq) == (9760, 11125)
        pub._gaps_inflight.add((gap.id, 11125))  # published, no PUBACK yet

        writer.begin()
        writer.record_gap(STREAM_READINGS, 11126, 11919, "buffer_full", now_ms())  # the cap again
        writer.commit()
        (grown,) = pub._unannounced(reader.pending_gaps())
        assert (grown.first_seq, grown.last_seq) == (11126, 11919), "only what was not said yet"

        pub._gaps_inflight.clear()  # the connection was lost: nothing on its way was acknowledged
        (again,) = pub._unannounced(reader.pending_gaps())
        assert (again.first_seq, again.last_seq) == (9760, 11919), "said again from the start"
    finally:
        reader.close()
        writer.close()


def test_a_rescued_file_the_publisher_opens_only_at_a_later_fill_has_its_gaps_read(tmp_path, monkeypatch):
    """The publisher that met a damaged page tries to reopen 0.5 s later; a rescue that takes longer (a
    backlog to salvage, a loaded machine) refuses that try, and the rescued file was then opened by a
    later fill without its pending gaps being read: the seqs the damage cost were announced only at the
    next reconnection (tests/integration/test_buffer_damaged_running.py under load: 'gaps []')."""
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    writer.begin()
    writer.insert_readings([Reading("d", "c", now_ms() + i, float(i), "mg/L", "N") for i in range(100)])
    writer.commit()
    recorder = Recorder(writer, commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    pub = Publisher(BrokerSettings(urls=["mqtt://127.0.0.1:9"], client_id="t", station_id="ST1"), str(path), recorder)
    pub._open_reader()
    pub._check_gaps = False  # connected: the pending gaps were read
    opened_by_recorder = recorder.open_reader

    def rescue_under_way() -> Buffer:
        raise BufferError(f"{path} is not the file the recorder writes (deleted, renamed or replaced while the "
                          "agent runs); waiting for the recorder to put its own back")

    monkeypatch.setattr(recorder, "open_reader", rescue_under_way)
    damage = sqlite3.DatabaseError("database disk image is malformed")
    pub._reader_failed(damage)
    assert pub._reader is None
    writer.conn.close()  # the recorder's rescue (`Recorder._rescue_corrupt`) completes
    recorder.buffer = Buffer.rescue(path, damage, sync="full", max_mb=None)
    monkeypatch.setattr(recorder, "open_reader", opened_by_recorder)
    try:
        pub._open_reader()  # the next fill
        assert pub._unannounced(pub._reader.pending_gaps()), "the rescue recorded the seqs it jumped over"
        assert pub._check_gaps, "the next fill reads and announces the new file's pending gaps"
    finally:
        pub._drop_reader()
        recorder.buffer.close()


def test_a_gap_announcement_acknowledged_across_a_rescue_never_silences_a_gap_of_the_new_file(tmp_path):
    """Gap ids are each file's own: a rescued file numbers its gaps from 1 again. A PUBACK of the old file's
    gap 1 [1501, 3500] that came while the recorder rescued the file (a drain met the damaged page just after
    the announcement) was written to the new file's gap 1 (the readings the damage cost, [~1200, ~1250]),
    marking it announced, and the publisher counted it said as well: those seqs were never announced, a
    jump left unexplained (audit audb)."""
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    for k in range(0, 5000, 50):
        writer.begin()
        writer.insert_readings([Reading("d", f"c{i % 10}", now_ms() + k + i, 1.0, "mg/L", "N") for i in range(50)])
        writer.commit()
    writer.begin()
    writer.set_sent_upto(STREAM_READINGS, 1000)
    writer._delete_upto(STREAM_READINGS, 3500, first=1501)  # the cap dropped what followed the rows in flight
    old_gap = writer.record_gap(STREAM_READINGS, 1501, 3500, "buffer_full", now_ms())
    writer.commit()
    writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn = sqlite3.connect(path)
    leaves = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name='readings' AND pagetype='leaf' "
                                         "ORDER BY pageno")]
    conn.close()
    with open(path, "r+b") as f:  # a page of the readings in flight (1001..1500), unpublished
        f.seek((leaves[len(leaves) * 2 // 5] - 1) * 1024)
        f.write(b"\xa5" * 1024)
    recorder = Recorder(writer, commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    pub = Publisher(BrokerSettings(urls=["mqtt://127.0.0.1:9"], client_id="t", station_id="ST1"), str(path), recorder)
    pub._open_reader()
    pub._by_mid[1] = ["gap", (old_gap.id, 3500), False]  # announced, waiting for its PUBACK
    pub._gaps_inflight.add((old_gap.id, 3500))
    try:
        recorder._rescue_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
        lost = [g for g in recorder.buffer.pending_gaps() if g.reason == "buffer_corrupt" and g.last_seq <= 1500]
        assert lost and lost[0].id == old_gap.id, "the new file's gap 1: the readings the damage cost"
        pub._acknowledge(1)  # before the publisher follows the new file
        recorder._commit_once()
        assert [(g.first_seq, g.last_seq) for g in recorder.buffer.pending_gaps() if g.id == lost[0].id] == [
            (lost[0].first_seq, lost[0].last_seq)], "still to announce, whole"
        pub._fill_window()  # follows the new file (no client: nothing is published)
        said = pub._unannounced(pub._reader.pending_gaps())
        whole = [(lost[0].first_seq, lost[0].last_seq)]
        assert [(g.first_seq, g.last_seq) for g in said if g.id == lost[0].id] == whole, "announced, whole"
    finally:
        pub._drop_reader()
        recorder.buffer.close()
