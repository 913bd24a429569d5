"""One agent per buffer, whatever a technician deletes beside it: a second `edge-agent run` on the same
config is refused (exit 1, naming the running agent's pid) for as long as the first one runs, also right
after `rm buffer.db*`. Real agent processes, a real mosquitto, real SQLite files."""

from __future__ import annotations

from harness import AgentProcess, db_last_seq, run_cli, start_station, wait_for


def refused(second: AgentProcess, first: AgentProcess) -> None:
    """`second` ends by itself, exit 1, saying which agent holds the buffer, having polled nothing."""
    wait_for(lambda: not second.alive(), 20, "the second agent to refuse the buffer and exit")
    log = second.log()
    assert second.stop() == 1, log[-2000:]
    assert f"another edge-agent (pid {first.proc.pid}) is running with the buffer" in log, log[-2000:]
    assert "Traceback" not in log


def test_a_second_agent_right_after_rm_buffer_db_star_is_refused(tmp_path, broker):
    """`rm buffer.db*` took the lock file with the database: for up to 5 s (until the running agent
    made it again) `status` said the agent was NOT running and a second `run` started on the same
    buffer, two writers issuing the same seqs. The lock is now held on a file `buffer.db*` does not
    name. Three times, each right after the rm, so that no 5 s check can make it pass by luck."""
    path, cfg, first = start_station(tmp_path, broker)
    try:
        for attempt in range(3):
            wait_for(lambda: db_last_seq(path) > 10, 20, "readings stored")
            for p in list(path.parent.glob("buffer.db*")):
                p.unlink()
            second = AgentProcess(cfg)
            status = run_cli("status", "-c", str(cfg))
            refused(second, first)
            assert f"agent    running (pid {first.proc.pid})" in status.stdout, (attempt, status.stdout)
            assert first.alive(), f"attempt {attempt}: the first agent keeps running"
            wait_for(lambda n=attempt: first.log().count("put back") > n, 20, "the first agent puts its file back")
        stored = db_last_seq(path)
        wait_for(lambda: db_last_seq(path) > stored + 10, 20, "the first agent goes on recording")
        log = first.log()
        assert "UNIQUE constraint" not in log and "Traceback" not in log, log[-3000:]
    finally:
        assert first.stop() == 0


def test_a_second_agent_is_refused_while_the_first_runs_and_starts_once_it_stopped(tmp_path, broker):
    path, cfg, first = start_station(tmp_path, broker)
    try:
        wait_for(lambda: db_last_seq(path) > 10, 20, "readings stored")
        refused(AgentProcess(cfg), first)
        assert first.alive()
    finally:
        assert first.stop() == 0
    stored = db_last_seq(path)
    third = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(path) > stored + 10, 20, "the next agent records once the first stopped")
    finally:
        assert third.stop() == 0
