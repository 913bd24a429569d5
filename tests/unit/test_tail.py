"""`edge-agent tail`'s flags of seq jumps and its command line (pure logic)."""

from __future__ import annotations

import argparse

from agent.tail import MAX_MISSING_RANGES, SeqTracker


def test_a_jump_while_tail_was_disconnected_is_not_called_a_loss_of_the_station():
    """Readings published while tail's own connection was down never reach it (a clean session): the
    jump after its reconnection was flagged `GAP a..b missing`, as a loss at the station is."""
    tracker = SeqTracker()
    assert [tracker.see("readings", s) for s in (1, 2)] == ["", ""]
    tracker.lost_sight()
    assert tracker.see("readings", 10) == "GAP 3..9 not seen here (tail was disconnected)"
    assert tracker.see("readings", 5) == "LATE (was missing)", "a resend of them still fills the hole"
    assert tracker.see("readings", 20) == "GAP 11..19 missing", "once back, a jump is the station's again"
    assert tracker.see("alarms", 7) == "", "a stream first seen after the reconnection starts there"


def test_a_huge_message_is_shown_cut_with_its_size_not_printed_whole():
    """Whoever may publish under the station's topics chose what tail printed, whole: a 100 MB payload of
    NUL bytes took tail past 7 GB of memory (each escaped byte a string of its own), a gateway's OOM killer
    then choosing among its processes (the agent's too). Beyond MAX_MESSAGE_BYTES a message is not decoded:
    its first SHOWN_BYTES and its size are shown; no line is ever longer than MAX_LINE_CHARS."""
    from agent.tail import MAX_LINE_CHARS, MAX_MESSAGE_BYTES, SHOWN_BYTES, format_message

    tracker = SeqTracker()
    size = MAX_MESSAGE_BYTES + 1
    [line] = format_message("env/S/data", b"\x00" * size, tracker)
    cut = size - SHOWN_BYTES
    assert line == (f"data   TOO LARGE: {size} bytes, not decoded; the first {SHOWN_BYTES} shown "
                    f"({cut} cut): {bytes(SHOWN_BYTES)!r}")
    [line] = format_message("env/S/cmd", b"##0101QN=1;PW=secret;" + b"x" * size, tracker)
    assert "TOO LARGE" in line and "secret" not in line and "PW=***" in line, "never the HJ 212 password"

    for payload, shown in ((b"\x00" * MAX_MESSAGE_BYTES, "\\x00"), (b"a" * MAX_MESSAGE_BYTES, "a"),
                           (b"\xc3\xa9" * (MAX_MESSAGE_BYTES // 2), "\u00e9")):
        [line] = format_message("env/S/status", payload, tracker)
        head = "status "  # the line's first MAX_LINE_CHARS characters are shown (escaped), then how many more
        more = len(head) + len(payload.decode()) - MAX_LINE_CHARS
        assert line == head + shown * (MAX_LINE_CHARS - len(head)) + f" \u2026 ({more} more characters not shown)"
    # Real messages are untouched: a data message of the largest batch prints every reading, whole.
    readings = ",".join(f'{{"seq":{s},"device":"cod","channel":"w01018","ts":"2026-01-01T00:00:00.000Z",'
                        f'"value":1.5,"unit":"mg/L","flag":"N"}}' for s in range(1, 10_001))
    lines = format_message("env/S/data", f'{{"readings":[{readings}]}}'.encode(), tracker)
    assert len(lines) == 10_000 and lines[-1] == "data   #10000 cod.w01018 2026-01-01T00:00:00.000Z 1.5 mg/L N"


def test_a_gap_message_with_bounds_that_are_not_seqs_does_not_poison_the_next_gaps():
    """A gap announcement `{"gap": ["x", "y"]}` (anyone allowed to publish on the station's topics) was kept
    as announced: from then on every jump of every stream compared seqs with strings, and each data message
    with a jump was shown as one `MALFORMED (TypeError ...)` line, its readings not at all, for the rest of
    tail's run. It is shown as malformed itself, and nothing of it is kept."""
    from agent.tail import format_message

    tracker = SeqTracker()
    for bad in (b'{"gap": ["x", "y"]}', b'{"gap": [true, 5]}', b'{"gap": [1, 2, 3]}', b'{"gap": 7}'):
        [line] = format_message("env/S/data", bad, tracker)
        assert line.startswith("data   MALFORMED ("), line
    assert format_message("env/S/data", b'{"gap": [2, 4], "reason": "cap"}', tracker) == [
        "GAP    seq 2..4 dropped at the station (cap)"]
    data = b'{"readings":[{"seq":%d,"device":"d","channel":"c","ts":"T","value":1,"flag":"N"}]}'
    assert format_message("env/S/data", data % 1, tracker) == ["data   #1 d.c T 1  N"]
    assert format_message("env/S/data", data % 5, tracker) == ["data   #5 d.c T 1  N (announced gap 2..4)"]
    assert format_message("env/S/data", data % 9, tracker) == ["data   #9 d.c T 1  N GAP 6..8 missing"]
    for a in range(100, 100 + 3 * MAX_MISSING_RANGES):  # announcements are kept as missing ranges are: the last
        format_message("env/S/data", b'{"gap": [%d, %d]}' % (a, a), tracker)
    assert len(tracker.announced_gaps) == MAX_MISSING_RANGES


def test_tail_help_says_url_defaults_to_the_configs_brokers_in_order():
    """`tail` without `--url` tries the config's `mqtt.urls` in order, as `run` does (README, Commands);
    its --help said "default: the config's first", which an operator with a failover list took for the
    one broker tail would watch."""
    from agent.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    url = next(a for a in sub.choices["tail"]._actions if "--url" in a.option_strings)
    assert "in order" in url.help and "first" not in url.help, url.help


def _data(seq: int) -> bytes:
    return (b'{"v":1,"station":"S","readings":[{"seq":%d,"device":"d","channel":"c","ts":"T","value":1,'
            b'"flag":"N"}]}' % seq)


def _gap(first: int, last: int) -> bytes:
    return b'{"v":1,"station":"S","gap":[%d,%d],"reason":"buffer_full"}' % (first, last)


def test_a_gap_announced_in_parts_is_not_called_missing():
    """The station announces a gap that the size cap grows while it stays connected in parts, the new
    part only ([10, 19], then [20, 29]: `Publisher._unannounced`, Audit T's soak). The jump over the
    whole of it (9 -> 30) was flagged `GAP 10..29 missing`, as a loss the station never announced; and
    a jump over an announced gap and seqs that really are missing called all of it missing."""
    from agent.tail import format_message

    tracker = SeqTracker()
    format_message("env/S/data", _data(9), tracker)
    format_message("env/S/data", _gap(10, 19), tracker)
    format_message("env/S/data", _gap(20, 29), tracker)
    assert format_message("env/S/data", _data(30), tracker) == ["data   #30 d.c T 1  N (announced gap 10..29)"]
    format_message("env/S/data", _gap(31, 40), tracker)
    assert format_message("env/S/data", _data(45), tracker) == [
        "data   #45 d.c T 1  N GAP 41..44 missing (31..40 announced)"]
    assert tracker.see("readings", 35) == "DUP", "an announced seq is not waited for"
    assert tracker.see("readings", 42) == "LATE (was missing)"



def test_a_readings_gap_announcement_does_not_hide_a_jump_of_the_aggregates_or_alarms():
    """A gap announcement (on the data topic) names readings seqs; each stream has its own seqs (SPEC §3).
    A jump of the aggregates or alarms that fell inside an announced readings gap was shown as
    `(announced gap ...)`: a loss of aggregates or alarms hidden."""
    tracker = SeqTracker()
    tracker.announce_gap(10, 500)
    assert tracker.see("aggregates", 11) == "" and tracker.see("aggregates", 20) == "GAP 12..19 missing"
    assert tracker.see("alarms", 11) == "" and tracker.see("alarms", 13) == "GAP 12..12 missing"


def test_a_gap_announced_after_the_readings_beyond_it_accounts_for_what_tail_called_missing():
    """The size cap may drop readings between the publisher's look at the pending gaps and its next batch
    (`Recorder._make_room` counts the gap once it lets the publisher go on): the readings beyond the gap
    then go out before its announcement. tail printed `GAP 32..44 missing` and, later, the announcement,
    with nothing to say that the two were the same, and went on waiting for 32..44 as missing."""
    from agent.tail import format_message

    tracker = SeqTracker()
    format_message("env/S/data", _data(31), tracker)
    assert format_message("env/S/data", _data(45), tracker) == ["data   #45 d.c T 1  N GAP 32..44 missing"]
    assert format_message("env/S/data", _gap(32, 44), tracker) == [
        "GAP    seq 32..44 dropped at the station (buffer_full): the GAP 32..44 above is accounted for"]
    assert tracker.see("readings", 40) == "DUP", "an announced seq is no longer waited for"
    assert format_message("env/S/data", _gap(50, 60), tracker) == [
        "GAP    seq 50..60 dropped at the station (buffer_full)"], "nothing was missing there"


def _cmd(cmd_id: str, first: int, last: int) -> bytes:
    return b'{"id":"%s","cmd":"resend","from_seq":%d,"to_seq":%d}' % (cmd_id.encode(), first, last)


def _reply(cmd_id: str, first: int, last: int) -> bytes:
    return b'{"v":1,"id":"%s","ok":true,"cmd":"resend","from_seq":%d,"to_seq":%d,"count":3}' % (
        cmd_id.encode(), first, last)


def test_a_resend_that_comes_before_any_live_reading_is_not_taken_for_the_live_seqs():
    """tail started, then the platform engineer sent a resend (a station polled every 60 s: no live
    reading yet). The resent readings were the first tail saw, so the next live one was a jump from
    them: `GAP 103..4999 missing`, a loss at the station that never happened. The jump is tail's own
    (it started during a resend), said as for a disconnection; a real jump after it is missing again."""
    from agent.tail import format_message

    tracker = SeqTracker()
    format_message("env/S/cmd", _cmd("r1", 100, 102), tracker)
    assert [format_message("env/S/data", _data(s), tracker)[0][-1] for s in (100, 101, 102)] == ["N", "N", "N"]
    format_message("env/S/cmd/reply", _reply("r1", 100, 102), tracker)
    assert format_message("env/S/data", _data(5000), tracker) == [
        "data   #5000 d.c T 1  N GAP 103..4999 not seen here (tail started during a resend)"]
    assert tracker.see("readings", 5001) == ""
    assert tracker.see("readings", 5003) == "GAP 5002..5002 missing"

    # The command published before tail subscribed: its reply says which seqs the resend covered.
    tracker = SeqTracker()
    for s in (100, 101, 102):
        format_message("env/S/data", _data(s), tracker)
    format_message("env/S/cmd/reply", _reply("r2", 100, 102), tracker)
    assert tracker.see("readings", 5000) == "GAP 103..4999 not seen here (tail started during a resend)"

    # Live readings first: the resend's are what tail saw or never saw, as before.
    tracker = SeqTracker()
    assert tracker.see("readings", 5000) == ""
    format_message("env/S/cmd", _cmd("r3", 100, 102), tracker)
    assert tracker.see("readings", 100) == "EARLIER (before tail started)"
    format_message("env/S/cmd/reply", _reply("r3", 100, 102), tracker)
    assert tracker.see("readings", 5002) == "GAP 5001..5001 missing"

    # A resend refused, or never answered (the agent was away): later jumps are the station's again.
    tracker = SeqTracker()
    format_message("env/S/cmd", _cmd("r4", 100, 102), tracker)
    format_message("env/S/cmd/reply", b'{"v":1,"id":"r4","ok":false,"error":"busy"}', tracker)
    assert tracker.see("readings", 7) == "" and tracker.see("readings", 9) == "GAP 8..8 missing"
    tracker = SeqTracker()
    format_message("env/S/cmd", _cmd("r5", 100, 102), tracker)
    assert tracker.see("readings", 100) == ""
    assert tracker.see("readings", 5000) == "GAP 101..4999 not seen here (tail started during a resend)"
    assert tracker.see("readings", 5002) == "GAP 5001..5001 missing"


def test_a_live_reading_that_comes_before_the_resends_readings_is_where_tail_counts_from():
    """tail saw a resend's command before any reading, but the first reading to come was a live one
    (new readings go first): a jump of the station's own after it is a loss, not tail's."""
    from agent.tail import format_message

    tracker = SeqTracker()
    format_message("env/S/cmd", _cmd("r6", 100, 102), tracker)
    assert tracker.see("readings", 5000) == ""
    assert tracker.see("readings", 100) == "EARLIER (before tail started)"
    assert tracker.see("readings", 5002) == "GAP 5001..5001 missing"
