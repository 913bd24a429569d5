"""The publisher's gap announcements, on a real buffer file: what it says of a gap that the size cap
extends while the announcement is on its way. The publisher thread is not started and no broker is
involved: the announcement in flight is the state `_publish_gap` leaves behind."""

from __future__ import annotations

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, now_ms
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
