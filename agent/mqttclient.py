"""The paho client the publisher uses: paho's own, except that an oversized incoming PUBLISH is not kept.

A command on P/cmd is a few hundred bytes, and anything longer than the publisher's limit is refused
without being decoded (SPEC §4: answered ok:false and ignored). paho 2.x has no limit of its own on what
it receives, and with MQTT 3.1.1 the broker cannot be told one (MQTT 5's Maximum Packet Size): paho
gathers the whole packet in a bytearray, then copies it three times while splitting off the topic and
the packet id (`_packet.decode_publish`, `struct.unpack` of the rest each time). A 20 MB message on
P/cmd took the agent from 44 MB to ~104 MB resident, and glibc kept much of it afterwards.

`Client` keeps paho's reading, but once the packet being read is a PUBLISH longer than `keep` bytes
(the longest topic, the packet id and `keep_payload` bytes of payload), it drops the bytes received
past that before paho appends the next ones: paho still reads the whole packet off the socket (it must,
to stay in step with the stream), acknowledges it at QoS 1 and hands it to `on_message`, but with its
payload cut to its first bytes (`keep_payload` at least) and the last chunk received: always longer than
the publisher's limit, so it is refused as "larger than" and never looked into. The peak is then about
`keep` plus one socket read (64 KiB at most: paho would ask the socket for the whole rest at once).

It also takes an MQTT 5 PUBACK whose failure reason code MQTT 5 does not list for a PUBACK: mosquitto
answers a message over its `message_size_limit` with 0x95 (Packet too large), which paho 2.x finds
malformed and drops the connection for, so that the refused message is published again and again,
with no word of why. `Client` hands such a PUBACK to `on_publish` as a failure (`Refusal`).

And it heeds the broker's Receive Maximum (`heed_receive_maximum`), which paho 2.x ignores.

This reaches into paho's private names (`_sock_recv`, `_in_packet`, `_handle_pubackcomp`,
`_out_messages`, `_do_on_publish`, `_max_inflight_messages`); when a paho release no longer has them
as expected, `Client` behaves exactly as paho's (the check is done at each packet).
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

PUBLISH = 0x30
MAX_TOPIC = 65_535  # an MQTT topic's longest (its length is two bytes)
RECV_CHUNK = 65_536  # the most asked of the socket at once while a long packet is read
UNLISTED_PUBACK_CODES = {0x95: "Packet too large"}  # failure codes brokers put in a PUBACK beyond MQTT 5's list


class Refusal:
    """A PUBACK failure reason code that paho's `ReasonCode` does not take for a PUBACK."""

    is_failure = True

    def __init__(self, value: int):
        self.value = value

    def __str__(self) -> str:
        return f"{UNLISTED_PUBACK_CODES.get(self.value, 'Unlisted reason code')} (0x{self.value:02x})"


class Client(mqtt.Client):
    """paho's client with a bound on what an incoming PUBLISH may hold in memory (see the module)."""

    def __init__(self, *args, keep_payload: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = 2 + MAX_TOPIC + 2 + keep_payload  # topic length, topic, packet id, payload kept
        self.cut_packets = 0  # oversized PUBLISH packets received so far (for tests and logs)
        self._cutting = False

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = getattr(self, "_in_packet", None)
        if not isinstance(packet, dict):  # not the paho this was written for: do as paho does
            return super()._sock_recv(bufsize)
        if not packet.get("have_remaining"):  # a new packet's fixed header is being read
            self._cutting = False
            return super()._sock_recv(bufsize)
        body = packet.get("packet")
        long_publish = (packet.get("command", 0) & 0xF0 == PUBLISH
                        and packet.get("remaining_length", 0) > self.keep and isinstance(body, bytearray))
        if not long_publish:
            return super()._sock_recv(bufsize)
        if not self._cutting:
            self._cutting = True
            self.cut_packets += 1
        if len(body) > self.keep:
            del body[self.keep:]  # what paho appended last time: read, never kept
        return super()._sock_recv(min(bufsize, RECV_CHUNK))

    def heed_receive_maximum(self, value: int) -> None:
        """MQTT 5: the broker takes at most `value` QoS 1 messages in flight (CONNACK's Receive Maximum;
        mosquitto's `max_inflight_messages`) and drops a client that sends more. paho 2.x neither heeds it
        nor lets its own limit change once connected; called on CONNACK, before anything is published,
        it lowers that limit (paho queues the rest and sends each as a PUBACK makes room)."""
        if value > 0 and (self._max_inflight_messages == 0 or value < self._max_inflight_messages):
            self._max_inflight_messages = value

    def _handle_pubackcomp(self, cmd):
        packet = self._in_packet.get("packet") if isinstance(getattr(self, "_in_packet", None), dict) else None
        if (cmd != "PUBACK" or self._protocol != mqtt.MQTTv5 or not isinstance(packet, (bytes, bytearray))
                or len(packet) < 3 or packet[2] < 0x80 or _listed(packet[2])):
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, Refusal(packet[2]), Properties(PacketTypes.PUBACK))
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


def _listed(code: int) -> bool:
    try:
        ReasonCode(PacketTypes.PUBACK, identifier=code)
    except Exception:  # noqa: BLE001 - paho raises a bare KeyError/ValueError for a name it lacks
        return False
    return True
