"""The backlog messages the publisher encodes ahead while offline, on a real buffer file: they are
exactly the messages the live drain would build, in order, and any doubt (another starting point,
rows evicted by the size cap since) discards them instead of publishing what the gap says is lost.
The publisher thread is not started and no broker is involved: these are its offline steps."""

from __future__ import annotations

import json

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading, now_ms
from agent.payloads import data_message
from agent.publisher import BrokerSettings, Publisher, _holes, _Resend
from agent.recorder import Recorder

BATCH = 200


def offline_publisher(tmp_path, n: int) -> tuple[Publisher, Buffer]:
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    t = now_ms()
    writer.begin()
    writer.insert_readings([Reading("d", f"c{i % 8}", t + i // 8 * 1000, i / 3, "mg/L", "N") for i in range(n)])
    writer.commit()
    recorder = Recorder(writer, commit_interval_ms=200, keep_sent_days=7, max_mb=64)
    settings = BrokerSettings(urls=["mqtt://127.0.0.1:9"], client_id="t", station_id="ST1", max_batch=BATCH)
    return Publisher(settings, str(path), recorder), writer


def prepare_all(pub: Publisher) -> int:
    n = 0
    while pub._prepare_backlog():
        n += 1
    return n


def test_prepared_messages_are_the_live_messages_in_order(tmp_path):
    pub, writer = offline_publisher(tmp_path, 1050)
    assert prepare_all(pub) == 5  # the 50 readings of the last, partial message are read live
    reader = Buffer.open_reader(writer.path)
    cursor = 0
    for _ in range(5):
        taken = pub._take_prepared(cursor)
        assert taken is not None
        live = reader.readings_json(cursor, BATCH)
        assert live is not None
        assert taken == (live.last_seq, data_message("ST1", live.items))
        seqs = [r["seq"] for r in json.loads(taken[1])["readings"]]
        assert seqs == list(range(cursor + 1, cursor + BATCH + 1))
        cursor = taken[0]
    assert pub._take_prepared(cursor) is None
    assert pub._prepared_bytes == 0


def test_a_cursor_off_the_prepared_chain_discards_it(tmp_path):
    pub, _ = offline_publisher(tmp_path, 1000)
    prepare_all(pub)
    assert pub._take_prepared(150) is None  # e.g. the watermark moved by an eviction
    assert not pub._prepared and pub._prepared_bytes == 0


def test_rows_evicted_after_preparing_are_never_published(tmp_path):
    pub, writer = offline_publisher(tmp_path, 1000)
    prepare_all(pub)
    first = pub._take_prepared(0)
    assert first is not None and first[0] == 200
    # The size cap drops the oldest unpublished readings (201..450) while the drain goes on.
    writer.begin()
    writer._delete_upto(STREAM_READINGS, 450)
    writer.commit()
    assert pub._take_prepared(200) is None
    assert not pub._prepared
    live = Buffer.open_reader(writer.path).readings_json(200, BATCH)
    assert live is not None and live.first_seq == 451


def test_rows_the_cap_evicts_above_the_messages_in_flight_are_never_published(tmp_path):
    """The size cap keeps the readings in flight (up to the cursor: they may arrive) and drops the oldest
    above them. The check that the next prepared message's rows were all still stored looked only at the
    oldest row stored, which the rows kept in flight hold below it: messages of evicted rows went out
    after the drain resumed, their seqs announced as a buffer_full gap as well (audit audw's soak: a
    0.1 MB cap and link cuts, 11660 readings both delivered and in a gap)."""
    pub, writer = offline_publisher(tmp_path, 1000)
    prepare_all(pub)
    first = pub._take_prepared(0)
    assert first is not None and first[0] == 200  # published: in flight, no PUBACK yet
    writer.begin()
    _, dropped, gap, _ = writer.evict(0, now_ms(), in_flight_upto=200, max_rows=250)
    writer.commit()
    assert dropped and gap is not None and gap.first_seq == 201
    taken = pub._take_prepared(200)
    published = [r["seq"] for r in json.loads(taken[1])["readings"]] if taken is not None else []
    assert not set(published) & set(range(gap.first_seq, gap.last_seq + 1)), "evicted readings published"


def test_nothing_is_prepared_for_less_than_a_full_message(tmp_path):
    pub, _ = offline_publisher(tmp_path, BATCH - 1)
    assert prepare_all(pub) == 0


def test_a_resend_whose_reply_was_lost_with_the_connection_replies_again():
    """Pure logic of a resend job: its reply is published once every batch is acknowledged, and the job
    stays queued until the reply is acknowledged too; a lost connection rewinds it to what the broker
    acknowledged, so it replies again (with the same count) instead of leaving the platform waiting."""
    job = _Resend("r1", 1, 400, after=0, acked=0)
    for upto in (200, 400):
        job.inflight.append(["resend", job, True, upto, 200, []])
    job.after, job.read_all = 400, True
    job.settle()
    assert (job.acked, job.count, list(job.inflight)) == (400, 400, [])
    job.replied = True  # published, its PUBACK lost with the connection
    job.rewind()
    assert (job.after, job.read_all, job.replied, job.count) == (400, False, False, 400)


def test_the_seqs_missing_inside_a_resent_batch_are_the_holes_between_its_own_seqs():
    """Pure logic: a resend's `missing` takes in the holes inside one batch (a poll of an HJ 212 resend that
    spans a damaged page, say), computed from the batch's own seqs, not from a later read of the file."""
    assert _holes([5, 6, 7]) == []
    assert _holes([5, 9, 10, 14]) == [[6, 8], [11, 13]]
    assert _holes([5]) == []
