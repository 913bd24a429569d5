"""A loop of the agent that dies of an error nobody foresaw (a bug, as the lone-surrogate command id
was): the agent stops and exits 1, so that systemd starts it afresh, instead of running on without
it. The bug is put into the real agent process by a `sitecustomize` module (the one fault injected
here: there is no known one left to trigger); broker, buffer and agent are otherwise real."""

from __future__ import annotations

import json

from harness import AgentProcess, Collector, db_last_seq, sim_config, wait_for, write_config

BUG = """\
import agent.publisher

_fill_window = agent.publisher.Publisher._fill_window
_calls = [0]


def buggy_fill_window(self):
    _calls[0] += 1
    if _calls[0] == 20:
        raise RuntimeError("an injected publisher bug")
    return _fill_window(self)


agent.publisher.Publisher._fill_window = buggy_fill_window
"""


def test_a_publisher_that_dies_stops_the_agent_with_status_1_and_nothing_is_lost(tmp_path, broker):
    collector = Collector(broker, "env/TEST0001/#")
    bug = tmp_path / "bug"
    bug.mkdir()
    (bug / "sitecustomize.py").write_text(BUG)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg, env={"PYTHONPATH": str(bug)})
    wait_for(lambda: not agent.alive(), 60, "the agent to stop after its publisher died")
    assert agent.proc.returncode == 1
    log = agent.log()
    assert "RuntimeError: an injected publisher bug" in log
    assert "publisher ended unexpectedly" in log and "exit status 1" in log and "stopped cleanly" not in log
    status = json.loads([p for t, p, _ in collector.messages if t.endswith("/status")][-1])
    assert (status["state"], status["reason"]) == ("offline", "crashed"), "not 'stopped': it did not choose to"
    stored = db_last_seq(tmp_path / "buffer.db")
    assert stored > 0

    again = AgentProcess(cfg)  # the restart systemd makes
    try:
        wait_for(lambda: collector.has_readings_upto(stored), 30,
                 "every reading stored before the failure")
    finally:
        assert again.stop() == 0
    collector.close()
