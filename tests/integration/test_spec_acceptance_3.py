"""SPEC.md §1 checked from the outside where no other test looks: how `tail` ends when it is stopped
the way a supervisor stops a process (SIGTERM)."""

from __future__ import annotations

import signal
import subprocess

from harness import Broker, run_cli, sim_config, start_tail, wait_for, write_config


def test_tail_stopped_by_sigterm_ends_with_status_0_as_on_ctrl_c(tmp_path):
    """SPEC §1: `tail` "runs until stopped". Stopped by Ctrl-C it exits 0 and prints nothing more;
    stopped by SIGTERM (`timeout 600 edge-agent tail ...`, a supervisor, `kill`) it must end the same
    way, as `run` and `simulate` do, not die of the signal (status 143) in the middle of a line."""
    broker = Broker(tmp_path / "broker").start()
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out, stderr=subprocess.PIPE)
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


def test_check_config_takes_the_file_also_as_dash_c_like_every_other_command(tmp_path):
    """SPEC §1: `check-config FILE`. Every other command that reads the file takes it as `-c FILE`,
    so a technician types `check-config -c FILE` too: it validates that file the same way (problems as
    `FILE:LINE:COL: path.to.key: message`, exit 2; exit 0 when valid), instead of an argparse usage
    error. Both spellings at once, or neither, is a usage error (exit 2)."""
    broker = Broker(tmp_path / "broker")
    good = write_config(tmp_path / "good.yaml", sim_config(tmp_path, broker))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("station:\n", "station:\n  nmae: x\n", 1))

    for args in (("check-config", str(good)), ("check-config", "-c", str(good)),
                 ("check-config", "--config", str(good))):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.startswith(f"{good}: OK"), result.stdout
    for args in (("check-config", str(bad)), ("check-config", "-c", str(bad))):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.splitlines()[0] == (f"{bad}:2:3: station.nmae: unknown key 'nmae' "
                                                 "(did you mean 'name'?)"), result.stderr
    for args in (("check-config",), ("check-config", str(good), "-c", str(good))):
        result = run_cli(*args)
        assert result.returncode == 2 and "usage: edge-agent check-config" in result.stderr, result.stderr
