"""Logs: one line per event on stderr (SPEC §1), also for a traceback or a message with line breaks."""

from __future__ import annotations

import io
import logging

from agent.logutil import OneLineFormatter


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


def test_a_new_reason_is_logged_at_once_a_repeated_one_is_held_back(caplog):
    from agent.logutil import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.limited"), every_s=300)
    with caplog.at_level(logging.ERROR, logger="test.limited"):
        for why in ("Connection refused", "Connection refused", "TLS handshake failed", "Connection refused"):
            limited.error("cannot connect to %s: %s", "mqtts://broker", why, key=why)
    assert [r.getMessage() for r in caplog.records] == ["cannot connect to mqtts://broker: Connection refused",
                                                        "cannot connect to mqtts://broker: TLS handshake failed"]
