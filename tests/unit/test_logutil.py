"""Logs: one line per event on stderr (SPEC §1), also for a traceback or a message with line breaks."""

from __future__ import annotations

import io
import logging

from agent.logutil import FlapLimiter, OneLineFormatter


def test_a_traceback_and_line_breaks_stay_on_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("test.oneline")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("command failed")
        logger.warning("two\r\nlines")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("ERROR test.oneline: command failed | Traceback")
    assert "ValueError: bad | value" in lines[0]
    assert lines[1] == "WARNING test.oneline: two | lines"


def test_control_characters_from_outside_cannot_end_a_journal_entry_or_drive_a_terminal():
    """journald ends an entry at a NUL as at a line break, and a terminal obeys escape sequences: text
    from outside (a console request's path, a broker's reason string) with them forged a second entry
    or recoloured/cleared the technician's screen. They are written as escapes; other text as it is."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("test.controls")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("console: GET %s failed", "/x\x00ERROR agent: forged\x1b[2J\u2028\x85\u202e")
        logger.warning("station %s\tµg/m³", "汾河")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert not [c for c in "\x00\x1b\u2028\x85\u202e" if c in text], repr(text)
    assert text.splitlines() == ["WARNING test.controls: console: GET /x\\x00ERROR agent: forged\\x1b[2J"
                                 "\\u2028\\x85\\u202e failed", "WARNING test.controls: station 汾河\tµg/m³"]


def test_a_new_reason_is_logged_at_once_a_repeated_one_is_held_back(caplog):
    from agent.logutil import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.limited"), every_s=300)
    with caplog.at_level(logging.ERROR, logger="test.limited"):
        for why in ("Connection refused", "Connection refused", "TLS handshake failed", "Connection refused"):
            limited.error("cannot connect to %s: %s", "mqtts://broker", why, key=why)
    assert [r.getMessage() for r in caplog.records] == ["cannot connect to mqtts://broker: Connection refused",
                                                        "cannot connect to mqtts://broker: TLS handshake failed"]


def test_flap_limiter_logs_a_flapping_state_at_most_a_burst_a_period_and_a_lasting_loss_late():
    limiter = FlapLimiter(every_s=60, burst=2)
    assert limiter.lost(0.0) == 0, "the first loss is logged at once"
    assert limiter.lost(0.5) is None, "still lost: nothing more"
    assert limiter.back() is True, "its return too"
    assert limiter.lost(1.0) == 0 and limiter.back() is True, "a second one within the burst as well"
    for t in (2.0, 4.0, 6.0):  # flapping: neither losses nor returns are logged
        assert limiter.lost(t) is None
        assert limiter.back() is False
    assert limiter.lost(61.0) == 3, "the next line after the period counts the losses in between"
    assert limiter.back() is True
    assert limiter.lost(62.0) == 0 and limiter.back() is True
    assert limiter.lost(63.0) is None, "lost again beyond the burst: deferred"
    assert limiter.lost(100.0) is None
    assert limiter.lost(121.0) == 0, "a deferred loss that lasts is logged once the period is over"
    assert limiter.lost(130.0) is None
    assert limiter.back() is True
