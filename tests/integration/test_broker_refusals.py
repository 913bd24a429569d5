"""A broker that takes a message and drops it: too large for its `message_size_limit`, or not allowed by
its ACL. In MQTT 3.1.1 its PUBACK cannot say so (the readings would be marked sent and lost); the agent
speaks MQTT 5, whose PUBACK carries the refusal, and falls back to 3.1.1 for a broker without it."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest
from harness import AgentProcess, Broker, Collector, db_last_seq, run_cli, sim_config, wait_for, write_config

# An ACL that lets the station say its status and read commands, and refuses its data.
REFUSING_DATA = ("topic readwrite env/TEST0001/status", "topic readwrite env/TEST0001/cmd/#", "topic read env/#")


def acl_broker(tmp_path, *rules: str) -> Broker:
    """A started broker whose ACL (mosquitto's acl_file) holds `rules`, one per line."""
    acl = tmp_path / "acl"
    acl.write_text("".join(f"{rule}\n" for rule in rules))
    return Broker(tmp_path / "broker", extra=f"acl_file {acl}").start()


def test_a_broker_message_size_limit_below_a_batch_loses_nothing(tmp_path):
    """mosquitto acknowledges a message over `message_size_limit` and drops it. A poll of 20 channels is
    a ~2.5 kB message and a backlog batch of 200 readings ~26 kB: every one would have been marked sent."""
    broker = Broker(tmp_path / "broker", persistence=True, extra="message_size_limit 2000").start()
    platform = Collector(broker, "env/#", persistent=True)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=20, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 400, 20, "400 readings stored")
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: platform.has_readings_upto(target), 30, f"seqs 1..{target}")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    # Halved from what each refused message carried: a poll (20 readings, ~2.1 kB) gives 10, but a first
    # message that took several polls (a slow start) gives 20 then 10, or 30 then 15, or 25 then 12: halved
    # until a message fits, and never below half of what does not (19 readings may not)
    assert "Packet too large" in agent.log()
    limits = [int(n) for n in re.findall(r"carry at most (\d+) readings", agent.log())]
    assert limits and limits == sorted(limits, reverse=True) and 9 <= limits[-1] <= 19, agent.log()
    sizes = [len(p) for t, p, _ in platform.messages if t.endswith("/data")]
    assert max(sizes) <= 2000
    status = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    assert status["backlog"] == 0


def test_messages_refused_as_too_large_halve_the_batch_once_per_size(tmp_path):
    """Under a `message_size_limit` of 1000 bytes, 20 readings (~2.5 kB) are refused, then 10 (~1.3 kB),
    and 5 pass. The backlog after a refusal goes out as several messages at once, all refused: each
    may halve what was refused, not the limit already lowered (10 -> 5 -> 2 -> 1 reading a message)."""
    broker = Broker(tmp_path / "broker", persistence=True, extra="message_size_limit 1000").start()
    platform = Collector(broker, "env/#", persistent=True)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=20, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "carry at most 5 readings" in agent.log(), 30, "the batch halved to 5")
        wait_for(lambda: len(set(platform.reading_seqs())) >= 200, 30, "200 readings delivered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert "carry at most 2 readings" not in agent.log(), agent.log()
    assert max(len(p) for t, p, _ in platform.messages if t.endswith("/data")) <= 1000


def test_readings_the_acl_refuses_are_not_marked_sent(tmp_path):
    """mosquitto refuses a PUBLISH its ACL does not allow with an MQTT 5 PUBACK 0x87: the readings stay
    unsent (backlog, state offline with the reason) and are retried with backoff, not lost."""
    broker = acl_broker(tmp_path, *REFUSING_DATA)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=5, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "Not authorized" in agent.log(), 20, "the refusal logged")
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 50, 20, "readings stored")
        status = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
        assert status["sent_upto"] == 0 and status["backlog"] >= 50, status
        assert "Not authorized" in (status["broker"].get("error") or ""), status["broker"]
    finally:
        assert agent.stop() == 0
        broker.stop()


def test_a_connection_given_up_after_a_refusal_leaves_offline_retained_until_the_next_one(tmp_path):
    """An operator reads the fleet from the retained statuses. After a refused message the agent drops
    the connection and waits its backoff before the next: a goodbye (DISCONNECT) then kept the broker
    from publishing the Last Will, and `online` stayed retained while the station published nothing.
    The broker now says `offline` (the Will) until the agent is back, and `online` again when it is."""
    broker = acl_broker(tmp_path, *REFUSING_DATA)
    watcher = Collector(broker, "env/TEST0001/status")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=5, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "Not authorized" in agent.log(), 20, "the refusal logged")

        def states() -> list[str]:
            return [m["state"] for m in watcher.json_messages("/status")]

        offline = wait_for(lambda: "offline" in states()[1:] and states(), 20, "offline after the refusal")
        assert offline[0] == "online"
        assert [m.get("reason") for m in watcher.json_messages("/status") if m["state"] == "offline"][0] == \
            "connection lost", "the Will, not a deliberate stop"
        assert agent.alive()
        wait_for(lambda: states()[len(offline):].count("online") >= 1, 60, "online again at the next connection")
    finally:
        assert agent.stop() == 0
        watcher.close()
        broker.stop()


def test_a_resend_reply_the_acl_refuses_neither_holds_up_later_resends_nor_renews_the_connection(tmp_path):
    """A broker whose ACL lets the station publish data but not P/cmd/reply refuses the reply to a resend
    (MQTT 5 PUBACK 0x87). That refusal was handled like refused data: the connection dropped and made
    again, the job rewound and its reply refused again, for ever (a new connection every reconnect_max),
    and every later resend waited behind it. A refused reply is logged and the job is over."""
    broker = acl_broker(tmp_path, "topic readwrite env/TEST0001/status", "topic readwrite env/TEST0001/data",
                        "topic readwrite env/TEST0001/cmd", "topic read env/#")
    platform = Collector(broker, "env/TEST0001/data")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=3, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: platform.has_readings_upto(60), 20, "seqs 1..60")
        platform.client.publish("env/TEST0001/cmd", json.dumps({"id": "r1", "cmd": "resend", "from_seq": 1,
                                                                "to_seq": 30}), qos=1)
        wait_for(lambda: "refused a resend-reply" in agent.log(), 20, "the reply refused")
        platform.client.publish("env/TEST0001/cmd", json.dumps({"id": "r2", "cmd": "resend", "from_seq": 41,
                                                                "to_seq": 50}), qos=1)
        wait_for(lambda: platform.reading_seqs().count(45) == 2, 20, "the second resend served")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert agent.log().count("connected to") == 1, agent.log()


class Mqtt311OnlyBroker:
    """A broker that speaks only MQTT 3.1.1: a CONNECT of protocol level 5 is answered with return
    code 1 (unacceptable protocol version) and closed, as MQTT 3.1.1 §3.1.2.2 says; at level 4 it
    acknowledges every QoS 1 PUBLISH and keeps its topic (`silent`: a CONNECT of level 5 is closed
    without a word, as some brokers do); a SUBSCRIBE is answered `suback` (1: QoS 1 granted, 0x80:
    failure)."""

    def __init__(self, silent: bool = False, suback: int = 1) -> None:
        self.suback = suback
        self.silent = silent  # a CONNECT of level 5 is closed without a CONNACK, as some brokers do
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.levels: list[int] = []
        self.topics: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()[0]
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _packet(f) -> tuple[int, bytes] | None:
        head = f.read(1)
        if not head:
            return None
        length, shift = 0, 0
        while True:
            byte = f.read(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return head[0], f.read(length)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            try:
                packet = self._packet(f)
                if packet is None:
                    return
                level = packet[1][6]  # after the protocol name "MQTT" and its length
                self.levels.append(level)
                if level != 4:
                    if not self.silent:
                        conn.sendall(b"\x20\x02\x00\x01")
                    return
                conn.sendall(b"\x20\x02\x00\x00")
                while (packet := self._packet(f)) is not None:
                    kind, body = packet
                    if kind & 0xF0 == 0x30:  # PUBLISH (the agent's are QoS 1)
                        topic_len = int.from_bytes(body[:2], "big")
                        self.topics.append(body[2:2 + topic_len].decode())
                        conn.sendall(b"\x40\x02" + body[2 + topic_len:4 + topic_len])
                    elif kind & 0xF0 == 0x80:  # SUBSCRIBE
                        conn.sendall(b"\x90\x03" + body[:2] + bytes([self.suback]))
                    elif kind & 0xF0 == 0xC0:  # PINGREQ
                        conn.sendall(b"\xd0\x00")
                    elif kind & 0xF0 == 0xE0:  # DISCONNECT
                        return
            except (OSError, IndexError):
                return

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(("silent", "said"), [
    (False, "does not speak MQTT 5: using MQTT 3.1.1"),
    (True, "closed an MQTT 5 CONNECT without a CONNACK, then took MQTT 3.1.1"),
], ids=["refuses-mqtt5", "closes-mqtt5-without-a-word"])
def test_a_broker_without_mqtt5_is_spoken_to_in_mqtt311(tmp_path, silent, said):
    fake = Mqtt311OnlyBroker(silent=silent)
    config = sim_config(tmp_path, Broker(tmp_path / "unused"), channels=2, interval=0.2)
    config["mqtt"]["url"] = f"mqtt://127.0.0.1:{fake.port}"
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: fake.topics.count("env/TEST0001/data") >= 5, 20, "data through the 3.1.1 broker")
    finally:
        assert agent.stop() == 0
        fake.close()
    assert fake.levels[:2] == [5, 4], fake.levels
    assert said in agent.log()
    if not silent:
        assert "cannot connect" not in agent.log(), "the fallback is not an error"


def test_a_broker_that_takes_one_message_at_a_time_gets_the_whole_backlog(tmp_path):
    """mosquitto's `max_inflight_messages 1` is its MQTT 5 Receive Maximum, which a broker may enforce by
    disconnecting a client with more QoS 1 messages in flight (mosquitto 2.0 tolerates it). The agent
    heeds it, and the drain goes on one message at a time (paho refuses a new limit once connected:
    setting it through paho's API took the publisher down)."""
    broker = Broker(tmp_path / "broker", persistence=True, extra="max_inflight_messages 1").start()
    platform = Collector(broker, "env/#", persistent=True)
    broker.stop()
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=80, interval=0.1))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 5000, 30, "a backlog of 5000 readings")
        broker.start()
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: platform.has_readings_upto(target), 30, f"seqs 1..{target}")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert agent.log().count("connected to") == 1, "one connection drained it all"


def test_a_resend_too_large_for_the_broker_is_sent_in_smaller_messages(tmp_path):
    """Live polls of 2 channels pass a `message_size_limit` of 2000 bytes; a resend's batch of 60
    readings does not. The resend must shrink too, or it is refused again at every connection."""
    broker = Broker(tmp_path / "broker", extra="message_size_limit 2000").start()
    platform = Collector(broker, "env/#")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(set(platform.reading_seqs())) >= 60, 30, "60 readings live")
        assert "Packet too large" not in agent.log(), "live messages are small enough"
        platform.client.publish("env/TEST0001/cmd", json.dumps({"id": "r1", "cmd": "resend", "from_seq": 1,
                                                                "to_seq": 60}), qos=1)
        replies = lambda: [m for m in platform.json_messages("/cmd/reply") if m.get("id") == "r1"]  # noqa: E731
        wait_for(replies, 30, "the resend answered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert replies()[0]["ok"] is True and replies()[0]["count"] == 60, replies()
    assert platform.reading_seqs().count(1) == 2, "seq 1 live, then resent"


def test_a_refused_subscription_to_the_command_topic_is_logged(tmp_path):
    """A broker whose ACL lets the station publish but not read P/cmd answers SUBACK 0x80: the
    technician learns from the log why the platform's resend requests go unanswered."""
    fake = Mqtt311OnlyBroker(suback=0x80)
    config = sim_config(tmp_path, Broker(tmp_path / "unused"), channels=2, interval=0.2)
    config["mqtt"]["url"] = f"mqtt://127.0.0.1:{fake.port}"
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: "refused the subscription to env/TEST0001/cmd" in agent.log(), 20, "the refusal logged")
        wait_for(lambda: fake.topics.count("env/TEST0001/data") >= 5, 20, "data published all the same")
    finally:
        assert agent.stop() == 0
        fake.close()
