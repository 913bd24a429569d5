"""The seq high-water mark kept outside the database file (SPEC §3).

If the buffer file is lost or moved aside as corrupt, the fresh file must continue every stream's
seq above the highest ever issued. Writing that number on every commit would double the writes to
the SD card, so seqs are reserved in blocks: the file holds, per stream, a number at or above every
seq issued so far, and is rewritten (atomically, fsynced) only when a stream crosses it. A fresh
database then starts above the reservation; the skipped seqs were never issued to anyone. After a
clean close the file also notes each stream's last seq, exact then: a fresh database continues right
after it instead (no jump for receivers to make sense of).
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
ISSUED = ".issued"  # key suffix of a stream's last seq at the last clean close
RUNNING = "running"  # 1 from a writer's start (its WAL written) to its clean close, else 0
VOLATILE_BOOT = "volatile_boot"  # the boot a writer that does not fsync each commit runs in, else 0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # new at every boot of the kernel
UNKNOWN_BOOT = -1  # the `volatile_boot` of a writer that could not read BOOT_ID: any start counts as another boot


def mark_path(buffer_path: Path) -> Path:
    """Where the seq mark of the buffer file at `buffer_path` is kept: `<buffer>.seq` beside it."""
    return buffer_path.with_name(buffer_path.name + ".seq")


class SeqMark:
    """The `<buffer>.seq` file: `{"readings": N, "aggregates": N, "alarms": N}` reserved upper bounds,
    and `{"readings.acked": N, ...}` the acknowledged watermarks as last noted (at a clean close, a
    block reservation, after a salvage): a lower bound of what was delivered, should the buffer file
    be lost. What tells a buffer file that lost rows from one that never had them (`lost_rows`):
    `{"readings.issued": N, ...}`, each stream's last seq at the last clean close, and `running`, 1
    while a writer has the file open (a start with `running` 1 and no WAL: the WAL, and with it the
    rows committed since the last checkpoint, was deleted after a crash), and `volatile_boot`, the boot
    (`boot_id`) in which a writer with `sync: normal` runs (a start in another boot with `running` 1:
    a power cut or a reset may have taken its last commits, published or not)."""

    def __init__(self, path: Path, block: int = BLOCK):
        self.path = path
        self.block = block
        self._marks: dict[str, int] | None = None
        self._mirrors: tuple[Path, ...] = ()
        self._mirror_floors: dict[Path, dict[str, int]] = {}  # what each mirror held before it mirrored this one
        self._keep_failed = False  # `keep` could not write the file back (said once, until it can)

    def mirror_to(self, path: Path) -> None:
        """Keep the reservation in `path` too, now and at every later rewrite, never lowering what that
        file holds: the config names another buffer file, which a restart will open fresh, and it must
        continue above every seq this one issued (SPEC §3)."""
        if path != self.path and path not in self._mirrors:
            # What buffers of that path issued themselves: the mirror never goes below it. Above it, it follows
            # this file down too (a clean close lowers the reservation to the last seq, `note_closed`): kept at
            # the higher reservation beside the lowered note, the note counted as stale and the next start
            # there jumped a block, announcing seqs never issued as missing.
            self._mirror_floors[path] = SeqMark(path).read()
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

    def lost_rows(self, stream: str, last: int, wal_missing: bool) -> bool:
        """Whether a buffer file whose stream ends at `last` lacks seqs a writer here issued: a clean
        close noted more (an older copy of the file was put back), more were acknowledged, or the
        last writer did not close cleanly and its WAL is gone (`wal_missing`), or it did not fsync each
        commit and the machine has rebooted since."""
        marks = self.read()
        if marks.get(RUNNING) and (wal_missing or marks.get(VOLATILE_BOOT, 0) not in (0, boot_id())):
            return True
        return max(marks.get(stream + ISSUED, 0), marks.get(stream + ACKED, 0)) > last

    def issued_at_clean_close(self, stream: str) -> int | None:
        """The last seq of `stream` issued here when the last writer closed cleanly (every seq up to it
        may have been issued, none above: a fresh file continues right after it); None when a writer
        runs or did not close cleanly (then only the reservation bounds what was issued), and when a
        writer that keeps no such note (an older edge-agent, after a downgrade) has opened the file since:
        a clean close lowers the reservation to the seq issued (`note_closed`), which every writer's first
        `ensure_above` raises again; a note left by an older clean close beside a higher reservation
        counts as stale too (a jump to the reservation, never a seq issued twice)."""
        marks = self.read()
        issued = marks.get(stream + ISSUED)
        if issued is None or marks.get(RUNNING) != 0 or marks.get(stream, 0) != issued:
            return None
        return issued

    def note_running(self, volatile: bool = False) -> None:
        """A writer has the file open and has written its WAL (see `lost_rows`); `volatile`: it does not
        fsync each commit (`sync: normal`): its latest commits outlive its process, not the machine. A boot
        that cannot be read (/proc/sys hidden, as by systemd's `ProcSubset=pid`) is noted as UNKNOWN_BOOT:
        the next start after a crash then jumps as after a reboot, never issuing a lost seq again."""
        boot = 0
        if volatile:
            boot = boot_id()
            if boot is None:
                log.warning("cannot read %s: with storage.sync normal, a start after a crash cannot tell it from "
                            "a reboot and continues above the reservation (an announced jump)", BOOT_ID)
                boot = UNKNOWN_BOOT
        self._note({RUNNING: 1, VOLATILE_BOOT: boot})

    def note_closed(self, last_seqs: dict[str, int], sent_upto: dict[str, int]) -> bool:
        """A writer closed the file cleanly, every row in the file itself: each stream's last seq and
        acknowledged watermark. Returns False when the file could not be written."""
        # The reservation comes down to the last seq issued: any writer's next start raises it (`ensure_above`),
        # so a note left beside a reservation that differs from it is known stale (`issued_at_clean_close`).
        marks = self.read()
        lowered = {stream: seq for stream, seq in last_seqs.items() if seq <= marks.get(stream, 0)}
        return self._note({RUNNING: 0, **lowered, **{stream + ISSUED: seq for stream, seq in last_seqs.items()},
                           **{stream + ACKED: seq for stream, seq in sent_upto.items()}})

    def note_acked(self, sent_upto: dict[str, int]) -> None:
        """Keep each stream's acknowledged watermark beside the reservation (keys `<stream>.acked`,
        plain numbers that an older reader takes for streams it does not have): after a salvage, and
        at a close whose checkpoint failed (`note_closed` otherwise)."""
        self._note({stream + ACKED: seq for stream, seq in sent_upto.items()})

    def keep(self) -> bool:
        """The file deleted while a writer runs (`rm buffer.db*`, a technician cleaning up): written again
        from what this writer holds, else it stayed away until the next block or the clean close, and a
        corrupt file meanwhile had its fresh one number on from what was salvaged, not above every seq
        issued. True when it was written again (logged). A failure (a full disk) is logged once, not at each
        of the recorder's path checks (every 5 s), until the file is written again."""
        if not self._marks or self.path.exists():
            return False
        try:
            self._write(self._marks)
        except OSError as exc:
            if not self._keep_failed:
                log.warning("seq high-water mark %s was deleted while the agent runs and cannot be written again "
                            "(%s); trying again every few seconds, said again once it is written", self.path, exc)
            self._keep_failed = True
            return False
        self._keep_failed = False
        log.warning("seq high-water mark %s was deleted while the agent runs: written again", self.path)
        return True

    def _note(self, values: dict[str, int]) -> bool:
        marks = self.read()
        wanted = {**marks, **values}
        if wanted != marks:
            try:
                self._write(wanted)
                self._marks = wanted
            except OSError as exc:
                log.warning("cannot keep %s in %s (%s)", ", ".join(sorted(values)), self.path, exc)
                return False
        return True

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

    def release(self, last_seqs: dict[str, int]) -> None:
        """After a rollback: bring each stream's reservation back to its last committed seq + a block when a
        rolled-back transaction had raised it above (`ensure_above` runs before the commit). Those seqs were
        never committed nor offered, and the writer issues them again; a reservation left a block above the
        file made a start after a crash take the file for one that lost rows: it jumped there and announced
        seqs never issued as buffer_missing. Never lowered below a block above `last_seqs`; a file that
        cannot be written keeps the higher reservation (logged: a jump at worst, never a seq twice)."""
        marks = self.read()
        lowered = {stream: last + self.block for stream, last in last_seqs.items()
                   if marks.get(stream, 0) > last + self.block}
        if lowered:
            self._note(lowered)

    def _write(self, marks: dict[str, int]) -> None:
        self._write_file(self.path, marks)
        for mirror in self._mirrors:
            self._write_mirror(mirror, marks)

    def _write_mirror(self, path: Path, marks: dict[str, int]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # where the new buffer will be created
            theirs = self._mirror_floors[path] if path in self._mirror_floors else SeqMark(path).read()
            merged = {s: max(marks.get(s, 0), theirs.get(s, 0)) for s in {*marks, *theirs} - {RUNNING, VOLATILE_BOOT}}
            # Whether the writer that issues seqs for that path too runs (its `issued` is then not final).
            self._write_file(path, {**merged, RUNNING: marks.get(RUNNING, 0)})
        except OSError as exc:
            log.error("cannot keep the seq high-water mark in %s (%s): a buffer started there would "
                      "number from its own", path, exc)

    @staticmethod
    def _write_file(path: Path, marks: dict[str, int]) -> None:
        write_atomically(path, json.dumps(marks))


def boot_id() -> int | None:
    """This boot of the kernel, as a number; None where the kernel does not say."""
    try:
        return int(BOOT_ID.read_text().strip().replace("-", ""), 16)
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash or power cut leaves the old or the new content, never
    a mix: a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
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
