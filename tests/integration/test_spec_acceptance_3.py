"""SPEC.md §1 checked from the outside where no other test looks: how `tail` ends when it is stopped
the way a supervisor stops a process (SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys

from harness import REPO, Broker, sim_config, wait_for, write_config


def test_tail_stopped_by_sigterm_ends_with_status_0_as_on_ctrl_c(tmp_path):
    """SPEC §1: `tail` "runs until stopped". Stopped by Ctrl-C it exits 0 and prints nothing more;
    stopped by SIGTERM (`timeout 600 edge-agent tail ...`, a supervisor, `kill`) it must end the same
    way, as `run` and `simulate` do, not die of the signal (status 143) in the middle of a line."""
    broker = Broker(tmp_path / "broker").start()
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    out = tmp_path / "tail.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "tail", "-c", str(cfg)], cwd=REPO,
                                stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.read_text().startswith("# subscribed"), 20, "tail subscribed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
        assert out.read_text().splitlines() == [out.read_text().splitlines()[0]], out.read_text()
    finally:
        proc.kill()
        proc.wait()
        broker.stop()
