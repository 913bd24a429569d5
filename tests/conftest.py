"""Shared fixtures: a real mosquitto per test on a free loopback port; a small tmpfs for a full disk; the
wall-clock shim."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clockshift import build_clockshift  # noqa: E402
from harness import Broker, Collector, kill_leftovers, leaked_secrets  # noqa: E402


def pytest_collection_modifyitems(items):
    """The order in which `--dist loadfile` hands the files out to the workers (`--no-loadscope-reorder`,
    pyproject.toml): the integration tests, which wait on real time, first, the files with the most tests
    first (xdist's own rule), then the unit tests, quick, which fill in while the last integration files
    end. By test count alone the one-test integration files (a minute's aggregates, a clock step: 35 s
    each) came last and ended the run alone on one worker. The tests of a file stay together and in order."""
    files = [item.nodeid.split("::")[0] for item in items]
    count, first = Counter(files), {}
    for i, f in enumerate(files):
        first.setdefault(f, i)
    order = {id(item): ("/unit/" in f, -count[f], first[f]) for item, f in zip(items, files, strict=True)}
    items.sort(key=lambda item: order[id(item)])  # stable: a file's tests keep their order


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
