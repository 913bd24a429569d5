"""CPU work as instructions, which do not depend on how fast (or how busy) the machine is: the agent
process polling 40 simulated channels at 1 s, run under `valgrind --tool=callgrind`; counters are
zeroed after a warm-up and dumped after `--seconds`; user-space instructions per stored reading, in
all and per thread (kernel work such as fdatasync is not counted).

    .venv/bin/python bench/bench_instructions.py [--seconds 60] [--warmup 20] [--agent-dir DIR]

`--agent-dir` runs the agent code of another checkout (e.g. a `git worktree` of an older commit)
with the same harness, for a before/after on the same machine. Needs valgrind (Debian: `apt install
valgrind`). The agent runs ~50× slower under valgrind, which 40 readings a second easily allow.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import Broker, db_last_seq, sim_config, wait_for, write_config  # noqa: E402


def dump_total(path: Path) -> int:
    """Total instructions (`summary:`/`totals:` line) of one callgrind dump file."""
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--agent-dir", type=Path, default=REPO)
    parser.add_argument("--keep", type=Path, help="copy the per-thread callgrind dumps here (for callgrind_annotate)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt install valgrind)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker").start()
        config = sim_config(tmp, broker, station_id="STEADY01", channels=40, interval=1.0,
                            storage={"commit_interval_ms": 200, "sync": "full"},
                            mqtt={"reconnect_max": 30, "shutdown_grace": 5})
        cfg = write_config(tmp / "station.yaml", config)
        out = tmp / "callgrind.out"
        with open(tmp / "agent.log", "wb") as log:
            proc = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--separate-threads=yes",
                 sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)],
                cwd=args.agent_dir, stdout=log, stderr=subprocess.STDOUT)
            db = tmp / "buffer.db"
            try:
                wait_for(lambda: db.exists() and db_last_seq(db) > 0, 180, "first readings under valgrind")
                time.sleep(args.warmup)
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                n0 = db_last_seq(db)
                time.sleep(args.seconds)
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
                n1 = db_last_seq(db)
            finally:
                proc.terminate()
                proc.wait(120)
                broker.stop()
        # The first dump after zeroing: one file per thread, `callgrind.out.PID.1-NN`.
        dumps = sorted(tmp.glob(f"callgrind.out.{proc.pid}.1-*"))
        per_thread = {p.name.rsplit("-", 1)[1]: dump_total(p) for p in dumps}
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for p in dumps:
                shutil.copy(p, args.keep / f"thread-{p.name.rsplit('-', 1)[1]}.callgrind")
    readings = n1 - n0
    total = sum(per_thread.values())
    print(f"bench_instructions  {time.strftime('%Y-%m-%d')}  {platform.machine()}  python {platform.python_version()}")
    print(f"  agent code: {args.agent_dir}")
    print(f"  40 simulated channels every 1 s; {readings} readings in {args.seconds:.0f} s after {args.warmup:.0f} s "
          f"warm-up, under callgrind")
    print(f"  user-space instructions per reading: {total / readings:,.0f}  ({total / 1e6:.1f} M in all)")
    for thread, count in per_thread.items():
        print(f"    thread {thread} (in order of creation): {count / readings:,.0f}")


if __name__ == "__main__":
    main()
