"""The seq high-water mark kept outside the database file (SPEC §3).

If the buffer file is lost or moved aside as corrupt, the fresh file must continue every stream's
seq above the highest ever issued. Writing that number on every commit would double the writes to
the SD card, so seqs are reserved in blocks: the file holds, per stream, a number at or above every
seq issued so far, and is rewritten (atomically, fsynced) only when a stream crosses it. A fresh
database then starts above the reservation; the skipped seqs were never issued to anyone.
Imports nothing from the project.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK = 10_000
ACKED = ".acked"  # key suffix of a stream's acknowledged watermark, as last noted


class SeqMark:
    """The `<buffer>.seq` file: `{"readings": N, "aggregates": N, "alarms": N}` reserved upper bounds,
    and `{"readings.acked": N, ...}` the acknowledged watermarks as last noted (at a clean close, a
    block reservation, after a salvage): a lower bound of what was delivered, should the buffer file
    be lost."""

    def __init__(self, path: Path, block: int = BLOCK):
        self.path = path
        self.block = block
        self._marks: dict[str, int] | None = None
        self._mirrors: tuple[Path, ...] = ()

    def mirror_to(self, path: Path) -> None:
        """Keep the reservation in `path` too, now and at every later rewrite, never lowering what that
        file holds: the config names another buffer file, which a restart will open fresh, and it must
        continue above every seq this one issued (SPEC §3)."""
        if path != self.path and path not in self._mirrors:
            self._mirrors = (*self._mirrors, path)
            self._write_mirror(path, self.read())

    def read(self) -> dict[str, int]:
        if self._marks is None:
            try:
                data = json.loads(self.path.read_text())
                self._marks = {str(k): int(v) for k, v in data.items()}
            except FileNotFoundError:
                self._marks = {}
            except (ValueError, OSError, AttributeError) as exc:
                log.error("seq high-water mark %s unreadable (%s); relying on the database alone",
                          self.path, exc)
                self._marks = {}
        return dict(self._marks)

    def acked(self) -> dict[str, int]:
        """Per stream, the acknowledged watermark a buffer here noted last."""
        return {key[:-len(ACKED)]: value for key, value in self.read().items() if key.endswith(ACKED)}

    def note_acked(self, sent_upto: dict[str, int]) -> None:
        """Keep each stream's acknowledged watermark beside the reservation (keys `<stream>.acked`,
        plain numbers that an older reader takes for streams it does not have): at a clean close,
        and after a salvage."""
        marks = self.read()
        wanted = {**marks, **{stream + ACKED: seq for stream, seq in sent_upto.items()}}
        if wanted != marks:
            try:
                self._write(wanted)
                self._marks = wanted
            except OSError as exc:
                log.warning("cannot keep the acknowledged watermark in %s (%s)", self.path, exc)

    def ensure_above(self, last_seqs: dict[str, int], acked: dict[str, int] | None = None) -> None:
        """Make sure every stream's reservation covers `last_seqs`; rewrite the file if not, with the
        acknowledged watermarks `acked` as they are then (a fresher hint than the last clean close's,
        should the buffer file be lost after a crash)."""
        marks = self.read()
        assert self._marks is not None
        changed = False
        for stream, last in last_seqs.items():
            if last >= marks.get(stream, 0):
                marks[stream] = last + self.block
                changed = True
        if changed:
            marks.update({stream + ACKED: seq for stream, seq in (acked or {}).items()})
            self._write(marks)
            self._marks = marks

    def _write(self, marks: dict[str, int]) -> None:
        self._write_file(self.path, marks)
        for mirror in self._mirrors:
            self._write_mirror(mirror, marks)

    def _write_mirror(self, path: Path, marks: dict[str, int]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # where the new buffer will be created
            theirs = SeqMark(path).read()
            self._write_file(path, {s: max(marks.get(s, 0), theirs.get(s, 0)) for s in {*marks, *theirs}})
        except OSError as exc:
            log.error("cannot keep the seq high-water mark in %s (%s): a buffer started there would "
                      "number from its own", path, exc)

    @staticmethod
    def _write_file(path: Path, marks: dict[str, int]) -> None:
        """Atomically (temporary file, fsync, rename, fsync of the directory)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marks, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
