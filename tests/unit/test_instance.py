"""One agent per buffer: the lock `run` holds, and what `status` learns from it (real lock files)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from agent.instance import AlreadyRunning, hold, keep_held, legacy_lock_path, lock_path, running_pid


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    buffer = tmp_path / "state" / "buffer.db"
    assert running_pid(buffer) is None, "no lock file yet: nobody runs"
    held = hold(buffer)
    try:
        assert running_pid(buffer) == os.getpid()
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            hold(buffer)
        assert running_pid(buffer) == os.getpid(), "the refused attempt did not disturb the holder"
    finally:
        held.close()
    assert running_pid(buffer) is None, "released when the holder's descriptor closes"
    assert lock_path(buffer).exists()


def test_the_lock_dies_with_its_process(tmp_path):
    """kill -9 or a power cut leaves the file but never a held lock."""
    buffer = tmp_path / "buffer.db"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                              "from agent.instance import hold; hold(Path(sys.argv[1])); print('held', flush=True); "
                              "time.sleep(60)", str(buffer)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert running_pid(buffer) == child.pid
    finally:
        child.kill()
        child.wait()
    assert running_pid(buffer) is None
    hold(buffer).close()


def test_a_status_probing_the_lock_never_makes_a_start_refused(tmp_path):
    """`status` asks the lock whether an agent runs by taking it shared for an instant; a start that
    met that instant was refused as if another agent ran ("another edge-agent (pid …) is running",
    exit 1: 1677 of 20 000 starts against a status probing in a loop)."""
    buffer = tmp_path / "buffer.db"
    probing = threading.Event()
    probing.set()

    def probe() -> None:
        while probing.is_set():
            running_pid(buffer)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(3000):
            hold(buffer).close()
    finally:
        probing.clear()
        prober.join()


def test_rm_buffer_db_star_leaves_the_lock_held(tmp_path):
    """`rm buffer.db*` (a technician cleaning up) took the lock file `buffer.db.lock` with the database:
    until the running agent made it again, `status` said nobody ran and a second agent took the buffer."""
    buffer = tmp_path / "buffer.db"
    held = hold(buffer)
    try:
        for p in tmp_path.glob("buffer.db*"):
            p.unlink()
        assert running_pid(buffer) == os.getpid()
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            hold(buffer)
        assert lock_path(buffer).exists(), "the lock file is not named by buffer.db*"
    finally:
        held.close()


def older_agent(path):
    """A process holding `path` as an edge-agent before the hidden lock file did: flock, pid inside."""
    child = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
                              "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, b'%d\\n' % os.getpid()); "
                              "print('held', flush=True); time.sleep(60)", str(path)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_an_older_agent_holding_the_legacy_lock_refuses_a_start_and_shows_in_status(tmp_path):
    """An upgrade installed while the older agent runs: a `run` by hand must not start beside it."""
    buffer = tmp_path / "buffer.db"
    child = older_agent(legacy_lock_path(buffer))
    try:
        assert running_pid(buffer) == child.pid
        with pytest.raises(AlreadyRunning, match=f"pid {child.pid}"):
            hold(buffer)
        assert running_pid(buffer) == child.pid, "the refused start left nothing held"
    finally:
        child.kill()
        child.wait()
    hold(buffer).close()


def test_the_legacy_lock_is_held_for_older_agents(tmp_path):
    """A downgrade's `run` (or an older `status`) looks at `buffer.db.lock` only: it is held too."""
    buffer = tmp_path / "buffer.db"
    held = hold(buffer)
    try:
        assert legacy_lock_path(buffer).read_text().strip() == str(os.getpid())
        assert not taken_elsewhere(legacy_lock_path(buffer))
    finally:
        held.close()


def taken_elsewhere(path) -> bool:
    """Whether another process can take the lock on `path` (as an agent of either version would)."""
    child = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; "
                            "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                            str(path)], capture_output=True, text=True, timeout=30)
    assert child.returncode == 0 or "BlockingIOError" in child.stderr, child.stderr
    return child.returncode == 0


@pytest.mark.parametrize("deleted", ["lock", "legacy", "both"])
def test_a_deleted_lock_file_is_taken_again(tmp_path, deleted):
    buffer = tmp_path / "buffer.db"
    paths = {"lock": [lock_path(buffer)], "legacy": [legacy_lock_path(buffer)],
             "both": [lock_path(buffer), legacy_lock_path(buffer)]}[deleted]
    held = hold(buffer)
    try:
        assert keep_held(held) == [], "nothing deleted: nothing made again"
        for p in paths:
            p.unlink()
        assert keep_held(held) == paths
        assert keep_held(held) == [], "made again once"
        for p in (lock_path(buffer), legacy_lock_path(buffer)):
            assert p.read_text().strip() == str(os.getpid())
            assert not taken_elsewhere(p), f"{p.name} is held"
        assert running_pid(buffer) == os.getpid()
    finally:
        held.close()
    assert taken_elsewhere(lock_path(buffer)) and taken_elsewhere(legacy_lock_path(buffer)), "released"
