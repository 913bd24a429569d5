"""Backlog drain: how fast the agent empties a buffer of N readings into a real mosquitto at QoS 1,
against a bare paho client publishing the same batches through the same broker.

    .venv/bin/python bench/bench_drain.py [--readings 100000] [--batch 200]

Two cases:
- after an outage (the issue's case): the agent runs with the broker down and N readings in its
  buffer; the broker starts; the agent reconnects and drains. While offline the agent has encoded
  the backlog's messages ahead (up to 16 MB of them), so the drain mostly sends.
- cold: the agent starts with N readings in its buffer and the broker up (after a power cut that
  ended an outage, say): every message is read and encoded during the drain.
All runs are timed the same way: from the first data message to the last one arriving at a
subscriber in a separate process (so that the subscriber's own cost is the same for all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
from harness import AgentProcess, Broker, sim_config, write_config  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.buffer import Buffer  # noqa: E402
from agent.model import Reading  # noqa: E402
from agent.payloads import data_message  # noqa: E402

SUBSCRIBER = r"""
import json, os, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
import socket
port, topic, expected = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while True:  # the broker may not be up yet: connect as soon as it is
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.005)
state = {"n": 0, "first": None, "last": None}
def on_message(c, u, m):
    now = time.perf_counter()
    if state["first"] is None:
        state["first"] = now
    state["n"] += 1
    state["last"] = now
    if state["n"] >= expected:
        c.disconnect()
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", clean_session=True)
c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
c.on_subscribe = lambda *a: print("ready", flush=True)
c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_forever()
print(json.dumps({"messages": state["n"], "seconds": state["last"] - state["first"]}), flush=True)
"""


def start_subscriber(port: int, topic: str, expected: int, broker: Broker | None = None) -> subprocess.Popen:
    """A subscriber process, subscribed when this returns. With `broker` (stopped): the subscriber
    waits for it, and the broker is started here — the subscriber connects within milliseconds,
    before the agent's next reconnection attempt."""
    proc = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(port), topic, str(expected)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if broker is not None:
        broker.start()
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish_subscriber(proc: subprocess.Popen, timeout: float = 600) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never left behind, waiting for a broker that a later run may start on its port
        proc.wait()
        sys.exit(f"bench_drain: the subscriber did not get every message within {timeout:.0f} s (after an outage, "
                 "the agent may have reconnected before the subscriber subscribed: run again)")
    return json.loads(out.strip().splitlines()[-1])


def prefill(db: Path, n: int) -> None:
    buf = Buffer.open_writer(db, sync="normal")
    t0 = int(time.time() * 1000) - n * 25
    chunk = 10_000
    for start in range(0, n, chunk):
        rows = [Reading("sim0", f"c{i % 40:02d}", t0 + (start + i) // 40 * 1000, 10.0 + (i % 97) / 7, "mg/L", "N")
                for i in range(min(chunk, n - start))]
        buf.begin()
        buf.insert_readings(rows)
        buf.commit()
    buf.close()


def bare_paho(broker: Broker, db: Path, station: str, batch: int, window: int) -> tuple[float, int]:
    """Publish the same batches the agent would, with a bare paho client (same window, QoS 1)."""
    reader = Buffer.open_reader(db)
    payloads = []
    after = 0
    while (chunk := reader.readings_json(after, batch)) is not None:
        payloads.append(data_message(station, chunk.items))
        after = chunk.last_seq
    reader.close()
    sub = start_subscriber(broker.port, f"bare/{station}/data", len(payloads))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=True)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(f"bare/{station}/data", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(600)
    client.loop_stop()
    client.disconnect()
    result = finish_subscriber(sub)
    return result["seconds"], len(payloads)


def agent_drain(broker: Broker, tmp: Path, n: int, batch: int) -> tuple[float, int, float]:
    db = tmp / "buffer.db"
    prefill(db, n)
    station = "BENCH0001"
    config = sim_config(tmp, broker, station_id=station, channels=1, interval=3600,
                        mqtt={"max_batch": batch, "reconnect_max": 1})
    messages = -(-n // batch) + 1  # the simulated device adds one reading at start: one more message
    sub = start_subscriber(broker.port, f"env/{station}/data", messages)
    cfg = write_config(tmp / "station.yaml", config)
    t0 = time.perf_counter()
    agent = AgentProcess(cfg)
    result = finish_subscriber(sub)
    total = time.perf_counter() - t0
    agent.stop()
    return result["seconds"], result["messages"], total


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def agent_drain_after_outage(tmp: Path, n: int, batch: int) -> tuple[float, int, float, float]:
    """The agent runs with the broker down and a backlog of n readings; then the broker starts."""
    db = tmp / "buffer.db"
    prefill(db, n)
    broker = Broker(tmp / "broker")  # not started: the outage
    station = "BENCH0001"
    config = sim_config(tmp, broker, station_id=station, channels=1, interval=3600,
                        mqtt={"max_batch": batch, "reconnect_max": 4})
    cfg = write_config(tmp / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        # Offline, the agent prepares its backlog's messages: wait until its CPU use levels off.
        time.sleep(2)
        last = cpu_seconds(agent.proc.pid)
        while True:
            time.sleep(1)
            now = cpu_seconds(agent.proc.pid)
            if now - last < 0.02:
                break
            last = now
        rss = rss_mb(agent.proc.pid, "VmHWM")
        sub = start_subscriber(broker.port, f"env/{station}/data", -(-n // batch) + 1, broker=broker)
        result = finish_subscriber(sub, timeout=120)
        time.sleep(2)  # the last acknowledgements
        rss_after = rss_mb(agent.proc.pid)
    finally:
        agent.stop()
        broker.stop()
    return result["seconds"], result["messages"], rss, rss_after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    from agent.publisher import WINDOW

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker").start()
        try:
            warm_s, warm_msgs, warm_rss, rss_after = agent_drain_after_outage(tmp / "warm", args.readings, args.batch)
            agent_s, agent_msgs, agent_total = agent_drain(broker, tmp / "agent", args.readings, args.batch)
            (tmp / "agent").mkdir(exist_ok=True)
            bare_s, bare_msgs = bare_paho(broker, tmp / "agent" / "buffer.db", "BENCH0001", args.batch, WINDOW)
        finally:
            broker.stop()
    agent_rate = args.readings / agent_s
    warm_rate = args.readings / warm_s
    bare_rate = args.readings / bare_s
    print(f"bench_drain  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cores  "
          f"python {platform.python_version()}")
    print(f"  backlog {args.readings} readings, max_batch {args.batch}, window {WINDOW} messages, QoS 1, "
          f"loopback mosquitto")
    print(f"  edge-agent after an outage : {warm_rate:>10,.0f} readings/s  ({warm_msgs} messages in {warm_s:.2f} s; "
          f"RSS with the backlog prepared {warm_rss:.1f} MB, after the drain {rss_after:.1f} MB)")
    print(f"  edge-agent cold start      : {agent_rate:>10,.0f} readings/s  ({agent_msgs} messages in {agent_s:.2f} s; "
          f"{agent_total:.2f} s including process start and connect)")
    print(f"  bare paho                  : {bare_rate:>10,.0f} readings/s  ({bare_msgs} messages in {bare_s:.2f} s)")
    print(f"  ratio after an outage      : {warm_rate / bare_rate:.2f} of the bare client (target >= 0.5)")
    print(f"  ratio cold start           : {agent_rate / bare_rate:.2f} of the bare client")


if __name__ == "__main__":
    main()
