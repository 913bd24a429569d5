"""A resend by time (`{"cmd": "resend", "from_ts": …, "to_ts": …}`) on a large buffer: what the scan by
seq costs, and whether live data waits for it.

    .venv/bin/python bench/bench_resend_by_time.py [--readings 1000000]

Readings have no time index (README, Performance), so the publisher reads them by seq and keeps those of
the range, RESEND_SCAN_SEQS seqs per read and RESEND_SCAN_S of reads per turn of its loop. Printed:
- the reads alone, on the buffer file: one step (the longest the publisher is held by one read), the whole
  scan in steps, and the same scan as one query (what holding the publisher for all of it would cost);
- the agent: a real `edge-agent run` with that buffer (all of it published before) and a live instrument
  every 0.1 s, asked over a real mosquitto for a range at the end of the buffer and for a range holding
  nothing (both scan every row): time to the reply, and the longest wait between two live data messages
  during it, against the longest before it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import AgentProcess, Broker, Collector, sim_config, wait_for, write_config  # noqa: E402

from agent.buffer import Buffer  # noqa: E402
from agent.model import STREAM_READINGS, Reading, iso_utc_ms  # noqa: E402
from agent.publisher import RESEND_SCAN_SEQS  # noqa: E402

CHANNELS = 40  # one poll of 40 readings a second


def prefill(db: Path, n: int) -> tuple[int, int]:
    """n published readings ending an hour ago; returns the first and last ts."""
    buf = Buffer.open_writer(db, sync="normal")
    t0 = int(time.time() * 1000) - 3_600_000 - n // CHANNELS * 1000
    chunk = 40_000
    for start in range(0, n, chunk):
        rows = [Reading("old", f"c{i % CHANNELS:02d}", t0 + i // CHANNELS * 1000, 10.0 + (i % 97) / 7, "mg/L",
                        "N") for i in range(start, min(start + chunk, n))]
        buf.begin()
        stored = buf.insert_readings(rows)
        buf.commit()
    buf.begin()
    buf.set_sent_upto(STREAM_READINGS, stored[-1].seq)
    buf.commit()
    buf.close()
    return t0, rows[-1].ts_ms


def reads_alone(db: Path, start: int, end: int) -> None:
    reader = Buffer.open_reader(db)
    top, _ = reader.stream_state()
    steps, after, longest, found = 0, 0, 0.0, 0
    t_all = time.perf_counter()
    while after < top:
        t = time.perf_counter()
        batch = reader.readings_json(after, 200, upto_seq=min(top, after + RESEND_SCAN_SEQS), ts_range=(start, end))
        longest = max(longest, time.perf_counter() - t)
        steps += 1
        if batch is None:
            after = min(top, after + RESEND_SCAN_SEQS)
        else:
            found += batch.count
            after = batch.last_seq
    total = time.perf_counter() - t_all
    t = time.perf_counter()
    one = reader.conn.execute("SELECT count(*) FROM readings WHERE ts_ms BETWEEN ? AND ?", (start, end)).fetchone()[0]
    single = time.perf_counter() - t
    reader.close()
    print(f"reads alone: {steps} steps of {RESEND_SCAN_SEQS} seqs, {found} readings found (one query: {one}); "
          f"longest step {longest * 1000:.1f} ms, whole scan {total:.2f} s; the scan as one query {single:.2f} s")


def through_agent(tmp: Path, db: Path, ranges: dict[str, tuple[int, int]]) -> None:
    broker = Broker(tmp / "broker").start()
    config = sim_config(tmp, broker, channels=1, interval=0.1, mqtt={"max_batch": 1000})
    config["storage"]["path"] = str(db)
    collector = Collector(broker, "env/#")
    arrivals: list[tuple[float, int]] = []
    real = collector._on_message

    def on_message(client, userdata, msg) -> None:
        if msg.topic.endswith("/data"):
            live = sum(1 for r in json.loads(msg.payload).get("readings", []) if r["device"] == "sim0")
            if live:
                arrivals.append((time.monotonic(), live))
        real(client, userdata, msg)

    collector.client.on_message = on_message
    agent = AgentProcess(write_config(tmp / "station.yaml", config))
    try:
        wait_for(lambda: len(arrivals) >= 30, 60, "live data")
        time.sleep(3)  # baseline of live arrivals
        for name, (start, end) in ranges.items():
            mark = time.monotonic()
            seen = len(arrivals)
            collector.client.publish("env/TEST0001/cmd", json.dumps(
                {"id": name, "cmd": "resend", "from_ts": iso_utc_ms(start), "to_ts": iso_utc_ms(end)}), qos=1)
            reply = wait_for(lambda n=name: next((r for r in collector.json_messages("/cmd/reply")
                                                  if r["id"] == n), None), 300, "the reply", interval=0.005)
            took = time.monotonic() - mark
            times = [mark] + [t for t, _ in arrivals[seen:]] + [time.monotonic()]
            gap = max(b - a for a, b in zip(times, times[1:], strict=False))
            before = [t for t, _ in arrivals[:seen]][-20:]
            base = max(b - a for a, b in zip(before, before[1:], strict=False))
            print(f"agent, {name}: reply after {took:.2f} s, count {reply.get('count')}; longest wait between live "
                  f"data messages meanwhile {gap * 1000:.0f} ms (before: {base * 1000:.0f} ms), "
                  f"{len(arrivals) - seen} live messages meanwhile")
            time.sleep(1)
    finally:
        agent.stop()
        collector.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"{platform.machine()} {platform.python_version()}, {args.readings} readings")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = tmp / "buffer.db"
        t = time.perf_counter()
        first, last = prefill(db, args.readings)
        print(f"prefill {time.perf_counter() - t:.1f} s, {db.stat().st_size / 2**20:.0f} MB")
        at_end = (last - 600_000, last)  # the last 10 minutes: every row is read, 24 000 are sent
        nothing = (first - 7_200_000, first - 3_600_000)  # before the first: every row is read, none sent
        reads_alone(db, *at_end)
        reads_alone(db, *nothing)
        through_agent(tmp, db, {"last 10 min": at_end, "empty hour": nothing})


if __name__ == "__main__":
    main()
