"""An HJ 212 uplink catching up a day of data against a platform 50 ms away: how long stop-and-wait costs.

    .venv/bin/python bench/bench_uplink_catchup.py [--rtt-ms 50] [--minutes 1440] [--polls 1440]

The real `agent.uplink.Uplink` (its own thread, real buffer and recorder) delivers over loopback TCP to the
independent test platform (tests/hj212_platform.py), whose 9014 for each data packet leaves `rtt` after
the packet arrived (a round trip of `rtt`; loopback adds ~0.1 ms). Printed, each from the uplink's start
to the platform's last packet:
- pushed: `--minutes` stored 1-minute aggregates (one 2051 packet per period start, Flag=5, each waiting
  for its 9014), then `--polls` stored device polls (one 2011 packet each), the backlog a platform gets
  after an outage;
- pulled: the platform asks for the same day of 2051 with BeginTime/EndTime: 9011, the records (Flag=4,
  no 9014 awaited), 9012.
Against `n x rtt`, the floor of one packet per round trip.
"""

from __future__ import annotations

import argparse
import platform as host
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import wait_for  # noqa: E402
from hj212_platform import Platform, frame  # noqa: E402

from agent.buffer import Buffer  # noqa: E402
from agent.hj212_payload import Hj212Identity  # noqa: E402
from agent.model import STREAM_AGGREGATES, STREAM_READINGS, Reading  # noqa: E402
from agent.recorder import Recorder  # noqa: E402
from agent.uplink import Uplink, UplinkTarget  # noqa: E402

MN = "14010500000017"
IDENTITY = Hj212Identity(mn=MN, st="32", pw="123456", timezone="Asia/Shanghai")
DAY0 = int(datetime(2026, 11, 28, 16, 0, tzinfo=UTC).timestamp() * 1000)  # 2026-11-29 00:00 in Shanghai


def delayed_acks(rtt: float):
    """The platform's answer: a 9014 `rtt` after a data packet asking for one arrived."""
    def answer(p) -> list[bytes]:
        if not p.flag & 1 or p.header.get("ST") == "91":
            return []
        time.sleep(rtt)
        h = p.header
        return [frame(f"QN={h['QN']};ST=91;CN=9014;PW=123456;MN={h['MN']};Flag=4;CP=&&&&")]
    return answer


def fill(recorder: Recorder, minutes: int, polls: int) -> tuple[int, int]:
    """`minutes` 1-minute aggregates of two channels and `polls` polls of two readings, a minute apart."""
    for i in range(minutes):
        ts = DAY0 + i * 60_000
        start = datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        for channel, avg in (("w01018", 20.0 + i % 7), ("w21003", 1.0 + i % 3 / 10)):
            recorder.submit_event(STREAM_AGGREGATES, ts, {
                "device": "cod", "channel": channel, "period": "1m", "start": start, "avg": avg, "min": avg - 1,
                "max": avg + 1, "cou": None, "count": 60, "flag": "N"})
    for i in range(polls):
        recorder.submit([Reading("cod", ch, DAY0 + i * 60_000 + 5_000, v, "mg/L", "N")
                         for ch, v in (("w01018", 20.0 + i % 5), ("w21003", 1.5))])
    recorder.flush()
    return minutes * 2, polls * 2


def run(rtt_ms: float, minutes: int, polls: int) -> None:
    rtt = rtt_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "buffer.db"
        buf = Buffer.open_writer(path)
        buf.ensure_time_index()
        recorder = Recorder(buf, commit_interval_ms=20, keep_sent_days=7, max_mb=256)
        recorder.start()
        last_agg, last_reading = fill(recorder, minutes, polls)
        platform = Platform(ack=delayed_acks(rtt))
        target = UplinkTarget("127.0.0.1", platform.port, timeout=10, retries=3)
        uplink = Uplink(target, IDENTITY, path, recorder, reconnect_max=0.5,
                        marks={STREAM_READINGS: 0, STREAM_AGGREGATES: 0})  # everything stored is due
        started = time.monotonic()
        uplink.start()
        try:
            wait_for(lambda: uplink.marks[STREAM_AGGREGATES] == last_agg, 3600, "the aggregates", interval=0.01)
            aggs_s = time.monotonic() - started
            wait_for(lambda: uplink.marks[STREAM_READINGS] == last_reading, 3600, "the polls", interval=0.01)
            polls_s = time.monotonic() - started - aggs_s
            assert len(platform.of_cn("2051")) == minutes and len(platform.of_cn("2011")) == polls
            assert not [p for p in platform.packets if p.problems]
            seen = len(platform.packets)
            qn = "20261130120000001"
            asked = time.monotonic()
            platform.send(frame(f"QN={qn};ST=32;CN=2051;PW=123456;MN={MN};Flag=5;CP=&&BeginTime=20261129000000,"
                                "EndTime=20261129235959&&"))
            wait_for(lambda: platform.of_cn("9012")[-1:], 600, "the backfill's 9012", interval=0.005)
            pulled_s = time.monotonic() - asked
            pulled = len([p for p in platform.packets[seen:] if p.cn == "2051"])
        finally:
            uplink.stop()
            platform.close()
            recorder.stop()
            recorder.buffer.close()
    print(f"{host.node()} {datetime.now().isoformat(timespec='minutes')} rtt {rtt_ms:g} ms")
    print(f"pushed {minutes} 2051 packets: {aggs_s:.1f} s ({aggs_s / minutes * 1000:.1f} ms each; "
          f"floor {minutes * rtt:.1f} s)")
    print(f"pushed {polls} 2011 packets: {polls_s:.1f} s ({polls_s / polls * 1000:.1f} ms each; "
          f"floor {polls * rtt:.1f} s)")
    print(f"pulled backfill of {pulled} 2051 records (9011 .. 9012): {pulled_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--minutes", type=int, default=1440, help="1-minute aggregates stored (a day: 1440)")
    parser.add_argument("--polls", type=int, default=1440, help="device polls stored")
    args = parser.parse_args()
    run(args.rtt_ms, args.minutes, args.polls)


if __name__ == "__main__":
    main()
