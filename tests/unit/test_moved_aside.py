"""Files the agent moved aside (a corrupt buffer) are never deleted and lie outside max_mb: every start
says how many there are and how much room they take, so that years of a failing card do not fill the
disk unnoticed. Real SQLite files."""

from __future__ import annotations

import logging

from agent.buffer import Buffer
from agent.model import Reading, now_ms
from agent.runtime import warn_of_moved_aside


def test_every_start_says_how_much_room_the_files_moved_aside_take(tmp_path, caplog):
    path = tmp_path / "buffer.db"
    warn_of_moved_aside(path)
    assert "moved aside" not in caplog.text
    for _ in range(2):  # the card damages the file twice
        buf = Buffer.open_writer(path)
        buf.begin()
        buf.insert_readings([Reading("d", "c", now_ms() + i, 1.0, "", "N") for i in range(5000)])
        buf.commit()
        buf.close()
        data = bytearray(path.read_bytes())
        data[:16] = b"\xff" * 16  # not a database any more
        path.write_bytes(bytes(data))
        Buffer.open_writer(path).close()  # moved aside, a fresh file started
    aside = sorted(p for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    size_mb = sum(p.stat().st_size for p in aside) / 1048576
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_of_moved_aside(path)
    assert f"{len(aside)} files moved aside beside the buffer (buffer.db.corrupt-" in caplog.text
    assert f"take {size_mb:.1f} MB outside storage.max_mb" in caplog.text
