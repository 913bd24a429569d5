"""One agent per buffer: `run` holds an exclusive lock on `.<buffer>.lock` for as long as it runs.

A second `run` with the same buffer (a technician starting one by hand beside the service) would
write into the same streams and take the broker's client id from the first, each one knocking the
other off; it is refused with the running one's pid. `status` asks the same lock whether an agent is
running, so that it does not report a broker state the agent left behind when it stopped. The kernel
drops the lock when the process ends, also on `kill -9` or a power cut: nothing stale to clean up.

The lock file is hidden beside the buffer (`.buffer.db.lock` for `buffer.db`), so that `rm buffer.db*`
(a technician cleaning up) does not take it: the lock used to be `buffer.db.lock`, and for the few
seconds until the running agent made it again a second `run` on the same buffer started. That older
name is held too (`legacy_lock_path`), so that an older edge-agent (before an upgrade's restart, or
after a downgrade) and this one refuse each other, and an older `status` sees this agent running.
Imports nothing from the project.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

PROBE_WAIT_S = 0.2  # how long a start tries again when the lock is taken (see _lock_exclusive)


class AlreadyRunning(Exception):
    """Another process holds the buffer's lock."""


def lock_path(buffer_path: Path) -> Path:
    """The lock file: hidden, a name `rm buffer.db*` (or `rm *`) does not match."""
    return buffer_path.with_name(f".{buffer_path.name}.lock")


def legacy_lock_path(buffer_path: Path) -> Path:
    """The lock file of edge-agents before `lock_path`, still held for them."""
    return buffer_path.with_name(buffer_path.name + ".lock")


def _lock_paths(buffer_path: Path) -> tuple[Path, Path]:
    return lock_path(buffer_path), legacy_lock_path(buffer_path)  # taken in this order


class Held:
    """The locks a running agent holds for its buffer: one descriptor per lock file, which must stay
    open until the process ends."""

    def __init__(self, buffer_path: Path):
        self.buffer_path = buffer_path
        self.fds: dict[Path, int] = {}

    def close(self) -> None:
        """Release every lock (a test's holder; an agent keeps them until it ends)."""
        while self.fds:
            os.close(self.fds.popitem()[1])


def hold(buffer_path: Path) -> Held:
    """Take the locks for this process and write its pid into their files. Raises AlreadyRunning if
    another process holds one of them (none is kept then), OSError when a file cannot be made."""
    held = Held(buffer_path)
    try:
        for path in _lock_paths(buffer_path):
            held.fds[path] = _take(path, buffer_path)
    except BaseException:
        held.close()
        raise
    return held


def _take(path: Path, buffer_path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if not _lock_exclusive(fd):
        pid = _read_pid(fd)
        os.close(fd)
        raise AlreadyRunning(f"another edge-agent{f' (pid {pid})' if pid else ''} is running with the buffer "
                             f"{buffer_path}; stop it first (systemctl stop edge-agent)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only its pid is not told
        pass
    return fd


def keep_held(held: Held) -> list[Path]:
    """A lock file deleted while the agent runs (`rm .buffer.db.lock`, `rm buffer.db*` for the legacy
    one): the lock its descriptor holds is then on a file without a name, `status` says no agent runs
    and a second `run` would take a new file at the path. Take the lock again on a new file at each
    such path; returns the paths made again (their old descriptors closed). Raises AlreadyRunning when
    another process took a new file first, OSError when it cannot be made (a full disk): the paths
    before it in the order are kept again all the same, the old descriptor of that one kept."""
    made: list[Path] = []
    for path, fd in list(held.fds.items()):
        try:
            at_path = os.stat(path)
            mine = os.fstat(fd)
            if (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino):
                continue
        except FileNotFoundError:
            pass
        held.fds[path] = _take(path, held.buffer_path)
        os.close(fd)
        made.append(path)
    return made


def _lock_exclusive(fd: int) -> bool:
    """Take the lock, False when another process holds it. A `status` asking whether an agent runs
    (`running_pid`) holds it shared for a few microseconds: an attempt that meets such a probe is tried
    again for up to PROBE_WAIT_S, so that a start is not refused as if another agent ran."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def running_pid(buffer_path: Path) -> int | None:
    """The pid of the agent running with this buffer (0 if it cannot be read), None if none runs: the
    lock file, else the legacy one (an older edge-agent holds only that). Raises PermissionError when
    neither tells that an agent runs and one may not be read (then nobody can tell)."""
    denied: PermissionError | None = None
    for path in _lock_paths(buffer_path):
        try:
            pid = _probe(path)
        except PermissionError as exc:
            denied = denied or exc
            continue
        if pid is not None:
            return pid
    if denied is not None:
        raise denied
    return None


def _probe(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0
