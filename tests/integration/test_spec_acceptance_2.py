"""SPEC.md checked from the outside, promise by promise, where no other test looks: `status --json`
figures taken together, `max_batch` while a backlog drains, which topics are retained, SIGINT,
a gap announced once and resends over evicted or never-issued seqs, and a YAML register map read
from pymodbus's own slave over Modbus TCP and over RTU on a socat pseudo-terminal pair."""

from __future__ import annotations

import json
import re

from harness import AgentProcess, Broker, run_cli, sim_config, wait_for, write_config

ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def status_json(cfg) -> dict:
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_json_figures_are_taken_from_one_state_of_the_buffer(tmp_path):
    """SPEC §1: `backlog` is the unsent readings and `last_seq` the highest seq stored. Read while the
    agent stores ~1000 readings a second with no broker (nothing sent, no seq skipped), the two must
    describe the same moment: backlog == last_seq - sent_upto, and the readings stream says the same."""
    broker = Broker(tmp_path / "broker")  # never started: everything stays in the backlog
    config = sim_config(tmp_path, broker, channels=200, interval=0.1)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: status_json(cfg)["last_seq"] > 2000, 30, "a backlog of a few thousand readings")
        for _ in range(10):
            s = status_json(cfg)
            assert isinstance(s["backlog"], int) and isinstance(s["last_seq"], int), s
            assert s["backlog"] == s["last_seq"] - s["sent_upto"], (s["backlog"], s["last_seq"], s["sent_upto"])
            assert s["streams"]["readings"]["last_seq"] == s["last_seq"], s["streams"]
            assert s["streams"]["readings"]["backlog"] == s["backlog"], s["streams"]
    finally:
        assert agent.stop() == 0
