"""One agent per buffer: `run` holds an exclusive lock on `<buffer>.lock` for as long as it runs.

A second `run` with the same buffer (a technician starting one by hand beside the service) would
write into the same streams and take the broker's client id from the first, each one knocking the
other off; it is refused with the running one's pid. `status` asks the same lock whether an agent is
running, so that it does not report a broker state the agent left behind when it stopped. The kernel
drops the lock when the process ends, also on `kill -9` or a power cut: nothing stale to clean up.
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
    return buffer_path.with_name(buffer_path.name + ".lock")


def hold(buffer_path: Path) -> int:
    """Take the lock for this process and write its pid into the file; returns the descriptor, which
    must stay open until the process ends. Raises AlreadyRunning if another process holds it."""
    path = lock_path(buffer_path)
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


def keep_held(fd: int, buffer_path: Path) -> int | None:
    """The lock file deleted while the agent runs (`rm buffer.db*`): the lock `fd` holds is then on a file
    without a name, `status` says no agent runs and a second `run` starts on the same buffer. Take the
    lock again on a new file at the path: returns the descriptor to keep from now on (`fd` closed), None
    while `fd` is still the file at the path. Raises AlreadyRunning when another process took the new
    file first (`fd` is kept then), OSError when it cannot be made (a full disk)."""
    try:
        at_path = os.stat(lock_path(buffer_path))
        mine = os.fstat(fd)
        if (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino):
            return None
    except FileNotFoundError:
        pass
    new = hold(buffer_path)
    os.close(fd)
    return new


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
    """The pid of the agent running with this buffer (0 if it cannot be read), None if none runs.
    Raises PermissionError when the lock file may not be read (then nobody can tell)."""
    try:
        fd = os.open(lock_path(buffer_path), os.O_RDONLY | os.O_CLOEXEC)
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
