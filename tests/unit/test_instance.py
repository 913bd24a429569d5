"""One agent per buffer: the lock `run` holds, and what `status` learns from it (real lock files)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from agent.instance import AlreadyRunning, hold, lock_path, running_pid


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    buffer = tmp_path / "state" / "buffer.db"
    assert running_pid(buffer) is None, "no lock file yet: nobody runs"
    fd = hold(buffer)
    try:
        assert running_pid(buffer) == os.getpid()
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            hold(buffer)
        assert running_pid(buffer) == os.getpid(), "the refused attempt did not disturb the holder"
    finally:
        os.close(fd)
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
    os.close(hold(buffer))


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
            os.close(hold(buffer))
    finally:
        probing.clear()
        prober.join()
