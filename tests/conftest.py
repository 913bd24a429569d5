"""Shared fixtures: a real mosquitto per test on a free loopback port."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Broker, kill_leftovers  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _no_leftover_agents():
    """An agent process left running by a failed test must not outlive it."""
    yield
    kill_leftovers()
