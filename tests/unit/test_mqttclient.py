"""agent.mqttclient.Client against a real mosquitto: an oversized PUBLISH costs its first bytes, not its size."""

from __future__ import annotations

import threading
import tracemalloc

import paho.mqtt.client as mqtt
from harness import wait_for
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqttclient import Client

KEEP = 4097
BIG = 8_000_000


def _receiver(broker, topic: str) -> tuple[Client, list[bytes], threading.Event]:
    got: list[bytes] = []
    subscribed = threading.Event()
    client = Client(CallbackAPIVersion.VERSION2, client_id="receiver", protocol=mqtt.MQTTv311, keep_payload=KEEP)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect("127.0.0.1", broker.port)
    return client, got, subscribed


def _sender(broker) -> mqtt.Client:
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sender")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    return sender


def test_an_oversized_publish_is_received_cut_and_acknowledged_without_holding_its_size(broker):
    """A 8 MB message arrives as a payload still longer than the limit (so it is refused as such) but
    cut to well under 200 kB, and reading it never holds it in memory (paho alone: ~3 copies of it);
    the connection stays in step: the broker does not send it again, and the next message is whole."""
    client, got, subscribed = _receiver(broker, "cmd")
    sender = _sender(broker)
    try:
        wait_for(lambda: client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and subscribed.is_set(), 10, "subscribed")
        big = b"{" + b"x" * BIG + b"}"
        sender.publish("cmd", big, qos=1).wait_for_publish(30)
        del big
        tracemalloc.start()
        try:
            wait_for(lambda: client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and got, 60, "the big message")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sender.publish("cmd", b'{"id": 1, "cmd": "ping"}', qos=1).wait_for_publish(10)
        wait_for(lambda: client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and len(got) >= 2, 20, "the next message")
        for _ in range(20):  # a big message left unacknowledged would come again (QoS 1)
            client.loop(0.05)
    finally:
        sender.loop_stop()
        sender.disconnect()
        client.disconnect()
    assert KEEP < len(got[0]) < 200_000, len(got[0])
    assert got[0].startswith(b"{xxx"), "its first bytes are kept"
    assert got[1:] == [b'{"id": 1, "cmd": "ping"}'], "nothing again, the next message whole"
    assert client.cut_packets == 1
    assert peak < 1_000_000, f"receiving {BIG / 1e6:.0f} MB took {peak / 1e6:.1f} MB at its peak"


def test_messages_up_to_the_limit_are_untouched(broker):
    client, got, subscribed = _receiver(broker, "cmd")
    sender = _sender(broker)
    try:
        wait_for(lambda: client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and subscribed.is_set(), 10, "subscribed")
        sizes = [0, 1, KEEP, 60_000]  # the last one is over the limit but under `keep` (topic room included)
        for n in sizes:
            sender.publish("cmd", b"y" * n, qos=1).wait_for_publish(10)
        wait_for(lambda: client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and len(got) == len(sizes), 20, "the messages")
    finally:
        sender.loop_stop()
        sender.disconnect()
        client.disconnect()
    assert [len(p) for p in got] == sizes and client.cut_packets == 0


def test_the_paho_internals_the_client_reaches_into_are_there():
    """`Client` overrides paho's PUBACK handler and calls its `_do_on_publish` to hand a refusal (0x95)
    to `on_publish`, and lowers `_max_inflight_messages` to the broker's Receive Maximum: a paho release
    that renames or reshapes them must fail here, not in the field (a TypeError there would stop the
    publisher, hence the agent, at each refusal)."""
    import inspect

    client = Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5, keep_payload=KEEP)
    assert list(inspect.signature(mqtt.Client._handle_pubackcomp).parameters) == ["self", "cmd"]
    assert list(inspect.signature(mqtt.Client._do_on_publish).parameters) == [
        "self", "mid", "reason_code", "properties"]
    for name in ("_out_messages", "_out_message_mutex", "_max_inflight_messages", "_protocol", "_in_packet"):
        assert hasattr(client, name), name
    client.heed_receive_maximum(1)
    assert client._max_inflight_messages == 1
