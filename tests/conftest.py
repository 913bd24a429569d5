"""Shared fixtures: a real mosquitto per test on a free loopback port; a small tmpfs for a full disk; the
wall-clock shim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clockshift import build_clockshift  # noqa: E402
from harness import Broker, Collector, kill_leftovers, leaked_secrets  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def collector(broker):
    """Every message the test's broker carries for the station (`env/#`), as a platform receives them."""
    c = Collector(broker, "env/#")
    yield c
    c.close()


@pytest.fixture(scope="session")
def clockshift(tmp_path_factory) -> Path:
    """The wall-clock shim of tests/clockshift.py (LD_PRELOAD), built and checked once per worker."""
    return build_clockshift(tmp_path_factory.mktemp("clockshift"))


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs for the buffer (`harness.fill_disk` fills it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(autouse=True)
def _no_leftover_agents():
    """An agent process left running by a failed test must not outlive it; and no agent of any test
    may have written a registered secret (password, key) into its log."""
    yield
    kill_leftovers()
    leaks = leaked_secrets()
    assert not leaks, f"secrets in agent logs: {leaks}"
